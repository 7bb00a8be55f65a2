//! Uploading one packed artifact to the controller's artifact store
//! (`ArtifactService.Upload`: the header, then the archive in chunks of about 1 MiB) to
//! whichever controller leads now. A dropped stream, an unreachable or restarting controller
//! or a redirect is retried from the first byte, with jittered backoff, for as long as it
//! takes (the attempt is not finished before its artifacts are stored); a refusal is final,
//! and so is a cancel.

use std::path::Path;

use scabbard_common::Error;
use scabbard_common::backoff::Backoff;
use scabbard_common::client::{UploadFailure, is_transient_status, upload_artifact};
use scabbard_common::proto::{ArtifactRef, ArtifactUploadHeader};
use tokio_util::sync::CancellationToken;

use crate::link::ControllerLink;

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
    upload_artifact(&mut client, header.clone(), archive)
        .await
        .map_err(|f| match f {
            UploadFailure::Status(s) => Try::Status(s),
            UploadFailure::Local(e) => Try::Local(e),
        })
}
