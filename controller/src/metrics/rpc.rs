//! A tower layer timing every gRPC call the controller serves, into
//! `scabbard_rpc_duration_seconds{method, code}`. The clock stops when the response body
//! ends (streams: when the stream ends) or is dropped; the code is read from the trailers,
//! or from the headers of a trailers-only response, and is `CANCELLED` for a response the
//! client walked away from. Each distinct path is interned once (at most [`MAX_METHODS`],
//! later ones count as `other`) with its `OK` histogram resolved, so a successful call
//! records with one read-locked map lookup and atomics; other codes look their histogram
//! up in the family.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{LazyLock, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::metrics::histogram::Histogram;
use tonic::body::Body;
use tonic::codegen::http;
use tower::{Layer, Service};

use super::registry::{METRICS, RpcLabels};

/// Distinct method paths given their own label.
const MAX_METHODS: usize = 256;

/// One interned method: its label and its `OK` histogram.
struct Method {
    name: &'static str,
    ok: Histogram,
}

static METHODS: LazyLock<RwLock<HashMap<Box<str>, &'static Method>>> =
    LazyLock::new(|| RwLock::new(HashMap::new()));

static OTHER: LazyLock<Method> = LazyLock::new(|| Method::new("other"));

impl Method {
    fn new(name: &'static str) -> Self {
        let ok = METRICS
            .rpc
            .get_or_create(&RpcLabels {
                method: name,
                code: "OK",
            })
            .clone();
        Self { name, ok }
    }
}

/// The method of a request path (`/pkg.Service/Method` → `pkg.Service/Method`).
fn method(path: &str) -> &'static Method {
    if let Some(m) = METHODS.read().unwrap_or_else(|e| e.into_inner()).get(path) {
        return m;
    }
    let mut map = METHODS.write().unwrap_or_else(|e| e.into_inner());
    if let Some(m) = map.get(path) {
        return m;
    }
    if map.len() >= MAX_METHODS {
        return &OTHER;
    }
    let name: &'static str = Box::leak(path.trim_start_matches('/').into());
    let m: &'static Method = Box::leak(Box::new(Method::new(name)));
    map.insert(path.into(), m);
    m
}

/// The name of a `grpc-status` value.
fn code_name(v: &[u8]) -> &'static str {
    let code = std::str::from_utf8(v)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Unknown, tonic::Code::from_i32);
    scabbard_common::error::code_name(code)
}

fn status_of(headers: &http::HeaderMap) -> Option<&'static str> {
    headers.get("grpc-status").map(|v| code_name(v.as_bytes()))
}

/// Tower layer recording `scabbard_rpc_duration_seconds`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcMetricsLayer;

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

/// The service [`RpcMetricsLayer`] wraps around the gRPC services.
#[derive(Clone, Debug)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for RpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let mut call = Call {
            start: Instant::now(),
            method: method(req.uri().path()),
            code: None,
            done: false,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            call.code = status_of(resp.headers());
            let (parts, body) = resp.into_parts();
            Ok(http::Response::from_parts(
                parts,
                Body::new(Timed { inner: body, call }),
            ))
        })
    }
}

/// One call being timed; observed once, when the body ends or is dropped.
struct Call {
    start: Instant,
    method: &'static Method,
    code: Option<&'static str>,
    done: bool,
}

impl Call {
    fn finish(&mut self, default: &'static str) {
        if self.done {
            return;
        }
        self.done = true;
        let took = self.start.elapsed().as_secs_f64();
        match self.code.unwrap_or(default) {
            "OK" => self.method.ok.observe(took),
            code => METRICS
                .rpc
                .get_or_create(&RpcLabels {
                    method: self.method.name,
                    code,
                })
                .observe(took),
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish("CANCELLED");
    }
}

/// A response body that stops its call's clock.
struct Timed {
    inner: Body,
    call: Call,
}

impl HttpBody for Timed {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    if let Some(code) = status_of(t) {
                        this.call.code = Some(code);
                    }
                    this.call.finish("OK");
                }
            }
            Poll::Ready(Some(Err(_))) => this.call.finish("INTERNAL"),
            Poll::Ready(None) => this.call.finish("OK"),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_methods_and_codes() {
        let m = method("/scabbard.v1.TaskService/Submit");
        assert_eq!(m.name, "scabbard.v1.TaskService/Submit");
        assert!(std::ptr::eq(m, method("/scabbard.v1.TaskService/Submit")));
        assert_eq!(code_name(b"5"), "NOT_FOUND");
        assert_eq!(code_name(b"x"), "UNKNOWN");
    }
}
