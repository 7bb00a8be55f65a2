//! The cluster-state store interface, modelled on etcd: revisioned keys, compare-and-swap
//! transactions, prefix ranges, watches from a revision, and leases. Domain logic is written
//! once above this trait; backends (`embedded` here, `etcd` later) only move bytes.
//!
//! Every successful write bumps the store-wide revision by one per transaction (as etcd
//! does). Writes are durable when the call returns; backends group concurrent writes into
//! one commit so durability does not cap throughput at one fsync per write.

pub mod conformance;
pub mod embedded;
pub mod etcd;
pub mod faults;

use std::time::Duration;

use async_trait::async_trait;
use scabbard_common::Result;
use tokio::sync::mpsc;

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdConfig, EtcdStore};

/// A lease id (0 = none).
pub type LeaseId = i64;

/// A stored key and its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value bytes.
    pub value: Vec<u8>,
    /// Revision of the write that created the key.
    pub create_revision: i64,
    /// Revision of the last write to the key.
    pub mod_revision: i64,
    /// Number of writes since creation (1 after the first put).
    pub version: i64,
    /// Lease the key is attached to, 0 for none.
    pub lease: LeaseId,
}

/// Comparison operator in a [`Compare`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `==`
    Equal,
    /// `!=`
    NotEqual,
    /// `>`
    Greater,
    /// `<`
    Less,
}

/// What a [`Compare`] looks at. A missing key has version, create and mod revision 0 and
/// an empty value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    /// The key's version.
    Version(i64),
    /// The key's create revision.
    CreateRevision(i64),
    /// The key's mod revision.
    ModRevision(i64),
    /// The key's value.
    Value(Vec<u8>),
}

/// One guard of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// Key compared.
    pub key: String,
    /// Operator.
    pub op: CmpOp,
    /// Target and operand.
    pub target: CompareTarget,
}

impl Compare {
    /// `key` does not exist.
    pub fn absent(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            op: CmpOp::Equal,
            target: CompareTarget::Version(0),
        }
    }

    /// `key`'s mod revision equals `rev` (0 = absent).
    pub fn mod_revision(key: impl Into<String>, rev: i64) -> Self {
        Self {
            key: key.into(),
            op: CmpOp::Equal,
            target: CompareTarget::ModRevision(rev),
        }
    }
}

/// An operation inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write `value` at `key`, attached to `lease` (0 = none).
    Put {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
        /// Lease, 0 for none.
        lease: LeaseId,
    },
    /// Delete `key` (no error when absent).
    Delete {
        /// Key.
        key: String,
    },
    /// Read `key`.
    Get {
        /// Key.
        key: String,
    },
}

impl Op {
    /// A put without a lease.
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }

    /// A delete.
    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }
}

/// The result of one [`Op`], in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// A put happened.
    Put,
    /// A delete happened; whether the key existed.
    Delete(bool),
    /// A read.
    Get(Option<KeyValue>),
}

/// A compare-and-swap transaction: if every compare holds, run `success`, else `failure`.
/// Portable transactions write each key at most once (etcd refuses more).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// Guards.
    pub compares: Vec<Compare>,
    /// Ops when all guards hold.
    pub success: Vec<Op>,
    /// Ops otherwise.
    pub failure: Vec<Op>,
}

/// What a transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether every compare held (so `success` ran).
    pub succeeded: bool,
    /// Store revision after the transaction (unchanged if it wrote nothing).
    pub revision: i64,
    /// One result per op that ran.
    pub results: Vec<OpResult>,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was written; `mod_revision` is the write's revision.
    Put(KeyValue),
    /// The key was deleted at `revision` (by a delete or an expired lease).
    Delete {
        /// Deleted key.
        key: String,
        /// Revision of the deletion.
        revision: i64,
    },
}

/// A page of a prefix range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangePage {
    /// Keys in ascending order.
    pub kvs: Vec<KeyValue>,
    /// Whether more keys follow the last one returned.
    pub more: bool,
    /// Store revision the page was read at.
    pub revision: i64,
}

/// Receiving end of a watch; dropping it cancels the watch. A lagging or broken watch ends
/// with an `Err` item.
pub type WatchStream = mpsc::Receiver<Result<WatchEvent>>;

/// The cluster-state store. Implementations are cheap to share (`Arc<dyn Store>`).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Reads keys starting with `prefix`, ascending, strictly after `start_after` (if given),
    /// at most `limit` (0 = no limit).
    async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<RangePage>;

    /// Runs a compare-and-swap transaction atomically and durably.
    async fn txn(&self, txn: Txn) -> Result<TxnResponse>;

    /// [`txn`](Self::txn) for background work that a crash may undo and that is then simply
    /// done again (the retention sweeper's deletes of expired history): atomic, in order
    /// with every other write and visible at once, but a backend may answer before it is
    /// durable, so it never delays the syncs of live work. It becomes durable with the next
    /// ordinary write or checkpoint. The default is [`txn`](Self::txn).
    async fn txn_background(&self, txn: Txn) -> Result<TxnResponse> {
        self.txn(txn).await
    }

    /// Streams changes to keys under `prefix` with revision >= `from_revision` (0 = only
    /// future changes). Fails with `FailedPrecondition` when that history is compacted.
    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream>;

    /// Creates a lease that expires `ttl` after the last keep-alive.
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId>;

    /// Renews a lease; `NotFound` if it expired or was revoked.
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<()>;

    /// Revokes a lease, deleting every key attached to it.
    async fn lease_revoke(&self, lease: LeaseId) -> Result<()>;

    /// The current store revision.
    async fn revision(&self) -> Result<i64>;

    /// Ok when the store can serve reads and writes.
    async fn health(&self) -> Result<()>;

    /// Backend name for status pages ("embedded", "etcd").
    fn backend(&self) -> &'static str {
        "embedded"
    }

    /// Most operations (compares + ops) one transaction may carry (etcd: 128 by default).
    fn max_txn_ops(&self) -> usize {
        usize::MAX
    }

    /// A failure this store cannot recover from while the process lives (the embedded
    /// writer stopped after a storage error): the controller exits so that a supervisor
    /// restarts it, which reopens and repairs the store. Cheap: no I/O.
    fn fatal(&self) -> Option<String> {
        None
    }

    /// Largest value one put may carry. Writers check against it before committing.
    fn max_value_bytes(&self) -> usize {
        usize::MAX
    }

    /// Largest transaction (keys and values of all ops) the backend accepts.
    fn max_txn_bytes(&self) -> usize {
        usize::MAX
    }

    /// Convenience: unconditional put; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64> {
        let r = self
            .txn(Txn {
                success: vec![Op::put(key, value)],
                ..Txn::default()
            })
            .await?;
        Ok(r.revision)
    }

    /// Convenience: unconditional delete; whether the key existed.
    async fn delete(&self, key: &str) -> Result<bool> {
        let r = self
            .txn(Txn {
                success: vec![Op::delete(key)],
                ..Txn::default()
            })
            .await?;
        Ok(matches!(r.results.first(), Some(OpResult::Delete(true))))
    }
}
