//! Placement explanations: why each queued task is not running yet, Nomad style ("0/3
//! agents eligible: 3 missing label os=windows"), with a reason code and the agents each
//! requirement filtered out.
//!
//! Tasks of one project and placement class ([`super::scheduler::placement_class`]) wait
//! for the same reason, so an explanation is kept per (project, class), never per task: a
//! class of 10,000 tasks asking for a label nobody has costs one explanation. It is derived
//! state, owned here and never written to the store (a new leader recomputes it within a
//! second); `Get` reads it into the task, `Watch` streams on the leader get an event per
//! task when its class's explanation changes (and once for a task that arrives in a class
//! already explained).
//!
//! It must not slow dispatch: it is recomputed after a dispatch round at most every
//! [`MIN_INTERVAL_MS`], and only when something it depends on changed (the agent set or a
//! breaker, flagged by [`Waiting::touch`]), a class appeared, or [`MAX_INTERVAL_MS`] passed
//! (running counts, quotas). A recompute looks at each class once, and at each agent
//! signature of the placement index once per class: never at every queued task.
//!
//! Causes are checked in the dispatcher's order: the project's running quota, the task's
//! concurrency group, the breakers it depends on, then the agents.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use scabbard_common::proto::{
    Placement, PlacementFilter, PlacementReason, Task, TaskSpec, TaskState,
};
use scabbard_common::time::now_ms;
use tokio::sync::broadcast;

use super::State;
use super::breakers::{agent_key, task_keys};
use super::scheduler::{Candidate, GPU_CAPABILITY, PlacementClass, executor_capability, needs_gpu};

/// Least time between two recomputes.
pub(crate) const MIN_INTERVAL_MS: i64 = 200;
/// Most time between two recomputes while tasks wait.
pub(crate) const MAX_INTERVAL_MS: i64 = 1_000;
/// Most explanation events sent to Watch streams per recompute (the rest follow next time).
const MAX_EVENTS: usize = 256;

/// The explanation of one (project, class).
struct ClassWait {
    /// None: an agent can take its tasks now (they are placed in the next round).
    placement: Option<Placement>,
    /// Tasks of the class up to this queue sequence number had their event.
    announced: u64,
}

/// Explanations of waiting tasks, by project and placement class (see the module docs).
pub(crate) struct Waiting {
    classes: HashMap<String, HashMap<PlacementClass, ClassWait>>,
    last_ms: i64,
    dirty: bool,
    /// Queued tasks carrying a changed explanation, for Watch streams on this leader.
    events: broadcast::Sender<Arc<Task>>,
}

impl Default for Waiting {
    fn default() -> Self {
        Self {
            classes: HashMap::new(),
            last_ms: 0,
            dirty: true,
            events: broadcast::channel(512).0,
        }
    }
}

impl Waiting {
    /// Something explanations depend on changed (an agent, a breaker): recompute at the
    /// next chance.
    pub(crate) fn touch(&mut self) {
        self.dirty = true;
    }

    /// Explanation events (queued tasks with their new `placement`).
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Task>> {
        self.events.subscribe()
    }

    fn get(&self, project: &str, class: &PlacementClass) -> Option<&ClassWait> {
        self.classes.get(project)?.get(class)
    }
}

/// The first requirement an agent of signature `a` misses for `spec` of `project`, in the
/// order [`super::scheduler::fits`] checks them (None: it fits), with its reason code.
pub(crate) fn first_miss(
    spec: &TaskSpec,
    project: &str,
    a: &Candidate<'_>,
) -> Option<(PlacementReason, String)> {
    let has = |c: &str| a.capabilities.iter().any(|x| x == c);
    if !a.project.is_empty() && a.project != project {
        return Some((
            PlacementReason::OtherProject,
            "bound to another project".into(),
        ));
    }
    if let Some(cap) = executor_capability(spec)
        && !has(cap)
    {
        let reason = if cap == "dagger" {
            PlacementReason::NoEngine
        } else {
            PlacementReason::MissingCapability
        };
        return Some((reason, format!("capability {cap}")));
    }
    if needs_gpu(spec) && !has(GPU_CAPABILITY) {
        return Some((
            PlacementReason::MissingCapability,
            format!("capability {GPU_CAPABILITY}"),
        ));
    }
    let req = spec.requirements.as_ref()?;
    let mut caps: Vec<&String> = req.capabilities.iter().collect();
    caps.sort();
    if let Some(c) = caps.into_iter().find(|c| !has(c)) {
        return Some((
            PlacementReason::MissingCapability,
            format!("capability {c}"),
        ));
    }
    let labels: BTreeMap<&String, &String> = req.labels.iter().collect();
    labels
        .into_iter()
        .find(|(k, v)| a.labels.get(*k) != Some(*v))
        .map(|(k, v)| (PlacementReason::MissingLabel, format!("label {k}={v}")))
}

/// How a filter reads in a message: "3 missing label os=windows".
fn phrase(f: &PlacementFilter) -> String {
    if f.requirement.starts_with("label ") || f.requirement.starts_with("capability ") {
        format!("{} missing {}", f.agents, f.requirement)
    } else {
        format!("{} {}", f.agents, f.requirement)
    }
}

/// What the running counts say about a class, before the agents are looked at.
struct Holds<'a> {
    now: i64,
    running_by_project: &'a HashMap<String, u32>,
    running_by_group: &'a HashMap<String, u32>,
}

impl State {
    /// Brings the explanations up to date if one is due (see the module docs); called after
    /// each dispatch round.
    pub(crate) fn explain_waiting(&mut self) {
        let now = now_ms();
        if now - self.waiting.last_ms < MIN_INTERVAL_MS {
            return;
        }
        if self.queue.len() == 0 {
            self.waiting.classes.clear();
            self.waiting.last_ms = now;
            self.waiting.dirty = false;
            return;
        }
        let due = self.waiting.dirty || now - self.waiting.last_ms >= MAX_INTERVAL_MS;
        if !due
            && self
                .queue
                .projects()
                .all(|(p, q)| q.by_class().all(|(c, _)| self.waiting.get(p, c).is_some()))
        {
            return;
        }
        self.waiting.last_ms = now;
        self.waiting.dirty = false;
        let quotas = self
            .queue
            .projects()
            .any(|(p, _)| self.catalog.quota(p).max_running_tasks > 0);
        let running_by_project = if quotas {
            self.count_running(|t| Some(t.project.clone()))
        } else {
            HashMap::new()
        };
        let grouped = self.queue.projects().any(|(_, q)| {
            q.by_class().any(|(_, keys)| {
                keys.iter().next().is_some_and(|k| {
                    self.tasks
                        .get(&k.2)
                        .and_then(|e| e.task.spec.as_ref())
                        .is_some_and(|s| s.concurrency.is_some())
                })
            })
        });
        let running_by_group = if grouped {
            self.count_running(|t| Some(t.spec.as_ref()?.concurrency.as_ref()?.key.clone()))
        } else {
            HashMap::new()
        };
        let holds = Holds {
            now,
            running_by_project: &running_by_project,
            running_by_group: &running_by_group,
        };
        let mut old = std::mem::take(&mut self.waiting.classes);
        let watched = self.waiting.events.receiver_count() > 0;
        let mut budget = MAX_EVENTS;
        let last_seq = self.queue.last_seq();
        let mut fresh: HashMap<String, HashMap<PlacementClass, ClassWait>> = HashMap::new();
        for (project, q) in self.queue.projects() {
            for (class, keys) in q.by_class() {
                let Some(spec) = keys
                    .iter()
                    .next()
                    .and_then(|k| self.tasks.get(&k.2))
                    .and_then(|e| e.task.spec.as_ref())
                else {
                    continue;
                };
                let mut placement = self.explain(spec, project, &holds);
                let before = old.get_mut(project).and_then(|m| m.remove(class));
                let mut announced = match before {
                    Some(b) => {
                        let same = match (&b.placement, &mut placement) {
                            (Some(was), Some(now)) => {
                                let same = was.reason == now.reason
                                    && was.message == now.message
                                    && was.filtered == now.filtered
                                    && was.agents_considered == now.agents_considered;
                                if same {
                                    // Unchanged: it keeps the time it took this form.
                                    now.updated_at_ms = was.updated_at_ms;
                                }
                                same
                            }
                            (None, None) => true,
                            _ => false,
                        };
                        if same { b.announced } else { 0 }
                    }
                    None => 0,
                };
                if let Some(p) = placement.as_ref().filter(|_| watched) {
                    let mut complete = true;
                    for k in keys.iter().filter(|k| k.1 > announced) {
                        if budget == 0 {
                            complete = false;
                            break;
                        }
                        if let Some(e) = self.tasks.get(&k.2) {
                            let mut t = e.task.clone();
                            t.placement = Some(p.clone());
                            let _ = self.waiting.events.send(Arc::new(t));
                            budget -= 1;
                        }
                    }
                    if complete {
                        announced = last_seq;
                    }
                } else {
                    announced = last_seq;
                }
                fresh.entry(project.to_string()).or_default().insert(
                    class.clone(),
                    ClassWait {
                        placement,
                        announced,
                    },
                );
            }
        }
        self.waiting.classes = fresh;
    }

    /// Why tasks of `spec` in `project` wait (None: an agent can take one now).
    fn explain(&self, spec: &TaskSpec, project: &str, holds: &Holds<'_>) -> Option<Placement> {
        let now = holds.now;
        let no_breakers = self.breakers.is_empty();
        let tally = self.placement.tally(
            |a| first_miss(spec, project, a),
            |id| no_breakers || self.breakers.allows(&agent_key(id), now),
        );
        let mut filtered: Vec<PlacementFilter> = tally
            .missed
            .iter()
            .map(|((_, req), n)| PlacementFilter {
                requirement: req.clone(),
                agents: *n as u32,
            })
            .collect();
        filtered.sort_by(|a, b| {
            b.agents
                .cmp(&a.agents)
                .then(a.requirement.cmp(&b.requirement))
        });
        let considered = tally.considered as u32;
        let eligible = tally.eligible as u32;
        let mut p = Placement {
            agents_considered: considered,
            agents_eligible: eligible,
            updated_at_ms: now,
            ..Default::default()
        };
        // What the agents say, whatever else holds the task.
        let (agent_reason, agent_line) = if considered == 0 {
            (
                PlacementReason::NoAgents,
                "no agent may get work (none connected, or all draining)".to_string(),
            )
        } else if eligible == 0 {
            // The requirement that filtered out the most agents names the reason.
            let reason = tally
                .missed
                .iter()
                .max_by_key(|((r, _), n)| (*n, std::cmp::Reverse(*r as i32)))
                .map_or(PlacementReason::NoAgents, |((r, _), _)| *r);
            let parts: Vec<String> = filtered.iter().map(phrase).collect();
            let mut line = format!("0/{considered} agents eligible: {}", parts.join(", "));
            if reason == PlacementReason::NoEngine {
                line.push_str(
                    " (container and dagger_call tasks need a worker with a Dagger engine)",
                );
            }
            (reason, line)
        } else if tally.free == 0 {
            filtered.push(PlacementFilter {
                requirement: "with no free slot".into(),
                agents: eligible,
            });
            (
                PlacementReason::NoFreeSlots,
                format!("{eligible}/{considered} agents eligible, every slot busy"),
            )
        } else if !tally.usable {
            filtered.push(PlacementFilter {
                requirement: "behind an open breaker".into(),
                agents: tally.free as u32,
            });
            (
                PlacementReason::BreakerOpen,
                format!(
                    "{eligible}/{considered} agents eligible; the {} with a free slot are behind an open breaker",
                    tally.free
                ),
            )
        } else {
            (PlacementReason::Unspecified, String::new())
        };
        p.filtered = filtered;
        let quota = self.catalog.quota(project).max_running_tasks;
        let held = holds.running_by_project.get(project).copied().unwrap_or(0);
        let group = spec
            .concurrency
            .as_ref()
            .filter(|g| holds.running_by_group.get(&g.key).copied().unwrap_or(0) >= g.limit.max(1));
        let open_breaker = if no_breakers {
            None
        } else {
            task_keys(Some(spec), project).find(|k| !self.breakers.allows(k, now))
        };
        let (reason, line, by) = if quota > 0 && held >= quota {
            (
                PlacementReason::ProjectQuota,
                format!("project {project} is at its running quota ({held}/{quota} tasks running)"),
                project.to_string(),
            )
        } else if let Some(g) = group {
            let running = holds.running_by_group.get(&g.key).copied().unwrap_or(0);
            (
                PlacementReason::ConcurrencyGroup,
                format!(
                    "concurrency group {} is full ({running}/{} running)",
                    g.key,
                    g.limit.max(1)
                ),
                g.key.clone(),
            )
        } else if let Some(k) = open_breaker {
            // No countdown in the text: it would change the explanation (and send an event)
            // every second. `scabbard breakers list` shows when the next probe goes.
            (
                PlacementReason::BreakerOpen,
                format!(
                    "held by circuit breaker {k} (open; `scabbard breakers reset {k}` closes it)"
                ),
                k,
            )
        } else if agent_reason == PlacementReason::Unspecified {
            return None;
        } else {
            p.reason = agent_reason as i32;
            p.message = agent_line;
            return Some(p);
        };
        p.reason = reason as i32;
        p.blocked_by = by;
        p.message = if eligible == 0 {
            format!("{line}; and {agent_line}")
        } else {
            line
        };
        Some(p)
    }

    /// The explanation of a task as `Get` shows it: its class's for a queued task, the
    /// retry backoff for one in RETRY_WAIT, none otherwise.
    pub(crate) fn placement_of(&self, t: &Task) -> Option<Placement> {
        match t.state() {
            TaskState::Queued => {
                let (project, class) = self.queue.place_of(&t.id)?;
                self.waiting.get(project, class)?.placement.clone()
            }
            TaskState::RetryWait => {
                let now = now_ms();
                let secs = ((t.retry_at_ms - now).max(0) + 999) / 1000;
                let failed = t.attempts.len();
                Some(Placement {
                    reason: PlacementReason::WaitingRetry as i32,
                    message: format!("attempt {failed} failed; retrying in {secs}s (backoff)"),
                    updated_at_ms: now,
                    ..Default::default()
                })
            }
            _ => None,
        }
    }

    /// Waiting tasks and pending workflows by reason (`scabbard status`).
    pub(crate) fn waiting_counts(&self) -> Vec<scabbard_common::proto::WaitingCount> {
        let mut by: BTreeMap<i32, (u64, u64)> = BTreeMap::new();
        for (project, q) in self.queue.projects() {
            for (class, keys) in q.by_class() {
                let reason = self
                    .waiting
                    .get(project, class)
                    .and_then(|w| w.placement.as_ref())
                    .map_or(PlacementReason::Unspecified as i32, |p| p.reason);
                by.entry(reason).or_default().0 += keys.len() as u64;
            }
        }
        if !self.retry_timers.is_empty() {
            by.entry(PlacementReason::WaitingRetry as i32)
                .or_default()
                .0 += self.retry_timers.len() as u64;
        }
        let pending = self.count_workflows(scabbard_common::proto::WorkflowState::Pending);
        if pending > 0 {
            by.entry(PlacementReason::ConcurrencyGroup as i32)
                .or_default()
                .1 += pending as u64;
        }
        by.into_iter()
            .map(
                |(reason, (tasks, workflows))| scabbard_common::proto::WaitingCount {
                    reason,
                    tasks,
                    workflows,
                },
            )
            .collect()
    }
}

#[cfg(test)]
mod tests;
