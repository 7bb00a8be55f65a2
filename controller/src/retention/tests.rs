//! The sweeper against a real embedded store: what it deletes and keeps, and that a
//! deposed leader's sweeper deletes nothing.

use std::sync::Arc;

use prost::Message;
use scabbard_common::proto::{Task, TaskState, Workflow, WorkflowState};
use tokio_util::sync::CancellationToken;

use super::sweep::Run;
use super::{Policy, Sweeper};
use crate::auth::Catalog;
use crate::auth::catalog::DefaultLimits;
use crate::config::ControllerConfig;
use crate::core::history::done_key;
use crate::core::{CoreHandle, CoreMsg};
use crate::logstore::LogStore;
use crate::store::{Compare, EmbeddedStore, Op, Store, Txn};

const NOW: i64 = 1_900_000_000_000;

fn task(id: &str, state: TaskState, finished: i64, workflow: &str) -> Task {
    Task {
        id: id.into(),
        state: state as i32,
        updated_at_ms: finished,
        project: "default".into(),
        workflow_id: workflow.into(),
        idempotency_key: format!("key-{id}"),
        ..Default::default()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<EmbeddedStore>,
    run: Run,
    forgotten: tokio::sync::mpsc::Receiver<CoreMsg>,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
    let rev = store.put("leader", b"me".to_vec()).await.unwrap();
    let logs = LogStore::open(&dir.path().join("logs")).unwrap();
    let (core, forgotten): (CoreHandle, _) = CoreHandle::detached(logs, store.clone());
    let catalog = Catalog::open(
        store.clone(),
        None,
        DefaultLimits {
            requests_per_second: 0,
            burst: 0,
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let run = Run::new(Sweeper {
        cfg: Arc::new(ControllerConfig::default()),
        store: store.clone(),
        catalog,
        core,
        artifacts: None,
        fence: Some(Compare::mod_revision("leader", rev)),
    });
    Fixture {
        _dir: dir,
        store,
        run,
        forgotten,
    }
}

async fn seed(store: &EmbeddedStore, t: &Task) {
    let mut ops = vec![
        Op::put(format!("tasks/{}", t.id), t.encode_to_vec()),
        Op::put(done_key(t.updated_at_ms, &t.id), b"default".to_vec()),
        Op::put(
            format!("idem/default/key-{}", t.id),
            t.id.clone().into_bytes(),
        ),
    ];
    if t.state() == TaskState::Running {
        ops.push(Op::put(format!("live/{}", t.id), Vec::new()));
    }
    store
        .txn(Txn {
            success: ops,
            ..Default::default()
        })
        .await
        .unwrap();
}

fn policy() -> Policy {
    Policy {
        now_ms: NOW,
        default_ms: 1_000,
        projects: Default::default(),
    }
}

async fn exists(store: &EmbeddedStore, key: &str) -> bool {
    store.get(key).await.unwrap().is_some()
}

#[tokio::test]
async fn deletes_expired_final_tasks_and_keeps_the_rest() {
    let mut f = fixture().await;
    let old = task("old", TaskState::Succeeded, NOW - 5_000, "");
    let recent = task("recent", TaskState::Failed, NOW - 10, "");
    let running = task("running", TaskState::Running, NOW - 5_000, "");
    let in_live_wf = task("node", TaskState::Succeeded, NOW - 5_000, "wf1");
    for t in [&old, &recent, &running, &in_live_wf] {
        seed(&f.store, t).await;
    }
    let wf = Workflow {
        id: "wf1".into(),
        state: WorkflowState::Running as i32,
        ..Default::default()
    };
    f.store
        .put("workflows/wf1", wf.encode_to_vec())
        .await
        .unwrap();

    let report = f
        .run
        .round(&policy(), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.tasks, 1, "{report:?}");
    assert!(!f.run.deposed);
    for gone in [
        "tasks/old",
        &done_key(old.updated_at_ms, "old"),
        "idem/default/key-old",
    ] {
        assert!(!exists(&f.store, gone).await, "{gone}");
    }
    for kept in [
        "tasks/recent",
        "tasks/running",
        "live/running",
        "tasks/node",
    ] {
        assert!(exists(&f.store, kept).await, "{kept}");
    }
    match f.forgotten.try_recv() {
        Ok(CoreMsg::Forget { ids }) => assert_eq!(ids, vec!["old".to_string()]),
        _ => panic!("the core was not told"),
    }

    // Once the workflow is over, its finished node goes too.
    let over = Workflow {
        state: WorkflowState::Succeeded as i32,
        ..wf
    };
    f.store
        .put("workflows/wf1", over.encode_to_vec())
        .await
        .unwrap();
    let report = f
        .run
        .round(&policy(), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.tasks, 1, "{report:?}");
    assert!(!exists(&f.store, "tasks/node").await);
}

#[tokio::test]
async fn a_deposed_leader_deletes_nothing() {
    let mut f = fixture().await;
    let old = task("old", TaskState::Succeeded, NOW - 5_000, "");
    seed(&f.store, &old).await;
    // Another leader took over: the leader key was written again.
    f.store.put("leader", b"other".to_vec()).await.unwrap();
    let report = f
        .run
        .round(&policy(), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.tasks, 0, "{report:?}");
    assert!(f.run.deposed);
    assert!(exists(&f.store, "tasks/old").await);
    assert!(exists(&f.store, &done_key(old.updated_at_ms, "old")).await);
    assert!(f.forgotten.try_recv().is_err());
}

#[tokio::test]
async fn the_backlog_is_counted_once_then_follows_what_rounds_delete() {
    let Fixture {
        _dir,
        store,
        mut run,
        mut forgotten,
    } = fixture().await;
    tokio::spawn(async move { while forgotten.recv().await.is_some() {} });
    let budget = super::ROUND_BUDGET;
    let n = 2 * budget + 500;
    let mut ops = Vec::with_capacity(2 * n);
    for i in 0..n {
        let t = task(&format!("t{i:05}"), TaskState::Succeeded, NOW - 5_000, "");
        ops.push(Op::put(format!("tasks/{}", t.id), t.encode_to_vec()));
        ops.push(Op::put(
            done_key(t.updated_at_ms, &t.id),
            b"default".to_vec(),
        ));
    }
    store
        .txn(Txn {
            success: ops,
            ..Default::default()
        })
        .await
        .unwrap();
    let stop = CancellationToken::new();
    // The first round stops at its budget and counts what it left.
    let first = run.round(&policy(), &stop).await.unwrap();
    assert_eq!(first.tasks, budget as u64, "{first:?}");
    assert_eq!(first.backlog, (budget + 500) as u64, "{first:?}");
    // The next, within the count's lifetime, takes what it deleted off that count.
    let second = run.round(&policy(), &stop).await.unwrap();
    assert_eq!(second.tasks, budget as u64, "{second:?}");
    assert_eq!(second.backlog, 500, "{second:?}");
    // The last catches up.
    let third = run.round(&policy(), &stop).await.unwrap();
    assert_eq!((third.tasks, third.backlog), (500, 0), "{third:?}");
    assert!(store.range("done/", None, 0).await.unwrap().kvs.is_empty());
    assert!(store.range("tasks/", None, 0).await.unwrap().kvs.is_empty());
}
