//! `--format cbor`: the JSON shapes of SPEC §1 in CBOR (RFC 8949), and the small CBOR writer
//! the SenML-CBOR encoder and the null sink's acks use too.
//!
//! A reading is a map `{"device_id": text, "seq": uint, "ts": uint (epoch ms), "metrics":
//! {name: value}}` with definite lengths. Floats take the shortest of half, single and double
//! precision that holds the value exactly (as RFC 8949 §4.2.2 suggests); booleans are the
//! simple values `true`/`false`. Injected faults (`--bad-ratio`) are their JSON readings turned
//! into CBOR item by item.

use crate::fleet::{Next, Reading, Value};

/// Appends a head: major type `major` (0–7) with argument `n`, in the shortest form.
pub fn head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    if n < 24 {
        out.push(m | n as u8);
    } else if n <= 0xff {
        out.extend_from_slice(&[m | 24, n as u8]);
    } else if n <= 0xffff {
        out.push(m | 25);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else if n <= 0xffff_ffff {
        out.push(m | 26);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

/// An unsigned integer.
pub fn uint(out: &mut Vec<u8>, n: u64) {
    head(out, 0, n);
}

/// A signed integer.
pub fn int(out: &mut Vec<u8>, n: i64) {
    if n >= 0 {
        head(out, 0, n as u64);
    } else {
        head(out, 1, (-1 - n) as u64);
    }
}

/// A text string.
pub fn text(out: &mut Vec<u8>, s: &str) {
    head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// The head of an array of `n` items.
pub fn array(out: &mut Vec<u8>, n: u64) {
    head(out, 4, n);
}

/// The head of a map of `n` pairs.
pub fn map(out: &mut Vec<u8>, n: u64) {
    head(out, 5, n);
}

/// `true` or `false`.
pub fn boolean(out: &mut Vec<u8>, b: bool) {
    out.push(if b { 0xf5 } else { 0xf4 });
}

/// `null`.
pub fn null(out: &mut Vec<u8>) {
    out.push(0xf6);
}

/// A float in the shortest of half (f16), single (f32) and double (f64) precision that holds
/// it exactly.
pub fn float(out: &mut Vec<u8>, x: f64) {
    let single = x as f32;
    if f64::from(single) != x && !x.is_nan() {
        out.push(0xfb);
        out.extend_from_slice(&x.to_be_bytes());
        return;
    }
    if let Some(half) = to_half(single) {
        out.push(0xf9);
        out.extend_from_slice(&half.to_be_bytes());
    } else {
        out.push(0xfa);
        out.extend_from_slice(&single.to_be_bytes());
    }
}

/// `f` as IEEE 754 half-precision bits, when that is exact (zeros, infinities and normal
/// halves; subnormal halves are left to single precision).
fn to_half(f: f32) -> Option<u16> {
    let bits = f.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let mant = bits & 0x7f_ffff;
    if exp == 0 && mant == 0 {
        return Some(sign); // ±0
    }
    if exp == 0xff {
        return (mant == 0).then_some(sign | 0x7c00); // ±inf (NaN: single)
    }
    let e = exp - 127;
    if (-14..=15).contains(&e) && mant & 0x1fff == 0 {
        return Some(sign | (((e + 15) as u16) << 10) | (mant >> 13) as u16);
    }
    None
}

/// A metric value.
pub fn value(out: &mut Vec<u8>, v: Value) {
    match v {
        Value::Num(x) => float(out, x),
        Value::Bool(b) => boolean(out, b),
    }
}

/// Appends `next` as one CBOR map.
pub fn write_reading(next: &Next<'_>, with_id: bool, out: &mut Vec<u8>) {
    match next {
        Next::Reading(r) => reading(r, with_id, out),
        Next::Fault {
            fault,
            device_id,
            ts_ms,
        } => {
            let mut json = String::new();
            fault.write(device_id, *ts_ms, &mut json);
            let v: serde_json::Value =
                serde_json::from_str(&json).expect("every fault is JSON (faults.rs tests)");
            from_json(&v, out);
        }
    }
}

/// Appends one valid reading.
pub fn reading(r: &Reading<'_>, with_id: bool, out: &mut Vec<u8>) {
    map(out, if with_id { 4 } else { 3 });
    if with_id {
        text(out, "device_id");
        text(out, r.device_id);
    }
    text(out, "seq");
    uint(out, r.seq);
    text(out, "ts");
    int(out, r.ts_ms);
    text(out, "metrics");
    map(out, r.metric_count() as u64);
    for (name, v) in r.metrics() {
        text(out, name);
        value(out, v);
    }
}

/// A JSON value item by item (integers stay integers).
pub fn from_json(v: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value as J;
    match v {
        J::Null => null(out),
        J::Bool(b) => boolean(out, *b),
        J::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => uint(out, u),
            (None, Some(i), _) => int(out, i),
            (_, _, Some(f)) => float(out, f),
            _ => null(out),
        },
        J::String(s) => text(out, s),
        J::Array(a) => {
            array(out, a.len() as u64);
            for x in a {
                from_json(x, out);
            }
        }
        J::Object(o) => {
            map(out, o.len() as u64);
            for (k, x) in o {
                text(out, k);
                from_json(x, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::Fault;
    use crate::fleet::{FleetProfile, FleetSpec};
    use ciborium::Value as C;

    fn decode(bytes: &[u8]) -> C {
        let mut rest = bytes;
        let v = ciborium::from_reader(&mut rest).expect("valid CBOR");
        assert!(rest.is_empty(), "trailing bytes");
        v
    }

    fn get<'a>(m: &'a C, key: &str) -> &'a C {
        m.as_map()
            .unwrap()
            .iter()
            .find(|(k, _)| k.as_text() == Some(key))
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no `{key}` in {m:?}"))
    }

    /// RFC 8949 Appendix A examples, byte for byte.
    #[test]
    fn heads_and_floats_match_the_rfc_examples() {
        let enc = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut out = Vec::new();
            f(&mut out);
            out
        };
        assert_eq!(enc(&|o| uint(o, 0)), [0x00]);
        assert_eq!(enc(&|o| uint(o, 23)), [0x17]);
        assert_eq!(enc(&|o| uint(o, 24)), [0x18, 0x18]);
        assert_eq!(enc(&|o| uint(o, 1000)), [0x19, 0x03, 0xe8]);
        assert_eq!(enc(&|o| uint(o, 1_000_000)), [0x1a, 0x00, 0x0f, 0x42, 0x40]);
        assert_eq!(
            enc(&|o| uint(o, 1_000_000_000_000)),
            [0x1b, 0x00, 0x00, 0x00, 0xe8, 0xd4, 0xa5, 0x10, 0x00]
        );
        assert_eq!(enc(&|o| int(o, -1)), [0x20]);
        assert_eq!(enc(&|o| int(o, -1000)), [0x39, 0x03, 0xe7]);
        assert_eq!(enc(&|o| float(o, 0.0)), [0xf9, 0x00, 0x00]);
        assert_eq!(enc(&|o| float(o, -0.0)), [0xf9, 0x80, 0x00]);
        assert_eq!(enc(&|o| float(o, 1.0)), [0xf9, 0x3c, 0x00]);
        assert_eq!(enc(&|o| float(o, 1.5)), [0xf9, 0x3e, 0x00]);
        assert_eq!(enc(&|o| float(o, 65504.0)), [0xf9, 0x7b, 0xff]);
        assert_eq!(enc(&|o| float(o, 100000.0)), [0xfa, 0x47, 0xc3, 0x50, 0x00]);
        assert_eq!(
            enc(&|o| float(o, 1.1)),
            [0xfb, 0x3f, 0xf1, 0x99, 0x99, 0x99, 0x99, 0x99, 0x9a]
        );
        assert_eq!(enc(&|o| float(o, -4.0)), [0xf9, 0xc4, 0x00]);
        assert_eq!(enc(&|o| text(o, "IETF")), [0x64, 0x49, 0x45, 0x54, 0x46]);
        assert_eq!(enc(&|o| boolean(o, true)), [0xf5]);
    }

    /// Every float comes back exactly, whatever width it took.
    #[test]
    fn floats_round_trip_through_ciborium() {
        let mut xs = vec![
            0.0,
            -0.0,
            21.5,
            21.37,
            1e-7,
            5.960464477539063e-8,
            6.1e-5,
            65504.0,
        ];
        xs.extend([
            65520.0,
            1e300,
            -123.456,
            88.12,
            3.0e38,
            1.0 / 3.0,
            51.123456,
        ]);
        for x in xs {
            let mut out = Vec::new();
            float(&mut out, x);
            let back = decode(&out).as_float().expect("a float");
            assert_eq!(back.to_bits(), x.to_bits(), "{x}: {out:02x?}");
        }
    }

    #[test]
    fn a_reading_decodes_to_the_json_shape() {
        let mut dev = FleetSpec {
            prefix: "cb".into(),
            devices: 5,
            profile: FleetProfile::Mixed,
            metrics: 6,
            seed: 3,
            seq_start: 40,
            bad_ratio: 0.0,
            distinct_ts: false,
        }
        .build()
        .remove(4); // a tracker
        let (_, next) = dev.next(1_795_000_000_123);
        let Next::Reading(r) = &next else { panic!() };
        let mut json = Vec::new();
        crate::encode::json::reading(r, true, &mut json);
        let mut out = Vec::new();
        write_reading(&next, true, &mut out);
        let v = decode(&out);
        assert_eq!(get(&v, "device_id").as_text(), Some("cb-4"));
        assert_eq!(get(&v, "seq").as_integer(), Some(40.into()));
        assert_eq!(
            get(&v, "ts").as_integer(),
            Some(1_795_000_000_123i64.into())
        );
        let metrics = get(&v, "metrics").as_map().unwrap();
        let names: Vec<&str> = metrics.iter().map(|(k, _)| k.as_text().unwrap()).collect();
        assert_eq!(
            names,
            ["lat", "lon", "speed", "heading", "battery", "aux_1"]
        );
        // The same values as the JSON encoding of the same reading.
        let j: serde_json::Value = serde_json::from_slice(&json).unwrap();
        for (k, v) in metrics {
            let want = j["metrics"][k.as_text().unwrap()].as_f64().unwrap();
            assert_eq!(v.as_float(), Some(want), "{k:?}");
        }
        assert!(
            out.len() < json.len(),
            "CBOR {} bytes, JSON {} bytes",
            out.len(),
            json.len()
        );
        // Without the id (a WebSocket frame).
        let mut out = Vec::new();
        write_reading(&next, false, &mut out);
        assert_eq!(decode(&out).as_map().unwrap().len(), 3);
    }

    /// Faults keep their JSON shape: null, negative seq, a string where a number goes.
    #[test]
    fn faults_keep_their_shape() {
        for fault in Fault::ALL {
            let next = Next::Fault {
                fault,
                device_id: "cb-1",
                ts_ms: 1_795_000_000_000,
            };
            let mut out = Vec::new();
            write_reading(&next, true, &mut out);
            let v = decode(&out);
            let mut json = String::new();
            fault.write("cb-1", 1_795_000_000_000, &mut json);
            let j: serde_json::Value = serde_json::from_str(&json).unwrap();
            let back: serde_json::Value = v.deserialized().unwrap();
            assert_eq!(back, j, "{fault:?}");
        }
    }
}
