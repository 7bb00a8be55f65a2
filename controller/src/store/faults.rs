//! Fault injection around a real store, for tests and failure drills: [`FaultyStore`]
//! wraps any [`Store`] and, while told to, refuses chosen writes the way a backend refuses
//! an oversized request, or fails every write the way an unreachable store does. Reads,
//! watches and leases pass through untouched; nothing is mocked.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use scabbard_common::{Error, Result};

use super::{LeaseId, Op, RangePage, Store, Txn, TxnResponse, WatchStream};
use crate::store::KeyValue;

/// Decides whether a put (key, value) is refused.
pub type RefusePut = dyn Fn(&str, &[u8]) -> bool + Send + Sync;

/// A [`Store`] that injects write failures on demand.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    refuse: Mutex<Option<Arc<RefusePut>>>,
    outage: AtomicBool,
    refused: AtomicU64,
    failed: AtomicU64,
    committed: AtomicU64,
}

impl FaultyStore {
    /// Wraps `inner`; no faults until told.
    pub fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            refuse: Mutex::new(None),
            outage: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            committed: AtomicU64::new(0),
        })
    }

    /// From now on, a transaction that puts a (key, value) for which `pred` holds is
    /// refused with `InvalidArgument`, as a backend refuses a request that is too large.
    pub fn refuse_puts(&self, pred: impl Fn(&str, &[u8]) -> bool + Send + Sync + 'static) {
        *self.refuse.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(pred));
    }

    /// Stops refusing puts.
    pub fn stop_refusing(&self) {
        *self.refuse.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// While `on`, every transaction that writes fails `Unavailable` and health fails.
    pub fn set_outage(&self, on: bool) {
        self.outage.store(on, Ordering::SeqCst);
    }

    /// Transactions refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    /// Transactions failed by an outage so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    /// Writing transactions that reached the real store.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    fn writes(txn: &Txn) -> impl Iterator<Item = &Op> {
        txn.success
            .iter()
            .chain(&txn.failure)
            .filter(|op| !matches!(op, Op::Get { .. }))
    }
}

#[async_trait]
impl Store for FaultyStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.inner.get(key).await
    }

    async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<RangePage> {
        self.inner.range(prefix, start_after, limit).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        let writes = Self::writes(&txn).count() > 0;
        if writes && self.outage.load(Ordering::SeqCst) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(Error::Unavailable(
                "injected outage: the store is unreachable".into(),
            ));
        }
        let refuse = self
            .refuse
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(pred) = refuse {
            for op in Self::writes(&txn) {
                if let Op::Put { key, value, .. } = op
                    && pred(key, value)
                {
                    self.refused.fetch_add(1, Ordering::SeqCst);
                    return Err(Error::invalid(format!(
                        "injected refusal: request is too large (key {key:?}, {} bytes)",
                        value.len()
                    )));
                }
            }
        }
        let r = self.inner.txn(txn).await?;
        if writes {
            self.committed.fetch_add(1, Ordering::SeqCst);
        }
        Ok(r)
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream> {
        self.inner.watch(prefix, from_revision).await
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId> {
        if self.outage.load(Ordering::SeqCst) {
            return Err(Error::Unavailable(
                "injected outage: the store is unreachable".into(),
            ));
        }
        self.inner.lease_grant(ttl).await
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.inner.lease_keep_alive(lease).await
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        self.inner.lease_revoke(lease).await
    }

    async fn revision(&self) -> Result<i64> {
        self.inner.revision().await
    }

    async fn health(&self) -> Result<()> {
        if self.outage.load(Ordering::SeqCst) {
            return Err(Error::Unavailable(
                "injected outage: the store is unreachable".into(),
            ));
        }
        self.inner.health().await
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn max_txn_ops(&self) -> usize {
        self.inner.max_txn_ops()
    }

    fn max_value_bytes(&self) -> usize {
        self.inner.max_value_bytes()
    }

    fn fatal(&self) -> Option<String> {
        self.inner.fatal()
    }

    fn max_txn_bytes(&self) -> usize {
        self.inner.max_txn_bytes()
    }
}
