//! Failover figures for the benchmark (`scabbard-bench --kind failover`): on a chaos cluster
//! with the production leases (3 etcd members, 3 controllers, leader lease 3 s, agent lease
//! 10 s), the leader controller is killed (-9) or frozen (SIGSTOP), or the etcd leader
//! member is killed, while tasks run; the figure is how long until a task submitted after
//! the fault has run to completion.
//!
//! Probes: from the fault on, a new probe starts every 100 ms through the full controller
//! list (as a client configured with every controller would); each submits a no-op shell
//! task and polls it until it is final. The first probe to see SUCCEEDED marks "work
//! resumed", so a probe stuck on the dead leader never inflates the figure. Tasks running
//! at the fault (longer than the outage) are checked afterwards: none may have been
//! requeued (`requeued` counts attempts beyond the first).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use scabbard_common::client::TaskServiceClient;
use scabbard_common::proto::{SubmitTaskRequest, TaskState};
use scabbard_controller::store::{EtcdConfig, EtcdStore, Store};
use tokio::task::JoinSet;

use super::cluster::{ChaosCluster, RPC_TIMEOUT};
use crate::{admin_channel, get, shell};

/// How the leader is taken away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// kill -9 of the leader controller (restarted afterwards).
    KillLeader,
    /// SIGSTOP of the leader controller (SIGCONT afterwards: it must step down).
    StopLeader,
    /// kill -9 of the etcd leader member (restarted afterwards).
    KillEtcdLeader,
}

impl Takeover {
    /// Every kind, in the order the benchmark measures them.
    pub const ALL: [Takeover; 3] = [
        Takeover::KillLeader,
        Takeover::StopLeader,
        Takeover::KillEtcdLeader,
    ];

    /// Its name on the command line.
    pub fn flag(self) -> &'static str {
        match self {
            Takeover::KillLeader => "kill-leader",
            Takeover::StopLeader => "stop-leader",
            Takeover::KillEtcdLeader => "kill-etcd-leader",
        }
    }

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Takeover::KillLeader => "kill -9 leader controller",
            Takeover::StopLeader => "SIGSTOP leader controller",
            Takeover::KillEtcdLeader => "kill -9 etcd leader member",
        }
    }
}

/// One measured failover.
#[derive(Debug, Clone)]
pub struct Sample {
    /// What was done.
    pub takeover: Takeover,
    /// From the fault until a task submitted after it had succeeded.
    pub resumed: Duration,
    /// Tasks running at the fault.
    pub running: usize,
    /// Attempts beyond the first among them (0 expected: nothing requeued needlessly).
    pub requeued: usize,
    /// Whether the Scabbard term changed (a new leader, or the same one re-elected).
    pub term_changed: bool,
}

/// A cluster kept for a series of measurements.
pub struct FailoverBench {
    cluster: ChaosCluster,
    store: Arc<dyn Store>,
    addrs: String,
    runs: usize,
}

/// Tasks running through each fault.
const RUNNING: usize = 4;

impl FailoverBench {
    /// Starts the cluster (3 etcd members, 3 controllers, 2 workers with 4 slots each, the
    /// production leader and agent leases).
    pub async fn start() -> Result<Self> {
        let cluster = ChaosCluster::start_leases(3, 3, 2, 4, "3s", "10s").await?;
        cluster.wait_leader(None, Duration::from_secs(60)).await?;
        let store: Arc<dyn Store> = EtcdStore::connect(&EtcdConfig {
            endpoints: cluster.etcd.endpoint_list(),
            ..Default::default()
        })
        .await?;
        let addrs = cluster.addrs();
        Ok(Self {
            cluster,
            store,
            addrs,
            runs: 0,
        })
    }

    /// Takes the leader away once and measures until work resumed; puts the cluster back
    /// together afterwards.
    pub async fn measure(&mut self, takeover: Takeover) -> Result<Sample> {
        self.runs += 1;
        let run = self.runs;
        // The cluster is whole and serving: a probe succeeds.
        probe(&self.addrs, &format!("warm-{run}"), Duration::from_secs(60))
            .await
            .context("the cluster does not serve before the fault")?;
        let running = self.start_running(run).await?;
        let term_before = self.term().await?;
        let fault = Instant::now();
        let restore = self.inject(takeover).await?;
        let resumed = first_probe(&self.addrs, run, fault, Duration::from_secs(60)).await?;
        self.restore(restore)?;
        let mut requeued = 0;
        for id in &running {
            let t = wait_final(&self.addrs, id, Duration::from_secs(90)).await?;
            if t.state() != TaskState::Succeeded {
                bail!("a task running through the fault ended {:?}", t.state());
            }
            requeued += t.attempts.len().saturating_sub(1);
        }
        // Wait for the restored member to lead or follow before the next run.
        self.cluster
            .wait_leader(None, Duration::from_secs(60))
            .await?;
        let term_changed = self.term().await? != term_before;
        Ok(Sample {
            takeover,
            resumed,
            running: running.len(),
            requeued,
            term_changed,
        })
    }

    async fn term(&self) -> Result<String> {
        Ok(self
            .store
            .get("meta/term")
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .unwrap_or_default())
    }

    /// Submits [`RUNNING`] tasks that outlast the outage; returns once all run.
    async fn start_running(&self, run: usize) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        for i in 0..RUNNING {
            let key = format!("failover-{run}-running-{i}");
            let id = submit_keyed(
                &self.addrs,
                &key,
                &shell("sleep 12"),
                Duration::from_secs(30),
            )
            .await?;
            ids.push(id);
        }
        for id in &ids {
            let end = Instant::now() + Duration::from_secs(30);
            loop {
                let t = retry(&self.addrs, Duration::from_secs(30), |mut c| {
                    let id = id.clone();
                    async move { get(&mut c, &id).await }
                })
                .await?;
                if t.state() == TaskState::Running {
                    break;
                }
                if Instant::now() > end {
                    bail!("task {id} is not running after 30 s ({:?})", t.state());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(ids)
    }

    async fn inject(&mut self, takeover: Takeover) -> Result<Restore> {
        Ok(match takeover {
            Takeover::KillLeader | Takeover::StopLeader => {
                let l = self
                    .cluster
                    .leader()
                    .await
                    .context("no leader before the fault")?;
                if takeover == Takeover::KillLeader {
                    self.cluster.kill_controller(l);
                    Restore::Controller(l)
                } else {
                    let pid = self.cluster.controllers[l]
                        .ctl
                        .as_ref()
                        .context("the leader has no process")?
                        .proc
                        .pid();
                    signal(pid, libc::SIGSTOP)?;
                    Restore::Thaw(pid)
                }
            }
            Takeover::KillEtcdLeader => {
                let m = self
                    .cluster
                    .etcd_leader()
                    .await
                    .context("no etcd leader before the fault")?;
                self.cluster.etcd.kill9(m);
                Restore::EtcdMember(m)
            }
        })
    }

    fn restore(&mut self, r: Restore) -> Result<()> {
        match r {
            Restore::Controller(i) => self.cluster.restart_controller(i),
            Restore::Thaw(pid) => signal(pid, libc::SIGCONT),
            Restore::EtcdMember(m) => self.cluster.etcd.restart(m),
        }
    }
}

/// How to undo a fault.
enum Restore {
    Controller(usize),
    Thaw(i32),
    EtcdMember(usize),
}

/// Sends `sig` to one process; never to a process group (a pid of 0 or less would stop
/// the benchmark itself with every process it started).
#[allow(unsafe_code)]
fn signal(pid: i32, sig: i32) -> Result<()> {
    if pid <= 0 {
        bail!("no process to signal (pid {pid})");
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } != 0 {
        bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` with a fresh leader client until it succeeds (each try bounded by
/// [`RPC_TIMEOUT`]) or `within` passes.
async fn retry<T, F, Fut>(addrs: &str, within: Duration, mut f: F) -> Result<T>
where
    F: FnMut(crate::Tasks) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    super::with_leader(addrs, Instant::now() + within, |ch| {
        f(TaskServiceClient::new(ch))
    })
    .await
}

/// Submits `spec` with idempotency key `key` (so a retried submit is the same task) through
/// the leader among `addrs`; returns its id.
async fn submit_keyed(
    addrs: &str,
    key: &str,
    spec: &scabbard_common::proto::TaskSpec,
    within: Duration,
) -> Result<String> {
    retry(addrs, within, |mut c| {
        let (key, spec) = (key.to_string(), spec.clone());
        async move {
            let r = c
                .submit(SubmitTaskRequest {
                    spec: Some(spec),
                    idempotency_key: key,
                    project: String::new(),
                })
                .await?
                .into_inner();
            Ok(r.task.map(|t| t.id).unwrap_or_default())
        }
    })
    .await
}

async fn wait_final(
    addrs: &str,
    id: &str,
    within: Duration,
) -> Result<scabbard_common::proto::Task> {
    let end = Instant::now() + within;
    loop {
        let t = retry(addrs, within, |mut c| {
            let id = id.to_string();
            async move { get(&mut c, &id).await }
        })
        .await?;
        if scabbard_common::is_final(t.state()) {
            return Ok(t);
        }
        if Instant::now() > end {
            bail!("task {id} not final within {within:?} ({:?})", t.state());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One probe: a no-op task submitted through `addrs` and polled until final; `Ok` once it
/// succeeded. Each RPC is bounded, so a probe stuck on a dead controller moves on.
async fn probe(addrs: &str, key: &str, within: Duration) -> Result<()> {
    let id = submit_keyed(addrs, key, &shell("true"), within).await?;
    let end = Instant::now() + within;
    let mut c: Option<crate::Tasks> = None;
    loop {
        if c.is_none() {
            c = tokio::time::timeout(RPC_TIMEOUT, admin_channel(addrs))
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(TaskServiceClient::new);
        }
        if let Some(client) = c.as_mut() {
            match tokio::time::timeout(RPC_TIMEOUT, get(client, &id)).await {
                Ok(Ok(t)) if t.state() == TaskState::Succeeded => return Ok(()),
                Ok(Ok(t)) if scabbard_common::is_final(t.state()) => {
                    bail!("probe {id} ended {:?}", t.state())
                }
                Ok(Ok(_)) => {}
                _ => c = None,
            }
        }
        if Instant::now() > end {
            bail!("probe {id} not done within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a probe every 100 ms from `fault` on; returns when the first succeeds, measured
/// from `fault`.
async fn first_probe(
    addrs: &str,
    run: usize,
    fault: Instant,
    within: Duration,
) -> Result<Duration> {
    let mut probes = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let end = fault + within;
    let mut n = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if Instant::now() > end {
                    bail!("no probe succeeded within {within:?} of the fault");
                }
                // Bounded: probes that hang are abandoned with the set.
                if probes.len() < 200 {
                    let (addrs, key) = (addrs.to_string(), format!("failover-{run}-probe-{n}"));
                    n += 1;
                    probes.spawn(async move { probe(&addrs, &key, within).await.map(|()| Instant::now()) });
                }
            }
            Some(done) = probes.join_next() => {
                if let Ok(Ok(at)) = done {
                    return Ok(at.duration_since(fault));
                }
            }
        }
    }
}

/// Figures of a series: min / median / max of `resumed` per takeover.
pub fn summary(samples: &[Sample]) -> String {
    let mut out = String::new();
    for t in Takeover::ALL {
        let mut v: Vec<&Sample> = samples.iter().filter(|s| s.takeover == t).collect();
        if v.is_empty() {
            continue;
        }
        v.sort_by_key(|s| s.resumed);
        let secs = |s: &Sample| s.resumed.as_secs_f64();
        let requeued: usize = v.iter().map(|s| s.requeued).sum();
        let running: usize = v.iter().map(|s| s.running).sum();
        let terms = v.iter().filter(|s| s.term_changed).count();
        out.push_str(&format!(
            "{:<28} runs {}  work resumed after min {:.2} s / median {:.2} s / max {:.2} s  \
             requeued {requeued}/{running} running  term changed in {terms}/{}\n",
            t.name(),
            v.len(),
            secs(v[0]),
            secs(v[v.len() / 2]),
            secs(v[v.len() - 1]),
            v.len(),
        ));
    }
    out
}
