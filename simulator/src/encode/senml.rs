//! `--format senml-json|senml-cbor`: readings as SenML records (RFC 8428).
//!
//! Each reading is `1 + metrics` records. The first sets the base name to `<device_id>/` and
//! the base time to the reading's time, in epoch seconds with milliseconds (an absolute time:
//! RFC 8428 §4.5.3 reads values under 2^28 as relative), and carries the `seq`:
//!
//! ```json
//! [{"bn":"dev-1/","bt":1795000000.123,"n":"seq","v":42},
//!  {"n":"temperature","v":21.37},{"n":"door_open","vb":false}, …]
//! ```
//!
//! So every record resolves to `dev-1/<metric>` at that time: Sluice splits the name at its
//! last `/` into the device and the metric, and groups the records of one device and time into
//! one reading (SPEC §10). The `seq` record, a resolved name ending in `/seq` with an integer
//! `v`, is Sluice's documented extension: it becomes the reading's `seq`, not a metric. Because
//! records of one device and time are one reading, the fleet keeps each device's readings at
//! least 1 ms apart with these formats ([`crate::fleet::FleetSpec::distinct_ts`]).
//!
//! SenML-CBOR uses the integer labels of RFC 8428 §6: `bn` −2, `bt` −3, `n` 0, `v` 2, `vb` 4.

use super::cbor;
use crate::fleet::{Reading, Value};

/// The name of the record that carries the reading's `seq`.
pub const SEQ_NAME: &str = "seq";

/// RFC 8428 §6 labels.
pub mod label {
    /// Base name.
    pub const BN: i64 = -2;
    /// Base time.
    pub const BT: i64 = -3;
    /// Name.
    pub const N: i64 = 0;
    /// Numeric value.
    pub const V: i64 = 2;
    /// Boolean value.
    pub const VB: i64 = 4;
}

/// Records a reading takes.
pub fn records(r: &Reading<'_>) -> usize {
    1 + r.metric_count()
}

/// The base time: epoch seconds as a float (milliseconds in the fraction).
pub fn base_time(ts_ms: i64) -> f64 {
    ts_ms as f64 / 1000.0
}

/// Appends the records of `r`, comma-separated, without the enclosing brackets.
pub fn write_json(r: &Reading<'_>, out: &mut Vec<u8>) {
    let mut ib = itoa::Buffer::new();
    out.extend_from_slice(b"{\"bn\":\"");
    out.extend_from_slice(r.device_id.as_bytes());
    out.extend_from_slice(b"/\",\"bt\":");
    if r.ts_ms >= 0 {
        // Exact decimal seconds: `1795000000.123`.
        out.extend_from_slice(ib.format(r.ts_ms / 1000).as_bytes());
        let ms = (r.ts_ms % 1000) as u16;
        out.extend_from_slice(&[
            b'.',
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
        ]);
    } else {
        out.extend_from_slice(ryu::Buffer::new().format(base_time(r.ts_ms)).as_bytes());
    }
    out.extend_from_slice(b",\"n\":\"");
    out.extend_from_slice(SEQ_NAME.as_bytes());
    out.extend_from_slice(b"\",\"v\":");
    out.extend_from_slice(ib.format(r.seq).as_bytes());
    out.push(b'}');
    let mut fb = ryu::Buffer::new();
    for (name, value) in r.metrics() {
        out.extend_from_slice(b",{\"n\":\"");
        out.extend_from_slice(name.as_bytes());
        match value {
            Value::Num(x) => {
                out.extend_from_slice(b"\",\"v\":");
                out.extend_from_slice(fb.format_finite(x).as_bytes());
            }
            Value::Bool(b) => {
                out.extend_from_slice(b"\",\"vb\":");
                out.extend_from_slice(if b { b"true" } else { b"false" });
            }
        }
        out.push(b'}');
    }
}

/// Appends the records of `r` as CBOR maps (the caller writes the array head).
pub fn write_cbor(r: &Reading<'_>, out: &mut Vec<u8>) {
    cbor::map(out, 4);
    cbor::int(out, label::BN);
    let mut bn = String::with_capacity(r.device_id.len() + 1);
    bn.push_str(r.device_id);
    bn.push('/');
    cbor::text(out, &bn);
    cbor::int(out, label::BT);
    cbor::float(out, base_time(r.ts_ms));
    cbor::int(out, label::N);
    cbor::text(out, SEQ_NAME);
    cbor::int(out, label::V);
    cbor::uint(out, r.seq);
    for (name, value) in r.metrics() {
        cbor::map(out, 2);
        cbor::int(out, label::N);
        cbor::text(out, name);
        match value {
            Value::Num(x) => {
                cbor::int(out, label::V);
                cbor::float(out, x);
            }
            Value::Bool(b) => {
                cbor::int(out, label::VB);
                cbor::boolean(out, b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::encode::{Encoder, Format};
    use crate::fleet::{Device, FleetProfile, FleetSpec};

    fn fleet(n: u32) -> Vec<Device> {
        FleetSpec {
            prefix: "sm".into(),
            devices: n,
            profile: FleetProfile::Sensor,
            metrics: 4,
            seed: 9,
            seq_start: 1,
            bad_ratio: 0.0,
            distinct_ts: true,
        }
        .build()
    }

    /// One resolved SenML record: (name, time in s, value as JSON).
    type Resolved = (String, f64, serde_json::Value);

    /// RFC 8428 §4.6 resolution of a pack given as JSON records (labels as in SenML-JSON),
    /// written here from the RFC, not from the encoder.
    fn resolve(pack: &[serde_json::Value]) -> Vec<Resolved> {
        let (mut bn, mut bt) = (String::new(), 0.0);
        let mut out = Vec::new();
        for rec in pack {
            if let Some(b) = rec.get("bn") {
                bn = b.as_str().unwrap().to_string();
            }
            if let Some(b) = rec.get("bt") {
                bt = b.as_f64().unwrap();
            }
            let name = format!(
                "{bn}{}",
                rec.get("n").and_then(|n| n.as_str()).unwrap_or("")
            );
            let t = bt + rec.get("t").and_then(|t| t.as_f64()).unwrap_or(0.0);
            let v = rec.get("v").or_else(|| rec.get("vb")).cloned().unwrap();
            out.push((name, t, v));
        }
        out
    }

    /// Readings as Sluice forms them: records grouped by (device, time), `seq` apart.
    fn group(records: &[Resolved]) -> BTreeMap<(String, i64), (Option<u64>, Vec<String>)> {
        let mut out: BTreeMap<(String, i64), (Option<u64>, Vec<String>)> = BTreeMap::new();
        for (name, t, v) in records {
            let (dev, metric) = name.rsplit_once('/').unwrap();
            let e = out
                .entry((dev.to_string(), (t * 1000.0).round() as i64))
                .or_default();
            if metric == SEQ_NAME {
                assert!(e.0.is_none(), "two seq records in one reading");
                e.0 = Some(v.as_u64().expect("an integer seq"));
            } else {
                e.1.push(metric.to_string());
            }
        }
        out
    }

    /// A SenML-CBOR pack as SenML-JSON records: integer labels back to their names.
    fn cbor_to_json(bytes: &[u8]) -> Vec<serde_json::Value> {
        let v: ciborium::Value = ciborium::from_reader(bytes).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|rec| {
                let mut o = serde_json::Map::new();
                for (k, v) in rec.as_map().unwrap() {
                    let label = i64::try_from(k.as_integer().expect("integer labels")).unwrap();
                    let name = match label {
                        label::BN => "bn",
                        label::BT => "bt",
                        label::N => "n",
                        label::V => "v",
                        label::VB => "vb",
                        other => panic!("unexpected label {other}"),
                    };
                    o.insert(name.into(), v.deserialized().unwrap());
                }
                serde_json::Value::Object(o)
            })
            .collect()
    }

    /// A batch with one device twice at the same clock time: every reading comes back as its
    /// own group, with its seq and the device's metrics, in JSON and in CBOR.
    #[test]
    fn packs_resolve_to_one_reading_per_seq() {
        for format in [Format::SenmlJson, Format::SenmlCbor] {
            let mut devs = fleet(3);
            let mut enc = Encoder::new(format, true, true, 5, 4);
            for i in [0, 1, 0, 2, 0] {
                enc.push(&mut devs[i], 1_795_000_000_123);
            }
            let e = enc.finish();
            let pack: Vec<serde_json::Value> = match format {
                Format::SenmlJson => serde_json::from_slice(&e.bytes).unwrap(),
                _ => cbor_to_json(&e.bytes),
            };
            assert_eq!(pack.len(), 25);
            assert_eq!(pack[0]["bn"], "sm-0/");
            assert_eq!(pack[0]["n"], "seq");
            let readings = group(&resolve(&pack));
            assert_eq!(readings.len(), 5, "{format:?}: {readings:?}");
            let want = ["temperature", "humidity", "battery", "door_open"];
            let t0 = 1_795_000_000_123;
            let expect = [
                (("sm-0", t0), 1),
                (("sm-0", t0 + 1), 2),
                (("sm-0", t0 + 2), 3),
                (("sm-1", t0), 1),
                (("sm-2", t0), 1),
            ];
            for ((dev, t), seq) in expect {
                let (s, names) = &readings[&(dev.to_string(), t)];
                assert_eq!(*s, Some(seq), "{format:?} {dev} at {t}");
                assert_eq!(names, &want);
            }
        }
    }

    #[test]
    fn base_time_is_absolute_seconds_with_milliseconds() {
        let mut devs = fleet(1);
        let mut enc = Encoder::new(Format::SenmlJson, true, true, 1, 4);
        enc.push(&mut devs[0], 1_795_000_000_007);
        let text = String::from_utf8(enc.finish().bytes.to_vec()).unwrap();
        assert!(
            text.starts_with(
                r#"[{"bn":"sm-0/","bt":1795000000.007,"n":"seq","v":1},{"n":"temperature","v":"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"{"n":"door_open","vb":"#), "{text}");
        assert!(base_time(1_795_000_000_007) > f64::from(1u32 << 28));
    }
}
