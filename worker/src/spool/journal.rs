//! The journal: the segment files of one spool directory and the in-memory index of the
//! attempts recorded in them. It owns appending records, rotating to a new segment,
//! compacting the oldest segment and deleting dead ones; [`super::replay`] rebuilds it from
//! disk. It knows nothing of locking (the [`super::Spool`] holds it in a mutex) and never
//! reads log bytes back into memory except to answer a read or copy them.
//!
//! Segments are deleted strictly oldest first. That keeps `Removed` records correct without
//! any bookkeeping: a `Removed` record only cancels records *before* it, and it stays on
//! disk at least as long as every older segment does. A dead segment behind a live one waits
//! until compaction moves the live attempts out of the oldest segment.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
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

    fn oldest_segment(&self) -> Option<u64> {
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

/// A move group being written: a complete copy of one attempt (see [`Tag::MoveStart`]).
pub(super) struct Group {
    key: AttemptKey,
    segment: u64,
    /// Where the group starts: cut back to here if it fails.
    start: u64,
    /// Where `out` will land.
    flushed: u64,
    out: Vec<u8>,
    chunks: Vec<Loc>,
}

/// Write a group out whenever this much is buffered.
const GROUP_FLUSH: usize = 1 << 20;

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

    fn reads(&self, locs: &[Loc]) -> Reads {
        let mut reads: Reads = Vec::new();
        for loc in locs {
            match reads.last_mut() {
                Some((file, spans)) if Arc::ptr_eq(file, &self.segments[&loc.segment].file) => {
                    spans.push((loc.offset, loc.len));
                }
                _ => reads.push((
                    self.segments[&loc.segment].file.clone(),
                    vec![(loc.offset, loc.len)],
                )),
            }
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
    fn write(&mut self, bytes: &[u8]) -> Result<u64> {
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
                self.cut_back(offset);
                Err(e.into())
            }
        }
    }

    /// Truncates the active segment to `len` after a failed write.
    fn cut_back(&mut self, len: u64) {
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
    pub(super) fn after_write(&mut self) {
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
            .open(&path)?;
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

    /// Copies the live attempts out of the oldest segments into the active one and deletes
    /// them, while [`Journal::worth_compacting`] says so. Only segments closed before the
    /// call are touched, so this ends.
    pub(super) fn compact(&mut self) -> Result<()> {
        let horizon = self.active;
        while self.drop_dead_segments() {
            let Some(&oldest) = self.segments.keys().next() else {
                break;
            };
            if oldest >= horizon || !self.worth_compacting(oldest) {
                break;
            }
            let keys: Vec<AttemptKey> = self
                .attempts
                .iter()
                .filter(|(_, a)| a.oldest_segment() == Some(oldest))
                .map(|(k, _)| k.clone())
                .collect();
            let moved_bytes: u64 = self.segments[&oldest].live_bytes;
            for key in &keys {
                self.relocate(key)?;
            }
            tracing::debug!(
                segment = oldest,
                attempts = keys.len(),
                moved_bytes,
                "compacted a spool segment"
            );
        }
        Ok(())
    }

    /// Whether the oldest segment should be compacted: it is mostly dead, or dead segments
    /// wait behind it.
    fn worth_compacting(&self, oldest: u64) -> bool {
        let ratio = u64::from(self.limits.compact_ratio);
        let seg = &self.segments[&oldest];
        if seg.len.saturating_sub(seg.live_bytes) > ratio.saturating_mul(seg.live_bytes) {
            return true;
        }
        let (len, live) = self
            .segments
            .iter()
            .filter(|(id, _)| **id != self.active)
            .fold((0, 0), |(len, live), (_, s)| (len + s.len, live + s.live_bytes));
        let dead = len.saturating_sub(live);
        dead >= self.limits.segment_bytes && dead > ratio.saturating_mul(live)
    }

    /// Rewrites an attempt's records at the end of the active segment as one move group.
    fn relocate(&mut self, key: &AttemptKey) -> Result<()> {
        let Some(attempt) = self.attempts.get(key) else {
            return Ok(());
        };
        let assign = attempt.assign.clone();
        let finished = attempt.finished.clone();
        let reads = self.reads(&attempt.chunks);
        let mut group = self.group_start(key.clone(), &assign)?;
        let copied = reads.iter().try_for_each(|(file, spans)| {
            record::read_at(&file.file, spans, |rec| {
                record::check(rec).map_err(|why| {
                    Error::internal(format!("{}: {why}", file.path.display()))
                })?;
                self.group_push(&mut group, rec)
            })
        });
        match copied {
            Ok(()) => self.group_end(group, assign, finished),
            Err(e) => {
                self.group_abort(group);
                Err(e)
            }
        }
    }

    /// Cuts off what a failed move group wrote.
    pub(super) fn group_abort(&mut self, group: Group) {
        self.cut_back(group.start);
    }

    /// Starts a move group for `key` (buffered; nothing is written yet).
    pub(super) fn group_start(&mut self, key: AttemptKey, assign: &proto::Assign) -> Result<Group> {
        let start = self.segments.get(&self.active).map_or(0, |s| s.len);
        let mut out = Vec::new();
        let r = AttemptRef {
            task_id: key.0.clone(),
            fencing_token: key.1,
        };
        record::encode(&mut out, Tag::MoveStart, &r)?;
        record::encode(&mut out, Tag::Begin, assign)?;
        Ok(Group {
            key,
            segment: self.active,
            start,
            flushed: start,
            out,
            chunks: Vec::new(),
        })
    }

    /// Adds the next log chunk's whole record to a move group.
    pub(super) fn group_push(&mut self, group: &mut Group, rec: &[u8]) -> Result<()> {
        group.chunks.push(Loc {
            segment: group.segment,
            offset: group.flushed + group.out.len() as u64,
            len: rec.len() as u32,
        });
        group.out.extend_from_slice(rec);
        if group.out.len() >= GROUP_FLUSH {
            self.group_flush(group)?;
        }
        Ok(())
    }

    fn group_flush(&mut self, group: &mut Group) -> Result<()> {
        let offset = self.write(&group.out)?;
        if offset != group.flushed || self.active != group.segment {
            return Err(Error::internal("spool move group written out of place"));
        }
        group.flushed += group.out.len() as u64;
        group.out.clear();
        Ok(())
    }

    /// Ends a move group and puts the copy in place of the attempt's old records. On error
    /// the whole group is cut off again.
    pub(super) fn group_end(
        &mut self,
        mut group: Group,
        assign: proto::Assign,
        finished: Option<proto::Finished>,
    ) -> Result<()> {
        let r = AttemptRef {
            task_id: group.key.0.clone(),
            fencing_token: group.key.1,
        };
        let written = finished
            .as_ref()
            .map_or(Ok(0), |f| record::encode(&mut group.out, Tag::Finished, f))
            .and_then(|_| record::encode(&mut group.out, Tag::MoveEnd, &r))
            .and_then(|_| self.group_flush(&mut group));
        if let Err(e) = written {
            self.cut_back(group.start);
            return Err(e);
        }
        let mut copy = Attempt::new(assign);
        copy.finished = finished;
        copy.chunks = group.chunks;
        copy.charge(&mut self.segments, group.segment, group.flushed - group.start);
        if let Some(old) = self.attempts.insert(group.key, copy) {
            old.discharge(&mut self.segments);
        }
        Ok(())
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
