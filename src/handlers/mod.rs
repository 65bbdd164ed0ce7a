//! Handlers: the ways in. Each turns bytes into [`crate::reading::Reading`]s or a precise
//! error, submits readings to the pipeline's admission, and answers after the ack.
//!
//! - `http`: `POST /v1/readings`
//! - `influx`: `POST /write`, `POST /api/v2/write` (InfluxDB line protocol, SPEC §10)
//! - `mqtt`: the MQTT source (subscribes to a broker; PUBACK after commit)
//! - `query`: `GET /v1/devices…` (device state and stored readings)
//! - `ops`: `/metrics`, `/healthz`, `/readyz`
//! - `params`: every endpoint's query string, with unknown parameters refused
//! - `problem`: RFC 9457 problem documents for every error answer
//! - `status`: the status page (`GET /`, `/static/…`) and its figures (`GET /v1/status`)

pub mod http;
pub mod influx;
pub mod live;
pub mod mqtt;
pub mod ops;
pub mod params;
pub mod problem;
pub mod query;
pub mod status;
pub mod ws;

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::pipeline::{Admission, Health};
use crate::reading::{self, BatchError, DeviceId, ParseContext, ParsedBatch};
use crate::services::{DeviceState, Live};
use crate::store::ReaderSlot;
use crate::telemetry::metrics::{Metrics, Transport};

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
        let text = reading::decode_utf8(&bytes)?;
        let ctx = ParseContext {
            now_ms: received_ms,
            max_future_skew: settings.limits.max_future_skew,
            max_age: settings.limits.max_age,
            max_readings: settings.limits.max_readings_per_request,
            bound_device: bound.as_ref(),
        };
        match format {
            Format::Json => reading::parse_json_batch(text, &ctx),
            Format::Ndjson => reading::parse_ndjson_batch(text, &ctx),
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

/// Open WebSocket connections: their limit, their shutdown signal, and a tracker to wait for
/// them to finish.
#[derive(Clone)]
pub struct WsHub {
    /// One permit per connection, `ws.max_connections` in all.
    pub connections: Arc<Semaphore>,
    /// Cancelled at shutdown: connections answer what they took, then close with 1001.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them before draining the pipeline.
    pub tracker: TaskTracker,
    /// Live subscribers.
    pub live: Arc<Live>,
}

/// Shared by every handler. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Effective configuration (limits, retry-after).
    pub settings: Arc<Settings>,
    /// Entry to the pipeline.
    pub admission: Admission,
    /// All metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness.
    pub health: Arc<Health>,
    /// Latest state per device.
    pub devices: Arc<DeviceState>,
    /// Query access to the store.
    pub reader: Arc<ReaderSlot>,
    /// WebSocket connections.
    pub ws: WsHub,
}
