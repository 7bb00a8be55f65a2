//! `CoreMsg::Forget`: the retention sweeper deleted finished tasks and workflows from the
//! store; the core drops whatever it still holds of them. A task or workflow that is not
//! final, or a finished task of a workflow that still runs, is never touched: the sweeper
//! only sends ids it found final, and this check makes that hold whatever it sent.

use scabbard_common::is_final;
use scabbard_common::proto::WorkflowState;

use super::{State, idempotency_key};

impl State {
    /// Drops the finished tasks and workflows named in `ids` from memory; returns how many
    /// were dropped.
    pub(super) fn forget_finished(&mut self, ids: &[String]) -> usize {
        let mut gone = 0;
        for id in ids {
            if let Some(entry) = self.tasks.get(id) {
                let t = &entry.task;
                let in_live_workflow =
                    !t.workflow_id.is_empty() && self.wf_active.contains(&t.workflow_id);
                if !is_final(t.state()) || entry.queue_key.is_some() || in_live_workflow {
                    continue;
                }
                if !t.idempotency_key.is_empty() {
                    let key = idempotency_key(&t.project, &t.idempotency_key);
                    self.idempotency.forget_key(&key, id);
                }
                self.tasks.remove(id);
                self.finished.remove(id);
                self.unstorable.remove(id);
                gone += 1;
            } else if let Some(w) = self.workflows.get(id)
                && !self.wf_active.contains(id)
                && matches!(
                    w.state(),
                    WorkflowState::Succeeded | WorkflowState::Failed | WorkflowState::Cancelled
                )
            {
                let key = idempotency_key(&w.project, &w.idempotency_key);
                if !w.idempotency_key.is_empty() && self.wf_idempotency.get(&key) == Some(id) {
                    self.wf_idempotency.remove(&key);
                }
                self.workflows.remove(id);
                self.wf_finished.remove(id);
                self.wf_dirty.remove(id);
                gone += 1;
            }
        }
        gone
    }
}

#[cfg(test)]
impl super::CoreHandle {
    /// A handle no core answers: what is sent to it arrives on the returned receiver.
    pub(crate) fn detached(
        logs: std::sync::Arc<crate::logstore::LogStore>,
        store: std::sync::Arc<dyn crate::store::Store>,
    ) -> (Self, tokio::sync::mpsc::Receiver<super::CoreMsg>) {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        (
            Self {
                tx,
                logs,
                archive: None,
                store,
                load: Default::default(),
            },
            rx,
        )
    }
}
