use std::collections::HashMap;
use std::path::Path;

use scabbard_common::proto::output_spec::Source;

use super::*;
use crate::config::{CacheVolumeConfig, RegistryAuth, SecretSource, WorkerSecret};
use crate::executor::StagedInput;
use crate::executor::dagger::tests::ctx;

fn task(image: &str, steps: &[&[&str]]) -> proto::ContainerTask {
    proto::ContainerTask {
        image: image.into(),
        steps: steps
            .iter()
            .map(|a| proto::ContainerStep {
                cache: false,
                args: a.iter().map(|s| s.to_string()).collect(),
                name: String::new(),
            })
            .collect(),
        ..Default::default()
    }
}

fn plan_as(
    project: &str,
    t: &proto::ContainerTask,
    spec: &proto::TaskSpec,
    cfg: &DaggerConfig,
) -> Result<Plan, Refusal> {
    let mut c = ctx(Path::new("/nonexistent"));
    c.project = project.into();
    plan(t, spec, cfg, &c)
}

fn plan_of(t: &proto::ContainerTask, cfg: &DaggerConfig) -> Result<Plan, Refusal> {
    plan_as("default", t, &proto::TaskSpec::default(), cfg)
}

fn refused(r: Result<Plan, Refusal>) -> String {
    match r {
        Err(Refusal::User(m)) => m,
        other => panic!("expected a user refusal, got {other:?}"),
    }
}

#[test]
fn user_mistakes_are_refused_with_reasons() {
    let cfg = DaggerConfig::default();
    assert!(refused(plan_of(&task("", &[&["x"]]), &cfg)).contains("no image"));
    assert!(refused(plan_of(&task("a", &[&[]]), &cfg)).contains("step 1 has no args"));
    let mut t = task("a", &[&["x"]]);
    t.secrets.push(proto::SecretRef {
        env: "T".into(),
        source: "nope".into(),
    });
    assert!(refused(plan_of(&t, &cfg)).contains("'nope'"));
    let mut t = task("a", &[&["x"]]);
    t.registry_auth = "ghcr.io".into();
    assert!(refused(plan_of(&t, &cfg)).contains("ghcr.io"));
    let mut spec = proto::TaskSpec::default();
    spec.outputs.push(proto::OutputSpec {
        name: "o".into(),
        source: Some(Source::Path("x".into())),
    });
    let m = refused(plan_as("p", &task("a", &[&["x"]]), &spec, &cfg));
    assert!(m.contains("only shell tasks"), "{m}");
}

#[test]
fn secrets_come_from_worker_sources_and_secret_env() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    std::fs::write(&file, "file-secret\n").unwrap();
    let cfg = DaggerConfig {
        secrets: HashMap::from([("key".to_string(), SecretSource::File(file).into())]),
        ..Default::default()
    };
    let mut t = task("a", &[&["x"]]);
    t.secrets.push(proto::SecretRef {
        env: "KEY".into(),
        source: "key".into(),
    });
    let spec = proto::TaskSpec {
        env: HashMap::from([("KEY".into(), "plain".into()), ("A".into(), "1".into())]),
        secret_env: HashMap::from([("TOKEN".into(), "tok".into())]),
        ..Default::default()
    };
    let p = plan_as("any", &t, &spec, &cfg).unwrap();
    assert_eq!(p.env, BTreeMap::from([("A".to_string(), "1".to_string())]));
    let got: Vec<(&str, &str)> = p
        .secrets
        .iter()
        .map(|s| (s.env.as_str(), s.value.as_str()))
        .collect();
    assert_eq!(got, [("KEY", "file-secret"), ("TOKEN", "tok")]);
    assert!(!format!("{p:?}").contains("file-secret"));
}

#[test]
fn unreadable_worker_secret_is_infrastructure() {
    let cfg = DaggerConfig {
        secrets: HashMap::from([(
            "gone".to_string(),
            SecretSource::Env("SCABBARD_TEST_SURELY_UNSET".into()).into(),
        )]),
        ..Default::default()
    };
    let mut t = task("a", &[&["x"]]);
    t.secrets.push(proto::SecretRef {
        env: "X".into(),
        source: "gone".into(),
    });
    match plan_of(&t, &cfg) {
        Err(Refusal::Infra(m)) => assert!(m.contains("SCABBARD_TEST_SURELY_UNSET"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// A source that fails when read: a user refusal (not the read's infrastructure error)
/// proves the check came first.
#[test]
fn another_projects_sources_are_refused_before_any_value_is_read() {
    let unreadable = SecretSource::File("/nonexistent/scabbard-test/secret".into());
    let cfg = DaggerConfig {
        secrets: HashMap::from([(
            "npm".to_string(),
            WorkerSecret::for_projects(unreadable.clone(), &["web"]),
        )]),
        registries: HashMap::from([(
            "ghcr.io".to_string(),
            RegistryAuth {
                username: "bot".into(),
                password_env: None,
                password_file: Some("/nonexistent/scabbard-test/pw".into()),
                projects: Some(vec!["web".into()]),
            },
        )]),
        caches: HashMap::from([(
            "gomod".to_string(),
            CacheVolumeConfig {
                projects: Some(vec!["web".into()]),
                shared: false,
            },
        )]),
        ..Default::default()
    };
    let spec = proto::TaskSpec::default();
    let mut secret = task("a", &[&["x"]]);
    secret.secrets.push(proto::SecretRef {
        env: "NPM_TOKEN".into(),
        source: "npm".into(),
    });
    let m = refused(plan_as("api", &secret, &spec, &cfg));
    assert!(
        m.contains("secret source 'npm'") && m.contains("project 'api'"),
        "{m}"
    );
    // The allowed project gets as far as reading it.
    assert!(
        matches!(plan_as("web", &secret, &spec, &cfg), Err(Refusal::Infra(m)) if m.contains("cannot read"))
    );

    let mut registry = task("a", &[&["x"]]);
    registry.registry_auth = "ghcr.io".into();
    let m = refused(plan_as("api", &registry, &spec, &cfg));
    assert!(
        m.contains("'ghcr.io'") && m.contains("registry_auth") && m.contains("project 'api'"),
        "{m}"
    );
    assert!(matches!(
        plan_as("web", &registry, &spec, &cfg),
        Err(Refusal::Infra(_))
    ));

    // Every forbidden resource is named; the secret is checked first.
    let mut both = secret.clone();
    both.caches.push(proto::CacheMount {
        volume: "gomod".into(),
        path: "/go".into(),
        sharing: 0,
    });
    let m = refused(plan_as("web2", &both, &spec, &cfg));
    assert!(m.contains("secret source 'npm'"), "{m}");
    both.secrets.clear();
    let m = refused(plan_as("api", &both, &spec, &cfg));
    assert!(
        m.contains("cache volume 'gomod'") && m.contains("project 'api'"),
        "{m}"
    );
}

#[test]
fn cache_volumes_are_namespaced_by_project_unless_shared() {
    let cfg = DaggerConfig {
        caches: HashMap::from([(
            "apt".to_string(),
            CacheVolumeConfig {
                projects: None,
                shared: true,
            },
        )]),
        ..Default::default()
    };
    let mut t = task("a", &[&["x"]]);
    for volume in ["gomod", "apt"] {
        t.caches.push(proto::CacheMount {
            volume: volume.into(),
            path: format!("/c/{volume}"),
            sharing: 0,
        });
    }
    let spec = proto::TaskSpec::default();
    let volumes = |project: &str| -> Vec<String> {
        plan_as(project, &t, &spec, &cfg)
            .unwrap()
            .caches
            .into_iter()
            .map(|c| c.volume)
            .collect()
    };
    assert_eq!(volumes("web"), ["web/gomod", "apt"]);
    assert_eq!(volumes("api"), ["api/gomod", "apt"]);
    // No project on the assignment: the controller's default project.
    assert_eq!(volumes(""), ["default/gomod", "apt"]);
}

#[test]
fn the_first_step_not_cached_gets_the_attempt_id() {
    let cfg = DaggerConfig::default();
    let mut t = task("a", &[&["one"], &["two"], &["three"], &["four"]]);
    let p = plan_of(&t, &cfg).unwrap();
    assert_eq!(p.nonce_before(), Some(0));
    assert_eq!(p.attempt_id, "task-1/7");
    for (i, cache) in [true, true, false, true].into_iter().enumerate() {
        t.steps[i].cache = cache;
    }
    let p = plan_of(&t, &cfg).unwrap();
    assert_eq!(p.nonce_before(), Some(2));
    let cached: Vec<bool> = p.steps.iter().map(|s| s.cached).collect();
    assert_eq!(cached, [true, true, false, false]);
    assert_eq!(p.notes.len(), 1);
    assert!(p.notes[0].starts_with("step 4 is marked cache: true but runs anyway"));
    t.cache = true;
    let p = plan_of(&t, &cfg).unwrap();
    assert_eq!(p.nonce_before(), None);
    assert!(p.notes.is_empty());
}

#[test]
fn gpus_must_be_offered_by_the_worker() {
    let mut t = task("a", &[&["nvidia-smi"]]);
    t.gpus = vec!["all".into()];
    let none = DaggerConfig::default();
    let m = refused(plan_of(&t, &none));
    assert!(
        m.contains("container.gpus") && m.contains("[dagger].gpus"),
        "{m}"
    );
    let all = DaggerConfig {
        gpus: vec!["all".into()],
        ..Default::default()
    };
    let listed = DaggerConfig {
        gpus: vec!["0".into(), "1".into()],
        ..Default::default()
    };
    assert_eq!(plan_of(&t, &all).unwrap().gpus, Some(Gpus::All));
    assert_eq!(
        plan_of(&t, &listed).unwrap().gpus,
        Some(Gpus::Devices(vec!["0".into(), "1".into()]))
    );
    t.gpus = vec!["1".into()];
    assert_eq!(
        plan_of(&t, &listed).unwrap().gpus,
        Some(Gpus::Devices(vec!["1".into()]))
    );
    assert_eq!(
        plan_of(&t, &all).unwrap().gpus,
        Some(Gpus::Devices(vec!["1".into()]))
    );
    t.gpus = vec!["2".into()];
    let m = refused(plan_of(&t, &listed));
    assert!(
        m.contains("device \"2\"") && m.contains("[dagger].gpus"),
        "{m}"
    );
    t.gpus = vec!["all".into(), "0".into()];
    assert!(refused(plan_of(&t, &all)).contains("container.gpus"));
}

#[test]
fn sources_inputs_and_artifacts_need_absolute_container_paths() {
    let cfg = DaggerConfig::default();
    let spec = proto::TaskSpec::default();
    let git = |path: &str| proto::GitSource {
        url: "https://example.com/repo.git".into(),
        r#ref: String::new(),
        path: path.into(),
        keep_git_dir: false,
    };
    let mut t = task("a", &[&["x"]]);
    t.git.push(git("src"));
    assert!(refused(plan_of(&t, &cfg)).contains("container.git[0].path"));
    t.git = vec![git("/src"), git("/src")];
    assert!(refused(plan_of(&t, &cfg)).contains("container.git[1].path /src is also"));
    t.git = vec![git("/src")];
    let p = plan_of(&t, &cfg).unwrap();
    assert_eq!(p.git[0].reference, None);

    let mut t = task("a", &[&["x"]]);
    t.downloads.push(proto::HttpSource {
        url: "ftp://example.com/f".into(),
        path: "/f".into(),
    });
    assert!(refused(plan_of(&t, &cfg)).contains("container.downloads[0].url"));
    t.downloads[0].url = "https://example.com/f".into();
    t.downloads[0].path = "f".into();
    assert!(refused(plan_of(&t, &cfg)).contains("container.downloads[0].path"));

    // Inputs come from the worker's cache: no workspace_root needed.
    let dir = tempfile::tempdir().unwrap();
    let mut c = ctx(dir.path());
    c.inputs.push(StagedInput {
        from: "${{ tasks.build.artifacts.dist }}".into(),
        path: "/in/dist".into(),
        local: dir.path().to_path_buf(),
        kind: proto::ArtifactKind::Unspecified,
    });
    let t = task("a", &[&["x"]]);
    let p = plan(&t, &spec, &cfg, &c).unwrap();
    assert!(p.inputs[0].dir);
    c.inputs[0].path = "in/dist".into();
    let m = refused(plan(&t, &spec, &cfg, &c));
    assert!(m.contains("inputs[0].path"), "{m}");

    let artifact = |name: &str, path: &str| proto::ArtifactSpec {
        name: name.into(),
        path: path.into(),
        optional: false,
    };
    let mut spec = proto::TaskSpec {
        artifacts: vec![artifact("dist", "out")],
        ..Default::default()
    };
    assert!(refused(plan_as("p", &t, &spec, &cfg)).contains("artifacts[0].path"));
    spec.artifacts = vec![artifact("dist", "/out"), artifact("dist", "/out2")];
    assert!(refused(plan_as("p", &t, &spec, &cfg)).contains("declared twice"));
    spec.artifacts = vec![artifact("..", "/out")];
    assert!(refused(plan_as("p", &t, &spec, &cfg)).contains("artifacts[0].name"));
}

#[test]
fn git_commit_and_published_outputs_need_their_source() {
    let cfg = DaggerConfig::default();
    let mut t = task("a", &[&["x"]]);
    let mut spec = proto::TaskSpec::default();
    spec.outputs.push(proto::OutputSpec {
        name: "sha".into(),
        source: Some(Source::GitCommit("/src".into())),
    });
    assert!(refused(plan_as("p", &t, &spec, &cfg)).contains("git_commit \"/src\""));
    t.git.push(proto::GitSource {
        url: "https://example.com/r".into(),
        r#ref: "main".into(),
        path: "/src".into(),
        keep_git_dir: true,
    });
    assert!(plan_as("p", &t, &spec, &cfg).is_ok());
    spec.outputs.push(proto::OutputSpec {
        name: "image".into(),
        source: Some(Source::Published(true)),
    });
    assert!(refused(plan_as("p", &t, &spec, &cfg)).contains("container.publish"));
    t.publish = "ghcr.io/org/app:1".into();
    let p = plan_as("p", &t, &spec, &cfg).unwrap();
    assert_eq!(p.publish.as_deref(), Some("ghcr.io/org/app:1"));
    assert_eq!(p.outputs[1].kind, OutputKind::Published);
}

#[test]
fn host_directories_stay_in_the_workspace() {
    let ws = tempfile::tempdir().unwrap();
    let root = ws.path().join("root");
    std::fs::create_dir_all(root.join("src/sub")).unwrap();
    std::fs::create_dir_all(ws.path().join("outside")).unwrap();
    std::os::unix::fs::symlink(ws.path().join("outside"), root.join("link")).unwrap();
    let real_root = std::fs::canonicalize(&root).unwrap();
    let ok = |p: &str| inside_workspace(p, Some(&root));
    assert_eq!(ok("src").unwrap(), real_root.join("src"));
    assert_eq!(ok("src/sub/..").unwrap(), real_root.join("src"));
    assert_eq!(
        ok(root.join("src").to_str().unwrap()).unwrap(),
        real_root.join("src")
    );
    for bad in [
        "..",
        "../outside",
        "src/../../outside",
        "link",
        "/etc",
        "missing",
    ] {
        assert!(matches!(ok(bad), Err(Refusal::User(_))), "{bad}");
    }
    assert!(
        matches!(inside_workspace("src", None), Err(Refusal::User(m)) if m.contains("workspace_root"))
    );
}
