//! The NATS output (SPEC §13): store outbox → **NATS publisher** → `<prefix>.<device_id>`, and
//! NATS → **fleet live** → `/v1/live`. Downstream of the ack: NATS being slow or down never
//! slows or refuses ingest, it only lets the outbox grow.
//!
//! - The publisher reads committed readings from the store's [`Outbox`] in commit order
//!   (hence in order per device) and advances the outbox only past readings NATS has
//!   acknowledged. With JetStream, up to `nats.max_in_flight` publications await their PubAck
//!   (in order; the first failure stops there), and the window is refilled each time half of
//!   it is acknowledged, so sending overlaps waiting. With core NATS, a batch is published and
//!   flushed. A failure re-sends from the first unacknowledged reading after a backoff.
//! - Every message carries `Nats-Msg-Id: <device_id>:<seq>` (or `<device_id>:r<rid>`, the
//!   store's reading id, for a reading without seq), so a re-send after a failure or a crash
//!   is dropped by the stream's duplicate window, and `Sluice-Replica: <id>`, so each replica
//!   can tell its own readings from others' on the live subscription.
//! - At-least-once, in order per device: a reading can be delivered twice only past the
//!   stream's duplicate window (e.g. a backlog older than it). Order has one exception: when
//!   the connection breaks in the middle of a batch, the messages already written to the dead
//!   socket are lost, while the client library sends those still queued behind them on the
//!   new connection; the lost ones then arrive with the re-send, after them. Every reading
//!   still arrives (once, within the duplicate window). Chaining `Nats-Expected-Last-Msg-Id`
//!   would close this for a stream with one publisher; it is not built.
//! - Fleet live (`nats.fleet_live`): a core subscription to `<prefix>.>` hands other replicas'
//!   readings to this replica's `/v1/live` subscribers ([`Live::deliver_remote`]).
//! - Shutdown (SPEC §9): after the pipeline has drained, [`NatsOutput::finish`] publishes what
//!   is left within the rest of the shutdown budget; whatever is not published stays in the
//!   outbox for the next start.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use std::collections::VecDeque;

use async_nats::connection::State;
use async_nats::jetstream::context::GetStreamByNameErrorKind;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use async_nats::{Client, ConnectOptions, Event, HeaderMap, ServerAddr};
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{NatsMode, NatsSettings};
use crate::reading::Reading;
use crate::services::live::{render_parts, Live};
use crate::services::Service;
use crate::store::{Outbox, OutboxItem, ReaderSlot, StoreError};
use crate::telemetry::log_limit::LogLimit;
use crate::telemetry::metrics::Metrics;

/// Header naming the replica that committed a reading.
pub const REPLICA_HEADER: &str = "Sluice-Replica";

/// Repeating failures, logged by the rule of [`crate::telemetry::log_limit`].
static PUBLISH_FAILED: LogLimit = LogLimit::new();
/// Reading or advancing the store's outbox failed.
static OUTBOX_FAILED: LogLimit = LogLimit::new();

/// Longest wait for a core flush (JetStream PubAcks have the context's own timeout).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a JetStream PubAck.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// First and largest wait before publishing again after a failure.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// With nothing to publish, look again after this long even without a commit notice.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// At shutdown, how long to wait for a NATS that is away to come back before leaving what is
/// left in the outbox (a NATS that is up is published to for the whole shutdown budget).
const SHUTDOWN_RECONNECT_WAIT: Duration = Duration::from_secs(5);
/// How often the backlog gauge is refreshed (a count on PostgreSQL).
const LAG_EVERY: Duration = Duration::from_millis(500);
/// In `auto` mode, how often to look again for a stream that captures the subjects.
const MODE_RECHECK: Duration = Duration::from_secs(30);

/// The `Nats-Msg-Id` of a committed reading (SPEC §13).
pub fn message_id(item: &OutboxItem) -> String {
    match item.row.seq {
        Some(seq) => format!("{}:{seq}", item.device_id),
        None => format!("{}:r{}", item.device_id, item.unsequenced_id),
    }
}

/// Wakes the publisher after each commit: a processing service that only notifies.
pub struct CommitNotice(pub Arc<Notify>);

impl Service for CommitNotice {
    fn name(&self) -> &'static str {
        "nats-notice"
    }

    fn after_commit(&self, stored: &[&Reading], _commit_ms: i64) {
        if !stored.is_empty() {
            self.0.notify_one();
        }
    }
}

/// The running NATS output.
pub struct NatsOutput {
    /// Cancelled at shutdown: publish what is left, then stop.
    draining: CancellationToken,
    /// Stops the live subscription.
    stop_live: CancellationToken,
    /// The publisher task.
    task: JoinHandle<()>,
    /// For a last cursor write if the publisher is cut short.
    reader: Arc<ReaderSlot>,
}

/// What the publisher task needs.
struct Publisher {
    /// `[nats]`.
    settings: NatsSettings,
    /// Counters and gauges.
    metrics: Arc<Metrics>,
    /// Where the outbox appears once the store is open.
    reader: Arc<ReaderSlot>,
    /// Commit notices.
    notify: Arc<Notify>,
    /// This process's `Sluice-Replica`.
    replica: String,
    /// Cancelled at shutdown.
    draining: CancellationToken,
}

/// How NATS acknowledges, as resolved from `nats.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolved {
    /// JetStream PubAcks.
    JetStream,
    /// Core publish and flush.
    Core,
}

/// A random id for this process (`Sluice-Replica`): replicas on one host must differ.
pub fn replica_id() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

impl NatsOutput {
    /// Connects (in the background: a NATS that is down delays publication, never the start)
    /// and starts the publisher and, with `nats.fleet_live`, the live subscription.
    pub fn start(
        settings: &NatsSettings,
        replica: &str,
        metrics: Arc<Metrics>,
        reader: Arc<ReaderSlot>,
        live: Arc<Live>,
        notify: Arc<Notify>,
    ) -> anyhow::Result<Self> {
        let addrs = settings
            .url
            .expose()
            .split(',')
            .map(|u| u.trim().parse::<ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("nats.url: {e}"))?;
        // The URL's user and password are percent-encoded (`%40` for `@`): decoded here.
        let decode = |s: Option<&str>| {
            percent_encoding::percent_decode_str(s.unwrap_or_default())
                .decode_utf8_lossy()
                .into_owned()
        };
        let mut options = match addrs.iter().find(|a| a.username().is_some()) {
            Some(a) if a.password().is_some() => {
                ConnectOptions::with_user_and_password(decode(a.username()), decode(a.password()))
            }
            // A user name alone is a token (`nats://<token>@host`).
            Some(a) => ConnectOptions::with_token(decode(a.username())),
            None => ConnectOptions::new(),
        };
        let replica = replica.to_owned();
        let connected = metrics.nats_connected.clone();
        let draining = CancellationToken::new();
        let shutting_down = draining.clone();
        options = options
            .name(format!("sluice-{replica}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(move |event| {
                let connected = connected.clone();
                let shutting_down = shutting_down.clone();
                async move {
                    match event {
                        Event::Connected => {
                            connected.set(1);
                            tracing::info!("NATS connected");
                        }
                        // Expected at shutdown, once the outbox is drained or its budget spent.
                        Event::Disconnected | Event::Closed if shutting_down.is_cancelled() => {
                            connected.set(0);
                            tracing::info!("NATS connection closed at shutdown");
                        }
                        Event::Disconnected | Event::Closed => {
                            connected.set(0);
                            tracing::warn!("NATS disconnected; readings wait in the outbox");
                        }
                        other => tracing::warn!(event = %other, "NATS"),
                    }
                }
            });
        metrics.nats_enabled.set(1);
        metrics
            .nats_outbox_limit
            .set(settings.max_outbox.min(i64::MAX as u64) as i64);
        let stop_live = CancellationToken::new();
        let publisher = Publisher {
            settings: settings.clone(),
            metrics: metrics.clone(),
            reader: reader.clone(),
            notify,
            replica: replica.clone(),
            draining: draining.clone(),
        };
        let fleet_live = settings.fleet_live;
        let prefix = settings.subject_prefix.clone();
        let live_stop = stop_live.clone();
        let task = tokio::spawn(async move {
            let client = match options.connect(addrs).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the NATS client; readings stay in the outbox");
                    return;
                }
            };
            if fleet_live {
                let client = client.clone();
                tokio::spawn(live_loop(client, prefix, replica, live, metrics, live_stop));
            }
            publisher.run(client).await;
        });
        Ok(Self {
            draining,
            stop_live,
            task,
            reader,
        })
    }

    /// Publishes what is left (the pipeline has drained), for at most `budget`; what is not
    /// published by then stays in the outbox for the next start.
    pub async fn finish(self, budget: Duration) {
        self.stop_live.cancel();
        self.draining.cancel();
        let mut task = self.task;
        if tokio::time::timeout(budget, &mut task).await.is_err() {
            task.abort();
            tracing::warn!("NATS: shutdown budget spent; the rest stays in the outbox");
        }
        if let Some(outbox) = self.reader.outbox() {
            let _ = tokio::task::spawn_blocking(move || outbox.persist()).await;
        }
    }
}

/// Sleeps for the backoff, then doubles it (up to its cap). At shutdown the task is aborted
/// by [`NatsOutput::finish`] when its budget is spent, so the sleep needs no cancellation.
async fn pause(backoff: &mut Duration) {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(BACKOFF.1);
}

/// Runs a store call on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Journal(format!("outbox task: {e}"))))
}

impl Publisher {
    async fn run(self, client: Client) {
        let outbox = loop {
            if let Some(o) = self.reader.outbox() {
                break o;
            }
            if self.draining.is_cancelled() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(IDLE_POLL) => {}
                () = self.draining.cancelled() => {}
            }
        };
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(ACK_TIMEOUT)
            .max_ack_inflight(self.settings.max_in_flight)
            .build(client.clone());
        let start = blocking({
            let o = outbox.clone();
            move || o.start()
        })
        .await;
        // `acked`: the position after the last reading NATS acknowledged; `sent`: after the
        // last one sent. JetStream publications between the two are in `inflight`, oldest
        // first, and the window is refilled when half of it is acknowledged, so sending and
        // acknowledging overlap.
        let mut acked = match start {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the NATS outbox cursor; not publishing");
                return;
            }
        };
        let mut sent = acked;
        // `None`: a reading too large for the server, skipped (counts as acknowledged).
        let mut inflight: VecDeque<(u64, Option<PublishAckFuture>)> = VecDeque::new();
        let max = self.settings.max_in_flight;
        let mut mode: Option<(Resolved, tokio::time::Instant)> = None;
        let mut backoff = BACKOFF.0;
        // When the shutdown found NATS away (see SHUTDOWN_RECONNECT_WAIT).
        let mut away_at_shutdown: Option<tokio::time::Instant> = None;
        // The backlog gauge has its own task, so it stays true while publishing waits.
        let _lag = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(lag_loop(
            outbox.clone(),
            self.metrics.clone(),
            self.settings.max_outbox,
        )));
        loop {
            if inflight.is_empty() && client.connection_state() != State::Connected {
                // Nothing is read while NATS is away: the outbox keeps it, and with
                // PostgreSQL another replica may publish meanwhile. At shutdown, a NATS that
                // stays away is waited for only briefly: the rest is published after the
                // next start.
                outbox.release();
                if self.draining.is_cancelled() {
                    let since = *away_at_shutdown.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= SHUTDOWN_RECONNECT_WAIT {
                        tracing::info!(
                            "NATS is away at shutdown; what is left stays in the outbox"
                        );
                        break;
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(IDLE_POLL) => {}
                    () = self.draining.cancelled() => {}
                }
                continue;
            }
            let mut batch = Vec::new();
            if inflight.len() <= max / 2 {
                let room = max - inflight.len();
                let read = blocking({
                    let o = outbox.clone();
                    move || o.read(sent, room)
                })
                .await;
                match read {
                    Ok(b) => batch = b,
                    Err(e) => {
                        self.metrics
                            .nats_errors
                            .with_label_values(&["outbox"])
                            .inc();
                        if let Some(suppressed) = OUTBOX_FAILED.event() {
                            tracing::error!(error = %e, suppressed, "cannot read the NATS outbox; retrying");
                        }
                        pause(&mut backoff).await;
                        continue;
                    }
                }
            }
            if batch.is_empty() && inflight.is_empty() {
                if self.draining.is_cancelled() {
                    break;
                }
                tokio::select! {
                    () = self.notify.notified() => {}
                    () = tokio::time::sleep(IDLE_POLL) => {}
                    () = self.draining.cancelled() => {}
                }
                continue;
            }
            let resolved = match (mode, batch.first()) {
                (Some((m, at)), _) if m == Resolved::JetStream || at.elapsed() < MODE_RECHECK => m,
                (_, Some(first)) => match self.resolve(&js, &first.device_id).await {
                    Some(m) => {
                        mode = Some((m, tokio::time::Instant::now()));
                        m
                    }
                    None => {
                        // Could not tell (NATS busy or away): try again, publishing nothing.
                        outbox.rewind();
                        pause(&mut backoff).await;
                        continue;
                    }
                },
                (Some((m, _)), None) => m,
                (None, None) => unreachable!("in-flight publications imply a resolved mode"),
            };
            let max_payload = client.server_info().max_payload;
            let before = acked;
            let failure = match resolved {
                Resolved::Core => match self.publish_core(&client, &batch, max_payload).await {
                    Ok(()) => {
                        acked = batch.last().map_or(acked, |i| i.next);
                        sent = acked;
                        self.metrics.nats_published.inc_by(batch.len() as u64);
                        None
                    }
                    Err(e) => Some(e),
                },
                Resolved::JetStream => {
                    let more = batch.len() == max - inflight.len();
                    let mut failure = None;
                    for item in &batch {
                        let (subject, headers, payload) = self.message(item);
                        if self.too_large(item, &payload, max_payload) {
                            inflight.push_back((item.next, None));
                            sent = item.next;
                            continue;
                        }
                        let msg = PublishMessage::build().headers(headers).payload(payload);
                        match js.send_publish(subject, msg).await {
                            Ok(ack) => {
                                inflight.push_back((item.next, Some(ack)));
                                sent = item.next;
                            }
                            Err(e) => {
                                self.metrics
                                    .nats_errors
                                    .with_label_values(&["publish"])
                                    .inc();
                                failure = Some(e.to_string());
                                break;
                            }
                        }
                    }
                    // With more to send, wait for half the window; else for all of it.
                    let keep = if more && failure.is_none() {
                        max / 2
                    } else {
                        0
                    };
                    let mut n = 0u64;
                    while inflight.len() > keep {
                        let (next, ack) = inflight.pop_front().expect("non-empty");
                        let Some(ack) = ack else {
                            acked = next; // skipped: too large ever to publish
                            continue;
                        };
                        match ack.await {
                            Ok(_) => {
                                acked = next;
                                n += 1;
                            }
                            Err(e) => {
                                self.metrics.nats_errors.with_label_values(&["ack"]).inc();
                                failure = Some(e.to_string());
                                break;
                            }
                        }
                    }
                    self.metrics.nats_published.inc_by(n);
                    failure
                }
            };
            if acked != before {
                let to = acked;
                let advanced = blocking({
                    let o = outbox.clone();
                    move || o.advance(to)
                })
                .await;
                if let Err(e) = advanced {
                    self.metrics
                        .nats_errors
                        .with_label_values(&["outbox"])
                        .inc();
                    if let Some(suppressed) = OUTBOX_FAILED.event() {
                        tracing::error!(error = %e, suppressed, "cannot record NATS progress; the readings will be sent again");
                    }
                }
            }
            match failure {
                None => {
                    backoff = BACKOFF.0;
                    if let Some(failures) = PUBLISH_FAILED.recovered() {
                        tracing::info!(failures, "NATS publication works again");
                    }
                }
                Some(e) => {
                    if let Some(suppressed) = PUBLISH_FAILED.event() {
                        tracing::warn!(error = %e, in_flight = inflight.len(), suppressed, "NATS publication failed; retrying from the first unacknowledged reading");
                    }
                    inflight.clear();
                    sent = acked;
                    outbox.rewind();
                    if client.connection_state() != State::Connected {
                        outbox.release();
                    }
                    if resolved == Resolved::JetStream && self.settings.mode == NatsMode::Auto {
                        mode = None; // the stream may be gone: look again
                    }
                    pause(&mut backoff).await;
                }
            }
        }
        if let Err(e) = blocking(move || outbox.persist()).await {
            tracing::error!(error = %e, "cannot record NATS progress at shutdown");
        }
    }

    /// `nats.mode`, resolved: in `auto`, JetStream if a stream captures this device's subject,
    /// core NATS if none does (or the server has no JetStream). `None` when the lookup could
    /// not tell (a timeout): the caller tries again later rather than guess.
    async fn resolve(&self, js: &async_nats::jetstream::Context, device: &str) -> Option<Resolved> {
        match self.settings.mode {
            NatsMode::Jetstream => Some(Resolved::JetStream),
            NatsMode::Core => Some(Resolved::Core),
            NatsMode::Auto => {
                let subject = format!("{}.{device}", self.settings.subject_prefix);
                match js.stream_by_subject(subject.clone()).await {
                    Ok(stream) => {
                        tracing::info!(%stream, "NATS: publishing to JetStream with PubAcks");
                        Some(Resolved::JetStream)
                    }
                    Err(e) => {
                        let text = format!("{e:?} {e}");
                        let no_stream = e.kind() == GetStreamByNameErrorKind::NotFound
                            || text.contains("no responders")
                            || text.contains("NoResponders");
                        if no_stream {
                            tracing::info!(subject, reason = %e, "NATS: no JetStream stream captures the subjects; publishing with core NATS (publish and flush)");
                            Some(Resolved::Core)
                        } else {
                            tracing::warn!(subject, error = %e, "NATS: cannot tell whether a JetStream stream captures the subjects; trying again");
                            None
                        }
                    }
                }
            }
        }
    }

    /// Whether `payload` (with its headers) is over the server's `max_payload`: such a reading
    /// can never be published. It is logged, counted (`kind="too_large"`) and skipped, so that
    /// it does not hold up every reading after it.
    fn too_large(&self, item: &OutboxItem, payload: &bytes::Bytes, max_payload: usize) -> bool {
        // Headers add well under 1 KiB: the message id, the replica id and their names.
        let size = payload.len() + item.device_id.len() + 256;
        if max_payload == 0 || size <= max_payload {
            return false;
        }
        self.metrics
            .nats_errors
            .with_label_values(&["too_large"])
            .inc();
        tracing::error!(
            device_id = %item.device_id,
            seq = ?item.row.seq,
            bytes = payload.len(),
            max_payload,
            "a reading is larger than the NATS server's max_payload and is not published"
        );
        true
    }

    /// The subject, headers and payload of a reading.
    fn message(&self, item: &OutboxItem) -> (String, HeaderMap, bytes::Bytes) {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", message_id(item));
        // The replica that committed it: with PostgreSQL one replica publishes for all.
        headers.insert(
            REPLICA_HEADER,
            item.origin.as_deref().unwrap_or(self.replica.as_str()),
        );
        let r = &item.row;
        let payload = render_parts(&item.device_id, r.ts_ms, r.seq, &r.metrics, &r.tags);
        (
            format!("{}.{}", self.settings.subject_prefix, item.device_id),
            headers,
            bytes::Bytes::from(payload.as_bytes().to_vec()),
        )
    }

    /// Publishes a batch with core NATS and flushes: all of it is acknowledged, or none.
    /// Bounded by [`FLUSH_TIMEOUT`] as a whole, since the client's buffer blocks while the
    /// server is away.
    async fn publish_core(
        &self,
        client: &Client,
        batch: &[OutboxItem],
        max_payload: usize,
    ) -> Result<(), String> {
        let send = async {
            for item in batch {
                let (subject, headers, payload) = self.message(item);
                if self.too_large(item, &payload, max_payload) {
                    continue;
                }
                if let Err(e) = client.publish_with_headers(subject, headers, payload).await {
                    self.metrics
                        .nats_errors
                        .with_label_values(&["publish"])
                        .inc();
                    return Err(e.to_string());
                }
            }
            client.flush().await.map_err(|e| {
                self.metrics.nats_errors.with_label_values(&["ack"]).inc();
                e.to_string()
            })
        };
        match tokio::time::timeout(FLUSH_TIMEOUT, send).await {
            Ok(result) => result,
            Err(_) => {
                self.metrics.nats_errors.with_label_values(&["ack"]).inc();
                Err("publish and flush timed out".into())
            }
        }
    }
}

/// Refreshes the backlog gauge every [`LAG_EVERY`] and warns when it crosses
/// `nats.max_outbox` (and says when it is back under).
async fn lag_loop(outbox: Arc<dyn Outbox>, metrics: Arc<Metrics>, max_outbox: u64) {
    let mut over = false;
    loop {
        let lag = blocking({
            let o = outbox.clone();
            move || o.lag()
        })
        .await;
        if let Ok(lag) = lag {
            metrics.nats_outbox_lag.set(lag.min(i64::MAX as u64) as i64);
            if (lag > max_outbox) != over {
                over = lag > max_outbox;
                if over {
                    tracing::warn!(lag, max_outbox, "NATS outbox backlog is past nats.max_outbox; readings are kept and published when NATS catches up");
                } else {
                    tracing::info!(lag, "NATS outbox backlog is back under nats.max_outbox");
                }
            }
        }
        tokio::time::sleep(LAG_EVERY).await;
    }
}

/// Other replicas' readings, from `<prefix>.>`, to this replica's `/v1/live` subscribers.
async fn live_loop(
    client: Client,
    prefix: String,
    replica: String,
    live: Arc<Live>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut sub = match client.subscribe(format!("{prefix}.>")).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to NATS for the fleet live stream");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => break,
            m = sub.next() => match m {
                Some(m) => m,
                None => break,
            },
        };
        let own = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(REPLICA_HEADER))
            .is_some_and(|v| v.as_str() == replica);
        if own || live.is_empty() {
            continue;
        }
        let Ok(text) = std::str::from_utf8(&msg.payload) else {
            continue;
        };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
            continue;
        };
        let Some(device) = value.get("device_id").and_then(|d| d.as_str()) else {
            continue;
        };
        let names = value
            .get("metrics")
            .and_then(|m| m.as_object())
            .map(|m| m.keys().map(String::as_str).collect::<Vec<_>>())
            .unwrap_or_default();
        metrics.nats_live_received.inc();
        live.deliver_remote(device, names.iter().copied(), Arc::from(text));
    }
    let _ = sub.unsubscribe().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredRow;

    fn item(seq: Option<u64>, rid: u64) -> OutboxItem {
        OutboxItem {
            device_id: "barn-1".into(),
            row: StoredRow {
                rid,
                ts_ms: 0,
                seq,
                metrics: vec![],
                tags: vec![],
            },
            next: rid + 1,
            unsequenced_id: format!("s1-{rid}"),
            origin: None,
        }
    }

    #[test]
    fn message_ids_tell_seq_from_store_ids() {
        assert_eq!(message_id(&item(Some(7), 99)), "barn-1:7");
        assert_eq!(message_id(&item(None, 7)), "barn-1:rs1-7");
        assert_ne!(message_id(&item(Some(7), 1)), message_id(&item(None, 7)));
    }

    #[test]
    fn replicas_get_different_ids() {
        assert_ne!(replica_id(), replica_id());
    }
}
