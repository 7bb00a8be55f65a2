//! On-disk layout of the embedded store: the redb table definitions and the binary encoding
//! of a key's record. Owns nothing but bytes; the writer decides what to store.

use redb::TableDefinition;
use scabbard_common::{Error, Result};

use crate::store::{KeyValue, LeaseId};

/// Keys and their records (header + value bytes).
pub(super) const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// Store-wide counters: [`META_REVISION`], [`META_NEXT_LEASE`].
pub(super) const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
/// Live leases: id -> ttl in milliseconds.
pub(super) const LEASES: TableDefinition<i64, u64> = TableDefinition::new("leases");
/// Keys attached to a lease: key -> lease id. Kept with every write so that opening the
/// store reads only these, not every key (which grows with history).
pub(super) const LEASED: TableDefinition<&str, i64> = TableDefinition::new("leased");
/// 1 once [`LEASED`] holds every leased key (stores from before it are scanned once).
pub(super) const META_LEASED_INDEX: &str = "leased_index";

/// The store revision, bumped by one per transaction that writes.
pub(super) const META_REVISION: &str = "revision";
/// The next lease id to hand out (ids are never reused, even across restarts).
pub(super) const META_NEXT_LEASE: &str = "next_lease";

/// Sequence number of the last write-ahead log frame applied to the tables.
pub(super) const META_WAL_SEQ: &str = "wal_seq";

/// Revision of a store that has never been written (as etcd, the first write is revision 2).
pub(super) const INITIAL_REVISION: i64 = 1;

/// Longest key accepted, in bytes.
pub(super) const MAX_KEY_BYTES: usize = 64 * 1024;
/// Largest value accepted, in bytes (etcd's default request limit).
pub(super) const MAX_VALUE_BYTES: usize = 1536 * 1024;

/// Largest transaction accepted (keys and values of both branches), in bytes.
pub(super) const MAX_TXN_BYTES: usize = 32 * 1024 * 1024;
/// The writer stops adding requests to a batch past this many bytes.
pub(super) const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;

/// Header: create_revision, mod_revision, version, lease, each an i64 little-endian.
const HEADER_BYTES: usize = 32;

/// One key's state as stored: metadata and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    /// Revision of the write that created the key.
    pub(super) create_revision: i64,
    /// Revision of the last write.
    pub(super) mod_revision: i64,
    /// Writes since creation.
    pub(super) version: i64,
    /// Attached lease, 0 for none.
    pub(super) lease: LeaseId,
    /// Value bytes.
    pub(super) value: Vec<u8>,
}

impl Record {
    /// Encodes the record as a fixed header followed by the value.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + self.value.len());
        for n in [
            self.create_revision,
            self.mod_revision,
            self.version,
            self.lease,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&self.value);
        out
    }

    /// Decodes bytes written by [`Record::encode`]; `key` only names the culprit in errors.
    pub(super) fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        let Some((header, value)) = bytes.split_at_checked(HEADER_BYTES) else {
            return Err(Error::internal(format!(
                "corrupt record for key {key:?}: {} bytes, shorter than the {HEADER_BYTES}-byte header",
                bytes.len()
            )));
        };
        let field = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[i * 8..i * 8 + 8]);
            i64::from_le_bytes(b)
        };
        Ok(Self {
            create_revision: field(0),
            mod_revision: field(1),
            version: field(2),
            lease: field(3),
            value: value.to_vec(),
        })
    }

    /// Like [`Record::decode`] without the value (left empty): for a key about to be
    /// rewritten or deleted, whose old value is not needed (no copy of it).
    pub(super) fn decode_meta(key: &str, bytes: &[u8]) -> Result<Self> {
        let header = bytes.get(..HEADER_BYTES).unwrap_or(bytes);
        Self::decode(key, header)
    }

    /// The record as the trait's [`KeyValue`].
    pub(super) fn to_kv(&self, key: &str) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: self.value.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        }
    }
}

/// Maps a redb failure to the store's error: the caller may retry, the operator may need to
/// look at the disk.
pub(super) fn storage_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("embedded store: {what}: {e}"))
}

/// [`storage_err`] for reads, usable as `map_err(read_err)` on any redb error type.
pub(super) fn read_err<E: std::fmt::Display>(e: E) -> Error {
    storage_err("read", e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips() {
        let r = Record {
            create_revision: 2,
            mod_revision: i64::MAX,
            version: -1,
            lease: 7,
            value: b"hello".to_vec(),
        };
        assert_eq!(Record::decode("k", &r.encode()).unwrap(), r);
    }

    #[test]
    fn short_record_is_an_error_not_a_panic() {
        assert!(matches!(
            Record::decode("k", &[1, 2, 3]),
            Err(Error::Internal(_))
        ));
    }
}
