//! Telemetry: what Sluice tells its operators. Metrics (`/metrics`), event-loop load
//! (`runtime`) and logs.

pub mod logging;
pub mod metrics;
pub mod runtime;
