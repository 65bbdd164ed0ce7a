//! The read side and the server's own endpoints: stored readings and device state
//! (`query`), the live stream (`live`), `/metrics` and health (`ops`), the status page
//! (`status`), and what every endpoint shares: the [`AppState`], query-string parsing
//! (`params`) and RFC 9457 problem documents (`problem`).
//!
//! - `query`: `GET /v1/devices…` (device state and stored readings)
//! - `live`: `GET /v1/live`, committed readings as they happen
//! - `ops`: `/metrics`, `/healthz`, `/readyz`
//! - `params`: every endpoint's query string, with unknown parameters refused
//! - `problem`: RFC 9457 problem documents for every error answer
//! - `status`: the status page (`GET /`, `/static/…`) and its figures (`GET /v1/status`)
//! - `alerts`: `GET /v1/alerts` and `GET /v1/rules` (alert rules)
//! - `admin`: `/v1/admin/tokens` (token administration, SPEC §11)

pub mod admin;
pub mod alerts;
pub mod live;
pub mod ops;
pub mod params;
pub mod problem;
pub mod query;
pub mod status;

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::pipeline::{Admission, Health};
use crate::services::{DeviceState, Live};
use crate::store::ReaderSlot;
use crate::telemetry::metrics::Metrics;

/// Open WebSocket connections: their limit, their shutdown signal, and a tracker to wait for
/// them to finish.
#[derive(Clone)]
pub struct WsHub {
    /// One permit per connection, `ws.max_connections` in all.
    pub connections: Arc<Semaphore>,
    /// Cancelled at shutdown: connections answer what they took, then close with 1001.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them before draining the pipeline.
    pub tracker: TaskTracker,
    /// Live subscribers.
    pub live: Arc<Live>,
}

/// Shared by every handler. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Effective configuration (limits, retry-after).
    pub settings: Arc<Settings>,
    /// Entry to the pipeline.
    pub admission: Admission,
    /// All metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness.
    pub health: Arc<Health>,
    /// Latest state per device.
    pub devices: Arc<DeviceState>,
    /// Query access to the store.
    pub reader: Arc<ReaderSlot>,
    /// WebSocket connections.
    pub ws: WsHub,
    /// The alert rules and their states, for `GET /v1/alerts` and `GET /v1/rules`.
    pub alerts: Arc<crate::services::rules::AlertBoard>,
    /// Tokens, the admin token and per-device rate limits (SPEC §11).
    pub access: Arc<crate::access::Access>,
}
