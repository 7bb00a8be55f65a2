//! The log store: append-only on-disk logs, one per attempt, behind `TaskService.Logs`.
//!
//! Layout: `<dir>/<task_id>/<attempt>.log` holds checksummed, length-prefixed records (a
//! prost-encoded [`proto::LogChunk`] each) in sequence order from 0; `<attempt>.sealed`
//! marks a final attempt. Each append reaches the OS before it is acknowledged (a restarted
//! controller or another process sees it); [`LogStore::seal`] and [`LogStore::sync_all`]
//! wait for the disk. On first use after a restart an attempt's file is scanned once: its
//! next sequence number and a sparse seq → offset index are rebuilt and a torn last record
//! is cut off.
//!
//! It owns the files and the per-attempt position ([`LogPosition`]) that followers watch.
//! It does not know tasks, fencing tokens or which attempt is current: callers check those
//! before appending. File IO runs on the blocking pool; at most `max_open_files` write
//! handles are open at once (least recently used closed first, sealed attempts closed at
//! once), and idle attempts fall out of memory.

pub mod archive;
mod disk;
mod record;
mod retention;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use scabbard_common::proto;
use scabbard_common::{Error, Result};
use tokio::sync::watch;

use disk::{Record, Shared, lock};
use record::encode_record;

/// A sealed attempt's log file, as [`LogStore::sealed_file`] finds it.
#[derive(Debug, Clone)]
pub struct SealedLog {
    pub path: std::path::PathBuf,
    /// Bytes of valid records in the file (what an archive copies).
    pub len: u64,
    /// Chunks stored.
    pub chunks: u64,
    /// Bytes of chunk data stored.
    pub data_bytes: u64,
}

/// Where an attempt's log stands; followers watch it through [`LogStore::subscribe`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogPosition {
    /// Sequence number of the next chunk (= number of chunks stored).
    pub next_seq: u64,
    /// The attempt is final: no chunk will be added.
    pub sealed: bool,
}

/// Resource limits of a [`LogStore`].
#[derive(Debug, Clone, Copy)]
pub struct LogStoreLimits {
    /// Write handles kept open at once (at least 1).
    pub max_open_files: usize,
    /// Attempts kept in memory before idle ones are dropped (they reload from disk).
    pub max_cached_attempts: usize,
}

impl Default for LogStoreLimits {
    fn default() -> Self {
        Self {
            max_open_files: 1024,
            max_cached_attempts: 4096,
        }
    }
}

/// Append-only per-attempt logs in a directory. See the module docs.
#[derive(Debug)]
pub struct LogStore {
    shared: Arc<Shared>,
    /// Where finished attempts' logs are archived (set once by the core that uses it).
    archive: std::sync::OnceLock<Arc<archive::LogArchive>>,
}

impl LogStore {
    /// Opens (creating if needed) a log store in `dir` with default limits.
    pub fn open(dir: &Path) -> Result<Arc<LogStore>> {
        Self::open_with(dir, LogStoreLimits::default())
    }

    /// Opens (creating if needed) a log store in `dir`.
    pub fn open_with(dir: &Path, limits: LogStoreLimits) -> Result<Arc<LogStore>> {
        scabbard_common::private::private_dir(dir)?;
        let limits = LogStoreLimits {
            max_open_files: limits.max_open_files.max(1),
            max_cached_attempts: limits.max_cached_attempts.max(1),
        };
        Ok(Arc::new(LogStore {
            shared: Arc::new(Shared::new(dir.to_path_buf(), limits)),
            archive: std::sync::OnceLock::new(),
        }))
    }

    /// Appends chunks of one attempt. Chunks must continue the sequence: `seq < next_seq`
    /// are duplicates and skipped (idempotent replay), `seq == next_seq` is appended,
    /// `seq > next_seq` is a gap and fails with `InvalidArgument` (nothing is written).
    /// New chunks for a sealed attempt fail with `FailedPrecondition`. Returns the new
    /// next_seq.
    pub async fn append(
        &self,
        task_id: &str,
        attempt: u32,
        chunks: &[proto::LogChunk],
    ) -> Result<u64> {
        check_task_id(task_id)?;
        let mut buf = Vec::with_capacity(chunks.iter().map(|c| c.data.len() + 32).sum());
        let mut records = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let start = buf.len();
            encode_record(&mut buf, chunk)?;
            records.push(Record {
                seq: chunk.seq,
                start,
                len: buf.len() - start,
                data_len: chunk.data.len(),
            });
        }
        let entry = self.shared.entry(task_id, attempt);
        self.blocking(move |shared| shared.append(&entry, &buf, &records))
            .await
    }

    /// The attempt's next sequence number; 0 if it has no log.
    pub async fn next_seq(&self, task_id: &str, attempt: u32) -> Result<u64> {
        Ok(self.position(task_id, attempt).await?.next_seq)
    }

    /// The attempt's current position.
    pub async fn position(&self, task_id: &str, attempt: u32) -> Result<LogPosition> {
        check_task_id(task_id)?;
        let entry = self.shared.entry(task_id, attempt);
        if entry.loaded.load(Ordering::Acquire) {
            return Ok(*entry.position.borrow());
        }
        self.blocking(move |shared| {
            shared.load(&entry, &mut lock(&entry.state))?;
            Ok(*entry.position.borrow())
        })
        .await
    }

    /// Bytes of chunk data stored for the attempt.
    pub async fn bytes(&self, task_id: &str, attempt: u32) -> Result<u64> {
        check_task_id(task_id)?;
        let entry = self.shared.entry(task_id, attempt);
        self.blocking(move |shared| {
            let mut st = lock(&entry.state);
            shared.load(&entry, &mut st)?;
            Ok(st.bytes)
        })
        .await
    }

    /// Bytes of chunk data stored for the attempt, when known without touching the disk
    /// (the attempt is cached and loaded, and no write holds it right now). For the core,
    /// which must not wait on the disk: an attempt that just received its log is cached.
    pub fn cached_bytes(&self, task_id: &str, attempt: u32) -> Option<u64> {
        let entry = lock(&self.shared.cache)
            .attempts
            .get(&(task_id.to_string(), attempt))
            .cloned()?;
        if !entry.loaded.load(Ordering::Acquire) {
            return None;
        }
        entry.state.try_lock().ok().map(|st| st.bytes)
    }

    /// Up to `max_chunks` chunks with `seq >= from_seq`, in order.
    pub async fn read(
        &self,
        task_id: &str,
        attempt: u32,
        from_seq: u64,
        max_chunks: usize,
    ) -> Result<Vec<proto::LogChunk>> {
        check_task_id(task_id)?;
        let entry = self.shared.entry(task_id, attempt);
        self.blocking(move |shared| shared.read(&entry, from_seq, max_chunks))
            .await
    }

    /// Watches the attempt's position: it changes whenever next_seq grows or the attempt is
    /// sealed. A follower reads until it is at `next_seq` and waits for a change, and stops
    /// once `sealed` and caught up. For an invalid task id the sender is already closed.
    pub fn subscribe(&self, task_id: &str, attempt: u32) -> watch::Receiver<LogPosition> {
        if check_task_id(task_id).is_err() {
            return watch::channel(LogPosition::default()).1;
        }
        let entry = self.shared.entry(task_id, attempt);
        let rx = entry.position.subscribe();
        if !entry.loaded.load(Ordering::Acquire)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // The position becomes right once the file has been read.
            let shared = self.shared.clone();
            runtime.spawn_blocking(move || {
                if let Err(e) = shared.load(&entry, &mut lock(&entry.state)) {
                    tracing::warn!(task_id = %entry.key.0, attempt = entry.key.1, error = %e, "cannot load log");
                }
            });
        }
        rx
    }

    /// Marks the attempt final: syncs its log to disk, records the seal durably, closes the
    /// file and wakes followers. Sealing twice is fine.
    pub async fn seal(&self, task_id: &str, attempt: u32) -> Result<()> {
        check_task_id(task_id)?;
        let entry = self.shared.entry(task_id, attempt);
        self.blocking(move |shared| shared.seal(&entry)).await
    }

    /// Where a sealed attempt's log file is and how long it is (its records never change
    /// again). `FailedPrecondition` if the attempt is not sealed.
    pub async fn sealed_file(&self, task_id: &str, attempt: u32) -> Result<SealedLog> {
        check_task_id(task_id)?;
        let entry = self.shared.entry(task_id, attempt);
        let (path, len, chunks, data_bytes) = self
            .blocking(move |shared| shared.sealed_file(&entry))
            .await?;
        Ok(SealedLog {
            path,
            len,
            chunks,
            data_bytes,
        })
    }

    /// Sets where this store's finished logs are archived (first call wins), so that
    /// deleting a task's logs can reach the archive too ([`LogStore::archive`]).
    pub fn attach_archive(&self, archive: Arc<archive::LogArchive>) {
        let _ = self.archive.set(archive);
    }

    /// The archive of this store's finished logs, if there is one.
    pub fn archive(&self) -> Option<&Arc<archive::LogArchive>> {
        self.archive.get()
    }

    /// Syncs every log written since its last sync to disk.
    pub async fn sync_all(&self) -> Result<()> {
        let entries: Vec<_> = lock(&self.shared.cache)
            .attempts
            .values()
            .cloned()
            .collect();
        self.blocking(move |shared| shared.sync(&entries)).await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| Error::internal(format!("log store task failed: {e}")))?
    }
}

/// Task ids name directories: only `[A-Za-z0-9._-]`, not starting with a dot.
fn check_task_id(task_id: &str) -> Result<()> {
    let valid = !task_id.is_empty()
        && task_id.len() <= 256
        && !task_id.starts_with('.')
        && task_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(Error::invalid(format!("invalid task id {task_id:?}")))
    }
}

#[cfg(test)]
mod tests;
