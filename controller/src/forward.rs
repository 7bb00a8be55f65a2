//! Followers forward client calls to the leader, so any controller (or a load balancer in
//! front of them all) serves every RPC: the outermost tower layer sends the raw HTTP/2
//! gRPC request, headers (the bearer token included) and streaming body as they are, over
//! one cached channel to the leader, and streams the leader's answer back. The leader
//! authenticates, rate-limits and serves the call; the follower never decodes it.
//!
//! What is not forwarded, and answered here as before (the services then redirect with
//! `UNAVAILABLE` and the leader's address in `x-scabbard-leader`):
//! * `AgentService` (`Register`, `Session`, …): the leader checks a worker's client
//!   certificate against the agent it claims to be, which a proxy would hide, and the
//!   session's liveness must be the worker's own connection to the leader (a session held
//!   through a follower would outlive a worker cut off from the leader, or die with a
//!   follower the worker does not need). Workers follow redirects themselves.
//! * Health, reflection and `AdminService/ClusterStatus`: they describe this controller
//!   (`ClusterStatus` says which controller answered and whom it takes for the leader:
//!   clients find the leader with it).
//! * Calls already forwarded once ([`FORWARDED_KEY`]): two controllers that each believe
//!   the other leads must not bounce a call between them.
//! * Everything while the listener speaks TLS and no peer CA is configured
//!   (`tls.peer_ca_file`, `--tls-peer-ca`): the follower could not verify the leader's
//!   certificate, so it redirects. With the peer CA it forwards over TLS, checking the
//!   leader's certificate against the host of its advertised address (or
//!   `tls.peer_domain`).
//!
//! A leader that cannot be reached within [`CONNECT_TIMEOUT`] gets the caller the redirect
//! it got before (`UNAVAILABLE` with the leader's address). A connected leader that goes
//! silent (frozen) is found by HTTP/2 keepalive pings within about 4 s: the forwarded calls
//! fail and the caller retries (new calls go to the next leader once one is elected) (no deadline on the first response, so
//! slow uploads and long unary calls are not cut).

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use scabbard_common::Error;
use tokio::sync::watch;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tower::{Layer, Service, ServiceExt};

use crate::core::Route;

/// Metadata set on a forwarded call (value: the forwarding controller's address).
pub const FORWARDED_KEY: &str = "x-scabbard-forwarded-by";

/// Metadata set on a forwarded call: the address of the client the follower serves. The
/// leader records it beside the follower's address (`<follower> for <client>` in audit
/// entries); never trusted alone, since any client could send it.
pub const FORWARDED_FOR_KEY: &str = "x-scabbard-forwarded-for";

/// How long a follower tries to connect to the leader before answering with a redirect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether calls to `path` are forwarded to the leader.
pub fn forwardable(path: &str) -> bool {
    path.starts_with("/scabbard.v1.")
        && !path.starts_with("/scabbard.v1.AgentService/")
        && path != "/scabbard.v1.AdminService/ClusterStatus"
}

/// One cached channel to the current leader, rebuilt when the leader changes.
#[derive(Default)]
pub struct LeaderChannels {
    current: Mutex<Option<(String, Channel)>>,
    /// TLS towards the leader (peer CA), or plaintext.
    tls: Option<ClientTlsConfig>,
}

impl LeaderChannels {
    /// Channels over TLS verified with `tls` (None: plaintext).
    pub fn new(tls: Option<ClientTlsConfig>) -> Self {
        Self {
            current: Mutex::default(),
            tls,
        }
    }

    /// The channel to `addr` (connected lazily, on first use).
    pub fn get(&self, addr: &str) -> Result<Channel, Error> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((a, ch)) = &*current
            && a == addr
        {
            return Ok(ch.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| Error::invalid(format!("leader address {addr}: {e}")))?;
        if let Some(tls) = &self.tls {
            ep = ep
                .tls_config(tls.clone())
                .map_err(|e| Error::invalid(format!("TLS towards the leader {addr}: {e}")))?;
        }
        let ch = ep
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // A frozen leader (connected, silent) fails the forwarded calls within ~4 s.
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true)
            .connect_lazy();
        *current = Some((addr.to_string(), ch.clone()));
        Ok(ch)
    }
}

/// The leader to forward to, if calls are forwarded right now.
pub fn leader_of(route: &Route) -> Option<String> {
    match route {
        Route::Follower(Some(l)) => Some(l.clone()),
        _ => None,
    }
}

/// Tower layer forwarding follower calls to the leader (see the module docs).
#[derive(Clone)]
pub struct ForwardLayer {
    route: watch::Receiver<Route>,
    channels: Arc<LeaderChannels>,
    me: String,
    enabled: bool,
}

impl ForwardLayer {
    /// Forwards while `route` says another controller leads; `me` is this controller's
    /// advertised address (sent along as [`FORWARDED_KEY`]). `enabled = false` keeps
    /// redirecting (TLS listeners without a peer CA).
    pub fn new(
        route: watch::Receiver<Route>,
        channels: Arc<LeaderChannels>,
        me: String,
        enabled: bool,
    ) -> Self {
        Self {
            route,
            channels,
            me,
            enabled,
        }
    }
}

impl<S> Layer<S> for ForwardLayer {
    type Service = Forward<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Forward {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`ForwardLayer`].
#[derive(Clone)]
pub struct Forward<S> {
    inner: S,
    layer: ForwardLayer,
}

impl<S> Service<http::Request<Body>> for Forward<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let leader = if self.layer.enabled
            && forwardable(req.uri().path())
            && !req.headers().contains_key(FORWARDED_KEY)
        {
            leader_of(&self.layer.route.borrow())
        } else {
            None
        };
        let Some(leader) = leader else {
            return Box::pin(self.inner.call(req));
        };
        let channel = match self.layer.channels.get(&leader) {
            Ok(c) => c,
            Err(_) => return Box::pin(self.inner.call(req)),
        };
        if let Ok(v) = http::HeaderValue::from_str(&self.layer.me) {
            req.headers_mut().insert(FORWARDED_KEY, v);
        }
        let client = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|i| i.remote_addr())
            .and_then(|a| http::HeaderValue::from_str(&a.to_string()).ok());
        match client {
            Some(v) => req.headers_mut().insert(FORWARDED_FOR_KEY, v),
            None => req.headers_mut().remove(FORWARDED_FOR_KEY),
        };
        Box::pin(async move {
            match channel.oneshot(req).await {
                Ok(resp) => Ok(resp),
                Err(e) => {
                    tracing::debug!(%leader, error = %e, "cannot forward to the leader: redirecting");
                    Ok(tonic::Status::from(Error::NotLeader {
                        leader: Some(leader),
                    })
                    .into_http::<Body>())
                }
            }
        })
    }
}

/// Whether the leader at `addr` answers its health check as SERVING within `deadline`.
pub async fn leader_serving(channels: &LeaderChannels, addr: &str, deadline: Duration) -> bool {
    let Ok(ch) = channels.get(addr) else {
        return false;
    };
    let mut client = tonic_health::pb::health_client::HealthClient::new(ch);
    let check = client.check(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    });
    matches!(
        tokio::time::timeout(deadline, check).await,
        Ok(Ok(r)) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    )
}

#[cfg(test)]
mod tests {
    use super::forwardable;

    #[test]
    fn client_calls_are_forwarded_agent_health_and_reflection_are_not() {
        for p in [
            "/scabbard.v1.TaskService/Submit",
            "/scabbard.v1.TaskService/Watch",
            "/scabbard.v1.TaskService/Logs",
            "/scabbard.v1.WorkflowService/Watch",
            "/scabbard.v1.AdminService/ListAgents",
            "/scabbard.v1.ArtifactService/Upload",
        ] {
            assert!(forwardable(p), "{p}");
        }
        for p in [
            "/scabbard.v1.AgentService/Register",
            "/scabbard.v1.AgentService/Session",
            "/scabbard.v1.AdminService/ClusterStatus",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(!forwardable(p), "{p}");
        }
    }
}
