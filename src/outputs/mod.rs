//! Outputs: after the commit and the ack, on their own tasks. store → **outputs** → other
//! systems. An output reads what the store committed and never slows or refuses ingest.
//!
//! - [`nats`]: every committed reading to NATS from the store's durable outbox, and readings
//!   other replicas committed back into `/v1/live` (SPEC §13).
//! - [`alerts`]: the rule engine's task: committed feed → `services::rules` → alert state in
//!   the store → events to `/v1/live?type=alert` and, through an [`outbox`] each, to the
//!   [`webhook`] and [`mqtt`] actions (SPEC §12).

pub mod alerts;
pub mod mqtt;
pub mod nats;
pub mod outbox;
pub mod webhook;
