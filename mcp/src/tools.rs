//! The tool catalog: the built-in tools (name, description, input schema, annotations and
//! the scope a token needs for them) and one typed `run_<template>` tool per template, whose
//! input schema is made from the template's typed parameters. Also turns a typed tool's
//! JSON arguments back into the string parameters the controller validates.

use std::collections::HashMap;
use std::sync::Arc;

use rmcp::model::{Tool, ToolAnnotations};
use scabbard_common::proto::{ParamType, Scope, Template, TemplateParam};
use serde_json::{Map, Value, json};

/// Prefix of the per-template tools.
pub(crate) const RUN_PREFIX: &str = "run_";

/// Arguments every typed template tool takes besides the template's own parameters (left
/// out when a parameter has the same name).
const RUN_OPTIONS: [&str; 3] = ["wait", "project", "idempotency_key"];

/// What a tool does to the cluster (its annotations) and the scope it needs.
#[derive(Clone, Copy)]
enum Kind {
    /// Reads only (scope read).
    Read,
    /// Creates work (scope submit); not idempotent unless an idempotency key is given.
    Create,
    /// Cancels (scope submit): destructive, idempotent.
    Cancel,
}

impl Kind {
    fn scope(self) -> Scope {
        match self {
            Kind::Read => Scope::Read,
            Kind::Create | Kind::Cancel => Scope::Submit,
        }
    }

    fn annotations(self, title: &str) -> ToolAnnotations {
        let a = ToolAnnotations::with_title(title).open_world(false);
        match self {
            Kind::Read => a.read_only(true).destructive(false).idempotent(true),
            Kind::Create => a.read_only(false).destructive(false).idempotent(false),
            Kind::Cancel => a.read_only(false).destructive(true).idempotent(true),
        }
    }
}

fn object(props: Value, required: &[&str]) -> Arc<Map<String, Value>> {
    let v = json!({
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": false,
    });
    match v {
        Value::Object(m) => Arc::new(m),
        _ => unreachable!("a JSON object literal"),
    }
}

fn tool(
    name: &'static str,
    title: &str,
    desc: &'static str,
    kind: Kind,
    schema: Arc<Map<String, Value>>,
) -> (Tool, Scope) {
    let mut t = Tool::new(name, desc, schema).annotate(kind.annotations(title));
    if let Some(out) = output_schema(name) {
        t = t.with_raw_output_schema(out);
    }
    (t, kind.scope())
}

/// The shape of a task in results (see `views::task_json`).
fn task_schema() -> Value {
    json!({"type": "object", "required": ["id", "state"], "properties": {
        "id": {"type": "string"}, "name": {"type": "string"},
        "state": {"type": "string", "enum": ["unspecified", "queued", "assigned", "running", "succeeded", "failed", "cancelled", "timed_out", "retry_wait"]},
        "project": {"type": "string"}, "agent_id": {"type": "string"},
        "attempts": {"type": "integer"}, "workflow_id": {"type": "string"},
        "result": {"type": ["object", "null"]}}})
}

/// The shape of a workflow in results (see `views::workflow_json`).
fn workflow_schema() -> Value {
    json!({"type": "object", "required": ["id", "state", "done", "total", "nodes"], "properties": {
        "id": {"type": "string"}, "name": {"type": "string"},
        "state": {"type": "string", "enum": ["unspecified", "pending", "running", "succeeded", "failed", "cancelled"]},
        "project": {"type": "string"}, "done": {"type": "integer"}, "total": {"type": "integer"},
        "message": {"type": "string"},
        "nodes": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "state": {"type": "string"}, "task_id": {"type": "string"}}}}}})
}

fn run_output() -> Value {
    json!({"type": "object", "required": ["workflow"], "properties": {
        "workflow": workflow_schema(), "existing": {"type": "boolean"}, "waited": {"type": "boolean"}}})
}

/// The structured result of a built-in tool.
fn output_schema(name: &str) -> Option<Arc<Map<String, Value>>> {
    let template = json!({"type": "object", "required": ["name", "version", "params"], "properties": {
        "name": {"type": "string"}, "version": {"type": "integer"}, "description": {"type": "string"},
        "tool": {"type": "string"}, "params": {"type": "array", "items": {"type": "object"}}}});
    let v = match name {
        "list_templates" => {
            json!({"type": "object", "required": ["templates"], "properties": {"templates": {"type": "array", "items": template}}})
        }
        "describe_template" => template,
        "render_template" => json!({"type": "object", "required": ["yaml"], "properties": {
            "template": {"type": "string"}, "version": {"type": "integer"}, "yaml": {"type": "string"}}}),
        "run_template" => run_output(),
        "submit_task" => {
            json!({"type": "object", "required": ["task"], "properties": {"task": task_schema(), "existing": {"type": "boolean"}}})
        }
        "get_task" | "cancel_task" => task_schema(),
        "list_tasks" => json!({"type": "object", "required": ["tasks"], "properties": {
            "tasks": {"type": "array", "items": task_schema()}, "next_page_token": {"type": "string"}}}),
        "task_logs" => {
            json!({"type": "object", "required": ["text", "next_offset", "truncated"], "properties": {
            "task_id": {"type": "string"}, "text": {"type": "string"},
            "next_offset": {"type": "integer"}, "truncated": {"type": "boolean"}}})
        }
        "get_workflow" | "cancel_workflow" => workflow_schema(),
        "list_agents" => {
            json!({"type": "object", "required": ["agents"], "properties": {"agents": {"type": "array", "items": {"type": "object"}}}})
        }
        "rerun_task" => {
            json!({"type": "object", "required": ["task"], "properties": {"task": task_schema(), "existing": {"type": "boolean"}}})
        }
        "rerun_workflow" | "trigger_schedule" => {
            json!({"type": "object", "required": ["workflow"], "properties": {"workflow": workflow_schema(), "existing": {"type": "boolean"}}})
        }
        "cluster_status" => json!({"type": "object", "properties": {
            "leader": {"type": "string"}, "store_healthy": {"type": "boolean"}, "queued_tasks": {"type": "integer"},
            "active_tasks": {"type": "integer"}, "connected_agents": {"type": "integer"}}}),
        _ => return None,
    };
    match v {
        Value::Object(m) => Some(Arc::new(m)),
        _ => None,
    }
}

/// The built-in tools with the scope each needs.
pub(crate) fn builtin() -> Vec<(Tool, Scope)> {
    let id = |what: &str| json!({"type": "string", "minLength": 1, "description": format!("The {what} id.")});
    let params = json!({"type": "object", "additionalProperties": {"type": ["string", "number", "integer", "boolean", "array"]}, "description": "Template parameters by name."});
    let version = json!({"type": "integer", "minimum": 0, "description": "Template version (0 or absent: the latest)."});
    let project = json!({"type": "string", "description": "Project to run in (default: the token's project, or `default`)."});
    let key = json!({"type": "string", "description": "Idempotency key: the same key returns the run already made instead of a new one."});
    vec![
        tool(
            "list_templates",
            "List templates",
            "Lists the workflow templates (latest version of each) with their typed parameters.",
            Kind::Read,
            object(json!({}), &[]),
        ),
        tool(
            "describe_template",
            "Describe a template",
            "A template's parameters (types, enums, patterns, defaults), description and body.",
            Kind::Read,
            object(
                json!({"name": {"type": "string", "minLength": 1}, "version": version}),
                &["name"],
            ),
        ),
        tool(
            "render_template",
            "Render a template (dry run)",
            "Dry run: the workflow the parameters give, as YAML, or every parameter error at once. Nothing is submitted.",
            Kind::Read,
            object(
                json!({"name": {"type": "string", "minLength": 1}, "params": params, "version": version}),
                &["name"],
            ),
        ),
        tool(
            "run_template",
            "Run a template",
            "Renders a template and submits the workflow; with `wait`, waits until it finishes, sending progress (done/total nodes).",
            Kind::Create,
            object(
                json!({"name": {"type": "string", "minLength": 1}, "params": params, "version": version, "project": project, "idempotency_key": key,
                "wait": {"type": "boolean", "default": false, "description": "Wait until the workflow finishes."}}),
                &["name"],
            ),
        ),
        tool(
            "submit_task",
            "Submit a shell task",
            "Submits one shell task (`sh -c script`, or `command` as argv).",
            Kind::Create,
            object(
                json!({"name": {"type": "string"}, "script": {"type": "string", "description": "Run with `sh -c`."},
                "command": {"type": "array", "items": {"type": "string"}, "minItems": 1, "description": "Argv (instead of script)."},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "timeout_seconds": {"type": "integer", "minimum": 0},
                "project": project, "idempotency_key": key}),
                &[],
            ),
        ),
        tool(
            "get_task",
            "Get a task",
            "A task's state, result, attempts and outputs.",
            Kind::Read,
            object(json!({"id": id("task")}), &["id"]),
        ),
        tool(
            "list_tasks",
            "List tasks",
            "Tasks, newest first, paged; filter by state, label and project.",
            Kind::Read,
            object(
                json!({"states": {"type": "array", "items": {"type": "string", "enum": ["queued", "assigned", "running", "succeeded", "failed", "cancelled", "timed_out", "retry_wait"]}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "project": {"type": "string"},
                "page_size": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
                "page_token": {"type": "string", "description": "next_page_token of the previous page."}}),
                &[],
            ),
        ),
        tool(
            "task_logs",
            "Read a task's logs",
            "A task's log text (already secret-redacted by the worker): the last `tail_lines` lines, or from chunk `offset` on; at most `max_bytes` bytes.",
            Kind::Read,
            object(
                json!({"id": id("task"),
                "attempt": {"type": "integer", "minimum": 0, "description": "Attempt (0: the latest)."},
                "tail_lines": {"type": "integer", "minimum": 1, "maximum": 100000},
                "offset": {"type": "integer", "minimum": 0, "description": "First log chunk (next_offset of a previous call)."},
                "max_bytes": {"type": "integer", "minimum": 1, "maximum": crate::calls::LOG_CAP_MAX, "default": crate::calls::LOG_CAP_DEFAULT}}),
                &["id"],
            ),
        ),
        tool(
            "cancel_task",
            "Cancel a task",
            "Cancels a task (a running attempt is stopped).",
            Kind::Cancel,
            object(
                json!({"id": id("task"), "reason": {"type": "string"}}),
                &["id"],
            ),
        ),
        tool(
            "get_workflow",
            "Get a workflow",
            "A workflow's state, progress (done/total) and nodes with their tasks.",
            Kind::Read,
            object(json!({"id": id("workflow")}), &["id"]),
        ),
        tool(
            "cancel_workflow",
            "Cancel a workflow",
            "Cancels a workflow and its unfinished tasks.",
            Kind::Cancel,
            object(
                json!({"id": id("workflow"), "reason": {"type": "string"}}),
                &["id"],
            ),
        ),
        tool(
            "list_agents",
            "List agents",
            "The workers (agents): slots, running tasks, labels, status.",
            Kind::Read,
            object(json!({}), &[]),
        ),
        tool(
            "cluster_status",
            "Cluster status",
            "Leader, store health, task and workflow counts.",
            Kind::Read,
            object(json!({}), &[]),
        ),
        tool(
            "rerun_task",
            "Rerun a task",
            "A new task with the same spec as the given one (secrets included), in its project; the same idempotency_key returns the first rerun.",
            Kind::Create,
            object(
                json!({"id": id("task"), "idempotency_key": {"type": "string"}}),
                &["id"],
            ),
        ),
        tool(
            "rerun_workflow",
            "Rerun a workflow",
            "A new workflow with the same spec and template parameters as the given one (every node runs again); the same idempotency_key returns the first rerun.",
            Kind::Create,
            object(
                json!({"id": id("workflow"), "idempotency_key": {"type": "string"}}),
                &["id"],
            ),
        ),
        tool(
            "trigger_schedule",
            "Trigger a schedule now",
            "Fires a schedule once now, whatever its overlap policy (a queue schedule's run waits its turn); the same idempotency_key returns the first run instead of starting another.",
            Kind::Create,
            object(
                json!({"id": {"type": "string", "description": "Schedule id."}, "idempotency_key": {"type": "string"}}),
                &["id"],
            ),
        ),
    ]
}

/// The typed tool name of a template: `run_` and the name with `-` as `_`.
pub(crate) fn run_tool_name(template: &str) -> String {
    format!("{RUN_PREFIX}{}", template.replace('-', "_"))
}

/// A parameter's default as a typed JSON value (`None` when it has none or it does not
/// parse as its type).
fn typed_default(p: &TemplateParam) -> Option<Value> {
    if !p.has_default {
        return None;
    }
    let d = p.default.as_str();
    match p.r#type() {
        ParamType::Int => d.trim().parse::<i64>().ok().map(Value::from),
        ParamType::Bool => d.trim().parse::<bool>().ok().map(Value::from),
        ParamType::List => Some(match serde_json::from_str::<Vec<String>>(d) {
            Ok(v) => json!(v),
            Err(_) => json!(
                d.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
            ),
        }),
        _ => Some(Value::from(d)),
    }
}

/// The JSON Schema of one template parameter.
pub(crate) fn param_schema(p: &TemplateParam) -> Value {
    // The controller matches patterns in full; JSON Schema patterns are unanchored.
    let pattern = (!p.pattern.is_empty()).then(|| format!("^(?:{})$", p.pattern));
    let mut s = match p.r#type() {
        ParamType::Int => {
            let mut s = json!({"type": "integer"});
            if let Some(m) = p.min {
                s["minimum"] = json!(m);
            }
            if let Some(m) = p.max {
                s["maximum"] = json!(m);
            }
            s
        }
        ParamType::Bool => json!({"type": "boolean"}),
        ParamType::Enum => json!({"type": "string", "enum": p.values}),
        ParamType::List => {
            let mut items = json!({"type": "string"});
            if let Some(pt) = &pattern {
                items["pattern"] = json!(pt);
            }
            json!({"type": "array", "items": items})
        }
        _ => {
            let mut s = json!({"type": "string"});
            if let Some(pt) = &pattern {
                s["pattern"] = json!(pt);
            }
            s
        }
    };
    if !p.description.is_empty() {
        s["description"] = json!(p.description);
    }
    if let Some(d) = typed_default(p) {
        s["default"] = d;
    }
    s
}

/// The typed tool of a template.
pub(crate) fn template_tool(t: &Template) -> Tool {
    let mut props = Map::new();
    let mut required = Vec::new();
    for p in &t.params {
        props.insert(p.name.clone(), param_schema(p));
        if p.required && !p.has_default {
            required.push(p.name.as_str());
        }
    }
    let extra = [
        (
            "wait",
            json!({"type": "boolean", "default": false, "description": "Wait until the workflow finishes, sending progress (done/total nodes)."}),
        ),
        (
            "project",
            json!({"type": "string", "description": "Project to run in (default: the token's project)."}),
        ),
        (
            "idempotency_key",
            json!({"type": "string", "description": "The same key returns the run already made."}),
        ),
    ];
    for (k, v) in extra {
        props.entry(k.to_string()).or_insert(v);
    }
    let desc = if t.description.is_empty() {
        format!("Runs template {} (version {}).", t.name, t.version)
    } else {
        format!(
            "Runs template {} (version {}): {}",
            t.name, t.version, t.description
        )
    };
    Tool::new(
        run_tool_name(&t.name),
        desc,
        object(Value::Object(props), &required),
    )
    .annotate(Kind::Create.annotations(&format!("Run {}", t.name)))
    .with_raw_output_schema(match run_output() {
        Value::Object(m) => Arc::new(m),
        _ => unreachable!("a JSON object literal"),
    })
}

/// Splits a typed tool's arguments into the template's string parameters and the run
/// options (`wait`, `project`, `idempotency_key`, unless the template has such a parameter).
pub(crate) fn split_args(
    t: &Template,
    args: &Map<String, Value>,
) -> (HashMap<String, String>, Map<String, Value>) {
    let mut params = HashMap::new();
    let mut opts = Map::new();
    for (k, v) in args {
        if RUN_OPTIONS.contains(&k.as_str()) && !t.params.iter().any(|p| &p.name == k) {
            opts.insert(k.clone(), v.clone());
        } else {
            params.insert(k.clone(), param_string(v));
        }
    }
    (params, opts)
}

/// A JSON argument as the string form the controller parses (lists as JSON arrays).
pub(crate) fn param_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_schemas() {
        assert_eq!(run_tool_name("ci-pipeline"), "run_ci_pipeline");
        let p = TemplateParam {
            name: "mode".into(),
            r#type: ParamType::Enum as i32,
            values: vec!["a".into(), "b".into()],
            has_default: true,
            default: "a".into(),
            ..Default::default()
        };
        assert_eq!(
            param_schema(&p),
            json!({"type": "string", "enum": ["a", "b"], "default": "a"})
        );
        let l = TemplateParam {
            name: "xs".into(),
            r#type: ParamType::List as i32,
            pattern: "[a-z]+".into(),
            has_default: true,
            default: "a, b".into(),
            ..Default::default()
        };
        assert_eq!(
            param_schema(&l),
            json!({"type": "array", "items": {"type": "string", "pattern": "^(?:[a-z]+)$"}, "default": ["a", "b"]})
        );
        assert_eq!(param_string(&json!(["x", "y"])), r#"["x","y"]"#);
        assert_eq!(param_string(&json!(3)), "3");
    }
}

#[cfg(test)]
mod split_tests {
    use super::*;

    #[test]
    fn run_options_are_not_parameters_unless_the_template_has_them() {
        let t = Template {
            name: "t".into(),
            params: vec![TemplateParam {
                name: "project".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let args: Map<String, Value> =
            serde_json::from_value(json!({"wait": true, "project": "p", "n": 2})).unwrap();
        let (params, opts) = split_args(&t, &args);
        assert_eq!(params.get("project").map(String::as_str), Some("p"));
        assert_eq!(params.get("n").map(String::as_str), Some("2"));
        assert_eq!(opts.get("wait"), Some(&json!(true)));
        assert!(!opts.contains_key("project"));
        // Every built-in tool has an input and an output schema.
        assert!(builtin().iter().all(|(t, _)| t.output_schema.is_some()));
    }
}
