//! Opening a spool: replaying every segment, oldest first, to rebuild the journal's index.
//!
//! Only the last segment is ever written to, so only it can end in a torn record (the worker
//! died mid-`write`) or an unfinished move group (it died while compacting): both are cut
//! off. Anything wrong in an older segment is corruption and fails the open, naming the
//! file. Records of an attempt whose `Begin` was in an already deleted segment are skipped:
//! the attempt was removed or moved, and a later record says so.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use prost::Message;
use scabbard_common::{Error, Result, proto};

use super::SpoolLimits;
use super::journal::{
    Attempt, AttemptKey, Journal, Loc, Segment, Segments, io_error, segment_id, segment_path,
};
use super::legacy;
use super::record::{AttemptRef, Next, Reader, Tag};

impl Journal {
    /// Opens (creating if needed) the spool in `dir` and replays its journal.
    pub(super) fn open(dir: &Path, limits: SpoolLimits) -> Result<Journal> {
        // Owner only: the journal holds task logs and results (tasks that run as another
        // user must not read them).
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        let mut ids = Vec::new();
        let mut legacy_files: Vec<PathBuf> = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = segment_id(name) {
                // Segments written by a version that left them 0644.
                fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o600))?;
                ids.push(id);
            } else if name.ends_with(legacy::EXTENSION) {
                legacy_files.push(entry.path());
            }
        }
        ids.sort_unstable();
        let mut replay = Replay {
            segments: BTreeMap::new(),
            attempts: HashMap::new(),
        };
        for (i, &id) in ids.iter().enumerate() {
            replay.segment(dir, id, i + 1 == ids.len())?;
        }
        if replay.segments.is_empty() {
            let path = segment_path(dir, 1);
            let file = OpenOptions::new()
                .read(true)
                .append(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| io_error(&path, e))?;
            replay.segments.insert(1, Segment::new(path, file, 0));
        }
        let mut journal = Journal::new(dir.to_path_buf(), limits, replay.segments, replay.attempts);
        legacy_files.sort();
        for path in legacy_files {
            legacy::import(&mut journal, &path)?;
        }
        // Rotation and compaction wait for the next write, as they would have without the restart.
        journal.drop_dead_segments();
        Ok(journal)
    }
}

/// The index being rebuilt.
struct Replay {
    segments: Segments,
    attempts: HashMap<AttemptKey, Attempt>,
}

/// A move group read up to its `MoveEnd`.
struct Pending {
    key: AttemptKey,
    /// Offset of the `MoveStart` record.
    start: u64,
    /// The copy, once its `Begin` is read.
    copy: Option<Attempt>,
}

impl Replay {
    /// Replays one segment; `last` is the one that will be appended to.
    fn segment(&mut self, dir: &Path, id: u64, last: bool) -> Result<()> {
        let path = segment_path(dir, id);
        let file = OpenOptions::new()
            .read(true)
            .append(last)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        let file_len = file.metadata()?.len();
        let segment = Segment::new(path.clone(), file, 0);
        let handle = segment.file.clone();
        self.segments.insert(id, segment);

        let mut reader = Reader::new(&handle.file);
        let mut pending = None;
        let mut cut = None;
        loop {
            match reader.next_record().map_err(|e| io_error(&path, e))? {
                Next::End => break,
                Next::Bad { offset, why } => {
                    cut = Some((offset, why));
                    break;
                }
                Next::Record {
                    offset,
                    len,
                    tag,
                    body,
                } => {
                    let loc = Loc {
                        segment: id,
                        offset,
                        len,
                    };
                    if let Err(why) = self.apply(&mut pending, loc, tag, body) {
                        cut = Some((offset, why));
                        break;
                    }
                }
            }
        }
        if let Some(p) = pending {
            let why = cut.map_or_else(|| "end of file".to_string(), |(_, why)| why);
            let why = format!(
                "copy of attempt {}/{} not finished ({why})",
                p.key.0, p.key.1
            );
            cut = Some((p.start, why));
        }
        let valid = match cut {
            None => file_len,
            Some((at, why)) if last => {
                tracing::warn!(
                    path = %path.display(), at, dropped_bytes = file_len - at, %why,
                    "cutting off the torn tail of the spool journal"
                );
                handle.file.set_len(at).map_err(|e| io_error(&path, e))?;
                at
            }
            Some((at, why)) => {
                return Err(Error::internal(format!(
                    "spool journal {} is corrupt at byte {at}: {why}",
                    path.display()
                )));
            }
        };
        if let Some(segment) = self.segments.get_mut(&id) {
            segment.len = valid;
        }
        Ok(())
    }

    /// Applies one record to the index; `Err` says why the record cannot be right.
    fn apply(
        &mut self,
        pending: &mut Option<Pending>,
        loc: Loc,
        tag: Tag,
        body: &[u8],
    ) -> std::result::Result<(), String> {
        if let Some(p) = pending {
            match tag {
                Tag::Begin if p.copy.is_none() => {
                    let assign: proto::Assign = decode(body)?;
                    same_attempt(&p.key, &assign.task_id, assign.fencing_token)?;
                    p.copy = Some(Attempt::new(assign));
                }
                Tag::Chunk => {
                    let chunk: proto::AgentLogChunk = decode(body)?;
                    same_attempt(&p.key, &chunk.task_id, chunk.fencing_token)?;
                    add_chunk(p.copy.as_mut().ok_or("chunk before Begin")?, chunk.seq, loc)?;
                }
                Tag::Finished => {
                    let finished: proto::Finished = decode(body)?;
                    same_attempt(&p.key, &finished.task_id, finished.fencing_token)?;
                    add_finished(p.copy.as_mut().ok_or("Finished before Begin")?, finished)?;
                }
                Tag::MoveEnd => {
                    let r: AttemptRef = decode(body)?;
                    same_attempt(&p.key, &r.task_id, r.fencing_token)?;
                    let mut copy = p.copy.take().ok_or("copy without Begin")?;
                    let bytes = loc.offset + u64::from(loc.len) - p.start;
                    copy.charge(&mut self.segments, loc.segment, bytes);
                    if let Some(old) = self.attempts.insert(p.key.clone(), copy) {
                        old.discharge(&mut self.segments);
                    }
                    *pending = None;
                }
                _ => return Err(format!("{tag:?} record inside a copy")),
            }
            return Ok(());
        }
        match tag {
            Tag::Begin => {
                let assign: proto::Assign = decode(body)?;
                let key = (assign.task_id.clone(), assign.fencing_token);
                if self.attempts.contains_key(&key) {
                    return Err(format!("attempt {}/{} begun twice", key.0, key.1));
                }
                let mut attempt = Attempt::new(assign);
                attempt.charge(&mut self.segments, loc.segment, loc.len.into());
                self.attempts.insert(key, attempt);
            }
            Tag::Chunk => {
                let chunk: proto::AgentLogChunk = decode(body)?;
                if let Some(a) = self.attempts.get_mut(&(chunk.task_id, chunk.fencing_token)) {
                    add_chunk(a, chunk.seq, loc)?;
                    a.charge(&mut self.segments, loc.segment, loc.len.into());
                }
            }
            Tag::Finished => {
                let finished: proto::Finished = decode(body)?;
                let key = (finished.task_id.clone(), finished.fencing_token);
                if let Some(a) = self.attempts.get_mut(&key) {
                    add_finished(a, finished)?;
                    a.charge(&mut self.segments, loc.segment, loc.len.into());
                }
            }
            Tag::Removed => {
                let r: AttemptRef = decode(body)?;
                if let Some(old) = self.attempts.remove(&(r.task_id, r.fencing_token)) {
                    old.discharge(&mut self.segments);
                }
            }
            Tag::MoveStart => {
                let r: AttemptRef = decode(body)?;
                *pending = Some(Pending {
                    key: (r.task_id, r.fencing_token),
                    start: loc.offset,
                    copy: None,
                });
            }
            Tag::MoveEnd => return Err("MoveEnd without MoveStart".into()),
        }
        Ok(())
    }
}

fn decode<M: Message + Default>(body: &[u8]) -> std::result::Result<M, String> {
    M::decode(body).map_err(|e| format!("undecodable record: {e}"))
}

fn same_attempt(key: &AttemptKey, task_id: &str, token: u64) -> std::result::Result<(), String> {
    if key.0 != task_id || key.1 != token {
        return Err(format!(
            "record of attempt {task_id}/{token} inside a copy of {}/{}",
            key.0, key.1
        ));
    }
    Ok(())
}

fn add_chunk(attempt: &mut Attempt, seq: u64, loc: Loc) -> std::result::Result<(), String> {
    if attempt.finished.is_some() {
        return Err(format!("log chunk {seq} after Finished"));
    }
    if seq != attempt.next_seq() {
        return Err(format!(
            "log chunk {seq} where {} was expected",
            attempt.next_seq()
        ));
    }
    attempt.chunks.push(loc);
    Ok(())
}

fn add_finished(
    attempt: &mut Attempt,
    finished: proto::Finished,
) -> std::result::Result<(), String> {
    if attempt.finished.is_some() {
        return Err("Finished twice".into());
    }
    attempt.finished = Some(finished);
    Ok(())
}
