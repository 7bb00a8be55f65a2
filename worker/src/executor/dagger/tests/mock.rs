//! The exact queries each task shape sends, through a recording mock of the SDK's
//! GraphQL client (compared with arguments in name order).

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use dagger_sdk::core::gql_client::GraphQLErrorMessage;
use dagger_sdk::core::graphql_client::{GraphQLClient, GraphQLError};
use scabbard_common::proto;
use sha2::Digest;
use tokio::sync::mpsc;

use super::super::gql::{LoggedClient, query_over};
use super::super::{container, plan};
use super::support::{Responder, Script, normalize};
use super::*;
use crate::config::DaggerConfig;
use crate::executor::ExecOutcome;
use crate::redact::Secrets;

/// Records every query and answers from a [`Responder`].
pub(super) struct Recorder {
    pub(super) queries: Mutex<Vec<String>>,
    responder: Responder,
}

#[async_trait]
impl GraphQLClient for Recorder {
    async fn query(&self, query: &str) -> Result<Option<serde_json::Value>, GraphQLError> {
        self.queries.lock().unwrap().push(query.to_string());
        match self.responder.answer(query) {
            Ok(data) => Ok(Some(data)),
            Err(errors) => {
                let fields: Vec<GraphQLErrorMessage> = serde_json::from_value(errors).unwrap();
                Err(GraphQLError::DomainError {
                    message: fields[0].message.clone(),
                    fields,
                })
            }
        }
    }
}

struct Ran {
    outcome: ExecOutcome,
    queries: Vec<String>,
    chunks: Vec<crate::executor::OutputChunk>,
}

async fn run_mock(
    spec: &proto::TaskSpec,
    cfg: &DaggerConfig,
    script: Script,
    export_dir: &std::path::Path,
) -> Ran {
    let Some(proto::task_spec::Kind::Container(task)) = &spec.kind else {
        panic!("container spec");
    };
    let plan = plan::plan(task, spec, cfg).expect("plan");
    let recorder = Arc::new(Recorder {
        queries: Mutex::default(),
        responder: Responder::new(script),
    });
    let secrets = Arc::new(Secrets::new(plan.secret_values()));
    let client = query_over(Arc::new(LoggedClient {
        inner: recorder.clone(),
        secrets,
    }));
    let (tx, mut rx) = mpsc::channel(1024);
    let outcome = container::run_pipeline(client, plan, tx, export_dir.to_path_buf()).await;
    let mut chunks = Vec::new();
    while let Some(c) = rx.recv().await {
        chunks.push(c);
    }
    let queries = recorder.queries.lock().unwrap().clone();
    Ran {
        outcome,
        queries,
        chunks,
    }
}

/// Log output captured for the current thread (the production filter applied).
struct Captured {
    buf: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Captured {
    fn start(silenced: bool) -> Self {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let mut filter = tracing_subscriber::EnvFilter::new("trace");
        if silenced {
            filter = scabbard_common::logging::silence_secrets(filter);
        }
        let writer = {
            let buf = buf.clone();
            move || SharedBuf(buf.clone())
        };
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(writer)
            .finish();
        Self {
            buf,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }
}

struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuf {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn assert_queries(got: &[String], want: &[String]) {
    let got: Vec<String> = got.iter().map(|q| normalize(q)).collect();
    let want: Vec<String> = want.iter().map(|q| normalize(q)).collect();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "query {i} differs");
    }
    assert_eq!(got.len(), want.len(), "query count; got {got:#?}");
}

/// The three reads after a step whose container is `ctr-N`.
fn reads(step: usize) -> Vec<String> {
    ["exitCode", "stdout", "stderr"]
        .iter()
        .map(|f| format!(r#"query{{node(id:"ctr-{step}"){{... on Container{{{f}}}}}}}"#))
        .collect()
}

fn then_exec(step: usize, args: &str) -> String {
    format!(
        r#"query{{node(id:"ctr-{step}"){{... on Container{{withExec(args:{args}, expect:ANY){{sync}}}}}}}}"#
    )
}

#[tokio::test]
async fn env_and_several_steps() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = container_spec(
        "alpine:3.20",
        &[
            &["echo", "hi"],
            &["sh", "-c", "echo \"two\" > /x"],
            &["true"],
        ],
    );
    spec.env.insert("B".into(), "2".into());
    spec.env.insert("A".into(), "1 \"quoted\"".into());
    container_mut(&mut spec).workdir = "/src".into();
    let script = Script {
        stdout: [(1, "hi\n".to_string()), (3, "done\n".to_string())].into(),
        stderr: [(2, "warning\n".to_string())].into(),
        ..Default::default()
    };
    let ran = run_mock(&spec, &DaggerConfig::default(), script, dir.path()).await;
    let mut want = vec![
        r#"query{container{from(address:"alpine:3.20"){withEnvVariable(name:"A", value:"1 \"quoted\""){withEnvVariable(name:"B", value:"2"){withWorkdir(path:"/src"){withExec(args:["echo","hi"], expect:ANY){sync}}}}}}}"#.to_string(),
    ];
    want.extend(reads(1));
    want.push(then_exec(1, r#"["sh","-c","echo \"two\" > /x"]"#));
    want.extend(reads(2));
    want.push(then_exec(2, r#"["true"]"#));
    want.extend(reads(3));
    assert_queries(&ran.queries, &want);
    assert_eq!(ran.outcome, ExecOutcome::succeeded());
    assert_eq!(text(&ran.chunks, OutStream::Stdout), "hi\ndone\n");
    assert_eq!(text(&ran.chunks, OutStream::Stderr), "warning\n");
    let system = text(&ran.chunks, OutStream::System);
    assert!(
        system.contains("step 1: echo hi\nstep 2: sh -c"),
        "{system}"
    );
}

#[tokio::test]
async fn secrets_are_resolved_first_and_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "file-s3cret\n").unwrap();
    let cfg = DaggerConfig {
        secrets: [(
            "deploy".to_string(),
            crate::config::SecretSource::File(key_file),
        )]
        .into(),
        ..Default::default()
    };
    let mut spec = container_spec("alpine", &[&["sh", "-c", "use $KEY $TOKEN"]]);
    spec.secret_env.insert("TOKEN".into(), "env-s3cret".into());
    container_mut(&mut spec).secrets.push(proto::SecretRef {
        env: "KEY".into(),
        source: "deploy".into(),
    });
    let script = Script {
        stdout: [(1, "ok\n".to_string())].into(),
        ..Default::default()
    };
    let silenced = Captured::start(true);
    let ran = run_mock(&spec, &cfg, script, dir.path()).await;
    let logged = silenced.text();
    drop(silenced);
    let mut want = vec![
        r#"query{setSecret(name:"scabbard-source-deploy", plaintext:"file-s3cret"){id}}"#.to_string(),
        r#"query{setSecret(name:"scabbard-env-TOKEN", plaintext:"env-s3cret"){id}}"#.to_string(),
        r#"query{container{from(address:"alpine"){withSecretVariable(name:"KEY", secret:"secret-1"){withSecretVariable(name:"TOKEN", secret:"secret-2"){withExec(args:["sh","-c","use $KEY $TOKEN"], expect:ANY){sync}}}}}}"#.to_string(),
    ];
    want.extend(reads(1));
    assert_queries(&ran.queries, &want);
    assert_eq!(ran.outcome, ExecOutcome::succeeded());
    // The values travel in setSecret only, never as plain variables...
    for value in ["file-s3cret", "env-s3cret"] {
        let carrying: Vec<&String> = ran.queries.iter().filter(|q| q.contains(value)).collect();
        assert_eq!(carrying.len(), 1, "{value}: {carrying:?}");
        assert!(carrying[0].contains("setSecret"));
        // ...and are not in the log, the chunks or the result.
        assert!(!logged.contains(value), "{value} logged:\n{logged}");
        assert!(!format!("{:?}", ran.chunks).contains(value));
        assert!(!format!("{:?}", ran.outcome).contains(value));
    }
    assert!(
        logged.contains("dagger query") && logged.contains("plaintext:\"***\""),
        "{logged}"
    );
    // Without the production filter the SDK itself would log the plaintext.
    let unfiltered = Captured::start(false);
    let _ = run_mock(&spec, &cfg, Script::default(), dir.path()).await;
    assert!(
        unfiltered.text().contains("env-s3cret"),
        "the SDK no longer logs queries?"
    );
}

#[tokio::test]
async fn registry_auth_comes_before_the_pull() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "registry-pw").unwrap();
    let cfg = DaggerConfig {
        registries: [(
            "ghcr.io".to_string(),
            crate::config::RegistryAuth {
                username: "bot".into(),
                password_env: None,
                password_file: Some(pw),
            },
        )]
        .into(),
        ..Default::default()
    };
    let mut spec = container_spec("ghcr.io/org/app:1", &[&["app", "--version"]]);
    container_mut(&mut spec).registry_auth = "ghcr.io".into();
    let ran = run_mock(&spec, &cfg, Script::default(), dir.path()).await;
    let mut want = vec![
        r#"query{setSecret(name:"scabbard-registry-ghcr.io", plaintext:"registry-pw"){id}}"#.to_string(),
        r#"query{container{withRegistryAuth(address:"ghcr.io", secret:"secret-1", username:"bot"){from(address:"ghcr.io/org/app:1"){withExec(args:["app","--version"], expect:ANY){sync}}}}}"#.to_string(),
    ];
    want.extend(reads(1));
    assert_queries(&ran.queries, &want);
    assert!(!format!("{:?}", ran.outcome).contains("registry-pw"));
}

#[tokio::test]
async fn cache_volumes_carry_their_sharing_mode() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = container_spec("golang", &[&["go", "build"]]);
    let caches = &mut container_mut(&mut spec).caches;
    for (volume, path, sharing) in [
        ("gomod", "/go/pkg/mod", proto::CacheSharing::Locked),
        ("gobuild", "/root/.cache", proto::CacheSharing::Private),
        ("tmp", "/tmp/c", proto::CacheSharing::Unspecified),
    ] {
        caches.push(proto::CacheMount {
            volume: volume.into(),
            path: path.into(),
            sharing: sharing as i32,
        });
    }
    let ran = run_mock(
        &spec,
        &DaggerConfig::default(),
        Script::default(),
        dir.path(),
    )
    .await;
    let mut want = vec![
        r#"query{cacheVolume(key:"gomod"){id}}"#.to_string(),
        r#"query{cacheVolume(key:"gobuild"){id}}"#.to_string(),
        r#"query{cacheVolume(key:"tmp"){id}}"#.to_string(),
        r#"query{container{from(address:"golang"){withMountedCache(cache:"cache-1", path:"/go/pkg/mod", sharing:LOCKED){withMountedCache(cache:"cache-2", path:"/root/.cache", sharing:PRIVATE){withMountedCache(cache:"cache-3", path:"/tmp/c"){withExec(args:["go","build"], expect:ANY){sync}}}}}}}"#.to_string(),
    ];
    want.extend(reads(1));
    assert_queries(&ran.queries, &want);
}

#[tokio::test]
async fn host_directories_are_resolved_with_their_excludes() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(ws.join("repo")).unwrap();
    let cfg = DaggerConfig {
        workspace_root: Some(ws.clone()),
        ..Default::default()
    };
    let mut spec = container_spec("node:22", &[&["npm", "ci"]]);
    container_mut(&mut spec)
        .directories
        .push(proto::DirectoryMount {
            host_path: "repo".into(),
            path: "/app".into(),
            exclude: vec!["node_modules/".into(), "*.log".into()],
        });
    let ran = run_mock(&spec, &cfg, Script::default(), dir.path()).await;
    let host = std::fs::canonicalize(ws.join("repo")).unwrap();
    let mut want = vec![
        format!(
            r#"query{{host{{directory(exclude:["node_modules/","*.log"], path:"{}"){{id}}}}}}"#,
            host.display()
        ),
        r#"query{container{from(address:"node:22"){withDirectory(path:"/app", source:"dir-1"){withExec(args:["npm","ci"], expect:ANY){sync}}}}}"#.to_string(),
    ];
    want.extend(reads(1));
    assert_queries(&ran.queries, &want);
}

#[tokio::test]
async fn first_failing_step_ends_the_pipeline_with_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let spec = container_spec("alpine", &[&["a"], &["b"], &["c"]]);
    let script = Script {
        exit_codes: [(2, 3)].into(),
        stdout: [(1, "one\n".to_string()), (2, "two\n".to_string())].into(),
        stderr: [(2, "broken\n".to_string())].into(),
        ..Default::default()
    };
    let ran = run_mock(&spec, &DaggerConfig::default(), script, dir.path()).await;
    let mut want = vec![
        r#"query{container{from(address:"alpine"){withExec(args:["a"], expect:ANY){sync}}}}"#
            .to_string(),
    ];
    want.extend(reads(1));
    want.push(then_exec(1, r#"["b"]"#));
    want.extend(reads(2));
    assert_queries(&ran.queries, &want);
    assert_eq!(ran.outcome.outcome, proto::Outcome::Failed);
    assert_eq!(ran.outcome.error_class, proto::ErrorClass::User);
    assert_eq!(ran.outcome.exit_code, 3);
    assert_eq!(ran.outcome.message, "step 2 exited with code 3");
    assert_eq!(text(&ran.chunks, OutStream::Stdout), "one\ntwo\n");
    assert_eq!(text(&ran.chunks, OutStream::Stderr), "broken\n");
}

#[tokio::test]
async fn container_path_outputs_are_exported_with_digests() {
    let dir = tempfile::tempdir().unwrap();
    let export_dir = dir.path().join("outputs");
    let mut spec = container_spec("alpine", &[&["build"]]);
    for (name, source) in [
        (
            "bin",
            proto::output_spec::Source::ContainerPath("/out/app".into()),
        ),
        (
            "dist",
            proto::output_spec::Source::ContainerPath("/out/dist".into()),
        ),
        ("version", proto::output_spec::Source::LastStdoutLine(true)),
    ] {
        spec.outputs.push(proto::OutputSpec {
            name: name.into(),
            source: Some(source),
        });
    }
    let script = Script {
        stdout: [(1, "building\nv1.2.3\n".to_string())].into(),
        paths: [
            ("/out/app".to_string(), false),
            ("/out/dist".to_string(), true),
        ]
        .into(),
        ..Default::default()
    };
    let ran = run_mock(&spec, &DaggerConfig::default(), script, &export_dir).await;
    let bin = export_dir.join("bin");
    let dist = export_dir.join("dist");
    let on_ctr =
        |field: String| format!(r#"query{{node(id:"ctr-1"){{... on Container{{{field}}}}}}}"#);
    let mut want = vec![
        r#"query{container{from(address:"alpine"){withExec(args:["build"], expect:ANY){sync}}}}"#
            .to_string(),
    ];
    want.extend(reads(1));
    want.extend([
        on_ctr(r#"exists(path:"/out/app")"#.into()),
        on_ctr(r#"exists(expectedType:DIRECTORY_TYPE, path:"/out/app")"#.into()),
        on_ctr(format!(
            r#"file(path:"/out/app"){{export(path:"{}")}}"#,
            bin.display()
        )),
        on_ctr(r#"exists(path:"/out/dist")"#.into()),
        on_ctr(r#"exists(expectedType:DIRECTORY_TYPE, path:"/out/dist")"#.into()),
        on_ctr(format!(
            r#"directory(path:"/out/dist"){{export(path:"{}")}}"#,
            dist.display()
        )),
    ]);
    assert_queries(&ran.queries, &want);
    assert_eq!(
        ran.outcome.outcome,
        proto::Outcome::Succeeded,
        "{:?}",
        ran.outcome
    );
    let o = &ran.outcome.outputs;
    assert_eq!(o["bin"], bin.display().to_string());
    assert_eq!(std::fs::read_to_string(&bin).unwrap(), "exported /out/app");
    assert_eq!(
        o["bin.digest"],
        "sha256:".to_string() + &hex::encode(sha2::Sha256::digest(b"exported /out/app"))
    );
    assert_eq!(o["dist"], dist.display().to_string());
    assert_eq!(
        o["dist.digest"],
        super::super::digest::digest_path(&dist).unwrap()
    );
    assert_eq!(o["version"], "v1.2.3");
    assert_eq!(o.len(), 5);
}

#[tokio::test]
async fn a_missing_container_path_fails_the_task() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = container_spec("alpine", &[&["true"]]);
    spec.outputs.push(proto::OutputSpec {
        name: "report".into(),
        source: Some(proto::output_spec::Source::ContainerPath(
            "/report.xml".into(),
        )),
    });
    let ran = run_mock(
        &spec,
        &DaggerConfig::default(),
        Script::default(),
        dir.path(),
    )
    .await;
    assert_eq!(ran.outcome.outcome, proto::Outcome::Failed);
    assert_eq!(ran.outcome.error_class, proto::ErrorClass::User);
    assert!(
        ran.outcome.message.contains("/report.xml does not exist"),
        "{}",
        ran.outcome.message
    );
}

#[tokio::test]
async fn engine_errors_are_infrastructure_and_exec_errors_are_the_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let spec = container_spec("no/such:image", &[&["true"]]);
    let script = Script {
        engine_error_on: Some("no/such:image".into()),
        ..Default::default()
    };
    let ran = run_mock(&spec, &DaggerConfig::default(), script, dir.path()).await;
    assert_eq!(ran.outcome.outcome, proto::Outcome::Failed);
    assert_eq!(ran.outcome.error_class, proto::ErrorClass::Infrastructure);
    assert!(
        ran.outcome.message.contains("failed to resolve image"),
        "{}",
        ran.outcome.message
    );

    let spec = container_spec("alpine", &[&["false"]]);
    let script = Script {
        exec_error_on: Some("withExec".into()),
        ..Default::default()
    };
    let ran = run_mock(&spec, &DaggerConfig::default(), script, dir.path()).await;
    assert_eq!(
        ran.outcome.error_class,
        proto::ErrorClass::User,
        "{:?}",
        ran.outcome
    );
    assert_eq!(ran.outcome.exit_code, 5);
    assert_eq!(text(&ran.chunks, OutStream::Stdout), "exec out");
    assert_eq!(text(&ran.chunks, OutStream::Stderr), "exec err");
}
