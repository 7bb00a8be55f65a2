//! Size limits under abuse, through real controller and worker processes: a result too big
//! for the store ends its attempt FAILED once (no commit failure, no rebuild, no resend
//! loop, not after a restart either); a 1.6 MiB submit and an oversized workflow get
//! `INVALID_ARGUMENT` naming size, limit and key; a 1,000-node DAG is validated off the
//! core; workflow node changes write small records. Each time another project's task still
//! runs promptly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use scabbard_common::proto::project_service_client::ProjectServiceClient;
use scabbard_common::proto::{
    AgentStatus, CancelTaskRequest, CancelWorkflowRequest, CreateProjectRequest, OutputSpec,
    Project, RetryPolicy, SubmitTaskRequest, SubmitWorkflowRequest, Task, TaskSpec, TaskState,
    WorkflowState, output_spec,
};
use scabbard_tests::etcd::EtcdServer;
use scabbard_tests::fleet::expect_succeeded;
use scabbard_tests::wf::*;
use scabbard_tests::*;
use tonic::Code;

/// Generous bound of "promptly" (a no-op shell task takes well under a second here).
const PROMPT: Duration = Duration::from_secs(30);

async fn create_projects(c: &Cluster, names: &[&str]) -> anyhow::Result<()> {
    let mut projects = ProjectServiceClient::new(c.channel().await?);
    for name in names {
        projects
            .create(CreateProjectRequest {
                project: Some(Project {
                    name: name.to_string(),
                    ..Default::default()
                }),
            })
            .await?;
    }
    Ok(())
}

async fn submit_in(c: &mut Tasks, project: &str, spec: TaskSpec) -> Result<Task, tonic::Status> {
    Ok(c.submit(SubmitTaskRequest {
        spec: Some(spec),
        project: project.into(),
        ..Default::default()
    })
    .await?
    .into_inner()
    .task
    .expect("task in the reply"))
}

/// Another project's simple task succeeds promptly.
async fn other_project_runs(tasks: &mut Tasks) -> anyhow::Result<()> {
    let t = submit_in(tasks, "other", shell("echo fine")).await?;
    expect_succeeded(tasks, &t.id, PROMPT).await?;
    Ok(())
}

/// A task declaring 120 `path` outputs of 15 KB each (1.8 MB of outputs: a 3.6 MB record).
fn huge_outputs() -> TaskSpec {
    let mut spec = shell(
        "for i in $(seq 1 120); do head -c 15000 /dev/zero | tr '\\0' x > o$i; done; echo made",
    );
    spec.outputs = (1..=120)
        .map(|i| OutputSpec {
            name: format!("o{i}"),
            source: Some(output_spec::Source::Path(format!("o{i}"))),
        })
        .collect();
    spec
}

#[tokio::test]
async fn an_oversized_result_fails_its_attempt_once_and_nobody_waits() -> anyhow::Result<()> {
    let mut c = Cluster::start(&["w0", "w1"], 2, &[])?;
    create_projects(&c, &["abuser", "other"]).await?;
    let mut tasks = tasks_client(&c.addr()).await?;

    let big = submit_in(&mut tasks, "abuser", huge_outputs()).await?;
    let t = wait_state(&mut tasks, &big.id, None, PROMPT).await?;
    assert_eq!(t.state(), TaskState::Failed, "{:?}", t.result);
    let msg = &t.result.as_ref().unwrap().message;
    for part in ["120 outputs", "1800", "131072", "max_outputs_bytes"] {
        assert!(msg.contains(part), "{part:?} not in {msg:?}");
    }
    assert_eq!(t.attempts.len(), 1, "{:?}", t.attempts);
    assert_eq!(t.infra_failures, 0);
    assert!(
        t.encoded_len() < 16 * 1024,
        "record of {} bytes",
        t.encoded_len()
    );
    other_project_runs(&mut tasks).await?;

    // With a retry policy it waits for its next attempt; cancel ends it at once, and the
    // failed attempt's record is small.
    let mut retried = huge_outputs();
    retried.retry = Some(RetryPolicy {
        max_attempts: 5,
        initial_backoff_ms: 60_000,
        ..Default::default()
    });
    let r = submit_in(&mut tasks, "abuser", retried).await?;
    wait_state(&mut tasks, &r.id, Some(TaskState::RetryWait), PROMPT).await?;
    let cancelled = tasks
        .cancel(CancelTaskRequest {
            id: r.id.clone(),
            reason: "enough".into(),
        })
        .await?
        .into_inner();
    assert_eq!(cancelled.state(), TaskState::Cancelled);
    assert!(cancelled.encoded_len() < 16 * 1024);

    // A restart reads the small records back; nothing is resent or rerun.
    let port = c.controller.addr.port();
    let data = c.controller.data_dir.clone();
    c.controller.proc.kill9();
    c.controller = Controller::start(&data, port, &ControllerOpts::default())?;
    let mut tasks = tasks_client(&c.addr()).await?;
    wait_agent(&c.addr(), "both workers back", |a| {
        a.name == "w1" && a.status() == AgentStatus::Connected
    })
    .await?;
    wait_agent(&c.addr(), "both workers back", |a| {
        a.name == "w0" && a.status() == AgentStatus::Connected
    })
    .await?;
    other_project_runs(&mut tasks).await?;
    let again = get(&mut tasks, &big.id).await?;
    assert_eq!(again.state(), TaskState::Failed);
    assert_eq!(again.attempts.len(), 1, "{:?}", again.attempts);
    assert_eq!(get(&mut tasks, &r.id).await?.state(), TaskState::Cancelled);
    Ok(())
}

#[tokio::test]
async fn a_huge_submit_is_invalid_argument_and_disturbs_nothing() -> anyhow::Result<()> {
    // A 2 MiB message limit: the 1.6 MiB spec fits the message, not the spec limit.
    let c = Cluster::start(&["w0"], 2, &["--max-message-bytes", "2097152"])?;
    create_projects(&c, &["abuser", "other"]).await?;
    let mut tasks = tasks_client(&c.addr()).await?;
    let before = submit_in(&mut tasks, "other", shell("sleep 1")).await?;

    let mut spec = shell("true");
    for i in 0..25 {
        spec.env.insert(format!("BIG{i}"), "x".repeat(64 * 1024));
    }
    let size = spec.encoded_len();
    assert!(size > 1_600_000, "{size}");
    let err = submit_in(&mut tasks, "abuser", spec.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // The size as stored (defaults filled in: a few bytes more than sent).
    for part in [&size.to_string()[..4], "262144", "max_spec_bytes"] {
        assert!(
            err.message().contains(part),
            "{part:?} not in {:?}",
            err.message()
        );
    }
    // The same as a workflow node.
    let mut wfs = c.workflows().await?;
    let mut n = node("big", &[], "true");
    n.spec = Some(spec.clone());
    let err = wfs
        .submit(SubmitWorkflowRequest {
            spec: Some(workflow("huge", vec![n])),
            project: "abuser".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("max_spec_bytes"),
        "{}",
        err.message()
    );

    // Over the gRPC message limit: a clear refusal, not UNAVAILABLE.
    for i in 25..40 {
        spec.env.insert(format!("BIG{i}"), "x".repeat(64 * 1024));
    }
    let err = submit_in(&mut tasks, "abuser", spec).await.unwrap_err();
    assert_ne!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("2097152") || err.message().contains("too large"),
        "{err:?}"
    );

    // Nothing else noticed: the task submitted before finishes, another one runs.
    expect_succeeded(&mut tasks, &before.id, PROMPT).await?;
    other_project_runs(&mut tasks).await?;
    Ok(())
}

#[tokio::test]
async fn an_oversized_workflow_is_refused_naming_the_key() -> anyhow::Result<()> {
    let c = Cluster::start(
        &["w0"],
        2,
        &["--max-workflow-bytes", "65536", "--max-spec-bytes", "16384"],
    )?;
    create_projects(&c, &["abuser", "other"]).await?;
    let mut wfs = c.workflows().await?;
    let nodes = (0..20)
        .map(|i| {
            let mut n = node(&format!("n{i}"), &[], "true");
            let s = n.spec.as_mut().unwrap();
            s.env.insert("PAD".into(), "y".repeat(8 * 1024));
            n
        })
        .collect();
    let err = wfs
        .submit(SubmitWorkflowRequest {
            spec: Some(workflow("fat", nodes)),
            project: "abuser".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    for part in ["65536", "max_workflow_bytes"] {
        assert!(
            err.message().contains(part),
            "{part:?} not in {:?}",
            err.message()
        );
    }
    let mut tasks = tasks_client(&c.addr()).await?;
    other_project_runs(&mut tasks).await?;
    Ok(())
}

/// A 1,000-node DAG, each node after up to 20 earlier ones (19,790 edges), every node
/// referencing the first node's output: the heaviest validation the limits allow.
fn thousand_nodes() -> scabbard_common::proto::WorkflowSpec {
    let nodes = (0..1000usize)
        .map(|i| {
            let deps: Vec<String> = (i.saturating_sub(20)..i).map(|d| format!("n{d}")).collect();
            let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
            let script = if i == 0 {
                "echo v=1 >> \"$SCABBARD_OUTPUT\"".to_string()
            } else {
                "echo ${{ tasks.n0.outputs.v }}".to_string()
            };
            node(&format!("n{i}"), &deps, &script)
        })
        .collect();
    workflow("thousand", nodes)
}

#[tokio::test]
async fn a_thousand_node_dag_does_not_hold_up_another_project() -> anyhow::Result<()> {
    let c = Cluster::start(&["w0", "w1"], 2, &[])?;
    create_projects(&c, &["dag", "other"]).await?;
    let mut tasks = tasks_client(&c.addr()).await?;
    let mut wfs = c.workflows().await?;
    // Submit several at once, while another project's tasks come and go.
    let mut submits = Vec::new();
    for _ in 0..3 {
        let mut wfs = wfs.clone();
        submits.push(tokio::spawn(async move {
            wfs.submit(SubmitWorkflowRequest {
                spec: Some(thousand_nodes()),
                project: "dag".into(),
                ..Default::default()
            })
            .await
        }));
    }
    let started = Instant::now();
    for _ in 0..3 {
        other_project_runs(&mut tasks).await?;
    }
    let mut ids = Vec::new();
    for s in submits {
        let wf = s.await??.into_inner().workflow.unwrap();
        assert_eq!(wf.total, 1000);
        ids.push(wf.id);
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    // They run (node by node) while the other project still gets through.
    let first = ids[0].clone();
    eventually("the DAG's first nodes to succeed", PROMPT, || {
        let mut wfs = wfs.clone();
        let id = first.clone();
        async move {
            let wf = wfs
                .get(scabbard_common::proto::GetWorkflowRequest { id })
                .await
                .ok()?
                .into_inner();
            (wf.done >= 3).then_some(())
        }
    })
    .await?;
    other_project_runs(&mut tasks).await?;
    for id in ids {
        wfs.cancel(CancelWorkflowRequest {
            id: id.clone(),
            reason: "done testing".into(),
        })
        .await?;
        let wf = wait_workflow(&mut wfs, &id, PROMPT).await?;
        assert_eq!(wf.state(), WorkflowState::Cancelled);
    }
    Ok(())
}

/// Every value written under `workflows/` in etcd, by key, in order.
type Writes = Arc<Mutex<Vec<(String, usize)>>>;

async fn record_workflow_writes(endpoint: &str) -> anyhow::Result<Writes> {
    let mut client = etcd_client::Client::connect([endpoint], None).await?;
    let mut stream = client
        .watch(
            "/scabbard/workflows/",
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await?;
    let writes: Writes = Arc::default();
    let into = writes.clone();
    tokio::spawn(async move {
        let _keep = client;
        while let Ok(Some(resp)) = stream.message().await {
            for ev in resp.events() {
                if let Some(kv) = ev.kv() {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    into.lock().unwrap().push((key, kv.value().len()));
                }
            }
        }
    });
    Ok(writes)
}

#[tokio::test]
async fn workflow_node_changes_write_small_records() -> anyhow::Result<()> {
    let etcd = EtcdServer::start()?;
    let writes = record_workflow_writes(&etcd.endpoints()).await?;
    let port = free_port();
    let advertise = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir()?;
    let ctl = Controller::start(
        &dir.path().join("c"),
        port,
        &ControllerOpts {
            extra: vec![
                "--store".into(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                etcd.endpoints(),
                "--advertise-addr".into(),
                advertise.clone(),
            ],
            ..ControllerOpts::default()
        },
    )?;
    let _w = Worker::start(&advertise, &dir.path().join("w0"), "w0", 4)?;
    wait_agent(&advertise, "the worker", |a| {
        a.status() == AgentStatus::Connected
    })
    .await?;
    // 60 nodes of ~4 KiB each (a ~240 KiB workflow), in a chain of 3 wide steps.
    let nodes = (0..60)
        .map(|i| {
            let deps: Vec<String> = if i >= 20 {
                vec![format!("n{}", i - 20)]
            } else {
                vec![]
            };
            let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
            let mut n = node(
                &format!("n{i}"),
                &deps,
                "echo out=ok >> \"$SCABBARD_OUTPUT\"",
            );
            n.spec
                .as_mut()
                .unwrap()
                .env
                .insert("PAD".into(), "z".repeat(4000));
            n
        })
        .collect();
    let spec = workflow("padded", nodes);
    let whole = spec.encoded_len();
    let ch = with_token(
        scabbard_common::client::connect(&advertise).await?,
        ADMIN_TOKEN,
    );
    let mut wfs = scabbard_common::proto::workflow_service_client::WorkflowServiceClient::new(ch);
    let wf = submit_workflow(&mut wfs, spec).await?;
    let wf = wait_workflow(&mut wfs, &wf.id, Duration::from_secs(120)).await?;
    assert_eq!(wf.state(), WorkflowState::Succeeded, "{wf:#?}");
    let writes = writes.lock().unwrap().clone();
    let ours: Vec<&(String, usize)> = writes.iter().filter(|(k, _)| k.contains(&wf.id)).collect();
    let mut by_kind: HashMap<&str, (usize, usize)> = HashMap::new();
    for (k, len) in &ours {
        let kind = if k.contains("/nodes/") {
            "node"
        } else if k.contains("/tasks/") {
            "task"
        } else {
            "header"
        };
        let e = by_kind.entry(kind).or_default();
        e.0 += 1;
        e.1 = e.1.max(*len);
    }
    // Each node's task is written once; node and header records stay small however big
    // the workflow; nothing ever rewrote the whole workflow.
    assert_eq!(by_kind["task"].0, 60, "{by_kind:?}");
    assert!(by_kind["node"].0 >= 60 * 3, "{by_kind:?}");
    assert!(by_kind["node"].1 < 1024, "{by_kind:?}");
    assert!(by_kind["header"].1 < 1024, "{by_kind:?}");
    assert!(ours.iter().all(|(_, len)| *len < whole / 10), "{whole}");
    let total: usize = ours.iter().map(|(_, l)| l).sum();
    assert!(
        total < 2 * whole,
        "{total} bytes written for a {whole}-byte workflow"
    );
    drop(ctl);
    Ok(())
}
