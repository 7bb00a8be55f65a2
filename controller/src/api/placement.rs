//! Placement explanation events in task watches: the leader's core sends a queued task with
//! its new `placement` (derived state, never stored); a watch of given ids forwards it
//! between the store's state events, unless it is older than the state already sent or
//! repeats the explanation already sent.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use scabbard_common::proto::{Placement, Task, TaskEvent};
use tokio::sync::broadcast;

use crate::sealed::masked;

/// What a watch stream sent of each task, to order explanation events after state events.
pub(crate) struct Seen {
    /// The revision of the last state event sent: explanation events carry it (they change
    /// nothing in the store, so resuming from it misses nothing).
    revision: i64,
    /// Per task: the state and `updated_at_ms` of the last state event, and the last
    /// explanation sent.
    tasks: HashMap<String, (i32, i64, Option<Placement>)>,
}

impl Seen {
    /// Before any event; `revision`: where the stream starts.
    pub(crate) fn new(revision: i64) -> Self {
        Self {
            revision: revision.max(0),
            tasks: HashMap::new(),
        }
    }

    /// Notes a state event of `t` at `revision`. Only a task in `ids` (the watch's ids) is
    /// remembered: explanations are sent for those alone, and a watch of a whole project or
    /// cluster, open for months, must not keep an entry per task it ever saw.
    pub(crate) fn state(&mut self, t: &Task, revision: i64, ids: &HashSet<String>) {
        self.revision = self.revision.max(revision);
        if !ids.contains(&t.id) {
            return;
        }
        if let Some(e) = self.tasks.get_mut(&t.id) {
            *e = (t.state, t.updated_at_ms, t.placement.clone());
        } else {
            self.tasks.insert(
                t.id.clone(),
                (t.state, t.updated_at_ms, t.placement.clone()),
            );
        }
    }

    /// The event for an explanation of `t` if the watch should send it.
    pub(crate) fn placement(&mut self, t: Arc<Task>, ids: &HashSet<String>) -> Option<TaskEvent> {
        if !ids.contains(&t.id) {
            return None;
        }
        let p = t.placement.as_ref()?;
        if let Some((state, updated, last)) = self.tasks.get(&t.id) {
            // A state event newer than this explanation's task already went out.
            if *state != t.state || *updated > t.updated_at_ms {
                return None;
            }
            if last.as_ref().is_some_and(|l| same(l, p)) {
                return None;
            }
        }
        let t = Arc::unwrap_or_clone(t);
        self.tasks.insert(
            t.id.clone(),
            (t.state, t.updated_at_ms, t.placement.clone()),
        );
        Some(TaskEvent {
            task: Some(masked(t)),
            revision: self.revision,
        })
    }
}

/// Whether two explanations say the same (their times aside).
fn same(a: &Placement, b: &Placement) -> bool {
    a.reason == b.reason
        && a.message == b.message
        && a.filtered == b.filtered
        && a.agents_considered == b.agents_considered
}

/// The next explanation event, or never (no core on this controller, or it went away).
pub(crate) async fn next(rx: &mut Option<broadcast::Receiver<Arc<Task>>>) -> Option<Arc<Task>> {
    loop {
        let Some(r) = rx.as_mut() else {
            return std::future::pending().await;
        };
        match r.recv().await {
            Ok(t) => return Some(t),
            // Fell behind: later explanations still come.
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => *rx = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scabbard_common::proto::{PlacementReason, TaskState};

    fn task(state: TaskState, updated: i64, reason: Option<PlacementReason>) -> Task {
        Task {
            id: "t1".into(),
            state: state as i32,
            updated_at_ms: updated,
            placement: reason.map(|r| Placement {
                reason: r as i32,
                message: format!("{r:?}"),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Explanations follow the state they belong to, once each, at the stream's revision.
    #[test]
    fn explanations_are_sent_once_and_never_after_a_newer_state() {
        let ids: HashSet<String> = ["t1".to_string()].into();
        let mut seen = Seen::new(9);
        seen.state(&task(TaskState::Queued, 10, None), 12, &ids);
        let label = || {
            Arc::new(task(
                TaskState::Queued,
                10,
                Some(PlacementReason::MissingLabel),
            ))
        };
        let ev = seen.placement(label(), &ids).expect("a new explanation");
        assert_eq!(ev.revision, 12);
        assert!(seen.placement(label(), &ids).is_none(), "sent twice");
        let quota = Arc::new(task(
            TaskState::Queued,
            10,
            Some(PlacementReason::ProjectQuota),
        ));
        assert!(
            seen.placement(quota, &ids).is_some(),
            "a changed one goes out"
        );
        // Assigned since: an explanation of the queued task is stale.
        seen.state(&task(TaskState::Assigned, 11, None), 13, &ids);
        assert!(seen.placement(label(), &ids).is_none());
        // Not a watched id, or no explanation: nothing.
        let mut other = task(TaskState::Queued, 10, Some(PlacementReason::NoAgents));
        other.id = "t2".into();
        assert!(seen.placement(Arc::new(other), &ids).is_none());
    }

    /// A watch of everything (no ids) remembers no task, however many it sees; the
    /// revision still moves.
    #[test]
    fn a_watch_without_ids_keeps_no_entry_per_task() {
        let none = HashSet::new();
        let mut seen = Seen::new(1);
        for i in 0..10_000 {
            let mut t = task(TaskState::Succeeded, i, None);
            t.id = format!("t{i}");
            seen.state(&t, 2 + i, &none);
        }
        assert!(seen.tasks.is_empty());
        assert_eq!(seen.revision, 10_001);
    }
}
