//! The on-disk record format of the log store: `len: u32 LE | crc32(body): u32 LE | body`,
//! where the body is a prost-encoded `LogChunk`.

use std::io::{self, BufReader, Read};

use prost::Message;
use scabbard_common::proto;
use scabbard_common::{Error, Result};

/// Length + CRC32 of the body.
const HEADER_LEN: usize = 8;
/// Largest record body accepted.
const MAX_BODY: usize = 16 << 20;

pub(super) fn encode_record(buf: &mut Vec<u8>, chunk: &proto::LogChunk) -> Result<()> {
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
pub(super) fn scan(
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

/// Decodes the record at the start of `buf`: `None` if `buf` holds only part of it, else
/// the chunk and the record's length. A corrupt record is an error.
pub(super) fn decode_one(buf: &[u8]) -> Result<Option<(proto::LogChunk, usize)>> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len > MAX_BODY {
        return Err(Error::internal(format!(
            "log record of {len} bytes (at most {MAX_BODY})"
        )));
    }
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    if crc32fast::hash(body) != crc {
        return Err(Error::internal("log record checksum mismatch"));
    }
    let chunk = proto::LogChunk::decode(body)
        .map_err(|e| Error::internal(format!("log record does not decode: {e}")))?;
    Ok(Some((chunk, HEADER_LEN + len)))
}

/// Fills `buf`; false if the input ended first (cleanly or mid-record).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e.into()),
    }
}
