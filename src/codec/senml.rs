//! SenML (RFC 8428, SPEC §10): `application/senml+json` and `application/senml+cbor` packs,
//! and SenML payloads on MQTT → readings. device → handler → **codec::senml** → readings →
//! admission.
//!
//! A pack is an array of records. Records are resolved as RFC 8428 §4.6 says: a base field
//! (`bn`, `bt`, `bv`, …) applies to its own record and every later one until another record
//! changes it; the name is `bn` + `n`, the time `bt` + `t` (seconds, kept to the nearest
//! millisecond), the value `bv` + `v`. A resolved time below 2^28 s is relative to the receive
//! time (RFC 8428 §4.5.3): `t = -10` is ten seconds before the pack arrived.
//!
//! Into readings (SPEC §10):
//! - the resolved name splits at its last `/`: the left part is the device id, the right part
//!   the metric name. With no `/`, the device is the one the transport binds (MQTT topic,
//!   WebSocket `?device_id=`, token) and the whole name is the metric; with none bound, the
//!   record is refused with JSON's error for a missing `device_id`;
//! - records with the same device and time form one reading, metrics in record order;
//! - `v` is a number (an integer stays an exact integer, −2^63..=2^64−1, as in JSON), `vb` a
//!   boolean. A record with `vs`, `vd`, or a sum `s` and no value is refused
//!   ([`RejectReason::UnsupportedValue`]). Units (`u`, `bu`), sums beside a value (`s`,
//!   `bs`) and update times (`ut`) are not kept;
//! - Sluice's extension (the SenML data model has no sequence number): a resolved metric named
//!   exactly `seq` with a non-negative integer value is the reading's `seq`, as an integer
//!   `seq` field is in line protocol; a negative one is refused, a float or boolean one is an
//!   ordinary metric.
//!
//! Whole-pack refusals ([`BatchError::Malformed`], naming the record and label, e.g.
//! `pack[2].bver: …`): not a JSON/CBOR array; a label ending in `_` (must-understand, RFC
//! 8428 §4.4 and §12: a reader that does not know it must not use the pack); `bver` above 10,
//! the version Sluice understands (§4.4); two records giving different `bver` values (a pack
//! has one version; `bver` 1 to 10 given alike is accepted, since the RFC's own examples use 5);
//! a base field of the wrong type or given twice in one record (every later record would
//! resolve wrongly). Other unknown labels, text or integer, are ignored.
//!
//! Per-record refusals keep their neighbours. A rejection's `index` is the record's position
//! in the pack (0-based), and its error names the record (`pack[3].vs: …`) or, for SPEC §1's
//! rules, the reading field as JSON does (`device_id: required …`). When a reading made of
//! several records breaks a rule, each of its records that breaks it alone is refused and the
//! rest are still taken; if the reading as a whole breaks it (more than 256 metrics), all of
//! its records are refused. Two records of one reading with the same metric name (in SenML,
//! records differing only by unit, RFC 8428 §5.1.3) keep the first; the later is refused.
//!
//! [`ParsedBatch::total`] is readings made plus records refused; records that carry only
//! base fields make neither. A pack whose total is above `limits.max_readings_per_request` is
//! refused ([`BatchError::TooMany`]).
//!
//! In CBOR, labels are the integers of RFC 8428 §6 (Table 4) or the text labels of JSON, and
//! decoding shares the CBOR codec's limits ([`super::cbor::MAX_DEPTH`], truncation, trailing
//! bytes); a tag 55799 (self-described CBOR) is transparent, bignums of up to 128 bits are
//! integers. One leading byte-order mark is ignored (SPEC §1).

use std::borrow::Cow;
use std::fmt;

use serde::de::{
    self, Deserializer, EnumAccess, IgnoredAny, MapAccess, SeqAccess, VariantAccess, Visitor,
};
use serde_json::value::RawValue;

use super::json::CowStr;
use super::{cbor, strip_bom};
use crate::reading::{
    format_ts, BatchError, MetricValue, ParseContext, ParsedBatch, Reading, ReadingError,
    ReadingParts, RejectReason, Rejection, MAX_METRICS,
};

/// The SenML version Sluice understands (RFC 8428 §4.4); packs with a higher `bver` are
/// refused.
pub const SENML_VERSION: i128 = 10;

/// Resolved times below this many seconds are relative to the receive time (RFC 8428
/// §4.5.3: 2^28).
const RELATIVE_BELOW_S: f64 = 268_435_456.0;

/// Parses a `application/senml+json` pack (or a SenML MQTT payload). Fails as a whole when it
/// is not a JSON array, breaks a pack-level rule (see the module docs), or makes more than
/// `limits.max_readings_per_request` readings and refusals.
pub fn parse_senml_json(text: &str, ctx: &ParseContext<'_>) -> Result<ParsedBatch, BatchError> {
    let text = strip_bom(text);
    let not_json = |e: serde_json::Error| BatchError::Malformed(format!("not valid JSON: {e}"));
    if text.trim_start().as_bytes().first() != Some(&b'[') {
        serde_json::from_str::<IgnoredAny>(text).map_err(not_json)?;
        return Err(BatchError::Malformed(format!(
            "expected a SenML pack: an array of records, not {}",
            json_kind(text.trim_start())
        )));
    }
    let raws: Vec<&RawValue> = serde_json::from_str(text).map_err(not_json)?;
    let mut pack = Resolver::new(ctx);
    for (index, raw) in raws.iter().enumerate() {
        match serde_json::from_str::<JsonRecord>(raw.get()) {
            Ok(JsonRecord(fields)) => pack.record(index, &fields)?,
            Err(_) => pack.not_a_record(index, json_kind(raw.get())),
        }
    }
    pack.finish()
}

/// Parses a `application/senml+cbor` pack. Fails as a whole when it is not CBOR (as
/// [`super::cbor::parse_cbor`] refuses it), is not an array, breaks a pack-level rule, or
/// makes more than `limits.max_readings_per_request` readings and refusals.
pub fn parse_senml_cbor(bytes: &[u8], ctx: &ParseContext<'_>) -> Result<ParsedBatch, BatchError> {
    let bytes = cbor::strip_bom(bytes);
    // Records are decoded one at a time, straight into the resolver, so a pack of a million
    // tiny records never exists as a million decoded records.
    let Some(elements) = cbor::array_elements(bytes)? else {
        let CborPack(kind) = cbor::decode(bytes)?;
        return Err(BatchError::Malformed(format!(
            "expected a SenML pack: an array of records, not {kind}"
        )));
    };
    let mut pack = Resolver::new(ctx);
    for (index, element) in elements.enumerate() {
        let (start, end) = element.map_err(|e| BatchError::Malformed(e.to_string()))?;
        match cbor::decode_checked::<CborRecordDe>(&bytes[start..end]) {
            Ok(CborRecordDe(Ok(fields))) => pack.record(index, &fields)?,
            Ok(CborRecordDe(Err(kind))) => pack.not_a_record(index, kind),
            // Valid CBOR the decoder refuses (nested too deep, an unassigned simple value):
            // this record only.
            Err(e) => pack.reject(
                index,
                format!("pack[{index}]"),
                e.to_string(),
                RejectReason::Malformed,
            ),
        }
    }
    pack.finish()
}

/// Whether an MQTT payload is SenML JSON (SPEC §10): after an optional byte-order mark and
/// whitespace it starts with `[{`, and its first record has a SenML label (`n`, `bn`, `v`,
/// `bt`, `bver`, …) and neither `device_id` nor `metrics`. Only the first record is read.
pub fn looks_like_senml(payload: &[u8]) -> bool {
    let p = payload.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(payload);
    let Some(rest) = p.trim_ascii_start().strip_prefix(b"[") else {
        return false;
    };
    let rest = rest.trim_ascii_start();
    if !rest.starts_with(b"{") {
        return false;
    }
    matches!(
        serde_json::Deserializer::from_slice(rest)
            .into_iter::<FirstRecord>()
            .next(),
        Some(Ok(FirstRecord(true)))
    )
}

/// A SenML label (RFC 8428 Table 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Bver,
    Bn,
    Bt,
    Bu,
    Bv,
    Bs,
    N,
    U,
    V,
    Vs,
    Vb,
    S,
    T,
    Ut,
    Vd,
}

impl Label {
    /// Every label with its JSON name and CBOR integer.
    const ALL: [(Label, &'static str, i128); 15] = [
        (Label::Bver, "bver", -1),
        (Label::Bn, "bn", -2),
        (Label::Bt, "bt", -3),
        (Label::Bu, "bu", -4),
        (Label::Bv, "bv", -5),
        (Label::Bs, "bs", -6),
        (Label::N, "n", 0),
        (Label::U, "u", 1),
        (Label::V, "v", 2),
        (Label::Vs, "vs", 3),
        (Label::Vb, "vb", 4),
        (Label::S, "s", 5),
        (Label::T, "t", 6),
        (Label::Ut, "ut", 7),
        (Label::Vd, "vd", 8),
    ];

    fn name(self) -> &'static str {
        Self::ALL[self as usize].1
    }

    fn bit(self) -> u16 {
        1 << self as u16
    }

    fn is_base(self) -> bool {
        matches!(
            self,
            Label::Bver | Label::Bn | Label::Bt | Label::Bu | Label::Bv | Label::Bs
        )
    }
}

/// A record's key.
#[derive(Debug)]
enum Key<'a> {
    Known(Label),
    /// A label ending in `_`: must be understood, and is not.
    MustUnderstand(Cow<'a, str>),
    /// `device_id` or `metrics`: a field of Sluice's JSON readings, which has no place in a
    /// SenML record (a reading mixed into a pack is refused, not ignored).
    ReadingField(&'static str),
    /// Any other label: ignored.
    Ignored,
}

impl<'a> Key<'a> {
    fn text(s: Cow<'a, str>) -> Self {
        if let Some((l, _, _)) = Label::ALL.iter().find(|(_, name, _)| *name == s) {
            Key::Known(*l)
        } else if s == "device_id" {
            Key::ReadingField("device_id")
        } else if s == "metrics" {
            Key::ReadingField("metrics")
        } else if s.ends_with('_') {
            Key::MustUnderstand(s)
        } else {
            Key::Ignored
        }
    }

    fn int(i: i128) -> Self {
        Label::ALL
            .iter()
            .find(|(_, _, n)| *n == i)
            .map_or(Key::Ignored, |(l, _, _)| Key::Known(*l))
    }
}

/// A number as sent: integers kept whole.
#[derive(Debug, Clone, Copy)]
enum Num {
    Int(i128),
    Float(f64),
    /// An integer beyond 128 bits (a JSON literal or a CBOR bignum).
    TooBig,
}

/// A field's value.
#[derive(Debug)]
enum Field<'a> {
    Text(Cow<'a, str>),
    Num(Num),
    Bool(bool),
    /// Anything else: what it is, for errors.
    Other(&'static str),
}

impl Field<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Field::Text(_) => "a text string",
            Field::Num(_) => "a number",
            Field::Bool(_) => "a boolean",
            Field::Other(k) => k,
        }
    }

    /// A finite number, as f64 (times and base values).
    fn finite(&self) -> Option<f64> {
        match self {
            Field::Num(Num::Int(i)) => Some(*i as f64),
            Field::Num(Num::Float(f)) if f.is_finite() => Some(*f),
            _ => None,
        }
    }
}

/// `pack[i].label`, the field name of errors about a record's label.
fn at(index: usize, label: &str) -> String {
    format!("pack[{index}].{label}")
}

/// A whole-pack refusal.
fn pack_error(index: usize, label: &str, reason: impl fmt::Display) -> BatchError {
    BatchError::Malformed(format!("{}: {reason}", at(index, label)))
}

/// One metric of a reading being assembled.
struct Entry {
    /// The resolved name; the metric is the part after `metric_at`.
    name: String,
    metric_at: usize,
    value: MetricValue,
    /// The record it came from.
    index: usize,
}

impl Entry {
    fn metric(&self) -> &str {
        &self.name[self.metric_at..]
    }
}

/// The records of one device at one time.
struct Group {
    /// The device: the names' left part, or the bound device; `None` when neither exists.
    device: Option<String>,
    ts_ms: i64,
    /// The `seq` and the record that gave it.
    seq: Option<(u64, usize)>,
    metrics: Vec<Entry>,
}

impl Group {
    fn parts<'a>(&'a self, entries: impl Iterator<Item = &'a Entry>) -> ReadingParts<'a> {
        ReadingParts {
            device_id: self.device.as_deref().map(Cow::Borrowed),
            ts_ms: Some(self.ts_ms),
            seq: self.seq.map(|(s, _)| s),
            metrics: entries
                .map(|e| (Cow::Borrowed(e.metric()), e.value))
                .collect(),
            tags: Vec::new(),
        }
    }
}

/// Resolves records in pack order (RFC 8428 §4.6) and groups them into readings.
struct Resolver<'c, 'b> {
    ctx: &'c ParseContext<'b>,
    /// The base fields in force.
    base_name: String,
    base_time: f64,
    base_value: Option<Num>,
    /// The pack's `bver` and the record that first gave it.
    version: Option<(i128, usize)>,
    groups: Vec<Group>,
    /// Groups by time and device.
    by_key: foldhash::HashMap<(i64, Option<String>), usize>,
    rejected: Vec<Rejection>,
    /// Refusals still to come from readings over [`MAX_METRICS`] metrics (each of their
    /// records will be refused), beyond the one the group already counts: part of the lower
    /// bound of the pack's total that is checked after every record.
    overfull: usize,
}

impl<'c, 'b> Resolver<'c, 'b> {
    fn new(ctx: &'c ParseContext<'b>) -> Self {
        Self {
            ctx,
            base_name: String::new(),
            base_time: 0.0,
            base_value: None,
            version: None,
            groups: Vec::new(),
            by_key: Default::default(),
            rejected: Vec::new(),
            overfull: 0,
        }
    }

    fn reject(
        &mut self,
        index: usize,
        field: String,
        reason: impl Into<String>,
        kind: RejectReason,
    ) {
        self.rejected.push(Rejection {
            index,
            error: ReadingError::new(field, reason, kind),
        });
    }

    fn not_a_record(&mut self, index: usize, kind: &str) {
        self.reject(
            index,
            format!("pack[{index}]"),
            format!("expected a record (an object of labels), not {kind}"),
            RejectReason::Malformed,
        );
    }

    /// Takes one record. `Err` refuses the whole pack: a pack-level rule is broken, or the
    /// pack already makes more readings and refusals than `limits.max_readings_per_request`
    /// (checked after every record, so work and memory stop at the limit; the count given is
    /// how many were made when it was passed).
    fn record(&mut self, index: usize, fields: &[(Key<'_>, Field<'_>)]) -> Result<(), BatchError> {
        self.resolve(index, fields)?;
        let at_least = self.groups.len() + self.rejected.len() + self.overfull;
        if at_least > self.ctx.max_readings {
            return Err(BatchError::TooMany {
                count: at_least,
                limit: self.ctx.max_readings,
            });
        }
        Ok(())
    }

    fn resolve(&mut self, index: usize, fields: &[(Key<'_>, Field<'_>)]) -> Result<(), BatchError> {
        let mut seen = 0u16;
        let mut reading_field = None;
        let mut repeated = None;
        let mut own: [Option<&Field<'_>>; 15] = Default::default();
        // Base fields first: they apply to this record too.
        for (key, field) in fields {
            let label =
                match key {
                    Key::Known(l) => *l,
                    Key::MustUnderstand(name) => return Err(pack_error(
                        index,
                        name,
                        "a must-understand label (ending in `_`) that Sluice does not know, so \
                         the pack cannot be used (RFC 8428 §4.4)",
                    )),
                    Key::ReadingField(name) => {
                        reading_field.get_or_insert(*name);
                        continue;
                    }
                    Key::Ignored => continue,
                };
            if seen & label.bit() != 0 {
                if label.is_base() {
                    return Err(pack_error(index, label.name(), "given more than once"));
                }
                repeated.get_or_insert(label);
            }
            seen |= label.bit();
            own[label as usize] = Some(field);
            let wrong = |expected: &str| {
                pack_error(
                    index,
                    label.name(),
                    format!("expected {expected}, not {}", field.kind()),
                )
            };
            match label {
                Label::Bver => {
                    let v = match field {
                        Field::Num(Num::Int(v)) if *v >= 1 => *v,
                        _ => return Err(wrong("a positive integer")),
                    };
                    if v > SENML_VERSION {
                        return Err(pack_error(
                            index,
                            "bver",
                            format!(
                                "version {v} is newer than {SENML_VERSION}, the SenML version \
                                 Sluice understands (RFC 8428 §4.4)"
                            ),
                        ));
                    }
                    match self.version {
                        Some((w, j)) if w != v => {
                            return Err(pack_error(
                                index,
                                "bver",
                                format!(
                                    "{v} differs from {w} given in pack[{j}]; one pack has one \
                                     version"
                                ),
                            ))
                        }
                        Some(_) => {}
                        None => self.version = Some((v, index)),
                    }
                }
                Label::Bn => match field {
                    Field::Text(t) => {
                        self.base_name.clear();
                        self.base_name.push_str(t);
                    }
                    _ => return Err(wrong("a text string")),
                },
                Label::Bt => {
                    self.base_time = field.finite().ok_or_else(|| wrong("a finite number"))?
                }
                Label::Bv => match field {
                    Field::Num(n @ Num::Int(_)) => self.base_value = Some(*n),
                    Field::Num(n @ Num::Float(f)) if f.is_finite() => self.base_value = Some(*n),
                    _ => return Err(wrong("a finite number")),
                },
                // Units and sums are not kept.
                Label::Bu | Label::Bs => {}
                _ => {}
            }
        }
        let get = |l: Label| own[l as usize];
        use RejectReason::*;
        if let Some(name) = reading_field {
            self.reject(
                index,
                at(index, name),
                "a field of Sluice's JSON readings in a SenML pack: send readings as JSON \
                 (`device_id`, `metrics`) or records as SenML (`n`, `v`), not both in one array",
                Malformed,
            );
            return Ok(());
        }
        if let Some(label) = repeated {
            self.reject(
                index,
                at(index, label.name()),
                "given more than once",
                Malformed,
            );
            return Ok(());
        }
        if get(Label::Vs).is_some() {
            self.reject(
                index,
                at(index, "vs"),
                "a string value cannot be stored: Sluice keeps numbers (`v`) and booleans (`vb`)",
                UnsupportedValue,
            );
            return Ok(());
        }
        if get(Label::Vd).is_some() {
            self.reject(
                index,
                at(index, "vd"),
                "a data value cannot be stored: Sluice keeps numbers (`v`) and booleans (`vb`)",
                UnsupportedValue,
            );
            return Ok(());
        }
        let value = match (get(Label::V), get(Label::Vb)) {
            (Some(_), Some(_)) => {
                self.reject(
                    index,
                    format!("pack[{index}]"),
                    "both `v` and `vb`: a record carries one value",
                    Malformed,
                );
                return Ok(());
            }
            (None, None) => {
                if get(Label::S).is_some() {
                    self.reject(
                        index,
                        at(index, "s"),
                        "a sum without a value cannot be stored: Sluice keeps `v` and `vb`",
                        UnsupportedValue,
                    );
                } else if get(Label::N).is_some()
                    || get(Label::T).is_some()
                    || !fields
                        .iter()
                        .any(|(k, _)| matches!(k, Key::Known(l) if l.is_base()))
                {
                    // A record with no value and no base field (even no known label at all)
                    // cannot be a base-field record: it is refused, never dropped unseen.
                    self.reject(
                        index,
                        format!("pack[{index}]"),
                        "no value: expected `v` or `vb`",
                        Malformed,
                    );
                }
                // Otherwise a record of base fields only (RFC 8428 §5.1.7): nothing to store.
                return Ok(());
            }
            (Some(v), None) => match self.number(v) {
                Ok(value) => value,
                Err(reason) => {
                    self.reject(index, at(index, "v"), reason, InvalidMetrics);
                    return Ok(());
                }
            },
            (None, Some(Field::Bool(b))) => MetricValue::Bool(*b),
            (None, Some(other)) => {
                let reason = format!("expected a boolean, not {}", other.kind());
                self.reject(index, at(index, "vb"), reason, InvalidMetrics);
                return Ok(());
            }
        };
        let mut name = self.base_name.clone();
        match get(Label::N) {
            None => {}
            Some(Field::Text(n)) => name.push_str(n),
            Some(other) => {
                let reason = format!("expected a text string, not {}", other.kind());
                self.reject(index, at(index, "n"), reason, InvalidMetrics);
                return Ok(());
            }
        }
        if name.is_empty() {
            self.reject(
                index,
                at(index, "n"),
                "the resolved name is empty (no `bn`, no `n`)",
                InvalidMetrics,
            );
            return Ok(());
        }
        let ts_ms = match self.time(get(Label::T)) {
            Ok(ms) => ms,
            Err(reason) => {
                self.reject(index, at(index, "t"), reason, InvalidTs);
                return Ok(());
            }
        };
        let (device, metric_at) = match name.rfind('/') {
            Some(slash) => (Some(&name[..slash]), slash + 1),
            None => (None, 0),
        };
        if metric_at == name.len() {
            let reason = format!("`{name}` ends in `/`, leaving no metric name after the device");
            self.reject(index, at(index, "n"), reason, InvalidMetrics);
            return Ok(());
        }
        let device = device
            .map(str::to_owned)
            .or_else(|| self.ctx.default_device().map(|d| d.as_str().to_owned()));
        let seq = match (&name[metric_at..], value) {
            ("seq", MetricValue::Int(n)) if n < 0 => {
                let reason = format!("seq {n} is negative; seq is an unsigned integer");
                self.reject(index, at(index, "v"), reason, InvalidSeq);
                return Ok(());
            }
            ("seq", MetricValue::Int(n)) => Some(n as u64),
            ("seq", MetricValue::UInt(n)) => Some(n),
            _ => None,
        };
        let g = self.group(device, ts_ms);
        let group = &mut self.groups[g];
        if let Some(seq) = seq {
            match group.seq {
                Some((s, j)) if s != seq => {
                    let reason = format!(
                        "seq {seq} differs from {s} given in pack[{j}] for the same reading"
                    );
                    self.reject(index, at(index, "v"), reason, InvalidSeq);
                }
                Some(_) => {}
                None => group.seq = Some((seq, index)),
            }
            return Ok(());
        }
        // Past MAX_METRICS metrics the reading is refused whole, so its names need no more
        // comparing (which keeps this search bounded).
        let duplicate = match group.metrics.len() {
            n if n > MAX_METRICS => None,
            _ => group
                .metrics
                .iter()
                .find(|e| e.metric() == &name[metric_at..]),
        };
        if let Some(first) = duplicate {
            let reason = format!(
                "`{}` at {} is already given by pack[{}] (units are not kept, so records that \
                 differ only by `u` collide)",
                &name[metric_at..],
                format_ts(ts_ms),
                first.index
            );
            self.reject(index, at(index, "n"), reason, InvalidMetrics);
            return Ok(());
        }
        group.metrics.push(Entry {
            name,
            metric_at,
            value,
            index,
        });
        // Every record of a reading over MAX_METRICS is refused in the end.
        match group.metrics.len() {
            n if n == MAX_METRICS + 1 => self.overfull += MAX_METRICS,
            n if n > MAX_METRICS + 1 => self.overfull += 1,
            _ => {}
        }
        Ok(())
    }

    /// `v` plus the base value, integers kept exact.
    fn number(&self, v: &Field<'_>) -> Result<MetricValue, String> {
        let out_of_range = |digits: &dyn fmt::Display| {
            format!(
                "integer {digits} is outside {}..{}, the range kept exactly",
                i64::MIN,
                u64::MAX
            )
        };
        let v = match v {
            Field::Num(n) => *n,
            other => return Err(format!("expected a number, not {}", other.kind())),
        };
        let sum = match (v, self.base_value) {
            (Num::TooBig, _) | (_, Some(Num::TooBig)) => {
                return Err(out_of_range(&"beyond 128 bits"))
            }
            (Num::Int(v), None) => Num::Int(v),
            (Num::Int(v), Some(Num::Int(b))) => match v.checked_add(b) {
                Some(s) => Num::Int(s),
                None => return Err(out_of_range(&"beyond 128 bits")),
            },
            (Num::Int(v), Some(Num::Float(b))) => Num::Float(v as f64 + b),
            (Num::Float(v), None) => Num::Float(v),
            (Num::Float(v), Some(Num::Int(b))) => Num::Float(v + b as f64),
            (Num::Float(v), Some(Num::Float(b))) => Num::Float(v + b),
        };
        match sum {
            Num::Int(i) => i64::try_from(i)
                .map(MetricValue::Int)
                .or_else(|_| u64::try_from(i).map(MetricValue::UInt))
                .map_err(|_| out_of_range(&i)),
            Num::Float(f) if f.is_finite() => Ok(MetricValue::Float(f)),
            _ => Err("expected a finite number".into()),
        }
    }

    /// The record's time in epoch milliseconds: `bt` + `t`, relative to the receive time
    /// below 2^28 s.
    fn time(&self, t: Option<&Field<'_>>) -> Result<i64, String> {
        let t = match t {
            None => 0.0,
            Some(f) => f
                .finite()
                .ok_or_else(|| format!("expected a finite number of seconds, not {}", f.kind()))?,
        };
        let seconds = self.base_time + t;
        let ms = (seconds * 1000.0).round();
        // `as` saturates; the bounds keep only exact conversions.
        let ms =
            (ms.is_finite() && ms >= i64::MIN as f64 && ms < i64::MAX as f64).then_some(ms as i64);
        let ms = if seconds < RELATIVE_BELOW_S {
            ms.and_then(|ms| self.ctx.now_ms.checked_add(ms))
        } else {
            ms
        };
        ms.ok_or_else(|| format!("time {seconds:?} s is out of range"))
    }

    /// The group of `device` at `ts_ms`, made if new.
    fn group(&mut self, device: Option<String>, ts_ms: i64) -> usize {
        let next = self.groups.len();
        match self.by_key.entry((ts_ms, device)) {
            std::collections::hash_map::Entry::Occupied(g) => *g.get(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let device = slot.key().1.clone();
                slot.insert(next);
                self.groups.push(Group {
                    device,
                    ts_ms,
                    seq: None,
                    metrics: Vec::new(),
                });
                next
            }
        }
    }

    fn finish(mut self) -> Result<ParsedBatch, BatchError> {
        let ctx = self.ctx;
        let too_many = |count| BatchError::TooMany {
            count,
            limit: ctx.max_readings,
        };
        // Validation only turns readings into refusals, never fewer: refuse early.
        let at_least = self.groups.len() + self.rejected.len();
        if at_least > ctx.max_readings {
            return Err(too_many(at_least));
        }
        let mut readings = Vec::with_capacity(self.groups.len());
        for group in std::mem::take(&mut self.groups) {
            match group.parts(group.metrics.iter()).validate(ctx) {
                Ok(r) => readings.push(r),
                Err(e) => self.attribute(&group, e, &mut readings),
            }
        }
        let total = readings.len() + self.rejected.len();
        if total > ctx.max_readings {
            return Err(too_many(total));
        }
        self.rejected.sort_by_key(|r| r.index);
        Ok(ParsedBatch {
            readings,
            rejected: self.rejected,
        })
    }

    /// A reading broke SPEC §1's rules: refuses each record that breaks them alone and takes
    /// the rest; if none does, the reading as a whole is at fault and all its records carry
    /// its error.
    fn attribute(&mut self, group: &Group, error: ReadingError, readings: &mut Vec<Reading>) {
        let ctx = self.ctx;
        let mut good = Vec::with_capacity(group.metrics.len());
        for e in &group.metrics {
            let alone = Group {
                device: group.device.clone(),
                ts_ms: group.ts_ms,
                seq: None,
                metrics: Vec::new(),
            };
            match alone.parts(std::iter::once(e)).validate(ctx) {
                Ok(_) => good.push(e),
                Err(error) => self.rejected.push(Rejection {
                    index: e.index,
                    error,
                }),
            }
        }
        let mut refuse_all = |good: &[&Entry], error: ReadingError| {
            let seq_record = group.seq.map(|(_, i)| i);
            for index in good.iter().map(|e| e.index).chain(seq_record) {
                self.rejected.push(Rejection {
                    index,
                    error: error.clone(),
                });
            }
        };
        if good.len() == group.metrics.len() || good.is_empty() {
            refuse_all(&good, error);
            return;
        }
        match group.parts(good.iter().copied()).validate(ctx) {
            Ok(r) => readings.push(r),
            Err(error) => refuse_all(&good, error),
        }
    }
}

/// A JSON record: its labels and their values, in order (repeats kept, so they are refused).
struct JsonRecord<'a>(Vec<(Key<'a>, Field<'a>)>);

impl<'de> serde::Deserialize<'de> for JsonRecord<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = JsonRecord<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a SenML record")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(CowStr(key)) = map.next_key::<CowStr<'de>>()? {
                    let raw = map.next_value::<&'de RawValue>()?;
                    out.push((Key::text(key), json_field(raw.get())));
                }
                Ok(JsonRecord(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// What the text of a valid JSON value is, for errors.
fn json_kind(text: &str) -> &'static str {
    match text.as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'[') => "an array",
        Some(b'{') => "an object",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// The value of a field, from its JSON text (already checked to be a JSON value).
fn json_field(text: &str) -> Field<'_> {
    match text.as_bytes().first() {
        Some(b'"') => match serde_json::from_str::<CowStr>(text) {
            Ok(CowStr(t)) => Field::Text(t),
            Err(_) => Field::Other("a string"),
        },
        Some(b't') => Field::Bool(true),
        Some(b'f') => Field::Bool(false),
        Some(b'-' | b'0'..=b'9') => {
            let digits = text.strip_prefix('-').unwrap_or(text);
            if digits.bytes().all(|b| b.is_ascii_digit()) {
                if text == "-0" {
                    // As JSON readings read it: a negative zero.
                    return Field::Num(Num::Float(-0.0));
                }
                Field::Num(text.parse().map_or(Num::TooBig, Num::Int))
            } else {
                // Rust's correctly rounded parse: the same f64 as the JSON reading parser's.
                Field::Num(text.parse().map_or(Num::Float(f64::NAN), Num::Float))
            }
        }
        _ => Field::Other(json_kind(text)),
    }
}

/// Probes the first record of a payload: `true` when it has a SenML label and no reading
/// field.
struct FirstRecord(bool);

impl<'de> serde::Deserialize<'de> for FirstRecord {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FirstRecord;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a record")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut senml, mut reading) = (false, false);
                while let Some(CowStr(key)) = map.next_key::<CowStr<'de>>()? {
                    map.next_value::<IgnoredAny>()?;
                    match &*key {
                        "device_id" | "metrics" => reading = true,
                        k => senml |= Label::ALL.iter().any(|(_, name, _)| *name == k),
                    }
                }
                Ok(FirstRecord(senml && !reading))
            }
        }
        d.deserialize_map(V)
    }
}

/// What a CBOR body that is not an array is instead, for the error (arrays are read one
/// record at a time by [`parse_senml_cbor`]).
struct CborPack(&'static str);

/// A CBOR record's labels and values, or what the element was instead of a map.
type CborRecord = Result<Vec<(Key<'static>, Field<'static>)>, &'static str>;

/// Reads a CBOR tag (ciborium hands tags over as enums): a tag 55799 (self-described CBOR,
/// no meaning of its own) yields its item as `T`; any other tag skips its item and yields
/// `other(tag)`.
fn tagged<'de, A, T>(data: A, other: fn(u64) -> T) -> Result<T, A::Error>
where
    A: EnumAccess<'de>,
    T: serde::Deserialize<'de>,
{
    struct Inner<T>(fn(u64) -> T);
    impl<'de, T: serde::Deserialize<'de>> Visitor<'de> for Inner<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a tag number and its item")
        }
        fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<T, S::Error> {
            let tag: u64 = seq
                .next_element()?
                .ok_or_else(|| de::Error::custom("a tag without its number"))?;
            if tag == 55799 {
                return seq
                    .next_element::<T>()?
                    .ok_or_else(|| de::Error::custom("a tag without its item"));
            }
            seq.next_element::<IgnoredAny>()?;
            Ok((self.0)(tag))
        }
    }
    let (_, variant): (IgnoredAny, _) = data.variant()?;
    variant.tuple_variant(2, Inner(other))
}

/// Consumes a whole array, map or tag that is not wanted where it is.
fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Implements the listed scalar `visit_*` methods of a CBOR visitor, each returning
/// `Ok($f(kind))` where `kind` names what was found.
macro_rules! other_scalars {
    ($f:expr; $($m:ident),*) => { $( other_scalars!(@ $m $f); )* };
    (@ visit_bool $f:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> { Ok($f("a boolean")) }
    };
    (@ visit_i64 $f:expr) => {
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> { Ok($f("an integer")) }
    };
    (@ visit_i128 $f:expr) => {
        fn visit_i128<E: de::Error>(self, _: i128) -> Result<Self::Value, E> { Ok($f("an integer")) }
    };
    (@ visit_u64 $f:expr) => {
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> { Ok($f("an integer")) }
    };
    (@ visit_u128 $f:expr) => {
        fn visit_u128<E: de::Error>(self, _: u128) -> Result<Self::Value, E> { Ok($f("an integer")) }
    };
    (@ visit_f64 $f:expr) => {
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> { Ok($f("a float")) }
    };
    (@ visit_str $f:expr) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> { Ok($f("a text string")) }
    };
    (@ visit_bytes $f:expr) => {
        fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Self::Value, E> { Ok($f("a byte string")) }
    };
    (@ visit_none $f:expr) => {
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> { Ok($f("null")) }
    };
    (@ visit_unit $f:expr) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> { Ok($f("null")) }
    };
}

impl<'de> serde::Deserialize<'de> for CborPack {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CborPack;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a SenML pack")
            }
            other_scalars!(CborPack; visit_bool, visit_i64, visit_i128, visit_u64, visit_u128, visit_f64, visit_str, visit_bytes, visit_none, visit_unit);
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<CborPack, A::Error> {
                skip_seq(seq)?;
                Ok(CborPack("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<CborPack, A::Error> {
                skip_map(map)?;
                Ok(CborPack("a map"))
            }
            fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<CborPack, A::Error> {
                tagged(data, |_| CborPack("a tagged item"))
            }
        }
        d.deserialize_any(V)
    }
}

/// Deserialises one [`CborRecord`].
struct CborRecordDe(CborRecord);

impl<'de> serde::Deserialize<'de> for CborRecordDe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CborRecordDe;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a SenML record")
            }
            other_scalars!(|k| CborRecordDe(Err(k)); visit_bool, visit_i64, visit_i128, visit_u64, visit_u128, visit_f64, visit_str, visit_bytes, visit_none, visit_unit);
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(CborKey(key)) = map.next_key()? {
                    let CborField(field) = map.next_value()?;
                    out.push((key, field));
                }
                Ok(CborRecordDe(Ok(out)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                skip_seq(seq)?;
                Ok(CborRecordDe(Err("an array")))
            }
            fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
                tagged(data, |_| CborRecordDe(Err("a tagged item")))
            }
        }
        d.deserialize_any(V)
    }
}

/// A CBOR label: an integer of RFC 8428 Table 4, or a text label as in JSON.
struct CborKey(Key<'static>);

impl<'de> serde::Deserialize<'de> for CborKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CborKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a SenML label")
            }
            other_scalars!(|_| CborKey(Key::Ignored); visit_bool, visit_i128, visit_u128, visit_f64, visit_bytes, visit_none, visit_unit);
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<CborKey, E> {
                Ok(CborKey(Key::int(v.into())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<CborKey, E> {
                Ok(CborKey(Key::int(v.into())))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CborKey, E> {
                Ok(CborKey(Key::text(Cow::Owned(v.to_owned()))))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<CborKey, A::Error> {
                skip_seq(seq)?;
                Ok(CborKey(Key::Ignored))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<CborKey, A::Error> {
                skip_map(map)?;
                Ok(CborKey(Key::Ignored))
            }
            fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<CborKey, A::Error> {
                tagged(data, |_| CborKey(Key::Ignored))
            }
        }
        d.deserialize_any(V)
    }
}

/// A CBOR field value.
struct CborField(Field<'static>);

impl<'de> serde::Deserialize<'de> for CborField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CborField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a SenML value")
            }
            other_scalars!(|k| CborField(Field::Other(k)); visit_bytes, visit_none, visit_unit);
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<CborField, E> {
                Ok(CborField(Field::Bool(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<CborField, E> {
                Ok(CborField(Field::Num(Num::Int(v.into()))))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<CborField, E> {
                Ok(CborField(Field::Num(Num::Int(v))))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<CborField, E> {
                Ok(CborField(Field::Num(Num::Int(v.into()))))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<CborField, E> {
                Ok(CborField(Field::Num(
                    i128::try_from(v).map_or(Num::TooBig, Num::Int),
                )))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<CborField, E> {
                Ok(CborField(Field::Num(Num::Float(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CborField, E> {
                Ok(CborField(Field::Text(Cow::Owned(v.to_owned()))))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<CborField, A::Error> {
                skip_seq(seq)?;
                Ok(CborField(Field::Other("an array")))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<CborField, A::Error> {
                skip_map(map)?;
                Ok(CborField(Field::Other("a map")))
            }
            fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<CborField, A::Error> {
                tagged(data, |tag| {
                    CborField(match tag {
                        // Bignums beyond the 128 bits ciborium reads as integers.
                        2 | 3 => Field::Num(Num::TooBig),
                        _ => Field::Other("a tagged item"),
                    })
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ciborium::value::Value;

    use super::*;
    use crate::reading::DeviceId;

    const NOW: i64 = 1_795_000_000_000; // 2026-11-17

    /// The RFC's examples are from 2010 and 2011: a window wide enough to take them.
    fn ctx() -> ParseContext<'static> {
        ParseContext {
            now_ms: NOW,
            max_future_skew: Duration::from_secs(300),
            max_age: Duration::from_secs(20 * 365 * 86400),
            max_readings: 10_000,
            bound_device: None,
            token_device: None,
        }
    }

    fn bound() -> &'static DeviceId {
        Box::leak(Box::new(DeviceId::parse("dev-1").unwrap()))
    }

    fn bound_ctx() -> ParseContext<'static> {
        ParseContext {
            bound_device: Some(bound()),
            token_device: None,
            ..ctx()
        }
    }

    fn json(text: &str, ctx: &ParseContext<'_>) -> ParsedBatch {
        parse_senml_json(text, ctx).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    /// A reading as `(device, ts, [(metric, value)])`.
    type Flat = (String, i64, Vec<(String, MetricValue)>);

    fn readings(b: &ParsedBatch) -> Vec<Flat> {
        b.readings
            .iter()
            .map(|r| (r.device_id.to_string(), r.ts_ms, r.metrics.clone()))
            .collect()
    }

    fn rejections(b: &ParsedBatch) -> Vec<(usize, RejectReason, String)> {
        b.rejected
            .iter()
            .map(|r| (r.index, r.error.kind, r.error.to_string()))
            .collect()
    }

    fn f(v: f64) -> MetricValue {
        MetricValue::Float(v)
    }

    fn m(name: &str, v: MetricValue) -> (String, MetricValue) {
        (name.to_string(), v)
    }

    /// The same pack in SenML-CBOR with the integer labels of RFC 8428 §6, built from the
    /// JSON text (numbers keep their JSON kind: an integer literal is a CBOR integer).
    fn to_cbor(text: &str) -> Vec<u8> {
        fn conv(v: &serde_json::Value, key: bool) -> Value {
            match v {
                serde_json::Value::String(s) if key => {
                    match Label::ALL.iter().find(|(_, name, _)| name == s) {
                        Some((_, _, n)) => Value::Integer((*n as i64).into()),
                        None => Value::Text(s.clone()),
                    }
                }
                serde_json::Value::String(s) => Value::Text(s.clone()),
                serde_json::Value::Bool(b) => Value::Bool(*b),
                serde_json::Value::Null => Value::Null,
                serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                    (Some(i), _) => Value::Integer(i.into()),
                    (_, Some(u)) => Value::Integer(u.into()),
                    _ => Value::Float(n.as_f64().unwrap()),
                },
                serde_json::Value::Array(a) => {
                    Value::Array(a.iter().map(|v| conv(v, false)).collect())
                }
                serde_json::Value::Object(o) => Value::Map(
                    o.iter()
                        .map(|(k, v)| {
                            (
                                conv(&serde_json::Value::String(k.clone()), true),
                                conv(v, false),
                            )
                        })
                        .collect(),
                ),
            }
        }
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        let mut out = Vec::new();
        ciborium::into_writer(&conv(&v, false), &mut out).unwrap();
        out
    }

    /// Parses `text` as SenML JSON and as SenML-CBOR, checks both agree, returns one.
    fn both(text: &str, ctx: &ParseContext<'_>) -> ParsedBatch {
        let j = json(text, ctx);
        let c = parse_senml_cbor(&to_cbor(text), ctx).unwrap();
        assert_eq!(readings(&j), readings(&c), "{text}");
        assert_eq!(rejections(&j), rejections(&c), "{text}");
        j
    }

    // RFC 8428 §5.1.1.
    const SINGLE_DATAPOINT: &str = r#"[
     {"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}
    ]"#;

    // RFC 8428 §5.1.2, first example.
    const MULTIPLE_DATAPOINTS: &str = r#"[
     {"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},
     {"n":"current","u":"A","v":1.2}
    ]"#;

    // RFC 8428 §5.1.2, second example.
    const MULTIPLE_DATAPOINTS_TIMED: &str = r#"[
     {"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,
      "bu":"A","bver":5,
      "n":"voltage","u":"V","v":120.1},
     {"n":"current","t":-5,"v":1.2},
     {"n":"current","t":-4,"v":1.3},
     {"n":"current","t":-3,"v":1.4},
     {"n":"current","t":-2,"v":1.5},
     {"n":"current","t":-1,"v":1.6},
     {"n":"current","v":1.7}
    ]"#;

    // RFC 8428 §5.1.3.
    const MULTIPLE_MEASUREMENTS: &str = r#"[
     {"bn":"urn:dev:ow:10e2073a01080063","bt":1.320067464e+09,
      "bu":"%RH","v":20},
     {"u":"lon","v":24.30621},
     {"u":"lat","v":60.07965},
     {"t":60,"v":20.3},
     {"u":"lon","t":60,"v":24.30622},
     {"u":"lat","t":60,"v":60.07965},
     {"t":120,"v":20.7},
     {"u":"lon","t":120,"v":24.30623},
     {"u":"lat","t":120,"v":60.07966},
     {"u":"%EL","t":150,"v":98},
     {"t":180,"v":21.2},
     {"u":"lon","t":180,"v":24.30628},
     {"u":"lat","t":180,"v":60.07967}
    ]"#;

    // RFC 8428 §5.1.4: §5.1.3 resolved.
    const RESOLVED: &str = r#"[
     {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067464e+09,
      "v":20},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067464e+09,
      "v":24.30621},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067464e+09,
      "v":60.07965},
     {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067524e+09,
      "v":20.3},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067524e+09,
      "v":24.30622},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067524e+09,
      "v":60.07965},
     {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067584e+09,
      "v":20.7},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067584e+09,
      "v":24.30623},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067584e+09,
      "v":60.07966},
     {"n":"urn:dev:ow:10e2073a01080063","u":"%EL","t":1.320067614e+09,
      "v":98},
     {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067644e+09,
      "v":21.2},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067644e+09,
      "v":24.30628},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067644e+09,
      "v":60.07967}
    ]"#;

    // RFC 8428 §5.1.5.
    const MULTIPLE_DATA_TYPES: &str = r#"[
     {"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","u":"Cel","v":23.1},
     {"n":"label","vs":"Machine Room"},
     {"n":"open","vb":false},
     {"n":"nfc-reader","vd":"aGkgCg"}
    ]"#;

    // RFC 8428 §5.1.6: names with a `/`, so the device comes from the name.
    const COLLECTION_OF_RESOURCES: &str = r#"[
     {"bn":"2001:db8::2/","bt":1.320078429e+09,
      "n":"temperature","u":"Cel","v":25.2},
     {"n":"humidity","u":"%RH","v":30},
     {"bn":"2001:db8::1/","n":"temperature","u":"Cel","v":12.3},
     {"n":"humidity","u":"%RH","v":67}
    ]"#;

    // RFC 8428 §5.1.7: a first record of base fields only.
    const SETTING_AN_ACTUATOR: &str = r#"[
     {"bn":"urn:dev:ow:10e2073a01080063:"},
     {"n":"temp","u":"Cel","v":23.1},
     {"n":"heat","u":"/","v":1},
     {"n":"fan","u":"/","v":0}
    ]"#;

    #[test]
    fn rfc_5_1_1_single_datapoint() {
        let b = both(SINGLE_DATAPOINT, &bound_ctx());
        assert_eq!(
            readings(&b),
            vec![(
                "dev-1".into(),
                NOW,
                vec![m("urn:dev:ow:10e2073a01080063", f(23.1))]
            )]
        );
        assert!(b.rejected.is_empty());
        // Without a bound device: JSON's error for a missing device_id.
        let b = both(SINGLE_DATAPOINT, &ctx());
        assert_eq!(
            rejections(&b),
            vec![(
                0,
                RejectReason::InvalidDeviceId,
                "device_id: required (or bound by the transport)".into()
            )]
        );
    }

    #[test]
    fn rfc_5_1_2_multiple_datapoints_group_into_one_reading() {
        let b = both(MULTIPLE_DATAPOINTS, &bound_ctx());
        assert_eq!(
            readings(&b),
            vec![(
                "dev-1".into(),
                NOW,
                vec![
                    m("urn:dev:ow:10e2073a01080063:voltage", f(120.1)),
                    m("urn:dev:ow:10e2073a01080063:current", f(1.2)),
                ]
            )]
        );
        let b = both(MULTIPLE_DATAPOINTS_TIMED, &bound_ctx());
        let bt = 1_276_020_076_001; // Tue Jun 8 18:01:16.001 UTC 2010
        let name = |n: &str| format!("urn:dev:ow:10e2073a0108006:{n}");
        let mut want = vec![(
            "dev-1".to_string(),
            bt,
            vec![m(&name("voltage"), f(120.1)), m(&name("current"), f(1.7))],
        )];
        for (i, v) in [1.2, 1.3, 1.4, 1.5, 1.6].into_iter().enumerate() {
            want.push((
                "dev-1".into(),
                bt - (5 - i as i64) * 1000,
                vec![m(&name("current"), f(v))],
            ));
        }
        assert_eq!(readings(&b), want);
        assert_eq!(crate::reading::format_ts(bt), "2010-06-08T18:01:16.001Z");
    }

    #[test]
    fn rfc_5_1_3_and_5_1_4_resolve_alike_and_units_do_not_separate_metrics() {
        let b = both(MULTIPLE_MEASUREMENTS, &bound_ctx());
        let bt = 1_320_067_464_000; // Mon Oct 31 13:24:24 UTC 2011
        let name = "urn:dev:ow:10e2073a01080063";
        let want: Vec<_> = [
            (0, MetricValue::Int(20)),
            (60, f(20.3)),
            (120, f(20.7)),
            (150, MetricValue::Int(98)),
            (180, f(21.2)),
        ]
        .into_iter()
        .map(|(t, v)| ("dev-1".to_string(), bt + t * 1000, vec![m(name, v)]))
        .collect();
        assert_eq!(readings(&b), want);
        // The lon/lat records differ from the %RH ones only by unit: refused by index.
        let errs = rejections(&b);
        assert_eq!(
            errs.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![1, 2, 4, 5, 7, 8, 11, 12]
        );
        assert_eq!(
            errs[0].2,
            "pack[1].n: `urn:dev:ow:10e2073a01080063` at 2011-10-31T13:24:24.000Z is already given by pack[0] (units are not kept, so records that differ only by `u` collide)"
        );
        assert!(errs.iter().all(|e| e.1 == RejectReason::InvalidMetrics));
        let r = both(RESOLVED, &bound_ctx());
        assert_eq!(readings(&r), readings(&b));
        assert_eq!(
            rejections(&r).iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![1, 2, 4, 5, 7, 8, 11, 12]
        );
    }

    #[test]
    fn rfc_5_1_5_multiple_data_types() {
        let b = both(MULTIPLE_DATA_TYPES, &bound_ctx());
        assert_eq!(
            readings(&b),
            vec![(
                "dev-1".into(),
                NOW,
                vec![
                    m("urn:dev:ow:10e2073a01080063:temp", f(23.1)),
                    m("urn:dev:ow:10e2073a01080063:open", MetricValue::Bool(false)),
                ]
            )]
        );
        assert_eq!(
            rejections(&b),
            vec![
                (1, RejectReason::UnsupportedValue, "pack[1].vs: a string value cannot be stored: Sluice keeps numbers (`v`) and booleans (`vb`)".into()),
                (3, RejectReason::UnsupportedValue, "pack[3].vd: a data value cannot be stored: Sluice keeps numbers (`v`) and booleans (`vb`)".into()),
            ]
        );
    }

    #[test]
    fn rfc_5_1_6_and_5_1_7_devices_from_names_and_base_only_records() {
        let b = both(COLLECTION_OF_RESOURCES, &ctx());
        let bt = 1_320_078_429_000;
        assert_eq!(
            readings(&b),
            vec![
                (
                    "2001:db8::2".into(),
                    bt,
                    vec![
                        m("temperature", f(25.2)),
                        m("humidity", MetricValue::Int(30))
                    ]
                ),
                (
                    "2001:db8::1".into(),
                    bt,
                    vec![
                        m("temperature", f(12.3)),
                        m("humidity", MetricValue::Int(67))
                    ]
                ),
            ]
        );
        let b = both(SETTING_AN_ACTUATOR, &bound_ctx());
        assert_eq!(b.total(), 1);
        assert_eq!(
            readings(&b)[0].2,
            vec![
                m("urn:dev:ow:10e2073a01080063:temp", f(23.1)),
                m("urn:dev:ow:10e2073a01080063:heat", MetricValue::Int(1)),
                m("urn:dev:ow:10e2073a01080063:fan", MetricValue::Int(0)),
            ]
        );
    }

    #[test]
    fn the_name_splits_at_its_last_slash() {
        let b = both(
            r#"[{"bn":"dev-2/","n":"temp","v":1},
                {"bn":"","n":"dev-3/rh","v":2},
                {"bn":"site/dev-4/","n":"t","v":3},
                {"bn":"","n":"dev-5/","v":4},
                {"n":"/lonely","v":5}]"#,
            &ctx(),
        );
        assert_eq!(
            readings(&b),
            vec![
                ("dev-2".into(), NOW, vec![m("temp", MetricValue::Int(1))]),
                ("dev-3".into(), NOW, vec![m("rh", MetricValue::Int(2))]),
            ]
        );
        let errs = rejections(&b);
        assert_eq!(
            errs[0],
            (
                2,
                RejectReason::InvalidDeviceId,
                "device_id: '/' is not allowed (use A-Z a-z 0-9 _ : -)".into()
            )
        );
        assert_eq!(
            errs[1],
            (
                3,
                RejectReason::InvalidMetrics,
                "pack[3].n: `dev-5/` ends in `/`, leaving no metric name after the device".into()
            )
        );
        assert_eq!(
            errs[2],
            (
                4,
                RejectReason::InvalidDeviceId,
                "device_id: must not be empty".into()
            )
        );
        // A bound device must agree with a name's device.
        let b = both(
            r#"[{"n":"dev-1/a","v":1},{"n":"b","v":2},{"n":"dev-9/c","v":3}]"#,
            &bound_ctx(),
        );
        assert_eq!(
            readings(&b),
            vec![(
                "dev-1".into(),
                NOW,
                vec![m("a", MetricValue::Int(1)), m("b", MetricValue::Int(2))]
            )]
        );
        assert_eq!(rejections(&b)[0].1, RejectReason::DeviceMismatch);
    }

    #[test]
    fn relative_times_and_rounding() {
        let b = both(
            r#"[{"n":"d/a","t":-10,"v":1},{"n":"d/b","v":2},{"n":"d/c","t":0.0015,"v":3},
                {"bt":-20,"n":"d/e","t":5,"v":4},{"n":"d/f","t":1.795e9,"v":5}]"#,
            &ctx(),
        );
        let ts: Vec<i64> = b.readings.iter().map(|r| r.ts_ms).collect();
        // `bt` carries forward: the last record is at 1.795e9 - 20 s, absolute.
        assert_eq!(
            ts,
            vec![NOW - 10_000, NOW, NOW + 2, NOW - 15_000, NOW - 20_000]
        );
        // A time past the window: JSON's error, by index.
        let b = both(
            r#"[{"n":"d/a","t":3600,"v":1},{"n":"d/b","t":1e300,"v":2},{"n":"d/c","t":"x","v":3}]"#,
            &ctx(),
        );
        let errs = rejections(&b);
        assert_eq!(errs[0].1, RejectReason::InvalidTs);
        assert!(
            errs[0].2.starts_with("ts: ") && errs[0].2.ends_with("in the future"),
            "{errs:?}"
        );
        assert_eq!(
            errs[1],
            (
                1,
                RejectReason::InvalidTs,
                "pack[1].t: time 1e300 s is out of range".into()
            )
        );
        assert_eq!(
            errs[2],
            (
                2,
                RejectReason::InvalidTs,
                "pack[2].t: expected a finite number of seconds, not a text string".into()
            )
        );
    }

    #[test]
    fn values_integers_exact_and_base_value() {
        let b = both(
            r#"[{"n":"d/max","v":18446744073709551615},{"n":"d/min","v":-9223372036854775808},
                {"bv":10,"n":"d/sum","v":5},{"n":"d/fsum","v":0.5},{"bv":0.25,"n":"d/mixed","v":1}]"#,
            &ctx(),
        );
        assert_eq!(
            b.readings[0].metrics,
            vec![
                m("max", MetricValue::UInt(u64::MAX)),
                m("min", MetricValue::Int(i64::MIN)),
                m("sum", MetricValue::Int(15)),
                m("fsum", f(10.5)),
                m("mixed", f(1.25)),
            ]
        );
        // JSON only: a CBOR pack built through serde_json would make -2^64 a float.
        let b = json(
            r#"[{"n":"d/big","v":-18446744073709551616},{"n":"d/str","v":"1"},{"n":"d/b","vb":1},
                {"n":"d/ok","v":1e3},{"bv":18446744073709551615,"n":"d/over","v":1}]"#,
            &ctx(),
        );
        assert_eq!(b.readings[0].metrics, vec![m("ok", f(1000.0))]);
        assert_eq!(
            rejections(&b).into_iter().map(|e| e.2).collect::<Vec<_>>(),
            vec![
                "pack[0].v: integer -18446744073709551616 is outside -9223372036854775808..18446744073709551615, the range kept exactly",
                "pack[1].v: expected a number, not a text string",
                "pack[2].vb: expected a boolean, not a number",
                "pack[4].v: integer 18446744073709551616 is outside -9223372036854775808..18446744073709551615, the range kept exactly",
            ]
        );
    }

    #[test]
    fn seq_is_our_extension() {
        let b = both(
            r#"[{"bn":"d/","n":"seq","v":7},{"n":"t","v":1.5},
                {"bt":1.79499e9,"n":"seq","v":-1},{"n":"t","v":2},
                {"bt":1.7949e9,"n":"seq","v":0.5},
                {"bt":1.7948e9,"n":"seq","v":1},{"n":"seq","v":2},{"n":"t","v":3}]"#,
            &ctx(),
        );
        let got: Vec<_> = b
            .readings
            .iter()
            .map(|r| (r.seq, r.metrics.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(7), vec![m("t", f(1.5))]),
                (None, vec![m("t", MetricValue::Int(2))]),
                (None, vec![m("seq", f(0.5))]),
                (Some(1), vec![m("t", MetricValue::Int(3))]),
            ]
        );
        let errs = rejections(&b);
        assert_eq!(
            errs[0],
            (
                2,
                RejectReason::InvalidSeq,
                "pack[2].v: seq -1 is negative; seq is an unsigned integer".into()
            )
        );
        assert_eq!(errs[1].0, 6);
        assert_eq!(errs[1].1, RejectReason::InvalidSeq);
        // A seq alone makes no reading: refused.
        let b = both(r#"[{"n":"d/seq","v":7}]"#, &ctx());
        assert_eq!(
            rejections(&b),
            vec![(
                0,
                RejectReason::InvalidMetrics,
                "metrics: at least one metric is required".into()
            )]
        );
    }

    #[test]
    fn pack_level_refusals() {
        let refused = |text: &str| {
            let j = parse_senml_json(text, &ctx()).unwrap_err();
            let c = parse_senml_cbor(&to_cbor(text), &ctx()).unwrap_err();
            assert_eq!(j, c, "{text}");
            match j {
                BatchError::Malformed(d) => d,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            refused(
                r#"[{"bver":5,"n":"d/a","v":1},{"n":"d/b","v":2},{"bver":10,"n":"d/c","v":3}]"#
            ),
            "pack[2].bver: 10 differs from 5 given in pack[0]; one pack has one version"
        );
        assert_eq!(
            refused(r#"[{"bver":11,"n":"d/a","v":1}]"#),
            "pack[0].bver: version 11 is newer than 10, the SenML version Sluice understands (RFC 8428 §4.4)"
        );
        assert_eq!(
            refused(r#"[{"bver":0,"n":"d/a","v":1}]"#),
            "pack[0].bver: expected a positive integer, not a number"
        );
        assert_eq!(
            refused(r#"[{"bver":"5","n":"d/a","v":1}]"#),
            "pack[0].bver: expected a positive integer, not a text string"
        );
        assert_eq!(
            refused(r#"[{"n":"d/a","v":1},{"n":"d/b","v":2,"crit_":true}]"#),
            "pack[1].crit_: a must-understand label (ending in `_`) that Sluice does not know, so the pack cannot be used (RFC 8428 §4.4)"
        );
        assert_eq!(
            refused(r#"[{"bn":5,"n":"a","v":1}]"#),
            "pack[0].bn: expected a text string, not a number"
        );
        assert_eq!(
            refused(r#"[{"bt":"now","n":"a","v":1}]"#),
            "pack[0].bt: expected a finite number, not a text string"
        );
        // (JSON only: a CBOR map built from JSON has no repeated keys.)
        assert_eq!(
            parse_senml_json(r#"[{"bt":1,"bt":2,"n":"a","v":1}]"#, &ctx()).unwrap_err(),
            BatchError::Malformed("pack[0].bt: given more than once".into())
        );
        assert_eq!(
            parse_senml_json(r#"{"n":"d/a","v":1}"#, &ctx()).unwrap_err(),
            BatchError::Malformed(
                "expected a SenML pack: an array of records, not an object".into()
            )
        );
        // The same bver throughout, and labels not ending in `_` are fine.
        let b = both(
            r#"[{"bver":5,"n":"d/a","v":1,"xyz":[1,{"a":2}],"ut":5,"bu":"W","bs":1,"u":"Cel"},{"bver":5,"n":"d/b","v":2}]"#,
            &ctx(),
        );
        assert_eq!(b.readings[0].metrics.len(), 2);
        // Not JSON.
        assert!(parse_senml_json("[{", &ctx())
            .unwrap_err()
            .to_string()
            .starts_with("not valid JSON: "));
    }

    #[test]
    fn records_refused_alone_keep_their_neighbours() {
        // JSON only: a CBOR map built from JSON cannot repeat `vb` (pack[5]).
        let b = json(
            r#"[{"n":"d/ok","v":1},{"n":"d/sum","s":5},{"n":"d/both","v":1,"vb":true},
                {"n":"d/none"},5,{"n":"d/v","v":1,"vb":true,"vb":false},{"bn":"","v":1},
                {"n":"d/bad name","v":1},{"n":"d/ok2","v":2},{"n":"d/ok","v":3}]"#,
            &ctx(),
        );
        assert_eq!(
            readings(&b),
            vec![(
                "d".into(),
                NOW,
                vec![m("ok", MetricValue::Int(1)), m("ok2", MetricValue::Int(2))]
            )]
        );
        use RejectReason::*;
        assert_eq!(
            rejections(&b),
            vec![
                (1, UnsupportedValue, "pack[1].s: a sum without a value cannot be stored: Sluice keeps `v` and `vb`".into()),
                (2, Malformed, "pack[2]: both `v` and `vb`: a record carries one value".into()),
                (3, Malformed, "pack[3]: no value: expected `v` or `vb`".into()),
                (4, Malformed, "pack[4]: expected a record (an object of labels), not a number".into()),
                (5, Malformed, "pack[5].vb: given more than once".into()),
                (6, InvalidMetrics, "pack[6].n: the resolved name is empty (no `bn`, no `n`)".into()),
                (7, InvalidMetrics, "metrics.bad name: ' ' is not allowed in a name (use A-Z a-z 0-9 _ . : / -)".into()),
                (9, InvalidMetrics, format!("pack[9].n: `ok` at {} is already given by pack[0] (units are not kept, so records that differ only by `u` collide)", format_ts(NOW))),
            ]
        );
        assert_eq!(b.total(), 9);
    }

    #[test]
    fn a_reading_over_the_metric_limit_refuses_all_its_records() {
        let records: Vec<String> = (0..257)
            .map(|i| format!(r#"{{"n":"d/m{i}","v":{i}}}"#))
            .collect();
        let b = both(&format!("[{}]", records.join(",")), &ctx());
        assert_eq!(b.readings.len(), 0);
        assert_eq!(b.rejected.len(), 257);
        assert_eq!(
            b.rejected[256].error.to_string(),
            "metrics: at most 256 metrics, got 257"
        );
    }

    #[test]
    fn too_many_readings_refuse_the_pack() {
        let c = ParseContext {
            max_readings: 2,
            ..ctx()
        };
        let text =
            r#"[{"n":"d/a","t":-1,"v":1},{"n":"d/a","t":-2,"v":1},{"n":"d/a","t":-3,"v":1}]"#;
        assert_eq!(
            parse_senml_json(text, &c).unwrap_err(),
            BatchError::TooMany { count: 3, limit: 2 }
        );
        assert_eq!(
            parse_senml_cbor(&to_cbor(text), &c).unwrap_err(),
            BatchError::TooMany { count: 3, limit: 2 }
        );
        // Records that group into few readings are fine.
        let text = r#"[{"n":"d/a","v":1},{"n":"d/b","v":1},{"n":"d/c","v":1}]"#;
        assert_eq!(parse_senml_json(text, &c).unwrap().readings.len(), 1);
    }

    #[test]
    fn the_limit_stops_work_early_and_big_packs_stay_linear() {
        let c = ParseContext {
            max_readings: 100,
            ..ctx()
        };
        // 200 000 records, each a new device at one time: refused once 101 readings exist,
        // without resolving the rest (the count given is where it stopped).
        let records: Vec<String> = (0..200_000)
            .map(|i| format!(r#"{{"n":"d{i}/a","bt":1.7e9,"v":1}}"#))
            .collect();
        let text = format!("[{}]", records.join(","));
        assert_eq!(
            parse_senml_json(&text, &c).unwrap_err(),
            BatchError::TooMany {
                count: 101,
                limit: 100
            }
        );
        assert_eq!(
            parse_senml_cbor(&to_cbor(&text), &c).unwrap_err(),
            BatchError::TooMany {
                count: 101,
                limit: 100
            }
        );
        // One reading of 20 000 distinct metrics: every record will be refused, so the
        // bound counts them and stops at the limit, without comparing every pair of names.
        let records: Vec<String> = (0..20_000)
            .map(|i| format!(r#"{{"n":"d/m{i}","v":1}}"#))
            .collect();
        let text = format!("[{}]", records.join(","));
        assert_eq!(
            parse_senml_json(&text, &ctx()).unwrap_err(),
            BatchError::TooMany {
                count: 10_001,
                limit: 10_000
            }
        );
        // Under the limit, a reading over MAX_METRICS refuses each of its records.
        let records: Vec<String> = (0..300)
            .map(|i| format!(r#"{{"n":"d/m{i}","v":1}}"#))
            .collect();
        let b = json(&format!("[{}]", records.join(",")), &ctx());
        assert!(b.readings.is_empty());
        assert_eq!(b.rejected.len(), 300);
    }

    #[test]
    fn records_without_a_value_are_refused_never_dropped() {
        // A JSON reading mixed into a pack (the first record made it SenML), a record of
        // unknown labels only, and an empty record: each refused by index; the SenML record
        // is taken. Base-field-only records still make nothing (RFC 8428 §5.1.7).
        let text = r#"[{"n":"d/a","v":1},
            {"device_id":"d","seq":1,"metrics":{"a":1}},
            {"foo":1},
            {},
            {"bn":"e/"},
            {"n":"b","v":2}]"#;
        let b = json(text, &ctx());
        assert_eq!(readings(&b).len(), 2);
        let r = rejections(&b);
        assert_eq!(r.len(), 3, "{r:?}");
        assert_eq!(r[0].0, 1);
        assert!(
            r[0].2
                .starts_with("pack[1].device_id: a field of Sluice's JSON readings"),
            "{r:?}"
        );
        assert_eq!(
            (r[1].0, r[1].1, r[1].2.as_str()),
            (
                2,
                RejectReason::Malformed,
                "pack[2]: no value: expected `v` or `vb`"
            )
        );
        assert_eq!(r[2].0, 3);
        assert_eq!(
            rejections(&parse_senml_cbor(&to_cbor(text), &ctx()).unwrap()),
            r
        );
    }

    #[test]
    fn cbor_specifics() {
        // Text labels in CBOR, a tag 55799 around the pack, bignums, floats of every width.
        let pack = Value::Tag(
            55799,
            Box::new(Value::Array(vec![
                Value::Map(vec![
                    (Value::Text("bn".into()), Value::Text("d/".into())),
                    (Value::Integer(0.into()), Value::Text("a".into())),
                    (
                        Value::Integer(2.into()),
                        Value::Tag(2, Box::new(Value::Bytes(vec![0xff; 8]))),
                    ),
                    (Value::Integer(99.into()), Value::Bytes(vec![1])),
                ]),
                Value::Map(vec![
                    (Value::Integer(0.into()), Value::Text("b".into())),
                    (
                        Value::Integer(2.into()),
                        Value::Tag(3, Box::new(Value::Bytes(vec![1; 20]))),
                    ),
                ]),
                Value::Map(vec![
                    (Value::Integer(0.into()), Value::Text("c".into())),
                    (Value::Integer(2.into()), Value::Bytes(vec![1])),
                ]),
                Value::Map(vec![
                    (Value::Text("crit".into()), Value::Bool(true)),
                    (Value::Integer(0.into()), Value::Text("e".into())),
                    (Value::Integer(4.into()), Value::Bool(true)),
                ]),
            ])),
        );
        let mut bytes = Vec::new();
        ciborium::into_writer(&pack, &mut bytes).unwrap();
        let b = parse_senml_cbor(&bytes, &ctx()).unwrap();
        assert_eq!(
            b.readings[0].metrics,
            vec![
                m("a", MetricValue::UInt(u64::MAX)),
                m("e", MetricValue::Bool(true))
            ]
        );
        assert_eq!(
            rejections(&b).into_iter().map(|e| e.2).collect::<Vec<_>>(),
            vec![
                "pack[1].v: integer beyond 128 bits is outside -9223372036854775808..18446744073709551615, the range kept exactly",
                "pack[2].v: expected a number, not a byte string",
            ]
        );
        // Half-precision float: 0xf9 0x3e 0x00 is 1.5.
        let half = [
            0x81, 0xa2, 0x00, 0x63, b'd', b'/', b'h', 0x02, 0xf9, 0x3e, 0x00,
        ];
        assert_eq!(
            parse_senml_cbor(&half, &ctx()).unwrap().readings[0].metrics,
            vec![m("h", f(1.5))]
        );
        // Not CBOR, or not a pack.
        let err = |b: &[u8]| parse_senml_cbor(b, &ctx()).unwrap_err().to_string();
        assert!(err(&half[..6]).starts_with("truncated CBOR"));
        assert!(err(&[half.as_slice(), &[0]].concat()).starts_with("1 bytes after the end"));
        // Valid CBOR nested too deep for the decoder: that record is refused, not the pack.
        let deep = [vec![0x81u8; 10_000], vec![0x00]].concat();
        assert_eq!(
            rejections(&parse_senml_cbor(&deep, &ctx()).unwrap()),
            vec![(
                0,
                RejectReason::Malformed,
                format!(
                    "pack[0]: CBOR nested deeper than {} levels",
                    cbor::MAX_DEPTH
                )
            )]
        );
        assert_eq!(
            err(&[0xa0]),
            "expected a SenML pack: an array of records, not a map"
        );
        assert_eq!(
            err(&[0x05]),
            "expected a SenML pack: an array of records, not an integer"
        );
        assert_eq!(
            rejections(&parse_senml_cbor(&[0x82, 0x01, 0x80], &ctx()).unwrap()),
            vec![
                (
                    0,
                    RejectReason::Malformed,
                    "pack[0]: expected a record (an object of labels), not an integer".into()
                ),
                (
                    1,
                    RejectReason::Malformed,
                    "pack[1]: expected a record (an object of labels), not an array".into()
                ),
            ]
        );
    }

    #[test]
    fn json_details() {
        // A byte-order mark is ignored; -0 stays a negative zero; 1e400 is not finite.
        let b = json("\u{feff} [{\"n\":\"d/z\",\"v\":-0},{\"n\":\"d/inf\",\"v\":1e400},{\"n\":\"d\\/e\",\"v\":1}]", &ctx());
        assert!(
            matches!(b.readings[0].metrics[0].1, MetricValue::Float(z) if z == 0.0 && z.is_sign_negative())
        );
        assert_eq!(b.readings[0].metrics[1], m("e", MetricValue::Int(1)));
        assert_eq!(rejections(&b)[0].2, "pack[1].v: expected a finite number");
    }

    #[test]
    fn senml_payloads_are_recognised() {
        for yes in [
            r#"[{"bn":"urn:dev:ow:1:","n":"t","v":1}]"#,
            "\u{feff} \n [ \t{\"n\":\"t\",\"v\":1}]",
            r#"[{"bver":10,"x":[1,2]},{"device_id":"x"}]"#,
            r#"[{"vb":true}"#, // only the first record is read
        ] {
            assert!(looks_like_senml(yes.as_bytes()), "{yes}");
        }
        for no in [
            r#"[{"device_id":"a","metrics":{"t":1}}]"#,
            r#"[{"n":"t","v":1,"metrics":{}}]"#,
            r#"{"n":"t","v":1}"#,
            r#"[]"#,
            r#"[1,{"n":"t"}]"#,
            r#"[{"colour":"red"}]"#,
            r#"[{"n":"t""#,
            "",
            "\u{feff}",
        ] {
            assert!(!looks_like_senml(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn arbitrary_input_never_panics() {
        for text in [
            MULTIPLE_DATAPOINTS_TIMED,
            MULTIPLE_DATA_TYPES,
            COLLECTION_OF_RESOURCES,
        ] {
            let bytes = to_cbor(text);
            for i in 0..bytes.len() {
                for b in [
                    0x00, 0x1f, 0x3b, 0x5f, 0x7f, 0x9f, 0xbf, 0xc2, 0xf9, 0xfb, 0xff,
                ] {
                    let mut m = bytes.clone();
                    m[i] = b;
                    let _ = parse_senml_cbor(&m, &ctx());
                }
            }
            for cut in 0..text.len() {
                if let Some(t) = text.get(..cut) {
                    let _ = parse_senml_json(t, &ctx());
                    let _ = looks_like_senml(t.as_bytes());
                }
            }
        }
    }
}
