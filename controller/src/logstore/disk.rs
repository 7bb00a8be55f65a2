//! The blocking side of the log store: per-attempt state, files, the open-handle LRU and
//! the in-memory cache of attempts. Everything here runs on the blocking pool (or takes
//! only short locks); nothing here awaits.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use scabbard_common::proto;
use scabbard_common::{Error, Result};
use tokio::sync::watch;

use super::record::scan;
use super::{LogPosition, LogStoreLimits};

/// One index entry per this many chunks.
const INDEX_EVERY: u64 = 64;

/// (task id, attempt number).
pub(super) type Key = (String, u32);

/// What the store's handle and its blocking tasks share.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) dir: PathBuf,
    limits: LogStoreLimits,
    pub(super) cache: Mutex<Cache>,
    open_files: Mutex<OpenFiles>,
}

/// The attempts in memory.
#[derive(Debug)]
pub(super) struct Cache {
    pub(super) attempts: HashMap<Key, Arc<AttemptLog>>,
    /// Idle attempts are dropped when the cache reaches this size.
    sweep_at: usize,
}

/// One attempt's log: its state and the position followers watch.
#[derive(Debug)]
pub(super) struct AttemptLog {
    pub(super) key: Key,
    /// The state was read from disk (or found absent).
    pub(super) loaded: AtomicBool,
    pub(super) state: Mutex<AttemptState>,
    pub(super) position: watch::Sender<LogPosition>,
}

/// What is known about an attempt's file.
#[derive(Debug, Default)]
pub(super) struct AttemptState {
    pub(super) file: Option<File>,
    /// Length of the valid records in the file.
    len: u64,
    next_seq: u64,
    /// Bytes of chunk data stored.
    pub(super) bytes: u64,
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
pub(super) struct Record {
    pub(super) seq: u64,
    /// Offset of the encoded record in the batch buffer.
    pub(super) start: usize,
    /// Length of the encoded record.
    pub(super) len: usize,
    /// Length of the chunk's data.
    pub(super) data_len: usize,
}

impl Shared {
    pub(super) fn new(dir: PathBuf, limits: LogStoreLimits) -> Self {
        Shared {
            dir,
            limits,
            cache: Mutex::new(Cache {
                attempts: HashMap::new(),
                sweep_at: limits.max_cached_attempts,
            }),
            open_files: Mutex::new(OpenFiles::default()),
        }
    }

    /// The attempt's entry, created if needed; drops idle entries when the cache is full.
    pub(super) fn entry(&self, task_id: &str, attempt: u32) -> Arc<AttemptLog> {
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
    pub(super) fn load(&self, entry: &AttemptLog, st: &mut AttemptState) -> Result<()> {
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

    pub(super) fn append(&self, entry: &AttemptLog, buf: &[u8], records: &[Record]) -> Result<u64> {
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
                Some(file) => file.write_all(&data).inspect_err(|_| {
                    let _ = file.set_len(len);
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
            st.file = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(scabbard_common::private::FILE_MODE)
                    .open(path)?,
            );
        }
        Ok(lock(&self.open_files).touch(&entry.key, self.limits.max_open_files))
    }

    /// Creates the task's directory; true if it did not exist.
    fn create_task_dir(&self, key: &Key) -> Result<bool> {
        let made = std::fs::DirBuilder::new()
            .mode(scabbard_common::private::DIR_MODE)
            .create(self.task_dir(key));
        match made {
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

    pub(super) fn read(
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

    pub(super) fn seal(&self, entry: &AttemptLog) -> Result<()> {
        let mut st = lock(&entry.state);
        self.load(entry, &mut st)?;
        if st.sealed {
            return Ok(());
        }
        self.sync_one(entry, &mut st)?;
        let new_dir = self.create_task_dir(&entry.key)?;
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(scabbard_common::private::FILE_MODE)
            .open(self.sealed_path(&entry.key))?;
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

    /// The sealed attempt's file: path, valid length, chunk count, data bytes.
    pub(super) fn sealed_file(&self, entry: &AttemptLog) -> Result<(PathBuf, u64, u64, u64)> {
        let mut st = lock(&entry.state);
        self.load(entry, &mut st)?;
        if !st.sealed {
            return Err(Error::FailedPrecondition(format!(
                "log of {}/{} is not sealed",
                entry.key.0, entry.key.1
            )));
        }
        Ok((self.log_path(&entry.key), st.len, st.next_seq, st.bytes))
    }

    pub(super) fn sync(&self, entries: &[Arc<AttemptLog>]) -> Result<()> {
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
                None => match File::open(self.log_path(&entry.key)) {
                    Ok(file) => file.sync_data()?,
                    // Nothing was ever written (a failed first append).
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                },
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

/// Locks a mutex, ignoring poisoning: every critical section leaves the state consistent.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
