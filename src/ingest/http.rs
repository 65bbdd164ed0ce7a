//! `POST /v1/readings`: device → **HTTP handler** → admission → … → ack → 200.
//!
//! The handler reads the body up to `limits.max_body_bytes` (after gzip), parses it at the edge,
//! counts what it received and rejected, submits the valid readings, and answers only after
//! the ack: 200 with counts, 422 when every reading was rejected, 503 with `Retry-After` when
//! the pipeline sheds, or a problem document for a request that cannot be read at all.

use std::io::Read;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::{count_parsed, parse_readings, Format, INLINE_PARSE_BYTES};
use crate::access::Caller;
use crate::api::params::{NoParams, Params};
use crate::api::problem::Problem;
use crate::api::AppState;
use crate::pipeline::{Ack, Refusal};
use crate::reading::{now_ms, BatchError, RejectReason, Rejection};
use crate::telemetry::metrics::Transport;

/// The answer to an ingest request that was read (SPEC §3).
#[derive(Debug, Serialize)]
pub struct IngestResponse {
    /// Readings stored by this request.
    pub accepted: usize,
    /// Readings already stored before (same `(device_id, seq)`).
    pub duplicates: usize,
    /// Readings refused, by index.
    pub rejected: Vec<RejectedItem>,
}

/// One refused reading, in HTTP answers and WebSocket acks.
#[derive(Debug, Serialize)]
pub struct RejectedItem {
    /// Position in the batch.
    pub index: usize,
    /// The `reason` label it was counted under in `sluice_readings_rejected_total` (the same
    /// value MQTT dead letters carry), for clients to match on.
    pub reason: &'static str,
    /// `field: reason`, for the device's developer.
    pub error: String,
}

impl From<&Rejection> for RejectedItem {
    fn from(r: &Rejection) -> Self {
        Self {
            index: r.index,
            reason: r.error.kind.as_str(),
            error: r.error.to_string(),
        }
    }
}

/// The ingest handler. It takes no query parameter.
pub async fn ingest(
    State(state): State<AppState>,
    caller: Caller,
    _: Params<NoParams>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let received = Instant::now();
    let inner = ingest_inner(&state, &caller, &headers, body);
    let response = match state.metrics.tasks.ingest.instrument(inner).await {
        Ok(r) => r,
        Err(problem) => problem.into_response(),
    };
    state
        .metrics
        .ack_latency
        .with_label_values(&[Transport::Http.as_str()])
        .observe(received.elapsed().as_secs_f64());
    response
}

/// Counts a request-level rejection: `n` readings (1 when the count is unknown).
fn reject_request(state: &AppState, reason: RejectReason, n: usize, problem: Problem) -> Problem {
    state
        .metrics
        .rejected_unparsed(Transport::Http, reason, n as u64);
    problem
}

fn content_format(state: &AppState, headers: &HeaderMap) -> Result<Format, Problem> {
    let ct = match headers.get(header::CONTENT_TYPE) {
        None => return Ok(Format::Json),
        Some(v) => v.to_str().unwrap_or("").to_ascii_lowercase(),
    };
    let mime = ct.split(';').next().unwrap_or("").trim();
    match mime {
        "application/json" => Ok(Format::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Ok(Format::Ndjson),
        "application/cbor" => Ok(Format::Cbor),
        "application/senml+json" => Ok(Format::SenmlJson),
        "application/senml+cbor" => Ok(Format::SenmlCbor),
        other => Err(reject_request(
            state,
            RejectReason::UnsupportedMediaType,
            1,
            Problem::unsupported(format!(
                "content type `{other}` is not accepted; use application/json, application/x-ndjson, application/cbor, application/senml+json or application/senml+cbor"
            )),
        )),
    }
}

fn is_gzip(state: &AppState, headers: &HeaderMap) -> Result<bool, Problem> {
    let Some(v) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(false);
    };
    match v
        .to_str()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
        .as_str()
    {
        "gzip" | "x-gzip" => Ok(true),
        "identity" | "" => Ok(false),
        other => Err(reject_request(
            state,
            RejectReason::UnsupportedMediaType,
            1,
            Problem::unsupported(format!(
                "content encoding `{other}` is not accepted; use gzip or none"
            )),
        )),
    }
}

/// Decompresses at most `limit` bytes; more is a 413, whatever the compressed size.
fn gunzip(compressed: &[u8], limit: usize) -> Result<Vec<u8>, GunzipError> {
    let mut out = Vec::with_capacity((compressed.len() * 4).min(limit + 1));
    flate2::read::MultiGzDecoder::new(compressed)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| GunzipError::Corrupt(e.to_string()))?;
    if out.len() > limit {
        return Err(GunzipError::TooLarge);
    }
    Ok(out)
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

enum GunzipError {
    TooLarge,
    Corrupt(String),
}

/// Reads an ingest body: at most `limits.max_body_bytes` (413 past it, counted as
/// `too_large`), within `server.request_timeout` (408), gunzipped when `Content-Encoding: gzip`
/// (the limit applies to the decompressed bytes; corrupt gzip is a 400). Shared by every
/// ingest endpoint (SPEC §1, §3).
pub(super) async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, Problem> {
    let limits = &state.settings.limits;
    let gzip = is_gzip(state, headers)?;
    let too_large = |state: &AppState| {
        reject_request(
            state,
            RejectReason::TooLarge,
            1,
            Problem::too_large(format!("body exceeds {} bytes", limits.max_body_bytes)),
        )
    };
    // The headers were bounded by hyper's header-read timer; the whole body gets
    // `server.request_timeout` more, so a client trickling bytes cannot hold the request.
    let request_timeout = state.settings.server.request_timeout;
    let read = axum::body::to_bytes(body, limits.max_body_bytes);
    let bytes: Bytes = match tokio::time::timeout(request_timeout, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) if is_length_limit(&e) => return Err(too_large(state)),
        Ok(Err(e)) => return Err(Problem::bad_request(format!("cannot read body: {e}"))),
        Err(_) => {
            return Err(Problem::request_timeout(format!(
                "the body did not arrive within {} (server.request_timeout)",
                crate::config::duration::format(request_timeout)
            )))
        }
    };
    let bytes = if gzip {
        let limit = limits.max_body_bytes;
        let decoded = if bytes.len() > INLINE_PARSE_BYTES / 4 {
            tokio::task::spawn_blocking(move || gunzip(&bytes, limit))
                .await
                .map_err(|_| Problem::bad_request("gzip body could not be decoded"))?
        } else {
            gunzip(&bytes, limit)
        };
        match decoded {
            Ok(v) => Bytes::from(v),
            Err(GunzipError::TooLarge) => {
                return Err(reject_request(
                    state,
                    RejectReason::TooLarge,
                    1,
                    Problem::too_large(format!(
                        "body exceeds {} bytes after decompression",
                        limits.max_body_bytes
                    )),
                ))
            }
            Err(GunzipError::Corrupt(e)) => {
                return Err(reject_request(
                    state,
                    RejectReason::Malformed,
                    1,
                    Problem::bad_request(format!("invalid gzip body: {e}")),
                ))
            }
        }
    } else {
        bytes
    };
    Ok(bytes)
}

async fn ingest_inner(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let format = content_format(state, headers)?;
    let bytes = read_body(state, headers, body).await?;

    let bound = crate::reading::Binding::token(caller.bound_device());
    let parsed = parse_readings(&state.settings, bytes, format, bound, now_ms()).await;
    let parsed = match parsed {
        Ok(p) => p,
        Err(BatchError::Malformed(detail)) => {
            return Err(reject_request(
                state,
                RejectReason::Malformed,
                1,
                Problem::bad_request(detail),
            ))
        }
        Err(e @ BatchError::TooMany { count, .. }) => {
            return Err(reject_request(
                state,
                RejectReason::TooManyReadings,
                count,
                Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too-many-readings",
                    "Too many readings",
                    e.to_string(),
                ),
            ))
        }
    };

    let t = Transport::Http;
    let mut parsed = parsed;
    count_parsed(state, t, &parsed);
    // Devices the token may not write, then each device's rate limit (SPEC §11).
    let screened = state.access.screen(caller, t, &mut parsed);
    let rejected: Vec<RejectedItem> = parsed.rejected.iter().map(RejectedItem::from).collect();
    let mut response = if parsed.readings.is_empty() {
        match screened.status_when_nothing_taken(rejected.len()) {
            Some(status) => crate::access::batch_refused(status, &screened, &rejected),
            None => {
                let status = if rejected.is_empty() {
                    StatusCode::OK // an empty array or body: nothing to do, nothing wrong
                } else {
                    StatusCode::UNPROCESSABLE_ENTITY
                };
                answer(
                    status,
                    Ack {
                        accepted: 0,
                        duplicates: 0,
                    },
                    rejected,
                )
            }
        }
    } else {
        match submit(state, t, parsed.readings).await {
            Ok(ack) => answer(StatusCode::OK, ack, rejected),
            Err(problem) => problem.into_response(),
        }
    };
    state.access.rate_headers(&screened, response.headers_mut());
    Ok(response)
}

/// Submits valid readings and waits for their commit: the ack, or the 503 problem (with
/// `Retry-After`) for a refusal or a store failure. Shared by every HTTP ingest endpoint.
pub(super) async fn submit(
    state: &AppState,
    t: Transport,
    readings: Vec<crate::reading::Reading>,
) -> Result<Ack, Problem> {
    let retry = state.settings.pipeline.retry_after;
    let ack_rx = match state.admission.submit(t, readings) {
        Ok(rx) => rx,
        Err(refusal) => {
            let problem = match refusal {
                Refusal::Overloaded { .. } => {
                    Problem::unavailable("overloaded", "Overloaded", refusal.to_string(), retry)
                }
                Refusal::Unavailable => Problem::unavailable(
                    "unavailable",
                    "Store unavailable",
                    state
                        .health
                        .readiness()
                        .err()
                        .unwrap_or_else(|| "store unavailable".into()),
                    retry,
                ),
                Refusal::ShuttingDown => Problem::unavailable(
                    "shutting-down",
                    "Shutting down",
                    "the server is shutting down; retry against another instance",
                    retry,
                ),
            };
            return Err(problem);
        }
    };
    match ack_rx.await {
        Ok(Ok(ack)) => Ok(ack),
        Ok(Err(e)) => Err(Problem::unavailable(
            "unavailable",
            "Store unavailable",
            e.to_string(),
            retry,
        )),
        Err(_) => Err(Problem::unavailable(
            "unavailable",
            "Store unavailable",
            "the pipeline stopped before committing",
            retry,
        )),
    }
}

fn answer(status: StatusCode, ack: Ack, rejected: Vec<RejectedItem>) -> Response {
    (
        status,
        Json(IngestResponse {
            accepted: ack.accepted,
            duplicates: ack.duplicates,
            rejected,
        }),
    )
        .into_response()
}
