//! Rebuilding the core's state from the store: on start, and after a failed commit. Live
//! tasks, agents, live workflows (see `workflows::live`) and schedules.

use std::collections::HashSet;
use std::time::Instant;

use prost::Message;
use scabbard_common::proto::{StoredAgent, Task, TaskState};
use scabbard_common::{Error, Result};
use tracing::info;

use super::scheduler::RunQueue;
use super::{AGENT_PREFIX, AgentEntry, State, TASK_PREFIX, TaskEntry, history, idempotency_key};

impl State {
    /// Rebuilds tasks, queue and agents from the store.
    pub(super) async fn recover(&mut self) -> Result<()> {
        let now = Instant::now();
        self.tasks.clear();
        self.idempotency.clear();
        self.finished = Default::default();
        self.idem_pending.clear();
        self.queue = RunQueue::default();
        self.retry_timers.clear();
        let old_agents = std::mem::take(&mut self.agents);
        drop(old_agents); // dropping the senders ends every session; workers reconnect.
        for kv in self.load_prefix(AGENT_PREFIX).await? {
            let mut stored = StoredAgent::decode(kv.value.as_slice())
                .map_err(|e| Error::internal(format!("corrupt agent record {}: {e}", kv.key)))?;
            // Records written before `drained` existed kept a drain in `agent.draining`.
            let Some(agent) = stored.agent.as_mut() else {
                continue;
            };
            stored.drained |= agent.draining;
            agent.draining = stored.drained;
            let agent = stored.agent.as_ref().expect("checked above");
            let id = agent.id.clone();
            let last_seen_ms = agent.last_seen_ms;
            self.agents.insert(
                id,
                AgentEntry {
                    last_seen_ms,
                    stored,
                    conn: None,
                    running: HashSet::new(),
                    // Every agent gets the grace period to reconnect to this leader.
                    disconnected_at: Some(now),
                    lost: false,
                    warm: Default::default(),
                },
            );
        }
        self.migrate_layout().await?;
        let mut orphans = Vec::new();
        // Only live tasks: finished ones are served from the store.
        let live: Vec<String> = self
            .load_prefix(history::LIVE_PREFIX)
            .await?
            .into_iter()
            .filter_map(|kv| {
                kv.key
                    .strip_prefix(history::LIVE_PREFIX)
                    .map(str::to_string)
            })
            .collect();
        for task in history::read_tasks(self.store.as_ref(), &live).await? {
            let mut entry = TaskEntry {
                task,
                queue_key: None,
            };
            let t = &entry.task;
            if !t.idempotency_key.is_empty() {
                self.idempotency.insert(
                    idempotency_key(&t.project, &t.idempotency_key),
                    t.id.clone(),
                    0,
                    &self.durability,
                );
            }
            match t.state() {
                TaskState::RetryWait if t.retry_at_ms > 0 => {
                    self.retry_timers.insert((t.retry_at_ms, t.id.clone()));
                }
                TaskState::Queued | TaskState::RetryWait => {
                    entry.queue_key = Some(self.queue.push(
                        &t.id,
                        t.spec.as_ref().map_or(0, |s| s.priority),
                        &t.project,
                        t.spec.as_ref(),
                    ));
                }
                TaskState::Assigned | TaskState::Running => {
                    match self.agents.get_mut(&t.agent_id) {
                        Some(a) => {
                            a.running.insert(t.id.clone());
                        }
                        None => orphans.push(t.id.clone()),
                    }
                }
                _ => {}
            }
            self.tasks.insert(entry.task.id.clone(), entry);
        }
        self.recover_workflows().await?;
        self.load_workflow_tasks().await?;
        let mut breakers = Vec::new();
        for kv in self.load_prefix(super::BREAKER_PREFIX).await? {
            breakers.push(
                scabbard_common::proto::Breaker::decode(kv.value.as_slice()).map_err(|e| {
                    Error::internal(format!("corrupt breaker record {}: {e}", kv.key))
                })?,
            );
        }
        self.breakers
            .restore(breakers, scabbard_common::time::now_ms());
        self.recover_schedules().await?;
        info!(
            workflows = self.workflows.len(),
            tasks = self.tasks.len(),
            queued = self.queue.len(),
            agents = self.agents.len(),
            "state rebuilt from the store"
        );
        for id in orphans {
            self.requeue_or_fail(&id, "its agent is unknown to this controller")
                .await;
        }
        Ok(())
    }

    /// The finished tasks of running workflows (they read them to advance): into the
    /// finished cache, where they stay while their workflow runs.
    async fn load_workflow_tasks(&mut self) -> Result<()> {
        let ids: Vec<String> = self
            .wf_active
            .iter()
            .filter_map(|id| self.workflows.get(id))
            .flat_map(|wf| wf.nodes.iter().map(|n| n.task_id.clone()))
            .filter(|id| !id.is_empty() && !self.tasks.contains_key(id))
            .collect();
        for task in history::read_tasks(self.store.as_ref(), &ids).await? {
            self.finished.finished(&task.id, task.updated_at_ms, 0);
            self.tasks.insert(
                task.id.clone(),
                TaskEntry {
                    task,
                    queue_key: None,
                },
            );
        }
        Ok(())
    }

    /// Once per store: writes the history keys (see [`history`]) of every task record
    /// (unless the store is at layout 2 already) and workflow header written before they
    /// existed, in bounded batches through the persister (fenced like every write of this
    /// term), then `meta/layout` = 3 after them. Idempotent: an interrupted migration runs
    /// again from the start on the next term.
    async fn migrate_layout(&mut self) -> Result<()> {
        let layout = self
            .store
            .get(history::LAYOUT_KEY)
            .await?
            .map(|kv| kv.value);
        if layout.as_deref() == Some(history::LAYOUT_VERSION) {
            return Ok(());
        }
        let started = Instant::now();
        let mut after: Option<String> = None;
        let mut n = 0usize;
        // Tasks (layout 2), unless a store at layout 2 has them already.
        let mut tasks_left = layout.as_deref() != Some(history::TASK_LAYOUT_VERSION);
        while tasks_left {
            let page = self
                .store
                .range(TASK_PREFIX, after.as_deref(), 2_000)
                .await?;
            after = page.kvs.last().map(|kv| kv.key.clone());
            for kv in &page.kvs {
                let mut t = Task::decode(kv.value.as_slice())
                    .map_err(|e| Error::internal(format!("corrupt task record {}: {e}", kv.key)))?;
                if t.project.is_empty() {
                    t.project = crate::auth::DEFAULT_PROJECT.to_string();
                }
                let mut ops = history::migration_ops(&t).into_iter();
                // Each write's first key is its own key: the persister batches them.
                if let Some((k, v)) = ops.next() {
                    self.write_with(k, v, ops.collect(), Vec::new()).await;
                }
                n += 1;
            }
            tasks_left = page.more && after.is_some();
        }
        // Workflows (layout 3).
        let workflows = self.migrate_workflows().await?;
        // Written after every key above: durable once they are (commits go in order).
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.write(
            history::LAYOUT_KEY.to_string(),
            Some(history::LAYOUT_VERSION.to_vec()),
            vec![Box::new(move |r| {
                let _ = tx.send(r.clone());
            })],
        )
        .await;
        match rx.await {
            Ok(Ok(())) => {
                info!(
                    tasks = n,
                    workflows,
                    took_ms = started.elapsed().as_millis() as u64,
                    "store migrated to history layout 3"
                );
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_error()),
            Err(_) => Err(Error::Unavailable("controller is shutting down".into())),
        }
    }

    pub(super) async fn load_prefix(&self, prefix: &str) -> Result<Vec<crate::store::KeyValue>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.store.range(prefix, after.as_deref(), 10_000).await?;
            after = page.kvs.last().map(|kv| kv.key.clone());
            out.extend(page.kvs);
            if !page.more || after.is_none() {
                return Ok(out);
            }
        }
    }
}
