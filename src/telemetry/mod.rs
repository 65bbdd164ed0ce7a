//! Telemetry: what Sluice tells its operators. Metrics (`/metrics`), event-loop load
//! (`runtime`) and logs (`logging`; `log_limit` for lines that can repeat).

pub mod log_limit;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod runtime;
