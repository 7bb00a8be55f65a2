//! Tests of the journal's segments: rotation, compaction, deletion and replay.

use super::*;

fn limits(segment_bytes: u64) -> SpoolLimits {
    SpoolLimits {
        segment_bytes,
        compact_ratio: 2,
    }
}

fn sized_chunk(task_id: &str, token: u64, seq: u64, size: usize) -> proto::AgentLogChunk {
    proto::AgentLogChunk {
        data: (0..size).map(|i| (seq as usize * 7 + i) as u8).collect(),
        ..chunk(task_id, token, seq)
    }
}

/// A whole short attempt: begin, one chunk, finish, remove.
fn short_attempt(spool: &Spool, token: u64) {
    spool.begin(&assign("short", token)).unwrap();
    spool.append_chunk(&chunk("short", token, 0)).unwrap();
    spool.finish(&finished("short", token, 1)).unwrap();
    spool.remove("short", token).unwrap();
}

/// Reopens the spool, checking the replay rebuilds exactly the index it had.
fn reopen(spool: Spool, dir: &Path, limits: SpoolLimits) -> Spool {
    let before = lock(&spool.journal).snapshot();
    drop(spool);
    let spool = Spool::open_with(dir, limits).unwrap();
    assert_eq!(lock(&spool.journal).snapshot(), before);
    spool
}

#[test]
fn many_short_attempts_leave_a_couple_of_segments() {
    let dir = tempfile::tempdir().unwrap();
    let limits = limits(64 << 10);
    let spool = Spool::open_with(dir.path(), limits).unwrap();
    for token in 0..10_000 {
        spool.begin(&assign("t", token)).unwrap();
        spool.finish(&finished("t", token, 0)).unwrap();
        spool.remove("t", token).unwrap();
        if token % 1000 == 0 {
            assert!(segment_ids(dir.path()).len() <= 2);
        }
    }
    let ids = segment_ids(dir.path());
    assert!(ids.len() <= 2, "{ids:?}");
    assert!(ids[0] >= 5, "the journal rotated: {ids:?}");
    assert!(spool.load_all().unwrap().is_empty());
    let spool = reopen(spool, dir.path(), limits);
    assert!(spool.load_all().unwrap().is_empty());
}

#[test]
fn a_long_lived_attempt_survives_rotation_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let limits = limits(16 << 10);
    let mut spool = Spool::open_with(dir.path(), limits).unwrap();
    spool.begin(&assign("long", 1)).unwrap();
    let mut expected = Vec::new();
    for round in 0..300u64 {
        for i in 0..20 {
            short_attempt(&spool, round * 20 + i);
        }
        let c = sized_chunk("long", 1, round, (round % 50) as usize);
        spool.append_chunk(&c).unwrap();
        expected.push(c);
        if round % 60 == 59 {
            spool = reopen(spool, dir.path(), limits);
        }
        let ids = segment_ids(dir.path());
        assert!(ids.len() <= 4, "round {round}: {ids:?}");
    }
    // The segment holding the long attempt's start was compacted away.
    assert!(segment_ids(dir.path())[0] > 1);
    assert_eq!(spool.chunks_from("long", 1, 0).unwrap(), expected);
    assert_eq!(spool.chunks_from("long", 1, 123).unwrap(), expected[123..]);
    spool.finish(&finished("long", 1, 300)).unwrap();

    let spool = reopen(spool, dir.path(), limits);
    assert_eq!(
        spool.load_all().unwrap(),
        vec![SpooledAttempt {
            assign: assign("long", 1),
            last_seq: Some(299),
            finished: Some(finished("long", 1, 300)),
        }]
    );
    assert_eq!(spool.chunks_from("long", 1, 0).unwrap(), expected);
    spool.remove("long", 1).unwrap();
    let spool = reopen(spool, dir.path(), limits);
    assert!(spool.load_all().unwrap().is_empty());
}

#[test]
fn removed_attempts_stay_removed_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let limits = limits(4 << 10);
    let mut spool = Spool::open_with(dir.path(), limits).unwrap();
    // `pin` keeps segment 1 alive (mostly live, so not worth compacting) while the attempts
    // beside it are removed by records in later segments.
    spool.begin(&assign("pin", 1)).unwrap();
    for seq in 0..4 {
        spool
            .append_chunk(&sized_chunk("pin", 1, seq, 600))
            .unwrap();
    }
    for token in 0..40 {
        spool.begin(&assign("gone", token)).unwrap();
        spool.append_chunk(&chunk("gone", token, 0)).unwrap();
    }
    for token in 0..40 {
        spool
            .append_chunk(&sized_chunk("gone", token, 1, 100))
            .unwrap();
        spool.remove("gone", token).unwrap();
        if token % 10 == 9 {
            spool = reopen(spool, dir.path(), limits);
        }
    }
    assert_eq!(segment_ids(dir.path())[0], 1);
    assert!(segment_ids(dir.path()).len() > 1);
    let spool = reopen(spool, dir.path(), limits);
    let all = spool.load_all().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].assign.task_id, "pin");
    assert_eq!(spool.chunks_from("pin", 1, 0).unwrap().len(), 4);
    // Once the pin goes, so does everything behind it.
    spool.remove("pin", 1).unwrap();
    assert_eq!(segment_ids(dir.path()).len(), 1);
    let spool = reopen(spool, dir.path(), limits);
    assert!(spool.load_all().unwrap().is_empty());
}

#[test]
fn corruption_in_an_older_segment_fails_the_open_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open_with(dir.path(), limits(4 << 10)).unwrap();
    spool.begin(&assign("t1", 1)).unwrap();
    for seq in 0..30 {
        spool.append_chunk(&sized_chunk("t1", 1, seq, 500)).unwrap();
    }
    drop(spool);
    assert!(segment_ids(dir.path()).len() >= 3);
    let path = segment(dir.path(), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();

    let err = Spool::open(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Internal(_)), "{err}");
    assert!(err.to_string().contains("journal-000001.log"), "{err}");
}

#[test]
fn an_unfinished_copy_is_cut_off_and_a_finished_one_replaces_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    spool.begin(&assign("t1", 1)).unwrap();
    spool.append_chunk(&chunk("t1", 1, 0)).unwrap();
    spool.append_chunk(&chunk("t1", 1, 1)).unwrap();
    drop(spool);
    let path = segment(dir.path(), 1);
    let good_len = std::fs::metadata(&path).unwrap().len();
    let r = record::AttemptRef {
        task_id: "t1".into(),
        fencing_token: 1,
    };
    let mut copy = Vec::new();
    record::encode(&mut copy, Tag::MoveStart, &r).unwrap();
    record::encode(&mut copy, Tag::Begin, &assign("t1", 1)).unwrap();
    record::encode(&mut copy, Tag::Chunk, &chunk("t1", 1, 0)).unwrap();
    // Compaction died before `MoveEnd`: the copy does not count.
    append_bytes(&path, &copy);
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(spool.load_all().unwrap()[0].last_seq, Some(1));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
    drop(spool);
    // With its `MoveEnd`, the copy is what counts.
    record::encode(&mut copy, Tag::MoveEnd, &r).unwrap();
    append_bytes(&path, &copy);
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(spool.load_all().unwrap()[0].last_seq, Some(0));
    assert_eq!(
        spool.chunks_from("t1", 1, 0).unwrap(),
        vec![chunk("t1", 1, 0)]
    );
    spool.append_chunk(&chunk("t1", 1, 1)).unwrap();
}

#[test]
fn readers_keep_up_with_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open_with(dir.path(), limits(8 << 10)).unwrap());
    spool.begin(&assign("long", 1)).unwrap();
    let writer = {
        let spool = spool.clone();
        std::thread::spawn(move || {
            for seq in 0..400u64 {
                for i in 0..5 {
                    short_attempt(&spool, seq * 5 + i);
                }
                spool
                    .append_chunk(&sized_chunk("long", 1, seq, (seq % 64) as usize))
                    .unwrap();
            }
        })
    };
    while !writer.is_finished() {
        let chunks = spool.chunks_from("long", 1, 0).unwrap();
        for (seq, c) in chunks.iter().enumerate() {
            assert_eq!(*c, sized_chunk("long", 1, seq as u64, seq % 64));
        }
    }
    writer.join().unwrap();
    assert_eq!(spool.chunks_from("long", 1, 0).unwrap().len(), 400);
}

/// Manual timing check:
/// `cargo test -p scabbard-worker --release spool::tests::journal::rate -- --ignored --nocapture`
#[test]
#[ignore]
fn rate_of_no_output_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let n = 200_000u64;
    let start = std::time::Instant::now();
    for token in 0..n {
        spool.begin(&assign("bench-task", token)).unwrap();
        spool.finish(&finished("bench-task", token, 0)).unwrap();
        spool.remove("bench-task", token).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{n} no-output attempts (begin+finish+remove) in {secs:.3}s: {:.0}/s; segments: {:?}",
        n as f64 / secs,
        segment_ids(dir.path())
    );
}
