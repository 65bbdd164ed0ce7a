//! `POST /write` (InfluxDB v1) and `POST /api/v2/write` (v2): Telegraf and InfluxDB client
//! libraries → **line-protocol handler** → admission → … → ack → 204 (SPEC §10).
//!
//! The body is read as for `POST /v1/readings` (limit, gzip, `server.request_timeout`),
//! parsed by [`crate::codec::line_protocol`], and its valid lines are committed before the
//! answer. Answers follow InfluxDB's conventions, which its clients act on:
//! - 204 when every line was stored or was a duplicate;
//! - 400 `{"code": "invalid", "message", "line"}` naming the first bad line, the good lines
//!   stored (a partial write; clients do not retry a 400);
//! - 413 `{"code": "request too large"}` (Telegraf's v2 output then halves the batch);
//! - 503 with `Retry-After` when the pipeline sheds or the store is down (clients back off).
//!
//! Any content type is accepted: InfluxDB ignores it, and Telegraf sends `text/plain`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::http::{read_body, submit};
use super::{count_parsed, INLINE_PARSE_BYTES};
use crate::access::Caller;
use crate::api::params;
use crate::api::problem::Problem;
use crate::api::AppState;
use crate::codec::line_protocol::{self, LineBatch, LineOptions, Precision};
use crate::reading::{now_ms, BatchError, ParseContext, RejectReason};
use crate::telemetry::metrics::Transport;

/// Query string of `POST /write` (InfluxDB 1.x). `db`, `rp` and `consistency` are accepted
/// and not used (Sluice has one store); `u` and `p` are the 1.x credentials.
#[derive(Debug, Deserialize)]
#[allow(dead_code)] // named so that they are accepted; only `precision` is read
pub struct V1Params {
    db: Option<String>,
    rp: Option<String>,
    precision: Option<String>,
    consistency: Option<String>,
    u: Option<String>,
    p: Option<String>,
}

/// Query string of `POST /api/v2/write` (InfluxDB 2.x). `org`, `orgID` and `bucket` are
/// accepted and not used.
#[derive(Debug, Deserialize)]
#[allow(dead_code)] // named so that they are accepted; only `precision` is read
pub struct V2Params {
    org: Option<String>,
    #[serde(rename = "orgID")]
    org_id: Option<String>,
    bucket: Option<String>,
    precision: Option<String>,
}

/// InfluxDB's error body.
#[derive(Debug, Serialize)]
struct InfluxError {
    /// `invalid`, `request too large`, `unavailable`, …
    code: &'static str,
    /// What is wrong.
    message: String,
    /// The first bad line (1-based), for a partial write.
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<usize>,
}

/// A problem as InfluxDB clients expect it: the same status and `Retry-After`, InfluxDB's body.
fn influx_error(p: Problem) -> Response {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = match status {
        StatusCode::BAD_REQUEST => "invalid",
        StatusCode::REQUEST_TIMEOUT => "request timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "request too large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported media type",
        StatusCode::TOO_MANY_REQUESTS => "too many requests",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ => "internal error",
    };
    let mut response = (
        status,
        Json(InfluxError {
            code,
            message: p.detail,
            line: None,
        }),
    )
        .into_response();
    if let Some(after) = p.retry_after {
        let secs = after.as_secs_f64().ceil().max(1.0) as u64;
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    response
}

/// The `precision` parameter: nanoseconds when absent; a 400 naming the accepted values.
fn precision(
    given: Option<&str>,
    parse: fn(&str) -> Option<Precision>,
    accepted: &str,
) -> Result<Precision, Problem> {
    match given {
        None | Some("") => Ok(Precision::Ns),
        Some(s) => parse(s).ok_or_else(|| {
            Problem::bad_request(format!("precision `{s}` is not one of {accepted}"))
        }),
    }
}

/// `POST /write?db=&precision=` (InfluxDB 1.x).
pub async fn write_v1(
    State(state): State<AppState>,
    caller: Caller,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let checked = params::parse::<V1Params>(&uri).and_then(|p| {
        precision(
            p.precision.as_deref(),
            Precision::parse_v1,
            "n, u, ms, s, m, h",
        )
    });
    match checked {
        Ok(p) => write(state, caller, headers, p, body).await,
        Err(problem) => influx_error(problem),
    }
}

/// `POST /api/v2/write?org=&bucket=&precision=` (InfluxDB 2.x).
pub async fn write_v2(
    State(state): State<AppState>,
    caller: Caller,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let checked = params::parse::<V2Params>(&uri)
        .and_then(|p| precision(p.precision.as_deref(), Precision::parse_v2, "ns, us, ms, s"));
    match checked {
        Ok(p) => write(state, caller, headers, p, body).await,
        Err(problem) => influx_error(problem),
    }
}

async fn write(
    state: AppState,
    caller: Caller,
    headers: HeaderMap,
    precision: Precision,
    body: Body,
) -> Response {
    let received = std::time::Instant::now();
    let inner = write_inner(&state, &caller, &headers, precision, body);
    let response = state
        .metrics
        .tasks
        .ingest
        .instrument(inner)
        .await
        .unwrap_or_else(influx_error);
    state
        .metrics
        .ack_latency
        .with_label_values(&[Transport::Http.as_str()])
        .observe(received.elapsed().as_secs_f64());
    response
}

async fn write_inner(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    precision: Precision,
    body: Body,
) -> Result<Response, Problem> {
    let t = Transport::Http;
    let bytes = read_body(state, headers, body).await?;
    let settings = state.settings.clone();
    let len = bytes.len();
    let received_ms = now_ms();
    // A token naming one device binds it: lines without the device tag are that device's.
    let bound = caller.bound_device().cloned();
    let parse = move || -> Result<LineBatch, BatchError> {
        let text = crate::codec::decode_utf8(&bytes)?;
        let ctx = ParseContext {
            now_ms: received_ms,
            max_future_skew: settings.limits.max_future_skew,
            max_age: settings.limits.max_age,
            max_readings: settings.limits.max_readings_per_request,
            bound_device: None,
            token_device: bound.as_ref(),
        };
        let opts = LineOptions {
            device_tag: &settings.formats.line_protocol.device_tag,
            precision,
        };
        line_protocol::parse(text, &opts, &ctx)
    };
    let parsed = if len > INLINE_PARSE_BYTES {
        tokio::task::spawn_blocking(parse)
            .await
            .unwrap_or_else(|e| Err(BatchError::Malformed(format!("parser failed: {e}"))))
    } else {
        parse()
    };
    let mut lines = match parsed {
        Ok(b) => b,
        Err(BatchError::Malformed(detail)) => {
            state
                .metrics
                .rejected_unparsed(t, RejectReason::Malformed, 1);
            return Err(Problem::bad_request(detail));
        }
        Err(e @ BatchError::TooMany { count, .. }) => {
            state
                .metrics
                .rejected_unparsed(t, RejectReason::TooManyReadings, count as u64);
            return Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-many-readings",
                "Too many readings",
                format!("{e} (lines)"),
            ));
        }
    };
    count_parsed(state, t, &lines.batch);
    state
        .metrics
        .line_protocol_ignored_fields
        .inc_by(lines.ignored_fields as u64);
    // Devices the token may not write, then each device's rate limit (SPEC §11). All forbidden
    // is a 403; some forbidden is a partial write naming the first refused line (a 400, which
    // clients do not retry: retrying would not help). Any line over its rate limit makes the
    // whole request a 429 with Retry-After, and nothing of it is stored: Telegraf and the
    // InfluxDB clients retry a 429 with the whole batch and drop a 400's, so storing the other
    // lines would store them twice on the retry, and a partial 400 would lose the limited ones.
    // A device with more lines than its burst can never go through whole, however long the
    // client waits: 413, before any allowance is taken, so that Telegraf splits the batch
    // (its v2 output halves a batch on 413) instead of resending it forever.
    let mut per_device: Option<(usize, &str)> = None;
    if let Some(limiter) = &state.access.limiter {
        let mut counts: foldhash::HashMap<&str, usize> = foldhash::HashMap::default();
        // Devices the token may not write are refused as forbidden below, whatever their count.
        for r in lines
            .batch
            .readings
            .iter()
            .filter(|r| caller.may_write(r.device_id.as_str()))
        {
            let n = counts.entry(r.device_id.as_str()).or_default();
            *n += 1;
            if per_device.is_none_or(|(most, _)| *n > most) {
                per_device = Some((*n, r.device_id.as_str()));
            }
        }
        let burst = limiter.rate().burst.max(1) as usize;
        if let Some((most, device)) = per_device.filter(|(most, _)| *most > burst) {
            let total = lines.batch.readings.len() as u64;
            state.metrics.rejected(t, RejectReason::RateLimited, total);
            state
                .metrics
                .readings_rate_limited
                .with_label_values(&[t.as_str()])
                .inc_by(total);
            return Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Too large for the rate limit",
                format!(
                    "device `{device}` has {most} lines in this batch, more than rate_limit.burst ({burst}) lets through at once; nothing was written: send at most {burst} lines per device per batch"
                ),
            ));
        }
    }
    let busiest = per_device.map_or(1, |(most, _)| most);
    let screened = state.access.screen(caller, t, &mut lines.batch);
    if screened.limited > 0 {
        let total = lines.batch.readings.len() + lines.batch.rejected.len();
        // The lines under their limit are turned away with the others: counted the same way.
        let collateral = lines.batch.readings.len() as u64;
        state
            .metrics
            .rejected(t, RejectReason::RateLimited, collateral);
        state
            .metrics
            .readings_rate_limited
            .with_label_values(&[t.as_str()])
            .inc_by(collateral);
        let mut p = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
            format!(
                "{} of {total} line(s) are over their device's rate limit (rate_limit.per_device); nothing was written: retry the whole batch after Retry-After",
                screened.limited
            ),
        );
        // Long enough for the busiest device of the batch to have all its lines' allowance
        // again (every device's allowance is then whole too), not just the next reading's.
        let whole = state
            .access
            .limiter
            .as_ref()
            .map(|l| l.rate().interval() * busiest as u32);
        p.retry_after = screened.retry.max(whole);
        let mut response = influx_error(p);
        state.access.rate_headers(&screened, response.headers_mut());
        return Ok(response);
    }
    let first_error = lines.first_error();
    let rejected = lines.batch.rejected.len();
    if lines.batch.readings.is_empty() && screened.status_when_nothing_taken(rejected).is_some() {
        return Ok(crate::access::forbidden_influx(
            "every line names a device this token may not write",
        ));
    }
    let written = lines.batch.readings.len();
    if written > 0 {
        submit(state, t, lines.batch.readings).await?;
    }
    let mut response = match first_error {
        None => StatusCode::NO_CONTENT.into_response(),
        Some((line, message)) => (
            StatusCode::BAD_REQUEST,
            Json(InfluxError {
                code: "invalid",
                message: if written == 0 {
                    format!("line {line}: {message} ({rejected} line(s) rejected, nothing written)")
                } else {
                    format!(
                        "partial write: line {line}: {message} ({rejected} line(s) rejected, the other {written} written)"
                    )
                },
                line: Some(line),
            }),
        )
            .into_response(),
    };
    state.access.rate_headers(&screened, response.headers_mut());
    Ok(response)
}
