//! Live state in memory, history in the store (issue 14): a finished task leaves the
//! core's memory (`ClusterStatus.total_tasks` counts what it holds) and is still served by
//! `Get`, `List` (paged, filtered by state, label, project and creation time), `Logs` and
//! `Watch` with `send_initial`, and its idempotency key still holds: on the embedded store
//! and on etcd, and after a controller restart. Page tokens are stable under concurrent
//! submits; a bad one gets INVALID_ARGUMENT. Real processes throughout.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use scabbard_common::client::{AdminServiceClient, ProjectServiceClient};
use scabbard_common::proto::{
    ClusterStatusRequest, CreateProjectRequest, ListTasksRequest, Project, SubmitTaskRequest, Task,
    TaskState, WatchTasksRequest,
};
use scabbard_tests::etcd::EtcdCluster;
use scabbard_tests::*;
use tonic::Code;

const T: Duration = Duration::from_secs(60);

/// A controller keeping at most this many finished tasks in memory.
const CACHE: &str = "2";

fn controller(dir: &std::path::Path, extra: &[String]) -> anyhow::Result<Controller> {
    let mut flags = Vec::new();
    if !extra.iter().any(|f| f == "--finished-cache-tasks") {
        flags.extend(["--finished-cache-tasks".to_string(), CACHE.to_string()]);
    }
    flags.extend_from_slice(extra);
    Controller::start(
        dir,
        0,
        &ControllerOpts {
            extra: flags,
            ..Default::default()
        },
    )
}

/// How many tasks the leader's core holds (an error from a follower).
async fn in_memory(addr: &str) -> anyhow::Result<u64> {
    let s = AdminServiceClient::new(admin_channel(addr).await?)
        .cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner();
    anyhow::ensure!(s.answered_by_leader, "not the leader");
    Ok(s.total_tasks)
}

/// Waits until the core holds at most `n` tasks.
async fn wait_in_memory_at_most(addr: &str, n: u64) -> anyhow::Result<()> {
    eventually(
        &format!("the core to hold at most {n} tasks"),
        T,
        || async { in_memory(addr).await.ok().filter(|m| *m <= n) },
    )
    .await?;
    Ok(())
}

/// Every page of `req` (page size `size`): the tasks in order.
async fn list_all(
    c: &mut Tasks,
    mut req: ListTasksRequest,
    size: u32,
) -> anyhow::Result<Vec<Task>> {
    req.page_size = size;
    let mut out = Vec::new();
    for _ in 0..1000 {
        let r = c.list(req.clone()).await?.into_inner();
        assert!(r.tasks.len() <= size as usize);
        out.extend(r.tasks);
        if r.next_page_token.is_empty() {
            return Ok(out);
        }
        req.page_token = r.next_page_token;
    }
    anyhow::bail!("List did not end after 1000 pages")
}

fn ids(ts: &[Task]) -> Vec<String> {
    ts.iter().map(|t| t.id.clone()).collect()
}

struct Submitted {
    /// Oldest first.
    ids: Vec<String>,
    labels: HashMap<String, String>,
    created: Vec<i64>,
    keyed: String,
}

/// Submits 6 shell tasks (labels batch=a/b, one in project `beta`, one with an idempotency
/// key) and waits until they finished.
async fn fill(c: &mut Tasks) -> anyhow::Result<Submitted> {
    let mut s = Submitted {
        ids: Vec::new(),
        labels: HashMap::new(),
        created: Vec::new(),
        keyed: String::new(),
    };
    for i in 0..6 {
        let batch = if i % 2 == 0 { "a" } else { "b" };
        let mut spec = shell(&format!("echo hello-{i}"));
        spec.labels.insert("batch".into(), batch.into());
        let r = c
            .submit(SubmitTaskRequest {
                spec: Some(spec),
                idempotency_key: if i == 1 { "once".into() } else { String::new() },
                project: if i == 4 { "beta".into() } else { String::new() },
            })
            .await?
            .into_inner();
        let t = r.task.unwrap();
        s.labels.insert(t.id.clone(), batch.into());
        s.created.push(t.created_at_ms);
        if i == 1 {
            s.keyed = t.id.clone();
        }
        s.ids.push(t.id);
        // Distinct creation times, so a time range splits them exactly.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    for id in &s.ids {
        let t = wait_state(c, id, None, T).await?;
        assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    }
    Ok(s)
}

/// What every finished task must still be served by, whatever holds it.
async fn check_served(addr: &str, s: &Submitted) -> anyhow::Result<()> {
    let mut c = tasks_client(addr).await?;
    // Get and Logs of the oldest task (long out of the core's memory).
    let t = get(&mut c, &s.ids[0]).await?;
    assert_eq!(t.state(), TaskState::Succeeded);
    let log = logs(&mut c, &s.ids[0], 0, false).await?;
    assert!(log.contains("hello-0"), "log: {log:?}");
    let log = logs(&mut c, &s.ids[0], 0, true).await?;
    assert!(log.contains("hello-0"), "followed log: {log:?}");
    // Watch with send_initial: the current record first.
    let mut w = c
        .watch(WatchTasksRequest {
            ids: vec![s.ids[0].clone()],
            send_initial: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let ev = tokio::time::timeout(T, w.message()).await??.unwrap();
    assert_eq!(ev.task.as_ref().unwrap().id, s.ids[0]);
    assert_eq!(ev.task.unwrap().state(), TaskState::Succeeded);

    // List: all, newest first, paged 2 at a time, nothing skipped or repeated.
    let all = list_all(&mut c, ListTasksRequest::default(), 2).await?;
    let newest_first: Vec<String> = s.ids.iter().rev().cloned().collect();
    let listed: Vec<String> = ids(&all)
        .into_iter()
        .filter(|id| s.ids.contains(id))
        .collect();
    assert_eq!(listed, newest_first);
    // By state and label.
    let mut req = ListTasksRequest {
        states: vec![TaskState::Succeeded as i32],
        ..Default::default()
    };
    req.labels.insert("batch".into(), "a".into());
    let a = list_all(&mut c, req, 1).await?;
    let want: Vec<String> = newest_first
        .iter()
        .filter(|id| s.labels[*id] == "a")
        .cloned()
        .collect();
    assert_eq!(ids(&a), want);
    let failed = list_all(
        &mut c,
        ListTasksRequest {
            states: vec![TaskState::Failed as i32],
            ..Default::default()
        },
        10,
    )
    .await?;
    assert!(failed.is_empty(), "{failed:?}");
    // By project.
    let beta = list_all(
        &mut c,
        ListTasksRequest {
            project: "beta".into(),
            ..Default::default()
        },
        10,
    )
    .await?;
    assert_eq!(ids(&beta), vec![s.ids[4].clone()]);
    // By project and label (the project's label index).
    let mut req = ListTasksRequest {
        project: "default".into(),
        ..Default::default()
    };
    req.labels.insert("batch".into(), "a".into());
    let default_a = list_all(&mut c, req, 1).await?;
    let want: Vec<String> = newest_first
        .iter()
        .filter(|id| s.labels[*id] == "a" && **id != s.ids[4])
        .cloned()
        .collect();
    assert_eq!(ids(&default_a), want);
    // By creation time: [created of #2, created of #5) → #2, #3, #4.
    let range = list_all(
        &mut c,
        ListTasksRequest {
            created_after_ms: s.created[2],
            created_before_ms: s.created[5],
            ..Default::default()
        },
        2,
    )
    .await?;
    let want: Vec<String> = s.ids[2..5].iter().rev().cloned().collect();
    assert_eq!(ids(&range), want);
    // A bad page token.
    for bad in ["nonsense", "h1.00", &s.ids[0]] {
        let (code, msg) = code_and_message(
            c.list(ListTasksRequest {
                page_token: bad.to_string(),
                ..Default::default()
            })
            .await,
        );
        assert_eq!(code, Code::InvalidArgument, "{bad}: {msg}");
        assert!(msg.contains("next_page_token"), "{msg}");
    }
    // The idempotency key of a task out of memory still holds.
    let again = c
        .submit(SubmitTaskRequest {
            spec: Some(shell("echo not-run")),
            idempotency_key: "once".into(),
            project: String::new(),
        })
        .await?
        .into_inner();
    assert!(again.existing);
    assert_eq!(again.task.unwrap().id, s.keyed);
    Ok(())
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

/// The scenario on one controller (`extra` flags pick the store), then after a restart.
async fn scenario(dir: &std::path::Path, extra: Vec<String>) -> anyhow::Result<()> {
    let mut ctl = controller(&dir.join("c"), &extra)?;
    let addr = ctl.addr.to_string();
    let _w = Worker::start(&addr, &dir.join("w"), "w", 4)?;
    let mut c = tasks_client(&addr).await?;
    create_beta(&addr).await?;
    let s = fill(&mut c).await?;
    // Finished tasks leave memory: at most the cache is left.
    wait_in_memory_at_most(&addr, CACHE.parse()?).await?;
    check_served(&addr, &s).await?;

    // After a restart only live work is loaded (none here), and everything is served.
    ctl.proc.kill9();
    drop(c);
    let ctl = Controller::start(
        &dir.join("c"),
        ctl.addr.port(),
        &ControllerOpts {
            extra: [
                vec!["--finished-cache-tasks".to_string(), CACHE.to_string()],
                extra,
            ]
            .concat(),
            ..Default::default()
        },
    )?;
    let addr = ctl.addr.to_string();
    tasks_client(&addr).await?;
    wait_in_memory_at_most(&addr, CACHE.parse()?).await?;
    check_served(&addr, &s).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_tasks_are_served_from_the_embedded_store() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    scenario(dir.path(), Vec::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_tasks_are_served_from_etcd() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let dir = tempfile::tempdir()?;
    let port = free_port();
    scenario_on_port(dir.path(), port, etcd.endpoints()).await
}

/// The etcd scenario: a fixed port (etcd mode advertises it).
async fn scenario_on_port(
    dir: &std::path::Path,
    port: u16,
    endpoints: String,
) -> anyhow::Result<()> {
    let extra = vec![
        "--store".to_string(),
        "etcd".to_string(),
        "--etcd-endpoints".to_string(),
        endpoints,
        "--finished-cache-tasks".to_string(),
        CACHE.to_string(),
    ];
    let opts = ControllerOpts {
        extra,
        ..Default::default()
    };
    let mut ctl = Controller::start(&dir.join("c"), port, &opts)?;
    let addr = ctl.addr.to_string();
    let _w = Worker::start(&addr, &dir.join("w"), "w", 4)?;
    let mut c = tasks_client(&addr).await?;
    eventually("the controller to lead", T, || async {
        in_memory(&addr).await.ok()
    })
    .await?;
    create_beta(&addr).await?;
    let s = fill(&mut c).await?;
    wait_in_memory_at_most(&addr, CACHE.parse()?).await?;
    check_served(&addr, &s).await?;
    ctl.proc.kill9();
    drop(c);
    let ctl = Controller::start(&dir.join("c"), port, &opts)?;
    let addr = ctl.addr.to_string();
    eventually("the restarted controller to lead", T, || async {
        in_memory(&addr).await.ok()
    })
    .await?;
    wait_in_memory_at_most(&addr, CACHE.parse()?).await?;
    check_served(&addr, &s).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn page_tokens_are_stable_under_concurrent_submits() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // No worker: the tasks stay queued, live in the core, and are listed from the store.
    let ctl = controller(&dir.path().join("c"), &[])?;
    let addr = ctl.addr.to_string();
    let mut c = tasks_client(&addr).await?;
    let mut before = Vec::new();
    for i in 0..40 {
        before.push(submit(&mut c, shell(&format!("echo {i}"))).await?);
    }
    // Submits keep coming while a client pages.
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let submitter = {
        let (addr, stop, count) = (addr.clone(), stop.clone(), count.clone());
        tokio::spawn(async move {
            let mut c = tasks_client(&addr).await?;
            while !stop.load(Ordering::Relaxed) {
                submit(&mut c, shell("echo later")).await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(count.load(Ordering::Relaxed))
        })
    };
    let mut seen = Vec::new();
    let mut req = ListTasksRequest {
        page_size: 7,
        ..Default::default()
    };
    loop {
        let r = c.list(req.clone()).await?.into_inner();
        seen.extend(ids(&r.tasks));
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
    let later = submitter.await??;
    assert!(later > 0);
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a task was listed twice");
    for id in &before {
        assert!(unique.contains(id), "task {id} was skipped");
    }
    // Newest first throughout.
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(sorted, seen);
    Ok(())
}

/// Removes every key of the history layout from the embedded store at `path`: what a store
/// written before it looks like.
async fn strip_history_keys(path: &std::path::Path) -> anyhow::Result<usize> {
    use scabbard_controller::store::{EmbeddedStore, Op, Store, Txn};
    let store = EmbeddedStore::open(path)?;
    let mut n = 0;
    for prefix in ["live/", "done/", "hist/", "idem/", "meta/layout"] {
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
    store.close().await?;
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_from_before_the_history_layout_is_migrated_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut ctl = controller(&dir.path().join("c"), &[])?;
    let addr = ctl.addr.to_string();
    let mut w = Worker::start(&addr, &dir.path().join("w"), "w", 4)?;
    let mut c = tasks_client(&addr).await?;
    create_beta(&addr).await?;
    let s = fill(&mut c).await?;
    // One task stays queued (no worker): live work the migrated store must still run.
    w.proc.kill9();
    // Until the controller sees the session close, it could still assign to the dead worker.
    wait_agent(&addr, "the killed worker's session to close", |a| {
        a.name == "w" && a.status() != scabbard_common::proto::AgentStatus::Connected
    })
    .await?;
    let queued = submit(&mut c, shell("echo hello-late")).await?;
    ctl.proc.kill9();
    drop(c);
    let removed = strip_history_keys(&dir.path().join("c/state.redb")).await?;
    assert!(removed >= 7 * 3, "removed only {removed} history keys");

    let port = ctl.addr.port();
    let ctl = Controller::start(
        &dir.path().join("c"),
        port,
        &ControllerOpts {
            extra: vec!["--finished-cache-tasks".to_string(), CACHE.to_string()],
            ..Default::default()
        },
    )?;
    let addr = ctl.addr.to_string();
    let mut c = tasks_client(&addr).await?;
    // Only the queued task is live: it is all the core loaded.
    eventually("the migrated controller to lead", T, || async {
        in_memory(&addr).await.ok().filter(|n| *n == 1)
    })
    .await?;
    let listed = list_all(&mut c, ListTasksRequest::default(), 3).await?;
    assert_eq!(listed.first().map(|t| t.id.clone()), Some(queued.clone()));
    assert_eq!(listed[0].state(), TaskState::Queued);
    check_served(&addr, &s).await?;
    // And it still runs.
    let _w = Worker::start(&addr, &dir.path().join("w2"), "w2", 4)?;
    let t = wait_state(&mut c, &queued, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_keys_hold_for_their_window_only() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = controller(
        &dir.path().join("c"),
        &["--idempotency-window".to_string(), "1s".to_string()],
    )?;
    let addr = ctl.addr.to_string();
    let mut c = tasks_client(&addr).await?;
    let keyed = |key: &str| SubmitTaskRequest {
        spec: Some(shell("echo keyed")),
        idempotency_key: key.into(),
        project: String::new(),
    };
    let first = c.submit(keyed("k")).await?.into_inner();
    assert!(!first.existing);
    let first = first.task.unwrap();
    // Within the window: the same task.
    let again = c.submit(keyed("k")).await?.into_inner();
    assert!(again.existing);
    assert_eq!(again.task.unwrap().id, first.id);
    // Past it: a new task, which the key names from then on.
    let second = eventually("the key's window to pass", T, || {
        let mut c = c.clone();
        async move {
            let r = c.submit(keyed("k")).await.ok()?.into_inner();
            (!r.existing).then_some(r.task?)
        }
    })
    .await?;
    assert_ne!(second.id, first.id);
    assert!(second.created_at_ms >= first.created_at_ms + 1_000);
    let third = c.submit(keyed("k")).await?.into_inner();
    assert!(third.existing);
    assert_eq!(third.task.unwrap().id, second.id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_pages_task_lists() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = controller(&dir.path().join("c"), &[])?;
    let addr = ctl.addr.to_string();
    let mut c = tasks_client(&addr).await?;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(submit(&mut c, shell(&format!("echo {i}"))).await?);
    }
    let run = |args: &[&str]| {
        let out = cli(dir.path())
            .args(["task", "list", "--controller", &addr])
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
            "task",
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
async fn a_selective_list_returns_partial_pages_within_its_scan_budget() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = controller(
        &dir.path().join("c"),
        &["--rate-limit".to_string(), "0".to_string()],
    )?;
    let addr = ctl.addr.to_string();
    let mut c = tasks_client(&addr).await?;
    let mut rare = shell("echo rare");
    rare.labels.insert("rare".into(), "yes".into());
    let rare = submit(&mut c, rare).await?;
    // More newer tasks than one page looks at (5,000), none of them matching.
    let mut clients = Vec::new();
    for _ in 0..16 {
        let mut c = c.clone();
        clients.push(tokio::spawn(async move {
            for _ in 0..320 {
                submit(&mut c, shell("echo filler")).await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in clients {
        h.await??;
    }
    let mut req = ListTasksRequest {
        page_size: 10,
        ..Default::default()
    };
    req.labels.insert("rare".into(), "yes".into());
    let first = c.list(req.clone()).await?.into_inner();
    assert!(first.tasks.is_empty(), "{:?}", ids(&first.tasks));
    assert!(
        !first.next_page_token.is_empty(),
        "a partial page carries a token"
    );
    let all = list_all(&mut c, req, 10).await?;
    assert_eq!(ids(&all), vec![rare]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submits_with_one_key_get_one_task_in_memory_or_not() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = controller(
        &dir.path().join("c"),
        &["--finished-cache-tasks".to_string(), "0".to_string()],
    )?;
    let addr = ctl.addr.to_string();
    let mut c = tasks_client(&addr).await?;
    let keyed = |key: &str| SubmitTaskRequest {
        spec: Some(shell("echo keyed")),
        idempotency_key: key.into(),
        project: String::new(),
    };
    // A key whose task finished (cancelled) and left the core's memory.
    let old = c.submit(keyed("old")).await?.into_inner().task.unwrap();
    c.cancel(scabbard_common::proto::CancelTaskRequest {
        id: old.id.clone(),
        reason: "done".into(),
    })
    .await?;
    wait_in_memory_at_most(&addr, 0).await?;
    for (key, want) in [("old", Some(old.id.clone())), ("fresh", None)] {
        let mut calls = Vec::new();
        for _ in 0..20 {
            let mut c = c.clone();
            let req = keyed(key);
            calls.push(tokio::spawn(async move { c.submit(req).await }));
        }
        let mut got = Vec::new();
        for h in calls {
            got.push(h.await??.into_inner());
        }
        let ids: HashSet<String> = got.iter().map(|r| r.task.clone().unwrap().id).collect();
        assert_eq!(ids.len(), 1, "key {key}: {ids:?}");
        let created = got.iter().filter(|r| !r.existing).count();
        match want {
            Some(id) => {
                assert!(ids.contains(&id));
                assert_eq!(created, 0);
            }
            None => assert_eq!(created, 1),
        }
    }
    Ok(())
}
