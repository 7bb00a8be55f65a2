//! Prometheus metrics of the worker (`prometheus-client`), served on `metrics_listen`
//! (`scabbard worker --metrics-listen ADDR`, `GET /metrics`, no auth) by
//! [`scabbard_common::metrics_http`]. Recorded as things happen: attempt durations by
//! executor and outcome, artifact bytes moved, sessions; read at scrape time: slots busy,
//! spool bytes on disk, the Dagger engine probe's answer. Process-wide (one worker per
//! process in production; in-process test fleets share the recorded ones).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use scabbard_common::metrics_http::{self, Format};
use scabbard_common::proto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::executor::DaggerExecutor;
use crate::runner::Runner;
use crate::spool::Spool;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    executor: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

struct Metrics {
    registry: Registry,
    attempts: Family<AttemptLabels, Histogram, fn() -> Histogram>,
    uploaded: Counter,
    downloaded: Counter,
    sessions: Counter,
    connected: Gauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let attempts: Family<AttemptLabels, Histogram, fn() -> Histogram> =
        Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.01, 2.5, 16)));
    registry.register(
        "scabbard_worker_attempt_duration_seconds",
        "Attempts run by this worker, from acceptance to result (inputs, execution, uploads), by executor and outcome",
        attempts.clone(),
    );
    let artifacts = Family::<DirectionLabel, Counter>::default();
    registry.register(
        "scabbard_worker_artifact_bytes",
        "Packed artifact bytes this worker moved: uploaded outputs, and downloaded inputs (cache hits not counted)",
        artifacts.clone(),
    );
    let uploaded = artifacts
        .get_or_create(&DirectionLabel {
            direction: "upload",
        })
        .clone();
    let downloaded = artifacts
        .get_or_create(&DirectionLabel {
            direction: "download",
        })
        .clone();
    let sessions = Counter::default();
    registry.register(
        "scabbard_worker_sessions",
        "Sessions this worker opened with a controller (the first and every reconnect)",
        sessions.clone(),
    );
    let connected = Gauge::default();
    registry.register(
        "scabbard_worker_connected",
        "1 while this worker holds a session with the leader",
        connected.clone(),
    );
    Metrics {
        registry,
        attempts,
        uploaded,
        downloaded,
        sessions,
        connected,
    }
});

fn outcome_label(o: proto::Outcome) -> &'static str {
    match o {
        proto::Outcome::Succeeded => "succeeded",
        proto::Outcome::Failed => "failed",
        proto::Outcome::Cancelled => "cancelled",
        proto::Outcome::TimedOut => "timed_out",
        proto::Outcome::Unspecified => "unspecified",
    }
}

/// An attempt on `executor` ended with `outcome` after `took`.
pub(crate) fn attempt_finished(executor: &'static str, outcome: proto::Outcome, took: Duration) {
    METRICS
        .attempts
        .get_or_create(&AttemptLabels {
            executor,
            outcome: outcome_label(outcome),
        })
        .observe(took.as_secs_f64());
}

/// Packed artifact bytes uploaded.
pub(crate) fn artifact_uploaded(bytes: u64) {
    METRICS.uploaded.inc_by(bytes);
}

/// Packed artifact bytes downloaded (not served from the cache).
pub(crate) fn artifact_downloaded(bytes: u64) {
    METRICS.downloaded.inc_by(bytes);
}

/// A session with the controller opened (`true`) or ended (`false`).
pub(crate) fn session(open: bool) {
    if open {
        METRICS.sessions.inc();
    }
    METRICS.connected.set(i64::from(open));
}

/// What the scrape reads from the running worker.
#[derive(Clone)]
pub(crate) struct Live {
    pub(crate) runner: Arc<Runner>,
    pub(crate) spool: Arc<Spool>,
    pub(crate) slots: u32,
    pub(crate) dagger: Option<DaggerExecutor>,
}

impl Live {
    fn registry(&self) -> Registry {
        let mut r = Registry::default();
        r.register(
            "scabbard_worker_slots",
            "Attempts this worker runs at once (its slots)",
            ConstGauge::new(i64::from(self.slots)),
        );
        r.register(
            "scabbard_worker_slots_busy",
            "Slots running an attempt now",
            ConstGauge::new(i64::from(self.runner.running())),
        );
        r.register(
            "scabbard_worker_spool_bytes",
            "Bytes of the log spool's journal on disk (output and results not yet acknowledged, until compaction)",
            ConstGauge::new(self.spool.disk_bytes() as i64),
        );
        if let Some(d) = &self.dagger {
            r.register(
                "scabbard_worker_engine_up",
                "1 when the Dagger engine answered the last probe (the dagger capability is advertised)",
                ConstGauge::new(i64::from(d.is_available())),
            );
        }
        r
    }
}

/// Binds `addr` and serves `/metrics` until `shutdown`; returns the bound address.
pub(crate) async fn start(
    addr: std::net::SocketAddr,
    live: Live,
    shutdown: CancellationToken,
) -> scabbard_common::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        scabbard_common::Error::invalid(format!("cannot listen on metrics_listen {addr}: {e}"))
    })?;
    let bound = listener.local_addr()?;
    let render = move |format: Format| {
        let live = live.clone();
        async move {
            let snap = live.registry();
            metrics_http::encode(format, &[&METRICS.registry, &snap])
        }
    };
    tokio::spawn(metrics_http::serve_listener(listener, render, shutdown));
    Ok(bound)
}
