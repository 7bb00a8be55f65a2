//! Schedule planning, pure logic with no I/O: parsing a cron expression in a time zone
//! ([`Cron`]), deciding what the leader's schedule loop does now for one schedule
//! ([`due`]) and what a tick does while the previous run is still going ([`overlap`]).
//!
//! # Ticks are handled at most once
//! A tick T is "handled" when the loop fires, skips or queues it. The caller persists
//! `last_tick_ms = T` in the same store transaction as the workflow it starts, and passes
//! the persisted value back to [`due`]. Since `due` only ever returns ticks strictly after
//! `last_tick_ms`, a new leader after a failover neither repeats a handled tick nor skips
//! an unhandled one still inside the catch-up window.
//!
//! # Catch-up
//! After downtime only the most recent passed tick fires, and only when it is no older
//! than the catch-up window (`now - tick <= window`); every other passed tick is counted
//! as missed.
//!
//! # Time zones and daylight saving (evaluated by the `croner` crate)
//! Expressions are matched against the wall clock of the schedule's IANA zone. A
//! *fixed-time* expression has a single second, minute and hour (`30 2 * * *`); any
//! other is an *interval* expression (`*/30 * * * *`, `0,30 2 * * *`).
//! - Spring forward (a wall-clock hour that does not exist): a fixed-time expression
//!   whose time falls in the gap is **moved** to the first instant after the gap (02:30
//!   in Europe/Berlin on 2025-03-30 runs at 03:00 CEST). An interval expression's times
//!   inside the gap are **skipped**.
//! - Fall back (a wall-clock hour that happens twice): a fixed-time expression fires
//!   once, at the earlier instant; an interval expression fires at both instants.

use std::str::FromStr;

use chrono::{DateTime, TimeZone};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use scabbard_common::proto::OverlapPolicy;

/// Catch-up window used when a schedule sets none (`catch_up_window_ms = 0`).
pub const DEFAULT_CATCH_UP_WINDOW_MS: u64 = 60_000;

/// How far ahead [`Cron::next_after`] looks: about five years.
const HORIZON_MS: i64 = 5 * 366 * 86_400_000;

/// Most ticks [`due`] walks one by one; past it, it jumps (to the start of the window,
/// then to the latest tick) and the ticks jumped over are not counted in
/// [`Due::missed`], which is then a lower bound. Only every-second expressions after
/// long downtime get near it.
pub const MISSED_COUNT_LIMIT: u64 = 100_000;

const SHORTHANDS: [&str; 6] = ["hourly", "daily", "weekly", "monthly", "yearly", "annually"];

/// A parsed cron expression and the time zone it is evaluated in.
#[derive(Debug, Clone)]
pub struct Cron {
    expr: String,
    tz: Tz,
    inner: croner::Cron,
}

impl Cron {
    /// Parses `expr` (5 fields `minute hour day-of-month month day-of-week`, 6 with seconds
    /// first, or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`/`@annually`) in
    /// `timezone` (an IANA name; empty = UTC). Errors are human-readable and name the
    /// field at fault: `cron: ...` or `timezone: unknown zone "Mars/Base" ...`.
    pub fn parse(expr: &str, timezone: &str) -> Result<Cron, String> {
        let tz = parse_timezone(timezone)?;
        let expr = expr.trim();
        if expr.is_empty() {
            return Err(format!("cron: empty expression; {FORMS}"));
        }
        if let Some(name) = expr.strip_prefix('@') {
            if !SHORTHANDS.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(format!(
                    "cron: unknown shorthand {expr:?} (use @hourly, @daily, @weekly, @monthly or @yearly)"
                ));
            }
        } else if expr.contains('@') {
            return Err(format!(
                "cron: {expr:?}: '@' only starts a shorthand such as @daily"
            ));
        } else {
            let n = expr.split_whitespace().count();
            if n != 5 && n != 6 {
                return Err(format!("cron: {expr:?} has {n} fields; {FORMS}"));
            }
        }
        let inner = parser()
            .parse(expr)
            .map_err(|e| format!("cron: {expr:?}: {}", locate(expr, &e)))?;
        let cron = Cron {
            expr: expr.to_string(),
            tz,
            inner,
        };
        // Refuse what can never fire (30 February), so a schedule is not created dead.
        // From 1970, five years include a 29 February.
        if cron.next_after(0).is_none() {
            return Err(format!(
                "cron: {expr:?} never matches a real date (within five years)"
            ));
        }
        Ok(cron)
    }

    /// The shortest gap between two consecutive ticks (milliseconds), looked for among the
    /// first 256 ticks after `from_ms`: every cron field repeats within that many ticks at
    /// the sub-minute level (a seconds list has at most 60 entries), so a schedule firing
    /// more often than every N seconds shows it there. None if it never fires twice.
    pub fn min_interval_ms(&self, from_ms: i64) -> Option<i64> {
        let mut prev = self.next_after(from_ms)?;
        let mut min: Option<i64> = None;
        for _ in 0..256 {
            let Some(next) = self.next_after(prev) else {
                break;
            };
            let gap = next - prev;
            min = Some(min.map_or(gap, |m: i64| m.min(gap)));
            if gap <= 1_000 {
                break; // cannot get shorter
            }
            prev = next;
        }
        min
    }

    /// The expression as given (trimmed).
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The time zone's IANA name.
    pub fn timezone(&self) -> &'static str {
        self.tz.name()
    }

    /// First tick strictly after `after_ms` (unix ms), or None if none within ~5 years.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        // Ticks fall on whole seconds: searching after the whole second at or before
        // `after_ms` finds exactly the ticks > after_ms.
        let mut secs = after_ms.div_euclid(1000);
        // A guard against a search that does not move forward (never seen): step on.
        for _ in 0..3 {
            let origin = self.at(secs)?;
            let next = self.inner.find_next_occurrence(&origin, false).ok()?;
            let ms = next.timestamp().checked_mul(1000)?;
            if ms > after_ms {
                return (ms <= after_ms.saturating_add(HORIZON_MS)).then_some(ms);
            }
            secs = secs.checked_add(1)?;
        }
        None
    }

    /// The latest tick at or before `at_ms`, if any within ~5 years before it.
    pub fn at_or_before(&self, at_ms: i64) -> Option<i64> {
        let origin = self.at(at_ms.div_euclid(1000))?;
        let prev = self.inner.find_previous_occurrence(&origin, true).ok()?;
        let ms = prev.timestamp().checked_mul(1000)?;
        (ms <= at_ms && ms >= at_ms.saturating_sub(HORIZON_MS)).then_some(ms)
    }

    fn at(&self, secs: i64) -> Option<DateTime<Tz>> {
        self.tz.timestamp_opt(secs, 0).single()
    }
}

const FORMS: &str = "expected 5 fields (minute hour day-of-month month day-of-week), 6 with seconds first, or @hourly/@daily/@weekly/@monthly/@yearly";

fn parse_timezone(name: &str) -> Result<Tz, String> {
    let name = name.trim();
    if name.is_empty() {
        return Ok(Tz::UTC);
    }
    Tz::from_str(name).map_err(|_| {
        format!("timezone: unknown zone {name:?} (use an IANA name such as UTC or Europe/Berlin)")
    })
}

fn parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
}

/// croner's message for `e`, prefixed with the field at fault when one field alone
/// fails (found by parsing each field with `*` in the others).
fn locate(expr: &str, e: &croner::errors::CronError) -> String {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let names: &[&str] = match fields.len() {
        5 => &FIELD_NAMES[1..],
        6 => &FIELD_NAMES,
        _ => &[],
    };
    for (i, name) in names.iter().enumerate() {
        let probe: Vec<&str> = (0..fields.len())
            .map(|j| if j == i { fields[i] } else { "*" })
            .collect();
        if let Err(e) = parser().parse(&probe.join(" ")) {
            return format!("{name} field {:?}: {}", fields[i], describe(&e));
        }
    }
    describe(e)
}

const FIELD_NAMES: [&str; 6] = [
    "second",
    "minute",
    "hour",
    "day-of-month",
    "month",
    "day-of-week",
];

/// croner's message without its type-name prefixes.
fn describe(e: &croner::errors::CronError) -> String {
    use croner::errors::CronError as E;
    let m = match e {
        E::InvalidPattern(m) | E::IllegalCharacters(m) | E::ComponentError(m) => m.clone(),
        other => other.to_string(),
    };
    let m = m.replace("CronPattern contains", "contains");
    m.trim_end_matches('.').to_string()
}

/// What the loop should do now for one schedule.
#[derive(Debug, PartialEq)]
pub struct Due {
    /// The tick to run now, if any (the most recent tick <= now that is inside the
    /// catch-up window).
    pub fire: Option<i64>,
    /// Ticks that passed and are NOT run (older than the catch-up window, or superseded by
    /// a later tick).
    pub missed: u64,
    /// The tick after `fire` (or after now), for the loop's timer and the API's
    /// next_tick_ms.
    pub next: Option<i64>,
}

/// The window [`due`] applies for a schedule's `catch_up_window_ms` (0 = the default).
pub fn effective_window(catch_up_window_ms: u64) -> u64 {
    if catch_up_window_ms == 0 {
        DEFAULT_CATCH_UP_WINDOW_MS
    } else {
        catch_up_window_ms
    }
}

/// What to do now for one schedule. `last_tick_ms` is the last tick already handled
/// (0 = never: ticks then count strictly after `created_ms`). `catch_up_window_ms` = 0
/// means [`DEFAULT_CATCH_UP_WINDOW_MS`], as in the protocol. A resumed schedule should
/// pass its resume time as `last_tick_ms` so ticks missed while paused do not run.
///
/// The fired tick is always in `(last_tick_ms, now_ms]` and no older than the window.
pub fn due(
    cron: &Cron,
    last_tick_ms: i64,
    created_ms: i64,
    now_ms: i64,
    catch_up_window_ms: u64,
) -> Due {
    let window = i64::try_from(effective_window(catch_up_window_ms)).unwrap_or(i64::MAX);
    let start = if last_tick_ms > 0 {
        last_tick_ms
    } else {
        created_ms
    };
    // Ticks before `oldest` are too old to run.
    let oldest = now_ms.saturating_sub(window);
    let mut missed = 0u64;
    let mut walked = 0u64;
    let mut tick = cron.next_after(start);
    while let Some(t) = tick
        && t < oldest
    {
        missed += 1;
        walked += 1;
        tick = if walked >= MISSED_COUNT_LIMIT {
            // Jump to the window; the ticks in between go uncounted.
            cron.next_after(oldest.saturating_sub(1).max(t))
        } else {
            cron.next_after(t)
        };
    }
    let mut fire = None;
    let mut jumped = false;
    while let Some(t) = tick
        && t <= now_ms
    {
        if fire.replace(t).is_some() {
            missed += 1;
        }
        walked += 1;
        if walked >= MISSED_COUNT_LIMIT && !jumped {
            // Jump to the latest tick; it supersedes the uncounted ones in between.
            jumped = true;
            if let Some(latest) = cron.at_or_before(now_ms)
                && latest > t
            {
                missed += 1;
                fire = Some(latest);
                tick = cron.next_after(latest);
                continue;
            }
        }
        tick = cron.next_after(t);
    }
    Due {
        fire,
        missed,
        next: tick,
    }
}

/// The overlap decision for a tick when the previous run of the schedule is still
/// running (`previous_running`).
#[derive(Debug, PartialEq)]
pub enum OverlapAction {
    /// Start the run now.
    Start,
    /// Do not run this tick (counted as skipped).
    Skip,
    /// Record the tick; start it when the previous run finishes.
    Queue,
    /// Cancel the previous run, then start this one.
    CancelPreviousThenStart,
}

/// What a tick does given the schedule's overlap policy (unspecified = skip).
pub fn overlap(policy: OverlapPolicy, previous_running: bool) -> OverlapAction {
    if !previous_running {
        return OverlapAction::Start;
    }
    match policy {
        OverlapPolicy::Queue => OverlapAction::Queue,
        OverlapPolicy::CancelPrevious => OverlapAction::CancelPreviousThenStart,
        OverlapPolicy::Skip | OverlapPolicy::Unspecified => OverlapAction::Skip,
    }
}

#[cfg(test)]
mod tests;
