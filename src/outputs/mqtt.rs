//! The MQTT alert action (SPEC §12): rule engine → outbox → **this task** → broker topic
//! `<alerts.mqtt_topic>/<rule>/<device_id>`, when `mqtt.enabled` and `alerts.mqtt_topic` is
//! not empty.
//!
//! A client and connection of its own (client id `<mqtt.client_id>-alerts`, clean session),
//! apart from the MQTT source in `ingest::mqtt`, so that neither can hold up the other. Events
//! are published at QoS 1 in queue order; `sent` is counted at each PUBACK. A lost connection
//! counts `failed` and is made again with backoff (rumqttc sends the unacknowledged publishes
//! again on the new connection); meanwhile the outbox fills and, past `alerts.queue_capacity`,
//! drops and counts new events (`drop_newest`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::outbox::OutboxReceiver;
use crate::config::Settings;
use crate::ingest::mqtt::broker_options;
use crate::telemetry::log_limit::LogLimit;
use crate::telemetry::metrics::Metrics;

/// QoS 1 publishes awaiting their PUBACK at once.
const IN_FLIGHT: u16 = 64;
/// First and largest wait before connecting again.
const RECONNECT: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(30));

/// An alert event for MQTT: its topic and its JSON.
pub type MqttEvent = (String, Arc<str>);

/// The running MQTT action.
pub struct MqttAlerts {
    /// Cancelled when the shutdown budget is spent.
    stop: CancellationToken,
    /// Takes events from the outbox and hands them to the client.
    publisher: JoinHandle<()>,
    /// Polls the connection.
    connection: JoinHandle<()>,
    /// Publishes handed to the client and not yet acknowledged.
    outstanding: Arc<AtomicU64>,
    /// To disconnect at the end.
    client: AsyncClient,
    /// `result="dropped"`, for what is left at the end.
    dropped: prometheus::IntCounter,
}

/// The topic of an event: `<prefix>/<rule>/<device_id>`.
pub fn topic(prefix: &str, rule: &str, device: &str) -> String {
    format!("{prefix}/{rule}/{device}")
}

impl MqttAlerts {
    /// Connects in the background (a broker that is down delays the events, never the start).
    pub fn start(
        settings: &Settings,
        mut rx: OutboxReceiver<MqttEvent>,
        metrics: &Metrics,
    ) -> anyhow::Result<Self> {
        let m = &settings.mqtt;
        // The source's way to reach the broker (address, credentials, TLS), another client id.
        let mut options = broker_options(m, format!("{}-alerts", m.client_id))?;
        options
            .set_clean_session(true)
            .set_keep_alive(m.keep_alive)
            .set_inflight(IN_FLIGHT);
        let (client, mut eventloop) = AsyncClient::new(options, IN_FLIGHT as usize);
        let stop = CancellationToken::new();
        let outstanding = Arc::new(AtomicU64::new(0));
        let sent = metrics
            .alert_notifications
            .with_label_values(&["mqtt", "sent"]);
        let failed = metrics
            .alert_notifications
            .with_label_values(&["mqtt", "failed"]);
        let dropped = rx.dropped.clone();

        let done = outstanding.clone();
        let stopping = stop.clone();
        let connection = tokio::spawn(async move {
            let failing = LogLimit::new();
            let mut backoff = RECONNECT.0;
            loop {
                let polled = tokio::select! {
                    p = eventloop.poll() => p,
                    () = stopping.cancelled() => return,
                };
                match polled {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        sent.inc();
                        done.fetch_sub(1, Ordering::AcqRel);
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff = RECONNECT.0;
                        if let Some(failures) = failing.recovered() {
                            tracing::info!(failures, "MQTT alert connection up again");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        failed.inc();
                        if let Some(suppressed) = failing.event() {
                            tracing::warn!(error = %e, suppressed, retry_in_ms = backoff.as_millis() as u64, "MQTT alert connection failed; alert events wait");
                        }
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = stopping.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(RECONNECT.1);
                    }
                }
            }
        });

        let publishing = client.clone();
        let stopping = stop.clone();
        let handed = outstanding.clone();
        let publisher = tokio::spawn(async move {
            loop {
                let (topic, payload) = tokio::select! {
                    e = rx.recv() => match e { Some(e) => e, None => break },
                    () = stopping.cancelled() => break,
                };
                handed.fetch_add(1, Ordering::AcqRel);
                let sent = tokio::select! {
                    r = publishing.publish_bytes(topic, QoS::AtLeastOnce, false, Bytes::copy_from_slice(payload.as_bytes())) => r.is_ok(),
                    () = stopping.cancelled() => false,
                };
                if !sent {
                    handed.fetch_sub(1, Ordering::AcqRel);
                    rx.dropped.inc();
                    break;
                }
            }
            rx.drop_rest();
        });
        Ok(Self {
            stop,
            publisher,
            connection,
            outstanding,
            client,
            dropped,
        })
    }

    /// Publishes what is queued, waiting for its PUBACKs, for at most `budget` (the producer
    /// must be gone); then drops and counts the rest, and disconnects.
    pub async fn finish(self, budget: Duration) {
        let deadline = tokio::time::Instant::now() + budget;
        let MqttAlerts {
            stop,
            mut publisher,
            connection,
            outstanding,
            client,
            dropped,
        } = self;
        if tokio::time::timeout_at(deadline, &mut publisher)
            .await
            .is_err()
        {
            stop.cancel();
            let _ = publisher.await;
        }
        while outstanding.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        dropped.inc_by(outstanding.load(Ordering::Acquire));
        let _ = client.try_disconnect();
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_millis(200), connection).await;
    }
}
