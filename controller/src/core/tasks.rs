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
//! | ASSIGNED, RUNNING | finished FAILED / TIMED_OUT and the retry policy retries it | RETRY_WAIT (until the backoff passes) |
//! | ASSIGNED, RUNNING | agent lost / rejected / infra | QUEUED (RETRY_WAIT with a policy), or FAILED past the infra bound, or CANCELLED if requested |
//! | RETRY_WAIT        | backoff passed                | QUEUED                               |
//! | RETRY_WAIT        | cancel                        | CANCELLED                            |
//!
//! Reports carrying any other fencing token than the task's current one are stale and
//! rejected. Dispatch lives in `dispatch.rs`, the end of attempts in `finish.rs`.

use scabbard_common::proto::{
    CancelAttempt, ControllerMessage, ListTasksRequest, Outcome, Task, TaskResult, TaskSpec,
    TaskState, controller_message,
};
use scabbard_common::time::now_ms;
use scabbard_common::{Error, Result, is_final};

use super::{
    CoreMsg, Effect, Reply, State, TaskEntry, agent_effect, history, reply_effect, validate,
};

impl State {
    /// A submit. When its idempotency key or an input's producer task is not in memory,
    /// they are first read from the store off the core ([`CoreMsg::SubmitLooked`] brings
    /// the submit back); later submits with the same key wait for that answer, so two of
    /// them never both miss.
    ///
    /// Why that is race-free: a key leaves memory only once the write that stored its
    /// `idem/` key is durable ([`history::IdemMemory`]), and the lookup starts after the
    /// core saw the miss; so a key missing from memory is either in the store when the
    /// lookup reads it, or was never used (within this store's history).
    pub(super) async fn submit(
        &mut self,
        spec: TaskSpec,
        key: String,
        project: String,
        origin: super::Origin,
        reply: Reply<(Task, bool)>,
    ) {
        let mem_key = super::idempotency_key(&project, &key);
        if !key.is_empty()
            && let Some(waiting) = self.idem_pending.get_mut(&mem_key)
        {
            waiting.push(CoreMsg::Submit {
                spec: Box::new(spec),
                idempotency_key: key,
                project,
                origin,
                reply,
            });
            return;
        }
        let key_missing = !key.is_empty()
            && self
                .idempotency
                .get(&mem_key)
                .is_none_or(|id| !self.tasks.contains_key(id));
        let producers: Vec<String> = spec
            .inputs
            .iter()
            .filter_map(|i| match validate::artifacts::parse_from(&i.from) {
                Ok(validate::artifacts::InputSource::Task { task_id, .. })
                    if !self.tasks.contains_key(&task_id)
                        && validate::id("task", &task_id).is_ok() =>
                {
                    Some(task_id)
                }
                _ => None,
            })
            .collect();
        if !key_missing && producers.is_empty() {
            return self.submit_checked(spec, key, project, origin, reply).await;
        }
        if !key.is_empty() {
            self.idem_pending.insert(mem_key, Vec::new());
        }
        let idem = key_missing.then(|| history::idem_key(&project, &key));
        let (store, back) = (self.store.clone(), self.self_tx.clone());
        tokio::spawn(async move {
            let found = history::lookup(store.as_ref(), idem.as_deref(), &producers).await;
            if let Some(core) = back.upgrade() {
                let _ = core
                    .send(CoreMsg::SubmitLooked {
                        spec: Box::new(spec),
                        idempotency_key: key,
                        project,
                        origin,
                        reply,
                        found,
                    })
                    .await;
            }
        });
    }

    /// A submit back from its store lookup (see [`submit`](Self::submit)).
    pub(super) async fn submit_looked(
        &mut self,
        spec: TaskSpec,
        key: String,
        project: String,
        origin: super::Origin,
        reply: Reply<(Task, bool)>,
        found: Result<(Option<String>, Vec<Task>)>,
    ) {
        let mem_key = super::idempotency_key(&project, &key);
        let waiting = self.idem_pending.remove(&mem_key).unwrap_or_default();
        match found {
            Err(e) => {
                let _ = reply.send(Err(e));
            }
            Ok((idem_id, tasks)) => {
                for t in tasks {
                    // Live tasks are always in memory; finished ones join the cache.
                    if is_final(t.state()) && !self.tasks.contains_key(&t.id) {
                        self.finished.finished(&t.id, t.updated_at_ms, 0);
                        self.tasks.insert(
                            t.id.clone(),
                            TaskEntry {
                                task: t,
                                queue_key: None,
                            },
                        );
                    }
                }
                if let Some(id) = idem_id.filter(|id| self.tasks.contains_key(id)) {
                    self.idempotency.insert(mem_key, id, 0, &self.durability);
                }
                self.submit_checked(spec, key, project, origin, reply).await;
            }
        }
        for msg in waiting {
            Box::pin(self.handle(msg)).await;
        }
    }

    async fn submit_checked(
        &mut self,
        mut spec: TaskSpec,
        key: String,
        project: String,
        origin: super::Origin,
        reply: Reply<(Task, bool)>,
    ) {
        if let Err(e) = validate::task_spec(&mut spec, &self.cfg)
            .and_then(|()| self.resolve_task_inputs(&mut spec, &project, false))
        {
            let _ = reply.send(Err(e));
            return;
        }
        // From here on (store, memory, events) secret values exist only sealed.
        if let Err(e) = self
            .secrets
            .seal_spec(&mut spec)
            .and_then(|()| validate::size::check_spec("spec", &spec, &self.cfg))
        {
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
        let window = self.cfg.idempotency_window_ms as i64;
        if !key.is_empty()
            && let Some(entry) = self
                .idempotency
                .get(&super::idempotency_key(&project, &key))
                .and_then(|id| self.tasks.get(id))
                .filter(|e| window == 0 || e.task.created_at_ms + window > now_ms())
        {
            // The first submit may still be on its way to the store.
            let effects = vec![reply_effect(reply, (entry.task.clone(), true))];
            self.after_durable(effects).await;
            return;
        }
        if let Err(e) = self.check_queue_quota(&project) {
            let _ = reply.send(Err(e));
            return;
        }
        match self.new_task(spec, key, project, None) {
            Ok(mut task) => {
                super::trace::stamp(&mut task, origin.trace);
                task.rerun_of = origin.rerun_of;
                let effects = vec![reply_effect(reply, (task.clone(), false))];
                let audit = origin.audit.map(|mut e| {
                    e.target.clone_from(&task.id);
                    e
                });
                self.enqueue_new(task, effects).await;
                // Staged in the same turn: lands in the task's commit, with no commit or
                // sync of its own on the submit path.
                if let Some(e) = audit {
                    self.write_audit(&e).await;
                }
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Fills in each input of the form `<task id>/<name>`: an artifact of a succeeded task
    /// of `project` (a task of another project is reported as unknown). Workflow nodes
    /// (`in_workflow`) may also name other nodes' artifacts, filled in at release.
    pub(super) fn resolve_task_inputs(
        &self,
        spec: &mut TaskSpec,
        project: &str,
        in_workflow: bool,
    ) -> Result<()> {
        use validate::artifacts::{InputSource, parse_from};
        for (i, input) in spec.inputs.iter_mut().enumerate() {
            let field = format!("spec.inputs[{i}].from");
            let (task_id, name) = match parse_from(&input.from) {
                Ok(InputSource::Task { task_id, name }) => (task_id, name),
                Ok(InputSource::Node { .. }) if in_workflow => continue,
                Ok(InputSource::Node { .. }) => {
                    return Err(Error::invalid(format!(
                        "{field} {:?} refers to a workflow task: outside a workflow name an artifact as <task id>/<name>",
                        input.from
                    )));
                }
                Err(why) => return Err(Error::invalid(format!("{field}: {why}"))),
            };
            let Some(producer) = self
                .tasks
                .get(&task_id)
                .map(|e| &e.task)
                .filter(|t| t.project == project)
            else {
                return Err(Error::invalid(format!(
                    "{field}: task {task_id} does not exist in project {project}"
                )));
            };
            if producer.state() != TaskState::Succeeded {
                return Err(Error::invalid(format!(
                    "{field}: task {task_id} is {}; only a succeeded task's artifacts can be inputs",
                    producer
                        .state()
                        .as_str_name()
                        .trim_start_matches("TASK_STATE_")
                )));
            }
            let found = producer
                .result
                .as_ref()
                .and_then(|r| r.artifacts.iter().find(|a| a.name == name));
            let Some(found) = found else {
                let have: Vec<&str> = producer
                    .result
                    .iter()
                    .flat_map(|r| r.artifacts.iter().map(|a| a.name.as_str()))
                    .collect();
                return Err(Error::invalid(format!(
                    "{field}: task {task_id} has no artifact {name:?} (it has: {})",
                    if have.is_empty() {
                        "none".to_string()
                    } else {
                        have.join(", ")
                    }
                )));
            };
            input.artifact = Some(found.clone());
        }
        Ok(())
    }

    /// A new task record (QUEUED) for a validated, sealed spec; `node` = (workflow id, node
    /// name) for a workflow's task.
    pub(super) fn new_task(
        &mut self,
        spec: TaskSpec,
        key: String,
        project: String,
        node: Option<(&str, &str)>,
    ) -> Result<Task> {
        let id = self
            .ids
            .generate()
            .map_err(Error::internal)?
            .to_string()
            .to_lowercase();
        let now = now_ms();
        let (workflow_id, workflow_node) = node.unwrap_or_default();
        crate::metrics::stats::task_submitted(now);
        Ok(Task {
            id,
            spec: Some(spec),
            state: TaskState::Queued as i32,
            created_at_ms: now,
            updated_at_ms: now,
            idempotency_key: key,
            project,
            workflow_id: workflow_id.to_string(),
            workflow_node: workflow_node.to_string(),
            ..Default::default()
        })
    }

    /// Queues a new task and persists it; `effects` run once it is durable.
    pub(super) async fn enqueue_new(&mut self, task: Task, effects: Vec<Effect>) {
        let key = (!task.idempotency_key.is_empty())
            .then(|| super::idempotency_key(&task.project, &task.idempotency_key));
        let priority = task.spec.as_ref().map_or(0, |s| s.priority);
        let queue_key =
            Some(
                self.queue
                    .push(&task.id, priority, &task.project, task.spec.as_ref()),
            );
        let mut effects = effects;
        if let Some(key) = key {
            let (seq, durable) = self.durability.track();
            effects.push(durable);
            self.idempotency
                .insert(key, task.id.clone(), seq, &self.durability);
        }
        self.persist_task_ref(&task, effects).await;
        self.tasks
            .insert(task.id.clone(), TaskEntry { task, queue_key });
    }

    /// Refuses a new task when the project's or the controller's queue is full.
    pub(super) fn check_queue_quota(&self, project: &str) -> Result<()> {
        let quota = self.catalog.quota(project);
        if quota.max_queued_tasks > 0 && self.queue.queued_in(project) >= quota.max_queued_tasks {
            return Err(Error::ResourceExhausted(format!(
                "project {project:?} has {} tasks queued, its quota (max_queued_tasks); retry when some have started",
                quota.max_queued_tasks
            )));
        }
        if self.queue.len() >= self.cfg.max_queued_tasks {
            return Err(Error::ResourceExhausted(format!(
                "the queue holds {} tasks, the configured maximum (max_queued_tasks); retry later",
                self.queue.len()
            )));
        }
        Ok(())
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
        match self.cancel_task(&id, reason) {
            Ok((task, mut effects)) => {
                effects.insert(0, reply_effect(reply, task.clone()));
                self.persist_task(task, effects).await;
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Cancels a task: at once when it is not on an agent, else asks its agent (the task
    /// ends when the agent reports). Returns the task to persist and the effects.
    pub(super) fn cancel_task(&mut self, id: &str, reason: String) -> Result<(Task, Vec<Effect>)> {
        let Some(entry) = self.tasks.get_mut(id) else {
            return Err(Error::not_found("task", id));
        };
        let state = entry.task.state();
        if is_final(state) {
            return Err(Error::FailedPrecondition(format!(
                "task {id} is already {}; only queued or running tasks can be cancelled",
                state.as_str_name().trim_start_matches("TASK_STATE_")
            )));
        }
        let reason = if reason.is_empty() {
            "cancelled by request".to_string()
        } else {
            reason
        };
        entry.task.updated_at_ms = now_ms();
        let mut effects = Vec::new();
        match state {
            TaskState::Assigned | TaskState::Running => {
                entry.task.cancel_requested = true;
                let agent = entry.task.agent_id.clone();
                let msg = ControllerMessage {
                    msg: Some(controller_message::Msg::Cancel(CancelAttempt {
                        task_id: id.to_string(),
                        fencing_token: entry.task.fencing_token,
                        reason,
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
                entry.task.retry_at_ms = 0;
                entry.task.result = Some(TaskResult {
                    outcome: Outcome::Cancelled as i32,
                    message: reason,
                    ..Default::default()
                });
                super::trace::task_ended(&entry.task);
            }
        }
        Ok((entry.task.clone(), effects))
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
            if a.number == 1 {
                crate::metrics::task_started(entry.task.created_at_ms, now);
            }
        }
        // Written late, and only if the attempt still runs then (see `running`).
        self.running_unwritten.defer(task_id);
    }

    /// A kept attempt of a reconnecting agent is running there (its `Hello` lists it): an
    /// attempt still ASSIGNED here (its `Accepted` never reached this controller, or its
    /// RUNNING record was not written before a leader change) becomes RUNNING, so the
    /// accept timeout does not requeue work the agent holds.
    pub(super) fn resumed_running(&mut self, task_id: &str, token: u64, agent_id: &str) {
        let Some(entry) = self.current_attempt(task_id, token, agent_id) else {
            return;
        };
        if entry.task.state() != TaskState::Assigned {
            return;
        }
        let now = now_ms();
        entry.task.state = TaskState::Running as i32;
        entry.task.updated_at_ms = now;
        if let Some(a) = entry.task.attempts.last_mut()
            && a.started_at_ms == 0
        {
            a.started_at_ms = now;
        }
        self.running_unwritten.defer(task_id);
    }

    /// Writes the RUNNING records that are due (see `running`): of tasks still running.
    pub(super) async fn write_due_running(&mut self) {
        let due = self.running_unwritten.due(std::time::Instant::now());
        self.write_running(due).await;
    }

    /// Writes every RUNNING record still waiting (the controller is stopping).
    pub(super) async fn write_all_running(&mut self) {
        let all = self.running_unwritten.take_all();
        self.write_running(all).await;
    }

    async fn write_running(&mut self, ids: Vec<String>) {
        for id in ids {
            if self
                .tasks
                .get(&id)
                .is_some_and(|e| e.task.state() == TaskState::Running)
            {
                self.persist_entry(&id, Vec::new()).await;
            }
        }
    }
}
