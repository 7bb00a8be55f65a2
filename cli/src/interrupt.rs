//! Ctrl-C while a command follows work (`submit --wait/--follow`, `logs --follow`,
//! `workflow watch`, `workflow submit --wait/--watch`, `template run --watch`): the work
//! goes on on the cluster, so the CLI says how to cancel it and exits 130; with the
//! global `--cancel-on-interrupt` it cancels the task or workflow first. A second Ctrl-C
//! exits at once.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use scabbard_common::client::{AuthedChannel, TaskServiceClient};
use scabbard_common::proto::workflow_service_client::WorkflowServiceClient;
use scabbard_common::proto::{CancelTaskRequest, CancelWorkflowRequest};

use crate::exit::{self, fail};

static CANCEL: AtomicBool = AtomicBool::new(false);

/// Records the global `--cancel-on-interrupt` (once, from `main`).
pub(crate) fn set_cancel_on_interrupt(on: bool) {
    CANCEL.store(on, Ordering::Relaxed);
}

/// What is being followed.
pub(crate) enum Work<'a> {
    /// A task: its id and a client to cancel it with.
    Task(&'a str, TaskServiceClient<AuthedChannel>),
    /// A workflow.
    Workflow(&'a str, WorkflowServiceClient<AuthedChannel>),
}

impl Work<'_> {
    fn noun(&self) -> &'static str {
        match self {
            Work::Task(..) => "task",
            Work::Workflow(..) => "workflow",
        }
    }

    fn id(&self) -> &str {
        match self {
            Work::Task(id, _) | Work::Workflow(id, _) => id,
        }
    }

    async fn cancel(&self) -> Result<(), tonic::Status> {
        let reason = "interrupted (--cancel-on-interrupt)".to_string();
        match self {
            Work::Task(id, c) => {
                c.clone()
                    .cancel(CancelTaskRequest {
                        id: id.to_string(),
                        reason,
                    })
                    .await?;
            }
            Work::Workflow(id, c) => {
                c.clone()
                    .cancel(CancelWorkflowRequest {
                        id: id.to_string(),
                        reason,
                    })
                    .await?;
            }
        }
        Ok(())
    }
}

/// Runs `fut` until it ends or Ctrl-C (SIGINT) arrives; on Ctrl-C, cancels `work` when
/// `--cancel-on-interrupt` was given, and fails with [`exit::INTERRUPTED`] and a message
/// saying how to cancel (or that it was cancelled).
pub(crate) async fn guard<T>(work: Work<'_>, fut: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::select! {
        r = fut => r,
        _ = tokio::signal::ctrl_c() => interrupted(work).await,
    }
}

async fn interrupted<T>(work: Work<'_>) -> Result<T> {
    // A second Ctrl-C does not wait for the cancel.
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(i32::from(exit::INTERRUPTED));
        }
    });
    let (noun, id) = (work.noun(), work.id().to_string());
    if !CANCEL.load(Ordering::Relaxed) {
        return Err(fail(
            exit::INTERRUPTED,
            format!(
                "interrupted: {noun} {id} keeps running; cancel it with `scabbard {noun} cancel {id}` \
                 (or pass --cancel-on-interrupt next time)"
            ),
        ));
    }
    esay!("interrupted: cancelling {noun} {id}");
    match work.cancel().await {
        Ok(()) => Err(fail(
            exit::INTERRUPTED,
            format!("interrupted: {noun} {id} cancelled (--cancel-on-interrupt)"),
        )),
        Err(s) => Err(fail(
            exit::INTERRUPTED,
            format!(
                "interrupted, and cancelling {noun} {id} failed ({}: {}); cancel it with `scabbard {noun} cancel {id}`",
                crate::output::code_name(s.code()),
                s.message()
            ),
        )),
    }
}
