//! Import of spool files written by earlier versions, which kept one file per attempt
//! (`<task_id>.<fencing_token>.spool`: an `Assign`, log chunks in order, maybe a
//! `Finished`, in the same record format). Each file becomes one move group in the journal
//! and is then deleted; a crash in between imports it again, replacing the first copy.

use std::fs::{self, File};
use std::io;
use std::path::Path;

use prost::Message;
use scabbard_common::{Result, proto};

use super::journal::Journal;
use super::record::{self, Next, Reader, Tag};

/// File name ending of the old per-attempt files.
pub(super) const EXTENSION: &str = ".spool";

/// Copies the readable part of one old file into the journal, then deletes the file. A file
/// without a readable `Assign` is just deleted.
pub(super) fn import(journal: &mut Journal, path: &Path) -> Result<()> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut reader = Reader::new(file);
    let assign = match reader.next_record()? {
        Next::Record {
            tag: Tag::Begin,
            body,
            ..
        } => proto::Assign::decode(body).ok(),
        _ => None,
    };
    match assign {
        Some(assign) => copy(journal, &mut reader, assign)?,
        None => {
            tracing::warn!(path = %path.display(), "dropping spool file without an assignment");
        }
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

fn copy(journal: &mut Journal, reader: &mut Reader<File>, assign: proto::Assign) -> Result<()> {
    let key = (assign.task_id.clone(), assign.fencing_token);
    let mut group = journal.group_start(key, &assign)?;
    let mut finished = None;
    let mut next_seq = 0;
    let mut rec = Vec::new();
    // The readable log ends at the first torn, corrupt or unexpected record, as it always did.
    let copied = loop {
        let (tag, body) = match reader.next_record() {
            Ok(Next::Record { tag, body, .. }) if finished.is_none() => (tag, body),
            Ok(_) => break Ok(()),
            Err(e) => break Err(e),
        };
        match tag {
            Tag::Chunk => match proto::AgentLogChunk::decode(body) {
                Ok(chunk) if chunk.seq == next_seq => {
                    rec.clear();
                    if let Err(e) = record::encode(&mut rec, Tag::Chunk, &chunk)
                        .and_then(|_| journal.group_push(&mut group, &rec))
                    {
                        break Err(e);
                    }
                    next_seq += 1;
                }
                _ => break Ok(()),
            },
            Tag::Finished => match proto::Finished::decode(body) {
                Ok(f) => finished = Some(f),
                Err(_) => break Ok(()),
            },
            _ => break Ok(()),
        }
    };
    match copied {
        Ok(()) => journal.group_end(group, assign, finished),
        Err(e) => {
            journal.group_abort(group);
            Err(e)
        }
    }
}
