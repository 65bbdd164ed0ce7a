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
use crate::codec::{self, json};
use crate::config::Settings;
use crate::reading::{BatchError, DeviceId, ParseContext, ParsedBatch};
use crate::telemetry::metrics::Transport;

/// Bodies and frames larger than this are parsed on a blocking thread, so a 4 MiB batch never
/// holds an event-loop worker for milliseconds.
pub const INLINE_PARSE_BYTES: usize = 64 * 1024;

/// How a body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One reading or an array.
    Json,
    /// One reading per line.
    Ndjson,
}

/// Parses readings at the edge, on a blocking thread when the input is large. `bound` is the
/// device the transport binds, if any; `received_ms` stands in for an absent `ts` and anchors
/// the accepted time window.
pub async fn parse_readings(
    settings: &Arc<Settings>,
    bytes: Bytes,
    format: Format,
    bound: Option<DeviceId>,
    received_ms: i64,
) -> Result<ParsedBatch, BatchError> {
    let settings = settings.clone();
    let len = bytes.len();
    let parse = move || {
        let text = codec::decode_utf8(&bytes)?;
        let ctx = ParseContext {
            now_ms: received_ms,
            max_future_skew: settings.limits.max_future_skew,
            max_age: settings.limits.max_age,
            max_readings: settings.limits.max_readings_per_request,
            bound_device: bound.as_ref(),
        };
        match format {
            Format::Json => json::parse_json_batch(text, &ctx),
            Format::Ndjson => json::parse_ndjson_batch(text, &ctx),
        }
    };
    if len > INLINE_PARSE_BYTES {
        tokio::task::spawn_blocking(parse)
            .await
            .unwrap_or_else(|e| Err(BatchError::Malformed(format!("parser failed: {e}"))))
    } else {
        parse()
    }
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
