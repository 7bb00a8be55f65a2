//! A test OTLP/gRPC receiver: the collector's `TraceService/Export` (from
//! `opentelemetry-proto`) on 127.0.0.1:0, keeping every span it receives in memory with
//! the `service.name` of the process that sent it; and checks on the traces collected.
//! [`cluster`]: a traced controller and workers to point at it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use tokio_util::sync::CancellationToken;

pub mod cluster;

/// One span as received.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of its resource.
    pub service: String,
    /// Hex trace id.
    pub trace_id: String,
    /// Hex span id.
    pub span_id: String,
    /// Hex parent span id ("" for a root).
    pub parent_span_id: String,
    /// Span name.
    pub name: String,
    /// Span kind (OTLP numbering: 1 internal, 2 server, 3 client).
    pub kind: i32,
    /// Attributes, values as text.
    pub attributes: BTreeMap<String, String>,
    /// Status code (0 unset, 1 ok, 2 error).
    pub status: i32,
}

impl ReceivedSpan {
    /// An attribute's value ("" when absent).
    pub fn attr(&self, key: &str) -> &str {
        self.attributes.get(key).map_or("", String::as_str)
    }
}

/// The receiver; stops when dropped.
pub struct Receiver {
    /// Where it listens.
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    stop: CancellationToken,
}

#[derive(Clone)]
struct Collect(Arc<Mutex<Vec<ReceivedSpan>>>);

fn text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

#[tonic::async_trait]
impl TraceService for Collect {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in req.into_inner().resource_spans {
            let resource = rs
                .resource
                .map(|r| attrs(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(ReceivedSpan {
                        service: service.clone(),
                        trace_id: hex::encode(&s.trace_id),
                        span_id: hex::encode(&s.span_id),
                        parent_span_id: hex::encode(&s.parent_span_id),
                        name: s.name.clone(),
                        kind: s.kind,
                        attributes: attrs(&s.attributes),
                        status: s.status.as_ref().map_or(0, |st| st.code),
                    });
                }
            }
        }
        self.0.lock().expect("spans lock").extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Starts a receiver on 127.0.0.1:0.
    pub async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let svc = TraceServiceServer::new(Collect(spans.clone()));
        let until = stop.clone();
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, until.cancelled_owned())
                .await;
        });
        Ok(Self { addr, spans, stop })
    }

    /// `http://127.0.0.1:<port>`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().expect("spans lock").clone()
    }

    /// Waits until `done` holds for the spans received (or fails after `timeout`, listing
    /// what came).
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Result<Vec<ReceivedSpan>> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return Ok(spans);
            }
            if tokio::time::Instant::now() > until {
                bail!(
                    "timed out waiting for {what}; received:\n{}",
                    describe(&spans)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One line per span (for failure messages).
pub fn describe(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "  {} {} {}<-{} {:?} {:?}",
                s.service, s.trace_id, s.span_id, s.parent_span_id, s.name, s.attributes
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The spans of trace `trace_id`.
pub fn trace<'a>(spans: &'a [ReceivedSpan], trace_id: &str) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.trace_id == trace_id).collect()
}

/// Checks that `spans` (one trace) form one tree: exactly one root, and every other span's
/// parent is in the trace. Returns the root.
pub fn check_tree<'a>(spans: &[&'a ReceivedSpan]) -> Result<&'a ReceivedSpan> {
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<&&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    let owned: Vec<ReceivedSpan> = spans.iter().map(|s| (*s).clone()).collect();
    if roots.len() != 1 {
        bail!(
            "{} roots in the trace, expected one:\n{}",
            roots.len(),
            describe(&owned)
        );
    }
    for s in spans {
        if !s.parent_span_id.is_empty() && !ids.contains(s.parent_span_id.as_str()) {
            bail!(
                "span {:?} ({}) has parent {} which is not in the trace:\n{}",
                s.name,
                s.service,
                s.parent_span_id,
                describe(&owned)
            );
        }
    }
    Ok(roots[0])
}

/// Whether `ancestor` is `span` or one of its ancestors in `spans`.
pub fn descends_from(spans: &[&ReceivedSpan], span: &ReceivedSpan, ancestor: &str) -> bool {
    let by_id: HashMap<&str, &ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    let mut cur = Some(span);
    let mut hops = 0;
    while let Some(s) = cur {
        if s.span_id == ancestor {
            return true;
        }
        hops += 1;
        if hops > 1000 {
            return false;
        }
        cur = by_id.get(s.parent_span_id.as_str()).copied();
    }
    false
}

/// The trace id in a `traceparent` value.
pub fn trace_id_of(traceparent: &str) -> Result<String> {
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    if parts.len() != 4 || parts[1].len() != 32 {
        return Err(anyhow::anyhow!("not a traceparent: {traceparent:?}"));
    }
    Ok(parts[1].to_string())
}

/// The `TRACEPARENT=<value>` a task printed (the first one in `text`).
pub fn printed_traceparent(text: &str) -> Result<String> {
    let at = text
        .find("TRACEPARENT=")
        .with_context(|| format!("no TRACEPARENT= in {text:?}"))?;
    let rest = &text[at + "TRACEPARENT=".len()..];
    Ok(rest
        .split(|c: char| c.is_whitespace())
        .next()
        .unwrap_or("")
        .to_string())
}
