//! One sweeper round: finished tasks, finished workflows, audit entries and idempotency
//! keys, each in batches of at most [`BATCH`] keys with a pause between batches and at most
//! [`ROUND_BUDGET`] items per kind. See the module docs of [`super`].

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use prost::Message;
use scabbard_common::proto::{Task, Workflow, WorkflowState};
use scabbard_common::{Result, is_final};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::stats::Kind;
use super::{
    BACKLOG_EVERY, BACKLOG_PAGE, BACKLOG_SCAN, BATCH, BUSY_BATCH, BUSY_FACTOR, BUSY_PAUSE,
    BUSY_QUEUE, MIN_PAUSE, Policy, ROUND_BUDGET, SCAN_BUDGET, SLOW_COMMIT, STATS, Sweeper,
};
use crate::audit::AUDIT_PREFIX;
use crate::core::history::{
    DONE_PREFIX, IDEM_PREFIX, WF_DONE_PREFIX, parse_done_key, task_keys, workflow_keys,
};
use crate::core::workflows::WORKFLOW_PREFIX;
use crate::core::{CoreMsg, TASK_PREFIX};

/// What one round deleted.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) tasks: u64,
    pub(crate) workflows: u64,
    pub(crate) audit: u64,
    pub(crate) idempotency_keys: u64,
    /// Expired tasks and workflows left for later rounds.
    pub(crate) backlog: u64,
}

impl Report {
    pub(crate) fn deleted(&self) -> u64 {
        self.tasks + self.workflows + self.audit + self.idempotency_keys
    }
}

/// A term's sweeper between rounds.
pub(crate) struct Run {
    pub(crate) s: Sweeper,
    /// A fenced delete was refused: this controller no longer leads.
    pub(crate) deposed: bool,
    /// Where the scan of `idem/` (which is not ordered by time) goes on next round.
    idem_cursor: Option<String>,
    /// Where the scans of `done/` and `wdone/` go on next round when the last stopped at
    /// its budget (None: from the oldest).
    history_cursor: [Option<String>; 2],
    /// The core's commits seen at the last pause (more since: live work is running).
    seen_commits: u64,
    /// Live work was running at the last pause: batches of [`BUSY_BATCH`].
    busy: bool,
    /// The last count of the backlog of `done/` and `wdone/` (see [`Self::backlog`]).
    counted: [Option<Counted>; 2],
    /// Tasks and workflows deleted by this run so far.
    deleted: [u64; 2],
}

/// A count of the expired entries a round left behind.
struct Counted {
    at: Instant,
    expired: u64,
    /// [`Run::deleted`] of its kind then.
    deleted: u64,
}

/// Which history a done-key scan walks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum History {
    Tasks = 0,
    Workflows = 1,
}

impl History {
    /// The keys it walks: `done/` or `wdone/`.
    fn prefix(self) -> &'static str {
        match self {
            History::Tasks => DONE_PREFIX,
            History::Workflows => WF_DONE_PREFIX,
        }
    }
}

impl Run {
    pub(crate) fn new(s: Sweeper) -> Self {
        Self {
            s,
            deposed: false,
            idem_cursor: None,
            history_cursor: [None, None],
            seen_commits: 0,
            busy: false,
            counted: [None, None],
            deleted: [0, 0],
        }
    }

    /// Sweeps every kind once.
    pub(crate) async fn round(
        &mut self,
        policy: &Policy,
        stop: &CancellationToken,
    ) -> Result<Report> {
        let mut report = Report::default();
        report.backlog += self
            .sweep_history(History::Tasks, policy, stop, &mut report)
            .await?;
        report.backlog += self
            .sweep_history(History::Workflows, policy, stop, &mut report)
            .await?;
        self.sweep_audit(policy, stop, &mut report).await?;
        self.sweep_idempotency(policy, stop, &mut report).await?;
        let oldest = self
            .s
            .store
            .range(DONE_PREFIX, None, 1)
            .await?
            .kvs
            .first()
            .and_then(|kv| parse_done_key(&kv.key).map(|(ms, _)| ms))
            .unwrap_or(0);
        if !self.deposed && !stop.is_cancelled() {
            STATS.round_done(scabbard_common::time::now_ms(), oldest, report.backlog);
        }
        Ok(report)
    }

    /// Whether live work ran at the last pause.
    pub(super) fn busy(&self) -> bool {
        self.busy
    }

    /// Keys per range page: smaller while live work runs, so each batch (its reads, log
    /// deletes and fenced transactions) delays a concurrent task less.
    fn batch(&self) -> usize {
        if self.busy { BUSY_BATCH } else { BATCH }
    }

    fn stopped(&self, stop: &CancellationToken) -> bool {
        self.deposed || stop.is_cancelled()
    }

    /// Lets the core and the store breathe between two batches. Idle (the core committed
    /// nothing since the last batch): as long as the batch took, at least [`MIN_PAUSE`].
    /// While live work runs: [`BUSY_FACTOR`] times as long, at least [`BUSY_PAUSE`], and
    /// longer still while the core's commits are slow or messages queue up for it, so the
    /// sweeper takes a small share of the store and the CPU from submit→finish.
    async fn pause(&mut self, started: Instant, stop: &CancellationToken) {
        let took = started.elapsed();
        let (load, queued) = self.s.core.load();
        let commits = load.commits();
        let busy = commits != self.seen_commits || queued > 0;
        self.seen_commits = commits;
        self.busy = busy;
        let wait = if busy {
            let slow = load.last_commit() > SLOW_COMMIT || queued > BUSY_QUEUE;
            let factor = if slow { 2 * BUSY_FACTOR } else { BUSY_FACTOR };
            (took * factor).max(BUSY_PAUSE)
        } else {
            took.max(MIN_PAUSE)
        };
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }

    /// Walks `done/` (or `wdone/`) from the oldest (or from where the last round ran out of
    /// budget), deleting what is expired; returns how many expired entries it left for
    /// later. Besides [`ROUND_BUDGET`] expired items, a round looks at no more than
    /// [`SCAN_BUDGET`] keys: with projects of different retentions, expired keys of a short
    /// one sit between many kept keys of a long one.
    async fn sweep_history(
        &mut self,
        kind: History,
        policy: &Policy,
        stop: &CancellationToken,
        report: &mut Report,
    ) -> Result<u64> {
        let prefix = kind.prefix();
        let until = policy.scan_until();
        let slot = kind as usize;
        let mut after: Option<String> = self.history_cursor[slot].take();
        let (mut handled, mut scanned) = (0usize, 0usize);
        // Workflow id → whether it is over (tasks of a running workflow are kept).
        let mut workflows_over: HashMap<String, bool> = HashMap::new();
        loop {
            if self.stopped(stop) {
                return Ok(0);
            }
            if handled >= ROUND_BUDGET || scanned >= SCAN_BUDGET {
                self.history_cursor[slot] = after.clone();
                return self.backlog(kind, after, policy, stop).await;
            }
            let started = Instant::now();
            let page = self
                .s
                .store
                .range(prefix, after.as_deref(), self.batch())
                .await?;
            after = page.kvs.last().map(|kv| kv.key.clone());
            scanned += page.kvs.len();
            let mut end = !page.more;
            let mut expired = Vec::new();
            for kv in &page.kvs {
                let Some((ms, id)) = parse_done_key(&kv.key) else {
                    warn!(key = %kv.key, "not a done key; leaving it");
                    continue;
                };
                if ms >= until {
                    end = true;
                    break;
                }
                if policy.expired(&String::from_utf8_lossy(&kv.value), ms) {
                    expired.push((kv.key.clone(), id.to_string()));
                }
            }
            handled += expired.len();
            let deleted = match kind {
                History::Tasks => {
                    let n = self.delete_tasks(expired, &mut workflows_over).await?;
                    report.tasks += n;
                    n
                }
                History::Workflows => {
                    let n = self.delete_workflows(expired).await?;
                    report.workflows += n;
                    n
                }
            };
            self.deleted[slot] += deleted;
            if end {
                // Caught up: the next backlog is counted afresh.
                self.counted[slot] = None;
                return Ok(0);
            }
            self.pause(started, stop).await;
        }
    }

    /// The expired entries this round leaves after `after`: counted (see
    /// [`Self::count_expired`]) at most once per [`BACKLOG_EVERY`]; in between, the last
    /// count less what was deleted since (what expired since shows at the next count).
    async fn backlog(
        &mut self,
        kind: History,
        after: Option<String>,
        policy: &Policy,
        stop: &CancellationToken,
    ) -> Result<u64> {
        let slot = kind as usize;
        if let Some(c) = &self.counted[slot]
            && c.at.elapsed() < BACKLOG_EVERY
        {
            return Ok(c
                .expired
                .saturating_sub(self.deleted[slot].saturating_sub(c.deleted)));
        }
        let expired = self
            .count_expired(kind.prefix(), after, policy, stop)
            .await?;
        self.counted[slot] = Some(Counted {
            at: Instant::now(),
            expired,
            deleted: self.deleted[slot],
        });
        Ok(expired)
    }

    /// Counts expired entries after `after` (at most [`BACKLOG_SCAN`] keys looked at), a
    /// page of [`BACKLOG_PAGE`] keys at a time with the same pauses as the deletes: it is
    /// only a figure for `scabbard status` and the metrics, and reading 100,000 keys in one
    /// go would take the CPU from live work for tens of milliseconds.
    async fn count_expired(
        &mut self,
        prefix: &str,
        mut after: Option<String>,
        policy: &Policy,
        stop: &CancellationToken,
    ) -> Result<u64> {
        let until = policy.scan_until();
        let (mut seen, mut expired) = (0usize, 0u64);
        while seen < BACKLOG_SCAN && !self.stopped(stop) {
            let started = Instant::now();
            let page = self
                .s
                .store
                .range(prefix, after.as_deref(), BACKLOG_PAGE)
                .await?;
            after = page.kvs.last().map(|kv| kv.key.clone());
            seen += page.kvs.len();
            for kv in &page.kvs {
                match parse_done_key(&kv.key) {
                    Some((ms, _)) if ms >= until => return Ok(expired),
                    Some((ms, _)) if policy.expired(&String::from_utf8_lossy(&kv.value), ms) => {
                        expired += 1
                    }
                    _ => {}
                }
            }
            if !page.more {
                break;
            }
            self.pause(started, stop).await;
        }
        Ok(expired)
    }

    /// Deletes expired finished tasks (`(done key, id)`): logs and artifacts first, then
    /// their keys. Returns how many were deleted.
    async fn delete_tasks(
        &mut self,
        expired: Vec<(String, String)>,
        workflows_over: &mut HashMap<String, bool>,
    ) -> Result<u64> {
        let mut groups = Vec::new();
        let mut ids = Vec::new();
        let mut doomed = Vec::new();
        let records = self
            .get_many(
                expired
                    .iter()
                    .map(|(_, id)| format!("{TASK_PREFIX}{id}"))
                    .collect(),
            )
            .await?;
        for ((done_key, id), record) in expired.into_iter().zip(records) {
            let Some(kv) = record else {
                // The record went in an earlier round that stopped before its done key.
                groups.push(vec![done_key]);
                continue;
            };
            let task = match Task::decode(kv.value.as_slice()) {
                Ok(t) => t,
                Err(e) => {
                    warn!(task = %id, error = %e, "corrupt task record; retention leaves it");
                    continue;
                }
            };
            if !is_final(task.state()) {
                debug!(task = %id, "has a done key but is not final; kept");
                continue;
            }
            if !task.workflow_id.is_empty()
                && !self
                    .workflow_over(&task.workflow_id, workflows_over)
                    .await?
            {
                continue;
            }
            doomed.push((done_key, id, task));
        }
        // Logs (of the whole batch at once) and artifacts first, a few tasks at a time.
        let logs = self
            .s
            .core
            .logs()
            .delete_tasks(
                &doomed
                    .iter()
                    .map(|(_, id, _)| id.clone())
                    .collect::<Vec<_>>(),
            )
            .await;
        let outside: Vec<_> = {
            use futures::StreamExt;
            let this = &*self;
            futures::stream::iter(doomed.into_iter().zip(logs))
                .map(|((done_key, id, task), logs)| async move {
                    let r = match logs {
                        Ok(()) => {
                            STATS.add(Kind::Log, task.attempts.len() as u64);
                            this.delete_artifacts(&task).await
                        }
                        Err(e) => Err(e),
                    };
                    (done_key, id, task, r)
                })
                .buffered(8)
                .collect()
                .await
        };
        for (done_key, id, task, deleted) in outside {
            if let Err(e) = deleted {
                warn!(task = %id, error = %e, "cannot delete the task's logs or artifacts; keeping it for the next round");
                continue;
            }
            let mut keys: Vec<String> = task_keys(&task)
                .into_iter()
                .filter(|k| *k != done_key)
                .collect();
            dedup(&mut keys);
            // The done key goes last: while it is there, the next round finds the rest.
            keys.push(done_key);
            groups.push(keys);
            ids.push(id);
        }
        if !self.delete_groups(groups).await? {
            return Ok(0);
        }
        let n = ids.len() as u64;
        STATS.add(Kind::Task, n);
        if !ids.is_empty() {
            self.s.core.send(CoreMsg::Forget { ids }).await;
        }
        Ok(n)
    }

    /// Reads `keys`, a few at a time (point reads: the embedded store answers them without
    /// its writer; etcd gets them in flight together).
    async fn get_many(&self, keys: Vec<String>) -> Result<Vec<Option<crate::store::KeyValue>>> {
        use futures::StreamExt;
        let store = &self.s.store;
        futures::stream::iter(keys)
            .map(|k| async move { store.get(&k).await })
            .buffered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// Whether workflow `id` is over (or gone); cached for the round.
    async fn workflow_over(&self, id: &str, cache: &mut HashMap<String, bool>) -> Result<bool> {
        if let Some(&over) = cache.get(id) {
            return Ok(over);
        }
        let over = match self.s.store.get(&format!("{WORKFLOW_PREFIX}{id}")).await? {
            None => true,
            Some(kv) => Workflow::decode(kv.value.as_slice())
                .map(|w| workflow_final(&w))
                .unwrap_or(false),
        };
        cache.insert(id.to_string(), over);
        Ok(over)
    }

    /// Deletes a final task's artifacts.
    async fn delete_artifacts(&self, task: &Task) -> Result<()> {
        let Some(store) = &self.s.artifacts else {
            return Ok(());
        };
        let mut refs = HashSet::new();
        let results = task
            .result
            .iter()
            .chain(task.attempts.iter().filter_map(|a| a.result.as_ref()));
        for r in task
            .attempts
            .iter()
            .flat_map(|a| a.artifacts.iter())
            .chain(results.flat_map(|r| r.artifacts.iter()))
        {
            refs.insert((r.task_id.clone(), r.fencing_token, r.name.clone()));
        }
        for (task_id, token, name) in refs {
            store.delete(&store.key(&task_id, token, &name)).await?;
            STATS.add(Kind::Artifact, 1);
        }
        Ok(())
    }

    /// Deletes expired finished workflows (`(wdone key, id)`): parts, header, done key.
    async fn delete_workflows(&mut self, expired: Vec<(String, String)>) -> Result<u64> {
        let mut groups = Vec::new();
        let mut ids = Vec::new();
        for (done_key, id) in expired {
            let header = format!("{WORKFLOW_PREFIX}{id}");
            let mut keys = Vec::new();
            if let Some(kv) = self.s.store.get(&header).await? {
                match Workflow::decode(kv.value.as_slice()) {
                    Ok(w) if workflow_final(&w) => keys.extend(workflow_keys(&w)),
                    Ok(_) => continue,
                    Err(e) => {
                        warn!(workflow = %id, error = %e, "corrupt workflow record; retention leaves it");
                        continue;
                    }
                }
            }
            // Its parts, before the header and the done key.
            let parts = format!("{header}/");
            let mut after: Option<String> = None;
            let mut part_keys = Vec::new();
            loop {
                let page = self.s.store.range(&parts, after.as_deref(), 1_000).await?;
                after = page.kvs.last().map(|kv| kv.key.clone());
                part_keys.extend(page.kvs.into_iter().map(|kv| kv.key));
                if !page.more {
                    break;
                }
            }
            keys.retain(|k| *k != done_key && *k != header);
            let mut all = part_keys;
            all.append(&mut keys);
            all.push(header);
            dedup(&mut all);
            all.push(done_key);
            groups.push(all);
            ids.push(id);
        }
        if !self.delete_groups(groups).await? {
            return Ok(0);
        }
        let n = ids.len() as u64;
        STATS.add(Kind::Workflow, n);
        if !ids.is_empty() {
            self.s.core.send(CoreMsg::Forget { ids }).await;
        }
        Ok(n)
    }

    /// Deletes audit entries older than every retention that may apply.
    async fn sweep_audit(
        &mut self,
        policy: &Policy,
        stop: &CancellationToken,
        report: &mut Report,
    ) -> Result<()> {
        // Keys sort newest first (`audit/<u64::MAX - at_ms:020>-<id>`): everything after
        // the cutoff's key is older than it.
        let inverted = u64::MAX - policy.audit_cutoff().max(0) as u64;
        let start = format!("{AUDIT_PREFIX}{inverted:020}~");
        let mut handled = 0;
        while handled < ROUND_BUDGET && !self.stopped(stop) {
            let started = Instant::now();
            let page = self
                .s
                .store
                .range(AUDIT_PREFIX, Some(&start), self.batch())
                .await?;
            let keys: Vec<Vec<String>> = page.kvs.into_iter().map(|kv| vec![kv.key]).collect();
            let n = keys.len() as u64;
            if n == 0 || !self.delete_groups(keys).await? {
                return Ok(());
            }
            handled += n as usize;
            report.audit += n;
            STATS.add(Kind::Audit, n);
            if !page.more {
                return Ok(());
            }
            self.pause(started, stop).await;
        }
        Ok(())
    }

    /// Deletes idempotency keys whose task is older than the window. `idem/` is not ordered
    /// by time, so each round goes on where the last stopped, [`ROUND_BUDGET`] keys at a
    /// time.
    async fn sweep_idempotency(
        &mut self,
        policy: &Policy,
        stop: &CancellationToken,
        report: &mut Report,
    ) -> Result<()> {
        let window = super::idempotency_window_ms(&self.s.cfg) as i64;
        let cutoff = policy.now_ms.saturating_sub(window);
        let mut seen = 0;
        while seen < ROUND_BUDGET && !self.stopped(stop) {
            let started = Instant::now();
            let page = self
                .s
                .store
                .range(IDEM_PREFIX, self.idem_cursor.as_deref(), self.batch())
                .await?;
            seen += page.kvs.len();
            self.idem_cursor = if page.more {
                page.kvs.last().map(|kv| kv.key.clone())
            } else {
                None
            };
            let old: Vec<(String, i64)> = page
                .kvs
                .into_iter()
                .filter(|kv| {
                    ulid_ms(&String::from_utf8_lossy(&kv.value)).is_some_and(|ms| ms < cutoff)
                })
                .map(|kv| (kv.key, kv.mod_revision))
                .collect();
            let n = self.delete_unchanged(old).await?;
            report.idempotency_keys += n;
            STATS.add(Kind::Idempotency, n);
            if self.idem_cursor.is_none() {
                return Ok(());
            }
            self.pause(started, stop).await;
        }
        Ok(())
    }
}

fn workflow_final(w: &Workflow) -> bool {
    matches!(
        w.state(),
        WorkflowState::Succeeded | WorkflowState::Failed | WorkflowState::Cancelled
    )
}

/// Removes repeated keys, keeping the first of each.
fn dedup(keys: &mut Vec<String>) {
    let mut seen = HashSet::new();
    keys.retain(|k| seen.insert(k.clone()));
}

/// The creation time (unix ms) of a ULID id, in either case.
fn ulid_ms(id: &str) -> Option<i64> {
    ulid::Ulid::from_string(&id.trim().to_ascii_uppercase())
        .ok()
        .map(|u| u.timestamp_ms() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulid_ids_carry_their_time() {
        let u = ulid::Ulid::from_parts(1_700_000_000_000, 42);
        assert_eq!(
            ulid_ms(&u.to_string().to_lowercase()),
            Some(1_700_000_000_000)
        );
        assert_eq!(ulid_ms("not-a-ulid"), None);
    }

    #[test]
    fn dedup_keeps_the_first() {
        let mut k = vec!["a".to_string(), "b".into(), "a".into()];
        dedup(&mut k);
        assert_eq!(k, vec!["a", "b"]);
    }
}
