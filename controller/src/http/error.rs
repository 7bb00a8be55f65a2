//! gRPC `Status` → HTTP: a JSON body `{"code": "<GRPC_CODE_NAME>", "message": "..."}` (plus
//! `retryAfterMs` / `leader` when the status carries them) with the matching HTTP status.
//! `FAILED_PRECONDITION` is 400, as in Google's HTTP mapping (the body's `code` tells it
//! apart from `INVALID_ARGUMENT`). A redirect from a follower that cannot forward becomes
//! `307` to the leader's HTTP address when the leader published one, else `503`.

use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tonic::{Code, Status};

pub(crate) use scabbard_common::error::code_name;

/// The HTTP status of a gRPC code.
pub(crate) fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The JSON error response of `status` (no redirect handling).
pub(crate) fn status_response(status: &Status) -> Response {
    let mut body = json!({
        "code": code_name(status.code()),
        "message": status.message(),
    });
    let retry = scabbard_common::error::retry_after(status);
    if let Some(d) = retry {
        body["retryAfterMs"] = json!(d.as_millis().to_string());
    }
    if let Some(l) = scabbard_common::error::leader_hint(status) {
        body["leader"] = json!(l);
    }
    let mut resp = (http_status(status.code()), axum::Json(body)).into_response();
    if status.code() == Code::ResourceExhausted {
        // Whole seconds, rounded up (at least 1).
        let secs = retry.map_or(1, |d| d.as_millis().div_ceil(1000).max(1));
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    resp
}

/// A JSON error with a code and message made here (bad JSON, unknown route).
pub(crate) fn error(code: Code, message: impl Into<String>) -> Response {
    status_response(&Status::new(code, message.into()))
}

/// The response for a failed call: a 307 to the leader's HTTP API when this follower could
/// not forward and the leader published its HTTP address, else the JSON error.
pub(crate) async fn call_failed(state: &super::HttpState, uri: &Uri, status: Status) -> Response {
    if let Some(leader) = scabbard_common::error::leader_hint(&status)
        && let Some(base) = state.leader_http(&leader).await
    {
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let location = format!("{}{path}", base.trim_end_matches('/'));
        if let Ok(v) = HeaderValue::from_str(&location) {
            let mut resp = status_response(&status);
            *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            resp.headers_mut().insert(header::LOCATION, v);
            return resp;
        }
    }
    status_response(&status)
}

/// Unknown routes.
pub(crate) async fn not_found(uri: Uri) -> Response {
    let hint = if uri.path() == "/" {
        " (the HTTP API is under /api/v1; its OpenAPI document is /api/v1/openapi.json)"
    } else {
        " (see /api/v1/openapi.json for the routes)"
    };
    error(Code::NotFound, format!("no route {}{hint}", uri.path()))
}

/// Turns the framework's own plain-text errors (405 for a method a route lacks, 413 for a
/// body over `max_message_bytes`) into the JSON error shape; JSON and non-error responses
/// pass untouched.
pub(crate) async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.as_u16() < 400 || json {
        return resp;
    }
    let (code, what) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (Code::Unimplemented, "method not allowed on this route"),
        StatusCode::PAYLOAD_TOO_LARGE => (
            Code::InvalidArgument,
            "request body larger than the controller's max_message_bytes",
        ),
        _ => (Code::InvalidArgument, "bad request"),
    };
    let text = axum::body::to_bytes(resp.into_body(), 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        what.to_string()
    } else {
        format!("{what}: {text}")
    };
    let mut out = error(code, message);
    *out.status_mut() = status;
    out
}
