//! InfluxDB line protocol (SPEC §10): `POST /write` and `POST /api/v2/write` bodies → readings.
//!
//! ```text
//! measurement[,tag=value…] field=value[,field=value…] [timestamp]
//! ```
//!
//! As InfluxDB documents it ("Line protocol", InfluxDB v2 reference):
//! - a backslash escapes a comma or a space in the measurement; a comma, `=` or a space in tag
//!   keys, tag values and field keys; `"` and `\` in string field values. Before any other
//!   character a backslash is itself;
//! - field values: a float (`1`, `-1.5`, `2e3`), an integer `1i`, an unsigned integer `1u`, a
//!   string `"…"`, or a boolean (`t`, `T`, `true`, `True`, `TRUE`, `f`, `F`, `false`, `False`,
//!   `FALSE`);
//! - an optional integer timestamp in the request's precision (default nanoseconds);
//! - blank lines and lines starting with `#` are skipped.
//!
//! Each line is one reading. Its device is the tag named by `formats.line_protocol.device_tag`
//! (default `device_id`), else the tag `host`; other tags stay tags. Field `f` of measurement
//! `m` is the metric `m.f`, except an integer field `seq`, which is the reading's seq. String
//! fields are ignored and counted; a line with only string fields is rejected. Timestamps are
//! kept to the millisecond (floor).
//!
//! Errors name the line (1-based, counting every line of the body) and the field.

use std::borrow::Cow;

use crate::reading::{
    BatchError, MetricValue, ParseContext, ParsedBatch, ReadingError, ReadingParts, RejectReason,
    Rejection,
};

/// The unit of line timestamps: the `precision` query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Nanoseconds (the default).
    Ns,
    /// Microseconds.
    Us,
    /// Milliseconds.
    Ms,
    /// Seconds.
    S,
    /// Minutes (v1 only).
    M,
    /// Hours (v1 only).
    H,
}

impl Precision {
    /// The query parameter's value for this precision (`ns`, `us`, `ms`, `s`, `m`, `h`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ns => "ns",
            Self::Us => "us",
            Self::Ms => "ms",
            Self::S => "s",
            Self::M => "m",
            Self::H => "h",
        }
    }

    /// The v2 API's values: `ns`, `us`, `ms`, `s`.
    pub fn parse_v2(s: &str) -> Option<Self> {
        match s {
            "ns" => Some(Self::Ns),
            "us" => Some(Self::Us),
            "ms" => Some(Self::Ms),
            "s" => Some(Self::S),
            _ => None,
        }
    }

    /// The v1 API's values: `n`, `u`, `ms`, `s`, `m`, `h` (and `ns`, `us`, which its clients
    /// also send).
    pub fn parse_v1(s: &str) -> Option<Self> {
        match s {
            "n" | "ns" => Some(Self::Ns),
            "u" | "us" => Some(Self::Us),
            "ms" => Some(Self::Ms),
            "s" => Some(Self::S),
            "m" => Some(Self::M),
            "h" => Some(Self::H),
            _ => None,
        }
    }

    /// `ts` in this unit as epoch milliseconds (rounded down); `None` past i64 milliseconds.
    pub fn to_ms(self, ts: i64) -> Option<i64> {
        match self {
            Self::Ns => Some(ts.div_euclid(1_000_000)),
            Self::Us => Some(ts.div_euclid(1_000)),
            Self::Ms => Some(ts),
            Self::S => ts.checked_mul(1_000),
            Self::M => ts.checked_mul(60_000),
            Self::H => ts.checked_mul(3_600_000),
        }
    }
}

/// How to read a body.
#[derive(Debug, Clone, Copy)]
pub struct LineOptions<'a> {
    /// The tag whose value is the device id (`formats.line_protocol.device_tag`).
    pub device_tag: &'a str,
    /// The unit of timestamps.
    pub precision: Precision,
}

/// A parsed body.
#[derive(Debug, Default)]
pub struct LineBatch {
    /// Readings and rejections; a rejection's `index` is its line number − 1.
    pub batch: ParsedBatch,
    /// String fields beside numeric ones, ignored.
    pub ignored_fields: usize,
}

impl LineBatch {
    /// The first bad line: its number (1-based) and what is wrong with it.
    pub fn first_error(&self) -> Option<(usize, String)> {
        self.batch
            .rejected
            .first()
            .map(|r| (r.index + 1, r.error.to_string()))
    }
}

/// Parses a body. Fails as a whole only when it has more lines than
/// `limits.max_readings_per_request`.
pub fn parse(
    text: &str,
    opts: &LineOptions<'_>,
    ctx: &ParseContext<'_>,
) -> Result<LineBatch, BatchError> {
    let text = super::strip_bom(text);
    let count = lines(text).count();
    if count > ctx.max_readings {
        return Err(BatchError::TooMany {
            count,
            limit: ctx.max_readings,
        });
    }
    let mut out = LineBatch::default();
    for (index, line) in lines(text) {
        match parse_line(line, opts, ctx, &mut out.ignored_fields) {
            Ok(r) => out.batch.readings.push(r),
            Err(error) => out.batch.rejected.push(Rejection { index, error }),
        }
    }
    Ok(out)
}

/// The body's lines that hold a point: (0-based line number, text without `\r`).
fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split('\n').enumerate().filter_map(|(i, l)| {
        let l = l.strip_suffix('\r').unwrap_or(l);
        let t = l.trim_start_matches([' ', '\t']);
        (!t.is_empty() && !t.starts_with('#')).then_some((i, t))
    })
}

fn syntax(reason: impl Into<String>) -> ReadingError {
    ReadingError::new("", reason, RejectReason::Malformed)
}

/// Reads up to the first unescaped byte of `stops`, unescaping a backslash before a byte of
/// `escapable`. Returns the text and the position of the stop (or the end).
fn token<'a>(s: &'a str, from: usize, stops: &[u8], escapable: &[u8]) -> (Cow<'a, str>, usize) {
    let b = s.as_bytes();
    let mut i = from;
    let mut owned: Option<String> = None;
    let mut run = from; // start of the bytes not yet copied into `owned`
    while i < b.len() {
        let c = b[i];
        if c == b'\\' && i + 1 < b.len() && escapable.contains(&b[i + 1]) {
            let o = owned.get_or_insert_with(String::new);
            o.push_str(&s[run..i]);
            o.push(b[i + 1] as char);
            i += 2;
            run = i;
            continue;
        }
        if stops.contains(&c) {
            break;
        }
        i += 1;
    }
    let text = match owned {
        None => Cow::Borrowed(&s[from..i]),
        Some(mut o) => {
            o.push_str(&s[run..i]);
            Cow::Owned(o)
        }
    };
    (text, i)
}

/// One field value.
enum Field {
    /// A number or a boolean.
    Value(MetricValue),
    /// A string (ignored).
    Text,
}

fn parse_line<'a>(
    line: &'a str,
    opts: &LineOptions<'_>,
    ctx: &ParseContext<'_>,
    ignored: &mut usize,
) -> Result<crate::reading::Reading, ReadingError> {
    let b = line.as_bytes();
    let (measurement, mut i) = token(line, 0, b", ", b", ");
    if measurement.is_empty() {
        return Err(syntax("missing measurement"));
    }
    // Tags.
    let mut tags: Vec<(Cow<'a, str>, Cow<'a, str>)> = Vec::new();
    while i < b.len() && b[i] == b',' {
        let (key, at) = token(line, i + 1, b"=, ", b",= ");
        if at >= b.len() || b[at] != b'=' {
            return Err(syntax(format!("tag `{key}` has no `=value`")));
        }
        let (value, at) = token(line, at + 1, b", ", b",= ");
        if key.is_empty() || value.is_empty() {
            return Err(syntax("a tag needs a key and a value"));
        }
        tags.push((key, value));
        i = at;
    }
    if i >= b.len() || b[i] != b' ' {
        return Err(syntax(
            "missing field set (a space, then field=value after the measurement and tags)",
        ));
    }
    while i < b.len() && b[i] == b' ' {
        i += 1;
    }
    // Fields.
    let mut fields: Vec<(Cow<'a, str>, Field)> = Vec::new();
    loop {
        let (key, at) = token(line, i, b"= ,", b",= ");
        if key.is_empty() || at >= b.len() || b[at] != b'=' {
            return Err(syntax(if fields.is_empty() {
                "missing field set (field=value)".to_string()
            } else {
                format!("field `{key}` has no `=value`")
            }));
        }
        let (value, at) = field_value(line, at + 1, &key)?;
        fields.push((key, value));
        i = at;
        if i < b.len() && b[i] == b',' {
            i += 1;
            continue;
        }
        break;
    }
    // Timestamp.
    let mut ts_ms = None;
    if i < b.len() {
        if b[i] != b' ' {
            return Err(syntax(format!(
                "unexpected `{}` after the field set (a space in a field value must be escaped)",
                line[i..].chars().next().unwrap_or(' ')
            )));
        }
        let rest = line[i..].trim_matches([' ', '\t']);
        if !rest.is_empty() {
            let ts: i64 = rest.parse().map_err(|_| {
                ReadingError::new(
                    "timestamp",
                    format!("`{rest}` is not an integer timestamp (an unescaped space earlier on the line?)"),
                    RejectReason::InvalidTs,
                )
            })?;
            ts_ms = Some(opts.precision.to_ms(ts).ok_or_else(|| {
                ReadingError::new(
                    "timestamp",
                    format!(
                        "{ts} is out of range for precision {}",
                        opts.precision.as_str()
                    ),
                    RejectReason::InvalidTs,
                )
            })?);
        }
    }

    // Device and tags.
    let device_at = tags
        .iter()
        .position(|(k, _)| k == opts.device_tag)
        .or_else(|| tags.iter().position(|(k, _)| k == "host"));
    let device_tag = device_at.map(|at| tags[at].0.clone());
    let device_id = device_at.map(|at| tags.remove(at).1);
    if device_id.is_none() && ctx.default_device().is_none() {
        return Err(ReadingError::new(
            format!("tags.{}", opts.device_tag),
            "required: the device id (or a `host` tag)",
            RejectReason::InvalidDeviceId,
        ));
    }
    // Metrics and seq.
    let mut seq = None;
    let mut metrics = Vec::with_capacity(fields.len());
    let mut strings = 0;
    for (key, value) in fields {
        match value {
            Field::Text => strings += 1,
            Field::Value(v) if key == "seq" => match v {
                MetricValue::UInt(u) => seq = Some(u),
                MetricValue::Int(n) if n >= 0 => seq = Some(n as u64),
                MetricValue::Int(n) => {
                    return Err(ReadingError::new(
                        "fields.seq",
                        format!("{n} is negative; seq is an unsigned integer"),
                        RejectReason::InvalidSeq,
                    ))
                }
                other => metrics.push((Cow::Owned(format!("{measurement}.{key}")), other)),
            },
            Field::Value(v) => metrics.push((Cow::Owned(format!("{measurement}.{key}")), v)),
        }
    }
    if metrics.is_empty() && seq.is_none() && strings > 0 {
        return Err(ReadingError::new(
            "fields",
            "only string fields: Sluice stores numbers and booleans",
            RejectReason::InvalidMetrics,
        ));
    }
    *ignored += strings;
    ReadingParts {
        device_id,
        ts_ms,
        seq,
        metrics,
        tags,
    }
    .validate(ctx)
    .map_err(|mut e| {
        // The model names JSON's fields; name the line's own parts instead: the tag the device
        // id came from, and the timestamp.
        match (&device_tag, e.field.as_str()) {
            (Some(tag), "device_id") => e.field = format!("tags.{tag}"),
            (_, "ts") => e.field = "timestamp".into(),
            _ => {}
        }
        e
    })
}

/// A field value starting at `from`: returns it and the position after it.
fn field_value(line: &str, from: usize, key: &str) -> Result<(Field, usize), ReadingError> {
    let b = line.as_bytes();
    let bad = |reason: String| {
        ReadingError::new(
            format!("fields.{key}"),
            reason,
            RejectReason::InvalidMetrics,
        )
    };
    if from < b.len() && b[from] == b'"' {
        // A string: up to the next unescaped quote.
        let mut i = from + 1;
        while i < b.len() {
            match b[i] {
                b'\\' if i + 1 < b.len() && matches!(b[i + 1], b'"' | b'\\') => i += 2,
                b'"' => return Ok((Field::Text, i + 1)),
                _ => i += 1,
            }
        }
        return Err(syntax(format!("field `{key}`: unterminated string")));
    }
    let end = line[from..].find([',', ' ']).map_or(b.len(), |n| from + n);
    let raw = &line[from..end];
    if raw.is_empty() {
        return Err(bad("missing value".into()));
    }
    let value = if let Some(n) = raw.strip_suffix('i') {
        MetricValue::Int(
            n.parse()
                .map_err(|_| bad(format!("`{raw}` is not an integer (a float takes no `i`)")))?,
        )
    } else if let Some(n) = raw.strip_suffix('u') {
        let u: u64 = n.parse().map_err(|_| {
            bad(format!(
                "`{raw}` is not an unsigned integer (0 to 18446744073709551615)"
            ))
        })?;
        // The JSON parser's canonical form: an integer is `Int` unless only `UInt` holds it,
        // so the same number is the same reading whichever format brought it.
        i64::try_from(u).map_or(MetricValue::UInt(u), MetricValue::Int)
    } else {
        match raw {
            "t" | "T" | "true" | "True" | "TRUE" => MetricValue::Bool(true),
            "f" | "F" | "false" | "False" | "FALSE" => MetricValue::Bool(false),
            _ => {
                let f: f64 = raw
                    .parse()
                    .ok()
                    .filter(|f: &f64| f.is_finite())
                    .filter(|_| {
                        raw.bytes()
                            .all(|c| c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'+' | b'e' | b'E'))
                    })
                    .ok_or_else(|| {
                        bad(format!(
                            "`{raw}` is not a number, an `i`/`u` integer, a boolean or a quoted string"
                        ))
                    })?;
                MetricValue::Float(f)
            }
        }
    };
    Ok((Field::Value(value), end))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::reading::DeviceId;

    const NOW: i64 = 1_790_000_000_000;

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

    fn opts(precision: Precision) -> LineOptions<'static> {
        LineOptions {
            device_tag: "device_id",
            precision,
        }
    }

    fn one(line: &str) -> Result<crate::reading::Reading, ReadingError> {
        let b = parse(line, &opts(Precision::Ms), &ctx()).unwrap();
        match (
            b.batch.readings.into_iter().next(),
            b.batch.rejected.into_iter().next(),
        ) {
            (Some(r), None) => Ok(r),
            (None, Some(e)) => Err(e.error),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_field_type_tags_and_escapes() {
        let ts = NOW - 1000;
        let r = one(&format!(
            "env,device_id=gh-1,site=north\\,east,zone=b\\ c\\=d t=21.5,n=-3i,u=18446744073709551615u,ok=T,on=false,note=\"a \\\"q\\\" \\\\ z\",seq=7u {ts}"
        ))
        .unwrap();
        assert_eq!(r.device_id.as_str(), "gh-1");
        assert_eq!(r.ts_ms, ts);
        assert_eq!(r.seq, Some(7));
        assert_eq!(
            r.metrics,
            vec![
                ("env.t".to_string(), MetricValue::Float(21.5)),
                ("env.n".to_string(), MetricValue::Int(-3)),
                ("env.u".to_string(), MetricValue::UInt(u64::MAX)),
                ("env.ok".to_string(), MetricValue::Bool(true)),
                ("env.on".to_string(), MetricValue::Bool(false)),
            ]
        );
        assert_eq!(
            r.tags,
            vec![
                ("site".to_string(), "north,east".to_string()),
                ("zone".to_string(), "b c=d".to_string())
            ]
        );
        // A measurement with an escaped space makes a metric name Sluice does not accept.
        let e = one(&format!("env\\ room,device_id=d t=1 {ts}")).unwrap_err();
        assert_eq!(e.kind, RejectReason::InvalidMetrics, "{e}");
        assert!(e.to_string().contains("env room.t"), "{e}");
    }

    #[test]
    fn metric_names_join_measurement_and_field() {
        let r = one(&format!(
            "cpu,host=web-1 usage_idle=99.5,usage_user=0.5 {}",
            NOW
        ))
        .unwrap();
        assert_eq!(r.device_id, DeviceId::parse("web-1").unwrap());
        assert_eq!(r.metrics[0].0, "cpu.usage_idle");
        assert_eq!(
            r.metrics[1],
            ("cpu.usage_user".into(), MetricValue::Float(0.5))
        );
        assert!(r.tags.is_empty());
        // Without a timestamp: the receive time.
        assert_eq!(one("m,device_id=d v=1").unwrap().ts_ms, NOW);
    }

    #[test]
    fn precisions() {
        let p = |prec, ts: i64| {
            parse(&format!("m,device_id=d v=1 {ts}"), &opts(prec), &ctx())
                .unwrap()
                .batch
                .readings[0]
                .ts_ms
        };
        assert_eq!(p(Precision::Ns, NOW * 1_000_000 + 999_999), NOW);
        assert_eq!(p(Precision::Us, NOW * 1_000 + 999), NOW);
        assert_eq!(p(Precision::S, NOW / 1000), NOW);
        assert_eq!(p(Precision::M, NOW / 60_000), NOW / 60_000 * 60_000);
        assert_eq!(Precision::parse_v1("n"), Some(Precision::Ns));
        assert_eq!(Precision::parse_v2("m"), None);
        assert_eq!(Precision::parse_v1("x"), None);
    }

    #[test]
    fn bad_lines_are_named_and_neighbours_kept() {
        let body = format!(
            "# a comment\n\
             m,device_id=ok v=1 {NOW}\n\
             m,device_id=a b v=1 {NOW}\n\
             m,device_id=nofields\n\
             m,device_id=c v=1.5i {NOW}\n\
             m,device_id=c v=-1u {NOW}\n\
             m,device_id=c v=1 {}\n\
             m,device_id=c s=\"only\" {NOW}\n\
             m v=1 {NOW}\n\
             \n\
             m,device_id=ok2 v=2,s=\"x\" {NOW}\r\n",
            NOW + 3_600_000
        );
        let b = parse(&body, &opts(Precision::Ms), &ctx()).unwrap();
        let ids: Vec<&str> = b
            .batch
            .readings
            .iter()
            .map(|r| r.device_id.as_str())
            .collect();
        assert_eq!(ids, ["ok", "ok2"]);
        assert_eq!(b.ignored_fields, 1);
        let errs: Vec<(usize, RejectReason, String)> = b
            .batch
            .rejected
            .iter()
            .map(|r| (r.index + 1, r.error.kind, r.error.to_string()))
            .collect();
        assert_eq!(errs.len(), 7, "{errs:?}");
        assert_eq!(b.first_error().unwrap().0, 3);
        assert_eq!(errs[0].1, RejectReason::Malformed, "{errs:?}"); // `a b v=1`: unescaped space
        assert!(errs[1].2.contains("missing field set"), "{errs:?}");
        assert!(
            errs[2].2.contains("fields.v") && errs[2].2.contains("`i`"),
            "{errs:?}"
        );
        assert!(errs[3].2.contains("unsigned"), "{errs:?}");
        assert_eq!(errs[4].1, RejectReason::InvalidTs);
        assert!(errs[4].2.contains("in the future"), "{errs:?}");
        assert!(errs[5].2.contains("only string fields"), "{errs:?}");
        assert_eq!(errs[6].1, RejectReason::InvalidDeviceId);
    }

    /// A bad device id names the tag it came from, `host` included, not the JSON field.
    #[test]
    fn a_bad_device_id_names_its_tag() {
        let e = one(&format!("cpu,host=bad/id usage=1 {NOW}")).unwrap_err();
        assert_eq!(e.kind, RejectReason::InvalidDeviceId, "{e}");
        assert_eq!(e.field, "tags.host", "{e}");
        let e = one(&format!("cpu,device_id=bad/id usage=1 {NOW}")).unwrap_err();
        assert_eq!(e.field, "tags.device_id", "{e}");
        // Errors on other fields keep their names.
        let e = one(&format!("cpu,host=ok usage=1 {}", NOW + 3_600_000)).unwrap_err();
        assert_eq!(e.field, "timestamp", "{e}");
    }

    /// Found by `cargo fuzz run line_protocol`: `235u` was kept as `UInt(235)`, which the
    /// JSON parser reads as `Int(235)`.
    #[test]
    fn unsigned_values_take_the_json_parsers_canonical_form() {
        let r = one("m,device_id=d z=235u,big=18446744073709551615u").unwrap();
        assert_eq!(r.metrics[0].1, MetricValue::Int(235));
        assert_eq!(r.metrics[1].1, MetricValue::UInt(u64::MAX));
    }

    #[test]
    fn too_many_lines_fail_the_body() {
        let mut c = ctx();
        c.max_readings = 2;
        let body = "m,device_id=a v=1\nm,device_id=a v=2\n# c\nm,device_id=a v=3\n";
        assert!(matches!(
            parse(body, &opts(Precision::Ns), &c),
            Err(BatchError::TooMany { count: 3, limit: 2 })
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        for s in [
            "",
            "\\",
            "m\\",
            "m,",
            "m,=",
            "m,a=",
            "m a",
            "m a=",
            "m a=\"",
            "m a=\"\\",
            "m a=1 ",
            "m a=1 x",
            ",",
            " ",
            "m,a=b a=1,",
            "m,a=b a=1,,b=2",
            "é,device_id=d ü=1",
        ] {
            let _ = parse(s, &opts(Precision::Ns), &ctx());
        }
    }
}
