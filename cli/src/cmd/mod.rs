//! Command implementations.

mod agents;
mod daemons;
mod tasks;

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::args::{Cli, Command};

/// Runs a command; returns the process exit code.
pub(crate) async fn dispatch(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Dev(a) => daemons::dev(a).await,
        Command::Controller(a) => daemons::controller(a).await,
        Command::Worker(a) => daemons::worker(a).await,
        Command::Submit(a) => tasks::submit(a).await,
        Command::Task(c) => tasks::task(c).await,
        Command::Logs(a) => tasks::logs(a).await,
        Command::Agents(c) => agents::agents(c).await,
        Command::Status { target } => agents::status(target).await,
    }
}

/// A token cancelled on the first SIGINT or SIGTERM (graceful stop); a second signal
/// exits at once.
pub(crate) fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down (signal again to stop at once)");
        t.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
    token
}
