//! The journal's record format, and nothing about what records mean.
//!
//! A record is `len: u32 LE | crc32(body): u32 LE | body`, the body a tag byte followed by
//! a prost-encoded message. Records are position-independent: a record's bytes can be
//! copied to another segment as they are (compaction does).

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use prost::Message;
use scabbard_common::{Error, Result};

/// Length + CRC32 of the body.
pub(super) const HEADER_LEN: usize = 8;
/// Anything longer is garbage (log chunks are at most 64 KiB; an `Assign` is small).
pub(super) const MAX_BODY: usize = 16 << 20;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tag {
    /// An attempt's `Assign`: the attempt starts.
    Begin = 1,
    /// One `AgentLogChunk` of an attempt.
    Chunk = 2,
    /// The attempt's `Finished`.
    Finished = 3,
    /// An [`AttemptRef`]: forget the attempt and everything recorded for it before.
    Removed = 4,
    /// An [`AttemptRef`]: a complete copy of the attempt follows (`Begin`, its chunks, maybe
    /// `Finished`), replacing what was recorded before, once the matching `MoveEnd` is read.
    MoveStart = 5,
    /// An [`AttemptRef`]: ends (commits) the copy opened by `MoveStart`.
    MoveEnd = 6,
}

impl Tag {
    fn from_byte(b: u8) -> Option<Tag> {
        Some(match b {
            1 => Tag::Begin,
            2 => Tag::Chunk,
            3 => Tag::Finished,
            4 => Tag::Removed,
            5 => Tag::MoveStart,
            6 => Tag::MoveEnd,
            _ => return None,
        })
    }
}

/// Names an attempt in `Removed`, `MoveStart` and `MoveEnd` records.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct AttemptRef {
    /// The task's id.
    #[prost(string, tag = "1")]
    pub(super) task_id: String,
    /// The attempt's fencing token.
    #[prost(uint64, tag = "2")]
    pub(super) fencing_token: u64,
}

/// Appends one record to `buf`; returns its length.
pub(super) fn encode(buf: &mut Vec<u8>, tag: Tag, msg: &impl Message) -> Result<u32> {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER_LEN]);
    buf.push(tag as u8);
    msg.encode_raw(buf);
    let body_len = buf.len() - start - HEADER_LEN;
    if body_len > MAX_BODY {
        buf.truncate(start);
        return Err(Error::invalid(format!(
            "spool record of {body_len} bytes is too large (at most {MAX_BODY})"
        )));
    }
    let crc = crc32fast::hash(&buf[start + HEADER_LEN..]).to_le_bytes();
    buf[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    buf[start + 4..start + HEADER_LEN].copy_from_slice(&crc);
    Ok((HEADER_LEN + body_len) as u32)
}

/// Splits one whole record (as located by the index) into its tag and message bytes,
/// checking length and checksum.
pub(super) fn check(record: &[u8]) -> std::result::Result<(Tag, &[u8]), String> {
    let (header, body) = record
        .split_at_checked(HEADER_LEN)
        .ok_or("record shorter than its header")?;
    let (len, crc) = parse_header(header);
    if len != body.len() || len == 0 {
        return Err(format!("record length {len} does not match {}", body.len()));
    }
    if crc32fast::hash(body) != crc {
        return Err("record checksum mismatch".into());
    }
    let tag = Tag::from_byte(body[0]).ok_or_else(|| format!("unknown record tag {}", body[0]))?;
    Ok((tag, &body[1..]))
}

fn parse_header(header: &[u8]) -> (usize, u32) {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    (len, crc)
}

/// One step of a sequential [`Reader`].
#[derive(Debug)]
pub(super) enum Next<'a> {
    /// A well-formed record at `offset`, `len` bytes long in all.
    Record {
        offset: u64,
        len: u32,
        tag: Tag,
        body: &'a [u8],
    },
    /// A torn or corrupt record at `offset`: nothing from there on can be trusted.
    Bad { offset: u64, why: String },
    /// The clean end of the file.
    End,
}

/// Reads a file's records front to back.
pub(super) struct Reader<R> {
    input: BufReader<R>,
    offset: u64,
    body: Vec<u8>,
}

impl<R: Read> Reader<R> {
    pub(super) fn new(input: R) -> Reader<R> {
        Reader {
            input: BufReader::with_capacity(256 << 10, input),
            offset: 0,
            body: Vec::new(),
        }
    }

    /// The next record; after `Bad` or `End` the reader must not be used again.
    pub(super) fn next_record(&mut self) -> Result<Next<'_>> {
        let offset = self.offset;
        let mut header = [0u8; HEADER_LEN];
        match read_full(&mut self.input, &mut header)? {
            Fill::Empty => return Ok(Next::End),
            Fill::Partial => return Ok(bad(offset, "torn record header")),
            Fill::Full => {}
        }
        let (len, crc) = parse_header(&header);
        if len == 0 || len > MAX_BODY {
            return Ok(bad(offset, format!("impossible record length {len}")));
        }
        self.body.resize(len, 0);
        if !matches!(read_full(&mut self.input, &mut self.body)?, Fill::Full) {
            return Ok(bad(offset, "torn record"));
        }
        if crc32fast::hash(&self.body) != crc {
            return Ok(bad(offset, "record checksum mismatch"));
        }
        let Some(tag) = Tag::from_byte(self.body[0]) else {
            return Ok(bad(offset, format!("unknown record tag {}", self.body[0])));
        };
        self.offset += (HEADER_LEN + len) as u64;
        Ok(Next::Record {
            offset,
            len: (HEADER_LEN + len) as u32,
            tag,
            body: &self.body[1..],
        })
    }
}

fn bad(offset: u64, why: impl Into<String>) -> Next<'static> {
    Next::Bad {
        offset,
        why: why.into(),
    }
}

enum Fill {
    Empty,
    Partial,
    Full,
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<Fill> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(match filled {
        0 => Fill::Empty,
        n if n < buf.len() => Fill::Partial,
        _ => Fill::Full,
    })
}

/// Reads the whole records at `spans` (offset, length) of `file` (at `path`), in the order
/// given, calling `each` with every record's bytes. Records close together are read with
/// one `pread`.
pub(super) fn read_at(
    file: &File,
    path: &Path,
    spans: &[(u64, u32)],
    mut each: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    /// Gaps up to this size (other attempts' records) are read rather than skipped.
    const MAX_GAP: u64 = 16 << 10;
    /// One read covers at most this much (unless a single record is larger).
    const MAX_READ: u64 = 1 << 20;
    let mut buf = Vec::new();
    let mut i = 0;
    while i < spans.len() {
        let start = spans[i].0;
        let mut end = start + u64::from(spans[i].1);
        let mut j = i + 1;
        while let Some(&(offset, len)) = spans.get(j) {
            let next_end = offset + u64::from(len);
            if offset < end || offset - end > MAX_GAP || next_end - start > MAX_READ {
                break;
            }
            end = next_end;
            j += 1;
        }
        buf.resize((end - start) as usize, 0);
        file.read_exact_at(&mut buf, start)
            .map_err(|e| Error::internal(format!("{}: {e}", path.display())))?;
        for &(offset, len) in &spans[i..j] {
            let at = (offset - start) as usize;
            each(&buf[at..at + len as usize])?;
        }
        i = j;
    }
    Ok(())
}
