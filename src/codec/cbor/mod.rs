//! CBOR (RFC 8949, SPEC §10): `application/cbor` bodies and binary WebSocket frames → readings,
//! and acks back to CBOR. device → handler → **codec::cbor** → readings → admission.
//!
//! A body carries the JSON shapes in CBOR: one reading (a map), an array of readings, or the
//! WebSocket envelope `{"id": …, "readings": …}` (SPEC §4; as in JSON, a top-level map with a
//! `readings` key is an envelope and its other keys but `id` are ignored).
//!
//! Every reading keeps exactly the JSON rules, error texts and integer range, because it *is*
//! parsed by the JSON parser: the decoder streams the CBOR through serde (ciborium) and writes
//! each reading as JSON text, which [`super::json::parse_reading`] then takes. No tree of
//! `ciborium::Value` is built, so memory stays proportional to the body. Integers are written
//! as their decimal digits, so `-2^63..=2^64-1` read back exactly and a CBOR integer beyond
//! that (a 65-bit negative, a bignum) gets JSON's out-of-range rejection; floats are written
//! in their shortest round-trip form (always with a `.` or an exponent, so a float stays a
//! float).
//!
//! What JSON cannot carry rejects *that* reading, by index, naming the field
//! (`metrics.t: expected a finite number or a boolean`), and its neighbours are kept:
//! - NaN and ±infinity, byte strings, map keys that are not text strings;
//! - tags, except: 55799 (self-described CBOR, RFC 8949 §3.4.6) anywhere, which changes
//!   nothing; bignums (tags 2 and 3) of up to 128 bits, which are integers; and on `ts` only,
//!   tag 0 (an RFC 3339 text) and tag 1 (epoch seconds, integer or float, kept to the nearest
//!   millisecond) — an extra over JSON;
//! - `undefined` reads as `null`, which no reading field accepts.
//!
//! The whole body is refused ([`BatchError::Malformed`]) when it is not CBOR: truncated
//! (including an indefinite-length item with no end), bytes after the item, nested deeper
//! than [`MAX_DEPTH`], a text string that is not UTF-8, or a simple value other than
//! `false`/`true`/`null`/`undefined` (ciborium cannot hold one). One leading UTF-8
//! byte-order mark is ignored, as SPEC §1 says for every body (it cannot start a CBOR item).

use std::fmt;
use std::io;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, EnumAccess, IgnoredAny, MapAccess,
    SeqAccess, VariantAccess, Visitor,
};
use serde::Serialize;

mod scan;

pub use scan::ScanError;

use super::envelope::MAX_ID_LEN;
use super::json::parse_reading;
use crate::reading::{
    BatchError, ParseContext, ParsedBatch, ReadingError, RejectReason, Rejection,
};

/// How deep CBOR items may nest. The JSON shapes need at most 5 levels (envelope map →
/// `readings` array → reading map → `metrics` map → a tagged value, plus one for a tag 55799
/// around the body); 16 leaves room for a wrong value nested inside a reading to reject that
/// reading alone, as JSON does, while bounding the decoder's recursion (a few hundred bytes of
/// stack per level), so 10 000 nested arrays are a clean error, not a stack overflow.
pub const MAX_DEPTH: usize = 16;

/// Self-described CBOR (RFC 8949 §3.4.6): a marker with no meaning of its own.
const TAG_SELF_DESCRIBED: u64 = 55799;
/// A standard date/time string (RFC 8949 §3.4.1).
const TAG_DATE_TIME: u64 = 0;
/// Epoch-based date/time in seconds (RFC 8949 §3.4.2).
const TAG_EPOCH: u64 = 1;
/// Unsigned and negative bignums (RFC 8949 §3.4.3); ciborium turns those of up to 128 bits
/// into integers, so only longer ones reach the decoder as tags.
const TAG_BIGNUMS: [u64; 2] = [2, 3];

/// A parsed body.
#[derive(Debug, Default)]
pub struct CborBatch {
    /// The envelope's `id`, for the WebSocket to echo in its ack; `None` without an envelope
    /// (HTTP ignores it).
    pub id: Option<String>,
    /// Readings and rejections; a rejection's `index` is the reading's position in the array
    /// (0 for a lone reading).
    pub batch: ParsedBatch,
}

/// A body that cannot be taken as a whole, with the envelope `id` when it was read before the
/// fault, so that a WebSocket error ack can echo it (SPEC §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CborError {
    /// The envelope's `id`, if the body is an envelope whose `id` is valid.
    pub id: Option<String>,
    /// What is wrong.
    pub error: BatchError,
}

impl fmt::Display for CborError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for CborError {}

impl From<CborError> for BatchError {
    fn from(e: CborError) -> Self {
        e.error
    }
}

/// Parses a CBOR body or binary frame: one reading, an array of readings, or an envelope.
/// Fails as a whole when it is not CBOR, is not one of those shapes, has an envelope `id`
/// that is not a text of at most [`MAX_ID_LEN`] characters, or holds more than
/// `limits.max_readings_per_request` readings.
pub fn parse_cbor(bytes: &[u8], ctx: &ParseContext<'_>) -> Result<CborBatch, CborError> {
    let bytes = strip_bom(bytes);
    scan::check(bytes).map_err(|e| CborError {
        id: None,
        error: BatchError::Malformed(e.to_string()),
    })?;
    // Each reading takes at least one byte, so only a body longer than the limit can hold too
    // many; those are counted from the heads before anything is built (memory stays bounded
    // by the limit, not by the body's item count).
    if bytes.len() > ctx.max_readings {
        if let Ok(Some(shape)) = scan::shape(bytes) {
            if shape.readings > ctx.max_readings {
                return Err(CborError {
                    id: shape.id.filter(|id| id.chars().count() <= MAX_ID_LEN),
                    error: BatchError::TooMany {
                        count: shape.readings,
                        limit: ctx.max_readings,
                    },
                });
            }
        }
    }
    let Body(body) = decode_checked(bytes).map_err(|error| CborError { id: None, error })?;
    let malformed = |id, detail: String| CborError {
        id,
        error: BatchError::Malformed(detail),
    };
    if let Some(detail) = body.shape_error {
        return Err(malformed(None, detail));
    }
    let mut id = None;
    if body.envelope {
        match body.id {
            Id::Absent => {}
            Id::Text(text) if text.chars().count() > MAX_ID_LEN => {
                return Err(malformed(
                    None,
                    format!("id: longer than {MAX_ID_LEN} characters"),
                ))
            }
            Id::Text(text) => id = Some(text),
            Id::Other(kind) => {
                return Err(malformed(
                    None,
                    format!("id: expected a text string, not {kind}"),
                ))
            }
        }
        if let Some(kind) = body.readings_error {
            return Err(malformed(
                id,
                format!("readings: expected an array of readings or one reading, not {kind}"),
            ));
        }
    }
    let count = body.readings.len();
    if count > ctx.max_readings {
        return Err(CborError {
            id,
            error: BatchError::TooMany {
                count,
                limit: ctx.max_readings,
            },
        });
    }
    let mut batch = ParsedBatch {
        readings: Vec::with_capacity(count),
        rejected: Vec::new(),
    };
    for (index, transcript) in body.readings.into_iter().enumerate() {
        let result = transcript.and_then(|json| match std::str::from_utf8(&json) {
            Ok(text) => parse_reading(text, ctx),
            // Never: only UTF-8 is written. Refused rather than trusted.
            Err(_) => Err(ReadingError::new(
                "",
                "transcoding produced invalid UTF-8",
                RejectReason::Malformed,
            )),
        });
        match result {
            Ok(r) => batch.readings.push(r),
            Err(error) => batch.rejected.push(Rejection { index, error }),
        }
    }
    Ok(CborBatch { id, batch })
}

/// Whether `bytes` are valid CBOR (RFC 8949): one well-formed item and nothing more, with
/// UTF-8 text strings (§5.3.1). The WebSocket closes with 1003 for a binary frame that is not
/// (SPEC §4) and answers an error ack for the rest, including CBOR this decoder refuses
/// (nesting deeper than [`MAX_DEPTH`], unassigned simple values). One leading byte-order mark
/// is ignored, as everywhere.
pub fn is_well_formed(bytes: &[u8]) -> bool {
    scan::check(strip_bom(bytes)).is_ok()
}

/// Encodes `value` as CBOR, for the acks of binary WebSocket frames: the same fields as the
/// JSON ack (SPEC §4, §10), as a map with text keys. The ack types always encode; a type
/// whose `Serialize` fails gives an empty vector.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    if ciborium::into_writer(value, &mut out).is_err() {
        out.clear();
    }
    out
}

/// Decodes one CBOR item that must fill `bytes` (after one optional byte-order mark), with
/// the nesting limit, describing every failure for the device's developer. Shared with the
/// SenML-CBOR codec.
pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BatchError> {
    let bytes = strip_bom(bytes);
    scan::check(bytes).map_err(|e| BatchError::Malformed(e.to_string()))?;
    decode_checked(bytes)
}

/// [`decode`] for bytes that passed the validity scan: what can still fail is what ciborium
/// refuses in valid CBOR (depth, unassigned simple values). A negative bignum below
/// `i128::MIN`, which ciborium refuses for the whole input, is first given a leading zero
/// byte so that it reaches the decoder as a tag and is refused for its reading only.
pub(super) fn decode_checked<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BatchError> {
    let mut rest = bytes;
    match ciborium::de::from_reader_with_recursion_limit(&mut rest, MAX_DEPTH) {
        Ok(value) => Ok(value),
        Err(first) => match scan::widen_negative_bignums(bytes) {
            Some(widened) => {
                ciborium::de::from_reader_with_recursion_limit(widened.as_slice(), MAX_DEPTH)
                    .map_err(|e| BatchError::Malformed(describe(e, widened.len())))
            }
            None => Err(BatchError::Malformed(describe(first, bytes.len()))),
        },
    }
}

/// One leading UTF-8 byte-order mark removed (SPEC §1); it cannot start a CBOR item.
pub(super) fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// The elements of a top-level array (after any tags 55799) as byte ranges, one at a time;
/// `Ok(None)` for another item; or why the bytes are not valid CBOR. For decoding a large
/// array one element at a time (SenML-CBOR packs) with [`decode_checked`]. The bytes must not
/// start with a byte-order mark (see [`strip_bom`]).
pub(super) fn array_elements(bytes: &[u8]) -> Result<Option<scan::Elements<'_>>, BatchError> {
    let malformed = |e: ScanError| BatchError::Malformed(e.to_string());
    scan::check(bytes).map_err(malformed)?;
    scan::array_elements(bytes).map_err(malformed)
}

fn describe(e: ciborium::de::Error<io::Error>, len: usize) -> String {
    use ciborium::de::Error;
    match e {
        Error::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => format!(
            "truncated CBOR: the body ends inside an item after {len} bytes (cut short, or an \
             indefinite-length item with no end)"
        ),
        Error::Io(e) => format!("cannot read the CBOR: {e}"),
        Error::Syntax(at) => format!(
            "not valid CBOR at byte {at} (a malformed header, or a text string that is not UTF-8)"
        ),
        Error::Semantic(Some(at), msg) => format!("not valid CBOR at byte {at}: {msg}"),
        Error::Semantic(None, msg) => format!("not valid CBOR: {msg}"),
        Error::RecursionLimitExceeded => {
            format!("CBOR nested deeper than {MAX_DEPTH} levels")
        }
    }
}

/// A body decoded into JSON texts, before the JSON rules run.
struct Body(Writer);

impl<'de> serde::Deserialize<'de> for Body {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut w = Writer::default();
        Item {
            w: &mut w,
            at: At::Body,
        }
        .deserialize(d)?;
        Ok(Body(w))
    }
}

/// The envelope's `id` as found.
#[derive(Default)]
enum Id {
    #[default]
    Absent,
    Text(String),
    /// Not a text string: what it was.
    Other(&'static str),
}

/// The reading field a value belongs to: it decides the reason of a rejection.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
enum Top {
    /// The reading itself (level 0), or one of its keys that is not a text string.
    #[default]
    Reading,
    DeviceId,
    Ts,
    Seq,
    Metrics,
    Tags,
    /// A field JSON refuses anyway (`unknown field`); nothing in it is reported.
    Unknown,
}

impl Top {
    fn of(key: &str) -> Self {
        match key {
            "device_id" => Top::DeviceId,
            "ts" => Top::Ts,
            "seq" => Top::Seq,
            "metrics" => Top::Metrics,
            "tags" => Top::Tags,
            _ => Top::Unknown,
        }
    }

    fn kind(self) -> Option<RejectReason> {
        match self {
            Top::Reading => Some(RejectReason::Malformed),
            Top::DeviceId => Some(RejectReason::InvalidDeviceId),
            Top::Ts => Some(RejectReason::InvalidTs),
            Top::Seq => Some(RejectReason::InvalidSeq),
            Top::Metrics => Some(RejectReason::InvalidMetrics),
            Top::Tags => Some(RejectReason::InvalidTags),
            Top::Unknown => None,
        }
    }
}

/// The decoder's state: the reading being written, and what the body holds so far.
#[derive(Default)]
struct Writer {
    /// The current reading's JSON text.
    out: Vec<u8>,
    /// While false, nothing is written: the reading is already refused, or the value is one
    /// whose text is not needed.
    on: bool,
    /// The field path of the current value (`metrics.t`), for errors.
    path: String,
    /// The reading field the current value is in.
    top: Top,
    /// The first thing in the current reading that JSON cannot carry.
    error: Option<ReadingError>,
    /// The last map key read (reused, so keys cost no allocation).
    key: String,
    /// Every reading of the body, in order: its JSON text or why it cannot have one.
    readings: Vec<Result<Vec<u8>, ReadingError>>,
    /// The body is a map with a `readings` key.
    envelope: bool,
    /// The top-level `id`, captured while its value is read.
    id: Id,
    /// Set while the top-level `id` value is read, so its text is kept.
    capturing_id: bool,
    /// The envelope's `readings` is neither an array nor a map: what it is.
    readings_error: Option<&'static str>,
    /// The body is none of the accepted shapes: why.
    shape_error: Option<String>,
}

impl Writer {
    fn begin_reading(&mut self) {
        self.out.clear();
        self.on = true;
        self.path.clear();
        self.top = Top::Reading;
        self.error = None;
    }

    fn end_reading(&mut self) {
        let result = match self.error.take() {
            Some(e) => Err(e),
            None => Ok(std::mem::take(&mut self.out)),
        };
        self.readings.push(result);
        self.on = false;
    }

    fn raw(&mut self, bytes: &[u8]) {
        if self.on {
            self.out.extend_from_slice(bytes);
        }
    }

    fn string(&mut self, s: &str) {
        if self.on {
            // Writing to a Vec cannot fail, and a &str always serialises.
            let _ = serde_json::to_writer(&mut self.out, s);
        }
    }

    fn integer(&mut self, v: impl fmt::Display) {
        if self.on {
            use std::io::Write;
            let _ = write!(self.out, "{v}");
        }
    }

    /// Records that the current value cannot be carried: `what` it is, at nesting `level`
    /// within the reading. In a field JSON refuses anyway, writes `null` and goes on.
    fn unsupported(&mut self, level: u8, what: &str) {
        let reason = match self.top {
            Top::Reading if level == 0 => format!("expected a reading object, not {what}"),
            Top::Metrics if level >= 2 => "expected a finite number or a boolean".to_string(),
            _ => format!("{what} is not allowed"),
        };
        self.refuse(reason);
    }

    fn refuse(&mut self, reason: String) {
        match self.top.kind() {
            Some(kind) => {
                if self.error.is_none() {
                    self.error = Some(ReadingError::new(self.path.clone(), reason, kind));
                }
                self.on = false;
            }
            None => self.raw(b"null"),
        }
    }
}

/// Where an item sits in the body.
#[derive(Clone, Copy, PartialEq, Eq)]
enum At {
    /// The whole body.
    Body,
    /// The value of an envelope's `readings`.
    Readings,
    /// Inside a reading, at this nesting level (0: the reading itself; 1: a field's value;
    /// 2: an entry of `metrics` or `tags`).
    Value(u8),
    /// The item of a tag 1 on `ts`: epoch seconds.
    EpochTs,
    /// The item of a tag 0 on `ts`: an RFC 3339 text.
    DateTs,
}

/// A scalar as CBOR gave it.
enum Scalar<'a> {
    Bool(bool),
    Int(i128),
    UInt(u128),
    Float(f64),
    Text(&'a str),
    Bytes,
    Null,
}

impl Scalar<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Scalar::Bool(_) => "a boolean",
            Scalar::Int(_) | Scalar::UInt(_) => "an integer",
            Scalar::Float(_) => "a float",
            Scalar::Text(_) => "a text string",
            Scalar::Bytes => "a byte string",
            Scalar::Null => "null",
        }
    }
}

/// Decodes one item at `at`, writing it (streamed, never held as a tree).
struct Item<'w> {
    w: &'w mut Writer,
    at: At,
}

impl<'de> DeserializeSeed<'de> for Item<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Item<'_> {
    fn scalar(self, s: Scalar<'_>) {
        let w = self.w;
        match self.at {
            At::Body => {
                w.shape_error = Some(format!(
                    "expected a reading (a map), an array of readings or an envelope, not {}",
                    s.kind()
                ))
            }
            At::Readings => w.readings_error = Some(s.kind()),
            At::Value(level) => {
                if w.capturing_id && level == 1 {
                    w.id = match &s {
                        Scalar::Text(t) => Id::Text((*t).to_owned()),
                        other => Id::Other(other.kind()),
                    };
                }
                match s {
                    Scalar::Bool(true) => w.raw(b"true"),
                    Scalar::Bool(false) => w.raw(b"false"),
                    Scalar::Null => w.raw(b"null"),
                    Scalar::Int(v) => w.integer(v),
                    Scalar::UInt(v) => w.integer(v),
                    Scalar::Float(f) if f.is_finite() => {
                        if w.on {
                            let _ = serde_json::to_writer(&mut w.out, &f);
                        }
                    }
                    Scalar::Float(_) => w.unsupported(level, "a NaN or infinite float"),
                    Scalar::Text(t) => w.string(t),
                    Scalar::Bytes => w.unsupported(level, "a byte string"),
                }
            }
            At::EpochTs => {
                let ms = match s {
                    Scalar::Int(v) => v.checked_mul(1000).and_then(|v| i64::try_from(v).ok()),
                    Scalar::UInt(v) => i128::try_from(v)
                        .ok()
                        .and_then(|v| v.checked_mul(1000))
                        .and_then(|v| i64::try_from(v).ok()),
                    Scalar::Float(f) => {
                        let ms = (f * 1000.0).round();
                        // `as` saturates; the bounds keep only exact conversions.
                        (ms.is_finite() && ms >= i64::MIN as f64 && ms < i64::MAX as f64)
                            .then_some(ms as i64)
                    }
                    other => {
                        w.refuse(format!(
                            "tag 1 (epoch seconds) must hold a number, not {}",
                            other.kind()
                        ));
                        return;
                    }
                };
                match ms {
                    Some(ms) => w.integer(ms),
                    None => w.refuse("tag 1 (epoch seconds): out of range".into()),
                }
            }
            At::DateTs => match s {
                Scalar::Text(t) => w.string(t),
                other => w.refuse(format!(
                    "tag 0 (a date/time string) must hold a text string, not {}",
                    other.kind()
                )),
            },
        }
    }

    fn seq<'de, A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let w = self.w;
        match self.at {
            At::Body | At::Readings => {
                loop {
                    w.begin_reading();
                    let item = Item {
                        w: &mut *w,
                        at: At::Value(0),
                    };
                    if seq.next_element_seed(item)?.is_none() {
                        break;
                    }
                    w.end_reading();
                }
                w.on = false;
            }
            At::Value(level) => {
                w.raw(b"[");
                let mut first = true;
                loop {
                    let comma = w.out.len();
                    if !first {
                        w.raw(b",");
                    }
                    let item = Item {
                        w: &mut *w,
                        at: At::Value(level + 1),
                    };
                    if seq.next_element_seed(item)?.is_none() {
                        // No element after all: take the comma back.
                        if w.on {
                            w.out.truncate(comma);
                        }
                        break;
                    }
                    first = false;
                }
                w.raw(b"]");
            }
            At::EpochTs | At::DateTs => {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                w.refuse(format!(
                    "tag {} must hold a {}, not an array",
                    if self.at == At::EpochTs { 1 } else { 0 },
                    if self.at == At::EpochTs {
                        "number"
                    } else {
                        "text string"
                    }
                ));
            }
        }
        Ok(())
    }

    fn map<'de, A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let w = self.w;
        let level = match self.at {
            At::Body => {
                w.begin_reading();
                0
            }
            At::Readings => {
                w.begin_reading();
                Item {
                    w: &mut *w,
                    at: At::Value(0),
                }
                .map(map)?;
                w.end_reading();
                return Ok(());
            }
            At::Value(level) => level,
            At::EpochTs | At::DateTs => {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                w.refuse(format!(
                    "tag {} must hold a {}, not a map",
                    if self.at == At::EpochTs { 1 } else { 0 },
                    if self.at == At::EpochTs {
                        "number"
                    } else {
                        "text string"
                    }
                ));
                return Ok(());
            }
        };
        let body = self.at == At::Body;
        let base = w.path.len();
        let top = w.top;
        w.raw(b"{");
        let mut first = true;
        while let Some(key) = map.next_key_seed(KeySeed { w: &mut *w })? {
            if body && w.envelope {
                // Past `readings`: only `id` still matters.
                if key && w.key == "id" {
                    w.id = Id::Other("an array or a map");
                    w.capturing_id = true;
                    w.on = false;
                    w.top = Top::Unknown;
                    map.next_value_seed(Item {
                        w: &mut *w,
                        at: At::Value(1),
                    })?;
                    w.capturing_id = false;
                } else if key && w.key == "readings" {
                    map.next_value::<IgnoredAny>()?;
                    w.shape_error = Some("readings: given more than once".into());
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
                continue;
            }
            if body && key && w.key == "readings" {
                w.envelope = true;
                w.on = false;
                map.next_value_seed(Item {
                    w: &mut *w,
                    at: At::Readings,
                })?;
                continue;
            }
            if !key {
                // The reason names the map the key is in.
                w.path.truncate(base);
                w.top = if level == 0 { Top::Reading } else { top };
                let reason = if level >= 2 && w.top == Top::Metrics {
                    "expected a finite number or a boolean".to_string()
                } else {
                    format!("map keys must be text strings, not {}", w.key)
                };
                w.refuse(reason);
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            if !first {
                w.raw(b",");
            }
            first = false;
            let key_text = std::mem::take(&mut w.key);
            w.string(&key_text);
            w.raw(b":");
            match level {
                0 => {
                    w.path.clear();
                    w.path.push_str(&key_text);
                    w.top = Top::of(&key_text);
                    w.capturing_id = body && key_text == "id";
                    if w.capturing_id {
                        w.id = Id::Other("an array or a map");
                    }
                }
                1 => {
                    w.path.truncate(base);
                    w.path.push('.');
                    w.path.push_str(&key_text);
                }
                _ => {}
            }
            w.key = key_text;
            map.next_value_seed(Item {
                w: &mut *w,
                at: At::Value(level + 1),
            })?;
            w.capturing_id = false;
        }
        w.raw(b"}");
        w.path.truncate(base);
        w.top = top;
        if body && !w.envelope {
            w.end_reading();
        }
        Ok(())
    }

    fn tagged<'de, A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        let (_, variant): (IgnoredAny, _) = data.variant()?;
        variant.tuple_variant(2, Tagged(self))
    }
}

/// The contents of a tag: its number, then its item.
struct Tagged<'w>(Item<'w>);

impl<'de> Visitor<'de> for Tagged<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a tag number and its item")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Item { w, at } = self.0;
        let tag: u64 = seq
            .next_element()?
            .ok_or_else(|| de::Error::custom("a tag without its number"))?;
        if tag == TAG_SELF_DESCRIBED {
            seq.next_element_seed(Item { w, at })?;
            return Ok(());
        }
        let ts_tag = match (at, tag) {
            (At::Value(1), TAG_EPOCH) if w.top == Top::Ts => Some(At::EpochTs),
            (At::Value(1), TAG_DATE_TIME) if w.top == Top::Ts => Some(At::DateTs),
            _ => None,
        };
        if let Some(at) = ts_tag {
            seq.next_element_seed(Item { w, at })?;
            return Ok(());
        }
        seq.next_element::<IgnoredAny>()?;
        match at {
            At::Body => {
                w.shape_error = Some(format!(
                    "expected a reading (a map), an array of readings or an envelope, not CBOR \
                     tag {tag}"
                ))
            }
            At::Readings => w.readings_error = Some("a tagged item"),
            At::Value(level) => {
                if w.capturing_id && level == 1 {
                    w.id = Id::Other("a tagged item");
                }
                if TAG_BIGNUMS.contains(&tag) {
                    w.refuse(format!(
                        "integer (a CBOR bignum) is outside {}..{}, the range \
                         kept exactly",
                        i64::MIN,
                        u64::MAX
                    ));
                } else if (tag == TAG_EPOCH || tag == TAG_DATE_TIME) && level > 0 {
                    w.unsupported(level, &format!("CBOR tag {tag} (allowed on `ts` only)"));
                } else {
                    w.unsupported(level, &format!("CBOR tag {tag}"));
                }
            }
            At::EpochTs | At::DateTs => {
                w.refuse(format!("CBOR tag {tag} inside a time tag is not allowed"))
            }
        }
        Ok(())
    }
}

impl<'de> Visitor<'de> for Item<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a CBOR item")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.scalar(Scalar::Bool(v));
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.scalar(Scalar::Int(v.into()));
        Ok(())
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<(), E> {
        self.scalar(Scalar::Int(v));
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.scalar(Scalar::UInt(v.into()));
        Ok(())
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<(), E> {
        self.scalar(Scalar::UInt(v));
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.scalar(Scalar::Float(v));
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.scalar(Scalar::Text(v));
        Ok(())
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<(), E> {
        self.scalar(Scalar::Bytes);
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.scalar(Scalar::Null);
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar(Scalar::Null);
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        self.seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        self.map(map)
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        self.tagged(data)
    }
}

/// Reads a map key into `Writer::key`: `true` for a text string; otherwise `false`, with
/// `key` describing what it was (the key is consumed whole).
struct KeySeed<'w> {
    w: &'w mut Writer,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl KeySeed<'_> {
    fn other(self, what: &str) -> bool {
        self.w.key.clear();
        self.w.key.push_str(what);
        false
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        self.w.key.clear();
        self.w.key.push_str(v);
        Ok(true)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(self.other("a boolean"))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        Ok(self.other(&format!("the integer {v}")))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<bool, E> {
        Ok(self.other(&format!("the integer {v}")))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        Ok(self.other(&format!("the integer {v}")))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<bool, E> {
        Ok(self.other(&format!("the integer {v}")))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(self.other("a float"))
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<bool, E> {
        Ok(self.other("a byte string"))
    }

    fn visit_none<E: de::Error>(self) -> Result<bool, E> {
        Ok(self.other("null"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(self.other("null"))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(self.other("an array"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(self.other("a map"))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<bool, A::Error> {
        let (_, variant): (IgnoredAny, _) = data.variant()?;
        variant.newtype_variant::<IgnoredAny>()?;
        Ok(self.other("a tagged item"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ciborium::value::Value;

    use super::*;
    use crate::reading::{DeviceId, MetricValue};

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

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn map(pairs: Vec<(&str, Value)>) -> Value {
        Value::Map(pairs.into_iter().map(|(k, v)| (text(k), v)).collect())
    }

    fn enc(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }

    fn reading(device: &str, metrics: Vec<(&str, Value)>) -> Value {
        map(vec![("device_id", text(device)), ("metrics", map(metrics))])
    }

    fn parse(v: &Value) -> Result<CborBatch, CborError> {
        parse_cbor(&enc(v), &ctx())
    }

    fn malformed(bytes: &[u8]) -> String {
        match parse_cbor(bytes, &ctx()) {
            Err(CborError {
                error: BatchError::Malformed(detail),
                ..
            }) => detail,
            other => panic!("{other:?}"),
        }
    }

    /// Every rejection as `(index, kind, text)`.
    fn rejections(b: &CborBatch) -> Vec<(usize, RejectReason, String)> {
        b.batch
            .rejected
            .iter()
            .map(|r| (r.index, r.error.kind, r.error.to_string()))
            .collect()
    }

    #[test]
    fn one_reading_an_array_and_an_envelope() {
        let full = map(vec![
            ("device_id", text("gh-7")),
            ("ts", text("2026-11-17T12:00:00.123Z")),
            ("seq", Value::Integer(1042.into())),
            (
                "metrics",
                map(vec![
                    ("temperature", Value::Float(21.5)),
                    ("humidity", Value::Integer(40.into())),
                    ("door_open", Value::Bool(false)),
                ]),
            ),
            ("tags", map(vec![("site", text("north"))])),
        ]);
        let b = parse(&full).unwrap();
        assert_eq!(b.id, None);
        let r = &b.batch.readings[0];
        assert_eq!(r.device_id.as_str(), "gh-7");
        assert_eq!(r.seq, Some(1042));
        assert_eq!(
            crate::reading::format_ts(r.ts_ms),
            "2026-11-17T12:00:00.123Z"
        );
        assert_eq!(
            r.metrics,
            vec![
                ("temperature".into(), MetricValue::Float(21.5)),
                ("humidity".into(), MetricValue::Int(40)),
                ("door_open".into(), MetricValue::Bool(false)),
            ]
        );
        assert_eq!(r.tags, vec![("site".into(), "north".into())]);

        let array = Value::Array(vec![
            full.clone(),
            reading("b", vec![("x", Value::Float(1.0))]),
        ]);
        let b = parse(&array).unwrap();
        assert_eq!(b.batch.readings.len(), 2);
        // A float stays a float even when it is integral.
        assert_eq!(b.batch.readings[1].metrics[0].1, MetricValue::Float(1.0));

        // The envelope, `id` after `readings`, an extra key ignored (as in JSON).
        let env = map(vec![
            ("readings", array.clone()),
            ("note", Value::Bytes(vec![1])),
            ("id", text("frame-1")),
        ]);
        let b = parse(&env).unwrap();
        assert_eq!(b.id.as_deref(), Some("frame-1"));
        assert_eq!(b.batch.readings.len(), 2);
        // An envelope holding one reading, with no id.
        let b = parse(&map(vec![("readings", full)])).unwrap();
        assert_eq!((b.id, b.batch.readings.len()), (None, 1));
        // Self-described CBOR around the body and inside.
        let b = parse(&Value::Tag(
            TAG_SELF_DESCRIBED,
            Box::new(reading(
                "c",
                vec![(
                    "x",
                    Value::Tag(TAG_SELF_DESCRIBED, Box::new(Value::Integer(3.into()))),
                )],
            )),
        ))
        .unwrap();
        assert_eq!(b.batch.readings[0].metrics[0].1, MetricValue::Int(3));
    }

    #[test]
    fn integers_at_the_edges_read_back_exactly() {
        let b = parse(&reading(
            "i",
            vec![
                ("max", Value::Integer(u64::MAX.into())),
                ("min", Value::Integer(i64::MIN.into())),
                ("i64max", Value::Integer(i64::MAX.into())),
                ("neg", Value::Integer((-1).into())),
            ],
        ))
        .unwrap();
        assert_eq!(
            b.batch.readings[0]
                .metrics
                .iter()
                .map(|m| m.1)
                .collect::<Vec<_>>(),
            vec![
                MetricValue::UInt(u64::MAX),
                MetricValue::Int(i64::MIN),
                MetricValue::Int(i64::MAX),
                MetricValue::Int(-1),
            ]
        );
        // Beyond the range: the same rejection JSON gives, naming the value.
        for (v, digits) in [
            (
                Value::Integer((i128::from(i64::MIN) - 1).try_into().unwrap()),
                "-9223372036854775809",
            ),
            // -2^64, CBOR's most negative plain integer.
            (
                Value::Integer((-(1i128 << 64)).try_into().unwrap()),
                "-18446744073709551616",
            ),
        ] {
            let b = parse(&Value::Array(vec![
                reading("a", vec![("v", v)]),
                reading("a", vec![("v", Value::Integer(1.into()))]),
            ]))
            .unwrap();
            assert_eq!(b.batch.readings.len(), 1);
            assert_eq!(
                rejections(&b),
                vec![(
                    0,
                    RejectReason::InvalidMetrics,
                    format!("metrics.v: integer {digits} is outside -9223372036854775808..18446744073709551615, the range kept exactly")
                )]
            );
        }
        // A bignum (tag 2) of 2^64: also out of range. Of 2^63 - 1: an integer.
        let big = |bytes: Vec<u8>| Value::Tag(2, Box::new(Value::Bytes(bytes)));
        let b = parse(&Value::Array(vec![
            reading("a", vec![("v", big(vec![1, 0, 0, 0, 0, 0, 0, 0, 0]))]),
            reading(
                "a",
                vec![(
                    "v",
                    big(vec![0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
                )],
            ),
            reading("a", vec![("v", big(vec![1; 17]))]),
        ]))
        .unwrap();
        assert_eq!(b.batch.readings[0].metrics[0].1, MetricValue::Int(i64::MAX));
        let errs = rejections(&b);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0]
                .2
                .starts_with("metrics.v: integer 18446744073709551616 is outside"),
            "{errs:?}"
        );
        assert!(
            errs[1]
                .2
                .starts_with("metrics.v: integer (a CBOR bignum) is outside"),
            "{errs:?}"
        );
        // seq up to u64::MAX.
        let b = parse(&map(vec![
            ("device_id", text("s")),
            ("seq", Value::Integer(u64::MAX.into())),
            ("metrics", map(vec![("x", Value::Bool(true))])),
        ]))
        .unwrap();
        assert_eq!(b.batch.readings[0].seq, Some(u64::MAX));
    }

    #[test]
    fn values_json_cannot_carry_reject_their_reading_by_index() {
        let ok = reading("ok", vec![("x", Value::Integer(1.into()))]);
        let b = parse(&Value::Array(vec![
            ok.clone(),
            reading("a", vec![("t", Value::Float(f64::NAN))]),
            reading("a", vec![("t", Value::Float(f64::INFINITY))]),
            reading("a", vec![("t", Value::Bytes(vec![1, 2]))]),
            map(vec![
                ("device_id", Value::Bytes(b"a".to_vec())),
                ("metrics", map(vec![("x", Value::Integer(1.into()))])),
            ]),
            Value::Map(vec![
                (text("device_id"), text("a")),
                (
                    text("metrics"),
                    Value::Map(vec![(Value::Integer(1.into()), Value::Integer(1.into()))]),
                ),
            ]),
            Value::Map(vec![(Value::Integer(0.into()), text("a"))]),
            reading(
                "a",
                vec![("t", Value::Tag(37, Box::new(Value::Bytes(vec![0; 16]))))],
            ),
            map(vec![
                ("device_id", text("a")),
                ("metrics", map(vec![("x", Value::Integer(1.into()))])),
                ("tags", map(vec![("k", Value::Bytes(vec![]))])),
            ]),
            Value::Bytes(vec![1]),
            Value::Integer(5.into()),
            // Inside an unknown field, JSON's own rejection wins.
            map(vec![
                ("device_id", text("a")),
                ("colour", Value::Float(f64::NAN)),
                ("metrics", map(vec![("x", Value::Integer(1.into()))])),
            ]),
            reading("a", vec![("t", Value::Null)]),
            reading(
                "a",
                vec![(
                    "deep",
                    Value::Array(vec![Value::Array(vec![Value::Float(f64::NAN)])]),
                )],
            ),
            ok,
        ]))
        .unwrap();
        assert_eq!(b.batch.readings.len(), 2);
        assert_eq!(b.batch.readings[1].device_id.as_str(), "ok");
        use RejectReason::*;
        let want: Vec<(usize, RejectReason, &str)> = vec![
            (
                1,
                InvalidMetrics,
                "metrics.t: expected a finite number or a boolean",
            ),
            (
                2,
                InvalidMetrics,
                "metrics.t: expected a finite number or a boolean",
            ),
            (
                3,
                InvalidMetrics,
                "metrics.t: expected a finite number or a boolean",
            ),
            (
                4,
                InvalidDeviceId,
                "device_id: a byte string is not allowed",
            ),
            (
                5,
                InvalidMetrics,
                "metrics: map keys must be text strings, not the integer 1",
            ),
            (
                6,
                Malformed,
                "map keys must be text strings, not the integer 0",
            ),
            (
                7,
                InvalidMetrics,
                "metrics.t: expected a finite number or a boolean",
            ),
            (8, InvalidTags, "tags.k: a byte string is not allowed"),
            (9, Malformed, "expected a reading object, not a byte string"),
            (
                10,
                Malformed,
                "expected a reading object: invalid type: integer `5`, expected a reading object",
            ),
            (11, UnknownField, "colour: unknown field"),
            (
                12,
                InvalidMetrics,
                "metrics.t: expected a finite number or a boolean",
            ),
            (
                13,
                InvalidMetrics,
                "metrics.deep: expected a finite number or a boolean",
            ),
        ];
        let got = rejections(&b);
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((g.0, g.1, g.2.as_str()), *w);
        }
    }

    #[test]
    fn ts_as_text_epoch_ms_and_tags_0_and_1() {
        let at = |ts: Value| {
            parse(&map(vec![
                ("device_id", text("t")),
                ("ts", ts),
                ("metrics", map(vec![("x", Value::Integer(1.into()))])),
            ]))
            .unwrap()
        };
        let ms = |b: CborBatch| b.batch.readings[0].ts_ms;
        assert_eq!(ms(at(Value::Integer((NOW - 5).into()))), NOW - 5);
        let iso = crate::reading::format_ts(NOW - 1500);
        assert_eq!(ms(at(text(&iso))), NOW - 1500);
        assert_eq!(ms(at(Value::Tag(0, Box::new(text(&iso))))), NOW - 1500);
        assert_eq!(
            ms(at(Value::Tag(
                1,
                Box::new(Value::Integer((NOW / 1000).into()))
            ))),
            NOW
        );
        assert_eq!(
            ms(at(Value::Tag(
                1,
                Box::new(Value::Float(NOW as f64 / 1000.0 - 0.0004))
            ))),
            NOW
        );
        let b = at(Value::Tag(1, Box::new(text("soon"))));
        assert_eq!(
            rejections(&b),
            vec![(
                0,
                RejectReason::InvalidTs,
                "ts: tag 1 (epoch seconds) must hold a number, not a text string".into()
            )]
        );
        let b = at(Value::Tag(1, Box::new(Value::Integer(u64::MAX.into()))));
        assert_eq!(
            rejections(&b)[0].2,
            "ts: tag 1 (epoch seconds): out of range"
        );
        // A float is not epoch milliseconds, as in JSON.
        let b = at(Value::Float(1.5));
        assert!(
            rejections(&b)[0]
                .2
                .starts_with("ts: invalid type: floating point"),
            "{:?}",
            rejections(&b)
        );
        // Tags 0 and 1 elsewhere are refused.
        let b = parse(&reading(
            "a",
            vec![("x", Value::Tag(1, Box::new(Value::Integer(1.into()))))],
        ))
        .unwrap();
        assert_eq!(
            rejections(&b)[0].2,
            "metrics.x: expected a finite number or a boolean"
        );
    }

    #[test]
    fn bound_device_and_the_json_rules_hold() {
        let bound = DeviceId::parse("dev-1").unwrap();
        let c = ParseContext {
            bound_device: Some(&bound),
            token_device: None,
            ..ctx()
        };
        let body = Value::Array(vec![
            map(vec![(
                "metrics",
                map(vec![("x", Value::Integer(1.into()))]),
            )]),
            reading("dev-2", vec![("x", Value::Integer(1.into()))]),
        ]);
        let b = parse_cbor(&enc(&body), &c).unwrap();
        assert_eq!(b.batch.readings[0].device_id, bound);
        assert_eq!(b.batch.rejected[0].error.kind, RejectReason::DeviceMismatch);
        // Duplicate keys: as JSON.
        let dup = Value::Map(vec![
            (text("device_id"), text("a")),
            (
                text("metrics"),
                Value::Map(vec![
                    (text("x"), Value::Integer(1.into())),
                    (text("x"), Value::Integer(2.into())),
                ]),
            ),
        ]);
        assert_eq!(
            rejections(&parse(&dup).unwrap())[0].2,
            "metrics.x: given more than once"
        );
    }

    #[test]
    fn bad_bodies_fail_whole_with_a_clear_message() {
        let good = enc(&Value::Array(vec![reading(
            "a",
            vec![("x", Value::Integer(1.into()))],
        )]));
        // Truncated, at every length.
        for cut in 1..good.len() {
            let d = malformed(&good[..cut]);
            assert!(
                d.starts_with("truncated CBOR: the body ends inside an item"),
                "{cut}: {d}"
            );
        }
        assert!(malformed(&[]).starts_with("truncated CBOR"));
        // Nested 10 000 deep.
        let deep = [vec![0x81u8; 10_000], vec![0x00]].concat();
        assert_eq!(
            malformed(&deep),
            format!("CBOR nested deeper than {MAX_DEPTH} levels")
        );
        // 10 000 open indefinite arrays never closed: cut short.
        let deep_indef = vec![0x9fu8; 10_000];
        assert!(malformed(&deep_indef).starts_with("truncated CBOR"));
        // An indefinite-length map with no end.
        let mut open = vec![0xbf];
        open.extend(enc(&text("device_id")));
        open.extend(enc(&text("a")));
        assert!(
            malformed(&open).starts_with("truncated CBOR"),
            "{}",
            malformed(&open)
        );
        // The same map, ended: one reading (refused: no metrics).
        open.push(0xff);
        let b = parse_cbor(&open, &ctx()).unwrap();
        assert_eq!(b.batch.rejected[0].error.to_string(), "metrics: required");
        // Trailing bytes.
        let mut trailing = good.clone();
        trailing.extend([0x01, 0x02]);
        assert_eq!(
            malformed(&trailing),
            format!(
                "2 bytes after the end of the CBOR item (at byte {}); a body holds one item",
                good.len()
            )
        );
        // Not a shape.
        assert_eq!(
            malformed(&enc(&Value::Integer(5.into()))),
            "expected a reading (a map), an array of readings or an envelope, not an integer"
        );
        assert!(
            malformed(&[0xf0]).starts_with("not valid CBOR"),
            "{}",
            malformed(&[0xf0])
        ); // simple(16)
        assert!(
            malformed(&[0x1c]).starts_with("not valid CBOR at byte 0"),
            "{}",
            malformed(&[0x1c])
        ); // reserved
           // Invalid UTF-8 in a text string.
        assert!(malformed(&[0x62, 0xff, 0xfe]).starts_with("not valid CBOR at byte 0"));
        // A leading byte-order mark is ignored.
        let with_bom = [b"\xEF\xBB\xBF".as_slice(), &good].concat();
        assert_eq!(
            parse_cbor(&with_bom, &ctx()).unwrap().batch.readings.len(),
            1
        );
    }

    #[test]
    fn deep_nesting_is_an_error_on_a_small_stack_too() {
        let deep = [vec![0x81u8; 10_000], vec![0x00]].concat();
        let deep_maps: Vec<u8> = std::iter::repeat_n([0xa1u8, 0x61, b'a'], 10_000)
            .flatten()
            .chain([0x00])
            .collect();
        let t = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                let a = parse_cbor(&deep, &ctx()).unwrap_err();
                let b = parse_cbor(&deep_maps, &ctx()).unwrap_err();
                (a, b)
            })
            .unwrap();
        let (a, b) = t.join().expect("no stack overflow");
        for e in [a, b] {
            assert_eq!(
                e.error,
                BatchError::Malformed(format!("CBOR nested deeper than {MAX_DEPTH} levels"))
            );
        }
    }

    #[test]
    fn envelope_errors_and_the_reading_limit() {
        let one = reading("a", vec![("x", Value::Integer(1.into()))]);
        let long = "i".repeat(MAX_ID_LEN + 1);
        let e = parse(&map(vec![
            ("id", text(&long)),
            ("readings", Value::Array(vec![one.clone()])),
        ]))
        .unwrap_err();
        assert_eq!(
            e,
            CborError {
                id: None,
                error: BatchError::Malformed("id: longer than 64 characters".into())
            }
        );
        let ok_id = "é".repeat(MAX_ID_LEN);
        assert_eq!(
            parse(&map(vec![("id", text(&ok_id)), ("readings", one.clone())]))
                .unwrap()
                .id,
            Some(ok_id)
        );
        let e = parse(&map(vec![
            ("id", Value::Integer(7.into())),
            ("readings", one.clone()),
        ]))
        .unwrap_err();
        assert_eq!(
            e.error,
            BatchError::Malformed("id: expected a text string, not an integer".into())
        );
        let e = parse(&map(vec![
            ("id", text("f")),
            ("readings", Value::Integer(7.into())),
        ]))
        .unwrap_err();
        assert_eq!(
            e,
            CborError {
                id: Some("f".into()),
                error: BatchError::Malformed(
                    "readings: expected an array of readings or one reading, not an integer".into()
                )
            }
        );
        // Without `readings`, a map with `id` is a reading, refused as JSON refuses it.
        let b = parse(&map(vec![
            ("id", text("f")),
            ("device_id", text("a")),
            ("metrics", map(vec![("x", Value::Integer(1.into()))])),
        ]))
        .unwrap();
        assert_eq!(rejections(&b)[0].2, "id: unknown field");
        // Too many: the id is kept for the error ack.
        let c = ParseContext {
            max_readings: 2,
            ..ctx()
        };
        let three = Value::Array(vec![one.clone(), one.clone(), one]);
        let e = parse_cbor(
            &enc(&map(vec![("id", text("big")), ("readings", three.clone())])),
            &c,
        )
        .unwrap_err();
        assert_eq!(
            e,
            CborError {
                id: Some("big".into()),
                error: BatchError::TooMany { count: 3, limit: 2 }
            }
        );
        assert_eq!(
            BatchError::from(parse_cbor(&enc(&three), &c).unwrap_err()),
            BatchError::TooMany { count: 3, limit: 2 }
        );
    }

    #[test]
    fn well_formed_is_about_the_cbor_not_the_shape() {
        let good = enc(&Value::Array(vec![reading(
            "a",
            vec![("x", Value::Integer(1.into()))],
        )]));
        assert!(is_well_formed(&good));
        // Valid CBOR that is not a reading shape, or whose readings are all refused.
        for v in [
            Value::Integer(5.into()),
            Value::Bytes(vec![1]),
            map(vec![("readings", Value::Integer(1.into()))]),
        ] {
            assert!(is_well_formed(&enc(&v)), "{v:?}");
        }
        // Tag 1 on a NaN.
        assert!(is_well_formed(&[0xc1, 0xfb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0]));
        // Not CBOR: cut short, trailing bytes, a never-ended indefinite map.
        assert!(!is_well_formed(&good[..good.len() - 1]));
        assert!(!is_well_formed(&[good.as_slice(), &[0]].concat()));
        // Nesting 10 000 deep is valid CBOR (the decoder refuses it, with an error ack).
        assert!(is_well_formed(&[vec![0x81u8; 10_000], vec![0x00]].concat()));
        assert!(!is_well_formed(&[0xbf, 0x61, b'a', 0x01]));
        assert!(!is_well_formed(&[]));
    }

    #[test]
    fn acks_encode_as_cbor_maps() {
        #[derive(Serialize)]
        struct Ack<'a> {
            ack: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            id: Option<&'a str>,
            accepted: usize,
            rejected: Vec<(usize, &'a str)>,
        }
        let bytes = to_vec(&Ack {
            ack: 3,
            id: None,
            accepted: 2,
            rejected: vec![],
        });
        let v: Value = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert_eq!(
            v,
            map(vec![
                ("ack", Value::Integer(3.into())),
                ("accepted", Value::Integer(2.into())),
                ("rejected", Value::Array(vec![])),
            ])
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let good = enc(&map(vec![
            ("id", text("x")),
            (
                "readings",
                Value::Array(vec![reading("a", vec![("x", Value::Float(0.5))])]),
            ),
        ]));
        for i in 0..good.len() {
            for b in [0x00, 0x1f, 0x5f, 0x7f, 0x9f, 0xbf, 0xc1, 0xf7, 0xf9, 0xff] {
                let mut m = good.clone();
                m[i] = b;
                let _ = parse_cbor(&m, &ctx());
            }
        }
    }
}
