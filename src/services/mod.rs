//! Processing services: batcher → **services** → store → ack.
//!
//! A service sees every batch twice, on the store writer's blocking thread:
//! - [`Service::before_commit`] may inspect or enrich readings before they are stored (the
//!   place for dedupe windows, rollups and alert rules);
//! - [`Service::after_commit`] sees the readings that were newly stored (not duplicates), before
//!   their devices are acknowledged, so state read after an ack already reflects it.
//!
//! Services must be quick and must not block: they run inside the commit loop. Work that is not
//! quick runs on its own task after the commit, fed through the bounded committed feed of
//! `pipeline`: [`rules::RulesFeed`] is the service that fills it for the rule engine, whose
//! evaluation is [`rules::Evaluator`] (no I/O) and whose task is `outputs::alerts`.

pub mod device_state;
pub mod live;
pub mod rules;

use std::sync::Arc;

use crate::reading::Reading;
use crate::store::DeviceLatest;

pub use device_state::DeviceState;
pub use live::Live;

/// One processing step around the commit.
pub trait Service: Send + Sync {
    /// Name used in logs.
    fn name(&self) -> &'static str;

    /// Before commit. Readings may be enriched but not removed: each one is owed an answer.
    fn before_commit(&self, _readings: &mut [Reading]) {}

    /// After commit, with the readings stored by this batch.
    /// `commit_ms` is the server time (epoch ms) of the commit, as the store recorded it.
    fn after_commit(&self, _stored: &[&Reading], _commit_ms: i64) {}

    /// At start-up, with every device's state as the store restored it.
    fn restore(&self, _devices: &[DeviceLatest]) {}
}

/// The ordered chain of services the store writer runs.
pub struct Services {
    /// Run in order for each hook.
    chain: Vec<Arc<dyn Service>>,
}

impl Services {
    /// A chain of services, run in the given order.
    pub fn new(chain: Vec<Arc<dyn Service>>) -> Self {
        Self { chain }
    }

    /// Runs every service's pre-commit hook.
    pub fn before_commit(&self, readings: &mut [Reading]) {
        for s in &self.chain {
            s.before_commit(readings);
        }
    }

    /// Runs every service's post-commit hook.
    pub fn after_commit(&self, stored: &[&Reading], commit_ms: i64) {
        for s in &self.chain {
            s.after_commit(stored, commit_ms);
        }
    }

    /// Runs every service's restore hook.
    pub fn restore(&self, latest: &[DeviceLatest]) {
        for s in &self.chain {
            tracing::debug!(
                service = s.name(),
                devices = latest.len(),
                "restoring state"
            );
            s.restore(latest);
        }
    }
}
