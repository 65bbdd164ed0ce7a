//! The MQTT source (SPEC §6): broker → **MQTT handler** → admission → … → commit → PUBACK.
//!
//! Sluice subscribes at QoS 1 with a persistent session (`clean_session = false`) and manual
//! acks, so a PUBACK is its promise that every reading of the message is committed, a known
//! duplicate, or dead-lettered (SPEC §2). Two tasks share the work:
//!
//! ```text
//!  broker ⇄ connection task (polls rumqttc's EventLoop, never blocks)
//!              │ try_send, at most mqtt.max_unacked messages / max_unacked_bytes held
//!              ▼
//!           processor task: held messages in arrival order; up to ACTIVE_MESSAGES of them
//!              answered at once, as futures in a FuturesOrdered (FIFO)
//!              parse at the edge → dead-letter what can never be taken
//!              → admission.submit → await the commit ack (retry on refusal)
//!              → futures complete in any order, PUBACKs go out strictly in arrival order
//! ```
//!
//! - **The event loop is always polled.** The connection task only reads, forwards and
//!   reconnects; it never awaits the pipeline. Keep-alive pings flow however slow the store is.
//! - **Backpressure is withheld PUBACKs, and a bounded take.** A broker stops sending once its
//!   per-client in-flight window is full of unacknowledged messages (mosquitto
//!   `max_inflight_messages`) — in principle. MQTT 3.1.1 gives the client no say in that
//!   window, and brokers overshoot it (mosquitto 2.0.11 releases up to a whole window of queued
//!   messages per in-order PUBACK, so a backlog arrives as a flood). So Sluice bounds what it
//!   holds itself: at most `mqtt.max_unacked` messages whose PUBACK is not yet written, and
//!   `mqtt.max_unacked_bytes` of payload. It cannot stop reading the socket instead: rumqttc
//!   reads and writes (PUBACKs, pings) in one `poll`, and must be polled for the keep-alive.
//! - **Pause and resume.** A message beyond that budget is *not taken*: left without a PUBACK
//!   and counted in `sluice_mqtt_not_taken_total`. The connection is then *paused* — the event
//!   loop runs on, nothing later is taken (which keeps the broker's order) — until everything
//!   taken is answered. Then Sluice DISCONNECTs (after the queued PUBACKs) and resumes the
//!   session at once; the broker redelivers what was left. Memory stays bounded whatever the
//!   broker does; the cost of an overshooting broker is its resending.
//! - **Refused by admission → kept and retried.** A live MQTT 3.1.1 session never redelivers
//!   by itself, so a message the pipeline refuses (full, store down) stays in the FIFO and is
//!   resubmitted with exponential backoff (capped at `pipeline.retry_after`); every refusal is
//!   counted as shed by admission. The head of the FIFO blocks later PUBACKs meanwhile, which is
//!   what MQTT's ordering rule asks for, and what pushes back on the broker.
//! - **PUBACKs belong to a connection.** Packet ids are per connection; a PUBACK sent on a later
//!   connection could ack a different message. Each message remembers the connection
//!   ("generation") it came on and is only acked on that one. After a reconnect with a resumed
//!   session the broker redelivers the rest; anything already committed is then a duplicate.
//! - **Dead letters.** A payload that can never be taken (not JSON, too large, bad readings, a
//!   topic level that is not a device id) is counted, republished at QoS 1 with its error to
//!   `<mqtt.dead_letter_topic>/<device_id>` (or `/_invalid`), and PUBACKed. See [`DeadLetter`].
//!   What a message comes to is decided by the pure [`decide`] (topic and payload in, a
//!   [`Verdict`] out, no I/O), which the tests and the `mqtt_payload` fuzz target call directly.
//! - **Shutdown** ([`MqttSource::stop_taking`], [`MqttSource::finish`]): stop taking messages,
//!   let those already submitted commit, PUBACK them in order, then DISCONNECT. Whatever is left
//!   unacked (including held messages not yet started) stays in the broker's session and is
//!   redelivered to the next one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, StreamExt};
use prometheus::{Histogram, IntCounter};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    Request, Subscribe, SubscribeReasonCode,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::{parse_readings, Format, INLINE_PARSE_BYTES};
use crate::config::{LimitSettings, MqttSettings, Settings};
use crate::pipeline::Admission;
use crate::reading::{self, format_ts, now_ms, BatchError, DeviceId, ParsedBatch, RejectReason};
use crate::telemetry::log_limit::LogLimit;
use crate::telemetry::metrics::{Metrics, Transport};

/// First reconnect delay; doubles on each failure up to [`RECONNECT_MAX`].
const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Reconnect backoff cap (SPEC §6).
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// A connection that stayed up this long restarts the backoff from [`RECONNECT_MIN`].
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// First delay before resubmitting a refused message; doubles up to `pipeline.retry_after`.
const RETRY_MIN: Duration = Duration::from_millis(10);
/// Messages being answered at once (parsed, submitted, awaiting their commit); later held
/// messages wait unparsed. Enough to fill the largest batches the batcher makes.
const ACTIVE_MESSAGES: usize = 4096;
/// Largest packet Sluice sends (the MQTT maximum); dead letters are bounded by the input limits.
const MAX_OUTGOING_PACKET: usize = 268_435_455;
/// Dead letters sent and not yet acknowledged by the broker (rumqttc preallocates this many).
const DEAD_LETTERS_IN_FLIGHT: u16 = 256;
/// Dead-letter topic level used when the topic's device level is not a valid device id.
pub const INVALID_DEVICE_LEVEL: &str = "_invalid";

/// Where the broker listens, from `mqtt.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// Host name or IP address.
    pub host: String,
    /// TCP port (1883 when the URL gives none).
    pub port: u16,
}

/// Parses `mqtt://host[:port]` (or `tcp://`). TLS is not built in.
pub fn parse_url(url: &str) -> Result<BrokerAddr, String> {
    let rest = if let Some(r) = url.strip_prefix("mqtt://") {
        r
    } else if let Some(r) = url.strip_prefix("tcp://") {
        r
    } else if url.starts_with("mqtts://") || url.starts_with("ssl://") {
        return Err(format!(
            "`{url}`: TLS is not built into this Sluice (rumqttc without TLS features); use mqtt:// to a local broker or a TLS-terminating proxy"
        ));
    } else {
        return Err(format!("`{url}` must look like mqtt://host:port"));
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        return Err(format!(
            "`{url}` must look like mqtt://host:port (credentials go in mqtt.username / mqtt.password)"
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("`{url}`: unclosed IPv6 bracket"))?;
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => return Err(format!("`{url}` must look like mqtt://host:port")),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    let port = match port {
        None => 1883,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("`{url}`: `{p}` is not a port"))?,
    };
    Ok(BrokerAddr {
        host: host.to_owned(),
        port,
    })
}

/// The index of the `+` level of `mqtt.topic`: the device id's place in each topic.
fn device_level(filter: &str) -> Result<usize, String> {
    if filter.starts_with('$') {
        return Err(format!(
            "`{filter}` must not start with `$` (set mqtt.shared_group for a shared subscription)"
        ));
    }
    let mut found = None;
    for (i, level) in filter.split('/').enumerate() {
        if level == "+" {
            if found.is_some() {
                return Err(format!(
                    "`{filter}` has more than one `+` level; exactly one (the device id) is allowed"
                ));
            }
            found = Some(i);
        } else if level.contains('+') || level.contains('#') {
            return Err(format!(
                "`{filter}`: level `{level}` has a wildcard; only one whole `+` level (the device id) is allowed"
            ));
        }
    }
    found.ok_or_else(|| format!("`{filter}` needs one `+` level for the device id"))
}

/// Whether a topic filter with `+` levels only matches `topic`.
fn filter_matches(filter: &str, topic: &str) -> bool {
    let (f, t): (Vec<&str>, Vec<&str>) = (filter.split('/').collect(), topic.split('/').collect());
    f.len() == t.len() && f.iter().zip(&t).all(|(f, t)| *f == "+" || f == t)
}

/// Checks the `[mqtt]` keys; the error names the key. Called from [`Settings::validate`].
pub fn validate(mqtt: &MqttSettings, limits: &LimitSettings) -> Result<(), (&'static str, String)> {
    parse_url(&mqtt.url).map_err(|e| ("mqtt.url", e))?;
    if mqtt.client_id.is_empty() {
        return Err((
            "mqtt.client_id",
            "must not be empty: the persistent session is keyed by it".into(),
        ));
    }
    device_level(&mqtt.topic).map_err(|e| ("mqtt.topic", e))?;
    if mqtt
        .shared_group
        .chars()
        .any(|c| matches!(c, '/' | '+' | '#'))
    {
        return Err((
            "mqtt.shared_group",
            format!("`{}` must not contain / + or #", mqtt.shared_group),
        ));
    }
    let ka = mqtt.keep_alive;
    if ka < Duration::from_secs(1) || ka > Duration::from_secs(u16::MAX as u64) {
        return Err((
            "mqtt.keep_alive",
            format!(
                "{} must be from 1s to 65535s",
                humantime::format_duration(ka)
            ),
        ));
    }
    let dl = &mqtt.dead_letter_topic;
    if dl.is_empty() || dl.contains('+') || dl.contains('#') || dl.starts_with('$') {
        return Err((
            "mqtt.dead_letter_topic",
            format!("`{dl}` must be a non-empty topic without wildcards or a leading $"),
        ));
    }
    if filter_matches(&mqtt.topic, &format!("{dl}/x")) {
        return Err((
            "mqtt.dead_letter_topic",
            format!(
                "`{dl}/<device_id>` matches mqtt.topic `{}`: dead letters would be read back",
                mqtt.topic
            ),
        ));
    }
    if mqtt.max_unacked == 0 || mqtt.max_unacked > u16::MAX as usize {
        return Err((
            "mqtt.max_unacked",
            format!("{} must be from 1 to 65535", mqtt.max_unacked),
        ));
    }
    if mqtt.max_unacked_bytes == 0 {
        return Err(("mqtt.max_unacked_bytes", "must be at least 1".into()));
    }
    if mqtt.max_packet_bytes <= limits.max_body_bytes || mqtt.max_packet_bytes > MAX_OUTGOING_PACKET
    {
        return Err((
            "mqtt.max_packet_bytes",
            format!(
                "{} must be more than limits.max_body_bytes ({}) and at most {MAX_OUTGOING_PACKET}, so that oversized payloads can still be read and dead-lettered",
                mqtt.max_packet_bytes, limits.max_body_bytes
            ),
        ));
    }
    Ok(())
}

/// The JSON republished to `<mqtt.dead_letter_topic>/<device_id>` for a payload that Sluice
/// PUBACKs without storing all of it:
///
/// ```json
/// {"topic": "devices/d1/readings", "device_id": "d1", "received_at": "2026-11-24T12:00:00.123Z",
///  "payload_bytes": 57, "payload": "<the original payload, when UTF-8 and within limits>",
///  "error": {"reason": "malformed", "detail": "not valid JSON at line 1 column 2: ..."},
///  "rejected": [{"index": 1, "reason": "invalid_metrics", "error": "metrics.t: expected a finite number or a boolean"}],
///  "taken": 1}
/// ```
///
/// `error` is set when the whole message was refused; `rejected` lists readings refused inside
/// a message whose other readings (`taken` of them) went on to be stored.
#[derive(Debug, Serialize)]
pub struct DeadLetter<'a> {
    /// The topic the message arrived on.
    pub topic: &'a str,
    /// The device id from the topic; `null` when that level is not a valid device id.
    pub device_id: Option<&'a str>,
    /// When Sluice received the message.
    pub received_at: String,
    /// Size of the original payload.
    pub payload_bytes: usize,
    /// The original payload, when it is UTF-8 and not over `limits.max_body_bytes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<&'a str>,
    /// Why the whole message was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<MessageError>,
    /// Readings refused individually.
    pub rejected: Vec<DeadReading>,
    /// Readings of this message taken for storage.
    pub taken: usize,
}

/// A whole-message refusal in a [`DeadLetter`].
#[derive(Debug, Serialize)]
pub struct MessageError {
    /// The `reason` label it was counted under.
    pub reason: &'static str,
    /// What is wrong, for the device's developer.
    pub detail: String,
}

/// One refused reading in a [`DeadLetter`].
#[derive(Debug, Serialize)]
pub struct DeadReading {
    /// Position in the payload's array (0 for a single reading).
    pub index: usize,
    /// The `reason` label it was counted under.
    pub reason: &'static str,
    /// `field: reason`.
    pub error: String,
}

/// What the two tasks share.
struct Shared {
    /// The connection PUBACKs may go to: `Some(generation)` while connected. Locked while a
    /// PUBACK is queued and while a lost connection is cleaned up, so that no PUBACK queued for
    /// one connection is ever written to the next.
    live: Mutex<Option<u64>>,
    /// Messages taken and not yet answered. At most `mqtt.max_unacked`.
    held: AtomicUsize,
    /// Their payload bytes. At most `mqtt.max_unacked_bytes`, unless one message alone is more.
    held_bytes: AtomicUsize,
    /// The latest connection that resumed a session. The broker redelivers what older
    /// connections left unacked, so their messages need not be retried.
    resumed: AtomicU64,
    /// Shutdown started: refused messages are no longer retried, a lost connection is not
    /// re-established, and the session is not resumed.
    stopping: AtomicBool,
    /// PUBACKs queued in rumqttc's request channel and not yet written. They count against
    /// `mqtt.max_unacked` too: rumqttc writes one request per poll but reads up to ten packets,
    /// so without this a flood could fill the request channel with PUBACKs.
    unwritten_acks: AtomicUsize,
}

impl Shared {
    /// Messages taken whose PUBACK is not yet written: the budget `mqtt.max_unacked` bounds.
    fn unacked(&self) -> usize {
        self.held.load(Ordering::Acquire) + self.unwritten_acks.load(Ordering::Acquire)
    }
}

/// A message handed from the connection task to the processor.
struct Taken {
    /// As received.
    publish: Publish,
    /// The connection it came on.
    generation: u64,
    /// For `sluice_ack_latency_seconds`.
    received: Instant,
    /// For absent `ts` and the accepted window; kept so that a retry parses identically.
    received_ms: i64,
}

/// How one message ended, in arrival order.
struct Answered {
    /// QoS and packet id for the PUBACK; `None` when it must not be acked (QoS 0, or given up).
    ack: Option<Publish>,
    /// The connection it came on.
    generation: u64,
    /// For `sluice_ack_latency_seconds`.
    received: Instant,
    /// Payload bytes it held.
    bytes: usize,
}

/// Everything the per-message work needs.
struct Ctx {
    settings: Arc<Settings>,
    admission: Admission,
    metrics: Arc<Metrics>,
    /// `sluice_readings_received_total{transport="mqtt"}`, looked up once.
    received: IntCounter,
    /// `sluice_ack_latency_seconds{transport="mqtt"}`, looked up once.
    ack_latency: Histogram,
    client: AsyncClient,
    shared: Arc<Shared>,
    /// Index of the device id level in topics.
    device_level: usize,
    /// Flips to `true` on shutdown; wakes retry sleeps.
    stop: watch::Receiver<bool>,
    /// PUBACKs that cannot be queued fail message after message: their line is limited.
    puback_failing: LogLimit,
    /// Likewise dead letters that cannot be queued.
    dead_letter_failing: LogLimit,
}

/// The running MQTT source.
pub struct MqttSource {
    /// Tells the processor to stop taking messages.
    stop: watch::Sender<bool>,
    /// Polls the rumqttc event loop; ends after DISCONNECT.
    connection: JoinHandle<()>,
    /// Turns messages into readings and PUBACKs; ends once every taken message is answered.
    processor: JoinHandle<()>,
}

impl MqttSource {
    /// Connects (in the background, with backoff) and starts taking messages.
    pub fn start(
        settings: Arc<Settings>,
        admission: Admission,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let m = &settings.mqtt;
        let addr = parse_url(&m.url).map_err(|e| anyhow::anyhow!("mqtt.url: {e}"))?;
        let device_level =
            device_level(&m.topic).map_err(|e| anyhow::anyhow!("mqtt.topic: {e}"))?;
        let mut options = MqttOptions::new(m.client_id.clone(), addr.host.clone(), addr.port);
        options
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(m.keep_alive)
            .set_max_packet_size(m.max_packet_bytes, MAX_OUTGOING_PACKET)
            // Outgoing QoS 1 publishes are dead letters only; the broker acks them at once.
            .set_inflight(DEAD_LETTERS_IN_FLIGHT);
        if let Some(user) = &m.username {
            let password = m.password.as_ref().map(|p| p.expose()).unwrap_or("");
            options.set_credentials(user.clone(), password);
        }
        // Room for one PUBACK and one dead letter per message the budget admits (held, or
        // PUBACK not yet written), so `try_ack` never finds the request channel full.
        let (client, mut eventloop) = AsyncClient::new(options, 2 * m.max_unacked + 16);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);

        let subscription = if m.shared_group.is_empty() {
            m.topic.clone()
        } else {
            format!("$share/{}/{}", m.shared_group, m.topic)
        };
        let shared = Arc::new(Shared {
            live: Mutex::new(None),
            held: AtomicUsize::new(0),
            held_bytes: AtomicUsize::new(0),
            resumed: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            unwritten_acks: AtomicUsize::new(0),
        });
        metrics.mqtt_connected.set(0);
        metrics.mqtt_unacked.set(0);
        // The budget bounds it: the connection task never sends more than `max_unacked`
        // messages that the processor has not answered, so `try_send` never finds it full.
        let (tx, rx) = mpsc::channel::<Taken>(m.max_unacked);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (done_tx, done_rx) = oneshot::channel::<()>();
        tracing::info!(
            broker = %m.url,
            client_id = %m.client_id,
            subscription = %subscription,
            "MQTT source starting"
        );
        let connection = tokio::spawn(metrics.tasks.mqtt.instrument(run_connection(
            eventloop,
            client.clone(),
            ConnCtx {
                subscription,
                max_unacked: m.max_unacked,
                max_unacked_bytes: m.max_unacked_bytes,
                metrics: metrics.clone(),
                shared: shared.clone(),
                tx,
            },
            done_rx,
        )));
        let mqtt = [Transport::Mqtt.as_str()];
        let ctx = Arc::new(Ctx {
            settings,
            admission,
            received: metrics.readings_received.with_label_values(&mqtt),
            ack_latency: metrics.ack_latency.with_label_values(&mqtt),
            metrics,
            client,
            shared,
            device_level,
            stop: stop_rx.clone(),
            puback_failing: LogLimit::new(),
            dead_letter_failing: LogLimit::new(),
        });
        let processor = tokio::spawn(ctx.metrics.tasks.mqtt.instrument(run_processor(
            ctx.clone(),
            rx,
            stop_rx,
            done_tx,
        )));
        Ok(Self {
            stop: stop_tx,
            connection,
            processor,
        })
    }

    /// Shutdown step 4: take no new messages. Those already taken still commit and are acked.
    pub fn stop_taking(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until every taken message is answered and PUBACKed and the connection is closed
    /// with DISCONNECT. Call before draining the pipeline, which must still commit them.
    pub async fn finish(self) {
        self.stop_taking();
        if let Err(e) = self.processor.await {
            tracing::error!(error = %e, "MQTT processor task failed");
        }
        if let Err(e) = self.connection.await {
            tracing::error!(error = %e, "MQTT connection task failed");
        }
        tracing::info!("MQTT source stopped");
    }
}

/// What the connection task needs.
struct ConnCtx {
    /// The filter to subscribe to (with `$share/<group>/` when shared).
    subscription: String,
    /// `mqtt.max_unacked`.
    max_unacked: usize,
    /// `mqtt.max_unacked_bytes`.
    max_unacked_bytes: usize,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    /// To the processor. Closed by it on shutdown, after which nothing more is taken.
    tx: mpsc::Sender<Taken>,
}

impl ConnCtx {
    /// Forgets the connection: PUBACKs for its messages are never sent. `eventloop.clean()`
    /// also drops PUBACKs still queued in rumqttc, under the same lock that guards queuing them.
    fn forget(&self, eventloop: &mut EventLoop) {
        let mut live = self.shared.live.lock().expect("mqtt live lock");
        *live = None;
        eventloop.clean();
        // Those PUBACKs are gone with the connection; the broker redelivers their messages.
        self.shared.unwritten_acks.store(0, Ordering::Release);
        drop(live);
        self.metrics.mqtt_unacked.set(self.shared.unacked() as i64);
    }

    /// Takes one message if the budget allows (always when nothing is held).
    fn take(&self, publish: Publish, generation: u64) -> bool {
        let unacked = self.shared.unacked();
        let bytes = self.shared.held_bytes.load(Ordering::Acquire);
        let len = publish.payload.len();
        if unacked > 0 && (unacked >= self.max_unacked || bytes + len > self.max_unacked_bytes) {
            tracing::trace!(
                pkid = publish.pkid,
                unacked,
                bytes,
                "MQTT message not taken"
            );
            return false;
        }
        // Its own allocation, so that holding it does not pin rumqttc's read buffer and the
        // byte budget counts what is really held.
        let publish = Publish {
            payload: Bytes::copy_from_slice(&publish.payload),
            ..publish
        };
        self.shared.held.fetch_add(1, Ordering::AcqRel);
        self.shared.held_bytes.fetch_add(len, Ordering::AcqRel);
        let taken = Taken {
            publish,
            generation,
            received: Instant::now(),
            received_ms: now_ms(),
        };
        if self.tx.try_send(taken).is_err() {
            // Closed: shutting down. Left unacked, so redelivered to the next session.
            self.shared.held_bytes.fetch_sub(len, Ordering::AcqRel);
            self.shared.held.fetch_sub(1, Ordering::AcqRel);
        }
        self.metrics.mqtt_unacked.set(self.shared.unacked() as i64);
        true
    }
}

/// Polls the event loop for as long as the source runs: reads messages, reconnects with
/// backoff, (re)subscribes, and pauses and resumes the session when over budget. It never
/// waits on the pipeline, so the connection stays alive however slow the store is. Ends after
/// the final DISCONNECT, or on shutdown once no connection is up.
async fn run_connection(
    mut eventloop: EventLoop,
    client: AsyncClient,
    ctx: ConnCtx,
    mut done: oneshot::Receiver<()>,
) {
    let mut generation = 0u64;
    let mut ever_connected = false;
    let mut connected_at: Option<Instant> = None;
    let mut delay = RECONNECT_MIN;
    // A broker that stays away fails every attempt (the backoff grows from 0.1 s to 30 s):
    // one line, then at most one per 30 s with a count, and `failures` on the next connect.
    let failing = LogLimit::new();
    // A message was not taken on this connection: take nothing more until resumed.
    let mut paused = false;
    // Our own DISCONNECT (to resume) is queued behind the last PUBACKs.
    let mut resuming = false;
    loop {
        let stopping = ctx.shared.stopping.load(Ordering::Acquire);
        let event = if eventloop.network.is_none() {
            if stopping {
                // Shutting down with no connection: nothing more can be acked. Wait for the
                // processor to answer what it holds; the broker redelivers it next session.
                let _ = (&mut done).await;
                break;
            }
            // Dropping a connect attempt is safe; dropping a poll mid-read would not be.
            tokio::select! {
                e = eventloop.poll() => e,
                _ = &mut done => break,
            }
        } else {
            eventloop.poll().await
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                generation += 1;
                *ctx.shared.live.lock().expect("mqtt live lock") = Some(generation);
                if ack.session_present {
                    ctx.shared.resumed.store(generation, Ordering::Release);
                }
                if ever_connected && connected_at.is_none() {
                    ctx.metrics.mqtt_reconnects.inc();
                }
                ever_connected = true;
                connected_at = Some(Instant::now());
                paused = false;
                tracing::info!(
                    session_present = ack.session_present,
                    failures = failing.recovered(),
                    "MQTT connected; subscribing"
                );
                // Always subscribe: a resumed session keeps it, a new one needs it. Ahead of
                // anything else queued, including retransmitted dead letters.
                eventloop
                    .pending
                    .push_front(Request::Subscribe(Subscribe::new(
                        ctx.subscription.clone(),
                        QoS::AtLeastOnce,
                    )));
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
                {
                    tracing::info!(subscription = %ctx.subscription, "MQTT subscribed");
                    ctx.metrics.mqtt_connected.set(1);
                } else {
                    tracing::error!(
                        subscription = %ctx.subscription,
                        "the broker refused the MQTT subscription; check its ACLs and shared-subscription support"
                    );
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if paused || !ctx.take(publish, generation) {
                    if !paused {
                        tracing::debug!(
                            held = ctx.shared.held.load(Ordering::Acquire),
                            "MQTT budget full (mqtt.max_unacked / max_unacked_bytes): pausing this connection"
                        );
                        paused = true;
                    }
                    ctx.metrics.mqtt_not_taken.inc();
                }
            }
            Ok(Event::Outgoing(Outgoing::PubAck(_))) => {
                // Saturating: a PUBACK written just as `forget` reset the count.
                let _ = ctx.shared.unwritten_acks.fetch_update(
                    Ordering::AcqRel,
                    Ordering::Acquire,
                    |n| n.checked_sub(1),
                );
                ctx.metrics.mqtt_unacked.set(ctx.shared.unacked() as i64);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                if resuming && !stopping {
                    resuming = false;
                    // Reconnect at once (not a loss: no backoff, not counted as a reconnect).
                    ctx.forget(&mut eventloop);
                    continue;
                }
                tracing::info!("MQTT disconnected");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                ctx.forget(&mut eventloop);
                ctx.metrics.mqtt_connected.set(0);
                paused = false;
                resuming = false;
                if matches!(e, ConnectionError::RequestsDone) {
                    break;
                }
                if connected_at
                    .take()
                    .is_some_and(|t| t.elapsed() >= STABLE_CONNECTION)
                {
                    delay = RECONNECT_MIN;
                }
                if let Some(suppressed) = failing.event() {
                    tracing::warn!(
                        error = %e,
                        retry_in = ?delay,
                        suppressed,
                        "MQTT connection failed; reconnecting"
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = &mut done => break,
                }
                delay = (delay * 2).min(RECONNECT_MAX);
                continue;
            }
        }
        // Paused and everything taken is answered: every PUBACK is queued, so a DISCONNECT
        // queued now goes out after them. Then resume, and the broker redelivers what was left.
        if paused
            && !resuming
            && !stopping
            && eventloop.network.is_some()
            && ctx.shared.held.load(Ordering::Acquire) == 0
        {
            tracing::debug!("MQTT: everything taken is answered; resuming the session");
            resuming = client.try_disconnect().is_ok();
        }
    }
    ctx.forget(&mut eventloop);
    ctx.metrics.mqtt_connected.set(0);
}

/// Takes messages from the connection task, answers each, and sends PUBACKs in arrival order.
///
/// At most [`ACTIVE_MESSAGES`] are being answered at a time (parsed, submitted, awaiting their
/// commit); the rest of the held messages wait, unparsed, in arrival order. That keeps a
/// broker's flood from turning into tens of thousands of futures and retries against a full
/// pipeline: a waiting message costs its payload and little more.
///
/// On shutdown, the active messages are answered and PUBACKed; the waiting ones were never
/// started and are left for the broker to redeliver. Ends after asking for DISCONNECT.
async fn run_processor(
    ctx: Arc<Ctx>,
    mut rx: mpsc::Receiver<Taken>,
    mut stop: watch::Receiver<bool>,
    done: oneshot::Sender<()>,
) {
    let mut active = FuturesOrdered::new();
    let mut waiting: VecDeque<Taken> = VecDeque::new();
    let mut open = true;
    let mut stopping = false;
    loop {
        // In arrival order: everything waiting arrived after everything active.
        while active.len() < ACTIVE_MESSAGES {
            let Some(t) = waiting.pop_front() else { break };
            if t.generation < ctx.shared.resumed.load(Ordering::Acquire) {
                // A later connection resumed the session: the broker redelivers this one.
                ctx.abandon(&t);
            } else {
                active.push_back(answer(ctx.clone(), t));
            }
        }
        tokio::select! {
            taken = rx.recv(), if open => match taken {
                Some(t) if stopping => ctx.abandon(&t),
                Some(t) => waiting.push_back(t),
                None => open = false,
            },
            Some(answered) = active.next(), if !active.is_empty() => ctx.puback(answered),
            _ = stop.changed(), if !stopping => {
                stopping = true;
                ctx.shared.stopping.store(true, Ordering::Release);
                // Nothing more is taken; what was not started is left for redelivery.
                rx.close();
                for t in waiting.drain(..) {
                    ctx.abandon(&t);
                }
                tracing::info!(
                    answering = active.len(),
                    "MQTT: no longer taking messages; answering those started"
                );
            }
        }
        if !open && active.is_empty() && waiting.is_empty() {
            break;
        }
    }
    if tokio::time::timeout(Duration::from_secs(5), ctx.client.disconnect())
        .await
        .is_err()
    {
        tracing::warn!("MQTT DISCONNECT could not be queued");
    }
    drop(done);
}

impl Ctx {
    /// Sends the PUBACK for the oldest answered message, if it is due one and its connection is
    /// still the live one.
    fn puback(&self, answered: Answered) {
        if let Some(publish) = answered.ack {
            let live = self.shared.live.lock().expect("mqtt live lock");
            if *live == Some(answered.generation) {
                // Counted before queuing: the connection task may write it at once.
                self.shared.unwritten_acks.fetch_add(1, Ordering::AcqRel);
                match self.client.try_ack(&publish) {
                    Ok(()) => {
                        self.ack_latency
                            .observe(answered.received.elapsed().as_secs_f64());
                    }
                    Err(e) => {
                        self.shared.unwritten_acks.fetch_sub(1, Ordering::AcqRel);
                        if let Some(suppressed) = self.puback_failing.event() {
                            tracing::warn!(
                                error = %e,
                                suppressed,
                                "PUBACK could not be queued; the broker will redeliver the message"
                            );
                        }
                    }
                }
            }
        }
        self.shared
            .held_bytes
            .fetch_sub(answered.bytes, Ordering::AcqRel);
        self.shared.held.fetch_sub(1, Ordering::AcqRel);
        self.metrics.mqtt_unacked.set(self.shared.unacked() as i64);
    }

    /// Lets go of a message that was never started: no PUBACK, so the broker redelivers it.
    fn abandon(&self, t: &Taken) {
        self.shared
            .held_bytes
            .fetch_sub(t.publish.payload.len(), Ordering::AcqRel);
        self.shared.held.fetch_sub(1, Ordering::AcqRel);
        self.metrics.mqtt_unacked.set(self.shared.unacked() as i64);
    }

    /// Counts readings received and rejected under `transport="mqtt"`.
    fn count(&self, received: usize, rejected: impl IntoIterator<Item = RejectReason>) {
        self.received.inc_by(received as u64);
        for reason in rejected {
            self.metrics.rejected(Transport::Mqtt, reason, 1);
        }
    }

    /// Republishes (QoS 1) what could not be taken, with its error.
    async fn dead_letter(&self, device: Option<&DeviceId>, t: &Taken, letter: DeadLetter<'_>) {
        let topic = format!(
            "{}/{}",
            self.settings.mqtt.dead_letter_topic,
            device.map(DeviceId::as_str).unwrap_or(INVALID_DEVICE_LEVEL)
        );
        let body = match serde_json::to_vec(&letter) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a dead letter");
                return;
            }
        };
        tracing::debug!(topic = %t.publish.topic, dead_letter = %topic, "MQTT payload dead-lettered");
        match self
            .client
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
        {
            Ok(()) => self.metrics.mqtt_dead_letters.inc(),
            Err(e) => {
                if let Some(suppressed) = self.dead_letter_failing.event() {
                    tracing::warn!(error = %e, suppressed, "cannot queue a dead letter");
                }
            }
        }
    }
}

/// The device id from the topic's `+` level (`device_level`, counted from 0).
fn device_of(topic: &str, device_level: usize) -> Result<DeviceId, String> {
    let level = topic.split('/').nth(device_level).ok_or_else(|| {
        format!(
            "topic `{topic}` has no level {} for the device id",
            device_level + 1
        )
    })?;
    DeviceId::parse(level)
        .map_err(|e| format!("device id in topic level {}: {e}", device_level + 1))
}

/// What one message comes to, decided from its topic and payload alone: the pure part of
/// [`answer`], with no I/O, so that it can be tested and fuzzed on its own.
#[derive(Debug)]
pub enum Verdict {
    /// The message can never be taken: it is PUBACKed, counted as `readings` rejected for
    /// `reason`, and dead-lettered with `detail`.
    Refused {
        /// The device from the topic; `None` when that level is not a valid device id.
        device: Option<DeviceId>,
        /// The `reason` label it is counted under.
        reason: RejectReason,
        /// What is wrong, for the device's developer.
        detail: String,
        /// Readings it is counted as (1 when the payload could not be split).
        readings: usize,
    },
    /// The payload parsed: `parsed.readings` go on to be committed, and `parsed.rejected`, if
    /// any, are dead-lettered beside them.
    Parsed {
        /// The device from the topic.
        device: DeviceId,
        /// What the edge parser made of the payload.
        parsed: ParsedBatch,
    },
}

/// Decides what a message on `topic` with `payload`, received at `received_ms`, comes to:
/// the device from topic level `device_level`, then the size limit, then the shared edge parser
/// (one reading or an array, `device_id` bound to the topic, one leading byte-order mark
/// ignored). Pure and synchronous; [`answer`] runs it on a blocking thread for large payloads.
pub fn decide(
    topic: &str,
    payload: &[u8],
    device_level: usize,
    limits: &LimitSettings,
    received_ms: i64,
) -> Verdict {
    let device = match device_of(topic, device_level) {
        Ok(d) => d,
        Err(detail) => {
            return Verdict::Refused {
                device: None,
                reason: RejectReason::InvalidDeviceId,
                detail,
                readings: 1,
            }
        }
    };
    if payload.len() > limits.max_body_bytes {
        return Verdict::Refused {
            device: Some(device),
            reason: RejectReason::TooLarge,
            detail: format!(
                "payload of {} bytes exceeds limits.max_body_bytes ({})",
                payload.len(),
                limits.max_body_bytes
            ),
            readings: 1,
        };
    }
    let ctx = reading::ParseContext {
        now_ms: received_ms,
        max_future_skew: limits.max_future_skew,
        max_age: limits.max_age,
        max_readings: limits.max_readings_per_request,
        bound_device: Some(&device),
    };
    let parsed =
        reading::decode_utf8(payload).and_then(|text| reading::parse_json_batch(text, &ctx));
    match parsed {
        Ok(parsed) => Verdict::Parsed { device, parsed },
        Err(BatchError::Malformed(detail)) => Verdict::Refused {
            device: Some(device),
            reason: RejectReason::Malformed,
            detail,
            readings: 1,
        },
        Err(e @ BatchError::TooMany { count, .. }) => Verdict::Refused {
            device: Some(device),
            reason: RejectReason::TooManyReadings,
            detail: e.to_string(),
            readings: count,
        },
    }
}

impl Verdict {
    /// The device from the topic, if it is a valid id.
    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            Verdict::Refused { device, .. } => device.as_ref(),
            Verdict::Parsed { device, .. } => Some(device),
        }
    }

    /// The dead letter to republish for this message, if any: always for a refused message,
    /// and for a parsed one when some of its readings were rejected. `max_body_bytes` bounds the
    /// payload copied into it.
    pub fn dead_letter<'a>(
        &'a self,
        topic: &'a str,
        payload: &'a [u8],
        received_ms: i64,
        max_body_bytes: usize,
    ) -> Option<DeadLetter<'a>> {
        let base = DeadLetter {
            topic,
            device_id: self.device().map(DeviceId::as_str),
            received_at: format_ts(received_ms),
            payload_bytes: payload.len(),
            payload: (payload.len() <= max_body_bytes)
                .then(|| std::str::from_utf8(payload).ok())
                .flatten(),
            error: None,
            rejected: Vec::new(),
            taken: 0,
        };
        match self {
            Verdict::Refused { reason, detail, .. } => Some(DeadLetter {
                error: Some(MessageError {
                    reason: reason.as_str(),
                    detail: detail.clone(),
                }),
                ..base
            }),
            Verdict::Parsed { parsed, .. } if !parsed.rejected.is_empty() => Some(DeadLetter {
                rejected: parsed
                    .rejected
                    .iter()
                    .map(|r| DeadReading {
                        index: r.index,
                        reason: r.error.kind.as_str(),
                        error: r.error.to_string(),
                    })
                    .collect(),
                taken: parsed.readings.len(),
                ..base
            }),
            Verdict::Parsed { .. } => None,
        }
    }
}

/// Parses a payload bound to `device` with the shared edge parser (for a resubmission).
async fn parse(
    settings: &Arc<Settings>,
    device: &DeviceId,
    payload: &Bytes,
    received_ms: i64,
) -> Result<ParsedBatch, BatchError> {
    parse_readings(
        settings,
        payload.clone(),
        Format::Json,
        Some(device.clone()),
        received_ms,
    )
    .await
}

/// Answers one message: dead-letters what can never be taken, and commits the rest, retrying
/// while the pipeline refuses. Resolves when the message may be PUBACKed, or when it is left
/// for the broker to redeliver.
async fn answer(ctx: Arc<Ctx>, t: Taken) -> Answered {
    let answered = |acked: bool| Answered {
        ack: (acked && t.publish.qos != QoS::AtMostOnce).then(|| {
            let mut p = Publish::new("", t.publish.qos, Vec::new());
            p.pkid = t.publish.pkid;
            p
        }),
        generation: t.generation,
        received: t.received,
        bytes: t.publish.payload.len(),
    };
    let limits = &ctx.settings.limits;
    let payload = &t.publish.payload;
    let level = ctx.device_level;
    let verdict = if payload.len() > INLINE_PARSE_BYTES {
        // A large payload is parsed on a blocking thread, as for the other transports.
        let (topic, bytes, lim, ms) = (
            t.publish.topic.clone(),
            payload.clone(),
            limits.clone(),
            t.received_ms,
        );
        tokio::task::spawn_blocking(move || decide(&topic, &bytes, level, &lim, ms))
            .await
            .unwrap_or_else(|e| Verdict::Refused {
                device: device_of(&t.publish.topic, level).ok(),
                reason: RejectReason::Malformed,
                detail: format!("parser failed: {e}"),
                readings: 1,
            })
    } else {
        decide(&t.publish.topic, payload, level, limits, t.received_ms)
    };
    match &verdict {
        Verdict::Refused {
            reason, readings, ..
        } => {
            ctx.count(*readings, []);
            ctx.metrics
                .rejected(Transport::Mqtt, *reason, *readings as u64);
        }
        Verdict::Parsed { parsed, .. } => {
            ctx.count(parsed.total(), parsed.rejected.iter().map(|r| r.error.kind))
        }
    }
    if let Some(dl) = verdict.dead_letter(
        &t.publish.topic,
        payload,
        t.received_ms,
        limits.max_body_bytes,
    ) {
        ctx.dead_letter(verdict.device(), &t, dl).await;
    }
    let (device, readings) = match verdict {
        Verdict::Parsed { device, parsed } if !parsed.readings.is_empty() => {
            (device, parsed.readings)
        }
        _ => return answered(true),
    };
    let committed = commit(&ctx, &t, &device, readings).await;
    answered(committed)
}

/// Submits the readings and waits for their commit, resubmitting after a refusal or a failed
/// commit. `true` once committed (or known duplicates); `false` when given up, which happens
/// only on shutdown or when the broker will redeliver the message to a resumed session.
async fn commit(ctx: &Ctx, t: &Taken, device: &DeviceId, readings: Vec<reading::Reading>) -> bool {
    let mut readings = Some(readings);
    let mut delay = RETRY_MIN;
    let cap = ctx.settings.pipeline.retry_after.max(RETRY_MIN);
    let mut stop = ctx.stop.clone();
    loop {
        let batch = match readings.take() {
            Some(r) => r,
            // `submit` consumed them. The same payload and receive time parse to the same
            // readings, so a retry stores exactly what the first attempt would have.
            None => match parse(&ctx.settings, device, &t.publish.payload, t.received_ms).await {
                Ok(p) => p.readings,
                Err(_) => return false,
            },
        };
        match ctx.admission.submit(Transport::Mqtt, batch) {
            Ok(ack) => match ack.await {
                Ok(Ok(_)) => return true,
                Ok(Err(e)) => tracing::debug!(error = %e, "MQTT message not committed; retrying"),
                Err(_) => tracing::debug!("MQTT message dropped by the pipeline; retrying"),
            },
            Err(refusal) => tracing::debug!(%refusal, "MQTT message refused; retrying"),
        }
        if ctx.shared.stopping.load(Ordering::Acquire) {
            return false;
        }
        if t.generation < ctx.shared.resumed.load(Ordering::Acquire) {
            // A later connection resumed the session: the broker redelivers this message.
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return false,
        }
        delay = (delay * 2).min(cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884").unwrap(),
            BrokerAddr {
                host: "127.0.0.1".into(),
                port: 1884
            }
        );
        assert_eq!(parse_url("tcp://broker").unwrap().port, 1883);
        assert_eq!(parse_url("mqtt://[::1]:9").unwrap().host, "::1");
        assert!(parse_url("mqtts://b:8883").unwrap_err().contains("TLS"));
        assert!(parse_url("http://b").is_err());
        assert!(parse_url("mqtt://b:0").is_err());
        assert!(parse_url("mqtt://u:p@b:1").is_err());
        assert!(parse_url("mqtt://").is_err());
    }

    #[test]
    fn topic_filters() {
        assert_eq!(device_level("devices/+/readings").unwrap(), 1);
        assert_eq!(device_level("+").unwrap(), 0);
        assert!(device_level("devices/readings").is_err());
        assert!(device_level("a/+/+").is_err());
        assert!(device_level("a/+/#").is_err());
        assert!(device_level("$share/g/a/+").is_err());
        assert!(filter_matches("devices/+/readings", "devices/x/readings"));
        assert!(!filter_matches("devices/+/readings", "devices/x"));
    }

    #[test]
    fn validation_names_the_key() {
        let limits = LimitSettings::default();
        let ok = MqttSettings::default();
        assert!(validate(&ok, &limits).is_ok());
        let bad = |f: fn(&mut MqttSettings)| {
            let mut m = MqttSettings::default();
            f(&mut m);
            validate(&m, &limits).unwrap_err().0
        };
        assert_eq!(bad(|m| m.url = "mqtts://x".into()), "mqtt.url");
        assert_eq!(bad(|m| m.client_id.clear()), "mqtt.client_id");
        assert_eq!(bad(|m| m.topic = "devices/#".into()), "mqtt.topic");
        assert_eq!(bad(|m| m.shared_group = "a/b".into()), "mqtt.shared_group");
        assert_eq!(
            bad(|m| m.keep_alive = Duration::from_millis(10)),
            "mqtt.keep_alive"
        );
        assert_eq!(bad(|m| m.max_unacked = 0), "mqtt.max_unacked");
        assert_eq!(bad(|m| m.max_packet_bytes = 1024), "mqtt.max_packet_bytes");
        assert_eq!(
            bad(|m| {
                m.topic = "+/+".into();
            }),
            "mqtt.topic"
        );
        assert_eq!(
            bad(|m| {
                m.topic = "devices/+".into();
                m.dead_letter_topic = "devices".into();
            }),
            "mqtt.dead_letter_topic"
        );
    }

    #[test]
    fn decide_refuses_or_parses_and_dead_letters_only_what_was_refused() {
        let limits = LimitSettings {
            max_body_bytes: 256,
            ..LimitSettings::default()
        };
        let now = now_ms();
        let topic = "devices/d1/readings";
        let decide = |topic: &str, payload: &[u8]| decide(topic, payload, 1, &limits, now);

        let ok = b"\xEF\xBB\xBF{\"seq\":1,\"metrics\":{\"x\":18446744073709551615}}";
        let v = decide(topic, ok);
        assert!(matches!(&v, Verdict::Parsed { parsed, .. } if parsed.readings.len() == 1));
        assert!(v.dead_letter(topic, ok, now, 256).is_none());

        let partial = br#"[{"metrics":{"x":1}},{"metrics":{"x":-9223372036854775809}}]"#;
        let v = decide(topic, partial);
        let dl = serde_json::to_value(v.dead_letter(topic, partial, now, 256).unwrap()).unwrap();
        assert_eq!(dl["taken"], 1);
        assert_eq!(dl["rejected"][0]["index"], 1);
        assert_eq!(dl["rejected"][0]["reason"], "invalid_metrics");
        assert_eq!(dl["payload"], std::str::from_utf8(partial).unwrap());

        let refused = |topic: &str, payload: &[u8]| match decide(topic, payload) {
            Verdict::Refused {
                reason,
                detail,
                device,
                ..
            } => (reason, detail, device),
            other => panic!("{other:?}"),
        };
        let (reason, detail, device) = refused(topic, b"\xEF\xBB\xBF\xEF\xBB\xBF{}");
        assert_eq!(
            (reason, device.unwrap().as_str()),
            (RejectReason::Malformed, "d1")
        );
        assert!(
            detail.contains("unexpected byte 0xEF (a UTF-8 byte-order mark?)"),
            "{detail}"
        );
        let (reason, _, device) = refused("devices/a+b/readings", b"{}");
        assert_eq!((reason, device), (RejectReason::InvalidDeviceId, None));
        let (reason, ..) = refused(topic, &[b' '; 300]);
        assert_eq!(reason, RejectReason::TooLarge);
        let (reason, detail, _) = refused(topic, b"[1, \xFF]");
        assert_eq!(
            (reason, detail.as_str()),
            (
                RejectReason::Malformed,
                "not UTF-8: invalid byte 0xFF at offset 4"
            )
        );
    }

    #[test]
    fn dead_letter_shape() {
        let dl = DeadLetter {
            topic: "devices/d1/readings",
            device_id: Some("d1"),
            received_at: format_ts(0),
            payload_bytes: 3,
            payload: Some("{x}"),
            error: Some(MessageError {
                reason: "malformed",
                detail: "bad".into(),
            }),
            rejected: vec![],
            taken: 0,
        };
        let v: serde_json::Value = serde_json::to_value(&dl).unwrap();
        assert_eq!(v["error"]["reason"], "malformed");
        assert_eq!(v["device_id"], "d1");
        assert_eq!(v["received_at"], "1970-01-01T00:00:00.000Z");
        let dl = DeadLetter {
            payload: None,
            error: None,
            device_id: None,
            ..dl
        };
        let v: serde_json::Value = serde_json::to_value(&dl).unwrap();
        assert!(v.get("error").is_none() && v.get("payload").is_none());
        assert!(v["device_id"].is_null());
    }
}
