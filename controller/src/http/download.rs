//! `GET /api/v1/artifacts/{id}/content`: an artifact's packed archive (tar + zstd) as the
//! response body, streamed from the in-process `ArtifactService.Download` (so the same
//! token, scope and project rules as gRPC). `{id}` is `<task id>:<artifact name>` or
//! `<task id>/<artifact name>` (the `/` percent-encoded as `%2F`), or a task id with the
//! `name` query parameter. A call refused before its first byte is the JSON error; one that
//! fails later cuts the body short of its `Content-Length`, so clients see a failed
//! download, never a silently short file.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use scabbard_common::proto as pb;
use scabbard_common::proto::download_artifact_response::Part;
use tonic::Code;

use super::HttpState;
use super::error::{call_failed, error};
use super::routes::path_params;
use super::sse::open;

/// The route's path template.
pub(crate) const PATH: &str = "/api/v1/artifacts/{id}/content";

/// What the OpenAPI document says about the route.
pub(crate) const SUMMARY: &str = "Download an artifact's packed archive (tar + zstd) as application/octet-stream, with Content-Disposition: attachment and Content-Length. {id} is <task id>:<artifact name> (or <task id>%2F<artifact name>, or a task id with ?name=). Same rules as gRPC ArtifactService.Download: read scope, the task's project.";

/// Splits `{id}` (and `?name=`) into the task id and the artifact name.
#[allow(clippy::result_large_err)]
fn target(uri: &Uri) -> Result<(String, String), Response> {
    let id = path_params(PATH, uri.path())
        .into_iter()
        .find(|(n, _)| n == "id")
        .map(|(_, v)| v)
        .unwrap_or_default();
    let mut name = None;
    for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "name" => name = Some(v.into_owned()),
            super::routes::CACHE_BUSTER => {}
            other => {
                return Err(error(
                    Code::InvalidArgument,
                    format!("unknown query parameter {other:?} (this route takes name)"),
                ));
            }
        }
    }
    let split = id.split_once(':').or_else(|| id.split_once('/'));
    match (split, name) {
        (Some((task, n)), None) => Ok((task.to_string(), n.to_string())),
        (None, Some(n)) => Ok((id, n)),
        (Some(_), Some(_)) => Err(error(
            Code::InvalidArgument,
            "give the artifact name once: in the id (<task id>:<name>) or as ?name=",
        )),
        // No name: the service answers (authentication first), see [`content`].
        (None, None) => Ok((id, String::new())),
    }
}

/// A file name safe in a `Content-Disposition` header: the artifact name with anything
/// but letters, digits, `.`, `_` and `-` replaced, plus the archive's extension.
pub(crate) fn file_name(task_id: &str, name: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect::<String>()
            .trim_start_matches('.')
            .to_string()
    };
    let stem = clean(name);
    let stem = if stem.is_empty() {
        clean(task_id)
    } else {
        stem
    };
    format!("{stem}.tar.zst")
}

/// The handler.
pub(crate) async fn content(
    State(st): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let (task_id, name) = match target(&uri) {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let req = pb::DownloadArtifactRequest {
        task_id: task_id.clone(),
        name: name.clone(),
        ..Default::default()
    };
    let rpc = "/scabbard.v1.ArtifactService/Download";
    let mut stream = match open::<_, pb::DownloadArtifactResponse>(&st, &headers, peer, rpc, req)
        .await
    {
        Ok(s) => s,
        Err(status) if status.code() == Code::InvalidArgument && name.is_empty() => {
            return error(
                Code::InvalidArgument,
                format!(
                    "artifact id {task_id:?} must be <task id>:<artifact name> (or a task id with ?name=<artifact name>)"
                ),
            );
        }
        Err(status) => return call_failed(&st, &uri, status).await,
    };
    // The first message is the artifact's ref: errors up to here are JSON.
    let artifact = match stream.message().await {
        Ok(Some(pb::DownloadArtifactResponse {
            part: Some(Part::Artifact(a)),
        })) => a,
        Ok(_) => {
            return error(
                Code::Internal,
                "the download did not start with the artifact's ref",
            );
        }
        Err(status) => return call_failed(&st, &uri, status).await,
    };
    let body = futures::stream::unfold(Some(stream), |s| async move {
        let mut s = s?;
        match s.message().await {
            Ok(Some(pb::DownloadArtifactResponse {
                part: Some(Part::Data(d)),
            })) => Some((Ok(bytes::Bytes::from(d)), Some(s))),
            Ok(Some(_)) => Some((
                Err(std::io::Error::other("unexpected message in the download")),
                None,
            )),
            Ok(None) => None,
            Err(status) => Some((
                Err(std::io::Error::other(format!(
                    "the download failed: {}",
                    status.message()
                ))),
                None,
            )),
        }
    })
    .boxed();
    let mut resp = Body::from_stream(body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{}\"",
        file_name(&task_id, &name)
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if artifact.size > 0 {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(artifact.size));
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"sha256:{}\"", artifact.sha256)) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_file_names() {
        let t = |s: &str| target(&s.parse::<Uri>().unwrap()).map_err(|r| r.status().as_u16());
        let want = Ok(("01abc".to_string(), "dist".to_string()));
        assert_eq!(t("/api/v1/artifacts/01abc:dist/content"), want);
        assert_eq!(t("/api/v1/artifacts/01abc%2Fdist/content"), want);
        assert_eq!(t("/api/v1/artifacts/01abc/content?name=dist&_=1"), want);
        let no_name = Ok(("01abc".to_string(), String::new()));
        assert_eq!(t("/api/v1/artifacts/01abc/content"), no_name);
        assert_eq!(t("/api/v1/artifacts/01abc/content?nam=dist"), Err(400));
        assert_eq!(file_name("t", "dist"), "dist.tar.zst");
        assert_eq!(file_name("t", "a\"b;c\r\n"), "a_b_c__.tar.zst");
        assert_eq!(file_name("t1", "..."), "t1.tar.zst");
    }
}
