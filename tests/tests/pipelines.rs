//! Multi-step Dagger pipelines on a fleet, end to end: a real controller, real worker
//! processes, and the fake engine (execs really run in a scratch root and are cached per op
//! chain). Artifacts travel between workers through the controller's artifact store (local
//! disk and S3), container and shell tasks hand files to each other, and reruns are never
//! served from the engine's cache unless a step says it is hermetic.

use std::time::Duration;

use scabbard_common::proto::{
    SubmitWorkflowRequest, TaskState, WorkflowSpec, WorkflowState, task_spec::Kind,
};
use scabbard_tests::fleet::*;
use scabbard_tests::*;

const T: Duration = Duration::from_secs(90);

fn parse(yaml: &str) -> WorkflowSpec {
    scabbard_common::wfdef::parse_workflow(yaml, "test.yaml").expect("workflow parses")
}

async fn run_workflow(
    fleet: &Fleet,
    yaml: &str,
) -> anyhow::Result<scabbard_common::proto::Workflow> {
    let mut wf = fleet.workflows().await?;
    let id = wf
        .submit(SubmitWorkflowRequest {
            spec: Some(parse(yaml)),
            idempotency_key: String::new(),
            project: String::new(),
        })
        .await?
        .into_inner()
        .workflow
        .expect("workflow")
        .id;
    let w = wait_workflow(&mut wf, &id, T).await?;
    if w.state() != WorkflowState::Succeeded {
        let mut tasks = fleet.tasks().await?;
        let mut logs = String::new();
        for n in &w.nodes {
            if !n.task_id.is_empty() {
                logs.push_str(&format!(
                    "--- {} ---\n{}\n",
                    n.name,
                    logs_of(&mut tasks, &n.task_id).await
                ));
            }
        }
        anyhow::bail!("workflow {id} is {:?}: {w:#?}\n{logs}", w.state());
    }
    Ok(w)
}

async fn logs_of(tasks: &mut Tasks, id: &str) -> String {
    logs(tasks, id, 0, false)
        .await
        .unwrap_or_else(|e| format!("(no log: {e:#})"))
}

/// The lines a step printed between two markers (its own sha256sum output).
fn between(log: &str, start: &str, end: &str) -> String {
    let from = log.find(start).map(|i| i + start.len()).unwrap_or(0);
    let to = log[from..].find(end).map_or(log.len(), |i| from + i);
    log[from..to].trim_start_matches('\n').to_string()
}

/// build (worker a) makes a directory of random bytes, numbers, a link and an empty dir;
/// verify (forced onto worker b by its label) gets it at another path and prints the
/// checksums of what it received.
const TWO_WORKERS: &str = r#"
name: artifacts-between-workers
tasks:
  - name: build
    requirements: {labels: {name: a}}
    container:
      image: alpine:3.20
      steps:
        - args:
            - sh
            - -c
            - |
              set -e
              mkdir -p /out/dist/sub /out/dist/empty
              head -c 1500000 /dev/urandom > /out/dist/sub/blob.bin
              seq 1 50000 > /out/dist/numbers.txt
              ln -s numbers.txt /out/dist/link
              cd /out/dist && echo SUMS-$((1+1)) && find . -type f | sort | xargs sha256sum && echo END-$((1+1))
    artifacts:
      - {name: dist, path: /out/dist}
  - name: verify
    depends_on: [build]
    requirements: {labels: {name: b}}
    container:
      image: alpine:3.20
      steps:
        - args:
            - sh
            - -c
            - |
              set -e
              test -d /in/dist/empty
              test "$(readlink /in/dist/link)" = numbers.txt
              cd /in/dist && echo SUMS-$((1+1)) && find . -type f | sort | xargs sha256sum && echo END-$((1+1))
    inputs:
      - {from: "${{ tasks.build.artifacts.dist }}", path: /in/dist}
"#;

async fn artifacts_cross_workers(fleet: &Fleet) -> anyhow::Result<()> {
    let w = run_workflow(fleet, TWO_WORKERS).await?;
    let mut tasks = fleet.tasks().await?;
    let build = node_task(&mut tasks, &w, "build").await?;
    let verify = node_task(&mut tasks, &w, "verify").await?;
    assert_eq!(fleet.worker_name(ran_on(&build)), "a");
    assert_eq!(fleet.worker_name(ran_on(&verify)), "b");
    // The producer's files, what the consumer received, and what the store serves: equal.
    let produced = between(&logs_of(&mut tasks, &build.id).await, "SUMS-2", "END-2");
    let received = between(&logs_of(&mut tasks, &verify.id).await, "SUMS-2", "END-2");
    assert!(produced.contains("./sub/blob.bin"), "{produced}");
    assert_eq!(produced, received);
    let dest = fleet.dir.path().join("fetched-dist");
    let r = fetch_artifact(fleet, &build.id, "dist", &dest).await?;
    assert_eq!(tree_sums(&dest)?, produced);
    // The consumer's input is the very artifact the producer uploaded.
    let input = verify.spec.as_ref().unwrap().inputs[0]
        .artifact
        .clone()
        .unwrap();
    assert_eq!(
        (input.sha256.as_str(), input.size),
        (r.sha256.as_str(), r.size)
    );
    assert_eq!(build.result.as_ref().unwrap().artifacts[0].sha256, r.sha256);
    // Listed by task and by workflow.
    let listed = fleet.list_artifacts("", &w.id).await?;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].workflow_node, "build");
    Ok(())
}

fn two_workers() -> Vec<WorkerSpec> {
    vec![WorkerSpec::named("a"), WorkerSpec::named("b")]
}

#[tokio::test]
async fn a_directory_artifact_reaches_a_task_on_another_worker_byte_for_byte() -> anyhow::Result<()>
{
    let fleet = Fleet::start(Vec::new(), two_workers()).await?;
    artifacts_cross_workers(&fleet).await
}

#[tokio::test]
async fn the_same_through_an_s3_artifact_store() -> anyhow::Result<()> {
    let s3 = scabbard_tests::moto::MotoServer::start().await?;
    s3.create_bucket("scabbard-artifacts").await?;
    let secret = tempfile::NamedTempFile::new()?;
    std::fs::write(secret.path(), scabbard_tests::moto::SECRET_ACCESS_KEY)?;
    let mut flags = s3.controller_flags("scabbard-artifacts");
    flags.push("--artifacts-s3-secret-access-key-file".into());
    flags.push(secret.path().display().to_string());
    let fleet = Fleet::start(flags, two_workers()).await?;
    artifacts_cross_workers(&fleet).await?;
    // The objects are in the bucket, under the task's prefix, and nothing else is (but
    // the archived attempt logs, under `logs/`).
    let keys: Vec<String> = s3
        .keys("scabbard-artifacts")
        .await?
        .into_iter()
        .filter(|k| !k.contains("/logs/") && !k.starts_with("logs/"))
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].ends_with("/dist.tar.zst"), "{keys:?}");
    Ok(())
}

/// shell (a) → container (b) → shell (a), a file and a directory.
const MIXED: &str = r#"
name: shell-and-container
tasks:
  - name: report
    requirements: {labels: {name: a}}
    shell:
      command: [sh, -c, 'mkdir -p out/report && echo "rows=42" > out/report/summary.txt && printf "\000\001\002binary" > out/report/raw.bin']
    artifacts:
      - {name: report, path: out/report}
  - name: render
    depends_on: [report]
    requirements: {labels: {name: b}}
    container:
      image: alpine:3.20
      steps:
        - args: [sh, -c, 'grep -q rows=42 /work/report/summary.txt && mkdir -p /out && (cat /work/report/summary.txt; wc -c < /work/report/raw.bin) > /out/page.txt']
    inputs:
      - {from: "${{ tasks.report.artifacts.report }}", path: /work/report}
    artifacts:
      - {name: page, path: /out/page.txt}
  - name: publish
    depends_on: [render]
    requirements: {labels: {name: a}}
    shell:
      command: [sh, -c, 'cat site/page.txt; test "$(tail -n 1 site/page.txt | tr -d " ")" = 9']
    inputs:
      - {from: "${{ tasks.render.artifacts.page }}", path: site/page.txt}
"#;

#[tokio::test]
async fn shell_and_container_tasks_hand_files_to_each_other() -> anyhow::Result<()> {
    let mut specs = two_workers();
    for s in &mut specs {
        s.labels.push(("shell".into(), "yes".into()));
    }
    let fleet = Fleet::start(Vec::new(), specs).await?;
    let w = run_workflow(&fleet, MIXED).await?;
    let mut tasks = fleet.tasks().await?;
    let render = node_task(&mut tasks, &w, "render").await?;
    assert_eq!(fleet.worker_name(ran_on(&render)), "b");
    let publish = node_task(&mut tasks, &w, "publish").await?;
    assert_eq!(fleet.worker_name(ran_on(&publish)), "a");
    let log = logs_of(&mut tasks, &publish.id).await;
    assert!(log.contains("rows=42"), "{log}");
    let page = render.result.as_ref().unwrap().artifacts[0].clone();
    assert_eq!(
        page.kind(),
        scabbard_common::proto::ArtifactKind::File,
        "{page:?}"
    );
    Ok(())
}

fn container_task(worker: &str, steps: &[(&[&str], bool)]) -> scabbard_common::proto::TaskSpec {
    use scabbard_common::proto::{ContainerStep, ContainerTask, Requirements, TaskSpec};
    TaskSpec {
        kind: Some(Kind::Container(ContainerTask {
            image: "alpine:3.20".into(),
            steps: steps
                .iter()
                .map(|(args, cache)| ContainerStep {
                    args: args.iter().map(|s| s.to_string()).collect(),
                    name: String::new(),
                    cache: *cache,
                })
                .collect(),
            ..Default::default()
        })),
        requirements: Some(Requirements {
            labels: [("name".to_string(), worker.to_string())].into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn reruns_really_run_unless_a_step_is_marked_cache() -> anyhow::Result<()> {
    let fleet = Fleet::start(Vec::new(), vec![WorkerSpec::named("a")]).await?;
    let engine = &fleet.worker("a").engine;
    let mut tasks = fleet.tasks().await?;
    // The same task twice (a backup, a fetch of main): both runs execute.
    let backup: &[&str] = &[
        "sh",
        "-c",
        "echo dumping; head -c 16 /dev/urandom > /tmp/dump",
    ];
    for _ in 0..2 {
        let id = submit(&mut tasks, container_task("a", &[(backup, false)])).await?;
        expect_succeeded(&mut tasks, &id, T).await?;
    }
    assert_eq!(engine.runs_of(backup)?, 2, "{:#?}", engine.execs()?);
    // A hermetic step marked cache: true runs once; the step after it still runs each time.
    let hermetic: &[&str] = &["sh", "-c", "echo installing pinned tools"];
    let after: &[&str] = &["sh", "-c", "echo testing"];
    for _ in 0..2 {
        let id = submit(
            &mut tasks,
            container_task("a", &[(hermetic, true), (after, false)]),
        )
        .await?;
        expect_succeeded(&mut tasks, &id, T).await?;
    }
    assert_eq!(engine.runs_of(hermetic)?, 1, "{:#?}", engine.execs()?);
    assert_eq!(engine.runs_of(after)?, 2, "{:#?}", engine.execs()?);
    // The engine answered the second hermetic step from its cache (logged as such).
    assert!(
        engine
            .execs()?
            .iter()
            .any(|r| r.cached && r.args == hermetic),
        "{:#?}",
        engine.execs()?
    );
    Ok(())
}

#[tokio::test]
async fn a_retried_attempt_runs_its_steps_again() -> anyhow::Result<()> {
    use scabbard_common::proto::{FailureClass, RetryPolicy};
    let fleet = Fleet::start(Vec::new(), vec![WorkerSpec::named("a")]).await?;
    let engine = &fleet.worker("a").engine;
    let mut tasks = fleet.tasks().await?;
    // Fails in attempt 1, succeeds in attempt 2 (the low half of the fencing token ending
    // SCABBARD_ATTEMPT_ID is the attempt number): the engine must not replay attempt 1's
    // failure from its cache.
    let flaky: &[&str] = &[
        "sh",
        "-c",
        "t=${SCABBARD_ATTEMPT_ID##*/}; test $((t % 4294967296)) -ne 1",
    ];
    let mut spec = container_task("a", &[(flaky, false)]);
    spec.retry = Some(RetryPolicy {
        max_attempts: 2,
        initial_backoff_ms: 50,
        retry_on: vec![FailureClass::ExitCode as i32],
        ..Default::default()
    });
    let id = submit(&mut tasks, spec).await?;
    let t = expect_succeeded(&mut tasks, &id, T).await?;
    assert_eq!(t.attempts.len(), 2);
    assert_eq!(engine.runs_of(flaky)?, 2);
    assert_eq!(t.state(), TaskState::Succeeded);
    Ok(())
}

#[tokio::test]
async fn container_tasks_emit_key_value_outputs_through_their_output_file() -> anyhow::Result<()> {
    let fleet = Fleet::start(Vec::new(), vec![WorkerSpec::named("a")]).await?;
    let w = run_workflow(
        &fleet,
        r#"
name: container-outputs
tasks:
  - name: version
    container:
      image: alpine:3.20
      steps:
        - args: [sh, -c, 'echo "version=1.4.2" >> "$SCABBARD_OUTPUT"; printf "notes<<EOF\nline one\nline two\nEOF\n" >> "$SCABBARD_OUTPUT"']
  - name: use
    depends_on: [version]
    container:
      image: alpine:3.20
      steps:
        - args: [sh, -c, 'test "$V" = 1.4.2 && echo "got $V"']
    env:
      V: "${{ tasks.version.outputs.version }}"
"#,
    )
    .await?;
    let node = w.nodes.iter().find(|n| n.name == "version").unwrap();
    assert_eq!(node.outputs["version"], "1.4.2");
    assert_eq!(node.outputs["notes"], "line one\nline two");
    Ok(())
}
