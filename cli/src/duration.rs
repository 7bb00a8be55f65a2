//! Parsing human durations: `250ms`, `30s`, `5m`, `2h`, `1h30m`, or plain seconds.

use std::time::Duration;

/// Parses a duration such as `90s`, `5m`, `1h30m`, `250ms` or `30` (a bare number is
/// seconds here; units are parsed by the workflow file format's parser).
pub(crate) fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    scabbard_common::wfdef::parse_duration_ms(s).map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_combinations() {
        assert_eq!(parse("30").unwrap(), Duration::from_secs(30));
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
