//! Wall-clock helpers: the protocol carries times as unix milliseconds.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `ms` as a human duration in the units the CLI takes (`250ms`, `90s`, `10m`, `2h`, `7d`,
/// or a combination such as `1h30m`).
pub fn human_ms(ms: u64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut s = ms / 1000;
    let mut out = String::new();
    for (unit, len) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if s >= len {
            out.push_str(&format!("{}{unit}", s / len));
            s %= len;
        }
    }
    out
}

#[cfg(test)]
mod human_tests {
    #[test]
    fn human_durations_use_the_cli_units() {
        assert_eq!(super::human_ms(250), "250ms");
        assert_eq!(super::human_ms(90_000), "1m30s");
        assert_eq!(super::human_ms(7 * 86_400_000), "7d");
        assert_eq!(super::human_ms(0), "0s");
    }
}
