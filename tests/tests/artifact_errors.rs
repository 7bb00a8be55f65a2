//! Bad input around artifacts, sources and GPUs, end to end: every refusal has the right
//! gRPC code (or, when only the worker can tell, a USER failure) and a message naming the
//! field, and nothing is left half-written in the artifact store.

use std::time::Duration;

use scabbard_common::proto::{
    ArtifactInput, ArtifactSpec, ContainerStep, ContainerTask, ErrorClass, SubmitTaskRequest,
    SubmitWorkflowRequest, TaskSpec, TaskState, task_spec::Kind,
};
use scabbard_tests::fleet::*;
use scabbard_tests::*;
use tonic::Code;

const T: Duration = Duration::from_secs(60);

fn parse(yaml: &str) -> scabbard_common::proto::WorkflowSpec {
    scabbard_common::wfdef::parse_workflow(yaml, "test.yaml").expect("workflow parses")
}

async fn submit_wf(fleet: &Fleet, yaml: &str) -> (Code, String) {
    let mut wf = fleet.workflows().await.unwrap();
    code_and_message(
        wf.submit(SubmitWorkflowRequest {
            spec: Some(parse(yaml)),
            idempotency_key: String::new(),
            project: String::new(),
        })
        .await,
    )
}

fn container(script: &str) -> ContainerTask {
    ContainerTask {
        image: "alpine:3.20".into(),
        steps: vec![ContainerStep {
            args: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn submit_spec(tasks: &mut Tasks, spec: TaskSpec) -> Result<String, (Code, String)> {
    tasks
        .submit(SubmitTaskRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
            project: String::new(),
        })
        .await
        .map(|r| r.into_inner().task.unwrap().id)
        .map_err(|s| (s.code(), s.message().to_string()))
}

#[tokio::test]
async fn bad_references_and_paths_are_refused_at_submit_naming_the_field() -> anyhow::Result<()> {
    let fleet = Fleet::controller(Vec::new())?;
    // An unknown task, an undeclared artifact, a non-ancestor (a cycle through the input).
    let (code, msg) = submit_wf(
        &fleet,
        r#"
tasks:
  - {name: build, shell: {command: [make]}, artifacts: [{name: dist, path: dist}]}
  - {name: ship, depends_on: [build], shell: {command: [ship]}, inputs: [{from: "${{ tasks.biuld.artifacts.dist }}", path: in}]}
"#,
    )
    .await;
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        msg.contains("inputs[0].from") && msg.contains("no task biuld"),
        "{msg}"
    );
    let (code, msg) = submit_wf(
        &fleet,
        r#"
tasks:
  - {name: build, shell: {command: [make]}, artifacts: [{name: dist, path: dist}]}
  - {name: ship, depends_on: [build], shell: {command: [ship]}, inputs: [{from: "${{ tasks.build.artifacts.docs }}", path: in}]}
"#,
    )
    .await;
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        msg.contains("declares no artifact docs (it declares: dist)"),
        "{msg}"
    );
    let (code, msg) = submit_wf(
        &fleet,
        r#"
tasks:
  - {name: a, shell: {command: [a]}, inputs: [{from: "${{ tasks.b.artifacts.x }}", path: in}]}
  - {name: b, depends_on: [a], shell: {command: [b]}, artifacts: [{name: x, path: x}]}
"#,
    )
    .await;
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.contains("cycle: a -> b -> a"), "{msg}");
    // Paths: a shell artifact leaving the work dir, a relative container path.
    let (code, msg) = submit_wf(
        &fleet,
        r#"
tasks:
  - {name: a, shell: {command: [a]}, artifacts: [{name: x, path: ../x}]}
"#,
    )
    .await;
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.contains("spec.artifacts[0].path"), "{msg}");

    // Plain tasks: an unknown producer, a workflow reference outside a workflow.
    let mut tasks = fleet.tasks().await?;
    let mut spec = shell("true");
    spec.inputs.push(ArtifactInput {
        from: "01jzzzzzzzzzzzzzzzzzzzzzzz/dist".into(),
        path: "in".into(),
        artifact: None,
    });
    let (code, msg) = submit_spec(&mut tasks, spec.clone()).await.unwrap_err();
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        msg.contains("spec.inputs[0].from") && msg.contains("does not exist"),
        "{msg}"
    );
    spec.inputs[0].from = "${{ tasks.build.artifacts.dist }}".into();
    let (code, msg) = submit_spec(&mut tasks, spec).await.unwrap_err();
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.contains("workflow"), "{msg}");
    // A producer that has not succeeded (no worker here: it stays queued).
    let id = submit(&mut tasks, shell("true")).await?;
    let mut spec = shell("true");
    spec.inputs.push(ArtifactInput {
        from: format!("{id}/dist"),
        path: "in".into(),
        artifact: None,
    });
    let (code, msg) = submit_spec(&mut tasks, spec).await.unwrap_err();
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        msg.contains(&id) && msg.contains("QUEUED") && msg.contains("succeeded"),
        "{msg}"
    );

    // Container fields.
    let mut c = container("true");
    c.gpus = vec!["all".into(), "0".into()];
    let (code, msg) = submit_spec(
        &mut tasks,
        TaskSpec {
            kind: Some(Kind::Container(c)),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.contains("spec.container.gpus"), "{msg}");
    let mut c = container("true");
    c.git.push(scabbard_common::proto::GitSource {
        url: "file:///etc".into(),
        path: "/src".into(),
        ..Default::default()
    });
    let (code, msg) = submit_spec(
        &mut tasks,
        TaskSpec {
            kind: Some(Kind::Container(c)),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.contains("spec.container.git[0].url"), "{msg}");
    Ok(())
}

#[tokio::test]
async fn an_oversized_artifact_fails_the_attempt_and_nothing_is_stored() -> anyhow::Result<()> {
    let fleet = Fleet::start(
        vec!["--max-artifact-bytes".into(), "64KiB".into()],
        vec![WorkerSpec::named("a")],
    )
    .await?;
    let mut tasks = fleet.tasks().await?;
    let spec = TaskSpec {
        kind: Some(Kind::Container(container(
            "mkdir -p /out && head -c 1000000 /dev/urandom > /out/big.bin",
        ))),
        artifacts: vec![ArtifactSpec {
            name: "big".into(),
            path: "/out/big.bin".into(),
            optional: false,
        }],
        ..Default::default()
    };
    let id = submit(&mut tasks, spec).await?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Failed, "{t:?}");
    let r = t.result.unwrap();
    assert_eq!(r.error_class(), ErrorClass::User, "{r:?}");
    assert!(
        r.message.contains("artifact big") && r.message.contains("max_artifact_bytes"),
        "{}",
        r.message
    );
    assert!(r.artifacts.is_empty());
    assert!(fleet.list_artifacts(&id, "").await?.is_empty());
    // Nothing in the store's directory either (but the archived attempt logs under
    // `logs/`, which share the blob store).
    let store = fleet.dir.path().join("controller/artifacts");
    let logs = store.join("logs");
    let mut files = Vec::new();
    let mut todo = vec![store];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path() == logs {
                continue;
            }
            if e.file_type()?.is_dir() {
                todo.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    assert!(files.is_empty(), "{files:?}");
    Ok(())
}

#[tokio::test]
async fn a_gpu_the_worker_does_not_have_is_the_tasks_failure() -> anyhow::Result<()> {
    let fleet = Fleet::start(
        Vec::new(),
        vec![WorkerSpec::named("gpu").dagger("gpus = [\"0\"]")],
    )
    .await?;
    let agent = wait_agent(&fleet.addr(), "the gpu capability", |a| {
        a.capabilities.iter().any(|c| c == "gpu")
    })
    .await?;
    assert_eq!(agent.name, "gpu");
    let mut tasks = fleet.tasks().await?;
    let mut c = container("echo $NVIDIA_VISIBLE_DEVICES");
    c.gpus = vec!["1".into()];
    let id = submit(
        &mut tasks,
        TaskSpec {
            kind: Some(Kind::Container(c)),
            ..Default::default()
        },
    )
    .await?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Failed, "{t:?}");
    let r = t.result.unwrap();
    assert_eq!(r.error_class(), ErrorClass::User);
    assert!(
        r.message.contains("container.gpus") && r.message.contains("[dagger].gpus"),
        "{}",
        r.message
    );
    // The device it has: the container sees it.
    let mut c = container("echo gpus=$NVIDIA_VISIBLE_DEVICES");
    c.gpus = vec!["0".into()];
    let id = submit(
        &mut tasks,
        TaskSpec {
            kind: Some(Kind::Container(c)),
            ..Default::default()
        },
    )
    .await?;
    expect_succeeded(&mut tasks, &id, T).await?;
    let log = logs(&mut tasks, &id, 0, false).await?;
    assert!(log.contains("gpus=0"), "{log}");
    Ok(())
}
