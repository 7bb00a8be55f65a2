//! `CoreMsg::Forget`: the retention sweeper deleted finished tasks and workflows from the
//! store; the core drops whatever it still holds of them. A task or workflow that is not
//! final, or a finished task of a workflow that still runs, is never touched: the sweeper
//! only sends ids it found final, and this check makes that hold whatever it sent.

use std::collections::HashSet;

use scabbard_common::is_final;
use scabbard_common::proto::WorkflowState;

use super::State;

impl State {
    /// Drops the finished tasks and workflows named in `ids` from memory; returns how many
    /// were dropped.
    pub(super) fn forget_finished(&mut self, ids: &[String]) -> usize {
        let mut gone: HashSet<&str> = HashSet::new();
        for id in ids {
            if let Some(entry) = self.tasks.get(id) {
                let t = &entry.task;
                let in_live_workflow =
                    !t.workflow_id.is_empty() && self.wf_active.contains(&t.workflow_id);
                if is_final(t.state()) && entry.queue_key.is_none() && !in_live_workflow {
                    self.tasks.remove(id);
                    self.unstorable.remove(id);
                    gone.insert(id);
                }
            } else if let Some(w) = self.workflows.get(id)
                && !self.wf_active.contains(id)
                && matches!(
                    w.state(),
                    WorkflowState::Succeeded | WorkflowState::Failed | WorkflowState::Cancelled
                )
            {
                self.workflows.remove(id);
                self.wf_dirty.remove(id);
                gone.insert(id);
            }
        }
        if !gone.is_empty() {
            self.idempotency.retain(|_, v| !gone.contains(v.as_str()));
            self.wf_idempotency
                .retain(|_, v| !gone.contains(v.as_str()));
        }
        gone.len()
    }
}

#[cfg(test)]
impl super::CoreHandle {
    /// A handle no core answers: what is sent to it arrives on the returned receiver.
    pub(crate) fn detached(
        logs: std::sync::Arc<crate::logstore::LogStore>,
    ) -> (Self, tokio::sync::mpsc::Receiver<super::CoreMsg>) {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        (Self { tx, logs }, rx)
    }
}
