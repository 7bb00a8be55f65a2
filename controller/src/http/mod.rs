//! The HTTP/JSON API (`--http-listen`, config `http_listen`): `/api/v1/...` routes served
//! with axum. Every route is a thin adapter over one gRPC method: the JSON body, query and
//! path parameters become the method's request message (proto3 JSON mapping, the pbjson
//! impls in `common`), and the call goes through the *same* tower stack the gRPC listener
//! uses (forwarding to the leader, authentication, rate and concurrency limits) into the
//! same tonic services, in process. So tokens, scopes, projects, limits, validation and
//! audit are one piece of code for both listeners. This module owns the listener, the call
//! path into the in-process services and the mapping of `Status` to HTTP ([`error`]).

mod download;
mod error;
mod events;
mod openapi;
mod routes;
mod schemas;
mod sse;
mod tls;
mod ui;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::HeaderMap;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::TcpConnectInfo;
use tracing::info;

use crate::store::Store;

/// The gRPC services with their layers, callable in process.
pub type Inner =
    tower::util::BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;

/// Store key prefix under which each controller publishes its HTTP base URL (under its
/// membership lease), keyed by its advertised gRPC address: a follower that must redirect
/// finds the leader's HTTP address there.
pub const HTTP_MEMBER_PREFIX: &str = "http-members/";

/// What every handler needs.
#[derive(Clone)]
pub struct HttpState {
    inner: Inner,
    store: Arc<dyn Store>,
}

impl HttpState {
    /// A tonic client over the in-process services, ready for a call.
    async fn grpc(&self) -> Result<tonic::client::Grpc<Inner>, tonic::Status> {
        let mut grpc = tonic::client::Grpc::new(self.inner.clone());
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("service not ready: {e}")))?;
        Ok(grpc)
    }

    /// The leader's HTTP base URL, when it published one.
    async fn leader_http(&self, leader_grpc: &str) -> Option<String> {
        let key = format!("{HTTP_MEMBER_PREFIX}{leader_grpc}");
        let kv = self.store.get(&key).await.ok().flatten()?;
        String::from_utf8(kv.value).ok()
    }
}

/// A tonic request carrying the HTTP caller's bearer token (and trace context) as
/// metadata and its address as the connection's peer (audit entries name it).
fn grpc_request<T>(headers: &HeaderMap, peer: SocketAddr, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    for key in ["authorization", "traceparent", "tracestate"] {
        if let Some(v) = headers.get(key)
            && let Ok(v) = tonic::metadata::MetadataValue::try_from(v.as_bytes())
        {
            req.metadata_mut().insert(key, v);
        }
    }
    req.extensions_mut().insert(TcpConnectInfo {
        local_addr: None,
        remote_addr: Some(peer),
    });
    req
}

/// Starts the HTTP API on `http_addr` over the in-process services, and publishes its
/// address (for followers' redirects) while serving.
pub async fn spawn(
    cfg: &crate::config::ControllerConfig,
    http_addr: SocketAddr,
    inner: Inner,
    store: Arc<dyn Store>,
    advertise: &str,
    shutdown: &CancellationToken,
) -> scabbard_common::Result<tokio::task::JoinHandle<()>> {
    let max = cfg.max_message_bytes;
    let tls = tls(&cfg.tls)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let l = bind(http_addr).await?;
    let local = l.local_addr()?;
    // Published as `http(s)://host:port`: the advertised host when listening on all
    // addresses.
    let host = if local.ip().is_unspecified() {
        let h = advertise.rsplit_once(':').map_or(advertise, |(h, _)| h);
        format!("{h}:{}", local.port())
    } else {
        local.to_string()
    };
    tokio::spawn(crate::membership::keep_key(
        store.clone(),
        format!("{}{advertise}", HTTP_MEMBER_PREFIX),
        format!("{scheme}://{host}"),
        cfg.leader_lease_ttl(),
        shutdown.clone(),
    ));
    let stop = shutdown.clone();
    Ok(tokio::spawn(async move {
        if let Err(e) = serve(
            l,
            HttpServe {
                tls,
                inner,
                store,
                max_body: max,
            },
            stop,
        )
        .await
        {
            tracing::warn!(error = %e, "HTTP API server failed");
        }
    }))
}

/// Binds `addr` for the HTTP API (errors name the config key).
pub async fn bind(addr: SocketAddr) -> scabbard_common::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        scabbard_common::Error::invalid(format!("cannot listen on http_listen {addr}: {e}"))
    })
}

/// The TLS settings of the HTTP listener: the gRPC listener's certificate, if any.
pub fn tls(cfg: &crate::tls::TlsConfig) -> scabbard_common::Result<Option<TlsAcceptor>> {
    tls::acceptor(cfg)
}

/// What the HTTP listener serves with.
pub struct HttpServe {
    /// HTTPS with this acceptor; plain HTTP without.
    pub tls: Option<TlsAcceptor>,
    /// The in-process services.
    pub inner: Inner,
    /// The store (the leader's published HTTP address).
    pub store: Arc<dyn Store>,
    /// Largest request body (the controller's `max_message_bytes`).
    pub max_body: usize,
}

/// Serves the HTTP API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    with: HttpServe,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let HttpServe {
        tls,
        inner,
        store,
        max_body,
    } = with;
    let mcp = mcp_service(&inner, addr, &shutdown);
    let app = router(HttpState { inner, store })
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        // MCP speaks JSON-RPC with its own errors: outside the JSON error mapping.
        .route_service("/mcp", mcp);
    if let Some(acceptor) = tls {
        info!(%addr, "HTTP API (HTTPS) on /api/v1 (OpenAPI at /api/v1/openapi.json)");
        return tls::serve(listener, acceptor, app, shutdown).await;
    }
    info!(%addr, "HTTP API on /api/v1 (OpenAPI at /api/v1/openapi.json)");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
}

/// The streamable-HTTP MCP endpoint over the same in-process services (and so the same
/// auth, scopes, projects and limits as every other call), with the caller's bearer token.
/// `Host` headers accepted: loopback names and the listener's own address.
fn mcp_service(
    inner: &Inner,
    addr: SocketAddr,
    shutdown: &CancellationToken,
) -> scabbard_mcp::HttpService {
    let transport = scabbard_mcp::Transport::new(tower::ServiceExt::map_err(
        inner.clone(),
        |e: Infallible| match e {},
    ));
    let port = addr.port();
    let mut hosts = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "[::1]".to_string(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ];
    if !addr.ip().is_unspecified() {
        hosts.push(addr.to_string());
    }
    scabbard_mcp::http_service(transport, hosts, shutdown.child_token())
}

/// Every route, plus JSON 404s for the rest; every error is JSON.
pub fn router(state: HttpState) -> axum::Router {
    routes::router()
        .merge(ui::routes())
        .fallback(error::not_found)
        .layer(axum::middleware::map_response(error::json_errors))
        .with_state(state)
}
