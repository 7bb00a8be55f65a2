//! Dispatch: hands queued tasks to agents with free slots.
//!
//! Order: projects are served fairly — the one with the fewest tasks holding a slot goes
//! next (ties: its head's priority, then age) — and within a project by priority, then
//! arrival. A task is held in the queue (not failed) while its project is at its running
//! quota, its concurrency group is full, or one of its circuit breakers is open; agents
//! whose breaker is open get nothing. Agents are found through the placement index
//! ([`super::placement`]): a round never walks the agent table, and placing a task looks
//! only at agents whose signature fits it and that have a free slot.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use scabbard_common::proto::{
    self, AttemptRecord, BreakerState, ControllerMessage, ErrorClass, Outcome, Task, TaskResult,
    TaskState, controller_message,
};
use scabbard_common::time::now_ms;
use tracing::debug;

use super::breakers::{agent_key, task_keys};
use super::placement::Choice;
use super::scheduler::{self, PlacementClass, QueueKey};
use super::{State, agent_effect};

/// A project's turn: (slots it holds, its head's priority, its head's age, cursor index);
/// the smallest goes first.
type Turn = (u32, Reverse<i32>, u64, usize);

/// Most queued tasks of one project looked at per dispatch round. Unplaceable classes cost
/// one look each, so this bounds a round only against a project whose tasks are each
/// their own class; other projects have their own budget.
const PROJECT_SCAN_BUDGET: usize = 1_024;

/// Where the dispatcher stands in one project's queue during a round: each placement
/// class still in the round, and a heap of their heads (priority, then age).
struct ProjectCursor<'a> {
    project: &'a str,
    classes: Vec<std::iter::Peekable<std::collections::btree_set::Iter<'a, QueueKey>>>,
    /// The placement class of each entry of `classes`.
    class_of: Vec<&'a PlacementClass>,
    heads: BinaryHeap<Reverse<(Reverse<i32>, u64, usize)>>,
    /// Tasks looked at this round.
    scanned: usize,
}

impl<'a> ProjectCursor<'a> {
    fn new(project: &'a str, q: &'a scheduler::ProjectQueue) -> Self {
        let (class_of, mut classes): (Vec<_>, Vec<_>) =
            q.by_class().map(|(k, c)| (k, c.iter().peekable())).unzip();
        let heads = classes
            .iter_mut()
            .enumerate()
            .filter_map(|(ci, it)| it.peek().map(|k| Reverse((k.0, k.1, ci))))
            .collect();
        Self {
            project,
            classes,
            class_of,
            heads,
            scanned: 0,
        }
    }

    /// The best head among the classes still in the round (priority, arrival).
    fn head(&self) -> Option<(Reverse<i32>, u64)> {
        self.heads.peek().map(|Reverse((p, s, _))| (*p, *s))
    }

    /// Takes the best class's head out of the heap: the caller then either
    /// [`advance`](Self::advance)s that class (the task was placed or skipped alone) or
    /// leaves it out for the rest of the round (its class is blocked).
    fn next(&mut self) -> Option<(usize, &'a QueueKey)> {
        let Reverse((_, _, ci)) = self.heads.pop()?;
        self.scanned += 1;
        let key = *self.classes[ci].peek()?;
        Some((ci, key))
    }

    /// Moves class `ci` past its head and puts it back in the heap.
    fn advance(&mut self, ci: usize) {
        let it = &mut self.classes[ci];
        it.next();
        if let Some(k) = it.peek() {
            self.heads.push(Reverse((k.0, k.1, ci)));
        }
    }
}

impl State {
    /// Hands queued tasks to agents with free slots, then brings the explanations of those
    /// still waiting up to date (rate-limited: see [`super::waiting`]).
    pub(crate) async fn schedule(&mut self) {
        self.dispatch().await;
        self.explain_waiting();
    }

    /// Hands queued tasks to agents with free slots.
    async fn dispatch(&mut self) {
        if self.queue.len() == 0 {
            return;
        }
        let now = now_ms();
        let affinity_wait = self.cfg.cache_affinity_wait_ms as i64;
        // Breakers not closed allow one new attempt per round (a probe), so admits below
        // cannot overshoot what `allows` saw.
        let mut probing: HashSet<String> = HashSet::new();
        let no_breakers = self.breakers.is_empty();
        // Agents with a free slot, over every agent that may get work (the index keeps the
        // sum: no walk over the agents).
        let mut free = self.placement.free_slots();
        if free == 0 {
            return;
        }
        let _round = crate::metrics::DispatchRound::start();
        // Tasks holding a slot per project (for fairness and running quotas) and per
        // concurrency group: counted only when needed, as that walks every running task.
        let active: HashMap<String, u32> = if self.queue.project_count() > 1
            || self
                .queue
                .projects()
                .any(|(p, _)| self.catalog.quota(p).max_running_tasks > 0)
        {
            self.count_running(|t| Some(t.project.clone()))
        } else {
            HashMap::new()
        };
        let mut groups: Option<HashMap<String, u32>> = None;
        let mut plan: Vec<(QueueKey, String)> = Vec::new();
        let mut cursors: Vec<ProjectCursor<'_>> = self
            .queue
            .projects()
            .map(|(p, q)| ProjectCursor::new(p, q))
            .collect();
        // Min-heap on (slots held, head priority, head age).
        let mut heap: BinaryHeap<Reverse<Turn>> = BinaryHeap::new();
        for (i, c) in cursors.iter().enumerate() {
            if let Some((prio, seq)) = c.head() {
                let held = active.get(c.project).copied().unwrap_or(0);
                heap.push(Reverse((held, prio, seq, i)));
            }
        }
        while free > 0 {
            let Some(Reverse((held, _, _, i))) = heap.pop() else {
                break;
            };
            let project = cursors[i].project;
            let max_running = self.catalog.quota(project).max_running_tasks;
            if max_running > 0 && held >= max_running {
                continue; // at its quota: the rest of this project waits
            }
            let mut placed = false;
            // The project's classes, best head first; a class none of whose tasks can be
            // placed this round (no fitting agent with a free slot, its concurrency group
            // full, a breaker open) leaves the round after one look at its head: slots
            // only get scarcer within a round.
            while let Some((ci, key)) = cursors[i].next() {
                if cursors[i].scanned > PROJECT_SCAN_BUDGET {
                    break; // this project had its share of looking this round
                }
                let Some(task) = self.tasks.get(&key.2).map(|e| &e.task) else {
                    cursors[i].advance(ci);
                    continue;
                };
                let Some(spec) = task.spec.as_ref() else {
                    cursors[i].advance(ci);
                    continue;
                };
                if let Some(g) = spec.concurrency.as_ref() {
                    let groups = groups.get_or_insert_with(|| {
                        self.count_running(|t| {
                            Some(t.spec.as_ref()?.concurrency.as_ref()?.key.clone())
                        })
                    });
                    if groups.get(&g.key).copied().unwrap_or(0) >= g.limit.max(1) {
                        continue; // the class is blocked: dropped for this round
                    }
                }
                if !no_breakers
                    && !task_keys(Some(spec), &task.project).all(|k| {
                        self.breakers.allows(&k, now)
                            && (self.breakers.state(&k) == BreakerState::Closed
                                || !probing.contains(&k))
                    })
                {
                    continue;
                }
                // Agents whose breaker is open get nothing; a half-open one gets one probe
                // per round.
                let usable = |id: &str| {
                    no_breakers || {
                        let k = agent_key(id);
                        self.breakers.allows(&k, now)
                            && (self.breakers.state(&k) == BreakerState::Closed
                                || !probing.contains(&k))
                    }
                };
                let container = matches!(spec.kind, Some(proto::task_spec::Kind::Container(_)));
                let score = |id: &str| {
                    if !container {
                        return 0;
                    }
                    self.agents.get(id).map_or(0, |a| a.warm.score(spec))
                };
                let class = cursors[i].class_of[ci];
                let agent = match self
                    .placement
                    .pick(spec, &task.project, class, usable, score)
                {
                    Choice::Agent(a) => a,
                    // A warmer engine is busy: wait for it a little, then take a cold one.
                    Choice::WarmerBusy(a) if now - task.updated_at_ms >= affinity_wait => a,
                    // Only this task waits (its image is warm elsewhere): next in its class.
                    Choice::WarmerBusy(_) => {
                        cursors[i].advance(ci);
                        continue;
                    }
                    Choice::None => continue,
                };
                if let Some(g) = spec.concurrency.as_ref()
                    && let Some(groups) = groups.as_mut()
                {
                    *groups.entry(g.key.clone()).or_default() += 1;
                }
                if !no_breakers {
                    for k in task_keys(Some(spec), &task.project).chain([agent_key(&agent)]) {
                        if self.breakers.state(&k) != BreakerState::Closed {
                            probing.insert(k);
                        }
                    }
                }
                self.placement.reserve(&agent);
                free -= 1;
                plan.push((key.clone(), agent));
                cursors[i].advance(ci);
                placed = true;
                break;
            }
            if placed && let Some((prio, seq)) = cursors[i].head() {
                heap.push(Reverse((held + 1, prio, seq, i)));
            }
        }
        drop(cursors);
        for (key, agent) in plan {
            self.queue.remove(&key);
            self.assign(&key.2, &agent, now).await;
            // The true count, also when the assignment could not be made.
            if let Some(a) = self.agents.get(&agent) {
                self.placement.sync_running(&agent, a);
            }
        }
    }

    /// Tasks holding an agent slot, counted by `key` (tasks it maps to None are skipped).
    pub(super) fn count_running(
        &self,
        key: impl Fn(&Task) -> Option<String>,
    ) -> HashMap<String, u32> {
        let mut out = HashMap::new();
        for id in self.agents.values().flat_map(|a| a.running.iter()) {
            if let Some(k) = self.tasks.get(id).and_then(|e| key(&e.task)) {
                *out.entry(k).or_default() += 1;
            }
        }
        out
    }

    async fn assign(&mut self, task_id: &str, agent_id: &str, now: i64) {
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
        let t = &mut entry.task;
        entry.queue_key = None;
        let number = t.attempts.len() as u32 + 1;
        let token = super::term::fencing_token(self.term, number);
        t.attempts.push(AttemptRecord {
            number,
            fencing_token: token,
            agent_id: agent_id.to_string(),
            assigned_at_ms: now,
            ..Default::default()
        });
        t.fencing_token = token;
        t.agent_id = agent_id.to_string();
        t.state = TaskState::Assigned as i32;
        t.updated_at_ms = now;
        agent.running.insert(task_id.to_string());
        self.placement.sync_running(agent_id, agent);
        if let Some(spec) = t.spec.as_ref()
            && matches!(spec.kind, Some(proto::task_spec::Kind::Container(_)))
        {
            if agent.warm.has_image(spec) {
                self.affinity.0 += 1;
            } else {
                self.affinity.1 += 1;
            }
        }
        for k in task_keys(t.spec.as_ref(), &t.project).chain([agent_key(agent_id)]) {
            self.breakers.admit(&k, now);
        }
        let project = t.project.clone();
        let (traceparent, tracestate) = super::trace::assign_context(t, number);
        let msg = ControllerMessage {
            msg: Some(controller_message::Msg::Assign(proto::Assign {
                task_id: task_id.to_string(),
                fencing_token: token,
                attempt: number,
                spec,
                project,
                traceparent,
                tracestate,
            })),
        };
        debug!(
            task = task_id,
            agent = agent_id,
            attempt = number,
            "assigned"
        );
        let effects = vec![agent_effect(conn.tx.clone(), msg)];
        self.persist_entry(task_id, effects).await;
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
        self.persist_task(task, Vec::new()).await;
    }
}
