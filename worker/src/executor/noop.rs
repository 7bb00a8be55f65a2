//! The `noop` executor: succeeds at once without output. It exists to measure the control
//! plane alone; it must never touch the host.

use async_trait::async_trait;
use scabbard_common::proto;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ExecContext, ExecOutcome, Executor, OutputChunk};

/// Capability name of [`NoopExecutor`].
pub(super) const CAPABILITY: &str = "noop";

/// Runs `noop` tasks: returns `SUCCEEDED` immediately, with no output.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopExecutor;

#[async_trait]
impl Executor for NoopExecutor {
    fn capability(&self) -> &'static str {
        CAPABILITY
    }

    async fn run(
        &self,
        _ctx: ExecContext,
        _spec: &proto::TaskSpec,
        _out: mpsc::Sender<OutputChunk>,
        _cancel: CancellationToken,
    ) -> ExecOutcome {
        ExecOutcome::succeeded()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn succeeds_without_output() {
        let (tx, mut rx) = mpsc::channel(1);
        let ctx = ExecContext {
            task_id: "t".into(),
            fencing_token: 1,
            attempt: 1,
            agent_id: "agent-1".into(),
            agent_name: "host-1".into(),
            work_root: PathBuf::from("/nonexistent"),
            default_timeout: Duration::from_secs(1),
            project: "default".into(),
            inputs: Vec::new(),
            artifact_dir: PathBuf::from("/nonexistent/artifacts"),
            trace: None,
        };
        let outcome = NoopExecutor
            .run(
                ctx,
                &proto::TaskSpec::default(),
                tx,
                CancellationToken::new(),
            )
            .await;
        assert_eq!(outcome, ExecOutcome::succeeded());
        assert!(rx.recv().await.is_none());
    }
}
