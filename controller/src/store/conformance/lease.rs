//! Conformance checks of leases.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{
    SHORT_TTL, assert_delete_event, assert_not_found, must_get, next_event, put_leased, txn,
};
use crate::store::{LeaseId, Op, Store, WatchEvent};

/// Revoking a lease deletes exactly its keys (with delete events) and ends the lease.
pub async fn lease_revoke(store: &Arc<dyn Store>, prefix: &str) {
    let lease = store
        .lease_grant(Duration::from_secs(60))
        .await
        .expect("grant");
    let (a, b, plain, moved) = (
        format!("{prefix}a"),
        format!("{prefix}b"),
        format!("{prefix}plain"),
        format!("{prefix}moved"),
    );
    store
        .txn(txn(
            vec![],
            vec![
                put_leased(&a, b"1", lease),
                put_leased(&b, b"2", lease),
                put_leased(&moved, b"3", lease),
                Op::put(&plain, "4"),
            ],
            vec![],
        ))
        .await
        .expect("leased puts");
    assert_eq!(must_get(store, &a).await.lease, lease);
    // Re-put without the lease: the key no longer belongs to it.
    store.put(&moved, b"5".to_vec()).await.expect("detach");
    assert_eq!(must_get(store, &moved).await.lease, 0);
    let mut rx = store.watch(prefix, 0).await.expect("watch");
    store.lease_keep_alive(lease).await.expect("keep-alive");
    store.lease_revoke(lease).await.expect("revoke");
    let e1 = next_event(&mut rx, "revoke delete 1").await;
    let e2 = next_event(&mut rx, "revoke delete 2").await;
    let mut deleted: Vec<&str> = [&e1, &e2]
        .iter()
        .map(|e| match e {
            WatchEvent::Delete { key, .. } => key.as_str(),
            other => panic!("expected a delete, got {other:?}"),
        })
        .collect();
    deleted.sort_unstable();
    assert_eq!(deleted, vec![a.as_str(), b.as_str()]);
    assert_eq!(store.get(&a).await.expect("get a"), None);
    assert_eq!(store.get(&b).await.expect("get b"), None);
    assert_eq!(must_get(store, &plain).await.value, b"4");
    assert_eq!(must_get(store, &moved).await.value, b"5");
    assert_not_found(
        store.lease_keep_alive(lease).await,
        "keep-alive after revoke",
    );
    assert_not_found(store.lease_revoke(lease).await, "revoke twice");
    assert_not_found(
        store
            .txn(txn(vec![], vec![put_leased(&a, b"x", lease)], vec![]))
            .await,
        "put with a revoked lease",
    );
    assert_eq!(store.get(&a).await.expect("get a"), None);
}

/// Unknown leases are `NotFound` everywhere, and a failed put changes nothing.
pub async fn unknown_lease(store: &Arc<dyn Store>, prefix: &str) {
    let unknown: LeaseId = 0x3fff_ffff_ffff_fff1;
    let k = format!("{prefix}k");
    let k2 = format!("{prefix}k2");
    let before = store.put(&k, b"before".to_vec()).await.expect("put");
    assert_not_found(
        store
            .txn(txn(
                vec![],
                vec![Op::put(&k, "partial"), put_leased(&k2, b"x", unknown)],
                vec![],
            ))
            .await,
        "put with an unknown lease",
    );
    assert_eq!(store.get(&k2).await.expect("get k2"), None);
    let kv = must_get(store, &k).await;
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision),
        (&b"before"[..], before)
    );
    assert_not_found(store.lease_keep_alive(unknown).await, "keep-alive unknown");
    assert_not_found(store.lease_revoke(unknown).await, "revoke unknown");
}

/// Keep-alives hold a lease past its TTL; once they stop, it expires.
pub async fn lease_keep_alive(store: &Arc<dyn Store>, prefix: &str) {
    let lease = store.lease_grant(SHORT_TTL).await.expect("grant");
    let k = format!("{prefix}k");
    store
        .txn(txn(vec![], vec![put_leased(&k, b"v", lease)], vec![]))
        .await
        .expect("leased put");
    // Renew at a third of the TTL for three TTLs (etcd's ~2 s minimum TTL included).
    let until = Instant::now() + SHORT_TTL * 3;
    while Instant::now() < until {
        tokio::time::sleep(SHORT_TTL / 3).await;
        store.lease_keep_alive(lease).await.expect("keep-alive");
    }
    assert_eq!(
        must_get(store, &k).await.lease,
        lease,
        "kept-alive key must survive"
    );
    wait_for_deletion(store, &k).await;
    assert_not_found(
        store.lease_keep_alive(lease).await,
        "keep-alive after expiry",
    );
}

/// An expired lease deletes its keys with delete events at a new revision.
pub async fn lease_expiry(store: &Arc<dyn Store>, prefix: &str) {
    let lease = store.lease_grant(SHORT_TTL).await.expect("grant");
    let (k, plain) = (format!("{prefix}k"), format!("{prefix}plain"));
    let r = store
        .txn(txn(
            vec![],
            vec![put_leased(&k, b"v", lease), Op::put(&plain, "p")],
            vec![],
        ))
        .await
        .expect("puts");
    let mut rx = store.watch(prefix, 0).await.expect("watch");
    let e = next_event(&mut rx, "expiry delete").await;
    let rev = assert_delete_event(&e, &k, None);
    assert!(rev > r.revision, "expiry deletes at a new revision");
    assert_eq!(store.get(&k).await.expect("get"), None);
    assert_eq!(must_get(store, &plain).await.value, b"p");
    // The store's revision reaches the event's (a writer may publish events a moment
    // before the revision counter).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while store.revision().await.expect("revision") < rev {
        assert!(
            tokio::time::Instant::now() < deadline,
            "revision never reached {rev}"
        );
        tokio::task::yield_now().await;
    }
    assert_not_found(
        store
            .txn(txn(vec![], vec![put_leased(&k, b"v", lease)], vec![]))
            .await,
        "put with an expired lease",
    );
}

async fn wait_for_deletion(store: &Arc<dyn Store>, key: &str) {
    let mut rx = store
        .watch(key, store.revision().await.expect("revision") + 1)
        .await
        .expect("watch");
    if store.get(key).await.expect("get").is_none() {
        return;
    }
    let e = next_event(&mut rx, "lease expiry").await;
    assert_delete_event(&e, key, None);
}
