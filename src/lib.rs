//! Sluice: a high-concurrency IoT ingestion service.
//!
//! The flow, and the modules that implement it:
//!
//! ```text
//! device ─▶ access (token) ─▶ ingest (parse at the edge: codec → reading) ─▶ access (devices,
//!        rate limit) ─▶ pipeline::Admission (bounded, in readings)
//!        ─▶ pipeline batcher ─▶ services (before commit) ─▶ store (one transaction per batch)
//!        ─▶ services (after commit: device state) ─▶ ack to each request
//! ```
//!
//! [`app::Application`] wires it together; `main.rs` only parses the command line.
//! See ARCHITECTURE.md for the invariants.
#![warn(missing_docs)]

pub mod access;
pub mod api;
pub mod app;
pub mod codec;
pub mod config;
pub mod ingest;
pub mod outputs;
pub mod pipeline;
pub mod reading;
pub mod services;
pub mod store;
pub mod telemetry;
#[cfg(test)]
mod test_rng;
pub mod tls;

pub use app::Application;
pub use config::Settings;
