//! Logs without a shared filesystem: finished attempts' logs are archived in the S3
//! artifact store (a real `moto_server`), live logs are held by the leader, and workers
//! keep an attempt's spooled chunks until the archive is recorded, so a new leader gets
//! the live part back by replay.
//!
//! * Three controllers on a real etcd, each with its own data dir (no `--logs-dir`), real
//!   workers; kill -9 of the leader while tasks print numbered lines: afterwards every log
//!   holds every line exactly once, in order, read through every surviving controller, and
//!   every log ends up archived in the bucket.
//! * One controller whose bucket does not exist yet: the worker keeps the finished
//!   attempt's chunks in its spool (checked on disk after kill -9), and drops them once it
//!   replayed them and the archive was recorded.

use std::time::Duration;

use anyhow::{Result, ensure};
use scabbard_common::client::{self, AdminServiceClient, TaskServiceClient};
use scabbard_common::proto::{ClusterStatusRequest, TaskState};
use scabbard_tests::etcd::EtcdCluster;
use scabbard_tests::moto::{MotoServer, SECRET_ACCESS_KEY};
use scabbard_tests::*;

const T: Duration = Duration::from_secs(90);

/// `lines` numbered lines, `pause` seconds apart every 10 lines.
fn numbered(tag: &str, lines: u32, pause: &str) -> scabbard_common::proto::TaskSpec {
    shell(&format!(
        "i=1; while [ $i -le {lines} ]; do echo \"{tag} line $i\"; \
         if [ $((i % 10)) -eq 0 ]; then sleep {pause}; fi; i=$((i+1)); done"
    ))
}

fn expected(tag: &str, lines: u32) -> String {
    (1..=lines).map(|i| format!("{tag} line {i}\n")).collect()
}

/// Flags for the S3 artifact (and log archive) backend on `bucket`.
fn s3_flags(moto: &MotoServer, bucket: &str, dir: &std::path::Path) -> Result<Vec<String>> {
    let secret = dir.join("s3-secret");
    std::fs::write(&secret, SECRET_ACCESS_KEY)?;
    let mut flags = moto.controller_flags(bucket);
    flags.push("--artifacts-s3-secret-access-key-file".into());
    flags.push(secret.display().to_string());
    Ok(flags)
}

async fn leader(addrs: &str) -> Option<String> {
    let ch = client::connect_leader(addrs).await.ok()?;
    let s = AdminServiceClient::new(ch)
        .cluster_status(ClusterStatusRequest {})
        .await
        .ok()?
        .into_inner();
    (s.answered_by_leader && s.store_healthy).then_some(s.leader)
}

/// A client of exactly the controller at `addr` (a follower forwards to the leader).
async fn client_of(addr: &str) -> Result<Tasks> {
    Ok(TaskServiceClient::new(with_token(
        client::connect(addr).await?,
        ADMIN_TOKEN,
    )))
}

/// Waits until the task's latest attempt has its log archived; returns the task.
async fn archived(c: &Tasks, id: &str) -> Result<scabbard_common::proto::Task> {
    eventually(&format!("the log of {id} to be archived"), T, || {
        let mut c = c.clone();
        async move {
            let t = get(&mut c, id).await.ok()?;
            t.attempts
                .last()
                .is_some_and(|a| !a.log_archive.is_empty())
                .then_some(t)
        }
    })
    .await
}

#[tokio::test]
async fn killing_the_leader_loses_no_log_line_without_a_shared_logs_dir() -> Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let moto = MotoServer::start().await?;
    moto.create_bucket("logs-ha").await?;
    let dir = tempfile::tempdir()?;
    let mut extra = vec![
        "--store".into(),
        "etcd".into(),
        "--etcd-endpoints".into(),
        etcd.endpoints(),
        "--leader-lease-ttl".into(),
        "2s".into(),
    ];
    extra.extend(s3_flags(&moto, "logs-ha", dir.path())?);
    let opts = ControllerOpts {
        lease: "8s",
        extra,
        ..ControllerOpts::default()
    };
    let mut controllers = Vec::new();
    for i in 0..3 {
        controllers.push(Controller::start(
            &dir.path().join(format!("c{i}")),
            free_port(),
            &opts,
        )?);
    }
    let addrs = controllers
        .iter()
        .map(|c| c.addr.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let first = eventually("a leader", T, || leader(&addrs)).await?;
    let mut workers = Vec::new();
    for i in 0..2 {
        workers.push(Worker::start(
            &addrs,
            &dir.path().join(format!("w{i}")),
            &format!("w{i}"),
            4,
        )?);
    }
    let mut tasks = TaskServiceClient::new(admin_channel(&addrs).await?);

    // Finished before the kill (their archive may or may not be recorded by then).
    let mut all = Vec::new();
    for i in 0..2 {
        let tag = format!("done{i}");
        let id = submit(&mut tasks, numbered(&tag, 300, "0")).await?;
        all.push((id, tag, 300));
    }
    for (id, _, _) in &all {
        let t = wait_state(&mut tasks, id, None, T).await?;
        assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    }
    // Running across the kill: 400 lines over about 8 s.
    let mut running = Vec::new();
    for i in 0..4 {
        let tag = format!("live{i}");
        let id = submit(&mut tasks, numbered(&tag, 400, "0.2")).await?;
        running.push((id, tag, 400));
    }
    // Kill once every running task has logged something.
    for (id, tag, _) in &running {
        eventually(&format!("{id} to log"), T, || {
            let mut tasks = tasks.clone();
            async move {
                let text = logs(&mut tasks, id, 0, false).await.ok()?;
                text.contains(&format!("{tag} line 20\n")).then_some(())
            }
        })
        .await?;
    }
    let idx = controllers
        .iter()
        .position(|x| x.addr.to_string() == first)
        .expect("the leader is one of ours");
    controllers[idx].proc.kill9();
    let rest: Vec<String> = controllers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != idx)
        .map(|(_, c)| c.addr.to_string())
        .collect();
    let rest_addrs = rest.join(",");
    let second = eventually("a new leader", T, || leader(&rest_addrs)).await?;
    assert_ne!(first, second);
    all.extend(running.iter().cloned());

    // Followed through a follower from the start while the tasks still run: complete.
    let follower = rest
        .iter()
        .find(|a| **a != second)
        .expect("two controllers survive")
        .clone();
    let mut follows = Vec::new();
    for (id, tag, lines) in &running {
        let mut c = client_of(&follower).await?;
        let (id, want) = (id.clone(), expected(tag, *lines));
        follows.push(tokio::spawn(async move {
            let got = tokio::time::timeout(T, logs(&mut c, &id, 0, true)).await??;
            ensure!(got == want, "followed log of {id} differs:\n{got}");
            anyhow::Ok(())
        }));
    }
    for f in follows {
        f.await??;
    }

    let mut tasks = TaskServiceClient::new(admin_channel(&rest_addrs).await?);
    for (id, tag, lines) in &all {
        let t = wait_state(&mut tasks, id, None, T).await?;
        assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
        assert_eq!(t.attempts.len(), 1, "task {id} ran more than once: {t:?}");
        let want = expected(tag, *lines);
        // Read through every surviving controller, before and after the archive.
        for addr in &rest {
            let mut c = client_of(addr).await?;
            assert_eq!(logs(&mut c, id, 0, false).await?, want, "{id} via {addr}");
        }
        let t = archived(&tasks, id).await?;
        let a = t.attempts.last().expect("an attempt");
        assert_eq!(a.log_bytes, want.len() as u64, "{t:?}");
        assert_eq!(a.log_archive, format!("ci/logs/{id}/1.log"));
        for addr in &rest {
            let mut c = client_of(addr).await?;
            assert_eq!(logs(&mut c, id, 0, false).await?, want, "{id} via {addr}");
            assert_eq!(logs(&mut c, id, 1, true).await?, want, "{id} via {addr}");
        }
    }
    let keys = moto.keys("logs-ha").await?;
    for (id, _, _) in &all {
        let key = format!("ci/logs/{id}/1.log");
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
    // No controller needed a logs directory beyond its own data dir.
    assert!(!dir.path().join("shared-logs").exists());
    drop(workers);
    Ok(())
}

#[tokio::test]
async fn the_worker_keeps_the_spool_until_the_log_is_archived() -> Result<()> {
    let moto = MotoServer::start().await?;
    let dir = tempfile::tempdir()?;
    // The bucket does not exist yet: archiving fails (and is retried for a while), the
    // result is still recorded.
    let opts = ControllerOpts {
        extra: s3_flags(&moto, "late", dir.path())?,
        ..ControllerOpts::default()
    };
    let mut c = Controller::start(&dir.path().join("c"), 0, &opts)?;
    let addr = c.addr.to_string();
    let wdir = dir.path().join("w");
    let mut w = Worker::start(&addr, &wdir, "w", 1)?;
    let mut tasks = tasks_client(&addr).await?;
    let id = submit(&mut tasks, numbered("kept", 50, "0")).await?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    let want = expected("kept", 50);
    assert_eq!(logs(&mut tasks, &id, 0, false).await?, want);
    let a = t.attempts.last().expect("an attempt").clone();
    assert!(a.log_archive.is_empty(), "{a:?}");
    assert!(a.log_chunks > 0, "{a:?}");

    // The result is acknowledged, the archive is not: the chunks are still spooled. The
    // controller dies too, so its own archive retries die with it.
    w.proc.kill9();
    c.proc.kill9();
    {
        let spool = scabbard_worker::spool::Spool::open(&wdir.join("spool"))?;
        let kept = spool.load_all()?;
        let s = kept
            .iter()
            .find(|s| s.assign.task_id == id)
            .unwrap_or_else(|| panic!("the attempt left the spool before its archive: {kept:?}"));
        assert!(s.finished.is_some());
        let chunks = spool.chunks_from(&id, a.fencing_token, 0)?;
        assert_eq!(chunks.len() as u64, a.log_chunks);
        let text: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(String::from_utf8_lossy(&text), want);
    }

    // The bucket appears and both come back: the controller keeps the attempt (its log is
    // not archived), the worker replays it, the log is archived, the worker is told and
    // lets the attempt go.
    moto.create_bucket("late").await?;
    let c = Controller::start(&dir.path().join("c"), 0, &opts)?;
    let addr = c.addr.to_string();
    let mut w = Worker::start(&addr, &wdir, "w", 1)?;
    let mut tasks = tasks_client(&addr).await?;
    let t = archived(&tasks, &id).await?;
    let a = t.attempts.last().expect("an attempt");
    assert_eq!(a.log_archive, format!("ci/logs/{id}/1.log"));
    assert_eq!(a.log_bytes, want.len() as u64);
    assert_eq!(logs(&mut tasks, &id, 0, false).await?, want);
    assert!(moto.keys("late").await?.contains(&a.log_archive));
    wait_agent(&addr, "the worker back", |a| {
        a.name == "w" && a.status() == scabbard_common::proto::AgentStatus::Connected
    })
    .await?;
    // A worker stops once nothing waits for an ack: its spool is then empty.
    ensure!(
        w.proc.terminate(T).is_some(),
        "the worker did not stop after the archive"
    );
    let spool = scabbard_worker::spool::Spool::open(&wdir.join("spool"))?;
    let left = spool.load_all()?;
    assert!(left.is_empty(), "{left:?}");
    Ok(())
}
