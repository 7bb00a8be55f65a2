//! Schedules: cron ticks that start workflows from templates. This module owns the pure
//! planning logic the leader's schedule loop calls ([`plan`]: parsing cron expressions in
//! a time zone, deciding which tick fires now, overlap decisions) and the clock it reads
//! ([`clock`]), so both can be tested without a store or real time.

pub mod clock;
pub mod plan;

pub use clock::{Clock, ManualClock, SystemClock};
