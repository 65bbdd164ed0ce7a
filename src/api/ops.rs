//! Operations endpoints: `/metrics`, `/healthz`, `/readyz`, and the middleware that counts
//! every HTTP request by route and status.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::params::{NoParams, Params};
use super::problem::Problem;
use super::AppState;

/// `GET /metrics`: Prometheus text exposition. It takes no query parameter.
pub async fn metrics(State(state): State<AppState>, _: Params<NoParams>) -> Response {
    let body = state.metrics.render();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// `GET /healthz`: 200 while the process serves. It takes no query parameter.
pub async fn healthz(_: Params<NoParams>) -> &'static str {
    "ok\n"
}

/// `GET /readyz`: 200 when ingest is accepted; otherwise 503, a problem document
/// (`urn:sluice:not-ready`) whose detail says why, with `Retry-After`. It takes no query
/// parameter.
pub async fn readyz(State(state): State<AppState>, _: Params<NoParams>) -> Response {
    match state.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => Problem::unavailable(
            "not-ready",
            "Not ready",
            format!("not ready: {why}"),
            state.settings.pipeline.retry_after,
        )
        .into_response(),
    }
}

/// Counts requests and their duration by matched route (never the raw path, which would
/// carry device ids) and status.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    let labels = [route.as_str(), status.as_str()];
    state.metrics.http_requests.with_label_values(&labels).inc();
    state
        .metrics
        .http_duration
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
    res
}
