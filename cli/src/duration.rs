//! Parsing human durations: `250ms`, `30s`, `5m`, `2h`, `7d`, `1h30m`. A unit is required
//! (`--timeout 10` is refused with "add a unit: 10s"); only `0` may go without one.

use std::time::Duration;

/// Parses a duration such as `90s`, `5m`, `1h30m`, `250ms` (units by the workflow file
/// format's parser); a bare number other than `0` is refused, naming the fix.
pub(crate) fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        if n == 0 {
            return Ok(Duration::ZERO);
        }
        return Err(format!(
            "{s:?} has no unit: add a unit, e.g. {s}s (seconds), {s}ms, {s}m, {s}h or {s}d"
        ));
    }
    scabbard_common::wfdef::parse_duration_ms(s).map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_refuses_bare_numbers() {
        let e = parse("10").unwrap_err();
        assert!(e.contains("add a unit, e.g. 10s"), "{e}");
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse("5x").is_err());
        assert!(parse("").is_err());
        assert!(parse("m5").is_err());
    }
}
