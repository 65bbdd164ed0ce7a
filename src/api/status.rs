//! The status page (SPEC §14): `GET /` serves the page, `GET /static/{*path}` its assets, and
//! `GET /v1/status` the figures it shows.
//!
//! This sits beside the flow, not in it, like `/metrics`: it reads what the pipeline already
//! counts and never touches the store.
//!
//! - **Assets** are the files of the top-level `static/` folder, built into the binary with
//!   `include_bytes!` ([`ASSETS`]): no CDN, no file read at run time, nothing to install. A
//!   path is looked up in that fixed table, so nothing outside it can ever be served; a path
//!   with a `..`, `.` or empty segment is refused with a 400 all the same, to say why.
//! - **Figures** come from one [`Registry::gather`](prometheus::Registry::gather) of
//!   [`Metrics::registry`](crate::telemetry::metrics::Metrics::registry): the same metric
//!   handles and collectors `/metrics` renders, read as structured values, never as text. So
//!   `/v1/status` and `/metrics` agree, and a metric added later under its SPEC §7 name
//!   (`sluice_readings_rate_limited_total`, `sluice_http_connections`, `sluice_alerts`) shows
//!   up here without a change to this file; until then its field is `null`.
//! - **Rates and percentiles** are taken over a window between the current gather and an
//!   earlier one that a previous call kept ([`Sampler`]): at least [`MIN_WINDOW`] old, so a
//!   page polling every second gets rates over about one second, and nothing runs between
//!   calls. The first call after a quiet spell has no window, and its rates are `null`.
//! - **Devices**: the count and the recently seen devices are the in-memory device-state
//!   service's ([`crate::services::DeviceState::recent`], a short list it keeps per commit), so
//!   `/v1/status` never scans every device and adds no work per reading. With
//!   `storage.backend = "postgres"` both are this replica's view (the devices it restored or
//!   committed), not the shared table that `GET /v1/devices` reads.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus::proto::{Metric, MetricFamily};
use serde::Serialize;

use super::params::{NoParams, Params};
use super::problem::Problem;
use super::AppState;
use crate::reading::format_ts;
use crate::services::device_state::DeviceView;
use crate::telemetry::metrics::Transport;

/// One file of the page, built into the binary.
pub struct Asset {
    /// Path under `/static/`.
    pub path: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

/// Every file `/static/` serves. The page is `index.html`, also served at `/`.
pub const ASSETS: &[Asset] = &[
    Asset {
        path: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../static/index.html"),
    },
    Asset {
        path: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../static/app.js"),
    },
    Asset {
        path: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../static/style.css"),
    },
    Asset {
        path: "vendor/uplot/uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../static/vendor/uplot/uPlot.iife.min.js"),
    },
    Asset {
        path: "vendor/uplot/uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../static/vendor/uplot/uPlot.min.css"),
    },
    Asset {
        path: "vendor/uplot/LICENSE",
        content_type: "text/plain; charset=utf-8",
        body: include_bytes!("../../static/vendor/uplot/LICENSE"),
    },
];

/// The page's policy: its own scripts, styles and connections only (the live tail's
/// WebSocket is same-origin), and no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; \
     connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// A window shorter than this is not used for rates: a page polling every second gets the
/// previous poll (the timer's jitter is why it is not exactly 1 s).
pub const MIN_WINDOW: Duration = Duration::from_millis(900);

/// Gathers kept for later windows, at most this often...
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// ...and for at most this long: a window never spans more than this.
pub const MAX_WINDOW: Duration = Duration::from_secs(30);

/// How many recently seen devices `/v1/status` lists.
pub const RECENT_DEVICES: usize = 10;

/// The routes of the page and its endpoint, each with the state it needs.
pub fn routes() -> Router<AppState> {
    let sampler = Arc::new(Sampler::default());
    Router::new()
        .route("/", get(page))
        .route("/static/{*path}", get(asset))
        .route(
            "/v1/status",
            get(move |state: State<AppState>, params: Params<NoParams>| {
                status(state, params, sampler)
            }),
        )
}

/// Answers with one built-in file.
fn serve(asset: &Asset) -> Response {
    let mut res = asset.body.into_response();
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    // Revalidate every time: a new binary must never run an old cached script.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    res
}

/// `GET /`: the status page. It takes no query parameter (see [`asset`]).
pub async fn page(_: Params<NoParams>) -> Response {
    match ASSETS.iter().find(|a| a.path == "index.html") {
        Some(a) => serve(a),
        None => Problem::not_found("the status page is not built in").into_response(),
    }
}

/// `GET /static/{*path}`: one of [`ASSETS`]. It takes no query parameter, not even a
/// cache-busting `?v=`: every asset is sent with `Cache-Control: no-cache`, so a browser
/// revalidates it on each load and never runs an old one, and the page links its assets
/// without one.
pub async fn asset(path: Result<Path<String>, PathRejection>, _: Params<NoParams>) -> Response {
    let path = match path {
        Ok(Path(path)) => path,
        Err(e) => return Problem::rejected(e.status(), e.body_text()).into_response(),
    };
    if let Some(bad) = path
        .split(['/', '\\'])
        .find(|s| s.is_empty() || *s == "." || *s == "..")
    {
        let what = if bad.is_empty() {
            "an empty"
        } else {
            "a `..` or `.`"
        };
        return Problem::bad_request(format!(
            "static path `{path}` has {what} segment; only the page's own files are served"
        ))
        .into_response();
    }
    match ASSETS.iter().find(|a| a.path == path) {
        Some(a) => serve(a),
        None => Problem::not_found(format!("no static file `{path}`")).into_response(),
    }
}

/// `GET /v1/status`: the status page's figures, as JSON (see the README for each field).
/// It takes no query parameter.
pub async fn status(
    State(state): State<AppState>,
    _: Params<NoParams>,
    sampler: Arc<Sampler>,
) -> Response {
    let now = Instant::now();
    let families = index(state.metrics.registry.gather());
    let totals = Arc::new(Totals::read(&families));
    let window = sampler.window(now, totals.clone());
    let recent = state.devices.recent(RECENT_DEVICES);
    Json(StatusBody::build(
        &state,
        &families,
        &totals,
        window.as_ref(),
        recent,
    ))
    .into_response()
}

/// Metric families by name.
type Families = HashMap<String, MetricFamily>;

fn index(families: Vec<MetricFamily>) -> Families {
    families
        .into_iter()
        .map(|f| (f.name().to_owned(), f))
        .collect()
}

/// Whether `m` carries every `(name, value)` of `labels`.
fn has_labels(m: &Metric, labels: &[(&str, &str)]) -> bool {
    labels.iter().all(|(k, v)| {
        m.get_label()
            .iter()
            .any(|l| l.name() == *k && l.value() == *v)
    })
}

/// The series of `name` that carry `labels`; `None` when the metric is not exported.
fn series<'a>(
    families: &'a Families,
    name: &str,
    labels: &'a [(&'a str, &'a str)],
) -> Option<impl Iterator<Item = &'a Metric> + 'a> {
    let family = families.get(name)?;
    Some(
        family
            .get_metric()
            .iter()
            .filter(move |m| has_labels(m, labels)),
    )
}

/// Sum of the counters `name{labels}`; `None` when the metric is not exported.
fn counter(families: &Families, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    series(families, name, labels).map(|s| s.map(|m| m.get_counter().get_value()).sum())
}

/// Sum of the gauges `name{labels}`; `None` when the metric is not exported.
fn gauge(families: &Families, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    series(families, name, labels).map(|s| s.map(|m| m.get_gauge().get_value()).sum())
}

/// An integer metric's value (counters and gauges that count things are whole numbers; a
/// negative gauge reads as 0).
fn int(v: Option<f64>) -> Option<u64> {
    v.map(|v| v.max(0.0).round() as u64)
}

/// A histogram, summed over its series: cumulative bucket counts by upper bound.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hist {
    /// `(upper bound, cumulative count)`, by bound; `+Inf` is `count`.
    pub buckets: Vec<(f64, u64)>,
    /// Observations.
    pub count: u64,
    /// Sum of the observations.
    pub sum: f64,
}

impl Hist {
    fn read(families: &Families, name: &str) -> Option<Self> {
        let mut h = Hist::default();
        for m in series(families, name, &[])? {
            let p = m.get_histogram();
            h.count += p.get_sample_count();
            h.sum += p.get_sample_sum();
            for b in p.get_bucket() {
                match h.buckets.iter_mut().find(|(le, _)| *le == b.upper_bound()) {
                    Some((_, c)) => *c += b.cumulative_count(),
                    None => h.buckets.push((b.upper_bound(), b.cumulative_count())),
                }
            }
        }
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(h)
    }

    /// The observations made since `earlier`.
    pub fn since(&self, earlier: &Hist) -> Hist {
        Hist {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, c)| {
                    let before = earlier
                        .buckets
                        .iter()
                        .find(|(l, _)| *l == le)
                        .map_or(0, |b| b.1);
                    (le, c.saturating_sub(before))
                })
                .collect(),
            count: self.count.saturating_sub(earlier.count),
            sum: (self.sum - earlier.sum).max(0.0),
        }
    }

    /// The `q` quantile, interpolated inside its bucket as Prometheus' `histogram_quantile`
    /// does; `None` without observations. Past the last finite bound it is that bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q * self.count as f64;
        let mut lower = (0.0, 0u64);
        for &(le, c) in &self.buckets {
            if c as f64 >= rank {
                let in_bucket = (c - lower.1) as f64;
                if in_bucket == 0.0 {
                    return Some(le);
                }
                return Some(lower.0 + (le - lower.0) * (rank - lower.1 as f64) / in_bucket);
            }
            lower = (le, c);
        }
        Some(lower.0)
    }

    /// Mean observation; `None` without observations.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// One transport's reading counters (SPEC §7), cumulative.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Counts {
    /// `sluice_readings_received_total`.
    pub received: u64,
    /// `sluice_readings_accepted_total`.
    pub accepted: u64,
    /// `sluice_readings_duplicate_total`.
    pub duplicate: u64,
    /// `sluice_readings_rejected_total`, every reason.
    pub rejected: u64,
    /// `sluice_readings_shed_total`.
    pub shed: u64,
    /// `sluice_readings_rate_limited_total`, when exported.
    pub rate_limited: Option<u64>,
}

/// [`Counts`] per second over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Rates {
    /// Readings received per second.
    pub received: f64,
    /// Readings accepted (committed) per second.
    pub accepted: f64,
    /// Duplicates per second.
    pub duplicate: f64,
    /// Readings rejected per second.
    pub rejected: f64,
    /// Readings shed per second.
    pub shed: f64,
    /// Readings rate-limited per second, when exported.
    pub rate_limited: Option<f64>,
}

impl Counts {
    fn per_second(&self, earlier: &Counts, secs: f64) -> Rates {
        let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
        Rates {
            received: rate(self.received, earlier.received),
            accepted: rate(self.accepted, earlier.accepted),
            duplicate: rate(self.duplicate, earlier.duplicate),
            rejected: rate(self.rejected, earlier.rejected),
            shed: rate(self.shed, earlier.shed),
            rate_limited: self
                .rate_limited
                .map(|n| rate(n, earlier.rate_limited.unwrap_or(0))),
        }
    }
}

/// The cumulative figures that rates and percentiles are taken from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    /// Per transport, in [`Transport::ALL`] order.
    pub transports: Vec<Counts>,
    /// `sluice_store_commit_seconds`, every store.
    pub commit: Hist,
    /// `sluice_event_loop_lag_seconds`, when `telemetry.runtime` is on.
    pub lag: Option<Hist>,
    /// `sluice_runtime_worker_busy_seconds_total`, every worker.
    pub busy_seconds: Option<f64>,
    /// `sluice_runtime_workers`.
    pub workers: Option<u64>,
}

impl Totals {
    fn read(f: &Families) -> Self {
        let transports = Transport::ALL
            .iter()
            .map(|t| {
                let l = [("transport", t.as_str())];
                let c = |name: &str| int(counter(f, name, &l)).unwrap_or(0);
                Counts {
                    received: c("sluice_readings_received_total"),
                    accepted: c("sluice_readings_accepted_total"),
                    duplicate: c("sluice_readings_duplicate_total"),
                    rejected: c("sluice_readings_rejected_total"),
                    shed: c("sluice_readings_shed_total"),
                    rate_limited: int(counter(f, "sluice_readings_rate_limited_total", &l)),
                }
            })
            .collect();
        Totals {
            transports,
            commit: Hist::read(f, "sluice_store_commit_seconds").unwrap_or_default(),
            lag: Hist::read(f, "sluice_event_loop_lag_seconds"),
            busy_seconds: counter(f, "sluice_runtime_worker_busy_seconds_total", &[]),
            workers: int(gauge(f, "sluice_runtime_workers", &[])),
        }
    }
}

/// Earlier gathers, so that each call can take rates over a window without a task running
/// between calls. One per app; shared by every caller.
#[derive(Default)]
pub struct Sampler {
    /// `(when, totals)`, oldest first; at most one per [`SAMPLE_EVERY`], none older than
    /// [`MAX_WINDOW`].
    kept: Mutex<VecDeque<(Instant, Arc<Totals>)>>,
}

/// The figures of a window: `now` against an earlier gather.
pub struct Window {
    /// Its length.
    pub seconds: f64,
    /// The earlier gather.
    pub earlier: Arc<Totals>,
}

impl Sampler {
    /// Keeps `totals` (taken at `now`) for later calls, and returns the newest kept gather
    /// at least [`MIN_WINDOW`] old, if any.
    pub fn window(&self, now: Instant, totals: Arc<Totals>) -> Option<Window> {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        while kept
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > MAX_WINDOW)
        {
            kept.pop_front();
        }
        let window = kept
            .iter()
            .rev()
            .find(|(t, _)| now.saturating_duration_since(*t) >= MIN_WINDOW)
            .map(|(t, earlier)| Window {
                seconds: now.saturating_duration_since(*t).as_secs_f64(),
                earlier: earlier.clone(),
            });
        if kept
            .back()
            .is_none_or(|(t, _)| now.saturating_duration_since(*t) >= SAMPLE_EVERY)
        {
            kept.push_back((now, totals));
        }
        window
    }
}

/// One transport's figures.
#[derive(Serialize)]
struct TransportStatus {
    /// Cumulative counters.
    total: Counts,
    /// The same, per second over the window; `null` without a window.
    per_second: Option<Rates>,
}

/// One pipeline stage's fill.
#[derive(Serialize)]
struct QueueStatus {
    /// `sluice_pipeline_queue_depth{stage}`.
    depth: u64,
    /// `sluice_pipeline_queue_capacity{stage}`.
    capacity: u64,
    /// depth / capacity, 0 to 1.
    fill: f64,
}

/// Store commits.
#[derive(Serialize)]
struct CommitStatus {
    /// Commits since start (`sluice_store_commit_seconds_count`).
    total: u64,
    /// Commits in the window.
    in_window: Option<u64>,
    /// Median commit time in the window, seconds.
    p50_seconds: Option<f64>,
    /// 99th percentile commit time in the window, seconds.
    p99_seconds: Option<f64>,
}

/// Event-loop load; absent with `telemetry.runtime = false`.
#[derive(Serialize)]
struct EventLoopStatus {
    /// `sluice_runtime_workers`.
    workers: Option<u64>,
    /// Busy time of all workers over the window, divided by workers × window (0 to 1).
    busy_ratio: Option<f64>,
    /// Mean lag of the probe over the window, seconds.
    lag_mean_seconds: Option<f64>,
    /// 99th percentile lag over the window, seconds.
    lag_p99_seconds: Option<f64>,
    /// Tasks alive on the runtime (`sluice_runtime_alive_tasks`).
    alive_tasks: Option<u64>,
}

/// Open connections.
#[derive(Serialize)]
struct ConnectionStatus {
    /// Device WebSockets (`sluice_ws_connections{kind="device"}`).
    ws_device: u64,
    /// Live-stream WebSockets (`sluice_ws_connections{kind="live"}`).
    ws_live: u64,
    /// Open HTTP connections (`sluice_http_connections`), when exported.
    http: Option<u64>,
    /// `sluice_mqtt_enabled`.
    mqtt_enabled: bool,
    /// `sluice_mqtt_connected`.
    mqtt_connected: bool,
}

/// The store.
#[derive(Serialize)]
struct StoreStatus {
    /// `sluice_store_up`.
    up: bool,
    /// `sluice_store_journal_readings`.
    journal_readings: Option<u64>,
    /// `sluice_store_journal_capacity_readings`.
    journal_capacity_readings: Option<u64>,
    /// `sluice_store_errors_total`, every store.
    errors_total: u64,
}

/// Devices, from the in-memory device-state service.
#[derive(Serialize)]
struct DevicesStatus {
    /// Devices known to this process.
    count: usize,
    /// Most recently seen first, with their latest values.
    recent: Vec<DeviceView>,
}

/// Alerts, from `sluice_alerts{rule,state}` when exported.
#[derive(Serialize)]
struct AlertsStatus {
    /// Rules whose alert is firing.
    firing: Vec<String>,
    /// Rules whose alert is pending.
    pending: Vec<String>,
}

/// The body of `GET /v1/status`.
#[derive(Serialize)]
struct StatusBody {
    /// Server time of the figures (RFC 3339).
    time: String,
    /// Length of the window rates and percentiles cover; `null` when there is none yet.
    window_seconds: Option<f64>,
    /// Whether ingest is accepted (`/readyz`).
    ready: bool,
    /// Why not, when not ready.
    not_ready_reason: Option<String>,
    /// Per transport (`http`, `ws`, `mqtt`).
    transports: std::collections::BTreeMap<&'static str, TransportStatus>,
    /// Per pipeline stage (`admission`, `store`).
    queues: std::collections::BTreeMap<String, QueueStatus>,
    /// Store commit latency.
    commits: CommitStatus,
    /// Event loop, `null` when `telemetry.runtime = false`.
    event_loop: Option<EventLoopStatus>,
    /// Open connections.
    connections: ConnectionStatus,
    /// The store.
    store: StoreStatus,
    /// Devices.
    devices: DevicesStatus,
    /// Alerts; `null` when Sluice exports no `sluice_alerts`.
    alerts: Option<AlertsStatus>,
}

impl StatusBody {
    fn build(
        state: &AppState,
        f: &Families,
        totals: &Totals,
        window: Option<&Window>,
        recent: Vec<DeviceView>,
    ) -> Self {
        let transports = Transport::ALL
            .iter()
            .zip(&totals.transports)
            .enumerate()
            .map(|(i, (t, c))| {
                let per_second = window.map(|w| c.per_second(&w.earlier.transports[i], w.seconds));
                (
                    t.as_str(),
                    TransportStatus {
                        total: c.clone(),
                        per_second,
                    },
                )
            })
            .collect();
        let mut queues = std::collections::BTreeMap::new();
        if let Some(family) = f.get("sluice_pipeline_queue_capacity") {
            for m in family.get_metric() {
                let Some(stage) = m.get_label().iter().find(|l| l.name() == "stage") else {
                    continue;
                };
                let stage = stage.value().to_owned();
                let capacity = int(Some(m.get_gauge().get_value())).unwrap_or(0);
                let depth = int(gauge(
                    f,
                    "sluice_pipeline_queue_depth",
                    &[("stage", &stage)],
                ))
                .unwrap_or(0);
                let fill = if capacity > 0 {
                    depth as f64 / capacity as f64
                } else {
                    0.0
                };
                queues.insert(
                    stage,
                    QueueStatus {
                        depth,
                        capacity,
                        fill,
                    },
                );
            }
        }
        let commit_window = window.map(|w| totals.commit.since(&w.earlier.commit));
        let commits = CommitStatus {
            total: totals.commit.count,
            in_window: commit_window.as_ref().map(|h| h.count),
            p50_seconds: commit_window.as_ref().and_then(|h| h.quantile(0.5)),
            p99_seconds: commit_window.as_ref().and_then(|h| h.quantile(0.99)),
        };
        let event_loop = totals.lag.as_ref().map(|lag| {
            let lag_window = window.and_then(|w| w.earlier.lag.as_ref().map(|e| lag.since(e)));
            let busy_ratio = window.and_then(|w| {
                let busy = totals.busy_seconds? - w.earlier.busy_seconds?;
                let workers = totals.workers.filter(|n| *n > 0)?;
                Some((busy / (workers as f64 * w.seconds)).clamp(0.0, 1.0))
            });
            EventLoopStatus {
                workers: totals.workers,
                busy_ratio,
                lag_mean_seconds: lag_window.as_ref().and_then(Hist::mean),
                lag_p99_seconds: lag_window.as_ref().and_then(|h| h.quantile(0.99)),
                alive_tasks: int(gauge(f, "sluice_runtime_alive_tasks", &[])),
            }
        });
        let ws =
            |kind: &str| int(gauge(f, "sluice_ws_connections", &[("kind", kind)])).unwrap_or(0);
        let flag = |name: &str| gauge(f, name, &[]).unwrap_or(0.0) > 0.0;
        let alerts = f.get("sluice_alerts").map(|family| {
            let mut a = AlertsStatus {
                firing: Vec::new(),
                pending: Vec::new(),
            };
            for m in family.get_metric() {
                if m.get_gauge().get_value() <= 0.0 {
                    continue;
                }
                let label = |k: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == k)
                        .map(|l| l.value().to_owned())
                };
                let (Some(rule), Some(st)) = (label("rule"), label("state")) else {
                    continue;
                };
                match st.as_str() {
                    "firing" => a.firing.push(rule),
                    "pending" => a.pending.push(rule),
                    _ => {}
                }
            }
            a
        });
        let readiness = state.health.readiness();
        StatusBody {
            time: format_ts(now_ms()),
            window_seconds: window.map(|w| w.seconds),
            ready: readiness.is_ok(),
            not_ready_reason: readiness.err(),
            transports,
            queues,
            commits,
            event_loop,
            connections: ConnectionStatus {
                ws_device: ws("device"),
                ws_live: ws("live"),
                http: int(gauge(f, "sluice_http_connections", &[])),
                mqtt_enabled: flag("sluice_mqtt_enabled"),
                mqtt_connected: flag("sluice_mqtt_connected"),
            },
            store: StoreStatus {
                up: flag("sluice_store_up"),
                journal_readings: int(gauge(f, "sluice_store_journal_readings", &[])),
                journal_capacity_readings: int(gauge(
                    f,
                    "sluice_store_journal_capacity_readings",
                    &[],
                )),
                errors_total: int(counter(f, "sluice_store_errors_total", &[])).unwrap_or(0),
            },
            devices: DevicesStatus {
                count: state.devices.len(),
                recent,
            },
            alerts,
        }
    }
}

/// The wall clock in epoch milliseconds.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(buckets: &[(f64, u64)], sum: f64) -> Hist {
        Hist {
            buckets: buckets.to_vec(),
            count: buckets.last().map_or(0, |b| b.1),
            sum,
        }
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        // 100 observations: 50 at ≤ 1 ms, 40 in (1, 2] ms, 10 in (2, 4] ms.
        let h = hist(&[(0.001, 50), (0.002, 90), (0.004, 100)], 0.15);
        assert_eq!(h.quantile(0.5), Some(0.001));
        let p99 = h.quantile(0.99).unwrap();
        assert!((p99 - 0.0038).abs() < 1e-9, "{p99}");
        assert_eq!(h.mean(), Some(0.0015));
        assert_eq!(Hist::default().quantile(0.5), None);
        assert_eq!(Hist::default().mean(), None);
    }

    #[test]
    fn a_quantile_past_the_last_bound_is_that_bound() {
        let h = Hist {
            buckets: vec![(0.001, 1), (0.002, 1)],
            count: 10,
            sum: 1.0,
        };
        assert_eq!(h.quantile(0.99), Some(0.002));
    }

    #[test]
    fn a_window_counts_only_new_observations() {
        let before = hist(&[(0.001, 10), (0.002, 10)], 0.01);
        let after = hist(&[(0.001, 10), (0.002, 20)], 0.025);
        let w = after.since(&before);
        assert_eq!(w.count, 10);
        assert_eq!(w.buckets, vec![(0.001, 0), (0.002, 10)]);
        assert_eq!(w.quantile(0.5), Some(0.0015));
    }

    #[test]
    fn the_sampler_needs_a_gather_old_enough_for_a_window() {
        let s = Sampler::default();
        let t0 = Instant::now();
        let totals = Arc::new(Totals::default());
        assert!(s.window(t0, totals.clone()).is_none(), "first call");
        assert!(
            s.window(t0 + Duration::from_millis(500), totals.clone())
                .is_none(),
            "0.5 s is too short"
        );
        let w = s
            .window(t0 + Duration::from_millis(1000), totals.clone())
            .expect("window over the first gather");
        assert!((w.seconds - 1.0).abs() < 1e-9);
        // The next call a second later uses the gather a second old, not the oldest.
        let w = s
            .window(t0 + Duration::from_millis(2000), totals.clone())
            .unwrap();
        assert!((w.seconds - 1.0).abs() < 1e-9, "{}", w.seconds);
        // After a long silence, nothing is old enough and young enough.
        assert!(s.window(t0 + Duration::from_secs(60), totals).is_none());
    }

    #[test]
    fn rates_are_per_second_over_the_window() {
        let a = Counts {
            received: 10,
            accepted: 8,
            rate_limited: Some(1),
            ..Counts::default()
        };
        let b = Counts {
            received: 30,
            accepted: 28,
            rate_limited: Some(5),
            ..Counts::default()
        };
        let r = b.per_second(&a, 2.0);
        assert_eq!(r.received, 10.0);
        assert_eq!(r.accepted, 10.0);
        assert_eq!(r.rate_limited, Some(2.0));
        assert_eq!(r.shed, 0.0);
    }

    #[test]
    fn every_asset_is_built_in_and_index_loads_only_built_in_assets() {
        let index = ASSETS.iter().find(|a| a.path == "index.html").unwrap();
        let html = std::str::from_utf8(index.body).unwrap();
        for part in html.split("/static/").skip(1) {
            let path = part.split('"').next().unwrap();
            assert!(
                ASSETS.iter().any(|a| a.path == path),
                "index.html loads /static/{path}, which is not built in"
            );
        }
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no CDN"
        );
        assert!(ASSETS.iter().all(|a| !a.body.is_empty()));
    }
}
