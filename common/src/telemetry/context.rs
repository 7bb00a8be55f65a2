//! W3C trace context (`traceparent`, `tracestate`): reading it from and writing it to gRPC
//! metadata and environment variables, deriving children with stable span ids, and
//! emitting spans whose start and end are known only afterwards (the controller's task,
//! attempt and workflow spans, which live longer than any process's stack).
//!
//! Stable ids: a span the controller emits late (when a task finishes) must already be
//! the parent of spans made while it ran (the worker's, a retry's). Its span id is a hash
//! of what it stands for ([`stable_span_id`]: e.g. `attempt`, task id, number), so every
//! controller (after a failover too) names it the same, and nothing extra is stored.

use std::cell::Cell;
use std::collections::HashMap;
use std::time::SystemTime;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceId, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A W3C trace context as carried in messages and records (`tracestate` may be empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceParent {
    /// `00-<trace id>-<parent span id>-<flags>`.
    pub traceparent: String,
    /// Vendor state, passed along untouched.
    pub tracestate: String,
}

/// Length of a version-00 `traceparent`.
const TRACEPARENT_LEN: usize = 55;

impl TraceParent {
    /// `traceparent`/`tracestate` as given; `None` when `traceparent` is empty.
    pub fn new(traceparent: &str, tracestate: &str) -> Option<Self> {
        (!traceparent.is_empty()).then(|| Self {
            traceparent: traceparent.to_string(),
            tracestate: tracestate.to_string(),
        })
    }

    /// The same trace and flags with `span` as the parent span (`None` when
    /// `traceparent` is not a version-00 header).
    pub fn child(&self, span: SpanId) -> Option<Self> {
        let tp = &self.traceparent;
        if tp.len() != TRACEPARENT_LEN || !tp.is_ascii() || !tp.starts_with("00-") {
            return None;
        }
        Some(Self {
            traceparent: format!("{}{span}{}", &tp[..36], &tp[52..]),
            tracestate: self.tracestate.clone(),
        })
    }

    /// The trace id (32 hex digits), if well-formed.
    pub fn trace_id(&self) -> Option<&str> {
        (self.traceparent.len() == TRACEPARENT_LEN).then(|| &self.traceparent[3..35])
    }

    /// As an OpenTelemetry parent context (remote).
    pub fn context(&self) -> Option<Context> {
        let sc = span_context_of(&self.traceparent, &self.tracestate)?;
        Some(Context::new().with_remote_span_context(sc))
    }
}

/// Parses a `traceparent` (and `tracestate`); `None` when it is not valid.
pub fn span_context_of(traceparent: &str, tracestate: &str) -> Option<SpanContext> {
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    if !tracestate.is_empty() {
        carrier.insert("tracestate".to_string(), tracestate.to_string());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The context of `cx`'s span as a [`TraceParent`] (`None` when it has none).
pub fn of_context(cx: &Context) -> Option<TraceParent> {
    let mut carrier = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    let traceparent = carrier.remove("traceparent")?;
    Some(TraceParent {
        traceparent,
        tracestate: carrier.remove("tracestate").unwrap_or_default(),
    })
}

/// The current `tracing` span's trace context; `None` when tracing is off or no span is
/// active.
pub fn current() -> Option<TraceParent> {
    if !super::enabled() {
        return None;
    }
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    of_context(&cx)
}

/// Makes `tp` the parent of `span` (a span just created, not yet entered).
pub fn set_parent(span: &tracing::Span, tp: &TraceParent) {
    if let Some(cx) = tp.context() {
        let _ = span.set_parent(cx);
    }
}

/// Adds the current span's `traceparent` (and `tracestate`) to outgoing gRPC metadata,
/// unless the call already carries one. Does nothing when tracing is off.
pub fn inject_metadata(md: &mut tonic::metadata::MetadataMap) {
    if !super::enabled() || md.contains_key("traceparent") {
        return;
    }
    let Some(tp) = current() else { return };
    if let Ok(v) = tp.traceparent.parse() {
        md.insert("traceparent", v);
    }
    if !tp.tracestate.is_empty()
        && let Ok(v) = tp.tracestate.parse()
    {
        md.insert("tracestate", v);
    }
}

/// The trace context a call arrived with (`traceparent` and `tracestate` headers).
pub fn from_headers(headers: &tonic::codegen::http::HeaderMap) -> Option<TraceParent> {
    let tp = headers.get("traceparent")?.to_str().ok()?;
    let ts = headers
        .get("tracestate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    TraceParent::new(tp, ts)
}

/// The environment a task's process gets: `TRACEPARENT`, and `TRACESTATE` when set.
pub fn traceparent_env(tp: &TraceParent) -> Vec<(&'static str, String)> {
    let mut env = vec![("TRACEPARENT", tp.traceparent.clone())];
    if !tp.tracestate.is_empty() {
        env.push(("TRACESTATE", tp.tracestate.clone()));
    }
    env
}

/// A span id derived from `parts` (SHA-256, first 8 bytes; never the invalid zero id).
pub fn stable_span_id(parts: &[&str]) -> SpanId {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p.as_bytes());
        ctx.update(&[0]);
    }
    let d = ctx.finish();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    if b == [0; 8] {
        b[7] = 1;
    }
    SpanId::from_bytes(b)
}

/// A span to emit after the fact.
pub struct Emit<'a> {
    /// Span name (low cardinality: `scabbard.task`, `scabbard.attempt`, …).
    pub name: &'static str,
    /// Its parent.
    pub parent: &'a TraceParent,
    /// Its own id ([`stable_span_id`]).
    pub span_id: SpanId,
    /// Start and end.
    pub start: SystemTime,
    /// End (not before `start`).
    pub end: SystemTime,
    /// Attributes.
    pub attributes: Vec<KeyValue>,
    /// `Some(message)`: the span's status is an error.
    pub error: Option<String>,
}

thread_local! {
    /// The id the next span built on this thread gets ([`Ids`]).
    static NEXT_SPAN_ID: Cell<Option<SpanId>> = const { Cell::new(None) };
}

/// Random ids, except that the next span id can be fixed for one span ([`emit`]); the
/// SDK's span builder takes no span id.
#[derive(Debug, Default)]
pub(crate) struct Ids(RandomIdGenerator);

impl IdGenerator for Ids {
    fn new_trace_id(&self) -> TraceId {
        self.0.new_trace_id()
    }

    fn new_span_id(&self) -> SpanId {
        NEXT_SPAN_ID.take().unwrap_or_else(|| self.0.new_span_id())
    }
}

/// Exports a finished span with a given id, parent and times. Does nothing when tracing
/// is off or the parent is not a valid context.
pub fn emit(e: Emit<'_>) {
    use opentelemetry::trace::Span as _;
    let Some(tracer) = super::tracer() else {
        return;
    };
    if !super::enabled() {
        return;
    }
    let Some(parent) = e.parent.context() else {
        return;
    };
    let builder = tracer
        .span_builder(e.name)
        .with_kind(SpanKind::Internal)
        .with_start_time(e.start)
        .with_attributes(e.attributes);
    NEXT_SPAN_ID.set(Some(e.span_id));
    let mut span = tracer.build_with_context(builder, &parent);
    // Unused when the span was not sampled before the id was drawn.
    NEXT_SPAN_ID.set(None);
    if let Some(msg) = e.error {
        span.set_status(Status::error(msg));
    } else {
        span.set_status(Status::Ok);
    }
    span.end_with_timestamp(e.end.max(e.start));
}

/// Unix milliseconds as a time (0 and negatives: `fallback`).
pub fn time_of_ms(ms: i64, fallback: SystemTime) -> SystemTime {
    if ms <= 0 {
        return fallback;
    }
    SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_child_keeps_trace_and_flags() {
        let tp = TraceParent::new(TP, "k=v").unwrap();
        let id = stable_span_id(&["attempt", "t1", "1"]);
        let c = tp.child(id).unwrap();
        assert_eq!(
            c.traceparent,
            format!("00-0af7651916cd43dd8448eb211c80319c-{id}-01")
        );
        assert_eq!(c.tracestate, "k=v");
        assert_eq!(c.trace_id(), Some("0af7651916cd43dd8448eb211c80319c"));
        let sc = span_context_of(&c.traceparent, &c.tracestate).unwrap();
        assert_eq!(sc.span_id(), id);
        assert!(sc.is_sampled());
    }

    #[test]
    fn stable_ids_differ_by_part() {
        assert_eq!(stable_span_id(&["a", "b"]), stable_span_id(&["a", "b"]));
        assert_ne!(stable_span_id(&["a", "b"]), stable_span_id(&["ab", ""]));
    }

    #[test]
    fn garbage_is_no_context() {
        assert!(span_context_of("nope", "").is_none());
        assert!(
            TraceParent::new("x", "")
                .unwrap()
                .child(SpanId::from_bytes([1; 8]))
                .is_none()
        );
        assert!(TraceParent::new("", "").is_none());
    }
}
