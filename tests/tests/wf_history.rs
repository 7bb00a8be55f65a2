//! Workflow history in the store (issue 14): a finished workflow leaves the core's memory
//! (`ClusterStatus.workflows_in_memory` counts what it holds) and is still served by `Get`
//! (with its nodes), `List` (paged, filtered by state, label, project and creation time),
//! `Watch`, and its idempotency key still holds; cancelling it is FAILED_PRECONDITION. On
//! the embedded store and on etcd, after a controller restart and after a failover, which
//! load only live workflows. Page tokens are stable under concurrent submits; a bad one gets
//! INVALID_ARGUMENT; a store written before the workflow history keys is migrated. Real
//! processes throughout.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use scabbard_common::client::{
    self, AdminServiceClient, ArtifactServiceClient, ProjectServiceClient,
};
use scabbard_common::proto::workflow_service_client::WorkflowServiceClient;
use scabbard_common::proto::{
    ArtifactSpec, CancelWorkflowRequest, ClusterStatusRequest, CreateProjectRequest,
    GetTaskRequest, GetWorkflowRequest, ListArtifactsRequest, ListWorkflowsRequest, NodeState,
    Project, SubmitWorkflowRequest, TaskState, WatchWorkflowRequest, Workflow, WorkflowSpec,
    WorkflowState,
};
use scabbard_tests::etcd::EtcdCluster;
use scabbard_tests::wf::*;
use scabbard_tests::*;
use tonic::Code;

const T: Duration = Duration::from_secs(60);

/// Flags keeping at most one finished workflow (and two finished tasks) in memory.
fn cache_flags() -> Vec<String> {
    [
        "--finished-cache-workflows",
        "1",
        "--finished-cache-tasks",
        "2",
    ]
    .map(String::from)
    .to_vec()
}

fn start(dir: &std::path::Path, port: u16, extra: &[String]) -> anyhow::Result<Controller> {
    Controller::start(
        dir,
        port,
        &ControllerOpts {
            extra: [cache_flags(), extra.to_vec()].concat(),
            ..Default::default()
        },
    )
}

async fn workflows_client(addr: &str) -> anyhow::Result<Workflows> {
    Ok(WorkflowServiceClient::new(admin_channel(addr).await?))
}

/// How many workflows the leader's core holds (an error from a follower).
async fn in_memory(addr: &str) -> anyhow::Result<u64> {
    let s = AdminServiceClient::new(admin_channel(addr).await?)
        .cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner();
    anyhow::ensure!(s.answered_by_leader, "not the leader");
    Ok(s.workflows_in_memory)
}

/// Waits until the core holds exactly `n` workflows.
async fn wait_in_memory(addr: &str, n: u64) -> anyhow::Result<()> {
    eventually(&format!("the core to hold {n} workflows"), T, || async {
        in_memory(addr).await.ok().filter(|m| *m == n)
    })
    .await?;
    Ok(())
}

/// Every page of `req` (page size `size`): the workflows in order.
async fn list_all(
    c: &mut Workflows,
    mut req: ListWorkflowsRequest,
    size: u32,
) -> anyhow::Result<Vec<Workflow>> {
    req.page_size = size;
    let mut out = Vec::new();
    for _ in 0..1000 {
        let r = c.list(req.clone()).await?.into_inner();
        assert!(r.workflows.len() <= size as usize);
        out.extend(r.workflows);
        if r.next_page_token.is_empty() {
            return Ok(out);
        }
        req.page_token = r.next_page_token;
    }
    anyhow::bail!("more than 1000 pages")
}

fn ids(ws: &[Workflow]) -> Vec<String> {
    ws.iter().map(|w| w.id.clone()).collect()
}

struct Submitted {
    /// Oldest first.
    ids: Vec<String>,
    teams: HashMap<String, String>,
    created: Vec<i64>,
    keyed: String,
}

/// A two-node workflow (`first` → `second`) labelled `team`; `fail`: `second` exits 3.
fn two_nodes(team: &str, fail: bool) -> WorkflowSpec {
    let mut first = node("first", &[], "mkdir -p out && echo first > out/a.txt");
    first.spec.as_mut().unwrap().artifacts = vec![ArtifactSpec {
        name: "a".into(),
        path: "out/a.txt".into(),
        optional: false,
    }];
    let mut spec = workflow(
        "pair",
        vec![
            first,
            node(
                "second",
                &["first"],
                if fail { "exit 3" } else { "echo second" },
            ),
        ],
    );
    spec.labels.insert("team".into(), team.into());
    spec
}

/// Submits 6 workflows (labels team=a/b, #3 fails, #4 in project `beta`, #1 with an
/// idempotency key) and waits until they finished.
async fn fill(c: &mut Workflows) -> anyhow::Result<Submitted> {
    let mut s = Submitted {
        ids: Vec::new(),
        teams: HashMap::new(),
        created: Vec::new(),
        keyed: String::new(),
    };
    for i in 0..6 {
        let team = if i % 2 == 0 { "a" } else { "b" };
        let w = c
            .submit(SubmitWorkflowRequest {
                spec: Some(two_nodes(team, i == 3)),
                idempotency_key: if i == 1 {
                    "wonce".into()
                } else {
                    String::new()
                },
                project: if i == 4 { "beta".into() } else { String::new() },
            })
            .await?
            .into_inner()
            .workflow
            .unwrap();
        s.teams.insert(w.id.clone(), team.into());
        s.created.push(w.created_at_ms);
        if i == 1 {
            s.keyed = w.id.clone();
        }
        s.ids.push(w.id);
        // Distinct creation times, so a time range splits them exactly.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    for (i, id) in s.ids.iter().enumerate() {
        let w = wait_workflow(c, id, T).await?;
        let want = if i == 3 {
            WorkflowState::Failed
        } else {
            WorkflowState::Succeeded
        };
        assert_eq!(w.state(), want, "{w:?}");
    }
    Ok(s)
}

async fn create_beta(addr: &str) -> anyhow::Result<()> {
    ProjectServiceClient::new(admin_channel(addr).await?)
        .create(CreateProjectRequest {
            project: Some(Project {
                name: "beta".into(),
                ..Default::default()
            }),
        })
        .await?;
    Ok(())
}

/// What every finished workflow must still be served by, whatever holds it.
async fn check_served(addr: &str, s: &Submitted) -> anyhow::Result<()> {
    let mut c = workflows_client(addr).await?;
    // Get of the oldest (long out of the core's memory), with its nodes and their tasks.
    let w = c
        .get(GetWorkflowRequest {
            id: s.ids[0].clone(),
        })
        .await?
        .into_inner();
    assert_eq!(w.state(), WorkflowState::Succeeded);
    assert_eq!((w.done, w.total, w.nodes.len()), (2, 2, 2));
    assert_eq!(w.spec.as_ref().unwrap().tasks.len(), 2);
    let mut tasks = tasks_client(addr).await?;
    for n in &w.nodes {
        assert_eq!(n.state(), NodeState::Succeeded, "{n:?}");
        let t = tasks
            .get(GetTaskRequest {
                id: n.task_id.clone(),
            })
            .await?
            .into_inner();
        assert_eq!(t.state(), TaskState::Succeeded);
        assert_eq!(t.workflow_id, w.id);
    }
    // Watch: the final state, then the end of the stream.
    let mut watch = c
        .watch(WatchWorkflowRequest {
            id: s.ids[0].clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let ev = tokio::time::timeout(T, watch.message()).await??.unwrap();
    assert_eq!(ev.workflow.unwrap().state(), WorkflowState::Succeeded);
    assert!(tokio::time::timeout(T, watch.message()).await??.is_none());
    // Its artifacts (each node's task read from the store).
    let arts = ArtifactServiceClient::new(admin_channel(addr).await?)
        .list(ListArtifactsRequest {
            task_id: String::new(),
            workflow_id: s.ids[0].clone(),
        })
        .await?
        .into_inner()
        .artifacts;
    assert_eq!(arts.len(), 1, "{arts:?}");
    assert_eq!(
        (arts[0].name.as_str(), arts[0].workflow_node.as_str()),
        ("a", "first")
    );
    // Cancel: it has finished.
    let (code, msg) = code_and_message(
        c.cancel(CancelWorkflowRequest {
            id: s.ids[0].clone(),
            reason: "late".into(),
        })
        .await,
    );
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("already SUCCEEDED"), "{msg}");
    // An unknown id is NOT_FOUND.
    let (code, _) = code_and_message(
        c.get(GetWorkflowRequest {
            id: "01aaaaaaaaaaaaaaaaaaaaaaaa".into(),
        })
        .await,
    );
    assert_eq!(code, Code::NotFound);

    // List: all, newest first, paged 2 at a time, nothing skipped or repeated.
    let newest_first: Vec<String> = s.ids.iter().rev().cloned().collect();
    let all = list_all(&mut c, ListWorkflowsRequest::default(), 2).await?;
    let listed: Vec<String> = ids(&all)
        .into_iter()
        .filter(|id| s.ids.contains(id))
        .collect();
    assert_eq!(listed, newest_first);
    assert!(all.iter().all(|w| w.nodes.len() == 2), "whole workflows");
    // By state.
    let failed = list_all(
        &mut c,
        ListWorkflowsRequest {
            states: vec![WorkflowState::Failed as i32],
            ..Default::default()
        },
        1,
    )
    .await?;
    assert_eq!(ids(&failed), vec![s.ids[3].clone()]);
    // By label (all projects), and by state and label.
    let mut req = ListWorkflowsRequest::default();
    req.labels.insert("team".into(), "a".into());
    let a = list_all(&mut c, req.clone(), 1).await?;
    let want_a: Vec<String> = newest_first
        .iter()
        .filter(|id| s.teams[*id] == "a")
        .cloned()
        .collect();
    assert_eq!(ids(&a), want_a);
    req.states = vec![WorkflowState::Succeeded as i32];
    assert_eq!(ids(&list_all(&mut c, req, 2).await?), want_a);
    // By project, and by project and label (the project's label index).
    let beta = list_all(
        &mut c,
        ListWorkflowsRequest {
            project: "beta".into(),
            ..Default::default()
        },
        10,
    )
    .await?;
    assert_eq!(ids(&beta), vec![s.ids[4].clone()]);
    let mut req = ListWorkflowsRequest {
        project: "default".into(),
        ..Default::default()
    };
    req.labels.insert("team".into(), "a".into());
    let want: Vec<String> = want_a
        .iter()
        .filter(|id| **id != s.ids[4])
        .cloned()
        .collect();
    assert_eq!(ids(&list_all(&mut c, req, 1).await?), want);
    // By creation time: [created of #2, created of #5) → #2, #3, #4.
    let range = list_all(
        &mut c,
        ListWorkflowsRequest {
            created_after_ms: s.created[2],
            created_before_ms: s.created[5],
            ..Default::default()
        },
        2,
    )
    .await?;
    let want: Vec<String> = s.ids[2..5].iter().rev().cloned().collect();
    assert_eq!(ids(&range), want);
    // Bad page tokens and bounds.
    for bad in ["nonsense", "h1.00", &s.ids[0]] {
        let (code, msg) = code_and_message(
            c.list(ListWorkflowsRequest {
                page_token: bad.to_string(),
                ..Default::default()
            })
            .await,
        );
        assert_eq!(code, Code::InvalidArgument, "{bad}: {msg}");
        assert!(msg.contains("next_page_token"), "{msg}");
    }
    let (code, _) = code_and_message(
        c.list(ListWorkflowsRequest {
            created_after_ms: 10,
            created_before_ms: 5,
            ..Default::default()
        })
        .await,
    );
    assert_eq!(code, Code::InvalidArgument);
    // The idempotency key of a workflow out of memory still holds.
    let again = c
        .submit(SubmitWorkflowRequest {
            spec: Some(two_nodes("z", false)),
            idempotency_key: "wonce".into(),
            project: String::new(),
        })
        .await?
        .into_inner();
    assert!(again.existing);
    assert_eq!(again.workflow.unwrap().id, s.keyed);
    Ok(())
}

/// The scenario on one controller (`extra` flags pick the store), then after a restart.
async fn scenario(dir: &std::path::Path, port: u16, extra: Vec<String>) -> anyhow::Result<()> {
    let mut ctl = start(&dir.join("c"), port, &extra)?;
    let addr = ctl.addr.to_string();
    let _w = Worker::start(&addr, &dir.join("w"), "w", 4)?;
    eventually("the controller to lead", T, || async {
        in_memory(&addr).await.ok()
    })
    .await?;
    let mut c = workflows_client(&addr).await?;
    create_beta(&addr).await?;
    let s = fill(&mut c).await?;
    // Finished workflows leave memory: at most the cache (1) is left.
    wait_in_memory(&addr, 1).await?;
    check_served(&addr, &s).await?;

    // After a restart only live workflows are loaded (none here), and all is served.
    ctl.proc.kill9();
    drop(c);
    let ctl = start(&dir.join("c"), ctl.addr.port(), &extra)?;
    let addr = ctl.addr.to_string();
    wait_in_memory(&addr, 0).await?;
    check_served(&addr, &s).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_workflows_are_served_from_the_embedded_store() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    scenario(dir.path(), 0, Vec::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_workflows_are_served_from_etcd() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let dir = tempfile::tempdir()?;
    // A fixed port: etcd mode advertises it.
    let extra = ["--store", "etcd", "--etcd-endpoints", &etcd.endpoints()]
        .map(String::from)
        .to_vec();
    scenario(dir.path(), free_port(), extra).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workflow_page_tokens_are_stable_under_concurrent_submits() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // No worker: the workflows stay running, live in the core, and are listed from the store.
    let ctl = start(&dir.path().join("c"), 0, &[])?;
    let addr = ctl.addr.to_string();
    let mut c = workflows_client(&addr).await?;
    let mut before = Vec::new();
    for i in 0..30 {
        let spec = workflow("one", vec![node("n", &[], &format!("echo {i}"))]);
        before.push(submit_workflow(&mut c, spec).await?.id);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let submitter = {
        let (addr, stop, count) = (addr.clone(), stop.clone(), count.clone());
        tokio::spawn(async move {
            let mut c = workflows_client(&addr).await?;
            while !stop.load(Ordering::Relaxed) {
                let spec = workflow("later", vec![node("n", &[], "echo later")]);
                submit_workflow(&mut c, spec).await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(count.load(Ordering::Relaxed))
        })
    };
    let mut seen = Vec::new();
    let mut req = ListWorkflowsRequest {
        page_size: 7,
        ..Default::default()
    };
    loop {
        let r = c.list(req.clone()).await?.into_inner();
        seen.extend(ids(&r.workflows));
        if r.next_page_token.is_empty() {
            break;
        }
        req.page_token = r.next_page_token;
        // Let a submit land between pages.
        let at = count.load(Ordering::Relaxed);
        eventually("a concurrent submit between pages", T, || async {
            (count.load(Ordering::Relaxed) > at).then_some(())
        })
        .await?;
    }
    stop.store(true, Ordering::Relaxed);
    assert!(submitter.await?? > 0);
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a workflow was listed twice");
    for id in &before {
        assert!(unique.contains(id), "workflow {id} was skipped");
    }
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(sorted, seen, "newest first");
    Ok(())
}

/// Removes every workflow history key from the embedded store at `path` and sets the
/// layout back to 2: a store written before workflow history was served from the store.
async fn strip_workflow_history(path: &std::path::Path) -> anyhow::Result<usize> {
    use scabbard_controller::store::{EmbeddedStore, Op, Store, Txn};
    let store = EmbeddedStore::open(path)?;
    let mut n = 0;
    for prefix in ["wlive/", "wdone/", "widem/", "hist/w"] {
        loop {
            let page = store.range(prefix, None, 100).await?;
            if page.kvs.is_empty() {
                break;
            }
            n += page.kvs.len();
            store
                .txn(Txn {
                    success: page
                        .kvs
                        .iter()
                        .map(|kv| Op::delete(kv.key.clone()))
                        .collect(),
                    ..Default::default()
                })
                .await?;
        }
    }
    store
        .txn(Txn {
            success: vec![Op::put("meta/layout", b"2".to_vec())],
            ..Default::default()
        })
        .await?;
    store.close().await?;
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_store_is_migrated_and_recovery_loads_only_live_workflows() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut ctl = start(&dir.path().join("c"), 0, &[])?;
    let addr = ctl.addr.to_string();
    let mut w = Worker::start(&addr, &dir.path().join("w"), "w", 4)?;
    let mut c = workflows_client(&addr).await?;
    create_beta(&addr).await?;
    let s = fill(&mut c).await?;
    // One workflow stays running (no worker): live work the migrated store must still run.
    w.proc.kill9();
    let live = submit_workflow(&mut c, two_nodes("live", false)).await?.id;
    ctl.proc.kill9();
    drop(c);
    let removed = strip_workflow_history(&dir.path().join("c/state.redb")).await?;
    assert!(
        removed >= 7 * 3,
        "removed only {removed} workflow history keys"
    );

    let ctl = start(&dir.path().join("c"), ctl.addr.port(), &[])?;
    let addr = ctl.addr.to_string();
    // Only the running workflow is live: it is all the core loaded.
    wait_in_memory(&addr, 1).await?;
    let mut c = workflows_client(&addr).await?;
    let listed = list_all(&mut c, ListWorkflowsRequest::default(), 3).await?;
    assert_eq!(listed.len(), 7);
    assert_eq!(listed[0].id, live);
    assert_eq!(listed[0].state(), WorkflowState::Running);
    check_served(&addr, &s).await?;
    // And it still runs, then leaves memory too (the cache keeps one).
    let _w = Worker::start(&addr, &dir.path().join("w2"), "w2", 4)?;
    let done = wait_workflow(&mut c, &live, T).await?;
    assert_eq!(done.state(), WorkflowState::Succeeded);
    wait_in_memory(&addr, 1).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_pages_workflow_lists() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = start(&dir.path().join("c"), 0, &[])?;
    let addr = ctl.addr.to_string();
    let mut c = workflows_client(&addr).await?;
    let mut ids = Vec::new();
    for i in 0..5 {
        let spec = workflow("cli", vec![node("n", &[], &format!("echo {i}"))]);
        ids.push(submit_workflow(&mut c, spec).await?.id);
    }
    let run = |args: &[&str]| {
        let out = cli(dir.path())
            .args(["workflow", "list", "--controller", &addr])
            .args(args)
            .output()
            .expect("run the CLI");
        assert!(out.status.success(), "{out:?}");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (first, hint) = run(&["--limit", "2"]);
    assert!(first.contains(&ids[4]) && first.contains(&ids[3]) && !first.contains(&ids[2]));
    let token = hint
        .split("--page-token ")
        .nth(1)
        .map(str::trim)
        .expect("a next page token");
    let (second, _) = run(&["--limit", "2", "--page-token", token]);
    assert!(second.contains(&ids[2]) && second.contains(&ids[1]) && !second.contains(&ids[3]));
    let (all, hint) = run(&["--limit", "2", "--all"]);
    for id in &ids {
        assert_eq!(all.matches(id.as_str()).count(), 1, "{all}");
    }
    assert!(!hint.contains("--page-token"), "{hint}");
    let out = cli(dir.path())
        .args([
            "workflow",
            "list",
            "--controller",
            &addr,
            "--page-token",
            "bogus",
        ])
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("next_page_token"),
        "{out:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_loads_only_live_workflows_and_serves_the_rest() -> anyhow::Result<()> {
    let mut cs = scabbard_tests::etcd::EtcdControllers::start(2, 1, 4)?;
    let addrs: Vec<String> = cs.controllers.iter().map(|c| c.addr.to_string()).collect();
    let leader = |skip: Option<String>| {
        let addrs = addrs.clone();
        async move {
            for a in addrs.iter().filter(|a| Some(*a) != skip.as_ref()) {
                // Straight to `a` (not following its redirect to the leader).
                let ch = with_token(client::connect(a).await.ok()?, ADMIN_TOKEN);
                let s = AdminServiceClient::new(ch)
                    .cluster_status(ClusterStatusRequest {})
                    .await
                    .ok()?
                    .into_inner();
                if s.answered_by_leader && s.store_healthy {
                    return Some(a.clone());
                }
            }
            None
        }
    };
    let first = eventually("a leader", T, || leader(None)).await?;
    let mut c = workflows_client(&first).await?;
    let mut done = Vec::new();
    for i in 0..3 {
        let spec = workflow("old", vec![node("n", &[], &format!("echo {i}"))]);
        done.push(submit_workflow(&mut c, spec).await?.id);
    }
    for id in &done {
        wait_workflow(&mut c, id, T).await?;
    }
    // One still running when the leader dies.
    let spec = workflow("live", vec![node("n", &[], "sleep 3")]);
    let live = submit_workflow(&mut c, spec).await?.id;
    drop(c);
    let idx = addrs.iter().position(|a| *a == first).expect("ours");
    cs.controllers[idx].proc.kill9();
    let next = eventually("a new leader", T, || leader(Some(first.clone()))).await?;
    // Only the running workflow was loaded.
    assert_eq!(in_memory(&next).await?, 1);
    let mut c = workflows_client(&next).await?;
    for id in &done {
        let w = c
            .get(GetWorkflowRequest { id: id.clone() })
            .await?
            .into_inner();
        assert_eq!(w.state(), WorkflowState::Succeeded);
    }
    let listed = list_all(&mut c, ListWorkflowsRequest::default(), 2).await?;
    let want: Vec<String> = std::iter::once(live.clone())
        .chain(done.iter().rev().cloned())
        .collect();
    assert_eq!(ids(&listed), want);
    let w = wait_workflow(&mut c, &live, T).await?;
    assert_eq!(w.state(), WorkflowState::Succeeded, "{w:?}");
    Ok(())
}
