//! Command-line values both binaries read: a duration flag of either says
//! what is wrong with it in the same words.

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
    fn text_that_is_no_duration_gets_the_examples() {
        let err = bounded_duration("soon", MIN, MAX, "1s, 500ms").unwrap_err();
        assert!(err.starts_with("\"soon\": "), "{err}");
        assert!(err.ends_with(" (e.g. 1s, 500ms)"), "{err}");
    }
}
