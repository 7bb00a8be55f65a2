//! Shell-task artifacts end to end through a real controller and two real workers: a
//! producer's directory and file artifacts reach a consumer forced onto the other worker
//! (byte for byte: the consumer checks them with `sha256sum`), as a workflow
//! (`${{ tasks.produce.artifacts.dist }}`) and as plain tasks (`<task id>/<name>`). The
//! consumer's worker runs shell tasks as `nobody`, so its inputs must be copies it owns.
//!
//! These need the controller's artifact store and the workflow resolution of artifact
//! references (merged separately from the worker side).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::Result;
use scabbard_common::artifact::Sha256;
use scabbard_common::proto::{
    ArtifactInput, ArtifactKind, ArtifactSpec, Requirements, TaskSpec, TaskState, WorkflowState,
};
use scabbard_tests::wf::{Workflows, node, node_of, submit_workflow, wait_workflow, workflow};
use scabbard_tests::{
    Controller, ControllerOpts, Tasks, Worker, get, logs, shell, submit, tasks_client, wait_agent,
    wait_state,
};

/// What the producer writes: `dist/numbers.txt` (1..=100000, one per line),
/// `dist/nested/deeper/hello.txt` and `report.json`.
const PRODUCE: &str = r#"
    set -e
    mkdir -p dist/nested/deeper
    seq 1 100000 > dist/numbers.txt
    printf 'hello from the producer\n' > dist/nested/deeper/hello.txt
    printf '{"ok":true}' > report.json
"#;

fn sha256_hex(data: &[u8]) -> String {
    let mut h = Sha256::default();
    h.update(data);
    h.finish()
}

/// The consumer's script: checks every input file against the digests of what the
/// producer wrote, then changes its own copy (it owns it, running as `nobody`).
fn consume_script() -> String {
    let numbers: String = (1..=100_000).map(|i| format!("{i}\n")).collect();
    format!(
        "set -e\n\
         echo '{}  in/dist/numbers.txt' | sha256sum -c -\n\
         echo '{}  in/dist/nested/deeper/hello.txt' | sha256sum -c -\n\
         echo '{}  in/report.json' | sha256sum -c -\n\
         echo tampered >> in/dist/numbers.txt\n\
         id -u\n",
        sha256_hex(numbers.as_bytes()),
        sha256_hex(b"hello from the producer\n"),
        sha256_hex(br#"{"ok":true}"#),
    )
}

fn on(worker: &str, mut spec: TaskSpec) -> TaskSpec {
    spec.requirements = Some(Requirements {
        labels: HashMap::from([("name".to_string(), worker.to_string())]),
        ..Default::default()
    });
    spec
}

fn producer_spec() -> TaskSpec {
    let mut spec = on("w0", shell(PRODUCE));
    spec.artifacts = vec![
        ArtifactSpec {
            name: "dist".into(),
            path: "dist".into(),
            optional: false,
        },
        ArtifactSpec {
            name: "report".into(),
            path: "report.json".into(),
            optional: false,
        },
        ArtifactSpec {
            name: "coverage".into(),
            path: "coverage".into(),
            optional: true,
        },
    ];
    spec
}

fn consumer_spec(dist_from: &str, report_from: &str) -> TaskSpec {
    let mut spec = on("w1", shell(&consume_script()));
    spec.inputs = vec![
        ArtifactInput {
            from: dist_from.into(),
            path: "in/dist".into(),
            artifact: None,
        },
        ArtifactInput {
            from: report_from.into(),
            path: "in/report.json".into(),
            artifact: None,
        },
    ];
    spec
}

/// A controller, worker `w0` (shell tasks as the worker's user) and worker `w1` (shell
/// tasks as `nobody`).
struct Fleet {
    _dir: tempfile::TempDir,
    _controller: Controller,
    workers: Vec<Worker>,
    addr: String,
}

impl Fleet {
    async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // `nobody` passes through to w1's work root.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
        let controller = Controller::start(
            &dir.path().join("controller"),
            0,
            &ControllerOpts::default(),
        )?;
        let addr = controller.addr.to_string();
        let w0 = Worker::start(&addr, &dir.path().join("w0"), "w0", 2)?;
        let w1 = Worker::start_with_config(
            &addr,
            &dir.path().join("w1"),
            "w1",
            2,
            "[shell]\nrun_as = \"nobody\"\n",
        )?;
        for name in ["w0", "w1"] {
            wait_agent(&addr, &format!("{name} to connect"), |a| {
                a.name == name && a.status() == scabbard_common::proto::AgentStatus::Connected
            })
            .await?;
        }
        Ok(Self {
            _dir: dir,
            _controller: controller,
            workers: vec![w0, w1],
            addr,
        })
    }

    async fn tasks(&self) -> Result<Tasks> {
        tasks_client(&self.addr).await
    }

    async fn workflows(&self) -> Result<Workflows> {
        let ch = scabbard_tests::admin_channel(&self.addr).await?;
        Ok(scabbard_common::proto::workflow_service_client::WorkflowServiceClient::new(ch))
    }
}

/// Checks a succeeded producer's result: both required artifacts, with digests, no
/// optional one.
fn check_producer_result(t: &scabbard_common::proto::Task) {
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    let result = t.result.as_ref().expect("a result");
    let mut names: Vec<(&str, ArtifactKind)> = result
        .artifacts
        .iter()
        .map(|a| (a.name.as_str(), a.kind()))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("dist", ArtifactKind::Directory),
            ("report", ArtifactKind::File)
        ]
    );
    for a in &result.artifacts {
        assert!(scabbard_common::artifact::is_sha256(&a.sha256), "{a:?}");
        assert!(a.size > 0 && a.task_id == t.id, "{a:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_passes_artifacts_to_a_consumer_on_another_worker() -> Result<()> {
    let fleet = Fleet::start().await?;
    let mut wf = fleet.workflows().await?;
    let mut produce = node("produce", &[], PRODUCE);
    produce.spec = Some(producer_spec());
    let mut consume = node("consume", &["produce"], "");
    consume.spec = Some(consumer_spec(
        "${{ tasks.produce.artifacts.dist }}",
        "${{ tasks.produce.artifacts.report }}",
    ));
    let submitted = submit_workflow(&mut wf, workflow("artifacts", vec![produce, consume])).await?;
    let done = wait_workflow(&mut wf, &submitted.id, Duration::from_secs(90)).await?;
    let mut c = fleet.tasks().await?;
    let produce_id = node_of(&done, "produce").task_id.clone();
    let consume_id = node_of(&done, "consume").task_id.clone();
    let consume_log = logs(&mut c, &consume_id, 0, false)
        .await
        .unwrap_or_default();
    assert_eq!(
        done.state(),
        WorkflowState::Succeeded,
        "{done:?}\nconsumer log:\n{consume_log}"
    );
    let producer = get(&mut c, &produce_id).await?;
    check_producer_result(&producer);
    let consumer = get(&mut c, &consume_id).await?;
    let (w0, w1) = (
        fleet.workers[0].agent_id().expect("w0 registered"),
        fleet.workers[1].agent_id().expect("w1 registered"),
    );
    let ran_on = |t: &scabbard_common::proto::Task| {
        t.attempts
            .last()
            .map(|a| a.agent_id.clone())
            .unwrap_or_default()
    };
    assert_eq!(ran_on(&producer), w0);
    assert_eq!(
        ran_on(&consumer),
        w1,
        "the consumer ran on the other worker"
    );
    // Every digest checked out, the consumer ran as nobody and the worker said where its
    // inputs came from.
    assert_eq!(consume_log.matches(": OK").count(), 3, "{consume_log}");
    assert!(consume_log.contains("65534"), "{consume_log}");
    assert!(consume_log.contains("input in/dist ("), "{consume_log}");
    let produce_log = logs(&mut c, &produce_id, 0, false).await?;
    assert!(produce_log.contains("artifact dist: "), "{produce_log}");
    assert!(
        produce_log.contains("optional artifact coverage"),
        "{produce_log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tasks_name_artifacts_by_task_id() -> Result<()> {
    let fleet = Fleet::start().await?;
    let mut c = fleet.tasks().await?;
    let producer_id = submit(&mut c, producer_spec()).await?;
    let producer = wait_state(&mut c, &producer_id, None, Duration::from_secs(60)).await?;
    check_producer_result(&producer);
    let consumer_id = submit(
        &mut c,
        consumer_spec(
            &format!("{producer_id}/dist"),
            &format!("{producer_id}/report"),
        ),
    )
    .await?;
    let consumer = wait_state(&mut c, &consumer_id, None, Duration::from_secs(60)).await?;
    let log = logs(&mut c, &consumer_id, 0, false).await?;
    assert_eq!(
        consumer.state(),
        TaskState::Succeeded,
        "{consumer:?}\n{log}"
    );
    assert_eq!(log.matches(": OK").count(), 3, "{log}");

    // A second consumer on the same worker is served from its cache, and gets a pristine
    // copy although the first one changed its own.
    let again_id = submit(
        &mut c,
        consumer_spec(
            &format!("{producer_id}/dist"),
            &format!("{producer_id}/report"),
        ),
    )
    .await?;
    let again = wait_state(&mut c, &again_id, None, Duration::from_secs(60)).await?;
    let log = logs(&mut c, &again_id, 0, false).await?;
    assert_eq!(again.state(), TaskState::Succeeded, "{again:?}\n{log}");
    assert!(log.contains("from this worker's cache"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_required_artifact_fails_the_producer_as_a_user_error() -> Result<()> {
    let fleet = Fleet::start().await?;
    let mut c = fleet.tasks().await?;
    let mut spec = on("w0", shell("mkdir -p dist"));
    spec.artifacts = vec![ArtifactSpec {
        name: "report".into(),
        path: "out/report.json".into(),
        optional: false,
    }];
    let id = submit(&mut c, spec).await?;
    let t = wait_state(&mut c, &id, None, Duration::from_secs(60)).await?;
    assert_eq!(t.state(), TaskState::Failed, "{t:?}");
    let result = t.result.expect("a result");
    assert_eq!(
        result.error_class(),
        scabbard_common::proto::ErrorClass::User
    );
    assert!(
        result.message.contains("required artifact report")
            && result.message.contains("out/report.json"),
        "{}",
        result.message
    );
    Ok(())
}
