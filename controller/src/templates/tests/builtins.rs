//! The four built-in templates: what each renders to (shape, artifacts between nodes,
//! Dagger sources, conditions), and that each validates as a workflow.

use super::*;

#[test]
fn ci_pipeline_renders_with_only_the_repository() {
    let reg = Registry::builtin();
    let (spec, version) = reg
        .render(
            "ci-pipeline",
            0,
            &params(&[("repository", "https://github.com/acme/app.git")]),
        )
        .unwrap();
    assert_eq!(version, 1);
    assert_eq!(spec.name, "ci-pipeline");
    assert_eq!(
        shape(&spec),
        edges(&[
            ("checkout", &[]),
            ("build", &["checkout"]),
            ("test", &["checkout"]),
            ("publish", &["build", "test"]),
        ])
    );
    // The checkout is Dagger's git source, handed on as an artifact; nothing is cloned by
    // a tool inside a container and nothing is mounted from a worker's disk.
    let checkout = node(&spec, "checkout");
    let git = &container(checkout).git[0];
    assert_eq!(
        (git.url.as_str(), git.r#ref.as_str(), git.path.as_str()),
        ("https://github.com/acme/app.git", "main", "/src")
    );
    assert!(container(checkout).steps.is_empty());
    let cspec = checkout.spec.as_ref().unwrap();
    assert_eq!(cspec.artifacts[0].name, "source");
    assert_eq!(
        cspec.outputs[0].source,
        Some(proto::output_spec::Source::GitCommit("/src".into()))
    );
    for name in ["build", "test"] {
        let n = node(&spec, name);
        let c = container(n);
        assert_eq!(c.image, "golang:1.23");
        assert!(c.directories.is_empty(), "{name}");
        assert_eq!(c.caches[1].volume, "gobuild-1.23");
        assert_eq!(c.caches[0].sharing(), proto::CacheSharing::Shared);
        let input = &n.spec.as_ref().unwrap().inputs[0];
        assert_eq!(
            (input.from.as_str(), input.path.as_str()),
            ("${{ tasks.checkout.artifacts.source }}", "/src")
        );
    }
    let build = container(node(&spec, "build"));
    assert!(build.steps[0].cache, "go mod download is hermetic");
    assert!(!build.steps[1].cache, "the build itself runs every time");
    let test = container(node(&spec, "test"));
    assert_eq!(
        test.steps[1].args,
        ["go", "test", "-count=1", "-p", "4", "./..."]
    );
    // publish runs only with publish=true, and only then needs registry credentials.
    let publish = node(&spec, "publish");
    assert_eq!(publish.when, "false");
    let p = container(publish);
    assert_eq!(p.registry_auth, "ghcr.io");
    assert_eq!(
        p.publish,
        "ghcr.io/example/app:${{ tasks.checkout.outputs.revision }}"
    );
    assert!(p.steps.is_empty());
    let pspec = publish.spec.as_ref().unwrap();
    assert_eq!(pspec.inputs[0].from, "${{ tasks.build.artifacts.binary }}");
    assert_eq!(pspec.breakers, vec!["registry:ghcr.io"]);
    let mut wf = spec.clone();
    crate::workflow::validate::workflow_spec(&mut wf, &crate::config::ControllerConfig::default())
        .unwrap();
}

#[test]
fn ci_pipeline_takes_every_parameter() {
    let reg = Registry::builtin();
    let (spec, _) = reg
        .render(
            "ci-pipeline",
            1,
            &params(&[
                ("repository", "git://example.com/app"),
                ("ref", "v1.2.0"),
                ("go_version", "1.22"),
                ("publish", "yes"),
                ("parallelism", "16"),
                ("goarch", "arm64"),
                ("packages", r#"["./pkg/...", "./cmd/..."]"#),
                ("registry", "registry.example.com:5000"),
                ("image", "team/app"),
                ("main_package", "./cmd/app"),
                ("base_image", "alpine:3.20"),
            ]),
        )
        .unwrap();
    assert_eq!(container(node(&spec, "checkout")).git[0].r#ref, "v1.2.0");
    let build = node(&spec, "build");
    assert_eq!(container(build).image, "golang:1.22");
    assert_eq!(build.spec.as_ref().unwrap().env["GOARCH"], "arm64");
    assert!(
        container(build).steps[1]
            .args
            .contains(&"./cmd/app".to_string())
    );
    let test = container(node(&spec, "test"));
    assert_eq!(
        test.steps[1].args,
        [
            "go",
            "test",
            "-count=1",
            "-p",
            "16",
            "./pkg/...",
            "./cmd/..."
        ]
    );
    let publish = node(&spec, "publish");
    assert_eq!(publish.when, "true");
    let p = container(publish);
    assert_eq!(p.image, "alpine:3.20");
    assert_eq!(p.registry_auth, "registry.example.com:5000");
    assert_eq!(
        p.publish,
        "registry.example.com:5000/team/app:${{ tasks.checkout.outputs.revision }}"
    );
}

#[test]
fn data_processing_expands_the_shards_into_arguments() {
    let reg = Registry::builtin();
    let required = [
        ("source_url", "https://example.com/sales.csv"),
        ("destination", "s3://acme-data/sales"),
    ];
    let (spec, _) = reg
        .render("data-processing", 0, &params(&required))
        .unwrap();
    assert_eq!(
        shape(&spec),
        edges(&[
            ("extract", &[]),
            ("transform", &["extract"]),
            ("load", &["transform"]),
        ])
    );
    let args = &container(node(&spec, "transform")).steps[1].args;
    assert_eq!(args[args.len() - 3..], ["eu", "us", "apac"]);
    let mut more = required.to_vec();
    more.push(("shards", "de,fr"));
    let (spec, _) = reg.render("data-processing", 0, &params(&more)).unwrap();
    let args = &container(node(&spec, "transform")).steps[1].args;
    assert_eq!(args[args.len() - 2..], ["de", "fr"]);
    assert_eq!(args[1], "-c");
}

#[test]
fn ml_training_requires_the_gpu_label_on_train() {
    let reg = Registry::builtin();
    let (spec, _) = reg
        .render(
            "ml-training",
            0,
            &params(&[
                ("code_repository", "https://github.com/acme/model.git"),
                ("dataset_url", "s3://acme/datasets/churn.parquet"),
                ("model_name", "churn"),
                ("gpu", "nvidia-a100"),
            ]),
        )
        .unwrap();
    assert_eq!(
        shape(&spec),
        edges(&[
            ("prepare-data", &[]),
            ("train", &["prepare-data"]),
            ("evaluate", &["train"]),
            ("register-model", &["evaluate"]),
        ])
    );
    let train = node(&spec, "train").spec.as_ref().unwrap();
    assert_eq!(
        train.requirements.as_ref().unwrap().labels["gpu"],
        "nvidia-a100"
    );
    assert_eq!(train.timeout_ms, 12 * 3600 * 1000);
    assert_eq!(container(node(&spec, "train")).gpus, ["all"]);
    let froms = |name: &str| -> Vec<String> {
        node(&spec, name)
            .spec
            .as_ref()
            .unwrap()
            .inputs
            .iter()
            .map(|i| i.from.clone())
            .collect()
    };
    assert_eq!(
        froms("evaluate"),
        [
            "${{ tasks.prepare-data.artifacts.code }}",
            "${{ tasks.prepare-data.artifacts.data }}",
            "${{ tasks.train.artifacts.model }}"
        ]
    );
    assert_eq!(
        froms("register-model"),
        ["${{ tasks.train.artifacts.model }}"]
    );
    let register = node(&spec, "register-model").spec.as_ref().unwrap();
    assert_eq!(register.env["SCORE"], "${{ tasks.evaluate.outputs.score }}");
}

#[test]
fn scheduled_maintenance_continues_past_failures() {
    let reg = Registry::builtin();
    let (spec, _) = reg
        .render(
            "scheduled-maintenance",
            0,
            &params(&[("bucket", "acme-ops")]),
        )
        .unwrap();
    assert_eq!(spec.failure_policy(), proto::FailurePolicy::Continue);
    assert_eq!(
        shape(&spec),
        edges(&[
            ("prune-caches", &[]),
            ("rotate-logs", &[]),
            ("backup-database", &[]),
            ("upload-backup", &["backup-database"]),
            ("prune-backups", &["upload-backup"]),
        ])
    );
    assert_eq!(
        spec.concurrency.as_ref().unwrap().key,
        "maintenance:acme-ops"
    );
    let prune = container(node(&spec, "prune-caches"));
    assert!(
        prune
            .caches
            .iter()
            .all(|c| c.sharing() == proto::CacheSharing::Locked)
    );
}

#[test]
fn builtins_pass_files_as_artifacts_and_validate_as_workflows() {
    let reg = Registry::builtin();
    let required: &[(&str, &[(&str, &str)])] = &[
        (
            "ci-pipeline",
            &[("repository", "https://github.com/acme/app.git")],
        ),
        (
            "data-processing",
            &[
                ("source_url", "https://example.com/sales.csv"),
                ("destination", "s3://acme-data/sales"),
            ],
        ),
        (
            "ml-training",
            &[
                ("code_repository", "https://github.com/acme/model.git"),
                ("dataset_url", "s3://acme/datasets/churn.parquet"),
                ("model_name", "churn"),
            ],
        ),
        ("scheduled-maintenance", &[("bucket", "acme-ops")]),
    ];
    for (name, p) in required {
        let (mut spec, _) = reg.render(name, 0, &params(p)).unwrap();
        for t in &spec.tasks {
            let ts = t.spec.as_ref().unwrap();
            // No worker-local paths: files travel as artifacts.
            assert!(container(t).directories.is_empty(), "{name}/{}", t.name);
            assert!(
                !ts.outputs.iter().any(|o| matches!(
                    o.source,
                    Some(proto::output_spec::Source::ContainerPath(_))
                )),
                "{name}/{}",
                t.name
            );
            // Nothing downloads or clones by hand: Dagger's sources do that.
            for step in &container(t).steps {
                let text = step.args.join(" ");
                assert!(
                    !text.contains("git clone")
                        && !text.contains("wget")
                        && !text.contains("crane"),
                    "{name}/{}: {text}",
                    t.name
                );
            }
        }
        crate::workflow::validate::workflow_spec(
            &mut spec,
            &crate::config::ControllerConfig::default(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
