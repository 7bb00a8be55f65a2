//! The core's writes and what follows them: queueing a record (a task's publishes its new
//! state once durable), barriers for answers that state what was written, and the effects
//! that answer a caller or message an agent once their write is durable.

use std::sync::Arc;

use prost::Message;
use scabbard_common::proto::{ControllerMessage, Task};
use tracing::warn;

use super::persist::{Effect, Write};
use super::{Reply, State, TASK_PREFIX, agent_tx};

impl State {
    /// Queues the durable write of a task record with its effects; publishes the new state
    /// as an event once durable.
    pub(crate) async fn persist_task(&mut self, task: &Task, mut effects: Vec<Effect>) {
        if !task.workflow_id.is_empty() {
            self.wf_dirty.insert(task.workflow_id.clone());
        }
        let snapshot = Arc::new(task.clone());
        let events = self.events.clone();
        effects.push(Box::new(move |r| {
            if r.is_ok() {
                let _ = events.send(snapshot);
            }
        }));
        self.write(
            format!("{TASK_PREFIX}{}", task.id),
            Some(task.encode_to_vec()),
            effects,
        )
        .await;
    }

    /// Runs `effects` once everything written so far is durable (they state it).
    pub(crate) async fn after_durable(&self, effects: Vec<Effect>) {
        if let Err(e) = self.persister.write(Write::barrier(effects)).await {
            warn!(error = %e, "dropping an answer: persister gone");
        }
    }

    pub(crate) async fn write(&self, key: String, value: Option<Vec<u8>>, effects: Vec<Effect>) {
        if let Err(e) = self
            .persister
            .write(Write {
                key,
                value,
                effects,
            })
            .await
        {
            warn!(error = %e, "dropping a write: persister gone");
        }
    }
}

/// An effect that answers `reply` with `value` once durable (or with the store error).
pub(crate) fn reply_effect<T: Send + 'static>(reply: Reply<T>, value: T) -> Effect {
    Box::new(move |r| {
        let _ = reply.send(match r {
            Ok(()) => Ok(value),
            Err(e) => Err(e.to_error()),
        });
    })
}

/// An effect that sends `msg` to an agent session once durable. A full queue closes the
/// session (see [`agent_tx`]): the agent reconnects and resynchronises.
pub(crate) fn agent_effect(tx: agent_tx::AgentTx, msg: ControllerMessage) -> Effect {
    Box::new(move |r| {
        if r.is_ok() && tx.try_send(msg).is_err() {
            warn!("agent session queue full or closed; the agent resyncs on reconnect");
        }
    })
}
