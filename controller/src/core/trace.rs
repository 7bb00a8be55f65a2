//! Trace context kept with tasks and workflows, and the spans the controller emits for
//! their lifetimes (see `scabbard_common::telemetry::context` for why their ids are
//! derived, not drawn):
//!
//! ```text
//! submitter's span (CLI, client; or the Submit RPC's server span)
//! ├─ scabbard.task           id H(task, <task id>)                  a plain task
//! │  └─ scabbard.attempt     id H(attempt, <task id>, <n>)          one per attempt
//! │     └─ worker spans      (Assign.traceparent = the attempt's context)
//! └─ scabbard.workflow       id H(workflow, <workflow id>)
//!    └─ scabbard.workflow.node   (the node's task span, same id scheme)
//!       └─ scabbard.attempt …
//! ```
//!
//! Spans are emitted when what they stand for ends (an attempt's result or loss, a task's
//! final state, a workflow's end) with the recorded start and end times. Nothing here
//! runs unless the task (or workflow) carries a trace context and tracing is on: a task
//! submitted without one costs an empty-string check.

use std::time::SystemTime;

use opentelemetry::KeyValue;
use scabbard_common::proto::{Outcome, Task, Workflow};
use scabbard_common::telemetry::context::{Emit, TraceParent, emit, stable_span_id, time_of_ms};
use scabbard_common::{is_final, telemetry};

/// A submitter's trace context on its way into the core (boxed: core messages stay small).
pub(crate) type Trace = Option<Box<TraceParent>>;

/// The trace context a call's handler runs in: its server span's when tracing is on, else
/// the caller's `traceparent` metadata as given (so a worker that traces still joins the
/// submitter's trace through a controller that does not).
pub(crate) fn incoming<T>(req: &tonic::Request<T>) -> Trace {
    if telemetry::enabled() {
        return telemetry::current().map(Box::new);
    }
    let md = req.metadata();
    let tp = md.get("traceparent")?.to_str().ok()?;
    let ts = md
        .get("tracestate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    TraceParent::new(tp, ts).map(Box::new)
}

/// Stores the submitter's context in a new task.
pub(crate) fn stamp(task: &mut Task, trace: Trace) {
    if let Some(t) = trace {
        task.traceparent = t.traceparent;
        task.tracestate = t.tracestate;
    }
}

fn parent_of_task(task: &Task) -> Option<TraceParent> {
    TraceParent::new(&task.traceparent, &task.tracestate)
}

fn task_span_id(task_id: &str) -> opentelemetry::trace::SpanId {
    stable_span_id(&["task", task_id])
}

fn attempt_span_id(task_id: &str, number: u32) -> opentelemetry::trace::SpanId {
    stable_span_id(&["attempt", task_id, &number.to_string()])
}

/// `Assign.traceparent`/`tracestate` for attempt `number` of `task` (empty when the task
/// has no trace context).
pub(crate) fn assign_context(task: &Task, number: u32) -> (String, String) {
    let Some(parent) = parent_of_task(task) else {
        return (String::new(), String::new());
    };
    let task_span = parent.child(task_span_id(&task.id));
    match task_span.and_then(|t| t.child(attempt_span_id(&task.id, number))) {
        Some(tp) => (tp.traceparent, tp.tracestate),
        None => (String::new(), String::new()),
    }
}

/// The context a workflow's node tasks are created with (its workflow span).
pub(crate) fn node_parent(wf: &Workflow) -> Trace {
    let parent = TraceParent::new(&wf.traceparent, "")?;
    parent
        .child(stable_span_id(&["workflow", &wf.id]))
        .map(Box::new)
}

/// After an attempt of `task` ended (its last attempt record is finished): emits the
/// attempt's span, and the task's when the task is final.
pub(crate) fn after_attempt(task: &Task) {
    if task.traceparent.is_empty() || !telemetry::enabled() {
        return;
    }
    let Some(parent) = parent_of_task(task) else {
        return;
    };
    let Some(task_ctx) = parent.child(task_span_id(&task.id)) else {
        return;
    };
    if let Some(a) = task.attempts.last().filter(|a| a.finished_at_ms > 0) {
        let now = SystemTime::now();
        let result = a.result.as_ref();
        let failed = result.is_some_and(|r| r.outcome() != Outcome::Succeeded);
        emit(Emit {
            name: "scabbard.attempt",
            parent: &task_ctx,
            span_id: attempt_span_id(&task.id, a.number),
            start: time_of_ms(a.assigned_at_ms, now),
            end: time_of_ms(a.finished_at_ms, now),
            attributes: vec![
                KeyValue::new("scabbard.task.id", task.id.clone()),
                KeyValue::new("scabbard.attempt", i64::from(a.number)),
                KeyValue::new("scabbard.agent.id", a.agent_id.clone()),
                KeyValue::new(
                    "scabbard.outcome",
                    result.map_or("UNSPECIFIED", |r| r.outcome().as_str_name()),
                ),
            ],
            error: failed.then(|| result.map(|r| r.message.clone()).unwrap_or_default()),
        });
    }
    task_ended(task);
}

/// When `task` is final: emits its span (`scabbard.task`, or `scabbard.workflow.node` for
/// a workflow's node).
pub(crate) fn task_ended(task: &Task) {
    if task.traceparent.is_empty() || !telemetry::enabled() || !is_final(task.state()) {
        return;
    }
    let Some(parent) = parent_of_task(task) else {
        return;
    };
    let now = SystemTime::now();
    let node = !task.workflow_node.is_empty();
    let mut attributes = vec![
        KeyValue::new("scabbard.task.id", task.id.clone()),
        KeyValue::new("scabbard.project", task.project.clone()),
        KeyValue::new("scabbard.task.state", task.state().as_str_name()),
        KeyValue::new("scabbard.attempts", task.attempts.len() as i64),
    ];
    if node {
        attributes.push(KeyValue::new(
            "scabbard.workflow.id",
            task.workflow_id.clone(),
        ));
        attributes.push(KeyValue::new(
            "scabbard.workflow.node",
            task.workflow_node.clone(),
        ));
    }
    let failed = task.state() != scabbard_common::proto::TaskState::Succeeded;
    emit(Emit {
        name: if node {
            "scabbard.workflow.node"
        } else {
            "scabbard.task"
        },
        parent: &parent,
        span_id: task_span_id(&task.id),
        start: time_of_ms(task.created_at_ms, now),
        end: time_of_ms(task.updated_at_ms, now),
        attributes,
        error: failed.then(|| {
            task.result
                .as_ref()
                .map(|r| r.message.clone())
                .unwrap_or_default()
        }),
    });
}

/// When `wf` is final: emits its span.
pub(crate) fn workflow_ended(wf: &Workflow) {
    if wf.traceparent.is_empty() || !telemetry::enabled() {
        return;
    }
    let Some(parent) = TraceParent::new(&wf.traceparent, "") else {
        return;
    };
    let now = SystemTime::now();
    let state = wf.state();
    emit(Emit {
        name: "scabbard.workflow",
        parent: &parent,
        span_id: stable_span_id(&["workflow", &wf.id]),
        start: time_of_ms(wf.created_at_ms, now),
        end: time_of_ms(wf.finished_at_ms.max(wf.updated_at_ms), now),
        attributes: vec![
            KeyValue::new("scabbard.workflow.id", wf.id.clone()),
            KeyValue::new("scabbard.project", wf.project.clone()),
            KeyValue::new("scabbard.workflow.state", state.as_str_name()),
            KeyValue::new("scabbard.workflow.nodes", i64::from(wf.total)),
        ],
        error: (state != scabbard_common::proto::WorkflowState::Succeeded)
            .then(|| wf.message.clone()),
    });
}
