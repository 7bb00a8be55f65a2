//! [`ArtifactStore`]: the blob store behind `object_store` — a directory on this
//! controller's disk or an S3-compatible bucket. It writes an upload as a multipart
//! upload that becomes visible only when complete (after its size and SHA-256 matched),
//! streams objects back from any offset, and deletes in the background.
//!
//! It knows nothing of tasks or tokens: callers pass keys made by [`ArtifactStore::key`]
//! after the core authorized the call.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, GetResultPayload, ObjectStore, ObjectStoreExt, WriteMultipart,
};
use scabbard_common::artifact::Sha256;
use scabbard_common::{Error, Result};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::config::ArtifactsConfig;
use super::{CHUNK_BYTES, fmt_bytes};

/// Bytes per part of a multipart upload (S3 wants at least 5 MiB for all but the last).
const PART_BYTES: usize = 8 << 20;
/// Parts of one upload written at once: with the part being filled, an upload holds at
/// most 3 × 8 MiB in memory.
const PARTS_IN_FLIGHT: usize = 2;
/// Keys waiting to be deleted in the background (more are dropped, with a warning).
const DISCARD_QUEUE: usize = 4096;

/// What an upload must turn out to be.
#[derive(Debug, Clone)]
pub struct Expected {
    /// What it is, for messages (`artifact "dist" of task t1`).
    pub what: String,
    /// Exact bytes.
    pub size: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// The configured blob store.
pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    /// Prepended to every key (`<s3 prefix>artifacts/`; empty for the local backend,
    /// whose directory is the artifacts directory itself).
    prefix: String,
    /// Local backend: where it writes (objects are fsynced after they complete).
    local: Option<LocalFileSystem>,
    /// Prepended to archived log keys (`<s3 prefix>logs/`; `logs/` locally).
    logs_prefix: String,
    /// `local directory …` / `s3://bucket/prefix` for messages.
    describe: String,
    discard: mpsc::Sender<Path>,
}

impl std::fmt::Debug for ArtifactStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ArtifactStore({})", self.describe)
    }
}

impl ArtifactStore {
    /// Opens the backend `cfg` names (the local directory is created). Does not reach a
    /// remote store: see [`ArtifactStore::probe`].
    pub fn open(cfg: &ArtifactsConfig, data_dir: &FsPath) -> Result<Arc<Self>> {
        cfg.validate()?;
        let (store, prefix, logs_prefix, local, describe): (Arc<dyn ObjectStore>, _, _, _, _) =
            match cfg.backend.as_str() {
                "s3" => {
                    let s3 = &cfg.s3;
                    let mut b = AmazonS3Builder::new()
                        .with_bucket_name(&s3.bucket)
                        .with_region(&s3.region)
                        .with_access_key_id(&s3.access_key_id)
                        .with_secret_access_key(s3.secret()?)
                        .with_allow_http(s3.allow_http)
                        .with_virtual_hosted_style_request(s3.virtual_hosted_style);
                    if !s3.endpoint.is_empty() {
                        b = b.with_endpoint(&s3.endpoint);
                    }
                    let store = b.build().map_err(|e| {
                        Error::invalid(format!("artifacts.s3: {}", error_chain(&e)))
                    })?;
                    let prefix = s3.normalized_prefix();
                    let describe = format!("s3://{}/{prefix}artifacts/", s3.bucket);
                    (
                        Arc::new(store),
                        format!("{prefix}artifacts/"),
                        format!("{prefix}logs/"),
                        None,
                        describe,
                    )
                }
                _ => {
                    let dir = cfg.local_dir(data_dir);
                    scabbard_common::private::private_dir(&dir).map_err(|e| {
                        Error::invalid(format!(
                            "artifacts.dir: cannot create {}: {e}",
                            dir.display()
                        ))
                    })?;
                    let fs = LocalFileSystem::new_with_prefix(&dir)
                        .map_err(|e| {
                            Error::invalid(format!("artifacts.dir {}: {e}", dir.display()))
                        })?
                        .with_automatic_cleanup(true);
                    let describe = format!("local directory {}", dir.display());
                    (
                        Arc::new(fs.clone()),
                        String::new(),
                        "logs/".to_string(),
                        Some(fs),
                        describe,
                    )
                }
            };
        let (discard, rx) = mpsc::channel(DISCARD_QUEUE);
        tokio::spawn(run_discards(store.clone(), rx));
        Ok(Arc::new(Self {
            store,
            prefix,
            logs_prefix,
            local,
            describe,
            discard,
        }))
    }

    /// Where artifacts go, for logs and messages.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Reaches the store once (a lookup of a key that does not exist): `Err` says why it
    /// cannot be used (bucket, credentials, endpoint).
    pub async fn probe(&self) -> Result<()> {
        let key = Path::from(format!("{}.probe", self.prefix));
        match tokio::time::timeout(Duration::from_secs(20), self.store.head(&key)).await {
            Ok(Ok(_)) | Ok(Err(object_store::Error::NotFound { .. })) => Ok(()),
            Ok(Err(e)) => Err(self.unavailable("reaching", &e)),
            Err(_) => Err(Error::Unavailable(format!(
                "artifact store {}: no answer within 20 s",
                self.describe
            ))),
        }
    }

    /// The key of an attempt's artifact: `<prefix>artifacts/<task>/<token>/<name>.tar.zst`
    /// (S3), `<dir>/<task>/<token>/<name>.tar.zst` (local). Ids and names are checked by
    /// the caller (letters, digits, `-`, `_`, `.`).
    pub fn key(&self, task_id: &str, fencing_token: u64, name: &str) -> Path {
        Path::from(format!(
            "{}{task_id}/{fencing_token}/{name}.tar.zst",
            self.prefix
        ))
    }

    /// The key of an attempt's archived log: `<prefix>logs/<task>/<attempt>.log` (S3:
    /// beside `artifacts/`), `<dir>/logs/<task>/<attempt>.log` (local; task ids are ULIDs,
    /// never `logs`). The task id is checked by the caller.
    pub fn log_key(&self, task_id: &str, attempt: u32) -> Path {
        Path::from(format!("{}{task_id}/{attempt}.log", self.logs_prefix))
    }

    /// Deletes every object under `logs/<task>/` (every archived log of the task); returns
    /// how many were deleted.
    pub async fn delete_logs(&self, task_id: &str) -> Result<usize> {
        let prefix = Path::from(format!("{}{task_id}", self.logs_prefix));
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.unavailable("listing", &e))?;
        let mut n = 0;
        for meta in metas {
            self.delete(&meta.location).await?;
            n += 1;
        }
        Ok(n)
    }

    /// Writes `data` at `key` as one object that becomes visible only once every byte
    /// arrived and the count and digest match `expected`. Any error, a stream that ends
    /// early or with an error, too many bytes or a wrong digest abort the upload: nothing
    /// is left at `key` by this call (an earlier object at `key` stays).
    pub async fn put_stream<S>(&self, key: &Path, expected: &Expected, data: S) -> Result<()>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        self.upload(key, Some(expected), data).await.map(|_| ())
    }

    /// Writes `data` at `key` as one object that becomes visible only once the stream
    /// ended without error (then it replaces an earlier object at `key`); returns its size
    /// and SHA-256. For data the controller produces itself (archived logs).
    pub async fn put_owned<S>(&self, key: &Path, what: &str, data: S) -> Result<(u64, String)>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        self.upload(key, None, data).await.map_err(|e| match e {
            Error::Unavailable(m) => Error::Unavailable(format!("{what}: {m}")),
            e => e,
        })
    }

    async fn upload<S>(
        &self,
        key: &Path,
        expected: Option<&Expected>,
        mut data: S,
    ) -> Result<(u64, String)>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        // Locally, the key's directories are created private before object_store would
        // create them by the umask (its staging file then sits in a 0700 directory).
        if let Some(fs) = &self.local
            && let Ok(path) = fs.path_to_filesystem(key)
            && let Some(parent) = path.parent()
        {
            use std::os::unix::fs::DirBuilderExt;
            let parent = parent.to_path_buf();
            tokio::task::spawn_blocking(move || {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
            })
            .await
            .map_err(Error::internal)?
            .map_err(|e| Error::Unavailable(format!("creating the directory of {key}: {e}")))?;
        }
        let upload = self
            .store
            .put_multipart(key)
            .await
            .map_err(|e| self.unavailable("starting an upload to", &e))?;
        let mut pending = Pending(Some(WriteMultipart::new_with_chunk_size(
            upload, PART_BYTES,
        )));
        let mut hasher = Sha256::default();
        let mut received = 0u64;
        let outcome = async {
            while let Some(chunk) = data.next().await {
                let chunk = chunk.map_err(|e| match expected {
                    Some(expected) => cut(expected, received, e),
                    None => e,
                })?;
                received += chunk.len() as u64;
                if let Some(expected) = expected
                    && received > expected.size
                {
                    return Err(Error::invalid(format!(
                        "{}: more data than the {} the header announced (size); nothing was stored",
                        expected.what,
                        fmt_bytes(expected.size)
                    )));
                }
                hasher.update(&chunk);
                let w = pending.writer()?;
                w.put(chunk);
                w.wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| self.unavailable("writing to", &e))?;
            }
            let digest = std::mem::take(&mut hasher).finish();
            let Some(expected) = expected else {
                return Ok(digest);
            };
            if received != expected.size {
                return Err(Error::invalid(format!(
                    "{}: the upload ended after {received} of the {} bytes the header announced (size); nothing was stored",
                    expected.what, expected.size
                )));
            }
            if digest != expected.sha256 {
                return Err(Error::invalid(format!(
                    "{}: the data's SHA-256 is {digest}, the header said {} (sha256); nothing was stored",
                    expected.what, expected.sha256
                )));
            }
            Ok(digest)
        }
        .await;
        match outcome {
            Ok(digest) => {
                let w = pending
                    .0
                    .take()
                    .ok_or_else(|| Error::internal("upload gone"))?;
                w.finish()
                    .await
                    .map_err(|e| self.unavailable("completing an upload to", &e))?;
                self.sync_local(key).await?;
                Ok((received, digest))
            }
            Err(e) => {
                if let Some(w) = pending.0.take()
                    && let Err(abort) = w.abort().await
                {
                    warn!(key = %key, error = %abort, "aborting a refused upload");
                }
                Err(e)
            }
        }
    }

    /// Local backend: the completed file (and its directory entry) reach the disk before
    /// the upload is recorded.
    async fn sync_local(&self, key: &Path) -> Result<()> {
        let Some(fs) = &self.local else {
            return Ok(());
        };
        let path = fs
            .path_to_filesystem(key)
            .map_err(|e| Error::internal(format!("artifact path of {key}: {e}")))?;
        // The directories object_store created under the artifacts dir (one per key
        // segment but the last): private like the rest of the data dir.
        let dirs = key.parts().count().saturating_sub(1);
        tokio::task::spawn_blocking(move || {
            owner_only(&path, 0o600)?;
            std::fs::File::open(&path)?.sync_all()?;
            let mut dir = path.parent();
            for _ in 0..dirs {
                let Some(d) = dir else { break };
                owner_only(d, 0o700)?;
                dir = d.parent();
            }
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(Error::internal)?
        .map_err(|e| Error::Unavailable(format!("syncing artifact {key} to disk: {e}")))
    }

    /// The object at `key` from byte `offset` on, in chunks of at most
    /// [`CHUNK_BYTES`]. `size` is its recorded size (`offset == size` gives no chunk).
    pub async fn read_from(
        &self,
        key: &Path,
        offset: u64,
        size: u64,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        if offset >= size {
            return Ok(futures::stream::empty().boxed());
        }
        let opts = GetOptions {
            range: Some(GetRange::Offset(offset)),
            ..Default::default()
        };
        let got = self.store.get_opts(key, opts).await.map_err(|e| match e {
            object_store::Error::NotFound { .. } => Error::NotFound {
                kind: "artifact data",
                id: format!(
                    "{key} (in the {}; deleted behind the controller's back?)",
                    self.describe
                ),
            },
            e => self.unavailable("reading from", &e),
        })?;
        let range = got.range.clone();
        Ok(match got.payload {
            GetResultPayload::File(file, path) => read_file(file, path, range.start, range.end),
            GetResultPayload::Stream(s) => {
                let describe = self.describe.clone();
                rechunk(s.map(move |r| {
                    r.map_err(|e| {
                        Error::Unavailable(format!(
                            "artifact store {describe}: reading: {}",
                            error_chain(&e)
                        ))
                    })
                }))
            }
        })
    }

    /// Whether an object exists at `key`.
    pub async fn exists(&self, key: &Path) -> Result<bool> {
        match self.store.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.unavailable("looking up", &e)),
        }
    }

    /// Deletes `key` now.
    pub async fn delete(&self, key: &Path) -> Result<()> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.unavailable("deleting from", &e)),
        }
    }

    /// Deletes `keys` in the background, best effort (failures are logged).
    pub fn discard(&self, keys: impl IntoIterator<Item = Path>) {
        for key in keys {
            if let Err(e) = self.discard.try_send(key) {
                warn!(key = %e.into_inner(), "artifact delete queue full: leaving the object");
            }
        }
    }

    fn unavailable(&self, doing: &str, e: &object_store::Error) -> Error {
        Error::Unavailable(format!(
            "artifact store: {doing} the {}: {}",
            self.describe,
            error_chain(e)
        ))
    }
}

/// Aborts a multipart upload that was neither finished nor aborted (the handler was
/// dropped mid-upload, e.g. at shutdown), so no parts stay behind.
struct Pending(Option<WriteMultipart>);

impl Pending {
    fn writer(&mut self) -> Result<&mut WriteMultipart> {
        self.0
            .as_mut()
            .ok_or_else(|| Error::internal("upload gone"))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(w) = self.0.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                if let Err(e) = w.abort().await {
                    warn!(error = %e, "aborting an abandoned upload");
                }
            });
        }
    }
}

/// A stream error while receiving: the client went away or sent something wrong.
fn cut(expected: &Expected, received: u64, e: Error) -> Error {
    match e {
        Error::InvalidArgument(m) => {
            Error::InvalidArgument(format!("{}: {m}; nothing was stored", expected.what))
        }
        Error::Unavailable(m) => Error::Unavailable(format!(
            "{}: the upload was cut after {received} of {} bytes ({m}); nothing was stored",
            expected.what, expected.size
        )),
        other => other,
    }
}

/// Reads `start..end` of a local file in [`CHUNK_BYTES`] blocks on a blocking thread.
/// (object_store's own file stream reads 8 KiB per blocking call.)
fn read_file(
    mut file: std::fs::File,
    path: PathBuf,
    start: u64,
    end: u64,
) -> BoxStream<'static, Result<Bytes>> {
    let (tx, rx) = mpsc::channel::<Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek, SeekFrom};
        let fail = |e: std::io::Error| {
            Err(Error::Unavailable(format!(
                "reading artifact file {}: {e}",
                path.display()
            )))
        };
        if let Err(e) = file.seek(SeekFrom::Start(start)) {
            let _ = tx.blocking_send(fail(e));
            return;
        }
        let mut left = end - start;
        while left > 0 {
            let n = left.min(CHUNK_BYTES as u64);
            let mut buf = Vec::with_capacity(n as usize);
            match (&mut file).take(n).read_to_end(&mut buf) {
                Ok(got) if got as u64 == n => {}
                Ok(got) => {
                    let short = std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the file ended {} bytes early", left - got as u64),
                    );
                    let _ = tx.blocking_send(fail(short));
                    return;
                }
                Err(e) => {
                    let _ = tx.blocking_send(fail(e));
                    return;
                }
            }
            left -= n;
            if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                return; // the reader went away
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
}

/// Regroups a stream of small pieces into chunks of [`CHUNK_BYTES`] (the last smaller).
fn rechunk(
    s: impl Stream<Item = Result<Bytes>> + Send + 'static,
) -> BoxStream<'static, Result<Bytes>> {
    futures::stream::unfold(
        (s.boxed(), BytesMut::new(), false),
        |(mut s, mut buf, done)| async move {
            if done {
                return None;
            }
            loop {
                if buf.len() >= CHUNK_BYTES {
                    let out = buf.split_to(CHUNK_BYTES).freeze();
                    return Some((Ok(out), (s, buf, false)));
                }
                match s.next().await {
                    Some(Ok(b)) => buf.extend_from_slice(&b),
                    Some(Err(e)) => return Some((Err(e), (s, buf, true))),
                    None if buf.is_empty() => return None,
                    None => {
                        let out = buf.split().freeze();
                        return Some((Ok(out), (s, buf, true)));
                    }
                }
            }
        },
    )
    .boxed()
}

async fn run_discards(store: Arc<dyn ObjectStore>, mut rx: mpsc::Receiver<Path>) {
    while let Some(key) = rx.recv().await {
        match store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                info!(key = %key, "deleted an artifact no result refers to")
            }
            Err(e) => warn!(key = %key, error = %error_chain(&e), "could not delete an artifact"),
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    scabbard_common::client::error_chain(e)
}

/// Sets `path` to `mode` if it lets the group or others in (object_store creates files and
/// directories by the umask; ours are private to the controller's user). Quietly: it is
/// the normal case for every new object, not a misconfiguration to warn about.
fn owner_only(path: &std::path::Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let current = std::fs::metadata(path)?.permissions().mode() & 0o7777;
    if current & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}
