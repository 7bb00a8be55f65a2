//! Compaction: copying the live attempts out of the oldest segment so it can be deleted.
//!
//! An attempt is copied whole (`Begin`, every chunk, `Finished`) as one move group at the end
//! of the active segment, bracketed by `MoveStart`/`MoveEnd`: a replay takes the copy only
//! once it reads the `MoveEnd`, so a worker killed mid-copy keeps the original. Chunk records
//! are copied byte for byte (after a checksum check), never decoded.

use scabbard_common::{Error, Result, proto};

use super::journal::{Attempt, AttemptKey, Journal, Loc};
use super::record::{self, AttemptRef, Tag};

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
            .fold((0, 0), |(len, live), (_, s)| {
                (len + s.len, live + s.live_bytes)
            });
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
            record::read_at(&file.file, &file.path, spans, |rec| {
                record::check(rec)
                    .map_err(|why| Error::internal(format!("{}: {why}", file.path.display())))?;
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
        copy.charge(
            &mut self.segments,
            group.segment,
            group.flushed - group.start,
        );
        if let Some(old) = self.attempts.insert(group.key, copy) {
            old.discharge(&mut self.segments);
        }
        Ok(())
    }
}
