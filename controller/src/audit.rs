//! The audit log: every admin and operator action (token create/revoke, drain, project
//! changes, cancel) as a record in the store under `audit/`, newest first by key, with who,
//! what and when. Written in the same transaction as the change where the change is a
//! store write of ours; listed by `AdminService.ListAudit` / `scabbard audit`.

use std::sync::Arc;

use prost::Message;
use scabbard_common::proto::AuditEntry;
use scabbard_common::time::now_ms;
use scabbard_common::{Error, Result};

use crate::auth::Principal;
use crate::store::{Op, Store, Txn};

/// Store key prefix of audit entries.
pub const AUDIT_PREFIX: &str = "audit/";

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
