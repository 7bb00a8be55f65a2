//! Conformance checks of watches.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::timeout;

use super::{assert_delete_event, assert_put_event, next_event, txn};
use crate::store::{Op, Store};

/// A watch from now sees puts and deletes under its prefix, in order, and nothing else.
pub async fn watch_live(store: &Arc<dyn Store>, prefix: &str) {
    let mut rx = store.watch(prefix, 0).await.expect("watch");
    let (a, b) = (format!("{prefix}a"), format!("{prefix}b"));
    let outside = format!("{}-outside", prefix.trim_end_matches('/'));
    let ra = store.put(&a, b"1".to_vec()).await.expect("put a");
    store
        .put(&outside, b"x".to_vec())
        .await
        .expect("put outside");
    let rb = store.put(&b, b"2".to_vec()).await.expect("put b");
    store.delete(&a).await.expect("delete a");
    let t = store
        .txn(txn(
            vec![],
            vec![Op::put(&a, "3"), Op::put(&b, "4")],
            vec![],
        ))
        .await
        .expect("txn");
    assert_put_event(&next_event(&mut rx, "put a").await, &a, b"1", ra);
    assert_put_event(&next_event(&mut rx, "put b").await, &b, b"2", rb);
    let rd = assert_delete_event(&next_event(&mut rx, "delete a").await, &a, None);
    assert!(rd > rb);
    assert_put_event(
        &next_event(&mut rx, "txn put a").await,
        &a,
        b"3",
        t.revision,
    );
    assert_put_event(
        &next_event(&mut rx, "txn put b").await,
        &b,
        b"4",
        t.revision,
    );
    assert!(
        timeout(Duration::from_millis(200), rx.recv())
            .await
            .is_err(),
        "no further events expected"
    );
}

/// A watch from a past revision replays history, then continues live without a gap or a
/// duplicate.
pub async fn watch_replay(store: &Arc<dyn Store>, prefix: &str) {
    let (a, b) = (format!("{prefix}a"), format!("{prefix}b"));
    let r1 = store.put(&a, b"1".to_vec()).await.expect("put a");
    let r2 = store.put(&b, b"2".to_vec()).await.expect("put b");
    store.delete(&a).await.expect("delete a");
    let mut from_r1 = store.watch(prefix, r1).await.expect("watch from r1");
    let mut from_r2 = store.watch(prefix, r2).await.expect("watch from r2");
    assert_put_event(
        &next_event(&mut from_r1, "replay put a").await,
        &a,
        b"1",
        r1,
    );
    assert_put_event(
        &next_event(&mut from_r1, "replay put b").await,
        &b,
        b"2",
        r2,
    );
    assert_delete_event(&next_event(&mut from_r1, "replay delete a").await, &a, None);
    assert_put_event(
        &next_event(&mut from_r2, "replay put b").await,
        &b,
        b"2",
        r2,
    );
    assert_delete_event(&next_event(&mut from_r2, "replay delete a").await, &a, None);
    let r4 = store.put(&b, b"3".to_vec()).await.expect("live put");
    assert_put_event(&next_event(&mut from_r1, "live put").await, &b, b"3", r4);
    assert_put_event(&next_event(&mut from_r2, "live put").await, &b, b"3", r4);
    assert!(
        timeout(Duration::from_millis(200), from_r1.recv())
            .await
            .is_err()
    );
}
