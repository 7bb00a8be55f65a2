//! A conformance suite for [`Store`] backends: every backend (embedded, etcd) must pass it.
//!
//! Each check takes the store and a key prefix of its own, so checks can share one store (and
//! one etcd cluster) with other users of it. Checks panic with a message on the first
//! violation, like `assert!`, so they are meant to be called from tests:
//!
//! ```ignore
//! #[tokio::test(flavor = "multi_thread")]
//! async fn conforms() {
//!     let store: Arc<dyn Store> = open_my_backend().await;
//!     scabbard_controller::store::conformance::run_all(store).await;
//! }
//! ```
//!
//! Checks that assert an exact revision step ([`revisions`]) assume no other writer uses the
//! store meanwhile; the others tolerate concurrent writers. Waits use deadlines, never fixed
//! sleeps; lease checks use 1 s TTLs (etcd may round them up to its minimum TTL, ~2 s) and so
//! take a few seconds.
//!
//! Not covered on purpose: a `Value` compare on a missing key. The trait documents it as
//! comparing with an empty value, while etcd always fails such a compare.

use std::sync::Arc;
use std::time::Duration;

use scabbard_common::Error;
use tokio::time::timeout;

mod kv;
mod lease;
mod watch;

pub use kv::{
    cas_counter, create_if_absent_race, put_get_metadata, range_paging, revisions, txn_compares,
    txn_sees_own_writes,
};
pub use lease::{lease_expiry, lease_keep_alive, lease_revoke, unknown_lease};
pub use watch::{watch_live, watch_replay};

use super::{Compare, KeyValue, LeaseId, Op, Store, Txn, WatchEvent, WatchStream};

/// How long a check waits for an event that should come promptly.
pub(super) const EVENT_WAIT: Duration = Duration::from_secs(10);
/// TTL of the leases the lease checks grant.
pub(super) const SHORT_TTL: Duration = Duration::from_secs(1);

/// Runs every check, each under its own fresh prefix.
pub async fn run_all(store: Arc<dyn Store>) {
    let run = ulid::Ulid::new();
    let p = |name: &str| format!("conformance/{run}/{name}/");
    put_get_metadata(&store, &p("put_get")).await;
    revisions(&store, &p("revisions")).await;
    txn_compares(&store, &p("compares")).await;
    // `txn_sees_own_writes` is embedded-only: etcd refuses several writes of one key in a txn.
    create_if_absent_race(&store, &p("race")).await;
    cas_counter(&store, &p("cas")).await;
    range_paging(&store, &p("range")).await;
    watch_live(&store, &p("watch_live")).await;
    watch_replay(&store, &p("watch_replay")).await;
    lease_revoke(&store, &p("lease_revoke")).await;
    unknown_lease(&store, &p("unknown_lease")).await;
    lease_keep_alive(&store, &p("lease_keep_alive")).await;
    lease_expiry(&store, &p("lease_expiry")).await;
    health(&store).await;
}

pub(super) fn txn(compares: Vec<Compare>, success: Vec<Op>, failure: Vec<Op>) -> Txn {
    Txn {
        compares,
        success,
        failure,
    }
}

pub(super) fn get_op(key: &str) -> Op {
    Op::Get { key: key.into() }
}

pub(super) fn put_leased(key: &str, value: &[u8], lease: LeaseId) -> Op {
    Op::Put {
        key: key.into(),
        value: value.to_vec(),
        lease,
    }
}

pub(super) async fn must_get(store: &Arc<dyn Store>, key: &str) -> KeyValue {
    match store.get(key).await {
        Ok(Some(kv)) => kv,
        other => panic!("get {key:?}: expected a value, got {other:?}"),
    }
}

/// Next watch event, failing the check after [`EVENT_WAIT`].
pub(super) async fn next_event(rx: &mut WatchStream, what: &str) -> WatchEvent {
    match timeout(EVENT_WAIT, rx.recv()).await {
        Ok(Some(Ok(e))) => e,
        Ok(Some(Err(e))) => panic!("{what}: watch failed: {e}"),
        Ok(None) => panic!("{what}: watch ended"),
        Err(_) => panic!("{what}: no watch event within {EVENT_WAIT:?}"),
    }
}

pub(super) fn assert_put_event(e: &WatchEvent, key: &str, value: &[u8], rev: i64) {
    match e {
        WatchEvent::Put(kv) if kv.key == key && kv.value == value && kv.mod_revision == rev => {}
        other => panic!("expected Put({key:?}, rev {rev}), got {other:?}"),
    }
}

pub(super) fn assert_delete_event(e: &WatchEvent, key: &str, rev: Option<i64>) -> i64 {
    match e {
        WatchEvent::Delete { key: k, revision }
            if k == key && rev.is_none_or(|r| r == *revision) =>
        {
            *revision
        }
        other => panic!("expected Delete({key:?}, rev {rev:?}), got {other:?}"),
    }
}

pub(super) fn assert_not_found<T: std::fmt::Debug>(r: scabbard_common::Result<T>, what: &str) {
    assert!(
        matches!(r, Err(Error::NotFound { .. })),
        "{what}: expected NotFound, got {r:?}"
    );
}

/// A live store reports healthy.
pub async fn health(store: &Arc<dyn Store>) {
    store.health().await.expect("health");
}
