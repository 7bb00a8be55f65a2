//! Startup of the embedded store: creates the tables, replays the write-ahead log frames the
//! database has not applied yet, then loads the counters, the leases (each with a fresh full
//! TTL, as etcd does on a leader change) and the lease -> keys index. Runs once, before the
//! writer starts; everything it applies is committed durably before the log is emptied.

use std::time::{Duration, Instant};

use redb::{Database, ReadableTable, ReadableTableMetadata};
use scabbard_common::{Error, Result};

use super::lease::LeaseTable;
use super::record::{
    INITIAL_REVISION, KV, LEASED, LEASES, META, META_LEASED_INDEX, META_NEXT_LEASE, META_REVISION,
    META_WAL_SEQ, Record, read_err, storage_err,
};
use super::wal::{Frame, Mutation};
use crate::store::LeaseId;

/// What startup reads from the file.
pub(super) struct Loaded {
    /// Store revision.
    pub(super) revision: i64,
    /// Next lease id to hand out.
    pub(super) next_lease: i64,
    /// Sequence number of the last batch applied.
    pub(super) wal_seq: u64,
    /// Leases with their keys, deadlines starting now.
    pub(super) leases: LeaseTable,
    /// Keys in the store.
    pub(super) keys: u64,
}

/// Replays `frames` (those newer than the database) and loads the state, in one durable
/// redb transaction.
pub(super) fn load(db: &Database, frames: Vec<Frame>) -> Result<Loaded> {
    let wtx = db
        .begin_write()
        .map_err(|e| storage_err("begin write", e))?;
    let loaded = {
        let open = |e| storage_err("open table", e);
        let mut kv = wtx.open_table(KV).map_err(open)?;
        let mut meta = wtx.open_table(META).map_err(open)?;
        let mut leases_t = wtx.open_table(LEASES).map_err(open)?;
        let mut leased = wtx.open_table(LEASED).map_err(open)?;
        let write = |e| storage_err("replay", e);
        let mut wal_seq = meta
            .get(META_WAL_SEQ)
            .map_err(read_err)?
            .map_or(0, |g| g.value());
        let mut replayed = 0;
        for frame in frames {
            let seq = i64::try_from(frame.seq)
                .map_err(|_| Error::internal(format!("log frame seq {} overflows", frame.seq)))?;
            if seq <= wal_seq {
                continue;
            }
            for m in frame.mutations {
                match m {
                    Mutation::Put { key, record } => {
                        let lease = Record::decode(&key, &record)?.lease;
                        kv.insert(key.as_str(), record.as_slice()).map_err(write)?;
                        super::batch::set_leased(&mut leased, &key, lease)?;
                    }
                    Mutation::Delete { key } => {
                        kv.remove(key.as_str()).map_err(write)?;
                        super::batch::set_leased(&mut leased, &key, 0)?;
                    }
                    Mutation::Grant { id, ttl_ms } => {
                        leases_t.insert(id, ttl_ms).map_err(write)?;
                    }
                    Mutation::Revoke { id } => {
                        leases_t.remove(id).map_err(write)?;
                    }
                }
            }
            meta.insert(META_REVISION, frame.revision).map_err(write)?;
            meta.insert(META_NEXT_LEASE, frame.next_lease)
                .map_err(write)?;
            meta.insert(META_WAL_SEQ, seq).map_err(write)?;
            wal_seq = seq;
            replayed += 1;
        }
        if replayed > 0 {
            tracing::info!(batches = replayed, "replayed the write-ahead log");
        }
        let counter = |name: &str, default: i64| -> Result<i64> {
            Ok(meta
                .get(name)
                .map_err(read_err)?
                .map_or(default, |g| g.value()))
        };
        let revision = counter(META_REVISION, INITIAL_REVISION)?;
        let next_lease = counter(META_NEXT_LEASE, 1)?;
        let mut leases = LeaseTable::default();
        let now = Instant::now();
        for entry in leases_t.iter().map_err(read_err)? {
            let (id, ttl_ms) = entry.map_err(read_err)?;
            leases.insert(id.value(), Duration::from_millis(ttl_ms.value()), now);
        }
        // The leased keys: from their table, or (a store from before it) by one scan of
        // every key that fills it.
        let mut attached: Vec<(String, LeaseId)> = Vec::new();
        if counter(META_LEASED_INDEX, 0)? == 1 {
            for entry in leased.iter().map_err(read_err)? {
                let (key, lease) = entry.map_err(read_err)?;
                attached.push((key.value().to_string(), lease.value()));
            }
        } else {
            for entry in kv.iter().map_err(read_err)? {
                let (key, bytes) = entry.map_err(read_err)?;
                let rec = Record::decode(key.value(), bytes.value())?;
                if rec.lease != 0 {
                    attached.push((key.value().to_string(), rec.lease));
                }
            }
            for (key, lease) in &attached {
                leased.insert(key.as_str(), *lease).map_err(write)?;
            }
            meta.insert(META_LEASED_INDEX, 1).map_err(write)?;
        }
        for (key, lease) in attached {
            if leases.contains(lease) {
                leases.move_key(&key, 0, lease);
            } else {
                tracing::warn!(
                    key = %key,
                    lease,
                    "key attached to an unknown lease; it will not expire"
                );
            }
        }
        Loaded {
            revision,
            next_lease,
            wal_seq: u64::try_from(wal_seq).unwrap_or(0),
            leases,
            keys: kv.len().map_err(read_err)?,
        }
    };
    wtx.commit().map_err(|e| storage_err("commit", e))?;
    Ok(loaded)
}
