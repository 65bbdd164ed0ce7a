//! Query endpoints: read back what the pipeline committed.
//!
//! - `GET /v1/devices` and `GET /v1/devices/{id}` answer from the device-state service
//!   (memory), or, when the store keeps a device table shared by replicas (PostgreSQL), from
//!   that table on a blocking thread, so every replica answers the same (SPEC §13).
//! - `GET /v1/devices/{id}/readings` queries the store on a blocking thread.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::params::{NoParams, Params};
use super::problem::Problem;
use super::AppState;
use crate::reading::{check_metric_name, parse_ts, DeviceId};
use crate::services::device_state::{DeviceState, DeviceView};
use crate::store::{DevicesQuery, Order, ReadingsQuery, StoredRow};

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
    let query = q.clone();
    let found = tokio::task::spawn_blocking(move || reader.devices(&query)).await;
    match found {
        Err(e) => Err(unavailable(e.to_string())),
        Ok(None) => Ok(match &q.device {
            Some(id) => state.devices.get(id).into_iter().collect(),
            None => state.devices.page(&q),
        }),
        Ok(Some(Err(e))) => Err(unavailable(e.to_string())),
        Ok(Some(Ok(list))) => Ok(list.iter().map(DeviceState::view_of).collect()),
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
    Params(p): Params<DevicesParams>,
) -> Response {
    let result = async {
        let limit = parse_limit(p.limit)?;
        for (name, value) in [("prefix", &p.prefix), ("cursor", &p.cursor)] {
            if let Some(v) = value {
                if v.len() > 128
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
                {
                    return Err(Problem::bad_request(format!(
                        "{name}: `{v}` cannot be part of a device id (1-128 of A-Z a-z 0-9 . _ : -)"
                    )));
                }
            }
        }
        let q = DevicesQuery {
            device: None,
            prefix: p.prefix.filter(|p| !p.is_empty()),
            after: p.cursor.filter(|c| !c.is_empty()),
            // One more than asked tells whether another page follows.
            limit: limit + 1,
        };
        let mut devices = find_devices(&state, q).await?;
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

/// The `{device_id}` of the path; a problem document (never axum's plain text) when it
/// does not decode or is not a device id.
fn device_path(path: Result<Path<String>, PathRejection>) -> Result<DeviceId, Problem> {
    let Path(id) = path.map_err(|e| Problem::rejected(e.status(), e.body_text()))?;
    DeviceId::parse(&id).map_err(|e| Problem::bad_request(format!("device_id: {e}")))
}

/// `GET /v1/devices/{device_id}`. It takes no query parameter.
pub async fn get_device(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    _: Params<NoParams>,
) -> Response {
    let id = match device_path(path) {
        Ok(id) => id,
        Err(p) => return p.into_response(),
    };
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
}

#[derive(Serialize)]
struct ReadingsBody {
    device_id: String,
    readings: Vec<StoredRow>,
    /// Present when more readings match: pass it as `cursor` for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
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

/// `GET /v1/devices/{device_id}/readings?from=&to=&metric=&limit=&order=&cursor=`: a page
/// of stored readings in `(ts, rid)` order; `next` is the cursor of the next page, present
/// only when more match (SPEC §3).
pub async fn readings(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    Params(params): Params<ReadingsParams>,
) -> Response {
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
        let rows = tokio::task::spawn_blocking(move || reader.readings(&q))
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .map_err(|e| unavailable(e.to_string()))?;
        match rows {
            Some(mut readings) => {
                let next = if readings.len() > limit {
                    readings.truncate(limit);
                    readings.last().map(cursor_after)
                } else {
                    None
                };
                Ok(Json(ReadingsBody {
                    device_id,
                    readings,
                    next,
                })
                .into_response())
            }
            None => Err(Problem::not_found(format!(
                "device `{device_id}` has no stored readings"
            ))),
        }
    }
    .await;
    result.unwrap_or_else(|p| p.into_response())
}
