//! Write throughput of the embedded store (ignored; run in release mode).

use std::sync::Arc;
use std::time::Instant;

use super::temp_store_with;
use crate::store::embedded::EmbeddedOptions;
use crate::store::{Op, Store, Txn};

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
        for wal in [true, false] {
            bench(layout, wal, 256, 400);
        }
    }
}

fn bench(layout: KeyLayout, wal: bool, writers: usize, per_writer: usize) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (_dir, store) = temp_store_with(EmbeddedOptions {
            wal,
            ..EmbeddedOptions::default()
        });
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
            "{layout:?} wal={wal}: {txns} txns in {elapsed:.2?}: {:.0} txns/s, {commits} \
             commits ({:.1} txns/commit), {} checkpoints",
            txns as f64 / elapsed.as_secs_f64(),
            txns as f64 / commits.max(1) as f64,
            after.checkpoints - before.checkpoints,
        );
        store.close().await.unwrap();
    });
}
