//! The chaos checker: after a run, reads every acknowledged task back (through the API) and
//! the store's whole history of task records and term claims (a watch from revision 1), and
//! counts every broken invariant:
//! - every acknowledged task reaches exactly one final state (once a record is final, no later
//!   write changes its state or result) and it is SUCCEEDED (the chaos tasks all exit 0);
//! - its log holds every numbered line exactly once, in order;
//! - the recorded result is the last attempt's (fencing token), in every version;
//! - no two leaders both committed: every attempt appears first in a write made under its
//!   own term (`meta/term` at that revision equals the token's high half), so a superseded
//!   leader never committed after the next term was claimed; term claims go up by one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use prost::Message;
use scabbard_common::proto::{Task, TaskState};
use scabbard_controller::store::{Store, WatchEvent};

use super::Report;
use crate::{Tasks, get, logs};

/// A task the controller acknowledged, and what its log must say.
#[derive(Debug, Clone)]
pub struct Acked {
    /// Task id.
    pub id: String,
    /// Each line is `<label> <n>` for n in 1..=lines.
    pub label: String,
    /// Number of lines.
    pub lines: u32,
}

impl Acked {
    /// The exact log the task must leave.
    pub fn expected_log(&self) -> String {
        (1..=self.lines)
            .map(|n| format!("{} {n}\n", self.label))
            .collect()
    }
}

/// The shell script that prints `label 1` … `label lines`, pausing `pause_ms` between lines.
pub fn numbered_script(label: &str, lines: u32, pause_ms: u32) -> String {
    format!(
        "i=1; while [ $i -le {lines} ]; do echo \"{label} $i\"; i=$((i+1)); sleep {}; done",
        f64::from(pause_ms) / 1000.0
    )
}

/// Reads the task back until the API answers (a failover may be under way).
async fn read_task(tasks: &Tasks, id: &str) -> Option<Task> {
    for _ in 0..50 {
        let mut c = tasks.clone();
        if let Ok(Ok(t)) = tokio::time::timeout(Duration::from_secs(5), get(&mut c, id)).await {
            return Some(t);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Checks every acknowledged task through the API, adding to `report`.
pub async fn check_tasks(tasks: &Tasks, acked: &[Acked], report: &mut Report) -> Result<()> {
    for a in acked {
        let Some(t) = read_task(tasks, &a.id).await else {
            report.lost += 1;
            report
                .problems
                .push(format!("task {} cannot be read", a.id));
            continue;
        };
        report.attempts += t.attempts.len();
        if !scabbard_common::is_final(t.state()) {
            report.lost += 1;
            report
                .problems
                .push(format!("task {} never finished: {:?}", a.id, t.state()));
            continue;
        }
        if t.state() != TaskState::Succeeded {
            report.not_succeeded += 1;
            report.problems.push(format!(
                "task {} ended {:?}: {:?}",
                a.id,
                t.state(),
                t.result
            ));
        }
        if !result_is_last_attempts(&t) {
            report.superseded_results += 1;
            report
                .problems
                .push(format!("task {}: result not from its last attempt", a.id));
        }
        let mut c = tasks.clone();
        let log = match tokio::time::timeout(Duration::from_secs(10), logs(&mut c, &a.id, 0, false))
            .await
        {
            Ok(Ok(l)) => l,
            _ => {
                report
                    .problems
                    .push(format!("task {}: log unreadable", a.id));
                report.log_lines_lost += a.lines as usize;
                continue;
            }
        };
        let (lost, dup) = compare_lines(&log, a);
        if lost + dup > 0 {
            report.problems.push(format!(
                "task {}: log {log:?} (lost {lost}, duplicated {dup})",
                a.id
            ));
        }
        report.log_lines_lost += lost;
        report.log_lines_duplicated += dup;
    }
    Ok(())
}

/// Lines missing or out of order, and lines seen more than once.
fn compare_lines(log: &str, a: &Acked) -> (usize, usize) {
    if log == a.expected_log() {
        return (0, 0);
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for l in log.lines() {
        *seen.entry(l).or_default() += 1;
    }
    let expected = a.expected_log();
    let mut lost = 0;
    let mut dup = 0;
    for l in expected.lines() {
        match seen.get(l).copied().unwrap_or(0) {
            0 => lost += 1,
            1 => {}
            n => dup += n - 1,
        }
    }
    if lost == 0 && dup == 0 {
        // Every line once, but not in order (or foreign lines).
        lost = 1;
    }
    (lost, dup)
}

/// The recorded result (if any) is the last attempt's, by fencing token.
fn result_is_last_attempts(t: &Task) -> bool {
    if t.result.is_none() {
        return true;
    }
    match t.attempts.last() {
        // The controller may record its own verdict (a refused record, a timeout), but
        // never an earlier attempt's.
        Some(last) => last.fencing_token == t.fencing_token,
        None => t.state() == TaskState::Cancelled,
    }
}

/// Every event under `prefix` from revision 1 to the store's current revision.
async fn history(store: &Arc<dyn Store>, prefix: &str) -> Result<Vec<(i64, String, Vec<u8>)>> {
    let upto = store.revision().await?;
    let mut out = Vec::new();
    let mut from = 1;
    while from <= upto {
        let mut w = store.watch(prefix, from).await?;
        // Keys under the prefix may stop changing before `upto`: a probe write ends the wait.
        loop {
            let ev = match tokio::time::timeout(Duration::from_secs(2), w.recv()).await {
                Ok(Some(Ok(ev))) => ev,
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) => break,
                Err(_) => return Ok(out),
            };
            let (rev, key, value) = match ev {
                WatchEvent::Put(kv) => (kv.mod_revision, kv.key, kv.value),
                WatchEvent::Delete { key, revision } => (revision, key, Vec::new()),
            };
            from = rev + 1;
            out.push((rev, key, value));
            if rev >= upto {
                return Ok(out);
            }
        }
    }
    Ok(out)
}

/// Checks the store's history of task records and term claims, adding to `report`.
pub async fn check_history(store: &Arc<dyn Store>, report: &mut Report) -> Result<()> {
    let terms = history(store, "meta/term").await?;
    // Revision → term claimed there.
    let mut claims: BTreeMap<i64, u64> = BTreeMap::new();
    let mut last = 0u64;
    for (rev, key, value) in &terms {
        if key != "meta/term" {
            continue;
        }
        let t: u64 = String::from_utf8_lossy(value).trim().parse().unwrap_or(0);
        if t != last + 1 && last != 0 {
            report.stale_commits += 1;
            report
                .problems
                .push(format!("term claims jumped {last} → {t} at revision {rev}"));
        }
        last = t;
        claims.insert(*rev, t);
    }
    report.terms = claims.len();
    let term_at = |rev: i64| claims.range(..=rev).next_back().map_or(0, |(_, t)| *t);
    let records = history(store, "tasks/").await?;
    let mut seen_tokens: HashMap<String, HashSet<u64>> = HashMap::new();
    let mut final_of: HashMap<String, (i32, Option<Vec<u8>>)> = HashMap::new();
    for (rev, key, value) in records {
        if value.is_empty() {
            continue;
        }
        let Ok(t) = Task::decode(value.as_slice()) else {
            continue;
        };
        if t.id.is_empty() || !key.ends_with(&t.id) {
            continue;
        }
        report.history_writes += 1;
        let tokens = seen_tokens.entry(t.id.clone()).or_default();
        for a in &t.attempts {
            if tokens.insert(a.fencing_token) {
                let term = a.fencing_token >> 32;
                if term != term_at(rev) {
                    report.stale_commits += 1;
                    report.problems.push(format!(
                        "task {}: attempt {} (term {term}) first committed at revision {rev} \
                         under term {}",
                        t.id,
                        a.number,
                        term_at(rev)
                    ));
                }
            }
        }
        if !result_is_last_attempts(&t) {
            report.superseded_results += 1;
            report.problems.push(format!(
                "task {} at revision {rev}: result not from its last attempt",
                t.id
            ));
        }
        if scabbard_common::is_final(t.state()) {
            let this = (t.state, t.result.as_ref().map(Message::encode_to_vec));
            match final_of.get(&t.id) {
                None => {
                    final_of.insert(t.id.clone(), this);
                }
                Some(first) if *first != this => {
                    report.duplicated += 1;
                    report.problems.push(format!(
                        "task {} reached a second final state at revision {rev}",
                        t.id
                    ));
                }
                Some(_) => {}
            }
        }
    }
    report.history_checked = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_lost_and_repeated_are_counted() {
        let a = Acked {
            id: "t".into(),
            label: "x".into(),
            lines: 3,
        };
        assert_eq!(compare_lines("x 1\nx 2\nx 3\n", &a), (0, 0));
        assert_eq!(compare_lines("x 1\nx 3\n", &a), (1, 0));
        assert_eq!(compare_lines("x 1\nx 2\nx 2\nx 3\n", &a), (0, 1));
        assert_eq!(compare_lines("x 2\nx 1\nx 3\n", &a), (1, 0));
    }
}
