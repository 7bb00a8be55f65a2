//! The tower layer giving every gRPC call a server span (when tracing is on), named and
//! described after the OpenTelemetry RPC conventions: `rpc.system=grpc`, `rpc.service`,
//! `rpc.method`, `rpc.grpc.status_code`, kind server, span name `service/method`. Its
//! parent is the caller's `traceparent` (and `tracestate`) metadata. The handler runs
//! inside the span, so what it stores (a task's trace context) and logs follows it.
//!
//! With tracing off the layer only forwards the call (one relaxed atomic load). Health
//! checks are never traced. A streaming call's span ends with its response headers, not
//! with the stream.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::Either;
use scabbard_common::telemetry;
use tonic::codegen::http;
use tower::{Layer, Service};
use tracing::Instrument;

/// Adds a server span per call.
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcTraceLayer;

impl<S> Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTrace { inner }
    }
}

/// The service made by [`RpcTraceLayer`].
#[derive(Clone, Debug)]
pub struct RpcTrace<S> {
    inner: S,
}

type Traced<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, RB: 'static> Service<http::Request<B>> for RpcTrace<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Traced<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !telemetry::enabled() {
            return Either::Left(self.inner.call(req));
        }
        let path = req.uri().path();
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .unwrap_or(("unknown", path));
        if service == "grpc.health.v1.Health" {
            return Either::Left(self.inner.call(req));
        }
        let span = tracing::info_span!(
            "rpc",
            otel.name = %format_args!("{service}/{method}"),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        if let Some(tp) = telemetry::context::from_headers(req.headers()) {
            telemetry::context::set_parent(&span, &tp);
        }
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        let in_span = span.clone();
        Either::Right(Box::pin(
            async move {
                let r = fut.await;
                let code = match &r {
                    // Errors are trailers-only responses: the status is in the headers;
                    // otherwise it comes in the trailers, after a successful start.
                    Ok(resp) => resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i64>().ok())
                        .unwrap_or(0),
                    Err(_) => 13,
                };
                in_span.record("rpc.grpc.status_code", code);
                if is_server_error(code) {
                    in_span.record("otel.status_code", "ERROR");
                }
                r
            }
            .instrument(span),
        ))
    }
}

/// The codes that mark a server span as failed (OTel gRPC conventions: the server's
/// fault, not the caller's).
fn is_server_error(code: i64) -> bool {
    // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}
