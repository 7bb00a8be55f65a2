//! Tests of the embedded store: the conformance suite, durability across reopen, group commit,
//! watch history limits, and a model-based property test.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use scabbard_common::Error;
use tempfile::TempDir;
use tokio::time::timeout;

use super::{EmbeddedOptions, EmbeddedStore};
use crate::store::{
    CmpOp, Compare, CompareTarget, Op, OpResult, Store, Txn, WatchEvent, conformance,
};

fn temp_store() -> (TempDir, Arc<EmbeddedStore>) {
    temp_store_with(EmbeddedOptions::default())
}

fn temp_store_with(options: EmbeddedOptions) -> (TempDir, Arc<EmbeddedStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open_with(&dir.path().join("state.redb"), options).expect("open");
    (dir, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes() {
    let (_dir, store) = temp_store();
    conformance::run_all(store.clone()).await;
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_revision_and_leases_survive_close_and_reopen() {
    let (dir, store) = temp_store();
    let path = store.path().to_path_buf();
    store.put("a", b"1".to_vec()).await.unwrap();
    store.put("b", b"2".to_vec()).await.unwrap();
    let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap();
    let rev = store
        .txn(Txn {
            success: vec![Op::Put {
                key: "leased".into(),
                value: b"l".to_vec(),
                lease,
            }],
            ..Txn::default()
        })
        .await
        .unwrap()
        .revision;
    store.close().await.unwrap();
    assert!(matches!(store.get("a").await, Err(Error::Unavailable(_))));
    assert!(store.health().await.is_err());
    store.close().await.expect("close is idempotent");

    let store = EmbeddedStore::open(&path).expect("reopen");
    assert_eq!(store.revision().await.unwrap(), rev);
    assert_eq!(store.get("a").await.unwrap().unwrap().value, b"1");
    let kv = store.get("leased").await.unwrap().unwrap();
    assert_eq!((kv.lease, kv.mod_revision), (lease, rev));
    store
        .lease_keep_alive(lease)
        .await
        .expect("lease survives reopen");
    let next = store.lease_grant(Duration::from_secs(60)).await.unwrap();
    assert!(next > lease, "lease ids are not reused");
    assert_eq!(store.put("c", b"3".to_vec()).await.unwrap(), rev + 1);
    // The lease index was rebuilt: revoking deletes the key.
    store.lease_revoke(lease).await.unwrap();
    assert_eq!(store.get("leased").await.unwrap(), None);
    // History from before the reopen is gone; from now on it is kept.
    assert!(matches!(
        store.watch("", rev).await,
        Err(Error::FailedPrecondition(_))
    ));
    store
        .watch("", rev + 1)
        .await
        .expect("watch from after the reopen");
    drop(store);
    // Dropping the last handle closes the file too.
    let store = EmbeddedStore::open(&path).expect("reopen after drop");
    assert_eq!(store.get("c").await.unwrap().unwrap().value, b"3");
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_keys_expire_after_reopen() {
    let (_dir, store) = temp_store();
    let path = store.path().to_path_buf();
    let lease = store.lease_grant(Duration::from_millis(500)).await.unwrap();
    store
        .txn(Txn {
            success: vec![Op::Put {
                key: "k".into(),
                value: vec![],
                lease,
            }],
            ..Txn::default()
        })
        .await
        .unwrap();
    store.close().await.unwrap();
    let store = EmbeddedStore::open(&path).unwrap();
    let mut rx = store.watch("k", 0).await.unwrap();
    let e = timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(e, WatchEvent::Delete { ref key, .. } if key == "k"),
        "{e:?}"
    );
    assert_not_found(store.lease_keep_alive(lease).await);
}

fn assert_not_found<T: std::fmt::Debug>(r: scabbard_common::Result<T>) {
    assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
}

#[tokio::test]
async fn a_second_open_of_the_same_file_is_refused() {
    let (_dir, store) = temp_store();
    let err = EmbeddedStore::open(store.path()).expect_err("second open must fail");
    assert!(
        matches!(&err, Error::Unavailable(m) if m.contains("locked")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_commits() {
    let (_dir, store) = temp_store();
    let before = store.stats();
    let tasks: Vec<_> = (0..256)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                for j in 0..4 {
                    store
                        .put(&format!("k/{i}/{j}"), vec![0; 200])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let after = store.stats();
    let (commits, txns) = (after.commits - before.commits, after.txns - before.txns);
    assert_eq!(txns, 1024);
    assert!(commits < txns / 2, "{commits} commits for {txns} txns");
    assert_eq!(store.revision().await.unwrap(), 1 + 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_txn_does_not_disturb_its_batch() {
    let (_dir, store) = temp_store();
    let tasks: Vec<_> = (0..200i64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let lease = if i % 2 == 0 { 0 } else { 999_999 };
                let r = store
                    .txn(Txn {
                        success: vec![
                            Op::put(format!("k/{i}/plain"), "v"),
                            Op::Put {
                                key: format!("k/{i}/leased"),
                                value: vec![],
                                lease,
                            },
                        ],
                        ..Txn::default()
                    })
                    .await;
                (i, r)
            })
        })
        .collect();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        let present = store.get(&format!("k/{i}/plain")).await.unwrap().is_some();
        if i % 2 == 0 {
            assert!(r.is_ok() && present);
        } else {
            assert_not_found(r);
            assert!(!present, "txn {i} failed but left a write");
        }
    }
    let page = store.range("k/", None, 0).await.unwrap();
    assert_eq!(page.kvs.len(), 200);
    assert_eq!(page.revision, 1 + 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_watcher_gets_an_error_and_old_history_is_compacted() {
    let (_dir, store) = temp_store_with(EmbeddedOptions {
        watch_history: 10,
        watch_buffer: 2,
        ..EmbeddedOptions::default()
    });
    let mut slow = store.watch("k", 0).await.unwrap();
    let first = store.put("k0", vec![]).await.unwrap();
    for i in 1..50 {
        store.put(&format!("k{i}"), vec![]).await.unwrap();
    }
    assert!(matches!(
        store.watch("k", first).await,
        Err(Error::FailedPrecondition(m)) if m.contains("compacted")
    ));
    let mut got_err = false;
    while let Some(item) = timeout(Duration::from_secs(5), slow.recv()).await.unwrap() {
        if let Err(e) = item {
            assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
            got_err = true;
        }
    }
    assert!(got_err, "the slow watcher must end with an error");
    // A watch inside the kept history still works.
    let rev = store.revision().await.unwrap();
    let mut w = store.watch("k", rev - 2).await.unwrap();
    for _ in 0..3 {
        timeout(Duration::from_secs(5), w.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn bad_input_is_rejected_not_panicked_on() {
    let (_dir, store) = temp_store();
    assert!(matches!(
        store.put("", vec![]).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        store.put("big", vec![0; 2 * 1024 * 1024]).await,
        Err(Error::ResourceExhausted(_))
    ));
    assert!(matches!(
        store.lease_grant(Duration::ZERO).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        store.watch("", -5).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(store.get(&"x".repeat(100_000)).await.unwrap().is_none());
    store.health().await.unwrap();
}

/// How the benchmark picks keys.
#[derive(Debug, Clone, Copy)]
enum KeyLayout {
    /// Each writer appends under its own prefix: every txn of a batch touches its own leaf.
    PerWriter,
    /// Globally increasing keys (ULID-like ids): a batch touches a few leaves.
    Sequential,
    /// Updates of random existing keys among 20,000.
    RandomUpdate,
}

/// Write throughput with 256 concurrent writers of ~200-byte puts. Run with
/// `cargo test --release -p scabbard-controller throughput -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark; run in release mode"]
fn throughput_256_writers() {
    for layout in [
        KeyLayout::Sequential,
        KeyLayout::RandomUpdate,
        KeyLayout::PerWriter,
    ] {
        if std::env::var("BENCH_LAYOUT").is_ok_and(|l| l != format!("{layout:?}")) {
            continue;
        }
        bench(layout, 256, 400);
    }
}

fn bench(layout: KeyLayout, writers: usize, per_writer: usize) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (_dir, store) = temp_store();
        const UPDATE_KEYS: u64 = 20_000;
        if let KeyLayout::RandomUpdate = layout {
            for chunk in 0..UPDATE_KEYS / 1000 {
                let ops = (chunk * 1000..(chunk + 1) * 1000)
                    .map(|i| Op::put(format!("bench/{i:08}"), vec![b'x'; 200]))
                    .collect();
                store
                    .txn(Txn {
                        success: ops,
                        ..Txn::default()
                    })
                    .await
                    .unwrap();
            }
        }
        let counter = Arc::new(AtomicU64::new(0));
        let before = store.stats();
        let start = Instant::now();
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let store = store.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    for i in 0..per_writer {
                        let key = match layout {
                            KeyLayout::PerWriter => format!("bench/{w:03}/{i:06}"),
                            KeyLayout::Sequential => {
                                format!("bench/{:012}", counter.fetch_add(1, Ordering::Relaxed))
                            }
                            KeyLayout::RandomUpdate => {
                                format!("bench/{:08}", rand::random_range(0..UPDATE_KEYS))
                            }
                        };
                        store.put(&key, vec![b'x'; 200]).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let elapsed = start.elapsed();
        let after = store.stats();
        let (txns, commits) = (after.txns - before.txns, after.commits - before.commits);
        println!(
            "{layout:?}: {txns} txns in {elapsed:.2?}: {:.0} txns/s, {commits} commits \
             ({:.1} txns/commit)",
            txns as f64 / elapsed.as_secs_f64(),
            txns as f64 / commits.max(1) as f64
        );
        store.close().await.unwrap();
    });
}

/// One step of the model test.
#[derive(Debug, Clone)]
enum Step {
    Put(u8, u8),
    Delete(u8),
    /// If key's version == v then put, else delete other key.
    CasVersion(u8, i64, u8, u8),
    /// If key's value < bytes then [put, get], else [get].
    CasValueLess(u8, u8, u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..6u8, any::<u8>()).prop_map(|(k, v)| Step::Put(k, v)),
        (0..6u8).prop_map(Step::Delete),
        (0..6u8, 0..4i64, 0..6u8, any::<u8>())
            .prop_map(|(k, v, o, x)| Step::CasVersion(k, v, o, x)),
        (0..6u8, any::<u8>(), any::<u8>()).prop_map(|(k, b, x)| Step::CasValueLess(k, b, x)),
    ]
}

/// (value, create, mod, version)
type Model = BTreeMap<String, (Vec<u8>, i64, i64, i64)>;

fn key(k: u8) -> String {
    format!("m/{k}")
}

/// Applies ops to the model as the store should; returns (results, wrote).
fn model_ops(model: &mut Model, rev: i64, ops: &[Op]) -> (Vec<OpResult>, bool) {
    let mut wrote = false;
    let mut results = Vec::new();
    for op in ops {
        match op {
            Op::Put { key, value, .. } => {
                let e = model.get(key).cloned();
                let (create, version) = e.map_or((rev, 1), |(_, c, _, v)| (c, v + 1));
                model.insert(key.clone(), (value.clone(), create, rev, version));
                wrote = true;
                results.push(OpResult::Put);
            }
            Op::Delete { key } => {
                let existed = model.remove(key).is_some();
                wrote |= existed;
                results.push(OpResult::Delete(existed));
            }
            Op::Get { key } => results.push(OpResult::Get(model.get(key).map(|(v, c, m, ver)| {
                crate::store::KeyValue {
                    key: key.clone(),
                    value: v.clone(),
                    create_revision: *c,
                    mod_revision: *m,
                    version: *ver,
                    lease: 0,
                }
            }))),
        }
    }
    (results, wrote)
}

fn to_txn(s: &Step, model: &Model) -> (Txn, bool) {
    let get = |k: u8| Op::Get { key: key(k) };
    match s {
        Step::Put(k, v) => (
            Txn {
                success: vec![Op::put(key(*k), vec![*v])],
                ..Txn::default()
            },
            true,
        ),
        Step::Delete(k) => (
            Txn {
                success: vec![Op::delete(key(*k))],
                ..Txn::default()
            },
            true,
        ),
        Step::CasVersion(k, v, o, x) => {
            let holds = model.get(&key(*k)).map_or(0, |e| e.3) == *v;
            let t = Txn {
                compares: vec![Compare {
                    key: key(*k),
                    op: CmpOp::Equal,
                    target: CompareTarget::Version(*v),
                }],
                success: vec![Op::put(key(*k), vec![*x]), get(*k)],
                failure: vec![Op::delete(key(*o)), get(*o)],
            };
            (t, holds)
        }
        Step::CasValueLess(k, b, x) => {
            let cur = model.get(&key(*k)).map_or(Vec::new(), |e| e.0.clone());
            let holds = cur < vec![*b];
            let t = Txn {
                compares: vec![Compare {
                    key: key(*k),
                    op: CmpOp::Less,
                    target: CompareTarget::Value(vec![*b]),
                }],
                success: vec![Op::put(key(*k), vec![*x]), get(*k)],
                failure: vec![get(*k)],
            };
            (t, holds)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn store_agrees_with_a_btreemap_model(steps in proptest::collection::vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (_dir, store) = temp_store();
            let mut model = Model::new();
            let mut rev = store.revision().await.unwrap();
            for s in &steps {
                let (txn, holds) = to_txn(s, &model);
                let ops = if holds { txn.success.clone() } else { txn.failure.clone() };
                let (results, wrote) = model_ops(&mut model, rev + 1, &ops);
                if wrote {
                    rev += 1;
                }
                let r = store.txn(txn).await.unwrap();
                assert_eq!(r.succeeded, holds, "{s:?}");
                assert_eq!(r.revision, rev, "{s:?}");
                assert_eq!(r.results, results, "{s:?}");
            }
            let page = store.range("m/", None, 0).await.unwrap();
            let got: Model = page
                .kvs
                .into_iter()
                .map(|kv| (kv.key, (kv.value, kv.create_revision, kv.mod_revision, kv.version)))
                .collect();
            assert_eq!(got, model);
            assert_eq!(page.revision, rev);
            store.close().await.unwrap();
        });
    }
}
