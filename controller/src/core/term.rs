//! What a leadership term owns beyond its state: its number, persisted so that fencing
//! tokens are never issued twice (`term << 32 | attempt`), and the end of a record the store
//! refused on its own (the rest of its batch committed): a task whose record cannot be
//! stored ends FAILED with a small record that says why; anything else ends the term.

use scabbard_common::proto::{
    ControllerMessage, ErrorClass, Outcome, TaskResult, TaskState, controller_message,
};
use scabbard_common::time::now_ms;
use scabbard_common::{Error, Result};
use tracing::{error, warn};

use super::persist::{Fence, Refused};
use super::{State, TASK_PREFIX, agent_effect};
use crate::store::{Compare, Op, Store, Txn};

/// Store key of the last term's number (decimal).
pub(crate) const TERM_KEY: &str = "meta/term";

/// Longest message kept on an attempt of a task whose record had to be shrunk.
const KEPT_MESSAGE_BYTES: usize = 4 * 1024;

/// The fencing token of attempt `number` in `term`. The low half is the attempt number, so
/// `token as u32` reads it back.
pub(crate) fn fencing_token(term: u64, number: u32) -> u64 {
    (term << 32) | u64::from(number)
}

/// Reads the last term's number and durably claims the next one (under the leader's
/// fence). Two claims of the same number cannot both succeed.
pub(super) async fn next_term(store: &dyn Store, fence: Option<&Fence>) -> Result<u64> {
    let (last, revision) = match store.get(TERM_KEY).await? {
        Some(kv) => {
            let text = String::from_utf8_lossy(&kv.value);
            let n = text
                .trim()
                .parse::<u64>()
                .map_err(|e| Error::internal(format!("corrupt {TERM_KEY} record {text:?}: {e}")))?;
            (n, kv.mod_revision)
        }
        None => (0, 0),
    };
    let next = last + 1;
    if next >= 1 << 31 {
        return Err(Error::internal(format!(
            "{TERM_KEY} reached {last}: fencing tokens would overflow"
        )));
    }
    let mut compares: Vec<Compare> = fence.iter().map(|f| f.compare.clone()).collect();
    compares.push(Compare::mod_revision(TERM_KEY, revision));
    let r = store
        .txn(Txn {
            compares,
            success: vec![Op::put(TERM_KEY, next.to_string().into_bytes())],
            failure: Vec::new(),
        })
        .await?;
    if !r.succeeded {
        return Err(Error::Unavailable(
            "another term started while this one was claiming its number".into(),
        ));
    }
    Ok(next)
}

impl State {
    /// The store refused one write of ours on its own.
    pub(super) async fn on_write_refused(&mut self, refused: Refused) {
        if refused.key.starts_with(crate::audit::AUDIT_PREFIX) {
            warn!(key = %refused.key, reason = %refused.reason, "the store refused an audit entry; it is not recorded");
            return;
        }
        let Some(id) = refused.key.strip_prefix(TASK_PREFIX).map(str::to_string) else {
            error!(key = %refused.key, reason = %refused.reason, "a record the store refused is not a task's: ending the term so the next one rebuilds from the store");
            self.term_over.cancel();
            return;
        };
        if !self.tasks.contains_key(&id) {
            return; // forgotten after an earlier refusal: this was a later write of it
        }
        match self.unstorable.get(&id) {
            Some(&shrunk) if shrunk == refused.bytes => {
                error!(task = %id, reason = %refused.reason, "even the shrunk record was refused: ending the term");
                self.term_over.cancel();
                return;
            }
            // A write queued before the shrunk record, which supersedes it.
            Some(_) => return,
            None => {}
        }
        let stored = match self.store.get(&refused.key).await {
            Ok(kv) => kv.is_some(),
            Err(e) => {
                error!(task = %id, error = %e, "cannot read back a refused task record: ending the term");
                self.term_over.cancel();
                return;
            }
        };
        let in_workflow = self
            .tasks
            .get(&id)
            .is_some_and(|e| !e.task.workflow_id.is_empty());
        if !stored && !in_workflow {
            // Never written: its submitter was told so; forget it.
            warn!(task = %id, reason = %refused.reason, "a new task's record was refused; forgetting it");
            self.forget(&id);
            return;
        }
        self.fail_unstorable(&id, &refused).await;
    }

    /// Drops every trace of a task that was never stored.
    fn forget(&mut self, id: &str) {
        let Some(entry) = self.tasks.remove(id) else {
            return;
        };
        if let Some(k) = entry.queue_key {
            self.queue.remove(&k);
        }
        self.idempotency.forget_task(id);
        self.finished.remove(id);
        self.retry_timers.retain(|(_, t)| t != id);
        for (agent_id, a) in self.agents.iter_mut() {
            if a.running.remove(id) {
                self.placement.sync_running(agent_id, a);
            }
        }
    }

    /// Ends the task FAILED with a record small enough to store: outputs dropped, messages
    /// cut, the reason in its result. Its live attempt, if any, is cancelled; a worker that
    /// reported the result gets its ack.
    async fn fail_unstorable(&mut self, id: &str, refused: &Refused) {
        let Some(entry) = self.tasks.get_mut(id) else {
            return;
        };
        if let Some(k) = entry.queue_key.take() {
            self.queue.remove(&k);
        }
        self.retry_timers.retain(|(_, t)| t != id);
        let t = &mut entry.task;
        let live_agent = std::mem::take(&mut t.agent_id);
        let token = t.fencing_token;
        for a in &mut t.attempts {
            if let Some(r) = a.result.as_mut() {
                shrink(r);
            }
        }
        let message = format!(
            "the task's record ({} bytes) could not be stored (the store refused it: {}); its outputs were dropped",
            refused.bytes, refused.reason
        );
        if t.spec
            .as_ref()
            .is_some_and(|s| prost::Message::encoded_len(s) > self.store.max_value_bytes() / 2)
        {
            t.spec = None;
        }
        t.state = TaskState::Failed as i32;
        t.updated_at_ms = now_ms();
        t.retry_at_ms = 0;
        t.result = Some(TaskResult {
            outcome: Outcome::Failed as i32,
            error_class: ErrorClass::User as i32,
            message: message.clone(),
            ..Default::default()
        });
        warn!(task = id, %message, "task failed: its record could not be stored");
        let mut effects = Vec::new();
        let last_agent = t.attempts.last().map(|a| a.agent_id.clone());
        if !live_agent.is_empty() {
            if let Some(conn) = self.agents.get(&live_agent).and_then(|a| a.conn.as_ref()) {
                effects.push(agent_effect(
                    conn.tx.clone(),
                    ControllerMessage {
                        msg: Some(controller_message::Msg::Cancel(
                            scabbard_common::proto::CancelAttempt {
                                task_id: id.to_string(),
                                fencing_token: token,
                                reason: message.clone(),
                            },
                        )),
                    },
                ));
            }
        } else if let Some(agent) = last_agent
            && let Some(conn) = self.agents.get(&agent).and_then(|a| a.conn.as_ref())
        {
            // The worker reported this attempt's result: it may drop its spool now.
            effects.push(agent_effect(
                conn.tx.clone(),
                ControllerMessage {
                    msg: Some(controller_message::Msg::Ack(scabbard_common::proto::Ack {
                        task_id: id.to_string(),
                        fencing_token: token,
                        next_seq: 0,
                        result: true,
                        stale: false,
                        archived: true,
                    })),
                },
            ));
        }
        for (agent_id, a) in self.agents.iter_mut() {
            if a.running.remove(id) {
                self.placement.sync_running(agent_id, a);
            }
        }
        let task = self.tasks.get(id).expect("present").task.clone();
        let bytes = refused.key.len() + prost::Message::encoded_len(&task);
        self.unstorable.insert(id.to_string(), bytes);
        self.persist_task(task, effects).await;
    }
}

/// Drops what makes a result big: outputs, artifacts, and all but the start of its message.
fn shrink(r: &mut TaskResult) {
    r.outputs.clear();
    r.artifacts.clear();
    if r.message.len() > KEPT_MESSAGE_BYTES {
        let mut cut = KEPT_MESSAGE_BYTES;
        while !r.message.is_char_boundary(cut) {
            cut -= 1;
        }
        r.message.truncate(cut);
        r.message.push_str(" … (cut)");
    }
}
