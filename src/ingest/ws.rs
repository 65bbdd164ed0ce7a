//! `GET /v1/ws[?device_id=ID]`: device → **WebSocket handler** → admission → … → ack frame.
//!
//! Each connection has two halves:
//! - the **reader** reads frames, parses each one at the edge, submits it, and queues the
//!   pending answer. Before reading a frame it takes one of `ws.max_in_flight` permits, so
//!   a device with that many frames unanswered is not read any further: TCP slows it down.
//! - the **writer** sends the answers strictly in frame order. For each one it waits for the
//!   commit, and only then releases the permit. It also sends the pings.
//!
//! Close codes (SPEC §4): 1009 for a message over `ws.max_message_bytes`, 1003 for a binary
//! frame, 1007 for invalid UTF-8, 1013 at `ws.max_connections`, and 1001 at shutdown, sent
//! after every frame read has been answered. A peer silent for `ws.idle_timeout` is closed.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::sleep_until;

use super::http::RejectedItem;
use super::{count_parsed, parse_off_loop, parse_readings, Format};
use crate::access::Caller;
use crate::api::params::Params;
use crate::api::problem::Problem;
use crate::api::AppState;
use crate::codec::{cbor, envelope};
use crate::config::WsSettings;
use crate::pipeline::{AckResult, Refusal};
use crate::reading::{now_ms, BatchError, Binding, DeviceId, ParsedBatch, RejectReason};
use crate::telemetry::metrics::Transport;

/// At shutdown, frames already on their way are still read and answered until the socket has
/// been quiet this long...
const DRAIN_QUIET: Duration = Duration::from_millis(100);
/// ...or for at most this long.
const DRAIN_MAX: Duration = Duration::from_secs(2);

/// Query string of `/v1/ws`. Any other parameter is a 400 before the upgrade: `?device=x`
/// (the live stream's name) would otherwise leave the connection unbound, and every reading
/// without `device_id` rejected.
#[derive(Debug, Deserialize)]
pub struct WsParams {
    /// Binds the connection to one device: readings may omit `device_id`, and must not name
    /// another.
    device_id: Option<String>,
    /// The token, for clients that cannot set `Authorization` on an upgrade (browsers); read
    /// by `access::guard`. Never logged.
    #[allow(dead_code)]
    token: Option<String>,
}

/// Applies the per-connection buffer and size limits.
pub fn configure(ws: WebSocketUpgrade, s: &WsSettings) -> WebSocketUpgrade {
    ws.read_buffer_size(s.read_buffer_bytes)
        .write_buffer_size(s.write_buffer_bytes)
        .max_write_buffer_size(s.write_buffer_bytes.max(64 * 1024) + s.max_message_bytes)
        .max_message_size(s.max_message_bytes)
        .max_frame_size(s.max_message_bytes)
}

/// How long to wait for the peer's half of the closing handshake.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Sends a close frame, waits briefly for the peer's reply, and ends the connection.
pub async fn close(mut socket: WebSocket, code: u16, reason: &'static str) {
    let _ = tokio::time::timeout(
        CLOSE_WAIT,
        socket.send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }))),
    )
    .await;
    finish_close(socket).await;
}

/// After our close frame: read (and discard) until the peer's close or EOF, so the TCP
/// connection ends with a clean closing handshake rather than a reset.
pub async fn finish_close(mut socket: WebSocket) {
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// The upgrade handler.
pub async fn device_ws(
    State(state): State<AppState>,
    caller: Caller,
    Params(params): Params<WsParams>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let bound = match params.device_id.as_deref().map(DeviceId::parse) {
        None => Binding::token(caller.bound_device()),
        Some(Ok(d)) => Binding::Transport(d),
        Some(Err(e)) => return Problem::bad_request(format!("device_id: {e}")).into_response(),
    };
    // A connection bound to a device the token may not write is refused before the upgrade.
    if let Binding::Transport(d) = &bound {
        if !caller.may_write(d.as_str()) {
            return crate::access::forbidden(
                &state.access,
                Transport::Ws,
                format!("device_id: `{d}` is not allowed for this token"),
            );
        }
    }
    upgrade(ws, state, move |socket, state, permit| {
        run(socket, state, bound, caller, permit)
    })
}

/// Upgrades with the configured buffers and limits, and runs `connection` as a tracked task
/// holding one of `ws.max_connections` slots. Without a free slot the peer gets 1013. A
/// request that is not a WebSocket handshake gets axum's status for it, as a problem document.
pub fn upgrade<F, Fut>(
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    state: AppState,
    connection: F,
) -> Response
where
    F: FnOnce(WebSocket, AppState, OwnedSemaphorePermit) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            let status = e.status();
            let mut response = Problem::rejected(
                status,
                format!(
                    "not a WebSocket handshake (RFC 6455 §4.1; connect with a WebSocket client): {}",
                    e.body_text()
                ),
            )
            .into_response();
            // What RFC 9110 asks of these answers: 405 says what is allowed (§15.5.6), 426 what
            // to upgrade to (§15.5.22).
            let header = match status {
                StatusCode::METHOD_NOT_ALLOWED => Some((header::ALLOW, "GET")),
                StatusCode::UPGRADE_REQUIRED => Some((header::UPGRADE, "websocket")),
                _ => None,
            };
            if let Some((name, value)) = header {
                response
                    .headers_mut()
                    .insert(name, HeaderValue::from_static(value));
            }
            return response;
        }
    };
    let permit = state.ws.connections.clone().try_acquire_owned().ok();
    let tracker = state.ws.tracker.clone();
    let family = state.metrics.tasks.ws.clone();
    configure(ws, &state.settings.ws)
        .on_upgrade(move |socket| {
            tracker.track_future(family.instrument(async move {
                match permit {
                    None => close(socket, 1013, "too many connections; try again later").await,
                    Some(permit) => connection(socket, state, permit).await,
                }
            }))
        })
        .into_response()
}

/// One answer owed to the device, in frame order.
enum Outgoing {
    /// Known at once (nothing to commit).
    Ready {
        /// Frees the in-flight slot once sent.
        permit: OwnedSemaphorePermit,
        /// When the frame was read.
        received: Instant,
        /// The answer, encoded as the frame was (JSON text or CBOR binary).
        body: Message,
    },
    /// Waiting for its commit.
    Pending {
        /// Frees the in-flight slot once sent.
        permit: OwnedSemaphorePermit,
        /// When the frame was read.
        received: Instant,
        /// Frame number on this connection.
        n: u64,
        /// The envelope id, echoed back.
        id: Option<String>,
        /// Readings refused at the edge.
        rejected: Vec<RejectedItem>,
        /// Completed by the store writer.
        ack: oneshot::Receiver<AckResult>,
        /// How the answer is encoded: as the frame was.
        encoding: Encoding,
        /// Some readings were over their device's rate limit: when to send them again.
        retry_after_ms: Option<u64>,
    },
    /// Close after everything before it was sent.
    Close(u16, Cow<'static, str>),
}

/// How a data frame and its answer are encoded (SPEC §4, §10): a text frame is JSON and is
/// answered in JSON text; a binary frame is CBOR and is answered in a CBOR binary frame with
/// the same fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    /// Text frames, JSON.
    Json,
    /// Binary frames, CBOR (RFC 8949).
    Cbor,
}

impl Encoding {
    /// `value` as a frame of this encoding.
    fn frame<T: Serialize>(self, value: &T) -> Message {
        match self {
            Encoding::Json => {
                Message::Text(serde_json::to_string(value).unwrap_or_default().into())
            }
            Encoding::Cbor => Message::Binary(crate::codec::cbor::to_vec(value).into()),
        }
    }
}

/// The longest close reason a close frame can carry (RFC 6455 §5.5: 125-byte control payload,
/// 2 of them the code).
const MAX_CLOSE_REASON: usize = 123;

/// `reason` cut to [`MAX_CLOSE_REASON`] bytes at a character boundary.
fn close_reason(reason: &str) -> Cow<'static, str> {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(reason[..end].to_owned())
}

#[derive(Serialize)]
struct AckFrame<'a> {
    ack: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    accepted: usize,
    duplicates: usize,
    rejected: &'a [RejectedItem],
    /// When some readings were rejected as `rate_limited`: the wait before resending them.
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

#[derive(Serialize)]
struct ErrorAck<'a> {
    ack: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    error: ErrorBody<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'static str,
    detail: &'a str,
}

fn error_ack(
    encoding: Encoding,
    n: u64,
    id: Option<&str>,
    code: &'static str,
    detail: &str,
    retry: Option<Duration>,
) -> Message {
    encoding.frame(&ErrorAck {
        ack: n,
        id,
        error: ErrorBody { code, detail },
        retry_after_ms: retry.map(|d| d.as_millis() as u64),
    })
}

/// Counts a connection in `sluice_ws_connections` for as long as it lives.
pub struct ConnectionGauge(prometheus::IntGauge);

impl ConnectionGauge {
    /// Increments the gauge of `kind`.
    pub fn new(state: &AppState, kind: &str) -> Self {
        let g = state.metrics.ws_connections.with_label_values(&[kind]);
        g.inc();
        Self(g)
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn run(
    socket: WebSocket,
    state: AppState,
    bound: Binding,
    caller: Caller,
    _slot: OwnedSemaphorePermit,
) {
    let _gauge = ConnectionGauge::new(&state, "device");
    let settings = state.settings.ws.clone();
    let (sink, stream) = socket.split();
    let in_flight = std::sync::Arc::new(Semaphore::new(settings.max_in_flight));
    // Never fuller than max_in_flight answers plus one close: the permits bound it.
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(settings.max_in_flight + 1);
    let writer_task = write_loop(sink, out_rx, state.clone());
    let mut writer = tokio::spawn(state.metrics.tasks.ws.instrument(writer_task));
    let stream = read_loop(stream, &out_tx, in_flight, &state, bound, &caller).await;
    drop(out_tx);
    // The writer answers what was read. At shutdown a peer that does not read its answers gets
    // DRAIN_MAX to take them; otherwise the writer's own send timeouts bound it.
    let limit = if state.ws.shutdown.is_cancelled() {
        DRAIN_MAX
    } else {
        state.settings.ws.idle_timeout * 2
    };
    match tokio::time::timeout(limit, &mut writer).await {
        Ok(Ok(Some(sink))) => {
            if let Ok(socket) = stream.reunite(sink) {
                finish_close(socket).await;
            }
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "websocket writer failed"),
        Err(_) => {
            tracing::debug!("websocket peer not reading its answers; dropping the connection");
            writer.abort();
        }
    }
}

/// Reads frames until the connection is to close; returns the stream for the closing handshake.
async fn read_loop(
    mut stream: SplitStream<WebSocket>,
    out: &mpsc::Sender<Outgoing>,
    in_flight: std::sync::Arc<Semaphore>,
    state: &AppState,
    bound: Binding,
    caller: &Caller,
) -> SplitStream<WebSocket> {
    // A revoked token closes the connection with 1008 after what was read is answered.
    let mut revoked = state.access.tokens.watch(caller.token_id());
    let revoked_close = || Outgoing::Close(1008, Cow::Borrowed("token revoked"));
    let idle = state.settings.ws.idle_timeout;
    let shutdown = state.ws.shutdown.clone();
    let mut last_heard = tokio::time::Instant::now();
    let mut drain_until: Option<tokio::time::Instant> = None;
    let mut n: u64 = 0;
    loop {
        // While draining for shutdown, only frames already on their way are read: the socket
        // must not stay quiet for DRAIN_QUIET, and the whole drain is bounded by DRAIN_MAX.
        let permit_deadline = drain_until.unwrap_or(last_heard + idle);
        let permit = tokio::select! {
            p = in_flight.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return stream,
            },
            _ = sleep_until(permit_deadline) => {
                let _ = out.send(timeout_close(drain_until)).await;
                return stream;
            }
            () = revoked.revoked() => {
                let _ = out.send(revoked_close()).await;
                return stream;
            }
            _ = shutdown.cancelled(), if drain_until.is_none() => {
                drain_until = Some(tokio::time::Instant::now() + DRAIN_MAX);
                continue;
            }
        };
        let read_deadline = match drain_until {
            Some(end) => end.min(tokio::time::Instant::now() + DRAIN_QUIET),
            None => last_heard + idle,
        };
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = sleep_until(read_deadline) => {
                let _ = out.send(timeout_close(drain_until)).await;
                return stream;
            }
            () = revoked.revoked() => {
                let _ = out.send(revoked_close()).await;
                return stream;
            }
            _ = shutdown.cancelled(), if drain_until.is_none() => {
                drain_until = Some(tokio::time::Instant::now() + DRAIN_MAX);
                continue;
            }
        };
        last_heard = tokio::time::Instant::now();
        let item = match msg {
            None => return stream, // the peer went away; the writer answers what it can
            Some(Err(e)) => {
                let (code, why) = classify_error(&e);
                tracing::debug!(error = %e, code, "websocket read error");
                Outgoing::Close(code, Cow::Borrowed(why))
            }
            Some(Ok(Message::Text(text))) => {
                n += 1;
                let frame = Bytes::from(text);
                handle_frame(state, caller, &bound, n, frame, Encoding::Json, permit).await
            }
            Some(Ok(Message::Binary(frame))) => {
                n += 1;
                handle_frame(state, caller, &bound, n, frame, Encoding::Cbor, permit).await
            }
            Some(Ok(Message::Close(_))) => Outgoing::Close(1000, Cow::Borrowed("")),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
        };
        let closing = matches!(item, Outgoing::Close(..));
        if out.send(item).await.is_err() || closing {
            return stream;
        }
    }
}

fn timeout_close(drain_until: Option<tokio::time::Instant>) -> Outgoing {
    match drain_until {
        Some(_) => Outgoing::Close(1001, Cow::Borrowed("server shutting down")),
        None => Outgoing::Close(1001, Cow::Borrowed("idle timeout")),
    }
}

fn classify_error(e: &axum::Error) -> (u16, &'static str) {
    use std::error::Error as _;
    let inner = e.source();
    match inner.and_then(|s| s.downcast_ref::<tungstenite::Error>()) {
        Some(tungstenite::Error::Capacity(_)) => (1009, "message too big"),
        Some(tungstenite::Error::Utf8(_)) => (1007, "invalid UTF-8 in a text frame"),
        Some(tungstenite::Error::Protocol(_)) => (1002, "protocol error"),
        _ => (1011, "read error"),
    }
}

/// Parses and submits one frame; the answer is either known now or after the commit.
async fn handle_frame(
    state: &AppState,
    caller: &Caller,
    bound: &Binding,
    n: u64,
    frame: Bytes,
    encoding: Encoding,
    permit: OwnedSemaphorePermit,
) -> Outgoing {
    let received = Instant::now();
    match frame_answer(state, caller, bound, n, frame, encoding).await {
        FrameAnswer::Ready(body) => Outgoing::Ready {
            permit,
            received,
            body,
        },
        FrameAnswer::Pending {
            id,
            rejected,
            ack,
            retry_after_ms,
        } => Outgoing::Pending {
            permit,
            received,
            n,
            id,
            rejected,
            ack,
            encoding,
            retry_after_ms,
        },
        FrameAnswer::Close(code, reason) => Outgoing::Close(code, reason),
    }
}

enum FrameAnswer {
    Ready(Message),
    Pending {
        id: Option<String>,
        rejected: Vec<RejectedItem>,
        ack: oneshot::Receiver<AckResult>,
        retry_after_ms: Option<u64>,
    },
    /// A binary frame that is not CBOR at all (SPEC §4: 1003).
    Close(u16, Cow<'static, str>),
}

/// Why a frame's readings could not be taken at all.
enum FrameError {
    /// The batch as a whole: answered with an error ack (echoing the id when it was read).
    Batch {
        id: Option<String>,
        error: BatchError,
    },
    /// Bytes that are not one well-formed CBOR item: the connection closes with 1003.
    NotCbor(String),
}

/// The envelope id (if any) and the readings of a text frame: JSON, one reading, an array, or
/// an envelope `{"id": ..., "readings": [...]}` (SPEC §4).
async fn json_frame(
    state: &AppState,
    bound: &Binding,
    frame: Bytes,
) -> Result<(Option<String>, ParsedBatch), FrameError> {
    // An envelope? Only objects with a `readings` field are. One leading byte-order mark is
    // ignored (SPEC §1); without an envelope the whole frame, mark included, goes to the batch
    // parser, which ignores it there.
    let text = std::str::from_utf8(&frame).unwrap_or_default();
    let (id, payload) = match envelope::split(text) {
        Ok(Some(env)) => (env.id, frame.slice(env.readings)),
        Ok(None) => (None, frame),
        Err(error) => return Err(FrameError::Batch { id: None, error }),
    };
    match parse_readings(
        &state.settings,
        payload,
        Format::Json,
        bound.clone(),
        now_ms(),
    )
    .await
    {
        Ok(parsed) => Ok((id, parsed)),
        Err(error) => Err(FrameError::Batch { id, error }),
    }
}

/// The envelope id (if any) and the readings of a binary frame: the JSON shapes in CBOR
/// (SPEC §10).
async fn cbor_frame(
    state: &AppState,
    bound: &Binding,
    frame: Bytes,
) -> Result<(Option<String>, ParsedBatch), FrameError> {
    let bytes = frame.clone();
    let parsed = parse_off_loop(
        &state.settings,
        frame.len(),
        bound.clone(),
        now_ms(),
        move |ctx| Ok(cbor::parse_cbor(&bytes, ctx)),
    )
    .await;
    match parsed {
        Ok(Ok(body)) => Ok((body.id, body.batch)),
        Ok(Err(e)) if !cbor::is_well_formed(&frame) => {
            Err(FrameError::NotCbor(e.error.to_string()))
        }
        Ok(Err(e)) => Err(FrameError::Batch {
            id: e.id,
            error: e.error,
        }),
        Err(error) => Err(FrameError::Batch { id: None, error }),
    }
}

async fn frame_answer(
    state: &AppState,
    caller: &Caller,
    bound: &Binding,
    n: u64,
    frame: Bytes,
    encoding: Encoding,
) -> FrameAnswer {
    let t = Transport::Ws;
    let retry = state.settings.pipeline.retry_after;
    let ready = FrameAnswer::Ready;
    let decoded = match encoding {
        Encoding::Json => json_frame(state, bound, frame).await,
        Encoding::Cbor => cbor_frame(state, bound, frame).await,
    };
    let (id, mut parsed) = match decoded {
        Ok(v) => v,
        Err(FrameError::NotCbor(detail)) => {
            count_request(state, RejectReason::Malformed, 1);
            return FrameAnswer::Close(1003, close_reason(&detail));
        }
        Err(FrameError::Batch {
            id,
            error: BatchError::Malformed(detail),
        }) => {
            count_request(state, RejectReason::Malformed, 1);
            return ready(error_ack(
                encoding,
                n,
                id.as_deref(),
                "malformed",
                &detail,
                None,
            ));
        }
        Err(FrameError::Batch {
            id,
            error: e @ BatchError::TooMany { count, .. },
        }) => {
            count_request(state, RejectReason::TooManyReadings, count);
            return ready(error_ack(
                encoding,
                n,
                id.as_deref(),
                "too_many_readings",
                &e.to_string(),
                None,
            ));
        }
    };
    count_parsed(state, t, &parsed);
    // Devices the token may not write, then each device's rate limit (SPEC §11).
    let screened = state.access.screen(caller, t, &mut parsed);
    let retry_after_ms = screened.retry.map(|d| d.as_millis().max(1) as u64);
    if parsed.readings.is_empty()
        && screened.limited > 0
        && screened.limited == parsed.rejected.len()
    {
        // Nothing taken, and waiting would help every reading: the frame is to be sent again,
        // whole. With other rejections beside, the ack lists them all (and `retry_after_ms`).
        return ready(error_ack(
            encoding,
            n,
            id.as_deref(),
            "rate_limited",
            "the frame's readings are over their device's rate limit (rate_limit.per_device); send it again after retry_after_ms",
            screened.retry,
        ));
    }
    let rejected: Vec<RejectedItem> = parsed.rejected.iter().map(RejectedItem::from).collect();
    if parsed.readings.is_empty() {
        return ready(ack_frame(
            encoding,
            n,
            id.as_deref(),
            0,
            0,
            &rejected,
            retry_after_ms,
        ));
    }
    match state.admission.submit(t, parsed.readings) {
        Ok(ack) => FrameAnswer::Pending {
            id,
            rejected,
            ack,
            retry_after_ms,
        },
        Err(refusal) => {
            let code = match refusal {
                Refusal::Overloaded { .. } => "overloaded",
                Refusal::Unavailable | Refusal::ShuttingDown => "unavailable",
            };
            ready(error_ack(
                encoding,
                n,
                id.as_deref(),
                code,
                &refusal.to_string(),
                Some(retry),
            ))
        }
    }
}

fn count_request(state: &AppState, reason: RejectReason, n: usize) {
    state
        .metrics
        .rejected_unparsed(Transport::Ws, reason, n as u64);
}

fn ack_frame(
    encoding: Encoding,
    n: u64,
    id: Option<&str>,
    accepted: usize,
    duplicates: usize,
    rejected: &[RejectedItem],
    retry_after_ms: Option<u64>,
) -> Message {
    encoding.frame(&AckFrame {
        ack: n,
        id,
        accepted,
        duplicates,
        rejected,
        retry_after_ms,
    })
}

/// Sends answers in order, and pings. Every send is bounded by `ws.idle_timeout`, so a peer
/// that stopped reading cannot hold the task forever. Returns the sink after a clean close.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outgoing>,
    state: AppState,
) -> Option<SplitSink<WebSocket, Message>> {
    let ws = &state.settings.ws;
    let retry = state.settings.pipeline.retry_after;
    let latency = state
        .metrics
        .ack_latency
        .with_label_values(&[Transport::Ws.as_str()]);
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + ws.ping_interval,
        ws.ping_interval,
    );
    let send_timeout = ws.idle_timeout;
    macro_rules! send {
        ($msg:expr) => {
            match tokio::time::timeout(send_timeout, sink.send($msg)).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        };
    }
    loop {
        let item = tokio::select! {
            item = rx.recv() => item,
            _ = ping.tick() => {
                send!(Message::Ping(Bytes::new()));
                continue;
            }
        };
        match item {
            None => {
                let _ = sink.close().await;
                return None;
            }
            Some(Outgoing::Ready {
                permit,
                received,
                body,
            }) => {
                send!(body);
                latency.observe(received.elapsed().as_secs_f64());
                drop(permit);
            }
            Some(Outgoing::Pending {
                permit,
                received,
                n,
                id,
                rejected,
                mut ack,
                encoding,
                retry_after_ms,
            }) => {
                let result = loop {
                    tokio::select! {
                        r = &mut ack => break r,
                        _ = ping.tick() => send!(Message::Ping(Bytes::new())),
                    }
                };
                let body = match result {
                    Ok(Ok(a)) => ack_frame(
                        encoding,
                        n,
                        id.as_deref(),
                        a.accepted,
                        a.duplicates,
                        &rejected,
                        retry_after_ms,
                    ),
                    Ok(Err(e)) => error_ack(
                        encoding,
                        n,
                        id.as_deref(),
                        "unavailable",
                        &e.to_string(),
                        Some(retry),
                    ),
                    Err(_) => error_ack(
                        encoding,
                        n,
                        id.as_deref(),
                        "unavailable",
                        "the pipeline stopped",
                        Some(retry),
                    ),
                };
                send!(body);
                latency.observe(received.elapsed().as_secs_f64());
                drop(permit);
            }
            Some(Outgoing::Close(code, reason)) => {
                let _ = tokio::time::timeout(
                    send_timeout,
                    sink.send(Message::Close(Some(CloseFrame {
                        code,
                        reason: match reason {
                            Cow::Borrowed(r) => Utf8Bytes::from_static(r),
                            Cow::Owned(r) => Utf8Bytes::from(r),
                        },
                    }))),
                )
                .await;
                return Some(sink);
            }
        }
    }
}
