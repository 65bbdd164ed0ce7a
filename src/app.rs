//! The application: binds the listener, builds the router, starts the pipeline, and owns the
//! shutdown order (SPEC §9).
//!
//! HTTP connections are served by hyper's HTTP/1 builder ([`serve_http`]) rather than
//! `axum::serve`, for the limits it does not set: at most `server.max_connections` open
//! connections, hyper's header-read timer (`server.request_timeout`, and the keep-alive idle
//! time), WebSocket upgrades as before, and TLS (`server.tls.*`, see [`crate::tls`]) in each
//! connection's task.
//!
//! ```text
//! signal ─▶ not ready ─▶ stop accepting, finish in-flight HTTP requests (their acks still flow)
//!        └▶ MQTT stops taking messages ─▶ (after HTTP and WebSocket) taken ones commit,
//!           are PUBACKed, DISCONNECT
//!        ─▶ close admission ─▶ batcher drains ─▶ writer commits and acks the rest
//!        ─▶ NATS publishes, and the rule engine evaluates what is left and its actions
//!           deliver, within the rest of the budget ─▶ exit 0
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::routing::{get, post};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::IntGauge;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState, WsHub};
use crate::config::{Backend, ConfigError, ServerSettings, Settings};
use crate::ingest::{self, mqtt::MqttSource};
use crate::outputs::alerts::AlertsOutput;
use crate::outputs::nats::{CommitNotice, NatsOutput};
use crate::pipeline::{Health, Pipeline};
use crate::services::{DeviceState, Live, Services};
use crate::store::ReaderSlot;
use crate::telemetry::log_limit::LogLimit;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::runtime::{RuntimeTelemetry, TaskMonitors};
use crate::tls::ServerTls;

/// A built, not yet running, Sluice.
pub struct Application {
    /// The bound HTTP listener.
    listener: TcpListener,
    /// The address it is bound to (the real port when 0 was asked).
    addr: SocketAddr,
    /// `server.tls.*`: the listener serves HTTPS and WSS with this certificate, reloaded
    /// while it runs. `None`: plain HTTP.
    tls: Option<ServerTls>,
    /// Handler state, shared by the router.
    state: AppState,
    /// The pipeline tasks, drained on shutdown.
    pipeline: Pipeline,
    /// Event-loop collector and lag probe (`telemetry.runtime`); stops the probe when dropped.
    runtime: Option<RuntimeTelemetry>,
    /// The MQTT source, when `mqtt.enabled`; stopped before the pipeline drains.
    mqtt: Option<MqttSource>,
    /// The NATS output, when `nats.enabled`; publishes what is left after the pipeline drains.
    nats: Option<NatsOutput>,
    /// The rule engine and its actions, when `[[rules]]` are configured; evaluates what is
    /// left after the pipeline drains.
    alerts: Option<AlertsOutput>,
}

/// The HTTP routes, with their state. Public so tests can drive it without a socket.
///
/// Every error answer is a problem document (SPEC §3): each handler's own, its extractors'
/// (`api::params` refuses unknown query parameters), and the two fallbacks below for
/// an unknown path (404) and a known path with another method (405, with axum's `Allow`).
/// Only what hyper answers before routing (431, 414, an unparsable request line) has no body.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/readings", post(ingest::http::ingest))
        .route("/write", post(ingest::influx::write_v1))
        .route("/api/v2/write", post(ingest::influx::write_v2))
        .route("/v1/devices", get(api::query::list_devices))
        .route("/v1/devices/{device_id}", get(api::query::get_device))
        .route(
            "/v1/devices/{device_id}/readings",
            get(api::query::readings),
        )
        .route("/v1/ws", get(ingest::ws::device_ws))
        .route("/v1/live", get(api::live::live_ws))
        .route("/v1/alerts", get(api::alerts::list_alerts))
        .route("/v1/rules", get(api::alerts::list_rules))
        .route(
            "/v1/admin/tokens",
            post(api::admin::create).get(api::admin::list),
        )
        .route(
            "/v1/admin/tokens/{id}",
            axum::routing::delete(api::admin::revoke),
        )
        .route("/metrics", get(api::ops::metrics))
        .route("/healthz", get(api::ops::healthz))
        .route("/readyz", get(api::ops::readyz))
        .merge(api::status::routes())
        // After every route: it applies to the routes registered before it.
        .method_not_allowed_fallback(api::problem::wrong_method)
        .fallback(api::problem::no_route)
        // Tokens (SPEC §11): inside the request counter, so refusals are counted by route.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::access::guard,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::ops::track,
        ))
        .with_state(state)
}

impl Application {
    /// Binds `server.listen` and starts the pipeline. The store opens in the background: if it
    /// cannot, Sluice still serves `/healthz`, and `/readyz` and ingest answer 503 until it can.
    pub async fn build(mut settings: Settings) -> anyhow::Result<Self> {
        // The store keeps committed readings for the NATS publisher until it has them.
        settings.storage.outbox = settings.nats.enabled;
        settings.storage.replica = crate::outputs::nats::replica_id();
        // The store keeps the rollups of [rollups] (SPEC §12).
        settings.storage.rollups = settings.rollups.clone();
        let settings = Arc::new(settings);
        preflight_store(&settings).await?;
        let listener = TcpListener::bind(settings.server.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (server.listen)",
                    settings.server.listen
                )
            })?;
        let addr = listener.local_addr().context("listener address")?;

        let metrics = Arc::new(Metrics::with_tasks(TaskMonitors::from_settings(
            &settings.telemetry,
        )));
        metrics.mqtt_enabled.set(i64::from(settings.mqtt.enabled));
        metrics.for_store(settings.storage.backend.as_str());
        // Unreadable or unusable certificate files stop the start (exit 2, naming the key).
        let tls = ServerTls::load(&settings.server, &metrics).await?;
        let runtime = if settings.telemetry.runtime {
            let handle = tokio::runtime::Handle::current();
            Some(
                RuntimeTelemetry::start(&metrics.registry, &handle)
                    .context("cannot register the runtime metrics")?,
            )
        } else {
            None
        };
        let health = Arc::new(Health::default());
        let devices = Arc::new(DeviceState::new());
        let live = Live::new();
        let notice = Arc::new(tokio::sync::Notify::new());
        let mut chain: Vec<Arc<dyn crate::services::Service>> = vec![devices.clone(), live.clone()];
        if settings.nats.enabled {
            chain.push(Arc::new(CommitNotice(notice.clone())));
        }
        // Alert rules: the rule engine gets committed readings through the feed (SPEC §12).
        let rules: Vec<crate::config::rules::Rule> = settings
            .rules
            .iter()
            .map(|r| {
                r.parse()
                    .map_err(|e| anyhow::anyhow!("rule `{}`: {e}", r.name))
            })
            .collect::<anyhow::Result<_>>()?;
        let board = Arc::new(crate::services::rules::AlertBoard::new(&rules));
        let rules_feed = if rules.is_empty() {
            None
        } else {
            let (tx, rx) = crate::pipeline::committed_feed(
                settings.alerts.evaluation_queue_readings,
                "rules",
                &metrics,
            );
            let metric_names = board.with(|e| e.metrics().to_vec());
            let feed = Arc::new(crate::services::rules::RulesFeed::new(metric_names, tx));
            chain.push(feed.clone());
            Some((feed, rx))
        };
        let services = Arc::new(Services::new(chain));
        let reader = Arc::new(ReaderSlot::new(settings.storage.backend));
        let pipeline = Pipeline::start(
            &settings,
            metrics.clone(),
            health.clone(),
            services,
            reader.clone(),
        );
        // Tokens and rate limits (SPEC §11); MQTT shares the per-device limiter.
        let access = Arc::new(crate::access::Access::new(
            &settings,
            reader.clone(),
            metrics.clone(),
        ));
        let mqtt = if settings.mqtt.enabled {
            Some(MqttSource::start(
                settings.clone(),
                pipeline.admission.clone(),
                metrics.clone(),
                access.limiter.clone(),
            )?)
        } else {
            None
        };
        let nats = if settings.nats.enabled {
            Some(NatsOutput::start(
                &settings.nats,
                &settings.storage.replica,
                metrics.clone(),
                reader.clone(),
                live.clone(),
                notice,
            )?)
        } else {
            None
        };
        let alerts = match rules_feed {
            Some((feed, rx)) => Some(AlertsOutput::start(
                &settings,
                board.clone(),
                feed,
                rx,
                reader.clone(),
                live.clone(),
                metrics.clone(),
            )?),
            None => None,
        };
        let state = AppState {
            settings: settings.clone(),
            admission: pipeline.admission.clone(),
            access,
            metrics,
            health,
            devices,
            reader,
            alerts: board,
            ws: WsHub {
                connections: Arc::new(tokio::sync::Semaphore::new(settings.ws.max_connections)),
                shutdown: tokio_util::sync::CancellationToken::new(),
                tracker: tokio_util::task::TaskTracker::new(),
                live,
            },
        };
        Ok(Self {
            listener,
            addr,
            tls,
            state,
            pipeline,
            runtime,
            mqtt,
            nats,
            alerts,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Serves until `shutdown` resolves, then shuts down in order. Fails if the shutdown takes
    /// longer than `server.shutdown_timeout`.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Application {
            listener,
            addr,
            tls,
            state,
            pipeline,
            runtime,
            mqtt,
            nats,
            alerts,
        } = self;
        let timeout = state.settings.server.shutdown_timeout;
        let ws_tracker = state.ws.tracker.clone();
        let health = state.health.clone();
        let ws = state.ws.clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutdown signal received: not ready, finishing in-flight requests");
            health.set_shutting_down();
            // WebSocket connections answer what they have read, then close with 1001.
            ws.shutdown.cancel();
            let _ = stop_tx.send(());
        };
        let settings = &state.settings;
        tracing::info!(version = env!("CARGO_PKG_VERSION"), "sluice starting");
        tracing::info!(%addr, tls = tls.is_some(), "sluice listening");
        match settings.storage.backend {
            Backend::Sqlite => tracing::info!(
                backend = "sqlite",
                data_dir = %settings.storage.data_dir.display(),
                synchronous = settings.storage.synchronous.as_sql(),
                retention = %crate::config::duration::format(settings.storage.retention),
                "store configured"
            ),
            Backend::Postgres => tracing::info!(
                backend = "postgres",
                url = %settings.storage.postgres.url,
                retention = %crate::config::duration::format(settings.storage.retention),
                "store configured"
            ),
        }
        tracing::info!(
            enabled = settings.nats.enabled,
            url = %if settings.nats.enabled { settings.nats.url.to_string() } else { "-".into() },
            subject_prefix = %settings.nats.subject_prefix,
            "NATS output"
        );
        tracing::info!(
            http = true,
            websocket = true,
            mqtt = settings.mqtt.enabled,
            mqtt_url = %if settings.mqtt.enabled { settings.mqtt.url.as_str() } else { "-" },
            "transports"
        );
        match settings.auth.mode {
            crate::config::access::AuthMode::Token => tracing::info!(
                mode = "token",
                rate_limit = %if settings.rate_limit.per_device.is_empty() { "off" } else { settings.rate_limit.per_device.as_str() },
                "auth: every ingest and query request needs a token"
            ),
            // Exactly one warning, and only where it matters: a port others can reach.
            crate::config::access::AuthMode::None if !addr.ip().is_loopback() => tracing::warn!(
                %addr,
                "auth.mode is \"none\": anyone who can reach this port can write and read any device; set auth.mode = \"token\" (README, \"Tokens\")"
            ),
            crate::config::access::AuthMode::None => {
                tracing::info!("auth: none (listening on loopback only)")
            }
        }
        // Revocations from other replicas, last-use times and the rate limiter's sweep.
        let upkeep_stop = CancellationToken::new();
        let upkeep = state
            .access
            .start_upkeep(settings.rate_limit.sweep_interval, upkeep_stop.clone());
        let server_settings = state.settings.server.clone();
        let open = state.metrics.http_connections.clone();
        let app = router(state);
        let server = tokio::spawn(serve_http(
            listener,
            app,
            server_settings,
            open,
            tls,
            signal,
        ));
        // Wait for the signal first, then bound everything that follows by the timeout.
        let _ = stop_rx.await;
        if let Some(mqtt) = &mqtt {
            mqtt.stop_taking();
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let drain = async {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "HTTP server task failed");
            }
            tracing::info!("HTTP drained; waiting for WebSocket connections to close");
            ws_tracker.close();
            ws_tracker.wait().await;
            tracing::info!("WebSocket connections closed");
            // The last token uses are written; bounded, so a store that is down cannot hold
            // the shutdown.
            upkeep_stop.cancel();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), upkeep).await;
            if let Some(mqtt) = mqtt {
                tracing::info!("answering taken MQTT messages");
                mqtt.finish().await;
            }
            tracing::info!("draining the pipeline");
            pipeline.drain().await;
            let left = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .saturating_sub(std::time::Duration::from_millis(250));
            let nats = async {
                if let Some(nats) = nats {
                    // Whatever is not published in the rest of the budget stays in the outbox.
                    tracing::info!(
                        budget_ms = left.as_millis() as u64,
                        "publishing what is left to NATS"
                    );
                    nats.finish(left).await;
                }
            };
            let alerts = async {
                if let Some(alerts) = alerts {
                    // Events not delivered in the rest of the budget are counted as dropped.
                    alerts.finish(left).await;
                }
            };
            tokio::join!(nats, alerts);
        };
        tokio::time::timeout(timeout, drain).await.map_err(|_| {
            anyhow::anyhow!(
                "shutdown took longer than server.shutdown_timeout ({})",
                crate::config::duration::format(timeout)
            )
        })?;
        drop(runtime);
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// Serves HTTP/1 (and WebSocket upgrades) on `listener` until `shutdown` resolves, then stops
/// accepting, lets every connection finish its in-flight request (idle ones close at once),
/// and returns when all have closed. What `axum::serve` with graceful shutdown does, plus:
/// - **`server.max_connections`**: a connection takes a semaphore slot *before* it is accepted,
///   so past the limit new connections wait in the kernel's listen backlog (and past that,
///   their SYNs are dropped and retried by the client): never served without bound.
/// - **hyper's header-read timer** ([`ServerSettings::header_read_timeout`]): headers that do
///   not complete in time, or a keep-alive connection idle that long, close the connection.
///   (The body's bound is the ingest handler's: 408.)
/// - the `sluice_http_connections` gauge (`open`). An upgraded WebSocket leaves it, and its
///   slot, once hyper hands the socket over; `ws.max_connections` bounds those.
/// - **TLS** (`tls`): the handshake runs in the connection's task, bounded by
///   `server.request_timeout`, holding the connection's slot; the accept loop never waits on
///   it. The certificate files are watched for as long as the listener runs.
async fn serve_http(
    listener: TcpListener,
    app: Router,
    settings: ServerSettings,
    open: IntGauge,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout())
        .keep_alive(true);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    // Tells every connection to finish its request and close; the tracker waits for them.
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let handshake = tls.as_ref().map(ServerTls::handshake);
    // Reloads the certificate until the listener stops (after the loop, with `stop`).
    if let Some(tls) = tls {
        tokio::spawn(tls.watch(stop.clone()));
    }
    // Out of file descriptors lasts: one line, then at most one per 30 s with a count.
    let accept_failing = LogLimit::new();
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    if let Some(failures) = accept_failing.recovered() {
                        tracing::info!(failures, "accepting HTTP connections again");
                    }
                    stream
                }
                Err(e) => {
                    if must_pause(&e) {
                        if let Some(suppressed) = accept_failing.event() {
                            tracing::error!(error = %e, suppressed, "cannot accept an HTTP connection; retrying in 1 s");
                        }
                        tokio::select! {
                            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                            () = &mut shutdown => break,
                        }
                    }
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let guard = OpenConnection::new(slot, open.clone());
        let (builder, app, stop) = (builder.clone(), app.clone(), stop.clone());
        let handshake = handshake.clone();
        let drain = settings.shutdown_timeout / 2;
        connections.spawn(async move {
            let _guard = guard;
            match handshake {
                None => serve_connection(&builder, TokioIo::new(stream), app, &stop, drain).await,
                Some(handshake) => {
                    let tls = tokio::select! {
                        tls = handshake.accept(stream) => tls,
                        // Not a request yet: nothing to finish.
                        () = stop.cancelled() => None,
                    };
                    if let Some(tls) = tls {
                        serve_connection(&builder, TokioIo::new(tls), app, &stop, drain).await;
                    }
                }
            }
        });
    }
    drop(listener);
    stop.cancel();
    connections.close();
    connections.wait().await;
}

/// Serves one connection's requests until it closes or, once `stop` is cancelled, until its
/// in-flight request is answered (at most `drain` for one still being received).
async fn serve_connection<I>(
    builder: &http1::Builder,
    io: I,
    app: Router,
    stop: &CancellationToken,
    drain: Duration,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = builder
        .serve_connection(io, TowerToHyperService::new(app))
        .with_upgrades();
    tokio::pin!(conn);
    let served = tokio::select! {
        served = conn.as_mut() => served,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            // hyper waits for a connection still receiving a request (its headers or
            // body) until `server.request_timeout`, which may outlast the shutdown.
            // Half the shutdown budget is its limit: such a request has not been
            // admitted, so dropping it loses nothing acknowledged.
            match tokio::time::timeout(drain, conn).await {
                Ok(served) => served,
                Err(_) => {
                    tracing::info!("closed an HTTP connection still receiving a request at shutdown");
                    Ok(())
                }
            }
        }
    };
    // Timeouts and clients that go away are routine; nothing to alarm anyone with.
    if let Err(e) = served {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// One open HTTP connection: holds its `server.max_connections` slot and counts in the gauge
/// until dropped (when hyper finishes with the connection, or hands it to a WebSocket).
struct OpenConnection {
    /// Returned to the semaphore on drop, which lets the accept loop take one more.
    _slot: OwnedSemaphorePermit,
    /// `sluice_http_connections`.
    open: IntGauge,
}

impl OpenConnection {
    fn new(slot: OwnedSemaphorePermit, open: IntGauge) -> Self {
        open.inc();
        Self { _slot: slot, open }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// After a failed `accept`: a connection that broke before it was accepted is skipped; any
/// other error (out of file descriptors, most often) is logged and accepting pauses for a
/// second rather than spinning, as `axum::serve` does.
fn must_pause(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    !matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    )
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Before anything listens: what the store can never recover from is a configuration error
/// ([`ConfigError`], exit code 2), not an endless "not ready".
async fn preflight_store(settings: &Settings) -> anyhow::Result<()> {
    for warning in settings.warnings() {
        tracing::warn!("{warning}");
    }
    let storage = settings.storage.clone();
    match storage.backend {
        Backend::Sqlite => {
            // A directory that cannot be created or written now will not heal by retrying:
            // refuse to start, naming the key. (A store that fails later gives 503 and is
            // reopened; that is the writer's.) The probe file is named after the process, so
            // two processes starting on one directory never remove each other's.
            let dir = &storage.data_dir;
            let probe = dir.join(format!(".sluice-write-probe-{}", std::process::id()));
            let checked = std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create the data directory {}: {e}", dir.display()))
                .and_then(|()| {
                    std::fs::write(&probe, b"")
                        .and_then(|()| std::fs::remove_file(&probe))
                        .map_err(|e| {
                            format!("cannot write in the data directory {}: {e}", dir.display())
                        })
                });
            checked.map_err(|reason| {
                anyhow::Error::new(ConfigError::Invalid {
                    key: "storage.data_dir",
                    reason,
                })
            })
        }
        Backend::Postgres => {
            let checked =
                tokio::task::spawn_blocking(move || crate::store::postgres::preflight(&storage))
                    .await
                    .context("postgres preflight")?;
            checked.map_err(|reason| {
                anyhow::Error::new(ConfigError::Invalid {
                    key: "storage.postgres.url",
                    reason,
                })
            })
        }
    }
}
