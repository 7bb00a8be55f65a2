//! The single writer of the embedded store and its group commit.
//!
//! Every write (transactions, lease grants, revokes and reaping) is a [`Request`] on one
//! bounded channel. The writer thread takes whatever is queued (up to `max_batch`), applies it
//! in order inside ONE redb write transaction, makes it durable once (a synced write-ahead log
//! frame, then a non-durable redb commit; or a durable redb commit without the log), then
//! publishes the watch events, updates the lease table and answers every caller (`batch`
//! applies the requests). Nothing becomes visible to readers before it is durable.
//!
//! Between batches the writer checkpoints: a durable redb commit, after which the log is
//! emptied. A storage failure fails the whole batch and stops the writer (redb refuses
//! further writes after a failed commit; reopening the database repairs it and replays the
//! log). This module owns the writes and must not be bypassed: nothing else opens a redb
//! write transaction after startup.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, Durability};
use scabbard_common::{Error, Result};
use tokio::sync::{mpsc, oneshot};

use super::Shared;
use super::batch::{Batch, Outcome};
use super::lease::lock;
use super::record::{MAX_BATCH_BYTES, storage_err};
use super::wal::{MutationLog, Wal};
use crate::store::{LeaseId, Op, Txn, TxnResponse};

/// A write for the writer thread.
pub(super) enum Request {
    /// A store transaction.
    Txn {
        txn: Txn,
        reply: oneshot::Sender<Result<TxnResponse>>,
        /// [`Store::txn_background`](crate::store::Store::txn_background): a batch of
        /// nothing else is not synced (the next synced frame or checkpoint makes it durable).
        background: bool,
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

impl Request {
    /// Rough size, to bound a batch.
    fn bytes(&self) -> usize {
        match self {
            Request::Txn { txn, .. } => txn_bytes(txn),
            _ => 16,
        }
    }
}

/// Bytes of keys and values in a transaction.
pub(super) fn txn_bytes(txn: &Txn) -> usize {
    let op = |op: &Op| match op {
        Op::Put { key, value, .. } => key.len() + value.len() + 32,
        Op::Delete { key } | Op::Get { key } => key.len() + 8,
    };
    let compares: usize = txn.compares.iter().map(|c| c.key.len() + 16).sum();
    compares
        + txn
            .success
            .iter()
            .chain(&txn.failure)
            .map(op)
            .sum::<usize>()
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

/// Where the committed state stands.
#[derive(Debug, Clone, Copy)]
pub(super) struct Position {
    /// Store revision.
    pub(super) revision: i64,
    /// Next lease id.
    pub(super) next_lease: i64,
    /// Sequence number of the last batch (its log frame and `META_WAL_SEQ`).
    pub(super) wal_seq: u64,
}

/// How the writer batches and makes batches durable.
pub(super) struct WriterConfig {
    /// Most requests per batch.
    pub(super) max_batch: usize,
    /// The write-ahead log, or `None` to commit every batch durably in redb.
    pub(super) wal: Option<Wal>,
    /// Longest time between checkpoints.
    pub(super) checkpoint_interval: Duration,
    /// Log size that forces a checkpoint.
    pub(super) checkpoint_wal_bytes: u64,
}

/// The writer thread's state.
pub(super) struct Writer {
    db: Arc<Database>,
    rx: mpsc::Receiver<Request>,
    shared: Arc<Shared>,
    at: Position,
    config: WriterConfig,
    last_checkpoint: Instant,
}

impl Writer {
    /// A writer continuing from the committed position `at`.
    pub(super) fn new(
        db: Arc<Database>,
        rx: mpsc::Receiver<Request>,
        shared: Arc<Shared>,
        at: Position,
        mut config: WriterConfig,
    ) -> Self {
        config.max_batch = config.max_batch.max(1);
        Self {
            db,
            rx,
            shared,
            at,
            config,
            last_checkpoint: Instant::now(),
        }
    }

    /// Starts the writer thread; it runs until every request sender is dropped.
    pub(super) fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || self.run())
    }

    fn run(mut self) {
        let mut requests = Vec::with_capacity(self.config.max_batch);
        while let Some(first) = self.rx.blocking_recv() {
            let mut bytes = first.bytes();
            requests.push(first);
            while requests.len() < self.config.max_batch && bytes < MAX_BATCH_BYTES {
                match self.rx.try_recv() {
                    Ok(r) => {
                        bytes += r.bytes();
                        requests.push(r);
                    }
                    Err(_) => break,
                }
            }
            let mut answers = Vec::with_capacity(requests.len());
            let result = self.write_batch(&mut requests, &mut answers);
            let result = match result {
                Ok(outcome) => {
                    self.publish(outcome);
                    answers.into_iter().for_each(Answer::send);
                    self.maybe_checkpoint()
                }
                Err(e) => {
                    let msg = self.stop(&e);
                    answers.into_iter().for_each(|a| a.fail(&msg));
                    return;
                }
            };
            if let Err(e) = result {
                self.stop(&e);
                return;
            }
        }
        // Every handle is gone: leave a database that needs no replay.
        if let Err(e) = self.checkpoint() {
            tracing::warn!("final checkpoint of the embedded store: {e}");
        }
    }

    /// Records a fatal storage failure; queued requests are dropped with the receiver and
    /// their callers see the message through `Shared::failure`.
    fn stop(&self, e: &Error) -> String {
        let msg = format!(
            "embedded store writer stopped after a storage failure ({e}); the outcome of \
             in-flight writes is unknown; restart the controller to reopen and repair the \
             database"
        );
        tracing::error!("{msg}");
        *lock(&self.shared.failure) = Some(msg.clone());
        msg
    }

    fn maybe_checkpoint(&mut self) -> Result<()> {
        let due = self.config.wal.as_ref().is_some_and(|wal| {
            wal.len() > 0
                && (wal.len() >= self.config.checkpoint_wal_bytes
                    || self.last_checkpoint.elapsed() >= self.config.checkpoint_interval)
        });
        if due { self.checkpoint() } else { Ok(()) }
    }

    /// Commits durably in redb everything committed so far, then empties the log.
    fn checkpoint(&mut self) -> Result<()> {
        let Some(wal) = self.config.wal.as_mut() else {
            return Ok(());
        };
        if wal.len() == 0 {
            return Ok(());
        }
        // An empty durable commit persists the non-durable commits before it.
        let wtx = self
            .db
            .begin_write()
            .map_err(|e| storage_err("begin checkpoint", e))?;
        wtx.commit().map_err(|e| storage_err("checkpoint", e))?;
        wal.reset()?;
        self.last_checkpoint = Instant::now();
        self.shared.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Applies `requests` in one redb transaction and commits it (if anything was written).
    fn write_batch(
        &mut self,
        requests: &mut Vec<Request>,
        answers: &mut Vec<Answer>,
    ) -> Result<Outcome> {
        // Only background transactions: logged and answered without a sync of their own
        // (with the log; without one every commit is durable).
        let lazy = requests.iter().all(|r| {
            matches!(
                r,
                Request::Txn {
                    background: true,
                    ..
                }
            )
        });
        let mut wtx = self
            .db
            .begin_write()
            .map_err(|e| storage_err("begin write", e))?;
        if self.config.wal.is_some() {
            // The log frame makes the batch durable; the next checkpoint persists the pages.
            wtx.set_durability(Durability::None)
                .map_err(|e| storage_err("set durability", e))?;
        }
        let log = self.config.wal.is_some().then(MutationLog::default);
        let mut batch = Batch::open(&wtx, &self.shared, self.at, log)?;
        for req in requests.drain(..) {
            match req {
                Request::Txn { txn, reply, .. } => {
                    let r = batch.apply_txn(txn)?;
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
            if let (Some(wal), Some(log)) = (self.config.wal.as_mut(), outcome.log.as_ref()) {
                wal.append(
                    outcome.at.wal_seq,
                    outcome.at.revision,
                    outcome.at.next_lease,
                    log,
                    !lazy,
                )?;
            }
            wtx.commit().map_err(|e| storage_err("commit", e))?;
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
        self.at = outcome.at;
        // Ring first: a reader of `revision()` then finds that revision's events in the ring.
        if !outcome.events.is_empty() {
            self.shared.hub.publish(outcome.events, outcome.at.revision);
        }
        self.shared
            .revision
            .store(outcome.at.revision, Ordering::Release);
        self.shared.commits.fetch_add(1, Ordering::Relaxed);
        self.shared.txns.fetch_add(outcome.txns, Ordering::Relaxed);
    }
}
