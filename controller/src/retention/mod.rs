//! Retention: the leader's background sweeper that deletes finished history once it is
//! older than its project's retention (`retention_days`, the project's own setting or the
//! controller's), and idempotency keys older than the idempotency window.
//!
//! It owns no state of its own besides its counters ([`stats`]): every round reads the
//! store's `done/` and `wdone/` keys (ascending by finish time, see
//! [`crate::core::history`]), the project settings from the catalog (so a changed setting
//! applies on the next round, without a restart), and deletes in small fenced batches:
//!
//! - a finished task: its logs ([`LogStore::delete_task`]), its artifacts, then every key
//!   [`history::task_keys`] names, in one transaction per task group, the `done/` key last;
//! - a finished workflow: its parts, its header and its `wdone/` key;
//! - audit entries older than the longest retention that applies to any project;
//! - `idem/` keys whose task id (a ULID, which carries its creation time) is older than the
//!   idempotency window.
//!
//! It must never block the core: it talks to it only to say what it deleted
//! ([`CoreMsg::Forget`]), pauses between batches as long as the batch took (so it uses at
//! most about half of the store's time; while live work runs, four to eight times as long,
//! see `sweep::Run::pause`), and does a bounded amount of work per round. It
//! runs only while this controller leads, and every delete carries the term's fence, so a
//! deposed leader never deletes. A task or workflow that is not final is never deleted,
//! nor a finished task of a workflow that still runs.

mod fenced;
mod stats;
mod sweep;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::artifacts::ArtifactStore;
use crate::auth::Catalog;
use crate::config::ControllerConfig;
use crate::core::CoreHandle;
use crate::store::{Compare, Store};

pub(crate) use stats::{STATS, status};

/// Keys read per range page, and most deletes per transaction.
const BATCH: usize = 128;
/// Most items of one kind (tasks, workflows, audit entries, idempotency keys) a round
/// deletes or looks at; the rest waits for the next round.
const ROUND_BUDGET: usize = 4_096;
/// Most `done/` (or `wdone/`) keys a round looks at.
const SCAN_BUDGET: usize = 32 * 1_024;
/// Most keys a round scans to count what it left behind (the backlog).
const BACKLOG_SCAN: usize = 100_000;
/// Keys per range page of that count (a pause after each, as after a batch of deletes).
const BACKLOG_PAGE: usize = 1_000;
/// The backlog is counted at most this often; rounds in between report the last count
/// less what they deleted.
const BACKLOG_EVERY: Duration = Duration::from_secs(30);
/// Keys read per range page while live work runs (see `sweep::Run::pause`).
const BUSY_BATCH: usize = 32;
/// Shortest pause between two batches.
const MIN_PAUSE: Duration = Duration::from_millis(10);
/// While live work runs: the pause between two batches is this many times as long as the
/// batch took (the sweeper takes at most about a fifth of the store's time)...
const BUSY_FACTOR: u32 = 4;
/// ... and at least this long.
const BUSY_PAUSE: Duration = Duration::from_millis(25);
/// A commit of the core's writes slower than this, or more messages than [`BUSY_QUEUE`]
/// waiting for the core, doubles that pause.
const SLOW_COMMIT: Duration = Duration::from_millis(5);
const BUSY_QUEUE: usize = 64;
/// Milliseconds per day.
const DAY_MS: f64 = 86_400_000.0;

/// The idempotency window the sweeper applies (`idempotency_window_ms`).
pub(crate) fn idempotency_window_ms(cfg: &ControllerConfig) -> u64 {
    cfg.idempotency_window_ms
}

/// Milliseconds in `days` (fractions allowed).
pub(crate) fn days_to_ms(days: f64) -> i64 {
    (days * DAY_MS).round() as i64
}

/// What one round applies: the time it started and each project's retention.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    /// Unix ms at the start of the round.
    pub(crate) now_ms: i64,
    /// The controller's retention (ms).
    pub(crate) default_ms: i64,
    /// Projects' own retentions (ms).
    pub(crate) projects: HashMap<String, i64>,
}

impl Policy {
    /// The policy now: the config's default and the catalog's project settings.
    pub(crate) fn current(cfg: &ControllerConfig, catalog: &Catalog, now_ms: i64) -> Self {
        Self {
            now_ms,
            default_ms: days_to_ms(cfg.retention_days),
            projects: catalog
                .retention_overrides()
                .into_iter()
                .map(|(p, d)| (p, days_to_ms(d)))
                .collect(),
        }
    }

    /// The retention of `project` (ms).
    pub(crate) fn retention_ms(&self, project: &str) -> i64 {
        self.projects
            .get(project)
            .copied()
            .unwrap_or(self.default_ms)
    }

    /// Whether something of `project` that finished at `finished_ms` is past retention.
    pub(crate) fn expired(&self, project: &str, finished_ms: i64) -> bool {
        finished_ms < self.now_ms.saturating_sub(self.retention_ms(project))
    }

    /// Nothing that finished at or after this is expired, whatever its project.
    pub(crate) fn scan_until(&self) -> i64 {
        let shortest = self
            .projects
            .values()
            .copied()
            .chain([self.default_ms])
            .min()
            .unwrap_or(self.default_ms);
        self.now_ms.saturating_sub(shortest)
    }

    /// Audit entries older than this are past every retention that may apply to them.
    pub(crate) fn audit_cutoff(&self) -> i64 {
        let longest = self
            .projects
            .values()
            .copied()
            .chain([self.default_ms])
            .max()
            .unwrap_or(self.default_ms);
        self.now_ms.saturating_sub(longest)
    }
}

/// What a term's sweeper works with.
pub(crate) struct Sweeper {
    pub(crate) cfg: Arc<ControllerConfig>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) catalog: Arc<Catalog>,
    /// This term's core (its log store, and `Forget`).
    pub(crate) core: CoreHandle,
    pub(crate) artifacts: Option<Arc<ArtifactStore>>,
    /// The leader's fence: every delete carries it.
    pub(crate) fence: Option<Compare>,
}

/// Starts the sweeper of a leadership term; it stops with `stop` (the end of the term) or
/// as soon as a fenced delete is refused.
pub(crate) fn spawn(sweeper: Sweeper, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(
        async move {
            let every = Duration::from_millis(sweeper.cfg.retention_sweep_interval_ms);
            STATS.set_default_days(sweeper.cfg.retention_days);
            let mut run = sweep::Run::new(sweeper);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                let policy = Policy::current(
                    &run.s.cfg,
                    &run.s.catalog,
                    scabbard_common::time::now_ms(),
                );
                match run.round(&policy, &stop).await {
                    Ok(report) if report.deleted() > 0 => {
                        info!(?report, "retention sweep");
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "retention sweep stopped early; retrying next round"),
                }
                if run.deposed {
                    warn!("a fenced retention delete was refused: this controller no longer leads; the sweeper stops");
                    return;
                }
            }
        }
        .in_current_span(),
    )
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            now_ms: 1_000_000,
            default_ms: 1_000,
            projects: [("short".to_string(), 100), ("long".to_string(), 10_000)]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn each_project_has_its_own_retention() {
        let p = policy();
        assert!(p.expired("default", 998_999));
        assert!(!p.expired("default", 999_000));
        assert!(p.expired("short", 999_899));
        assert!(!p.expired("short", 999_900));
        assert!(!p.expired("long", 995_000));
        assert!(p.expired("long", 989_999));
        assert_eq!(p.scan_until(), 999_900);
        assert_eq!(p.audit_cutoff(), 990_000);
    }

    #[test]
    fn fractional_days() {
        assert_eq!(days_to_ms(30.0), 2_592_000_000);
        assert_eq!(days_to_ms(0.0001), 8_640);
    }
}
