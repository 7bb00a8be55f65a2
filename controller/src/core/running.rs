//! RUNNING records written late. An agent's `Accepted` moves its attempt to RUNNING in
//! memory at once, but the record is written only if the attempt is still running
//! [`DELAY`] later: most short tasks finish before that, and their final record (which
//! carries the RUNNING facts too: the state went through it, `started_at_ms`) is then the
//! only write after the assignment — one commit and one encode of the task fewer per task.
//!
//! Why this is safe: nothing waits on a RUNNING write (no reply, no message to an agent;
//! the event is published once it is durable, like every other). A controller that dies
//! before it leaves the task ASSIGNED in the store with the same attempt and fencing
//! token, which recovery treats exactly as RUNNING (the agent keeps the attempt when it
//! reconnects, `Hello` lists it, and that `Hello` marks it RUNNING again: see
//! `agents::attach`). Any other write of the task in between (a result, a cancel, a
//! requeue) writes the whole record and supersedes the late one.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

/// How long an accepted attempt runs before its RUNNING record is written.
pub(crate) const DELAY: Duration = Duration::from_millis(200);

/// How often due RUNNING records are looked for (while any are pending).
pub(crate) const TICK: Duration = Duration::from_millis(50);

/// Tasks RUNNING in memory whose record still says ASSIGNED.
#[derive(Default)]
pub(crate) struct Unwritten {
    /// When each became due, in that order (entries of tasks written since stay until
    /// their time and are skipped then).
    order: VecDeque<(Instant, String)>,
    pending: HashSet<String>,
}

impl Unwritten {
    /// `id` went RUNNING now: its record is due after [`DELAY`].
    pub(crate) fn defer(&mut self, id: &str) {
        if self.pending.insert(id.to_string()) {
            self.order
                .push_back((Instant::now() + DELAY, id.to_string()));
        }
    }

    /// `id`'s whole record is being written: nothing left to write late.
    pub(crate) fn written(&mut self, id: &str) {
        if self.pending.is_empty() {
            return;
        }
        self.pending.remove(id);
        if self.pending.is_empty() {
            self.order.clear();
        }
    }

    /// Whether any RUNNING record waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Every task whose RUNNING record still waits, due or not (a controller stopping
    /// writes them all, so a restart finds them RUNNING without waiting for the agents).
    pub(crate) fn take_all(&mut self) -> Vec<String> {
        self.order.clear();
        let mut out: Vec<String> = self.pending.drain().collect();
        out.sort();
        out
    }

    /// Tasks whose RUNNING record is due at `now` (and no longer pending after this).
    pub(crate) fn due(&mut self, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.order.front() {
            if *at > now {
                break;
            }
            let Some((_, id)) = self.order.pop_front() else {
                break;
            };
            if self.pending.remove(&id) {
                out.push(id);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_after_the_delay_unless_written() {
        let mut u = Unwritten::default();
        u.defer("a");
        u.defer("b");
        u.defer("a");
        assert!(u.due(Instant::now()).is_empty());
        u.written("b");
        assert!(!u.is_empty());
        assert_eq!(u.due(Instant::now() + DELAY * 2), vec!["a".to_string()]);
        assert!(u.is_empty());
        assert!(u.due(Instant::now() + DELAY * 4).is_empty());
    }

    #[test]
    fn take_all_writes_what_is_not_due_yet() {
        let mut u = Unwritten::default();
        u.defer("b");
        u.defer("a");
        u.written("b");
        assert_eq!(u.take_all(), vec!["a".to_string()]);
        assert!(u.is_empty());
        assert!(u.due(Instant::now() + DELAY * 2).is_empty());
    }

    #[test]
    fn a_written_task_accepted_again_is_due_once() {
        let mut u = Unwritten::default();
        u.defer("a");
        u.defer("c");
        u.written("a");
        u.defer("a");
        assert_eq!(
            u.due(Instant::now() + DELAY * 2),
            vec!["a".to_string(), "c".to_string()]
        );
        assert!(u.is_empty());
    }
}
