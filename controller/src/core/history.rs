//! The store layout of task and workflow history: which keys a task or workflow owns
//! besides its record, so the core can keep only live work in memory, recovery can load
//! only live work, `Get`/`List` can serve finished work from the store, and the retention
//! sweeper can delete exactly what belongs to an expired task.
//!
//! | key | value | present |
//! |---|---|---|
//! | `tasks/<id>` | the task record | always |
//! | `live/<id>` | empty | while the task is not final |
//! | `done/<finished_at_ms:013>/<id>` | project name | once the task is final (the time is the final record's `updated_at_ms`; a final record never changes it again) |
//! | `idem/<project>/<key>` | task id | for a task submitted with an idempotency key |
//! | `wlive/<id>`, `wdone/<ms:013>/<id>` | as above | for workflows |
//!
//! Every key here is written in the same store transaction as the record change it
//! follows, so the layout is never half-updated.

// Used by the history and retention work of issue 14, which lands in parts.
#![allow(dead_code)]

use scabbard_common::proto::{Task, Workflow};

/// Present while a task is not final.
pub(crate) const LIVE_PREFIX: &str = "live/";
/// Final tasks by the time they finished.
pub(crate) const DONE_PREFIX: &str = "done/";
/// Idempotency keys of tasks.
pub(crate) const IDEM_PREFIX: &str = "idem/";
/// Present while a workflow is not final.
pub(crate) const WF_LIVE_PREFIX: &str = "wlive/";
/// Final workflows by the time they finished.
pub(crate) const WF_DONE_PREFIX: &str = "wdone/";

/// `live/<id>`.
pub(crate) fn live_key(id: &str) -> String {
    format!("{LIVE_PREFIX}{id}")
}

/// `done/<finished_at_ms:013>/<id>`: ascending by finish time.
pub(crate) fn done_key(finished_at_ms: i64, id: &str) -> String {
    format!("{DONE_PREFIX}{:013}/{id}", finished_at_ms.max(0))
}

/// `idem/<project>/<key>`.
pub(crate) fn idem_key(project: &str, key: &str) -> String {
    format!("{IDEM_PREFIX}{project}/{key}")
}

/// `wlive/<id>`.
pub(crate) fn wf_live_key(id: &str) -> String {
    format!("{WF_LIVE_PREFIX}{id}")
}

/// `wdone/<finished_at_ms:013>/<id>`.
pub(crate) fn wf_done_key(finished_at_ms: i64, id: &str) -> String {
    format!("{WF_DONE_PREFIX}{:013}/{id}", finished_at_ms.max(0))
}

/// Parses a `done/` or `wdone/` key into (finished_at_ms, id).
pub(crate) fn parse_done_key(key: &str) -> Option<(i64, &str)> {
    let rest = key
        .strip_prefix(DONE_PREFIX)
        .or_else(|| key.strip_prefix(WF_DONE_PREFIX))?;
    let (ms, id) = rest.split_once('/')?;
    Some((ms.parse().ok()?, id))
}

/// Every store key a final task owns besides logs, artifacts and audit entries: its
/// record, its `done/` key, its idempotency key and its index keys. Deleting all of them
/// removes the task without a trace.
pub(crate) fn task_keys(t: &Task) -> Vec<String> {
    let mut keys = vec![
        format!("{}{}", super::TASK_PREFIX, t.id),
        done_key(t.updated_at_ms, &t.id),
    ];
    if !t.idempotency_key.is_empty() {
        keys.push(idem_key(&t.project, &t.idempotency_key));
    }
    keys
}

/// Every store key a final workflow owns besides its tasks' (see [`task_keys`]).
pub(crate) fn workflow_keys(w: &Workflow) -> Vec<String> {
    vec![
        format!("{}{}", super::workflows::WORKFLOW_PREFIX, w.id),
        wf_done_key(w.finished_at_ms, &w.id),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_keys_sort_by_finish_time_and_parse_back() {
        let a = done_key(999, "b");
        let b = done_key(1_000, "a");
        assert!(a < b, "{a} {b}");
        assert_eq!(parse_done_key(&b), Some((1_000, "a")));
        assert_eq!(parse_done_key(&wf_done_key(5, "w")), Some((5, "w")));
        assert_eq!(parse_done_key("tasks/x"), None);
    }
}
