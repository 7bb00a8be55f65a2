//! The end of an attempt: recording a result (or refusing a stale one), retrying by the
//! task's policy after a backoff (state RETRY_WAIT, released by a timer), requeueing after
//! infrastructure failures within their separate bound, and feeding circuit breakers. A
//! success serves the artifacts its attempt recorded (a required one missing is an
//! infrastructure failure); the uploads of attempts that end any other way are deleted.

use scabbard_common::is_final;
use scabbard_common::proto::{
    self, ControllerMessage, ErrorClass, Outcome, TaskResult, TaskSpec, TaskState,
    controller_message,
};
use scabbard_common::time::now_ms;
use tracing::info;

use super::breakers::{agent_key, task_keys};
use super::validate::size;
use super::{Effect, State, agent_effect, archive, artifacts, retry};

impl State {
    /// Records an attempt's result, or tells the agent its report is stale.
    pub(super) async fn on_finished(&mut self, agent_id: &str, f: proto::Finished) {
        let tx = self
            .agents
            .get(agent_id)
            .and_then(|a| a.conn.as_ref())
            .map(|c| c.tx.clone());
        let ack = |stale: bool| ControllerMessage {
            msg: Some(controller_message::Msg::Ack(proto::Ack {
                task_id: f.task_id.clone(),
                fencing_token: f.fencing_token,
                next_seq: f.log_chunks,
                result: !stale,
                stale,
                archived: false,
            })),
        };
        if self
            .current_attempt(&f.task_id, f.fencing_token, agent_id)
            .is_none()
        {
            // Already recorded (a replay after reconnect: the attempt holds this very
            // result) → ack; otherwise stale.
            let recorded = self.tasks.get(&f.task_id).and_then(|e| {
                let last = e.task.attempts.last();
                e.task.attempts.iter().rev().find(|a| {
                    a.fencing_token == f.fencing_token
                        && a.agent_id == agent_id
                        && match (&a.result, &f.result) {
                            // The last attempt, kept as sent or as its oversized form was
                            // recorded.
                            (Some(kept), Some(sent))
                                if last.is_some_and(|l| std::ptr::eq(l, *a)) =>
                            {
                                artifacts::same_report(kept, sent)
                                    || artifacts::same_report(
                                        kept,
                                        &size::fit_result(sent.clone(), &self.cfg),
                                    )
                                    || a.log_chunks > 0
                            }
                            // Any attempt whose result came from its worker with a log
                            // (`log_chunks` is set from a `Finished` only, never for an
                            // attempt the controller gave up on): its log is wanted.
                            (Some(_), Some(_)) => a.log_chunks > 0,
                            _ => false,
                        }
                })
            });
            let archived = recorded.map(|a| !a.log_archive.is_empty() || a.log_chunks == 0);
            let recorded = recorded.is_some();
            if !recorded {
                info!(task = %f.task_id, token = f.fencing_token, agent = agent_id, "rejected a stale result");
                // What that attempt uploaded will never be served.
                if let Some(t) = self.tasks.get(&f.task_id).map(|e| &e.task)
                    && t.attempts
                        .iter()
                        .any(|a| a.fencing_token == f.fencing_token && a.agent_id == agent_id)
                {
                    let refs = self.unreferenced_uploads(t, f.fencing_token);
                    self.discard_uploads(&refs);
                }
            }
            // Whether recorded or stale, the verdict rests on state that may still be on
            // its way to the store.
            if let Some(tx) = tx {
                let effect = if archived == Some(true) {
                    agent_effect(
                        tx,
                        archive::result_ack(&f.task_id, f.fencing_token, f.log_chunks, true),
                    )
                } else if recorded {
                    // A replay: its log may not be synced or archived yet (a seal that
                    // failed before, or a new leader that got the chunks from the spool).
                    archive::after_result(
                        self.log_ctx(),
                        &f.task_id,
                        f.fencing_token,
                        f.log_chunks,
                        Some(tx),
                    )
                } else {
                    agent_effect(tx, ack(true))
                };
                self.after_durable(vec![effect]).await;
            }
            return;
        }
        let result = f.result.clone().unwrap_or(TaskResult {
            outcome: Outcome::Failed as i32,
            message: "the agent reported no result".into(),
            error_class: ErrorClass::Infrastructure as i32,
            ..Default::default()
        });
        // A result over the size limits is recorded as a small failure saying so: the
        // record stays within the store's value limit and the agent gets its ack.
        let result = size::fit_result(result, &self.cfg);
        // A success serves what the attempt recorded; a required artifact it did not
        // upload makes it an infrastructure failure.
        let result = self.with_recorded_artifacts(&f.task_id, result);
        if result.error_class() == ErrorClass::Infrastructure && result.outcome() == Outcome::Failed
        {
            let msg = format!(
                "infrastructure failure on agent {agent_id}: {}",
                result.message
            );
            if let Some(a) = self
                .tasks
                .get_mut(&f.task_id)
                .and_then(|e| e.task.attempts.last_mut())
            {
                a.log_chunks = f.log_chunks;
            }
            self.requeue_or_fail(&f.task_id, &msg).await;
            let effect = archive::after_result(
                self.log_ctx(),
                &f.task_id,
                f.fencing_token,
                f.log_chunks,
                tx,
            );
            self.after_durable(vec![effect]).await;
            return;
        }
        let now = now_ms();
        let Some(entry) = self.tasks.get_mut(&f.task_id) else {
            return;
        };
        let t = &mut entry.task;
        // Successes only matter to breakers that exist: skip the keys on the hot path.
        let keys = if result.outcome() == Outcome::Succeeded && self.breakers.is_empty() {
            Vec::new()
        } else {
            breaker_keys(t.spec.as_ref(), &t.project, agent_id)
        };
        let mut state = match result.outcome() {
            Outcome::Succeeded => TaskState::Succeeded,
            Outcome::Cancelled => TaskState::Cancelled,
            Outcome::TimedOut => TaskState::TimedOut,
            Outcome::Failed | Outcome::Unspecified => TaskState::Failed,
        };
        let mut retry_at = None;
        if matches!(state, TaskState::Failed | TaskState::TimedOut) {
            t.user_failures += 1;
            if !t.cancel_requested
                && let Some(delay) = retry::user_retry(
                    t.spec.as_ref().and_then(|s| s.retry.as_ref()),
                    &result,
                    t.user_failures,
                )
            {
                state = TaskState::RetryWait;
                retry_at = Some(now + delay.as_millis() as i64);
            }
        }
        t.state = state as i32;
        t.updated_at_ms = now;
        let attempt = t.fencing_token as u32;
        if let Some(a) = t.attempts.last_mut() {
            a.finished_at_ms = now;
            a.result = Some(result.clone());
            // Logs before a report are stored before the core sees the report.
            a.log_bytes = self.logs.cached_bytes(&f.task_id, attempt).unwrap_or(0);
            a.log_chunks = f.log_chunks;
        }
        compact_earlier_attempts(t);
        t.agent_id.clear();
        match retry_at {
            Some(at) => {
                t.retry_at_ms = at;
                self.retry_timers.insert((at, f.task_id.clone()));
                info!(task = %f.task_id, attempt, retry_in_ms = at - now, "attempt failed; retrying after backoff");
            }
            None => {
                t.result = Some(result.clone());
                crate::metrics::task_finished(state, t.created_at_ms, now);
            }
        }
        super::trace::after_attempt(t);
        if let Some(a) = self.agents.get_mut(agent_id) {
            a.running.remove(&f.task_id);
            self.placement.sync_running(agent_id, a);
        }
        let discard = if result.outcome() == Outcome::Succeeded {
            None
        } else {
            self.tasks.get(&f.task_id).and_then(|e| {
                self.discard_effect(self.unreferenced_uploads(&e.task, f.fencing_token))
            })
        };
        match retry::class_of(&result) {
            None if result.outcome() == Outcome::Succeeded => {
                keys.iter().for_each(|k| self.breakers.success(k));
            }
            None => keys.iter().for_each(|k| self.breakers.release(k)),
            Some(_) => {
                // The task's own failure (exit code, timeout: infrastructure failures went
                // to `requeue_or_fail`) blames what it names (its project's breakers),
                // never the agent it ran on; the agent's probe slot, if it was one, is freed.
                let why = format!("task {} attempt {attempt}: {}", f.task_id, result.message);
                let agent = agent_key(agent_id);
                for k in &keys {
                    if *k == agent {
                        self.breakers.release(k);
                    } else {
                        self.breakers.failure(k, &why, now);
                    }
                }
            }
        }
        let mut effects: Vec<Effect> = Vec::new();
        // The ack goes out once the log is on disk; the worker drops its spool once the
        // log is archived and that recorded (see `archive`).
        effects.push(archive::after_result(
            self.log_ctx(),
            &f.task_id,
            f.fencing_token,
            f.log_chunks,
            tx,
        ));
        effects.extend(discard);
        // Breaker changes first: durable no later than the result that caused them.
        self.flush_breakers().await;
        self.persist_entry(&f.task_id, effects).await;
    }

    /// An attempt failed for a reason that is not the task's fault: requeue (after the
    /// policy's backoff, if it has one), or give up past the bound, or finish as cancelled
    /// when that was asked.
    pub(crate) async fn requeue_or_fail(&mut self, task_id: &str, why: &str) {
        let default_max = self.cfg.default_max_infra_retries;
        let Some(entry) = self.tasks.get_mut(task_id) else {
            return;
        };
        let t = &mut entry.task;
        if is_final(t.state()) || t.state() == TaskState::RetryWait {
            return;
        }
        let now = now_ms();
        // Agents' messages are bounded by max_result_bytes; the record keeps less.
        let why = &size::cut(why, 4 * size::ATTEMPT_MESSAGE_BYTES);
        let failure = TaskResult {
            outcome: Outcome::Failed as i32,
            message: why.to_string(),
            error_class: ErrorClass::Infrastructure as i32,
            ..Default::default()
        };
        if let Some(a) = t.attempts.last_mut().filter(|a| a.result.is_none()) {
            a.finished_at_ms = now;
            a.result = Some(failure.clone());
            if let Some(bytes) = self.logs.cached_bytes(task_id, a.fencing_token as u32) {
                a.log_bytes = bytes;
            }
        }
        compact_earlier_attempts(t);
        let old_agent = std::mem::take(&mut t.agent_id);
        t.infra_failures += 1;
        t.updated_at_ms = now;
        let policy = t.spec.as_ref().and_then(|s| s.retry.as_ref());
        let max = retry::max_infra(
            policy,
            t.spec.as_ref().and_then(|s| s.max_infra_retries),
            default_max,
        );
        if t.cancel_requested {
            t.state = TaskState::Cancelled as i32;
            t.result = Some(TaskResult {
                outcome: Outcome::Cancelled as i32,
                message: format!("cancelled (attempt ended by: {why})"),
                ..Default::default()
            });
        } else if t.infra_failures > max {
            t.state = TaskState::Failed as i32;
            t.result = Some(TaskResult {
                message: format!(
                    "gave up after {} infrastructure failures; last: {why}",
                    t.infra_failures
                ),
                ..failure
            });
        } else if let Some(delay) = retry::infra_delay(policy, t.infra_failures) {
            let at = now + delay.as_millis() as i64;
            t.state = TaskState::RetryWait as i32;
            t.retry_at_ms = at;
            self.retry_timers.insert((at, task_id.to_string()));
        } else {
            t.state = TaskState::Queued as i32;
            let prio = t.spec.as_ref().map_or(0, |s| s.priority);
            entry.queue_key = Some(self.queue.push(task_id, prio, &t.project, t.spec.as_ref()));
        }
        info!(task = task_id, agent = %old_agent, state = ?entry.task.state(), why, "attempt lost");
        let task = entry.task.clone();
        super::trace::after_attempt(&task);
        if !old_agent.is_empty() {
            // The agent failed, not the task's dependencies.
            for k in breaker_keys(task.spec.as_ref(), &task.project, &old_agent) {
                if k == agent_key(&old_agent) {
                    self.breakers.failure(&k, why, now);
                } else {
                    self.breakers.release(&k);
                }
            }
        }
        if let Some(a) = self.agents.get_mut(&old_agent) {
            a.running.remove(task_id);
            self.placement.sync_running(&old_agent, a);
        }
        // The ended attempt's uploads will never be served.
        let discard = task
            .attempts
            .last()
            .and_then(|a| self.discard_effect(self.unreferenced_uploads(&task, a.fencing_token)));
        // Breaker changes first: durable no later than the result that caused them.
        self.flush_breakers().await;
        self.persist_task(task, discard.into_iter().collect()).await;
    }

    /// Puts tasks whose retry backoff has passed back in the queue.
    pub(crate) async fn release_due_retries(&mut self) {
        let now = now_ms();
        while let Some((at, id)) = self.retry_timers.first().cloned() {
            if at > now {
                break;
            }
            self.retry_timers.pop_first();
            let Some(entry) = self.tasks.get_mut(&id) else {
                continue;
            };
            let t = &mut entry.task;
            if t.state() != TaskState::RetryWait || t.retry_at_ms != at {
                continue; // cancelled meanwhile, or a newer timer
            }
            t.state = TaskState::Queued as i32;
            t.retry_at_ms = 0;
            t.updated_at_ms = now;
            let prio = t.spec.as_ref().map_or(0, |s| s.priority);
            entry.queue_key = Some(self.queue.push(&id, prio, &t.project, t.spec.as_ref()));
            let task = t.clone();
            self.persist_task(task, Vec::new()).await;
        }
    }
}

/// Every attempt but the last keeps only a short message and no outputs, so a task record
/// stays bounded however many attempts it takes (the last one, and the task's result, are
/// kept whole).
fn compact_earlier_attempts(t: &mut proto::Task) {
    let n = t.attempts.len();
    for a in t.attempts.iter_mut().take(n.saturating_sub(1)) {
        if let Some(r) = a.result.as_mut() {
            size::compact_attempt_result(r);
        }
    }
}

/// The breakers an attempt of `spec` (a task of `project`) on `agent_id` goes through.
fn breaker_keys(spec: Option<&TaskSpec>, project: &str, agent_id: &str) -> Vec<String> {
    task_keys(spec, project)
        .chain([agent_key(agent_id)])
        .collect()
}
