//! The agent table: registration, attaching and detaching sessions, reconciling the
//! attempts a reconnecting agent reports, the lease sweeper, draining.

use std::collections::HashSet;
use std::time::Instant;

use scabbard_common::proto::{
    Agent, AgentStatus, CancelAttempt, ControllerMessage, Drain, Hello, Resume, StoredAgent,
    TaskState, Welcome, agent_message, controller_message,
};
use scabbard_common::time::now_ms;
use scabbard_common::{Error, is_final};
use tracing::{info, warn};

use super::{AGENT_PREFIX, AgentEntry, Attached, Conn, Reply, State, agent_effect, reply_effect};

static NEXT_SESSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl State {
    pub(super) async fn register(&mut self, mut stored: StoredAgent, reply: Reply<()>) {
        let Some(agent) = stored.agent.clone() else {
            let _ = reply.send(Err(Error::internal("register without agent")));
            return;
        };
        // Re-registering keeps an operator's drain.
        if let Some(e) = self.agents.get(&agent.id)
            && e.stored.drained
        {
            stored.drained = true;
            if let Some(a) = stored.agent.as_mut() {
                a.draining = true;
            }
        }
        let entry = self
            .agents
            .entry(agent.id.clone())
            .or_insert_with(|| AgentEntry {
                stored: stored.clone(),
                conn: None,
                running: HashSet::new(),
                disconnected_at: Some(Instant::now()),
                lost: false,
                last_seen_ms: now_ms(),
                warm: Default::default(),
            });
        entry.stored = stored.clone();
        self.sync_agent(&agent.id);
        info!(agent = %agent.id, name = %agent.name, "agent registered");
        self.write(
            format!("{AGENT_PREFIX}{}", agent.id),
            Some(super::agent_admin::record(&stored)),
            vec![reply_effect(reply, ())],
        )
        .await;
    }

    pub(super) async fn attach(
        &mut self,
        agent_id: String,
        hello: Hello,
        tx: super::agent_tx::AgentTx,
        reply: Reply<Attached>,
    ) {
        if !hello.agent_id.is_empty() && hello.agent_id != agent_id {
            let _ = reply.send(Err(Error::PermissionDenied(format!(
                "this token belongs to agent {agent_id}, not {}",
                hello.agent_id
            ))));
            return;
        }
        // Process-wide, so a session of an earlier core (before a leadership change) can
        // never be mistaken for one of this core.
        let session = NEXT_SESSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(entry) = self.agents.get_mut(&agent_id) else {
            let _ = reply.send(Err(Error::Unauthenticated(format!(
                "agent {agent_id} is not registered with this cluster: register it again"
            ))));
            return;
        };
        let drained = entry.stored.drained;
        if let Some(a) = entry.stored.agent.as_mut() {
            // A new session: only an operator's drain carries over (not a shutdown's).
            a.draining = drained;
            a.capabilities = hello.capabilities.clone();
            a.labels = hello.labels.clone();
            a.slots = hello.slots;
            if !hello.version.is_empty() {
                a.version = hello.version.clone();
            }
        }
        self.presence.up(&agent_id);
        let entry = self.agents.get_mut(&agent_id).expect("checked above");
        if let Some(c) = hello.cache.as_ref() {
            entry.warm.set(c);
        }
        crate::metrics::session_attached(entry.conn.is_some() || entry.disconnected_at.is_some());
        let last_seen = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(now_ms()));
        entry.conn = Some(Conn {
            session,
            tx: tx.clone(),
            last_seen: last_seen.clone(),
        });
        entry.disconnected_at = None;
        entry.lost = false;
        entry.last_seen_ms = now_ms();
        let previously: HashSet<String> = std::mem::take(&mut entry.running);

        let mut resume = Vec::new();
        let mut attempts = Vec::new();
        let mut cancels = Vec::new();
        // Finished attempts whose logs come back for archiving (they hold no slot).
        let mut replays = Vec::new();
        for r in &hello.running {
            let mut res = Resume {
                task_id: r.task_id.clone(),
                fencing_token: r.fencing_token,
                ..Default::default()
            };
            if let Some(t) = self.tasks.get(&r.task_id).map(|e| &e.task) {
                let current = t.fencing_token == r.fencing_token && t.agent_id == agent_id;
                if current && matches!(t.state(), TaskState::Assigned | TaskState::Running) {
                    res.keep = true;
                    attempts.push((r.task_id.clone(), r.fencing_token));
                    if t.cancel_requested {
                        cancels.push((r.task_id.clone(), r.fencing_token));
                    }
                } else {
                    if is_final(t.state())
                        && t.attempts.last().is_some_and(|a| {
                            a.fencing_token == r.fencing_token
                                && a.agent_id == agent_id
                                && a.result.is_some()
                        })
                    {
                        res.result_recorded = true;
                    }
                    // A result from this worker whose log is not archived (a new leader, or
                    // an archive that never committed): the worker replays the chunks and
                    // the result, and this leader archives them. (`log_chunks` is set from a
                    // `Finished` only.)
                    if self.archive.is_some()
                        && t.attempts.iter().any(|a| {
                            a.fencing_token == r.fencing_token
                                && a.agent_id == agent_id
                                && a.result.is_some()
                                && a.log_chunks > 0
                                && a.log_archive.is_empty()
                        })
                    {
                        res.keep = true;
                        res.result_recorded = true;
                        replays.push((r.task_id.clone(), r.fencing_token));
                    }
                }
            }
            resume.push(res);
        }
        for (task, token) in &attempts {
            self.resumed_running(task, *token, &agent_id);
        }
        let entry = self.agents.get_mut(&agent_id).expect("checked above");
        for (task, _) in &attempts {
            entry.running.insert(task.clone());
        }
        let stored = entry.stored.clone();
        self.sync_agent(&agent_id);
        // Attempts this controller gave the agent that it no longer knows: lost.
        let lost: Vec<String> = previously
            .into_iter()
            .filter(|t| !attempts.iter().any(|(kept, _)| kept == t))
            .collect();
        let welcome = Welcome {
            heartbeat_interval_ms: self.cfg.heartbeat_interval_ms,
            lease_ttl_ms: self.cfg.agent_lease_ttl_ms,
            resume,
            project: stored
                .agent
                .as_ref()
                .map(|a| a.project.clone())
                .unwrap_or_default(),
            max_artifact_bytes: self.cfg.artifacts.max_artifact_bytes,
            max_task_artifact_bytes: self.cfg.artifacts.max_task_artifact_bytes,
            archives_logs: self.archive.is_some(),
            drained: stored.drained,
        };
        info!(agent = %agent_id, session, resumed = attempts.len(), log_replays = replays.len(), lost = lost.len(), "agent attached");
        for t in lost {
            self.requeue_or_fail(&t, "the agent came back without this attempt")
                .await;
        }
        // The welcome says which attempts to keep: it goes out once every decision it
        // states (requeues included, queued above) is durable.
        let mut effects = vec![reply_effect(
            reply,
            Attached {
                agent_id: agent_id.clone(),
                session,
                welcome,
                attempts: attempts.into_iter().chain(replays).collect(),
                last_seen,
            },
        )];
        for (task_id, fencing_token) in cancels {
            effects.push(agent_effect(
                tx.clone(),
                ControllerMessage {
                    msg: Some(controller_message::Msg::Cancel(CancelAttempt {
                        task_id,
                        fencing_token,
                        reason: "cancelled while the agent was away".into(),
                    })),
                },
            ));
        }
        self.write(
            format!("{AGENT_PREFIX}{agent_id}"),
            Some(super::agent_admin::record(&stored)),
            effects,
        )
        .await;
    }

    /// Ends `session` of `agent_id`. The grace period runs from `last_heard`, the last
    /// time the session heard from the agent: a session that ended because the agent fell
    /// silent for a lease has used up the grace period already, so its attempts are
    /// requeued at the next sweep (one agent lease after the silence began, not two).
    pub(super) fn detach(&mut self, agent_id: &str, session: u64, last_heard: Instant) {
        if let Some(a) = self.agents.get_mut(agent_id)
            && a.conn.as_ref().is_some_and(|c| c.session == session)
        {
            if let Some(c) = a.conn.take() {
                a.last_seen_ms = a.last_seen_ms.max(c.last_seen_ms());
            }
            a.disconnected_at = Some(last_heard.min(Instant::now()));
            self.presence.down(agent_id);
            self.sync_agent(agent_id);
            info!(
                agent = agent_id,
                session,
                silent_ms = last_heard.elapsed().as_millis() as u64,
                "agent session ended; grace period runs from its last message"
            );
        }
    }

    pub(super) async fn on_agent_message(
        &mut self,
        agent_id: &str,
        session: u64,
        msg: agent_message::Msg,
    ) {
        let live = self
            .agents
            .get_mut(agent_id)
            .filter(|a| a.conn.as_ref().is_some_and(|c| c.session == session));
        let Some(agent) = live else { return };
        agent.last_seen_ms = now_ms();
        use agent_message::Msg;
        match msg {
            Msg::Accepted(a) => {
                self.on_accepted(agent_id, &a.task_id, a.fencing_token)
                    .await
            }
            Msg::Rejected(r) => {
                if self
                    .current_attempt(&r.task_id, r.fencing_token, agent_id)
                    .is_some()
                {
                    let why = format!("agent {agent_id} rejected the task: {}", r.reason);
                    self.requeue_or_fail(&r.task_id, &why).await;
                }
            }
            Msg::Finished(f) => self.on_finished(agent_id, f).await,
            Msg::Heartbeat(h) => {
                if let Some(c) = h.cache.as_ref() {
                    agent.warm.set(c);
                }
                if let Some(u) = h.capabilities.as_ref()
                    && let Some(a) = agent.stored.agent.as_mut()
                    && a.capabilities != u.capabilities
                {
                    info!(agent = agent_id, capabilities = ?u.capabilities, "agent capabilities changed");
                    a.capabilities = u.capabilities.clone();
                }
                if h.draining
                    && let Some(a) = agent.stored.agent.as_mut()
                    && !a.draining
                {
                    info!(agent = agent_id, "agent is shutting down: no new work");
                    a.draining = true;
                }
                self.sync_agent(agent_id);
            }
            Msg::Progress(_) | Msg::Hello(_) | Msg::Log(_) => {}
        }
    }

    /// Agents disconnected for longer than the lease TTL are lost: their attempts are
    /// requeued as infrastructure failures.
    pub(crate) async fn sweep_lost_agents(&mut self) {
        let ttl = self.cfg.agent_lease_ttl();
        let mut lost = Vec::new();
        for (id, a) in self.agents.iter_mut() {
            if a.lost || a.conn.is_some() {
                continue;
            }
            if a.disconnected_at.is_some_and(|t| t.elapsed() >= ttl) {
                a.lost = true;
                warn!(agent = %id, attempts = a.running.len(), "agent lost: lease expired");
                lost.extend(a.running.drain().map(|t| (id.clone(), t)));
            }
        }
        for (agent, task) in lost {
            let why = format!(
                "agent {agent} was lost (no contact for {} ms)",
                ttl.as_millis()
            );
            self.requeue_or_fail(&task, &why).await;
        }
        self.requeue_unaccepted().await;
    }

    /// Assigns their agent has not accepted within `assign_accept_timeout_ms` go back to
    /// the queue as infrastructure failures. The attempt is fenced off: the next one has a
    /// new token, so a late `Accepted` or result of this one is refused; the agent is told
    /// to cancel it in case the Assign reaches it after all.
    pub(crate) async fn requeue_unaccepted(&mut self) {
        let timeout = self.cfg.assign_accept_timeout_ms as i64;
        if timeout == 0 {
            return;
        }
        let now = now_ms();
        let mut late = Vec::new();
        for (agent_id, a) in &self.agents {
            for task_id in &a.running {
                let Some(t) = self.tasks.get(task_id).map(|e| &e.task) else {
                    continue;
                };
                if t.state() != TaskState::Assigned || t.agent_id != *agent_id {
                    continue;
                }
                if let Some(at) = t.attempts.last()
                    && now - at.assigned_at_ms >= timeout
                {
                    late.push((agent_id.clone(), task_id.clone(), t.fencing_token));
                }
            }
        }
        for (agent_id, task_id, fencing_token) in late {
            warn!(agent = %agent_id, task = %task_id, timeout_ms = timeout, "assignment not accepted in time: requeued");
            if let Some(conn) = self.agents.get(&agent_id).and_then(|a| a.conn.as_ref()) {
                let _ = conn.tx.try_send(ControllerMessage {
                    msg: Some(controller_message::Msg::Cancel(CancelAttempt {
                        task_id: task_id.clone(),
                        fencing_token,
                        reason: "not accepted in time: given to another agent".into(),
                    })),
                });
            }
            let why = format!(
                "agent {agent_id} did not accept the assignment within {timeout} ms (assign_accept_timeout_ms)"
            );
            self.requeue_or_fail(&task_id, &why).await;
        }
    }

    pub(super) async fn drain(&mut self, id: String, reason: String, reply: Reply<Agent>) {
        let Some(entry) = self.agents.get_mut(&id) else {
            let _ = reply.send(Err(Error::not_found("agent", id)));
            return;
        };
        entry.stored.drained = true;
        if let Some(a) = entry.stored.agent.as_mut() {
            a.draining = true;
        }
        let mut effects = Vec::new();
        if let Some(conn) = &entry.conn {
            effects.push(agent_effect(
                conn.tx.clone(),
                ControllerMessage {
                    msg: Some(controller_message::Msg::Drain(Drain { reason })),
                },
            ));
        }
        let stored = entry.stored.clone();
        self.sync_agent(&id);
        let view = self.agent_view(self.agents.get(&id).expect("present"));
        effects.insert(0, reply_effect(reply, view));
        self.write(
            format!("{AGENT_PREFIX}{id}"),
            Some(super::agent_admin::record(&stored)),
            effects,
        )
        .await;
    }

    pub(super) fn agent_view(&self, a: &AgentEntry) -> Agent {
        let mut view = a.stored.agent.clone().unwrap_or_default();
        view.running = a.running.len() as u32;
        view.cache = a.warm.summary();
        view.last_seen_ms = a
            .conn
            .as_ref()
            .map_or(a.last_seen_ms, |c| a.last_seen_ms.max(c.last_seen_ms()));
        view.status = if a.lost {
            AgentStatus::Lost
        } else if a.conn.is_none() {
            AgentStatus::Disconnected
        } else if view.draining {
            AgentStatus::Draining
        } else {
            AgentStatus::Connected
        } as i32;
        view
    }
}
