//! Handlers: the ways in. Each turns bytes into [`crate::reading::Reading`]s or a precise
//! error, submits readings to the pipeline's admission, and answers after the ack.
//!
//! - `http`: `POST /v1/readings`
//! - `query`: `GET /v1/devices…` (device state and stored readings)
//! - `ops`: `/metrics`, `/healthz`, `/readyz`
//! - `problem`: RFC 9457 problem documents for every non-ingest error

pub mod http;
pub mod ops;
pub mod problem;
pub mod query;

use std::sync::Arc;

use crate::config::Settings;
use crate::pipeline::{Admission, Health};
use crate::services::DeviceState;
use crate::store::StoreReader;
use crate::telemetry::metrics::Metrics;

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
    pub reader: Arc<StoreReader>,
}
