//! Jittered exponential backoff, shared by every retry loop (worker reconnects, client
//! redirects, store retries).

use std::time::Duration;

/// Exponential backoff policy with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
    /// Growth per attempt (>= 1).
    pub multiplier: f64,
    /// Fraction of the delay that is randomised, 0.0..=1.0.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.5,
        }
    }
}

impl Backoff {
    /// The backoff of a task retry policy, with its documented defaults for zero fields
    /// (1 s initial, 60 s max, x2).
    pub fn from_policy(p: &crate::proto::RetryPolicy) -> Self {
        let initial = match p.initial_backoff_ms {
            0 => 1_000,
            n => n,
        };
        let max = match p.max_backoff_ms {
            0 => 60_000.max(initial),
            n => n,
        };
        Self {
            initial: Duration::from_millis(initial),
            max: Duration::from_millis(max),
            multiplier: if p.multiplier == 0.0 {
                2.0
            } else {
                p.multiplier
            },
            jitter: p.jitter,
        }
    }

    /// The un-jittered delay before retry number `attempt` (0-based), capped at `max`.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let mult = self.multiplier.max(1.0);
        let factor = mult.powi(attempt.min(64) as i32);
        let secs = (self.initial.as_secs_f64() * factor).min(self.max.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// The delay before retry number `attempt`, with `unit` in 0.0..1.0 as the random draw
    /// (so the result is testable); the jittered part is taken off the base delay.
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.base_delay(attempt).as_secs_f64();
        let jitter = self.jitter.clamp(0.0, 1.0);
        let unit = unit.clamp(0.0, 1.0);
        Duration::from_secs_f64(base * (1.0 - jitter * unit))
    }

    /// The delay before retry number `attempt`, with a random jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn delay_never_exceeds_max_nor_drops_below_the_unjittered_floor(
            initial_ms in 1u64..10_000, max_ms in 1u64..100_000, mult in 1.0f64..5.0,
            jitter in 0.0f64..1.0, attempt in 0u32..200, unit in 0.0f64..1.0,
        ) {
            let b = Backoff { initial: Duration::from_millis(initial_ms), max: Duration::from_millis(max_ms), multiplier: mult, jitter };
            let d = b.delay_with(attempt, unit);
            let base = b.base_delay(attempt);
            prop_assert!(d <= base);
            prop_assert!(base <= Duration::from_millis(max_ms) + Duration::from_micros(1));
            prop_assert!(d.as_secs_f64() >= base.as_secs_f64() * (1.0 - jitter) - 1e-9);
        }

        #[test]
        fn policy_delays_stay_within_the_policy_bounds(
            initial_ms in 0u64..5_000, extra_ms in 0u64..60_000, mult in prop_oneof![Just(0.0f64), 1.0f64..10.0],
            jitter in 0.0f64..=1.0, retry in 0u32..100, unit in 0.0f64..1.0,
        ) {
            let p = crate::proto::RetryPolicy {
                initial_backoff_ms: initial_ms,
                max_backoff_ms: if extra_ms == 0 { 0 } else { initial_ms + extra_ms },
                multiplier: mult,
                jitter,
                ..Default::default()
            };
            let b = Backoff::from_policy(&p);
            let d = b.delay_with(retry, unit);
            // Never above the cap, never below the un-jittered delay minus the jitter share.
            prop_assert!(d <= b.max + Duration::from_micros(1));
            prop_assert!(d.as_secs_f64() >= b.base_delay(retry).as_secs_f64() * (1.0 - jitter) - 1e-9);
            // The first retry waits at most the initial backoff.
            prop_assert!(b.delay_with(0, unit) <= b.initial);
        }

        #[test]
        fn base_delay_is_monotonic(initial_ms in 1u64..1_000, mult in 1.0f64..4.0, attempt in 0u32..100) {
            let b = Backoff { initial: Duration::from_millis(initial_ms), multiplier: mult, ..Backoff::default() };
            prop_assert!(b.base_delay(attempt) <= b.base_delay(attempt + 1));
        }
    }
}
