//! The workflow engine: runs DAGs of tasks on top of the task machinery.
//!
//! A workflow's nodes mirror their tasks' states. Whenever a node's task changes, the
//! workflow is marked dirty and [`State::advance_workflows`] — run by the core loop before
//! each dispatch round — brings it forward: it copies task states into the nodes, applies
//! the failure policy (fail fast: cancel what runs, skip the rest; continue: skip only the
//! failed node's dependents), releases nodes whose dependencies all succeeded (filling in
//! `${{ tasks.X.outputs.Y }}` from their outputs), and finishes the workflow once every
//! node is done. Workflows naming a concurrency group wait in PENDING while the group is
//! full. Only the leader's core runs this; everything is rebuilt from the store on start.

use std::collections::HashMap;

use prost::Message;
use scabbard_common::proto::{
    FailurePolicy, NodeState, Placement, PlacementReason, TaskState, TemplateRef, Workflow,
    WorkflowNode, WorkflowSpec, WorkflowState,
};
use scabbard_common::time::now_ms;
use scabbard_common::{Error, Result};
use tracing::info;

use super::{Effect, Reply, State, reply_effect, validate};
use crate::workflow::{self, node_final, refs};

mod live;
pub(crate) mod records;

/// Store key prefix of workflow records (see [`records`] for the layout).
pub(crate) const WORKFLOW_PREFIX: &str = "workflows/";

impl State {
    // The submission's parts as the API message carries them.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn submit_workflow(
        &mut self,
        spec: WorkflowSpec,
        key: String,
        project: String,
        template: Option<TemplateRef>,
        validated: bool,
        trace: super::trace::Trace,
        rerun_of: String,
        reply: Reply<(Workflow, bool)>,
    ) {
        // The reply carries the outcome.
        let origin = (trace, rerun_of);
        let _ = self
            .create_workflow(spec, key, project, template, validated, origin, Some(reply))
            .await;
    }

    /// Creates a workflow (or finds the one with the same idempotency key) and releases its
    /// first nodes. `reply` gets the answer once it is durable; the result is also returned
    /// (for the schedule loop; errors as their message). `validated`: the spec already
    /// passed [`workflow::validate::workflow_spec`] (in the API, off the core).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn create_workflow(
        &mut self,
        mut spec: WorkflowSpec,
        key: String,
        project: String,
        template: Option<TemplateRef>,
        validated: bool,
        // The submitter's trace context and the workflow this one reruns ("" for none).
        (trace, rerun_of): (super::trace::Trace, String),
        reply: Option<Reply<(Workflow, bool)>>,
    ) -> std::result::Result<(Workflow, bool), String> {
        let answer = |reply: Option<Reply<(Workflow, bool)>>, r: Result<(Workflow, bool)>| {
            if let Some(reply) = reply {
                let _ = reply.send(r);
            }
        };
        let wf = match self.new_workflow(&mut spec, &key, &project, validated) {
            Err(e) => {
                let msg = e.to_string();
                answer(reply, Err(e));
                return Err(msg);
            }
            Ok(Some(existing)) => {
                // The first submit may still be on its way to the store.
                if let Some(reply) = reply {
                    let effect = super::reply_effect(reply, (existing.clone(), true));
                    self.after_durable(vec![effect]).await;
                }
                return Ok((existing, true));
            }
            Ok(None) => match self.workflow_record(spec, key, project, template) {
                Ok(mut wf) => {
                    // The submitter's context: the workflow's span is its child.
                    wf.traceparent = trace.map(|t| t.traceparent).unwrap_or_default();
                    wf.rerun_of = rerun_of;
                    wf
                }
                Err(e) => {
                    let msg = e.to_string();
                    answer(reply, Err(e));
                    return Err(msg);
                }
            },
        };
        let id = wf.id.clone();
        info!(workflow = %id, nodes = wf.total, state = ?wf.state(), "workflow submitted");
        // Its records first (the header last: a crash after it resumes the workflow), then
        // its tasks.
        self.persist_whole_workflow(&wf, Vec::new()).await;
        if !wf.idempotency_key.is_empty() {
            self.wf_idempotency.insert(
                super::idempotency_key(&wf.project, &wf.idempotency_key),
                id.clone(),
            );
        }
        self.wf_active.insert(id.clone());
        self.workflows.insert(id.clone(), wf);
        self.advance(&id).await;
        let wf = self.workflows[&id].clone();
        // Durable once this last write of the workflow is.
        let effects = match reply {
            Some(reply) => vec![reply_effect(reply, (wf.clone(), false))],
            None => Vec::new(),
        };
        self.persist_workflow(&wf, std::iter::empty(), effects)
            .await;
        Ok((wf, false))
    }

    /// Checks a submission; returns the existing workflow for a repeated idempotency key.
    fn new_workflow(
        &mut self,
        spec: &mut WorkflowSpec,
        key: &str,
        project: &str,
        validated: bool,
    ) -> Result<Option<Workflow>> {
        if !validated {
            workflow::validate::workflow_spec(spec, &self.cfg)?;
        }
        if key.len() > 256 {
            return Err(Error::invalid("idempotency_key is longer than 256 bytes"));
        }
        if !key.is_empty()
            && let Some(wf) = self
                .wf_idempotency
                .get(&super::idempotency_key(project, key))
                .and_then(|id| self.workflows.get(id))
        {
            return Ok(Some(wf.clone()));
        }
        self.check_queue_quota(project)?;
        for (i, t) in spec.tasks.iter_mut().enumerate() {
            if let Some(s) = t.spec.as_mut() {
                self.resolve_task_inputs(s, project, true)
                    .map_err(|e| Error::invalid(format!("tasks[{i}] ({}): {e}", t.name)))?;
                self.secrets.seal_spec(s)?;
                // Sealed secrets are larger than the values the API checked.
                validate::size::check_spec(&format!("tasks[{i}] ({}) spec", t.name), s, &self.cfg)?;
            }
        }
        Ok(None)
    }

    fn workflow_record(
        &mut self,
        spec: WorkflowSpec,
        key: String,
        project: String,
        template: Option<TemplateRef>,
    ) -> Result<Workflow> {
        let id = self
            .ids
            .generate()
            .map_err(Error::internal)?
            .to_string()
            .to_lowercase();
        let now = now_ms();
        let nodes: Vec<WorkflowNode> = spec
            .tasks
            .iter()
            .map(|t| WorkflowNode {
                name: t.name.clone(),
                depends_on: t.depends_on.clone(),
                state: NodeState::Waiting as i32,
                ..Default::default()
            })
            .collect();
        let (state, placement) = match spec.concurrency.as_ref() {
            Some(g) if self.group_running(&g.key) >= g.limit.max(1) => (
                WorkflowState::Pending,
                Some(group_placement(
                    &g.key,
                    self.group_running(&g.key),
                    g.limit,
                    now,
                )),
            ),
            _ => (WorkflowState::Running, None),
        };
        let wf = Workflow {
            id,
            total: nodes.len() as u32,
            nodes,
            spec: Some(spec),
            state: state as i32,
            project,
            created_at_ms: now,
            updated_at_ms: now,
            template,
            idempotency_key: key,
            placement,
            ..Default::default()
        };
        let header = records::header(&wf).encoded_len();
        if header > self.cfg.max_spec_bytes {
            return Err(Error::invalid(format!(
                "the workflow's header (name, labels, template and its params) is {header} bytes, over the limit of {} bytes (max_spec_bytes)",
                self.cfg.max_spec_bytes
            )));
        }
        Ok(wf)
    }

    /// Running workflows of a concurrency group.
    fn group_running(&self, key: &str) -> u32 {
        self.wf_active
            .iter()
            .filter_map(|id| self.workflows.get(id))
            .filter(|w| w.state() == WorkflowState::Running && group_of(w) == Some(key))
            .count() as u32
    }

    pub(super) fn get_workflow(&self, id: &str) -> Result<Workflow> {
        let mut wf = self
            .workflows
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found("workflow", id))?;
        wf.placement = match wf.state() {
            WorkflowState::Pending => wf.placement.take(),
            // Running: the first node whose task waits, with its task's explanation.
            WorkflowState::Running => wf.nodes.iter().find_map(|n| {
                let t = &self.tasks.get(&n.task_id)?.task;
                let mut p = self.placement_of(t)?;
                p.message = format!("node {}: {}", n.name, p.message);
                Some(p)
            }),
            _ => None,
        };
        Ok(wf)
    }

    pub(super) async fn cancel_workflow(
        &mut self,
        id: String,
        reason: String,
        reply: Reply<Workflow>,
    ) {
        let Some(wf) = self.workflows.get_mut(&id) else {
            let _ = reply.send(Err(Error::not_found("workflow", id)));
            return;
        };
        if workflow_final(wf.state()) {
            let _ = reply.send(Err(not_cancellable(&id, wf.state())));
            return;
        }
        wf.cancel_requested = true;
        wf.message = if reason.is_empty() {
            "cancelled by request".into()
        } else {
            format!("cancelled: {reason}")
        };
        self.advance(&id).await;
        let wf = self.workflows[&id].clone();
        self.persist_workflow(
            &wf,
            std::iter::empty(),
            vec![reply_effect(reply, wf.clone())],
        )
        .await;
    }

    /// Advances every workflow whose tasks changed, until nothing more moves.
    pub(crate) async fn advance_workflows(&mut self) {
        for _ in 0..64 {
            if self.wf_dirty.is_empty() {
                return;
            }
            let ids = std::mem::take(&mut self.wf_dirty);
            for id in ids {
                self.advance(&id).await;
            }
        }
    }

    /// Brings one workflow forward (see the module docs); persists it if anything changed.
    pub(super) async fn advance(&mut self, id: &str) {
        let Some(mut wf) = self.workflows.remove(id) else {
            return;
        };
        // What was last written: the header and each node (compared, not encoded: the
        // nodes' tasks are not looked at again).
        let before_header = records::header(&wf);
        let before_nodes = wf.nodes.clone();
        let now = now_ms();
        self.sync_nodes(&mut wf);
        let mut effects_tasks = Vec::new();
        let fail_fast = wf
            .spec
            .as_ref()
            .is_none_or(|s| s.failure_policy() != FailurePolicy::Continue);
        let failed: Vec<String> = wf
            .nodes
            .iter()
            .filter(|n| matches!(n.state(), NodeState::Failed | NodeState::Cancelled))
            .map(|n| n.name.clone())
            .collect();
        let stopping = wf.cancel_requested || (fail_fast && !failed.is_empty());
        if stopping {
            let (why, cancel_why) = if wf.cancel_requested {
                (
                    "skipped: the workflow was cancelled".to_string(),
                    "the workflow was cancelled".to_string(),
                )
            } else {
                (
                    format!("skipped: {} failed (fail fast)", failed.join(", ")),
                    format!("{} failed (fail fast)", failed.join(", ")),
                )
            };
            for n in wf.nodes.iter_mut() {
                match n.state() {
                    NodeState::Waiting => {
                        n.state = NodeState::Skipped as i32;
                        n.message = why.clone();
                    }
                    NodeState::Queued | NodeState::Running | NodeState::Retrying => {
                        let live = self
                            .tasks
                            .get(&n.task_id)
                            .is_some_and(|e| !e.task.cancel_requested);
                        if live
                            && let Ok((task, effects)) =
                                self.cancel_task(&n.task_id, cancel_why.clone())
                        {
                            effects_tasks.push((task, effects));
                        }
                    }
                    _ => {}
                }
            }
        } else {
            skip_dependents_of_failed(&mut wf);
        }
        for (task, effects) in effects_tasks {
            self.persist_task(task, effects).await;
        }
        self.sync_nodes(&mut wf);
        if wf.state() == WorkflowState::Running && !stopping {
            self.release_ready(&mut wf).await;
        }
        wf.done = wf.nodes.iter().filter(|n| node_final(n.state())).count() as u32;
        let mut finished_group = None;
        if !workflow_final(wf.state()) && wf.done == wf.total {
            self.finish(&mut wf, now);
            finished_group = group_of(&wf).map(str::to_string);
        }
        if workflow_final(wf.state()) {
            self.wf_active.remove(&wf.id);
        }
        let changed_nodes: Vec<usize> = wf
            .nodes
            .iter()
            .zip(&before_nodes)
            .enumerate()
            .filter(|(_, (now, was))| now != was)
            .map(|(i, _)| i)
            .collect();
        let changed = !changed_nodes.is_empty() || records::header(&wf) != before_header;
        if changed {
            wf.updated_at_ms = now;
            self.persist_workflow(&wf, changed_nodes.into_iter(), Vec::new())
                .await;
        }
        self.workflows.insert(id.to_string(), wf);
        if let Some(group) = finished_group {
            self.start_pending(&group);
        }
    }

    /// Copies each released node's task state, attempts, result and outputs.
    fn sync_nodes(&self, wf: &mut Workflow) {
        for n in wf.nodes.iter_mut().filter(|n| !n.task_id.is_empty()) {
            let Some(t) = self.tasks.get(&n.task_id).map(|e| &e.task) else {
                continue;
            };
            n.state = workflow::node_state(t.state()) as i32;
            n.attempts = t.attempts.len() as u32;
            let last = t
                .result
                .as_ref()
                .or_else(|| t.attempts.last().and_then(|a| a.result.as_ref()));
            if let Some(r) = last {
                n.exit_code = r.exit_code;
                n.message = r.message.clone();
                if t.state() == TaskState::Succeeded {
                    n.outputs = r.outputs.clone();
                }
            }
        }
    }

    /// Releases every waiting node whose dependencies all succeeded.
    async fn release_ready(&mut self, wf: &mut Workflow) {
        // Which nodes are ready, from the node states alone (cheap on every advance).
        let states: HashMap<&str, NodeState> = wf
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.state()))
            .collect();
        let ready: Vec<usize> = wf
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                n.state() == NodeState::Waiting
                    && n.depends_on
                        .iter()
                        .all(|d| states.get(d.as_str()) == Some(&NodeState::Succeeded))
            })
            .map(|(i, _)| i)
            .collect();
        drop(states);
        let Some(spec) = wf.spec.as_ref().filter(|_| !ready.is_empty()) else {
            return;
        };
        // Borrowed, not copied: every node's outputs may add up to megabytes.
        let outputs: HashMap<&str, &HashMap<String, String>> = wf
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), &n.outputs))
            .collect();
        let mut released = Vec::new();
        let mut skipped = Vec::new();
        for i in ready {
            match condition(&spec.tasks[i].when, &outputs) {
                Ok(true) => released.push((
                    i,
                    self.node_task_spec(spec, i, &outputs, wf, wf.template.as_ref()),
                )),
                Ok(false) => skipped.push((i, None)),
                Err(why) => skipped.push((i, Some(why))),
            }
        }
        drop(outputs);
        for (i, why) in skipped {
            match why {
                None => {
                    wf.nodes[i].state = NodeState::Skipped as i32;
                    wf.nodes[i].message = "skipped: its condition (when) is false".into();
                }
                Some(why) => fail_node(&mut wf.nodes[i], why),
            }
            self.wf_dirty.insert(wf.id.clone());
        }
        for (i, task_spec) in released {
            let name = wf.nodes[i].name.clone();
            match task_spec.and_then(|ts| {
                self.new_task(ts, String::new(), wf.project.clone(), Some((&wf.id, &name)))
                    .map_err(|e| e.to_string())
            }) {
                Ok(mut task) => {
                    super::trace::stamp(&mut task, super::trace::node_parent(wf));
                    wf.nodes[i].task_id = task.id.clone();
                    wf.nodes[i].state = NodeState::Queued as i32;
                    self.enqueue_new(task, Vec::new()).await;
                }
                Err(why) => fail_node(&mut wf.nodes[i], why),
            }
        }
        // A node failed at release: apply the policy on the next pass.
        if wf
            .nodes
            .iter()
            .any(|n| n.state() == NodeState::Failed && n.task_id.is_empty())
        {
            self.wf_dirty.insert(wf.id.clone());
        }
    }

    /// The task spec of node `i`: workflow defaults applied, output references filled in,
    /// inputs naming other nodes' artifacts resolved to what those nodes uploaded.
    fn node_task_spec(
        &self,
        spec: &WorkflowSpec,
        i: usize,
        outputs: &HashMap<&str, &HashMap<String, String>>,
        wf: &Workflow,
        template: Option<&TemplateRef>,
    ) -> std::result::Result<scabbard_common::proto::TaskSpec, String> {
        let node = &spec.tasks[i];
        let mut ts = node.spec.clone().unwrap_or_default();
        if ts.retry.is_none() {
            ts.retry = spec.default_retry.clone();
        }
        ts.priority = (ts.priority + spec.priority).clamp(-1000, 1000);
        let mut missing = Vec::new();
        refs::for_each_string(&mut ts, &mut |_, s| match refs::substitute(s, &|r| {
            outputs.get(r.task.as_str())?.get(&r.output).cloned()
        }) {
            Ok(v) => *s = v,
            Err(m) => missing.extend(m),
        });
        if !missing.is_empty() {
            return Err(format!(
                "not started: {} not produced by the node(s) it depends on",
                missing.join(", ")
            ));
        }
        self.resolve_node_inputs(&mut ts, wf)?;
        if let Some(t) = template {
            ts.breakers.push(format!("step:{}/{}", t.name, node.name));
        }
        validate::task_spec(&mut ts, &self.cfg)
            .and_then(|()| validate::size::check_spec("its spec", &ts, &self.cfg))
            .map_err(|e| format!("not started: with its inputs filled in, {e}"))?;
        Ok(ts)
    }

    /// Fills in the inputs that name another node's artifact from that node's result.
    fn resolve_node_inputs(
        &self,
        ts: &mut scabbard_common::proto::TaskSpec,
        wf: &Workflow,
    ) -> std::result::Result<(), String> {
        use super::validate::artifacts::{InputSource, parse_from};
        for input in ts.inputs.iter_mut() {
            let Ok(InputSource::Node { node, name }) = parse_from(&input.from) else {
                continue;
            };
            let producer = wf
                .nodes
                .iter()
                .find(|n| n.name == node)
                .and_then(|n| self.tasks.get(&n.task_id))
                .map(|e| &e.task);
            let found = producer
                .and_then(|t| t.result.as_ref())
                .and_then(|r| r.artifacts.iter().find(|a| a.name == name));
            match found {
                Some(a) => input.artifact = Some(a.clone()),
                None => {
                    return Err(format!(
                        "not started: input tasks.{node}.artifacts.{name} was not produced by {node} (an optional artifact it did not find?)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Sets the final state of a workflow whose nodes are all done.
    fn finish(&mut self, wf: &mut Workflow, now: i64) {
        let failed: Vec<&str> = wf
            .nodes
            .iter()
            .filter(|n| n.state() == NodeState::Failed)
            .map(|n| n.name.as_str())
            .collect();
        // Skipped nodes without a failed or cancelled one were skipped by their conditions.
        let (state, message) = if wf.cancel_requested {
            (WorkflowState::Cancelled, wf.message.clone())
        } else if wf
            .nodes
            .iter()
            .all(|n| matches!(n.state(), NodeState::Succeeded | NodeState::Skipped))
        {
            (WorkflowState::Succeeded, String::new())
        } else if failed.is_empty() {
            (
                WorkflowState::Failed,
                "a node was cancelled outside the workflow".to_string(),
            )
        } else {
            (
                WorkflowState::Failed,
                format!("failed: {}", failed.join(", ")),
            )
        };
        wf.state = state as i32;
        wf.message = message;
        wf.finished_at_ms = now;
        info!(workflow = %wf.id, state = ?state, "workflow finished");
        super::trace::workflow_ended(wf);
    }

    /// Starts the oldest pending workflows of `group` while it has room.
    fn start_pending(&mut self, group: &str) {
        let mut pending: Vec<String> = self
            .wf_active
            .iter()
            .filter(|id| {
                self.workflows.get(*id).is_some_and(|w| {
                    w.state() == WorkflowState::Pending && group_of(w) == Some(group)
                })
            })
            .cloned()
            .collect();
        pending.sort(); // ULIDs: oldest first
        for id in pending {
            let limit = self
                .workflows
                .get(&id)
                .and_then(|w| {
                    w.spec
                        .as_ref()?
                        .concurrency
                        .as_ref()
                        .map(|g| g.limit.max(1))
                })
                .unwrap_or(1);
            if self.group_running(group) >= limit {
                break;
            }
            if let Some(w) = self.workflows.get_mut(&id) {
                w.state = WorkflowState::Running as i32;
                w.placement = None;
                self.wf_dirty.insert(id);
            }
        }
    }

    /// Queues the durable writes of a workflow's changed nodes (`nodes`, by index), then of
    /// its header; runs `effects` once the header is durable.
    /// A node change writes one small record, whatever the workflow's size.
    pub(super) async fn persist_workflow(
        &mut self,
        wf: &Workflow,
        nodes: impl Iterator<Item = usize>,
        effects: Vec<Effect>,
    ) {
        self.persist_workflow_parts(wf, nodes, effects, false).await
    }

    /// [`persist_workflow`](Self::persist_workflow); `new`: the workflow's first header
    /// (its index and idempotency keys go with it).
    async fn persist_workflow_parts(
        &mut self,
        wf: &Workflow,
        nodes: impl Iterator<Item = usize>,
        effects: Vec<Effect>,
        new: bool,
    ) {
        for i in nodes {
            self.write(
                records::node_key(&wf.id, &wf.nodes[i].name),
                Some(records::node_record(wf, i)),
                Vec::new(),
            )
            .await;
        }
        // Written last: a watch (api::workflows) reads a change as complete at the header.
        // Its `wlive/` / `wdone/` keys go in the same commit (see `history`); a final one
        // enters the finished cache (see `live`).
        let mut also = super::history::workflow_ops(wf);
        let mut effects = effects;
        if new {
            also.extend(super::history::workflow_submit_ops(wf));
        }
        if workflow_final(wf.state()) {
            effects.push(self.finished_workflow(wf));
        }
        self.write_with(
            records::header_key(&wf.id),
            Some(records::header(wf).encode_to_vec()),
            also,
            effects,
        )
        .await;
    }

    /// Queues every record of a workflow: each node's task and state, then the header (a
    /// new workflow, or one read from an earlier version's whole record).
    pub(crate) async fn persist_whole_workflow(&mut self, wf: &Workflow, effects: Vec<Effect>) {
        for i in 0..wf.nodes.len() {
            if let Some(task) = records::task_record(wf, i) {
                self.write(
                    records::task_key(&wf.id, &wf.nodes[i].name),
                    Some(task),
                    Vec::new(),
                )
                .await;
            }
        }
        self.persist_workflow_parts(wf, 0..wf.nodes.len(), effects, true)
            .await;
    }
}

/// Under `continue`: nodes downstream of a failed node will never run.
fn skip_dependents_of_failed(wf: &mut Workflow) {
    loop {
        let blocked: HashMap<String, String> = wf
            .nodes
            .iter()
            .filter(|n| {
                matches!(
                    n.state(),
                    NodeState::Failed | NodeState::Cancelled | NodeState::Skipped
                )
            })
            .map(|n| (n.name.clone(), n.name.clone()))
            .collect();
        let mut changed = false;
        for n in wf.nodes.iter_mut() {
            if n.state() != NodeState::Waiting {
                continue;
            }
            if let Some(d) = n.depends_on.iter().find(|d| blocked.contains_key(*d)) {
                n.state = NodeState::Skipped as i32;
                n.message = format!("skipped: dependency {d} did not run to success");
                changed = true;
            }
        }
        if !changed {
            return;
        }
    }
}

/// A node's condition once its dependencies succeeded: `when` with their outputs filled in.
fn condition(
    when: &str,
    outputs: &HashMap<&str, &HashMap<String, String>>,
) -> std::result::Result<bool, String> {
    let value = refs::substitute(when, &|r| {
        outputs.get(r.task.as_str())?.get(&r.output).cloned()
    })
    .map_err(|missing| {
        format!(
            "not started: its condition needs {} (not produced by its dependencies)",
            missing.join(", ")
        )
    })?;
    match value.trim() {
        "" | "true" => Ok(true),
        "false" => Ok(false),
        other => Err(format!(
            "not started: its condition (when) is {other:?}, which is neither true nor false"
        )),
    }
}

fn fail_node(n: &mut WorkflowNode, why: String) {
    n.state = NodeState::Failed as i32;
    n.message = why;
}

/// The explanation of a workflow PENDING on its concurrency group (stored with its header:
/// it is written once, when the workflow starts waiting).
fn group_placement(key: &str, running: u32, limit: u32, now: i64) -> Placement {
    Placement {
        reason: PlacementReason::ConcurrencyGroup as i32,
        message: format!(
            "waiting for concurrency group {key} ({running}/{} workflows running)",
            limit.max(1)
        ),
        blocked_by: key.to_string(),
        updated_at_ms: now,
        ..Default::default()
    }
}

fn group_of(w: &Workflow) -> Option<&str> {
    w.spec
        .as_ref()?
        .concurrency
        .as_ref()
        .map(|g| g.key.as_str())
}

/// The answer to a cancel of a finished workflow (`FAILED_PRECONDITION`).
pub(crate) fn not_cancellable(id: &str, state: WorkflowState) -> Error {
    Error::FailedPrecondition(format!(
        "workflow {id} is already {}; only pending or running workflows can be cancelled",
        state.as_str_name().trim_start_matches("WORKFLOW_STATE_")
    ))
}

/// Whether a workflow is done.
pub(crate) fn workflow_final(s: WorkflowState) -> bool {
    matches!(
        s,
        WorkflowState::Succeeded | WorkflowState::Failed | WorkflowState::Cancelled
    )
}
