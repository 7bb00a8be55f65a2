//! Tests of the spool against a real directory.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use super::journal::{segment_id, segment_path};
use super::*;

mod journal;
mod model;

fn segment(dir: &Path, id: u64) -> PathBuf {
    segment_path(dir, id)
}

/// Ids of the segment files in `dir`, oldest first.
fn segment_ids(dir: &Path) -> Vec<u64> {
    let mut ids: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| segment_id(e.unwrap().file_name().to_str()?))
        .collect();
    ids.sort_unstable();
    ids
}

fn append_bytes(path: &Path, bytes: &[u8]) {
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(bytes).unwrap();
}

fn assign(task_id: &str, token: u64) -> proto::Assign {
    proto::Assign {
        project: String::new(),
        task_id: task_id.into(),
        fencing_token: token,
        attempt: 1,
        spec: Some(proto::TaskSpec {
            name: "build".into(),
            ..Default::default()
        }),
        traceparent: String::new(),
        tracestate: String::new(),
    }
}

fn chunk(task_id: &str, token: u64, seq: u64) -> proto::AgentLogChunk {
    proto::AgentLogChunk {
        task_id: task_id.into(),
        fencing_token: token,
        seq,
        stream: proto::LogStream::Stdout as i32,
        data: format!("line {seq}\n").into_bytes(),
        at_ms: 1_000 + seq as i64,
    }
}

fn finished(task_id: &str, token: u64, chunks: u64) -> proto::Finished {
    proto::Finished {
        task_id: task_id.into(),
        fencing_token: token,
        result: Some(proto::TaskResult {
            outcome: proto::Outcome::Succeeded as i32,
            ..Default::default()
        }),
        log_chunks: chunks,
    }
}

#[test]
fn round_trip_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    spool.begin(&assign("t1", 5)).unwrap();
    spool.begin(&assign("t2", 9)).unwrap();
    for seq in 0..3 {
        spool.append_chunk(&chunk("t1", 5, seq)).unwrap();
    }
    spool.finish(&finished("t1", 5, 3)).unwrap();
    spool.append_chunk(&chunk("t2", 9, 0)).unwrap();
    drop(spool);

    let spool = Spool::open(dir.path()).unwrap();
    let all = spool.load_all().unwrap();
    assert_eq!(
        all,
        vec![
            SpooledAttempt {
                assign: assign("t1", 5),
                last_seq: Some(2),
                finished: Some(finished("t1", 5, 3)),
            },
            SpooledAttempt {
                assign: assign("t2", 9),
                last_seq: Some(0),
                finished: None,
            },
        ]
    );
    let replay = spool.chunks_from("t1", 5, 0).unwrap();
    assert_eq!(
        replay,
        (0..3).map(|s| chunk("t1", 5, s)).collect::<Vec<_>>()
    );
    // An unfinished attempt can be continued after the restart.
    spool.append_chunk(&chunk("t2", 9, 1)).unwrap();
    spool.finish(&finished("t2", 9, 2)).unwrap();
    assert_eq!(
        spool.chunks_from("t2", 9, 1).unwrap(),
        vec![chunk("t2", 9, 1)]
    );
}

#[test]
fn replay_starts_at_the_requested_seq() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    spool.begin(&assign("t1", 1)).unwrap();
    for seq in 0..10 {
        spool.append_chunk(&chunk("t1", 1, seq)).unwrap();
    }
    let seqs: Vec<u64> = spool
        .chunks_from("t1", 1, 7)
        .unwrap()
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(seqs, [7, 8, 9]);
    assert!(spool.chunks_from("t1", 1, 10).unwrap().is_empty());
}

#[test]
fn misuse_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    spool.begin(&assign("t1", 1)).unwrap();
    assert!(matches!(
        spool.begin(&assign("t1", 1)),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        spool.append_chunk(&chunk("t1", 1, 1)),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        spool.append_chunk(&chunk("nope", 1, 0)),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        spool.chunks_from("nope", 1, 0),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        spool.begin(&assign("../etc", 1)),
        Err(Error::InvalidArgument(_))
    ));
    spool.finish(&finished("t1", 1, 0)).unwrap();
    assert!(matches!(
        spool.append_chunk(&chunk("t1", 1, 0)),
        Err(Error::FailedPrecondition(_))
    ));
    assert!(matches!(
        spool.finish(&finished("t1", 1, 0)),
        Err(Error::FailedPrecondition(_))
    ));
}

#[test]
fn a_torn_tail_is_cut_off_and_appending_continues() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    spool.begin(&assign("t1", 3)).unwrap();
    spool.append_chunk(&chunk("t1", 3, 0)).unwrap();
    spool.append_chunk(&chunk("t1", 3, 1)).unwrap();
    drop(spool);
    // A crash in the middle of writing chunk 2: only part of its record reached the file.
    let path = segment(dir.path(), 1);
    let good_len = std::fs::metadata(&path).unwrap().len();
    let mut rec = Vec::new();
    record::encode(&mut rec, Tag::Chunk, &chunk("t1", 3, 2)).unwrap();
    append_bytes(&path, &rec[..rec.len() - 3]);

    let spool = Spool::open(dir.path()).unwrap();
    let all = spool.load_all().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].last_seq, Some(1));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
    spool.append_chunk(&chunk("t1", 3, 2)).unwrap();
    assert_eq!(spool.chunks_from("t1", 3, 0).unwrap().len(), 3);
    drop(spool);
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(
        spool.chunks_from("t1", 3, 0).unwrap(),
        (0..3).map(|s| chunk("t1", 3, s)).collect::<Vec<_>>()
    );
}

#[test]
fn a_corrupt_record_ends_the_readable_log() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    spool.begin(&assign("t1", 3)).unwrap();
    spool.append_chunk(&chunk("t1", 3, 0)).unwrap();
    spool.append_chunk(&chunk("t1", 3, 1)).unwrap();
    drop(spool);
    // Flip the last byte: chunk 1's checksum no longer matches.
    let path = segment(dir.path(), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    *bytes.last_mut().unwrap() ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(spool.load_all().unwrap()[0].last_seq, Some(0));
}

#[test]
fn garbage_in_the_journal_is_cut_off_and_other_files_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(segment(dir.path(), 1), [1, 2, 3]).unwrap();
    std::fs::write(dir.path().join("unrelated.txt"), b"keep").unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    assert!(spool.load_all().unwrap().is_empty());
    assert_eq!(std::fs::metadata(segment(dir.path(), 1)).unwrap().len(), 0);
    assert!(dir.path().join("unrelated.txt").exists());
}

#[test]
fn old_per_attempt_files_are_imported() {
    let dir = tempfile::tempdir().unwrap();
    let mut old = Vec::new();
    record::encode(&mut old, Tag::Begin, &assign("t1", 4)).unwrap();
    for seq in 0..3 {
        record::encode(&mut old, Tag::Chunk, &chunk("t1", 4, seq)).unwrap();
    }
    record::encode(&mut old, Tag::Finished, &finished("t1", 4, 3)).unwrap();
    old.extend_from_slice(&[9, 9]); // a torn tail, as the old format allowed
    std::fs::write(dir.path().join("t1.4.spool"), &old).unwrap();
    // A file without an assignment is dropped, as it always was.
    std::fs::write(dir.path().join("t2.1.spool"), [1, 2, 3]).unwrap();

    let spool = Spool::open(dir.path()).unwrap();
    let expected = vec![SpooledAttempt {
        assign: assign("t1", 4),
        last_seq: Some(2),
        finished: Some(finished("t1", 4, 3)),
    }];
    assert_eq!(spool.load_all().unwrap(), expected);
    assert!(!dir.path().join("t1.4.spool").exists());
    assert!(!dir.path().join("t2.1.spool").exists());
    drop(spool);
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(spool.load_all().unwrap(), expected);
    assert_eq!(
        spool.chunks_from("t1", 4, 1).unwrap(),
        vec![chunk("t1", 4, 1), chunk("t1", 4, 2)]
    );
}

#[test]
fn remove_deletes_the_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    spool.begin(&assign("t1", 1)).unwrap();
    spool.append_chunk(&chunk("t1", 1, 0)).unwrap();
    spool.remove("t1", 1).unwrap();
    spool.remove("t1", 1).unwrap();
    assert!(spool.load_all().unwrap().is_empty());
    assert!(matches!(
        spool.append_chunk(&chunk("t1", 1, 1)),
        Err(Error::NotFound { .. })
    ));
    // The same attempt can be spooled again from scratch.
    spool.begin(&assign("t1", 1)).unwrap();
    spool.append_chunk(&chunk("t1", 1, 0)).unwrap();
}

#[test]
fn concurrent_attempts_do_not_interfere() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path()).unwrap());
    let writers: Vec<_> = (0..4u64)
        .map(|token| {
            let spool = spool.clone();
            std::thread::spawn(move || {
                spool.begin(&assign("t", token)).unwrap();
                for seq in 0..200 {
                    spool.append_chunk(&chunk("t", token, seq)).unwrap();
                }
                spool.finish(&finished("t", token, 200)).unwrap();
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let all = spool.load_all().unwrap();
    assert_eq!(all.len(), 4);
    assert!(
        all.iter()
            .all(|a| a.last_seq == Some(199) && a.finished.is_some())
    );
}

#[test]
fn spool_is_private_to_the_worker_user() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    // A spool left by an older version with world-readable modes.
    std::fs::create_dir(&spool_dir).unwrap();
    std::fs::set_permissions(&spool_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let spool = Spool::open(&spool_dir).unwrap();
    spool.begin(&assign("t1", 1)).unwrap();
    drop(spool);
    std::fs::set_permissions(
        segment(&spool_dir, 1),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let _spool = Spool::open(&spool_dir).unwrap();
    assert_eq!(mode(&spool_dir), 0o700);
    for id in segment_ids(&spool_dir) {
        assert_eq!(mode(&segment(&spool_dir, id)), 0o600, "segment {id}");
    }
}
