//! The `/metrics` HTTP endpoint shared by the controller and the worker: plain HTTP/1.1,
//! `GET /metrics` only, in the Prometheus text format (0.0.4) — or OpenMetrics 1.0 when
//! the scraper's `Accept` asks for it — rendered from `prometheus-client` registries. No
//! authentication: bind it to an address only your monitoring can reach.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The exposition format a scrape asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4 (the default; `promtool check metrics`).
    Prometheus,
    /// OpenMetrics 1.0 text (`Accept: application/openmetrics-text`).
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header value asks for.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Encodes `registries` one after the other as one exposition (metric names must not
/// repeat across them).
pub fn encode(format: Format, registries: &[&Registry]) -> String {
    let mut out = String::with_capacity(16 * 1024);
    for r in registries {
        // Writing into a String cannot fail.
        let _ = match format {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::encode(&mut out, r),
            Format::OpenMetrics => prometheus_client::encoding::text::encode_registry(&mut out, r),
        };
    }
    if format == Format::OpenMetrics {
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
    }
    out
}

/// Serves `GET /metrics` on every connection `incoming` yields until `shutdown`;
/// `render` produces the body of each scrape.
pub async fn serve<S, IO, R, Fut>(incoming: S, render: R, shutdown: CancellationToken)
where
    S: Stream<Item = io::Result<IO>> + Send,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    R: Fn(Format) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let render = Arc::new(render);
    tokio::pin!(incoming);
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = incoming.next() => match r {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    warn!(error = %e, "metrics listener: accept failed");
                    continue;
                }
                None => return,
            },
        };
        let render = render.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(respond(&req, &*render).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    debug!(error = %e, "metrics connection ended");
                },
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

async fn respond<R, Fut>(req: &Request<hyper::body::Incoming>, render: &R) -> Response<Full<Bytes>>
where
    R: Fn(Format) -> Fut,
    Fut: Future<Output = String>,
{
    if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".into(),
        );
    }
    let format = Format::from_accept(
        req.headers()
            .get(hyper::header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let body = render(format).await;
    reply(StatusCode::OK, format.content_type(), body)
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

/// Serves on a plain TCP listener (no connection limits): the worker's endpoint.
pub async fn serve_listener<R, Fut>(
    listener: tokio::net::TcpListener,
    render: R,
    shutdown: CancellationToken,
) where
    R: Fn(Format) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let incoming = futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    });
    serve(incoming, render, shutdown).await
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn encodes_both_formats() {
        let mut r = Registry::default();
        let c: Counter = Counter::default();
        r.register("scabbard_things", "Things.", c.clone());
        c.inc();
        let text = encode(Format::Prometheus, &[&r]);
        assert!(text.contains("# TYPE scabbard_things_total counter\nscabbard_things_total 1\n"));
        let om = encode(Format::OpenMetrics, &[&r]);
        assert!(om.ends_with("# EOF\n"));
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(None), Format::Prometheus);
    }
}
