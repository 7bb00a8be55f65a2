//! Controller membership: each controller keeps `members/<advertised address>` alive under
//! its own store lease, so cluster status can list the controllers that are up.

use std::sync::Arc;
use std::time::Duration;

use scabbard_common::backoff::Backoff;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::store::{Op, Store, Txn};

/// Store key prefix of member records.
pub const MEMBER_PREFIX: &str = "members/";

/// Keeps this controller's member key alive until `shutdown`, then removes it.
pub async fn keep_membership(
    store: Arc<dyn Store>,
    advertise: String,
    ttl: Duration,
    shutdown: CancellationToken,
) {
    let key = format!("{MEMBER_PREFIX}{advertise}");
    keep_key(store, key, advertise, ttl, shutdown).await;
}

/// Keeps `key` = `value` alive under a lease of its own until `shutdown`, then removes it
/// (membership, and the HTTP API's published address).
pub async fn keep_key(
    store: Arc<dyn Store>,
    key: String,
    value: String,
    ttl: Duration,
    shutdown: CancellationToken,
) {
    let backoff = Backoff {
        max: ttl,
        ..Backoff::default()
    };
    let mut failures = 0;
    while !shutdown.is_cancelled() {
        let lease = match store.lease_grant(ttl).await {
            Ok(l) => l,
            Err(e) => {
                failures += 1;
                warn!(error = %e, "membership: cannot grant a lease");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.delay(failures)) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        let put = Txn {
            success: vec![Op::Put {
                key: key.clone(),
                value: value.clone().into_bytes(),
                lease,
            }],
            ..Txn::default()
        };
        if store.txn(put).await.is_err() {
            let _ = store.lease_revoke(lease).await;
            failures += 1;
            tokio::select! {
                _ = tokio::time::sleep(backoff.delay(failures)) => continue,
                _ = shutdown.cancelled() => return,
            }
        }
        failures = 0;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(ttl / 3) => {}
                _ = shutdown.cancelled() => {
                    let _ = store.lease_revoke(lease).await;
                    return;
                }
            }
            if store.lease_keep_alive(lease).await.is_err() {
                break; // expired or store trouble: start over with a new lease
            }
        }
    }
}
