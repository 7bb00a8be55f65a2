//! The spool against an in-memory model, under random operations with tiny segments and
//! reopens in between.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

#[derive(Debug, Default)]
struct ModelAttempt {
    chunks: Vec<proto::AgentLogChunk>,
    finished: Option<proto::Finished>,
}

type Model = BTreeMap<(String, u64), ModelAttempt>;

/// What a call came to, to compare with what the model expects.
fn outcome<T>(r: &Result<T>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(Error::AlreadyExists(_)) => "already exists",
        Err(Error::NotFound { .. }) => "not found",
        Err(Error::FailedPrecondition(_)) => "finished",
        Err(Error::InvalidArgument(_)) => "out of order",
        Err(e) => panic!("unexpected error {e}"),
    }
}

fn expect_all(spool: &Spool, model: &Model) {
    let expected: Vec<SpooledAttempt> = model
        .iter()
        .map(|((task_id, token), a)| SpooledAttempt {
            assign: assign(task_id, *token),
            last_seq: a.chunks.last().map(|c| c.seq),
            finished: a.finished.clone(),
        })
        .collect();
    assert_eq!(spool.load_all().unwrap(), expected);
}

fn run(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let limits = SpoolLimits {
        segment_bytes: rng.random_range(256..8192),
        compact_ratio: rng.random_range(1..4),
    };
    let mut spool = Spool::open_with(dir.path(), limits).unwrap();
    let mut model = Model::new();
    for step in 0..2_000 {
        let key = (
            format!("t{}", rng.random_range(0..5)),
            rng.random_range(0..3),
        );
        let (task_id, token) = (key.0.as_str(), key.1);
        let known = model.get(&key);
        let ctx = format!("seed {seed} step {step} {key:?}");
        let segments: Vec<u64> = lock(&spool.journal).segments.keys().copied().collect();
        assert_eq!(segments, segment_ids(dir.path()), "{ctx}");
        match rng.random_range(0..100) {
            0..15 => {
                let want = if known.is_some() {
                    "already exists"
                } else {
                    "ok"
                };
                let got = spool.begin(&assign(task_id, token));
                assert_eq!(outcome(&got), want, "{ctx}: begin");
                model.entry(key).or_default();
            }
            15..60 => {
                let next = known.map_or(0, |a| a.chunks.len() as u64);
                let seq = if rng.random_bool(0.1) { next + 1 } else { next };
                let mut c = chunk(task_id, token, seq);
                c.data = (0..rng.random_range(0..400))
                    .map(|_| rng.random())
                    .collect();
                let want = match known {
                    None => "not found",
                    Some(a) if a.finished.is_some() => "finished",
                    Some(_) if seq != next => "out of order",
                    Some(_) => "ok",
                };
                assert_eq!(outcome(&spool.append_chunk(&c)), want, "{ctx}: append");
                if let (Some(a), "ok") = (model.get_mut(&key), want) {
                    a.chunks.push(c);
                }
            }
            60..70 => {
                let f = finished(task_id, token, known.map_or(0, |a| a.chunks.len() as u64));
                let want = match known {
                    None => "not found",
                    Some(a) if a.finished.is_some() => "finished",
                    Some(_) => "ok",
                };
                assert_eq!(outcome(&spool.finish(&f)), want, "{ctx}: finish");
                if let (Some(a), "ok") = (model.get_mut(&key), want) {
                    a.finished = Some(f);
                }
            }
            70..85 => {
                spool.remove(task_id, token).unwrap();
                model.remove(&key);
            }
            85..95 => {
                let len = known.map_or(0, |a| a.chunks.len() as u64);
                let from = rng.random_range(0..=len + 1);
                let got = spool.chunks_from(task_id, token, from);
                match known {
                    None => assert_eq!(outcome(&got), "not found", "{ctx}: read"),
                    Some(a) => assert_eq!(
                        got.unwrap(),
                        a.chunks[(from.min(len) as usize)..],
                        "{ctx}: read from {from}"
                    ),
                }
            }
            95..98 => {
                let before = lock(&spool.journal).snapshot();
                drop(spool);
                spool = Spool::open_with(dir.path(), limits).unwrap();
                assert_eq!(lock(&spool.journal).snapshot(), before, "{ctx}: reopen");
                expect_all(&spool, &model);
            }
            _ => expect_all(&spool, &model),
        }
    }
    drop(spool);
    let spool = Spool::open_with(dir.path(), limits).unwrap();
    expect_all(&spool, &model);
    for ((task_id, token), a) in &model {
        assert_eq!(spool.chunks_from(task_id, *token, 0).unwrap(), a.chunks);
    }
}

#[test]
fn the_spool_behaves_like_a_map_of_attempts() {
    for seed in 0..12 {
        run(seed);
    }
}
