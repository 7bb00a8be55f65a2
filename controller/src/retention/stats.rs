//! What the sweeper did, for `/metrics` and `scabbard status`: counters since the process
//! started, and what the last round saw. Process-wide (one controller per process in
//! production; in-process test clusters share them).

use std::fmt::Write as _;
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

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Task,
        Kind::Workflow,
        Kind::Log,
        Kind::Artifact,
        Kind::Audit,
        Kind::Idempotency,
    ];

    fn label(self) -> &'static str {
        match self {
            Kind::Task => "task",
            Kind::Workflow => "workflow",
            Kind::Log => "log",
            Kind::Artifact => "artifact",
            Kind::Audit => "audit",
            Kind::Idempotency => "idempotency_key",
        }
    }
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

/// The sweeper's metrics in the Prometheus text format.
pub(crate) fn metrics_text() -> String {
    let s = &STATS;
    let mut out = String::new();
    out.push_str("# HELP scabbard_retention_deleted_total Items the retention sweeper deleted since the controller started, by kind.\n# TYPE scabbard_retention_deleted_total counter\n");
    for kind in Kind::ALL {
        let _ = writeln!(
            out,
            "scabbard_retention_deleted_total{{kind=\"{}\"}} {}",
            kind.label(),
            s.deleted(kind)
        );
    }
    let last = s.last_sweep_at_ms.load(Ordering::Relaxed) as f64 / 1000.0;
    let _ = writeln!(
        out,
        "# HELP scabbard_retention_last_sweep_timestamp_seconds When the last retention sweep ended (0 = none yet).\n# TYPE scabbard_retention_last_sweep_timestamp_seconds gauge\nscabbard_retention_last_sweep_timestamp_seconds {last}"
    );
    let _ = writeln!(
        out,
        "# HELP scabbard_retention_backlog Expired tasks and workflows the last sweep left for later rounds.\n# TYPE scabbard_retention_backlog gauge\nscabbard_retention_backlog {}",
        s.backlog.load(Ordering::Relaxed)
    );
    let oldest = s.oldest_finished_at_ms.load(Ordering::Relaxed) as f64 / 1000.0;
    let _ = writeln!(
        out,
        "# HELP scabbard_retention_oldest_finished_timestamp_seconds Finish time of the oldest finished task kept (0 = none).\n# TYPE scabbard_retention_oldest_finished_timestamp_seconds gauge\nscabbard_retention_oldest_finished_timestamp_seconds {oldest}"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_kind() {
        STATS.add(Kind::Audit, 2);
        let text = metrics_text();
        assert!(text.contains("# TYPE scabbard_retention_deleted_total counter"));
        assert!(text.contains("scabbard_retention_deleted_total{kind=\"task\"}"));
        assert!(text.contains("scabbard_retention_deleted_total{kind=\"idempotency_key\"}"));
        assert!(text.contains("scabbard_retention_backlog "));
        assert!(text.contains("scabbard_retention_last_sweep_timestamp_seconds "));
    }
}
