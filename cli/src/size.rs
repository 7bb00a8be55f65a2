//! Parsing byte sizes: `1048576`, `512KiB`, `300MiB`, `5GiB`, `1TiB` (also `K`/`KB`/`M`/…,
//! all binary: 1 KB = 1024 bytes here, as in the config's `*_bytes` keys).

/// Parses a size in bytes; a bare number is bytes.
pub(crate) fn parse(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 1048576, 512MiB, 5GiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (B, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bytes_and_binary_units() {
        assert_eq!(parse("1048576").unwrap(), 1 << 20);
        assert_eq!(parse("5GiB").unwrap(), 5 << 30);
        assert_eq!(parse("300MB").unwrap(), 300 << 20);
        assert_eq!(parse("0").unwrap(), 0);
        assert!(parse("5 parsecs").is_err());
        assert!(parse("GiB").is_err());
        assert!(parse("99999999999TiB").is_err());
    }
}
