//! The route table: one line per unary route (method, path, gRPC method, request and
//! response messages, summary). The same table builds the axum router and the OpenAPI
//! document, so every route is documented. A request message is made from the JSON body,
//! then the query string, then the path parameters (see [`build_request`]).

use std::net::SocketAddr;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, patch, post};
use scabbard_common::proto as pb;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;

use super::error::{call_failed, error};
use super::{HttpState, grpc_request};

/// One unary route.
pub(crate) struct RouteDoc {
    /// `GET`, `POST`, `PATCH`, `DELETE`.
    pub(crate) method: &'static str,
    /// Path template, `{name}` for a path parameter.
    pub(crate) path: &'static str,
    /// The gRPC method it calls.
    pub(crate) rpc: &'static str,
    /// Request and response message names (`scabbard.v1.<name>`).
    pub(crate) request: &'static str,
    pub(crate) response: &'static str,
    /// What it does.
    pub(crate) summary: &'static str,
    /// Path parameter → the request field it sets (dotted for nested messages).
    pub(crate) params: &'static [(&'static str, &'static str)],
}

macro_rules! unary_routes {
    ($( $method:ident $path:literal => $rpc:literal, $req:ident, $resp:ident,
        [$($param:literal => $field:literal),*], $summary:literal; )*) => {
        /// Every unary route.
        pub(crate) const UNARY: &[RouteDoc] = &[$(RouteDoc {
            method: stringify!($method),
            path: $path,
            rpc: $rpc,
            request: stringify!($req),
            response: stringify!($resp),
            summary: $summary,
            params: &[$(($param, $field)),*],
        }),*];

        fn unary_router(mut r: Router<HttpState>) -> Router<HttpState> {
            $( r = r.route($path, unary::<pb::$req, pb::$resp>(
                stringify!($method), $path, $rpc, &[$(($param, $field)),*])); )*
            r
        }
    };
}

unary_routes! {
    POST "/api/v1/tasks" => "/scabbard.v1.TaskService/Submit", SubmitTaskRequest, SubmitTaskResponse, [],
        "Submit a task (body: SubmitTaskRequest).";
    POST "/api/v1/tasks:batch" => "/scabbard.v1.TaskService/SubmitBatch", SubmitBatchRequest, SubmitBatchResponse, [],
        "Submit several tasks at once.";
    GET "/api/v1/tasks" => "/scabbard.v1.TaskService/List", ListTasksRequest, ListTasksResponse, [],
        "List tasks. Query: states (repeatable or comma-separated), label=k=v (repeatable), project, pageSize, pageToken, createdAfterMs, createdBeforeMs.";
    GET "/api/v1/tasks/{id}" => "/scabbard.v1.TaskService/Get", GetTaskRequest, Task, ["id" => "id"],
        "Get a task.";
    POST "/api/v1/tasks/{id}/cancel" => "/scabbard.v1.TaskService/Cancel", CancelTaskRequest, Task, ["id" => "id"],
        "Cancel a task (body: optional {\"reason\": ...}).";
    POST "/api/v1/workflows" => "/scabbard.v1.WorkflowService/Submit", SubmitWorkflowRequest, SubmitWorkflowResponse, [],
        "Submit a workflow (body: SubmitWorkflowRequest).";
    GET "/api/v1/workflows" => "/scabbard.v1.WorkflowService/List", ListWorkflowsRequest, ListWorkflowsResponse, [],
        "List workflows. Query: states, project, template, pageSize, pageToken.";
    GET "/api/v1/workflows/{id}" => "/scabbard.v1.WorkflowService/Get", GetWorkflowRequest, Workflow, ["id" => "id"],
        "Get a workflow with its nodes.";
    POST "/api/v1/workflows/{id}/cancel" => "/scabbard.v1.WorkflowService/Cancel", CancelWorkflowRequest, Workflow, ["id" => "id"],
        "Cancel a workflow: running nodes are cancelled, the rest skipped.";
    GET "/api/v1/templates" => "/scabbard.v1.TemplateService/List", ListTemplatesRequest, ListTemplatesResponse, [],
        "List workflow templates.";
    GET "/api/v1/templates/{name}" => "/scabbard.v1.TemplateService/Get", GetTemplateRequest, Template, ["name" => "name"],
        "Show a template with its typed parameters (query: version).";
    POST "/api/v1/templates/{name}/render" => "/scabbard.v1.TemplateService/Render", RenderTemplateRequest, RenderTemplateResponse, ["name" => "name"],
        "Render a template with parameters (dry run; body: {\"params\": {...}}).";
    POST "/api/v1/templates/{name}/run" => "/scabbard.v1.TemplateService/Run", RunTemplateRequest, SubmitWorkflowResponse, ["name" => "name"],
        "Run a template as a workflow (body: {\"params\": {...}, \"project\": ...}).";
    POST "/api/v1/schedules" => "/scabbard.v1.ScheduleService/Create", CreateScheduleRequest, Schedule, [],
        "Create a schedule.";
    GET "/api/v1/schedules" => "/scabbard.v1.ScheduleService/List", ListSchedulesRequest, ListSchedulesResponse, [],
        "List schedules (query: project).";
    GET "/api/v1/schedules/{id}" => "/scabbard.v1.ScheduleService/Get", GetScheduleRequest, Schedule, ["id" => "id"],
        "Get a schedule with its next fire time.";
    POST "/api/v1/schedules/{id}/pause" => "/scabbard.v1.ScheduleService/Pause", PauseScheduleRequest, Schedule, ["id" => "id"],
        "Pause a schedule.";
    POST "/api/v1/schedules/{id}/resume" => "/scabbard.v1.ScheduleService/Resume", ResumeScheduleRequest, Schedule, ["id" => "id"],
        "Resume a schedule.";
    DELETE "/api/v1/schedules/{id}" => "/scabbard.v1.ScheduleService/Delete", DeleteScheduleRequest, DeleteScheduleResponse, ["id" => "id"],
        "Delete a schedule.";
    POST "/api/v1/projects" => "/scabbard.v1.ProjectService/Create", CreateProjectRequest, Project, [],
        "Create a project (admin).";
    GET "/api/v1/projects" => "/scabbard.v1.ProjectService/List", ListProjectsRequest, ListProjectsResponse, [],
        "List projects.";
    GET "/api/v1/projects/{name}" => "/scabbard.v1.ProjectService/Get", GetProjectRequest, Project, ["name" => "name"],
        "Get a project with its quota, rate and retention.";
    PATCH "/api/v1/projects/{name}" => "/scabbard.v1.ProjectService/Update", UpdateProjectRequest, Project, ["name" => "project.name"],
        "Update a project's description, quota and retention (body: {\"project\": {...}}; admin).";
    DELETE "/api/v1/projects/{name}" => "/scabbard.v1.ProjectService/Delete", DeleteProjectRequest, DeleteProjectResponse, ["name" => "name"],
        "Delete an empty project (admin).";
    GET "/api/v1/agents" => "/scabbard.v1.AdminService/ListAgents", ListAgentsRequest, ListAgentsResponse, [],
        "List agents with capabilities, labels, slots and state.";
    POST "/api/v1/agents/{id}/drain" => "/scabbard.v1.AdminService/DrainAgent", DrainAgentRequest, Agent, ["id" => "id"],
        "Drain an agent (operator).";
    POST "/api/v1/agents/{id}/undrain" => "/scabbard.v1.AdminService/UndrainAgent", UndrainAgentRequest, Agent, ["id" => "id"],
        "Return a drained agent to service (operator; id, unique id prefix or name).";
    DELETE "/api/v1/agents/{id}" => "/scabbard.v1.AdminService/RemoveAgent", RemoveAgentRequest, RemoveAgentResponse, ["id" => "id"],
        "Remove a LOST agent: its record, presence and tokens (operator).";
    GET "/api/v1/breakers" => "/scabbard.v1.AdminService/ListBreakers", ListBreakersRequest, ListBreakersResponse, [],
        "List circuit breakers (query: all=true for closed ones too).";
    POST "/api/v1/breakers/{key}/reset" => "/scabbard.v1.AdminService/ResetBreaker", ResetBreakerRequest, Breaker, ["key" => "key"],
        "Reset a breaker (operator).";
    POST "/api/v1/tokens" => "/scabbard.v1.AdminService/CreateToken", CreateTokenRequest, CreateTokenResponse, [],
        "Create a token (the secret is in the response only).";
    GET "/api/v1/tokens" => "/scabbard.v1.AdminService/ListTokens", ListTokensRequest, ListTokensResponse, [],
        "List tokens (query: project, kind, includeRevoked).";
    POST "/api/v1/tokens/{id}/revoke" => "/scabbard.v1.AdminService/RevokeToken", RevokeTokenRequest, TokenInfo, ["id" => "id"],
        "Revoke a token.";
    GET "/api/v1/whoami" => "/scabbard.v1.AdminService/WhoAmI", WhoAmIRequest, WhoAmIResponse, [],
        "The calling token.";
    GET "/api/v1/audit" => "/scabbard.v1.AdminService/ListAudit", ListAuditRequest, ListAuditResponse, [],
        "The audit log (query: limit, project, action).";
    GET "/api/v1/cluster" => "/scabbard.v1.AdminService/ClusterStatus", ClusterStatusRequest, ClusterStatusResponse, [],
        "Cluster status: controllers, leader, store health.";
    GET "/api/v1/artifacts" => "/scabbard.v1.ArtifactService/List", ListArtifactsRequest, ListArtifactsResponse, [],
        "List artifacts of a task or workflow (query: taskId or workflowId).";
    GET "/api/v1/stats" => "/scabbard.v1.AdminService/GetStats", GetStatsRequest, GetStatsResponse, [],
        "Recent throughput and latency (5 s buckets, last 15 min; query: windowMs, project) and queue depth per project.";
    GET "/api/v1/config" => "/scabbard.v1.AdminService/GetConfig", GetConfigRequest, GetConfigResponse, [],
        "The answering controller's effective configuration, secrets hidden (operator).";
    POST "/api/v1/tasks/{id}/rerun" => "/scabbard.v1.TaskService/Rerun", RerunTaskRequest, SubmitTaskResponse, ["id" => "id"],
        "Run a task again: a new task with the same spec (body: optional {\"idempotencyKey\": ...}).";
    POST "/api/v1/workflows/{id}/rerun" => "/scabbard.v1.WorkflowService/Rerun", RerunWorkflowRequest, SubmitWorkflowResponse, ["id" => "id"],
        "Run a workflow again: a new workflow with the same spec and template (body: optional {\"idempotencyKey\": ...}).";
    POST "/api/v1/schedules/{id}/trigger" => "/scabbard.v1.ScheduleService/Trigger", TriggerScheduleRequest, TriggerScheduleResponse, ["id" => "id"],
        "Fire a schedule once now (body: optional {\"idempotencyKey\": ...}; the same key returns the same run).";
    PATCH "/api/v1/schedules/{id}" => "/scabbard.v1.ScheduleService/Update", UpdateScheduleRequest, Schedule, ["id" => "id"],
        "Change a schedule: the fields set in the body (cron, timezone, template, templateVersion, params: {\"values\": {...}}, overlap, catchUpWindowMs, paused, name).";
}

/// The routes: unary ones, streaming ones and the OpenAPI document.
pub(crate) fn router() -> Router<HttpState> {
    let r = Router::new()
        .route("/api/v1/openapi.json", get(super::openapi::document))
        .route(super::download::PATH, get(super::download::content));
    super::sse::routes(unary_router(r))
}

/// The method router calling `rpc` with a request made from the HTTP request.
fn unary<Req, Resp>(
    method: &'static str,
    template: &'static str,
    rpc: &'static str,
    params: &'static [(&'static str, &'static str)],
) -> MethodRouter<HttpState>
where
    Req: prost::Message + Default + DeserializeOwned + Send + 'static,
    Resp: prost::Message + Default + Serialize + Send + 'static,
{
    let handler = move |State(st): State<HttpState>,
                        ConnectInfo(peer): ConnectInfo<SocketAddr>,
                        uri: Uri,
                        headers: HeaderMap,
                        body: Bytes| async move {
        let msg: Req = match build_request(template, params, &uri, &body) {
            Ok(m) => m,
            Err(resp) => return resp,
        };
        match call_unary::<Req, Resp>(&st, &headers, peer, rpc, msg).await {
            Ok(resp) => axum::Json(resp).into_response(),
            Err(status) => call_failed(&st, &uri, status).await,
        }
    };
    match method {
        "POST" => post(handler),
        "PATCH" => patch(handler),
        "DELETE" => delete(handler),
        _ => get(handler),
    }
}

/// Calls the unary gRPC method `rpc` in process.
pub(crate) async fn call_unary<Req, Resp>(
    st: &HttpState,
    headers: &HeaderMap,
    peer: SocketAddr,
    rpc: &'static str,
    msg: Req,
) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    let mut grpc = st.grpc().await?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    grpc.unary(
        grpc_request(headers, peer, msg),
        PathAndQuery::from_static(rpc),
        codec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// The request message: the JSON body (an object, or empty), then each query parameter,
/// then each path parameter, deserialized with the proto3 JSON mapping. Errors are 400
/// `INVALID_ARGUMENT` naming the field.
#[allow(clippy::result_large_err)]
pub(crate) fn build_request<Req: DeserializeOwned>(
    template: &str,
    params: &[(&str, &str)],
    uri: &Uri,
    body: &[u8],
) -> Result<Req, Response> {
    let mut obj = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                return Err(error(
                    Code::InvalidArgument,
                    "the request body must be a JSON object",
                ));
            }
            Err(e) => {
                return Err(error(
                    Code::InvalidArgument,
                    format!("the request body is not valid JSON: {e}"),
                ));
            }
        }
    };
    for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        add_query(&mut obj, &k, &v)?;
    }
    let segments = path_params(template, uri.path());
    for (param, field) in params {
        if let Some(v) = segments.iter().find(|(n, _)| n == param).map(|(_, v)| v) {
            set_dotted(&mut obj, field, Value::String(v.clone()));
        }
    }
    serde_path_to_error::deserialize::<_, Req>(Value::Object(obj)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            error(Code::InvalidArgument, format!("bad request: {inner}"))
        } else {
            error(Code::InvalidArgument, format!("field {path}: {inner}"))
        }
    })
}

/// The query parameter every route accepts and ignores (`?_=1700000000000`).
pub(crate) const CACHE_BUSTER: &str = "_";

/// Query fields that are lists (`states=A&states=B` or `states=A,B`).
const LIST_FIELDS: &[&str] = &["states", "scopes", "ids"];

/// Adds one query parameter: `label=k=v` / `param=k=v` fill the `labels` / `params`
/// maps, list fields collect, `true`/`false` are booleans, everything else a string (the
/// proto3 JSON mapping reads numbers from strings).
#[allow(clippy::result_large_err)]
fn add_query(obj: &mut Map<String, Value>, key: &str, value: &str) -> Result<(), Response> {
    // `_=<time>`: the cache buster browsers and HTTP libraries add; not a request field.
    if key == CACHE_BUSTER {
        return Ok(());
    }
    let map_field = match key {
        "label" | "labels" => Some("labels"),
        "param" | "params" => Some("params"),
        _ => None,
    };
    if let Some(field) = map_field {
        let Some((k, v)) = value.split_once('=') else {
            return Err(error(
                Code::InvalidArgument,
                format!("query parameter {key}={value:?} must look like {key}=KEY=VALUE"),
            ));
        };
        let entry = obj
            .entry(field)
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = entry {
            m.insert(k.to_string(), Value::String(v.to_string()));
        }
        return Ok(());
    }
    if LIST_FIELDS.contains(&key) {
        let entry = obj.entry(key).or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(a) = entry {
            a.extend(
                value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.to_string())),
            );
        }
        return Ok(());
    }
    let v = match value {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        s => Value::String(s.to_string()),
    };
    obj.insert(key.to_string(), v);
    Ok(())
}

/// Sets `a.b.c` in `obj`, making the objects on the way.
fn set_dotted(obj: &mut Map<String, Value>, field: &str, v: Value) {
    match field.split_once('.') {
        None => {
            obj.insert(field.to_string(), v);
        }
        Some((head, rest)) => {
            let entry = obj.entry(head).or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            if let Value::Object(m) = entry {
                set_dotted(m, rest, v);
            }
        }
    }
}

/// The `{name}` segments of `template` matched against `path` (percent-decoded).
pub(crate) fn path_params(template: &str, path: &str) -> Vec<(String, String)> {
    template
        .split('/')
        .zip(path.split('/'))
        .filter_map(|(t, p)| {
            let name = t.strip_prefix('{')?.strip_suffix('}')?;
            let value = percent_decode(p);
            Some((name.to_string(), value))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_made_from_body_query_and_path() {
        let uri: Uri =
            "/api/v1/tasks?states=TASK_STATE_RUNNING,TASK_STATE_QUEUED&label=a=b&pageSize=5"
                .parse()
                .unwrap();
        let r: pb::ListTasksRequest = build_request("/api/v1/tasks", &[], &uri, b"").unwrap();
        assert_eq!(r.states.len(), 2);
        assert_eq!(r.labels.get("a").map(String::as_str), Some("b"));
        assert_eq!(r.page_size, 5);
        // The cache buster is ignored; other unknown parameters are refused, named.
        let uri: Uri = "/api/v1/tasks?_=1700000000000&pageSize=2".parse().unwrap();
        let r: pb::ListTasksRequest = build_request("/api/v1/tasks", &[], &uri, b"").unwrap();
        assert_eq!(r.page_size, 2);
        let uri: Uri = "/api/v1/tasks?cachebust=1".parse().unwrap();
        let e = build_request::<pb::ListTasksRequest>("/api/v1/tasks", &[], &uri, b"").unwrap_err();
        assert_eq!(e.status(), 400);
        let uri: Uri = "/api/v1/projects/p%201".parse().unwrap();
        let r: pb::UpdateProjectRequest = build_request(
            "/api/v1/projects/{name}",
            &[("name", "project.name")],
            &uri,
            br#"{"project": {"description": "d"}}"#,
        )
        .unwrap();
        let p = r.project.unwrap();
        assert_eq!((p.name.as_str(), p.description.as_str()), ("p 1", "d"));
    }

    #[test]
    fn bad_fields_are_named() {
        let uri: Uri = "/api/v1/tasks?pageSize=many".parse().unwrap();
        let e = build_request::<pb::ListTasksRequest>("/api/v1/tasks", &[], &uri, b"").unwrap_err();
        assert_eq!(e.status(), 400);
        let uri: Uri = "/api/v1/tasks".parse().unwrap();
        let e = build_request::<pb::SubmitTaskRequest>(
            "/api/v1/tasks",
            &[],
            &uri,
            br#"{"spec": {"nope": 1}}"#,
        )
        .unwrap_err();
        assert_eq!(e.status(), 400);
    }
}
