//! Machine-readable workflows for `workflow get -o json|yaml`. The protocol types have no
//! serde, so this maps them to `serde_json::Value` by hand (enum values by their short
//! lower-case names, secret values as `***`); YAML is printed from the same value, with
//! the spec as a workflow file (`wfdef::to_yaml`).

use std::collections::HashMap;

use scabbard_common::proto::{
    ConcurrencyGroup, RetryPolicy, TaskSpec, Workflow, WorkflowSpec, output_spec, task_spec,
};
use serde_json::{Map, Value, json};

/// `FAILURE_POLICY_FAIL_FAST` → `fail_fast`.
fn short(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_ascii_lowercase()
}

fn sorted(m: &HashMap<String, String>) -> Value {
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort();
    Value::Object(
        keys.into_iter()
            .map(|k| (k.clone(), Value::String(m[k].clone())))
            .collect(),
    )
}

fn retry(r: &Option<RetryPolicy>) -> Value {
    let Some(r) = r else { return Value::Null };
    json!({
        "max_attempts": r.max_attempts,
        "initial_backoff_ms": r.initial_backoff_ms,
        "max_backoff_ms": r.max_backoff_ms,
        "multiplier": r.multiplier,
        "jitter": r.jitter,
        "retry_on": r.retry_on().map(|c| short(c.as_str_name(), "FAILURE_CLASS_")).collect::<Vec<_>>(),
        "retry_exit_codes": r.retry_exit_codes,
        "max_infra_retries": r.max_infra_retries,
    })
}

fn concurrency(c: &Option<ConcurrencyGroup>) -> Value {
    match c {
        Some(c) => json!({ "key": c.key, "limit": c.limit }),
        None => Value::Null,
    }
}

fn kind(k: &Option<task_spec::Kind>) -> Value {
    use task_spec::Kind;
    match k {
        Some(Kind::Shell(s)) => json!({ "shell": { "command": s.command } }),
        Some(Kind::Noop(_)) => json!({ "noop": {} }),
        Some(Kind::Container(c)) => json!({ "container": {
            "image": c.image,
            "workdir": c.workdir,
            "steps": c.steps.iter().map(|s| json!({ "name": s.name, "args": s.args, "cache": s.cache })).collect::<Vec<_>>(),
            "secrets": c.secrets.iter().map(|s| json!({ "env": s.env, "source": s.source })).collect::<Vec<_>>(),
            "caches": c.caches.iter().map(|m| json!({
                "volume": m.volume,
                "path": m.path,
                "sharing": short(m.sharing().as_str_name(), "CACHE_SHARING_"),
            })).collect::<Vec<_>>(),
            "directories": c.directories.iter().map(|d| json!({
                "host_path": d.host_path, "path": d.path, "exclude": d.exclude,
            })).collect::<Vec<_>>(),
            "registry_auth": c.registry_auth,
            "gpus": c.gpus,
            "git": c.git.iter().map(|g| json!({
                "url": g.url, "ref": g.r#ref, "path": g.path, "keep_git_dir": g.keep_git_dir,
            })).collect::<Vec<_>>(),
            "downloads": c.downloads.iter().map(|d| json!({ "url": d.url, "path": d.path })).collect::<Vec<_>>(),
            "cache": c.cache,
            "publish": c.publish,
            "entrypoint": c.entrypoint,
        } }),
        Some(Kind::DaggerCall(d)) => json!({ "dagger_call": {
            "module": d.module, "function": d.function, "args": d.args,
        } }),
        None => Value::Null,
    }
}

fn task(t: &TaskSpec) -> Value {
    let mut secret_keys: Vec<&String> = t.secret_env.keys().collect();
    secret_keys.sort();
    let outputs: Vec<Value> = t
        .outputs
        .iter()
        .map(|o| {
            let source = match &o.source {
                Some(output_spec::Source::Path(p)) => json!({ "path": p }),
                Some(output_spec::Source::LastStdoutLine(b)) => json!({ "last_stdout_line": b }),
                Some(output_spec::Source::ContainerPath(p)) => json!({ "container_path": p }),
                Some(output_spec::Source::GitCommit(p)) => json!({ "git_commit": p }),
                Some(output_spec::Source::Published(b)) => json!({ "published": b }),
                None => Value::Null,
            };
            json!({ "name": o.name, "source": source })
        })
        .collect();
    let req = t.requirements.clone().unwrap_or_default();
    json!({
        "name": t.name,
        "kind": kind(&t.kind),
        "env": sorted(&t.env),
        "secret_env": secret_keys.into_iter().map(|k| (k.clone(), json!("***"))).collect::<Map<_, _>>(),
        "requirements": { "capabilities": req.capabilities, "labels": sorted(&req.labels) },
        "priority": t.priority,
        "timeout_ms": t.timeout_ms,
        "labels": sorted(&t.labels),
        "max_infra_retries": t.max_infra_retries,
        "retry": retry(&t.retry),
        "concurrency": concurrency(&t.concurrency),
        "breakers": t.breakers,
        "outputs": outputs,
        "artifacts": t.artifacts.iter().map(|a| json!({
            "name": a.name, "path": a.path, "optional": a.optional,
        })).collect::<Vec<_>>(),
        "inputs": t.inputs.iter().map(|i| json!({
            "from": i.from,
            "path": i.path,
            "artifact": i.artifact.as_ref().map_or(Value::Null, |a| json!({
                "task_id": a.task_id, "name": a.name, "sha256": a.sha256, "size": a.size,
            })),
        })).collect::<Vec<_>>(),
    })
}

/// A workflow spec as JSON.
pub(crate) fn spec(s: &WorkflowSpec) -> Value {
    json!({
        "name": s.name,
        "failure_policy": short(s.failure_policy().as_str_name(), "FAILURE_POLICY_"),
        "default_retry": retry(&s.default_retry),
        "concurrency": concurrency(&s.concurrency),
        "labels": sorted(&s.labels),
        "priority": s.priority,
        "tasks": s.tasks.iter().map(|t| json!({
            "name": t.name,
            "depends_on": t.depends_on,
            "when": t.when,
            "spec": t.spec.as_ref().map_or(Value::Null, task),
        })).collect::<Vec<_>>(),
    })
}

/// A workflow's status (everything but the spec) as JSON.
pub(crate) fn status(w: &Workflow) -> Value {
    let template = w.template.as_ref().map_or(Value::Null, |t| {
        json!({
            "name": t.name,
            "version": t.version,
            "params": sorted(&t.params),
            "schedule_id": t.schedule_id,
            "scheduled_for_ms": t.scheduled_for_ms,
        })
    });
    let nodes: Vec<Value> = w
        .nodes
        .iter()
        .map(|n| {
            json!({
                "name": n.name,
                "depends_on": n.depends_on,
                "state": short(n.state().as_str_name(), "NODE_STATE_"),
                "task_id": n.task_id,
                "attempts": n.attempts,
                "exit_code": n.exit_code,
                "message": n.message,
                "outputs": sorted(&n.outputs),
            })
        })
        .collect();
    json!({
        "id": w.id,
        "state": short(w.state().as_str_name(), "WORKFLOW_STATE_"),
        "project": w.project,
        "done": w.done,
        "total": w.total,
        "message": w.message,
        "cancel_requested": w.cancel_requested,
        "idempotency_key": w.idempotency_key,
        "created_at_ms": w.created_at_ms,
        "updated_at_ms": w.updated_at_ms,
        "finished_at_ms": w.finished_at_ms,
        "template": template,
        "nodes": nodes,
    })
}

/// The whole workflow as pretty JSON.
pub(crate) fn json(w: &Workflow) -> String {
    let mut v = status(w);
    if let Value::Object(m) = &mut v {
        m.insert("spec".into(), w.spec.as_ref().map_or(Value::Null, spec));
    }
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// The workflow as YAML: its status, then `spec:` as a workflow file.
pub(crate) fn yaml(w: &Workflow) -> String {
    let mut out = String::new();
    emit(&status(w), 0, &mut out);
    if let Some(s) = &w.spec {
        out.push_str("spec:\n");
        for line in scabbard_common::wfdef::to_yaml(s).lines() {
            if line.is_empty() {
                out.push('\n');
            } else {
                out.push_str("  ");
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// A YAML scalar: plain when unambiguous, else a JSON-quoted string (valid YAML).
fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => {
            let plain = !s.is_empty()
                && s.trim() == s
                && !s.contains(|c: char| ":#{}[],&*?|<>=!%@`\"'\\\n\t".contains(c))
                && !s.starts_with('-')
                && s.parse::<f64>().is_err()
                && !matches!(
                    s.to_ascii_lowercase().as_str(),
                    "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "~"
                );
            if plain {
                s.clone()
            } else {
                serde_json::to_string(s).unwrap_or_default()
            }
        }
        Value::Object(m) if m.is_empty() => "{}".into(),
        Value::Array(a) if a.is_empty() => "[]".into(),
        other => other.to_string(),
    }
}

fn is_block(v: &Value) -> bool {
    match v {
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => false,
    }
}

/// Block-style YAML of an object's entries at `indent` spaces.
fn emit(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if is_block(v) {
                    out.push_str(&format!("{pad}{k}:\n"));
                    let inner = if v.is_array() { indent } else { indent + 2 };
                    emit(v, inner, out);
                } else {
                    out.push_str(&format!("{pad}{k}: {}\n", scalar(v)));
                }
            }
        }
        Value::Array(a) => {
            for item in a {
                if is_block(item) && item.is_object() {
                    let mut nested = String::new();
                    emit(item, indent + 2, &mut nested);
                    // The first line of the item goes after the dash.
                    let body = nested.get(indent + 2..).unwrap_or("");
                    out.push_str(&format!("{pad}- {body}"));
                } else if is_block(item) {
                    out.push_str(&format!("{pad}-\n"));
                    emit(item, indent + 2, out);
                } else {
                    out.push_str(&format!("{pad}- {}\n", scalar(item)));
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scabbard_common::proto::{NodeState, ShellTask, WorkflowNode, WorkflowState, WorkflowTask};

    fn sample() -> Workflow {
        let mut secret_env = HashMap::new();
        secret_env.insert("TOKEN".to_string(), "hunter2".to_string());
        Workflow {
            id: "wf1".into(),
            state: WorkflowState::Running as i32,
            project: "default".into(),
            spec: Some(WorkflowSpec {
                name: "ship".into(),
                tasks: vec![WorkflowTask {
                    name: "build".into(),
                    spec: Some(TaskSpec {
                        kind: Some(task_spec::Kind::Shell(ShellTask {
                            command: vec!["make".into(), "all".into()],
                        })),
                        secret_env,
                        ..TaskSpec::default()
                    }),
                    depends_on: vec![],
                    when: String::new(),
                }],
                ..WorkflowSpec::default()
            }),
            nodes: vec![WorkflowNode {
                name: "build".into(),
                state: NodeState::Running as i32,
                attempts: 1,
                message: "needs: quoting".into(),
                ..WorkflowNode::default()
            }],
            ..Workflow::default()
        }
    }

    #[test]
    fn json_has_status_nodes_and_spec_without_secrets() {
        let text = json(&sample());
        let v: Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(v["state"], "running");
        assert_eq!(v["nodes"][0]["state"], "running");
        assert_eq!(v["spec"]["failure_policy"], "unspecified");
        let t = &v["spec"]["tasks"][0]["spec"];
        assert_eq!(t["kind"]["shell"]["command"][1], "all");
        assert_eq!(t["secret_env"]["TOKEN"], "***");
        assert!(!text.contains("hunter2"));
    }

    #[test]
    fn yaml_is_block_style_and_quotes_what_needs_it() {
        let text = yaml(&sample());
        assert!(text.starts_with("id: wf1\nstate: running\n"), "{text}");
        assert!(
            text.contains("nodes:\n- name: build\n  depends_on: []\n"),
            "{text}"
        );
        assert!(text.contains("  message: \"needs: quoting\"\n"), "{text}");
        assert!(text.contains("template: null\n"), "{text}");
        assert!(text.contains("\nspec:\n  "), "{text}");
        assert_eq!(scalar(&json!("123")), "\"123\"");
        assert_eq!(scalar(&json!("true")), "\"true\"");
        assert_eq!(scalar(&json!("")), "\"\"");
        assert_eq!(scalar(&json!("plain words")), "plain words");
    }
}
