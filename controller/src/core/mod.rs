//! The core: one actor that owns the cluster's live state — every task, the run queue and
//! the agent table — and is the only place where tasks change state. Tonic services and
//! agent session actors talk to it through [`CoreHandle`]; it never awaits I/O except to
//! hand writes to the [`persist`] loop, which runs their effects (replies, messages to
//! agents, events) once they are durable.
//!
//! On start it rebuilds itself from the store. A failed commit ends its term: it stops, and
//! the controller starts a new term that rebuilds from the store again.

mod agent_admin;
pub(crate) mod agent_tx;
mod agents;
pub(crate) mod archive;
pub(crate) mod artifacts;
pub(crate) mod breakers;
mod dispatch;
mod finish;
mod forget;
mod msg;
use msg::Reply;
pub(crate) use msg::{Attached, BatchEntry, CoreMsg, Origin};
mod handle;
pub use handle::{CoreHandle, CoreRouter, Route};
pub mod history;
pub(crate) mod persist;
pub(crate) mod placement;
mod presence;
mod recover;
mod rerun;
mod retry;
mod running;
mod schedule_verbs;
pub(crate) mod scheduler;
mod schedules;
mod tasks;
pub(crate) mod term;
pub(crate) mod trace;
pub(crate) mod validate;
mod waiting;
pub(crate) mod workflows;
mod writes;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use scabbard_common::proto::{
    Agent, Hello, ListTasksRequest, StoredAgent, Task, TaskSpec, Welcome, Workflow, agent_message,
};
use scabbard_common::{Error, Result};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::auth::Catalog;
use crate::config::ControllerConfig;
use crate::logstore::LogStore;
use crate::store::Store;
use persist::{BatchLimits, Effect, Persister};
use scheduler::{QueueKey, RunQueue};
pub(crate) use writes::{agent_effect, reply_effect};

/// Store key prefix of task records.
pub(crate) const TASK_PREFIX: &str = "tasks/";
/// Store key prefix of circuit breaker records.
pub(crate) const BREAKER_PREFIX: &str = "breakers/";
/// Store key prefix of agent records.
pub(crate) const AGENT_PREFIX: &str = "agents/";

/// Counters for status pages and the benchmark.
#[derive(Debug, Clone, Default)]
pub struct CoreStats {
    /// Tasks waiting for an agent.
    pub queued: usize,
    /// Tasks assigned or running.
    pub active: usize,
    /// Tasks held in the core's memory: live ones and the finished cache
    /// (`scabbard_core_tasks_in_memory`).
    pub total: usize,
    /// Finished tasks among them (the cache, bounded by `finished_cache_tasks`).
    pub finished_cached: usize,
    /// Workflows held in the core's memory: live ones and the finished cache
    /// (`finished_cache_workflows`).
    pub workflows_in_memory: usize,
    /// Agents with a live session.
    pub connected_agents: usize,
    /// Circuit breakers that are not closed.
    pub breakers: Vec<scabbard_common::proto::Breaker>,
    /// Workflows running, and waiting for their concurrency group.
    pub running_workflows: usize,
    pub pending_workflows: usize,
    /// Container tasks dispatched to a warm engine, and to a cold one.
    pub cache_affinity_hits: u64,
    pub cache_affinity_misses: u64,
    /// Queued and running tasks per project (`/metrics`).
    pub projects: Vec<crate::metrics::ProjectLoad>,
    /// Agents registered, and those declared lost (silent past their lease).
    pub registered_agents: usize,
    pub lost_agents: usize,
    /// Waiting tasks and pending workflows by reason (see `core::waiting`).
    pub waiting: Vec<scabbard_common::proto::WaitingCount>,
}

pub(crate) struct TaskEntry {
    pub(crate) task: Task,
    pub(crate) queue_key: Option<QueueKey>,
}

pub(crate) struct Conn {
    pub(crate) session: u64,
    pub(crate) tx: agent_tx::AgentTx,
    /// Kept by the session (see [`Attached::last_seen`]).
    pub(crate) last_seen: Arc<std::sync::atomic::AtomicI64>,
}

impl Conn {
    /// When the session last heard from the agent (unix ms).
    pub(crate) fn last_seen_ms(&self) -> i64 {
        self.last_seen.load(std::sync::atomic::Ordering::Relaxed)
    }
}

pub(crate) struct AgentEntry {
    pub(crate) stored: StoredAgent,
    pub(crate) conn: Option<Conn>,
    /// Task ids with a live attempt on this agent.
    pub(crate) running: HashSet<String>,
    pub(crate) disconnected_at: Option<Instant>,
    pub(crate) lost: bool,
    pub(crate) last_seen_ms: i64,
    /// What its engine has warm (last reported).
    pub(crate) warm: scheduler::Warm,
}

pub(crate) struct State {
    pub(crate) cfg: Arc<ControllerConfig>,
    pub(crate) store: Arc<dyn Store>,
    /// Projects (quotas) and tokens.
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) tasks: BTreeMap<String, TaskEntry>,
    /// Recent idempotency keys; older ones are looked up in the store (`idem/`).
    pub(crate) idempotency: history::IdemMemory,
    /// Submits waiting for the store lookup of their idempotency key (by key), after the
    /// first one with that key: decided in order once it is back.
    pub(crate) idem_pending: HashMap<String, Vec<CoreMsg>>,
    /// Finished tasks still in `tasks`, oldest first.
    pub(crate) finished: history::FinishedCache,
    /// Which tracked writes are durable.
    pub(crate) durability: history::Durability,
    /// The core's own queue, for lookups done off the core to come back.
    pub(crate) self_tx: mpsc::WeakSender<CoreMsg>,
    pub(crate) queue: RunQueue,
    pub(crate) agents: BTreeMap<String, AgentEntry>,
    /// The agents that may get work, by signature and free slots (kept in step with
    /// `agents` through [`State::sync_agent`]).
    pub(crate) placement: placement::AgentIndex,
    /// Why queued tasks wait (derived, never stored: see [`waiting`]).
    pub(crate) waiting: waiting::Waiting,
    pub(crate) persister: Persister,
    pub(crate) events: broadcast::Sender<Arc<Task>>,
    pub(crate) logs: Arc<LogStore>,
    pub(crate) ids: ulid::Generator,
    pub(crate) presence: presence::Presence,
    /// Seals `secret_env` values before they are stored; opens them for `Assign`.
    pub(crate) secrets: crate::sealed::SecretBox,
    /// Circuit breakers of this term (agents, steps, named dependencies).
    pub(crate) breakers: breakers::Breakers,
    /// Container tasks sent to a warm engine / a cold one (cache affinity hit rate).
    pub(crate) affinity: (u64, u64),
    /// Tasks in RETRY_WAIT by the time they go back to the queue (unix ms, task id).
    pub(crate) retry_timers: std::collections::BTreeSet<(i64, String)>,
    /// Live workflows and the finished cache (`workflows::live`), by id.
    pub(crate) workflows: BTreeMap<String, Workflow>,
    /// Finished workflows still in `workflows`, oldest first.
    pub(crate) wf_finished: history::FinishedCache,
    /// Workflows not yet final.
    pub(crate) wf_active: BTreeSet<String>,
    /// Workflows whose tasks changed since they were last advanced.
    pub(crate) wf_dirty: BTreeSet<String>,
    pub(crate) wf_idempotency: HashMap<String, String>,
    /// Schedules by id, and their parsed cron expressions.
    pub(crate) schedules: BTreeMap<String, scabbard_common::proto::Schedule>,
    pub(crate) crons: HashMap<String, crate::schedules::plan::Cron>,
    /// Templates, for schedules.
    pub(crate) templates: Arc<crate::templates::Registry>,
    /// The time schedules go by.
    pub(crate) clock: Arc<dyn crate::schedules::Clock>,
    /// The artifact store, for deleting uploads no result will refer to (in the
    /// background: the core never waits on it).
    pub(crate) artifacts: Option<Arc<crate::artifacts::ArtifactStore>>,
    /// Finished attempts' logs go here (the artifact store's blob store), when there is one.
    pub(crate) archive: Option<Arc<crate::logstore::archive::LogArchive>>,
    /// This core's own queue, for work it spawns (archives) to report back.
    pub(crate) me: mpsc::WeakSender<CoreMsg>,
    /// This term's number: the high half of every fencing token it issues.
    pub(crate) term: u64,
    /// Cancelled to end this term (the persister does it when a commit fails).
    pub(crate) term_over: CancellationToken,
    /// Tasks whose record the store refused this term, with the size of the shrunk record
    /// written instead (if that is refused too, the term ends).
    pub(crate) unstorable: HashMap<String, usize>,
    /// Tasks RUNNING in memory whose record still says ASSIGNED (written late, see
    /// [`running`]).
    pub(crate) running_unwritten: running::Unwritten,
}

/// What a core works with besides its config and store.
pub(crate) struct Deps {
    /// Projects (quotas) and tokens.
    pub(crate) catalog: Arc<Catalog>,
    /// Templates, for schedules.
    pub(crate) templates: Arc<crate::templates::Registry>,
    /// This term's log store.
    pub(crate) logs: Arc<LogStore>,
    /// The artifact store (deletes of uploads no result refers to).
    pub(crate) artifacts: Option<Arc<crate::artifacts::ArtifactStore>>,
}

/// Starts the core: rebuilds state from `store`, then serves requests until `shutdown`.
///
/// `fence`, when given, guards every write (the leader's compare); a refused write cancels
/// `fence.lost`.
pub(crate) async fn start(
    cfg: Arc<ControllerConfig>,
    store: Arc<dyn Store>,
    deps: Deps,
    shutdown: CancellationToken,
    fence: Option<persist::Fence>,
) -> Result<(CoreHandle, tokio::task::JoinHandle<()>)> {
    let Deps {
        catalog,
        templates,
        logs,
        artifacts,
    } = deps;
    let secrets = crate::sealed::SecretBox::from_config(&cfg)?;
    // Every term issues fencing tokens above all earlier terms' (`term << 32 | attempt`).
    let term = term::next_term(store.as_ref(), fence.as_ref()).await?;
    let (persister, persisted, persist_task) =
        Persister::start(store.clone(), BatchLimits::for_store(store.as_ref()), fence);
    let (events, _) = broadcast::channel(16 * 1024);
    let store_for_presence = store.clone();
    let agent_ttl = cfg.agent_lease_ttl();
    let breakers_cfg = cfg.breakers();
    let clock = cfg.clock.0.clone();
    let (tx, rx) = mpsc::channel(16 * 1024);
    let archive = artifacts
        .clone()
        .map(crate::logstore::archive::LogArchive::new);
    if let Some(a) = &archive {
        logs.attach_archive(a.clone());
    }
    let mut state = State {
        cfg,
        store,
        catalog,
        tasks: BTreeMap::new(),
        idempotency: Default::default(),
        idem_pending: HashMap::new(),
        finished: Default::default(),
        durability: Default::default(),
        self_tx: tx.downgrade(),
        queue: RunQueue::default(),
        agents: BTreeMap::new(),
        placement: Default::default(),
        waiting: Default::default(),
        persister,
        events,
        logs,
        ids: ulid::Generator::new(),
        presence: presence::Presence::start(store_for_presence, agent_ttl, shutdown.child_token()),
        secrets,
        breakers: breakers::Breakers::new(breakers_cfg),
        retry_timers: Default::default(),
        affinity: (0, 0),
        workflows: BTreeMap::new(),
        wf_finished: Default::default(),
        wf_active: BTreeSet::new(),
        wf_dirty: BTreeSet::new(),
        wf_idempotency: HashMap::new(),
        schedules: BTreeMap::new(),
        crons: HashMap::new(),
        templates,
        clock,
        artifacts,
        archive,
        me: tx.downgrade(),
        term,
        term_over: persisted.term_over.clone(),
        unstorable: HashMap::new(),
        running_unwritten: Default::default(),
    };
    state.recover().await?;
    state.advance_workflows().await;
    let logs = state.logs.clone();
    let archive = state.archive.clone();
    let store = state.store.clone();
    let load = state.persister.load();
    let handle = tokio::spawn(async move {
        run(state, rx, persisted, shutdown).await;
        // The state (and with it every handle to the persister) is gone: what was queued is
        // committed or failed before the next term reads the store.
        let _ = persist_task.await;
    });
    Ok((
        CoreHandle {
            tx,
            logs,
            archive,
            store,
            load,
        },
        handle,
    ))
}

async fn run(
    mut state: State,
    mut rx: mpsc::Receiver<CoreMsg>,
    mut persisted: persist::PersisterEvents,
    shutdown: CancellationToken,
) {
    let term_over = persisted.term_over.clone();
    let sweep_every = (state.cfg.agent_lease_ttl() / 4).max(Duration::from_millis(25));
    let mut sweep = tokio::time::interval(sweep_every);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Schedules are checked often enough for second-granularity cron expressions.
    let mut cron_tick = tokio::time::interval(Duration::from_millis(200));
    cron_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running_tick = tokio::time::interval(running::TICK);
    running_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Each turn's writes go to the persister together, at the end of the turn.
    state.persister.stage();
    loop {
        state.flush_writes().await;
        tokio::select! {
            _ = shutdown.cancelled() => {
                // A stop is not a crash: leave RUNNING tasks RUNNING in the store.
                state.write_all_running().await;
                break;
            }
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                state.handle(msg).await;
                // Drain what is already queued before scheduling once for all of it.
                let mut n = 0;
                while n < 1024 {
                    match rx.try_recv() {
                        Ok(msg) => { state.handle(msg).await; n += 1; }
                        Err(_) => break,
                    }
                }
                state.advance_workflows().await;
                state.schedule().await;
                state.flush_breakers().await;
                state.evict_finished();
                state.evict_finished_workflows();
            }
            _ = sweep.tick() => {
                state.evict_finished();
                state.evict_finished_workflows();
                state.sweep_lost_agents().await;
                state.advance_workflows().await;
                state.schedule().await;
                state.flush_breakers().await;
            }
            _ = cron_tick.tick() => {
                state.fire_schedules().await;
                state.advance_workflows().await;
                state.schedule().await;
                state.flush_breakers().await;
            }
            _ = running_tick.tick(), if !state.running_unwritten.is_empty() => {
                state.write_due_running().await;
            }
            _ = tokio::time::sleep_until(state.next_timer()) => {
                state.release_due_retries().await;
                state.advance_workflows().await;
                state.schedule().await;
                state.flush_breakers().await;
            }
            Some(refused) = persisted.refused.recv() => {
                state.on_write_refused(refused).await;
                state.advance_workflows().await;
                state.schedule().await;
                state.flush_breakers().await;
            }
            _ = term_over.cancelled() => {
                warn!("a store commit failed: this term is over");
                break;
            }
        }
    }
    state.flush_writes().await;
    info!("core stopped");
}

impl State {
    async fn handle(&mut self, msg: CoreMsg) {
        match msg {
            CoreMsg::Submit {
                spec,
                idempotency_key,
                project,
                origin,
                reply,
            } => {
                self.submit(*spec, idempotency_key, project, origin, reply)
                    .await
            }
            CoreMsg::SubmitBatch { entries } => {
                for e in entries {
                    let (spec, key, project) = (*e.spec, e.idempotency_key, e.project);
                    let origin = msg::Origin {
                        trace: e.trace,
                        ..Default::default()
                    };
                    self.submit(spec, key, project, origin, e.reply).await;
                }
            }
            CoreMsg::SubmitLooked {
                spec,
                idempotency_key,
                project,
                origin,
                reply,
                found,
            } => {
                self.submit_looked(*spec, idempotency_key, project, origin, reply, found)
                    .await
            }
            CoreMsg::Get { id, reply } => {
                let _ = reply.send(
                    self.tasks
                        .get(&id)
                        .map(|e| {
                            let mut t = e.task.clone();
                            t.placement = self.placement_of(&t);
                            t
                        })
                        .ok_or_else(|| Error::not_found("task", id)),
                );
            }
            CoreMsg::SubscribePlacements { ids, reply } => {
                let rx = self.waiting.subscribe();
                let now = ids
                    .iter()
                    .filter_map(|id| {
                        let t = &self.tasks.get(id)?.task;
                        let p = self.placement_of(t)?;
                        let mut t = t.clone();
                        t.placement = Some(p);
                        Some(t)
                    })
                    .collect();
                let _ = reply.send((now, rx));
            }
            CoreMsg::List { req, reply } => {
                let _ = reply.send(self.list(&req));
            }
            CoreMsg::Cancel { id, reason, reply } => self.cancel(id, reason, reply).await,
            CoreMsg::Subscribe { ids, reply } => {
                let rx = self.events.subscribe();
                let snapshot = ids
                    .iter()
                    .filter_map(|id| self.tasks.get(id).map(|e| e.task.clone()))
                    .collect();
                let _ = reply.send((snapshot, rx));
            }
            CoreMsg::Register { stored, reply } => self.register(stored, reply).await,
            CoreMsg::Attach {
                agent_id,
                hello,
                tx,
                reply,
            } => self.attach(agent_id, hello, tx, reply).await,
            CoreMsg::Detach {
                agent_id,
                session,
                last_heard,
            } => self.detach(&agent_id, session, last_heard),
            CoreMsg::FromAgent {
                agent_id,
                session,
                msg,
            } => self.on_agent_message(&agent_id, session, msg).await,
            CoreMsg::ListAgents { reply } => {
                let _ = reply.send(Ok(self
                    .agents
                    .values()
                    .map(|a| self.agent_view(a))
                    .collect()));
            }
            CoreMsg::DrainAgent { id, reason, reply } => self.drain(id, reason, reply).await,
            CoreMsg::UndrainAgent { id, reason, reply } => self.undrain(id, reason, reply).await,
            CoreMsg::RemoveAgent { id, reply } => self.remove_agent(id, reply).await,
            CoreMsg::SubmitWorkflow {
                spec,
                idempotency_key,
                project,
                template,
                validated,
                trace,
                reply,
            } => {
                self.submit_workflow(
                    *spec,
                    idempotency_key,
                    project,
                    template,
                    validated,
                    trace,
                    String::new(),
                    reply,
                )
                .await
            }
            CoreMsg::GetWorkflow { id, reply } => {
                let _ = reply.send(self.get_workflow(&id));
            }
            CoreMsg::Durable { reply } => self.after_durable(vec![reply_effect(reply, ())]).await,
            CoreMsg::CancelWorkflow { id, reason, reply } => {
                self.cancel_workflow(id, reason, reply).await
            }
            CoreMsg::CreateSchedule {
                spec,
                project,
                paused,
                reply,
            } => self.create_schedule(spec, project, paused, reply).await,
            CoreMsg::GetSchedule { id, reply } => {
                let _ = reply.send(self.get_schedule(&id));
            }
            CoreMsg::ListSchedules { project, reply } => {
                let _ = reply.send(self.list_schedules(&project));
            }
            CoreMsg::PauseSchedule { id, pause, reply } => {
                self.pause_schedule(id, pause, reply).await
            }
            CoreMsg::DeleteSchedule { id, reply } => self.delete_schedule(id, reply).await,
            CoreMsg::ListBreakers { all, reply } => {
                let _ = reply.send(self.breakers.list(all));
            }
            CoreMsg::ResetBreaker { key, reply } => {
                let _ = reply.send(
                    self.breakers
                        .reset(&key)
                        .ok_or_else(|| Error::not_found("breaker", key)),
                );
                self.flush_breakers().await;
            }
            CoreMsg::ArtifactUploadStart {
                agent_id,
                task_id,
                fencing_token,
                name,
                size,
                reply,
            } => {
                let _ = reply.send(self.artifact_upload_start(
                    &agent_id,
                    &task_id,
                    fencing_token,
                    &name,
                    size,
                ));
            }
            CoreMsg::ArtifactRecord {
                agent_id,
                artifact,
                reply,
            } => self.record_artifact(&agent_id, *artifact, reply).await,
            CoreMsg::ArtifactForInput {
                agent_id,
                for_task_id,
                for_fencing_token,
                task_id,
                name,
                reply,
            } => {
                let _ = reply.send(self.artifact_for_input(
                    &agent_id,
                    &for_task_id,
                    for_fencing_token,
                    &task_id,
                    &name,
                ));
            }
            CoreMsg::ServedArtifacts {
                id,
                workflow,
                reply,
            } => {
                let _ = reply.send(if workflow {
                    self.workflow_artifacts(&id)
                } else {
                    self.task_artifacts(&id)
                });
            }
            CoreMsg::LogArchived {
                task_id,
                fencing_token,
                archived,
            } => self.on_log_archived(task_id, fencing_token, archived).await,
            CoreMsg::RerunTask {
                source,
                idempotency_key,
                trace,
                reply,
            } => {
                self.rerun_task(*source, idempotency_key, trace, reply)
                    .await
            }
            CoreMsg::RerunWorkflow {
                source,
                idempotency_key,
                trace,
                reply,
            } => {
                self.rerun_workflow(*source, idempotency_key, trace, reply)
                    .await
            }
            CoreMsg::TriggerSchedule {
                id,
                idempotency_key,
                reply,
            } => self.trigger_schedule(id, idempotency_key, reply).await,
            CoreMsg::UpdateSchedule { req, reply } => self.update_schedule(*req, reply).await,
            CoreMsg::Forget { ids } => {
                self.forget_finished(&ids);
            }
            CoreMsg::Stats { reply } => {
                let active = self.agents.values().map(|a| a.running.len()).sum();
                let _ = reply.send(CoreStats {
                    queued: self.queue.len(),
                    active,
                    total: self.tasks.len(),
                    finished_cached: self.finished.len(),
                    workflows_in_memory: self.workflows.len(),
                    connected_agents: self.agents.values().filter(|a| a.conn.is_some()).count(),
                    breakers: self.breakers.list(false),
                    running_workflows: self
                        .count_workflows(scabbard_common::proto::WorkflowState::Running),
                    pending_workflows: self
                        .count_workflows(scabbard_common::proto::WorkflowState::Pending),
                    cache_affinity_hits: self.affinity.0,
                    cache_affinity_misses: self.affinity.1,
                    projects: crate::metrics::project_loads(self),
                    registered_agents: self.agents.len(),
                    lost_agents: self.agents.values().filter(|a| a.lost).count(),
                    waiting: self.waiting_counts(),
                });
            }
        }
    }

    fn count_workflows(&self, state: scabbard_common::proto::WorkflowState) -> usize {
        self.wf_active
            .iter()
            .filter(|id| self.workflows.get(*id).is_some_and(|w| w.state() == state))
            .count()
    }

    /// Brings the dispatcher's agent index in step with agent `id` (after any change of
    /// its session, slots, attempts, capabilities, labels, drain flag or warm cache).
    pub(crate) fn sync_agent(&mut self, id: &str) {
        self.placement.sync(id, self.agents.get(id));
        self.waiting.touch();
    }

    /// Persists the breakers that changed (a new leader starts from them).
    pub(crate) async fn flush_breakers(&mut self) {
        let changes = self.breakers.take_changes();
        if !changes.is_empty() {
            self.waiting.touch();
        }
        for (key, record) in changes {
            self.write(
                format!("{BREAKER_PREFIX}{key}"),
                record.map(|r| r.encode_to_vec()),
                Vec::new(),
            )
            .await;
        }
    }

    /// When the loop must wake next for a timer (retry backoffs), at most a second away.
    fn next_timer(&self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let max = now + Duration::from_secs(1);
        match self.retry_timers.first() {
            Some((at, _)) => {
                let wait = (*at - scabbard_common::time::now_ms()).max(0) as u64;
                (now + Duration::from_millis(wait)).min(max)
            }
            None => max,
        }
    }
}

/// Idempotency keys are unique per project.
pub(crate) fn idempotency_key(project: &str, key: &str) -> String {
    format!("{project}\u{0}{key}")
}
