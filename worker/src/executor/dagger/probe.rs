//! Does an engine answer? Starts a session like a task would and asks the engine its
//! version, all within `probe_timeout_ms`. The worker advertises the `dagger` capability
//! only while the answer is yes ([`super::DaggerExecutor::probe`] keeps the flag,
//! [`super::DaggerExecutor::spawn_rechecks`] asks again every `probe_interval_ms`).

use std::sync::Arc;

use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::cli::{cli_env, cli_path};
use super::gql;
use super::session::{EngineSession, SessionSpec};
use crate::config::DaggerConfig;
use crate::redact::Secrets;

/// The engine's version, or why it does not answer.
pub(super) async fn probe(cfg: &DaggerConfig) -> Result<String, String> {
    let limit = cfg.probe_timeout();
    let attempt = async {
        let cli = cli_path(cfg).await?;
        let cwd = std::env::temp_dir();
        let spec = SessionSpec {
            cli: &cli,
            env: cli_env(cfg),
            cwd: &cwd,
            start_timeout: cfg.session_start_timeout().min(limit),
            kill_grace: cfg.kill_grace(),
        };
        let session = EngineSession::start(spec, None, CancellationToken::new()).await?;
        let client = gql::connect(session.port, &session.token, Arc::new(Secrets::default()));
        // A panic in the SDK must not take the worker down.
        let version = tokio::spawn(async move { client.version().await }).await;
        session.shutdown().await;
        match version {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(gql::describe(&e)),
            Err(e) => Err(format!("the Dagger SDK failed: {e}")),
        }
    };
    match timeout(limit, attempt).await {
        Ok(answer) => answer,
        Err(_) => Err(format!(
            "the engine did not answer within {}s (dagger.probe_timeout_ms)",
            limit.as_secs_f64()
        )),
    }
}
