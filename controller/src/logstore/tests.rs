//! Tests of the log store against a real directory.

use std::fs::OpenOptions;
use std::io::Write;
use std::time::Duration;

use super::*;

fn chunk(seq: u64) -> proto::LogChunk {
    proto::LogChunk {
        attempt: 1,
        seq,
        stream: proto::LogStream::Stdout as i32,
        data: format!("line {seq}\n").into_bytes(),
        at_ms: 1_000 + seq as i64,
    }
}

fn chunks(seqs: std::ops::Range<u64>) -> Vec<proto::LogChunk> {
    seqs.map(chunk).collect()
}

/// Chunks as read back from `attempt`.
fn chunks_of(attempt: u32, seqs: std::ops::Range<u64>) -> Vec<proto::LogChunk> {
    seqs.map(|seq| proto::LogChunk {
        attempt,
        ..chunk(seq)
    })
    .collect()
}

fn seqs(chunks: &[proto::LogChunk]) -> Vec<u64> {
    chunks.iter().map(|c| c.seq).collect()
}

/// Waits (bounded) until the watched position satisfies `ok`.
async fn wait_for(
    rx: &mut watch::Receiver<LogPosition>,
    ok: impl FnMut(&LogPosition) -> bool,
) -> LogPosition {
    *tokio::time::timeout(Duration::from_secs(5), rx.wait_for(ok))
        .await
        .expect("position in time")
        .expect("sender alive")
}

#[tokio::test]
async fn append_then_read_from_any_seq() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.next_seq("t1", 1).await.unwrap(), 0);
    for batch in 0..10 {
        let next = store
            .append("t1", 1, &chunks(batch * 30..batch * 30 + 30))
            .await
            .unwrap();
        assert_eq!(next, batch * 30 + 30);
    }
    assert_eq!(store.next_seq("t1", 1).await.unwrap(), 300);
    assert_eq!(store.read("t1", 1, 0, 1000).await.unwrap(), chunks(0..300));
    for from in [1, 63, 64, 65, 127, 128, 200, 299] {
        let got = store.read("t1", 1, from, 10).await.unwrap();
        assert_eq!(
            seqs(&got),
            (from..(from + 10).min(300)).collect::<Vec<_>>(),
            "from {from}"
        );
    }
    assert!(store.read("t1", 1, 300, 10).await.unwrap().is_empty());
    assert!(store.read("t1", 2, 0, 10).await.unwrap().is_empty());
    let bytes: u64 = chunks(0..300).iter().map(|c| c.data.len() as u64).sum();
    assert_eq!(store.bytes("t1", 1).await.unwrap(), bytes);
}

#[tokio::test]
async fn read_reports_the_attempt_number() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    store.append("t1", 3, &chunks(0..1)).await.unwrap();
    assert_eq!(store.read("t1", 3, 0, 1).await.unwrap()[0].attempt, 3);
}

#[tokio::test]
async fn duplicates_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    store.append("t1", 1, &chunks(0..3)).await.unwrap();
    let mut replay = chunks(1..4);
    replay[0].data = b"different".to_vec();
    assert_eq!(store.append("t1", 1, &replay).await.unwrap(), 4);
    assert_eq!(store.append("t1", 1, &chunks(0..4)).await.unwrap(), 4);
    // A batch with a duplicate in the middle still appends the rest in order.
    let mut mixed = chunks(4..6);
    mixed.insert(1, chunk(2));
    assert_eq!(store.append("t1", 1, &mixed).await.unwrap(), 6);
    assert_eq!(store.read("t1", 1, 0, 100).await.unwrap(), chunks(0..6));
}

#[tokio::test]
async fn a_gap_is_rejected_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    store.append("t1", 1, &chunks(0..2)).await.unwrap();
    let err = store
        .append("t1", 1, &[chunk(2), chunk(4)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert_eq!(store.next_seq("t1", 1).await.unwrap(), 2);
    assert!(matches!(
        store.append("t2", 1, &[chunk(1)]).await,
        Err(Error::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn bad_task_ids_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    for id in ["", "..", ".hidden", "a/b", "../x", "a\\b", "a b"] {
        let err = store.append(id, 1, &chunks(0..1)).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{id:?}");
        assert!(matches!(
            store.read(id, 1, 0, 1).await,
            Err(Error::InvalidArgument(_))
        ));
        assert!(
            store.subscribe(id, 1).has_changed().is_err(),
            "closed for {id:?}"
        );
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn subscribers_wake_on_append_and_seal() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    let mut rx = store.subscribe("t1", 1);
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            store.append("t1", 1, &chunks(0..5)).await.unwrap();
            store.seal("t1", 1).await.unwrap();
        })
    };
    let pos = wait_for(&mut rx, |p| p.next_seq == 5).await;
    assert_eq!(pos.next_seq, 5);
    let pos = wait_for(&mut rx, |p| p.sealed).await;
    assert_eq!(
        pos,
        LogPosition {
            next_seq: 5,
            sealed: true
        }
    );
    writer.await.unwrap();
    // Sealed: new chunks are refused, replays are still fine.
    assert!(matches!(
        store.append("t1", 1, &chunks(5..6)).await,
        Err(Error::FailedPrecondition(_))
    ));
    assert_eq!(store.append("t1", 1, &chunks(0..5)).await.unwrap(), 5);
    store.seal("t1", 1).await.unwrap();
}

#[tokio::test]
async fn a_follower_sees_every_chunk_then_stops_at_the_seal() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    let follower = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut rx = store.subscribe("t1", 1);
            let mut got = Vec::new();
            loop {
                let batch = store.read("t1", 1, got.len() as u64, 7).await.unwrap();
                if !batch.is_empty() {
                    got.extend(batch);
                    continue;
                }
                let pos = *rx.borrow_and_update();
                if pos.sealed && got.len() as u64 >= pos.next_seq {
                    return got;
                }
                if pos.next_seq <= got.len() as u64 {
                    rx.changed().await.unwrap();
                }
            }
        })
    };
    for batch in 0..20 {
        store
            .append("t1", 1, &chunks(batch * 10..batch * 10 + 10))
            .await
            .unwrap();
        tokio::task::yield_now().await;
    }
    store.seal("t1", 1).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, chunks(0..200));
}

#[tokio::test]
async fn a_restart_keeps_data_and_the_seal() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.append("t1", 1, &chunks(0..100)).await.unwrap();
        store.seal("t1", 1).await.unwrap();
        store.append("t1", 2, &chunks(0..10)).await.unwrap();
        store.sync_all().await.unwrap();
    }
    let store = LogStore::open(dir.path()).unwrap();
    let mut rx = store.subscribe("t1", 1);
    assert_eq!(wait_for(&mut rx, |p| p.sealed).await.next_seq, 100);
    assert_eq!(store.read("t1", 1, 70, 100).await.unwrap(), chunks(70..100));
    assert_eq!(
        store.position("t1", 2).await.unwrap(),
        LogPosition {
            next_seq: 10,
            sealed: false
        }
    );
    assert_eq!(store.append("t1", 2, &chunks(5..12)).await.unwrap(), 12);
    assert_eq!(
        store.read("t1", 2, 0, 100).await.unwrap(),
        chunks_of(2, 0..12)
    );
}

#[tokio::test]
async fn a_torn_tail_is_cut_off_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t1").join("1.log");
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.append("t1", 1, &chunks(0..3)).await.unwrap();
    }
    let good_len = std::fs::metadata(&path).unwrap().len();
    // A crash in the middle of writing chunk 3.
    let mut record = Vec::new();
    encode_record(&mut record, &chunk(3)).unwrap();
    let mut file = OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(&record[..record.len() / 2]).unwrap();
    drop(file);

    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.next_seq("t1", 1).await.unwrap(), 3);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
    assert_eq!(store.append("t1", 1, &chunks(3..5)).await.unwrap(), 5);
    assert_eq!(store.read("t1", 1, 0, 100).await.unwrap(), chunks(0..5));
}

#[tokio::test]
async fn open_handles_stay_under_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let limits = LogStoreLimits {
        max_open_files: 3,
        max_cached_attempts: 1000,
    };
    let store = LogStore::open_with(dir.path(), limits).unwrap();
    for round in 0..5u64 {
        for attempt in 0..10u32 {
            let next = store
                .append("t1", attempt, &chunks(round..round + 1))
                .await
                .unwrap();
            assert_eq!(next, round + 1);
            let open = lock(&store.shared.cache)
                .attempts
                .values()
                .filter(|e| lock(&e.state).file.is_some())
                .count();
            assert!(open <= 3, "{open} files open");
        }
    }
    for attempt in 0..10u32 {
        assert_eq!(
            store.read("t1", attempt, 0, 10).await.unwrap(),
            chunks_of(attempt, 0..5)
        );
    }
}

#[tokio::test]
async fn idle_attempts_fall_out_of_memory_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let limits = LogStoreLimits {
        max_open_files: 8,
        max_cached_attempts: 16,
    };
    let store = LogStore::open_with(dir.path(), limits).unwrap();
    for task in 0..100 {
        let id = format!("task-{task}");
        store.append(&id, 1, &chunks(0..3)).await.unwrap();
        store.seal(&id, 1).await.unwrap();
    }
    assert!(lock(&store.shared.cache).attempts.len() <= 32);
    assert_eq!(store.read("task-0", 1, 0, 10).await.unwrap(), chunks(0..3));
    assert_eq!(
        store.position("task-0", 1).await.unwrap(),
        LogPosition {
            next_seq: 3,
            sealed: true
        }
    );
}

#[tokio::test]
async fn concurrent_appends_to_many_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let limits = LogStoreLimits {
        max_open_files: 4,
        max_cached_attempts: 64,
    };
    let store = LogStore::open_with(dir.path(), limits).unwrap();
    let writers: Vec<_> = (0..16)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                let id = format!("task-{task}");
                for seq in 0..50 {
                    store.append(&id, 1, &chunks(seq..seq + 1)).await.unwrap();
                }
                store.seal(&id, 1).await.unwrap();
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    for task in 0..16 {
        let id = format!("task-{task}");
        assert_eq!(store.read(&id, 1, 0, 100).await.unwrap(), chunks(0..50));
    }
}

#[tokio::test]
async fn logs_are_private_to_the_controller() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("logs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = LogStore::open(&dir).unwrap();
    assert_eq!(mode(&dir), 0o700, "an existing logs dir is tightened");
    store.append("t1", 1, &chunks(0..2)).await.unwrap();
    store.seal("t1", 1).await.unwrap();
    assert_eq!(mode(&dir.join("t1")), 0o700);
    for entry in std::fs::read_dir(dir.join("t1")).unwrap() {
        let p = entry.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
}
