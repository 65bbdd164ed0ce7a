//! `--format line`: InfluxDB line protocol, posted to `/api/v2/write?…&precision=ms`.
//!
//! One line per reading, the `seq` as an integer field and the time in milliseconds:
//!
//! ```text
//! m,device_id=dev-1 temperature=21.37,humidity=40.2,battery=88.12,door_open=false,seq=42i 1795000000123
//! ```
//!
//! Sluice takes the device from the `device_id` tag, the integer field `seq` as the reading's
//! `seq`, and stores field `f` of measurement `m` as the metric `m.f` (SPEC §10). Numbers are
//! floats (the shortest text that reads back exactly), booleans `true`/`false`. Tag values and
//! field keys are escaped as InfluxDB documents (a backslash before `,`, `=` and space;
//! measurements: before `,` and space), although device ids and metric names never need it.

use super::LINE_MEASUREMENT;
use crate::fleet::Reading;

/// Appends `s` with a backslash before each byte of `special`.
fn escaped(s: &str, special: &[u8], out: &mut Vec<u8>) {
    if !s.bytes().any(|b| special.contains(&b)) {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    for b in s.bytes() {
        if special.contains(&b) {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// A measurement name.
pub fn measurement(s: &str, out: &mut Vec<u8>) {
    escaped(s, b", ", out);
}

/// A tag key, tag value or field key.
pub fn key(s: &str, out: &mut Vec<u8>) {
    escaped(s, b",= ", out);
}

/// Appends one reading as a line (no newline).
pub fn write(r: &Reading<'_>, out: &mut Vec<u8>) {
    measurement(LINE_MEASUREMENT, out);
    out.extend_from_slice(b",device_id=");
    key(r.device_id, out);
    out.push(b' ');
    let mut fb = ryu::Buffer::new();
    for (name, value) in r.metrics() {
        key(name, out);
        out.push(b'=');
        super::json::value_text(value, &mut fb, out);
        out.push(b',');
    }
    let mut ib = itoa::Buffer::new();
    out.extend_from_slice(b"seq=");
    out.extend_from_slice(ib.format(r.seq).as_bytes());
    out.extend_from_slice(b"i ");
    out.extend_from_slice(ib.format(r.ts_ms).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{FleetProfile, FleetSpec, Next};

    /// Splits at unescaped `sep`, as a line-protocol reader does, and unescapes.
    fn split(s: &str, sep: char) -> Vec<String> {
        let mut parts = vec![String::new()];
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        parts.last_mut().unwrap().push(n);
                    }
                }
                c if c == sep => parts.push(String::new()),
                c => parts.last_mut().unwrap().push(c),
            }
        }
        parts
    }

    #[test]
    fn escaping_of_keys_tags_and_measurements() {
        let mut out = Vec::new();
        key("a b,c=d", &mut out);
        assert_eq!(out, br"a\ b\,c\=d");
        let mut out = Vec::new();
        measurement("cpu load,x=1", &mut out);
        assert_eq!(out, br"cpu\ load\,x=1");
        let mut out = Vec::new();
        key("plain-id:7", &mut out);
        assert_eq!(out, b"plain-id:7");
        // Read back by the reader's rules: the same text.
        let mut out = Vec::new();
        key("x=1, y", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(split(&text, ' '), ["x=1, y"]);
        assert_eq!(split(&text, ','), ["x=1, y"]);
    }

    #[test]
    fn a_line_has_the_device_tag_every_field_and_the_seq() {
        let mut dev = FleetSpec {
            prefix: "lp".into(),
            devices: 1,
            profile: FleetProfile::Sensor,
            metrics: 5,
            seed: 2,
            seq_start: 7,
            bad_ratio: 0.0,
            distinct_ts: false,
        }
        .build()
        .remove(0);
        let (_, next) = dev.next(1_795_000_000_123);
        let Next::Reading(r) = next else { panic!() };
        let mut out = Vec::new();
        write(&r, &mut out);
        let line = String::from_utf8(out).unwrap();
        let parts = split(&line, ' ');
        assert_eq!(parts.len(), 3, "{line}");
        assert_eq!(parts[0], "m,device_id=lp-0");
        assert_eq!(parts[2], "1795000000123");
        let fields: Vec<(String, String)> = parts[1]
            .split(',')
            .map(|f| {
                let (k, v) = f.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "temperature",
                "humidity",
                "battery",
                "door_open",
                "aux_1",
                "seq"
            ]
        );
        assert_eq!(fields[5].1, "7i");
        assert!(fields[3].1 == "true" || fields[3].1 == "false");
        for (k, v) in &fields[..3] {
            let x: f64 = v.parse().unwrap_or_else(|_| panic!("{k}={v}"));
            assert!(x.is_finite() && !v.ends_with('i'), "{k}={v}: a float");
        }
    }

    /// Sluice's own line-protocol parser takes the line: device, seq, `m.<field>` metrics.
    #[test]
    fn sluice_parses_the_lines() {
        use sluice::codec::line_protocol::{parse, LineOptions, Precision};
        let mut devs = FleetSpec {
            prefix: "lp".into(),
            devices: 5,
            profile: FleetProfile::Mixed,
            metrics: 4,
            seed: 2,
            seq_start: 1,
            bad_ratio: 0.0,
            distinct_ts: false,
        }
        .build();
        let now = 1_795_000_000_000;
        let mut enc = crate::encode::Encoder::new(crate::encode::Format::Line, true, true, 5, 4);
        for d in &mut devs {
            enc.push(d, now);
        }
        let body = enc.finish().bytes;
        let ctx = sluice::reading::ParseContext {
            now_ms: now,
            max_future_skew: std::time::Duration::from_secs(300),
            max_age: std::time::Duration::from_secs(30 * 86_400),
            max_readings: 10_000,
            bound_device: None,
            token_device: None,
        };
        let opts = LineOptions {
            device_tag: "device_id",
            precision: Precision::Ms,
        };
        let parsed = parse(std::str::from_utf8(&body).unwrap(), &opts, &ctx).unwrap();
        assert!(
            parsed.batch.rejected.is_empty(),
            "{:?}",
            parsed.batch.rejected
        );
        assert_eq!(parsed.batch.readings.len(), 5);
        for (n, r) in parsed.batch.readings.iter().enumerate() {
            assert_eq!(r.device_id.as_str(), format!("lp-{n}"));
            assert_eq!((r.seq, r.ts_ms), (Some(1), now));
            let names: Vec<&str> = r.metrics.iter().map(|(k, _)| k.as_str()).collect();
            let want: Vec<String> = crate::fleet::metric_names(FleetProfile::Mixed, n as u32, 4)
                .iter()
                .map(|m| format!("m.{m}"))
                .collect();
            assert_eq!(names, want);
        }
    }
}
