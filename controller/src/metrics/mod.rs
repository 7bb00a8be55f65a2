//! Prometheus metrics of the controller (`prometheus-client`): `GET /metrics` on
//! `metrics_listen`, served by [`scabbard_common::metrics_http`] (Prometheus text 0.0.4, or
//! OpenMetrics when asked). No authentication: bind it to an address only your monitoring
//! can reach.
//!
//! Two sources: [`registry`] holds what hot paths record as it happens (RPC latency, task
//! submit→start and submit→finish, store group commits, dispatch rounds, log bytes,
//! sessions); [`snapshot`] reads the core at scrape time (queue depth and running tasks per
//! project, agents, breakers, workflows, retention). A follower reports `scabbard_leader 0`,
//! its store health and its own recorded metrics, but no snapshot of a core.

mod load;
mod registry;
mod rpc;
mod snapshot;
pub mod stats;

use std::sync::Arc;

use scabbard_common::metrics_http::{self, Format};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::core::CoreRouter;
use crate::store::Store;

pub use load::ProjectLoad;
pub(crate) use load::project_loads;
pub(crate) use registry::{
    DispatchRound, log_received, session_attached, store_commit, task_finished, task_started,
};
pub use rpc::RpcMetricsLayer;
pub use snapshot::render_snapshot;

/// Serves `/metrics` on `listener` until `shutdown`.
/// Connections are bounded like the gRPC listener's (per-address cap, handshake timeout).
pub async fn serve(
    listener: TcpListener,
    limits: Arc<crate::listener::ConnLimits>,
    core: CoreRouter,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) {
    let render = move |format: Format| {
        let (core, store) = (core.clone(), store.clone());
        async move { render(format, &core, &*store).await }
    };
    metrics_http::serve(limits.incoming(listener), render, shutdown).await
}

/// One scrape: this process's recorded metrics, then the snapshot.
pub async fn render(format: Format, core: &CoreRouter, store: &dyn Store) -> String {
    let healthy = store.health().await.is_ok();
    let stats = match core.current() {
        Ok(c) => c.stats().await.ok(),
        Err(_) => None,
    };
    let snap = snapshot::registry(healthy, stats.as_ref());
    metrics_http::encode(format, &[&registry::METRICS.registry, &snap])
}
