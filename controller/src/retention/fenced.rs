//! The sweeper's writes: deletes guarded by the leader's fence, packed into transactions the
//! store accepts. A refused fence marks the run deposed; it never deletes again.

use scabbard_common::{Error, Result};

use super::sweep::Run;
use crate::store::{Compare, CompareTarget, Op, Txn};

/// Deletes per transaction (besides the fence compare).
const TXN_DELETES: usize = super::BATCH;
/// ... while live work runs.
const BUSY_TXN_DELETES: usize = 32;

impl Run {
    /// Deletes keys that still have the given mod revision (a key rewritten since it was
    /// read is kept); returns how many went.
    pub(super) async fn delete_unchanged(&mut self, keys: Vec<(String, i64)>) -> Result<u64> {
        let per_txn = self.per_txn().saturating_sub(1).max(1) / 2;
        let mut deleted = 0;
        for chunk in keys.chunks(per_txn.max(1)) {
            let mut compares: Vec<_> = self.s.fence.iter().cloned().collect();
            compares.extend(
                chunk
                    .iter()
                    .map(|(k, rev)| Compare::mod_revision(k.clone(), *rev)),
            );
            let r = self
                .s
                .store
                .txn_background(Txn {
                    compares,
                    success: chunk.iter().map(|(k, _)| Op::delete(k.clone())).collect(),
                    failure: vec![],
                })
                .await?;
            if r.succeeded {
                deleted += chunk.len() as u64;
                continue;
            }
            // A key changed, or the fence: one at a time.
            for (k, rev) in chunk {
                if !self.fence_holds().await? {
                    self.deposed = true;
                    return Ok(deleted);
                }
                let r = self
                    .s
                    .store
                    .txn_background(Txn {
                        compares: self
                            .s
                            .fence
                            .iter()
                            .cloned()
                            .chain([Compare::mod_revision(k.clone(), *rev)])
                            .collect(),
                        success: vec![Op::delete(k.clone())],
                        failure: vec![],
                    })
                    .await?;
                deleted += u64::from(r.succeeded);
            }
        }
        Ok(deleted)
    }

    /// Most deletes one fenced transaction carries: fewer while live work runs, so a commit
    /// of the core's that lands in the same store batch waits less. (The transactions are
    /// [background ones](crate::store::Store::txn_background): the embedded store does not
    /// sync a batch of them alone, so small ones cost the sweep little.)
    fn per_txn(&self) -> usize {
        let most = if self.busy() {
            BUSY_TXN_DELETES
        } else {
            TXN_DELETES
        };
        most.min(self.s.store.max_txn_ops().saturating_sub(1))
            .max(1)
    }

    /// Deletes groups of keys under the fence, packing whole groups into transactions of
    /// at most [`Self::per_txn`] deletes (a larger group is split in its order). Returns
    /// false when the fence was refused (and sets `deposed`).
    pub(super) async fn delete_groups(&mut self, groups: Vec<Vec<String>>) -> Result<bool> {
        let per_txn = self.per_txn();
        let mut txn: Vec<String> = Vec::new();
        for group in groups {
            if txn.len() + group.len() > per_txn
                && !txn.is_empty()
                && !self.fenced_delete(std::mem::take(&mut txn)).await?
            {
                return Ok(false);
            }
            for key in group {
                if txn.len() == per_txn && !self.fenced_delete(std::mem::take(&mut txn)).await? {
                    return Ok(false);
                }
                txn.push(key);
            }
        }
        if txn.is_empty() {
            return Ok(true);
        }
        self.fenced_delete(txn).await
    }

    async fn fenced_delete(&mut self, keys: Vec<String>) -> Result<bool> {
        let r = self
            .s
            .store
            .txn_background(Txn {
                compares: self.s.fence.iter().cloned().collect(),
                success: keys.into_iter().map(Op::delete).collect(),
                failure: vec![],
            })
            .await?;
        if !r.succeeded {
            self.deposed = true;
        }
        // Live work first: the core and the sessions run before the next transaction.
        tokio::task::yield_now().await;
        Ok(r.succeeded)
    }

    /// Whether the leader's fence still holds.
    async fn fence_holds(&self) -> Result<bool> {
        let Some(f) = &self.s.fence else {
            return Ok(true);
        };
        let rev = self.s.store.get(&f.key).await?.map(|kv| kv.mod_revision);
        match &f.target {
            CompareTarget::ModRevision(want) => Ok(rev.unwrap_or(0) == *want),
            other => Err(Error::internal(format!(
                "the leader's fence compares {other:?}, not a mod revision"
            ))),
        }
    }
}
