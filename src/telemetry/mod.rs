//! Telemetry: what Sluice tells its operators. Metrics (`/metrics`) and logs.

pub mod logging;
pub mod metrics;
