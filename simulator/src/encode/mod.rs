//! Wire formats (`--format`): generated readings → the bytes of a request body, frame or
//! payload.
//!
//! ```text
//! fleet (Device::next → Reading | fault) ─▶ encode::Encoder (json | cbor | senml | line)
//!   ─▶ transport (body, frame, payload)
//! ```
//!
//! | `--format` | bytes | HTTP | WebSocket | MQTT |
//! |---|---|---|---|---|
//! | `json` | SPEC §1 JSON | `POST /v1/readings`, `application/json` | text frames | payload |
//! | `cbor` | the same shapes in CBOR (RFC 8949) | `application/cbor` | binary frames | — |
//! | `senml-json` | a SenML pack (RFC 8428) | `application/senml+json` | — | payload |
//! | `senml-cbor` | a SenML pack in CBOR, integer labels | `application/senml+cbor` | — | — |
//! | `line` | InfluxDB line protocol | `POST /api/v2/write?…&precision=ms` | — | — |
//!
//! Each format has its module; [`Encoder`] builds one body, frame or payload from readings
//! of any devices and keeps the [`Item`]s that say what each reading was.

pub mod cbor;
pub mod json;
pub mod line;
pub mod senml;

use bytes::Bytes;
use serde::Serialize;

use crate::config::Transport;
use crate::fleet::{Device, Item, Next};

/// How readings are encoded on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// SPEC §1 JSON (http, ws text frames, mqtt).
    Json,
    /// The JSON shapes in CBOR (http `application/cbor`, ws binary frames).
    Cbor,
    /// SenML JSON packs (http `application/senml+json`, mqtt).
    SenmlJson,
    /// SenML CBOR packs with RFC 8428 §6 integer labels (http `application/senml+cbor`).
    SenmlCbor,
    /// InfluxDB line protocol (http `POST /api/v2/write`, precision ms).
    Line,
}

/// The measurement of line-protocol readings: field `f` is stored as metric `m.f`.
pub const LINE_MEASUREMENT: &str = "m";

impl Format {
    /// Every format.
    pub const ALL: [Format; 5] = [
        Format::Json,
        Format::Cbor,
        Format::SenmlJson,
        Format::SenmlCbor,
        Format::Line,
    ];

    /// The `--format` value.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Cbor => "cbor",
            Format::SenmlJson => "senml-json",
            Format::SenmlCbor => "senml-cbor",
            Format::Line => "line",
        }
    }

    /// The formats `transport` carries.
    pub fn for_transport(transport: Transport) -> &'static [Format] {
        match transport {
            Transport::Http => &Format::ALL,
            Transport::Ws => &[Format::Json, Format::Cbor],
            Transport::Mqtt => &[Format::Json, Format::SenmlJson],
        }
    }

    /// Whether `transport` carries this format.
    pub fn applies_to(self, transport: Transport) -> bool {
        Format::for_transport(transport).contains(&self)
    }

    /// `http: json, cbor, …; ws: …; mqtt: …`, for error messages.
    pub fn valid_pairs() -> String {
        [
            (Transport::Http, "http"),
            (Transport::Ws, "ws"),
            (Transport::Mqtt, "mqtt"),
        ]
        .iter()
        .map(|(t, name)| {
            let names: Vec<&str> = Format::for_transport(*t).iter().map(|f| f.name()).collect();
            format!("{name}: {}", names.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
    }

    /// The HTTP `Content-Type` of a body.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Cbor => "application/cbor",
            Format::SenmlJson => "application/senml+json",
            Format::SenmlCbor => "application/senml+cbor",
            Format::Line => "text/plain; charset=utf-8",
        }
    }

    /// The HTTP path (and query) a body is posted to.
    pub fn http_path(self) -> &'static str {
        match self {
            Format::Line => "/api/v2/write?org=o&bucket=b&precision=ms",
            _ => "/v1/readings",
        }
    }

    /// Whether the bytes are binary (CBOR): a WebSocket binary frame rather than a text one.
    pub fn is_binary(self) -> bool {
        matches!(self, Format::Cbor | Format::SenmlCbor)
    }

    /// Whether the format can carry the injected faults of `--bad-ratio` (they are JSON
    /// readings, which CBOR carries as they are; SenML and line protocol have no such shapes).
    pub fn carries_faults(self) -> bool {
        matches!(self, Format::Json | Format::Cbor)
    }

    /// Whether the format needs each device's readings at distinct times (SenML: records of
    /// one device and time are one reading).
    pub fn needs_distinct_ts(self) -> bool {
        matches!(self, Format::SenmlJson | Format::SenmlCbor)
    }

    /// The name under which Sluice stores metric `name` sent in this format (line protocol:
    /// field `f` of measurement `m` is metric `m.f`).
    pub fn stored_name(self, name: &str) -> String {
        match self {
            Format::Line => format!("{LINE_MEASUREMENT}.{name}"),
            _ => name.to_string(),
        }
    }
}

/// Room kept at the start of a CBOR body for the array head (at most 9 bytes), written when
/// the number of elements is known.
const HEAD_ROOM: usize = 9;

/// Builds one body, frame or payload.
#[derive(Debug)]
pub struct Encoder {
    format: Format,
    /// JSON/CBOR readings carry `device_id` (false: the transport binds the device).
    with_id: bool,
    /// An array of readings (JSON/CBOR); false: exactly one reading, as an object.
    array: bool,
    buf: Vec<u8>,
    /// Top-level array elements so far: readings, or SenML records.
    elems: u64,
    items: Vec<Item>,
    /// SenML: the item each record belongs to, to map an answer's record index to a reading.
    record_items: Vec<u32>,
    /// Where each reading's bytes are in `buf` (separators left out).
    spans: Vec<(u32, u32)>,
}

impl Encoder {
    /// An empty body of `format`, for about `readings` readings of `metrics` metrics.
    /// `array` false: one JSON/CBOR reading as an object (SenML and line protocol ignore it).
    pub fn new(
        format: Format,
        with_id: bool,
        array: bool,
        readings: usize,
        metrics: usize,
    ) -> Self {
        let per_reading = 64 + 24 * metrics;
        let mut buf = Vec::with_capacity(HEAD_ROOM + 2 + readings * per_reading);
        match format {
            Format::Json if array => buf.push(b'['),
            Format::SenmlJson => buf.push(b'['),
            Format::Cbor | Format::SenmlCbor => buf.resize(HEAD_ROOM, 0),
            _ => {}
        }
        Self {
            format,
            with_id,
            array,
            buf,
            elems: 0,
            items: Vec::with_capacity(readings),
            record_items: Vec::new(),
            spans: Vec::with_capacity(readings),
        }
    }

    /// Appends `dev`'s next reading at `ts_ms`.
    pub fn push(&mut self, dev: &mut Device, ts_ms: i64) {
        let (item, next) = dev.next(ts_ms);
        let first = self.items.is_empty();
        let buf = &mut self.buf;
        match self.format {
            Format::Json => {
                if !first {
                    buf.push(b',');
                }
                let start = buf.len();
                json::write(&next, self.with_id, buf);
                self.spans.push((start as u32, buf.len() as u32));
                self.elems += 1;
            }
            Format::Cbor => {
                let start = buf.len();
                cbor::write_reading(&next, self.with_id, buf);
                self.spans.push((start as u32, buf.len() as u32));
                self.elems += 1;
            }
            Format::SenmlJson | Format::SenmlCbor => {
                let Next::Reading(r) = &next else {
                    unreachable!("--bad-ratio is refused with senml")
                };
                if self.format == Format::SenmlJson && !first {
                    buf.push(b',');
                }
                let start = buf.len();
                if self.format == Format::SenmlJson {
                    senml::write_json(r, buf);
                } else {
                    senml::write_cbor(r, buf);
                }
                self.spans.push((start as u32, buf.len() as u32));
                let records = senml::records(r);
                self.elems += records as u64;
                let index = self.items.len() as u32;
                self.record_items
                    .extend(std::iter::repeat_n(index, records));
            }
            Format::Line => {
                let Next::Reading(r) = &next else {
                    unreachable!("--bad-ratio is refused with line")
                };
                if !first {
                    buf.push(b'\n');
                }
                let start = buf.len();
                line::write(r, buf);
                self.spans.push((start as u32, buf.len() as u32));
                self.elems += 1;
            }
        }
        self.items.push(item);
    }

    /// Readings so far.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// No reading yet.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The finished bytes and what each reading is.
    pub fn finish(self) -> Encoded {
        let mut buf = self.buf;
        let (bytes, shift) = match self.format {
            Format::Json if self.array => {
                buf.push(b']');
                (Bytes::from(buf), 0)
            }
            Format::SenmlJson => {
                buf.push(b']');
                (Bytes::from(buf), 0)
            }
            Format::Cbor if !self.array => (Bytes::from(buf).slice(HEAD_ROOM..), HEAD_ROOM),
            Format::Cbor | Format::SenmlCbor => {
                let mut head = Vec::with_capacity(HEAD_ROOM);
                cbor::array(&mut head, self.elems);
                let at = HEAD_ROOM - head.len();
                buf[at..HEAD_ROOM].copy_from_slice(&head);
                (Bytes::from(buf).slice(at..), at)
            }
            _ => (Bytes::from(buf), 0),
        };
        let mut spans = self.spans;
        if shift > 0 {
            let shift = shift as u32;
            for s in &mut spans {
                *s = (s.0 - shift, s.1 - shift);
            }
        }
        Encoded {
            bytes,
            items: self.items,
            record_items: self.record_items,
            spans,
            format: self.format,
        }
    }
}

/// A finished body, frame or payload.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The bytes on the wire.
    pub bytes: Bytes,
    /// What each reading is, in order.
    pub items: Vec<Item>,
    /// SenML: the reading each record belongs to (empty for the other formats).
    pub record_items: Vec<u32>,
    /// Where each reading's bytes are in `bytes` (separators left out).
    pub spans: Vec<(u32, u32)>,
    /// The format of `bytes`.
    pub format: Format,
}

impl Encoded {
    /// A body of the same format holding only the readings at `keep` (indexes into `items`,
    /// in order), e.g. those refused for a rate limit, to send them again with the same `seq`s.
    /// For batches (arrays, SenML packs, line protocol), not single-object frames.
    pub fn subset(&self, keep: &[usize]) -> Encoded {
        let format = self.format;
        let mut records = vec![0usize; self.items.len()];
        for &r in &self.record_items {
            if let Some(c) = records.get_mut(r as usize) {
                *c += 1;
            }
        }
        let room = if format.is_binary() { HEAD_ROOM } else { 0 };
        let mut buf = Vec::with_capacity(
            room + 2
                + keep
                    .iter()
                    .map(|&i| (self.spans[i].1 - self.spans[i].0) as usize + 1)
                    .sum::<usize>(),
        );
        buf.resize(room, 0);
        if matches!(format, Format::Json | Format::SenmlJson) {
            buf.push(b'[');
        }
        let mut items = Vec::with_capacity(keep.len());
        let mut record_items = Vec::new();
        let mut spans = Vec::with_capacity(keep.len());
        let mut elems = 0u64;
        for (k, &i) in keep.iter().enumerate() {
            if k > 0 {
                match format {
                    Format::Json | Format::SenmlJson => buf.push(b','),
                    Format::Line => buf.push(b'\n'),
                    Format::Cbor | Format::SenmlCbor => {}
                }
            }
            let (a, b) = self.spans[i];
            let start = buf.len();
            buf.extend_from_slice(&self.bytes[a as usize..b as usize]);
            spans.push((start as u32, buf.len() as u32));
            items.push(self.items[i].clone());
            if format.needs_distinct_ts() {
                record_items.extend(std::iter::repeat_n(k as u32, records[i]));
                elems += records[i] as u64;
            } else {
                elems += 1;
            }
        }
        if matches!(format, Format::Json | Format::SenmlJson) {
            buf.push(b']');
        }
        let mut at = 0;
        if format.is_binary() {
            let mut head = Vec::with_capacity(HEAD_ROOM);
            cbor::array(&mut head, elems);
            at = HEAD_ROOM - head.len();
            buf[at..HEAD_ROOM].copy_from_slice(&head);
            for s in &mut spans {
                *s = (s.0 - at as u32, s.1 - at as u32);
            }
        }
        Encoded {
            bytes: Bytes::from(buf).slice(at..),
            items,
            record_items,
            spans,
            format,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{FleetProfile, FleetSpec};

    fn devices(distinct_ts: bool) -> Vec<Device> {
        FleetSpec {
            prefix: "enc".into(),
            devices: 3,
            profile: FleetProfile::Mixed,
            metrics: 4,
            seed: 5,
            seq_start: 1,
            bad_ratio: 0.0,
            distinct_ts,
        }
        .build()
    }

    #[test]
    fn every_transport_has_json_and_the_pairs_are_named() {
        for t in [Transport::Http, Transport::Ws, Transport::Mqtt] {
            assert!(Format::Json.applies_to(t));
        }
        assert!(!Format::Line.applies_to(Transport::Ws));
        assert!(!Format::SenmlCbor.applies_to(Transport::Mqtt));
        assert!(Format::SenmlJson.applies_to(Transport::Mqtt));
        assert_eq!(
            Format::valid_pairs(),
            "http: json, cbor, senml-json, senml-cbor, line; ws: json, cbor; mqtt: json, senml-json"
        );
        assert_eq!(Format::Line.stored_name("temperature"), "m.temperature");
        assert_eq!(Format::SenmlCbor.stored_name("temperature"), "temperature");
    }

    /// A batch in each format: readings of several devices, decoded by an independent path.
    #[test]
    fn a_batch_in_each_format_holds_every_reading() {
        for format in Format::ALL {
            let mut devs = devices(format.needs_distinct_ts());
            let mut enc = Encoder::new(format, true, true, 6, 4);
            for i in 0..6 {
                enc.push(&mut devs[i % 3], 1_795_000_000_000);
            }
            let e = enc.finish();
            assert_eq!(e.items.len(), 6);
            let seqs: Vec<u64> = e.items.iter().map(|i| i.seq.unwrap()).collect();
            assert_eq!(seqs, [1, 1, 1, 2, 2, 2], "{format:?}");
            match format {
                Format::Json => {
                    let v: serde_json::Value = serde_json::from_slice(&e.bytes).unwrap();
                    assert_eq!(v.as_array().unwrap().len(), 6);
                }
                Format::Cbor => {
                    let v: ciborium::Value = ciborium::from_reader(&e.bytes[..]).unwrap();
                    assert_eq!(v.as_array().unwrap().len(), 6);
                }
                Format::SenmlJson => {
                    let v: serde_json::Value = serde_json::from_slice(&e.bytes).unwrap();
                    // 1 seq record + 4 metrics per reading.
                    assert_eq!(v.as_array().unwrap().len(), 30);
                    assert_eq!(e.record_items.len(), 30);
                    assert_eq!(e.record_items[5], 1);
                }
                Format::SenmlCbor => {
                    let v: ciborium::Value = ciborium::from_reader(&e.bytes[..]).unwrap();
                    assert_eq!(v.as_array().unwrap().len(), 30);
                }
                Format::Line => {
                    let text = std::str::from_utf8(&e.bytes).unwrap();
                    assert_eq!(text.lines().count(), 6);
                    assert!(!text.ends_with('\n'));
                }
            }
        }
    }

    /// A subset of a batch is a valid body of the same format with just those readings.
    #[test]
    fn a_subset_of_a_batch_holds_just_those_readings() {
        for format in Format::ALL {
            let mut devs = devices(format.needs_distinct_ts());
            let mut enc = Encoder::new(format, true, true, 6, 4);
            for i in 0..6 {
                enc.push(&mut devs[i % 3], 1_795_000_000_000);
            }
            let e = enc.finish();
            let sub = e.subset(&[1, 4]);
            let devices: Vec<u32> = sub.items.iter().map(|i| i.device).collect();
            assert_eq!(devices, [1, 1], "{format:?}");
            let seqs: Vec<u64> = sub.items.iter().map(|i| i.seq.unwrap()).collect();
            assert_eq!(seqs, [1, 2], "{format:?}");
            let n = match format {
                Format::Json => {
                    let v: serde_json::Value = serde_json::from_slice(&sub.bytes).unwrap();
                    assert_eq!(v[1]["seq"], 2);
                    assert_eq!(v[1]["device_id"], "enc-1");
                    v.as_array().unwrap().len()
                }
                Format::SenmlJson => {
                    let v: serde_json::Value = serde_json::from_slice(&sub.bytes).unwrap();
                    assert_eq!(sub.record_items, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]);
                    v.as_array().unwrap().len() / 5
                }
                Format::Cbor | Format::SenmlCbor => {
                    let v: ciborium::Value = ciborium::from_reader(&sub.bytes[..]).unwrap();
                    let n = v.as_array().unwrap().len();
                    if format == Format::Cbor {
                        n
                    } else {
                        n / 5
                    }
                }
                Format::Line => {
                    let text = std::str::from_utf8(&sub.bytes).unwrap();
                    assert!(text.lines().all(|l| l.contains("device_id=enc-1")));
                    text.lines().count()
                }
            };
            assert_eq!(n, 2, "{format:?}");
            // Spans point at the readings in the subset too.
            let again = sub.subset(&[1]);
            assert_eq!(again.items[0].seq, Some(2), "{format:?}");
        }
    }

    #[test]
    fn one_reading_is_an_object_in_json_and_cbor() {
        let mut devs = devices(false);
        let mut enc = Encoder::new(Format::Cbor, false, false, 1, 4);
        enc.push(&mut devs[0], 1_795_000_000_000);
        let e = enc.finish();
        let v: ciborium::Value = ciborium::from_reader(&e.bytes[..]).unwrap();
        let m = v.as_map().expect("one reading is a map");
        assert!(m.iter().all(|(k, _)| k.as_text() != Some("device_id")));
        let mut enc = Encoder::new(Format::Json, false, false, 1, 4);
        enc.push(&mut devs[0], 1_795_000_000_000);
        let v: serde_json::Value = serde_json::from_slice(&enc.finish().bytes).unwrap();
        assert_eq!(v["seq"], 2);
    }

    /// A CBOR array head of every size (1, 2, 3, 5 and 9 bytes) lands right before the items.
    #[test]
    fn cbor_array_heads_of_every_size() {
        for n in [0usize, 23, 24, 255, 256, 70_000] {
            let mut devs = devices(false);
            let mut enc = Encoder::new(Format::Cbor, true, true, n, 1);
            for _ in 0..n {
                enc.push(&mut devs[0], 1_795_000_000_000);
            }
            let e = enc.finish();
            let v: ciborium::Value = ciborium::from_reader(&e.bytes[..]).unwrap();
            assert_eq!(v.as_array().unwrap().len(), n);
        }
    }
}
