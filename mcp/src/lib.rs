//! Scabbard's MCP server (official Rust SDK `rmcp`): templates, tasks and workflows as tools
//! and resources for AI agents. It is a gRPC client of the controller: every call carries
//! the caller's API token, so scopes, projects, rate limits, validation and the audit log
//! (with the token as actor) are the controller's own, never a second copy here.
//!
//! Two transports: [`serve_stdio`] (`scabbard mcp`, one token for the session) and
//! [`http_service`] (streamable HTTP, the bearer token of each HTTP request), for the
//! controller's HTTP listener to mount at `/mcp`.
//!
//! This module owns the [`ServerHandler`]: which tools a token sees (its scopes, from
//! `WhoAmI`), dispatching calls ([`calls`]), the tool catalog ([`tools`]), resources and
//! their subscriptions ([`resources`]), and `tools/list_changed` when the template list
//! changes (polled).

mod calls;
mod resources;
mod tools;
mod views;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Extensions,
    Implementation, ListResourceTemplatesResult, ListToolsResult, PaginatedRequestParams,
    ReadResourceRequestParams, ReadResourceResponse, ServerCapabilities, ServerConfig,
    SubscribeRequestParams, UnsubscribeRequestParams,
};
use rmcp::service::{NotificationContext, RequestContext};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, ServiceExt};
use scabbard_common::client;
use scabbard_common::proto::Scope;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How the server reaches the controller's gRPC services: a network [`Channel`]
/// (`scabbard mcp`, see [`transport`]) or the controller's own in-process service stack
/// (`/mcp` on its HTTP listener), so the same layers (auth, scopes, limits) judge every call.
pub type Transport = tower::util::BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    tonic::Status,
>;

/// A network channel as a [`Transport`].
pub fn transport(channel: Channel) -> Transport {
    // What tonic's client does with a transport error itself (UNAVAILABLE for a refused
    // connection, …).
    Transport::new(tower::ServiceExt::map_err(
        channel,
        |e: tonic::transport::Error| tonic::Status::from_error(e.into()),
    ))
}

use crate::calls::{Api, Progress, ToolError};

/// How often the template list is read to notice changes (`tools/list_changed`).
pub const TEMPLATE_POLL: Duration = Duration::from_secs(2);

/// Where a session's token comes from.
#[derive(Clone)]
enum TokenSource {
    /// One token for the whole session (stdio).
    Fixed(String),
    /// The `Authorization: Bearer` header of each HTTP request.
    Header,
}

struct Inner {
    channel: Transport,
    token: TokenSource,
    /// Resource subscriptions by URI: the task following the resource.
    subs: Mutex<HashMap<String, JoinHandle<()>>>,
    /// Stops the template poller when the session ends.
    stop: CancellationToken,
    /// The templates (name, version) behind the typed tools last listed to this session;
    /// `None` until tools were listed with a token that sees them.
    listed: Arc<Mutex<Option<Templates>>>,
}

type Templates = Vec<(String, u32)>;

fn fingerprint(list: &[scabbard_common::proto::Template]) -> Templates {
    list.iter().map(|t| (t.name.clone(), t.version)).collect()
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Ok(subs) = self.subs.lock() {
            for h in subs.values() {
                h.abort();
            }
        }
    }
}

/// One MCP session's handler.
#[derive(Clone)]
pub struct ScabbardMcp {
    inner: Arc<Inner>,
}

impl ScabbardMcp {
    /// A handler calling the controller on `channel` with `token`.
    pub fn new(channel: Transport, token: String) -> Self {
        Self::with_source(channel, TokenSource::Fixed(token))
    }

    fn with_source(channel: Transport, token: TokenSource) -> Self {
        Self {
            inner: Arc::new(Inner {
                channel,
                token,
                subs: Mutex::new(HashMap::new()),
                stop: CancellationToken::new(),
                listed: Arc::new(Mutex::new(None)),
            }),
        }
    }

    /// The API with the caller's token (from the session, or the HTTP request).
    fn api(&self, ext: &Extensions) -> Result<Api, McpError> {
        let token = match &self.inner.token {
            TokenSource::Fixed(t) => t.clone(),
            TokenSource::Header => ext
                .get::<http::request::Parts>()
                .and_then(|p| p.headers.get(http::header::AUTHORIZATION))
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    McpError::invalid_request(
                        "an API token is required: send `Authorization: Bearer <token>`",
                        None,
                    )
                })?,
        };
        let auth = client::BearerAuth::new(Some(&token))
            .map_err(|e| McpError::invalid_request(e.to_string(), None))?;
        let ch =
            tonic::service::interceptor::InterceptedService::new(self.inner.channel.clone(), auth);
        Ok(Api::new(ch))
    }
}

/// A refused gRPC call as a protocol error (for list and resource requests, which have no
/// `isError` result).
pub(crate) fn status_error(s: tonic::Status) -> McpError {
    let msg = ToolError::from(s.clone()).message;
    match s.code() {
        tonic::Code::NotFound => McpError::resource_not_found(msg, None),
        tonic::Code::InvalidArgument => McpError::invalid_params(msg, None),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            McpError::invalid_request(msg, None)
        }
        _ => McpError::internal_error(msg, None),
    }
}

fn tool_result(r: Result<Value, ToolError>) -> CallToolResult {
    match r {
        Ok(v) => CallToolResult::structured(v),
        Err(e) => {
            let mut res = CallToolResult::error(vec![ContentBlock::text(e.message.clone())]);
            res.structured_content =
                Some(json!({"error": e.message, "code": e.code, "errors": e.errors}));
            res
        }
    }
}

fn max_scope(scopes: &[i32]) -> i32 {
    scopes
        .iter()
        .copied()
        .max()
        .unwrap_or(Scope::Unspecified as i32)
}

impl ServerHandler for ScabbardMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .enable_resources()
                .enable_resources_subscribe()
                .build(),
        )
        .with_server_info(Implementation::new("scabbard", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "Scabbard runs build workflows from templates. list_templates / describe_template show the typed parameters; render_template is a dry run; run_<template> (or run_template) submits, with wait=true following it to the end. Read logs with task_logs or the scabbard://tasks/{id}/logs resource.",
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let api = self.api(&context.extensions)?;
        let me = api.whoami().await.map_err(status_error)?;
        let scope = max_scope(&me.scopes);
        let mut out: Vec<_> = tools::builtin()
            .into_iter()
            .filter(|(_, need)| *need as i32 <= scope)
            .map(|(t, _)| t)
            .collect();
        if scope >= Scope::Submit as i32 {
            let templates = api.list_templates().await.map_err(status_error)?;
            // A template whose tool name is a built-in's (`template` → `run_template`) is
            // reachable through `run_template` only.
            let typed: Vec<_> = templates
                .iter()
                .map(tools::template_tool)
                .filter(|t| !out.iter().any(|b| b.name == t.name))
                .collect();
            out.extend(typed);
            if let Ok(mut l) = self.inner.listed.lock() {
                *l = Some(fingerprint(&templates));
            }
        }
        Ok(ListToolsResult::with_all_items(out))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let api = self.api(&context.extensions)?;
        let args = request.arguments.clone().unwrap_or_default();
        let progress = Progress {
            peer: context.peer.clone(),
            token: context.meta.get_progress_token(),
            cancel: context.ct.clone(),
        };
        let name = request.name.as_ref();
        if tools::builtin().iter().any(|(t, _)| t.name == name) {
            return Ok(tool_result(api.call(name, &args, progress).await).into());
        }
        let Some(suffix) = name.strip_prefix(tools::RUN_PREFIX) else {
            return Err(McpError::invalid_params(format!("no tool {name:?}"), None));
        };
        let templates = api.list_templates().await.map_err(status_error)?;
        let Some(t) = templates
            .iter()
            .find(|t| t.name.replace('-', "_") == suffix)
        else {
            return Err(McpError::invalid_params(
                format!("no tool {name:?} (no such template)"),
                None,
            ));
        };
        let (params, opts) = tools::split_args(t, &args);
        Ok(tool_result(api.run_template(&t.name, 0, params, &opts, progress).await).into())
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, McpError> {
        Ok(ListResourceTemplatesResult::with_all_items(
            resources::templates(),
        ))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        let api = self.api(&context.extensions)?;
        Ok(resources::read(&api, &request.uri).await?.into())
    }

    #[allow(deprecated)]
    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        let api = self.api(&context.extensions)?;
        let handle = resources::subscribe(api, request.uri.clone(), context.peer.clone()).await?;
        let mut subs = self
            .inner
            .subs
            .lock()
            .map_err(|_| McpError::internal_error("lock poisoned", None))?;
        if let Some(old) = subs.insert(request.uri, handle) {
            old.abort();
        }
        Ok(())
    }

    #[allow(deprecated)]
    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        if let Ok(mut subs) = self.inner.subs.lock()
            && let Some(h) = subs.remove(&request.uri)
        {
            h.abort();
        }
        Ok(())
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        let Ok(api) = self.api(&context.extensions) else {
            return;
        };
        let stop = self.inner.stop.clone();
        let listed = self.inner.listed.clone();
        let peer = context.peer.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(TEMPLATE_POLL) => {}
                }
                if peer.is_transport_closed() {
                    return;
                }
                // A controller that is down or restarting: try again next round.
                let Ok(list) = api.list_templates().await else {
                    continue;
                };
                let now = fingerprint(&list);
                let changed = match listed.lock() {
                    Ok(mut l) => match l.as_mut() {
                        Some(seen) if *seen != now => {
                            *seen = now;
                            true
                        }
                        _ => false,
                    },
                    Err(_) => return,
                };
                if changed && peer.notify_tool_list_changed().await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Serves MCP on stdin/stdout until the client closes it, calling the controller on
/// `channel` with `token`.
pub async fn serve_stdio(channel: Channel, token: String) -> anyhow::Result<()> {
    let running = ScabbardMcp::new(transport(channel), token)
        .serve(rmcp::transport::stdio())
        .await?;
    running.waiting().await?;
    Ok(())
}

/// The streamable-HTTP MCP service type.
pub type HttpService = StreamableHttpService<ScabbardMcp, LocalSessionManager>;

/// The streamable-HTTP MCP service (a tower service; mount it at `/mcp`): each request's
/// `Authorization: Bearer` token is the one the controller sees. `allowed_hosts` are the
/// `Host` header values accepted (DNS-rebinding protection; empty: rmcp's default,
/// localhost only). Cancel `stop` to end open streams.
pub fn http_service(
    channel: Transport,
    allowed_hosts: Vec<String>,
    stop: CancellationToken,
) -> HttpService {
    let mut config = StreamableHttpServerConfig::default();
    config.cancellation_token = stop;
    if !allowed_hosts.is_empty() {
        config.allowed_hosts = allowed_hosts;
    }
    StreamableHttpService::new(
        move || {
            Ok(ScabbardMcp::with_source(
                channel.clone(),
                TokenSource::Header,
            ))
        },
        Arc::new(LocalSessionManager::default()),
        config,
    )
}
