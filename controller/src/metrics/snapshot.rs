//! Gauges read at scrape time: leadership and store health always; the core's counts, the
//! per-project load and the retention sweeper's figures only on the leader.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use scabbard_common::metrics_http::{self, Format};
use scabbard_common::proto::BreakerState;
use scabbard_common::time::now_ms;

use crate::core::CoreStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectLabel {
    project: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: i64) {
    r.register(name, help, ConstGauge::new(v));
}

fn gauge_f(r: &mut Registry, name: &str, help: &str, v: f64) {
    r.register(name, help, ConstGauge::new(v));
}

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    r.register(name, help, ConstCounter::new(v));
}

/// The snapshot as text (tests; the endpoint encodes it with the recorded metrics).
pub fn render_snapshot(store_healthy: bool, stats: Option<&CoreStats>) -> String {
    metrics_http::encode(Format::Prometheus, &[&registry(store_healthy, stats)])
}

/// The snapshot's registry (built per scrape).
pub(crate) fn registry(store_healthy: bool, stats: Option<&CoreStats>) -> Registry {
    let mut r = Registry::default();
    gauge(
        &mut r,
        "scabbard_leader",
        "1 when this controller leads the cluster",
        i64::from(stats.is_some()),
    );
    gauge(
        &mut r,
        "scabbard_store_healthy",
        "1 when the state store answers",
        i64::from(store_healthy),
    );
    let Some(s) = stats else {
        return r;
    };
    let count = |state| s.breakers.iter().filter(|b| b.state() == state).count() as i64;
    let dispatched = s.cache_affinity_hits + s.cache_affinity_misses;
    for (name, help, v) in [
        (
            "scabbard_tasks_queued",
            "Tasks waiting for an agent",
            s.queued,
        ),
        (
            "scabbard_tasks_active",
            "Tasks assigned or running",
            s.active,
        ),
        (
            "scabbard_tasks_known",
            "Tasks held in the leader's memory",
            s.total,
        ),
        (
            "scabbard_core_tasks_in_memory",
            "Tasks the core holds: live work and the finished cache (finished_cache_tasks)",
            s.total,
        ),
        (
            "scabbard_core_finished_cached",
            "Finished tasks in the core's cache; older ones are served from the store",
            s.finished_cached,
        ),
        (
            "scabbard_agents_connected",
            "Agents with a live session",
            s.connected_agents,
        ),
        (
            "scabbard_agents_registered",
            "Agents registered with the cluster",
            s.registered_agents,
        ),
        (
            "scabbard_agents_lost",
            "Registered agents declared lost (silent past their lease); their attempts were requeued",
            s.lost_agents,
        ),
        (
            "scabbard_workflows_running",
            "Workflows running",
            s.running_workflows,
        ),
        (
            "scabbard_workflows_pending",
            "Workflows waiting for their concurrency group",
            s.pending_workflows,
        ),
    ] {
        gauge(&mut r, name, help, v as i64);
    }
    gauge(
        &mut r,
        "scabbard_breakers_open",
        "Circuit breakers open",
        count(BreakerState::Open),
    );
    gauge(
        &mut r,
        "scabbard_breakers_half_open",
        "Circuit breakers letting probes through",
        count(BreakerState::HalfOpen),
    );
    counter(
        &mut r,
        "scabbard_cache_affinity_hits",
        "Container tasks sent to a worker whose engine had their image warm",
        s.cache_affinity_hits,
    );
    counter(
        &mut r,
        "scabbard_cache_affinity_misses",
        "Container tasks sent to a worker whose engine did not have their image",
        s.cache_affinity_misses,
    );
    gauge_f(
        &mut r,
        "scabbard_cache_affinity_hit_ratio",
        "Share of container tasks sent to a warm engine since the leader started (0 before any)",
        if dispatched == 0 {
            0.0
        } else {
            s.cache_affinity_hits as f64 / dispatched as f64
        },
    );
    projects(&mut r, s);
    waiting(&mut r, s);
    retention(&mut r);
    r
}

/// Waiting tasks and workflows by placement reason (see docs/placement.md).
fn waiting(r: &mut Registry, s: &CoreStats) {
    let tasks = Family::<ReasonLabel, Gauge>::default();
    let workflows = Family::<ReasonLabel, Gauge>::default();
    for w in &s.waiting {
        let l = ReasonLabel {
            reason: w
                .reason()
                .as_str_name()
                .trim_start_matches("PLACEMENT_REASON_")
                .to_ascii_lowercase(),
        };
        if w.tasks > 0 {
            tasks.get_or_create(&l).set(w.tasks as i64);
        }
        if w.workflows > 0 {
            workflows.get_or_create(&l).set(w.workflows as i64);
        }
    }
    r.register(
        "scabbard_tasks_waiting",
        "Queued and retry-waiting tasks by why they wait (placement reason)",
        tasks,
    );
    r.register(
        "scabbard_workflows_waiting",
        "Pending workflows by why they wait (placement reason)",
        workflows,
    );
}

fn projects(r: &mut Registry, s: &CoreStats) {
    let queued = Family::<ProjectLabel, Gauge>::default();
    let running = Family::<ProjectLabel, Gauge>::default();
    let age = Family::<ProjectLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let now = now_ms();
    let mut oldest_all = 0.0f64;
    for p in &s.projects {
        let l = ProjectLabel {
            project: p.project.clone(),
        };
        queued.get_or_create(&l).set(i64::from(p.queued));
        running.get_or_create(&l).set(i64::from(p.running));
        let a = if p.oldest_queued_at_ms > 0 {
            (now - p.oldest_queued_at_ms).max(0) as f64 / 1000.0
        } else {
            0.0
        };
        age.get_or_create(&l).set(a);
        oldest_all = oldest_all.max(a);
    }
    r.register(
        "scabbard_project_tasks_queued",
        "Tasks waiting for an agent, per project",
        queued,
    );
    r.register(
        "scabbard_project_tasks_running",
        "Tasks holding a slot on an agent (assigned or running), per project",
        running,
    );
    r.register(
        "scabbard_project_queue_oldest_age_seconds",
        "Age of the oldest queued task of a project (time since it entered the queue; 0 = none queued)",
        age,
    );
    gauge_f(
        r,
        "scabbard_queue_oldest_age_seconds",
        "Age of the oldest queued task of any project (0 = none queued)",
        oldest_all,
    );
}

fn retention(r: &mut Registry) {
    let st = crate::retention::status();
    let deleted = Family::<KindLabel, prometheus_client::metrics::counter::Counter>::default();
    for (kind, n) in [
        ("task", st.tasks_deleted),
        ("workflow", st.workflows_deleted),
        ("log", st.logs_deleted),
        ("artifact", st.artifacts_deleted),
        ("audit", st.audit_deleted),
        ("idempotency_key", st.idempotency_keys_deleted),
    ] {
        deleted.get_or_create(&KindLabel { kind }).inc_by(n);
    }
    r.register(
        "scabbard_retention_deleted",
        "Items the retention sweeper deleted since the controller started, by kind",
        deleted,
    );
    gauge_f(
        r,
        "scabbard_retention_last_sweep_timestamp_seconds",
        "When the last retention sweep ended (0 = none yet)",
        st.last_sweep_at_ms as f64 / 1000.0,
    );
    gauge(
        r,
        "scabbard_retention_backlog",
        "Expired tasks and workflows the last sweep left for later rounds",
        st.backlog as i64,
    );
    gauge_f(
        r,
        "scabbard_retention_oldest_finished_timestamp_seconds",
        "Finish time of the oldest finished task kept (0 = none)",
        st.oldest_finished_at_ms as f64 / 1000.0,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_leader_metrics_and_only_health_on_a_follower() {
        let follower = render_snapshot(true, None);
        assert!(follower.contains("scabbard_leader 0"));
        assert!(follower.contains("scabbard_store_healthy 1"));
        assert!(!follower.contains("scabbard_tasks_queued"));
        let stats = CoreStats {
            queued: 3,
            cache_affinity_hits: 3,
            cache_affinity_misses: 1,
            projects: vec![crate::metrics::ProjectLoad {
                project: "p\"1".into(),
                queued: 3,
                running: 2,
                oldest_queued_at_ms: now_ms() - 5_000,
            }],
            waiting: vec![scabbard_common::proto::WaitingCount {
                reason: scabbard_common::proto::PlacementReason::MissingLabel as i32,
                tasks: 2,
                workflows: 0,
            }],
            ..CoreStats::default()
        };
        let leader = render_snapshot(false, Some(&stats));
        assert!(
            leader.contains("scabbard_tasks_waiting{reason=\"missing_label\"} 2"),
            "{leader}"
        );
        assert!(leader.contains("scabbard_leader 1"));
        assert!(leader.contains("scabbard_tasks_queued 3"));
        assert!(leader.contains("scabbard_cache_affinity_hit_ratio 0.75"));
        assert!(leader.contains("# TYPE scabbard_cache_affinity_hits_total counter"));
        assert!(leader.contains("scabbard_project_tasks_running{project=\"p\\\"1\"} 2"));
        assert!(leader.contains("scabbard_retention_deleted_total{kind=\"task\"}"));
    }
}
