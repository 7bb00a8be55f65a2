//! `--kind agents`: one `scabbard controller` **process** (so its RSS, read from
//! `/proc/<pid>/status`, is its own) and `--agents` simulated agents in this process. Each
//! agent registers, holds its own `AgentService.Session` stream (the streams are spread over
//! `--agent-connections` HTTP/2 connections, at most 100 streams each), heartbeats at the
//! interval the controller asks for, like a real worker, and finishes every no-op task it is
//! assigned at once.
//!
//! Reported for a 2-agent run and for the `--agents` run: controller RSS per connected agent,
//! whether heartbeats held (every agent still connected after holding them for two agent
//! leases, no session ended), submit→start (dispatch) and submit→finish latency of
//! sequential tasks, and no-op throughput (submitted with `SubmitBatch`).
//!
//! The controller binary is `scabbard` next to this one (`target/<profile>/scabbard`) or
//! `$SCABBARD_BIN`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use scabbard_common::client::{self, AdminServiceClient, AgentServiceClient, TaskServiceClient};
use scabbard_common::proto::{
    Accepted, AgentMessage, Finished, Heartbeat, Hello, ListAgentsRequest, Outcome,
    RegisterRequest, SubmitBatchRequest, SubmitTaskRequest, TaskResult, agent_message,
    controller_message,
};
use tokio::sync::{Mutex, mpsc};
use tonic::transport::Channel;

use crate::{ADMIN_TOKEN, Seen, report, spec, watch_all};

/// Streams per HTTP/2 connection (the server allows 200 at once by default).
const STREAMS_PER_CONNECTION: usize = 100;
/// Registration token of the bench's controller.
const REG_TOKEN: &str = "bench-registration-token-0123456789";

/// What `--kind agents` is told.
pub(crate) struct Opts {
    pub(crate) agents: usize,
    pub(crate) tasks: usize,
    pub(crate) latency_samples: usize,
    pub(crate) heartbeat: Duration,
    pub(crate) lease: Duration,
    /// Extra arguments for the controller process.
    pub(crate) controller_args: Vec<String>,
}

/// The figures of one run.
struct Figures {
    agents: usize,
    rss_idle_kib: u64,
    rss_kib: u64,
    connected: usize,
    sessions_ended: usize,
    throughput: f64,
    start_p50: Duration,
    finish_p50: Duration,
}

pub(crate) async fn run(o: Opts) -> Result<()> {
    let bin = scabbard_bin()?;
    println!(
        "scabbard-bench: kind=agents controller={} {} heartbeat={:?} lease={:?} tasks={} latency samples={}",
        bin.display(),
        o.controller_args.join(" "),
        o.heartbeat,
        o.lease,
        o.tasks,
        o.latency_samples
    );
    let small = run_once(&bin, 2, &o).await?;
    print(&small);
    let big = run_once(&bin, o.agents, &o).await?;
    print(&big);
    let per_agent = (big.rss_kib.saturating_sub(big.rss_idle_kib)) as f64 / big.agents as f64;
    let pct = |a: f64, b: f64| (a / b - 1.0) * 100.0;
    println!(
        "agents: {} connected, RSS {:.1} KiB per connected agent (target ≤ 100), heartbeats {}",
        big.connected,
        per_agent,
        if big.connected == big.agents && big.sessions_ended == 0 {
            "held (no agent lost)"
        } else {
            "NOT held"
        }
    );
    println!(
        "agents vs 2: throughput {:+.1} %, submit→start p50 {:+.1} %, submit→finish p50 {:+.1} % (target within 20 %)",
        pct(big.throughput, small.throughput),
        pct(
            big.start_p50.as_secs_f64(),
            small.start_p50.as_secs_f64().max(1e-9)
        ),
        pct(
            big.finish_p50.as_secs_f64(),
            small.finish_p50.as_secs_f64().max(1e-9)
        ),
    );
    Ok(())
}

fn print(f: &Figures) {
    println!(
        "  {} agents: controller RSS {} KiB idle, {} KiB with the agents; {} connected, {} sessions ended; \
         {:.0} no-op tasks/s; submit→start p50 {:.2} ms, submit→finish p50 {:.2} ms",
        f.agents,
        f.rss_idle_kib,
        f.rss_kib,
        f.connected,
        f.sessions_ended,
        f.throughput,
        f.start_p50.as_secs_f64() * 1e3,
        f.finish_p50.as_secs_f64() * 1e3
    );
}

/// `scabbard` next to this binary, or `$SCABBARD_BIN`.
pub(crate) fn scabbard_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("SCABBARD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe()?;
    let dir = me.parent().context("bench binary has no directory")?;
    for d in [Some(dir), dir.parent()] {
        let p = d.map(|d| d.join("scabbard"));
        if let Some(p) = p.filter(|p| p.is_file()) {
            return Ok(p);
        }
    }
    bail!(
        "no `scabbard` binary next to {} (build it: cargo build -p scabbard-cli), and SCABBARD_BIN is not set",
        me.display()
    )
}

/// A `scabbard controller` process, killed on drop.
pub(crate) struct ControllerProc {
    child: Child,
    pub(crate) addr: String,
}

impl ControllerProc {
    pub(crate) fn start(bin: &PathBuf, dir: &std::path::Path, extra: &[String]) -> Result<Self> {
        Self::start_on(bin, dir, "127.0.0.1:0", extra)
    }

    /// As [`start`](Self::start), listening on `listen`.
    pub(crate) fn start_on(
        bin: &PathBuf,
        dir: &std::path::Path,
        listen: &str,
        extra: &[String],
    ) -> Result<Self> {
        let mut child = Command::new(bin)
            .args(["controller", "--listen", listen])
            .arg("--data-dir")
            .arg(dir)
            .args(["--registration-token", REG_TOKEN])
            .args(["--max-concurrent-requests", "0", "--rate-limit", "0"])
            .args(extra)
            .env("SCABBARD_BOOTSTRAP_TOKEN", ADMIN_TOKEN)
            .env(
                "SCABBARD_LOG",
                std::env::var("SCABBARD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            bail!("the controller did not start: {line:?}");
        };
        Ok(Self {
            addr: addr.to_string(),
            child,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident set size of `pid` in KiB (`VmRSS` of /proc/<pid>/status).
pub(crate) fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

async fn run_once(bin: &PathBuf, n: usize, o: &Opts) -> Result<Figures> {
    let dir = tempfile::tempdir()?;
    let mut extra = vec![
        "--heartbeat-interval".into(),
        format!("{}ms", o.heartbeat.as_millis()),
        "--agent-lease-ttl".into(),
        format!("{}ms", o.lease.as_millis()),
    ];
    extra.extend(o.controller_args.iter().cloned());
    let ctl = ControllerProc::start(bin, dir.path(), &extra)?;
    let admin_ch = client::authed(client::connect(&ctl.addr).await?, Some(ADMIN_TOKEN))?;
    // Settled: one call answered.
    AdminServiceClient::new(admin_ch.clone())
        .list_agents(ListAgentsRequest {})
        .await?;
    let rss_idle_kib = rss_kib(ctl.pid())?;

    let conns = n.div_ceil(STREAMS_PER_CONNECTION).max(1);
    let mut channels = Vec::with_capacity(conns);
    for _ in 0..conns {
        channels.push(client::connect(&ctl.addr).await?);
    }
    let slots = (512 / n).max(1) as u32;
    // Register (64 at a time), then open every session.
    let ids = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let next = Arc::new(AtomicUsize::new(0));
    let mut regs = Vec::new();
    for _ in 0..64.min(n) {
        let (channels, ids, next) = (channels.clone(), ids.clone(), next.clone());
        regs.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                let r = AgentServiceClient::new(channels[i % channels.len()].clone())
                    .register(RegisterRequest {
                        registration_token: REG_TOKEN.into(),
                        name: format!("sim-{i}"),
                        capabilities: vec!["noop".into()],
                        slots,
                        version: "bench".into(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                ids.lock().await.push((i, r.agent_id, r.agent_token));
            }
        }));
    }
    for r in regs {
        r.await??;
    }
    let ended = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let agents = std::mem::take(&mut *ids.lock().await);
    for (i, id, token) in agents {
        let ch = channels[i % channels.len()].clone();
        tokio::spawn(agent(
            ch,
            id,
            token,
            slots,
            ended.clone(),
            stop.child_token(),
        ));
    }
    let mut admin = AdminServiceClient::new(admin_ch.clone());
    let connected = |admin: &mut AdminServiceClient<client::AuthedChannel>| {
        let mut admin = admin.clone();
        async move {
            anyhow::Ok(
                admin
                    .list_agents(ListAgentsRequest {})
                    .await?
                    .into_inner()
                    .agents
                    .iter()
                    .filter(|a| a.status == 1)
                    .count(),
            )
        }
    };
    let t_attach = Instant::now();
    let deadline = t_attach + Duration::from_secs(120 + n as u64 / 50);
    while connected(&mut admin).await? < n {
        if Instant::now() > deadline {
            bail!("{n} agents did not all attach");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "  {n} agents attached in {:.1}s ({} sessions ended and reconnected meanwhile)",
        t_attach.elapsed().as_secs_f64(),
        ended.swap(0, Ordering::Relaxed)
    );
    // Heartbeats must hold: two agent leases with every agent only heartbeating.
    tokio::time::sleep(o.lease * 2).await;
    let connected_after = connected(&mut admin).await?;
    let rss_kib = rss_kib(ctl.pid())?;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    watch_all(admin_ch.clone(), seen.clone(), done_tx).await?;
    let mut tasks = TaskServiceClient::new(admin_ch.clone());
    let mut to_start = Vec::new();
    let mut to_finish = Vec::new();
    for _ in 0..o.latency_samples {
        let t0 = Instant::now();
        let id = crate::submit(&mut tasks, "noop").await?;
        done_rx.recv().await.context("watch ended")?;
        let s = seen.lock().await;
        if let (Some(st), Some(fin)) = (s.started.get(&id), s.finished.get(&id)) {
            to_start.push(st.duration_since(t0));
            to_finish.push(fin.duration_since(t0));
        }
    }
    report("  submit→start ", &mut to_start);
    report("  submit→finish", &mut to_finish);
    let throughput = batch_throughput(&admin_ch, o.tasks, &mut done_rx).await?;
    stop.cancel();
    let p50 = |v: &mut Vec<Duration>| {
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    Ok(Figures {
        agents: n,
        rss_idle_kib,
        rss_kib,
        connected: connected_after,
        sessions_ended: ended.load(Ordering::Relaxed),
        throughput,
        start_p50: p50(&mut to_start),
        finish_p50: p50(&mut to_finish),
    })
}

/// Submits `n` no-op tasks with `SubmitBatch` (1000 per call, 8 callers) and times first
/// submit → last final state; returns tasks/s.
pub(crate) async fn batch_throughput(
    ch: &client::AuthedChannel,
    n: usize,
    done_rx: &mut mpsc::UnboundedReceiver<()>,
) -> Result<f64> {
    let t0 = Instant::now();
    let batches: Vec<usize> = (0..n.div_ceil(1000))
        .map(|b| (n - b * 1000).min(1000))
        .collect();
    let queue = Arc::new(Mutex::new(batches));
    let mut callers = Vec::new();
    for _ in 0..8 {
        let (queue, mut c) = (queue.clone(), TaskServiceClient::new(ch.clone()));
        callers.push(tokio::spawn(async move {
            loop {
                let Some(size) = queue.lock().await.pop() else {
                    return anyhow::Ok(());
                };
                let req = SubmitBatchRequest {
                    tasks: (0..size)
                        .map(|_| SubmitTaskRequest {
                            spec: Some(spec("noop")),
                            ..Default::default()
                        })
                        .collect(),
                };
                let r = c.submit_batch(req).await?.into_inner();
                if let Some(e) = r.results.iter().find_map(|r| r.error.as_ref()) {
                    bail!("a batch entry was refused: {}", e.message);
                }
            }
        }));
    }
    for c in callers {
        c.await??;
    }
    for _ in 0..n {
        done_rx.recv().await.context("watch ended")?;
    }
    let el = t0.elapsed();
    println!(
        "  throughput: {n} no-op tasks in {:.2}s = {:.0} tasks/s (SubmitBatch)",
        el.as_secs_f64(),
        n as f64 / el.as_secs_f64()
    );
    Ok(n as f64 / el.as_secs_f64())
}

/// One simulated agent: a session like a real worker's (Hello, heartbeats at the asked
/// interval, Accepted + Finished for every Assign), opened again a second after it ends,
/// as a worker reconnects. Every end is counted in `ended`.
async fn agent(
    ch: Channel,
    id: String,
    token: String,
    slots: u32,
    ended: Arc<AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let r = session(ch.clone(), &id, &token, slots, &stop).await;
        if stop.is_cancelled() {
            return;
        }
        if ended.fetch_add(1, Ordering::Relaxed) < 3 {
            eprintln!(
                "agent {id}: session ended: {r:#}",
                r = r.err().unwrap_or_else(|| anyhow::anyhow!("ok"))
            );
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn session(
    ch: Channel,
    id: &str,
    token: &str,
    slots: u32,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<()> {
    let (tx, rx) = mpsc::channel::<AgentMessage>(16);
    let msg = |m: agent_message::Msg| AgentMessage { msg: Some(m) };
    tx.send(msg(agent_message::Msg::Hello(Hello {
        agent_id: id.to_string(),
        capabilities: vec!["noop".into()],
        slots,
        version: "bench".into(),
        ..Default::default()
    })))
    .await?;
    let mut c = AgentServiceClient::new(client::authed(ch, Some(token))?);
    let mut inbound = c
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let welcome = match inbound.message().await?.and_then(|m| m.msg) {
        Some(controller_message::Msg::Welcome(w)) => w,
        other => bail!("expected Welcome, got {other:?}"),
    };
    let mut beat = tokio::time::interval(Duration::from_millis(
        welcome.heartbeat_interval_ms.max(100),
    ));
    beat.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = beat.tick() => {
                tx.send(msg(agent_message::Msg::Heartbeat(Heartbeat {
                    free_slots: slots,
                    ..Default::default()
                }))).await?;
            }
            m = inbound.message() => match m?.and_then(|m| m.msg) {
                Some(controller_message::Msg::Assign(a)) => {
                    tx.send(msg(agent_message::Msg::Accepted(Accepted {
                        task_id: a.task_id.clone(),
                        fencing_token: a.fencing_token,
                    }))).await?;
                    tx.send(msg(agent_message::Msg::Finished(Finished {
                        task_id: a.task_id,
                        fencing_token: a.fencing_token,
                        result: Some(TaskResult {
                            outcome: Outcome::Succeeded as i32,
                            ..Default::default()
                        }),
                        log_chunks: 0,
                    }))).await?;
                }
                Some(_) => {}
                None => bail!("the controller ended the session"),
            },
        }
    }
}
