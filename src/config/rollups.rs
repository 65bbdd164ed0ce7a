//! `[rollups]` (SPEC §12): the levels of per-device, per-metric aggregates the store keeps,
//! how long it keeps them, and the largest aggregation answer.
//!
//! Read by the store (`store::sqlite` derives rollups during compaction, `store::rollup`
//! picks the level that serves a query) and by `api::query` (the `limit` of an `agg` query).
//! [`validate`] checks every key once at start; a bad value stops the start with exit code 2
//! and names the key. Components read the parsed levels with [`RollupSettings::level_ms`],
//! which cannot fail on validated settings.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[rollups]`.
///
/// ```toml
/// [rollups]
/// levels = ["1m", "1h"]   # each a whole number of seconds, increasing, a multiple of the one before
/// retention = "400days"   # rollups of readings older than this are deleted
/// max_buckets = 100000    # the largest `limit` of an agg query
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RollupSettings {
    /// Bucket widths of the kept rollups, finest first, as durations (`"1m"`, `"1h"`). Each is
    /// a whole number of seconds, at least 1s, longer than the one before and a multiple of
    /// it (so each level can be built from the one below). `[]` keeps no rollups: every `agg`
    /// query is then computed from raw readings.
    pub levels: Vec<String>,
    /// Rollup buckets that ended longer ago than this are deleted (by the same sweep as raw
    /// retention, every `storage.retention_interval`). Separate from `storage.retention`, so
    /// a year of hourly rollups can outlive a week of raw readings.
    #[serde(with = "crate::config::duration")]
    pub retention: Duration,
    /// The largest `limit` an `agg` query may ask for: the most buckets in one answer (the
    /// default `limit` is 1000, as for readings). 43 200 is 30 days of minutes.
    pub max_buckets: usize,
}

impl Default for RollupSettings {
    fn default() -> Self {
        Self {
            levels: vec!["1m".into(), "1h".into()],
            retention: Duration::from_secs(400 * 86_400),
            max_buckets: 100_000,
        }
    }
}

/// Most levels: each costs a rollup row per device, metric and bucket at every compaction.
const MAX_LEVELS: usize = 8;

impl RollupSettings {
    /// The levels in milliseconds, finest first. Levels that do not parse are left out, which
    /// only happens with settings [`validate`] refused.
    pub fn level_ms(&self) -> Vec<i64> {
        self.levels
            .iter()
            .filter_map(|l| humantime::parse_duration(l.trim()).ok())
            .map(|d| d.as_millis() as i64)
            .collect()
    }

    /// The rollup retention in milliseconds.
    pub fn retention_ms(&self) -> i64 {
        self.retention.as_millis().min(i64::MAX as u128) as i64
    }
}

/// Checks `[rollups]`. `Err((key, reason))` names the first bad key.
pub fn validate(r: &RollupSettings) -> Result<(), (&'static str, String)> {
    if r.levels.len() > MAX_LEVELS {
        return Err((
            "rollups.levels",
            format!("has {} levels; at most {MAX_LEVELS}", r.levels.len()),
        ));
    }
    let mut previous: Option<(&str, u64)> = None;
    for level in &r.levels {
        let d = humantime::parse_duration(level.trim()).map_err(|e| {
            (
                "rollups.levels",
                format!("`{level}` is not a duration ({e}); e.g. \"1m\", \"1h\""),
            )
        })?;
        if d.subsec_nanos() != 0 || d.as_secs() == 0 {
            return Err((
                "rollups.levels",
                format!("`{level}` must be a whole number of seconds, at least 1s"),
            ));
        }
        let secs = d.as_secs();
        if secs > 100 * 365 * 86_400 {
            return Err((
                "rollups.levels",
                format!("`{level}` is longer than 100 years"),
            ));
        }
        if let Some((prev, prev_secs)) = previous {
            if secs <= prev_secs {
                return Err((
                    "rollups.levels",
                    format!("`{level}` must be longer than the level before it, `{prev}` (finest first)"),
                ));
            }
            if secs % prev_secs != 0 {
                return Err((
                    "rollups.levels",
                    format!("`{level}` must be a multiple of the level before it, `{prev}`"),
                ));
            }
        }
        previous = Some((level, secs));
    }
    if r.retention.is_zero() {
        return Err(("rollups.retention", "must be more than 0s".into()));
    }
    if r.max_buckets == 0 || r.max_buckets > 10_000_000 {
        return Err((
            "rollups.max_buckets",
            format!("is {}; must be from 1 to 10000000", r.max_buckets),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels(l: &[&str]) -> RollupSettings {
        RollupSettings {
            levels: l.iter().map(|s| s.to_string()).collect(),
            ..RollupSettings::default()
        }
    }

    #[test]
    fn defaults_are_valid_and_parse() {
        let r = RollupSettings::default();
        assert_eq!(validate(&r), Ok(()));
        assert_eq!(r.level_ms(), [60_000, 3_600_000]);
        assert_eq!(validate(&levels(&[])), Ok(()));
        assert_eq!(validate(&levels(&["10s", "1m", "1h", "1day"])), Ok(()));
    }

    #[test]
    fn bad_levels_name_the_key_and_the_level() {
        for (bad, says) in [
            (&["5x"][..], "`5x` is not a duration"),
            (&["1500ms"][..], "whole number of seconds"),
            (&["0s"][..], "whole number of seconds"),
            (&["1h", "1m"][..], "longer than the level before it"),
            (&["1m", "1m"][..], "longer than the level before it"),
            (&["1m", "90s"][..], "multiple of the level before it, `1m`"),
        ] {
            let (key, reason) = validate(&levels(bad)).unwrap_err();
            assert_eq!(key, "rollups.levels");
            assert!(reason.contains(says), "{bad:?}: {reason}");
        }
        let r = RollupSettings {
            retention: Duration::ZERO,
            ..RollupSettings::default()
        };
        assert_eq!(validate(&r).unwrap_err().0, "rollups.retention");
        let r = RollupSettings {
            max_buckets: 0,
            ..RollupSettings::default()
        };
        assert_eq!(validate(&r).unwrap_err().0, "rollups.max_buckets");
    }
}
