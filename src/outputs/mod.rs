//! Outputs: after the commit and the ack, on their own tasks. store → **outputs** → other
//! systems. An output reads what the store committed and never slows or refuses ingest.
//!
//! - [`nats`]: every committed reading to NATS from the store's durable outbox, and readings
//!   other replicas committed back into `/v1/live` (SPEC §13).

pub mod nats;
