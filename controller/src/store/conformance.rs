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
use tokio::time::{Instant, timeout};

use super::{
    CmpOp, Compare, CompareTarget, KeyValue, LeaseId, Op, OpResult, Store, Txn, WatchEvent,
    WatchStream,
};

/// How long a check waits for an event that should come promptly.
const EVENT_WAIT: Duration = Duration::from_secs(10);
/// TTL of the leases the lease checks grant.
const SHORT_TTL: Duration = Duration::from_secs(1);

/// Runs every check, each under its own fresh prefix.
pub async fn run_all(store: Arc<dyn Store>) {
    let run = ulid::Ulid::new();
    let p = |name: &str| format!("conformance/{run}/{name}/");
    put_get_metadata(&store, &p("put_get")).await;
    revisions(&store, &p("revisions")).await;
    txn_compares(&store, &p("compares")).await;
    txn_sees_own_writes(&store, &p("own_writes")).await;
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

fn txn(compares: Vec<Compare>, success: Vec<Op>, failure: Vec<Op>) -> Txn {
    Txn {
        compares,
        success,
        failure,
    }
}

fn get_op(key: &str) -> Op {
    Op::Get { key: key.into() }
}

fn put_leased(key: &str, value: &[u8], lease: LeaseId) -> Op {
    Op::Put {
        key: key.into(),
        value: value.to_vec(),
        lease,
    }
}

async fn must_get(store: &Arc<dyn Store>, key: &str) -> KeyValue {
    match store.get(key).await {
        Ok(Some(kv)) => kv,
        other => panic!("get {key:?}: expected a value, got {other:?}"),
    }
}

/// Next watch event, failing the check after [`EVENT_WAIT`].
async fn next_event(rx: &mut WatchStream, what: &str) -> WatchEvent {
    match timeout(EVENT_WAIT, rx.recv()).await {
        Ok(Some(Ok(e))) => e,
        Ok(Some(Err(e))) => panic!("{what}: watch failed: {e}"),
        Ok(None) => panic!("{what}: watch ended"),
        Err(_) => panic!("{what}: no watch event within {EVENT_WAIT:?}"),
    }
}

fn assert_put_event(e: &WatchEvent, key: &str, value: &[u8], rev: i64) {
    match e {
        WatchEvent::Put(kv) if kv.key == key && kv.value == value && kv.mod_revision == rev => {}
        other => panic!("expected Put({key:?}, rev {rev}), got {other:?}"),
    }
}

fn assert_delete_event(e: &WatchEvent, key: &str, rev: Option<i64>) -> i64 {
    match e {
        WatchEvent::Delete { key: k, revision }
            if k == key && rev.is_none_or(|r| r == *revision) =>
        {
            *revision
        }
        other => panic!("expected Delete({key:?}, rev {rev:?}), got {other:?}"),
    }
}

fn assert_not_found<T: std::fmt::Debug>(r: scabbard_common::Result<T>, what: &str) {
    assert!(
        matches!(r, Err(Error::NotFound { .. })),
        "{what}: expected NotFound, got {r:?}"
    );
}

/// Put/get/delete and the metadata etcd keeps per key.
pub async fn put_get_metadata(store: &Arc<dyn Store>, prefix: &str) {
    let k = format!("{prefix}k");
    assert_eq!(store.get(&k).await.expect("get missing"), None);
    let r1 = store.put(&k, b"v1".to_vec()).await.expect("put 1");
    let kv = must_get(store, &k).await;
    assert_eq!(
        kv,
        KeyValue {
            key: k.clone(),
            value: b"v1".to_vec(),
            create_revision: r1,
            mod_revision: r1,
            version: 1,
            lease: 0,
        }
    );
    let r2 = store.put(&k, b"v2".to_vec()).await.expect("put 2");
    assert!(r2 > r1, "second put revision {r2} must exceed {r1}");
    let kv = must_get(store, &k).await;
    assert_eq!(
        (
            kv.value.as_slice(),
            kv.create_revision,
            kv.mod_revision,
            kv.version
        ),
        (&b"v2"[..], r1, r2, 2)
    );
    assert!(store.revision().await.expect("revision") >= r2);
    assert!(store.delete(&k).await.expect("delete"));
    assert_eq!(store.get(&k).await.expect("get deleted"), None);
    assert!(!store.delete(&k).await.expect("delete again"));
    let r3 = store.put(&k, Vec::new()).await.expect("re-create");
    let kv = must_get(store, &k).await;
    assert_eq!(
        (
            kv.value.len(),
            kv.create_revision,
            kv.mod_revision,
            kv.version
        ),
        (0, r3, r3, 1),
        "a re-created key starts a new life"
    );
}

/// One revision per writing transaction, none for a transaction that writes nothing.
/// Assumes no other writer meanwhile.
pub async fn revisions(store: &Arc<dyn Store>, prefix: &str) {
    let (a, b, c) = (
        format!("{prefix}a"),
        format!("{prefix}b"),
        format!("{prefix}c"),
    );
    let before = store.revision().await.expect("revision");
    let r = store
        .txn(txn(
            vec![],
            vec![Op::put(&a, "1"), Op::put(&b, "1"), Op::put(&c, "1")],
            vec![],
        ))
        .await
        .expect("three puts");
    assert_eq!(
        r.revision,
        before + 1,
        "a txn of three puts is one revision"
    );
    for k in [&a, &b, &c] {
        assert_eq!(must_get(store, k).await.mod_revision, r.revision);
    }
    let no_writes = [
        txn(vec![], vec![get_op(&a)], vec![]),
        txn(vec![], vec![Op::delete(format!("{prefix}missing"))], vec![]),
        txn(vec![Compare::absent(&a)], vec![Op::put(&a, "x")], vec![]),
        txn(vec![], vec![], vec![]),
    ];
    for t in no_writes {
        let resp = store.txn(t.clone()).await.expect("txn without writes");
        assert_eq!(
            resp.revision, r.revision,
            "{t:?} must not bump the revision"
        );
    }
    assert_eq!(store.revision().await.expect("revision"), r.revision);
    assert_eq!(
        store.put(&a, b"2".to_vec()).await.expect("put"),
        r.revision + 1
    );
}

/// Every compare target with every operator, on a present and a missing key; branches.
pub async fn txn_compares(store: &Arc<dyn Store>, prefix: &str) {
    let k = format!("{prefix}k");
    let create = store.put(&k, b"m1".to_vec()).await.expect("put 1");
    let modr = store.put(&k, b"m".to_vec()).await.expect("put 2");
    let holds = |key: &str, op: CmpOp, target: CompareTarget| {
        let c = Compare {
            key: key.to_string(),
            op,
            target,
        };
        let ok_key = format!("{prefix}ok");
        let store = Arc::clone(store);
        async move {
            let r = store
                .txn(txn(
                    vec![c.clone()],
                    vec![get_op(&ok_key)],
                    vec![get_op(&ok_key), get_op(&ok_key)],
                ))
                .await
                .expect("compare txn");
            let want = if r.succeeded { 1 } else { 2 };
            assert_eq!(
                r.results.len(),
                want,
                "{c:?}: results must come from the branch that ran"
            );
            r.succeeded
        }
    };
    use CmpOp::*;
    let ints: [(fn(i64) -> CompareTarget, i64); 3] = [
        (CompareTarget::Version, 2),
        (CompareTarget::CreateRevision, create),
        (CompareTarget::ModRevision, modr),
    ];
    for (target, actual) in ints {
        let cases = [
            (Equal, actual, true),
            (Equal, actual - 1, false),
            (NotEqual, actual, false),
            (NotEqual, actual + 1, true),
            (Greater, actual - 1, true),
            (Greater, actual, false),
            (Less, actual + 1, true),
            (Less, actual, false),
        ];
        for (op, operand, want) in cases {
            let got = holds(&k, op, target(operand)).await;
            assert_eq!(
                got,
                want,
                "{:?} {op:?} {operand} (actual {actual})",
                target(operand)
            );
        }
    }
    let value_cases: [(CmpOp, &[u8], bool); 8] = [
        (Equal, b"m", true),
        (Equal, b"m1", false),
        (NotEqual, b"m", false),
        (NotEqual, b"x", true),
        (Greater, b"a", true),
        (Greater, b"m", false),
        (Less, b"z", true),
        (Less, b"m", false),
    ];
    for (op, operand, want) in value_cases {
        let got = holds(&k, op, CompareTarget::Value(operand.to_vec())).await;
        assert_eq!(got, want, "value {op:?} {operand:?}");
    }
    let missing = format!("{prefix}missing");
    for target in [
        CompareTarget::Version(0),
        CompareTarget::CreateRevision(0),
        CompareTarget::ModRevision(0),
    ] {
        assert!(
            holds(&missing, Equal, target.clone()).await,
            "missing key: {target:?} == 0"
        );
        assert!(
            !holds(&missing, Greater, target).await,
            "missing key: nothing > 0"
        );
    }
    // All compares must hold; one false one sends the txn to `failure`.
    let r = store
        .txn(txn(
            vec![Compare::mod_revision(&k, modr), Compare::absent(&k)],
            vec![Op::put(&k, "should not happen")],
            vec![get_op(&k)],
        ))
        .await
        .expect("two compares");
    assert!(!r.succeeded);
    match &r.results[..] {
        [OpResult::Get(Some(kv))] => assert_eq!(kv.value, b"m"),
        other => panic!("failure branch results: {other:?}"),
    }
    let r = store
        .txn(txn(
            vec![Compare::mod_revision(&k, modr), Compare::absent(&missing)],
            vec![Op::put(&k, "n")],
            vec![],
        ))
        .await
        .expect("two holding compares");
    assert!(r.succeeded);
    assert_eq!(r.results, vec![OpResult::Put]);
    assert_eq!(must_get(store, &k).await.mod_revision, r.revision);
}

/// Reads inside a transaction see its earlier writes.
pub async fn txn_sees_own_writes(store: &Arc<dyn Store>, prefix: &str) {
    let k = format!("{prefix}k");
    let r = store
        .txn(txn(
            vec![Compare::absent(&k)],
            vec![Op::put(&k, "v"), get_op(&k), Op::delete(&k), get_op(&k)],
            vec![],
        ))
        .await
        .expect("txn");
    assert!(r.succeeded);
    match &r.results[..] {
        [
            OpResult::Put,
            OpResult::Get(Some(kv)),
            OpResult::Delete(true),
            OpResult::Get(None),
        ] => {
            assert_eq!((kv.value.as_slice(), kv.version), (&b"v"[..], 1));
            assert_eq!(
                (kv.create_revision, kv.mod_revision),
                (r.revision, r.revision)
            );
        }
        other => panic!("results: {other:?}"),
    }
    assert_eq!(store.get(&k).await.expect("get"), None);
}

/// Many tasks create the same key if absent: exactly one wins, the others see its value.
pub async fn create_if_absent_race(store: &Arc<dyn Store>, prefix: &str) {
    const TASKS: usize = 64;
    let k = format!("{prefix}leader");
    let mut handles = Vec::with_capacity(TASKS);
    for i in 0..TASKS {
        let store = Arc::clone(store);
        let k = k.clone();
        handles.push(tokio::spawn(async move {
            store
                .txn(txn(
                    vec![Compare::absent(&k)],
                    vec![Op::put(&k, format!("task-{i}"))],
                    vec![get_op(&k)],
                ))
                .await
                .expect("race txn")
        }));
    }
    let mut winners = Vec::new();
    let mut seen = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let r = h.await.expect("race task");
        if r.succeeded {
            winners.push(format!("task-{i}").into_bytes());
        } else {
            match &r.results[..] {
                [OpResult::Get(Some(kv))] => seen.push(kv.value.clone()),
                other => panic!("loser results: {other:?}"),
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one creator must win");
    assert!(
        seen.iter().all(|v| *v == winners[0]),
        "losers must see the winner's value"
    );
    assert_eq!(must_get(store, &k).await.value, winners[0]);
}

/// Concurrent read-modify-write loops guarded by mod revision lose no update.
pub async fn cas_counter(store: &Arc<dyn Store>, prefix: &str) {
    const TASKS: usize = 16;
    const INCREMENTS: usize = 10;
    let k = format!("{prefix}counter");
    store.put(&k, b"0".to_vec()).await.expect("init");
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let store = Arc::clone(store);
        let k = k.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..INCREMENTS {
                loop {
                    let kv = must_get(&store, &k).await;
                    let n: u64 = String::from_utf8_lossy(&kv.value).parse().expect("counter");
                    let r = store
                        .txn(txn(
                            vec![Compare::mod_revision(&k, kv.mod_revision)],
                            vec![Op::put(&k, (n + 1).to_string())],
                            vec![],
                        ))
                        .await
                        .expect("cas");
                    if r.succeeded {
                        break;
                    }
                }
            }
        }));
    }
    for h in handles {
        h.await.expect("cas task");
    }
    let kv = must_get(store, &k).await;
    assert_eq!(kv.value, (TASKS * INCREMENTS).to_string().into_bytes());
    assert_eq!(kv.version, (TASKS * INCREMENTS + 1) as i64);
}

/// Prefix ranges: order, paging with `start_after` and `limit`, `more`.
pub async fn range_paging(store: &Arc<dyn Store>, prefix: &str) {
    let keys: Vec<String> = (0..25).map(|i| format!("{prefix}k{i:02}")).collect();
    // Neighbours that share a string prefix with the range but are outside it.
    let outside = format!("{}x", prefix.trim_end_matches('/'));
    store
        .put(&outside, b"no".to_vec())
        .await
        .expect("put outside");
    let mut last = 0;
    for k in keys.iter().rev() {
        last = store.put(k, k.as_bytes().to_vec()).await.expect("put");
    }
    let all = store.range(prefix, None, 0).await.expect("range all");
    assert!(!all.more);
    assert!(all.revision >= last);
    let got: Vec<&str> = all.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(got, keys.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(all.kvs.iter().all(|kv| kv.value == kv.key.as_bytes()));

    let mut after: Option<String> = None;
    let mut pages = Vec::new();
    loop {
        let page = store
            .range(prefix, after.as_deref(), 10)
            .await
            .expect("range page");
        pages.push(page.kvs.len());
        let more = page.more;
        after = page.kvs.last().map(|kv| kv.key.clone());
        if !more {
            break;
        }
        assert!(pages.len() < 10, "paging does not terminate");
    }
    assert_eq!(pages, vec![10, 10, 5]);
    let exact = store.range(prefix, None, 25).await.expect("range 25");
    assert_eq!((exact.kvs.len(), exact.more), (25, false));
    let tail = store.range(prefix, Some(&keys[24]), 0).await.expect("tail");
    assert_eq!((tail.kvs.len(), tail.more), (0, false));
    let before = store
        .range(prefix, Some(""), 3)
        .await
        .expect("start before prefix");
    assert_eq!(before.kvs[0].key, keys[0]);
    assert!(before.more);
    let mid = store.range(prefix, Some(&keys[4]), 2).await.expect("mid");
    let got: Vec<&str> = mid.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(got, vec![keys[5].as_str(), keys[6].as_str()]);
    let none = store
        .range(&format!("{prefix}nothing/"), None, 0)
        .await
        .expect("empty");
    assert!(none.kvs.is_empty() && !none.more);
}

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
    let before = store.put(&k, b"before".to_vec()).await.expect("put");
    assert_not_found(
        store
            .txn(txn(
                vec![],
                vec![Op::put(&k, "partial"), put_leased(&k, b"x", unknown)],
                vec![],
            ))
            .await,
        "put with an unknown lease",
    );
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
    assert!(store.revision().await.expect("revision") >= rev);
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

/// A live store reports healthy.
pub async fn health(store: &Arc<dyn Store>) {
    store.health().await.expect("health");
}
