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
//! | `hist/t/<inverted id>` | project name | every task: all tasks, newest first |
//! | `hist/p/<project>/<inverted id>` | empty | every task: a project's tasks, newest first |
//! | `hist/l/<project>/<hex key>.<hex value>/<inverted id>` | empty | per short label of a task (at most 32) |
//! | `hist/lx/<project>/<inverted id>` | empty | a task with more than 32 short labels (none indexed) |
//! | `hist/w/`, `hist/wp/<project>/`, `hist/wl/…`, `hist/wlx/…` + `<inverted id>` | as the task index | every workflow: by id, project and spec labels ([`WORKFLOW_INDEX`]) |
//! | `widem/<project>/<key>` | workflow id | for a workflow submitted with an idempotency key |
//! | `meta/layout` | `3` | once every task (`2`) and workflow (`3`) has the keys above (written by the migration) |
//!
//! Every key here is written in the same store transaction as the record change it
//! follows (a [`persist::Write`](super::persist::Write)'s `also` keys), so the layout is
//! never half-updated. The index keys never change after the submit: a task's id, project
//! and creation time are fixed, so `List` filters the state and labels on the records it
//! reads (see `api::list`).
//!
//! The *inverted id* maps every character `c` of a (lower-case Crockford base32) ULID to
//! the character at `31 - index(c)`: an ascending store range over inverted ids is newest
//! first, and because a ULID starts with its creation time, a time range is a key range.

mod memory;
mod read;

use prost::Message;
use scabbard_common::proto::{Task, Workflow};
use scabbard_common::{Error, Result, is_final};

pub(crate) use memory::{Durability, FinishedCache, IdemMemory};
pub(crate) use read::{
    get_many, lookup, read_task, read_tasks, read_workflow, read_workflow_records,
};

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
/// Idempotency keys of workflows.
pub(crate) const WF_IDEM_PREFIX: &str = "widem/";

/// `widem/<project>/<key>`.
pub(crate) fn wf_idem_key(project: &str, key: &str) -> String {
    format!("{WF_IDEM_PREFIX}{project}/{key}")
}

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

/// Every task, newest first.
pub(crate) const TASK_INDEX_PREFIX: &str = "hist/t/";
/// A project's tasks, newest first.
pub(crate) const PROJECT_INDEX_PREFIX: &str = "hist/p/";
/// The layout version, once the migration has written every key above.
pub(crate) const LAYOUT_KEY: &str = "meta/layout";
/// [`LAYOUT_KEY`]'s value in this layout (`2`: tasks have their history keys; `3`:
/// workflows too).
pub(crate) const LAYOUT_VERSION: &[u8] = b"3";
/// [`LAYOUT_KEY`]'s value once tasks (not yet workflows) have their history keys.
pub(crate) const TASK_LAYOUT_VERSION: &[u8] = b"2";

/// Crockford base32, lower case, as ids are written: ascending in ASCII.
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// The inverted id (see the module docs); `None` for a string that is not a ULID.
pub(crate) fn invert_id(id: &str) -> Option<String> {
    if id.len() != 26 {
        return None;
    }
    id.bytes()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            ALPHABET
                .iter()
                .position(|a| *a == c)
                .map(|i| ALPHABET[31 - i] as char)
        })
        .collect()
}

/// The id an inverted id came from (inversion is its own inverse).
pub(crate) fn uninvert_id(inv: &str) -> Option<String> {
    invert_id(inv)
}

/// The inverted form of the smallest id created at `ms`: every id created at `ms` or later
/// inverts to a key at or before it; every earlier one to a key after it.
pub(crate) fn inverted_time_bound(ms: i64) -> String {
    let ulid = ulid::Ulid::from_parts(ms.max(0) as u64, 0)
        .to_string()
        .to_lowercase();
    invert_id(&ulid).expect("a ulid")
}

/// A project's tasks carrying label `key=value`, newest first.
pub(crate) const LABEL_INDEX_PREFIX: &str = "hist/l/";

/// One kind of history index: every record newest first, a project's, per label, and the
/// mark of records whose labels are not indexed. Tasks and workflows each have one; `List`
/// (`api::list`) pages both through the same code.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IndexSpace {
    /// `<all><inverted id>` → project name.
    pub(crate) all: &'static str,
    /// `<project><name>/<inverted id>` → empty.
    pub(crate) project: &'static str,
    /// `<label><name>/<hex key>.<hex value>/<inverted id>` → empty.
    pub(crate) label: &'static str,
    /// `<overflow><name>/<inverted id>` → empty.
    pub(crate) overflow: &'static str,
}

/// The task index (`hist/t/`, `hist/p/`, `hist/l/`, `hist/lx/`).
pub(crate) const TASK_INDEX: IndexSpace = IndexSpace {
    all: TASK_INDEX_PREFIX,
    project: PROJECT_INDEX_PREFIX,
    label: LABEL_INDEX_PREFIX,
    overflow: LABEL_OVERFLOW_PREFIX,
};

/// The workflow index (`hist/w/`, `hist/wp/`, `hist/wl/`, `hist/wlx/`): by the workflow's
/// id, project and spec labels.
pub(crate) const WORKFLOW_INDEX: IndexSpace = IndexSpace {
    all: "hist/w/",
    project: "hist/wp/",
    label: "hist/wl/",
    overflow: "hist/wlx/",
};

impl IndexSpace {
    /// `<project prefix><project>/`: the prefix of a project's index.
    pub(crate) fn project_prefix(&self, project: &str) -> String {
        format!("{}{project}/", self.project)
    }

    /// The prefix of a label's index in a project (hex: labels may hold any character).
    pub(crate) fn label_prefix(&self, project: &str, key: &str, value: &str) -> String {
        format!(
            "{}{project}/{}.{}/",
            self.label,
            hex::encode(key),
            hex::encode(value)
        )
    }

    /// The prefix of a project's records whose labels are not indexed.
    pub(crate) fn overflow_prefix(&self, project: &str) -> String {
        format!("{}{project}/", self.overflow)
    }

    /// The index keys of a record (none for an id that is not a ULID: tests' hand-made ids).
    pub(crate) fn keys(
        &self,
        id: &str,
        project: &str,
        labels: Option<&std::collections::HashMap<String, String>>,
    ) -> Vec<(String, Vec<u8>)> {
        let Some(inv) = invert_id(id) else {
            return Vec::new();
        };
        let mut out = vec![
            (format!("{}{inv}", self.all), project.as_bytes().to_vec()),
            (format!("{}{inv}", self.project_prefix(project)), Vec::new()),
        ];
        let short: Vec<_> = labels
            .into_iter()
            .flatten()
            .filter(|(k, v)| label_indexable(k, v))
            .collect();
        if short.len() <= MAX_INDEXED_LABELS {
            for (k, v) in short {
                out.push((
                    format!("{}{inv}", self.label_prefix(project, k, v)),
                    Vec::new(),
                ));
            }
        } else {
            // Too many to index in one commit: listed by label through the project index.
            out.push((
                format!("{}{inv}", self.overflow_prefix(project)),
                Vec::new(),
            ));
        }
        out
    }
}

/// The index keys of a task.
fn index_keys(t: &Task) -> Vec<(String, Vec<u8>)> {
    TASK_INDEX.keys(&t.id, &t.project, t.spec.as_ref().map(|s| &s.labels))
}

/// Labels longer than this (key and value) are not indexed (their filter scans).
pub(crate) const MAX_LABEL_INDEX_BYTES: usize = 128;
/// A task with more indexable labels than this indexes none (and is marked, see
/// [`LABEL_OVERFLOW_PREFIX`]): its keys must fit one store transaction.
pub(crate) const MAX_INDEXED_LABELS: usize = 32;
/// `hist/lx/<project>/<inverted id>`: tasks whose labels are not indexed. While a project
/// has any, `List` by label in it goes through the project index.
pub(crate) const LABEL_OVERFLOW_PREFIX: &str = "hist/lx/";

/// Whether label `k=v` gets an index key.
pub(crate) fn label_indexable(k: &str, v: &str) -> bool {
    k.len() + v.len() <= MAX_LABEL_INDEX_BYTES
}

/// The keys written with a task's first record: `live/` (unless it is born final), its
/// index keys and its idempotency key.
pub(crate) fn submit_ops(t: &Task) -> Vec<(String, Option<Vec<u8>>)> {
    let mut ops: Vec<(String, Option<Vec<u8>>)> = index_keys(t)
        .into_iter()
        .map(|(k, v)| (k, Some(v)))
        .collect();
    if !t.idempotency_key.is_empty() {
        ops.push((
            idem_key(&t.project, &t.idempotency_key),
            Some(t.id.as_bytes().to_vec()),
        ));
    }
    if !is_final(t.state()) {
        ops.push((live_key(&t.id), Some(Vec::new())));
    }
    ops
}

/// Whether a final task still has an attempt log the leader has not archived in the blob
/// store (the worker keeps its spool until then): such a task keeps its `live/` key, so a
/// new leader loads it and can archive the log its workers replay.
pub(crate) fn log_pending(t: &Task) -> bool {
    t.attempts
        .iter()
        .any(|a| a.log_chunks > 0 && a.log_archive.is_empty())
}

/// The keys written with the record that makes a task final: `live/` deleted (unless
/// `keep_live`: its log is not archived yet, see [`log_pending`]), `done/` put (and, when
/// an earlier final record of it had another time, that one's `done/` deleted).
pub(crate) fn final_ops(
    t: &Task,
    earlier_done_ms: Option<i64>,
    keep_live: bool,
) -> Vec<(String, Option<Vec<u8>>)> {
    let live = (live_key(&t.id), keep_live.then(Vec::new));
    let mut ops = vec![
        live,
        (
            done_key(t.updated_at_ms, &t.id),
            Some(t.project.as_bytes().to_vec()),
        ),
    ];
    if let Some(ms) = earlier_done_ms.filter(|ms| *ms != t.updated_at_ms) {
        ops.push((done_key(ms, &t.id), None));
    }
    ops
}

/// Every key the migration to this layout writes for a task record (all idempotent puts).
pub(crate) fn migration_ops(t: &Task) -> Vec<(String, Option<Vec<u8>>)> {
    let mut ops = submit_ops(t);
    if is_final(t.state()) {
        ops.push((
            done_key(t.updated_at_ms, &t.id),
            Some(t.project.as_bytes().to_vec()),
        ));
    }
    ops
}

/// Every key (with its value) a finished task has in this layout, its record first: for
/// tools that write history straight into a store (`scabbard-bench --kind history`).
pub fn finished_task_records(t: &Task) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![(format!("{}{}", super::TASK_PREFIX, t.id), t.encode_to_vec())];
    out.extend(
        migration_ops(t)
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v))),
    );
    out
}

/// The key and value that mark a store as written in this layout.
pub fn layout_marker() -> (String, Vec<u8>) {
    (LAYOUT_KEY.to_string(), LAYOUT_VERSION.to_vec())
}

/// A `List` page position: opaque to clients (`h1.` and the hex of the inverted id of the
/// last task the page looked at).
pub(crate) fn encode_page_token(inverted_id: &str) -> String {
    format!("h1.{}", hex::encode(inverted_id))
}

/// The inverted id a page token continues after; `INVALID_ARGUMENT` when it is not one
/// this server issued.
pub(crate) fn decode_page_token(token: &str) -> Result<String> {
    let bad = || {
        Error::invalid(format!(
            "page_token {:?} is not a token a List response issued: pass a response's next_page_token unchanged, or leave page_token empty for the first page",
            token.chars().take(80).collect::<String>()
        ))
    };
    let hex_part = token.strip_prefix("h1.").ok_or_else(bad)?;
    let bytes = hex::decode(hex_part).map_err(|_| bad())?;
    let inv = String::from_utf8(bytes).map_err(|_| bad())?;
    invert_id(&inv).ok_or_else(bad)?;
    Ok(inv)
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
        live_key(&t.id),
    ];
    if !t.idempotency_key.is_empty() {
        keys.push(idem_key(&t.project, &t.idempotency_key));
    }
    keys.extend(index_keys(t).into_iter().map(|(k, _)| k));
    keys
}

/// The index keys of a workflow (by its id, project and spec labels).
fn workflow_index_keys(w: &Workflow) -> Vec<(String, Vec<u8>)> {
    WORKFLOW_INDEX.keys(&w.id, &w.project, w.spec.as_ref().map(|s| &s.labels))
}

/// Every store key a final workflow owns besides its tasks' (see [`task_keys`]): the
/// header, every node's records, the `wdone/` and `wlive/` keys, its index keys and its
/// idempotency key. `w` may be a header without nodes (retention ranges the parts).
pub(crate) fn workflow_keys(w: &Workflow) -> Vec<String> {
    use super::workflows::records;
    let mut keys = vec![
        records::header_key(&w.id),
        wf_done_key(w.finished_at_ms, &w.id),
        wf_live_key(&w.id),
    ];
    for n in &w.nodes {
        keys.push(records::node_key(&w.id, &n.name));
        keys.push(records::task_key(&w.id, &n.name));
    }
    if !w.idempotency_key.is_empty() {
        keys.push(wf_idem_key(&w.project, &w.idempotency_key));
    }
    keys.extend(workflow_index_keys(w).into_iter().map(|(k, _)| k));
    keys
}

/// The keys written with a new workflow's first header: its index keys and its
/// idempotency key (never changed after; see [`workflow_ops`] for `wlive/`/`wdone/`).
pub(crate) fn workflow_submit_ops(w: &Workflow) -> Vec<(String, Option<Vec<u8>>)> {
    let mut ops: Vec<(String, Option<Vec<u8>>)> = workflow_index_keys(w)
        .into_iter()
        .map(|(k, v)| (k, Some(v)))
        .collect();
    if !w.idempotency_key.is_empty() {
        ops.push((
            wf_idem_key(&w.project, &w.idempotency_key),
            Some(w.id.as_bytes().to_vec()),
        ));
    }
    ops
}

/// The keys written with a workflow's header: `wlive/` while it runs; once final,
/// `wlive/` deleted and `wdone/` put (idempotent: a final header keeps its time).
pub(crate) fn workflow_ops(w: &Workflow) -> Vec<(String, Option<Vec<u8>>)> {
    if super::workflows::workflow_final(w.state()) {
        vec![
            (wf_live_key(&w.id), None),
            (
                wf_done_key(w.finished_at_ms, &w.id),
                Some(w.project.as_bytes().to_vec()),
            ),
        ]
    } else {
        vec![(wf_live_key(&w.id), Some(Vec::new()))]
    }
}

/// Every key the migration to layout 3 writes for a workflow header (all idempotent).
pub(crate) fn workflow_migration_ops(w: &Workflow) -> Vec<(String, Option<Vec<u8>>)> {
    let mut ops = workflow_submit_ops(w);
    ops.extend(workflow_ops(w));
    ops
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

    #[test]
    fn inverted_ids_sort_newest_first_and_time_bounds_split_them() {
        let old = ulid::Ulid::from_parts(1_000, 5).to_string().to_lowercase();
        let new = ulid::Ulid::from_parts(2_000, 1).to_string().to_lowercase();
        let (io, inn) = (invert_id(&old).unwrap(), invert_id(&new).unwrap());
        assert!(inn < io);
        assert_eq!(uninvert_id(&io).unwrap(), old);
        // Created at or after 2000 → at or before the bound; earlier → after it.
        let b = inverted_time_bound(2_000);
        assert!(inn <= b && io > b);
        assert!(invert_id("not-a-ulid").is_none());
    }

    #[test]
    fn the_finished_cache_evicts_oldest_first_and_only_durable_tasks() {
        let mut d = Durability::default();
        let mut c = FinishedCache::default();
        let mut effects = Vec::new();
        for id in ["a", "b", "c"] {
            let (seq, effect) = d.track();
            effects.push(effect);
            assert_eq!(c.finished(id, 1, seq), None);
        }
        assert_eq!(
            c.finished("b", 2, 99),
            Some(1),
            "a rewrite returns the earlier time"
        );
        // Nothing durable yet: nothing leaves.
        assert_eq!(c.pop_evictable(1, &d), None);
        for e in effects.drain(..2) {
            e(&Ok(()));
        }
        assert_eq!(c.pop_evictable(1, &d).as_deref(), Some("a"));
        c.remove("b");
        // "b" is gone (its entry stale); "c" is not durable: it stays.
        assert_eq!(c.pop_evictable(0, &d), None);
        assert_eq!(c.len(), 1);
    }

    fn task_with_labels(n: usize, long: bool) -> Task {
        let mut spec = scabbard_common::proto::TaskSpec::default();
        for i in 0..n {
            spec.labels.insert(format!("k{i}"), "v".into());
        }
        if long {
            spec.labels.insert("big".into(), "x".repeat(4096));
        }
        Task {
            id: ulid::Ulid::new().to_string().to_lowercase(),
            project: "p".into(),
            spec: Some(spec),
            ..Default::default()
        }
    }

    #[test]
    fn short_labels_are_indexed_up_to_a_bound_and_every_key_is_owned() {
        let t = task_with_labels(3, true);
        let keys = submit_ops(&t);
        let labels = keys
            .iter()
            .filter(|(k, _)| k.starts_with(LABEL_INDEX_PREFIX));
        assert_eq!(labels.count(), 3, "the long label is not indexed");
        assert!(keys.iter().all(|(k, _)| k.len() < 512));
        let owned = task_keys(&t);
        for (k, _) in &keys {
            assert!(owned.contains(k), "{k} is not in task_keys");
        }
        // Too many: none indexed, the task is marked instead; its keys fit one etcd txn.
        let t = task_with_labels(MAX_INDEXED_LABELS + 1, false);
        let keys = submit_ops(&t);
        assert!(!keys.iter().any(|(k, _)| k.starts_with(LABEL_INDEX_PREFIX)));
        assert!(
            keys.iter()
                .any(|(k, _)| k.starts_with(LABEL_OVERFLOW_PREFIX))
        );
        assert!(submit_ops(&task_with_labels(MAX_INDEXED_LABELS, false)).len() < 127);
    }

    #[test]
    fn a_workflow_owns_its_index_and_idempotency_keys_in_its_own_index() {
        let mut spec = scabbard_common::proto::WorkflowSpec::default();
        spec.labels.insert("team".into(), "a".into());
        let w = Workflow {
            id: ulid::Ulid::new().to_string().to_lowercase(),
            project: "p".into(),
            spec: Some(spec),
            idempotency_key: "k".into(),
            ..Default::default()
        };
        let ops = workflow_migration_ops(&w);
        let owned = workflow_keys(&w);
        for (k, v) in &ops {
            if v.is_some() {
                assert!(owned.contains(k), "{k} is not in workflow_keys");
            }
            // Never in the task index: task lists do not see workflows.
            assert!(!k.starts_with(TASK_INDEX.all) && !k.starts_with(TASK_INDEX.project));
        }
        let label = WORKFLOW_INDEX.label_prefix("p", "team", "a");
        assert!(ops.iter().any(|(k, _)| k.starts_with(&label)));
        assert!(ops.iter().any(|(k, _)| *k == wf_idem_key("p", "k")));
        assert!(
            ops.iter()
                .any(|(k, v)| *k == wf_live_key(&w.id) && v.is_some())
        );
    }

    #[test]
    fn page_tokens_round_trip_and_bad_ones_are_refused() {
        let inv = invert_id(&ulid::Ulid::new().to_string().to_lowercase()).unwrap();
        assert_eq!(decode_page_token(&encode_page_token(&inv)).unwrap(), inv);
        for bad in ["x", "h1.zz", "h1.", "01hxyz", &hex::encode("short")] {
            let e = decode_page_token(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e}");
        }
    }
}
