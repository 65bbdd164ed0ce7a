//! Query endpoints: read back what the pipeline committed.
//!
//! - `GET /v1/devices` and `GET /v1/devices/{id}` answer from the device-state service
//!   (memory), or, when the store keeps a device table shared by replicas (PostgreSQL), from
//!   that table on a blocking thread, so every replica answers the same (SPEC §13).
//! - `GET /v1/devices/{id}/readings` queries the store on a blocking thread. With `agg` and
//!   `step` (SPEC §12) it answers aggregates per bucket instead ([`aggregate`]): from a rollup
//!   level when the step is a multiple of one, else from raw readings (`store::rollup`).

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::params::{NoParams, Params};
use super::problem::Problem;
use super::AppState;
use crate::access::Caller;
use crate::reading::{check_metric_name, parse_ts, DeviceId};
use crate::services::device_state::{DeviceState, DeviceView};
use crate::store::rollup::{AggAnswer, AggFn, AggQuery, AggSeries, AggSource};
use crate::store::{DeviceGlob, DevicesQuery, Order, ReadingsQuery, StoreError, StoredRow};

/// Default and largest `limit` of a readings query (SPEC §3).
pub const DEFAULT_LIMIT: usize = 1000;
/// Largest `limit`.
pub const MAX_LIMIT: usize = 10_000;

/// Devices that `q` selects: from the store's shared device table (PostgreSQL), or from the
/// device-state service (memory). A store error is a 503 problem.
async fn find_devices(state: &AppState, q: DevicesQuery) -> Result<Vec<DeviceView>, Problem> {
    let reader = state.reader.clone();
    let retry = state.settings.pipeline.retry_after;
    let unavailable =
        |detail: String| Problem::unavailable("unavailable", "Store unavailable", detail, retry);
    let devices = state.devices.clone();
    // The store's query, or a pass over the device state: either may take a while with many
    // devices, so neither runs on the event loop.
    let found = read_blocking(move || match reader.devices(&q) {
        None => Ok(match &q.device {
            Some(id) => devices.get(id).into_iter().collect(),
            None => devices.page(&q),
        }),
        Some(Err(e)) => Err(e),
        Some(Ok(list)) => Ok(list.iter().map(DeviceState::view_of).collect()),
    })
    .await;
    match found {
        Err(e) => Err(unavailable(e.to_string())),
        Ok(Err(e)) => Err(unavailable(e.to_string())),
        Ok(Ok(list)) => Ok(list),
    }
}

/// Query string of `GET /v1/devices` (SPEC §3).
#[derive(Debug, Deserialize)]
pub struct DevicesParams {
    /// Only device ids that start with this.
    prefix: Option<String>,
    /// At most this many per page (default 1000, max 10 000).
    limit: Option<String>,
    /// The `next` of the previous page.
    cursor: Option<String>,
}

#[derive(Serialize)]
struct DevicesBody {
    devices: Vec<DeviceView>,
    /// Present when more devices match: pass it as `cursor` for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// `GET /v1/devices?prefix=&limit=&cursor=`: a page of devices sorted by id; `next` is the
/// cursor of the next page (the last id of this one), present only when more match.
pub async fn list_devices(
    State(state): State<AppState>,
    caller: Caller,
    Params(p): Params<DevicesParams>,
) -> Response {
    let result = async {
        let limit = parse_limit(p.limit)?;
        // A prefix is the start of a device id (SPEC §1: a letter or digit, then letters,
        // digits, `_`, `:`, `-`, at most 128); a cursor is a whole one, the last of a page.
        if let Some(v) = p.prefix.as_deref().filter(|v| !v.is_empty()) {
            if v.len() > crate::reading::MAX_DEVICE_ID_LEN
                || !v.starts_with(|c: char| c.is_ascii_alphanumeric())
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_:-".contains(&b))
            {
                return Err(Problem::bad_request(format!(
                    "prefix: no device id starts with `{v}` (a letter or digit, then A-Z a-z 0-9 _ : -, at most 128)"
                )));
            }
        }
        if let Some(v) = p.cursor.as_deref().filter(|v| !v.is_empty()) {
            DeviceId::parse(v).map_err(|e| {
                Problem::bad_request(format!(
                    "cursor: `{v}` is not a cursor this server gave (the `next` of a page): {e}"
                ))
            })?;
        }
        let q = DevicesQuery {
            device: None,
            prefix: p.prefix.filter(|p| !p.is_empty()),
            after: p.cursor.filter(|c| !c.is_empty()),
            glob: None,
            // One more than asked tells whether another page follows.
            limit: limit + 1,
        };
        let mut devices = match caller.read_glob() {
            None => find_devices(&state, q).await?,
            // A write token lists only its own devices (SPEC §11).
            Some(glob) => own_devices(&state, q, glob).await?,
        };
        let next = if devices.len() > limit {
            devices.truncate(limit);
            devices.last().map(|d| d.device_id.clone())
        } else {
            None
        };
        Ok(Json(DevicesBody { devices, next }).into_response())
    }
    .await;
    result.unwrap_or_else(|p: Problem| p.into_response())
}

/// The devices `q` selects that `glob` matches, at most `q.limit`: the query narrowed to the
/// glob's literal prefix and filtered by the glob, in one pass of the store or device state.
async fn own_devices(
    state: &AppState,
    mut q: DevicesQuery,
    glob: &str,
) -> Result<Vec<DeviceView>, Problem> {
    let glob = DeviceGlob::new(glob);
    let literal = glob.literal_prefix();
    let asked = q.prefix.clone().unwrap_or_default();
    q.prefix = if literal.starts_with(&asked) {
        Some(literal.to_owned()).filter(|p| !p.is_empty())
    } else if asked.starts_with(literal) {
        Some(asked)
    } else {
        return Ok(Vec::new()); // the prefix asked for and the token's devices do not overlap
    };
    q.glob = Some(glob);
    find_devices(state, q).await
}

/// Refuses a device the caller may not read (a write token reading another device): 403,
/// whether the device exists or not, so existence is not revealed.
fn check_read(state: &AppState, caller: &Caller, device: &str) -> Result<(), Box<Response>> {
    if caller.may_read(device) {
        return Ok(());
    }
    Err(Box::new(crate::access::forbidden(
        &state.access,
        crate::telemetry::metrics::Transport::Http,
        format!("device `{device}` is not allowed for this token"),
    )))
}

/// The `{device_id}` of the path; a problem document (never axum's plain text) when it
/// does not decode or is not a device id.
fn device_path(path: Result<Path<String>, PathRejection>) -> Result<DeviceId, Problem> {
    let Path(id) = path.map_err(|e| Problem::rejected(e.status(), e.body_text()))?;
    DeviceId::parse(&id).map_err(|e| Problem::bad_request(format!("device_id: {e}")))
}

/// `GET /v1/devices/{device_id}`. It takes no query parameter.
pub async fn get_device(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    _: Params<NoParams>,
) -> Response {
    let id = match device_path(path) {
        Ok(id) => id,
        Err(p) => return p.into_response(),
    };
    if let Err(refused) = check_read(&state, &caller, id.as_str()) {
        return *refused;
    }
    let q = DevicesQuery {
        device: Some(id.as_str().to_owned()),
        limit: 1,
        ..DevicesQuery::default()
    };
    match find_devices(&state, q).await {
        Ok(found) => match found.into_iter().next() {
            Some(d) => Json(d).into_response(),
            None => Problem::not_found(format!("device `{id}` is not known")).into_response(),
        },
        Err(p) => p.into_response(),
    }
}

/// `limit`: default [`DEFAULT_LIMIT`], 1 to [`MAX_LIMIT`].
fn parse_limit(limit: Option<String>) -> Result<usize, Problem> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(Problem::bad_request(format!(
                "limit: `{s}` must be an integer from 1 to {MAX_LIMIT}"
            ))),
        },
    }
}

/// Query string of `GET /v1/devices/{id}/readings`.
#[derive(Debug, Deserialize)]
pub struct ReadingsParams {
    /// Inclusive lower bound: RFC 3339 or epoch ms.
    from: Option<String>,
    /// Exclusive upper bound: RFC 3339 or epoch ms.
    to: Option<String>,
    /// Only readings carrying this metric, narrowed to it.
    metric: Option<String>,
    /// At most this many (default 1000, max 10 000).
    limit: Option<String>,
    /// `asc` (default) or `desc`.
    order: Option<String>,
    /// The `next` of the previous page.
    cursor: Option<String>,
    /// `avg`, `min`, `max`, `sum`, `count`, `first` or `last`: aggregates per bucket of
    /// `step` instead of readings (SPEC §12). Needs `step`.
    agg: Option<String>,
    /// The bucket width of `agg`, a duration (`7s`, `5m`, `1h`). Needs `agg`.
    step: Option<String>,
}

/// Writes a readings page, `{"device_id": …, "readings": [<row>, …], "next": …}` (SPEC §3;
/// `next` only when given), to `out`: the bytes serde_json writes for [`StoredRow`]'s
/// `Serialize`, without its per-row costs. Keys are written as literals and each row's
/// timestamp in place ([`TsText`]), where serde would allocate the
/// timestamp's text and run every key and timestamp through its string escaper; a name
/// escapes only when it holds a byte JSON must escape. Numbers go through serde_json, so
/// they are written exactly as before (`null` for a non-finite float, which the store never
/// holds). The page is most of a readings query's CPU, 1 000 rows ≈ 140 kB.
///
/// Errors: only serde_json's, for a number it cannot write (not expected).
fn write_page(
    out: &mut Vec<u8>,
    device_id: &str,
    rows: &[StoredRow],
    next: Option<&str>,
) -> serde_json::Result<()> {
    out.extend_from_slice(b"{\"device_id\":");
    write_str(out, device_id)?;
    out.extend_from_slice(b",\"readings\":[");
    let mut ts = TsText::default();
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"ts\":\"");
        ts.write(out, row.ts_ms);
        out.extend_from_slice(b"\",\"seq\":");
        match row.seq {
            Some(seq) => serde_json::to_writer(&mut *out, &seq)?,
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"metrics\":");
        write_pairs(out, &row.metrics, |out, v| serde_json::to_writer(out, v))?;
        out.extend_from_slice(b",\"tags\":");
        write_pairs(out, &row.tags, |out, v| write_str(out, v))?;
        out.push(b'}');
    }
    out.push(b']');
    if let Some(next) = next {
        out.extend_from_slice(b",\"next\":");
        write_str(out, next)?;
    }
    out.push(b'}');
    Ok(())
}

/// `(name, value)` pairs as a JSON object, in order: names by [`write_str`], values by
/// `value`.
fn write_pairs<V>(
    out: &mut Vec<u8>,
    pairs: &[(String, V)],
    mut value: impl FnMut(&mut Vec<u8>, &V) -> serde_json::Result<()>,
) -> serde_json::Result<()> {
    out.push(b'{');
    for (k, (name, v)) in pairs.iter().enumerate() {
        if k > 0 {
            out.push(b',');
        }
        write_str(out, name)?;
        out.push(b':');
        value(out, v)?;
    }
    out.push(b'}');
    Ok(())
}

/// `s` as a JSON string: copied between quotes when no byte needs escaping (RFC 8259 §7: `"`,
/// `\\` and the controls below U+0020, the bytes serde_json escapes), else by serde_json.
fn write_str(out: &mut Vec<u8>, s: &str) -> serde_json::Result<()> {
    // A fold, not `any`: with no early exit the check is vectorised.
    let escape = s
        .bytes()
        .fold(false, |e, b| e | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if !escape {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(out, s)
    }
}

/// The `next` cursor after `row`: `<ts_ms>.<rid>`, the position of the page's last reading
/// in `(ts, rid)` order. Clients treat it as opaque (SPEC §3).
fn cursor_after(row: &StoredRow) -> String {
    format!("{}.{}", row.ts_ms, row.rid)
}

/// The inverse of [`cursor_after`]; a 400 problem for anything this server did not give.
fn parse_cursor(c: &str) -> Result<(i64, u64), Problem> {
    c.split_once('.')
        .and_then(|(ts, rid)| Some((ts.parse().ok()?, rid.parse().ok()?)))
        .ok_or_else(|| {
            Problem::bad_request(format!(
                "cursor: `{c}` is not a cursor this server gave (pass the `next` of the previous page)"
            ))
        })
}

fn readings_query(id: DeviceId, p: ReadingsParams) -> Result<ReadingsQuery, Problem> {
    let ts = |name: &str, v: Option<String>, default: i64| -> Result<i64, Problem> {
        match v {
            None => Ok(default),
            Some(s) => parse_ts(&s).ok_or_else(|| {
                Problem::bad_request(format!(
                    "{name}: `{s}` is not RFC 3339 or epoch milliseconds"
                ))
            }),
        }
    };
    let from_ms = ts("from", p.from, i64::MIN)?;
    let to_ms = ts("to", p.to, i64::MAX)?;
    let limit = parse_limit(p.limit)?;
    let order = match p.order.as_deref() {
        None | Some("asc") => Order::Asc,
        Some("desc") => Order::Desc,
        Some(o) => {
            return Err(Problem::bad_request(format!(
                "order: `{o}` must be asc or desc"
            )))
        }
    };
    if let Some(m) = &p.metric {
        check_metric_name(m).map_err(|e| Problem::bad_request(format!("metric: {e}")))?;
    }
    let after = p.cursor.as_deref().map(parse_cursor).transpose()?;
    Ok(ReadingsQuery {
        device_id: id.as_str().to_owned(),
        from_ms,
        to_ms,
        metric: p.metric,
        limit,
        order,
        after,
    })
}

/// Runs a store read on a blocking thread and answers with its result; then, with the answer
/// already on its way, hands that thread's free memory back
/// ([`crate::telemetry::memory::give_back`], at most every 200 ms per thread). A readings page
/// decodes whole chunks into rows, megabytes the thread would otherwise keep after the answer
/// has gone: reading a fleet back 8 devices at a time after 15 s of fleet-1k took peak RSS to
/// 216 and 168 MiB without it, 165 and 153 MiB with it (2026-12-02). The collection comes after
/// the answer because it takes milliseconds: before it, it delayed every query that was due
/// one (at 50 queries/s during fleet-1k load, a tenth of them by more than 2.6 ms).
///
/// Errors: the read's panic, or its cancellation when the runtime shuts down, as text.
async fn read_blocking<T: Send + 'static>(
    read: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (answer_tx, answer) = tokio::sync::oneshot::channel();
    let thread = tokio::task::spawn_blocking(move || {
        // Unsent only when the request was dropped meanwhile (the client went away).
        let _ = answer_tx.send(read());
        crate::telemetry::memory::give_back(crate::telemetry::memory::BLOCKING_INTERVAL);
    });
    match answer.await {
        Ok(answer) => Ok(answer),
        // Dropped unsent: the read panicked, which the join reports.
        Err(_) => Err(match thread.await {
            Err(e) => e.to_string(),
            Ok(()) => "the read ended without an answer".to_owned(),
        }),
    }
}

/// `GET /v1/devices/{device_id}/readings?from=&to=&metric=&limit=&order=&cursor=`: a page
/// of stored readings in `(ts, rid)` order; `next` is the cursor of the next page, present
/// only when more match (SPEC §3).
pub async fn readings(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    Params(mut params): Params<ReadingsParams>,
) -> Response {
    if let Ok(Path(id)) = &path {
        if let Err(refused) = check_read(&state, &caller, id) {
            return *refused;
        }
    }
    if params.agg.is_some() || params.step.is_some() {
        let agg = params.agg.take();
        let step = params.step.take();
        return aggregate(state, path, params, agg, step).await;
    }
    let result = async {
        let id = device_path(path)?;
        let mut q = readings_query(id, params)?;
        let limit = q.limit;
        // One more than asked tells whether another page follows.
        q.limit += 1;
        let reader = state.reader.clone();
        let retry = state.settings.pipeline.retry_after;
        let unavailable = |detail: String| {
            Problem::unavailable("unavailable", "Store unavailable", detail, retry)
        };
        let device_id = q.device_id.clone();
        // The page is read and serialized on a blocking thread: 1 000 readings are ~140 kB of
        // JSON, about a millisecond of CPU that would otherwise hold an event-loop worker
        // that ingest handlers are queued on.
        let page = read_blocking(move || {
            let Some(mut readings) = reader.readings(&q)? else {
                return Ok(None);
            };
            let next = if readings.len() > limit {
                readings.truncate(limit);
                readings.last().map(cursor_after)
            } else {
                None
            };
            // About 140 bytes per 4-metric reading: sized up front rather than grown.
            let mut out = Vec::with_capacity(128 + readings.len() * 160);
            let written = write_page(&mut out, &q.device_id, &readings, next.as_deref());
            Ok::<_, StoreError>(Some(written.map(|()| out)))
        })
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .map_err(|e| unavailable(e.to_string()))?;
        match page {
            // Not expected (every value is a finite number, a bool or a string); answered as
            // axum's `Json` would, with a 500.
            Some(Err(e)) => Err(Problem::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                format!("cannot serialize the page: {e}"),
            )),
            Some(Ok(out)) => Ok((
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                out,
            )
                .into_response()),
            None => Err(Problem::not_found(format!(
                "device `{device_id}` has no stored readings"
            ))),
        }
    }
    .await;
    result.unwrap_or_else(|p| p.into_response())
}

/// `agg=&step=` on `GET /v1/devices/{device_id}/readings` (SPEC §12):
/// `{"device_id", "agg", "step", "series": [{"ts": <bucket start>, "metrics": {...}}]}`.
///
/// - Buckets start at whole multiples of `step` since the Unix epoch (UTC) and are whole: a
///   `from` or `to` inside a bucket takes all of it. Empty buckets are left out. An open
///   `from` or `to` is the device's oldest or newest stored data.
/// - The range may span at most `limit` buckets (default 1000, up to `rollups.max_buckets`);
///   past it the answer is a 400 `too-many-buckets` that names both numbers. So an answer is
///   always complete: it has no `next`, and `cursor` is refused.
/// - `metric` narrows to one metric; `order=desc` gives the newest bucket first.
/// - `avg` and `sum` are doubles (a boolean counts 1 when true: its sum is the count of true,
///   its average the fraction true); `count` an integer; `min`, `max`, `first` and `last` the
///   stored values, first and last by reading time.
async fn aggregate(
    state: AppState,
    path: Result<Path<String>, PathRejection>,
    p: ReadingsParams,
    agg: Option<String>,
    step: Option<String>,
) -> Response {
    let result = async {
        let id = device_path(path)?;
        let accepted = || {
            AggFn::ALL
                .iter()
                .map(|f| f.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (agg, step) = match (agg, step) {
            (Some(a), Some(s)) => (a, s),
            (Some(_), None) => {
                return Err(Problem::bad_request(
                    "agg needs step: the bucket width, e.g. step=5m",
                ))
            }
            (None, _) => {
                return Err(Problem::bad_request(format!(
                    "step needs agg: one of {}",
                    accepted()
                )))
            }
        };
        let func = AggFn::parse(&agg).ok_or_else(|| {
            Problem::bad_request(format!("agg: `{agg}` must be one of {}", accepted()))
        })?;
        // At most 100 years (config::duration::MAX), so the step is always the one asked for.
        let step_ms = match crate::config::duration::parse(&step) {
            Ok(d) if d.as_millis() >= 1 && d.subsec_nanos() % 1_000_000 == 0 => {
                i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
            }
            Ok(_) => {
                return Err(Problem::bad_request(format!(
                    "step: `{step}` must be a duration of whole milliseconds, at least 1ms (e.g. 7s, 5m, 1h)"
                )))
            }
            Err(e) => return Err(Problem::bad_request(format!("step: {e}"))),
        };
        if p.cursor.is_some() {
            return Err(Problem::bad_request(
                "cursor: aggregation answers are never paged (a range that does not fit in limit buckets is refused); narrow from and to instead",
            ));
        }
        let max = state.settings.rollups.max_buckets;
        let limit = match p.limit.as_deref() {
            None => DEFAULT_LIMIT.min(max),
            Some(s) => match s.parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => n,
                _ => {
                    return Err(Problem::bad_request(format!(
                        "limit: `{s}` must be an integer from 1 to {max} buckets (rollups.max_buckets)"
                    )))
                }
            },
        };
        // The rest of the parameters mean what they mean for readings.
        let base = readings_query(
            id,
            ReadingsParams {
                limit: None,
                cursor: None,
                agg: None,
                step: None,
                ..p
            },
        )?;
        let q = AggQuery {
            device_id: base.device_id,
            from_ms: (base.from_ms != i64::MIN).then_some(base.from_ms),
            to_ms: (base.to_ms != i64::MAX).then_some(base.to_ms),
            metric: base.metric,
            step_ms,
            max_buckets: limit as u64,
        };
        let reader = state.reader.clone();
        let retry = state.settings.pipeline.retry_after;
        let unavailable = |detail: String| {
            Problem::unavailable("unavailable", "Store unavailable", detail, retry)
        };
        let query = q.clone();
        let answer = read_blocking(move || reader.aggregate(&query))
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .map_err(|e| unavailable(e.to_string()))?;
        let step_text = crate::config::duration::format(std::time::Duration::from_millis(step_ms as u64));
        match answer {
            None => Err(Problem::not_found(format!(
                "device `{}` has no stored readings",
                q.device_id
            ))),
            Some(AggAnswer::TooManyBuckets {
                buckets,
                from_ms,
                to_ms,
            }) => Err(Problem::new(
                axum::http::StatusCode::BAD_REQUEST,
                "too-many-buckets",
                "Too many buckets",
                format!(
                    "from {} to {} at step {step_text} is {buckets} buckets, more than limit {limit}; \
                     use a larger step, a shorter range, or a limit up to {max} (rollups.max_buckets)",
                    crate::reading::format_ts(from_ms),
                    crate::reading::format_ts(to_ms),
                ),
            )),
            Some(AggAnswer::Series(series)) => {
                let source = match series.source {
                    AggSource::Level(_) => "level",
                    AggSource::Raw => "raw",
                };
                state
                    .metrics
                    .rollup_queries
                    .with_label_values(&[source])
                    .inc();
                let body = AggBody {
                    device_id: &q.device_id,
                    agg: func,
                    step: step_text,
                    series: &series,
                    desc: base.order == Order::Desc,
                };
                // Sized up front (about 40 bytes per bucket and 30 per value): a month of
                // minutes is megabytes, which axum's `Json` would grow from 128 bytes.
                let values: usize = series.buckets.iter().map(|(_, m)| m.len()).sum();
                let mut out = Vec::with_capacity(256 + series.buckets.len() * 40 + values * 30);
                serde_json::to_writer(&mut out, &body).map_err(|e| unavailable(e.to_string()))?;
                Ok((
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    out,
                )
                    .into_response())
            }
        }
    }
    .await;
    result.unwrap_or_else(|p: Problem| p.into_response())
}

/// The body of an aggregation answer (see [`aggregate`]).
struct AggBody<'a> {
    device_id: &'a str,
    agg: AggFn,
    step: String,
    series: &'a AggSeries,
    /// Newest bucket first.
    desc: bool,
}

impl Serialize for AggBody<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        struct Buckets<'a>(&'a AggBody<'a>);
        struct Bucket<'a>(
            &'a AggBody<'a>,
            &'a str,
            &'a (i64, Vec<(u32, crate::store::rollup::Agg)>),
        );
        struct Metrics<'a>(&'a AggBody<'a>, &'a [(u32, crate::store::rollup::Agg)]);
        impl Serialize for Buckets<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeSeq;
                let b = &self.0.series.buckets;
                let mut seq = s.serialize_seq(Some(b.len()))?;
                let mut ts = TsText::default();
                let mut one = |x: &(i64, Vec<(u32, crate::store::rollup::Agg)>)| {
                    seq.serialize_element(&Bucket(self.0, ts.format(x.0), x))
                };
                if self.0.desc {
                    b.iter().rev().try_for_each(&mut one)?;
                } else {
                    b.iter().try_for_each(&mut one)?;
                }
                seq.end()
            }
        }
        impl Serialize for Bucket<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("ts", self.1)?;
                m.serialize_entry("metrics", &Metrics(self.0, &self.2 .1))?;
                m.end()
            }
        }
        impl Serialize for Metrics<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let names = &self.0.series.names;
                let mut m = s.serialize_map(Some(self.1.len()))?;
                for (ix, agg) in self.1 {
                    let name = names.get(*ix as usize).map_or("", String::as_str);
                    m.serialize_entry(name, &self.0.agg.value(agg))?;
                }
                m.end()
            }
        }
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("device_id", self.device_id)?;
        m.serialize_entry("agg", self.agg.as_str())?;
        m.serialize_entry("step", &self.step)?;
        m.serialize_entry("series", &Buckets(self))?;
        m.end()
    }
}

/// [`crate::reading::format_ts`] for a run of nearby timestamps (bucket starts, a readings
/// page): the date part is formatted once per day, the time of day by hand (43 200 buckets of
/// a month otherwise spend milliseconds on calendar arithmetic, and a page of 1 000 readings
/// a third of a millisecond).
#[derive(Default)]
struct TsText {
    /// The day (since the epoch) `last` holds the date of, when it has the 24-byte form.
    day: Option<i64>,
    /// The last timestamp written on the fast path: `YYYY-MM-DDThh:mm:ss.mmmZ`.
    last: [u8; 24],
    /// [`TsText::format`]'s answer.
    text: String,
}

impl TsText {
    /// Appends `format_ts(ms)` to `out`.
    fn write(&mut self, out: &mut Vec<u8>, ms: i64) {
        let day = ms.div_euclid(86_400_000);
        if self.day != Some(day) {
            let start = out.len();
            crate::reading::write_ts(out, ms);
            let text = &out[start..];
            // The fast path needs the 24-byte form, whose time digits sit at fixed places:
            // years 0 to 9999, and -999 to -1 (`-001`). Longer years are written in full
            // every time (the `<ms> ms since the epoch` of a time beyond them is 34 bytes
            // or more).
            self.day = None;
            if text.len() == 24 && text[10] == b'T' {
                self.last.copy_from_slice(text);
                self.day = Some(day);
            }
            return;
        }
        let of_day = ms.rem_euclid(86_400_000);
        let (h, m, s, milli) = (
            of_day / 3_600_000,
            of_day / 60_000 % 60,
            of_day / 1000 % 60,
            of_day % 1000,
        );
        let digits = [
            (11, h / 10),
            (12, h % 10),
            (14, m / 10),
            (15, m % 10),
            (17, s / 10),
            (18, s % 10),
            (20, milli / 100),
            (21, milli / 10 % 10),
            (22, milli % 10),
        ];
        for (at, d) in digits {
            self.last[at] = b'0' + d as u8;
        }
        out.extend_from_slice(&self.last);
    }

    /// `format_ts(ms)`, borrowed until the next call.
    fn format(&mut self, ms: i64) -> &str {
        let mut bytes = std::mem::take(&mut self.text).into_bytes();
        bytes.clear();
        self.write(&mut bytes, ms);
        // Always UTF-8 (ASCII digits over `write_ts`'s text); the fallback keeps it safe.
        self.text = String::from_utf8(bytes).unwrap_or_else(|_| crate::reading::format_ts(ms));
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::MetricValue;

    /// The page as serde writes it from [`StoredRow`]'s `Serialize` (the handler's output
    /// before [`write_page`]).
    #[derive(Serialize)]
    struct SerdePage<'a> {
        device_id: &'a str,
        readings: &'a [StoredRow],
        #[serde(skip_serializing_if = "Option::is_none")]
        next: Option<&'a str>,
    }

    #[test]
    fn the_page_writer_writes_what_serde_writes() {
        let row =
            |rid: u64, ts_ms: i64, seq: Option<u64>, metrics: Vec<(&str, MetricValue)>| StoredRow {
                rid,
                ts_ms,
                seq,
                metrics: metrics
                    .into_iter()
                    .map(|(n, v)| (n.to_owned(), v))
                    .collect(),
                tags: Vec::new(),
            };
        let mut odd = row(
            3,
            -62_135_596_800_001,
            None,
            vec![
                ("q\"uote", MetricValue::Float(-0.0)),
                ("back\\slash", MetricValue::Float(1.5e-7)),
                ("tab\tnl\n\u{1}", MetricValue::Float(1e300)),
                ("é\u{2028}\u{7f}", MetricValue::Float(3.0)),
            ],
        );
        odd.tags = vec![
            ("site".into(), "north \"B\"\\2".into()),
            ("k\u{0}".into(), "ü\r".into()),
            ("".into(), "".into()),
        ];
        let rows = [
            row(
                1,
                1_796_058_000_123,
                Some(0),
                vec![
                    ("t", MetricValue::Float(21.5)),
                    ("n", MetricValue::Int(i64::MIN)),
                    ("u", MetricValue::UInt(u64::MAX)),
                    ("on", MetricValue::Bool(true)),
                ],
            ),
            row(
                2,
                0,
                Some(u64::MAX),
                vec![
                    ("off", MetricValue::Bool(false)),
                    ("x", MetricValue::Float(0.1)),
                ],
            ),
            odd,
            // Beyond the years RFC 3339 can write.
            row(
                4,
                i64::MAX,
                None,
                vec![("f", MetricValue::Float(f64::MIN_POSITIVE))],
            ),
            row(
                5,
                253_402_300_799_999,
                Some(7),
                vec![("i", MetricValue::Int(-1))],
            ),
            // Later on the first row's day, and the day before it (the timestamp cache).
            row(
                6,
                1_796_058_000_123 + 3_723_456,
                None,
                vec![("t", MetricValue::Float(2.0))],
            ),
            row(
                7,
                1_796_058_000_123 - 86_400_000,
                None,
                vec![("t", MetricValue::Float(2.5))],
            ),
            row(
                8,
                1_796_058_000_123 - 86_399_999,
                None,
                vec![("t", MetricValue::Float(3.5))],
            ),
            // Two on one day of the year -1 (`-001-…`, the fast path too).
            row(
                9,
                -62_180_000_000_000,
                None,
                vec![("t", MetricValue::Int(1))],
            ),
            row(
                10,
                -62_179_999_998_766,
                None,
                vec![("t", MetricValue::Int(2))],
            ),
        ];
        for (device, rows, next) in [
            ("d-1", &rows[..], Some("1796058000123.1")),
            ("gw:7_a-b", &rows[..], None),
            ("d", &rows[..0], None),
            ("d", &rows[2..3], Some("x\"y")),
        ] {
            let mut ours = Vec::new();
            write_page(&mut ours, device, rows, next).expect("writes");
            let serde = serde_json::to_vec(&SerdePage {
                device_id: device,
                readings: rows,
                next,
            })
            .expect("serde writes");
            assert_eq!(
                String::from_utf8(ours).expect("UTF-8"),
                String::from_utf8(serde).expect("UTF-8")
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocking_read_answers_its_value_or_its_panic() {
        assert_eq!(read_blocking(|| 7).await, Ok(7));
        let panicked = read_blocking(|| -> u8 { panic!("the chunk is gone") })
            .await
            .expect_err("a panic is an error");
        assert!(panicked.contains("panic"), "{panicked}");
    }

    #[test]
    fn bucket_timestamps_format_as_format_ts() {
        let mut t = TsText::default();
        for ms in [
            0,
            59_999,
            86_399_999,
            86_400_000,
            1_796_058_000_123,
            -1,
            -86_400_001,
            253_402_300_799_999,
            253_402_300_800_000,
        ] {
            assert_eq!(t.format(ms), crate::reading::format_ts(ms), "{ms}");
        }
        let mut ms = 1_796_000_000_000;
        while ms < 1_796_000_000_000 + 3 * 86_400_000 {
            assert_eq!(t.format(ms), crate::reading::format_ts(ms));
            ms += 61_001;
        }
    }
}
