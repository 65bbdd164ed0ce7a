//! `--format json`: SPEC §1 readings, `{"device_id":…,"seq":…,"ts":<epoch ms>,"metrics":{…}}`.

use crate::fleet::{Next, Reading, Value};

/// Appends `next` as one JSON object (an injected fault as its malformed JSON).
pub fn write(next: &Next<'_>, with_id: bool, out: &mut Vec<u8>) {
    match next {
        Next::Reading(r) => reading(r, with_id, out),
        Next::Fault {
            fault,
            device_id,
            ts_ms,
        } => {
            let mut text = String::new();
            fault.write(device_id, *ts_ms, &mut text);
            out.extend_from_slice(text.as_bytes());
        }
    }
}

/// Appends one valid reading.
pub fn reading(r: &Reading<'_>, with_id: bool, out: &mut Vec<u8>) {
    out.push(b'{');
    if with_id {
        out.extend_from_slice(b"\"device_id\":\"");
        out.extend_from_slice(r.device_id.as_bytes());
        out.extend_from_slice(b"\",");
    }
    let mut ib = itoa::Buffer::new();
    out.extend_from_slice(b"\"seq\":");
    out.extend_from_slice(ib.format(r.seq).as_bytes());
    out.extend_from_slice(b",\"ts\":");
    out.extend_from_slice(ib.format(r.ts_ms).as_bytes());
    out.extend_from_slice(b",\"metrics\":{");
    let mut fb = ryu::Buffer::new();
    for (i, (name, value)) in r.metrics().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
        value_text(value, &mut fb, out);
    }
    out.extend_from_slice(b"}}");
}

/// A metric value as JSON (and line-protocol float) text: shortest round-trip float, or
/// `true`/`false`.
pub fn value_text(value: Value, fb: &mut ryu::Buffer, out: &mut Vec<u8>) {
    match value {
        Value::Num(x) => out.extend_from_slice(fb.format_finite(x).as_bytes()),
        Value::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
    }
}
