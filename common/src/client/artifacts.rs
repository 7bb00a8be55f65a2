//! Moving one artifact to and from the controller's artifact store, written once for every
//! client (the worker's inputs and outputs, the CLI's `scabbard artifacts get`, the
//! benchmark): [`download_artifact`] (`ArtifactService.Download`) and [`upload_artifact`]
//! (`ArtifactService.Upload`, one try; the worker retries it by its own policy).
//!
//! [`download_artifact`] owns the transfer: it resumes a dropped stream at the byte after the
//! last one it received (with jittered backoff between tries), hashes the archive as it
//! arrives, checks the SHA-256 and the size against the store's [`ArtifactRef`] (and against
//! a digest the caller already expects), and downloads once more from scratch after a
//! mismatch. Where the bytes go is the caller's ([`ArtifactSink`]: a file, memory, …), and so
//! is how to reach the controller: a connect function called before every try, which gets
//! the error that ended the previous one (to follow a leader hint, refresh a token, …).
//!
//! It does not unpack, cache or decide what an error means for a task: its callers do.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use crate::artifact::Sha256;
use crate::backoff::Backoff;
use crate::client::{ArtifactServiceClient, AuthedChannel};
use crate::proto::{ArtifactRef, DownloadArtifactRequest, download_artifact_response::Part};
use crate::{Error, Result};

/// Where a download's bytes go.
pub trait ArtifactSink: Send {
    /// Appends `data` after everything written so far.
    fn write(&mut self, data: &[u8]) -> impl Future<Output = io::Result<()>> + Send;

    /// Forgets everything written so far: the download starts again from byte 0.
    fn restart(&mut self) -> impl Future<Output = io::Result<()>> + Send;

    /// Makes everything written durable enough for the caller to read it back.
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        async { Ok(()) }
    }
}

impl ArtifactSink for Vec<u8> {
    async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.extend_from_slice(data);
        Ok(())
    }

    async fn restart(&mut self) -> io::Result<()> {
        self.clear();
        Ok(())
    }
}

/// A buffered file opened for writing at its start.
impl ArtifactSink for tokio::io::BufWriter<tokio::fs::File> {
    async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_all(data).await
    }

    async fn restart(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.get_mut().restart().await
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.get_mut().finish().await
    }
}

/// A file opened for writing at its start (e.g. `tokio::fs::File::create`).
impl ArtifactSink for tokio::fs::File {
    async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_all(data).await
    }

    async fn restart(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.set_len(0).await?;
        self.seek(io::SeekFrom::Start(0)).await?;
        Ok(())
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.sync_all().await
    }
}

/// How hard [`download_artifact`] tries.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// Tries in a row that bring no new byte before giving up (a try that brought bytes
    /// resets the count).
    pub max_tries: u32,
    /// Delay between tries.
    pub backoff: Backoff,
    /// A stream silent this long is given up and resumed.
    pub idle_timeout: Duration,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self {
            max_tries: 8,
            backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(5),
                ..Backoff::default()
            },
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// What [`download_artifact`] fetched.
#[derive(Debug, Clone, PartialEq)]
pub struct Downloaded {
    /// The store's ref of the artifact (kind, size, digest, producer).
    pub artifact: ArtifactRef,
    /// Bytes received over all tries (more than the size when a stream was resumed at a
    /// byte the store had already sent, or the download was restarted).
    pub received: u64,
    /// Streams that dropped and were resumed.
    pub resumes: u32,
    /// Whole downloads started again after a digest mismatch (0 or 1).
    pub restarts: u32,
}

/// Whether a call that failed with `s` is worth another try: the controller or the
/// connection was unavailable, a redirect to the leader, a stream cut in the middle
/// (surfacing as unknown or internal), a deadline, a lost race, or a rate limit that says
/// when to come back. Refusals (not found, permission denied, invalid, too big,
/// unimplemented, …) are final.
pub fn is_transient_status(s: &tonic::Status) -> bool {
    use tonic::Code;
    match s.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Internal
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Aborted => true,
        Code::ResourceExhausted => crate::error::retry_after(s).is_some(),
        _ => false,
    }
}

/// A failed try, and whether another may succeed.
struct Failure {
    error: Error,
    transient: bool,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Self {
            transient: is_transient_status(&s),
            error: s.into(),
        }
    }
}

impl Failure {
    fn transient(error: Error) -> Self {
        Self {
            error,
            transient: true,
        }
    }

    fn fatal(error: Error) -> Self {
        Self {
            error,
            transient: false,
        }
    }
}

/// Downloads the artifact `req.task_id`/`req.name` (the request's `offset` is ignored:
/// the download starts at 0 and resumes by itself) into `sink`.
///
/// `connect` is called before every try with the error that ended the previous try
/// (`None` the first time) and returns a client carrying the caller's token. When
/// `expected_sha256` is given, a store whose artifact has another digest is refused at
/// once. A digest or size mismatch after the whole archive arrived restarts the sink and
/// downloads once more; a second mismatch is an [`Error::Internal`] naming both digests.
/// A connect error that is [`Error::Unavailable`] or a redirect, and a failed call for
/// which [`is_transient_status`] holds, lead to another try; other errors end the download
/// at once.
pub async fn download_artifact<C, Fut, S>(
    mut connect: C,
    req: &DownloadArtifactRequest,
    expected_sha256: Option<&str>,
    sink: &mut S,
    opts: &DownloadOptions,
) -> Result<Downloaded>
where
    C: FnMut(Option<&Error>) -> Fut,
    Fut: Future<Output = Result<ArtifactServiceClient<AuthedChannel>>>,
    S: ArtifactSink,
{
    let what = format!("artifact {}/{}", req.task_id, req.name);
    let mut progress = Progress::default();
    let mut restarts = 0;
    let mut last_error: Option<Error> = None;
    loop {
        let mut transfer = Transfer {
            hasher: Sha256::default(),
            offset: 0,
            artifact: None,
        };
        let mut failures = 0u32;
        loop {
            let before = progress.received;
            let tried = try_stream(
                &mut connect,
                last_error.as_ref(),
                req,
                expected_sha256,
                &mut transfer,
                sink,
                &mut progress,
                opts,
            )
            .await;
            match tried {
                Ok(()) => break,
                Err(Failure {
                    error: e,
                    transient: true,
                }) => {
                    if progress.received > before {
                        failures = 0;
                    }
                    failures += 1;
                    if failures >= opts.max_tries {
                        return Err(Error::Unavailable(format!(
                            "{what}: gave up after {failures} tries without progress: {e}"
                        )));
                    }
                    if transfer.offset > 0 {
                        progress.resumes += 1;
                    }
                    tokio::time::sleep(opts.backoff.delay(failures - 1)).await;
                    last_error = Some(e);
                }
                Err(Failure { error, .. }) => return Err(error),
            }
        }
        sink.finish()
            .await
            .map_err(|e| Error::internal(format!("{what}: cannot write it: {e}")))?;
        let artifact = transfer.artifact.take().unwrap_or_default();
        let digest = transfer.hasher.finish();
        if digest == artifact.sha256 && transfer.offset == artifact.size {
            return Ok(Downloaded {
                artifact,
                received: progress.received,
                resumes: progress.resumes,
                restarts,
            });
        }
        let mismatch = format!(
            "{what}: received {} bytes with SHA-256 {digest}, the store says {} bytes with SHA-256 {}",
            transfer.offset, artifact.size, artifact.sha256
        );
        if restarts > 0 {
            return Err(Error::Internal(format!(
                "{mismatch} (downloaded twice, from scratch the second time)"
            )));
        }
        tracing::warn!("{mismatch}; downloading it again from scratch");
        restarts += 1;
        sink.restart()
            .await
            .map_err(|e| Error::internal(format!("{what}: cannot restart the download: {e}")))?;
        last_error = None;
    }
}

/// Counters kept across tries.
#[derive(Default)]
struct Progress {
    received: u64,
    resumes: u32,
}

/// One whole download in progress.
struct Transfer {
    hasher: Sha256,
    /// Bytes of the archive written to the sink.
    offset: u64,
    /// The store's ref, from the first stream.
    artifact: Option<ArtifactRef>,
}

/// One stream from `transfer.offset`: `Ok` once the archive is complete (or the store sent
/// more than it announced: the digest check then fails), `Err` when the stream or the
/// connection failed.
#[allow(clippy::too_many_arguments)]
async fn try_stream<C, Fut, S>(
    connect: &mut C,
    last_error: Option<&Error>,
    req: &DownloadArtifactRequest,
    expected_sha256: Option<&str>,
    transfer: &mut Transfer,
    sink: &mut S,
    progress: &mut Progress,
    opts: &DownloadOptions,
) -> std::result::Result<(), Failure>
where
    C: FnMut(Option<&Error>) -> Fut,
    Fut: Future<Output = Result<ArtifactServiceClient<AuthedChannel>>>,
    S: ArtifactSink,
{
    let what = || format!("artifact {}/{}", req.task_id, req.name);
    let mut client = connect(last_error).await.map_err(|e| Failure {
        transient: matches!(e, Error::Unavailable(_) | Error::NotLeader { .. }),
        error: e,
    })?;
    let request = DownloadArtifactRequest {
        offset: transfer.offset,
        ..req.clone()
    };
    let idle = |e| Failure::transient(Error::Unavailable(format!("{}: no data for {e}", what())));
    let call = tokio::time::timeout(opts.idle_timeout, client.download(request))
        .await
        .map_err(|_| idle(format!("{:?}", opts.idle_timeout)))?;
    let mut stream = call?.into_inner();
    let mut first = true;
    loop {
        let msg = tokio::time::timeout(opts.idle_timeout, stream.message())
            .await
            .map_err(|_| idle(format!("{:?}", opts.idle_timeout)))??;
        let Some(msg) = msg else {
            let size = transfer.artifact.as_ref().map_or(0, |a| a.size);
            if transfer.artifact.is_some() && transfer.offset >= size {
                return Ok(());
            }
            return Err(Failure::transient(Error::Unavailable(format!(
                "{}: the stream ended at byte {} of {size}",
                what(),
                transfer.offset
            ))));
        };
        match msg.part {
            Some(Part::Artifact(a)) if first => {
                first = false;
                if let Some(want) = expected_sha256
                    && a.sha256 != want
                {
                    return Err(Failure::fatal(Error::FailedPrecondition(format!(
                        "{}: the store holds SHA-256 {}, not the expected {want}",
                        what(),
                        a.sha256
                    ))));
                }
                match &transfer.artifact {
                    None => transfer.artifact = Some(a),
                    // Resuming must continue the same bytes.
                    Some(known) if known.sha256 == a.sha256 && known.size == a.size => {}
                    Some(known) => {
                        return Err(Failure::fatal(Error::FailedPrecondition(format!(
                            "{}: changed in the store during the download (SHA-256 {} then {})",
                            what(),
                            known.sha256,
                            a.sha256
                        ))));
                    }
                }
            }
            Some(Part::Data(data)) if !first => {
                progress.received += data.len() as u64;
                transfer.hasher.update(&data);
                transfer.offset += data.len() as u64;
                sink.write(&data).await.map_err(|e| {
                    Failure::fatal(Error::internal(format!("{}: cannot write it: {e}", what())))
                })?;
                let size = transfer.artifact.as_ref().map_or(0, |a| a.size);
                if transfer.offset > size {
                    return Ok(());
                }
            }
            _ => {
                return Err(Failure::transient(Error::Internal(format!(
                    "{}: the store's stream does not start with the artifact's ref",
                    what()
                ))));
            }
        }
    }
}

#[cfg(test)]
mod tests;

/// Bytes of archive per upload message: 1 MiB, less a little so that a message with its
/// framing stays under a 1 MiB message limit.
pub const CHUNK_BYTES: usize = (1 << 20) - 1024;

/// Why one upload did not store the artifact.
#[derive(Debug)]
pub enum UploadFailure {
    /// The call failed; whether to try again is the caller's call
    /// ([`is_transient_status`]).
    Status(tonic::Status),
    /// The archive could not be read.
    Local(Error),
}

impl std::fmt::Display for UploadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status(s) => write!(f, "{}: {}", s.code(), s.message()),
            Self::Local(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for UploadFailure {}

impl From<UploadFailure> for Error {
    fn from(f: UploadFailure) -> Self {
        match f {
            UploadFailure::Status(s) => s.into(),
            UploadFailure::Local(e) => e,
        }
    }
}

/// Uploads the packed archive at `archive` as one artifact of an attempt, once: the header
/// (its `size` and `sha256` must describe the file, or the controller refuses the upload),
/// then the file in [`CHUNK_BYTES`] pieces. Returns the ref the controller recorded.
pub async fn upload_artifact<T>(
    client: &mut ArtifactServiceClient<T>,
    header: crate::proto::ArtifactUploadHeader,
    archive: &std::path::Path,
) -> std::result::Result<ArtifactRef, UploadFailure>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    use crate::proto::{UploadArtifactRequest, upload_artifact_request};
    use std::sync::{Arc, Mutex, PoisonError};
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(archive).await.map_err(|e| {
        UploadFailure::Local(Error::internal(format!(
            "cannot open the archive {}: {e}",
            archive.display()
        )))
    })?;
    let read_error: Arc<Mutex<Option<io::Error>>> = Arc::default();
    let start = UploadArtifactRequest {
        part: Some(upload_artifact_request::Part::Header(header)),
    };
    let failed = read_error.clone();
    let data = futures::stream::unfold(Some(file), move |file| {
        let failed = failed.clone();
        async move {
            let mut file = file?;
            let mut buf = Vec::with_capacity(CHUNK_BYTES);
            match (&mut file)
                .take(CHUNK_BYTES as u64)
                .read_to_end(&mut buf)
                .await
            {
                Ok(0) => None,
                Ok(_) => Some((
                    UploadArtifactRequest {
                        part: Some(upload_artifact_request::Part::Data(buf)),
                    },
                    Some(file),
                )),
                Err(e) => {
                    *failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                    None
                }
            }
        }
    });
    let body = futures::StreamExt::chain(futures::stream::iter([start]), data);
    let result = client.upload(body).await;
    // A file that could not be read explains a refused upload better than the refusal.
    if let Some(e) = read_error
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    {
        return Err(UploadFailure::Local(Error::internal(format!(
            "cannot read the archive {}: {e}",
            archive.display()
        ))));
    }
    result
        .map(tonic::Response::into_inner)
        .map_err(UploadFailure::Status)
}

/// [`download_artifact`] through one client (cloned for each try) with the default
/// options; returns the artifact's ref.
pub async fn download_from<S: ArtifactSink>(
    client: ArtifactServiceClient<AuthedChannel>,
    req: &DownloadArtifactRequest,
    sink: &mut S,
) -> Result<ArtifactRef> {
    let got = download_artifact(
        |_| {
            let c = client.clone();
            async move { Ok(c) }
        },
        req,
        None,
        sink,
        &DownloadOptions::default(),
    )
    .await?;
    Ok(got.artifact)
}
