//! The exact queries each task shape sends, through a recording mock of the SDK's
//! GraphQL client (compared with arguments in name order). The shapes of sources, GPUs,
//! publish, `$SCABBARD_OUTPUT`, inputs and artifacts are in [`super::mock_results`];
//! secrets in [`super::mock_secrets`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use dagger_sdk::core::gql_client::GraphQLErrorMessage;
use dagger_sdk::core::graphql_client::{GraphQLClient, GraphQLError};
use scabbard_common::proto;
use sha2::Digest;
use tokio::sync::mpsc;

use super::super::container::AttemptDirs;
use super::super::gql::{LoggedClient, query_over};
use super::super::{container, plan};
use super::support::{Responder, Script, chain, normalize};
use super::*;
use crate::config::DaggerConfig;
use crate::executor::{ExecContext, ExecOutcome};
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

pub(super) struct Ran {
    pub(super) outcome: ExecOutcome,
    pub(super) queries: Vec<String>,
    pub(super) chunks: Vec<crate::executor::OutputChunk>,
    /// The attempt's work dir (step outputs pass through `steps/`, exports land in
    /// `outputs/`).
    pub(super) work: PathBuf,
}

/// Runs `spec` as the attempt of `tests::ctx(root)` (project `default`).
pub(super) async fn run_mock(
    spec: &proto::TaskSpec,
    cfg: &DaggerConfig,
    script: Script,
    root: &Path,
) -> Ran {
    run_mock_in(spec, cfg, script, ctx(root)).await
}

/// Runs `spec` as the attempt `ctx`; the work dir is `<work_root>/work`.
pub(super) async fn run_mock_in(
    spec: &proto::TaskSpec,
    cfg: &DaggerConfig,
    script: Script,
    ctx: ExecContext,
) -> Ran {
    let Some(proto::task_spec::Kind::Container(task)) = &spec.kind else {
        panic!("container spec");
    };
    let plan = plan::plan(task, spec, cfg, &ctx).expect("plan");
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
    let work = ctx.work_root.join("work");
    let dirs = AttemptDirs {
        work: work.clone(),
        artifacts: ctx.artifact_dir.clone(),
    };
    let outcome = container::run_pipeline(client, plan, tx, dirs).await;
    let mut chunks = Vec::new();
    while let Some(c) = rx.recv().await {
        chunks.push(c);
    }
    let queries = recorder.queries.lock().unwrap().clone();
    Ran {
        outcome,
        queries,
        chunks,
        work,
    }
}

pub(super) fn assert_queries(got: &[String], want: &[String]) {
    let got: Vec<String> = got.iter().map(|q| normalize(q)).collect();
    let want: Vec<String> = want.iter().map(|q| normalize(q)).collect();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "query {i} differs");
    }
    assert_eq!(got.len(), want.len(), "query count; got {got:#?}");
}

/// `SCABBARD_OUTPUT`, the scratch directory (`scratch-1`): the base's fixed part.
pub(super) const SCABBARD_BASE: [&str; 2] = [
    r#"withEnvVariable(name:"SCABBARD_OUTPUT", value:"/scabbard/output")"#,
    r#"withDirectory(path:"/scabbard", source:"scratch-1")"#,
];

/// The attempt id of `tests::ctx`, set before the first step not cached.
pub(super) const NONCE: &str = r#"withEnvVariable(name:"SCABBARD_ATTEMPT_ID", value:"task-1/7")"#;

/// The query creating the scratch directory for `steps` steps.
pub(super) fn scratch(steps: usize) -> String {
    let file =
        |path: String| format!(r#"withNewFile(contents:"", path:"{path}", permissions:438)"#);
    let mut fields = vec!["directory".to_string(), file("output".into())];
    for n in 1..=steps {
        fields.push(file(format!("steps/{n}.out")));
        fields.push(file(format!("steps/{n}.err")));
    }
    fields.push("id".into());
    let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
    chain(&fields)
}

/// Step `n`'s `withExec` (`args` as JSON).
pub(super) fn exec(args: &str, n: usize) -> String {
    format!(
        r#"withExec(args:{args}, expect:ANY, redirectStderr:"/scabbard/steps/{n}.err", redirectStdout:"/scabbard/steps/{n}.out")"#
    )
}

/// A query on the container of step `n` (`ctr-n`).
pub(super) fn on_ctr(n: usize, fields: &[&str]) -> String {
    let node = format!(r#"node(id:"ctr-{n}")"#);
    let mut all = vec![node.as_str(), "... on Container"];
    all.extend_from_slice(fields);
    chain(&all)
}

/// What follows step `n`'s `sync`: its exit code, then its output files exported to the
/// work dir.
pub(super) fn after_step(work: &Path, n: usize) -> Vec<String> {
    let mut queries = vec![on_ctr(n, &["exitCode"])];
    for stream in ["out", "err"] {
        let file = format!(r#"file(path:"/scabbard/steps/{n}.{stream}")"#);
        let export = format!(r#"export(path:"{}/steps/{n}.{stream}")"#, work.display());
        queries.push(on_ctr(n, &[&file, &export]));
    }
    queries
}

/// The size of `$SCABBARD_OUTPUT` after the last step `n`.
pub(super) fn output_size(n: usize) -> String {
    on_ctr(n, &[r#"file(path:"/scabbard/output")"#, "size"])
}

/// Step `n` after step `n - 1`: `extra` fields (the attempt id), then the exec.
pub(super) fn then_exec(n: usize, extra: &[&str], args: &str) -> String {
    let exec = exec(args, n);
    let mut fields: Vec<&str> = extra.to_vec();
    fields.push(&exec);
    fields.push("sync");
    on_ctr(n - 1, &fields)
}

/// The first query that runs something: `container`, `before` (the pull and what comes
/// before the scratch part), the scratch part, `after` (mounts, workdir, the attempt id),
/// step 1 and `sync`.
pub(super) fn first_step(before: &[&str], after: &[&str], args: &str) -> String {
    let exec = exec(args, 1);
    let mut fields = vec!["container"];
    fields.extend_from_slice(before);
    fields.extend_from_slice(&SCABBARD_BASE);
    fields.extend_from_slice(after);
    fields.push(&exec);
    fields.push("sync");
    chain(&fields)
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
        scratch(3),
        first_step(
            &[
                r#"from(address:"alpine:3.20")"#,
                r#"withEnvVariable(name:"A", value:"1 \"quoted\"")"#,
                r#"withEnvVariable(name:"B", value:"2")"#,
            ],
            &[r#"withWorkdir(path:"/src")"#, NONCE],
            r#"["echo","hi"]"#,
        ),
    ];
    want.extend(after_step(&ran.work, 1));
    want.push(then_exec(2, &[], r#"["sh","-c","echo \"two\" > /x"]"#));
    want.extend(after_step(&ran.work, 2));
    want.push(then_exec(3, &[], r#"["true"]"#));
    want.extend(after_step(&ran.work, 3));
    want.push(output_size(3));
    assert_queries(&ran.queries, &want);
    assert_eq!(ran.outcome, ExecOutcome::succeeded());
    assert_eq!(text(&ran.chunks, OutStream::Stdout), "hi\ndone\n");
    assert_eq!(text(&ran.chunks, OutStream::Stderr), "warning\n");
    let system = text(&ran.chunks, OutStream::System);
    assert!(
        system.contains("step 1: echo hi\nstep 2: sh -c"),
        "{system}"
    );
    // The step files passed through the work dir and are gone.
    assert_eq!(
        std::fs::read_dir(ran.work.join("steps")).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn step_output_is_streamed_in_bounded_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let spec = container_spec("alpine", &[&["gen"]]);
    let big: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    let script = Script {
        stdout: [(1, format!("{big}\nthe last line\n\n"))].into(),
        ..Default::default()
    };
    let mut spec = spec;
    spec.outputs.push(proto::OutputSpec {
        name: "last".into(),
        source: Some(proto::output_spec::Source::LastStdoutLine(true)),
    });
    let ran = run_mock(&spec, &DaggerConfig::default(), script, dir.path()).await;
    let stdout: Vec<&crate::executor::OutputChunk> = ran
        .chunks
        .iter()
        .filter(|c| c.stream == OutStream::Stdout)
        .collect();
    assert!(stdout.len() > 2, "{} chunks", stdout.len());
    assert!(stdout.iter().all(|c| c.data.len() <= 64 * 1024));
    assert_eq!(
        text(&ran.chunks, OutStream::Stdout),
        format!("{big}\nthe last line\n\n")
    );
    assert_eq!(ran.outcome.outputs["last"], "the last line");
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
                projects: Some(vec!["default".into()]),
            },
        )]
        .into(),
        ..Default::default()
    };
    let mut spec = container_spec("ghcr.io/org/app:1", &[&["app", "--version"]]);
    container_mut(&mut spec).registry_auth = "ghcr.io".into();
    let ran = run_mock(&spec, &cfg, Script::default(), dir.path()).await;
    let mut want = vec![
        r#"query{setSecret(name:"scabbard-registry-ghcr.io", plaintext:"registry-pw"){id}}"#
            .to_string(),
        scratch(1),
        first_step(
            &[
                r#"withRegistryAuth(address:"ghcr.io", secret:"secret-1", username:"bot")"#,
                r#"from(address:"ghcr.io/org/app:1")"#,
            ],
            &[NONCE],
            r#"["app","--version"]"#,
        ),
    ];
    want.extend(after_step(&ran.work, 1));
    want.push(output_size(1));
    assert_queries(&ran.queries, &want);
    assert!(!format!("{:?}", ran.outcome).contains("registry-pw"));
}

#[tokio::test]
async fn cache_volumes_are_namespaced_by_project_and_carry_their_sharing_mode() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = container_spec("golang", &[&["go", "build"]]);
    let caches = &mut container_mut(&mut spec).caches;
    for (volume, path, sharing) in [
        ("gomod", "/go/pkg/mod", proto::CacheSharing::Locked),
        ("gobuild", "/root/.cache", proto::CacheSharing::Private),
        ("apt", "/var/cache/apt", proto::CacheSharing::Unspecified),
    ] {
        caches.push(proto::CacheMount {
            volume: volume.into(),
            path: path.into(),
            sharing: sharing as i32,
        });
    }
    let cfg = DaggerConfig {
        caches: [(
            "apt".to_string(),
            crate::config::CacheVolumeConfig {
                projects: None,
                shared: true,
            },
        )]
        .into(),
        ..Default::default()
    };
    let mut c = ctx(dir.path());
    c.project = "web".into();
    let ran = run_mock_in(&spec, &cfg, Script::default(), c).await;
    let mut want = vec![
        r#"query{cacheVolume(key:"web/gomod"){id}}"#.to_string(),
        r#"query{cacheVolume(key:"web/gobuild"){id}}"#.to_string(),
        r#"query{cacheVolume(key:"apt"){id}}"#.to_string(),
        scratch(1),
        first_step(
            &[r#"from(address:"golang")"#],
            &[
                r#"withMountedCache(cache:"cache-1", path:"/go/pkg/mod", sharing:LOCKED)"#,
                r#"withMountedCache(cache:"cache-2", path:"/root/.cache", sharing:PRIVATE)"#,
                r#"withMountedCache(cache:"cache-3", path:"/var/cache/apt")"#,
                NONCE,
            ],
            r#"["go","build"]"#,
        ),
    ];
    want.extend(after_step(&ran.work, 1));
    want.push(output_size(1));
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
        scratch(1),
        first_step(
            &[r#"from(address:"node:22")"#],
            &[r#"withDirectory(path:"/app", source:"dir-1")"#, NONCE],
            r#"["npm","ci"]"#,
        ),
    ];
    want.extend(after_step(&ran.work, 1));
    want.push(output_size(1));
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
        scratch(3),
        first_step(&[r#"from(address:"alpine")"#], &[NONCE], r#"["a"]"#),
    ];
    want.extend(after_step(&ran.work, 1));
    want.push(then_exec(2, &[], r#"["b"]"#));
    want.extend(after_step(&ran.work, 2));
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
    let ran = run_mock(&spec, &DaggerConfig::default(), script, dir.path()).await;
    let export_dir = ran.work.join("outputs");
    let bin = export_dir.join("bin");
    let dist = export_dir.join("dist");
    let mut want = vec![
        scratch(1),
        first_step(&[r#"from(address:"alpine")"#], &[NONCE], r#"["build"]"#),
    ];
    want.extend(after_step(&ran.work, 1));
    want.push(output_size(1));
    want.extend([
        on_ctr(1, &[r#"exists(path:"/out/app")"#]),
        on_ctr(
            1,
            &[r#"exists(expectedType:DIRECTORY_TYPE, path:"/out/app")"#],
        ),
        on_ctr(
            1,
            &[
                r#"file(path:"/out/app")"#,
                &format!(r#"export(path:"{}")"#, bin.display()),
            ],
        ),
        on_ctr(1, &[r#"exists(path:"/out/dist")"#]),
        on_ctr(
            1,
            &[r#"exists(expectedType:DIRECTORY_TYPE, path:"/out/dist")"#],
        ),
        on_ctr(
            1,
            &[
                r#"directory(path:"/out/dist")"#,
                &format!(r#"export(path:"{}")"#, dist.display()),
            ],
        ),
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
