//! The log archive: finished attempts' logs in the blob store that holds artifacts (a
//! local directory by default, an S3-compatible bucket for clusters), so any leader serves
//! them and no controller needs a shared logs directory.
//!
//! An archived log is the sealed local log file copied byte for byte to
//! [`ArtifactStore::log_key`] (`logs/<task>/<attempt>.log`): the same checksummed records
//! (see `record`), checked again when they are read back. Uploading is idempotent (an
//! upload replaces the object with the same bytes), so an archive whose record was never
//! committed (the leader died in between) is simply uploaded again by the next leader,
//! from the chunks the worker replays out of its spool.
//!
//! It knows nothing of tasks or fencing: the core decides when an attempt's log is
//! complete, records the archive key on the attempt and tells the worker it may drop its
//! spool (see `core::archive`).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use scabbard_common::proto;
use scabbard_common::{Error, Result};
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

use super::LogStore;
use super::record::decode_one;
use crate::artifacts::ArtifactStore;

/// Uploads running at once (more wait).
const UPLOADS: usize = 16;
/// Bytes read from the local file per piece of an upload.
const PIECE: usize = 1 << 20;

/// What an archived log is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archived {
    /// Blob store key (goes into `AttemptRecord.log_archive`).
    pub key: String,
    /// Chunks in it.
    pub chunks: u64,
    /// Bytes of chunk data in it (`AttemptRecord.log_bytes`).
    pub data_bytes: u64,
    /// Size of the object.
    pub size: u64,
}

/// Archived logs in the blob store. See the module docs.
#[derive(Debug)]
pub struct LogArchive {
    blobs: Arc<ArtifactStore>,
    uploads: Semaphore,
}

impl LogArchive {
    pub fn new(blobs: Arc<ArtifactStore>) -> Arc<Self> {
        Arc::new(Self {
            blobs,
            uploads: Semaphore::new(UPLOADS),
        })
    }

    /// Where archives go, for messages.
    pub fn describe(&self) -> &str {
        self.blobs.describe()
    }

    /// Copies the attempt's sealed local log to the blob store. `FailedPrecondition` if
    /// it is not sealed.
    pub async fn upload(&self, logs: &LogStore, task_id: &str, attempt: u32) -> Result<Archived> {
        let sealed = logs.sealed_file(task_id, attempt).await?;
        let key = self.blobs.log_key(task_id, attempt);
        let _permit = self
            .uploads
            .acquire()
            .await
            .map_err(|_| Error::Unavailable("log archive closed".into()))?;
        let file = tokio::fs::File::open(&sealed.path).await?;
        let what = format!("archiving the log of {task_id} attempt {attempt}");
        let data = futures::stream::unfold(
            (file.take(sealed.len), false),
            |(mut input, done)| async move {
                if done {
                    return None;
                }
                let mut buf = BytesMut::with_capacity(PIECE);
                loop {
                    match input.read_buf(&mut buf).await {
                        Ok(0) => break,
                        Ok(_) if buf.len() >= PIECE => break,
                        Ok(_) => {}
                        Err(e) => return Some((Err(Error::from(e)), (input, true))),
                    }
                }
                if buf.is_empty() {
                    return None;
                }
                Some((Ok(buf.freeze()), (input, false)))
            },
        )
        .boxed();
        let (size, _sha256) = self.blobs.put_owned(&key, &what, data).await?;
        if size != sealed.len {
            return Err(Error::internal(format!(
                "{what}: the file gave {size} of its {} bytes",
                sealed.len
            )));
        }
        Ok(Archived {
            key: key.to_string(),
            chunks: sealed.chunks,
            data_bytes: sealed.data_bytes,
            size,
        })
    }

    /// The chunks of the archived log at `key` with `seq >= from_seq`, in order, each
    /// marked with `attempt`. A corrupt object fails the stream (`Internal`).
    pub async fn read(
        &self,
        key: &str,
        attempt: u32,
        from_seq: u64,
    ) -> Result<BoxStream<'static, Result<proto::LogChunk>>> {
        let key = Path::from(key);
        // The size is only known from the store; read to the end.
        let bytes = self
            .blobs
            .read_from(&key, 0, u64::MAX)
            .await
            .map_err(|e| match e {
                Error::NotFound { .. } => Error::NotFound {
                    kind: "archived log",
                    id: format!(
                        "{key} (not in the {} this controller uses: with several controllers, \
                         use artifacts.backend = \"s3\" or a shared artifacts.dir)",
                        self.blobs.describe()
                    ),
                },
                e => e,
            })?;
        Ok(decode_stream(bytes, attempt, from_seq))
    }

    /// Deletes every archived log of `task_id` (retention, with `LogStore::delete_task`
    /// for the local files). Deleting what is not there is fine.
    pub async fn delete_archived_logs(&self, task_id: &str) -> Result<usize> {
        crate::artifacts::check_id("task_id", task_id)?;
        self.blobs.delete_logs(task_id).await
    }
}

/// Turns the bytes of an archived log into its chunks (`seq >= from_seq`).
fn decode_stream(
    bytes: BoxStream<'static, Result<Bytes>>,
    attempt: u32,
    from_seq: u64,
) -> BoxStream<'static, Result<proto::LogChunk>> {
    futures::stream::unfold(
        (bytes, BytesMut::new(), Vec::<proto::LogChunk>::new(), false),
        move |(mut bytes, mut buf, mut ready, mut done)| async move {
            loop {
                if let Some(chunk) = ready.pop() {
                    return Some((Ok(chunk), (bytes, buf, ready, done)));
                }
                if done {
                    return None;
                }
                match bytes.next().await {
                    Some(Ok(b)) => buf.extend_from_slice(&b),
                    Some(Err(e)) => return Some((Err(e), (bytes, buf, ready, true))),
                    None if buf.is_empty() => return None,
                    None => {
                        let e = Error::internal(format!(
                            "archived log ends inside a record ({} bytes left over)",
                            buf.len()
                        ));
                        return Some((Err(e), (bytes, buf, ready, true)));
                    }
                }
                let mut used = 0;
                let mut got = Vec::new();
                loop {
                    match decode_one(&buf[used..]) {
                        Ok(Some((mut chunk, n))) => {
                            used += n;
                            if chunk.seq >= from_seq {
                                chunk.attempt = attempt;
                                got.push(chunk);
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            done = true;
                            ready.clear();
                            return Some((
                                Err(Error::internal(format!("archived log: {e}"))),
                                (bytes, buf, ready, done),
                            ));
                        }
                    }
                }
                let _ = buf.split_to(used);
                got.reverse();
                ready = got;
            }
        },
    )
    .boxed()
}
