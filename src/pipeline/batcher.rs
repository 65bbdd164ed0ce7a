//! The batcher: admission → **batcher** → store writer.
//!
//! It groups submissions into batches and flushes a batch as soon as the store writer is idle,
//! or once it holds `pipeline.batch_max` readings, or once its first submission has waited
//! `pipeline.batch_max_delay`, whichever comes first. While the writer is busy committing,
//! submissions gather here, so the next batch picks up everything that arrived during the
//! previous commit: that is the group commit that makes durability cost latency rather than
//! throughput. Flushing when the writer goes idle keeps the writer (whose time is mostly the
//! journal's fsync) busy back to back under load, and adds no wait at low load.
//!
//! A submission is never split, so a batch may exceed `batch_max` by less than one request.

use std::sync::Arc;

use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::{Submission, Unavailable};
use crate::config::PipelineSettings;
use crate::telemetry::log_limit::LogLimit;
use crate::telemetry::metrics::Metrics;

/// Submissions committed together in one transaction.
#[derive(Default)]
pub struct Batch {
    /// In arrival order.
    pub submissions: Vec<Submission>,
    /// Total readings over all submissions.
    pub readings: usize,
}

impl Batch {
    fn push(&mut self, s: Submission) {
        self.readings += s.readings.len();
        self.submissions.push(s);
    }
}

/// Runs until the admission channel is closed and empty. `drain` turning `true` closes it:
/// no new submissions are taken, and those already queued are still batched and committed.
pub async fn run(
    mut rx: mpsc::Receiver<Submission>,
    tx: mpsc::Sender<Batch>,
    settings: PipelineSettings,
    metrics: Arc<Metrics>,
    mut drain: watch::Receiver<bool>,
    writer_idle: Arc<Notify>,
) {
    let store_depth = metrics.queue_depth.with_label_values(&["store"]);
    // Every batch fails alike once the writer is gone: one line, then one per 30 s.
    let writer_gone = LogLimit::new();
    let mut draining = false;
    loop {
        let first = if draining {
            rx.recv().await
        } else {
            tokio::select! {
                biased;
                s = rx.recv() => s,
                _ = drain.wait_for(|d| *d) => {
                    tracing::info!("batcher draining");
                    rx.close();
                    draining = true;
                    continue;
                }
            }
        };
        let Some(first) = first else { break };
        let deadline = Instant::now() + settings.batch_max_delay;
        let mut batch = Batch::default();
        batch.push(first);
        while batch.readings < settings.batch_max {
            // Take what is already queued without waiting; wait only for the remainder.
            match rx.try_recv() {
                Ok(s) => {
                    batch.push(s);
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            tokio::select! {
                biased;
                _ = writer_idle.notified() => break,
                s = rx.recv() => match s {
                    Some(s) => batch.push(s),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if let Err(mpsc::error::SendError(batch)) = tx.send(batch).await {
            // The writer is gone (it only stops after we do, so this is a bug or a panic):
            // answer rather than leave handlers waiting.
            if let Some(suppressed) = writer_gone.event() {
                tracing::error!(suppressed, "store writer stopped; refusing batch");
            }
            for s in batch.submissions {
                let _ = s.ack.send(Err(Unavailable("store writer stopped".into())));
            }
        }
        store_depth.set((tx.max_capacity() - tx.capacity()) as i64);
    }
    tracing::info!("batcher drained");
}
