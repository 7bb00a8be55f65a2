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

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prost::Message;
use scabbard_common::proto;
use scabbard_common::{Error, Result};
use tokio::sync::watch;

/// Length + CRC32 of the body (a prost-encoded `LogChunk`).
const HEADER_LEN: usize = 8;
/// Largest record body accepted.
const MAX_BODY: usize = 16 << 20;
/// One index entry per this many chunks.
const INDEX_EVERY: u64 = 64;

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
}

type Key = (String, u32);

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    limits: LogStoreLimits,
    cache: Mutex<Cache>,
    open_files: Mutex<OpenFiles>,
}

#[derive(Debug)]
struct Cache {
    attempts: HashMap<Key, Arc<AttemptLog>>,
    sweep_at: usize,
}

/// One attempt's log: its state and the position followers watch.
#[derive(Debug)]
struct AttemptLog {
    key: Key,
    /// The state was read from disk (or found absent).
    loaded: AtomicBool,
    state: Mutex<AttemptState>,
    position: watch::Sender<LogPosition>,
}

#[derive(Debug, Default)]
struct AttemptState {
    file: Option<File>,
    /// Length of the valid records in the file.
    len: u64,
    next_seq: u64,
    /// Bytes of chunk data stored.
    bytes: u64,
    /// `index[i]` = offset of chunk `i * INDEX_EVERY`.
    index: Vec<u64>,
    sealed: bool,
    /// Written since the last fsync.
    dirty: bool,
    /// The task directory was created by this process and not yet synced into its parent.
    new_dir: bool,
}

/// Least-recently-used order of the open write handles.
#[derive(Debug, Default)]
struct OpenFiles {
    tick: u64,
    by_key: HashMap<Key, u64>,
    by_tick: BTreeMap<u64, Key>,
}

/// Where one encoded chunk sits in an append batch.
#[derive(Debug)]
struct Record {
    seq: u64,
    start: usize,
    len: usize,
    data_len: usize,
}

impl LogStore {
    /// Opens (creating if needed) a log store in `dir` with default limits.
    pub fn open(dir: &Path) -> Result<Arc<LogStore>> {
        Self::open_with(dir, LogStoreLimits::default())
    }

    /// Opens (creating if needed) a log store in `dir`.
    pub fn open_with(dir: &Path, limits: LogStoreLimits) -> Result<Arc<LogStore>> {
        std::fs::create_dir_all(dir)?;
        let limits = LogStoreLimits {
            max_open_files: limits.max_open_files.max(1),
            max_cached_attempts: limits.max_cached_attempts.max(1),
        };
        Ok(Arc::new(LogStore {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                limits,
                cache: Mutex::new(Cache {
                    attempts: HashMap::new(),
                    sweep_at: limits.max_cached_attempts,
                }),
                open_files: Mutex::new(OpenFiles::default()),
            }),
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

impl Shared {
    /// The attempt's entry, created if needed; drops idle entries when the cache is full.
    fn entry(&self, task_id: &str, attempt: u32) -> Arc<AttemptLog> {
        let key = (task_id.to_string(), attempt);
        let mut cache = lock(&self.cache);
        if let Some(entry) = cache.attempts.get(&key) {
            return entry.clone();
        }
        if cache.attempts.len() >= cache.sweep_at {
            // Idle: nobody holds or watches it and nothing awaits a sync. Dropping it closes
            // its file; it is read again from disk when next used.
            cache.attempts.retain(|key, e| {
                let idle = Arc::strong_count(e) == 1
                    && e.position.receiver_count() == 0
                    && e.state.try_lock().is_ok_and(|st| !st.dirty && !st.new_dir);
                if idle {
                    lock(&self.open_files).forget(key);
                }
                !idle
            });
            cache.sweep_at = self
                .limits
                .max_cached_attempts
                .max(cache.attempts.len() * 2);
        }
        let entry = Arc::new(AttemptLog {
            key: key.clone(),
            loaded: AtomicBool::new(false),
            state: Mutex::new(AttemptState::default()),
            position: watch::Sender::new(LogPosition::default()),
        });
        cache.attempts.insert(key, entry.clone());
        entry
    }

    fn task_dir(&self, key: &Key) -> PathBuf {
        self.dir.join(&key.0)
    }

    fn log_path(&self, key: &Key) -> PathBuf {
        self.task_dir(key).join(format!("{}.log", key.1))
    }

    fn sealed_path(&self, key: &Key) -> PathBuf {
        self.task_dir(key).join(format!("{}.sealed", key.1))
    }

    /// Reads the attempt's file once: next_seq, index, seal; cuts off a torn tail.
    fn load(&self, entry: &AttemptLog, st: &mut AttemptState) -> Result<()> {
        if entry.loaded.load(Ordering::Acquire) {
            return Ok(());
        }
        let path = self.log_path(&entry.key);
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => {
                let file_len = file.metadata()?.len();
                let valid = scan(&file, 0, |offset, chunk| {
                    if chunk.seq != st.next_seq {
                        return false;
                    }
                    if chunk.seq % INDEX_EVERY == 0 {
                        st.index.push(offset);
                    }
                    st.next_seq += 1;
                    st.bytes += chunk.data.len() as u64;
                    true
                })?;
                if valid < file_len {
                    tracing::warn!(path = %path.display(), valid, file_len, "cutting off a torn log record");
                    file.set_len(valid)?;
                }
                st.len = valid;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        st.sealed = self.sealed_path(&entry.key).try_exists()?;
        // A previous process may have died before syncing: sync on seal / sync_all.
        st.dirty = st.len > 0 && !st.sealed;
        entry.publish(st);
        entry.loaded.store(true, Ordering::Release);
        Ok(())
    }

    fn append(&self, entry: &AttemptLog, buf: &[u8], records: &[Record]) -> Result<u64> {
        let (next_seq, victims) = {
            let mut st = lock(&entry.state);
            self.load(entry, &mut st)?;
            let mut expected = st.next_seq;
            let mut accepted = Vec::new();
            for record in records {
                if record.seq > expected {
                    return Err(Error::invalid(format!(
                        "log of {}/{} has {expected} chunks: chunk {} leaves a gap",
                        entry.key.0, entry.key.1, record.seq
                    )));
                }
                if record.seq == expected {
                    accepted.push(record);
                    expected += 1;
                }
            }
            if accepted.is_empty() {
                return Ok(st.next_seq);
            }
            if st.sealed {
                return Err(Error::FailedPrecondition(format!(
                    "log of {}/{} is sealed",
                    entry.key.0, entry.key.1
                )));
            }
            let victims = self.open_for_append(entry, &mut st)?;
            let data: std::borrow::Cow<'_, [u8]> = if accepted.len() == records.len() {
                buf.into()
            } else {
                accepted
                    .iter()
                    .flat_map(|r| &buf[r.start..r.start + r.len])
                    .copied()
                    .collect()
            };
            let len = st.len;
            let written = match st.file.as_mut() {
                Some(file) => file.write_all(&data).map_err(|e| {
                    let _ = file.set_len(len);
                    e
                }),
                None => Err(io::Error::other("log file not open")),
            };
            if let Err(e) = written {
                // The half-written record was cut off, or is on the next load: start over
                // from the file.
                lock(&self.open_files).forget(&entry.key);
                entry.loaded.store(false, Ordering::Release);
                *st = AttemptState {
                    dirty: true,
                    new_dir: st.new_dir,
                    ..AttemptState::default()
                };
                return Err(e.into());
            }
            let mut offset = st.len;
            for record in accepted {
                if record.seq % INDEX_EVERY == 0 {
                    st.index.push(offset);
                }
                offset += record.len as u64;
                st.bytes += record.data_len as u64;
            }
            st.len = offset;
            st.next_seq = expected;
            st.dirty = true;
            entry.publish(&st);
            (expected, victims)
        };
        self.close(victims);
        Ok(next_seq)
    }

    /// Opens the write handle if needed and marks it most recently used; returns the
    /// attempts whose handles should be closed to stay under the limit.
    fn open_for_append(&self, entry: &AttemptLog, st: &mut AttemptState) -> Result<Vec<Key>> {
        if st.file.is_none() {
            st.new_dir |= self.create_task_dir(&entry.key)?;
            let path = self.log_path(&entry.key);
            st.file = Some(OpenOptions::new().create(true).append(true).open(path)?);
        }
        Ok(lock(&self.open_files).touch(&entry.key, self.limits.max_open_files))
    }

    /// Creates the task's directory; true if it did not exist.
    fn create_task_dir(&self, key: &Key) -> Result<bool> {
        match std::fs::create_dir(self.task_dir(key)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Closes the write handles of `victims` unless they were used again meanwhile.
    fn close(&self, victims: Vec<Key>) {
        for key in victims {
            let Some(entry) = lock(&self.cache).attempts.get(&key).cloned() else {
                continue;
            };
            let mut st = lock(&entry.state);
            if !lock(&self.open_files).by_key.contains_key(&key) {
                st.file = None;
            }
        }
    }

    fn read(
        &self,
        entry: &AttemptLog,
        from_seq: u64,
        max_chunks: usize,
    ) -> Result<Vec<proto::LogChunk>> {
        let (start, end) = {
            let mut st = lock(&entry.state);
            self.load(entry, &mut st)?;
            if from_seq >= st.next_seq || max_chunks == 0 {
                return Ok(Vec::new());
            }
            let slot = usize::try_from(from_seq / INDEX_EVERY).unwrap_or(usize::MAX);
            (st.index.get(slot).copied().unwrap_or(0), st.len)
        };
        let mut file = File::open(self.log_path(&entry.key))?;
        file.seek(SeekFrom::Start(start))?;
        // Only the records complete when the state was looked at: an append may be under way.
        let input = file.take(end - start);
        let mut chunks = Vec::new();
        let valid = scan(input, start, |_, mut chunk| {
            if chunk.seq >= from_seq {
                chunk.attempt = entry.key.1;
                chunks.push(chunk);
            }
            chunks.len() < max_chunks
        })?;
        if chunks.len() < max_chunks && valid < end {
            return Err(Error::internal(format!(
                "log of {}/{} is corrupt at offset {valid}",
                entry.key.0, entry.key.1
            )));
        }
        Ok(chunks)
    }

    fn seal(&self, entry: &AttemptLog) -> Result<()> {
        let mut st = lock(&entry.state);
        self.load(entry, &mut st)?;
        if st.sealed {
            return Ok(());
        }
        self.sync_one(entry, &mut st)?;
        let new_dir = self.create_task_dir(&entry.key)?;
        File::create(self.sealed_path(&entry.key))?;
        File::open(self.task_dir(&entry.key))?.sync_all()?;
        if new_dir {
            File::open(&self.dir)?.sync_all()?;
        }
        st.sealed = true;
        st.file = None;
        lock(&self.open_files).forget(&entry.key);
        entry.publish(&st);
        Ok(())
    }

    fn sync(&self, entries: &[Arc<AttemptLog>]) -> Result<()> {
        for entry in entries {
            self.sync_one(entry, &mut lock(&entry.state))?;
        }
        Ok(())
    }

    /// Syncs the attempt's data (and its new directory) to disk if written since last time.
    fn sync_one(&self, entry: &AttemptLog, st: &mut AttemptState) -> Result<()> {
        if st.dirty {
            match &st.file {
                Some(file) => file.sync_data()?,
                None => File::open(self.log_path(&entry.key))?.sync_data()?,
            }
            st.dirty = false;
        }
        if st.new_dir {
            File::open(self.task_dir(&entry.key))?.sync_all()?;
            File::open(&self.dir)?.sync_all()?;
            st.new_dir = false;
        }
        Ok(())
    }
}

impl AttemptLog {
    /// Tells followers the current position (only if it changed).
    fn publish(&self, st: &AttemptState) {
        let now = LogPosition {
            next_seq: st.next_seq,
            sealed: st.sealed,
        };
        self.position
            .send_if_modified(|pos| std::mem::replace(pos, now) != now);
    }
}

impl OpenFiles {
    /// Marks `key` most recently used; returns the keys evicted to stay within `cap`.
    fn touch(&mut self, key: &Key, cap: usize) -> Vec<Key> {
        self.tick += 1;
        if let Some(old) = self.by_key.insert(key.clone(), self.tick) {
            self.by_tick.remove(&old);
        }
        self.by_tick.insert(self.tick, key.clone());
        let mut victims = Vec::new();
        while self.by_key.len() > cap {
            let Some((_, victim)) = self.by_tick.pop_first() else {
                break;
            };
            self.by_key.remove(&victim);
            victims.push(victim);
        }
        victims
    }

    fn forget(&mut self, key: &Key) {
        if let Some(tick) = self.by_key.remove(key) {
            self.by_tick.remove(&tick);
        }
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

fn encode_record(buf: &mut Vec<u8>, chunk: &proto::LogChunk) -> Result<()> {
    let len = chunk.encoded_len();
    if len > MAX_BODY {
        return Err(Error::invalid(format!(
            "log chunk {} is too large ({len} bytes)",
            chunk.seq
        )));
    }
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER_LEN]);
    chunk.encode_raw(buf);
    let crc = crc32fast::hash(&buf[start + HEADER_LEN..]);
    buf[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    buf[start + 4..start + HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Reads records from `input`, which starts at file offset `offset`, calling
/// `f(offset, chunk)` for each until it returns false, the input ends or a record is torn
/// or corrupt. Returns the offset after the last record accepted.
fn scan(
    input: impl Read,
    mut offset: u64,
    mut f: impl FnMut(u64, proto::LogChunk) -> bool,
) -> Result<u64> {
    let mut reader = BufReader::with_capacity(64 * 1024, input);
    let mut header = [0u8; HEADER_LEN];
    let mut body = Vec::new();
    loop {
        if !read_full(&mut reader, &mut header)? {
            return Ok(offset);
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_BODY {
            return Ok(offset);
        }
        body.resize(len, 0);
        if !read_full(&mut reader, &mut body)? || crc32fast::hash(&body) != crc {
            return Ok(offset);
        }
        let Ok(chunk) = proto::LogChunk::decode(body.as_slice()) else {
            return Ok(offset);
        };
        if !f(offset, chunk) {
            return Ok(offset);
        }
        offset += (HEADER_LEN + len) as u64;
    }
}

/// Fills `buf`; false if the input ended first (cleanly or mid-record).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Locks a mutex, ignoring poisoning: every critical section leaves the state consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
