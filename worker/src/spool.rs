//! The worker's spool: a durable on-disk record of every attempt this worker holds, so no
//! log chunk or result is lost to a dropped stream or a worker restart.
//!
//! # Layout
//!
//! One append-only journal per worker: segment files `<dir>/journal-000001.log`,
//! `journal-000002.log`, ... of checksummed records (see `record`): `Begin` (the `Assign`),
//! `Chunk` (one `AgentLogChunk`), `Finished`, `Removed`, and the `MoveStart`/`MoveEnd`
//! brackets of a copy made by compaction. Only the newest segment is written to; once it
//! passes [`SpoolLimits::segment_bytes`] a new one is started. A call appends its record
//! with one `write` to the already open file: no file is created or deleted per attempt.
//!
//! In memory the spool keeps, per live attempt, its `Assign`, its `Finished` and where each
//! of its log chunks is (segment, offset, length), never the log bytes:
//! [`Spool::chunks_from`] reads just the chunks asked for, with `pread`, outside the lock.
//!
//! Disk space comes back segment by segment, oldest first: a segment is deleted once no
//! live attempt has a record in it and every older segment is gone (a `Removed` record must
//! outlive the records it cancels). When the oldest segment is mostly dead but pinned by a
//! few long-lived attempts, or dead segments pile up behind it, compaction copies those
//! attempts into the newest segment and deletes it (see [`SpoolLimits::compact_ratio`]).
//!
//! # Durability
//!
//! Every call's record reaches the OS before the call returns, so the spool survives the
//! worker process being killed (even with SIGKILL); nothing is fsynced. A machine crash can
//! lose the newest records, which only matters for attempts the controller has not
//! acknowledged, and the controller requeues those after the agent's lease runs out. When
//! the spool opens, a torn or corrupt tail of the newest segment (a write cut short) is cut
//! off; a corrupt record in an older segment fails the open, naming the file.
//!
//! # Not its job
//!
//! The spool does not decide what to replay or when to drop an attempt: the connection
//! does, from the controller's acks. Its methods are synchronous and cheap, safe to call
//! from async code; its one `std` mutex is never held across an `.await` (there is none).

use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use prost::Message;
use scabbard_common::proto;
use scabbard_common::{Error, Result};

use journal::{AttemptKey, Journal};
use record::Tag;

mod compaction;
mod journal;
mod legacy;
mod record;
mod replay;

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

/// How the spool's journal is cut into segments and compacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    /// A new segment is started once the current one reaches this many bytes.
    pub segment_bytes: u64,
    /// The oldest segment is compacted when its dead bytes exceed its live bytes this many
    /// times over, or when the closed segments' dead bytes (at least one segment's worth)
    /// exceed their live bytes this many times over. At least 1.
    pub compact_ratio: u32,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        SpoolLimits {
            segment_bytes: 64 << 20,
            compact_ratio: 2,
        }
    }
}

/// The on-disk record of the attempts this worker holds. See the module docs.
#[derive(Debug)]
pub struct Spool {
    journal: Mutex<Journal>,
}

impl Spool {
    /// Opens (creating if needed) the spool directory with the default limits, replaying
    /// what an earlier run left there.
    pub fn open(dir: &Path) -> Result<Spool> {
        Spool::open_with(dir, SpoolLimits::default())
    }

    /// Opens (creating if needed) the spool directory, replaying what an earlier run left
    /// there.
    pub fn open_with(dir: &Path, limits: SpoolLimits) -> Result<Spool> {
        if limits.segment_bytes == 0 || limits.compact_ratio == 0 {
            return Err(Error::invalid(format!("invalid spool limits {limits:?}")));
        }
        Ok(Spool {
            journal: Mutex::new(Journal::open(dir, limits)?),
        })
    }

    /// Starts recording an attempt by persisting its `Assign`. Fails with `AlreadyExists`
    /// if the attempt is already spooled.
    pub fn begin(&self, assign: &proto::Assign) -> Result<()> {
        check_task_id(&assign.task_id)?;
        lock(&self.journal).begin(assign)
    }

    /// Bytes of the journal's segments on disk (`scabbard_worker_spool_bytes`).
    pub fn disk_bytes(&self) -> u64 {
        lock(&self.journal).segments.values().map(|s| s.len).sum()
    }

    /// Records a log chunk. Chunks of one attempt must come in sequence: 0, 1, 2, ...
    pub fn append_chunk(&self, chunk: &proto::AgentLogChunk) -> Result<()> {
        check_task_id(&chunk.task_id)?;
        lock(&self.journal).append_chunk(chunk)
    }

    /// Records the attempt's result. No chunk can follow; the attempt stays readable until
    /// [`Spool::remove`].
    pub fn finish(&self, finished: &proto::Finished) -> Result<()> {
        check_task_id(&finished.task_id)?;
        lock(&self.journal).finish(finished)
    }

    /// The attempt's log chunks with `seq >= from_seq`, in order, for replay after a
    /// reconnect.
    pub fn chunks_from(
        &self,
        task_id: &str,
        fencing_token: u64,
        from_seq: u64,
    ) -> Result<Vec<proto::AgentLogChunk>> {
        check_task_id(task_id)?;
        let key: AttemptKey = (task_id.to_string(), fencing_token);
        // Only where the chunks are is taken under the lock; they are read after it (records
        // are never changed in place, and an open file outlives its deletion).
        let reads = lock(&self.journal).chunk_reads(&key, from_seq)?;
        let mut chunks = Vec::with_capacity(reads.iter().map(|(_, spans)| spans.len()).sum());
        for (file, spans) in &reads {
            record::read_at(&file.file, &file.path, spans, |rec| {
                let expected = from_seq + chunks.len() as u64;
                let chunk = decode_chunk(rec, &key, expected).map_err(|why| {
                    Error::internal(format!("spool journal {}: {why}", file.path.display()))
                })?;
                chunks.push(chunk);
                Ok(())
            })?;
        }
        Ok(chunks)
    }

    /// Forgets an attempt. Removing an unknown attempt is not an error.
    pub fn remove(&self, task_id: &str, fencing_token: u64) -> Result<()> {
        check_task_id(task_id)?;
        lock(&self.journal).remove(task_id, fencing_token)
    }

    /// Every attempt spooled and not removed, by (task id, fencing token): after a restart,
    /// what the previous run left (the journal is replayed when the spool opens).
    pub fn load_all(&self) -> Result<Vec<SpooledAttempt>> {
        Ok(lock(&self.journal).spooled())
    }
}

/// Task ids are restricted as they were when they named files.
fn check_task_id(task_id: &str) -> Result<()> {
    let valid = !task_id.is_empty()
        && !task_id.starts_with('.')
        && task_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(Error::invalid(format!("invalid task id {task_id:?}")));
    }
    Ok(())
}

/// Decodes a chunk record read back through the index, checking it is the one expected.
fn decode_chunk(
    rec: &[u8],
    key: &AttemptKey,
    seq: u64,
) -> std::result::Result<proto::AgentLogChunk, String> {
    let (tag, body) = record::check(rec)?;
    if tag != Tag::Chunk {
        return Err(format!("expected a log chunk record, found {tag:?}"));
    }
    let chunk = proto::AgentLogChunk::decode(body).map_err(|e| e.to_string())?;
    if chunk.task_id != key.0 || chunk.fencing_token != key.1 || chunk.seq != seq {
        return Err(format!(
            "found chunk {} of {}/{} where chunk {seq} of {}/{} should be",
            chunk.seq, chunk.task_id, chunk.fencing_token, key.0, key.1
        ));
    }
    Ok(chunk)
}

/// Locks a mutex, ignoring poisoning: every critical section leaves the state consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
