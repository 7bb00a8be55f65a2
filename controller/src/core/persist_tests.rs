//! The persister against a real embedded store wrapped in [`FaultyStore`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::store::EmbeddedStore;
use crate::store::faults::FaultyStore;

/// Each write's name and the outcome its effect saw, in the order effects ran.
type Outcomes = Arc<Mutex<Vec<(String, std::result::Result<(), CommitError>)>>>;

struct Rig {
    _dir: tempfile::TempDir,
    faulty: Arc<FaultyStore>,
    persister: Persister,
    events: PersisterEvents,
    task: tokio::task::JoinHandle<()>,
    outcomes: Outcomes,
}

fn rig(limits: BatchLimits) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let inner: Arc<dyn Store> = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
    let faulty = FaultyStore::new(inner);
    let (persister, events, task) = Persister::start(faulty.clone(), limits, None);
    Rig {
        _dir: dir,
        faulty,
        persister,
        events,
        task,
        outcomes: Arc::default(),
    }
}

impl Rig {
    fn write(&self, key: &str, value: &[u8]) -> Write {
        let outcomes = self.outcomes.clone();
        let name = key.to_string();
        Write {
            key: key.into(),
            value: Some(value.to_vec()),
            also: Vec::new(),
            effects: vec![Box::new(move |r| {
                outcomes.lock().unwrap().push((name, r.clone()));
            })],
        }
    }

    fn barrier(&self, name: &str) -> Write {
        let outcomes = self.outcomes.clone();
        let name = name.to_string();
        Write::barrier(vec![Box::new(move |r| {
            outcomes.lock().unwrap().push((name, r.clone()));
        })])
    }

    /// Queues everything before the persister can look (one batch, as under load).
    async fn send_all(&self, writes: Vec<Write>) {
        for w in writes {
            self.persister.write(w).await.unwrap();
        }
    }

    async fn settled(&self, n: usize) -> Vec<(String, std::result::Result<(), CommitError>)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.outcomes.lock().unwrap().clone();
            if got.len() >= n {
                return got;
            }
            assert!(tokio::time::Instant::now() < deadline, "only {got:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn wide() -> BatchLimits {
    BatchLimits {
        ops: 1000,
        bytes: 1 << 30,
    }
}

#[tokio::test]
async fn a_refused_write_fails_alone_and_its_batch_commits() {
    let r = rig(wide());
    r.faulty.refuse_puts(|key, _| key == "tasks/big");
    // Hold the persister on a first write so the rest queue up into one batch.
    r.send_all(vec![
        r.write("tasks/a", b"a"),
        r.write("tasks/big", b"huge"),
        r.write("tasks/b", b"b"),
        r.barrier("after"),
    ])
    .await;
    let got = r.settled(4).await;
    let by_key: std::collections::HashMap<_, _> = got.iter().cloned().collect();
    assert!(by_key["tasks/a"].is_ok(), "{got:?}");
    assert!(by_key["tasks/b"].is_ok(), "{got:?}");
    let refused = by_key["tasks/big"].as_ref().unwrap_err();
    assert!(refused.refused, "{refused:?}");
    assert!(refused.message.contains("too large"), "{refused}");
    assert!(by_key["after"].is_ok());
    // The order of effects is the order of writes.
    let order: Vec<_> = got.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(order, ["tasks/a", "tasks/big", "tasks/b", "after"]);
    let mut r = r;
    let report = r.events.refused.recv().await.unwrap();
    assert_eq!(report.key, "tasks/big");
    assert!(!r.events.term_over.is_cancelled());
    assert_eq!(r.faulty.get("tasks/a").await.unwrap().unwrap().value, b"a");
    assert_eq!(r.faulty.get("tasks/b").await.unwrap().unwrap().value, b"b");
    assert!(r.faulty.get("tasks/big").await.unwrap().is_none());
    // And the persister goes on.
    r.faulty.stop_refusing();
    r.send_all(vec![r.write("tasks/c", b"c")]).await;
    assert!(r.settled(5).await[4].1.is_ok());
}

#[tokio::test]
async fn batches_are_bounded_by_bytes() {
    let r = rig(BatchLimits {
        ops: 1000,
        bytes: 10_000,
    });
    let value = vec![7u8; 3_000];
    let writes = (0..10)
        .map(|i| r.write(&format!("k/{i}"), &value))
        .collect::<Vec<_>>();
    r.send_all(writes).await;
    let got = r.settled(10).await;
    assert!(got.iter().all(|(_, res)| res.is_ok()));
    // 3 writes of ~3 KB per 10 KB batch at most: at least 4 commits for 10 writes.
    assert!(r.faulty.committed() >= 4, "{}", r.faulty.committed());
    // A single write over the bound still goes (alone); the store decides.
    r.send_all(vec![r.write("k/big", &vec![1u8; 20_000])]).await;
    assert!(r.settled(11).await[10].1.is_ok());
}

#[tokio::test]
async fn an_outage_ends_the_term_and_nothing_queued_after_it_commits() {
    let r = rig(wide());
    r.send_all(vec![r.write("k/before", b"1")]).await;
    r.settled(1).await;
    r.faulty.set_outage(true);
    r.send_all(vec![r.write("k/during", b"2")]).await;
    let got = r.settled(2).await;
    let err = got[1].1.as_ref().unwrap_err();
    assert!(!err.refused, "{err:?}");
    tokio::time::timeout(Duration::from_secs(5), r.events.term_over.cancelled())
        .await
        .expect("the term is over");
    // The store is back, but this term's persister commits nothing more: a new term must
    // read the store first.
    r.faulty.set_outage(false);
    let committed = r.faulty.committed();
    r.send_all(vec![r.write("k/after", b"3"), r.barrier("barrier")])
        .await;
    let got = r.settled(4).await;
    assert!(got[2].1.is_err() && got[3].1.is_err(), "{got:?}");
    assert_eq!(r.faulty.committed(), committed);
    assert!(r.faulty.get("k/after").await.unwrap().is_none());
    // Dropping the last handle ends the loop.
    drop(r.persister);
    tokio::time::timeout(Duration::from_secs(5), r.task)
        .await
        .expect("the persister ends")
        .unwrap();
}

#[tokio::test]
async fn a_barrier_waits_for_what_came_before() {
    let r = rig(BatchLimits {
        ops: 1,
        bytes: 1 << 30,
    });
    r.send_all(vec![
        r.write("k/1", b"1"),
        r.write("k/2", b"2"),
        r.barrier("b"),
    ])
    .await;
    let got = r.settled(3).await;
    assert_eq!(got[2].0, "b");
    assert!(got.iter().all(|(_, res)| res.is_ok()));
    assert!(r.faulty.get("k/2").await.unwrap().is_some());
}
