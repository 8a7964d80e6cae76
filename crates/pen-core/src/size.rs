//! Sizes given on the command line or in profiles: `10G`, `512M`, `1T`, `4096` (bytes),
//! binary units (K = 1024). Zero and unknown suffixes are refused.

use crate::UsageError;

pub fn parse_size(what: &str, text: &str) -> Result<u64, UsageError> {
    let bad = |why: &str| {
        UsageError::new(format!(
            "invalid {what} {text:?}: {why}; use a number with an optional K, M, G or T suffix, e.g. 10G"
        ))
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(split);
    if digits.is_empty() {
        return Err(bad("no number"));
    }
    let number: u64 = digits.parse().map_err(|_| bad("number too large"))?;
    let unit: u64 = match suffix.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "" if suffix.is_empty() => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(bad(&format!("unknown unit {suffix:?}"))),
    };
    let bytes = number.checked_mul(unit).ok_or_else(|| bad("too large"))?;
    if bytes == 0 {
        return Err(bad("must be greater than zero"));
    }
    Ok(bytes)
}

/// Human-readable size for listings: `1.5G`, `320M`, `12K`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value >= 10.0 {
        format!("{value:.0}{}", UNITS[unit])
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("disk size", "10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("disk size", "512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("disk size", "1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("disk size", "4096").unwrap(), 4096);
    }

    #[test]
    fn refuses_bad_sizes() {
        for text in ["10Q", "0", "0G", "", "G", "-1G", "99999999999999999999T"] {
            assert!(parse_size("disk size", text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(human(0), "0B");
        assert_eq!(human(1536), "1.5K");
        assert_eq!(human(320 << 20), "320M");
    }
}
