//! `scabbard-bench`: measures the control plane end to end on loopback — a controller on
//! the embedded store (durable: every transition is committed before it is acknowledged)
//! and N workers, each with its own gRPC session, all in this process.
//!
//! * throughput: submit `--tasks` tasks from `--concurrency` concurrent clients and time
//!   first submit → last final state (observed through `TaskService.Watch`).
//! * latency: `--latency-samples` tasks one at a time on an idle cluster; submit→start
//!   (RUNNING event) and submit→finish (final event) p50/p99. A task shorter than the
//!   controller's RUNNING deferral (200 ms) has no RUNNING event: its start is not observed
//!   and the bench says so rather than print the finish twice.
//!
//! * artifacts (`--kind artifacts`): upload + download of one artifact of
//!   `--artifact-mib` MiB through the controller (local disk), in MB/s ([`artifacts`]).
//!
//! * logs (`--kind logs`): ingest + follow of one `--log-mib` MiB log, then its archive
//!   and an archived read, in MB/s ([`logs`]).
//!
//! * failover and chaos (`--kind failover`, `--kind chaos`): fault figures on real
//!   processes ([`chaos`]).
//!
//! * agents (`--kind agents`): a controller process and `--agents` simulated agents, each
//!   with its own session: RSS per agent, heartbeats, throughput vs 2 agents ([`agents`]).
//!
//! * `--external` (with `--kind noop` or `shell`): the same latency and throughput runs
//!   against real `scabbard controller` and `scabbard worker` processes started by the
//!   bench, which acts as a client only ([`external`]).
//!
//! * retention (`--kind retention`): submit→finish latency while the retention sweeper
//!   deletes `--tasks` expired tasks, and the sweep's rate ([`retention`]).
//! * history (`--kind history --history-tasks N`): a controller process on a store holding
//!   N finished tasks: RSS, restart to serving, `Get`/`List` latency ([`history`]).
//!
//! Run: `cargo run --release -p scabbard-bench -- --kind noop` (or `--kind shell`,
//! `--kind artifacts`, `--kind failover`, `--kind chaos`, `--kind agents`, `--kind logs`, `--kind retention`).

mod agents;
mod artifacts;
mod chaos;
mod external;
mod history;
mod logs;
mod retention;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use scabbard_common::client::{self, AuthedChannel, TaskServiceClient};
use scabbard_common::is_final;
use scabbard_common::proto::{
    NoopTask, ShellTask, SubmitTaskRequest, TaskSpec, TaskState, WatchTasksRequest, task_spec::Kind,
};
use tokio::sync::{Mutex, mpsc};

/// Same allocator as the `scabbard` binary (many small, cross-thread allocations).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Scabbard control-plane benchmark")]
struct Args {
    /// `noop` (control plane alone), `shell` (`true` as a host process), `artifacts`
    /// (artifact upload + download throughput), `logs` (ingest + follow of one big log),
    /// `failover` (time until work resumes after the leader or the etcd leader member is
    /// lost), `chaos` (the chaos suite's figures), `agents` (many simulated agents) or
    /// `retention` (latency while the sweeper deletes `--tasks` expired tasks).
    #[arg(long, default_value = "noop")]
    kind: String,
    /// `--kind artifacts`: size of the artifact, in MiB.
    #[arg(long, default_value_t = 256)]
    artifact_mib: usize,
    /// `--kind artifacts`: rounds (the median is reported).
    #[arg(long, default_value_t = 3)]
    artifact_rounds: usize,
    /// `--kind logs`: size of the log, in MiB.
    #[arg(long, default_value_t = 1024)]
    log_mib: usize,
    /// `--kind history`: finished tasks written into the store before the controller starts.
    #[arg(long, default_value_t = 1_000_000)]
    history_tasks: usize,
    /// `--kind failover`: runs of each fault.
    #[arg(long, default_value_t = 3)]
    failover_runs: usize,
    /// `--kind chaos`: the long form.
    #[arg(long)]
    chaos_long: bool,
    /// Tasks in the throughput run (`--kind chaos`: overrides the plan's number of tasks).
    #[arg(long)]
    tasks: Option<usize>,
    /// Concurrent submitting clients.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Worker count.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Slots per worker.
    #[arg(long, default_value_t = 256)]
    slots: u32,
    /// Sequential tasks for the latency run.
    #[arg(long, default_value_t = 500)]
    latency_samples: usize,
    /// Data directory (default: a temporary one).
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// Store backend: `embedded` or `etcd`.
    #[arg(long, default_value = "embedded")]
    store: String,
    /// etcd endpoints (with `--store etcd`), comma-separated.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    etcd_endpoints: String,
    /// With `--store etcd`: `etcd.max_txn_ops` (0: found at start, as by default).
    #[arg(long, default_value_t = 0)]
    etcd_max_txn_ops: usize,
    /// Controller's per-token rate limit (requests/s; 0 = off, so the bench is never
    /// throttled).
    #[arg(long, default_value_t = 0)]
    rate_limit: u32,
    /// Controller's global concurrency limit (0 = off).
    #[arg(long, default_value_t = 10_000)]
    max_concurrent_requests: usize,
    /// Controller's per-RPC deadline in milliseconds (0 = off).
    #[arg(long, default_value_t = 30_000)]
    rpc_timeout_ms: u64,
    /// `--kind agents`: simulated agents (each with its own session).
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// `--kind agents`: heartbeat interval the controller asks of agents, in ms (default:
    /// the controller's default).
    #[arg(long, default_value_t = 2_000)]
    agent_heartbeat_ms: u64,
    /// `--kind agents`: agent lease (silence before a session ends and an agent is lost),
    /// in ms (default: the controller's default).
    #[arg(long, default_value_t = 10_000)]
    agent_lease_ms: u64,
    /// Drive real `scabbard controller` / `scabbard worker` processes (the bench is a
    /// client only); `--kind noop` or `shell`.
    #[arg(long)]
    external: bool,
    /// `--kind agents` and `--external`: extra arguments for the `scabbard controller`
    /// process, whitespace-separated (e.g. `--controller-args "--leader-lease-ttl 30s"`).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    controller_args: String,
    /// Throughput run: submit with `SubmitBatch` (1000 per call) instead of one `Submit`
    /// per task.
    #[arg(long)]
    batch: bool,
}

/// Admin token the bench's controller is bootstrapped with (its clients send it).
const ADMIN_TOKEN: &str = "scbd_api_bench-admin-0123456789abcdef0123456789abcdef";

fn spec(kind: &str) -> TaskSpec {
    TaskSpec {
        kind: Some(match kind {
            "shell" => Kind::Shell(ShellTask {
                command: vec!["true".into()],
            }),
            _ => Kind::Noop(NoopTask {}),
        }),
        ..Default::default()
    }
}

/// Times at which this client saw each task start and finish.
#[derive(Default)]
struct Seen {
    started: HashMap<String, Instant>,
    finished: HashMap<String, Instant>,
}

#[tokio::main]
async fn main() {
    let result = bench(Args::parse()).await;
    // Exit here, not by dropping the runtime: an error must be printed even if a background
    // task (a worker, the controller) is slow to stop.
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("scabbard-bench: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn bench(args: Args) -> Result<()> {
    scabbard_common::logging::init("warn", false);
    match args.kind.as_str() {
        "noop" | "shell" | "artifacts" | "logs" => {}
        "failover" => return chaos::failover(args.failover_runs.max(1)).await,
        "chaos" => return chaos::chaos(args.chaos_long, args.tasks).await,
        "agents" => {
            return agents::run(agents::Opts {
                agents: args.agents.max(1),
                tasks: args.tasks.unwrap_or(20_000),
                latency_samples: args.latency_samples,
                heartbeat: Duration::from_millis(args.agent_heartbeat_ms.max(100)),
                lease: Duration::from_millis(args.agent_lease_ms.max(500)),
                controller_args: args
                    .controller_args
                    .split_whitespace()
                    .map(str::to_string)
                    .collect(),
            })
            .await;
        }
        "history" => return history::run(args.history_tasks, args.data_dir.clone()).await,
        "retention" => {
            return retention::run(args.tasks.unwrap_or(1_000_000), args.latency_samples).await;
        }
        _ => bail!(
            "--kind must be noop, shell, artifacts, logs, failover, chaos, agents, history or retention"
        ),
    }
    if args.external {
        if matches!(args.kind.as_str(), "artifacts" | "logs") {
            bail!("--external runs --kind noop or shell");
        }
        return external::run(&args).await;
    }
    // From here on this process hosts the controller (and the workers, whose tasks start
    // no processes that matter): the controller's process settings. Modes that start
    // `scabbard` processes returned above, so those never inherit them.
    scabbard_controller::process::disable_transparent_huge_pages();
    let temp = tempfile::tempdir()?;
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    let token = "bench-registration-token-0123456789".to_string();
    let namespace = format!("/bench-{}/", std::process::id());
    let etcd = scabbard_controller::store::EtcdConfig {
        endpoints: args.etcd_endpoints.split(',').map(str::to_string).collect(),
        namespace: namespace.clone(),
        max_txn_ops: args.etcd_max_txn_ops,
        ..Default::default()
    };
    // etcd mode needs an advertised address (followers redirect to it): a free loopback
    // port, chosen before the controller binds it.
    let (listen, advertise_addr) = if args.store == "etcd" {
        let addr = free_loopback_addr()?;
        (addr, Some(addr.to_string()))
    } else {
        ("127.0.0.1:0".parse()?, None)
    };
    let mut ctl = scabbard_controller::spawn(scabbard_controller::ControllerConfig {
        listen,
        advertise_addr,
        data_dir: dir.join("controller"),
        registration_token: token.clone(),
        bootstrap_token: Some(ADMIN_TOKEN.into()),
        rate_limit_per_second: args.rate_limit,
        rate_limit_burst: args.rate_limit,
        max_concurrent_requests: args.max_concurrent_requests,
        rpc_timeout_ms: args.rpc_timeout_ms,
        store: args.store.clone(),
        etcd: etcd.clone(),
        ..Default::default()
    })
    .await?;
    // etcd bumps its revision once per write transaction: the delta counts writes.
    let etcd_probe = if args.store == "etcd" {
        Some(scabbard_controller::store::EtcdStore::connect(&etcd).await?)
    } else {
        None
    };
    let addr = ctl.addr.to_string();
    if args.kind == "logs" {
        let r = logs::run(&addr, &token, ADMIN_TOKEN, args.log_mib.max(1)).await;
        ctl.shutdown.cancel();
        let _ = ctl.task.await;
        return r;
    }
    if args.kind == "artifacts" {
        let r = artifacts::run(
            &addr,
            &token,
            ADMIN_TOKEN,
            &dir,
            args.artifact_mib.max(1),
            args.artifact_rounds.max(1),
        )
        .await;
        ctl.shutdown.cancel();
        let _ = ctl.task.await;
        return r;
    }
    let stop = tokio_util::sync::CancellationToken::new();
    for i in 0..args.workers {
        let cfg = scabbard_worker::WorkerConfig {
            controller: addr.clone(),
            registration_token: token.clone(),
            name: format!("bench-{i}"),
            slots: args.slots,
            data_dir: dir.join(format!("worker-{i}")),
            ..Default::default()
        };
        tokio::spawn(scabbard_worker::run(cfg, stop.child_token()));
    }
    let channel = client::authed(client::connect(&addr).await?, Some(ADMIN_TOKEN))?;
    // Wait for the workers to attach.
    let mut admin = client::AdminServiceClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let agents = match admin
            .list_agents(scabbard_common::proto::ListAgentsRequest {})
            .await
        {
            Ok(r) => r.into_inner().agents,
            Err(e) => {
                // Say why, if the controller itself stopped.
                if let Ok(Ok(stopped)) =
                    tokio::time::timeout(Duration::from_secs(1), &mut ctl.task).await
                {
                    bail!("the controller stopped: {stopped:?} ({e})");
                }
                return Err(e.into());
            }
        };
        if agents.iter().filter(|a| a.status == 1).count() == args.workers {
            break;
        }
        if Instant::now() > deadline {
            bail!("workers did not attach");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    println!(
        "scabbard-bench: kind={} workers={} slots={} store={} (durable commits, loopback); \
         limits: rate {}/s per token, {} concurrent, rpc timeout {} ms (0 = off)",
        args.kind,
        args.workers,
        args.slots,
        args.store,
        args.rate_limit,
        args.max_concurrent_requests,
        args.rpc_timeout_ms
    );
    measure(&args, channel, etcd_probe.as_ref()).await?;
    stop.cancel();
    ctl.shutdown.cancel();
    let _ = ctl.task.await;
    Ok(())
}

/// The latency run, then the throughput run, against the cluster behind `channel`.
async fn measure(
    args: &Args,
    channel: AuthedChannel,
    etcd_probe: Option<&Arc<scabbard_controller::store::EtcdStore>>,
) -> Result<()> {
    let n_tasks = args.tasks.unwrap_or(20_000);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    watch_all(channel.clone(), seen.clone(), done_tx).await?;

    // Latency: one at a time on an idle cluster.
    let mut tasks = TaskServiceClient::new(channel.clone());
    let mut to_start = Vec::new();
    let mut to_finish = Vec::new();
    for _ in 0..args.latency_samples {
        let t0 = Instant::now();
        let id = submit(&mut tasks, &args.kind).await?;
        done_rx.recv().await.context("watch ended")?;
        let s = seen.lock().await;
        let (Some(st), Some(fin)) = (s.started.get(&id), s.finished.get(&id)) else {
            continue;
        };
        to_start.push(st.duration_since(t0));
        to_finish.push(fin.duration_since(t0));
    }
    report_drift("submit→finish", &to_finish);
    if to_start.iter().zip(&to_finish).all(|(s, f)| s == f) {
        // Only final events came: RUNNING records of short tasks are written late or never
        // (the final record carries the start), so there is no start to time here.
        println!(
            "submit→start : not observed (no RUNNING event: these tasks finish before their \
             RUNNING record is due)"
        );
    } else {
        report("submit→start ", &mut to_start);
    }
    report("submit→finish", &mut to_finish);

    // Throughput.
    let rev0 = match etcd_probe {
        Some(s) => Some(scabbard_controller::store::Store::revision(s.as_ref()).await?),
        None => None,
    };
    if args.batch {
        agents::batch_throughput(&channel, n_tasks, &mut done_rx).await?;
        return Ok(());
    }
    let per_client = n_tasks / args.concurrency.max(1);
    let total = per_client * args.concurrency.max(1);
    let t0 = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let mut c = TaskServiceClient::new(channel.clone());
        let kind = args.kind.clone();
        clients.push(tokio::spawn(async move {
            for _ in 0..per_client {
                submit(&mut c, &kind).await?;
            }
            anyhow::Ok(())
        }));
    }
    for c in clients {
        c.await??;
    }
    let submitted = t0.elapsed();
    for _ in 0..total {
        done_rx.recv().await.context("watch ended")?;
    }
    let elapsed = t0.elapsed();
    println!(
        "throughput: {total} tasks in {:.2}s = {:.0} tasks/s end to end (submits alone: {:.0}/s)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        total as f64 / submitted.as_secs_f64()
    );
    if let (Some(s), Some(r0)) = (etcd_probe, rev0) {
        let r1 = scabbard_controller::store::Store::revision(s.as_ref()).await?;
        println!(
            "etcd: {} write transactions for {total} tasks = {:.3} per task",
            r1 - r0,
            (r1 - r0) as f64 / total as f64
        );
    }
    Ok(())
}

async fn submit(c: &mut TaskServiceClient<AuthedChannel>, kind: &str) -> Result<String> {
    let r = c
        .submit(SubmitTaskRequest {
            spec: Some(spec(kind)),
            idempotency_key: String::new(),
            project: String::new(),
        })
        .await?
        .into_inner();
    Ok(r.task.context("no task")?.id)
}

/// Follows every task event; signals one `()` per task that reaches a final state.
async fn watch_all(
    channel: AuthedChannel,
    seen: Arc<Mutex<Seen>>,
    done: mpsc::UnboundedSender<()>,
) -> Result<()> {
    let mut stream = TaskServiceClient::new(channel)
        .watch(WatchTasksRequest {
            ids: vec![],
            send_initial: false,
            ..Default::default()
        })
        .await?
        .into_inner();
    tokio::spawn(async move {
        while let Ok(Some(ev)) = stream.message().await {
            let Some(t) = ev.task else { continue };
            let now = Instant::now();
            let mut s = seen.lock().await;
            if t.state() == TaskState::Running || is_final(t.state()) {
                s.started.entry(t.id.clone()).or_insert(now);
            }
            if is_final(t.state()) && s.finished.insert(t.id.clone(), now).is_none() {
                let _ = done.send(());
            }
        }
        eprintln!("watch stream ended");
    });
    Ok(())
}

fn report(what: &str, samples: &mut [Duration]) {
    if samples.is_empty() {
        println!("{what}: no samples");
        return;
    }
    samples.sort();
    let pct = |p: f64| percentile(samples, p);
    println!(
        "{what}: p50 {:.2} ms  p99 {:.2} ms  (n={})",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        samples.len()
    );
}

/// The `p` quantile (0..=1) of sorted `samples` (zero for none).
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// For a long sequential run (at least [`DRIFT_MIN_SAMPLES`]): p50 and p99 of each tenth
/// of it in order, so latency that grows with the tasks a controller has run shows.
fn report_drift(what: &str, samples: &[Duration]) {
    if samples.len() < DRIFT_MIN_SAMPLES {
        return;
    }
    let size = samples.len() / 10;
    for (i, window) in samples.chunks(size).take(10).enumerate() {
        report(
            &format!("{what} tasks {}..{}", i * size, (i + 1) * size),
            &mut window.to_vec(),
        );
    }
}

/// Sequential samples from which [`report_drift`] reports windows.
const DRIFT_MIN_SAMPLES: usize = 20_000;

/// A loopback address with a free port, for a controller that must know its address
/// before it binds (etcd mode advertises it). The port is free when chosen; nothing else
/// on this host is expected to take it in between.
pub(crate) fn free_loopback_addr() -> Result<std::net::SocketAddr> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(([127, 0, 0, 1], port).into())
}
