//! The pipeline: handler → **admission → batcher → processing services → store writer → ack**.
//!
//! This module is the only place channels are created ([`Pipeline::start`]). Each one is
//! bounded and has a named policy for when it is full:
//!
//! | channel | bound | when full |
//! |---|---|---|
//! | admission (handlers → batcher) | `pipeline.queue_capacity` readings, held as semaphore permits until commit | refuse: the handler answers 503 / `overloaded` / no PUBACK, and the readings are counted as shed |
//! | batches (batcher → store writer) | 2 batches | block the batcher; readings pile up in admission, whose bound then sheds |
//! | acks (writer → one handler) | a oneshot per submission | never full |
//! | committed feed (writer, after commit → rule engine; [`committed_feed`]) | `alerts.evaluation_queue_readings` readings, as semaphore permits until the engine takes the batch; stage `rules` | drop_newest: the new batch is not queued, its readings are counted in `sluice_rules_skipped_readings_total`; the commit and its acks never wait |
//! | alert actions (rule engine → webhook, MQTT; `outputs::outbox`) | `alerts.queue_capacity` events per action | drop_newest: the new event is counted as `sluice_alert_notifications_total{result="dropped"}` |
//!
//! A submission's permits are released only after its commit, so the admission bound covers
//! every reading that has been taken but not yet made durable.

mod admission;
mod batcher;
mod feed;
mod writer;

pub use admission::{Admission, Refusal};
pub use feed::{FeedReceiver, FeedSender};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::Settings;
use crate::reading::Reading;
use crate::services::Services;
use crate::telemetry::metrics::{Metrics, Transport};

/// What the store writer tells one submission once its batch is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Readings stored for the first time.
    pub accepted: usize,
    /// Readings that were already stored (same `(device_id, seq)`).
    pub duplicates: usize,
}

/// The batch could not be committed. Nothing in it is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("store unavailable: {0}")]
pub struct Unavailable(pub String);

/// The answer to one submission.
pub type AckResult = Result<Ack, Unavailable>;

/// Readings from one request, frame or message, travelling together to one ack.
pub struct Submission {
    /// Valid readings, in the order the device sent them.
    pub readings: Vec<Reading>,
    /// How they arrived, for the counters.
    pub transport: Transport,
    /// Completed after commit (or failure). Dropping it answers "unavailable".
    pub ack: tokio::sync::oneshot::Sender<AckResult>,
    /// Admission permits, one per reading, released when this submission is dropped.
    pub permit: tokio::sync::OwnedSemaphorePermit,
}

/// Readiness shared by the pipeline and the HTTP probes.
#[derive(Debug, Default)]
pub struct Health {
    /// The store is open and its last write succeeded.
    store_up: AtomicBool,
    /// Why the store is down, for `/readyz`.
    store_error: Mutex<Option<String>>,
    /// A shutdown signal arrived.
    shutting_down: AtomicBool,
}

impl Health {
    /// Records that the store works.
    pub fn set_store_up(&self) {
        self.store_up.store(true, Ordering::Release);
        *self.store_error.lock().expect("health lock") = None;
    }

    /// Records that the store failed, and why.
    pub fn set_store_down(&self, reason: String) {
        self.store_up.store(false, Ordering::Release);
        *self.store_error.lock().expect("health lock") = Some(reason);
    }

    /// Whether the store accepts writes.
    pub fn store_up(&self) -> bool {
        self.store_up.load(Ordering::Acquire)
    }

    /// Marks the service as shutting down; `/readyz` turns 503.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// `Ok` when ready for ingest, else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err("shutting down".into());
        }
        if !self.store_up() {
            let why = self.store_error.lock().expect("health lock").clone();
            return Err(format!(
                "store unavailable: {}",
                why.unwrap_or_else(|| "not opened yet".into())
            ));
        }
        Ok(())
    }
}

/// The running pipeline: its admission handle and its tasks.
pub struct Pipeline {
    /// Where handlers submit readings. Cheap to clone.
    pub admission: Admission,
    /// Tells the batcher to stop taking submissions and drain.
    drain: watch::Sender<bool>,
    /// The batcher task; ends after draining.
    batcher: JoinHandle<()>,
    /// The store writer task; ends after the batcher and the last commit.
    writer: JoinHandle<()>,
}

/// Creates the feed of committed readings for a service that runs on its own task after
/// the commit (the rule engine): bounded at `capacity` readings, full-policy `drop_newest`
/// (see the table above), its depth reported as `sluice_pipeline_queue_depth{stage}`.
pub fn committed_feed<T>(
    capacity: usize,
    stage: &'static str,
    metrics: &Metrics,
) -> (FeedSender<T>, FeedReceiver<T>) {
    metrics
        .queue_capacity
        .with_label_values(&[stage])
        .set(capacity as i64);
    feed::new(
        capacity,
        stage,
        metrics.queue_depth.with_label_values(&[stage]),
        metrics.rules_skipped.clone(),
    )
}

impl Pipeline {
    /// Creates the channels and starts the batcher and the store writer. The writer opens the
    /// store itself, retrying in the background if it cannot; until then ingest answers 503.
    pub fn start(
        settings: &Settings,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        services: Arc<Services>,
        reader: Arc<crate::store::ReaderSlot>,
    ) -> Self {
        let capacity = settings.pipeline.queue_capacity;
        // Each submission holds at least one reading, so this channel can never fill before
        // the semaphore does: the semaphore is the real bound, counted in readings.
        let (sub_tx, sub_rx) = mpsc::channel::<Submission>(capacity);
        let (batch_tx, batch_rx) = mpsc::channel::<batcher::Batch>(writer::BATCH_QUEUE);
        let (drain_tx, drain_rx) = watch::channel(false);

        metrics
            .queue_capacity
            .with_label_values(&["admission"])
            .set(capacity as i64);
        metrics
            .queue_capacity
            .with_label_values(&["store"])
            .set(writer::BATCH_QUEUE as i64);
        metrics.queue_depth.with_label_values(&["admission"]).set(0);
        metrics.queue_depth.with_label_values(&["store"]).set(0);

        let admission = Admission::new(sub_tx, capacity, metrics.clone(), health.clone());
        // The writer signals when it has nothing queued, so the batcher flushes at once.
        let writer_idle = Arc::new(tokio::sync::Notify::new());
        writer_idle.notify_one();
        let batcher = tokio::spawn(metrics.tasks.batcher.instrument(batcher::run(
            sub_rx,
            batch_tx,
            settings.pipeline.clone(),
            metrics.clone(),
            drain_rx,
            writer_idle.clone(),
        )));
        let writer = tokio::spawn(metrics.tasks.store.instrument(writer::run(
            batch_rx,
            writer::Ctx {
                settings: settings.storage.clone(),
                metrics: metrics.clone(),
                health,
                services,
                admission: admission.clone(),
                reader,
                logs: writer::Logs::default(),
            },
            writer_idle,
        )));
        Pipeline {
            admission,
            drain: drain_tx,
            batcher,
            writer,
        }
    }

    /// Stops admission, commits and acks everything already taken, and waits for the tasks.
    pub async fn drain(self) {
        let _ = self.drain.send(true);
        if let Err(e) = self.batcher.await {
            tracing::error!(error = %e, "batcher task failed");
        }
        if let Err(e) = self.writer.await {
            tracing::error!(error = %e, "store writer task failed");
        }
    }
}
