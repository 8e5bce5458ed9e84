//! Command-line values both binaries read: a duration or byte-count flag of
//! either says what is wrong with it in the same words.

use std::time::Duration;

/// A duration between `min` and `max`, in humantime's syntax (`90s`, `2m`,
/// `500ms`); `examples` go into the error for text that is not one.
pub fn bounded_duration(
    s: &str,
    min: Duration,
    max: Duration,
    examples: &str,
) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. {examples})"))?;
    if d < min || d > max {
        return Err(format!(
            "{s:?}: must be between {} and {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// A byte count: digits, optionally with a `Ki`, `Mi` or `Gi` suffix.
pub fn bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => s.split_at(at),
        None => (s, ""),
    };
    let shift = match unit {
        "" => 0,
        "Ki" => 10,
        "Mi" => 20,
        "Gi" => 30,
        other => return Err(format!("unknown unit {other:?} (bytes, Ki, Mi or Gi)")),
    };
    let n: usize = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count (e.g. 16Mi)"))?;
    n.checked_mul(1usize << shift)
        .ok_or_else(|| format!("{s:?}: more than fits a usize"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(60);

    #[test]
    fn the_bounds_are_inclusive() {
        assert_eq!(bounded_duration("10ms", MIN, MAX, "1s"), Ok(MIN));
        assert_eq!(bounded_duration("1m", MIN, MAX, "1s"), Ok(MAX));
    }

    #[test]
    fn a_value_out_of_bounds_names_them() {
        assert_eq!(
            bounded_duration("61s", MIN, MAX, "1s"),
            Err("\"61s\": must be between 10ms and 1m".to_owned())
        );
        assert_eq!(
            bounded_duration("9ms", MIN, MAX, "1s"),
            Err("\"9ms\": must be between 10ms and 1m".to_owned())
        );
    }

    #[test]
    fn byte_counts_take_binary_units() {
        assert_eq!(bytes("16Mi"), Ok(16 << 20));
        assert_eq!(bytes(" 512 "), Ok(512));
        assert_eq!(bytes("2Ki"), Ok(2048));
        assert_eq!(
            bytes("16MB"),
            Err("unknown unit \"MB\" (bytes, Ki, Mi or Gi)".to_owned())
        );
        assert_eq!(
            bytes("Mi"),
            Err("\"Mi\" is not a byte count (e.g. 16Mi)".to_owned())
        );
    }

    #[test]
    fn text_that_is_no_duration_gets_the_examples() {
        let err = bounded_duration("soon", MIN, MAX, "1s, 500ms").unwrap_err();
        assert!(err.starts_with("\"soon\": "), "{err}");
        assert!(err.ends_with(" (e.g. 1s, 500ms)"), "{err}");
    }
}
