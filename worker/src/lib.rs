//! The Scabbard worker daemon: registers with a controller, holds one `Session` stream,
//! runs assigned attempts on its slots with the matching executor, and streams their logs
//! and results back — spooling both on disk so a dropped stream or a restart loses nothing.
//!
//! Layout: [`connection`] (register, stream, reconnect) → [`runner`] (slots, attempts,
//! cancel) → [`executor`] (`shell`, `noop`, `dagger`); [`spool`] keeps unacknowledged output;
//! [`redact`] keeps task secrets out of both.

pub mod config;
mod connection;
pub mod executor;
pub mod identity;
pub mod redact;
mod runner;
pub mod spool;

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
    std::fs::create_dir_all(&cfg.data_dir)?;
    std::fs::create_dir_all(cfg.work_root())?;
    let spool = Arc::new(spool::Spool::open(&cfg.data_dir.join("spool"))?);
    let (outbox_tx, outbox_rx) = mpsc::channel(4096);
    let agent_name = cfg.effective_name()?.unwrap_or_else(connection::hostname);
    let mut executors: Vec<Arc<dyn executor::Executor>> = vec![
        Arc::new(executor::ShellExecutor::default()),
        Arc::new(executor::NoopExecutor),
    ];
    // The `dagger` capability is advertised only while an engine answers: asked once now
    // (bounded by `dagger.probe_timeout_ms`), then every `dagger.probe_interval_ms`.
    let mut rechecks = None;
    if cfg.dagger.enabled {
        let dagger = executor::DaggerExecutor::new(cfg.dagger.clone());
        dagger.probe().await;
        rechecks = dagger.spawn_rechecks(shutdown.child_token());
        executors.push(Arc::new(dagger));
    }
    let runner = Arc::new(runner::Runner::new(
        spool,
        executors,
        cfg.work_root(),
        Duration::from_millis(cfg.default_task_timeout_ms),
        cfg.slots,
        outbox_tx,
        agent_name,
    ));
    let adopted = runner.adopt_spooled()?;
    if adopted > 0 {
        info!(
            adopted,
            "found attempts spooled by a previous run; they will be reported"
        );
    }
    let target = scabbard_common::client::addresses(&cfg.controller)
        .into_iter()
        .next()
        .unwrap_or_default();
    let conn = connection::Connection {
        target,
        cfg,
        runner,
        outbox: outbox_rx,
        draining: false,
        stop_at: None,
    };
    let result = conn.run(shutdown).await;
    if let Some(rechecks) = rechecks {
        rechecks.abort();
    }
    result
}
