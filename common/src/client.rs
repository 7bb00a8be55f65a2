//! Client library: connecting to a controller (plaintext or TLS, see [`ClientOptions`])
//! and the generated clients with a bearer token and the caller's trace context
//! (`traceparent`, when tracing is on) attached to every call ([`authed`]);
//! artifact downloads and uploads in [`artifacts`].

use std::path::PathBuf;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{Error, Result};

pub mod artifacts;

pub use artifacts::{
    ArtifactSink, DownloadOptions, Downloaded, UploadFailure, download_artifact,
    is_transient_status, upload_artifact,
};

pub use crate::proto::admin_service_client::AdminServiceClient;
pub use crate::proto::agent_service_client::AgentServiceClient;
pub use crate::proto::artifact_service_client::ArtifactServiceClient;
pub use crate::proto::project_service_client::ProjectServiceClient;
pub use crate::proto::task_service_client::TaskServiceClient;

/// How to reach and authenticate to a controller.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Bearer token sent on every call.
    pub token: Option<String>,
    /// PEM CA certificate to verify the controller with; setting it (or an `https://`
    /// address) turns TLS on.
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate and key for mutual TLS (workers).
    pub client_cert: Option<PathBuf>,
    /// Key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Name to verify the controller's certificate against (default: the address's host).
    pub tls_domain: Option<String>,
    /// Deadline on each call (until the response, or a stream's first message, arrives);
    /// `None`: no deadline beyond the keep-alive that detects a silent controller. The
    /// CLI's `--timeout`. A call past it fails with [`tonic::Code::Cancelled`] and the
    /// message [`TIMEOUT_MESSAGE`].
    pub request_timeout: Option<Duration>,
}

/// The message of a call that ran past [`ClientOptions::request_timeout`] (tonic's).
pub const TIMEOUT_MESSAGE: &str = "Timeout expired";

/// How often an HTTP/2 keep-alive ping goes to the controller, on every channel, busy or
/// idle.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// How long a ping may go unanswered before the connection is given up: a controller that
/// stopped answering (frozen, partitioned) is detected within
/// `KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT` (4 s), well within the default agent lease
/// (10 s), and every call on that connection fails with UNAVAILABLE.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a TCP connect to a controller may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the first answer on a new connection may take when looking for the leader (the
/// cluster status asked of each address and of the leader it names): a redirect into a
/// frozen controller fails after this and the next address is tried, instead of hanging.
pub const FIRST_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Adds `authorization: Bearer <token>` to every call made through a channel, and the
/// current span's `traceparent`/`tracestate` when tracing is on.
#[derive(Clone, Debug, Default)]
pub struct BearerAuth {
    header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl BearerAuth {
    /// An interceptor for `token` (`None` sends nothing).
    pub fn new(token: Option<&str>) -> Result<Self> {
        let header = match token {
            None => None,
            Some(t) => Some(format!("Bearer {}", t.trim()).parse().map_err(|_| {
                Error::invalid("token contains characters not allowed in metadata")
            })?),
        };
        Ok(Self { header })
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.header
            && !req.metadata().contains_key("authorization")
        {
            req.metadata_mut().insert("authorization", h.clone());
        }
        crate::telemetry::inject_metadata(req.metadata_mut());
        Ok(req)
    }
}

/// A channel that sends a bearer token on every call.
pub type AuthedChannel = InterceptedService<Channel, BearerAuth>;

/// Wraps `channel` so every call carries `token`.
pub fn authed(channel: Channel, token: Option<&str>) -> Result<AuthedChannel> {
    Ok(InterceptedService::new(channel, BearerAuth::new(token)?))
}

/// Largest message the clients accept or send (matches the controller's limit).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Normalises `host:port` or a URL into an endpoint URL (`http://` when no scheme).
pub fn endpoint_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// Builds an endpoint with Scabbard's defaults (connect timeout, keep-alive pings with a
/// timeout, see [`KEEPALIVE_INTERVAL`], no Nagle).
pub fn endpoint(addr: &str) -> Result<Endpoint> {
    let url = endpoint_url(addr);
    let ep = Endpoint::from_shared(url.clone())
        .map_err(|e| Error::invalid(format!("bad controller address {addr:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok(ep)
}

/// Whether `s` is a call that ran past [`ClientOptions::request_timeout`].
pub fn is_timeout(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Cancelled && s.message() == TIMEOUT_MESSAGE
}

/// Connects to a controller at `addr` (`host:port` or URL), plaintext.
pub async fn connect(addr: &str) -> Result<Channel> {
    connect_with(addr, &ClientOptions::default()).await
}

impl ClientOptions {
    /// Whether connections to `addr` use TLS: a CA certificate or a client certificate is
    /// configured, or the address is `https://…`.
    pub fn uses_tls(&self, addr: &str) -> bool {
        self.ca_cert.is_some() || self.client_cert.is_some() || addr.starts_with("https://")
    }

    /// The tonic TLS settings (CA, client identity, domain), with every PEM file read and
    /// checked; errors name the file.
    pub fn tls_config(&self) -> Result<ClientTlsConfig> {
        let Some(ca) = &self.ca_cert else {
            return Err(Error::invalid(
                "TLS needs the CA certificate that signed the controller's certificate (--ca-cert, or ca_cert in the config); this build has no system roots, so for a public CA pass the system bundle (e.g. /etc/ssl/certs/ca-certificates.crt)",
            ));
        };
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(crate::tls::read_cert_pem(
                ca, "ca_cert",
            )?))
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    crate::tls::read_cert_pem(cert, "client_cert")?,
                    crate::tls::read_key_pem(key, "client_key")?,
                ));
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(Error::invalid(
                    "client_cert is set without client_key (--client-key)",
                ));
            }
            (None, Some(_)) => {
                return Err(Error::invalid(
                    "client_key is set without client_cert (--client-cert)",
                ));
            }
        }
        if let Some(d) = &self.tls_domain {
            tls = tls.domain_name(d.clone());
        }
        Ok(tls)
    }
}

/// How long a TLS handshake with the controller may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds an endpoint for `addr` with the TLS settings of `opts`: with TLS (see
/// [`ClientOptions::uses_tls`]) a bare `host:port` becomes `https://host:port`, and an
/// explicit `http://` address is refused rather than silently sent in plaintext.
pub fn endpoint_with(addr: &str, opts: &ClientOptions) -> Result<Endpoint> {
    let ep = endpoint_with_tls(addr, opts)?;
    Ok(match opts.request_timeout {
        Some(t) => ep.timeout(t),
        None => ep,
    })
}

fn endpoint_with_tls(addr: &str, opts: &ClientOptions) -> Result<Endpoint> {
    if !opts.uses_tls(addr) {
        return endpoint(addr);
    }
    if addr.starts_with("http://") {
        return Err(Error::invalid(format!(
            "controller address {addr:?} is plaintext (http://) but TLS settings are given: use https:// or host:port"
        )));
    }
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("https://{addr}")
    };
    endpoint(&url)?
        .tls_config(opts.tls_config()?)
        .map_err(|e| Error::invalid(format!("TLS settings for {addr}: {}", error_chain(&e))))
}

/// Connects to a controller at `addr` with `opts` (TLS when configured).
///
/// With a client certificate, one health check is made before returning: under TLS 1.3 a
/// server refuses a client certificate only after the client considers the handshake
/// done, and the refusal would otherwise surface later as a bare "broken pipe".
pub async fn connect_with(addr: &str, opts: &ClientOptions) -> Result<Channel> {
    let channel = endpoint_with(addr, opts)?.connect().await.map_err(|e| {
        let mut msg = format!("cannot reach controller at {addr}: {}", error_chain(&e));
        if !opts.uses_tls(addr) && looks_like_tls_needed(&msg) {
            msg.push_str(" (does the controller use TLS? then pass --ca-cert)");
        }
        Error::Unavailable(msg)
    })?;
    if let Some(cert) = &opts.client_cert
        && let Err(why) = probe(channel.clone()).await
    {
        return Err(Error::Unavailable(format!(
            "controller at {addr} closed the connection after the TLS handshake, most likely refusing the client certificate {} (is it issued by the controller's client CA, and still valid?): {why}",
            cert.display()
        )));
    }
    Ok(channel)
}

/// `grpc.health.v1.HealthCheckRequest` (for [`probe`]).
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse` (for [`probe`]).
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

/// One health check: `Ok` once the server answered at all (any gRPC status), `Err` when
/// the connection itself failed.
async fn probe(channel: Channel) -> std::result::Result<(), String> {
    let mut grpc = tonic::client::Grpc::new(channel);
    let call = async {
        grpc.ready().await.map_err(|e| error_chain(&e))?;
        let r: std::result::Result<tonic::Response<HealthCheckResponse>, tonic::Status> = grpc
            .unary(
                tonic::Request::new(HealthCheckRequest::default()),
                tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/grpc.health.v1.Health/Check",
                ),
                tonic_prost::ProstCodec::default(),
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(s) => match std::error::Error::source(&s) {
                // Failed below gRPC: the connection is gone.
                Some(src) if src.is::<tonic::transport::Error>() => Err(error_chain(src)),
                _ => Ok(()),
            },
        }
    };
    tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err("no answer to a health check".into()))
}

/// `e` and its sources, joined with `: ` (tonic's transport errors say little on their own).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        cur = s.source();
    }
    out
}

/// A failed call as an [`Error`]; a connection failure keeps its cause (and a hint when a
/// plaintext client seems to have reached a TLS port).
fn call_error(addr: &str, opts: &ClientOptions, s: tonic::Status) -> Error {
    match std::error::Error::source(&s) {
        Some(src) if src.is::<tonic::transport::Error>() => {
            let mut msg = format!("controller at {addr}: {}", error_chain(src));
            if !opts.uses_tls(addr) && looks_like_tls_needed(&msg) {
                msg.push_str(" (does the controller use TLS? then pass --ca-cert)");
            }
            Error::Unavailable(msg)
        }
        _ => s.into(),
    }
}

fn looks_like_tls_needed(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    [
        "connection reset",
        "broken pipe",
        "connection closed",
        // The server hung up before the HTTP/2 handshake finished (what a TLS listener
        // does with a plaintext client when the reset races the client's preface).
        "connection was not ready",
        "frame",
        "protocol",
    ]
    .iter()
    .any(|p| m.contains(p))
}

/// Splits a comma-separated list of controller addresses.
pub fn addresses(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Connects to the leading controller, given one or more controller addresses
/// (comma-separated): asks the first reachable one for the cluster status and follows it to
/// the leader. With no leader elected yet, returns the reachable controller (its answers
/// then say so).
pub async fn connect_leader(list: &str) -> Result<Channel> {
    connect_leader_with(list, &ClientOptions::default()).await
}

/// [`connect_leader`] with TLS settings.
///
/// Every step is bounded: the status call to each address and the check of the leader it
/// names each get [`FIRST_RESPONSE_TIMEOUT`] (or the shorter `request_timeout`). The
/// addresses are tried in order but staggered, not one after another: when one has not
/// answered within [`STAGGER`] the next is tried alongside it, and the first to lead the
/// caller to a leader wins. So a frozen controller first in the list (or a redirect into a
/// frozen leader) costs a quarter of a second, not a connect deadline, while a healthy
/// first address is still the one used.
pub async fn connect_leader_with(list: &str, opts: &ClientOptions) -> Result<Channel> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let addrs = addresses(list);
    if addrs.is_empty() {
        return Err(Error::invalid(
            "no controller address given (--controller host:port[,host:port…])",
        ));
    }
    let deadline = opts
        .request_timeout
        .map_or(FIRST_RESPONSE_TIMEOUT, |t| t.min(FIRST_RESPONSE_TIMEOUT));
    let mut rest = addrs.iter();
    let mut pending = FuturesUnordered::new();
    let mut last = None;
    if let Some(a) = rest.next() {
        pending.push(leader_via(a, opts, deadline));
    }
    loop {
        let more = rest.len() > 0;
        tokio::select! {
            r = pending.next(), if !pending.is_empty() => match r {
                Some(Ok(channel)) => return Ok(channel),
                Some(Err(e)) => {
                    last = Some(e);
                    if let Some(a) = rest.next() {
                        pending.push(leader_via(a, opts, deadline));
                    }
                }
                None => {}
            },
            _ = tokio::time::sleep(STAGGER), if more => {
                if let Some(a) = rest.next() {
                    pending.push(leader_via(a, opts, deadline));
                }
            }
        }
        if pending.is_empty() && rest.len() == 0 {
            break;
        }
    }
    Err(last.unwrap_or_else(|| Error::Unavailable("no controller reachable".into())))
}

/// How long [`connect_leader_with`] waits for one address before trying the next too.
pub const STAGGER: Duration = Duration::from_millis(250);

/// The leader's channel as `addr` leads to it: `addr` itself when it leads (or no leader
/// is elected, or it does not implement the status call), else the leader it names, if
/// that answers in time (the one named may be frozen, its successor not yet known).
async fn leader_via(addr: &str, opts: &ClientOptions, deadline: Duration) -> Result<Channel> {
    let (channel, status) = match status_of(addr, opts, deadline).await? {
        (channel, Some(s)) => (channel, s),
        (channel, None) => return Ok(channel),
    };
    if status.answered_by_leader || status.leader.is_empty() || status.leader == status.answered_by
    {
        return Ok(channel);
    }
    match status_of(&status.leader, opts, deadline).await {
        Ok((leader, _)) => Ok(leader),
        Err(e) => {
            tracing::debug!(%addr, leader = %status.leader, error = %e, "the leader named by a follower does not answer; trying the next controller");
            Err(e)
        }
    }
}

/// Connects to `addr` and asks for the cluster status within `deadline`; `None` when the
/// controller does not implement it (then the channel is used as it is).
async fn status_of(
    addr: &str,
    opts: &ClientOptions,
    deadline: Duration,
) -> Result<(Channel, Option<crate::proto::ClusterStatusResponse>)> {
    let silent = || {
        Error::Unavailable(format!(
            "controller at {addr} did not answer within {} ms (frozen or overloaded?)",
            deadline.as_millis()
        ))
    };
    let channel = tokio::time::timeout(deadline + CONNECT_TIMEOUT, connect_with(addr, opts))
        .await
        .map_err(|_| silent())??;
    let mut admin = AdminServiceClient::new(channel.clone());
    let call = admin.cluster_status(crate::proto::ClusterStatusRequest {});
    match tokio::time::timeout(deadline, call).await {
        Err(_) => Err(silent()),
        Ok(Ok(s)) => Ok((channel, Some(s.into_inner()))),
        Ok(Err(e)) if e.code() == tonic::Code::Unimplemented => Ok((channel, None)),
        Ok(Err(e)) if is_timeout(&e) => Err(silent()),
        Ok(Err(e)) => Err(call_error(addr, opts, e)),
    }
}

/// Adds `authorization: Bearer <token>` to a request when a token is given.
pub fn with_token<T>(mut req: tonic::Request<T>, token: Option<&str>) -> Result<tonic::Request<T>> {
    if let Some(t) = token {
        let v = format!("Bearer {t}")
            .parse()
            .map_err(|_| Error::invalid("token contains characters not allowed in metadata"))?;
        req.metadata_mut().insert("authorization", v);
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// A TCP listener that accepts connections and never answers (a frozen controller:
    /// the kernel still completes the handshake).
    async fn silent() -> (String, tokio::task::JoinHandle<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        (addr, hold)
    }

    fn with_timeout(ms: u64) -> ClientOptions {
        ClientOptions {
            request_timeout: Some(Duration::from_millis(ms)),
            ..ClientOptions::default()
        }
    }

    #[tokio::test]
    async fn a_call_past_the_request_timeout_fails_as_a_timeout() {
        let (addr, _hold) = silent().await;
        let ch = connect_with(&addr, &with_timeout(300)).await.unwrap();
        let started = Instant::now();
        let err = AdminServiceClient::new(ch)
            .cluster_status(crate::proto::ClusterStatusRequest {})
            .await
            .unwrap_err();
        assert!(is_timeout(&err), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "{err:?}");
    }

    #[tokio::test]
    async fn looking_for_the_leader_gives_up_on_a_silent_controller() {
        let (addr, _hold) = silent().await;
        let started = Instant::now();
        let err = connect_leader_with(&addr, &with_timeout(300))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Unavailable(m) if m.contains("did not answer within 300 ms")),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2), "{err:?}");
    }

    #[tokio::test]
    async fn keep_alive_drops_a_silent_controller_without_any_deadline() {
        let (addr, _hold) = silent().await;
        let ch = connect(&addr).await.unwrap();
        let started = Instant::now();
        let err = AdminServiceClient::new(ch)
            .cluster_status(crate::proto::ClusterStatusRequest {})
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(
            took < KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + Duration::from_secs(2),
            "a silent controller was noticed only after {took:?}: {err:?}"
        );
    }
}
