//! The MQTT connection task: broker ⇄ rumqttc's event loop, always polled (see the parent
//! module for the whole picture). It reads, forwards what it may take, reconnects with backoff
//! and pauses the session when over budget; it never awaits the pipeline.

use super::{Shared, Taken};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    Request, Subscribe, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, oneshot};

use crate::config::mqtt::parse_url;
use crate::config::{ConfigError, MqttSettings};
use crate::reading::now_ms;
use crate::telemetry::log_limit::LogLimit;
use crate::telemetry::metrics::Metrics;

/// First reconnect delay; doubles on each failure up to [`RECONNECT_MAX`].
const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Reconnect backoff cap (SPEC §6).
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// A connection that stayed up this long restarts the backoff from [`RECONNECT_MIN`].
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// How to reach the broker, from `[mqtt]`: its address, the credentials and, for
/// `mqtts://`, TLS trusting only `mqtt.ca_file`'s CAs (through the build's one rustls and
/// provider, `crate::tls`). The one way to connect, for the source and for the alert action's
/// own connection (`outputs::mqtt`). A CA file that cannot be used is a configuration error
/// (exit 2, naming the key).
pub(crate) fn broker_options(m: &MqttSettings, client_id: String) -> anyhow::Result<MqttOptions> {
    let addr = parse_url(&m.url).map_err(|reason| ConfigError::Invalid {
        key: "mqtt.url",
        reason,
    })?;
    let mut options = MqttOptions::new(client_id, addr.host, addr.port);
    if let Some(user) = &m.username {
        let password = m.password.as_ref().map(|p| p.expose()).unwrap_or("");
        options.set_credentials(user.clone(), password);
    }
    if addr.tls {
        let ca_file = m.ca_file.as_deref().ok_or_else(|| ConfigError::Invalid {
            key: "mqtt.ca_file",
            reason: "is required with mqtts://".into(),
        })?;
        let config = crate::tls::client_config(ca_file).map_err(|reason| ConfigError::Invalid {
            key: "mqtt.ca_file",
            reason,
        })?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    }
    Ok(options)
}

/// What the connection task needs.
pub(super) struct ConnCtx {
    /// The filter to subscribe to (with `$share/<group>/` when shared).
    pub(super) subscription: String,
    /// `mqtt.max_unacked`.
    pub(super) max_unacked: usize,
    /// `mqtt.max_unacked_bytes`.
    pub(super) max_unacked_bytes: usize,
    pub(super) metrics: Arc<Metrics>,
    pub(super) shared: Arc<Shared>,
    /// To the processor. Closed by it on shutdown, after which nothing more is taken.
    pub(super) tx: mpsc::Sender<Taken>,
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
pub(super) async fn run_connection(
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
