//! Tests of the embedded store: the conformance suite (with and without the write-ahead log),
//! durability across close and crash, group commit, watch history limits; `model` holds a
//! property test against a `BTreeMap`, `bench` the throughput benchmark.

use std::sync::Arc;
use std::time::Duration;

use scabbard_common::Error;
use tempfile::TempDir;
use tokio::time::timeout;

mod bench;
mod model;

use super::wal::Wal;
use super::{EmbeddedOptions, EmbeddedStore};
use crate::store::{Op, Store, Txn, WatchEvent, conformance};

pub(super) fn temp_store() -> (TempDir, Arc<EmbeddedStore>) {
    temp_store_with(EmbeddedOptions::default())
}

pub(super) fn temp_store_with(options: EmbeddedOptions) -> (TempDir, Arc<EmbeddedStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open_with(&dir.path().join("state.redb"), options).expect("open");
    (dir, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes() {
    let (_dir, store) = temp_store();
    conformance::run_all(store.clone()).await;
    let dyn_store: Arc<dyn Store> = store.clone();
    conformance::txn_sees_own_writes(&dyn_store, "own_writes/").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_without_the_log() {
    let (dir, store) = temp_store_with(EmbeddedOptions {
        wal: false,
        ..EmbeddedOptions::default()
    });
    conformance::run_all(store.clone()).await;
    let stats = store.stats();
    assert!(stats.commits > 0 && stats.checkpoints == 0, "{stats:?}");
    store.close().await.expect("close");
    assert!(!Wal::path_for(&dir.path().join("state.redb")).exists());
}

const CRASH_DIR: &str = "SCABBARD_TEST_CRASH_DIR";
const CRASH_CHECKPOINT: &str = "SCABBARD_TEST_CRASH_CHECKPOINT";
const CRASH_EXIT: i32 = 17;

/// Not a test on its own: `crash_recovery` runs it in a child process, which writes and then
/// exits without closing the store, as a crash would.
#[test]
#[ignore = "helper of crash_recovery, run in a child process"]
fn crash_child() {
    let Ok(dir) = std::env::var(CRASH_DIR) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let options = EmbeddedOptions {
        checkpoint_interval: if std::env::var(CRASH_CHECKPOINT).is_ok() {
            Duration::ZERO
        } else {
            Duration::from_secs(3600)
        },
        ..EmbeddedOptions::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = EmbeddedStore::open_with(&dir.join("state.redb"), options).unwrap();
        let lease = store.lease_grant(Duration::from_secs(600)).await.unwrap();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(
                    async move { store.put(&format!("k/{i:03}"), vec![i as u8; 100]).await },
                )
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        store
            .txn(Txn {
                success: vec![Op::Put {
                    key: "leased".into(),
                    value: vec![],
                    lease,
                }],
                ..Txn::default()
            })
            .await
            .unwrap();
        assert!(store.delete("k/000").await.unwrap());
        // A background write is answered unsynced: a process crash (the page cache
        // survives it) still finds it in the log.
        store
            .txn_background(Txn {
                success: vec![Op::delete("k/199")],
                ..Txn::default()
            })
            .await
            .unwrap();
        std::fs::write(dir.join("lease"), lease.to_string()).unwrap();
        // Crash: no close, no drop, no final checkpoint.
        std::process::exit(CRASH_EXIT);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_recovery() {
    for checkpoint_every_batch in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child
            .args([
                "--exact",
                "store::embedded::tests::crash_child",
                "--ignored",
                "--nocapture",
            ])
            .env(CRASH_DIR, dir.path());
        if checkpoint_every_batch {
            child.env(CRASH_CHECKPOINT, "1");
        }
        let status = child.status().unwrap();
        assert_eq!(status.code(), Some(CRASH_EXIT), "child: {status:?}");
        let lease: i64 = std::fs::read_to_string(dir.path().join("lease"))
            .unwrap()
            .parse()
            .unwrap();
        let store = EmbeddedStore::open(&dir.path().join("state.redb")).expect("reopen");
        // 200 puts, the leased put, two deletes; the lease grant does not bump.
        assert_eq!(
            store.revision().await.unwrap(),
            1 + 203,
            "checkpoint={checkpoint_every_batch}"
        );
        let page = store.range("k/", None, 0).await.unwrap();
        assert_eq!(page.kvs.len(), 198);
        assert_eq!(page.kvs[0].key, "k/001");
        assert_eq!(page.kvs[197].key, "k/198");
        assert!(
            page.kvs
                .iter()
                .all(|kv| kv.version == 1 && kv.value.len() == 100)
        );
        assert_eq!(store.get("leased").await.unwrap().unwrap().lease, lease);
        store
            .lease_keep_alive(lease)
            .await
            .expect("lease survives the crash");
        let next = store.lease_grant(Duration::from_secs(1)).await.unwrap();
        assert!(next > lease);
        store.close().await.unwrap();
    }
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
    let huge = Txn {
        success: (0..30)
            .map(|i| Op::put(format!("huge/{i}"), vec![0; 1_200_000]))
            .collect(),
        ..Txn::default()
    };
    assert!(matches!(
        store.txn(huge).await,
        Err(Error::ResourceExhausted(_))
    ));
    store.health().await.unwrap();
}

#[test]
fn the_store_file_and_its_log_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let (dir, store) = temp_store();
    let path = dir.path().join("state.redb");
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&Wal::path_for(&path)), 0o600);
    drop(store);
    // Found wider at start: tightened.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(Wal::path_for(&path), std::fs::Permissions::from_mode(0o644)).unwrap();
    let _store = EmbeddedStore::open(&path).expect("reopen");
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&Wal::path_for(&path)), 0o600);
}
