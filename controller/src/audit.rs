//! The audit log: every admin and operator action (token create/revoke, drain, project
//! changes, cancel) as a record in the store under `audit/`, newest first by key, with who,
//! what and when. Written in the same transaction as the change where the change is a
//! store write of ours; listed by `AdminService.ListAudit` / `scabbard audit`.
//!
//! A `task.submit` of a new task through `TaskService.Submit` is staged by the core with
//! the task's own writes and lands in the task's commit: no commit, sync or task of its
//! own on the submit path. Other submits (`SubmitBatch`, `workflow.submit`, `template.run`,
//! an idempotent repeat) are recorded through a [`Sink`]: in the background, many entries
//! per store transaction (one entry per `SubmitBatch` call, not per task). The sink writes
//! background transactions ([`Store::txn_background`]): on the embedded store a commit of
//! nothing else is not synced on its own (the next synced commit makes it durable; only a
//! power loss in that gap can drop one).
//!
//! Action strings, `noun.verb`: [`ACTIONS`].

use std::sync::Arc;

use prost::Message;
use scabbard_common::proto::AuditEntry;
use scabbard_common::time::now_ms;
use scabbard_common::{Error, Result};

use crate::auth::Principal;
use crate::store::{Op, Store, Txn};

/// Store key prefix of audit entries.
pub const AUDIT_PREFIX: &str = "audit/";

/// Every action the controller records (what `scabbard audit --action` may filter on):
/// one list, shared with the CLI.
pub use scabbard_common::audit_actions::KNOWN as ACTIONS;

/// Entries the sink holds before it refuses more (each is well under 1 KiB).
const SINK_CAPACITY: usize = 100_000;
/// Most entries in one transaction.
const SINK_BATCH: usize = 256;

/// Writes audit entries in the background, batching those that arrive together into one
/// transaction. Recording never blocks the caller; a full sink (the store unreachable for
/// long) drops the entry with a warning.
#[derive(Clone)]
pub struct Sink {
    tx: tokio::sync::mpsc::Sender<AuditEntry>,
}

impl Sink {
    /// Starts the writer over `store` (it ends when every `Sink` clone is dropped).
    pub fn spawn(store: Arc<dyn Store>) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<AuditEntry>(SINK_CAPACITY);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(SINK_BATCH);
            while rx.recv_many(&mut batch, SINK_BATCH).await > 0 {
                let txn = Txn {
                    success: batch.iter().map(op).collect(),
                    ..Default::default()
                };
                let mut delay = std::time::Duration::from_millis(50);
                for attempt in 1..=5 {
                    match store.txn_background(txn.clone()).await {
                        Ok(_) => break,
                        Err(e) if attempt == 5 => {
                            tracing::warn!(error = %e, entries = batch.len(), "could not write audit entries; dropped");
                        }
                        Err(_) => {
                            tokio::time::sleep(delay).await;
                            delay *= 2;
                        }
                    }
                }
                batch.clear();
            }
        });
        Self { tx }
    }

    /// Queues `e` for writing.
    pub fn record(&self, e: AuditEntry) {
        if let Err(e) = self.tx.try_send(e) {
            tracing::warn!(error = %e, "audit sink full or closed; entry dropped");
        }
    }
}

/// An entry for an action by `who`.
pub fn entry(
    who: &Principal,
    action: &str,
    target: &str,
    project: &str,
    detail: impl Into<String>,
) -> AuditEntry {
    AuditEntry {
        id: ulid::Ulid::new().to_string().to_lowercase(),
        at_ms: now_ms(),
        actor: who.token_id.clone(),
        actor_name: who.name.clone(),
        action: action.into(),
        target: target.into(),
        project: project.into(),
        detail: detail.into(),
        peer: who.peer.clone(),
    }
}

/// The store write of an entry. Keys sort newest first: the inverted timestamp, then the id.
pub fn op(e: &AuditEntry) -> Op {
    let inverted = u64::MAX - e.at_ms.max(0) as u64;
    Op::put(
        format!("{AUDIT_PREFIX}{inverted:020}-{}", e.id),
        e.encode_to_vec(),
    )
}

/// Records an entry on its own.
pub async fn record(store: &Arc<dyn Store>, e: &AuditEntry) -> Result<()> {
    store
        .txn(Txn {
            success: vec![op(e)],
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// Newest-first entries matching the filters (empty = any), at most `limit`.
pub async fn list(
    store: &Arc<dyn Store>,
    project: Option<&str>,
    action: &str,
    limit: usize,
) -> Result<Vec<AuditEntry>> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.range(AUDIT_PREFIX, after.as_deref(), 1000).await?;
        after = page.kvs.last().map(|kv| kv.key.clone());
        for kv in page.kvs {
            let e = AuditEntry::decode(kv.value.as_slice())
                .map_err(|e| Error::internal(format!("corrupt audit entry {}: {e}", kv.key)))?;
            if project.is_some_and(|p| p != e.project) || (!action.is_empty() && action != e.action)
            {
                continue;
            }
            out.push(e);
            if out.len() >= limit {
                return Ok(out);
            }
        }
        if !page.more || after.is_none() {
            return Ok(out);
        }
    }
}
