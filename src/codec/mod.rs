//! Wire formats: bytes → readings, no I/O. device → handler → **codec** → readings →
//! admission.
//!
//! Each format turns a body, frame or payload into a [`crate::reading::ParsedBatch`] with
//! per-index errors, and every reading it makes keeps SPEC §1's rules (non-JSON formats build
//! them through [`crate::reading::ReadingParts::validate`]). Transports pick the format by
//! content type, endpoint, frame type or payload; none knows a format's details.
//!
//! - [`json`]: Sluice's own JSON and NDJSON (SPEC §1).
//! - [`cbor`]: CBOR (RFC 8949) carrying the JSON shapes, for `application/cbor` and binary
//!   WebSocket frames, and the CBOR acks of those frames (SPEC §10).
//! - [`senml`]: SenML (RFC 8428) packs in JSON and CBOR, resolved into readings (SPEC §10).
//! - [`line_protocol`]: InfluxDB line protocol (SPEC §10), for Telegraf and InfluxDB clients.
//! - [`envelope`]: the WebSocket envelope `{"id", "readings"}` of JSON text frames (SPEC §4).

pub mod cbor;
pub mod envelope;
pub mod json;
pub mod line_protocol;
pub mod senml;

use crate::reading::BatchError;

/// The UTF-8 byte-order mark (SPEC §1: ignored once, at the start of a body, frame or payload).
pub const BOM: char = '\u{feff}';

/// `text` without one leading byte-order mark.
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix(BOM).unwrap_or(text)
}

/// Checks that a body, frame or payload is UTF-8, naming the first bad byte and its offset.
/// The byte-order mark, if any, is kept: the batch parsers ignore it.
pub fn decode_utf8(bytes: &[u8]) -> Result<&str, BatchError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        BatchError::Malformed(format!(
            "not UTF-8: invalid byte 0x{:02X} at offset {at}",
            bytes[at]
        ))
    })
}
