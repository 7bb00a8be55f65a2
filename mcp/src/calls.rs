//! The tools' work: each is one or a few gRPC calls made with the caller's token, so the
//! controller enforces scopes, projects, rate limits, validation and audit exactly as for
//! any other client. Results are JSON views of the protos; a refused call becomes a
//! [`ToolError`] carrying the controller's message (which names the field).

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use rmcp::model::{ProgressNotificationParam, ProgressToken};
use rmcp::{Peer, RoleServer};
/// The controller's services with the caller's bearer token on every call.
type AuthedChannel = tonic::service::interceptor::InterceptedService<
    crate::Transport,
    scabbard_common::client::BearerAuth,
>;
use scabbard_common::proto::admin_service_client::AdminServiceClient;
use scabbard_common::proto::task_service_client::TaskServiceClient;
use scabbard_common::proto::template_service_client::TemplateServiceClient;
use scabbard_common::proto::workflow_service_client::WorkflowServiceClient;
use scabbard_common::proto::{self as pb, task_spec};
use scabbard_common::wfdef;
use serde_json::{Map, Value, json};

pub(crate) use crate::views::{state_name, task_json, template_json, workflow_json};
use tokio_util::sync::CancellationToken;

/// Default and largest `max_bytes` of `task_logs` (and the cap of the logs resource).
pub(crate) const LOG_CAP_DEFAULT: u64 = 64 * 1024;
pub(crate) const LOG_CAP_MAX: u64 = 1024 * 1024;

/// A tool call that failed: shown to the model as a result with `isError: true`.
#[derive(Debug)]
pub(crate) struct ToolError {
    pub(crate) message: String,
    /// Each separate error of an INVALID_ARGUMENT (render lists every parameter error).
    pub(crate) errors: Vec<String>,
    pub(crate) code: String,
}

impl ToolError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            errors: vec![message.clone()],
            message,
            code: "INVALID_ARGUMENT".into(),
        }
    }
}

impl From<tonic::Status> for ToolError {
    fn from(s: tonic::Status) -> Self {
        let code = format!("{:?}", s.code());
        let code = upper_snake(&code);
        Self {
            message: format!("{code}: {}", s.message()),
            errors: split_errors(s.message()),
            code,
        }
    }
}

fn upper_snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The separate errors of a message: one per line, or joined by `; `.
fn split_errors(message: &str) -> Vec<String> {
    let lines: Vec<&str> = message
        .lines()
        .map(|l| l.trim().trim_start_matches("- ").trim())
        .filter(|l| !l.is_empty())
        .collect();
    let parts: Vec<&str> = if lines.len() > 1 {
        lines
    } else {
        message
            .split("; ")
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect()
    };
    parts.into_iter().map(str::to_string).collect()
}

pub(crate) type Outcome = Result<Value, ToolError>;

/// Where `run_template` with `wait` reports progress.
pub(crate) struct Progress {
    pub(crate) peer: Peer<RoleServer>,
    pub(crate) token: Option<ProgressToken>,
    pub(crate) cancel: CancellationToken,
}

/// The controller's services, called with one token.
#[derive(Clone)]
pub(crate) struct Api {
    ch: AuthedChannel,
}

fn s(args: &Map<String, Value>, k: &str) -> Option<String> {
    args.get(k).and_then(Value::as_str).map(str::to_string)
}

fn u(args: &Map<String, Value>, k: &str) -> Option<u64> {
    args.get(k).and_then(Value::as_u64)
}

fn required(args: &Map<String, Value>, k: &str) -> Result<String, ToolError> {
    match s(args, k) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(ToolError::invalid(format!(
            "{k}: required (a non-empty string)"
        ))),
    }
}

fn string_map(args: &Map<String, Value>, k: &str) -> Result<HashMap<String, String>, ToolError> {
    match args.get(k) {
        None | Some(Value::Null) => Ok(HashMap::new()),
        Some(Value::Object(m)) => Ok(m
            .iter()
            .map(|(k, v)| (k.clone(), crate::tools::param_string(v)))
            .collect()),
        Some(_) => Err(ToolError::invalid(format!("{k}: must be an object"))),
    }
}

fn terminal(w: &pb::Workflow) -> bool {
    matches!(
        w.state(),
        pb::WorkflowState::Succeeded | pb::WorkflowState::Failed | pb::WorkflowState::Cancelled
    )
}

impl Api {
    pub(crate) fn new(ch: AuthedChannel) -> Self {
        Self { ch }
    }

    pub(crate) fn tasks(&self) -> TaskServiceClient<AuthedChannel> {
        TaskServiceClient::new(self.ch.clone())
            .max_decoding_message_size(scabbard_common::client::MAX_MESSAGE_BYTES)
    }

    pub(crate) fn workflows(&self) -> WorkflowServiceClient<AuthedChannel> {
        WorkflowServiceClient::new(self.ch.clone())
            .max_decoding_message_size(scabbard_common::client::MAX_MESSAGE_BYTES)
    }

    pub(crate) fn templates(&self) -> TemplateServiceClient<AuthedChannel> {
        TemplateServiceClient::new(self.ch.clone())
            .max_decoding_message_size(scabbard_common::client::MAX_MESSAGE_BYTES)
    }

    pub(crate) fn admin(&self) -> AdminServiceClient<AuthedChannel> {
        AdminServiceClient::new(self.ch.clone())
    }

    /// The scopes of the calling token (`WhoAmI`).
    pub(crate) async fn whoami(&self) -> Result<pb::TokenInfo, tonic::Status> {
        let r = self
            .admin()
            .who_am_i(pb::WhoAmIRequest {})
            .await?
            .into_inner();
        Ok(r.token.unwrap_or_default())
    }

    pub(crate) async fn list_templates(&self) -> Result<Vec<pb::Template>, tonic::Status> {
        Ok(self
            .templates()
            .list(pb::ListTemplatesRequest {})
            .await?
            .into_inner()
            .templates)
    }

    pub(crate) async fn get_template(
        &self,
        name: &str,
        version: u32,
    ) -> Result<pb::Template, tonic::Status> {
        Ok(self
            .templates()
            .get(pb::GetTemplateRequest {
                name: name.into(),
                version,
            })
            .await?
            .into_inner())
    }

    pub(crate) async fn get_task(&self, id: &str) -> Result<pb::Task, tonic::Status> {
        Ok(self
            .tasks()
            .get(pb::GetTaskRequest { id: id.into() })
            .await?
            .into_inner())
    }

    pub(crate) async fn get_workflow(&self, id: &str) -> Result<pb::Workflow, tonic::Status> {
        Ok(self
            .workflows()
            .get(pb::GetWorkflowRequest { id: id.into() })
            .await?
            .into_inner())
    }

    /// Runs a built-in tool (not the per-template ones).
    pub(crate) async fn call(
        &self,
        name: &str,
        args: &Map<String, Value>,
        progress: Progress,
    ) -> Outcome {
        match name {
            "list_templates" => {
                let ts = self.list_templates().await?;
                Ok(
                    json!({"templates": ts.iter().map(|t| template_json(t, false)).collect::<Vec<_>>()}),
                )
            }
            "describe_template" => {
                let t = self
                    .get_template(&required(args, "name")?, version(args)?)
                    .await?;
                Ok(template_json(&t, true))
            }
            "render_template" => {
                let name = required(args, "name")?;
                let r = self
                    .templates()
                    .render(pb::RenderTemplateRequest {
                        name: name.clone(),
                        version: version(args)?,
                        params: string_map(args, "params")?,
                    })
                    .await?
                    .into_inner();
                Ok(
                    json!({"template": name, "version": r.version, "yaml": wfdef::to_yaml(&r.workflow.unwrap_or_default())}),
                )
            }
            "run_template" => {
                let name = required(args, "name")?;
                let params = string_map(args, "params")?;
                self.run_template(&name, version(args)?, params, args, progress)
                    .await
            }
            "submit_task" => self.submit_task(args).await,
            "get_task" => Ok(task_json(&self.get_task(&required(args, "id")?).await?)),
            "list_tasks" => self.list_tasks(args).await,
            "task_logs" => {
                let id = required(args, "id")?;
                let cap = u(args, "max_bytes")
                    .unwrap_or(LOG_CAP_DEFAULT)
                    .clamp(1, LOG_CAP_MAX);
                let tail = u(args, "tail_lines");
                if tail.is_some() && args.contains_key("offset") {
                    return Err(ToolError::invalid(
                        "tail_lines and offset: give one of them, not both",
                    ));
                }
                let attempt = u(args, "attempt").unwrap_or(0) as u32;
                self.logs(&id, attempt, u(args, "offset").unwrap_or(0), tail, cap)
                    .await
            }
            "cancel_task" => {
                let t = self
                    .tasks()
                    .cancel(pb::CancelTaskRequest {
                        id: required(args, "id")?,
                        reason: s(args, "reason").unwrap_or_else(|| "cancelled through MCP".into()),
                    })
                    .await?
                    .into_inner();
                Ok(task_json(&t))
            }
            "get_workflow" => Ok(workflow_json(
                &self.get_workflow(&required(args, "id")?).await?,
            )),
            "cancel_workflow" => {
                let w = self
                    .workflows()
                    .cancel(pb::CancelWorkflowRequest {
                        id: required(args, "id")?,
                        reason: s(args, "reason").unwrap_or_else(|| "cancelled through MCP".into()),
                    })
                    .await?
                    .into_inner();
                Ok(workflow_json(&w))
            }
            "rerun_task" => {
                let r = self
                    .tasks()
                    .rerun(pb::RerunTaskRequest {
                        id: required(args, "id")?,
                        idempotency_key: s(args, "idempotency_key").unwrap_or_default(),
                    })
                    .await?
                    .into_inner();
                let t = r.task.unwrap_or_default();
                Ok(json!({"task": task_json(&t), "existing": r.existing}))
            }
            "rerun_workflow" => {
                let r = self
                    .workflows()
                    .rerun(pb::RerunWorkflowRequest {
                        id: required(args, "id")?,
                        idempotency_key: s(args, "idempotency_key").unwrap_or_default(),
                    })
                    .await?
                    .into_inner();
                let w = r.workflow.unwrap_or_default();
                Ok(json!({"workflow": workflow_json(&w), "existing": r.existing}))
            }
            "trigger_schedule" => {
                let r = pb::schedule_service_client::ScheduleServiceClient::new(self.ch.clone())
                    .trigger(pb::TriggerScheduleRequest {
                        id: required(args, "id")?,
                        idempotency_key: s(args, "idempotency_key").unwrap_or_default(),
                    })
                    .await?
                    .into_inner();
                let w = r.workflow.unwrap_or_default();
                Ok(json!({"workflow": workflow_json(&w), "existing": r.existing}))
            }
            "list_agents" => {
                let r = self
                    .admin()
                    .list_agents(pb::ListAgentsRequest {})
                    .await?
                    .into_inner();
                let agents: Vec<Value> = r
                    .agents
                    .iter()
                    .map(|a| {
                        json!({"id": a.id, "name": a.name, "status": state_name(a.status().as_str_name(), "AGENT_STATUS_"),
                            "slots": a.slots, "running": a.running, "labels": a.labels, "capabilities": a.capabilities,
                            "draining": a.draining, "version": a.version, "project": a.project, "last_seen_ms": a.last_seen_ms})
                    })
                    .collect();
                Ok(json!({"agents": agents}))
            }
            "cluster_status" => {
                let r = self
                    .admin()
                    .cluster_status(pb::ClusterStatusRequest {})
                    .await?
                    .into_inner();
                Ok(
                    json!({"leader": r.leader, "store_backend": r.store_backend, "store_healthy": r.store_healthy,
                    "store_error": r.store_error, "queued_tasks": r.queued_tasks, "active_tasks": r.active_tasks,
                    "total_tasks": r.total_tasks, "connected_agents": r.connected_agents,
                    "running_workflows": r.running_workflows, "pending_workflows": r.pending_workflows,
                    "members": r.members.iter().map(|m| json!({"address": m.address, "leader": m.leader})).collect::<Vec<_>>()}),
                )
            }
            other => Err(ToolError::invalid(format!("name: no tool {other:?}"))),
        }
    }

    /// Runs a template; with `wait` true in `opts`, follows the workflow to its end.
    pub(crate) async fn run_template(
        &self,
        name: &str,
        version: u32,
        params: HashMap<String, String>,
        opts: &Map<String, Value>,
        progress: Progress,
    ) -> Outcome {
        let r = self
            .templates()
            .run(pb::RunTemplateRequest {
                name: name.into(),
                version,
                params,
                idempotency_key: s(opts, "idempotency_key").unwrap_or_default(),
                project: s(opts, "project").unwrap_or_default(),
            })
            .await?
            .into_inner();
        let wf = r.workflow.unwrap_or_default();
        if !opts.get("wait").and_then(Value::as_bool).unwrap_or(false) {
            return Ok(json!({"workflow": workflow_json(&wf), "existing": r.existing}));
        }
        let wf = self.wait_workflow(wf, &progress).await?;
        Ok(json!({"workflow": workflow_json(&wf), "existing": r.existing, "waited": true}))
    }

    /// Follows a workflow (Watch stream, re-opened when it drops) until it finishes or the
    /// request is cancelled, sending progress (done/total) when the client asked for it.
    async fn wait_workflow(
        &self,
        mut wf: pb::Workflow,
        p: &Progress,
    ) -> Result<pb::Workflow, ToolError> {
        let id = wf.id.clone();
        let mut last = None;
        let mut stream = None;
        loop {
            if let Some(t) = &p.token
                && last != Some((wf.done, wf.total))
            {
                last = Some((wf.done, wf.total));
                let _ = p
                    .peer
                    .notify_progress(
                        ProgressNotificationParam::new(t.clone(), f64::from(wf.done))
                            .with_total(f64::from(wf.total))
                            .with_message(format!(
                                "workflow {id}: {}",
                                state_name(wf.state().as_str_name(), "WORKFLOW_STATE_")
                            )),
                    )
                    .await;
            }
            if terminal(&wf) {
                return Ok(wf);
            }
            let st = match &mut stream {
                Some(st) => st,
                None => match self
                    .workflows()
                    .watch(pb::WatchWorkflowRequest {
                        id: id.clone(),
                        after_revision: 0,
                    })
                    .await
                {
                    Ok(st) => stream.insert(st.into_inner()),
                    Err(s) if s.code() != tonic::Code::Unavailable => return Err(s.into()),
                    Err(_) => {
                        tokio::select! {
                            _ = p.cancel.cancelled() => return Ok(wf),
                            _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        }
                    }
                },
            };
            tokio::select! {
                _ = p.cancel.cancelled() => return Ok(wf),
                ev = st.next() => match ev {
                    Some(Ok(e)) => {
                        if let Some(w) = e.workflow {
                            wf = w;
                        }
                    }
                    // A dropped stream is re-opened after reading the workflow again.
                    Some(Err(_)) | None => {
                        stream = None;
                        wf = self.get_workflow(&id).await?;
                    }
                }
            }
        }
    }

    async fn submit_task(&self, args: &Map<String, Value>) -> Outcome {
        let command: Vec<String> = match (s(args, "script"), args.get("command")) {
            (Some(sc), None) => vec!["sh".into(), "-c".into(), sc],
            (None, Some(Value::Array(a))) if !a.is_empty() => {
                a.iter().map(crate::tools::param_string).collect()
            }
            (Some(_), Some(_)) => {
                return Err(ToolError::invalid(
                    "script and command: give one of them, not both",
                ));
            }
            _ => {
                return Err(ToolError::invalid(
                    "script: required (or command, an argv array)",
                ));
            }
        };
        let spec = pb::TaskSpec {
            name: s(args, "name").unwrap_or_default(),
            kind: Some(task_spec::Kind::Shell(pb::ShellTask { command })),
            env: string_map(args, "env")?,
            labels: string_map(args, "labels")?,
            timeout_ms: u(args, "timeout_seconds").unwrap_or(0).saturating_mul(1000),
            ..Default::default()
        };
        let r = self
            .tasks()
            .submit(pb::SubmitTaskRequest {
                spec: Some(spec),
                idempotency_key: s(args, "idempotency_key").unwrap_or_default(),
                project: s(args, "project").unwrap_or_default(),
            })
            .await?
            .into_inner();
        Ok(json!({"task": r.task.as_ref().map(task_json), "existing": r.existing}))
    }

    async fn list_tasks(&self, args: &Map<String, Value>) -> Outcome {
        let mut states = Vec::new();
        if let Some(Value::Array(a)) = args.get("states") {
            for v in a {
                let name = format!(
                    "TASK_STATE_{}",
                    v.as_str().unwrap_or_default().to_ascii_uppercase()
                );
                match pb::TaskState::from_str_name(&name) {
                    Some(st) if st != pb::TaskState::Unspecified => states.push(st as i32),
                    _ => return Err(ToolError::invalid(format!("states: unknown state {v}"))),
                }
            }
        }
        let r = self
            .tasks()
            .list(pb::ListTasksRequest {
                states,
                labels: string_map(args, "labels")?,
                page_size: u(args, "page_size").unwrap_or(50).min(1000) as u32,
                page_token: s(args, "page_token").unwrap_or_default(),
                project: s(args, "project").unwrap_or_default(),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(
            json!({"tasks": r.tasks.iter().map(task_json).collect::<Vec<_>>(), "next_page_token": r.next_page_token}),
        )
    }

    /// A task's log text: from chunk `offset` on, or the last `tail` lines; at most `cap`
    /// bytes. Secrets were masked by the worker before the log left it.
    pub(crate) async fn logs(
        &self,
        id: &str,
        attempt: u32,
        offset: u64,
        tail: Option<u64>,
        cap: u64,
    ) -> Outcome {
        let mut stream = self
            .tasks()
            .logs(pb::TaskLogsRequest {
                task_id: id.into(),
                attempt,
                follow: false,
                from_seq: offset,
            })
            .await?
            .into_inner();
        let cap = cap as usize;
        let mut text: Vec<u8> = Vec::new();
        let mut next = offset;
        let mut truncated = false;
        while let Some(c) = stream.next().await {
            let c = c?;
            if tail.is_none() && text.len() + c.data.len() > cap {
                if text.is_empty() {
                    text.extend_from_slice(&c.data[..cap]);
                }
                truncated = true;
                break;
            }
            text.extend_from_slice(&c.data);
            next = c.seq + 1;
        }
        let mut text = String::from_utf8_lossy(&text).into_owned();
        if let Some(n) = tail {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n as usize);
            let mut t = lines[start..].join("\n");
            if t.len() > cap {
                let mut cut = t.len() - cap;
                while !t.is_char_boundary(cut) {
                    cut += 1;
                }
                t = t[cut..].to_string();
                truncated = true;
            }
            text = t;
        }
        Ok(json!({"task_id": id, "text": text, "next_offset": next, "truncated": truncated}))
    }
}

fn version(args: &Map<String, Value>) -> Result<u32, ToolError> {
    match args.get("version") {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| ToolError::invalid("version: must be a non-negative integer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_calls_name_the_code_and_every_error() {
        let e = ToolError::from(tonic::Status::invalid_argument(
            "repository: \"x\" does not match; go_version: \"0.1\" is not one of 1.22, 1.23",
        ));
        assert_eq!(e.code, "INVALID_ARGUMENT");
        assert!(e.message.starts_with("INVALID_ARGUMENT: repository"));
        assert_eq!(e.errors.len(), 2);
        let e = ToolError::from(tonic::Status::permission_denied("needs scope submit"));
        assert_eq!(e.code, "PERMISSION_DENIED");
    }

    #[test]
    fn arguments() {
        let args: Map<String, Value> = serde_json::from_value(
            json!({"id": "", "params": {"n": 3, "xs": ["a"]}, "version": -1}),
        )
        .unwrap();
        assert!(
            required(&args, "id")
                .unwrap_err()
                .message
                .starts_with("id:")
        );
        let m = string_map(&args, "params").unwrap();
        assert_eq!(m["n"], "3");
        assert_eq!(m["xs"], r#"["a"]"#);
        assert!(version(&args).unwrap_err().message.starts_with("version:"));
    }
}
