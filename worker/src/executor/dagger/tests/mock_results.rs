//! The exact queries of honest caching, git and http sources, GPUs, staged inputs, the
//! `$SCABBARD_OUTPUT` file, publish and artifacts, through the recording mock.

use scabbard_common::proto::{self, ArtifactKind, ErrorClass, Outcome, output_spec::Source};

use super::mock::{
    NONCE, after_step, assert_queries, first_step, on_ctr, output_size, run_mock, run_mock_in,
    scratch, then_exec,
};
use super::support::{COMMIT, Script};
use super::*;
use crate::config::{DaggerConfig, RegistryAuth};
use crate::executor::{ProducedArtifact, StagedInput};

fn output(name: &str, source: Source) -> proto::OutputSpec {
    proto::OutputSpec {
        name: name.into(),
        source: Some(source),
    }
}

#[tokio::test]
async fn the_attempt_id_comes_before_the_first_step_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = container_spec(
        "golang",
        &[&["go", "mod", "download"], &["go", "test"], &["vet"]],
    );
    let c = container_mut(&mut spec);
    c.steps[0].cache = true;
    c.steps[2].cache = true;
    let ran = run_mock(
        &spec,
        &DaggerConfig::default(),
        Script::default(),
        dir.path(),
    )
    .await;
    let mut want = vec![
        scratch(3),
        first_step(
            &[r#"from(address:"golang")"#],
            &[],
            r#"["go","mod","download"]"#,
        ),
    ];
    want.extend(after_step(&ran.work, 1));
    want.push(then_exec(2, &[NONCE], r#"["go","test"]"#));
    want.extend(after_step(&ran.work, 2));
    want.push(then_exec(3, &[], r#"["vet"]"#));
    want.extend(after_step(&ran.work, 3));
    want.push(output_size(3));
    assert_queries(&ran.queries, &want);
    let system = text(&ran.chunks, OutStream::System);
    assert!(
        system.contains("step 3 is marked cache: true but runs anyway"),
        "{system}"
    );

    // A cached task: no attempt id anywhere, so every step may come from the cache.
    container_mut(&mut spec).cache = true;
    let ran = run_mock(
        &spec,
        &DaggerConfig::default(),
        Script::default(),
        dir.path(),
    )
    .await;
    assert_eq!(ran.outcome.outcome, Outcome::Succeeded);
    assert!(
        !ran.queries
            .iter()
            .any(|q| q.contains("SCABBARD_ATTEMPT_ID")),
        "{:#?}",
        ran.queries
    );
}

#[tokio::test]
async fn git_sources_are_resolved_to_commits_and_mounted_as_trees() {
    let dir = tempfile::tempdir().unwrap();
    let lib_commit = "fedcba9876543210fedcba9876543210fedcba98";
    let mut spec = container_spec("golang", &[&["go", "build", "./..."]]);
    let c = container_mut(&mut spec);
    c.git.push(proto::GitSource {
        url: "https://example.com/app.git".into(),
        r#ref: "main".into(),
        path: "/src".into(),
        keep_git_dir: false,
    });
    c.git.push(proto::GitSource {
        url: "https://example.com/lib.git".into(),
        r#ref: String::new(),
        path: "/lib".into(),
        keep_git_dir: true,
    });
    spec.outputs
        .push(output("sha", Source::GitCommit("/src".into())));
    spec.outputs
        .push(output("lib_sha", Source::GitCommit("/lib".into())));
    let script = Script {
        commits: [(
            "https://example.com/lib.git".to_string(),
            lib_commit.to_string(),
        )]
        .into(),
        ..Default::default()
    };
    let ran = run_mock(&spec, &DaggerConfig::default(), script, dir.path()).await;
    let mut want = vec![
        r#"query{git(url:"https://example.com/app.git"){ref(name:"main"){commit}}}"#.to_string(),
        format!(
            r#"query{{git(url:"https://example.com/app.git"){{commit(id:"{COMMIT}"){{tree(discardGitDir:true){{id}}}}}}}}"#
        ),
        r#"query{git(url:"https://example.com/lib.git"){head{commit}}}"#.to_string(),
        format!(
            r#"query{{git(url:"https://example.com/lib.git"){{commit(id:"{lib_commit}"){{tree(discardGitDir:false){{id}}}}}}}}"#
        ),
        scratch(1),
        first_step(
            &[r#"from(address:"golang")"#],
            &[
                r#"withDirectory(path:"/src", source:"tree-1")"#,
                r#"withDirectory(path:"/lib", source:"tree-2")"#,
                NONCE,
            ],
            r#"["go","build","./..."]"#,
        ),
    ];
    want.extend(after_step(&ran.work, 1));
    want.push(output_size(1));
    assert_queries(&ran.queries, &want);
    assert_eq!(ran.outcome.outcome, Outcome::Succeeded, "{:?}", ran.outcome);
    assert_eq!(ran.outcome.outputs["sha"], COMMIT);
    assert_eq!(ran.outcome.outputs["lib_sha"], lib_commit);
    let system = text(&ran.chunks, OutStream::System);
    assert!(
        system.contains(&format!(
            "container.git[0]: https://example.com/app.git main is commit {COMMIT}"
        )),
        "{system}"
    );
}

#[tokio::test]
async fn a_git_ref_that_does_not_exist_is_the_tasks_failure() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = container_spec("alpine", &[&["true"]]);
    container_mut(&mut spec).git.push(proto::GitSource {
        url: "https://example.com/app.git".into(),
        r#ref: "no-such-branch".into(),
        path: "/src".into(),
        keep_git_dir: false,
    });
    let mut script = Script::default();
    script.fail_on.push((
        "no-such-branch".into(),
        "git error: fatal: couldn't find remote ref no-such-branch".into(),
    ));
    let ran = run_mock(&spec, &DaggerConfig::default(), script, dir.path()).await;
    assert_eq!(
        ran.outcome.error_class,
        ErrorClass::User,
        "{:?}",
        ran.outcome
    );
    assert!(
        ran.outcome.message.contains("container.git[0]"),
        "{}",
        ran.outcome.message
    );
    // An unreachable remote is the platform's.
    let mut script = Script::default();
    script.fail_on.push((
        "no-such-branch".into(),
        "dial tcp: lookup example.com: no such host".into(),
    ));
    let ran = run_mock(&spec, &DaggerConfig::default(), script, dir.path()).await;
    assert_eq!(ran.outcome.error_class, ErrorClass::Infrastructure);
}

#[tokio::test]
async fn downloads_are_http_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = container_spec("python:3.12", &[&["python", "train.py"]]);
    container_mut(&mut spec).downloads.push(proto::HttpSource {
        url: "https://example.com/data/train.csv".into(),
        path: "/data/train.csv".into(),
    });
    let ran = run_mock(
        &spec,
        &DaggerConfig::default(),
        Script::default(),
        dir.path(),
    )
    .await;
    let mut want = vec![
        r#"query{http(url:"https://example.com/data/train.csv"){id}}"#.to_string(),
        scratch(1),
        first_step(
            &[r#"from(address:"python:3.12")"#],
            &[
                r#"withFile(path:"/data/train.csv", source:"http-1")"#,
                NONCE,
            ],
            r#"["python","train.py"]"#,
        ),
    ];
    want.extend(after_step(&ran.work, 1));
    want.push(output_size(1));
    assert_queries(&ran.queries, &want);
}

#[tokio::test]
async fn gpus_are_all_of_the_workers_or_listed_devices() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = container_spec("cuda", &[&["nvidia-smi"]]);
    container_mut(&mut spec).gpus = vec!["all".into()];
    let all = DaggerConfig {
        gpus: vec!["all".into()],
        ..Default::default()
    };
    let ran = run_mock(&spec, &all, Script::default(), dir.path()).await;
    let want = first_step(
        &[r#"from(address:"cuda")"#, "experimentalWithAllGPUs"],
        &[NONCE],
        r#"["nvidia-smi"]"#,
    );
    assert_queries(&ran.queries[1..2], &[want]);
    container_mut(&mut spec).gpus = vec!["1".into()];
    let listed = DaggerConfig {
        gpus: vec!["0".into(), "1".into()],
        ..Default::default()
    };
    let ran = run_mock(&spec, &listed, Script::default(), dir.path()).await;
    let want = first_step(
        &[
            r#"from(address:"cuda")"#,
            r#"experimentalWithGPU(devices:["1"])"#,
        ],
        &[NONCE],
        r#"["nvidia-smi"]"#,
    );
    assert_queries(&ran.queries[1..2], &[want]);
}

#[tokio::test]
async fn staged_inputs_are_mounted_from_the_workers_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("artifact-cache");
    std::fs::create_dir_all(cache.join("dist")).unwrap();
    std::fs::write(cache.join("model.bin"), "weights").unwrap();
    let mut c = ctx(dir.path());
    c.inputs = vec![
        StagedInput {
            from: "${{ tasks.build.artifacts.dist }}".into(),
            path: "/in/dist".into(),
            local: cache.join("dist"),
            kind: ArtifactKind::Directory,
        },
        StagedInput {
            from: "${{ tasks.train.artifacts.model }}".into(),
            path: "/in/model.bin".into(),
            local: cache.join("model.bin"),
            kind: ArtifactKind::File,
        },
    ];
    // No workspace_root: the worker's own cache is not the workspace.
    let spec = container_spec("alpine", &[&["ls", "/in"]]);
    let ran = run_mock_in(&spec, &DaggerConfig::default(), Script::default(), c).await;
    let mut want = vec![
        format!(
            r#"query{{host{{directory(path:"{}"){{id}}}}}}"#,
            cache.join("dist").display()
        ),
        format!(
            r#"query{{host{{file(path:"{}"){{id}}}}}}"#,
            cache.join("model.bin").display()
        ),
        scratch(1),
        first_step(
            &[r#"from(address:"alpine")"#],
            &[
                r#"withDirectory(path:"/in/dist", source:"dir-1")"#,
                r#"withFile(path:"/in/model.bin", source:"file-1")"#,
                NONCE,
            ],
            r#"["ls","/in"]"#,
        ),
    ];
    want.extend(after_step(&ran.work, 1));
    want.push(output_size(1));
    assert_queries(&ran.queries, &want);
}

#[tokio::test]
async fn output_file_values_are_read_back_and_declared_outputs_win() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = container_spec("alpine", &[&["sh", "-c", "echo ... >> $SCABBARD_OUTPUT"]]);
    spec.outputs
        .push(output("last", Source::LastStdoutLine(true)));
    let script = Script {
        stdout: [(1, "from-stdout\n".to_string())].into(),
        output_file: "version=1.2.3\nnotes<<EOF\na\nb\nEOF\nlast=from-file\nbad line\n".into(),
        ..Default::default()
    };
    let ran = run_mock(&spec, &DaggerConfig::default(), script, dir.path()).await;
    let mut want = vec![
        scratch(1),
        first_step(
            &[r#"from(address:"alpine")"#],
            &[NONCE],
            r#"["sh","-c","echo ... >> $SCABBARD_OUTPUT"]"#,
        ),
    ];
    want.extend(after_step(&ran.work, 1));
    want.push(output_size(1));
    want.push(on_ctr(1, &[r#"file(path:"/scabbard/output")"#, "contents"]));
    assert_queries(&ran.queries, &want);
    let o = &ran.outcome.outputs;
    assert_eq!(o["version"], "1.2.3");
    assert_eq!(o["notes"], "a\nb");
    assert_eq!(o["last"], "from-stdout");
    assert_eq!(o.len(), 3);
    let system = text(&ran.chunks, OutStream::System);
    assert!(
        system.contains("$SCABBARD_OUTPUT: line 7: neither"),
        "{system}"
    );

    // Too big: not read at all.
    let script = Script {
        output_file: "k=v\n".repeat(20_000),
        ..Default::default()
    };
    let ran = run_mock(&spec, &DaggerConfig::default(), script, dir.path()).await;
    assert!(!ran.queries.iter().any(|q| q.contains("{contents}")));
    let system = text(&ran.chunks, OutStream::System);
    assert!(system.contains("more than the 64 KiB limit"), "{system}");
}

fn registry_cfg(dir: &std::path::Path) -> DaggerConfig {
    let pw = dir.join("pw");
    std::fs::write(&pw, "push-pw").unwrap();
    DaggerConfig {
        registries: [(
            "ghcr.io".to_string(),
            RegistryAuth {
                username: "bot".into(),
                password_env: None,
                password_file: Some(pw),
                projects: None,
            },
        )]
        .into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn publish_pushes_the_container_without_scabbards_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = registry_cfg(dir.path());
    let mut spec = container_spec("golang", &[&["go", "build"]]);
    let c = container_mut(&mut spec);
    c.registry_auth = "ghcr.io".into();
    c.publish = "ghcr.io/org/app:1".into();
    spec.outputs.push(output("image", Source::Published(true)));
    let ran = run_mock(&spec, &cfg, Script::default(), dir.path()).await;
    let mut want = vec![
        r#"query{setSecret(name:"scabbard-registry-ghcr.io", plaintext:"push-pw"){id}}"#
            .to_string(),
        scratch(1),
        first_step(
            &[
                r#"withRegistryAuth(address:"ghcr.io", secret:"secret-1", username:"bot")"#,
                r#"from(address:"golang")"#,
            ],
            &[NONCE],
            r#"["go","build"]"#,
        ),
    ];
    want.extend(after_step(&ran.work, 1));
    want.push(output_size(1));
    want.push(on_ctr(
        1,
        &[
            r#"withoutEnvVariable(name:"SCABBARD_ATTEMPT_ID")"#,
            r#"withoutEnvVariable(name:"SCABBARD_OUTPUT")"#,
            r#"withoutDirectory(path:"/scabbard")"#,
            r#"publish(address:"ghcr.io/org/app:1")"#,
        ],
    ));
    assert_queries(&ran.queries, &want);
    assert_eq!(ran.outcome.outcome, Outcome::Succeeded, "{:?}", ran.outcome);
    assert_eq!(
        ran.outcome.outputs["image"],
        format!("ghcr.io/org/app:1@sha256:{}", "ab".repeat(32))
    );
}

#[tokio::test]
async fn a_refused_push_is_the_tasks_failure_and_a_broken_one_the_platforms() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = registry_cfg(dir.path());
    let mut spec = container_spec("golang", &[&["go", "build"]]);
    let c = container_mut(&mut spec);
    c.registry_auth = "ghcr.io".into();
    c.publish = "ghcr.io/org/app:1".into();
    let mut script = Script::default();
    script.fail_on.push((
        "publish".into(),
        "failed to push ghcr.io/org/app:1: unexpected status from HEAD request: 401 Unauthorized"
            .into(),
    ));
    let ran = run_mock(&spec, &cfg, script, dir.path()).await;
    assert_eq!(
        ran.outcome.error_class,
        ErrorClass::User,
        "{:?}",
        ran.outcome
    );
    let m = &ran.outcome.message;
    assert!(
        m.contains("registry ghcr.io refused") && m.contains("registry_auth \"ghcr.io\""),
        "{m}"
    );
    let mut script = Script::default();
    script
        .fail_on
        .push(("publish".into(), "write: connection reset by peer".into()));
    let ran = run_mock(&spec, &cfg, script, dir.path()).await;
    assert_eq!(ran.outcome.error_class, ErrorClass::Infrastructure);
    assert!(ran.outcome.message.contains("publishing ghcr.io/org/app:1"));
}

#[tokio::test]
async fn artifacts_are_exported_to_the_artifact_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = container_spec("alpine", &[&["make"]]);
    for (name, path, optional) in [
        ("dist", "/out/dist", false),
        ("report", "/out/report.txt", false),
        ("coverage", "/out/coverage", true),
    ] {
        spec.artifacts.push(proto::ArtifactSpec {
            name: name.into(),
            path: path.into(),
            optional,
        });
    }
    let script = || Script {
        paths: [
            ("/out/dist".to_string(), true),
            ("/out/report.txt".to_string(), false),
        ]
        .into(),
        ..Default::default()
    };
    let c = ctx(dir.path());
    let artifacts = c.artifact_dir.clone();
    let ran = run_mock_in(&spec, &DaggerConfig::default(), script(), c.clone()).await;
    let mut want = vec![
        scratch(1),
        first_step(&[r#"from(address:"alpine")"#], &[NONCE], r#"["make"]"#),
    ];
    want.extend(after_step(&ran.work, 1));
    want.push(output_size(1));
    want.extend([
        on_ctr(1, &[r#"exists(path:"/out/dist")"#]),
        on_ctr(
            1,
            &[r#"exists(expectedType:DIRECTORY_TYPE, path:"/out/dist")"#],
        ),
        on_ctr(
            1,
            &[
                r#"directory(path:"/out/dist")"#,
                &format!(r#"export(path:"{}")"#, artifacts.join("dist").display()),
            ],
        ),
        on_ctr(1, &[r#"exists(path:"/out/report.txt")"#]),
        on_ctr(
            1,
            &[r#"exists(expectedType:DIRECTORY_TYPE, path:"/out/report.txt")"#],
        ),
        on_ctr(
            1,
            &[
                r#"file(path:"/out/report.txt")"#,
                &format!(r#"export(path:"{}")"#, artifacts.join("report").display()),
            ],
        ),
        on_ctr(1, &[r#"exists(path:"/out/coverage")"#]),
    ]);
    assert_queries(&ran.queries, &want);
    assert_eq!(ran.outcome.outcome, Outcome::Succeeded, "{:?}", ran.outcome);
    assert_eq!(
        ran.outcome.artifacts,
        [
            ProducedArtifact {
                name: "dist".into(),
                kind: ArtifactKind::Directory
            },
            ProducedArtifact {
                name: "report".into(),
                kind: ArtifactKind::File
            },
        ]
    );
    assert_eq!(
        std::fs::read_to_string(artifacts.join("dist/sub/b.txt")).unwrap(),
        "exported /out/dist/sub/b.txt"
    );
    assert_eq!(
        std::fs::read_to_string(artifacts.join("report")).unwrap(),
        "exported /out/report.txt"
    );
    let system = text(&ran.chunks, OutStream::System);
    assert!(
        system.contains(
            "artifact 'coverage': /out/coverage does not exist in the container: skipped (optional)"
        ),
        "{system}"
    );

    // A required one missing: the task's failure, naming it; nothing listed.
    spec.artifacts[2].optional = false;
    let ran = run_mock_in(&spec, &DaggerConfig::default(), script(), c).await;
    assert_eq!(ran.outcome.outcome, Outcome::Failed);
    assert_eq!(ran.outcome.error_class, ErrorClass::User);
    assert_eq!(
        ran.outcome.message,
        "artifact 'coverage': /out/coverage does not exist in the container"
    );
    assert!(ran.outcome.artifacts.is_empty());
}
