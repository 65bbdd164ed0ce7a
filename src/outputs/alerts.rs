//! The rule engine's task: committed-readings feed (after the commit) → **evaluate
//! (`services::rules`) → persist the state → announce** → `/v1/live?type=alert`, and the
//! webhook and MQTT actions through their outboxes.
//!
//! - It takes batches from the feed and, every `alerts.evaluation_interval`, runs the timer
//!   (absence rules, and pending rules whose `for` has passed). Evaluation runs on a blocking
//!   thread under the [`AlertBoard`]'s lock; the task never waits on a receiver: actions are
//!   `offer`ed to bounded outboxes (`drop_newest`), live subscribers are `try_send`.
//! - State changes that announce an event (firing, resolved) are written to the store
//!   ([`ReaderSlot::apply_alert_changes`]) *before* the event is announced, so a crash can
//!   lose an announcement but never repeat one after the restart. An event is announced only
//!   if its change applied (with PostgreSQL, another replica may have made it first). Changes
//!   that announce nothing (a rule going pending, or back from pending) are kept per (rule,
//!   device), the latest winning, and written at each timer tick and at shutdown: a value
//!   that flaps around a threshold costs one write per interval, not one per reading, and a
//!   crash forgets at most the last interval's pending changes. If the store cannot save,
//!   the events are announced anyway, the failure is counted
//!   (`sluice_alert_state_errors_total`) and the changes are tried again at the next step.
//! - At the first step after the store opens, it restores the persisted states and the
//!   devices the store knew (for absence rules).
//! - With a store shared by replicas (PostgreSQL), a device about to be declared silent is
//!   first looked up in the shared device table, since its readings may go to another replica.
//! - Shutdown: after the pipeline has drained, [`AlertsOutput::finish`] evaluates what is
//!   left in the feed, then gives the actions the rest of the budget.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::mqtt::{self as mqtt_action, MqttAlerts, MqttEvent};
use super::outbox::{outbox, OutboxSender};
use super::webhook::WebhookOutput;
use crate::config::Settings;
use crate::pipeline::FeedReceiver;
use crate::reading::now_ms;
use crate::services::rules::{AlertBoard, Committed, RulesFeed, Step};
use crate::services::Live;
use crate::store::{AlertChange, DevicesQuery, ReaderSlot};
use crate::telemetry::log_limit::LogLimit;
use crate::telemetry::metrics::Metrics;

/// Most silent devices looked up in the shared device table per timer tick.
const SHARED_LOOKUPS: usize = 256;
/// Most queued batches evaluated together, with one save of their changes: when the engine
/// is behind, it catches up in bigger steps instead of one store transaction per commit.
const BATCHES_PER_STEP: usize = 64;

/// Saving or loading alert states failed; repeats while the store is down.
static STATE_FAILED: LogLimit = LogLimit::new();

/// The running rule engine and its actions.
pub struct AlertsOutput {
    /// Tells the engine to evaluate what is left in the feed and stop.
    stop: CancellationToken,
    /// The engine task.
    engine: JoinHandle<()>,
    /// The webhook action, with `alerts.webhook_url`.
    webhook: Option<WebhookOutput>,
    /// The MQTT action, with `mqtt.enabled` and `alerts.mqtt_topic`.
    mqtt: Option<MqttAlerts>,
    /// The most the actions may take at shutdown (`alerts.webhook_timeout`): a receiver that
    /// is down must not hold the exit for the whole shutdown budget.
    action_budget: Duration,
}

/// Where an event goes.
struct Sinks {
    /// `/v1/live?type=alert`.
    live: Arc<Live>,
    /// The webhook's outbox.
    webhook: Option<OutboxSender<Arc<str>>>,
    /// The MQTT action's outbox, and the topic prefix.
    mqtt: Option<(OutboxSender<MqttEvent>, String)>,
}

/// What the engine task holds.
struct Engine {
    /// The evaluator, shared with the API.
    board: Arc<AlertBoard>,
    /// Devices restored at each store open.
    feed: Arc<RulesFeed>,
    /// The store's alert states, and the shared device table.
    reader: Arc<ReaderSlot>,
    /// Whether the device table is shared by replicas (PostgreSQL).
    shared: bool,
    /// The actions.
    sinks: Sinks,
    /// `sluice_alerts`, `sluice_alert_state_errors_total`.
    metrics: Arc<Metrics>,
    /// Persisted states have been read.
    loaded: bool,
    /// Changes the store has not taken yet (a failed save), tried again first.
    unsaved: Vec<AlertChange>,
}

impl AlertsOutput {
    /// Starts the engine over `rx` (the committed feed `feed` fills) and the configured
    /// actions.
    pub fn start(
        settings: &Arc<Settings>,
        board: Arc<AlertBoard>,
        feed: Arc<RulesFeed>,
        rx: FeedReceiver<Committed>,
        reader: Arc<ReaderSlot>,
        live: Arc<Live>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let a = &settings.alerts;
        let (webhook_tx, webhook) = if a.webhook_url.is_empty() {
            (None, None)
        } else {
            let (tx, rx) = outbox("webhook", a.queue_capacity, &metrics);
            (Some(tx), Some(WebhookOutput::start(a, rx, &metrics)?))
        };
        let (mqtt_tx, mqtt) = if settings.mqtt.enabled && !a.mqtt_topic.is_empty() {
            let (tx, rx) = outbox("mqtt", a.queue_capacity, &metrics);
            (
                Some((tx, a.mqtt_topic.clone())),
                Some(MqttAlerts::start(settings, rx, &metrics)?),
            )
        } else {
            (None, None)
        };
        for (rule, _, _) in board.with(|e| e.counts()) {
            for state in ["pending", "firing"] {
                metrics.alerts.with_label_values(&[&rule, state]).set(0);
            }
        }
        let stop = CancellationToken::new();
        let engine = Engine {
            board,
            feed,
            reader,
            shared: settings.storage.backend == crate::config::Backend::Postgres,
            sinks: Sinks {
                live,
                webhook: webhook_tx,
                mqtt: mqtt_tx,
            },
            metrics,
            loaded: false,
            unsaved: Vec::new(),
        };
        let task = engine.run(rx, settings.alerts.evaluation_interval, stop.clone());
        Ok(Self {
            stop,
            engine: tokio::spawn(task),
            webhook,
            mqtt,
            action_budget: settings.alerts.webhook_timeout,
        })
    }

    /// After the pipeline has drained: evaluates what is left in the feed, then delivers the
    /// queued events within what is left of `budget`, at most `alerts.webhook_timeout`; what
    /// is not delivered by then is counted as dropped.
    pub async fn finish(self, budget: Duration) {
        let deadline = tokio::time::Instant::now() + budget;
        self.stop.cancel();
        if tokio::time::timeout_at(deadline, self.engine)
            .await
            .is_err()
        {
            tracing::warn!("rule engine did not finish within the shutdown budget");
        }
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(self.action_budget);
        let webhook = async {
            if let Some(w) = self.webhook {
                w.finish(left).await;
            }
        };
        let mqtt = async {
            if let Some(m) = self.mqtt {
                m.finish(left).await;
            }
        };
        tokio::join!(webhook, mqtt);
    }
}

impl Engine {
    async fn run(
        mut self,
        mut rx: FeedReceiver<Committed>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let mut timer = tokio::time::interval(interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                batch = rx.recv() => match batch {
                    Some(batch) => {
                        let mut batches = vec![batch];
                        while batches.len() < BATCHES_PER_STEP {
                            let Some(more) = rx.try_recv() else { break };
                            batches.push(more);
                        }
                        self.step(batches, false).await;
                    }
                    None => break,
                },
                _ = timer.tick() => self.step(Vec::new(), true).await,
                () = stop.cancelled() => {
                    let mut batches = Vec::new();
                    while let Some(batch) = rx.try_recv() {
                        batches.push(batch);
                    }
                    self.step(batches, true).await;
                    break;
                }
            }
        }
        // The senders go with the engine: the actions end once their queues are empty.
        tracing::debug!("rule engine stopped");
    }

    /// One evaluation: of committed batches, in commit order, or of the timer (none). With
    /// `flush`, the quiet changes are written too.
    async fn step(&mut self, batches: Vec<Committed>, flush: bool) {
        self.restore().await;
        let timer = batches.is_empty();
        if !self.loaded && timer {
            // Nothing is known before the store opens; the timer has nothing to do.
            return;
        }
        let mut seen = Vec::new();
        if timer && self.shared {
            seen = self.shared_last_seen().await;
        }
        let board = self.board.clone();
        let evaluated = tokio::task::spawn_blocking(move || {
            board.with(|ev| {
                let mut out = Vec::new();
                if timer {
                    for (device, last_seen) in &seen {
                        ev.seen(device, *last_seen);
                    }
                    ev.tick(now_ms(), &mut out);
                }
                for b in &batches {
                    ev.observe(b, &mut out);
                }
                // The gauges follow the timer: a scrape needs no fresher figure, and one
                // update per batch cost a label lookup per rule.
                let counts = timer.then(|| ev.counts());
                // Changes without an event (pending, and back) are saved with the timer,
                // one per (rule, device), from the state then.
                let quiet = if flush { ev.take_quiet() } else { Vec::new() };
                (out, counts, quiet)
            })
        })
        .await;
        let Ok((loud, counts, extra)) = evaluated else {
            tracing::error!("rule evaluation panicked; batch skipped");
            return;
        };
        if let Some(counts) = counts {
            for (rule, pending, firing) in counts {
                self.metrics
                    .alerts
                    .with_label_values(&[&rule, "pending"])
                    .set(pending);
                self.metrics
                    .alerts
                    .with_label_values(&[&rule, "firing"])
                    .set(firing);
            }
        }
        if loud.is_empty() && extra.is_empty() && self.unsaved.is_empty() {
            return;
        }
        let applied = self.save(extra, &loud).await;
        for (step, applied) in loud.into_iter().zip(applied) {
            if let (Some(event), true) = (step.event, applied) {
                self.announce(event);
            }
        }
    }

    /// Takes the devices of a store open (each time it opens) and, once, the persisted
    /// states; clears states of rules no longer configured.
    async fn restore(&mut self) {
        let devices = self.feed.take_restored();
        if self.loaded {
            if let Some(devices) = devices {
                self.board.with(|ev| ev.restore(&devices, Vec::new()));
            }
            return;
        }
        let reader = self.reader.clone();
        let rows = tokio::task::spawn_blocking(move || reader.alert_states()).await;
        let rows = match rows {
            Ok(Ok(rows)) => rows,
            Ok(Err(crate::store::StoreError::NotOpen)) => {
                if let Some(devices) = devices {
                    // Keep them for the load that follows.
                    self.board.with(|ev| ev.restore(&devices, Vec::new()));
                }
                return;
            }
            Ok(Err(e)) => {
                self.state_failed("load", &e.to_string());
                if let Some(devices) = devices {
                    self.board.with(|ev| ev.restore(&devices, Vec::new()));
                }
                return;
            }
            Err(e) => {
                self.state_failed("load", &e.to_string());
                return;
            }
        };
        let n = rows.len();
        let devices = devices.unwrap_or_default();
        let stale = self.board.with(|ev| ev.restore(&devices, rows));
        tracing::info!(states = n, stale = stale.len(), "alert states restored");
        self.unsaved.extend(stale);
        self.loaded = true;
        let counts = self.board.with(|ev| ev.counts());
        for (rule, pending, firing) in counts {
            self.metrics
                .alerts
                .with_label_values(&[&rule, "pending"])
                .set(pending);
            self.metrics
                .alerts
                .with_label_values(&[&rule, "firing"])
                .set(firing);
        }
    }

    /// The shared `last_seen` of devices about to be declared silent (PostgreSQL).
    async fn shared_last_seen(&self) -> Vec<(String, i64)> {
        let now = now_ms();
        let mut candidates = self.board.with(|ev| ev.absence_candidates(now));
        candidates.truncate(SHARED_LOOKUPS);
        if candidates.is_empty() {
            return Vec::new();
        }
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            candidates
                .into_iter()
                .filter_map(|id| {
                    let q = DevicesQuery {
                        device: Some(id.clone()),
                        limit: 1,
                        ..DevicesQuery::default()
                    };
                    let found = reader.devices(&q)?.ok()?;
                    Some((id, found.first()?.last_seen_ms))
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// Persists `extra` and the changes of `steps` (after any left unsaved) in one
    /// transaction; per step, whether its change applied. When the store fails, every step
    /// counts as applied (announced) and the changes are kept for the next save.
    async fn save(&mut self, extra: Vec<AlertChange>, steps: &[Step]) -> Vec<bool> {
        // Older failures first, then the step's changes with events, then the quiet ones: a
        // quiet change is the state after the step, so it goes after an event's (a resolve
        // followed by pending again must delete the firing row, then write the pending one).
        let mut changes = std::mem::take(&mut self.unsaved);
        let earlier = changes.len();
        changes.extend(steps.iter().map(|s| s.change.clone()));
        changes.extend(extra);
        let reader = self.reader.clone();
        let attempt = changes.clone();
        let result =
            tokio::task::spawn_blocking(move || reader.apply_alert_changes(&attempt)).await;
        match result {
            Ok(Ok(applied)) => {
                if let Some(failures) = STATE_FAILED.recovered() {
                    tracing::info!(failures, "alert states saved again");
                }
                applied
                    .into_iter()
                    .skip(earlier)
                    .take(steps.len())
                    .collect()
            }
            Ok(Err(e)) => {
                self.state_failed("save", &e.to_string());
                self.unsaved = changes;
                vec![true; steps.len()]
            }
            Err(e) => {
                self.state_failed("save", &e.to_string());
                self.unsaved = changes;
                vec![true; steps.len()]
            }
        }
    }

    /// Counts and logs (limited) a failed load or save.
    fn state_failed(&self, what: &str, error: &str) {
        self.metrics.alert_state_errors.inc();
        if let Some(suppressed) = STATE_FAILED.event() {
            tracing::warn!(error, suppressed, "cannot {what} alert states; retrying");
        }
    }

    /// Counts and logs an event, and hands it to every sink; never waits.
    fn announce(&self, event: crate::services::rules::AlertEvent) {
        let state = match event.state {
            crate::services::rules::Transition::Firing => "firing",
            crate::services::rules::Transition::Resolved => "resolved",
        };
        self.metrics.alert_events.with_label_values(&[state]).inc();
        tracing::info!(
            rule = %event.rule,
            device_id = %event.device_id,
            state,
            "alert"
        );
        if self.sinks.webhook.is_none() && self.sinks.mqtt.is_none() && self.sinks.live.is_empty() {
            // Nobody to tell: the state is in the store and in GET /v1/alerts.
            return;
        }
        let json: Arc<str> = event.to_json().into();
        self.sinks
            .live
            .deliver_alert(&event.device_id, event.metric.as_deref(), json.clone());
        if let Some(tx) = &self.sinks.webhook {
            tx.offer(json.clone());
        }
        if let Some((tx, prefix)) = &self.sinks.mqtt {
            tx.offer((
                mqtt_action::topic(prefix, &event.rule, &event.device_id),
                json,
            ));
        }
    }
}
