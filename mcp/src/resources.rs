//! Resources: `scabbard://tasks/{id}`, `scabbard://tasks/{id}/logs`,
//! `scabbard://workflows/{id}` and `scabbard://templates/{name}` (resource templates), read
//! with the caller's token; and subscriptions, which follow a task or workflow through the
//! controller's Watch streams and send `resources/updated` when its state changes.

use std::time::Duration;

use futures::StreamExt;
use rmcp::model::{
    ReadResourceResult, ResourceContents, ResourceTemplate, ResourceUpdatedNotificationParam,
};
use rmcp::{ErrorData as McpError, Peer, RoleServer};
use scabbard_common::proto as pb;
use tokio::task::JoinHandle;

use crate::calls::{self, Api};
use crate::status_error;

/// The resource templates.
pub(crate) fn templates() -> Vec<ResourceTemplate> {
    let t = |uri: &str, name: &str, desc: &str, mime: &str| {
        let mut r = ResourceTemplate::new(uri, name).with_description(desc);
        r.mime_type = Some(mime.into());
        r
    };
    vec![
        t(
            "scabbard://tasks/{id}",
            "task",
            "A task (JSON): state, result, attempts.",
            "application/json",
        ),
        t(
            "scabbard://tasks/{id}/logs",
            "task-logs",
            "A task's log text (latest attempt; the last 64 KiB, secrets masked).",
            "text/plain",
        ),
        t(
            "scabbard://workflows/{id}",
            "workflow",
            "A workflow (JSON): state, progress and nodes.",
            "application/json",
        ),
        t(
            "scabbard://templates/{name}",
            "template",
            "A template (JSON): parameters and body.",
            "application/json",
        ),
    ]
}

/// What a URI names.
enum Target {
    Task(String),
    Logs(String),
    Workflow(String),
    Template(String),
}

fn parse(uri: &str) -> Result<Target, McpError> {
    let bad = || {
        McpError::invalid_params(
            format!(
                "uri: {uri:?} is not a scabbard:// resource (tasks/{{id}}, tasks/{{id}}/logs, workflows/{{id}}, templates/{{name}})"
            ),
            None,
        )
    };
    let rest = uri.strip_prefix("scabbard://").ok_or_else(bad)?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["tasks", id] if !id.is_empty() => Ok(Target::Task(id.to_string())),
        ["tasks", id, "logs"] if !id.is_empty() => Ok(Target::Logs(id.to_string())),
        ["workflows", id] if !id.is_empty() => Ok(Target::Workflow(id.to_string())),
        ["templates", name] if !name.is_empty() => Ok(Target::Template(name.to_string())),
        _ => Err(bad()),
    }
}

fn json_contents(uri: &str, v: &serde_json::Value) -> ReadResourceResult {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    ReadResourceResult::new(vec![ResourceContents::TextResourceContents {
        uri: uri.into(),
        mime_type: Some("application/json".into()),
        text,
        meta: None,
    }])
}

/// Reads a resource with the caller's token.
pub(crate) async fn read(api: &Api, uri: &str) -> Result<ReadResourceResult, McpError> {
    match parse(uri)? {
        Target::Task(id) => Ok(json_contents(
            uri,
            &calls::task_json(&api.get_task(&id).await.map_err(status_error)?),
        )),
        Target::Workflow(id) => Ok(json_contents(
            uri,
            &calls::workflow_json(&api.get_workflow(&id).await.map_err(status_error)?),
        )),
        Target::Template(name) => Ok(json_contents(
            uri,
            &calls::template_json(
                &api.get_template(&name, 0).await.map_err(status_error)?,
                true,
            ),
        )),
        Target::Logs(id) => {
            let v = api
                .logs(&id, 0, 0, Some(u64::MAX), calls::LOG_CAP_DEFAULT)
                .await
                .map_err(|e| McpError::invalid_params(e.message, None))?;
            let text = v["text"].as_str().unwrap_or_default().to_string();
            Ok(ReadResourceResult::new(vec![ResourceContents::text(
                text, uri,
            )]))
        }
    }
}

/// Starts following `uri` (after checking the caller may read it): each state change of
/// its task or workflow sends `resources/updated`, until the task ends (aborted on
/// unsubscribe or when the session ends).
pub(crate) async fn subscribe(
    api: Api,
    uri: String,
    peer: Peer<RoleServer>,
) -> Result<JoinHandle<()>, McpError> {
    let target = parse(&uri)?;
    // Refused here (project, scope, unknown id) rather than in the background.
    match &target {
        Target::Task(id) | Target::Logs(id) => {
            api.get_task(id).await.map_err(status_error)?;
        }
        Target::Workflow(id) => {
            api.get_workflow(id).await.map_err(status_error)?;
        }
        Target::Template(name) => {
            api.get_template(name, 0).await.map_err(status_error)?;
        }
    }
    Ok(tokio::spawn(async move {
        let notify = |peer: Peer<RoleServer>, uri: String| async move {
            peer.notify_resource_updated(ResourceUpdatedNotificationParam::new(uri))
                .await
                .is_ok()
        };
        match target {
            Target::Task(id) | Target::Logs(id) => {
                let mut last = None;
                loop {
                    let stream = api
                        .tasks()
                        .watch(pb::WatchTasksRequest {
                            ids: vec![id.clone()],
                            send_initial: true,
                            ..Default::default()
                        })
                        .await;
                    if let Ok(s) = stream {
                        let mut s = s.into_inner();
                        while let Some(Ok(ev)) = s.next().await {
                            let Some(t) = ev.task else { continue };
                            let st = t.state;
                            if last.is_some_and(|l| l != st)
                                && !notify(peer.clone(), uri.clone()).await
                            {
                                return;
                            }
                            last = Some(st);
                        }
                    }
                    if peer.is_transport_closed() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            Target::Workflow(id) => {
                let mut last = None;
                loop {
                    let stream = api
                        .workflows()
                        .watch(pb::WatchWorkflowRequest {
                            id: id.clone(),
                            after_revision: 0,
                        })
                        .await;
                    if let Ok(s) = stream {
                        let mut s = s.into_inner();
                        while let Some(Ok(ev)) = s.next().await {
                            let Some(w) = ev.workflow else { continue };
                            let key = (w.state, w.done);
                            if last.is_some_and(|l| l != key)
                                && !notify(peer.clone(), uri.clone()).await
                            {
                                return;
                            }
                            last = Some(key);
                        }
                    }
                    if peer.is_transport_closed() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            // Templates change only with a controller restart: nothing to follow.
            Target::Template(_) => {}
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert!(matches!(parse("scabbard://tasks/t1"), Ok(Target::Task(id)) if id == "t1"));
        assert!(matches!(parse("scabbard://tasks/t1/logs"), Ok(Target::Logs(id)) if id == "t1"));
        assert!(matches!(parse("scabbard://workflows/w1"), Ok(Target::Workflow(id)) if id == "w1"));
        assert!(
            matches!(parse("scabbard://templates/ci-pipeline"), Ok(Target::Template(n)) if n == "ci-pipeline")
        );
        for bad in [
            "scabbard://tasks/",
            "scabbard://tasks/a/b",
            "file:///etc/passwd",
            "scabbard://agents/a",
        ] {
            let e = parse(bad).err().expect(bad);
            assert!(e.message.contains("uri:"), "{e:?}");
        }
    }
}
