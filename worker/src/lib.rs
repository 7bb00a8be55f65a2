//! The Scabbard worker daemon: registers with a controller, holds one `Session` stream,
//! runs assigned attempts on its slots with the matching executor, and streams their logs
//! and results back — spooling both on disk so a dropped stream or a restart loses nothing.
//!
//! Layout: [`connection`] (register, stream, reconnect) → [`runner`] (slots, attempts,
//! cancel) → [`executor`] (`shell`, `noop`, `dagger`); [`spool`] keeps unacknowledged output;
//! [`redact`] keeps task secrets out of both. `artifacts` gets inputs into a local cache and
//! uploads what attempts produced, through `link` (the current controller and agent token);
//! `layout` owns the data dir's modes.

mod artifacts;
pub mod config;
mod connection;
pub mod executor;
pub mod identity;
mod layout;
mod link;
mod metrics;
pub mod redact;
mod runner;
pub mod spool;
mod trace;

use std::sync::Arc;
use std::time::Duration;

use scabbard_common::Result;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::WorkerConfig;

/// Runs a worker until `shutdown` is cancelled and its running attempts have finished and
/// reported (or `shutdown_grace_ms` passed).
pub async fn run(cfg: WorkerConfig, shutdown: CancellationToken) -> Result<()> {
    cfg.validate()?;
    let run_as = cfg.shell.resolve()?;
    let hide = cfg.shell.resolve_hide()?;
    {
        let (cfg, run_as) = (cfg.clone(), run_as.clone());
        tokio::task::spawn_blocking(move || layout::prepare(&cfg, run_as.as_ref()))
            .await
            .map_err(scabbard_common::Error::internal)??;
    }
    if let Some(r) = &run_as {
        info!(user = %r.user, uid = r.uid, gid = r.gid, "shell tasks run as another user, each in its own PID namespace");
    }
    let contain = {
        let data = cfg.data_dir.clone();
        tokio::task::spawn_blocking(move || executor::Containment::open(&data))
            .await
            .map_err(scabbard_common::Error::internal)?
            .map_err(|e| {
                scabbard_common::Error::internal(format!(
                    "cannot set up the containment of tasks' processes: {e}"
                ))
            })?
    };
    let contain = Arc::new(contain);
    let spool = Arc::new(spool::Spool::open(&cfg.data_dir.join("spool"))?);
    let (outbox_tx, outbox_rx) = mpsc::channel(4096);
    let agent_name = cfg.effective_name()?.unwrap_or_else(connection::hostname);
    let mut executors: Vec<Arc<dyn executor::Executor>> = vec![
        Arc::new(
            executor::ShellExecutor::default()
                .run_as(run_as)
                .hide(hide)
                .contain(Some(contain)),
        ),
        Arc::new(executor::NoopExecutor),
    ];
    // The `dagger` capability is advertised only while an engine answers: asked once now
    // (bounded by `dagger.probe_timeout_ms`), then every `dagger.probe_interval_ms`.
    let mut rechecks = None;
    let mut engine = None;
    if cfg.dagger.enabled {
        let dagger = executor::DaggerExecutor::new(cfg.dagger.clone());
        dagger.probe().await;
        rechecks = dagger.spawn_rechecks(shutdown.child_token());
        engine = Some(dagger.clone());
        executors.push(Arc::new(dagger));
    }
    let target = scabbard_common::client::addresses(&cfg.controller)
        .into_iter()
        .next()
        .unwrap_or_default();
    let link = Arc::new(link::ControllerLink::new(&target, cfg.client_options()));
    let cache =
        artifacts::ArtifactCache::open(&cfg.artifact_cache_dir(), cfg.artifact_cache_bytes).await?;
    let runner = Arc::new(runner::Runner::new(runner::RunnerParts {
        spool: spool.clone(),
        executors,
        work_root: cfg.work_root(),
        default_timeout: Duration::from_millis(cfg.default_task_timeout_ms),
        slots: cfg.slots,
        outbox: outbox_tx,
        agent_name,
        artifacts: Arc::new(artifacts::Artifacts::new(cache, link.clone())),
    }));
    if let Some(addr) = cfg.metrics_listen {
        let live = metrics::Live {
            runner: runner.clone(),
            spool,
            slots: cfg.slots,
            dagger: engine,
        };
        let bound = metrics::start(addr, live, shutdown.child_token()).await?;
        info!(addr = %bound, "metrics on GET /metrics");
    }
    let adopted = runner.adopt_spooled()?;
    if adopted > 0 {
        info!(
            adopted,
            "found attempts spooled by a previous run; they will be reported"
        );
    }
    let conn = connection::Connection {
        target,
        cfg,
        runner,
        outbox: outbox_rx,
        draining: false,
        stop_at: None,
        link,
        previous: None,
    };
    let result = conn.run(shutdown).await;
    if let Some(rechecks) = rechecks {
        rechecks.abort();
    }
    result
}
