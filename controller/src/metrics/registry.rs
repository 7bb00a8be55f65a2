//! The controller's process-wide metrics (`prometheus-client`): histograms and counters the
//! hot paths update with atomics, through handles resolved once (fixed label sets) or per
//! call from a read-locked map (RPC method and code). Everything read from the core at
//! scrape time lives in [`super::snapshot`].

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use scabbard_common::proto::TaskState;

/// Latency buckets: 0.25 ms .. ~16 s.
pub(crate) fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_25, 2.0, 17)
}

/// Task-time buckets (queueing, whole runs): 10 ms .. ~11.6 h.
fn task_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.01, 2.5, 16)
}

/// Labels of `scabbard_rpc_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RpcLabels {
    /// `package.Service/Method`.
    pub(crate) method: &'static str,
    /// gRPC status code name (`OK`, `NOT_FOUND`, …).
    pub(crate) code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the controller updates as things happen.
pub(crate) struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) rpc: HistFamily<RpcLabels>,
    submit_to_start: Histogram,
    /// Pre-resolved per final state: succeeded, failed, cancelled, timed_out.
    submit_to_finish: [Histogram; 4],
    commit_seconds: Histogram,
    commit_writes: Histogram,
    commit_failures: Counter,
    dispatch_round: Histogram,
    log_bytes_in: Counter,
    log_chunks_in: Counter,
    sessions: Counter,
    reconnects: Counter,
}

/// The metrics of this process (in-process test clusters share them).
pub(crate) static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let rpc: HistFamily<RpcLabels> =
            Family::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "scabbard_rpc_duration_seconds",
            "gRPC calls served, by method and status code: time from the request to the end of the response (whole stream for streaming calls)",
            rpc.clone(),
        );
        let submit_to_start = Histogram::new(task_buckets());
        registry.register(
            "scabbard_task_submit_to_start_seconds",
            "Time from a task's submission to the start of its first attempt on a worker",
            submit_to_start.clone(),
        );
        let finish: HistFamily<StateLabel> =
            Family::new_with_constructor(|| Histogram::new(task_buckets()));
        registry.register(
            "scabbard_task_submit_to_finish_seconds",
            "Time from a task's submission to its final result reported by a worker, by final state",
            finish.clone(),
        );
        let submit_to_finish = ["succeeded", "failed", "cancelled", "timed_out"]
            .map(|state| finish.get_or_create(&StateLabel { state }).clone());
        let commit_seconds = Histogram::new(latency_buckets());
        registry.register(
            "scabbard_store_commit_duration_seconds",
            "Duration of one group commit of the leader's writes to the state store (one transaction, retries included)",
            commit_seconds.clone(),
        );
        let commit_writes = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        registry.register(
            "scabbard_store_commit_batch_writes",
            "Writes grouped into one store commit",
            commit_writes.clone(),
        );
        let commit_failures = Counter::default();
        registry.register(
            "scabbard_store_commit_failures",
            "Store commits that failed (refused, or ending the leader's term)",
            commit_failures.clone(),
        );
        let dispatch_round = Histogram::new(latency_buckets());
        registry.register(
            "scabbard_dispatch_round_duration_seconds",
            "Duration of one dispatch round of the leader (matching queued tasks to free slots and assigning them)",
            dispatch_round.clone(),
        );
        let log_bytes_in = Counter::default();
        registry.register(
            "scabbard_log_received_bytes",
            "Bytes of task output received from workers' sessions",
            log_bytes_in.clone(),
        );
        let log_chunks_in = Counter::default();
        registry.register(
            "scabbard_log_received_chunks",
            "Log chunks received from workers' sessions",
            log_chunks_in.clone(),
        );
        let sessions = Counter::default();
        registry.register(
            "scabbard_agent_sessions",
            "Agent sessions attached to this controller's core",
            sessions.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "scabbard_agent_reconnects",
            "Agent sessions that replaced or followed an earlier session of the same agent under the same leader",
            reconnects.clone(),
        );
        Self {
            registry,
            rpc,
            submit_to_start,
            submit_to_finish,
            commit_seconds,
            commit_writes,
            commit_failures,
            dispatch_round,
            log_bytes_in,
            log_chunks_in,
            sessions,
            reconnects,
        }
    }
}

fn since_ms(from_ms: i64, now_ms: i64) -> f64 {
    (now_ms - from_ms).max(0) as f64 / 1000.0
}

/// A task's first attempt started (`created_at_ms` is its submission).
pub(crate) fn task_started(created_at_ms: i64, now_ms: i64) {
    METRICS
        .submit_to_start
        .observe(since_ms(created_at_ms, now_ms));
}

/// A task reached a final state from a worker's report.
pub(crate) fn task_finished(state: TaskState, created_at_ms: i64, now_ms: i64) {
    let i = match state {
        TaskState::Succeeded => 0,
        TaskState::Failed => 1,
        TaskState::Cancelled => 2,
        TaskState::TimedOut => 3,
        _ => return,
    };
    METRICS.submit_to_finish[i].observe(since_ms(created_at_ms, now_ms));
    super::stats::task_done(now_ms, now_ms - created_at_ms, i == 1 || i == 3);
}

/// One group commit of `writes` writes took `took`.
pub(crate) fn store_commit(writes: usize, took: Duration, ok: bool) {
    let m = &*METRICS;
    m.commit_seconds.observe(took.as_secs_f64());
    m.commit_writes.observe(writes as f64);
    if !ok {
        m.commit_failures.inc();
    }
}

/// Times a dispatch round until dropped.
pub(crate) struct DispatchRound(std::time::Instant);

impl DispatchRound {
    pub(crate) fn start() -> Self {
        Self(std::time::Instant::now())
    }
}

impl Drop for DispatchRound {
    fn drop(&mut self) {
        METRICS
            .dispatch_round
            .observe(self.0.elapsed().as_secs_f64());
    }
}

/// Log chunks of `bytes` bytes in total arrived on a session.
pub(crate) fn log_received(chunks: u64, bytes: u64) {
    METRICS.log_chunks_in.inc_by(chunks);
    METRICS.log_bytes_in.inc_by(bytes);
}

/// An agent session attached; `reconnect` when the agent had one before under this core.
pub(crate) fn session_attached(reconnect: bool) {
    METRICS.sessions.inc();
    if reconnect {
        METRICS.reconnects.inc();
    }
}
