//! One group-commit batch being applied: the open redb tables of the batch's write
//! transaction, and everything the batch did that is published only after it is durable
//! (revision, lease changes, watch events, the log frame). Each store transaction is staged in
//! a scratch map and reaches the tables only if it succeeds, so a failing transaction leaves
//! the rest of its batch untouched. Runs on the writer thread only.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redb::{ReadableTable, Table, WriteTransaction};
use scabbard_common::{Error, Result};

use super::Shared;
use super::lease::{lock, ttl_millis};
use super::record::{
    KV, LEASED, LEASES, META, META_NEXT_LEASE, META_REVISION, META_WAL_SEQ, Record, storage_err,
};
use super::wal::MutationLog;
use super::writer::Position;
use crate::store::{
    CmpOp, Compare, CompareTarget, LeaseId, Op, OpResult, Txn, TxnResponse, WatchEvent,
};

/// What a batch did, to publish after its commit.
pub(super) struct Outcome {
    /// Whether anything was written (and must be made durable).
    pub(super) dirty: bool,
    /// Position after the batch (`wal_seq` only advances if it is dirty).
    pub(super) at: Position,
    /// The batch's changes for the log, when there is one.
    pub(super) log: Option<MutationLog>,
    /// Leases granted, with their TTL.
    pub(super) granted: HashMap<LeaseId, Duration>,
    /// Leases revoked or reaped.
    pub(super) revoked: HashSet<LeaseId>,
    /// (key, from lease, to lease) in batch order.
    pub(super) moves: Vec<(String, LeaseId, LeaseId)>,
    /// Watch events, in revision order.
    pub(super) events: Vec<WatchEvent>,
    /// Store transactions answered.
    pub(super) txns: u64,
}

/// A key touched by the transaction being applied.
struct Touched {
    /// Lease of the key before this transaction.
    base_lease: LeaseId,
    /// The record; its value is empty until the transaction writes the key (`changed`).
    current: Option<Record>,
    changed: bool,
}

/// One batch in progress: the open tables and everything not yet committed.
pub(super) struct Batch<'t> {
    kv: Table<'t, &'static str, &'static [u8]>,
    leases: Table<'t, i64, u64>,
    leased: Table<'t, &'static str, i64>,
    meta: Table<'t, &'static str, i64>,
    shared: &'t Shared,
    now: Instant,
    out: Outcome,
}

/// Outer `Result`: a storage failure that sinks the batch. Inner: this request's answer.
pub(super) type Applied<T> = Result<Result<T>>;

impl<'t> Batch<'t> {
    pub(super) fn open(
        wtx: &'t WriteTransaction,
        shared: &'t Shared,
        at: Position,
        log: Option<MutationLog>,
    ) -> Result<Self> {
        let open = |e| storage_err("open table", e);
        Ok(Self {
            kv: wtx.open_table(KV).map_err(open)?,
            leases: wtx.open_table(LEASES).map_err(open)?,
            leased: wtx.open_table(LEASED).map_err(open)?,
            meta: wtx.open_table(META).map_err(open)?,
            shared,
            now: Instant::now(),
            out: Outcome {
                dirty: false,
                at,
                log,
                granted: HashMap::new(),
                revoked: HashSet::new(),
                moves: Vec::new(),
                events: Vec::new(),
                txns: 0,
            },
        })
    }

    /// The key's committed-or-earlier-in-batch record.
    fn read(&self, key: &str) -> Result<Option<Record>> {
        let guard = self.kv.get(key).map_err(|e| storage_err("read", e))?;
        guard.map(|g| Record::decode(key, g.value())).transpose()
    }

    /// The key's record without its value (see [`Record::decode_meta`]).
    fn read_meta(&self, key: &str) -> Result<Option<Record>> {
        let guard = self.kv.get(key).map_err(|e| storage_err("read", e))?;
        guard
            .map(|g| Record::decode_meta(key, g.value()))
            .transpose()
    }

    fn lease_exists(&self, id: LeaseId) -> bool {
        !self.out.revoked.contains(&id)
            && (self.out.granted.contains_key(&id) || lock(&self.shared.leases).contains(id))
    }

    fn lease_live(&self, id: LeaseId) -> bool {
        !self.out.revoked.contains(&id)
            && (self.out.granted.contains_key(&id)
                || lock(&self.shared.leases).is_live(id, self.now))
    }

    pub(super) fn apply_txn(&mut self, txn: Txn) -> Applied<TxnResponse> {
        self.out.txns += 1;
        let mut succeeded = true;
        for c in &txn.compares {
            if !compare_holds(c, self.read(&c.key)?.as_ref()) {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded { txn.success } else { txn.failure };
        let rev = self.out.at.revision + 1;
        let mut scratch: HashMap<String, Touched> = HashMap::new();
        let mut events = Vec::new();
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    if lease != 0 && !self.lease_live(lease) {
                        return Ok(Err(Error::not_found("lease", lease.to_string())));
                    }
                    let t = self.touch(&mut scratch, &key)?;
                    let rec = match &t.current {
                        Some(old) => Record {
                            create_revision: old.create_revision,
                            mod_revision: rev,
                            version: old.version.saturating_add(1),
                            lease,
                            value,
                        },
                        None => Record {
                            create_revision: rev,
                            mod_revision: rev,
                            version: 1,
                            lease,
                            value,
                        },
                    };
                    events.push(WatchEvent::Put(rec.to_kv(&key)));
                    t.current = Some(rec);
                    t.changed = true;
                    results.push(OpResult::Put);
                }
                Op::Delete { key } => {
                    let t = self.touch(&mut scratch, &key)?;
                    let existed = t.current.take().is_some();
                    if existed {
                        t.changed = true;
                        events.push(WatchEvent::Delete { key, revision: rev });
                    }
                    results.push(OpResult::Delete(existed));
                }
                Op::Get { key } => {
                    // A key only touched (not yet written) holds no value: read it.
                    let rec = match scratch.get(&key) {
                        Some(t) if t.changed => t.current.clone(),
                        _ => self.read(&key)?,
                    };
                    results.push(OpResult::Get(rec.map(|r| r.to_kv(&key))));
                }
            }
        }
        if !events.is_empty() {
            for (key, t) in scratch {
                if !t.changed {
                    continue;
                }
                let write = match &t.current {
                    Some(r) => {
                        let bytes = r.encode();
                        if let Some(log) = &mut self.out.log {
                            log.put(&key, &bytes);
                        }
                        self.kv.insert(key.as_str(), bytes.as_slice()).map(drop)
                    }
                    None => {
                        if let Some(log) = &mut self.out.log {
                            log.delete(&key);
                        }
                        self.kv.remove(key.as_str()).map(drop)
                    }
                };
                write.map_err(|e| storage_err("write", e))?;
                let to = t.current.as_ref().map_or(0, |r| r.lease);
                if t.base_lease != to {
                    set_leased(&mut self.leased, &key, to)?;
                    self.out.moves.push((key, t.base_lease, to));
                }
            }
            self.out.at.revision = rev;
            self.out.events.extend(events);
            self.out.dirty = true;
        }
        Ok(Ok(TxnResponse {
            succeeded,
            revision: self.out.at.revision,
            results,
        }))
    }

    /// The scratch entry for `key`, loaded from the table on first touch.
    fn touch<'s>(
        &self,
        scratch: &'s mut HashMap<String, Touched>,
        key: &str,
    ) -> Result<&'s mut Touched> {
        if !scratch.contains_key(key) {
            // Only the header: a touched key is about to be rewritten or deleted.
            let current = self.read_meta(key)?;
            let base_lease = current.as_ref().map_or(0, |r| r.lease);
            scratch.insert(
                key.to_string(),
                Touched {
                    base_lease,
                    current,
                    changed: false,
                },
            );
        }
        scratch
            .get_mut(key)
            .ok_or_else(|| Error::internal("scratch entry vanished"))
    }

    pub(super) fn grant(&mut self, ttl: Duration) -> Applied<LeaseId> {
        let ms = match ttl_millis(ttl) {
            Ok(ms) => ms,
            Err(e) => return Ok(Err(e)),
        };
        let id = self.out.at.next_lease;
        self.out.at.next_lease = id.saturating_add(1);
        self.leases
            .insert(id, ms)
            .map_err(|e| storage_err("write lease", e))?;
        if let Some(log) = &mut self.out.log {
            log.grant(id, ms);
        }
        self.out.granted.insert(id, Duration::from_millis(ms));
        self.out.dirty = true;
        Ok(Ok(id))
    }

    /// Revokes a lease: deletes its keys at one new revision (none if it had no keys).
    pub(super) fn revoke(&mut self, id: LeaseId) -> Applied<()> {
        if !self.lease_exists(id) {
            return Ok(Err(Error::not_found("lease", id.to_string())));
        }
        let mut candidates: BTreeSet<String> =
            lock(&self.shared.leases).keys(id).into_iter().collect();
        candidates.extend(
            self.out
                .moves
                .iter()
                .filter(|(_, _, to)| *to == id)
                .map(|(k, _, _)| k.clone()),
        );
        let rev = self.out.at.revision + 1;
        let mut deleted = false;
        for key in candidates {
            if self.read(&key)?.is_none_or(|r| r.lease != id) {
                continue;
            }
            self.kv
                .remove(key.as_str())
                .map_err(|e| storage_err("delete", e))?;
            if let Some(log) = &mut self.out.log {
                log.delete(&key);
            }
            self.out.events.push(WatchEvent::Delete {
                key: key.clone(),
                revision: rev,
            });
            set_leased(&mut self.leased, &key, 0)?;
            self.out.moves.push((key, id, 0));
            deleted = true;
        }
        if deleted {
            self.out.at.revision = rev;
        }
        self.leases
            .remove(id)
            .map_err(|e| storage_err("delete lease", e))?;
        if let Some(log) = &mut self.out.log {
            log.revoke(id);
        }
        self.out.granted.remove(&id);
        self.out.revoked.insert(id);
        self.out.dirty = true;
        Ok(Ok(()))
    }

    /// Revokes every lease whose deadline has passed, one revision each.
    pub(super) fn reap_expired(&mut self) -> Result<()> {
        self.shared.expire_pending.store(false, Ordering::Release);
        let expired = lock(&self.shared.leases).expired(Instant::now());
        for id in expired {
            if !self.out.revoked.contains(&id) {
                // The lease exists (it is in the table), so the inner result is Ok.
                let _ = self.revoke(id)?;
                tracing::debug!(lease = id, "lease expired");
            }
        }
        Ok(())
    }

    /// Writes the counters and closes the tables.
    pub(super) fn finish(mut self) -> Result<Outcome> {
        if self.out.dirty {
            self.out.at.wal_seq += 1;
            let seq = i64::try_from(self.out.at.wal_seq)
                .map_err(|_| Error::internal("batch sequence number overflow"))?;
            let meta = |e| storage_err("write meta", e);
            self.meta.insert(META_WAL_SEQ, seq).map_err(meta)?;
            self.meta
                .insert(META_REVISION, self.out.at.revision)
                .map_err(meta)?;
            self.meta
                .insert(META_NEXT_LEASE, self.out.at.next_lease)
                .map_err(meta)?;
        }
        Ok(self.out)
    }
}

/// Records `key`'s lease in the leased-keys table (0: none, the key leaves it).
pub(super) fn set_leased(
    t: &mut Table<'_, &'static str, i64>,
    key: &str,
    lease: LeaseId,
) -> Result<()> {
    let r = if lease == 0 {
        t.remove(key).map(drop)
    } else {
        t.insert(key, lease).map(drop)
    };
    r.map_err(|e| storage_err("write leased key", e))
}

/// Evaluates one guard; a missing key has version and revisions 0 and an empty value.
fn compare_holds(c: &Compare, rec: Option<&Record>) -> bool {
    let ord = match &c.target {
        CompareTarget::Version(v) => rec.map_or(0, |r| r.version).cmp(v),
        CompareTarget::CreateRevision(v) => rec.map_or(0, |r| r.create_revision).cmp(v),
        CompareTarget::ModRevision(v) => rec.map_or(0, |r| r.mod_revision).cmp(v),
        CompareTarget::Value(v) => rec
            .map_or(&[][..], |r| r.value.as_slice())
            .cmp(v.as_slice()),
    };
    match c.op {
        CmpOp::Equal => ord.is_eq(),
        CmpOp::NotEqual => ord.is_ne(),
        CmpOp::Greater => ord.is_gt(),
        CmpOp::Less => ord.is_lt(),
    }
}
