//! The four built-in templates, rendered with their defaults (and the parameters they
//! require), run to SUCCEEDED through a real controller and two real workers on the fake
//! Dagger engine, with each tool the templates call (go, pip, python, aws, pg_dump, …)
//! answered by a script in the fake engine's image fixtures. Every input arrives from its
//! producer's artifact, and dependents are placed on the other worker at least once: before
//! a run, each worker is warmed up with some of the template's images, which the scheduler's
//! cache affinity follows.

use std::collections::HashMap;
use std::time::Duration;

use scabbard_common::proto::{
    ContainerStep, ContainerTask, ListAgentsRequest, NodeState, Requirements, RunTemplateRequest,
    TaskSpec, Workflow, WorkflowState, admin_service_client::AdminServiceClient, task_spec::Kind,
    template_service_client::TemplateServiceClient,
};
use scabbard_tests::fleet::*;
use scabbard_tests::*;

const T: Duration = Duration::from_secs(120);

/// Worker-side secrets every template may ask for (files, open to every project).
fn secrets(dir: &std::path::Path) -> anyhow::Result<String> {
    let mut toml = String::from("[dagger.secrets]\n");
    for (name, value) in [
        ("aws-access-key-id", "AKIAFAKE"),
        ("aws-secret-access-key", "fake-secret-key"),
        ("maintenance-db-password", "db-pw"),
        ("mlflow-token", "mlflow-tok"),
    ] {
        let path = dir.join(name);
        write_private(&path, value)?;
        toml.push_str(&format!(
            "{name:?} = {{ file = {:?} }}\n",
            path.display().to_string()
        ));
    }
    Ok(toml)
}

/// Two workers, `a` and `b` (b with GPUs and the gpu label), 2 slots each.
async fn fleet(extra_b: &str) -> anyhow::Result<Fleet> {
    let mut fleet = Fleet::controller(Vec::new())?;
    let secrets = secrets(fleet.dir.path())?;
    fleet.add(WorkerSpec::named("a").dagger(&secrets)).await?;
    let b = WorkerSpec::named("b")
        .label("gpu", "nvidia-l4")
        .dagger("gpus = [\"all\"]")
        .dagger(&secrets)
        .dagger(extra_b);
    fleet.add(b).await?;
    Ok(fleet)
}

/// Runs a trivial container task with `image` on `worker`, then waits until the worker
/// reports the image warm (cache-affine placement follows it).
async fn warm(fleet: &Fleet, worker: &str, image: &str) -> anyhow::Result<()> {
    let mut tasks = fleet.tasks().await?;
    let spec = TaskSpec {
        kind: Some(Kind::Container(ContainerTask {
            image: image.into(),
            steps: vec![ContainerStep {
                args: vec!["true".into()],
                ..Default::default()
            }],
            ..Default::default()
        })),
        requirements: Some(Requirements {
            labels: [("name".to_string(), worker.to_string())].into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = submit(&mut tasks, spec).await?;
    expect_succeeded(&mut tasks, &id, T).await?;
    let admin = AdminServiceClient::new(fleet.channel(ADMIN_TOKEN).await?);
    eventually(
        &format!("{worker} reporting {image} warm"),
        Duration::from_secs(30),
        || {
            let mut admin = admin.clone();
            async move {
                let agents = admin
                    .list_agents(ListAgentsRequest {})
                    .await
                    .ok()?
                    .into_inner()
                    .agents;
                agents
                    .iter()
                    .any(|a| {
                        a.name == worker
                            && a.cache
                                .as_ref()
                                .is_some_and(|c| c.images.iter().any(|i| i == image))
                    })
                    .then_some(())
            }
        },
    )
    .await?;
    Ok(())
}

/// Runs `template` with `params`; returns the final workflow (SUCCEEDED, or the error with
/// every node's log).
async fn run(fleet: &Fleet, template: &str, params: &[(&str, &str)]) -> anyhow::Result<Workflow> {
    let mut t = TemplateServiceClient::new(fleet.channel(ADMIN_TOKEN).await?);
    let id = t
        .run(RunTemplateRequest {
            name: template.into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .workflow
        .expect("workflow")
        .id;
    let w = wait_workflow(&mut fleet.workflows().await?, &id, T).await?;
    if w.state() != WorkflowState::Succeeded {
        let mut tasks = fleet.tasks().await?;
        let mut all = String::new();
        for n in &w.nodes {
            if !n.task_id.is_empty() {
                let log = logs(&mut tasks, &n.task_id, 0, false)
                    .await
                    .unwrap_or_default();
                all.push_str(&format!("--- {} ({:?}) ---\n{log}\n", n.name, n.state()));
            }
        }
        anyhow::bail!("{template}: {:?} {}\n{w:#?}\n{all}", w.state(), w.message);
    }
    Ok(w)
}

/// Checks every input of every node came from its producer's uploaded artifact, and that
/// at least one dependent ran on another worker than its producer; returns the worker of
/// each node.
async fn check_flow(fleet: &Fleet, w: &Workflow) -> anyhow::Result<HashMap<String, String>> {
    let mut tasks = fleet.tasks().await?;
    let mut by_node = HashMap::new();
    let mut placed = HashMap::new();
    for n in &w.nodes {
        if n.state() == NodeState::Succeeded {
            let t = get(&mut tasks, &n.task_id).await?;
            placed.insert(n.name.clone(), fleet.worker_name(ran_on(&t)).to_string());
            by_node.insert(n.name.clone(), t);
        }
    }
    let mut crossed = Vec::new();
    let mut inputs = 0;
    for (name, t) in &by_node {
        for input in &t.spec.as_ref().unwrap().inputs {
            inputs += 1;
            let a = input
                .artifact
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: input {} unresolved", input.from));
            let (producer, _) = by_node
                .iter()
                .find(|(_, p)| p.id == a.task_id)
                .unwrap_or_else(|| panic!("{name}: {} from an unknown task", input.from));
            let uploaded = by_node[producer]
                .result
                .as_ref()
                .unwrap()
                .artifacts
                .iter()
                .find(|u| u.name == a.name)
                .unwrap_or_else(|| panic!("{producer} did not upload {}", a.name));
            assert_eq!(
                (uploaded.sha256.as_str(), uploaded.size),
                (a.sha256.as_str(), a.size),
                "{name} <- {producer}/{}",
                a.name
            );
            assert!(
                input
                    .from
                    .contains(&format!("tasks.{producer}.artifacts.{}", a.name)),
                "{name}: {} resolved to {producer}/{}",
                input.from,
                a.name
            );
            if placed[producer] != placed[name] {
                crossed.push(format!(
                    "{producer}@{} -> {name}@{}",
                    placed[producer], placed[name]
                ));
            }
        }
    }
    assert!(inputs > 0, "no inputs at all in {}", w.id);
    assert!(
        !crossed.is_empty(),
        "no dependent ran on another worker than its producer: {placed:?}"
    );
    Ok(placed)
}

const GO_TOOL: &str = r#"#!/bin/sh
set -e
case "$1" in
  mod)
    test -f go.mod || { echo "go: go.mod file not found in $(pwd)" >&2; exit 1; }
    mkdir -p /go/pkg/mod/cache && echo downloaded > /go/pkg/mod/cache/marker ;;
  build)
    out=
    while [ $# -gt 0 ]; do [ "$1" = -o ] && { out=$2; shift; }; shift; done
    test -f main.go
    mkdir -p "$(dirname "$out")"
    printf '#!/bin/sh\necho "app %s $GOARCH"\n' "$(cat VERSION)" > "$out"
    chmod +x "$out"
    echo "built $out for $GOOS/$GOARCH" >&2 ;;
  vet) test -f main.go ;;
  test) test -f main.go && echo "ok  	example.com/app	0.012s" ;;
  *) echo "go: unknown command $1" >&2; exit 2 ;;
esac
"#;

#[tokio::test]
async fn ci_pipeline_checks_out_builds_tests_and_publishes() -> anyhow::Result<()> {
    let password = "push-pw";
    let fleet_dir = tempfile::tempdir()?;
    let pw_file = fleet_dir.path().join("registry-pw");
    write_private(&pw_file, password)?;
    let registry = format!(
        "[dagger.registries.\"registry.test\"]\nusername = \"bot\"\npassword_file = {:?}\n",
        pw_file.display().to_string()
    );
    // No worker has registry credentials: with publish=false none are needed.
    let fleet = fleet("").await?;
    let repo = LocalRepo::init(fleet.dir.path().join("app-repo"))?;
    let commit = repo.commit(
        &[
            ("go.mod", "module example.com/app\n\ngo 1.23\n"),
            ("main.go", "package main\n\nfunc main() {}\n"),
            ("VERSION", "1.4.2"),
        ],
        "first",
    )?;
    let f = &fleet.fixtures;
    f.git_repo("https://github.com/acme/app.git", repo.dir())?;
    f.image_tool("golang:1.23", "go", GO_TOOL)?;
    f.registry("registry.test", "bot", password)?;
    warm(&fleet, "a", "alpine:3.20").await?;
    warm(&fleet, "b", "golang:1.23").await?;

    // Defaults: publish=false, so publish is skipped and needs no registry credentials.
    let w = run(
        &fleet,
        "ci-pipeline",
        &[("repository", "https://github.com/acme/app.git")],
    )
    .await?;
    let placed = check_flow(&fleet, &w).await?;
    let publish = w.nodes.iter().find(|n| n.name == "publish").unwrap();
    assert_eq!(publish.state(), NodeState::Skipped, "{publish:?}");
    let checkout = w.nodes.iter().find(|n| n.name == "checkout").unwrap();
    assert_eq!(checkout.outputs["revision"], commit);
    assert!(f.pushes()?.is_empty());
    assert_eq!(placed["checkout"], "a");

    // publish=true: pushed with the SDK, with the workers' credentials, tagged with the
    // commit.
    drop(fleet);
    let fleet = fleet_with_registry(&registry).await?;
    let repo = LocalRepo::init(fleet.dir.path().join("app-repo"))?;
    let commit = repo.commit(
        &[
            ("go.mod", "module example.com/app\n"),
            ("main.go", "package main\n"),
            ("VERSION", "2.0.0"),
        ],
        "second",
    )?;
    let f = &fleet.fixtures;
    f.git_repo("https://github.com/acme/app.git", repo.dir())?;
    f.image_tool("golang:1.23", "go", GO_TOOL)?;
    f.registry("registry.test", "bot", password)?;
    warm(&fleet, "b", "alpine:3.20").await?;
    warm(&fleet, "a", "golang:1.23").await?;
    let w = run(
        &fleet,
        "ci-pipeline",
        &[
            ("repository", "https://github.com/acme/app.git"),
            ("publish", "true"),
            ("registry", "registry.test"),
        ],
    )
    .await?;
    check_flow(&fleet, &w).await?;
    let pushes = f.pushes()?;
    assert_eq!(pushes.len(), 1, "{pushes:?}");
    assert_eq!(
        pushes[0].address,
        format!("registry.test/example/app:{commit}")
    );
    assert_eq!(
        pushes[0].entrypoint.as_deref(),
        Some(&["/app".to_string()][..])
    );
    let publish = w.nodes.iter().find(|n| n.name == "publish").unwrap();
    assert_eq!(
        publish.outputs["image"],
        format!(
            "registry.test/example/app:{commit}@sha256:{}",
            pushes[0].digest
        )
    );
    Ok(())
}

/// A fleet whose workers both hold the registry credentials.
async fn fleet_with_registry(registry: &str) -> anyhow::Result<Fleet> {
    let mut fleet = Fleet::controller(Vec::new())?;
    let secrets = secrets(fleet.dir.path())?;
    let both = format!("{secrets}{registry}");
    fleet.add(WorkerSpec::named("a").dagger(&both)).await?;
    fleet
        .add(
            WorkerSpec::named("b")
                .label("gpu", "nvidia-l4")
                .dagger("gpus = [\"all\"]")
                .dagger(&both),
        )
        .await?;
    Ok(fleet)
}

const PIP: &str = r#"#!/bin/sh
echo "pip $*" >&2
[ "$1" = install ] || exit 2
prev=
for a in "$@"; do
  if [ "$prev" = -r ]; then test -f "$a" || { echo "no such file: $a" >&2; exit 1; }; fi
  prev=$a
done
exit 0
"#;

const AWS: &str = r#"#!/bin/sh
set -e
S3=/tmp/fake-s3
[ -n "$AWS_ACCESS_KEY_ID" ] && [ -n "$AWS_SECRET_ACCESS_KEY" ] || { echo "Unable to locate credentials" >&2; exit 253; }
[ "$1" = s3 ] || { echo "aws: unsupported $*" >&2; exit 2; }
shift; cmd=$1; shift
at() { echo "$S3/${1#s3://}"; }
case "$cmd" in
  sync) test -d "$1"; mkdir -p "$(at "$2")"; cp -r "$1"/. "$(at "$2")"/ ;;
  cp) dst=$(at "$2"); mkdir -p "$(dirname "$dst")"; if [ "$1" = - ]; then cat > "$dst"; else test -f "$1"; cp "$1" "$dst"; fi ;;
  ls) dir=$(at "$1"); if [ -d "$dir" ]; then find "$dir" -type f | sort | while read -r f; do echo "2026-12-01 00:00:00 $(wc -c < "$f") ${f#$S3/*/}"; done; fi ;;
  mv|rm) ;;
  *) echo "aws s3 $cmd: unsupported" >&2; exit 2 ;;
esac
"#;

/// The base of the fake engine's images is busybox, whose shell runs its own applets before
/// anything in PATH, and whose `date` and `find` lack `-d "-30 days"` and `-delete`. The
/// images these steps name have real ones (coreutils, findutils): give them the host's,
/// with dash as their shell.
fn real_tools(f: &Fixtures, image: &str, tools: &[&str]) -> anyhow::Result<()> {
    use std::path::Path;
    f.image_host_binary(image, Path::new("/bin/dash"), "/bin/sh")?;
    for tool in tools {
        let host = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("the host has no {tool}"));
        f.image_host_binary(image, &host, &format!("/usr/local/bin/{tool}"))?;
    }
    Ok(())
}

const SHARDS: &str = r#"#!/bin/sh
set -e
[ "$1" = -c ] || { echo "python: unexpected $*" >&2; exit 2; }
shift 2
n=0
for shard in "$@"; do
  out="/data/out/${SHARD_COLUMN}=${shard}"
  mkdir -p "$out"
  awk -F, -v s="$shard" -v col="$SHARD_COLUMN" 'NR==1{for(i=1;i<=NF;i++) if($i==col) c=i; next} $c==s' /data/raw/input.csv > "$out/part-0.parquet"
  echo "$shard: $(wc -l < "$out/part-0.parquet") rows" >&2
  n=$((n+1))
done
echo "$n"
"#;

#[tokio::test]
async fn data_processing_extracts_transforms_and_loads() -> anyhow::Result<()> {
    let fleet = fleet("").await?;
    let f = &fleet.fixtures;
    let csv = fleet.dir.path().join("sales.csv");
    std::fs::write(
        &csv,
        "id,region,amount\n1,eu,10\n2,us,20\n3,apac,30\n4,eu,5\n",
    )?;
    f.http_file("https://data.example.com/sales.csv", &csv)?;
    f.image_tool("python:3.12-slim", "pip", PIP)?;
    f.image_tool("python:3.12-slim", "python", SHARDS)?;
    f.image_tool("amazon/aws-cli:2.17.50", "aws", AWS)?;
    warm(&fleet, "a", "alpine:3.20").await?;
    warm(&fleet, "b", "python:3.12-slim").await?;
    warm(&fleet, "a", "amazon/aws-cli:2.17.50").await?;
    let w = run(
        &fleet,
        "data-processing",
        &[
            ("source_url", "https://data.example.com/sales.csv"),
            ("destination", "s3://acme-data/sales"),
        ],
    )
    .await?;
    check_flow(&fleet, &w).await?;
    let out = |n: &str, k: &str| w.nodes.iter().find(|x| x.name == n).unwrap().outputs[k].clone();
    assert_eq!(out("transform", "shards"), "3");
    assert_eq!(out("load", "files"), "3");
    let sum = scabbard_common::artifact::sha256_file(&csv)?;
    assert_eq!(out("extract", "checksum"), sum);
    Ok(())
}

const PREPARE_PY: &str = r#"#!/bin/sh
set -e
case "$1" in
  /workspace/code/prepare.py)
    out=; while [ $# -gt 0 ]; do [ "$1" = --out ] && { out=$2; shift; }; shift; done
    mkdir -p "$out/train" "$out/test"
    echo rows > "$out/train/part.csv"; echo rows > "$out/test/part.csv" ;;
  -c)
    test -f /model/weights.bin || { echo "no model at /model" >&2; exit 1; }
    [ -n "$MLFLOW_TRACKING_TOKEN" ] || { echo "no mlflow token" >&2; exit 1; }
    echo 7 ;;
  *) echo "python: unexpected $*" >&2; exit 2 ;;
esac
"#;

const TORCH_PY: &str = r#"#!/bin/sh
set -e
case "$1" in
  /workspace/code/train.py)
    [ -n "$NVIDIA_VISIBLE_DEVICES" ] || { echo "CUDA: no device visible" >&2; exit 1; }
    test -f /workspace/data/train/part.csv
    mkdir -p /model && echo "weights on $NVIDIA_VISIBLE_DEVICES" > /model/weights.bin ;;
  /workspace/code/evaluate.py)
    test -f /model/weights.bin && test -f /workspace/data/test/part.csv
    m=; while [ $# -gt 0 ]; do [ "$1" = --metrics ] && { m=$2; shift; }; shift; done
    echo 0.93 > "$m" ;;
  *) echo "python: unexpected $*" >&2; exit 2 ;;
esac
"#;

#[tokio::test]
async fn ml_training_trains_on_the_gpu_worker() -> anyhow::Result<()> {
    let fleet = fleet("").await?;
    let f = &fleet.fixtures;
    let repo = LocalRepo::init(fleet.dir.path().join("model-repo"))?;
    let commit = repo.commit(
        &[
            ("requirements.txt", "torch\n"),
            ("prepare.py", "# prepare\n"),
            ("train.py", "# train\n"),
            ("evaluate.py", "# evaluate\n"),
        ],
        "model code",
    )?;
    f.git_repo("https://github.com/acme/model.git", repo.dir())?;
    let torch = "pytorch/pytorch:2.4.1-cuda12.1-cudnn9-runtime";
    for image in ["python:3.12", "python:3.12-slim", torch] {
        f.image_tool(image, "pip", PIP)?;
    }
    f.image_tool("python:3.12", "python", PREPARE_PY)?;
    f.image_tool("python:3.12-slim", "python", PREPARE_PY)?;
    f.image_tool(torch, "python", TORCH_PY)?;
    warm(&fleet, "a", "python:3.12").await?;
    warm(&fleet, "a", "python:3.12-slim").await?;
    let w = run(
        &fleet,
        "ml-training",
        &[
            ("code_repository", "https://github.com/acme/model.git"),
            ("dataset_url", "s3://acme/datasets/churn.parquet"),
            ("model_name", "churn"),
        ],
    )
    .await?;
    let placed = check_flow(&fleet, &w).await?;
    assert_eq!(placed["train"], "b", "only b has GPUs and the gpu label");
    let out = |n: &str, k: &str| w.nodes.iter().find(|x| x.name == n).unwrap().outputs[k].clone();
    assert_eq!(out("prepare-data", "revision"), commit);
    assert_eq!(out("evaluate", "score"), "0.93");
    assert_eq!(out("register-model", "version"), "7");
    // The GPU reached the training container (the model says on which devices).
    let mut tasks = fleet.tasks().await?;
    let train = node_task(&mut tasks, &w, "train").await?;
    let dest = fleet.dir.path().join("model");
    fetch_artifact(&fleet, &train.id, "model", &dest).await?;
    assert_eq!(
        std::fs::read_to_string(dest.join("weights.bin"))?,
        "weights on all\n"
    );
    Ok(())
}

const PG_DUMP: &str = r#"#!/bin/sh
set -e
[ -n "$PGPASSWORD" ] || { echo "pg_dump: no password supplied" >&2; exit 1; }
for a in "$@"; do case "$a" in --file=*) f=${a#--file=};; esac; done
echo "PGDMP $PGDATABASE@$PGHOST $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$f"
"#;

#[tokio::test]
async fn scheduled_maintenance_backs_up_and_uploads_every_run() -> anyhow::Result<()> {
    let fleet = fleet("").await?;
    let f = &fleet.fixtures;
    f.image_tool("postgres:16-alpine", "pg_dump", PG_DUMP)?;
    f.image_tool("amazon/aws-cli:2.17.50", "aws", AWS)?;
    real_tools(f, "amazon/aws-cli:2.17.50", &["date"])?;
    real_tools(f, "alpine:3.20", &["find"])?;
    warm(&fleet, "a", "postgres:16-alpine").await?;
    warm(&fleet, "b", "amazon/aws-cli:2.17.50").await?;
    let mut dumps = Vec::new();
    for _ in 0..2 {
        let w = run(&fleet, "scheduled-maintenance", &[("bucket", "acme-ops")]).await?;
        check_flow(&fleet, &w).await?;
        let node = |n: &str| w.nodes.iter().find(|x| x.name == n).unwrap().clone();
        assert!(
            node("upload-backup").outputs["object"].starts_with("s3://acme-ops/backups/app-"),
            "{:?}",
            node("upload-backup")
        );
        assert_eq!(node("prune-backups").outputs["deleted"], "0");
        assert_eq!(node("rotate-logs").outputs["archived"], "0");
        dumps.push(node("backup-database").outputs["checksum"].clone());
    }
    // The nightly backup really happens each night: a new dump, not the cached one.
    assert_ne!(dumps[0], dumps[1]);
    let runs: usize = fleet
        .workers
        .iter()
        .map(|w| {
            w.engine
                .runs()
                .unwrap_or_default()
                .iter()
                .filter(|r| r.args.iter().any(|a| a.contains("pg_dump")))
                .count()
        })
        .sum();
    assert_eq!(runs, 2);
    Ok(())
}
