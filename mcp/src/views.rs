//! JSON views of the controller's messages, as tool results and resource contents: states
//! as lower-case names (`succeeded`), the fields an agent needs, never secrets (a task's
//! `secret_env` values are not part of the view).

use scabbard_common::proto as pb;
use serde_json::{Value, json};

pub(crate) fn state_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
}

pub(crate) fn task_json(t: &pb::Task) -> Value {
    let spec = t.spec.clone().unwrap_or_default();
    let result = t.result.as_ref().map(|r| {
        json!({
            "outcome": state_name(r.outcome().as_str_name(), "OUTCOME_"),
            "exit_code": r.exit_code,
            "message": r.message,
            "outputs": r.outputs,
        })
    });
    json!({
        "id": t.id,
        "name": spec.name,
        "state": state_name(t.state().as_str_name(), "TASK_STATE_"),
        "project": t.project,
        "agent_id": t.agent_id,
        "labels": spec.labels,
        "created_at_ms": t.created_at_ms,
        "updated_at_ms": t.updated_at_ms,
        "attempts": t.attempts.len(),
        "cancel_requested": t.cancel_requested,
        "workflow_id": t.workflow_id,
        "workflow_node": t.workflow_node,
        "result": result,
    })
}

pub(crate) fn workflow_json(w: &pb::Workflow) -> Value {
    let nodes: Vec<Value> = w
        .nodes
        .iter()
        .map(|n| {
            json!({
                "name": n.name,
                "state": state_name(n.state().as_str_name(), "NODE_STATE_"),
                "task_id": n.task_id,
                "depends_on": n.depends_on,
                "attempts": n.attempts,
                "exit_code": n.exit_code,
                "message": n.message,
                "outputs": n.outputs,
            })
        })
        .collect();
    json!({
        "id": w.id,
        "name": w.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
        "state": state_name(w.state().as_str_name(), "WORKFLOW_STATE_"),
        "project": w.project,
        "done": w.done,
        "total": w.total,
        "message": w.message,
        "template": w.template.as_ref().map(|t| json!({"name": t.name, "version": t.version, "params": t.params})),
        "created_at_ms": w.created_at_ms,
        "finished_at_ms": w.finished_at_ms,
        "nodes": nodes,
    })
}

pub(crate) fn template_json(t: &pb::Template, body: bool) -> Value {
    let params: Vec<Value> = t
        .params
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "type": state_name(p.r#type().as_str_name(), "PARAM_TYPE_"),
                "required": p.required,
                "default": p.has_default.then(|| p.default.clone()),
                "pattern": (!p.pattern.is_empty()).then(|| p.pattern.clone()),
                "values": p.values,
                "description": p.description,
                "schema": crate::tools::param_schema(p),
            })
        })
        .collect();
    let mut v = json!({
        "name": t.name,
        "version": t.version,
        "description": t.description,
        "source": t.source,
        "versions": t.versions,
        "tool": crate::tools::run_tool_name(&t.name),
        "params": params,
    });
    if body {
        v["body"] = json!(t.body);
    }
    v
}
