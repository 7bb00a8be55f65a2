//! Prometheus metrics: `GET /metrics` on `metrics_listen` (plain HTTP/1.1, text exposition
//! format 0.0.4). Read from the core of this controller when it leads; a follower reports
//! `scabbard_leader 0` and its store health only. No authentication: bind it to an address
//! only your monitoring can reach.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use scabbard_common::proto::BreakerState;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::core::{CoreRouter, CoreStats};
use crate::store::Store;

/// Serves `/metrics` on `listener` until `shutdown`.
/// Connections are bounded like the gRPC listener's (per-address cap, handshake timeout).
pub async fn serve(
    listener: TcpListener,
    limits: Arc<crate::listener::ConnLimits>,
    core: CoreRouter,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) {
    let incoming = limits.incoming(listener);
    tokio::pin!(incoming);
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = futures::StreamExt::next(&mut incoming) => match r {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    warn!(error = %e, "metrics listener: accept failed");
                    continue;
                }
                None => return,
            },
        };
        let (core, store) = (core.clone(), store.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let (core, store) = (core.clone(), store.clone());
                async move { Ok::<_, Infallible>(respond(req, core, store).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    core: CoreRouter,
    store: Arc<dyn Store>,
) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            "only GET /metrics is served here\n".into(),
        );
    }
    let healthy = store.health().await.is_ok();
    let stats = match core.current() {
        Ok(c) => c.stats().await.ok(),
        Err(_) => None,
    };
    let mut body = render(healthy, stats.as_ref());
    if stats.is_some() {
        body.push_str(&crate::retention::metrics_text());
    }
    text(StatusCode::OK, body)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// The exposition text for a controller (stats only when it leads).
pub fn render(store_healthy: bool, stats: Option<&CoreStats>) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "scabbard_leader",
        "gauge",
        "1 when this controller leads the cluster.",
        f64::from(u8::from(stats.is_some())),
    );
    metric(
        "scabbard_store_healthy",
        "gauge",
        "1 when the state store answers.",
        f64::from(u8::from(store_healthy)),
    );
    let Some(s) = stats else {
        return out;
    };
    let open = s
        .breakers
        .iter()
        .filter(|b| b.state() == BreakerState::Open)
        .count();
    let half = s
        .breakers
        .iter()
        .filter(|b| b.state() == BreakerState::HalfOpen)
        .count();
    let dispatched = s.cache_affinity_hits + s.cache_affinity_misses;
    for (name, kind, help, value) in [
        (
            "scabbard_tasks_queued",
            "gauge",
            "Tasks waiting for an agent.",
            s.queued as f64,
        ),
        (
            "scabbard_tasks_active",
            "gauge",
            "Tasks assigned or running.",
            s.active as f64,
        ),
        (
            "scabbard_tasks_known",
            "gauge",
            "Tasks held in the leader's memory.",
            s.total as f64,
        ),
        (
            "scabbard_core_tasks_in_memory",
            "gauge",
            "Tasks the core holds: live work and the finished cache (finished_cache_tasks).",
            s.total as f64,
        ),
        (
            "scabbard_core_finished_cached",
            "gauge",
            "Finished tasks in the core's cache; older ones are served from the store.",
            s.finished_cached as f64,
        ),
        (
            "scabbard_agents_connected",
            "gauge",
            "Agents with a live session.",
            s.connected_agents as f64,
        ),
        (
            "scabbard_workflows_running",
            "gauge",
            "Workflows running.",
            s.running_workflows as f64,
        ),
        (
            "scabbard_workflows_pending",
            "gauge",
            "Workflows waiting for their concurrency group.",
            s.pending_workflows as f64,
        ),
        (
            "scabbard_breakers_open",
            "gauge",
            "Circuit breakers open.",
            open as f64,
        ),
        (
            "scabbard_breakers_half_open",
            "gauge",
            "Circuit breakers letting probes through.",
            half as f64,
        ),
        (
            "scabbard_cache_affinity_hits_total",
            "counter",
            "Container tasks sent to a worker whose engine had their image warm.",
            s.cache_affinity_hits as f64,
        ),
        (
            "scabbard_cache_affinity_misses_total",
            "counter",
            "Container tasks sent to a worker whose engine did not have their image.",
            s.cache_affinity_misses as f64,
        ),
        (
            "scabbard_cache_affinity_hit_ratio",
            "gauge",
            "Share of container tasks sent to a warm engine since the leader started (0 before any).",
            if dispatched == 0 {
                0.0
            } else {
                s.cache_affinity_hits as f64 / dispatched as f64
            },
        ),
    ] {
        metric(name, kind, help, value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_leader_metrics_and_only_health_on_a_follower() {
        let follower = render(true, None);
        assert!(follower.contains("scabbard_leader 0"));
        assert!(follower.contains("scabbard_store_healthy 1"));
        assert!(!follower.contains("scabbard_tasks_queued"));
        let stats = CoreStats {
            queued: 3,
            cache_affinity_hits: 3,
            cache_affinity_misses: 1,
            ..CoreStats::default()
        };
        let leader = render(false, Some(&stats));
        assert!(leader.contains("scabbard_leader 1"));
        assert!(leader.contains("scabbard_tasks_queued 3"));
        assert!(leader.contains("scabbard_cache_affinity_hit_ratio 0.75"));
        assert!(leader.contains("# TYPE scabbard_cache_affinity_hits_total counter"));
    }
}
