//! Task transitions. The table, enforced here and nowhere else:
//!
//! | from              | event                         | to                                   |
//! |-------------------|-------------------------------|--------------------------------------|
//! | (new)             | submit                        | QUEUED                               |
//! | QUEUED            | scheduled on an agent         | ASSIGNED (new attempt, new token)    |
//! | QUEUED            | cancel                        | CANCELLED                            |
//! | ASSIGNED          | agent accepted                | RUNNING                              |
//! | ASSIGNED, RUNNING | agent finished (current token)| SUCCEEDED, FAILED, CANCELLED, TIMED_OUT |
//! | ASSIGNED, RUNNING | cancel                        | (same, cancel requested; agent told) |
//! | ASSIGNED, RUNNING | agent lost / rejected / infra | QUEUED, or FAILED past the retry bound, or CANCELLED if requested |
//!
//! Reports carrying any other fencing token than the task's current one are stale and
//! rejected.

use std::collections::HashMap;

use scabbard_common::proto::{
    self, AttemptRecord, CancelAttempt, ControllerMessage, ErrorClass, ListTasksRequest, Outcome,
    Task, TaskResult, TaskSpec, TaskState, controller_message,
};
use scabbard_common::time::now_ms;
use scabbard_common::{Error, Result, is_final};
use tracing::{debug, info};

use super::scheduler::{self, Candidate};
use super::{Effect, Reply, State, TaskEntry, agent_effect, reply_effect, validate};

impl State {
    pub(super) async fn submit(
        &mut self,
        mut spec: TaskSpec,
        key: String,
        project: String,
        reply: Reply<(Task, bool)>,
    ) {
        if let Err(e) = validate::task_spec(&mut spec, &self.cfg) {
            let _ = reply.send(Err(e));
            return;
        }
        // From here on (store, memory, events) secret values exist only sealed.
        if let Err(e) = self.secrets.seal_spec(&mut spec) {
            let _ = reply.send(Err(e));
            return;
        }
        if key.len() > 256 {
            let _ = reply.send(Err(Error::invalid(
                "idempotency_key is longer than 256 bytes",
            )));
            return;
        }
        // Idempotency keys are per project: two tenants may use the same key.
        let key_in_project = super::idempotency_key(&project, &key);
        if !key.is_empty()
            && let Some(entry) = self
                .idempotency
                .get(&key_in_project)
                .and_then(|id| self.tasks.get(id))
        {
            let _ = reply.send(Ok((entry.task.clone(), true)));
            return;
        }
        let quota = self.catalog.quota(&project);
        if quota.max_queued_tasks > 0 && self.queue.queued_in(&project) >= quota.max_queued_tasks {
            let _ = reply.send(Err(Error::ResourceExhausted(format!(
                "project {project:?} has {} tasks queued, its quota (max_queued_tasks); retry when some have started",
                quota.max_queued_tasks
            ))));
            return;
        }
        if self.queue.len() >= self.cfg.max_queued_tasks {
            let _ = reply.send(Err(Error::ResourceExhausted(format!(
                "the queue holds {} tasks, the configured maximum (max_queued_tasks); retry later",
                self.queue.len()
            ))));
            return;
        }
        let id = match self.ids.generate() {
            Ok(u) => u.to_string().to_lowercase(),
            Err(e) => {
                let _ = reply.send(Err(Error::internal(e)));
                return;
            }
        };
        let now = now_ms();
        let priority = spec.priority;
        let task = Task {
            id: id.clone(),
            spec: Some(spec),
            state: TaskState::Queued as i32,
            created_at_ms: now,
            updated_at_ms: now,
            idempotency_key: key.clone(),
            project: project.clone(),
            ..Default::default()
        };
        if !key.is_empty() {
            self.idempotency.insert(key_in_project, id.clone());
        }
        let queue_key = Some(self.queue.push(&id, priority, &project));
        self.persist_task(&task, vec![reply_effect(reply, (task.clone(), false))])
            .await;
        self.tasks.insert(id, TaskEntry { task, queue_key });
    }

    pub(super) fn list(&self, req: &ListTasksRequest) -> Result<(Vec<Task>, String)> {
        let size = match req.page_size {
            0 => 100,
            n if n <= 1000 => n as usize,
            n => return Err(Error::invalid(format!("page_size {n} is larger than 1000"))),
        };
        let upper = if req.page_token.is_empty() {
            std::ops::Bound::Unbounded
        } else {
            validate::id("page_token", &req.page_token)?;
            std::ops::Bound::Excluded(req.page_token.clone())
        };
        let mut out = Vec::with_capacity(size);
        let mut next = String::new();
        for (id, e) in self.tasks.range((std::ops::Bound::Unbounded, upper)).rev() {
            let t = &e.task;
            if !req.project.is_empty() && t.project != req.project {
                continue;
            }
            if !req.states.is_empty() && !req.states.contains(&t.state) {
                continue;
            }
            let labels = t.spec.as_ref().map(|s| &s.labels);
            if !req
                .labels
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            {
                continue;
            }
            if out.len() == size {
                next = out.last().map(|t: &Task| t.id.clone()).unwrap_or_default();
                break;
            }
            let _ = id;
            out.push(t.clone());
        }
        Ok((out, next))
    }

    pub(super) async fn cancel(&mut self, id: String, reason: String, reply: Reply<Task>) {
        let Some(entry) = self.tasks.get_mut(&id) else {
            let _ = reply.send(Err(Error::not_found("task", id)));
            return;
        };
        let state = entry.task.state();
        if is_final(state) {
            let _ = reply.send(Err(Error::FailedPrecondition(format!(
                "task {id} is already {}; only queued or running tasks can be cancelled",
                state.as_str_name().trim_start_matches("TASK_STATE_")
            ))));
            return;
        }
        let reason = if reason.is_empty() {
            "cancelled by request".to_string()
        } else {
            reason
        };
        let now = now_ms();
        entry.task.updated_at_ms = now;
        let mut effects = Vec::new();
        match state {
            TaskState::Assigned | TaskState::Running => {
                entry.task.cancel_requested = true;
                let agent = entry.task.agent_id.clone();
                let msg = ControllerMessage {
                    msg: Some(controller_message::Msg::Cancel(CancelAttempt {
                        task_id: id.clone(),
                        fencing_token: entry.task.fencing_token,
                        reason: reason.clone(),
                    })),
                };
                if let Some(conn) = self.agents.get(&agent).and_then(|a| a.conn.as_ref()) {
                    effects.push(agent_effect(conn.tx.clone(), msg));
                }
            }
            _ => {
                if let Some(k) = entry.queue_key.take() {
                    self.queue.remove(&k);
                }
                entry.task.state = TaskState::Cancelled as i32;
                entry.task.result = Some(TaskResult {
                    outcome: Outcome::Cancelled as i32,
                    message: reason,
                    ..Default::default()
                });
            }
        }
        let task = entry.task.clone();
        effects.insert(0, reply_effect(reply, task.clone()));
        self.persist_task(&task, effects).await;
    }

    /// Hands queued tasks to agents with free slots.
    pub(crate) async fn schedule(&mut self) {
        if self.queue.len() == 0 {
            return;
        }
        let mut extra: HashMap<&str, u32> = HashMap::new();
        let mut free: u32 = self
            .agents
            .values()
            .filter(|a| a.conn.is_some() && !a.lost && !agent_draining(a))
            .map(|a| agent_slots(a).saturating_sub(a.running.len() as u32))
            .sum();
        if free == 0 {
            return;
        }
        let mut plan: Vec<(super::scheduler::QueueKey, String)> = Vec::new();
        let mut unplaceable = 0usize;
        // Projects with a running-task quota, and how many of their tasks hold a slot.
        let mut limits: HashMap<String, Option<(u32, u32)>> = HashMap::new();
        for key in self.queue.iter() {
            if free == 0 || unplaceable > 10_000 {
                break;
            }
            let Some(task) = self.tasks.get(&key.2).map(|e| &e.task) else {
                continue;
            };
            let Some(spec) = task.spec.as_ref() else {
                continue;
            };
            let limit = limits.entry(task.project.clone()).or_insert_with(|| {
                let max = self.catalog.quota(&task.project).max_running_tasks;
                (max > 0).then(|| (max, self.active_in(&task.project)))
            });
            if let Some((max, active)) = limit
                && *active >= *max
            {
                unplaceable += 1;
                continue;
            }
            let candidates = self
                .agents
                .iter()
                .filter(|(_, a)| a.conn.is_some() && !a.lost && !agent_draining(a))
                .filter_map(|(id, a)| {
                    let ag = a.stored.agent.as_ref()?;
                    Some(Candidate {
                        id: id.as_str(),
                        capabilities: &ag.capabilities,
                        labels: &ag.labels,
                        slots: ag.slots,
                        running: a.running.len() as u32
                            + extra.get(id.as_str()).copied().unwrap_or(0),
                    })
                });
            match scheduler::pick(spec, candidates) {
                Some(agent) => {
                    if let Some((_, active)) = limit {
                        *active += 1;
                    }
                    *extra.entry(agent).or_default() += 1;
                    free -= 1;
                    plan.push((key.clone(), agent.to_string()));
                }
                None => unplaceable += 1,
            }
        }
        for (key, agent) in plan {
            self.queue.remove(&key);
            self.assign(&key.2, &agent).await;
        }
    }

    /// Tasks of `project` holding an agent slot (assigned or running).
    fn active_in(&self, project: &str) -> u32 {
        self.agents
            .values()
            .flat_map(|a| a.running.iter())
            .filter(|id| {
                self.tasks
                    .get(*id)
                    .is_some_and(|e| e.task.project == project)
            })
            .count() as u32
    }

    async fn assign(&mut self, task_id: &str, agent_id: &str) {
        let (Some(entry), Some(agent)) =
            (self.tasks.get_mut(task_id), self.agents.get_mut(agent_id))
        else {
            return;
        };
        let Some(conn) = agent.conn.as_ref() else {
            return;
        };
        // The worker gets the secret values in the clear; nothing else ever does.
        let mut spec = entry.task.spec.clone();
        if let Some(Err(e)) = spec.as_mut().map(|s| self.secrets.unseal_spec(s)) {
            self.fail_unassignable(task_id, &e.to_string()).await;
            return;
        }
        let now = now_ms();
        let t = &mut entry.task;
        entry.queue_key = None;
        let number = t.attempts.len() as u32 + 1;
        t.attempts.push(AttemptRecord {
            number,
            fencing_token: number as u64,
            agent_id: agent_id.to_string(),
            assigned_at_ms: now,
            ..Default::default()
        });
        t.fencing_token = number as u64;
        t.agent_id = agent_id.to_string();
        t.state = TaskState::Assigned as i32;
        t.updated_at_ms = now;
        agent.running.insert(task_id.to_string());
        let msg = ControllerMessage {
            msg: Some(controller_message::Msg::Assign(proto::Assign {
                task_id: task_id.to_string(),
                fencing_token: number as u64,
                attempt: number,
                spec,
            })),
        };
        debug!(
            task = task_id,
            agent = agent_id,
            attempt = number,
            "assigned"
        );
        let effects = vec![agent_effect(conn.tx.clone(), msg)];
        let task = t.clone();
        self.persist_task(&task, effects).await;
    }

    /// Fails a task taken off the queue that no agent can ever be given (its secrets cannot
    /// be opened with this controller's key).
    async fn fail_unassignable(&mut self, task_id: &str, why: &str) {
        let Some(entry) = self.tasks.get_mut(task_id) else {
            return;
        };
        entry.queue_key = None;
        let t = &mut entry.task;
        t.state = TaskState::Failed as i32;
        t.updated_at_ms = now_ms();
        t.result = Some(TaskResult {
            outcome: Outcome::Failed as i32,
            message: format!("cannot be assigned: {why}"),
            error_class: ErrorClass::Infrastructure as i32,
            ..Default::default()
        });
        tracing::warn!(task = task_id, why, "task cannot be assigned; failed");
        let task = t.clone();
        self.persist_task(&task, Vec::new()).await;
    }

    /// The task's current attempt, if `agent_id` holds it with `token`.
    pub(super) fn current_attempt(
        &mut self,
        task_id: &str,
        token: u64,
        agent_id: &str,
    ) -> Option<&mut TaskEntry> {
        self.tasks.get_mut(task_id).filter(|e| {
            e.task.fencing_token == token
                && e.task.agent_id == agent_id
                && matches!(e.task.state(), TaskState::Assigned | TaskState::Running)
        })
    }

    pub(super) async fn on_accepted(&mut self, agent_id: &str, task_id: &str, token: u64) {
        let Some(entry) = self.current_attempt(task_id, token, agent_id) else {
            return;
        };
        if entry.task.state() != TaskState::Assigned {
            return;
        }
        let now = now_ms();
        entry.task.state = TaskState::Running as i32;
        entry.task.updated_at_ms = now;
        if let Some(a) = entry.task.attempts.last_mut() {
            a.started_at_ms = now;
        }
        let task = entry.task.clone();
        self.persist_task(&task, Vec::new()).await;
    }

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
            })),
        };
        let Some(entry) = self.current_attempt(&f.task_id, f.fencing_token, agent_id) else {
            // Already recorded (a replay after reconnect) → ack; otherwise stale.
            let recorded = self.tasks.get(&f.task_id).is_some_and(|e| {
                is_final(e.task.state())
                    && e.task.attempts.last().is_some_and(|a| {
                        a.fencing_token == f.fencing_token
                            && a.agent_id == agent_id
                            && a.result.is_some()
                    })
            });
            if !recorded {
                info!(task = %f.task_id, token = f.fencing_token, agent = agent_id, "rejected a stale result");
            }
            if let Some(tx) = tx {
                let _ = tx.try_send(ack(!recorded));
            }
            return;
        };
        let result = f.result.clone().unwrap_or(TaskResult {
            outcome: Outcome::Failed as i32,
            message: "the agent reported no result".into(),
            error_class: ErrorClass::Infrastructure as i32,
            ..Default::default()
        });
        if result.error_class() == ErrorClass::Infrastructure && result.outcome() == Outcome::Failed
        {
            let msg = format!(
                "infrastructure failure on agent {agent_id}: {}",
                result.message
            );
            self.requeue_or_fail(&f.task_id, &msg).await;
            if let Some(tx) = tx {
                let _ = tx.try_send(ack(false));
            }
            return;
        }
        let state = match result.outcome() {
            Outcome::Succeeded => TaskState::Succeeded,
            Outcome::Cancelled => TaskState::Cancelled,
            Outcome::TimedOut => TaskState::TimedOut,
            Outcome::Failed | Outcome::Unspecified => TaskState::Failed,
        };
        let now = now_ms();
        let t = &mut entry.task;
        t.state = state as i32;
        t.updated_at_ms = now;
        t.result = Some(result.clone());
        let attempt = t.fencing_token as u32;
        if let Some(a) = t.attempts.last_mut() {
            a.finished_at_ms = now;
            a.result = Some(result);
        }
        let task = t.clone();
        if let Some(a) = self.agents.get_mut(agent_id) {
            a.running.remove(&f.task_id);
        }
        let mut effects: Vec<Effect> = Vec::new();
        if let Some(tx) = tx {
            effects.push(agent_effect(tx, ack(false)));
        }
        if f.log_chunks > 0 {
            // Flush the finished log to disk and release its file, off the hot path.
            let logs = self.logs.clone();
            let task_id = f.task_id.clone();
            effects.push(Box::new(move |r| {
                if r.is_ok() {
                    tokio::spawn(async move {
                        if let Err(e) = logs.seal(&task_id, attempt).await {
                            tracing::warn!(task = %task_id, error = %e, "sealing the log failed");
                        }
                    });
                }
            }));
        }
        self.persist_task(&task, effects).await;
    }

    /// An attempt failed for a reason that is not the task's fault: requeue, or give up
    /// past the bound, or finish as cancelled when that was asked.
    pub(crate) async fn requeue_or_fail(&mut self, task_id: &str, why: &str) {
        let default_max = self.cfg.default_max_infra_retries;
        let Some(entry) = self.tasks.get_mut(task_id) else {
            return;
        };
        let t = &mut entry.task;
        if is_final(t.state()) {
            return;
        }
        let now = now_ms();
        let failure = TaskResult {
            outcome: Outcome::Failed as i32,
            message: why.to_string(),
            error_class: ErrorClass::Infrastructure as i32,
            ..Default::default()
        };
        if let Some(a) = t.attempts.last_mut().filter(|a| a.result.is_none()) {
            a.finished_at_ms = now;
            a.result = Some(failure.clone());
        }
        let old_agent = std::mem::take(&mut t.agent_id);
        t.infra_failures += 1;
        t.updated_at_ms = now;
        let max = match t.spec.as_ref().map_or(0, |s| s.max_infra_retries) {
            0 => default_max,
            n => n,
        };
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
        } else {
            t.state = TaskState::Queued as i32;
            let prio = t.spec.as_ref().map_or(0, |s| s.priority);
            entry.queue_key = Some(self.queue.push(task_id, prio, &t.project));
        }
        info!(task = task_id, agent = %old_agent, state = ?entry.task.state(), why, "attempt lost");
        let task = entry.task.clone();
        if let Some(a) = self.agents.get_mut(&old_agent) {
            a.running.remove(task_id);
        }
        self.persist_task(&task, Vec::new()).await;
    }
}

fn agent_draining(a: &super::AgentEntry) -> bool {
    a.stored.agent.as_ref().is_some_and(|g| g.draining)
}

fn agent_slots(a: &super::AgentEntry) -> u32 {
    a.stored.agent.as_ref().map_or(0, |g| g.slots)
}
