//! The session's GraphQL endpoint: HTTP/1.1 on 127.0.0.1, `POST /query` with Basic auth
//! `<token>:` (401 otherwise), a JSON body `{"query": …}`. Each query is resolved on a
//! blocking thread (the resolvers copy trees and wait for execs). At most
//! [`MAX_CONNECTIONS`] connections are served at once. On shutdown the listener closes,
//! running execs are killed (they watch the same token) and open connections get
//! [`DRAIN`] to finish.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::query;
use crate::resolve;

/// Connections served at once.
const MAX_CONNECTIONS: usize = 64;
/// Largest request body.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// How long open connections may take to finish after shutdown.
pub(crate) const DRAIN: Duration = Duration::from_secs(3);

/// Serves `listener` until `shutdown` fires, then drains.
pub(crate) async fn serve(
    listener: TcpListener,
    engine: Arc<Engine>,
    token: String,
    shutdown: CancellationToken,
) {
    let token = Arc::new(token);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let acquired = tokio::select! {
            () = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => p,
        };
        let Ok(permit) = acquired else {
            break;
        };
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    engine.progress(&format!("fake engine: accept failed: {e}"));
                    continue;
                }
            },
        };
        let engine = engine.clone();
        let token = token.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| handle(req, engine.clone(), token.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN, conn).await;
                }
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN + Duration::from_millis(500), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}

fn reply(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    if let Ok(v) = "application/json".parse() {
        r.headers_mut().insert("content-type", v);
    }
    r
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    reply(
        status,
        &json!({ "data": null, "errors": [{ "message": message }] }),
    )
}

/// Whether the request carries Basic `<token>:` (standard or URL-safe base64).
fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    let Some(encoded) = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    else {
        return false;
    };
    let want = format!("{token}:");
    [
        base64::engine::general_purpose::STANDARD.decode(encoded.trim()),
        base64::engine::general_purpose::URL_SAFE.decode(encoded.trim()),
    ]
    .into_iter()
    .flatten()
    .any(|decoded| decoded == want.as_bytes())
}

async fn handle(
    req: Request<Incoming>,
    engine: Arc<Engine>,
    token: Arc<String>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/query" {
        return Ok(error(
            StatusCode::NOT_FOUND,
            "fake engine: only /query is served",
        ));
    }
    if req.method() != Method::POST {
        return Ok(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "fake engine: POST /query",
        ));
    }
    if !authorized(&req, &token) {
        return Ok(error(
            StatusCode::UNAUTHORIZED,
            "fake engine: unauthorized (Basic auth with the session token)",
        ));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                &format!("fake engine: reading the request: {e}"),
            ));
        }
    };
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                &format!("fake engine: the body is not JSON: {e}"),
            ));
        }
    };
    let Some(text) = request.get("query").and_then(Value::as_str) else {
        return Ok(error(
            StatusCode::BAD_REQUEST,
            "fake engine: no query in the body",
        ));
    };
    let has_variables = match request.get("variables") {
        None | Some(Value::Null) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(_) => true,
    };
    if has_variables {
        return Ok(error(
            StatusCode::OK,
            "fake engine: query variables are not supported",
        ));
    }
    let selections = match query::parse(text) {
        Ok(s) => s,
        Err(e) => return Ok(error(StatusCode::OK, &e.to_string())),
    };
    let answer = tokio::task::spawn_blocking(move || resolve::execute(&engine, &selections)).await;
    Ok(match answer {
        Ok(body) => reply(StatusCode::OK, &body),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("fake engine: the resolver failed: {e}"),
        ),
    })
}
