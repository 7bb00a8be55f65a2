//! The worker's spool: a durable on-disk record of every attempt this worker holds, so no
//! log chunk or result is lost to a dropped stream or a worker restart.
//!
//! One append-only file per attempt, `<dir>/<task_id>.<fencing_token>.spool`, holding
//! checksummed records: the `Assign` first, then the log chunks in sequence order, then at
//! most one `Finished`. Appends are written straight to the OS (they survive a killed
//! worker); only [`Spool::finish`] waits for the disk. A torn last record (a crash in the
//! middle of a write) is cut off when the file is next opened.
//!
//! The spool does not decide what to replay or when to drop an attempt: the connection
//! does, from the controller's acks. Its methods are synchronous and cheap (one `write` per
//! call), safe to call from async code; no lock is held across an `.await`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prost::Message;
use scabbard_common::proto;
use scabbard_common::{Error, Result};

const TAG_ASSIGN: u8 = 1;
const TAG_CHUNK: u8 = 2;
const TAG_FINISHED: u8 = 3;
/// Length + CRC32 of the body; the body is a tag byte and a prost-encoded message.
const HEADER_LEN: usize = 8;
/// Anything longer is garbage (chunks are at most 64 KiB).
const MAX_BODY: usize = 16 << 20;
const EXTENSION: &str = "spool";

/// An attempt found on disk by [`Spool::load_all`].
#[derive(Debug, Clone, PartialEq)]
pub struct SpooledAttempt {
    /// The assignment the attempt started from.
    pub assign: proto::Assign,
    /// Sequence number of the last log chunk recorded, if any.
    pub last_seq: Option<u64>,
    /// The attempt's result, if it finished.
    pub finished: Option<proto::Finished>,
}

/// The on-disk record of the attempts this worker holds. See the module docs.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    /// Attempts with an open file, by (task id, fencing token).
    open: Mutex<HashMap<AttemptKey, Arc<Mutex<AttemptFile>>>>,
}

/// (task id, fencing token).
type AttemptKey = (String, u64);

/// The write side of one attempt's file.
#[derive(Debug)]
struct AttemptFile {
    file: File,
    last_seq: Option<u64>,
    finished: bool,
    /// Reused encode buffer.
    buf: Vec<u8>,
}

impl Spool {
    /// Opens (creating if needed) the spool directory.
    pub fn open(dir: &Path) -> Result<Spool> {
        std::fs::create_dir_all(dir)?;
        Ok(Spool {
            dir: dir.to_path_buf(),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Starts recording an attempt by persisting its `Assign`. Fails with `AlreadyExists`
    /// if the attempt is already spooled.
    pub fn begin(&self, assign: &proto::Assign) -> Result<()> {
        let path = self.path(&assign.task_id, assign.fencing_token)?;
        let key = (assign.task_id.clone(), assign.fencing_token);
        let mut open = lock(&self.open);
        if open.contains_key(&key) {
            return Err(already_spooled(&key));
        }
        let file = match OpenOptions::new().append(true).create_new(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(already_spooled(&key));
            }
            Err(e) => return Err(e.into()),
        };
        let mut attempt = AttemptFile {
            file,
            last_seq: None,
            finished: false,
            buf: Vec::new(),
        };
        if let Err(e) = attempt.write(TAG_ASSIGN, assign) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        open.insert(key, Arc::new(Mutex::new(attempt)));
        Ok(())
    }

    /// Records a log chunk. Chunks of one attempt must come in sequence: 0, 1, 2, ...
    pub fn append_chunk(&self, chunk: &proto::AgentLogChunk) -> Result<()> {
        let attempt = self.attempt(&chunk.task_id, chunk.fencing_token)?;
        let mut attempt = lock(&attempt);
        if attempt.finished {
            return Err(Error::FailedPrecondition(format!(
                "attempt {}/{} already finished",
                chunk.task_id, chunk.fencing_token
            )));
        }
        let expected = attempt.last_seq.map_or(0, |s| s + 1);
        if chunk.seq != expected {
            return Err(Error::invalid(format!(
                "log chunk {} of attempt {}/{} out of order (expected {expected})",
                chunk.seq, chunk.task_id, chunk.fencing_token
            )));
        }
        attempt.write(TAG_CHUNK, chunk)?;
        attempt.last_seq = Some(chunk.seq);
        Ok(())
    }

    /// Records the attempt's result (written to the OS, like every record: it survives the
    /// worker process dying; a machine crash loses only unacknowledged attempts, which the
    /// controller requeues after the agent's lease). Closes the attempt's file; it stays
    /// readable until [`Spool::remove`].
    pub fn finish(&self, finished: &proto::Finished) -> Result<()> {
        let key = (finished.task_id.clone(), finished.fencing_token);
        let attempt = self.attempt(&key.0, key.1)?;
        {
            let mut attempt = lock(&attempt);
            if attempt.finished {
                return Err(Error::FailedPrecondition(format!(
                    "attempt {}/{} already finished",
                    key.0, key.1
                )));
            }
            attempt.write(TAG_FINISHED, finished)?;
            attempt.finished = true;
        }
        lock(&self.open).remove(&key);
        Ok(())
    }

    /// The attempt's log chunks with `seq >= from_seq`, in order, for replay after a
    /// reconnect.
    pub fn chunks_from(
        &self,
        task_id: &str,
        fencing_token: u64,
        from_seq: u64,
    ) -> Result<Vec<proto::AgentLogChunk>> {
        let path = self.path(task_id, fencing_token)?;
        // Holding the attempt's lock keeps a concurrent append from showing up half-written.
        let open = lock(&self.open)
            .get(&(task_id.to_string(), fencing_token))
            .cloned();
        let _writer = open.as_ref().map(|a| lock(a));
        let file = File::open(&path).map_err(|e| not_found(e, task_id, fencing_token))?;
        let mut chunks = Vec::new();
        scan(file, |tag, body| {
            if tag == TAG_CHUNK {
                let chunk = proto::AgentLogChunk::decode(body).ok()?;
                if chunk.seq >= from_seq {
                    chunks.push(chunk);
                }
            }
            Some(())
        })?;
        Ok(chunks)
    }

    /// Forgets an attempt and deletes its file. Removing an unknown attempt is not an error.
    pub fn remove(&self, task_id: &str, fencing_token: u64) -> Result<()> {
        let path = self.path(task_id, fencing_token)?;
        lock(&self.open).remove(&(task_id.to_string(), fencing_token));
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Every attempt on disk, e.g. after a restart. Cuts off torn last records; deletes
    /// files without a readable `Assign` (a crash during [`Spool::begin`]).
    pub fn load_all(&self) -> Result<Vec<SpooledAttempt>> {
        let mut attempts = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some(EXTENSION) {
                continue;
            }
            // An attempt being written to is read under its lock: no write shows up half-done.
            let writer = path
                .file_stem()
                .and_then(|stem| stem.to_str())
                .and_then(|stem| stem.rsplit_once('.'))
                .and_then(|(task_id, token)| {
                    Some((task_id.to_string(), token.parse::<u64>().ok()?))
                })
                .and_then(|key| lock(&self.open).get(&key).cloned());
            let _writing = writer.as_ref().map(|w| lock(w));
            let file = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(file) => file,
                // Removed since the directory was listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            match recover(&path, file)? {
                Some(attempt) => attempts.push(attempt),
                None => {
                    tracing::warn!(path = %path.display(), "dropping spool file without an assignment");
                    std::fs::remove_file(&path)?;
                }
            }
        }
        attempts.sort_by(|a, b| {
            (&a.assign.task_id, a.assign.fencing_token)
                .cmp(&(&b.assign.task_id, b.assign.fencing_token))
        });
        Ok(attempts)
    }

    /// The attempt's open file, reopening it (after a restart) if needed.
    fn attempt(&self, task_id: &str, fencing_token: u64) -> Result<Arc<Mutex<AttemptFile>>> {
        let path = self.path(task_id, fencing_token)?;
        let key = (task_id.to_string(), fencing_token);
        let mut open = lock(&self.open);
        if let Some(attempt) = open.get(&key) {
            return Ok(attempt.clone());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| not_found(e, task_id, fencing_token))?;
        let Some(found) = recover(&path, file)? else {
            return Err(Error::not_found(
                "spooled attempt",
                format!("{task_id}/{fencing_token}"),
            ));
        };
        let attempt = Arc::new(Mutex::new(AttemptFile {
            file: OpenOptions::new().append(true).open(&path)?,
            last_seq: found.last_seq,
            finished: found.finished.is_some(),
            buf: Vec::new(),
        }));
        open.insert(key, attempt.clone());
        Ok(attempt)
    }

    fn path(&self, task_id: &str, fencing_token: u64) -> Result<PathBuf> {
        let valid = !task_id.is_empty()
            && !task_id.starts_with('.')
            && task_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            return Err(Error::invalid(format!("invalid task id {task_id:?}")));
        }
        Ok(self
            .dir
            .join(format!("{task_id}.{fencing_token}.{EXTENSION}")))
    }
}

impl AttemptFile {
    /// Appends one record with a single `write` (no user-space buffering across calls).
    fn write(&mut self, tag: u8, msg: &impl Message) -> Result<()> {
        self.buf.clear();
        encode_record(&mut self.buf, tag, msg);
        self.file.write_all(&self.buf)?;
        Ok(())
    }
}

fn encode_record(buf: &mut Vec<u8>, tag: u8, msg: &impl Message) {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER_LEN]);
    buf.push(tag);
    msg.encode_raw(buf);
    let body = &buf[start + HEADER_LEN..];
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes();
    let crc = crc32fast::hash(body).to_le_bytes();
    buf[start..start + 4].copy_from_slice(&len);
    buf[start + 4..start + HEADER_LEN].copy_from_slice(&crc);
}

/// Reads records until the end or the first torn/corrupt one, calling `record(tag, body)`
/// for each; `record` returning `None` counts as corruption. Returns the length of the
/// valid prefix.
fn scan(file: File, mut record: impl FnMut(u8, &[u8]) -> Option<()>) -> Result<u64> {
    let mut reader = BufReader::new(file);
    let mut valid = 0u64;
    let mut header = [0u8; HEADER_LEN];
    let mut body = Vec::new();
    loop {
        if !read_full(&mut reader, &mut header)? {
            return Ok(valid);
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len == 0 || len > MAX_BODY {
            return Ok(valid);
        }
        body.resize(len, 0);
        if !read_full(&mut reader, &mut body)? || crc32fast::hash(&body) != crc {
            return Ok(valid);
        }
        if record(body[0], &body[1..]).is_none() {
            return Ok(valid);
        }
        valid += (HEADER_LEN + len) as u64;
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

/// Reads an attempt's file (opened read-write), truncating a torn tail. `None` if it holds
/// no `Assign`.
fn recover(path: &Path, file: File) -> Result<Option<SpooledAttempt>> {
    let file_len = file.metadata()?.len();
    let mut assign = None;
    let mut last_seq = None;
    let mut finished = None;
    let valid = scan(file.try_clone()?, |tag, body| {
        match tag {
            TAG_ASSIGN if assign.is_none() => assign = Some(proto::Assign::decode(body).ok()?),
            TAG_CHUNK if assign.is_some() && finished.is_none() => {
                last_seq = Some(proto::AgentLogChunk::decode(body).ok()?.seq)
            }
            TAG_FINISHED if assign.is_some() && finished.is_none() => {
                finished = Some(proto::Finished::decode(body).ok()?)
            }
            _ => return None,
        }
        Some(())
    })?;
    if valid < file_len {
        tracing::warn!(path = %path.display(), valid, file_len, "cutting off a torn spool record");
        file.set_len(valid)?;
    }
    Ok(assign.map(|assign| SpooledAttempt {
        assign,
        last_seq,
        finished,
    }))
}

fn already_spooled(key: &AttemptKey) -> Error {
    Error::AlreadyExists(format!("attempt {}/{} is already spooled", key.0, key.1))
}

fn not_found(e: io::Error, task_id: &str, fencing_token: u64) -> Error {
    if e.kind() == io::ErrorKind::NotFound {
        Error::not_found("spooled attempt", format!("{task_id}/{fencing_token}"))
    } else {
        e.into()
    }
}

/// Locks a mutex, ignoring poisoning: every critical section leaves the state consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
