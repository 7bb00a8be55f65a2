//! Per-project load read from the core's state when `/metrics` is scraped: queued and
//! running tasks, and the age of the oldest queued task. Cost per scrape: one walk over the
//! running attempts, and per project and placement class one lookup per priority band
//! (the queue is ordered by priority then arrival, so each band's first key is its oldest).

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::ops::Bound;

use crate::core::State;

/// One project's load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectLoad {
    pub project: String,
    pub queued: u32,
    pub running: u32,
    /// When its oldest queued task entered the queue (unix ms; 0 = nothing queued).
    pub oldest_queued_at_ms: i64,
}

/// The load of every project with queued or running tasks.
pub(crate) fn project_loads(state: &State) -> Vec<ProjectLoad> {
    let mut by: BTreeMap<&str, ProjectLoad> = BTreeMap::new();
    for a in state.agents.values() {
        for id in &a.running {
            if let Some(e) = state.tasks.get(id) {
                by.entry(e.task.project.as_str()).or_default().running += 1;
            }
        }
    }
    for (project, q) in state.queue.projects() {
        let load = by.entry(project).or_default();
        load.queued = state.queue.queued_in(project);
        let mut oldest = i64::MAX;
        for (_, keys) in q.by_class() {
            let mut next = keys.first();
            while let Some(k) = next {
                if let Some(e) = state.tasks.get(&k.2) {
                    oldest = oldest.min(e.task.updated_at_ms);
                }
                let prio = k.0.0;
                if prio == i32::MIN {
                    break;
                }
                // The next band: the first key of a lower priority.
                next = keys
                    .range((
                        Bound::Included((Reverse(prio - 1), 0, String::new())),
                        Bound::Unbounded,
                    ))
                    .next();
            }
        }
        if oldest != i64::MAX {
            load.oldest_queued_at_ms = oldest;
        }
    }
    by.into_iter()
        .map(|(p, mut l)| {
            l.project = p.to_string();
            l
        })
        .collect()
}
