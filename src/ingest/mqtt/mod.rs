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
//!
//! Files: `mod.rs` (this: the source, its start and stop, what the tasks share),
//! `connection.rs` (the connection task), `processor.rs` (the processor task and the pure
//! [`decide`]), `dead_letter.rs` (the dead-letter shape).

mod connection;
mod dead_letter;
mod processor;

pub use dead_letter::{DeadLetter, DeadReading, MessageError, INVALID_DEVICE_LEVEL};
pub use processor::{decide, Verdict};

pub(crate) use connection::broker_options;
use connection::{run_connection, ConnCtx};
use processor::run_processor;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus::{Histogram, IntCounter};
use rumqttc::{AsyncClient, Publish};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::mqtt::{device_level, MAX_OUTGOING_PACKET};
use crate::config::Settings;
use crate::pipeline::Admission;
use crate::telemetry::log_limit::LogLimit;
use crate::telemetry::metrics::{Metrics, Transport};

/// Dead letters sent and not yet acknowledged by the broker (rumqttc preallocates this many).
const DEAD_LETTERS_IN_FLIGHT: u16 = 256;

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
    /// Per-device rate limits (`rate_limit.per_device`), shared with HTTP and WebSocket: a
    /// message waits for its device's allowance before it is admitted, so its PUBACK is
    /// withheld meanwhile (SPEC §11), for at most `rate_limit.mqtt_max_wait`.
    limiter: Option<Arc<crate::access::rate_limit::DeviceLimiter>>,
    /// Readings waiting for their device's allowance, by device: what a new message of that
    /// device would wait behind.
    rate_waiting: Arc<Mutex<HashMap<String, usize>>>,
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
        limiter: Option<Arc<crate::access::rate_limit::DeviceLimiter>>,
    ) -> anyhow::Result<Self> {
        let m = &settings.mqtt;
        let device_level =
            device_level(&m.topic).map_err(|e| anyhow::anyhow!("mqtt.topic: {e}"))?;
        let mut options = broker_options(m, m.client_id.clone())?;
        options
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(m.keep_alive)
            .set_max_packet_size(m.max_packet_bytes, MAX_OUTGOING_PACKET)
            // Outgoing QoS 1 publishes are dead letters only; the broker acks them at once.
            .set_inflight(DEAD_LETTERS_IN_FLIGHT);
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
            limiter,
            rate_waiting: Arc::default(),
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
