//! Durations in the configuration, for every duration key of `config` and its submodules.
//!
//! Read as humantime text (`"5m"`, `"400days"`, `"1h 30m"`), as SPEC §8 gives them. Written
//! back (by `--check-config`, and in logs) as one whole number in the largest unit that states
//! the value exactly: `400days`, `90m`, `1500ms`, not humantime's own rendering
//! (`1year 1month 4days 7h 26m 24s` for 400 days, whose year is 365.25 days). Both read back to
//! the same value.
//!
//! Every duration key takes at most [`MAX`] (100 years): longer values overflow the clock
//! arithmetic they feed (an `Instant` plus the value, or milliseconds in an `i64`), so they
//! stop the start with exit code 2 and the key's name, like any other bad value.

use std::time::Duration;

use serde::{Deserializer, Serializer};

/// The longest duration any key takes: 100 years as humantime counts them (365.25 days each),
/// `36525days`, so that `"100years"` is taken.
pub const MAX: Duration = Duration::from_secs(36_525 * 86_400);

/// `d` as one whole number and unit (`days`, `h`, `m`, `s`, `ms`, `us`, `ns`); `0s` for zero.
pub fn format(d: Duration) -> String {
    const UNITS: [(u128, &str); 7] = [
        (86_400_000_000_000, "days"),
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
        (1, "ns"),
    ];
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    let (size, unit) = UNITS
        .iter()
        .find(|(size, _)| nanos % size == 0)
        .copied()
        .unwrap_or((1, "ns"));
    match (nanos / size, unit) {
        (1, "days") => "1day".into(),
        (n, unit) => format!("{n}{unit}"),
    }
}

/// For `#[serde(with = "crate::config::duration")]` on a `Duration`.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

/// Reads one duration's text: humantime (`"5m"`, `"1h 30m"`, `"400days"`), at most [`MAX`].
/// `Err` is the reason, for the key's error message.
pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if !t.is_empty() && t.parse::<f64>().is_ok() {
        return Err(format!(
            "`{t}` has no unit; write a whole number and a unit, e.g. \"30s\", \"1500ms\", \"5m\", \"400days\""
        ));
    }
    let d = humantime::parse_duration(t).map_err(|e| {
        format!("`{t}` is not a duration ({e}); write e.g. \"30s\", \"1h 30m\", \"400days\"")
    })?;
    if d > MAX {
        return Err(format!(
            "`{t}` is longer than {} (100 years), the longest duration Sluice takes",
            format(MAX)
        ));
    }
    Ok(d)
}

struct Text;

impl serde::de::Visitor<'_> for Text {
    type Value = Duration;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a duration with a unit, e.g. \"30s\", \"5m\" or \"400days\"")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
        parse(v).map_err(E::custom)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Duration, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Duration, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Duration, E> {
        self.visit_str(&v.to_string())
    }
}

/// For `#[serde(with = "crate::config::duration")]`: [`parse`]'s text. A bare number is refused
/// with a hint to add a unit.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(Text)
}

/// The same for an `Option<Duration>` (`#[serde(with = "crate::config::duration::option")]`).
pub mod option {
    use super::*;

    /// `None` as a unit (skip it with `skip_serializing_if`), `Some` as [`format`] gives.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format(*d)),
            None => s.serialize_none(),
        }
    }

    /// [`super::parse`]'s text, when present.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        struct Maybe;
        impl<'de> serde::de::Visitor<'de> for Maybe {
            type Value = Option<Duration>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                Text.expecting(f)
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                super::deserialize(d).map(Some)
            }
        }
        d.deserialize_option(Maybe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_value_in_its_largest_exact_unit_and_back() {
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(400 * 86_400), "400days"),
            (Duration::from_secs(86_400), "1day"),
            (Duration::from_secs(90 * 60), "90m"),
            (Duration::from_secs(3_600), "1h"),
            (Duration::from_millis(1_500), "1500ms"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_nanos(1_000_001), "1000001ns"),
        ] {
            assert_eq!(format(d), text);
            assert_eq!(parse(text).unwrap(), d, "{text}");
        }
    }

    #[test]
    fn at_most_a_hundred_years_and_bare_numbers_get_a_hint() {
        assert_eq!(parse("36525days").unwrap(), MAX);
        assert_eq!(parse("100years").unwrap(), MAX);
        assert_eq!(parse(" 1h 30m ").unwrap(), Duration::from_secs(5400));
        let e = parse("36526days").unwrap_err();
        assert!(e.contains("longer than 36525days"), "{e}");
        assert!(parse("18446744073709551615s").is_err());
        // Every accepted value prints as a whole number that reads back (ns fit in a u64).
        let odd = MAX - Duration::from_nanos(1);
        assert_eq!(parse(&format(odd)).unwrap(), odd);
        let e = parse("30").unwrap_err();
        assert!(e.contains("no unit") && e.contains("\"30s\""), "{e}");
        let e = parse("soon").unwrap_err();
        assert!(e.contains("`soon` is not a duration"), "{e}");
    }
}
