//! Command implementations.

mod agents;
mod artifacts;
mod context;
mod daemons;
mod schedules;
mod security;
mod store;
mod taskfollow;
mod tasks;
mod templates;
mod verbs;
mod workflow_logs;
mod workflows;

use anyhow::Result;
use scabbard_common::client::{self, AuthedChannel};
use tokio_util::sync::CancellationToken;

use crate::args::{Cli, Command, Target};
use crate::credentials;

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
        Command::Login(a) => security::login(a).await,
        Command::Logout(a) => security::logout(a),
        Command::Whoami { target } => security::whoami(target).await,
        Command::Token(c) => security::token(c).await,
        Command::Mcp { target } => mcp(target).await,
        Command::Project(c) => security::project(c).await,
        Command::Audit(a) => security::audit(a).await,
        Command::Workflow(c) => workflows::workflow(c).await,
        Command::Template(c) => templates::template(c).await,
        Command::Schedule(c) => schedules::schedule(c).await,
        Command::Breakers(c) => agents::breakers(c).await,
        Command::Artifacts(c) => artifacts::artifacts(c).await,
        Command::Store(c) => store::store(c).await,
        Command::Context(c) => context::context(c, cli.context),
        Command::Completion { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "scabbard", &mut std::io::stdout());
            Ok(0)
        }
    }
}

/// Connects to the leader among `target`'s controllers with its token and TLS settings
/// (flags, environment, then the credentials file); fails without a token.
pub(crate) async fn connect(target: &Target) -> Result<AuthedChannel> {
    crate::retry::remember(target);
    let r = credentials::resolve(target)?;
    let token = r.token()?;
    let channel = client::connect_leader_with(&r.controller, &r.opts).await?;
    Ok(client::authed(channel, Some(token))?)
}

/// `scabbard mcp`: MCP over stdio with the target's token and TLS settings; logs go to
/// stderr, stdout carries the protocol only.
async fn mcp(target: Target) -> Result<u8> {
    let r = credentials::resolve(&target)?;
    let token = r.token()?.to_string();
    let channel = client::connect_leader_with(&r.controller, &r.opts).await?;
    // A rejected token fails here, plainly, rather than on the agent's first request.
    client::AdminServiceClient::new(client::authed(channel.clone(), Some(&token))?)
        .who_am_i(scabbard_common::proto::WhoAmIRequest {})
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "the controller refused the token ({:?}: {}); pass --token, set SCABBARD_TOKEN or run `scabbard login`",
                s.code(),
                s.message()
            )
        })?;
    scabbard_mcp::serve_stdio(channel, token).await?;
    Ok(0)
}

/// [`connect`] for calls that work without a token too (cluster status).
pub(crate) async fn connect_optional(target: &Target) -> Result<AuthedChannel> {
    let r = credentials::resolve(target)?;
    let channel = client::connect_leader_with(&r.controller, &r.opts).await?;
    Ok(client::authed(channel, r.opts.token.as_deref())?)
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
        esay!("second signal: exiting now");
        std::process::exit(130);
    });
    token
}
