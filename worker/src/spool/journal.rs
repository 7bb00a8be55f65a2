//! The journal: the segment files of one spool directory and the in-memory index of the
//! attempts recorded in them. It owns appending records, rotating to a new segment and
//! deleting dead ones; `compaction` copies attempts out of old segments and `replay`
//! rebuilds the journal from disk. It knows nothing of locking (the [`super::Spool`] holds it
//! in a mutex) and never holds log bytes in memory.
//!
//! Segments are deleted strictly oldest first. That keeps `Removed` records correct without
//! any bookkeeping: a `Removed` record only cancels records *before* it, and it stays on
//! disk at least as long as every older segment does. A dead segment behind a live one waits
//! until compaction moves the live attempts out of the oldest segment.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use scabbard_common::{Error, Result, proto};

use super::record::{self, AttemptRef, Tag};
use super::{SpoolLimits, SpooledAttempt};

/// (task id, fencing token).
pub(super) type AttemptKey = (String, u64);

/// Segments by id; ids only grow, so iteration is oldest first.
pub(super) type Segments = BTreeMap<u64, Segment>;

/// Where one record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loc {
    pub(super) segment: u64,
    pub(super) offset: u64,
    /// Of the whole record, header included.
    pub(super) len: u32,
}

/// An open segment file, shared with readers that work outside the spool's lock (an open
/// file stays readable after it is deleted).
#[derive(Debug)]
pub(super) struct SegmentFile {
    pub(super) path: PathBuf,
    pub(super) file: File,
}

/// One segment and how much of it still matters.
#[derive(Debug)]
pub(super) struct Segment {
    pub(super) file: Arc<SegmentFile>,
    /// Length of the valid records (the file's length).
    pub(super) len: u64,
    /// Bytes of records of live attempts.
    pub(super) live_bytes: u64,
    /// Live attempts with at least one record here.
    pub(super) live_attempts: usize,
}

/// What the index keeps of one live attempt.
#[derive(Debug)]
pub(super) struct Attempt {
    pub(super) assign: proto::Assign,
    pub(super) finished: Option<proto::Finished>,
    /// Where log chunk `seq` is, at index `seq`.
    pub(super) chunks: Vec<Loc>,
    /// Bytes of this attempt's records per segment, oldest segment first.
    shares: Vec<(u64, u64)>,
}

impl Attempt {
    pub(super) fn new(assign: proto::Assign) -> Attempt {
        Attempt {
            assign,
            finished: None,
            chunks: Vec::new(),
            shares: Vec::new(),
        }
    }

    /// The sequence number the next log chunk must have.
    pub(super) fn next_seq(&self) -> u64 {
        self.chunks.len() as u64
    }

    /// Counts `bytes` more of this attempt's records in `segment` (the newest it uses) as live.
    pub(super) fn charge(&mut self, segments: &mut Segments, segment: u64, bytes: u64) {
        let Some(seg) = segments.get_mut(&segment) else {
            return;
        };
        match self.shares.last_mut() {
            Some((s, b)) if *s == segment => *b += bytes,
            _ => {
                self.shares.push((segment, bytes));
                seg.live_attempts += 1;
            }
        }
        seg.live_bytes += bytes;
    }

    /// Stops counting this attempt's records as live (it was removed or replaced).
    pub(super) fn discharge(&self, segments: &mut Segments) {
        for (segment, bytes) in &self.shares {
            if let Some(seg) = segments.get_mut(segment) {
                seg.live_attempts -= 1;
                seg.live_bytes -= bytes;
            }
        }
    }

    pub(super) fn oldest_segment(&self) -> Option<u64> {
        self.shares.first().map(|&(s, _)| s)
    }
}

/// Chunk records to read: per segment file, (offset, len) spans in order.
pub(super) type Reads = Vec<(Arc<SegmentFile>, Vec<(u64, u32)>)>;

/// The segments and the index. See the module docs.
#[derive(Debug)]
pub(super) struct Journal {
    pub(super) dir: PathBuf,
    pub(super) limits: SpoolLimits,
    pub(super) segments: Segments,
    /// The segment appended to: the newest.
    pub(super) active: u64,
    pub(super) attempts: HashMap<AttemptKey, Attempt>,
    /// Reused encode buffer.
    buf: Vec<u8>,
    /// Set when a failed write could not be cut off again: anything appended after it would
    /// be unreadable.
    broken: Option<String>,
    /// Length of the active segment from which the next rotation is tried.
    rotate_at: u64,
}

impl Journal {
    /// A journal over `segments` (at least one: the last is the active one) and `attempts`.
    pub(super) fn new(
        dir: PathBuf,
        limits: SpoolLimits,
        segments: Segments,
        attempts: HashMap<AttemptKey, Attempt>,
    ) -> Journal {
        let active = segments.last_key_value().map_or(0, |(&id, _)| id);
        Journal {
            dir,
            limits,
            segments,
            active,
            attempts,
            buf: Vec::new(),
            broken: None,
            rotate_at: limits.segment_bytes,
        }
    }

    pub(super) fn begin(&mut self, assign: &proto::Assign) -> Result<()> {
        let key = (assign.task_id.clone(), assign.fencing_token);
        if self.attempts.contains_key(&key) {
            return Err(Error::AlreadyExists(format!(
                "attempt {}/{} is already spooled",
                key.0, key.1
            )));
        }
        let loc = self.append_record(Tag::Begin, assign)?;
        let mut attempt = Attempt::new(assign.clone());
        attempt.charge(&mut self.segments, loc.segment, loc.len.into());
        self.attempts.insert(key, attempt);
        self.after_write();
        Ok(())
    }

    pub(super) fn append_chunk(&mut self, chunk: &proto::AgentLogChunk) -> Result<()> {
        let key = (chunk.task_id.clone(), chunk.fencing_token);
        let attempt = self.writable(&key)?;
        let expected = attempt.next_seq();
        if chunk.seq != expected {
            return Err(Error::invalid(format!(
                "log chunk {} of attempt {}/{} out of order (expected {expected})",
                chunk.seq, key.0, key.1
            )));
        }
        let loc = self.append_record(Tag::Chunk, chunk)?;
        if let Some(attempt) = self.attempts.get_mut(&key) {
            attempt.chunks.push(loc);
            attempt.charge(&mut self.segments, loc.segment, loc.len.into());
        }
        self.after_write();
        Ok(())
    }

    pub(super) fn finish(&mut self, finished: &proto::Finished) -> Result<()> {
        let key = (finished.task_id.clone(), finished.fencing_token);
        self.writable(&key)?;
        let loc = self.append_record(Tag::Finished, finished)?;
        if let Some(attempt) = self.attempts.get_mut(&key) {
            attempt.finished = Some(finished.clone());
            attempt.charge(&mut self.segments, loc.segment, loc.len.into());
        }
        self.after_write();
        Ok(())
    }

    pub(super) fn remove(&mut self, task_id: &str, fencing_token: u64) -> Result<()> {
        let key = (task_id.to_string(), fencing_token);
        if !self.attempts.contains_key(&key) {
            return Ok(());
        }
        let removed = AttemptRef {
            task_id: key.0.clone(),
            fencing_token,
        };
        self.append_record(Tag::Removed, &removed)?;
        if let Some(attempt) = self.attempts.remove(&key) {
            attempt.discharge(&mut self.segments);
        }
        self.drop_dead_segments();
        self.after_write();
        Ok(())
    }

    /// Where the attempt's chunks with `seq >= from_seq` are.
    pub(super) fn chunk_reads(&self, key: &AttemptKey, from_seq: u64) -> Result<Reads> {
        let attempt = self.attempts.get(key).ok_or_else(|| not_found(key))?;
        let from = usize::try_from(from_seq).unwrap_or(usize::MAX);
        Ok(self.reads(attempt.chunks.get(from..).unwrap_or_default()))
    }

    /// Every live attempt, ordered by (task id, fencing token).
    pub(super) fn spooled(&self) -> Vec<SpooledAttempt> {
        let mut all: Vec<_> = self
            .attempts
            .values()
            .map(|a| SpooledAttempt {
                assign: a.assign.clone(),
                last_seq: a.next_seq().checked_sub(1),
                finished: a.finished.clone(),
            })
            .collect();
        all.sort_by(|a, b| {
            (&a.assign.task_id, a.assign.fencing_token)
                .cmp(&(&b.assign.task_id, b.assign.fencing_token))
        });
        all
    }

    /// The attempt, if it may still be written to.
    fn writable(&self, key: &AttemptKey) -> Result<&Attempt> {
        let attempt = self.attempts.get(key).ok_or_else(|| not_found(key))?;
        if attempt.finished.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "attempt {}/{} already finished",
                key.0, key.1
            )));
        }
        Ok(attempt)
    }

    /// The records at `locs`, grouped by segment (in order).
    pub(super) fn reads(&self, locs: &[Loc]) -> Reads {
        let mut reads: Reads = Vec::new();
        let mut segment = None;
        for loc in locs {
            match reads.last_mut() {
                Some((_, spans)) if segment == Some(loc.segment) => {
                    spans.push((loc.offset, loc.len));
                }
                // A live attempt's segments are never deleted.
                _ => reads.push((
                    self.segments[&loc.segment].file.clone(),
                    vec![(loc.offset, loc.len)],
                )),
            }
            segment = Some(loc.segment);
        }
        reads
    }

    /// Appends one record with a single `write`.
    fn append_record(&mut self, tag: Tag, msg: &impl Message) -> Result<Loc> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let written = record::encode(&mut buf, tag, msg).and_then(|len| {
            let offset = self.write(&buf)?;
            Ok(Loc {
                segment: self.active,
                offset,
                len,
            })
        });
        self.buf = buf;
        written
    }

    /// Appends whole records to the active segment; returns the offset they start at. A
    /// failed write is cut off again, so the segment always ends with a whole record.
    pub(super) fn write(&mut self, bytes: &[u8]) -> Result<u64> {
        if let Some(why) = &self.broken {
            return Err(Error::internal(format!("the spool is unusable: {why}")));
        }
        let seg = self
            .segments
            .get_mut(&self.active)
            .ok_or_else(|| Error::internal("the spool has no active segment"))?;
        let offset = seg.len;
        match (&seg.file.file).write_all(bytes) {
            Ok(()) => {
                seg.len += bytes.len() as u64;
                Ok(offset)
            }
            Err(e) => {
                let e = io_error(&seg.file.path, e);
                self.cut_back(offset);
                Err(e)
            }
        }
    }

    /// Truncates the active segment to `len` after a failed write.
    pub(super) fn cut_back(&mut self, len: u64) {
        let Some(seg) = self.segments.get_mut(&self.active) else {
            return;
        };
        match seg.file.file.set_len(len) {
            Ok(()) => seg.len = len,
            Err(e) => {
                let why = format!(
                    "cannot cut a failed write off {}: {e}",
                    seg.file.path.display()
                );
                tracing::error!("{why}");
                self.broken = Some(why);
            }
        }
    }

    /// Rotates (and compacts) once the active segment is full. The record that got us here
    /// is written, so a failure is logged and retried a little later, not returned.
    fn after_write(&mut self) {
        let len = self.segments.get(&self.active).map_or(0, |s| s.len);
        if len < self.rotate_at {
            return;
        }
        if let Err(e) = self.rotate().and_then(|()| self.compact()) {
            tracing::warn!(error = %e, "cannot rotate or compact the spool journal");
            self.rotate_at = len + (self.limits.segment_bytes / 8).max(1);
        }
    }

    /// Starts a new active segment.
    pub(super) fn rotate(&mut self) -> Result<()> {
        let id = self.active + 1;
        let path = segment_path(&self.dir, id);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        self.segments.insert(id, Segment::new(path, file, 0));
        self.active = id;
        self.rotate_at = self.limits.segment_bytes;
        Ok(())
    }

    /// Deletes the oldest segments while no live attempt is left in them (never the active
    /// one). False if a file could not be deleted (it is kept and retried later).
    pub(super) fn drop_dead_segments(&mut self) -> bool {
        while let Some(oldest) = self.segments.first_entry() {
            if *oldest.key() == self.active || oldest.get().live_attempts > 0 {
                break;
            }
            let path = &oldest.get().file.path;
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete a spool segment");
                    return false;
                }
                _ => {
                    oldest.remove();
                }
            }
        }
        true
    }
}

impl Segment {
    pub(super) fn new(path: PathBuf, file: File, len: u64) -> Segment {
        Segment {
            file: Arc::new(SegmentFile { path, file }),
            len,
            live_bytes: 0,
            live_attempts: 0,
        }
    }
}

/// `<dir>/journal-000042.log`.
pub(super) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("journal-{id:06}.log"))
}

/// The id of a segment file name, if it is one.
pub(super) fn segment_id(file_name: &str) -> Option<u64> {
    let digits = file_name.strip_prefix("journal-")?.strip_suffix(".log")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(super) fn not_found(key: &AttemptKey) -> Error {
    Error::not_found("spooled attempt", format!("{}/{}", key.0, key.1))
}

/// An I/O failure on `path`, naming it.
pub(super) fn io_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::internal(format!("{}: {e}", path.display()))
}

#[cfg(test)]
impl Journal {
    /// Checks the index against itself and the files, and returns every segment's
    /// (id, length, live bytes, live attempts) plus every attempt's chunk locations: what a
    /// replay of the files must rebuild exactly.
    #[allow(clippy::type_complexity)]
    pub(super) fn snapshot(&self) -> (Vec<(u64, u64, u64, usize)>, Vec<(AttemptKey, Vec<Loc>)>) {
        let mut shares: BTreeMap<u64, (u64, usize)> = BTreeMap::new();
        for attempt in self.attempts.values() {
            assert!(attempt.shares.windows(2).all(|w| w[0].0 < w[1].0));
            for &(segment, bytes) in &attempt.shares {
                let share = shares.entry(segment).or_default();
                share.0 += bytes;
                share.1 += 1;
            }
            for loc in &attempt.chunks {
                assert!(attempt.shares.iter().any(|&(s, _)| s == loc.segment));
            }
        }
        for (id, seg) in &self.segments {
            let share = shares.remove(id).unwrap_or_default();
            assert_eq!(share, (seg.live_bytes, seg.live_attempts), "segment {id}");
            assert_eq!(seg.file.file.metadata().unwrap().len(), seg.len);
        }
        assert!(shares.is_empty(), "shares of missing segments: {shares:?}");
        let segments = self
            .segments
            .iter()
            .map(|(&id, s)| (id, s.len, s.live_bytes, s.live_attempts))
            .collect();
        let mut attempts: Vec<_> = self
            .attempts
            .iter()
            .map(|(k, a)| (k.clone(), a.chunks.clone()))
            .collect();
        attempts.sort_by(|a, b| a.0.cmp(&b.0));
        (segments, attempts)
    }
}
