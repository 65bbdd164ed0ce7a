//! Durations in the configuration, for every duration key of `config` and its submodules.
//!
//! Read as humantime text (`"5m"`, `"400days"`, `"1h 30m"`), as SPEC §8 gives them. Written
//! back (by `--check-config`, and in logs) as one whole number in the largest unit that states
//! the value exactly: `400days`, `90m`, `1500ms`, not humantime's own rendering
//! (`1year 1month 4days 7h 26m 24s` for 400 days, whose year is 365.25 days). Both read back to
//! the same value.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

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

/// For `#[serde(with = "crate::config::duration")]`: humantime text, e.g. `"5m"`.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    humantime_serde::deserialize(d)
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

    /// Humantime text, when present.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<humantime_serde::Serde<Duration>>::deserialize(d)
            .map(|o| o.map(humantime_serde::Serde::into_inner))
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
            assert_eq!(humantime::parse_duration(text).unwrap(), d, "{text}");
        }
    }
}
