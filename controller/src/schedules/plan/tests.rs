use chrono::{TimeZone, Utc};
use proptest::prelude::*;

use super::*;

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;

/// Unix ms of a UTC date and time.
fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> i64 {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
        .single()
        .expect("valid date")
        .timestamp_millis()
}

fn cron(expr: &str) -> Cron {
    Cron::parse(expr, "").expect("valid expression")
}

/// The first `n` ticks after `from`.
fn ticks(c: &Cron, from: i64, n: usize) -> Vec<i64> {
    let mut out = Vec::new();
    let mut at = from;
    while out.len() < n {
        at = c.next_after(at).expect("a tick");
        out.push(at);
    }
    out
}

#[test]
fn parses_five_and_six_fields_and_shorthands() {
    let c = cron("*/15 * * * *");
    let t0 = utc(2024, 1, 1, 0, 7, 0);
    assert_eq!(c.next_after(t0), Some(utc(2024, 1, 1, 0, 15, 0)));
    assert_eq!(c.timezone(), "UTC");
    assert_eq!(c.expr(), "*/15 * * * *");

    let secs = cron("*/10 * * * * *");
    assert_eq!(
        ticks(&secs, t0, 3),
        vec![t0 + 10_000, t0 + 20_000, t0 + 30_000]
    );
    let at_five = cron("5 0 * * * *");
    assert_eq!(at_five.next_after(t0), Some(utc(2024, 1, 1, 1, 0, 5)));

    assert_eq!(
        cron("@hourly").next_after(t0),
        Some(utc(2024, 1, 1, 1, 0, 0))
    );
    assert_eq!(
        cron("@daily").next_after(t0),
        Some(utc(2024, 1, 2, 0, 0, 0))
    );
    // 2024-01-07 is a Sunday.
    assert_eq!(
        cron("@weekly").next_after(t0),
        Some(utc(2024, 1, 7, 0, 0, 0))
    );
    assert_eq!(
        cron("@monthly").next_after(t0),
        Some(utc(2024, 2, 1, 0, 0, 0))
    );
    assert_eq!(
        cron("@yearly").next_after(t0),
        Some(utc(2025, 1, 1, 0, 0, 0))
    );
    assert_eq!(
        cron("@DAILY").next_after(t0),
        Some(utc(2024, 1, 2, 0, 0, 0))
    );
    assert_eq!(
        cron("0 9 * * mon-fri").next_after(utc(2024, 1, 5, 10, 0, 0)),
        Some(utc(2024, 1, 8, 9, 0, 0))
    );
}

#[test]
fn next_after_is_strictly_after_to_the_millisecond() {
    let c = cron("0 * * * *");
    let tick = utc(2024, 6, 1, 12, 0, 0);
    assert_eq!(c.next_after(tick - 1), Some(tick));
    assert_eq!(c.next_after(tick), Some(tick + HOUR));
    assert_eq!(c.next_after(tick + 1), Some(tick + HOUR));
    assert_eq!(c.next_after(tick + 999), Some(tick + HOUR));
    // Before the epoch too.
    assert_eq!(cron("0 0 * * *").next_after(-1), Some(0));
}

#[test]
fn rare_but_real_dates_are_found() {
    let leap = cron("0 0 29 2 *");
    assert_eq!(
        leap.next_after(utc(2025, 3, 1, 0, 0, 0)),
        Some(utc(2028, 2, 29, 0, 0, 0))
    );
}

#[test]
fn bad_expressions_and_zones_give_clear_errors() {
    let err = |expr: &str, tz: &str| Cron::parse(expr, tz).expect_err(expr);
    assert!(err("", "").starts_with("cron: empty expression"));
    let e = err("* * * *", "");
    assert!(
        e.starts_with("cron: \"* * * *\" has 4 fields; expected 5"),
        "{e}"
    );
    let e = err("0 0 0 * * * 2030", "");
    assert!(e.contains("has 7 fields"), "{e}");
    let e = err("61 * * * *", "");
    assert!(
        e.starts_with("cron: \"61 * * * *\": minute field \"61\": "),
        "{e}"
    );
    let e = err("0 0 12 * * fooday", "");
    assert!(
        e.starts_with("cron: \"0 0 12 * * fooday\": day-of-week field \"fooday\": "),
        "{e}"
    );
    let e = err("*/0 * * * * *", "");
    assert!(e.contains("second field \"*/0\""), "{e}");
    let e = err("@fortnightly", "");
    assert!(e.contains("unknown shorthand \"@fortnightly\""), "{e}");
    let e = err("0 0 30 2 *", "");
    assert!(e.contains("never matches"), "{e}");
    let e = err("0 0 * * *", "Mars/Base");
    assert!(e.starts_with("timezone: unknown zone \"Mars/Base\""), "{e}");
    assert!(Cron::parse("0 0 * * *", " Europe/Berlin ").is_ok());
}

#[test]
fn time_zones_follow_the_local_wall_clock() {
    let c = Cron::parse("0 9 * * *", "Europe/Berlin").expect("valid");
    assert_eq!(c.timezone(), "Europe/Berlin");
    // CET (UTC+1) in winter, CEST (UTC+2) in summer.
    assert_eq!(
        c.next_after(utc(2025, 1, 15, 0, 0, 0)),
        Some(utc(2025, 1, 15, 8, 0, 0))
    );
    assert_eq!(
        c.next_after(utc(2025, 7, 15, 0, 0, 0)),
        Some(utc(2025, 7, 15, 7, 0, 0))
    );
    let ny = Cron::parse("30 17 * * *", "America/New_York").expect("valid");
    assert_eq!(
        ny.next_after(utc(2025, 1, 15, 0, 0, 0)),
        Some(utc(2025, 1, 15, 22, 30, 0))
    );
}

/// Europe/Berlin springs forward on 2025-03-30: 02:00 CET becomes 03:00 CEST
/// (01:00 UTC), so 02:xx does not exist that day.
#[test]
fn dst_spring_forward_moves_fixed_times_to_the_end_of_the_gap() {
    let c = Cron::parse("30 2 * * *", "Europe/Berlin").expect("valid");
    let days = ticks(&c, utc(2025, 3, 28, 12, 0, 0), 3);
    assert_eq!(
        days,
        vec![
            utc(2025, 3, 29, 1, 30, 0), // 02:30 CET
            utc(2025, 3, 30, 1, 0, 0),  // moved: 03:00 CEST, the first instant after the gap
            utc(2025, 3, 31, 0, 30, 0), // 02:30 CEST
        ]
    );
    // A list is not a fixed time: its times inside the gap do not run at all.
    let list = Cron::parse("0,30 2 * * *", "Europe/Berlin").expect("valid");
    assert_eq!(
        ticks(&list, utc(2025, 3, 29, 12, 0, 0), 2),
        vec![utc(2025, 3, 31, 0, 0, 0), utc(2025, 3, 31, 0, 30, 0)]
    );
    // Neither has an interval expression.
    let every = Cron::parse("*/30 * * * *", "Europe/Berlin").expect("valid");
    assert_eq!(
        ticks(&every, utc(2025, 3, 30, 0, 15, 0), 3),
        vec![
            utc(2025, 3, 30, 0, 30, 0), // 01:30 CET
            utc(2025, 3, 30, 1, 0, 0),  // 03:00 CEST
            utc(2025, 3, 30, 1, 30, 0), // 03:30 CEST
        ]
    );
}

/// Europe/Berlin falls back on 2025-10-26: 03:00 CEST becomes 02:00 CET (01:00 UTC),
/// so 02:xx happens twice.
#[test]
fn dst_fall_back_runs_fixed_times_once_and_intervals_twice() {
    let c = Cron::parse("30 2 * * *", "Europe/Berlin").expect("valid");
    assert_eq!(
        ticks(&c, utc(2025, 10, 25, 12, 0, 0), 2),
        vec![
            utc(2025, 10, 26, 0, 30, 0), // 02:30 CEST, the earlier instant
            utc(2025, 10, 27, 1, 30, 0), // 02:30 CET the next day
        ]
    );
    // A list is not a fixed time: both instants of each run.
    let list = Cron::parse("0,30 2 * * *", "Europe/Berlin").expect("valid");
    assert_eq!(
        ticks(&list, utc(2025, 10, 25, 23, 0, 0), 5),
        vec![
            utc(2025, 10, 26, 0, 0, 0),  // 02:00 CEST
            utc(2025, 10, 26, 0, 30, 0), // 02:30 CEST
            utc(2025, 10, 26, 1, 0, 0),  // 02:00 CET
            utc(2025, 10, 26, 1, 30, 0), // 02:30 CET
            utc(2025, 10, 27, 1, 0, 0),  // next day 02:00 CET
        ]
    );
    let wild = Cron::parse("*/30 * * * *", "Europe/Berlin").expect("valid");
    assert_eq!(
        ticks(&wild, utc(2025, 10, 25, 23, 45, 0), 4),
        vec![
            utc(2025, 10, 26, 0, 0, 0),  // 02:00 CEST
            utc(2025, 10, 26, 0, 30, 0), // 02:30 CEST
            utc(2025, 10, 26, 1, 0, 0),  // 02:00 CET
            utc(2025, 10, 26, 1, 30, 0), // 02:30 CET
        ]
    );
}

#[test]
fn due_fires_the_first_tick_after_creation() {
    let c = cron("*/5 * * * *");
    let created = utc(2025, 1, 1, 10, 2, 0);
    let tick = utc(2025, 1, 1, 10, 5, 0);
    assert_eq!(
        due(&c, 0, created, tick - 1, 0),
        Due {
            fire: None,
            missed: 0,
            next: Some(tick)
        }
    );
    assert_eq!(
        due(&c, 0, created, tick + 10, 0),
        Due {
            fire: Some(tick),
            missed: 0,
            next: Some(tick + 5 * MIN)
        }
    );
    // Once persisted, the same tick does not fire again.
    assert_eq!(
        due(&c, tick, created, tick + 20, 0),
        Due {
            fire: None,
            missed: 0,
            next: Some(tick + 5 * MIN)
        }
    );
    // A tick at the creation instant itself is not run.
    let on_tick = due(&c, 0, tick, tick + 1, 0);
    assert_eq!(on_tick.fire, None);
}

#[test]
fn due_after_downtime_runs_only_the_latest_tick_in_the_window() {
    let c = cron("* * * * *");
    let last = utc(2025, 1, 1, 10, 0, 0);
    // Down for 10 minutes and 30 seconds; window 5 minutes.
    let now = last + 10 * MIN + 30_000;
    assert_eq!(
        due(&c, last, 0, now, 5 * MIN as u64),
        Due {
            fire: Some(last + 10 * MIN),
            missed: 9,
            next: Some(last + 11 * MIN)
        }
    );
    // The default window (60 s) is applied for 0.
    assert_eq!(due(&c, last, 0, now, 0).fire, Some(last + 10 * MIN));
    // The latest tick is older than the window: nothing runs, everything is missed.
    let hourly = cron("0 * * * *");
    let last = utc(2025, 1, 1, 10, 0, 0);
    let now = last + 3 * HOUR + 2 * MIN;
    assert_eq!(
        due(&hourly, last, 0, now, MIN as u64),
        Due {
            fire: None,
            missed: 3,
            next: Some(last + 4 * HOUR)
        }
    );
    // Exactly as old as the window still runs.
    assert_eq!(
        due(&hourly, last, 0, last + HOUR + MIN, MIN as u64).fire,
        Some(last + HOUR)
    );
}

#[test]
fn due_counts_long_every_second_downtime_without_walking_it_all() {
    let c = cron("* * * * * *");
    let last = utc(2025, 1, 1, 0, 0, 0);
    let now = last + 30 * 86_400_000; // 30 days of every-second ticks
    let d = due(&c, last, 0, now, 0);
    assert_eq!(d.fire, Some(now));
    assert_eq!(d.next, Some(now + 1000));
    assert!(d.missed >= MISSED_COUNT_LIMIT, "{}", d.missed);
}

#[test]
fn overlap_follows_the_policy() {
    use OverlapAction::*;
    for p in [
        OverlapPolicy::Unspecified,
        OverlapPolicy::Skip,
        OverlapPolicy::Queue,
        OverlapPolicy::CancelPrevious,
    ] {
        assert_eq!(overlap(p, false), Start);
    }
    assert_eq!(overlap(OverlapPolicy::Unspecified, true), Skip);
    assert_eq!(overlap(OverlapPolicy::Skip, true), Skip);
    assert_eq!(overlap(OverlapPolicy::Queue, true), Queue);
    assert_eq!(
        overlap(OverlapPolicy::CancelPrevious, true),
        CancelPreviousThenStart
    );
}

const EXPRS: [(&str, &str); 8] = [
    ("* * * * *", "UTC"),
    ("*/7 * * * *", "UTC"),
    ("*/20 * * * * *", "UTC"),
    ("0 * * * *", "Europe/Berlin"),
    ("30 2 * * *", "Europe/Berlin"),
    ("*/30 * * * *", "America/New_York"),
    ("15 3,15 * * *", "Australia/Lord_Howe"),
    ("0 9 * * 1-5", "Asia/Kolkata"),
];

/// The smallest gap between consecutive ticks over the first `n` from `from`.
fn min_gap(c: &Cron, from: i64, n: usize) -> i64 {
    let t = ticks(c, from, n);
    t.windows(2).map(|w| w[1] - w[0]).min().unwrap_or(HOUR)
}

/// Around the 2025 DST changes of Europe, the US and Australia.
fn instants() -> impl Strategy<Value = i64> {
    prop_oneof![
        utc(2025, 3, 28, 0, 0, 0)..utc(2025, 4, 8, 0, 0, 0),
        utc(2025, 10, 24, 0, 0, 0)..utc(2025, 11, 4, 0, 0, 0),
        utc(2020, 1, 1, 0, 0, 0)..utc(2030, 1, 1, 0, 0, 0),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// A fired tick is after the last handled one, not after now, inside the window,
    /// and never fires twice once persisted.
    #[test]
    fn due_fires_only_new_ticks_inside_the_window(
        which in 0..EXPRS.len(),
        last in instants(),
        elapsed in 0i64..(3 * 86_400_000),
        window in prop_oneof![Just(0u64), 1u64..(2 * 86_400_000)],
    ) {
        let (expr, tz) = EXPRS[which];
        let c = Cron::parse(expr, tz).expect("valid");
        let now = last + elapsed;
        let d = due(&c, last, 0, now, window);
        let w = effective_window(window) as i64;
        if let Some(f) = d.fire {
            prop_assert!(f > last && f <= now, "fire {f} last {last} now {now}");
            prop_assert!(now - f <= w, "fire {f} older than the window");
            prop_assert_eq!(d.next, c.next_after(f));
            let again = due(&c, f, 0, now, window);
            prop_assert_eq!(again.fire, None);
            prop_assert_eq!(again.missed, 0);
        } else if let Some(latest) = c.at_or_before(now).filter(|t| *t > last) {
            prop_assert!(now - latest > w, "latest tick {latest} in the window but not fired");
        }
        if let Some(n) = d.next {
            prop_assert!(n > now && n > last);
        }
        // Every passed tick is fired or counted missed.
        let passed = {
            let mut n = 0u64;
            let mut t = last;
            while let Some(x) = c.next_after(t).filter(|x| *x <= now) { n += 1; t = x; }
            n
        };
        prop_assert_eq!(passed, d.missed + u64::from(d.fire.is_some()));
    }

    /// A loop that runs at least once per tick interval (and no less often than the
    /// window) fires every tick exactly once, in order, persisting each as it goes.
    #[test]
    fn stepped_clock_fires_every_tick_exactly_once(
        which in 0..EXPRS.len(),
        start in instants(),
        steps in proptest::collection::vec(1u32..=1000, 50..200),
    ) {
        let (expr, tz) = EXPRS[which];
        let c = Cron::parse(expr, tz).expect("valid");
        let gap = min_gap(&c, start, 400);
        let window = gap as u64;
        let mut now = start;
        let mut last = 0i64;
        let mut fired = Vec::new();
        for s in steps {
            // Each step is 0.1%..100% of the smallest tick gap.
            now += (gap * i64::from(s) / 1000).max(1);
            let d = due(&c, last, start, now, window);
            prop_assert_eq!(d.missed, 0, "missed a tick at {}", now);
            if let Some(f) = d.fire {
                fired.push(f);
                last = f;
            }
        }
        let mut expected = Vec::new();
        let mut t = start;
        while let Some(x) = c.next_after(t).filter(|x| *x <= now) { expected.push(x); t = x; }
        prop_assert_eq!(fired, expected);
    }
}
