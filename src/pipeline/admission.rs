//! Admission: the bounded entry to the pipeline. Handlers call [`Admission::submit`] with
//! parsed, valid readings and get back a receiver for the ack.
//!
//! The bound is counted in readings (`pipeline.queue_capacity`), not requests: a request of
//! 10 000 readings takes 10 000 permits. Admission never waits: when the permits run out it
//! refuses at once, so a handler can answer 503 while the device still holds its data.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{AckResult, Health, Submission};
use crate::reading::Reading;
use crate::telemetry::metrics::{Metrics, Transport};

/// Why readings were not taken. Every refusal is counted as shed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The pipeline holds `queue_capacity` readings already.
    #[error("pipeline full: {queued} of {capacity} readings queued")]
    Overloaded {
        /// Readings admitted and not yet committed.
        queued: usize,
        /// `pipeline.queue_capacity`.
        capacity: usize,
    },
    /// The store cannot be written.
    #[error("store unavailable")]
    Unavailable,
    /// The pipeline is draining for shutdown.
    #[error("shutting down")]
    ShuttingDown,
}

/// Handle to submit readings. Cheap to clone; every handler holds one.
#[derive(Clone)]
pub struct Admission {
    /// Submissions to the batcher. Closed by the batcher when it drains.
    tx: mpsc::Sender<Submission>,
    /// One permit per reading of free queue space.
    permits: Arc<Semaphore>,
    /// `pipeline.queue_capacity`.
    capacity: usize,
    /// Counters and the depth gauge.
    metrics: Arc<Metrics>,
    /// Whether the store is up; no point admitting what cannot be committed.
    health: Arc<Health>,
}

impl Admission {
    pub(super) fn new(
        tx: mpsc::Sender<Submission>,
        capacity: usize,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        Self {
            tx,
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            metrics,
            health,
        }
    }

    /// Admits `readings` (at least one) or refuses all of them. On success the receiver
    /// yields the ack after commit. A refusal is counted in `sluice_readings_shed_total`.
    pub fn submit(
        &self,
        transport: Transport,
        readings: Vec<Reading>,
    ) -> Result<oneshot::Receiver<AckResult>, Refusal> {
        let n = readings.len();
        debug_assert!(n > 0, "empty submissions are answered by the handler");
        let result = self.try_submit(transport, readings);
        if result.is_err() {
            self.metrics
                .readings_shed
                .with_label_values(&[transport.as_str()])
                .inc_by(n as u64);
        }
        result
    }

    fn try_submit(
        &self,
        transport: Transport,
        readings: Vec<Reading>,
    ) -> Result<oneshot::Receiver<AckResult>, Refusal> {
        if self.tx.is_closed() {
            return Err(Refusal::ShuttingDown);
        }
        if !self.health.store_up() {
            return Err(Refusal::Unavailable);
        }
        let n = u32::try_from(readings.len()).unwrap_or(u32::MAX);
        let permit = self
            .permits
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| Refusal::Overloaded {
                queued: self.queued(),
                capacity: self.capacity,
            })?;
        let (ack, rx) = oneshot::channel();
        self.tx
            .try_send(Submission {
                readings,
                transport,
                ack,
                permit,
            })
            .map_err(|_| Refusal::ShuttingDown)?;
        self.update_depth();
        Ok(rx)
    }

    /// Readings admitted and not yet committed.
    pub fn queued(&self) -> usize {
        self.capacity
            .saturating_sub(self.permits.available_permits())
    }

    /// Refreshes `sluice_pipeline_queue_depth{stage="admission"}`.
    pub fn update_depth(&self) {
        self.metrics
            .queue_depth
            .with_label_values(&["admission"])
            .set(self.queued() as i64);
    }
}
