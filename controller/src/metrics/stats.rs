//! The recent-activity ring behind `AdminService.GetStats` (the web dashboard's chart):
//! 5 s buckets over the last 15 minutes of tasks submitted and finished, with a small
//! log-scale histogram of submit→finish latency per bucket for p50/p95. The hot paths do
//! one uncontended lock and a few integer updates; a bucket is reset lazily when its slot
//! comes round again, so nothing runs in the background.

use std::sync::{LazyLock, Mutex};

use scabbard_common::proto::StatsSample;

/// Bucket width.
pub const BUCKET_MS: i64 = 5_000;
/// Buckets kept (15 minutes).
pub const BUCKETS: usize = 180;
/// Latency histogram bins per bucket: four per doubling from 1 ms (bin 0 is < 1 ms).
const BINS: usize = 128;

#[derive(Clone)]
struct Slot {
    /// Which bucket (`at_ms / BUCKET_MS`) the slot holds; -1 = none.
    epoch: i64,
    submitted: u32,
    finished: u32,
    failed: u32,
    latency: [u32; BINS],
}

impl Slot {
    const EMPTY: Slot = Slot {
        epoch: -1,
        submitted: 0,
        finished: 0,
        failed: 0,
        latency: [0; BINS],
    };
}

struct Ring {
    slots: Vec<Slot>,
}

impl Ring {
    fn slot(&mut self, now_ms: i64) -> &mut Slot {
        let epoch = now_ms.max(0) / BUCKET_MS;
        let s = &mut self.slots[(epoch as usize) % BUCKETS];
        if s.epoch != epoch {
            *s = Slot::EMPTY;
            s.epoch = epoch;
        }
        s
    }
}

static RING: LazyLock<Mutex<Ring>> = LazyLock::new(|| {
    Mutex::new(Ring {
        slots: vec![Slot::EMPTY; BUCKETS],
    })
});

fn bin(ms: i64) -> usize {
    if ms < 1 {
        return 0;
    }
    let b = 1 + (4.0 * (ms as f64).log2()).floor() as usize;
    b.min(BINS - 1)
}

/// A representative latency of `bin` (ms): the geometric middle of its range.
fn bin_value(bin: usize) -> f64 {
    if bin == 0 {
        return 0.5;
    }
    2f64.powf((bin as f64 - 0.5) / 4.0)
}

fn with_ring(f: impl FnOnce(&mut Ring)) {
    // A poisoned lock only means a panic elsewhere mid-update: the counts stay usable.
    let mut g = RING.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut g);
}

/// A task was submitted.
pub(crate) fn task_submitted(now_ms: i64) {
    with_ring(|r| r.slot(now_ms).submitted += 1);
}

/// A task finished (`failed`: failed or timed out) `latency_ms` after its submission.
pub(crate) fn task_done(now_ms: i64, latency_ms: i64, failed: bool) {
    with_ring(|r| {
        let s = r.slot(now_ms);
        s.finished += 1;
        if failed {
            s.failed += 1;
        }
        s.latency[bin(latency_ms)] += 1;
    });
}

fn percentile(hist: &[u32; BINS], total: u32, q: f64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u32;
    let mut seen = 0;
    for (i, n) in hist.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return (bin_value(i) * 10.0).round() / 10.0;
        }
    }
    bin_value(BINS - 1)
}

/// The buckets of the last `window_ms` (0 or more than kept = all kept) up to `now_ms`,
/// oldest first, empty ones included.
pub fn samples(now_ms: i64, window_ms: i64) -> Vec<StatsSample> {
    let now_epoch = now_ms.max(0) / BUCKET_MS;
    let kept = BUCKETS as i64;
    let n = if window_ms <= 0 {
        kept
    } else {
        (window_ms + BUCKET_MS - 1) / BUCKET_MS
    }
    .clamp(1, kept);
    let g = RING.lock().unwrap_or_else(|e| e.into_inner());
    (now_epoch - n + 1..=now_epoch)
        .filter(|e| *e >= 0)
        .map(|epoch| {
            let mut out = StatsSample {
                at_ms: epoch * BUCKET_MS,
                ..Default::default()
            };
            let s = &g.slots[(epoch as usize) % BUCKETS];
            if s.epoch == epoch {
                out.submitted = s.submitted;
                out.finished = s.finished;
                out.failed = s.failed;
                out.p50_ms = percentile(&s.latency, s.finished, 0.5);
                out.p95_ms = percentile(&s.latency, s.finished, 0.95);
            }
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_count_and_percentiles_track_latency() {
        // Far in the future so other tests' updates (process-wide ring) don't land here.
        let t0 = 4_000_000_000_000 + 3 * BUCKET_MS;
        task_submitted(t0);
        task_submitted(t0 + 1);
        for ms in [10, 20, 30, 40, 1000] {
            task_done(t0 + 2, ms, ms == 1000);
        }
        let s = samples(t0 + BUCKET_MS, 2 * BUCKET_MS);
        assert_eq!(s.len(), 2);
        let b = &s[0];
        assert_eq!((b.submitted, b.finished, b.failed), (2, 5, 1));
        assert!(b.p50_ms > 20.0 && b.p50_ms < 40.0, "{b:?}");
        assert!(b.p95_ms > 800.0 && b.p95_ms < 1200.0, "{b:?}");
        assert_eq!(s[1].finished, 0);
        assert_eq!(s[1].at_ms, t0 + BUCKET_MS);
        // A slot coming round again is reset.
        let later = t0 + BUCKETS as i64 * BUCKET_MS;
        task_submitted(later);
        let s = samples(later, BUCKET_MS);
        assert_eq!((s[0].submitted, s[0].finished), (1, 0));
    }
}
