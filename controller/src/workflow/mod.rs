//! Workflows as data: checking a submitted DAG ([`validate`]) and the `${{ tasks.X.outputs.Y }}`
//! references that pass one node's outputs to its dependents ([`refs`]). The engine that
//! runs workflows lives in the core (`core/workflows.rs`), which owns all live state.

pub mod refs;
pub mod validate;

use scabbard_common::proto::{NodeState, TaskState};

/// The node state that mirrors its task's state.
pub fn node_state(task: TaskState) -> NodeState {
    match task {
        TaskState::Queued | TaskState::Unspecified => NodeState::Queued,
        TaskState::Assigned | TaskState::Running => NodeState::Running,
        TaskState::RetryWait => NodeState::Retrying,
        TaskState::Succeeded => NodeState::Succeeded,
        TaskState::Failed | TaskState::TimedOut => NodeState::Failed,
        TaskState::Cancelled => NodeState::Cancelled,
    }
}

/// Whether a node is done (nothing more will happen to it).
pub fn node_final(s: NodeState) -> bool {
    matches!(
        s,
        NodeState::Succeeded | NodeState::Failed | NodeState::Cancelled | NodeState::Skipped
    )
}
