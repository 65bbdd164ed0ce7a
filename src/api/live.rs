//! `GET /v1/live?device=<glob>&metric=<glob>[&type=reading|alert]`: committed readings (the
//! default), or with `type=alert` the rule engine's alert events (SPEC §5, §12), streamed to
//! dashboards and consumers. The reverse of ingest: store → live service → **this handler** →
//! client.
//!
//! The subscriber's buffer lives in the live service and is bounded (`ws.live_buffer`). This
//! task only forwards. When the service reports missed readings, the client first gets
//! `{"type":"lagged","missed":n}` and then the stream carries on.

use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;

use super::params::Params;
use super::AppState;
use crate::access::Caller;
use crate::ingest::ws::{finish_close, upgrade, ConnectionGauge};

/// How often a subscriber is checked for missed readings when nothing else is sent.
const LAG_CHECK: Duration = Duration::from_millis(100);

/// Query string of `/v1/live`; any other parameter is a 400 before the upgrade.
#[derive(Debug, Deserialize)]
pub struct LiveParams {
    /// Glob on device ids (`*`, `?`); all devices if absent.
    device: Option<String>,
    /// Glob on metric names; a reading matches if any of its metrics does (an alert, if its
    /// rule's metric does).
    metric: Option<String>,
    /// `reading` (default) or `alert`.
    #[serde(rename = "type", default)]
    kind: LiveKind,
    /// The token, for browsers, which cannot set `Authorization` on an upgrade; read by
    /// `access::guard`. Never logged.
    #[allow(dead_code)]
    token: Option<String>,
}

/// What a live stream carries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LiveKind {
    /// Committed readings (SPEC §5).
    #[default]
    Reading,
    /// Alert events (SPEC §12).
    Alert,
}

/// The upgrade handler.
pub async fn live_ws(
    State(state): State<AppState>,
    caller: Caller,
    Params(mut params): Params<LiveParams>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // A write token streams only its own devices: no `device` filter means its glob; a filter
    // must be that glob or one device it matches (SPEC §11).
    if let Some(glob) = caller.read_glob() {
        match params.device.as_deref() {
            None => params.device = Some(glob.to_owned()),
            Some(d) if d == glob || (!d.contains(['*', '?']) && caller.may_read(d)) => {}
            Some(d) => {
                return crate::access::forbidden(
                    &state.access,
                    crate::telemetry::metrics::Transport::Ws,
                    format!(
                        "device: `{d}` is not within this token's devices (`{glob}`); use `{glob}` or one device id it matches"
                    ),
                )
            }
        }
    }
    upgrade(ws, state, move |socket, state, _slot| {
        run(socket, state, params, caller)
    })
}

async fn run(socket: WebSocket, state: AppState, params: LiveParams, caller: Caller) {
    let mut revoked = state.access.tokens.watch(caller.token_id());
    let _gauge = ConnectionGauge::new(&state, "live");
    let ws = &state.settings.ws;
    let subscribe = match params.kind {
        LiveKind::Reading => crate::services::Live::subscribe,
        LiveKind::Alert => crate::services::Live::subscribe_alerts,
    };
    let (subscription, mut rx) = subscribe(
        &state.ws.live,
        params.device.as_deref(),
        params.metric.as_deref(),
        ws.live_buffer,
    );
    let (mut sink, mut stream) = socket.split();
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + ws.ping_interval,
        ws.ping_interval,
    );
    let mut lag_check = tokio::time::interval(LAG_CHECK);
    let mut last_heard = tokio::time::Instant::now();
    let shutdown = state.ws.shutdown.clone();
    let send_timeout = ws.idle_timeout;
    let (code, reason) = loop {
        let msg = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => Message::Text(Utf8Bytes::from(m.as_ref())),
                None => break (1011, "stream ended"),
            },
            _ = lag_check.tick() => {
                let missed = subscription.subscriber.take_missed();
                if missed == 0 { continue }
                Message::Text(format!("{{\"type\":\"lagged\",\"missed\":{missed}}}").into())
            }
            _ = ping.tick() => Message::Ping(Bytes::new()),
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => { last_heard = tokio::time::Instant::now(); continue }
            },
            _ = tokio::time::sleep_until(last_heard + ws.idle_timeout) => break (1001, "idle timeout"),
            _ = shutdown.cancelled() => break (1001, "server shutting down"),
            () = revoked.revoked() => break (1008, "token revoked"),
        };
        // Report misses before the next reading, so the client knows where the gap is.
        let missed = subscription.subscriber.take_missed();
        if missed > 0 {
            let lagged =
                Message::Text(format!("{{\"type\":\"lagged\",\"missed\":{missed}}}").into());
            if !matches!(
                tokio::time::timeout(send_timeout, sink.send(lagged)).await,
                Ok(Ok(()))
            ) {
                return;
            }
        }
        if !matches!(
            tokio::time::timeout(send_timeout, sink.send(msg)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    };
    let sent = tokio::time::timeout(
        send_timeout.min(Duration::from_secs(2)),
        sink.send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }))),
    )
    .await;
    if matches!(sent, Ok(Ok(()))) {
        if let Ok(socket) = stream.reunite(sink) {
            finish_close(socket).await;
        }
    }
}
