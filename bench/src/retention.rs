//! `--kind retention`: what the retention sweeper costs the live path. The store is filled
//! with `--tasks` finished no-op tasks (records and `done/` keys, written straight into the
//! embedded store before the controller starts), two days old and so inside the default
//! 30-day retention. Sequential submit→finish latency is measured, then the `default`
//! project's retention is cut to one day (no restart), and the latency is measured again
//! while the sweeper deletes them all, and once more after it is done; the sweep's rate comes
//! from `scabbard status`'s counters.
//!
//! The idle windows run for at least [`IDLE_WINDOW`] each (or `--latency-samples`, whichever
//! is more), one before and one after the sweep: a p99 needs thousands of samples to be
//! steady, and the window after the sweep sees the same store (grown by the tasks run during
//! it) and the same warm caches as the sweep, so the comparison is of the sweep alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use scabbard_common::client::{self, AdminServiceClient, ProjectServiceClient, TaskServiceClient};
use scabbard_common::proto::{
    ClusterStatusRequest, GetProjectRequest, ListAgentsRequest, Outcome, Task, TaskResult,
    TaskState, UpdateProjectRequest,
};
use scabbard_controller::store::{EmbeddedStore, Op, Store, Txn};
use tokio::sync::{Mutex, mpsc};

use super::{ADMIN_TOKEN, Seen, report, submit, watch_all};

/// Fills the store, then measures latency before and during the sweep.
pub(crate) async fn run(expired: usize, samples: usize) -> Result<()> {
    let temp = tempfile::tempdir()?;
    let data_dir = temp.path().join("controller");
    scabbard_common::private::private_dir(&data_dir)?;
    let t0 = Instant::now();
    fill(&data_dir.join("state.redb"), expired).await?;
    println!(
        "retention: filled {expired} finished tasks in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let token = "bench-registration-token-0123456789".to_string();
    let ctl = scabbard_controller::spawn(scabbard_controller::ControllerConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: data_dir.clone(),
        registration_token: token.clone(),
        bootstrap_token: Some(ADMIN_TOKEN.into()),
        rate_limit_per_second: 0,
        rate_limit_burst: 0,
        retention_sweep_interval_ms: 200,
        ..Default::default()
    })
    .await?;
    let addr = ctl.addr.to_string();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(scabbard_worker::run(
        scabbard_worker::WorkerConfig {
            controller: addr.clone(),
            registration_token: token,
            name: "bench-0".into(),
            slots: 64,
            data_dir: temp.path().join("worker"),
            ..Default::default()
        },
        stop.child_token(),
    ));
    let channel = client::authed(client::connect(&addr).await?, Some(ADMIN_TOKEN))?;
    let mut admin = AdminServiceClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    while admin
        .list_agents(ListAgentsRequest {})
        .await?
        .into_inner()
        .agents
        .iter()
        .all(|a| a.status != 1)
    {
        if Instant::now() > deadline {
            bail!("the worker did not attach");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    watch_all(channel.clone(), seen.clone(), done_tx).await?;
    let mut tasks = TaskServiceClient::new(channel.clone());

    let mut before = idle_window(&mut tasks, &seen, &mut done_rx, samples).await?;
    report("idle before:    submit→finish", &mut before);

    // Cut the default project's retention: everything filled is now expired.
    let mut projects = ProjectServiceClient::new(channel.clone());
    let mut p = projects
        .get(GetProjectRequest {
            name: "default".into(),
        })
        .await?
        .into_inner();
    p.retention_days = 1.0;
    projects
        .update(UpdateProjectRequest { project: Some(p) })
        .await?;
    let swept = async |admin: &mut AdminServiceClient<_>| -> Result<u64> {
        Ok(admin
            .cluster_status(ClusterStatusRequest {})
            .await?
            .into_inner()
            .retention
            .map(|r| r.tasks_deleted)
            .unwrap_or(0))
    };
    let started = Instant::now();
    while swept(&mut admin).await? == 0 {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the sweeper did not start");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sweep_start = Instant::now();
    let mut during = Vec::new();
    let mut deleted = 0;
    while deleted < expired as u64 {
        during.push(one(&mut tasks, &seen, &mut done_rx).await?);
        if during.len() % 20 == 0 {
            deleted = swept(&mut admin).await?;
        }
        if sweep_start.elapsed() > Duration::from_secs(3600) {
            bail!("the sweep did not finish within an hour ({deleted} deleted)");
        }
    }
    let took = sweep_start.elapsed();
    report("while sweeping: submit→finish", &mut during);
    println!(
        "retention: swept {deleted} tasks in {:.1}s = {:.0} tasks/s",
        took.as_secs_f64(),
        deleted as f64 / took.as_secs_f64()
    );
    let mut after = idle_window(&mut tasks, &seen, &mut done_rx, samples).await?;
    report("idle after:     submit→finish", &mut after);
    let mut idle = before;
    idle.extend_from_slice(&after);
    report("idle (both):    submit→finish", &mut idle);
    let (idle99, during99) = (p99(&mut idle), p99(&mut during));
    println!(
        "retention: p99 while sweeping vs idle: {:+.1} % (goal: at most +20 %)",
        (during99.as_secs_f64() / idle99.as_secs_f64().max(1e-9) - 1.0) * 100.0
    );
    stop.cancel();
    ctl.shutdown.cancel();
    let _ = ctl.task.await;
    Ok(())
}

/// Shortest idle window (see the module docs).
const IDLE_WINDOW: Duration = Duration::from_secs(30);

/// Sequential tasks for [`IDLE_WINDOW`] and at least `samples` of them.
async fn idle_window(
    tasks: &mut TaskServiceClient<client::AuthedChannel>,
    seen: &Arc<Mutex<Seen>>,
    done: &mut mpsc::UnboundedReceiver<()>,
    samples: usize,
) -> Result<Vec<Duration>> {
    let started = Instant::now();
    let mut out = Vec::new();
    while out.len() < samples || started.elapsed() < IDLE_WINDOW {
        out.push(one(tasks, seen, done).await?);
    }
    Ok(out)
}

/// The 99th percentile of `samples` (sorted in place), as `report` prints it.
fn p99(samples: &mut [Duration]) -> Duration {
    samples.sort();
    super::percentile(samples, 0.99)
}

/// One sequential no-op task, submit→finish.
async fn one(
    tasks: &mut TaskServiceClient<client::AuthedChannel>,
    seen: &Arc<Mutex<Seen>>,
    done: &mut mpsc::UnboundedReceiver<()>,
) -> Result<Duration> {
    let t0 = Instant::now();
    let id = submit(tasks, "noop").await?;
    loop {
        done.recv().await.context("watch ended")?;
        if let Some(at) = seen.lock().await.finished.get(&id) {
            return Ok(at.duration_since(t0));
        }
    }
}

/// Writes `n` finished no-op tasks two days old (records and `done/` keys).
async fn fill(path: &std::path::Path, n: usize) -> Result<()> {
    let store = EmbeddedStore::open(path)?;
    let finished = scabbard_common::time::now_ms() - 2 * 86_400_000;
    let mut written = 0;
    while written < n {
        let mut ops = Vec::new();
        for i in written..(written + 500).min(n) {
            let id = format!("bench{i:012}");
            let at = finished + i as i64 / 1000;
            let t = Task {
                id: id.clone(),
                state: TaskState::Succeeded as i32,
                project: "default".into(),
                created_at_ms: at - 5,
                updated_at_ms: at,
                result: Some(TaskResult {
                    outcome: Outcome::Succeeded as i32,
                    ..Default::default()
                }),
                ..Default::default()
            };
            ops.push(Op::put(
                format!("tasks/{id}"),
                prost::Message::encode_to_vec(&t),
            ));
            ops.push(Op::put(format!("done/{at:013}/{id}"), b"default".to_vec()));
        }
        written += ops.len() / 2;
        store
            .txn(Txn {
                success: ops,
                ..Default::default()
            })
            .await?;
    }
    store.close().await?;
    Ok(())
}
