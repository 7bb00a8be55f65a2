//! Conformance checks of keys, revisions, transactions and ranges.

use std::sync::Arc;

use super::{get_op, must_get, txn};
use crate::store::{CmpOp, Compare, CompareTarget, KeyValue, Op, OpResult, Store};

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
    type IntTarget = fn(i64) -> CompareTarget;
    let ints: [(IntTarget, i64); 3] = [
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
