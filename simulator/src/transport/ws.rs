//! WebSocket: one connection per device on `GET /v1/ws?device_id=<id>`, frames pipelined.
//!
//! A connection runs two halves in one task:
//! - the **writer** takes one of `--window` slots, then sends the next frame: a refused frame
//!   whose back-off is over, or a new one when the schedule says so (at once in max mode);
//! - the **reader** takes the acks, which come in frame order, settles each against the oldest
//!   frame in flight and frees its slot. An `overloaded`/`unavailable` error ack puts the frame
//!   back for `retry_after_ms`.
//!
//! Frames are text (JSON) or, with `--format cbor`, binary (CBOR), and the server answers a
//! binary frame with a CBOR binary ack of the same fields (SPEC §4, §10).
//!
//! With a token (`--token`, `--tokens-file`) the upgrade carries the device's
//! `Authorization: Bearer` header (SPEC §11). An upgrade refused with 401/403 and a close with
//! 1008 count as auth failures; the device then retries with back-off. A `rate_limited` error
//! ack puts the frame back for its `retry_after_ms`, as `overloaded` does.
//!
//! When the connection breaks, every frame not acknowledged is sent again on the next one,
//! with the same readings and `seq`s. Readings omit `device_id`: the connection binds it.
//! A device's schedule starts when it is first connected (at a random phase within one
//! period), so the connect storm of a large fleet does not turn into a burst of overdue frames.
//!
//! With `--rate 0` (`--idle`) a connection only reads, so tungstenite answers the server's
//! pings, until the run ends: the idle-connection memory benchmark.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::encode::{Encoded, Encoder, Format};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{now_ms, Ctx, Ended};
use crate::fleet::{Device, Item};
use crate::rate::Pacer;
use crate::stats::Answer;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest wait for a handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read chunk per connection: acks are small, and 10 000 connections × 128 KiB (tungstenite's
/// default) would be more than a gigabyte.
const READ_BUFFER: usize = 8 * 1024;

/// Starts one lane per device.
pub fn spawn(ctx: &Arc<Ctx>, lanes: &mut JoinSet<()>) {
    let gate = Arc::new(Semaphore::new(ctx.cfg.connect_concurrency));
    for dev in ctx.cfg.fleet().build() {
        lanes.spawn(lane(ctx.clone(), gate.clone(), dev));
    }
}

/// `http://host:port` → `ws://host:port/v1/ws?device_id=<id>`.
pub fn ws_url(target: &str, device: &str) -> String {
    let base = target.strip_prefix("http://").unwrap_or(target);
    format!("ws://{base}/v1/ws?device_id={device}")
}

/// One frame: its message (text or binary) and what each reading in it is.
#[derive(Debug)]
struct Frame {
    msg: Message,
    /// An array frame's encoding, to send a part of it again (readings refused for their rate
    /// limit); `None` for a single-reading frame, which is sent again whole.
    body: Option<Encoded>,
    /// Payload bytes.
    len: usize,
    items: Vec<Item>,
    /// Sends so far.
    attempts: u32,
    /// Not to be sent again before (after an `overloaded` ack).
    not_before: Instant,
    /// When it was last sent.
    sent_at: Instant,
}

/// The next frame of `dev`: one reading object, or an array of `k`, in `format`.
fn new_frame(dev: &mut Device, k: usize, format: Format, metrics: usize) -> Frame {
    let ts = now_ms();
    let mut enc = Encoder::new(format, false, k > 1, k, metrics);
    for _ in 0..k {
        enc.push(dev, ts);
    }
    frame_of(enc.finish(), k > 1)
}

/// A frame carrying `e` (an array when `array`).
fn frame_of(e: Encoded, array: bool) -> Frame {
    let len = e.bytes.len();
    let msg = if e.format.is_binary() {
        Message::Binary(e.bytes.clone())
    } else {
        Message::Text(Utf8Bytes::try_from(e.bytes.clone()).expect("JSON is UTF-8"))
    };
    let now = Instant::now();
    Frame {
        msg,
        len,
        items: e.items.clone(),
        body: array.then_some(e),
        attempts: 0,
        not_before: now,
        sent_at: now,
    }
}

/// The schedule of one device's frames.
struct Schedule {
    pacer: Pacer,
    generation: u64,
}

impl Schedule {
    /// Follows a rate change (ramp).
    fn sync(&mut self, ctx: &Ctx) {
        if ctx.rate.generation() != self.generation {
            let (rate, g) = ctx.rate.get();
            self.pacer
                .set_rate(rate / ctx.cfg.frame_readings as f64, Instant::now());
            self.generation = g;
        }
    }
}

async fn lane(ctx: Arc<Ctx>, gate: Arc<Semaphore>, mut dev: Device) {
    let url = ws_url(&ctx.cfg.target, &dev.id);
    let k = ctx.cfg.frame_readings;
    let (rate, generation) = ctx.rate.get();
    let frame_rate = rate / k as f64;
    // Spread the first frames over one period (at most a second), so that a fleet at 1/s does
    // not send in lockstep.
    let period = if frame_rate > 0.0 {
        (1.0 / frame_rate).min(1.0)
    } else {
        0.0
    };
    let phase = Duration::from_secs_f64(dev.unit_random() * period);
    let mut schedule = Schedule {
        pacer: Pacer::new(frame_rate, ctx.start + phase),
        generation,
    };
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER);
    let mut carry: VecDeque<Frame> = VecDeque::new();
    let mut scheduled = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        if ctx.abort.is_cancelled() {
            break;
        }
        if ctx.stop.is_cancelled() && carry.is_empty() {
            break;
        }
        let mut request = match url.as_str().into_client_request() {
            Ok(r) => r,
            Err(e) => {
                failed_connect(&ctx, &url, &super::chain(&e), &mut backoff).await;
                continue;
            }
        };
        if let Some(token) = ctx.cfg.auth.for_device(dev.index) {
            request
                .headers_mut()
                .insert(reqwest::header::AUTHORIZATION, token.clone());
        }
        let connected = {
            let _slot = tokio::select! {
                p = gate.acquire() => p,
                _ = ctx.abort.cancelled() => break,
            };
            timeout(
                CONNECT_TIMEOUT,
                tokio_tungstenite::connect_async_with_config(request, Some(config), true),
            )
            .await
        };
        let ws = match connected {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(res)))
                if matches!(res.status().as_u16(), 401 | 403) =>
            {
                let status = res.status().as_u16();
                ctx.stats.auth_failures.inc();
                let why = format!(
                    "upgrade refused with {status}: {}",
                    super::http::auth_hint(status, ctx.cfg.auth.is_on())
                );
                failed_connect(&ctx, &url, &why, &mut backoff).await;
                continue;
            }
            Ok(Err(e)) => {
                failed_connect(&ctx, &url, &super::chain(&e), &mut backoff).await;
                continue;
            }
            Err(_) => {
                failed_connect(&ctx, &url, "handshake timed out", &mut backoff).await;
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        if !scheduled {
            // The device's schedule starts once it is connected: a slow connect storm does not
            // turn into a burst of overdue frames.
            let rate = schedule.pacer.rate();
            schedule.pacer = Pacer::new(rate, (ctx.start + phase).max(Instant::now()));
            scheduled = true;
        }
        ctx.stats.connected();
        let end = if ctx.cfg.idle {
            idle(&ctx, ws).await
        } else {
            session(&ctx, ws, &mut dev, &mut schedule, &mut carry).await
        };
        ctx.stats.connections.dec();
        match end {
            Ended::Done | Ended::Aborted => break,
            Ended::Lost(why) => {
                ctx.stats.errors.inc();
                ctx.stats.problem(|| format!("{}: {why}", dev.id));
                tokio::select! {
                    _ = sleep(backoff) => {}
                    _ = ctx.abort.cancelled() => {}
                }
            }
        }
    }
    for f in &carry {
        ctx.stats.give_up(&f.items);
    }
    if ctx.paced() && !ctx.cfg.idle {
        ctx.stats
            .behind
            .add(schedule.pacer.behind(ctx.stopped_at()) * k as u64);
    }
}

async fn failed_connect(ctx: &Ctx, url: &str, why: &str, backoff: &mut Duration) {
    ctx.stats.connect_errors.inc();
    ctx.stats.problem(|| format!("connect {url}: {why}"));
    tokio::select! {
        _ = sleep(*backoff) => {}
        _ = ctx.abort.cancelled() => {}
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}

/// An idle connection: reads (so pings get their pongs) until the run ends.
async fn idle(ctx: &Ctx, mut ws: Ws) -> Ended {
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Close(c))) => return Ended::Lost(format!("closed by the server: {c:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Ended::Lost(format!("read: {e}")),
                None => return Ended::Lost("connection closed".into()),
            },
            _ = ctx.stop.cancelled() => {
                let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
                return Ended::Done;
            }
            _ = ctx.abort.cancelled() => return Ended::Aborted,
        }
    }
}

/// Frames in flight and frames waiting to be sent again, shared by the two halves.
struct Shared {
    /// Sent, not yet acknowledged, oldest first (acks come in this order).
    pending: VecDeque<Frame>,
    /// Refused for load, or left over from a lost connection.
    retry: VecDeque<Frame>,
    /// Acks received on this connection.
    acks: u64,
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection carrying frames until everything generated is answered or it breaks.
async fn session(
    ctx: &Ctx,
    ws: Ws,
    dev: &mut Device,
    schedule: &mut Schedule,
    carry: &mut VecDeque<Frame>,
) -> Ended {
    let (mut sink, mut stream) = ws.split();
    let shared = Mutex::new(Shared {
        pending: VecDeque::new(),
        retry: std::mem::take(carry),
        acks: 0,
    });
    let window = Semaphore::new(ctx.cfg.window);
    let wake = Notify::new();
    let end = tokio::select! {
        e = write_frames(ctx, &mut sink, dev, schedule, &shared, &window, &wake) => e,
        e = read_acks(ctx, &mut stream, &shared, &window, &wake) => e,
    };
    let mut s = shared.into_inner().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    carry.extend(s.pending.drain(..).map(|mut f| {
        f.attempts += 1;
        f.not_before = now;
        f
    }));
    carry.extend(s.retry.drain(..));
    if matches!(end, Ended::Done) {
        let _ = timeout(Duration::from_secs(1), sink.close()).await;
    }
    end
}

async fn write_frames(
    ctx: &Ctx,
    sink: &mut SplitSink<Ws, Message>,
    dev: &mut Device,
    schedule: &mut Schedule,
    shared: &Mutex<Shared>,
    window: &Semaphore,
    wake: &Notify,
) -> Ended {
    let max = !ctx.paced();
    let far = Duration::from_secs(86_400);
    loop {
        let slot = tokio::select! {
            p = window.acquire() => p,
            _ = ctx.abort.cancelled() => return Ended::Aborted,
        };
        match slot {
            Ok(p) => p.forget(), // given back by the reader when the frame is answered
            Err(_) => return Ended::Aborted,
        }
        let mut frame = loop {
            let now = Instant::now();
            let generating = !ctx.stop.is_cancelled();
            let retry_at = {
                let mut s = lock(shared);
                match s.retry.front() {
                    Some(f) if f.not_before <= now => break s.retry.pop_front().expect("front"),
                    Some(f) => Some(f.not_before),
                    None if !generating && s.pending.is_empty() => return Ended::Done,
                    None => None,
                }
            };
            if generating {
                schedule.sync(ctx);
                if max {
                    break new_frame(dev, ctx.cfg.frame_readings, ctx.cfg.format, ctx.cfg.metrics);
                }
                if schedule.pacer.available(now) > 0 {
                    schedule.pacer.take(1);
                    break new_frame(dev, ctx.cfg.frame_readings, ctx.cfg.format, ctx.cfg.metrics);
                }
            }
            let mut until = retry_at.unwrap_or(now + far);
            if generating {
                until = until.min(schedule.pacer.next_at());
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = sleep_until(until) => {}
                _ = ctx.stop.cancelled(), if generating => {}
                _ = ctx.abort.cancelled() => return Ended::Aborted,
            }
        };
        ctx.stats
            .wrote(&frame.items, frame.attempts == 0, frame.len);
        let msg = frame.msg.clone();
        frame.sent_at = Instant::now();
        lock(shared).pending.push_back(frame);
        if let Err(e) = sink.send(msg).await {
            return Ended::Lost(format!("send: {e}"));
        }
    }
}

/// An answer frame: an ack (`accepted`, ...) or an error ack, as JSON text or CBOR binary.
#[derive(Deserialize)]
struct AckFrame {
    ack: u64,
    #[serde(flatten)]
    answer: Answer,
    #[serde(default)]
    error: Option<AckError>,
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

#[derive(Deserialize)]
struct AckError {
    code: String,
    #[serde(default)]
    detail: String,
}

async fn read_acks(
    ctx: &Ctx,
    stream: &mut SplitStream<Ws>,
    shared: &Mutex<Shared>,
    window: &Semaphore,
    wake: &Notify,
) -> Ended {
    let stats = &ctx.stats;
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = ctx.abort.cancelled() => return Ended::Aborted,
        };
        let parsed: Result<AckFrame, String> = match msg {
            Some(Ok(Message::Text(t))) => {
                serde_json::from_str(&t).map_err(|e| format!("unreadable ack `{t}`: {e}"))
            }
            Some(Ok(Message::Binary(b))) => ciborium::from_reader(&b[..]).map_err(|e| {
                format!(
                    "unreadable CBOR ack ({} bytes {:02x?}): {e}",
                    b.len(),
                    &b[..b.len().min(32)]
                )
            }),
            Some(Ok(Message::Close(c))) => {
                if c.as_ref().is_some_and(|c| c.code == CloseCode::Policy) {
                    stats.auth_failures.inc();
                }
                return Ended::Lost(format!("closed by the server: {c:?}"));
            }
            Some(Ok(_)) => continue, // pings are answered by tungstenite itself
            Some(Err(e)) => return Ended::Lost(format!("read: {e}")),
            None => return Ended::Lost("connection closed".into()),
        };
        let ack = match parsed {
            Ok(a) => a,
            Err(e) => return Ended::Lost(e),
        };
        let (frame, n) = {
            let mut s = lock(shared);
            s.acks += 1;
            (s.pending.pop_front(), s.acks)
        };
        let Some(mut frame) = frame else {
            return Ended::Lost(format!("ack {} for no frame in flight", ack.ack));
        };
        if ack.ack != n {
            stats.errors.inc();
            stats.problem(|| format!("ack {} where {n} was expected", ack.ack));
        }
        match (ack.error, ack.retry_after_ms) {
            (None, retry) => {
                let limited = stats.settle(&frame.items, &ack.answer, frame.sent_at.elapsed());
                if !limited.is_empty() {
                    // Readings over the device's rate limit: sent again, alone, with the same
                    // seqs, after `retry_after_ms`.
                    let mut again = match &frame.body {
                        Some(body) if limited.len() < frame.items.len() => {
                            frame_of(body.subset(&limited), true)
                        }
                        _ => frame,
                    };
                    again.attempts += 1;
                    again.not_before = Instant::now() + Duration::from_millis(retry.unwrap_or(250));
                    lock(shared).retry.push_back(again);
                }
            }
            (Some(err), Some(ms)) => {
                // overloaded / unavailable / rate_limited: nothing was taken; the same frame
                // goes again later.
                if err.code == "rate_limited" {
                    stats.rate_limited.add(frame.items.len() as u64);
                } else {
                    stats.shed.inc();
                }
                frame.attempts += 1;
                frame.not_before = Instant::now() + Duration::from_millis(ms);
                lock(shared).retry.push_back(frame);
            }
            (Some(err), None) => {
                stats.errors.inc();
                stats.problem(|| format!("frame refused: {} {}", err.code, err.detail));
                stats.give_up(&frame.items);
            }
        }
        window.add_permits(1);
        wake.notify_one();
    }
}
