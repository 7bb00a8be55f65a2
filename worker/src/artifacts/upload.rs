//! Uploading one packed artifact to the controller's artifact store
//! (`ArtifactService.Upload`: the header, then the archive in chunks of about 1 MiB) to
//! whichever controller leads now. A dropped stream, an unreachable or restarting controller
//! or a redirect is retried from the first byte, with jittered backoff, for as long as it
//! takes (the attempt is not finished before its artifacts are stored); a refusal is final,
//! and so is a cancel.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use scabbard_common::Error;
use scabbard_common::backoff::Backoff;
use scabbard_common::client::is_transient_status;
use scabbard_common::proto::{
    ArtifactRef, ArtifactUploadHeader, UploadArtifactRequest, upload_artifact_request::Part,
};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::link::ControllerLink;

/// Bytes per data message: 1 MiB, less a little so a message with its framing stays under
/// a 1 MiB message limit.
const CHUNK: usize = (1 << 20) - 1024;

/// Why an upload did not store the artifact.
#[derive(Debug)]
pub(crate) enum UploadError {
    /// The controller refused it for good (the message is the controller's).
    Refused(tonic::Status),
    /// The archive could not be read.
    Local(Error),
    /// The attempt was cancelled.
    Cancelled,
}

/// Uploads `archive` under `header` until it is stored, refused, or `cancel` fires.
/// `on_retry` hears about each failed try (for the attempt's log).
pub(crate) async fn upload(
    link: &ControllerLink,
    header: &ArtifactUploadHeader,
    archive: &Path,
    backoff: &Backoff,
    cancel: &CancellationToken,
    mut on_retry: impl FnMut(u32, &str),
) -> Result<ArtifactRef, UploadError> {
    let mut failures = 0u32;
    loop {
        let tried = tokio::select! {
            r = try_once(link, header, archive) => r,
            () = cancel.cancelled() => return Err(UploadError::Cancelled),
        };
        let wait = match tried {
            Ok(r) => return Ok(r),
            Err(Try::Local(e)) => return Err(UploadError::Local(e)),
            Err(Try::Connect(e)) => {
                link.failed(&e);
                failures += 1;
                on_retry(failures, &e.to_string());
                backoff.delay(failures - 1)
            }
            Err(Try::Status(s))
                if is_transient_status(&s) || s.code() == tonic::Code::Unauthenticated =>
            {
                // An agent token refused now may be a re-registration in progress: the
                // connection sets the new one.
                let hint = scabbard_common::error::retry_after(&s);
                let e = Error::from(s);
                link.failed(&e);
                failures += 1;
                on_retry(failures, &e.to_string());
                hint.unwrap_or_else(|| backoff.delay(failures - 1))
            }
            Err(Try::Status(s)) => return Err(UploadError::Refused(s)),
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => return Err(UploadError::Cancelled),
        }
    }
}

/// How one try failed.
enum Try {
    /// No client could be made (no token yet, controller unreachable).
    Connect(Error),
    /// The call failed.
    Status(tonic::Status),
    /// Reading the archive failed.
    Local(Error),
}

async fn try_once(
    link: &ControllerLink,
    header: &ArtifactUploadHeader,
    archive: &Path,
) -> Result<ArtifactRef, Try> {
    let mut client = link.artifacts().await.map_err(Try::Connect)?;
    let file = tokio::fs::File::open(archive).await.map_err(|e| {
        Try::Local(Error::internal(format!(
            "cannot open the archive {}: {e}",
            archive.display()
        )))
    })?;
    let read_error: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
    let requests = body(header.clone(), file, read_error.clone());
    let result = client.upload(requests).await;
    if let Some(e) = read_error
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    {
        return Err(Try::Local(Error::internal(format!(
            "cannot read the archive {}: {e}",
            archive.display()
        ))));
    }
    result.map(tonic::Response::into_inner).map_err(Try::Status)
}

/// The request stream: the header, then the file in chunks. A read error ends the stream
/// early and is left in `read_error`.
fn body(
    header: ArtifactUploadHeader,
    file: tokio::fs::File,
    read_error: Arc<Mutex<Option<std::io::Error>>>,
) -> impl futures::Stream<Item = UploadArtifactRequest> + Send + 'static {
    let start = UploadArtifactRequest {
        part: Some(Part::Header(header)),
    };
    let data = futures::stream::unfold(Some(file), move |file| {
        let read_error = read_error.clone();
        async move {
            let mut file = file?;
            let mut buf = Vec::with_capacity(CHUNK);
            let read = (&mut file).take(CHUNK as u64).read_to_end(&mut buf).await;
            match read {
                Ok(0) => None,
                Ok(_) => Some((
                    UploadArtifactRequest {
                        part: Some(Part::Data(buf)),
                    },
                    Some(file),
                )),
                Err(e) => {
                    *read_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                    None
                }
            }
        }
    });
    futures::StreamExt::chain(futures::stream::iter([start]), data)
}
