//! What the sweeper did, for `/metrics` and `scabbard status`: counters since the process
//! started, and what the last round saw. Process-wide (one controller per process in
//! production; in-process test clusters share them).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use scabbard_common::proto::RetentionStatus;

/// Kinds of deleted items, as the `kind` label of `scabbard_retention_deleted_total`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Task,
    Workflow,
    Log,
    Artifact,
    Audit,
    Idempotency,
}

/// The sweeper's counters.
#[derive(Debug)]
pub(crate) struct Stats {
    deleted: [AtomicU64; 6],
    last_sweep_at_ms: AtomicI64,
    oldest_finished_at_ms: AtomicI64,
    backlog: AtomicU64,
    /// The controller's retention in days (`f64` bits).
    default_days: AtomicU64,
}

/// The counters of this process.
pub(crate) static STATS: Stats = Stats {
    deleted: [const { AtomicU64::new(0) }; 6],
    last_sweep_at_ms: AtomicI64::new(0),
    oldest_finished_at_ms: AtomicI64::new(0),
    backlog: AtomicU64::new(0),
    default_days: AtomicU64::new(0),
};

impl Stats {
    /// Counts `n` deleted items of `kind`.
    pub(crate) fn add(&self, kind: Kind, n: u64) {
        self.deleted[kind as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Items of `kind` deleted so far.
    pub(crate) fn deleted(&self, kind: Kind) -> u64 {
        self.deleted[kind as usize].load(Ordering::Relaxed)
    }

    /// Records the controller's retention (shown by `scabbard status`).
    pub(crate) fn set_default_days(&self, days: f64) {
        self.default_days.store(days.to_bits(), Ordering::Relaxed);
    }

    /// Records the end of a round.
    pub(crate) fn round_done(&self, at_ms: i64, oldest_finished_at_ms: i64, backlog: u64) {
        self.last_sweep_at_ms.store(at_ms, Ordering::Relaxed);
        self.oldest_finished_at_ms
            .store(oldest_finished_at_ms, Ordering::Relaxed);
        self.backlog.store(backlog, Ordering::Relaxed);
    }
}

/// The `retention` part of `ClusterStatusResponse`.
pub(crate) fn status() -> RetentionStatus {
    let s = &STATS;
    RetentionStatus {
        last_sweep_at_ms: s.last_sweep_at_ms.load(Ordering::Relaxed),
        tasks_deleted: s.deleted(Kind::Task),
        workflows_deleted: s.deleted(Kind::Workflow),
        logs_deleted: s.deleted(Kind::Log),
        artifacts_deleted: s.deleted(Kind::Artifact),
        audit_deleted: s.deleted(Kind::Audit),
        idempotency_keys_deleted: s.deleted(Kind::Idempotency),
        oldest_finished_at_ms: s.oldest_finished_at_ms.load(Ordering::Relaxed),
        backlog: s.backlog.load(Ordering::Relaxed),
        default_retention_days: f64::from_bits(s.default_days.load(Ordering::Relaxed)),
    }
}
