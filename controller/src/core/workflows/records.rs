//! How a workflow is laid out in the store: one record per part, so a node change writes
//! O(1) bytes whatever the workflow's size.
//!
//! - `workflows/<id>`: the header, the [`Workflow`] without its nodes and without its
//!   spec's tasks (state, counters, message, template, the spec's other fields);
//! - `workflows/<id>/tasks/<name>`: a node's task as submitted (written once);
//! - `workflows/<id>/nodes/<name>`: a node's state (rewritten when it changes).
//!
//! A new workflow's parts are written before its header, so a header always has its parts.
//! Records of earlier versions hold the whole workflow under `workflows/<id>` (a header
//! with nodes); they are read as they are and rewritten in this layout.

use std::collections::BTreeMap;

use prost::Message;
use scabbard_common::proto::{StoredWorkflowPart, Workflow, WorkflowSpec};
use scabbard_common::{Error, Result};

use super::WORKFLOW_PREFIX;

/// Key of a workflow's header.
pub(crate) fn header_key(id: &str) -> String {
    format!("{WORKFLOW_PREFIX}{id}")
}

/// Key of a node's state.
pub(crate) fn node_key(id: &str, name: &str) -> String {
    format!("{WORKFLOW_PREFIX}{id}/nodes/{name}")
}

/// Key of a node's task as submitted.
pub(crate) fn task_key(id: &str, name: &str) -> String {
    format!("{WORKFLOW_PREFIX}{id}/tasks/{name}")
}

/// The header record of `wf`: everything but the nodes and the spec's tasks.
pub(crate) fn header(wf: &Workflow) -> Workflow {
    Workflow {
        id: wf.id.clone(),
        spec: wf.spec.as_ref().map(|s| WorkflowSpec {
            name: s.name.clone(),
            tasks: Vec::new(),
            failure_policy: s.failure_policy,
            default_retry: s.default_retry.clone(),
            concurrency: s.concurrency.clone(),
            labels: s.labels.clone(),
            priority: s.priority,
        }),
        state: wf.state,
        project: wf.project.clone(),
        nodes: Vec::new(),
        created_at_ms: wf.created_at_ms,
        updated_at_ms: wf.updated_at_ms,
        finished_at_ms: wf.finished_at_ms,
        done: wf.done,
        total: wf.total,
        message: wf.message.clone(),
        template: wf.template.clone(),
        idempotency_key: wf.idempotency_key.clone(),
        cancel_requested: wf.cancel_requested,
        traceparent: wf.traceparent.clone(),
        // Only a pending workflow's (written once); a running one's is derived on read.
        placement: if wf.state() == scabbard_common::proto::WorkflowState::Pending {
            wf.placement.clone()
        } else {
            None
        },
        rerun_of: wf.rerun_of.clone(),
    }
}

/// The record of node `i`'s state.
pub(crate) fn node_record(wf: &Workflow, i: usize) -> Vec<u8> {
    StoredWorkflowPart {
        index: i as u32,
        node: Some(wf.nodes[i].clone()),
        task: None,
    }
    .encode_to_vec()
}

/// The record of node `i`'s task.
pub(crate) fn task_record(wf: &Workflow, i: usize) -> Option<Vec<u8>> {
    let task = wf.spec.as_ref()?.tasks.get(i)?.clone();
    Some(
        StoredWorkflowPart {
            index: i as u32,
            node: None,
            task: Some(task),
        }
        .encode_to_vec(),
    )
}

/// Workflows read back from a prefix range of `workflows/`, in id order.
#[derive(Default)]
pub(crate) struct Loader {
    headers: BTreeMap<String, Workflow>,
    parts: BTreeMap<String, Vec<StoredWorkflowPart>>,
}

/// What [`Loader::finish`] gives back.
pub(crate) struct Loaded {
    /// Every complete workflow.
    pub(crate) workflows: Vec<Workflow>,
    /// Ids of those read from whole-workflow records of an earlier version (to rewrite).
    pub(crate) legacy: Vec<String>,
    /// Workflows whose parts are missing or broken, with why (skipped).
    pub(crate) broken: Vec<(String, String)>,
}

impl Loader {
    /// Takes one record under `workflows/`.
    pub(crate) fn add(&mut self, key: &str, value: &[u8]) -> Result<()> {
        let rest = key.strip_prefix(WORKFLOW_PREFIX).unwrap_or(key);
        let corrupt =
            |e: prost::DecodeError| Error::internal(format!("corrupt workflow record {key}: {e}"));
        match rest.split('/').collect::<Vec<_>>()[..] {
            [id] => {
                let wf = Workflow::decode(value).map_err(corrupt)?;
                self.headers.insert(id.to_string(), wf);
            }
            [id, "nodes" | "tasks", _] => {
                let part = StoredWorkflowPart::decode(value).map_err(corrupt)?;
                self.parts.entry(id.to_string()).or_default().push(part);
            }
            _ => {
                return Err(Error::internal(format!(
                    "unexpected key {key} under {WORKFLOW_PREFIX}"
                )));
            }
        }
        Ok(())
    }

    /// Assembles every workflow from its header and parts.
    pub(crate) fn finish(mut self) -> Loaded {
        let mut out = Loaded {
            workflows: Vec::with_capacity(self.headers.len()),
            legacy: Vec::new(),
            broken: Vec::new(),
        };
        for (id, mut wf) in self.headers {
            let parts = self.parts.remove(&id).unwrap_or_default();
            if !wf.nodes.is_empty() {
                // A whole record of an earlier version (parts, if any, are older still).
                out.legacy.push(id);
                out.workflows.push(wf);
                continue;
            }
            match assemble(&mut wf, parts) {
                Ok(()) => out.workflows.push(wf),
                Err(why) => out.broken.push((id, why)),
            }
        }
        // Parts without a header: a submission that never completed (never acknowledged).
        out
    }
}

/// Puts `parts` back into the header `wf` (nodes and spec tasks in index order).
fn assemble(wf: &mut Workflow, parts: Vec<StoredWorkflowPart>) -> std::result::Result<(), String> {
    let n = wf.total as usize;
    let mut nodes = vec![None; n];
    let mut tasks = vec![None; n];
    for p in parts {
        let i = p.index as usize;
        if i >= n {
            return Err(format!("part {i} of a workflow of {n} nodes"));
        }
        if let Some(node) = p.node {
            nodes[i] = Some(node);
        }
        if let Some(task) = p.task {
            tasks[i] = Some(task);
        }
    }
    let nodes: Option<Vec<_>> = nodes.into_iter().collect();
    let tasks: Option<Vec<_>> = tasks.into_iter().collect();
    let (Some(nodes), Some(tasks)) = (nodes, tasks) else {
        return Err("some of its node or task records are missing".into());
    };
    wf.nodes = nodes;
    wf.spec.get_or_insert_with(Default::default).tasks = tasks;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use scabbard_common::proto::{NodeState, TaskSpec, TemplateRef, WorkflowNode, WorkflowTask};

    fn workflow(n: usize) -> Workflow {
        Workflow {
            id: "01wf".into(),
            spec: Some(WorkflowSpec {
                name: "big".into(),
                tasks: (0..n)
                    .map(|i| WorkflowTask {
                        name: format!("n{i}"),
                        spec: Some(TaskSpec {
                            name: "x".repeat(200),
                            ..Default::default()
                        }),
                        depends_on: if i > 0 {
                            vec![format!("n{}", i - 1)]
                        } else {
                            vec![]
                        },
                        when: String::new(),
                    })
                    .collect(),
                labels: [("team".to_string(), "a".to_string())].into(),
                priority: 3,
                ..Default::default()
            }),
            state: 2,
            project: "p".into(),
            nodes: (0..n)
                .map(|i| WorkflowNode {
                    name: format!("n{i}"),
                    state: NodeState::Waiting as i32,
                    ..Default::default()
                })
                .collect(),
            total: n as u32,
            template: Some(TemplateRef {
                name: "t".into(),
                ..Default::default()
            }),
            message: "m".into(),
            ..Default::default()
        }
    }

    fn write_all(wf: &Workflow, into: &mut Vec<(String, Vec<u8>)>) {
        for i in 0..wf.nodes.len() {
            into.push((
                task_key(&wf.id, &wf.nodes[i].name),
                task_record(wf, i).unwrap(),
            ));
            into.push((node_key(&wf.id, &wf.nodes[i].name), node_record(wf, i)));
        }
        into.push((header_key(&wf.id), header(wf).encode_to_vec()));
    }

    #[test]
    fn a_workflow_round_trips_through_its_parts_in_key_order() {
        let wf = workflow(30);
        let mut kvs = Vec::new();
        write_all(&wf, &mut kvs);
        kvs.sort(); // as a prefix range returns them
        let mut l = Loader::default();
        for (k, v) in &kvs {
            l.add(k, v).unwrap();
        }
        let loaded = l.finish();
        assert!(loaded.legacy.is_empty() && loaded.broken.is_empty());
        assert_eq!(loaded.workflows, vec![wf]);
    }

    #[test]
    fn a_node_record_is_small_whatever_the_workflow_size() {
        let wf = workflow(1000);
        assert!(wf.encoded_len() > 200_000);
        assert!(
            node_record(&wf, 500).len() < 64,
            "{}",
            node_record(&wf, 500).len()
        );
        assert!(header(&wf).encoded_len() < 128);
    }

    #[test]
    fn old_whole_records_are_read_and_flagged_for_rewriting() {
        let wf = workflow(3);
        let mut l = Loader::default();
        l.add(&header_key(&wf.id), &wf.encode_to_vec()).unwrap();
        let loaded = l.finish();
        assert_eq!(loaded.workflows, vec![wf.clone()]);
        assert_eq!(loaded.legacy, vec![wf.id]);
    }

    #[test]
    fn missing_parts_and_headerless_parts_are_not_workflows() {
        let wf = workflow(3);
        let mut kvs = Vec::new();
        write_all(&wf, &mut kvs);
        let mut l = Loader::default();
        for (k, v) in kvs.iter().filter(|(k, _)| !k.ends_with("nodes/n1")) {
            l.add(k, v).unwrap();
        }
        let loaded = l.finish();
        assert!(loaded.workflows.is_empty());
        assert_eq!(loaded.broken.len(), 1);
        let mut l = Loader::default();
        for (k, v) in kvs.iter().filter(|(k, _)| k.contains("/nodes/")) {
            l.add(k, v).unwrap();
        }
        assert!(l.finish().workflows.is_empty());
        assert!(Loader::default().add("workflows/a/b", b"").is_err());
    }
}
