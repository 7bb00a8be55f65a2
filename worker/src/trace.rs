//! The worker's spans of an attempt (only when tracing is on and the assignment carries a
//! trace context): `scabbard.worker.attempt`, child of the controller's attempt span
//! (`Assign.traceparent`), and under it one span per step: `accept`, `inputs` (staging
//! input artifacts), `execute` (the executor; the task's processes get this span's
//! context as `TRACEPARENT`; a container task has one `scabbard.worker.step` per step
//! under it), `upload` (artifacts) and `spool` (the result).

use scabbard_common::proto;
use scabbard_common::telemetry::{self, TraceParent};
use tracing::Span;

/// The assignment's trace context, if any.
pub(crate) fn of_assign(a: &proto::Assign) -> Option<TraceParent> {
    TraceParent::new(&a.traceparent, &a.tracestate)
}

/// The attempt's span (disabled when tracing is off or the task has no trace).
pub(crate) fn attempt_span(a: &proto::Assign, tp: Option<&TraceParent>) -> Span {
    let Some(tp) = tp.filter(|_| telemetry::enabled()) else {
        return Span::none();
    };
    let span = tracing::info_span!(
        "attempt",
        otel.name = "scabbard.worker.attempt",
        scabbard.task.id = %a.task_id,
        scabbard.attempt = a.attempt,
        scabbard.outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    telemetry::context::set_parent(&span, tp);
    span
}

/// A step of the attempt under the current span (disabled when the attempt is not traced).
pub(crate) fn step(name: &'static str) -> Span {
    if !telemetry::enabled() || Span::current().is_none() {
        return Span::none();
    }
    tracing::info_span!("step", otel.name = name)
}

/// Step `n` of a container task, under the current (execute) span; it lasts until dropped.
pub(crate) fn container_step(n: usize, label: &str) -> Span {
    if !telemetry::enabled() || Span::current().is_none() {
        return Span::none();
    }
    tracing::info_span!(
        "step",
        otel.name = "scabbard.worker.step",
        scabbard.step = n,
        scabbard.step.label = %label,
        scabbard.exit_code = tracing::field::Empty,
    )
}

/// Records how the attempt ended on its span.
pub(crate) fn record_outcome(span: &Span, outcome: proto::Outcome) {
    if span.is_none() {
        return;
    }
    span.record("scabbard.outcome", outcome.as_str_name());
    if outcome != proto::Outcome::Succeeded {
        span.record("otel.status_code", "ERROR");
    }
}
