//! The readings model: what a reading is, and the rules it keeps (SPEC §1). Every wire format
//! in [`crate::codec`] ends here: device → handler → codec → **reading** → admission.
//!
//! A [`Reading`] is valid by construction. Formats build one only through
//! [`ReadingParts::validate`] (or the JSON parser, which fills the same unchecked form), so the
//! device-id, time-window, metric and tag rules hold whatever the bytes looked like, and nothing
//! downstream re-validates. The per-reading and per-batch errors ([`ReadingError`],
//! [`BatchError`]) and their metric label ([`RejectReason`]) live here too, because every
//! format reports through them.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Longest device id (SPEC §1).
pub const MAX_DEVICE_ID_LEN: usize = 128;
/// Most metrics in one reading.
pub const MAX_METRICS: usize = 256;
/// Longest metric name (also the rule for tag keys).
pub const MAX_METRIC_NAME_LEN: usize = 64;
/// Most tags in one reading.
pub const MAX_TAGS: usize = 16;
/// Longest tag value.
pub const MAX_TAG_VALUE_LEN: usize = 128;

/// A validated device id: 1 to 128 of `A-Z a-z 0-9 _ : -`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    /// Validates `s` as a device id.
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::check(s)?;
        Ok(DeviceId(s.to_owned()))
    }

    fn check(s: &str) -> Result<(), String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > MAX_DEVICE_ID_LEN {
            return Err(format!(
                "must be at most {MAX_DEVICE_ID_LEN} characters, got {}",
                s.chars().count()
            ));
        }
        let first = s.as_bytes()[0];
        if !first.is_ascii_alphanumeric() {
            return Err(format!(
                "must start with a letter or a digit, not {:?}",
                s.chars().next().unwrap_or(' ')
            ));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-')))
        {
            return Err(format!("{c:?} is not allowed (use A-Z a-z 0-9 _ : -)"));
        }
        Ok(())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// One metric value. Integers stay integers so that values read back as given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MetricValue {
    /// A JSON integer that fits in i64.
    Int(i64),
    /// A JSON integer above `i64::MAX` (up to `u64::MAX`), kept exact (SPEC §1).
    UInt(u64),
    /// Any other finite JSON number.
    Float(f64),
    /// `true` / `false`.
    Bool(bool),
}

impl Serialize for MetricValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            MetricValue::Int(v) => s.serialize_i64(v),
            MetricValue::UInt(v) => s.serialize_u64(v),
            MetricValue::Float(v) => s.serialize_f64(v),
            MetricValue::Bool(v) => s.serialize_bool(v),
        }
    }
}

/// A valid reading. Only this module constructs one from untrusted input.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Which device measured it.
    pub device_id: DeviceId,
    /// When, in Unix epoch milliseconds (the server's receive time if the device gave none).
    pub ts_ms: i64,
    /// The device's sequence number; `(device_id, seq)` identifies a reading for dedupe.
    pub seq: Option<u64>,
    /// 1 to 256 named values, in the order given.
    pub metrics: Vec<(String, MetricValue)>,
    /// Up to 16 string tags, in the order given.
    pub tags: Vec<(String, String)>,
}

/// Serialises `(name, value)` pairs as a JSON object, in order.
pub struct PairsAsMap<'a, V>(pub &'a [(String, V)]);

impl<V: Serialize> Serialize for PairsAsMap<'_, V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// Formats epoch milliseconds as RFC 3339 with millisecond precision, in UTC. A year before 0
/// (down to -9999) keeps its minus sign within four places (year -1 is `-001`, not ISO
/// 8601's expanded `-0001`; RFC 3339 has no such years); a time beyond the years ±9999 is
/// written as `<ms> ms since the epoch`.
pub fn format_ts(ms: i64) -> String {
    let mut out = Vec::with_capacity(24);
    write_ts(&mut out, ms);
    String::from_utf8(out).unwrap_or_default()
}

/// Appends [`format_ts`]'s text for `ms` to `out` (UTF-8, no quotes), without an allocation of
/// its own: a readings page writes one timestamp per row straight into its body.
pub fn write_ts(out: &mut Vec<u8>, ms: i64) {
    let Ok(t) = OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000) else {
        // Beyond the years ±9999 that RFC 3339 can write: the number itself, never a wrong date.
        out.extend_from_slice(format!("{ms} ms since the epoch").as_bytes());
        return;
    };
    let (y, mo, d) = (t.year(), t.month() as u8, t.day());
    let Ok(year) = u16::try_from(y) else {
        out.extend_from_slice(
            format!(
                "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
                t.hour(),
                t.minute(),
                t.second(),
                t.millisecond()
            )
            .as_bytes(),
        );
        return;
    };
    // Years 0 to 9999, all of them in practice: digits written in place, without the
    // formatting machinery.
    let mut b = *b"0000-00-00T00:00:00.000Z";
    put_digits(&mut b[0..4], year.into());
    put_digits(&mut b[5..7], mo.into());
    put_digits(&mut b[8..10], d.into());
    put_digits(&mut b[11..13], t.hour().into());
    put_digits(&mut b[14..16], t.minute().into());
    put_digits(&mut b[17..19], t.second().into());
    put_digits(&mut b[20..23], t.millisecond().into());
    out.extend_from_slice(&b);
}

/// Writes `v` as `out.len()` decimal digits, zero-padded (`v` fits).
fn put_digits(out: &mut [u8], mut v: u32) {
    for c in out.iter_mut().rev() {
        *c = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Parses an RFC 3339 string or an integer string of epoch milliseconds (query parameters).
pub fn parse_ts(s: &str) -> Option<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    rfc3339_ms(s)
}

/// An RFC 3339 timestamp as Unix epoch milliseconds, digits below the millisecond cut toward
/// the past (floor), before 1970 as after it: `1969-12-31T23:59:59.9995Z` is -1, as
/// `…59.999Z` is. `None` if it is not RFC 3339 or is beyond `i64` milliseconds. Readings'
/// `ts` (SPEC §1) and the query API's `from` and `to` (SPEC §3) both read this way, so a
/// range given with the text a reading was sent with holds that reading.
pub fn rfc3339_ms(s: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).ok()
}

/// The current time in epoch milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Why a reading (or a whole request) was rejected: the `reason` label of
/// `sluice_readings_rejected_total`. A small fixed set, so cardinality stays bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not JSON / NDJSON, or a reading that is not an object.
    Malformed,
    /// Body over `limits.max_body_bytes`.
    TooLarge,
    /// More than `limits.max_readings_per_request` readings.
    TooManyReadings,
    /// Content type or encoding not accepted.
    UnsupportedMediaType,
    /// `device_id` missing or invalid.
    InvalidDeviceId,
    /// `device_id` disagrees with the one bound by the transport.
    DeviceMismatch,
    /// `ts` unparsable or out of the accepted window.
    InvalidTs,
    /// `seq` not an unsigned 64-bit integer.
    InvalidSeq,
    /// `metrics` missing, empty, too many, bad name or bad value.
    InvalidMetrics,
    /// `tags` too many, bad key or bad value.
    InvalidTags,
    /// An unknown top-level field.
    UnknownField,
    /// A value kind the readings model cannot hold (SenML `vs`, `vd`, or a sum alone; SPEC §10).
    UnsupportedValue,
    /// A device the request's token may not write (SPEC §11).
    Forbidden,
    /// Over the device's `rate_limit.per_device` (SPEC §11).
    RateLimited,
}

impl RejectReason {
    /// Every reason, for pre-registering metric series.
    pub const ALL: [RejectReason; 14] = [
        RejectReason::Malformed,
        RejectReason::TooLarge,
        RejectReason::TooManyReadings,
        RejectReason::UnsupportedMediaType,
        RejectReason::InvalidDeviceId,
        RejectReason::DeviceMismatch,
        RejectReason::InvalidTs,
        RejectReason::InvalidSeq,
        RejectReason::InvalidMetrics,
        RejectReason::InvalidTags,
        RejectReason::UnknownField,
        RejectReason::UnsupportedValue,
        RejectReason::Forbidden,
        RejectReason::RateLimited,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::TooLarge => "too_large",
            RejectReason::TooManyReadings => "too_many_readings",
            RejectReason::UnsupportedMediaType => "unsupported_media_type",
            RejectReason::InvalidDeviceId => "invalid_device_id",
            RejectReason::DeviceMismatch => "device_mismatch",
            RejectReason::InvalidTs => "invalid_ts",
            RejectReason::InvalidSeq => "invalid_seq",
            RejectReason::InvalidMetrics => "invalid_metrics",
            RejectReason::InvalidTags => "invalid_tags",
            RejectReason::UnknownField => "unknown_field",
            RejectReason::UnsupportedValue => "unsupported_value",
            RejectReason::Forbidden => "forbidden",
            RejectReason::RateLimited => "rate_limited",
        }
    }
}

/// Why one reading was refused. Displays as `field: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadingError {
    /// The field path, e.g. `metrics.temperature`; empty when the reading as a whole is wrong.
    pub field: String,
    /// What is wrong, for the device's developer.
    pub reason: String,
    /// The metric label.
    pub kind: RejectReason,
}

impl ReadingError {
    /// An error on `field` (a path such as `metrics.t`, or empty for the whole reading).
    pub fn new(field: impl Into<String>, reason: impl Into<String>, kind: RejectReason) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
            kind,
        }
    }
}

impl fmt::Display for ReadingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

/// What validation needs to know besides the bytes.
#[derive(Debug, Clone)]
pub struct ParseContext<'a> {
    /// Receive time, used for absent `ts` and for the accepted window.
    pub now_ms: i64,
    /// `limits.max_future_skew`.
    pub max_future_skew: Duration,
    /// `limits.max_age`.
    pub max_age: Duration,
    /// `limits.max_readings_per_request`.
    pub max_readings: usize,
    /// The device bound by the transport (MQTT topic, WebSocket `?device_id=`), if any: a
    /// reading without `device_id` is its, one naming another device is `device_mismatch`.
    pub bound_device: Option<&'a DeviceId>,
    /// The device a token naming exactly one device binds (SPEC §11), if any: a reading without
    /// `device_id` is its; one naming another device keeps that id and is left to the token
    /// check, which rejects it as `forbidden`.
    pub token_device: Option<&'a DeviceId>,
}

impl ParseContext<'_> {
    /// The device a reading without `device_id` belongs to: the transport's, else the token's.
    pub fn default_device(&self) -> Option<&DeviceId> {
        self.bound_device.or(self.token_device)
    }
}

/// What binds the readings of one request or connection to a device, if anything.
#[derive(Debug, Clone, Default)]
pub enum Binding {
    /// Nothing: every reading names its device.
    #[default]
    None,
    /// The transport: an MQTT topic's device level, or a WebSocket's `?device_id=`.
    Transport(DeviceId),
    /// A token whose device glob names exactly one device (SPEC §11).
    Token(DeviceId),
}

impl Binding {
    /// A token's device when there is one, else nothing.
    pub fn token(device: Option<&DeviceId>) -> Self {
        device.map_or(Binding::None, |d| Binding::Token(d.clone()))
    }

    /// The parse context's `(bound_device, token_device)`.
    pub fn devices(&self) -> (Option<&DeviceId>, Option<&DeviceId>) {
        match self {
            Binding::None => (None, None),
            Binding::Transport(d) => (Some(d), None),
            Binding::Token(d) => (None, Some(d)),
        }
    }
}

/// A reading refused inside an otherwise accepted batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Position of the reading in the batch (0-based; NDJSON counts non-blank lines).
    pub index: usize,
    /// Why.
    pub error: ReadingError,
}

/// The outcome of parsing a batch: what can go on, and what was refused.
#[derive(Debug, Default)]
pub struct ParsedBatch {
    /// Valid readings, in batch order.
    pub readings: Vec<Reading>,
    /// Invalid readings with their index and error.
    pub rejected: Vec<Rejection>,
}

impl ParsedBatch {
    /// Readings in the batch, valid or not.
    pub fn total(&self) -> usize {
        self.readings.len() + self.rejected.len()
    }
}

/// The batch as a whole cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// Not JSON / NDJSON. Carries a detail with line and column.
    #[error("{0}")]
    Malformed(String),
    /// Over `limits.max_readings_per_request`.
    #[error("{count} readings exceed the limit of {limit} per request")]
    TooMany {
        /// How many readings the batch holds.
        count: usize,
        /// The limit.
        limit: usize,
    },
}

/// A reading decoded by another wire format (`crate::codec`), before validation: the one way
/// such a format makes a [`Reading`], so every format keeps SPEC §1's rules.
#[derive(Debug, Default)]
pub struct ReadingParts<'a> {
    /// The device, if the format carries one; else the transport's bound device is used.
    pub device_id: Option<Cow<'a, str>>,
    /// Epoch milliseconds; `None` for the receive time.
    pub ts_ms: Option<i64>,
    /// The device's sequence number.
    pub seq: Option<u64>,
    /// Metric names and values, in the order sent.
    pub metrics: Vec<(Cow<'a, str>, MetricValue)>,
    /// Tag keys and values, in the order sent.
    pub tags: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl ReadingParts<'_> {
    /// Validates the parts as SPEC §1 says (device id, time window, metric names and count,
    /// tags); errors name the field as the JSON parser does.
    pub fn validate(self, ctx: &ParseContext<'_>) -> Result<Reading, ReadingError> {
        WireReading {
            device_id: self.device_id,
            ts: self.ts_ms.map(WireTs::Millis),
            seq: self.seq,
            metrics: Some(self.metrics),
            tags: Some(self.tags),
        }
        .validate(ctx)
    }
}

/// A reading as it arrives, before validation: what the JSON parser fills field by field.
/// Strings borrow from the input when they can. `validate` is the one way to a [`Reading`].
#[derive(Default)]
pub(crate) struct WireReading<'a> {
    pub(crate) device_id: Option<Cow<'a, str>>,
    pub(crate) ts: Option<WireTs<'a>>,
    pub(crate) seq: Option<u64>,
    pub(crate) metrics: Option<Vec<(Cow<'a, str>, MetricValue)>>,
    pub(crate) tags: Option<Vec<(Cow<'a, str>, Cow<'a, str>)>>,
}

/// A `ts` as sent: RFC 3339 text (parsed in `validate`) or epoch milliseconds.
pub(crate) enum WireTs<'a> {
    Text(Cow<'a, str>),
    Millis(i64),
}

impl<'a> WireReading<'a> {
    pub(crate) fn validate(self, ctx: &ParseContext<'_>) -> Result<Reading, ReadingError> {
        use RejectReason::*;
        let device_id = match (self.device_id, ctx.default_device()) {
            (None, None) => {
                return Err(ReadingError::new(
                    "device_id",
                    "required (or bound by the transport)",
                    InvalidDeviceId,
                ))
            }
            (None, Some(bound)) => bound.clone(),
            (Some(given), bound) => {
                DeviceId::check(&given)
                    .map_err(|r| ReadingError::new("device_id", r, InvalidDeviceId))?;
                match bound.filter(|_| ctx.bound_device.is_some()) {
                    Some(b) if b.as_str() != given => {
                        return Err(ReadingError::new(
                            "device_id",
                            format!("`{given}` does not match the bound device `{b}`"),
                            DeviceMismatch,
                        ))
                    }
                    Some(b) => b.clone(),
                    None => DeviceId(given.into_owned()),
                }
            }
        };

        let ts_ms = match self.ts {
            None => ctx.now_ms,
            Some(WireTs::Millis(ms)) => ms,
            Some(WireTs::Text(s)) => rfc3339_ms(&s).ok_or_else(|| {
                ReadingError::new(
                    "ts",
                    format!("`{s}` is not an RFC 3339 timestamp"),
                    InvalidTs,
                )
            })?,
        };
        let skew = ctx.max_future_skew.as_millis() as i64;
        if ts_ms > ctx.now_ms.saturating_add(skew) {
            return Err(ReadingError::new(
                "ts",
                format!(
                    "{} is more than {} in the future",
                    format_ts(ts_ms),
                    crate::config::duration::format(ctx.max_future_skew)
                ),
                InvalidTs,
            ));
        }
        let age = ctx.max_age.as_millis() as i64;
        if ts_ms < ctx.now_ms.saturating_sub(age) {
            return Err(ReadingError::new(
                "ts",
                format!(
                    "{} is more than {} old",
                    format_ts(ts_ms),
                    crate::config::duration::format(ctx.max_age)
                ),
                InvalidTs,
            ));
        }

        let metrics = self
            .metrics
            .ok_or_else(|| ReadingError::new("metrics", "required", InvalidMetrics))?;
        if metrics.is_empty() {
            return Err(ReadingError::new(
                "metrics",
                "at least one metric is required",
                InvalidMetrics,
            ));
        }
        if metrics.len() > MAX_METRICS {
            return Err(ReadingError::new(
                "metrics",
                format!("at most {MAX_METRICS} metrics, got {}", metrics.len()),
                InvalidMetrics,
            ));
        }
        let mut out_metrics = Vec::with_capacity(metrics.len());
        for (name, value) in metrics {
            check_metric_name(&name)
                .map_err(|r| ReadingError::new(format!("metrics.{name}"), r, InvalidMetrics))?;
            if out_metrics.iter().any(|(n, _): &(String, _)| *n == name) {
                return Err(ReadingError::new(
                    format!("metrics.{name}"),
                    "given more than once",
                    InvalidMetrics,
                ));
            }
            out_metrics.push((name.into_owned(), value));
        }

        let tags = self.tags.unwrap_or_default();
        if tags.len() > MAX_TAGS {
            return Err(ReadingError::new(
                "tags",
                format!("at most {MAX_TAGS} tags, got {}", tags.len()),
                InvalidTags,
            ));
        }
        let mut out_tags = Vec::with_capacity(tags.len());
        for (k, v) in tags {
            check_metric_name(&k)
                .map_err(|r| ReadingError::new(format!("tags.{k}"), r, InvalidTags))?;
            if v.chars().count() > MAX_TAG_VALUE_LEN {
                return Err(ReadingError::new(
                    format!("tags.{k}"),
                    format!("value longer than {MAX_TAG_VALUE_LEN} characters"),
                    InvalidTags,
                ));
            }
            if out_tags.iter().any(|(n, _): &(String, String)| *n == k) {
                return Err(ReadingError::new(
                    format!("tags.{k}"),
                    "given more than once",
                    InvalidTags,
                ));
            }
            out_tags.push((k.into_owned(), v.into_owned()));
        }

        Ok(Reading {
            device_id,
            ts_ms,
            seq: self.seq,
            metrics: out_metrics,
            tags: out_tags,
        })
    }
}

/// Validates a metric name or tag key: 1 to 64 of `A-Z a-z 0-9 _ . : / -`.
pub fn check_metric_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name must not be empty".into());
    }
    if name.len() > MAX_METRIC_NAME_LEN {
        return Err(format!("name longer than {MAX_METRIC_NAME_LEN} characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '/' | '-')))
    {
        return Err(format!(
            "{c:?} is not allowed in a name (use A-Z a-z 0-9 _ . : / -)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `format_ts` as the formatting machinery writes it, for every year.
    fn reference(ms: i64) -> String {
        let Ok(t) = OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000) else {
            return format!("{ms} ms since the epoch");
        };
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            t.month() as u8,
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        )
    }

    /// Found by a breaking session: truncating nanoseconds toward zero stored
    /// `1969-12-31T23:59:59.9995Z` as 1970-01-01T00:00:00.000Z, another second, day and year.
    #[test]
    fn digits_below_the_millisecond_are_cut_toward_the_past() {
        for (text, ms) in [
            ("1970-01-01T00:00:00.0005Z", 0),
            ("1969-12-31T23:59:59.9995Z", -1),
            ("1969-12-31T23:59:59.999Z", -1),
            ("1969-12-31T23:59:59.000000001Z", -1000),
            ("1950-06-15T12:00:00.0001Z", -616_852_800_000),
            ("1950-06-15T11:59:59.9999Z", -616_852_800_001),
            ("2026-12-01T23:59:59.9999Z", 1_796_169_599_999),
        ] {
            assert_eq!(rfc3339_ms(text), Some(ms), "{text}");
            assert_eq!(parse_ts(text), Some(ms), "{text}");
        }
        assert_eq!(rfc3339_ms("1969-13-01T00:00:00Z"), None);
        assert_eq!(format_ts(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn timestamps_written_in_place_match_the_formatting_machinery() {
        let mut below = crate::test_rng::xorshift(0x5eed);
        // 0000-01-01 to 9999-12-31: 10 000 years of milliseconds.
        let span = 315_569_520_000_000u64;
        let mut cases: Vec<i64> = vec![
            0,
            -1,
            999,
            1_796_058_000_123,
            -62_167_219_200_000, // 0000-01-01T00:00:00.000Z
            -62_167_219_200_001, // the year before 0: written by the machinery
            253_402_300_799_999, // 9999-12-31T23:59:59.999Z
            253_402_300_800_000, // year 10000: none
            i64::MIN,
            i64::MAX,
        ];
        cases.extend((0..20_000).map(|_| below(span) as i64 - 62_167_219_200_000));
        for ms in cases {
            assert_eq!(format_ts(ms), reference(ms), "{ms}");
        }
    }
}
