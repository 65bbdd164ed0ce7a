//! Sluice's own JSON and NDJSON (SPEC §1): bytes → readings, no I/O. device → handler →
//! **codec::json** → readings → admission.
//!
//! Transports hand their bytes to [`super::decode_utf8`] and then [`parse_json_batch`] or
//! [`parse_ndjson_batch`], and get back typed, validated readings plus a precise error for
//! each reading refused. The CBOR codec transcodes to this parser, so both share every rule.
//!
//! One leading UTF-8 byte-order mark is ignored (SPEC §1); anywhere else, a byte that cannot
//! start a JSON token is named in the error (`unexpected byte 0xEF (a UTF-8 byte-order mark?)`),
//! not only located. Line and column count bytes after an ignored byte-order mark.
//!
//! Parsing never builds a `serde_json::Value`. An array is first deserialised in one pass into
//! typed fields, element by element. If any element does not deserialise (a wrong type, an
//! unknown field), the body is parsed again the slower way: split into borrowed raw elements
//! (a cheap syntax scan), then each element deserialised on its own, so that one bad reading
//! fails alone, with its field named, while its neighbours are still taken. Both ways give the
//! same answer for a body the one pass takes; a body with a bad element costs about two passes.
//! So does a body refused whole after a good start (bytes after the array, one reading over
//! the limit): the one pass has built and validated every reading before it finds out, which
//! for a 3.8 MB body of 10 000 readings took ~110 ms against ~20 ms for the scan alone. That is
//! what a valid body of the same size costs, so it is no more than the old worst case.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::strip_bom;
use crate::reading::{
    BatchError, MetricValue, ParseContext, ParsedBatch, Reading, ReadingError, RejectReason,
    Rejection, WireReading, WireTs, MAX_METRICS, MAX_TAGS,
};

/// Parses a JSON body: one reading object or an array of them.
///
/// One leading byte-order mark is ignored.
pub fn parse_json_batch(body: &str, ctx: &ParseContext<'_>) -> Result<ParsedBatch, BatchError> {
    let body = strip_bom(body);
    let first = body.bytes().find(|b| !b.is_ascii_whitespace());
    if first == Some(b'[') {
        if let Some(batch) = parse_array_one_pass(body, ctx) {
            return Ok(batch);
        }
    }
    parse_json_batch_by_element(body, first, ctx)
}

/// The common case in one pass over the bytes: an array whose every element deserializes
/// (each may still fail validation, which is a per-index rejection either way). `None` when
/// any element does not deserialize, the body is not well-formed JSON, or it holds more than
/// `ctx.max_readings` elements: [`parse_json_batch_by_element`] then parses the body again and
/// gives the exact answer, per-index errors and all. Either path gives the same
/// [`ParsedBatch`] for a body the one pass takes (a differential test checks it); the one
/// pass only skips the pass that splits the array into raw elements first.
fn parse_array_one_pass(body: &str, ctx: &ParseContext<'_>) -> Option<ParsedBatch> {
    struct Batch<'c, 'x>(&'c ParseContext<'x>);

    impl<'de> Visitor<'de> for Batch<'_, '_> {
        type Value = Option<ParsedBatch>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array of readings")
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = ParsedBatch {
                readings: Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.0.max_readings)),
                rejected: Vec::new(),
            };
            let failed_field = RefCell::new(None);
            let mut index = 0usize;
            while let Some(wire) = seq.next_element_seed(WireSeed {
                failed_field: &failed_field,
            })? {
                if index == self.0.max_readings {
                    // Too many: the other path counts them all and names the number.
                    return Ok(None);
                }
                match wire.validate(self.0) {
                    Ok(r) => out.readings.push(r),
                    Err(error) => out.rejected.push(Rejection { index, error }),
                }
                index += 1;
            }
            Ok(Some(out))
        }
    }

    let mut de = serde_json::Deserializer::from_str(body);
    let batch = de.deserialize_seq(Batch(ctx)).ok()??;
    de.end().ok()?;
    Some(batch)
}

/// Parses a JSON body element by element: the array is first split into raw elements, so
/// that an element that does not deserialize is rejected by index while the others go on.
fn parse_json_batch_by_element(
    body: &str,
    first: Option<u8>,
    ctx: &ParseContext<'_>,
) -> Result<ParsedBatch, BatchError> {
    let malformed = |e| malformed(body, e);
    let raws: Vec<&RawValue> = match first {
        Some(b'[') => serde_json::from_str(body).map_err(malformed)?,
        Some(b'{') => vec![serde_json::from_str::<&RawValue>(body).map_err(malformed)?],
        _ => {
            serde_json::from_str::<&RawValue>(body).map_err(malformed)?;
            return Err(BatchError::Malformed(
                "expected a reading object or an array of readings".into(),
            ));
        }
    };
    if raws.len() > ctx.max_readings {
        return Err(BatchError::TooMany {
            count: raws.len(),
            limit: ctx.max_readings,
        });
    }
    let mut out = ParsedBatch {
        readings: Vec::with_capacity(raws.len()),
        rejected: Vec::new(),
    };
    for (index, raw) in raws.iter().enumerate() {
        match parse_reading(raw.get(), ctx) {
            Ok(r) => out.readings.push(r),
            Err(error) => out.rejected.push(Rejection { index, error }),
        }
    }
    Ok(out)
}

/// Parses NDJSON: one reading per line; blank lines are skipped. A line that is not JSON is
/// rejected on its own (with its line number), so one corrupt line does not sink the rest.
/// One leading byte-order mark (before the first line only) is ignored.
pub fn parse_ndjson_batch(body: &str, ctx: &ParseContext<'_>) -> Result<ParsedBatch, BatchError> {
    let body = strip_bom(body);
    let lines: Vec<(usize, &str)> = body
        .split('\n')
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    if lines.len() > ctx.max_readings {
        return Err(BatchError::TooMany {
            count: lines.len(),
            limit: ctx.max_readings,
        });
    }
    let mut out = ParsedBatch {
        readings: Vec::with_capacity(lines.len()),
        rejected: Vec::new(),
    };
    for (index, (line_no, line)) in lines.into_iter().enumerate() {
        let result = match serde_json::from_str::<&RawValue>(line) {
            Ok(raw) => parse_reading(raw.get(), ctx),
            Err(e) => Err(ReadingError::new(
                "",
                match unexpected_byte(line, &e) {
                    Some(what) => format!(
                        "line {}: {what} at column {}; {}",
                        line_no + 1,
                        e.column(),
                        strip_position(&e)
                    ),
                    None => format!("line {}: {}", line_no + 1, strip_position(&e)),
                },
                RejectReason::Malformed,
            )),
        };
        match result {
            Ok(r) => out.readings.push(r),
            Err(error) => out.rejected.push(Rejection { index, error }),
        }
    }
    Ok(out)
}

fn malformed(text: &str, e: serde_json::Error) -> BatchError {
    let detail = strip_position(&e);
    BatchError::Malformed(match unexpected_byte(text, &e) {
        Some(what) => format!(
            "not valid JSON at line {} column {}: {what}; {detail}",
            e.line(),
            e.column()
        ),
        None => format!(
            "not valid JSON at line {} column {}: {detail}",
            e.line(),
            e.column()
        ),
    })
}

/// Names the byte a syntax error stopped at, when it is one a reader cannot see in the message:
/// a control character or any non-ASCII byte (`unexpected byte 0xEF (a UTF-8 byte-order
/// mark?)`). `None` for printable ASCII, which serde_json's message already makes plain.
fn unexpected_byte(text: &str, e: &serde_json::Error) -> Option<String> {
    if e.classify() != serde_json::error::Category::Syntax || e.column() == 0 {
        return None;
    }
    // serde_json counts lines from 1 and columns in bytes from 1 (the byte it stopped at).
    let line_start = if e.line() <= 1 {
        0
    } else {
        text.match_indices('\n').nth(e.line() - 2)?.0 + 1
    };
    let at = line_start + e.column() - 1;
    let byte = *text.as_bytes().get(at)?;
    if byte.is_ascii_graphic() || byte == b' ' {
        return None;
    }
    let what = if text.as_bytes()[at..].starts_with("\u{feff}".as_bytes()) {
        "a UTF-8 byte-order mark?".to_string()
    } else if byte.is_ascii() {
        match byte {
            b'\t' | b'\n' | b'\r' => return None,
            _ => "a control character".to_string(),
        }
    } else {
        match text.get(at..).and_then(|rest| rest.chars().next()) {
            Some(c) => format!("the first byte of {c:?}, U+{:04X}", c as u32),
            None => "inside a multi-byte character".to_string(),
        }
    };
    Some(format!("unexpected byte 0x{byte:02X} ({what})"))
}

/// serde_json's message without its ` at line L column C` suffix.
fn strip_position(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    msg.strip_suffix(&suffix).map(str::to_owned).unwrap_or(msg)
}

/// Parses and validates one reading from the text of one JSON value.
pub fn parse_reading(text: &str, ctx: &ParseContext<'_>) -> Result<Reading, ReadingError> {
    let failed_field = RefCell::new(None::<(String, RejectReason)>);
    let mut de = serde_json::Deserializer::from_str(text);
    let wire = match (WireSeed {
        failed_field: &failed_field,
    })
    .deserialize(&mut de)
    .and_then(|w| de.end().map(|_| w))
    {
        Ok(w) => w,
        Err(e) => {
            return Err(match failed_field.into_inner() {
                Some((field, kind)) => {
                    let reason = match kind {
                        RejectReason::InvalidMetrics
                            if field.starts_with("metrics.")
                                && !strip_position(&e).starts_with(OUT_OF_RANGE) =>
                        {
                            "expected a finite number or a boolean".to_string()
                        }
                        _ => strip_position(&e),
                    };
                    ReadingError::new(field, reason, kind)
                }
                None => ReadingError::new(
                    "",
                    format!("expected a reading object: {}", strip_position(&e)),
                    RejectReason::Malformed,
                ),
            })
        }
    };
    wire.validate(ctx)
}

/// Deserialises a [`WireReading`], recording which field failed so the error can name it.
struct WireSeed<'s> {
    failed_field: &'s RefCell<Option<(String, RejectReason)>>,
}

impl<'de> DeserializeSeed<'de> for WireSeed<'_> {
    type Value = WireReading<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for WireSeed<'_> {
    type Value = WireReading<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a reading object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut w = WireReading::default();
        let fail = |field: &str, kind| {
            *self.failed_field.borrow_mut() = Some((field.to_string(), kind));
        };
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let dup = match &*key {
                "device_id" => w.device_id.is_some(),
                "ts" => w.ts.is_some(),
                "seq" => w.seq.is_some(),
                "metrics" => w.metrics.is_some(),
                "tags" => w.tags.is_some(),
                other => {
                    fail(other, RejectReason::UnknownField);
                    return Err(de::Error::custom("unknown field"));
                }
            };
            if dup {
                fail(&key, RejectReason::Malformed);
                return Err(de::Error::custom("given more than once"));
            }
            match &*key {
                "device_id" => {
                    w.device_id = Some(
                        map.next_value::<CowStr<'de>>()
                            .inspect_err(|_| fail("device_id", RejectReason::InvalidDeviceId))?
                            .0,
                    )
                }
                "ts" => {
                    w.ts = Some(
                        map.next_value::<WireTsDe<'de>>()
                            .inspect_err(|_| fail("ts", RejectReason::InvalidTs))?
                            .0,
                    )
                }
                "seq" => {
                    w.seq = Some(
                        map.next_value::<SeqDe>()
                            .inspect_err(|_| fail("seq", RejectReason::InvalidSeq))?
                            .0,
                    )
                }
                "metrics" => {
                    w.metrics = Some(map.next_value_seed(MetricsSeed {
                        failed_field: self.failed_field,
                    })?)
                }
                _ => {
                    w.tags = Some(
                        map.next_value::<TagsDe<'de>>()
                            .inspect_err(|_| fail("tags", RejectReason::InvalidTags))?
                            .0,
                    )
                }
            }
        }
        Ok(w)
    }
}

/// A string that borrows from the input unless it holds escapes.
pub(crate) struct CowStr<'a>(pub(crate) Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

struct WireTsDe<'a>(WireTs<'a>);

impl<'de> serde::Deserialize<'de> for WireTsDe<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = WireTsDe<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an RFC 3339 string or integer epoch milliseconds")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(WireTsDe(WireTs::Text(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(WireTsDe(WireTs::Text(Cow::Owned(v.to_owned()))))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(WireTsDe(WireTs::Millis(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                i64::try_from(v)
                    .map(|v| WireTsDe(WireTs::Millis(v)))
                    .map_err(|_| E::custom("epoch milliseconds out of range"))
            }
        }
        d.deserialize_any(V)
    }
}

struct MetricsSeed<'s> {
    failed_field: &'s RefCell<Option<(String, RejectReason)>>,
}

impl<'de> DeserializeSeed<'de> for MetricsSeed<'_> {
    type Value = Vec<(Cow<'de, str>, MetricValue)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let slot = self.failed_field;
        *slot.borrow_mut() = Some(("metrics".into(), RejectReason::InvalidMetrics));
        let v = d.deserialize_map(self)?;
        *slot.borrow_mut() = None;
        Ok(v)
    }
}

impl<'de> Visitor<'de> for MetricsSeed<'_> {
    type Value = Vec<(Cow<'de, str>, MetricValue)>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of metric names to values")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(map.size_hint().unwrap_or(4).min(MAX_METRICS));
        while let Some(CowStr(name)) = map.next_key::<CowStr<'de>>()? {
            if out.len() == MAX_METRICS {
                // Stop early: the reading is rejected anyway; don't parse thousands of values.
                *self.failed_field.borrow_mut() =
                    Some(("metrics".into(), RejectReason::InvalidMetrics));
                return Err(de::Error::custom(format!(
                    "at most {MAX_METRICS} metrics, got more"
                )));
            }
            // The field path is only built when the value is bad: it costs an allocation.
            let value = match map.next_value::<MetricValueDe>() {
                Ok(v) => v.0,
                Err(e) => {
                    *self.failed_field.borrow_mut() =
                        Some((format!("metrics.{name}"), RejectReason::InvalidMetrics));
                    return Err(e);
                }
            };
            out.push((name, value));
        }
        *self.failed_field.borrow_mut() = Some(("metrics".into(), RejectReason::InvalidMetrics));
        Ok(out)
    }
}

struct MetricValueDe(MetricValue);

/// How an out-of-range integer's error starts, so that its message is kept (SPEC §1).
const OUT_OF_RANGE: &str = "integer ";

/// A JSON number literal with no fraction and no exponent: an integer, whatever its size.
fn is_integer_literal(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

impl<'de> serde::Deserialize<'de> for MetricValueDe {
    /// Reads the value's text, so that an integer literal outside −2^63..2^64−1 is refused with
    /// its value named rather than silently rounded to a float (serde_json's own fallback).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <&'de RawValue>::deserialize(d)?;
        metric_value(raw.get())
            .map(MetricValueDe)
            .map_err(|e| match e {
                Some(msg) => de::Error::custom(msg),
                None => de::Error::custom("expected a finite number or a boolean"),
            })
    }
}

/// Decodes the JSON text of one metric value. `Err(Some(msg))` for an out-of-range integer,
/// `Err(None)` for anything that is not a finite number or a boolean.
fn metric_value(text: &str) -> Result<MetricValue, Option<String>> {
    match text {
        "true" => return Ok(MetricValue::Bool(true)),
        "false" => return Ok(MetricValue::Bool(false)),
        _ => {}
    }
    if is_integer_literal(text) {
        if text == "-0" {
            // As serde_json reads it: a negative zero, which reads back as `-0.0`.
            return Ok(MetricValue::Float(-0.0));
        }
        if let Ok(v) = text.parse::<i64>() {
            return Ok(MetricValue::Int(v));
        }
        if let Ok(v) = text.parse::<u64>() {
            return Ok(MetricValue::UInt(v));
        }
        return Err(Some(format!(
            "{OUT_OF_RANGE}{text} is outside {}..{}, the range kept exactly",
            i64::MIN,
            u64::MAX
        )));
    }
    let first = text.as_bytes().first().copied().unwrap_or(b' ');
    if first == b'-' || first.is_ascii_digit() {
        // A valid JSON number (the raw value was checked), so Rust's correctly rounded parser
        // gives the same f64 as serde_json's `float_roundtrip`.
        if let Ok(v) = text.parse::<f64>() {
            if v.is_finite() {
                return Ok(MetricValue::Float(v));
            }
        }
    }
    Err(None)
}

/// A `seq`: an unsigned 64-bit integer. A larger literal is named as out of range instead of
/// being reported as a float.
struct SeqDe(u64);

impl<'de> serde::Deserialize<'de> for SeqDe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <&'de RawValue>::deserialize(d)?;
        let text = raw.get();
        if is_integer_literal(text) {
            return match text.parse::<u64>() {
                Ok(v) => Ok(SeqDe(v)),
                Err(_) => Err(de::Error::custom(format!(
                    "invalid value: {text} is outside 0..{}, an unsigned 64-bit integer",
                    u64::MAX
                ))),
            };
        }
        serde_json::from_str::<u64>(text)
            .map(SeqDe)
            .map_err(|e| de::Error::custom(strip_position(&e)))
    }
}

struct TagsDe<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl<'de> serde::Deserialize<'de> for TagsDe<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TagsDe<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of string tags")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((CowStr(k), CowStr(v))) = map.next_entry::<CowStr, CowStr>()? {
                    if out.len() == MAX_TAGS {
                        return Err(de::Error::custom(format!("at most {MAX_TAGS} tags")));
                    }
                    out.push((k, v));
                }
                Ok(TagsDe(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode_utf8;
    use crate::reading::{format_ts, DeviceId, MetricValue, PairsAsMap};
    use std::time::Duration;

    const NOW: i64 = 1_795_000_000_000; // 2026-11-17

    fn ctx() -> ParseContext<'static> {
        ParseContext {
            now_ms: NOW,
            max_future_skew: Duration::from_secs(300),
            max_age: Duration::from_secs(30 * 86400),
            max_readings: 10_000,
            bound_device: None,
            token_device: None,
        }
    }

    fn err(text: &str) -> ReadingError {
        parse_reading(text, &ctx()).unwrap_err()
    }

    #[test]
    fn numbers_read_back_as_given() {
        // Long mantissas that serde_json's fast float path rounds one ULP off.
        for text in [
            "8.469785299465608e+251",
            "6.5913101261897515e-133",
            "9.501363022599779e+17",
            "0.1",
            "-0.0",
            "5e-324",
        ] {
            let r = parse_reading(
                &format!(r#"{{"device_id": "f", "metrics": {{"x": {text}}}}}"#),
                &ctx(),
            )
            .unwrap();
            let want: f64 = text.parse().unwrap();
            match r.metrics[0].1 {
                MetricValue::Float(got) => assert_eq!(got.to_bits(), want.to_bits(), "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        let r = parse_reading(
            r#"{"device_id": "u", "metrics": {"max": 18446744073709551615, "min": -9223372036854775808}}"#,
            &ctx(),
        )
        .unwrap();
        assert_eq!(r.metrics[0].1, MetricValue::UInt(u64::MAX));
        assert_eq!(r.metrics[1].1, MetricValue::Int(i64::MIN));
    }

    #[test]
    fn parses_the_spec_example() {
        let r = parse_reading(
            r#"{"device_id": "greenhouse-7", "ts": "2026-11-17T12:00:00.123Z", "seq": 1042,
               "metrics": {"temperature": 21.5, "humidity": 40, "door_open": false},
               "tags": {"site": "north"}}"#,
            &ctx(),
        )
        .unwrap();
        assert_eq!(r.device_id.as_str(), "greenhouse-7");
        assert_eq!(r.seq, Some(1042));
        assert_eq!(format_ts(r.ts_ms), "2026-11-17T12:00:00.123Z");
        assert_eq!(
            r.metrics,
            vec![
                ("temperature".into(), MetricValue::Float(21.5)),
                ("humidity".into(), MetricValue::Int(40)),
                ("door_open".into(), MetricValue::Bool(false)),
            ]
        );
        assert_eq!(
            serde_json::to_string(&PairsAsMap(&r.metrics)).unwrap(),
            r#"{"temperature":21.5,"humidity":40,"door_open":false}"#
        );
    }

    #[test]
    fn absent_ts_is_receive_time_and_epoch_ms_is_accepted() {
        let r = parse_reading(r#"{"device_id":"a","metrics":{"x":1}}"#, &ctx()).unwrap();
        assert_eq!(r.ts_ms, NOW);
        let r = parse_reading(
            &format!(
                r#"{{"device_id":"a","ts":{},"metrics":{{"x":1}}}}"#,
                NOW - 5
            ),
            &ctx(),
        )
        .unwrap();
        assert_eq!(r.ts_ms, NOW - 5);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str, RejectReason)] = &[
            (
                r#"{"metrics":{"x":1}}"#,
                "device_id: required",
                RejectReason::InvalidDeviceId,
            ),
            (
                r#"{"device_id":"a/b","metrics":{"x":1}}"#,
                "device_id: '/' is not allowed",
                RejectReason::InvalidDeviceId,
            ),
            (
                r#"{"device_id":"a+b","metrics":{"x":1}}"#,
                "device_id: '+'",
                RejectReason::InvalidDeviceId,
            ),
            (
                r#"{"device_id":"a#b","metrics":{"x":1}}"#,
                "device_id: '#'",
                RejectReason::InvalidDeviceId,
            ),
            (
                r#"{"device_id":"a b","metrics":{"x":1}}"#,
                "device_id: ' '",
                RejectReason::InvalidDeviceId,
            ),
            (
                r#"{"device_id":"-ab","metrics":{"x":1}}"#,
                "device_id: must start",
                RejectReason::InvalidDeviceId,
            ),
            (
                r#"{"device_id":"","metrics":{"x":1}}"#,
                "device_id: must not be empty",
                RejectReason::InvalidDeviceId,
            ),
            (
                r#"{"device_id":7,"metrics":{"x":1}}"#,
                "device_id: invalid type",
                RejectReason::InvalidDeviceId,
            ),
            (
                r#"{"device_id":"a","ts":"yesterday","metrics":{"x":1}}"#,
                "ts: `yesterday` is not an RFC 3339",
                RejectReason::InvalidTs,
            ),
            (
                r#"{"device_id":"a","ts":1.5,"metrics":{"x":1}}"#,
                "ts: invalid type",
                RejectReason::InvalidTs,
            ),
            (
                r#"{"device_id":"a","seq":-1,"metrics":{"x":1}}"#,
                "seq: invalid value",
                RejectReason::InvalidSeq,
            ),
            (
                r#"{"device_id":"a","metrics":{"x":"warm"}}"#,
                "metrics.x: expected a finite number or a boolean",
                RejectReason::InvalidMetrics,
            ),
            (
                r#"{"device_id":"a","metrics":{"x":null}}"#,
                "metrics.x: expected a finite number or a boolean",
                RejectReason::InvalidMetrics,
            ),
            (
                r#"{"device_id":"a","metrics":{"x":1e400}}"#,
                "metrics.x: expected a finite number or a boolean",
                RejectReason::InvalidMetrics,
            ),
            (
                r#"{"device_id":"a","metrics":{"x":[[[[1]]]]}}"#,
                "metrics.x: expected a finite number or a boolean",
                RejectReason::InvalidMetrics,
            ),
            (
                r#"{"device_id":"a","metrics":{}}"#,
                "metrics: at least one metric",
                RejectReason::InvalidMetrics,
            ),
            (
                r#"{"device_id":"a"}"#,
                "metrics: required",
                RejectReason::InvalidMetrics,
            ),
            (
                r#"{"device_id":"a","metrics":[1]}"#,
                "metrics: invalid type",
                RejectReason::InvalidMetrics,
            ),
            (
                r#"{"device_id":"a","metrics":{"bad name":1}}"#,
                "metrics.bad name: ' ' is not allowed",
                RejectReason::InvalidMetrics,
            ),
            (
                r#"{"device_id":"a","metrics":{"x":1,"x":2}}"#,
                "metrics.x: given more than once",
                RejectReason::InvalidMetrics,
            ),
            (
                r#"{"device_id":"a","metrics":{"x":1},"tags":{"k":1}}"#,
                "tags: invalid type",
                RejectReason::InvalidTags,
            ),
            (
                r#"{"device_id":"a","metrics":{"x":1},"colour":"red"}"#,
                "colour: unknown field",
                RejectReason::UnknownField,
            ),
            (
                r#"{"device_id":"a","device_id":"a","metrics":{"x":1}}"#,
                "device_id: given more than once",
                RejectReason::Malformed,
            ),
            (
                r#"[1,2]"#,
                "expected a reading object",
                RejectReason::Malformed,
            ),
        ];
        for (text, want, kind) in cases {
            let e = err(text);
            assert!(
                e.to_string().starts_with(want),
                "{text}: got `{e}`, want `{want}…`"
            );
            assert_eq!(e.kind, *kind, "{text}");
        }
    }

    #[test]
    fn limits_on_counts_and_lengths() {
        let long = "d".repeat(129);
        let e = err(&format!(r#"{{"device_id":"{long}","metrics":{{"x":1}}}}"#));
        assert!(e.to_string().contains("at most 128"), "{e}");
        assert!(DeviceId::parse(&"d".repeat(128)).is_ok());

        let many: Vec<String> = (0..257).map(|i| format!(r#""m{i}":1"#)).collect();
        let e = err(&format!(
            r#"{{"device_id":"a","metrics":{{{}}}}}"#,
            many.join(",")
        ));
        assert!(e.to_string().starts_with("metrics: at most 256"), "{e}");
        let ok: Vec<String> = (0..256).map(|i| format!(r#""m{i}":1"#)).collect();
        assert!(parse_reading(
            &format!(r#"{{"device_id":"a","metrics":{{{}}}}}"#, ok.join(",")),
            &ctx()
        )
        .is_ok());

        let tags: Vec<String> = (0..17).map(|i| format!(r#""t{i}":"v""#)).collect();
        let e = err(&format!(
            r#"{{"device_id":"a","metrics":{{"x":1}},"tags":{{{}}}}}"#,
            tags.join(",")
        ));
        assert!(e.to_string().starts_with("tags:"), "{e}");
    }

    #[test]
    fn ts_window() {
        let year = 365 * 86400 * 1000;
        let e = err(&format!(
            r#"{{"device_id":"a","ts":{},"metrics":{{"x":1}}}}"#,
            NOW + year
        ));
        assert!(e.to_string().contains("in the future"), "{e}");
        let e = err(&format!(
            r#"{{"device_id":"a","ts":{},"metrics":{{"x":1}}}}"#,
            NOW - year
        ));
        assert!(e.to_string().contains("old"), "{e}");
    }

    #[test]
    fn bound_device_fills_in_and_must_agree() {
        let bound = DeviceId::parse("dev-1").unwrap();
        let c = ParseContext {
            bound_device: Some(&bound),
            token_device: None,
            ..ctx()
        };
        let r = parse_reading(r#"{"metrics":{"x":1}}"#, &c).unwrap();
        assert_eq!(r.device_id, bound);
        let e = parse_reading(r#"{"device_id":"dev-2","metrics":{"x":1}}"#, &c).unwrap_err();
        assert_eq!(e.kind, RejectReason::DeviceMismatch);
    }

    #[test]
    fn batches_keep_good_neighbours() {
        let b = parse_json_batch(
            r#"[{"device_id":"a","metrics":{"x":1}}, {"device_id":"a","metrics":{"x":"s"}}, 5]"#,
            &ctx(),
        )
        .unwrap();
        assert_eq!(b.readings.len(), 1);
        assert_eq!(
            b.rejected.iter().map(|r| r.index).collect::<Vec<_>>(),
            vec![1, 2]
        );

        let b = parse_ndjson_batch(
            "{\"device_id\":\"a\",\"metrics\":{\"x\":1}}\n\n{oops\n{\"device_id\":\"b\",\"metrics\":{\"x\":2}}\n",
            &ctx(),
        )
        .unwrap();
        assert_eq!(b.readings.len(), 2);
        assert_eq!(b.rejected[0].index, 1);
        assert!(
            b.rejected[0].error.to_string().starts_with("line 3:"),
            "{}",
            b.rejected[0].error
        );
    }

    #[test]
    fn one_leading_bom_is_ignored_and_any_other_stray_byte_is_named() {
        let one = r#"{"device_id":"a","metrics":{"x":1}}"#;
        let b = parse_json_batch(&format!("\u{feff}[{one},{one}]"), &ctx()).unwrap();
        assert_eq!(b.readings.len(), 2);
        let b = parse_json_batch(&format!("\u{feff}{one}"), &ctx()).unwrap();
        assert_eq!(b.readings.len(), 1);
        let b = parse_ndjson_batch(&format!("\u{feff}{one}\n{one}\n"), &ctx()).unwrap();
        assert_eq!((b.readings.len(), b.rejected.len()), (2, 0));

        let cases = [
            (
                format!("\u{feff}\u{feff}[{one}]"),
                "not valid JSON at line 1 column 1: unexpected byte 0xEF (a UTF-8 byte-order mark?); expected value",
            ),
            (
                format!("[{one},\n \u{feff}{one}]"),
                "not valid JSON at line 2 column 2: unexpected byte 0xEF (a UTF-8 byte-order mark?); expected value",
            ),
            (
                format!("[{one}\u{0}]"),
                "not valid JSON at line 1 column 37: unexpected byte 0x00 (a control character); expected `,` or `]`",
            ),
            (
                "[\u{e9}]".to_string(),
                "not valid JSON at line 1 column 2: unexpected byte 0xC3 (the first byte of '\u{e9}', U+00E9); expected value",
            ),
            // Printable ASCII is already plain in serde_json's message.
            (
                "[x]".to_string(),
                "not valid JSON at line 1 column 2: expected value",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(
                parse_json_batch(&text, &ctx()).unwrap_err(),
                BatchError::Malformed(want.into()),
                "{text:?}"
            );
        }

        let b = parse_ndjson_batch(&format!("{one}\n\u{feff}{one}\n"), &ctx()).unwrap();
        assert_eq!(b.readings.len(), 1);
        assert_eq!(
            b.rejected[0].error.to_string(),
            "line 2: unexpected byte 0xEF (a UTF-8 byte-order mark?) at column 1; expected value"
        );
        assert_eq!(
            decode_utf8(b"[1, \xFF]").unwrap_err(),
            BatchError::Malformed("not UTF-8: invalid byte 0xFF at offset 4".into())
        );
        assert_eq!(decode_utf8("\u{feff}[]".as_bytes()).unwrap(), "\u{feff}[]");
    }

    #[test]
    fn integers_outside_the_exact_range_are_refused_with_their_field() {
        let m = |v: &str| {
            parse_reading(
                &format!(r#"{{"device_id":"a","metrics":{{"v":{v}}}}}"#),
                &ctx(),
            )
        };
        assert_eq!(
            m("9223372036854775807").unwrap().metrics[0].1,
            MetricValue::Int(i64::MAX)
        );
        assert_eq!(
            m("9223372036854775808").unwrap().metrics[0].1,
            MetricValue::UInt(1 << 63)
        );
        assert_eq!(m("-0").unwrap().metrics[0].1, MetricValue::Float(-0.0));
        assert!(
            matches!(m("-0").unwrap().metrics[0].1, MetricValue::Float(f) if f.is_sign_negative())
        );
        // A float literal may be as large as it likes: it is a float.
        assert_eq!(
            m("18446744073709551616.0").unwrap().metrics[0].1,
            MetricValue::Float(18446744073709551616.0)
        );
        assert_eq!(m("1e19").unwrap().metrics[0].1, MetricValue::Float(1e19));
        for v in [
            "18446744073709551616",
            "-9223372036854775809",
            "100000000000000000000000",
        ] {
            let e = m(v).unwrap_err();
            assert_eq!(e.kind, RejectReason::InvalidMetrics);
            assert_eq!(
                e.to_string(),
                format!("metrics.v: integer {v} is outside -9223372036854775808..18446744073709551615, the range kept exactly")
            );
        }
        let s = |v: &str| {
            parse_reading(
                &format!(r#"{{"device_id":"a","seq":{v},"metrics":{{"x":1}}}}"#),
                &ctx(),
            )
        };
        assert_eq!(s("18446744073709551615").unwrap().seq, Some(u64::MAX));
        let e = s("18446744073709551616").unwrap_err();
        assert_eq!(e.kind, RejectReason::InvalidSeq);
        assert_eq!(
            e.to_string(),
            "seq: invalid value: 18446744073709551616 is outside 0..18446744073709551615, an unsigned 64-bit integer"
        );
        assert!(s("1.5")
            .unwrap_err()
            .to_string()
            .starts_with("seq: invalid type: floating point"));
        assert!(s("\"7\"")
            .unwrap_err()
            .to_string()
            .starts_with("seq: invalid type: string"));
        // In a batch, by index.
        let b = parse_json_batch(
            r#"[{"device_id":"a","metrics":{"x":1}},{"device_id":"a","metrics":{"x":-9223372036854775809}}]"#,
            &ctx(),
        )
        .unwrap();
        assert_eq!((b.readings.len(), b.rejected[0].index), (1, 1));
        assert!(b.rejected[0]
            .error
            .to_string()
            .starts_with("metrics.x: integer -9223372036854775809"));
    }

    #[test]
    fn the_one_pass_and_the_element_by_element_parse_agree() {
        let good = r#"{"device_id":"g-1","seq":7,"ts":1794999999000,"metrics":{"t":21.5,"n":-3,"u":18446744073709551615,"b":true},"tags":{"site":"nörth"}}"#;
        let escaped = " {\n \"device_id\" : \"g-2\", \"metrics\" : { \"\\u0074\" : -0.0 , \"s\" : 1 } ,\n \"tags\" : { \"q\" : \"a\\\"b\\u00e9\\n\" } } ";
        let invalid = [
            r#"{"device_id":"bad id","metrics":{"x":1}}"#, // validation: device id
            r#"{"device_id":"old","ts":1,"metrics":{"x":1}}"#, // validation: ts window
            r#"{"device_id":"none","metrics":{}}"#,        // validation: no metrics
        ];
        let undeserializable = [
            r#"{"device_id":"a","metrics":{"x":"s"}}"#,
            r#"{"device_id":"a","metrics":{"x":1},"extra":1}"#,
            r#"{"device_id":"a","metrics":{"x":1e999}}"#,
            r#"{"device_id":"a","seq":-1,"metrics":{"x":1}}"#,
            "5",
            "[]",
        ];
        // Both kinds of valid element are taken whole, escapes and all.
        let b = parse_array_one_pass(&format!("[{good},{escaped}]"), &ctx()).expect("one pass");
        assert_eq!((b.readings.len(), b.rejected.len()), (2, 0), "{b:?}");
        assert_eq!(b.readings[1].tags[0].1, "a\"bé\n");
        let c2 = ParseContext {
            max_readings: 2,
            ..ctx()
        };
        let mut below = crate::test_rng::xorshift(11);
        let mut bodies: Vec<(String, bool)> = vec![
            ("[]".into(), true),
            (" \n[ ]\t".into(), true),
            (format!("[{good}]"), true),
            (format!("[{good}, {}]", invalid[0]), true),
            (format!("[{good}] x"), false),
            (format!("[{good},]"), false),
            (format!("[{good}"), false),
        ];
        for _ in 0..300 {
            let n = below(6) as usize;
            let mut parts = Vec::new();
            let mut one_pass = true;
            for _ in 0..n {
                parts.push(match below(10) {
                    0..=2 => good.to_string(),
                    3..=5 => escaped.to_string(),
                    6..=7 => invalid[below(3) as usize].to_string(),
                    _ => {
                        one_pass = false;
                        undeserializable[below(6) as usize].to_string()
                    }
                });
            }
            bodies.push((format!("[{}]", parts.join(",")), one_pass));
        }
        let mut taken = 0;
        for (body, one_pass) in &bodies {
            for c in [ctx(), c2.clone()] {
                let first = body.bytes().find(|b| !b.is_ascii_whitespace());
                let fast = parse_array_one_pass(body, &c);
                let fits = body.matches("device_id").count() <= c.max_readings;
                assert_eq!(fast.is_some(), *one_pass && fits, "{body}");
                taken += usize::from(fast.is_some());
                assert_eq!(
                    format!("{:?}", parse_json_batch(body, &c)),
                    format!("{:?}", parse_json_batch_by_element(body, first, &c)),
                    "{body}"
                );
            }
        }
        assert!(taken > 100, "the one pass took only {taken} bodies");
    }

    #[test]
    fn batch_level_errors() {
        assert!(matches!(
            parse_json_batch("not json", &ctx()),
            Err(BatchError::Malformed(_))
        ));
        assert!(matches!(
            parse_json_batch("[{\"device_id\":", &ctx()),
            Err(BatchError::Malformed(_))
        ));
        assert!(matches!(
            parse_json_batch("42", &ctx()),
            Err(BatchError::Malformed(_))
        ));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let b = parse_json_batch(&deep, &ctx()).unwrap();
        assert_eq!(b.rejected.len(), 1);
        let deep_obj = format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
        let r = parse_json_batch(&deep_obj, &ctx());
        assert!(matches!(&r, Ok(b) if b.rejected.len() == 1), "{r:?}");
        let c = ParseContext {
            max_readings: 2,
            ..ctx()
        };
        assert_eq!(
            parse_json_batch("[{},{},{}]", &c).unwrap_err(),
            BatchError::TooMany { count: 3, limit: 2 }
        );
    }
}
