//! Where the schedule loop reads the time: [`SystemClock`] in production, [`ManualClock`]
//! in tests that step time by hand (shared through an `Arc` between the test and the loop).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// A source of wall-clock time in unix milliseconds.
pub trait Clock: Send + Sync {
    /// Milliseconds since the unix epoch.
    fn now_ms(&self) -> i64;
}

/// The host's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        scabbard_common::time::now_ms()
    }
}

/// A clock that only moves when told to: `set` it or `advance` it. Share it as
/// `Arc<ManualClock>` (which also coerces to `Arc<dyn Clock>`).
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicI64,
}

impl ManualClock {
    /// A clock showing `now_ms`.
    pub fn new(now_ms: i64) -> Self {
        ManualClock {
            now: AtomicI64::new(now_ms),
        }
    }

    /// Sets the time (it may go backwards, like a host clock can).
    pub fn set(&self, now_ms: i64) {
        self.now.store(now_ms, Ordering::SeqCst);
    }

    /// Moves the clock forward by `ms` milliseconds; returns the new time.
    pub fn advance_ms(&self, ms: i64) -> i64 {
        self.now.fetch_add(ms, Ordering::SeqCst).wrapping_add(ms)
    }

    /// Moves the clock forward by `d`; returns the new time.
    pub fn advance(&self, d: Duration) -> i64 {
        self.advance_ms(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now_ms(&self) -> i64 {
        (**self).now_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn manual_clock_is_shared_and_steps() {
        let clock = Arc::new(ManualClock::new(1_000));
        let seen: Arc<dyn Clock> = clock.clone();
        assert_eq!(seen.now_ms(), 1_000);
        assert_eq!(clock.advance_ms(500), 1_500);
        assert_eq!(clock.advance(Duration::from_secs(2)), 3_500);
        assert_eq!(seen.now_ms(), 3_500);
        clock.set(10);
        assert_eq!(seen.now_ms(), 10);
    }

    #[test]
    fn system_clock_is_near_now() {
        let d = (SystemClock.now_ms() - scabbard_common::time::now_ms()).abs();
        assert!(d < 5_000, "{d}");
    }
}
