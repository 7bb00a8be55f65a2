//! Per-project load read from the core's state when `/metrics` is scraped: queued and
//! running tasks, and the age of the oldest queued task. Cost per scrape: one walk over the
//! running attempts, and per project and placement class one lookup per priority band
//! (the queue is ordered by priority then arrival, so each band's first key is its oldest).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use crate::core::State;
use crate::core::scheduler::QueueKey;

/// One project's load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectLoad {
    pub project: String,
    pub queued: u32,
    pub running: u32,
    /// When its oldest queued task entered the queue (unix ms; 0 = nothing queued).
    pub oldest_queued_at_ms: i64,
}

/// The first (oldest) key of each priority band of a queue in dispatch order.
fn band_heads(keys: &BTreeSet<QueueKey>) -> impl Iterator<Item = &QueueKey> {
    std::iter::successors(keys.first(), move |k| {
        let prio = k.0.0;
        if prio == i32::MIN {
            return None;
        }
        // The first key of a lower priority: `Reverse` orders higher priorities first.
        keys.range((
            Bound::Included((Reverse(prio - 1), 0, String::new())),
            Bound::Unbounded,
        ))
        .next()
    })
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
            for k in band_heads(keys) {
                if let Some(e) = state.tasks.get(&k.2) {
                    oldest = oldest.min(e.task.updated_at_ms);
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn band_heads_are_the_oldest_of_each_priority() {
        let keys: BTreeSet<QueueKey> = [(5, 7), (5, 3), (0, 1), (-3, 9), (-3, 4), (i32::MIN, 2)]
            .into_iter()
            .map(|(p, seq)| (Reverse(p), seq, format!("t{seq}")))
            .collect();
        let heads: Vec<u64> = band_heads(&keys).map(|k| k.1).collect();
        assert_eq!(heads, vec![3, 1, 4, 2]);
        assert_eq!(band_heads(&BTreeSet::new()).count(), 0);
    }
}
