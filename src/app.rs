//! The application: binds the listener, builds the router, starts the pipeline, and owns the
//! shutdown order (SPEC §9).
//!
//! ```text
//! signal ─▶ not ready ─▶ stop accepting, finish in-flight HTTP requests (their acks still flow)
//!        └▶ MQTT stops taking messages ─▶ (after HTTP and WebSocket) taken ones commit,
//!           are PUBACKed, DISCONNECT
//!        ─▶ close admission ─▶ batcher drains ─▶ writer commits and acks the rest ─▶ exit 0
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

use crate::config::{Backend, ConfigError, Settings};
use crate::handlers::mqtt::MqttSource;
use crate::handlers::{self, AppState, WsHub};
use crate::pipeline::{Health, Pipeline};
use crate::services::{DeviceState, Live, Services};
use crate::store::ReaderSlot;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::runtime::{RuntimeTelemetry, TaskMonitors};

/// A built, not yet running, Sluice.
pub struct Application {
    /// The bound HTTP listener.
    listener: TcpListener,
    /// The address it is bound to (the real port when 0 was asked).
    addr: SocketAddr,
    /// Handler state, shared by the router.
    state: AppState,
    /// The pipeline tasks, drained on shutdown.
    pipeline: Pipeline,
    /// Event-loop collector and lag probe (`telemetry.runtime`); stops the probe when dropped.
    runtime: Option<RuntimeTelemetry>,
    /// The MQTT source, when `mqtt.enabled`; stopped before the pipeline drains.
    mqtt: Option<MqttSource>,
}

/// The HTTP routes, with their state. Public so tests can drive it without a socket.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/readings", post(handlers::http::ingest))
        .route("/v1/devices", get(handlers::query::list_devices))
        .route("/v1/devices/{device_id}", get(handlers::query::get_device))
        .route(
            "/v1/devices/{device_id}/readings",
            get(handlers::query::readings),
        )
        .route("/v1/ws", get(handlers::ws::device_ws))
        .route("/v1/live", get(handlers::live::live_ws))
        .route("/metrics", get(handlers::ops::metrics))
        .route("/healthz", get(handlers::ops::healthz))
        .route("/readyz", get(handlers::ops::readyz))
        .merge(handlers::status::routes())
        .fallback(|| async {
            handlers::problem::Problem::not_found("no such endpoint; see the README for the API")
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            handlers::ops::track,
        ))
        .with_state(state)
}

impl Application {
    /// Binds `server.listen` and starts the pipeline. The store opens in the background: if it
    /// cannot, Sluice still serves `/healthz`, and `/readyz` and ingest answer 503 until it can.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
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
        let services = Arc::new(Services::new(vec![devices.clone(), live.clone()]));
        let reader = Arc::new(ReaderSlot::new(settings.storage.backend));
        let pipeline = Pipeline::start(
            &settings,
            metrics.clone(),
            health.clone(),
            services,
            reader.clone(),
        );
        let mqtt = if settings.mqtt.enabled {
            Some(MqttSource::start(
                settings.clone(),
                pipeline.admission.clone(),
                metrics.clone(),
            )?)
        } else {
            None
        };
        let state = AppState {
            settings: settings.clone(),
            admission: pipeline.admission.clone(),
            metrics,
            health,
            devices,
            reader,
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
            state,
            pipeline,
            runtime,
            mqtt,
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
            state,
            pipeline,
            runtime,
            mqtt,
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
        tracing::info!(%addr, "sluice listening");
        let app = router(state);
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(signal)
                .await
        });
        // Wait for the signal first, then bound everything that follows by the timeout.
        let _ = stop_rx.await;
        if let Some(mqtt) = &mqtt {
            mqtt.stop_taking();
        }
        let drain = async {
            match server.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "HTTP server failed"),
                Err(e) => tracing::error!(error = %e, "HTTP server task failed"),
            }
            tracing::info!("HTTP drained; waiting for WebSocket connections to close");
            ws_tracker.close();
            ws_tracker.wait().await;
            tracing::info!("WebSocket connections closed");
            if let Some(mqtt) = mqtt {
                tracing::info!("answering taken MQTT messages");
                mqtt.finish().await;
            }
            tracing::info!("draining the pipeline");
            pipeline.drain().await;
        };
        tokio::time::timeout(timeout, drain).await.map_err(|_| {
            anyhow::anyhow!(
                "shutdown took longer than server.shutdown_timeout ({})",
                humantime::format_duration(timeout)
            )
        })?;
        drop(runtime);
        tracing::info!("shutdown complete");
        Ok(())
    }
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
    let storage = settings.storage.clone();
    match storage.backend {
        Backend::Sqlite => {
            if !storage.postgres.url.is_empty() {
                tracing::warn!(
                    url = %storage.postgres.url,
                    "storage.postgres.url is set but storage.backend is \"sqlite\": the URL is not used"
                );
            }
            Ok(())
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
