//! Prometheus metrics (SPEC §7): one registry per running app, so tests that start several
//! apps in one process do not mix their counts.
//!
//! Every stage of the flow reports here: handlers count what they receive and reject, the
//! pipeline reports queue depth, the store writer reports commits, and acks report latency.
//! No label ever carries a device id: cardinality stays fixed whatever the fleet size.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::runtime::{TaskCollector, TaskMonitors};
use crate::reading::RejectReason;

/// The ways readings arrive. The `transport` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// `POST /v1/readings`.
    Http,
    /// `GET /v1/ws`.
    Ws,
    /// The MQTT source.
    Mqtt,
}

impl Transport {
    /// Every transport, for pre-registering series.
    pub const ALL: [Transport; 3] = [Transport::Http, Transport::Ws, Transport::Mqtt];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Ws => "ws",
            Transport::Mqtt => "mqtt",
        }
    }
}

/// Every metric Sluice exports, registered in [`Metrics::registry`].
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Readings that reached a handler, valid or not.
    pub readings_received: IntCounterVec,
    /// Readings committed for the first time.
    pub readings_accepted: IntCounterVec,
    /// Readings whose `(device_id, seq)` was already stored.
    pub readings_duplicate: IntCounterVec,
    /// Readings refused for what they are, by reason.
    pub readings_rejected: IntCounterVec,
    /// Readings refused for load (pipeline full, store unavailable, shutting down).
    pub readings_shed: IntCounterVec,
    /// Readings (or batches) waiting in each stage.
    pub queue_depth: IntGaugeVec,
    /// Capacity of each stage, in the same unit as its depth.
    pub queue_capacity: IntGaugeVec,
    /// Readings per committed batch.
    pub batch_size: Histogram,
    /// Time one batch commit takes.
    pub store_commit_seconds: HistogramVec,
    /// Failed commits or store opens.
    pub store_errors: IntCounterVec,
    /// Group commits the database aborted and asked to retry (PostgreSQL: deadlock or
    /// serialization failure), each retried in place.
    pub store_commit_retries: IntCounterVec,
    /// Receive → ack, per request / frame / message.
    pub ack_latency: HistogramVec,
    /// HTTP requests by matched route and status.
    pub http_requests: IntCounterVec,
    /// HTTP request duration by matched route and status.
    pub http_duration: HistogramVec,
    /// Readings deleted by the retention sweep.
    pub retention_deleted: IntCounter,
    /// 1 while the store accepts writes.
    pub store_up: IntGauge,
    /// Readings committed to the journal and not yet compacted into chunks (bounded by
    /// `storage.journal_max_readings`).
    pub store_journal_readings: IntGauge,
    /// `storage.journal_max_readings`: the journal's bound, so dashboards can show its fill.
    pub store_journal_capacity: IntGauge,
    /// Time one compaction of a journal generation takes, from seal to chunks committed.
    pub store_compaction_seconds: Histogram,
    /// Readings moved from the journal into chunks.
    pub store_compacted_readings: IntCounter,
    /// Group commits refused because compaction is behind (the journal is full).
    pub store_journal_full: IntCounter,
    /// Open WebSocket connections by kind (`device`, `live`).
    pub ws_connections: IntGaugeVec,
    /// Open HTTP connections, at most `server.max_connections`. A connection upgraded to a
    /// WebSocket leaves this count (it is in `ws_connections` from then on).
    pub http_connections: IntGauge,
    /// 1 while the MQTT source is connected and subscribed. Set by the MQTT source.
    pub mqtt_connected: IntGauge,
    /// MQTT connections re-established after a loss. Counted by the MQTT source.
    pub mqtt_reconnects: IntCounter,
    /// 1 when `mqtt.enabled`: lets an alert on `sluice_mqtt_connected == 0` stay quiet on
    /// instances that do not use MQTT.
    pub mqtt_enabled: IntGauge,
    /// MQTT messages taken and not yet PUBACKed (bounded by `mqtt.max_unacked`).
    pub mqtt_unacked: IntGauge,
    /// MQTT payloads republished to the dead-letter topic.
    pub mqtt_dead_letters: IntCounter,
    /// MQTT messages not taken because `mqtt.max_unacked` were held already; left unacked for
    /// the broker to redeliver.
    pub mqtt_not_taken: IntCounter,
    /// 1 when `nats.enabled`.
    pub nats_enabled: IntGauge,
    /// 1 while the NATS publisher is connected.
    pub nats_connected: IntGauge,
    /// Readings NATS acknowledged (a JetStream PubAck, or a core flush), re-sends included.
    pub nats_published: IntCounter,
    /// Readings committed and not yet acknowledged by NATS (the outbox backlog).
    pub nats_outbox_lag: IntGauge,
    /// `nats.max_outbox`, for the backlog alert.
    pub nats_outbox_limit: IntGauge,
    /// Failures on the way to NATS, by `kind`: `publish`, `ack`, `outbox`.
    pub nats_errors: IntCounterVec,
    /// Readings other replicas committed, received over NATS for `/v1/live`.
    pub nats_live_received: IntCounter,
    /// Line-protocol string fields ignored (beside numeric fields of the same line).
    pub line_protocol_ignored_fields: IntCounter,
    /// Pending and firing (rule, device)s, by `rule` and `state` (SPEC §7).
    pub alerts: IntGaugeVec,
    /// Alert events announced, by `state` (`firing`, `resolved`).
    pub alert_events: IntCounterVec,
    /// Alert events by `action` (webhook, mqtt) and `result`: `sent`, `failed` (an attempt
    /// that did not deliver; retried), `dropped` (never delivered: queue full, refused by the
    /// receiver, or left at shutdown).
    pub alert_notifications: IntCounterVec,
    /// Alert events waiting for each `action`, against `alert_queue_capacity`.
    pub alert_queue_depth: IntGaugeVec,
    /// `alerts.queue_capacity`, per `action`.
    pub alert_queue_capacity: IntGaugeVec,
    /// Committed readings the rule engine skipped because its feed was full.
    pub rules_skipped: IntCounter,
    /// Alert states that could not be loaded or saved in the store (retried).
    pub alert_state_errors: IntCounter,
    /// Rollup rows (one device's bucket of one level) written by compaction (SPEC §12).
    pub rollup_rows_written: IntCounter,
    /// Rollup rows deleted because their bucket ended before `rollups.retention`.
    pub rollup_retention_deleted: IntCounter,
    /// Aggregation queries by `source`: `level` (served from a rollup level) or `raw`.
    pub rollup_queries: IntCounterVec,
    /// Checks of `server.tls.*` that found new files, by `result`: `ok` (the new certificate is
    /// served to new connections) or `error` (refused; the previous one stays).
    pub tls_cert_reloads: IntCounterVec,
    /// TLS handshakes on the HTTP listener that did not complete, by `reason`: `timeout`
    /// (`server.request_timeout`) or `error` (e.g. plain HTTP, or a client that distrusts us).
    pub tls_handshake_failures: IntCounterVec,
    /// Requests (and WebSocket upgrades) refused or limited by access checks, by `transport`
    /// (http, ws) and `reason` (missing, invalid, revoked, forbidden); SPEC §7, §11.
    pub auth_failures: IntCounterVec,
    /// Readings rejected (HTTP, WebSocket) or held back (MQTT) by their device's rate limit.
    pub readings_rate_limited: IntCounterVec,
    /// Devices the rate limiter holds in memory now (those that sent within one refill).
    pub rate_limit_devices: IntGauge,
    /// Per-family task monitors; wrap a task's future with `tasks.<family>.instrument(..)`.
    pub tasks: TaskMonitors,
}

impl Metrics {
    /// Creates the series of the store backend in use (`sqlite` or `postgres`, the `store`
    /// label) at zero, so that dashboards and `increase()` alerts see the first error or
    /// retry, and a PostgreSQL deployment shows no `sqlite` series.
    pub fn for_store(&self, backend: &str) {
        self.store_errors.with_label_values(&[backend]);
        self.store_commit_retries.with_label_values(&[backend]);
        self.store_commit_seconds.with_label_values(&[backend]);
    }

    /// Creates and registers every metric, with task families measured by default.
    pub fn new() -> Self {
        Self::with_tasks(TaskMonitors::default())
    }

    /// Creates and registers every metric, with the label values known up front so that
    /// dashboards see zeros rather than missing series. The task families' counters are
    /// exported when `tasks` is enabled.
    pub fn with_tasks(tasks: TaskMonitors) -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let latency_buckets = exponential_buckets(0.0005, 2.0, 15).expect("valid buckets");

        let m = Metrics {
            readings_received: counter(
                "sluice_readings_received_total",
                "Readings that reached a handler, valid or not.",
                &["transport"],
            ),
            readings_accepted: counter(
                "sluice_readings_accepted_total",
                "Readings committed to the store.",
                &["transport"],
            ),
            readings_duplicate: counter(
                "sluice_readings_duplicate_total",
                "Readings whose (device_id, seq) was already stored; acknowledged, not stored twice.",
                &["transport"],
            ),
            readings_rejected: counter(
                "sluice_readings_rejected_total",
                "Readings refused for what they are, by reason.",
                &["transport", "reason"],
            ),
            readings_shed: counter(
                "sluice_readings_shed_total",
                "Readings refused for load: pipeline full, store unavailable or shutting down.",
                &["transport"],
            ),
            queue_depth: gauge(
                "sluice_pipeline_queue_depth",
                "Items waiting in a pipeline stage (admission: readings; store: batches).",
                &["stage"],
            ),
            queue_capacity: gauge(
                "sluice_pipeline_queue_capacity",
                "Capacity of a pipeline stage, in the unit of its depth.",
                &["stage"],
            ),
            batch_size: {
                let h = Histogram::with_opts(
                    HistogramOpts::new("sluice_batch_size", "Readings per committed batch.")
                        .buckets(exponential_buckets(1.0, 2.0, 16).expect("valid buckets")),
                )
                .expect("valid metric");
                registry.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            store_commit_seconds: histogram(
                "sluice_store_commit_seconds",
                "Time to commit one batch, including the fsync.",
                &["store"],
                latency_buckets.clone(),
            ),
            store_errors: counter(
                "sluice_store_errors_total",
                "Store opens or commits that failed.",
                &["store"],
            ),
            store_commit_retries: counter(
                "sluice_store_commit_retries_total",
                "Group commits the database aborted and asked to retry (deadlock, serialization failure).",
                &["store"],
            ),
            ack_latency: histogram(
                "sluice_ack_latency_seconds",
                "Receive to acknowledgement, per request, frame or message.",
                &["transport"],
                latency_buckets.clone(),
            ),
            http_requests: counter(
                "sluice_http_requests_total",
                "HTTP requests by route and status.",
                &["route", "status"],
            ),
            http_duration: histogram(
                "sluice_http_request_duration_seconds",
                "HTTP request duration by route and status.",
                &["route", "status"],
                latency_buckets,
            ),
            retention_deleted: {
                let c = IntCounter::new(
                    "sluice_retention_deleted_total",
                    "Readings deleted because they are older than storage.retention.",
                )
                .expect("valid metric");
                registry.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            store_up: {
                let g = IntGauge::new("sluice_store_up", "1 while the store accepts writes.")
                    .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            store_journal_readings: {
                let g = IntGauge::new(
                    "sluice_store_journal_readings",
                    "Readings committed to the journal and not yet compacted into chunks.",
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            store_journal_capacity: {
                let g = IntGauge::new(
                    "sluice_store_journal_capacity_readings",
                    "storage.journal_max_readings: past it, commits are refused until compaction catches up.",
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            store_compaction_seconds: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "sluice_store_compaction_seconds",
                        "Time to compact a batch of journal generations (one, or those that queued up, up to 4) into chunks.",
                    )
                    .buckets(exponential_buckets(0.005, 2.0, 14).expect("valid buckets")),
                )
                .expect("valid metric");
                registry.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            store_compacted_readings: {
                let c = IntCounter::new(
                    "sluice_store_compacted_readings_total",
                    "Readings moved from the journal into compressed chunks.",
                )
                .expect("valid metric");
                registry.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            store_journal_full: {
                let c = IntCounter::new(
                    "sluice_store_journal_full_total",
                    "Group commits refused because the journal held storage.journal_max_readings (compaction behind).",
                )
                .expect("valid metric");
                registry.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            ws_connections: gauge(
                "sluice_ws_connections",
                "Open WebSocket connections, by kind (device ingest or live stream).",
                &["kind"],
            ),
            http_connections: {
                let g = IntGauge::new(
                    "sluice_http_connections",
                    "Open HTTP connections (at most server.max_connections); upgraded WebSockets are in sluice_ws_connections.",
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            mqtt_connected: {
                let g = IntGauge::new(
                    "sluice_mqtt_connected",
                    "1 while the MQTT source is connected to the broker and subscribed.",
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            mqtt_reconnects: {
                let c = IntCounter::new(
                    "sluice_mqtt_reconnects_total",
                    "MQTT connections re-established after a loss.",
                )
                .expect("valid metric");
                registry.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            nats_enabled: simple_gauge(&registry, "sluice_nats_enabled", "1 when NATS publication is configured (nats.enabled)."),
            nats_connected: simple_gauge(&registry, "sluice_nats_connected", "1 while the NATS publisher is connected to a server."),
            nats_published: simple_counter(&registry, "sluice_nats_published_total", "Readings NATS acknowledged (JetStream PubAck, or core publish and flush), re-sends included."),
            nats_outbox_lag: simple_gauge(&registry, "sluice_nats_outbox_lag", "Readings committed and not yet acknowledged by NATS (the outbox backlog)."),
            nats_outbox_limit: simple_gauge(&registry, "sluice_nats_outbox_limit", "nats.max_outbox: a backlog past it is alerted on (nothing is dropped)."),
            nats_errors: {
                let c = counter(
                    "sluice_nats_errors_total",
                    "Failures on the way to NATS, by kind: publish (sending), ack (no PubAck or flush), outbox (reading the store), too_large (a reading over the server's max_payload, skipped).",
                    &["kind"],
                );
                for kind in ["publish", "ack", "outbox", "too_large"] {
                    c.with_label_values(&[kind]);
                }
                c
            },
            line_protocol_ignored_fields: simple_counter(&registry, "sluice_line_protocol_ignored_fields_total", "Line-protocol string fields ignored: Sluice stores numbers and booleans (SPEC §10)."),
            nats_live_received: simple_counter(&registry, "sluice_nats_live_received_total", "Readings other replicas committed, received over NATS for /v1/live."),
            mqtt_enabled: {
                let g = IntGauge::new(
                    "sluice_mqtt_enabled",
                    "1 when the MQTT source is configured (mqtt.enabled).",
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            mqtt_unacked: {
                let g = IntGauge::new(
                    "sluice_mqtt_unacked_messages",
                    "MQTT messages taken and not yet PUBACKed (at most mqtt.max_unacked).",
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            mqtt_dead_letters: {
                let c = IntCounter::new(
                    "sluice_mqtt_dead_letters_total",
                    "MQTT payloads republished with their error to the dead-letter topic.",
                )
                .expect("valid metric");
                registry.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            mqtt_not_taken: {
                let c = IntCounter::new(
                    "sluice_mqtt_not_taken_total",
                    "MQTT messages left unacknowledged for redelivery because mqtt.max_unacked were held.",
                )
                .expect("valid metric");
                registry.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            alerts: gauge(
                "sluice_alerts",
                "Pending and firing alerts, by rule and state (pending, firing).",
                &["rule", "state"],
            ),
            alert_events: counter(
                "sluice_alert_events_total",
                "Alert events announced, by state (firing, resolved).",
                &["state"],
            ),
            alert_notifications: counter(
                "sluice_alert_notifications_total",
                "Alert events by action (webhook, mqtt) and result: sent, failed (an attempt that did not deliver; retried), dropped (never delivered).",
                &["action", "result"],
            ),
            alert_queue_depth: gauge(
                "sluice_alert_queue_depth",
                "Alert events waiting for an action (webhook, mqtt).",
                &["action"],
            ),
            alert_queue_capacity: gauge(
                "sluice_alert_queue_capacity",
                "alerts.queue_capacity: past it, new alert events for that action are dropped.",
                &["action"],
            ),
            rules_skipped: simple_counter(&registry, "sluice_rules_skipped_readings_total", "Committed readings the rule engine never evaluated because its feed was full (drop_newest)."),
            alert_state_errors: simple_counter(&registry, "sluice_alert_state_errors_total", "Alert states that could not be loaded or saved in the store (retried)."),
            rollup_rows_written: simple_counter(&registry, "sluice_rollup_rows_written_total", "Rollup rows (one device's bucket of one level, every metric) written by compaction."),
            rollup_retention_deleted: simple_counter(&registry, "sluice_rollup_retention_deleted_total", "Rollup rows deleted because their bucket ended before rollups.retention."),
            rollup_queries: counter(
                "sluice_rollup_queries_total",
                "Aggregation queries (agg=&step=) by source: level (a rollup level) or raw (raw readings).",
                &["source"],
            ),
            tls_cert_reloads: counter(
                "sluice_tls_cert_reloads_total",
                "Changed server.tls.cert_file/key_file found, by result: ok (served to new connections) or error (refused; the previous certificate stays).",
                &["result"],
            ),
            tls_handshake_failures: counter(
                "sluice_tls_handshake_failures_total",
                "TLS handshakes on the HTTP listener that did not complete, by reason: timeout or error.",
                &["reason"],
            ),
            auth_failures: counter(
                "sluice_auth_failures_total",
                "Requests refused by access checks, by transport (http, ws) and reason: missing, invalid, revoked (401) or forbidden (403, or readings of devices the token may not write).",
                &["transport", "reason"],
            ),
            readings_rate_limited: counter(
                "sluice_readings_rate_limited_total",
                "Readings over their device's rate_limit.per_device: rejected (HTTP, WebSocket) or held until allowed (MQTT, PUBACK withheld).",
                &["transport"],
            ),
            rate_limit_devices: simple_gauge(&registry, "sluice_rate_limit_devices", "Devices the per-device rate limiter holds in memory (those that sent within one refill of their allowance)."),
            registry,
            tasks,
        };
        if m.tasks.enabled() {
            m.registry
                .register(Box::new(
                    TaskCollector::new(&m.tasks).expect("valid metric"),
                ))
                .expect("unique metric");
        }
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        for t in Transport::ALL {
            let t = t.as_str();
            m.readings_received.with_label_values(&[t]);
            m.readings_accepted.with_label_values(&[t]);
            m.readings_duplicate.with_label_values(&[t]);
            m.readings_shed.with_label_values(&[t]);
            m.readings_rate_limited.with_label_values(&[t]);
            for r in RejectReason::ALL {
                m.readings_rejected.with_label_values(&[t, r.as_str()]);
            }
        }
        for t in ["http", "ws"] {
            for reason in ["missing", "invalid", "revoked", "forbidden"] {
                m.auth_failures.with_label_values(&[t, reason]);
            }
        }
        m.ws_connections.with_label_values(&["device"]);
        m.ws_connections.with_label_values(&["live"]);
        for source in ["level", "raw"] {
            m.rollup_queries.with_label_values(&[source]);
        }
        for result in ["ok", "error"] {
            m.tls_cert_reloads.with_label_values(&[result]);
        }
        for reason in ["timeout", "error"] {
            m.tls_handshake_failures.with_label_values(&[reason]);
        }
        m.alert_events.with_label_values(&["firing"]);
        m.alert_events.with_label_values(&["resolved"]);
        for action in ["webhook", "mqtt"] {
            for result in ["sent", "failed", "dropped"] {
                m.alert_notifications.with_label_values(&[action, result]);
            }
            m.alert_queue_depth.with_label_values(&[action]);
            m.alert_queue_capacity.with_label_values(&[action]);
        }
        m
    }

    /// Counts `n` readings rejected for `reason`.
    pub fn rejected(&self, transport: Transport, reason: RejectReason, n: u64) {
        self.readings_rejected
            .with_label_values(&[transport.as_str(), reason.as_str()])
            .inc_by(n);
    }

    /// Counts readings refused before they could be parsed one by one (malformed body, too
    /// large, too many): received and rejected together, `n` readings (1 when unknown).
    pub fn rejected_unparsed(&self, transport: Transport, reason: RejectReason, n: u64) {
        self.readings_received
            .with_label_values(&[transport.as_str()])
            .inc_by(n);
        self.rejected(transport, reason, n);
    }

    /// Renders the text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A registered gauge without labels.
fn simple_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

/// A registered counter without labels.
fn simple_counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}
