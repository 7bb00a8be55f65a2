//! Client side of `ArtifactService`, shared by the worker (inputs, uploads), the CLI
//! (`scabbard artifacts get`) and the benchmark:
//!
//! * [`download_artifact`]: streams an artifact into a sink, resuming at the byte it got
//!   to when the stream drops, and checks size and SHA-256 against the artifact's ref;
//! * [`upload_artifact`]: sends a packed archive (header, then 1 MiB chunks) and returns
//!   the ref the controller recorded.
//!
//! Both take the generated client over any transport and an optional bearer token added to
//! every call (for channels that do not carry one).

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::codegen::{Body, Bytes, StdError};

use crate::artifact::Sha256;
use crate::backoff::Backoff;
use crate::proto::artifact_service_client::ArtifactServiceClient;
use crate::proto::{
    ArtifactRef, ArtifactUploadHeader, DownloadArtifactRequest, UploadArtifactRequest,
    download_artifact_response, upload_artifact_request,
};
use crate::{Error, Result};

/// Bytes of data per upload message (the protocol's chunk size).
pub const CHUNK_BYTES: usize = 1 << 20;

/// Times a download is resumed after its stream dropped, before giving up.
pub const DOWNLOAD_RESUMES: u32 = 5;

/// Whether a failed call or stream may be resumed (the connection, not the request, failed).
fn resumable(s: &tonic::Status) -> bool {
    use tonic::Code::*;
    matches!(
        s.code(),
        Unavailable | Unknown | Cancelled | DeadlineExceeded | Aborted | Internal
    ) && crate::error::leader_hint(s).is_none()
}

/// Downloads the artifact `req` names (from `req.offset`, normally 0) into `sink`,
/// resuming where it got to when the stream drops (up to [`DOWNLOAD_RESUMES`] times), and
/// checks the bytes against the artifact's ref: their count, and their SHA-256 when the
/// download started at 0. Returns the ref. `sink` gets exactly the archive's bytes from
/// `req.offset` on; on an error it may hold part of them (the caller deletes them).
///
/// Errors: the service's (`NOT_FOUND`, `PERMISSION_DENIED`, …) as they come; a size or
/// digest that does not match → `INTERNAL` naming both values.
pub async fn download_artifact<T, W>(
    client: &mut ArtifactServiceClient<T>,
    token: Option<&str>,
    req: DownloadArtifactRequest,
    sink: &mut W,
) -> Result<ArtifactRef>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
    W: AsyncWrite + Unpin + ?Sized,
{
    let start = req.offset;
    let what = format!("artifact {:?} of task {}", req.name, req.task_id);
    let mut hasher = (start == 0).then(Sha256::default);
    let mut offset = start;
    let mut artifact: Option<ArtifactRef> = None;
    let mut interruptions = 0u32;
    let backoff = Backoff::default();
    loop {
        let call = DownloadArtifactRequest {
            offset,
            ..req.clone()
        };
        let outcome: std::result::Result<(), Fail> = async {
            let mut stream = client
                .download(
                    crate::client::with_token(tonic::Request::new(call), token)
                        .map_err(Fail::Fatal)?,
                )
                .await?
                .into_inner();
            while let Some(msg) = stream.message().await? {
                match msg.part {
                    Some(download_artifact_response::Part::Artifact(a)) => {
                        if let Some(first) = &artifact
                            && (first.sha256 != a.sha256 || first.size != a.size)
                        {
                            return Err(Fail::Fatal(Error::internal(format!(
                                "{what} changed while it was downloaded (sha256 {} → {})",
                                first.sha256, a.sha256
                            ))));
                        }
                        artifact = Some(a);
                    }
                    Some(download_artifact_response::Part::Data(d)) => {
                        let Some(a) = &artifact else {
                            return Err(Fail::Fatal(Error::internal(format!(
                                "{what}: data came before the artifact's ref"
                            ))));
                        };
                        if offset + d.len() as u64 > a.size {
                            return Err(Fail::Fatal(Error::internal(format!(
                                "{what}: more than the {} bytes its ref announces",
                                a.size
                            ))));
                        }
                        if let Some(h) = hasher.as_mut() {
                            h.update(&d);
                        }
                        sink.write_all(&d).await.map_err(|e| {
                            Fail::Fatal(Error::internal(format!(
                                "{what}: writing what was downloaded: {e}"
                            )))
                        })?;
                        offset += d.len() as u64;
                    }
                    None => {}
                }
            }
            Ok(())
        }
        .await;
        let why = match outcome {
            Ok(()) if artifact.as_ref().is_some_and(|a| offset == a.size) => break,
            // The stream ended early (a controller going away may end it cleanly).
            Ok(()) => "the stream ended early".to_string(),
            Err(Fail::Fatal(e)) => return Err(e),
            Err(Fail::Status(s)) if !resumable(&s) => return Err(s.into()),
            Err(Fail::Status(s)) => s.message().to_string(),
        };
        interruptions += 1;
        if interruptions > DOWNLOAD_RESUMES {
            return Err(Error::Unavailable(format!(
                "{what}: the download broke {interruptions} times, last at byte {offset}: {why}"
            )));
        }
        tracing::info!(%what, offset, interruptions, %why, "artifact download interrupted; resuming");
        tokio::time::sleep(backoff.delay(interruptions).min(Duration::from_secs(5))).await;
    }
    sink.flush()
        .await
        .map_err(|e| Error::internal(format!("{what}: writing what was downloaded: {e}")))?;
    let artifact = artifact.ok_or_else(|| Error::internal(format!("{what}: no ref received")))?;
    if let Some(h) = hasher {
        let digest = h.finish();
        if digest != artifact.sha256 {
            return Err(Error::internal(format!(
                "{what}: the downloaded bytes have SHA-256 {digest}, the artifact's ref says {}",
                artifact.sha256
            )));
        }
    }
    Ok(artifact)
}

/// Why one download call stopped.
enum Fail {
    /// The call or its stream failed (maybe resumable).
    Status(tonic::Status),
    /// Not worth resuming.
    Fatal(Error),
}

impl From<tonic::Status> for Fail {
    fn from(s: tonic::Status) -> Self {
        Fail::Status(s)
    }
}

/// Uploads the packed archive at `archive` as artifact `header.name` of an attempt
/// (`header.size` and `header.sha256` must describe the file: the controller refuses the
/// upload otherwise). Returns the ref the controller recorded.
pub async fn upload_artifact<T>(
    client: &mut ArtifactServiceClient<T>,
    token: Option<&str>,
    header: ArtifactUploadHeader,
    archive: &Path,
) -> Result<ArtifactRef>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let mut file = tokio::fs::File::open(archive)
        .await
        .map_err(|e| Error::internal(format!("opening {}: {e}", archive.display())))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<UploadArtifactRequest>(4);
    let path = archive.to_path_buf();
    let reader = tokio::spawn(async move {
        let first = UploadArtifactRequest {
            part: Some(upload_artifact_request::Part::Header(header)),
        };
        if tx.send(first).await.is_err() {
            return Ok(());
        }
        loop {
            let mut buf = vec![0u8; CHUNK_BYTES];
            let mut n = 0;
            while n < buf.len() {
                let got = file.read(&mut buf[n..]).await?;
                if got == 0 {
                    break;
                }
                n += got;
            }
            if n == 0 {
                return Ok(());
            }
            buf.truncate(n);
            let msg = UploadArtifactRequest {
                part: Some(upload_artifact_request::Part::Data(buf)),
            };
            if tx.send(msg).await.is_err() {
                return Ok(()); // the call ended (refused); its status says why
            }
        }
    });
    let sent = client
        .upload(crate::client::with_token(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            token,
        )?)
        .await;
    let read: std::io::Result<()> = reader
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // A file that could not be read explains a refused upload better than the refusal.
    read.map_err(|e| Error::internal(format!("reading {}: {e}", path.display())))?;
    Ok(sent?.into_inner())
}
