//! Wire formats other than Sluice's own JSON: bytes → readings, no I/O. device → handler →
//! **codec** → readings → admission.
//!
//! Each format turns a body into a [`crate::reading::ParsedBatch`] with per-index errors and
//! makes every reading through [`crate::reading::ReadingParts::validate`], so SPEC §1's rules
//! hold whatever the format.
//!
//! - [`line_protocol`]: InfluxDB line protocol (SPEC §10), for Telegraf and InfluxDB clients.

pub mod line_protocol;
