//! Streaming routes: server-sent events over the gRPC streams (`TaskService.Watch`,
//! `WorkflowService.Watch`, `TaskService.Logs` with `follow`), and the task log as one
//! JSON document when not following.
//!
//! Event ids are the gRPC resume points, so `Last-Event-ID` (sent by browsers on
//! reconnect) resumes from the store's history on any controller, after restarts and
//! leader changes: `<task revision>:<task id>:<workflow revision>` for `/api/v1/events`
//! (task and workflow events, see [`super::events`]), `<revision>` for a workflow's
//! events, the chunk `seq` for logs.

use std::net::SocketAddr;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{Stream, StreamExt};
use scabbard_common::proto as pb;
use serde::Serialize;
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;

use super::error::{call_failed, code_name, error};
use super::routes::build_request;
use super::{HttpState, grpc_request};

/// One streaming route (for the OpenAPI document).
pub(crate) struct StreamDoc {
    pub(crate) path: &'static str,
    pub(crate) rpc: &'static str,
    pub(crate) request: &'static str,
    pub(crate) event: &'static str,
    pub(crate) summary: &'static str,
    pub(crate) sse: bool,
}

/// Every streaming route.
pub(crate) const STREAMS: &[StreamDoc] = &[
    StreamDoc {
        path: "/api/v1/events",
        rpc: "/scabbard.v1.TaskService/Watch",
        request: "WatchTasksRequest",
        event: "TaskEvent",
        summary: "Task and workflow events as server-sent events: event `task` (data: TaskEvent) and event `workflow` (data: WorkflowEvent, the whole workflow with its nodes); id `<task revision>:<task id>:<workflow revision>`. Query: ids (repeatable: only those tasks, no workflow events), sendInitial. Resumes exactly after the event named by the Last-Event-ID header (or afterRevision/afterTaskId) from the store's history, on any controller, after restarts.",
        sse: true,
    },
    StreamDoc {
        path: "/api/v1/workflows/{id}/events",
        rpc: "/scabbard.v1.WorkflowService/Watch",
        request: "WatchWorkflowRequest",
        event: "WorkflowEvent",
        summary: "A workflow's events as server-sent events (event `workflow`, id `<revision>`), until it is final; resumable with Last-Event-ID.",
        sse: true,
    },
    StreamDoc {
        path: "/api/v1/tasks/{id}/logs",
        rpc: "/scabbard.v1.TaskService/Logs",
        request: "TaskLogsRequest",
        event: "LogChunk",
        summary: "A task's log. Without follow: {\"chunks\": [LogChunk...]} (data base64). With follow=true: server-sent events (event `log`, id = seq) until the attempt is final; Last-Event-ID resumes after that chunk. Query: attempt, fromSeq, follow.",
        sse: false,
    },
];

/// Adds the streaming routes.
pub(crate) fn routes(r: Router<HttpState>) -> Router<HttpState> {
    r.route("/api/v1/events", get(super::events::events))
        .route("/api/v1/workflows/{id}/events", get(workflow_events))
        .route("/api/v1/tasks/{id}/logs", get(logs))
}

pub(crate) fn last_event_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

async fn workflow_events(
    State(st): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let template = "/api/v1/workflows/{id}/events";
    let mut req: pb::WatchWorkflowRequest =
        match build_request(template, &[("id", "id")], &uri, b"") {
            Ok(r) => r,
            Err(resp) => return resp,
        };
    if let Some(id) = last_event_id(&headers) {
        match id.parse::<i64>() {
            Ok(rev) => req.after_revision = rev,
            Err(_) => {
                return error(
                    Code::InvalidArgument,
                    format!("Last-Event-ID {id:?} is not an event id of this stream (<revision>)"),
                );
            }
        }
    }
    sse(
        &st,
        &headers,
        peer,
        &uri,
        "/scabbard.v1.WorkflowService/Watch",
        req,
        |e: &pb::WorkflowEvent| ("workflow", e.revision.to_string()),
    )
    .await
}

async fn logs(
    State(st): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
    _body: Bytes,
) -> Response {
    let template = "/api/v1/tasks/{id}/logs";
    let mut req: pb::TaskLogsRequest = match build_request(template, &[("id", "taskId")], &uri, b"")
    {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let rpc = "/scabbard.v1.TaskService/Logs";
    if req.follow {
        if let Some(id) = last_event_id(&headers) {
            match id.parse::<u64>() {
                Ok(seq) => req.from_seq = seq + 1,
                Err(_) => {
                    return error(
                        Code::InvalidArgument,
                        format!("Last-Event-ID {id:?} is not a log chunk seq"),
                    );
                }
            }
        }
        return sse(&st, &headers, peer, &uri, rpc, req, |c: &pb::LogChunk| {
            ("log", c.seq.to_string())
        })
        .await;
    }
    let mut stream = match open::<_, pb::LogChunk>(&st, &headers, peer, rpc, req).await {
        Ok(s) => s,
        Err(status) => return call_failed(&st, &uri, status).await,
    };
    let mut chunks = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(c)) => chunks.push(c),
            Ok(None) => break,
            Err(status) => return call_failed(&st, &uri, status).await,
        }
    }
    axum::Json(serde_json::json!({ "chunks": chunks })).into_response()
}

/// Opens a server-streaming call in process.
pub(crate) async fn open<Req, Resp>(
    st: &HttpState,
    headers: &HeaderMap,
    peer: SocketAddr,
    rpc: &'static str,
    msg: Req,
) -> Result<tonic::Streaming<Resp>, tonic::Status>
where
    Req: prost::Message + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    let mut grpc = st.grpc().await?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    grpc.server_streaming(
        grpc_request(headers, peer, msg),
        PathAndQuery::from_static(rpc),
        codec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Serves the stream of `rpc` as server-sent events; a call refused before its first
/// message gets the JSON error instead, one failing later ends with an `error` event.
async fn sse<Req, Resp>(
    st: &HttpState,
    headers: &HeaderMap,
    peer: SocketAddr,
    uri: &Uri,
    rpc: &'static str,
    msg: Req,
    name: fn(&Resp) -> (&'static str, String),
) -> Response
where
    Req: prost::Message + Send + 'static,
    Resp: prost::Message + Default + Serialize + Send + 'static,
{
    let stream = match open::<Req, Resp>(st, headers, peer, rpc, msg).await {
        Ok(s) => s,
        Err(status) => return call_failed(st, uri, status).await,
    };
    Sse::new(events(stream, name))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn events<Resp: prost::Message + Default + Serialize + Send + 'static>(
    stream: tonic::Streaming<Resp>,
    name: fn(&Resp) -> (&'static str, String),
) -> impl Stream<Item = Result<Event, std::convert::Infallible>> + Send {
    futures::stream::unfold(Some(stream), move |s| async move {
        let mut s = s?;
        match s.message().await {
            Ok(Some(m)) => {
                let (event, id) = name(&m);
                let ev = Event::default()
                    .event(event)
                    .id(id)
                    .json_data(&m)
                    .unwrap_or_else(|e| Event::default().event("error").data(e.to_string()));
                Some((Ok(ev), Some(s)))
            }
            Ok(None) => None,
            Err(status) => {
                let body = serde_json::json!({
                    "code": code_name(status.code()),
                    "message": status.message(),
                });
                Some((
                    Ok(Event::default().event("error").data(body.to_string())),
                    None,
                ))
            }
        }
    })
    .boxed()
}
