//! The core's writes and what follows them: queueing a record (a task's publishes its new
//! state once durable), barriers for answers that state what was written, and the effects
//! that answer a caller or message an agent once their write is durable.

use std::sync::Arc;

use prost::Message;
use scabbard_common::proto::{ControllerMessage, Task};
use tracing::warn;

use super::persist::{Effect, Write};
use super::{Reply, State, TASK_PREFIX, agent_tx, history};

/// A key written (`Some`) or deleted (`None`) in the same commit as a record.
type Also = (String, Option<Vec<u8>>);

impl State {
    /// Queues the durable write of a task record with its effects; publishes the new state
    /// as an event once durable. The history keys it implies (see [`history`]) go in the
    /// same commit: a new task's `live/`, index and idempotency keys; a final one's `done/`
    /// key and `live/` delete. A task that becomes final enters the finished cache and
    /// leaves memory once that write is durable and newer ones push it out.
    ///
    /// Takes the task by value: it is encoded once and then becomes the event's snapshot
    /// (no copy of the task, with all its attempts, per transition beyond the caller's).
    pub(crate) async fn persist_task(&mut self, task: Task, mut effects: Vec<Effect>) {
        let (key, value, also) = self.task_write(&task, &mut effects);
        self.publish_when_durable(task, &mut effects);
        self.write_with(key, Some(value), also, effects).await;
    }

    /// [`persist_task`](Self::persist_task) for a task the caller keeps: copied only when
    /// somebody watches.
    pub(crate) async fn persist_task_ref(&mut self, task: &Task, mut effects: Vec<Effect>) {
        let (key, value, also) = self.task_write(task, &mut effects);
        if self.events.receiver_count() > 0 {
            self.publish_when_durable(task.clone(), &mut effects);
        }
        self.write_with(key, Some(value), also, effects).await;
    }

    /// [`persist_task_ref`](Self::persist_task_ref) of the task `id` in the table, as it is
    /// now: no copy of the task at all unless somebody watches. (The record is moved out
    /// of its entry while it is encoded and back in afterwards; nothing reads it between.)
    pub(crate) async fn persist_entry(&mut self, id: &str, effects: Vec<Effect>) {
        let Some(task) = self.tasks.get_mut(id).map(|e| std::mem::take(&mut e.task)) else {
            return;
        };
        self.persist_task_ref(&task, effects).await;
        if let Some(e) = self.tasks.get_mut(id) {
            e.task = task;
        }
    }

    /// A task record's key, value and the history keys it implies (see `persist_task`).
    fn task_write(
        &mut self,
        task: &Task,
        effects: &mut Vec<Effect>,
    ) -> (String, Vec<u8>, Vec<Also>) {
        self.running_unwritten.written(&task.id);
        if !task.workflow_id.is_empty() && !self.wf_dirty.contains(&task.workflow_id) {
            self.wf_dirty.insert(task.workflow_id.clone());
        }
        // `enqueue_new` persists a task before it enters the table: the only new records.
        let mut also = if self.tasks.contains_key(&task.id) {
            Vec::new()
        } else {
            history::submit_ops(task)
        };
        if scabbard_common::is_final(task.state()) {
            let (seq, durable) = self.durability.track();
            effects.push(durable);
            let earlier = self.finished.finished(&task.id, task.updated_at_ms, seq);
            let keep_live = self.archive.is_some() && history::log_pending(task);
            also.extend(history::final_ops(task, earlier, keep_live));
        }
        let key = format!("{TASK_PREFIX}{}", task.id);
        (key, task.encode_to_vec(), also)
    }

    /// Publishes `task` as an event once its write is durable; nobody watching (no Watch
    /// stream), nothing to publish.
    fn publish_when_durable(&self, task: Task, effects: &mut Vec<Effect>) {
        if self.events.receiver_count() == 0 {
            return;
        }
        let snapshot = Arc::new(task);
        let events = self.events.clone();
        effects.push(Box::new(move |r| {
            if r.is_ok() {
                let _ = events.send(snapshot);
            }
        }));
    }

    /// Drops the oldest finished tasks past `finished_cache_tasks` whose final record is
    /// durable (they are served from the store from then on). Tasks of a running workflow
    /// stay until it ends (it reads them to advance).
    pub(crate) fn evict_finished(&mut self) {
        let cap = self.cfg.finished_cache_tasks;
        let mut pinned = Vec::new();
        while let Some(id) = self.finished.pop_evictable(cap, &self.durability) {
            let Some(e) = self.tasks.get(&id) else {
                continue;
            };
            if !scabbard_common::is_final(e.task.state()) {
                continue;
            }
            // A log still to be archived: the archive path and a worker's replay after a
            // reconnect need the task in memory (it leaves once the archive is recorded).
            let log_pending = self.archive.is_some() && history::log_pending(&e.task);
            if log_pending
                || (!e.task.workflow_id.is_empty() && self.wf_active.contains(&e.task.workflow_id))
            {
                pinned.push((id, e.task.updated_at_ms));
                continue;
            }
            self.tasks.remove(&id);
        }
        // Back at the end of the line: they leave after their workflow has ended.
        for (id, ms) in pinned {
            self.finished.finished(&id, ms, 0);
        }
    }

    /// Sends the writes staged this turn to the persister (see [`Persister::stage`]).
    ///
    /// [`Persister::stage`]: super::persist::Persister::stage
    pub(crate) async fn flush_writes(&self) {
        if let Err(e) = self.persister.flush().await {
            warn!(error = %e, "dropping writes: persister gone");
        }
    }

    /// Runs `effects` once everything written so far is durable (they state it).
    pub(crate) async fn after_durable(&self, effects: Vec<Effect>) {
        if let Err(e) = self.persister.write(Write::barrier(effects)).await {
            warn!(error = %e, "dropping an answer: persister gone");
        }
    }

    pub(crate) async fn write(&self, key: String, value: Option<Vec<u8>>, effects: Vec<Effect>) {
        self.write_with(key, value, Vec::new(), effects).await
    }

    /// An audit entry, staged with the writes of this turn (so it lands in their commit).
    /// A refusal of it is logged, never held against a task (see `on_write_refused`).
    pub(crate) async fn write_audit(&self, e: &scabbard_common::proto::AuditEntry) {
        if let crate::store::Op::Put { key, value, .. } = crate::audit::op(e) {
            self.write_with(key, Some(value), Vec::new(), Vec::new())
                .await;
        }
    }

    /// [`write`](Self::write) with more keys in the same commit.
    pub(crate) async fn write_with(
        &self,
        key: String,
        value: Option<Vec<u8>>,
        also: Vec<(String, Option<Vec<u8>>)>,
        effects: Vec<Effect>,
    ) {
        if let Err(e) = self
            .persister
            .write(Write {
                key,
                value,
                also,
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
