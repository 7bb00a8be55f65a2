//! The persister: the only writer of task and agent records. The core hands it writes in
//! order; it groups everything pending into one store transaction (one durable commit),
//! and only then runs each write's effects — replying to a client, sending a message to an
//! agent, publishing a task event. So nothing is acknowledged before it is durable, and the
//! core never waits on the disk.

use std::sync::Arc;

use scabbard_common::{Error, Result};
use tokio::sync::{Notify, mpsc};
use tracing::{error, warn};

use tokio_util::sync::CancellationToken;

use crate::store::{Compare, Op, Store, Txn};

/// What guards every commit: the leader's fence, and the token to cancel when it fails.
#[derive(Clone)]
pub(crate) struct Fence {
    pub(crate) compare: Compare,
    pub(crate) lost: CancellationToken,
}

/// Runs after the write's batch committed (`Ok`) or failed (`Err`).
pub(crate) type Effect = Box<dyn FnOnce(&Result<(), String>) + Send>;

/// One record to write (or delete) and what to do once it is durable.
pub(crate) struct Write {
    pub(crate) key: String,
    /// `None` deletes the key.
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) effects: Vec<Effect>,
}

/// Handle used by the core to enqueue writes.
#[derive(Clone)]
pub(crate) struct Persister {
    tx: mpsc::Sender<Write>,
}

impl Persister {
    /// Starts the persister loop. `failed` is notified when a commit fails, so the core can
    /// rebuild its state from the store.
    pub(crate) fn start(
        store: Arc<dyn Store>,
        max_batch: usize,
        failed: Arc<Notify>,
        fence: Option<Fence>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(64 * 1024);
        let handle = tokio::spawn(run(store, rx, max_batch.max(1), failed, fence));
        (Self { tx }, handle)
    }

    /// Enqueues a write; waits only when the queue is full (backpressure).
    pub(crate) async fn write(&self, w: Write) -> Result<()> {
        self.tx
            .send(w)
            .await
            .map_err(|_| Error::Unavailable("controller is shutting down".into()))
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Write>,
    max_batch: usize,
    failed: Arc<Notify>,
    fence: Option<Fence>,
) {
    let mut batch: Vec<Write> = Vec::with_capacity(max_batch);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let ops = ops_for(&batch);
        let result = commit(store.as_ref(), ops, fence.as_ref()).await;
        if let Err(e) = &result {
            error!(error = %e, writes = batch.len(), "store commit failed; the core will resync");
            failed.notify_one();
        }
        for w in batch.drain(..) {
            for effect in w.effects {
                effect(&result);
            }
        }
    }
}

/// The store ops of a batch; later writes of a key supersede earlier ones.
fn ops_for(batch: &[Write]) -> Vec<Op> {
    // Later writes of the same key in one batch supersede earlier ones.
    let mut last: std::collections::HashMap<&str, usize> =
        std::collections::HashMap::with_capacity(batch.len());
    for (i, w) in batch.iter().enumerate() {
        last.insert(w.key.as_str(), i);
    }
    let mut ops = Vec::with_capacity(last.len());
    for (i, w) in batch.iter().enumerate() {
        if last.get(w.key.as_str()) != Some(&i) {
            continue;
        }
        ops.push(match &w.value {
            Some(v) => Op::put(w.key.clone(), v.clone()),
            None => Op::delete(w.key.clone()),
        });
    }
    ops
}

async fn commit(store: &dyn Store, ops: Vec<Op>, fence: Option<&Fence>) -> Result<(), String> {
    let mut attempt = 0u32;
    loop {
        let txn = Txn {
            compares: fence.iter().map(|f| f.compare.clone()).collect(),
            success: ops.clone(),
            failure: Vec::new(),
        };
        match store.txn(txn).await {
            Ok(r) if r.succeeded => return Ok(()),
            Ok(_) => {
                if let Some(f) = fence {
                    f.lost.cancel();
                }
                return Err(
                    "this controller is no longer the leader (fenced write refused)".into(),
                );
            }
            Err(e @ Error::Unavailable(_)) if attempt < 3 => {
                attempt += 1;
                warn!(error = %e, attempt, "store unavailable; retrying commit");
                tokio::time::sleep(scabbard_common::backoff::Backoff::default().delay(attempt))
                    .await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}
