//! The ways in: device → **ingest** → codec → admission → … → commit → ack. Each transport
//! takes bytes, picks the format (content type, endpoint, frame type or payload) and hands them
//! to [`crate::codec`], submits the readings to the pipeline's admission, and answers after the
//! ack. No transport knows a format's details.
//!
//! - [`http`]: `POST /v1/readings` (JSON, NDJSON, CBOR, SenML)
//! - [`influx`]: `POST /write`, `POST /api/v2/write` (InfluxDB line protocol, SPEC §10)
//! - [`ws`]: `GET /v1/ws`, the device WebSocket (text frames JSON, binary frames CBOR)
//! - [`mqtt`]: the MQTT source (subscribes to a broker; PUBACK after commit)

pub mod http;
pub mod influx;
pub mod mqtt;
pub mod ws;

use std::sync::Arc;

use bytes::Bytes;

use crate::api::AppState;
use crate::codec::{self, cbor, json, senml};
use crate::config::Settings;
use crate::reading::{BatchError, Binding, ParseContext, ParsedBatch};
use crate::telemetry::metrics::Transport;

/// Bodies and frames larger than this are parsed on a blocking thread, so a 4 MiB batch never
/// holds an event-loop worker for milliseconds.
pub const INLINE_PARSE_BYTES: usize = 64 * 1024;

/// The wire format of a body, frame or payload; the transport picks it (content type,
/// endpoint, frame type, or the MQTT payload), the codec knows its details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON: one reading or an array (SPEC §1).
    Json,
    /// NDJSON: one reading per line (SPEC §1).
    Ndjson,
    /// CBOR with the JSON shapes (SPEC §10, RFC 8949).
    Cbor,
    /// SenML JSON, `application/senml+json` (SPEC §10, RFC 8428).
    SenmlJson,
    /// SenML CBOR, `application/senml+cbor` (RFC 8428 §6).
    SenmlCbor,
}

impl Format {
    /// The format of an MQTT payload on `topic` (SPEC §10): SenML when the topic's last level
    /// is `senml` or the payload looks like a SenML pack, else Sluice's JSON.
    pub fn of_mqtt(topic: &str, payload: &[u8]) -> Format {
        if topic.rsplit('/').next() == Some("senml") || senml::looks_like_senml(payload) {
            Format::SenmlJson
        } else {
            Format::Json
        }
    }

    /// Parses `bytes` in this format. Pure and synchronous: no I/O.
    pub fn parse(self, bytes: &[u8], ctx: &ParseContext<'_>) -> Result<ParsedBatch, BatchError> {
        match self {
            Format::Json => json::parse_json_batch(codec::decode_utf8(bytes)?, ctx),
            Format::Ndjson => json::parse_ndjson_batch(codec::decode_utf8(bytes)?, ctx),
            Format::Cbor => cbor::parse_cbor(bytes, ctx)
                .map(|b| b.batch)
                .map_err(BatchError::from),
            Format::SenmlJson => senml::parse_senml_json(codec::decode_utf8(bytes)?, ctx),
            Format::SenmlCbor => senml::parse_senml_cbor(bytes, ctx),
        }
    }
}

/// The parse context of SPEC §1's limits for input received at `received_ms`, with what
/// binds its readings to a device (the transport or the token), if anything.
pub fn parse_context<'a>(
    settings: &Settings,
    bound: &'a Binding,
    received_ms: i64,
) -> ParseContext<'a> {
    let (bound_device, token_device) = bound.devices();
    ParseContext {
        now_ms: received_ms,
        max_future_skew: settings.limits.max_future_skew,
        max_age: settings.limits.max_age,
        max_readings: settings.limits.max_readings_per_request,
        bound_device,
        token_device,
    }
}

/// Runs `parse` with the parse context, on a blocking thread when the input (`len` bytes) is
/// larger than [`INLINE_PARSE_BYTES`], so a 4 MiB batch never holds an event-loop worker.
pub async fn parse_off_loop<T, F>(
    settings: &Arc<Settings>,
    len: usize,
    bound: Binding,
    received_ms: i64,
    parse: F,
) -> Result<T, BatchError>
where
    T: Send + 'static,
    F: FnOnce(&ParseContext<'_>) -> Result<T, BatchError> + Send + 'static,
{
    let settings = settings.clone();
    let run = move || parse(&parse_context(&settings, &bound, received_ms));
    if len > INLINE_PARSE_BYTES {
        tokio::task::spawn_blocking(run)
            .await
            .unwrap_or_else(|e| Err(BatchError::Malformed(format!("parser failed: {e}"))))
    } else {
        run()
    }
}

/// Parses readings at the edge, on a blocking thread when the input is large. `bound` is what
/// binds the readings to a device (the transport or the token), if anything; `received_ms` stands in for an absent `ts` and anchors
/// the accepted time window.
pub async fn parse_readings(
    settings: &Arc<Settings>,
    bytes: Bytes,
    format: Format,
    bound: Binding,
    received_ms: i64,
) -> Result<ParsedBatch, BatchError> {
    parse_off_loop(settings, bytes.len(), bound, received_ms, move |ctx| {
        format.parse(&bytes, ctx)
    })
    .await
}

/// Counts the readings of a parsed batch as received, and its rejections by reason.
pub fn count_parsed(state: &AppState, transport: Transport, parsed: &ParsedBatch) {
    let metrics = &state.metrics;
    metrics
        .readings_received
        .with_label_values(&[transport.as_str()])
        .inc_by(parsed.total() as u64);
    for r in &parsed.rejected {
        metrics.rejected(transport, r.error.kind, 1);
    }
}
