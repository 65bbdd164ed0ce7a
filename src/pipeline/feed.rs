//! The committed-readings feed: store writer (after commit) → **feed** → a service that runs
//! on its own task after the commit (the rule engine).
//!
//! Bounded in readings, like admission: a batch takes one permit per reading, which it gives
//! back when the consumer takes it. The full-policy is `drop_newest`: a batch that finds no
//! room is not queued; its readings are counted as skipped (one place logs and counts) and the
//! writer goes on at once. The commit and its acks never wait for the consumer. The feed is
//! created by [`super::committed_feed`], like every channel of the pipeline.

use std::sync::Arc;

use prometheus::{IntCounter, IntGauge};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::telemetry::log_limit::LogLimit;

/// A batch not taken because the feed was full; repeats while the consumer is behind.
static SKIPPING: LogLimit = LogLimit::new();

/// The writer's end: offers batches, never waits.
pub struct FeedSender<T> {
    /// The queue; its own bound (one slot per permit) is never the one that fills.
    tx: mpsc::Sender<(T, OwnedSemaphorePermit)>,
    /// One permit per queued reading.
    permits: Arc<Semaphore>,
    /// The bound, in readings.
    capacity: usize,
    /// `sluice_pipeline_queue_depth{stage}`, in readings.
    depth: IntGauge,
    /// Readings skipped because the feed was full.
    skipped: IntCounter,
    /// The stage name, for the log line.
    stage: &'static str,
}

/// The consumer's end.
pub struct FeedReceiver<T> {
    /// The queue.
    rx: mpsc::Receiver<(T, OwnedSemaphorePermit)>,
    /// Shared with the sender, to report the depth.
    permits: Arc<Semaphore>,
    /// The bound, in readings.
    capacity: usize,
    /// `sluice_pipeline_queue_depth{stage}`.
    depth: IntGauge,
}

/// A feed of `capacity` readings reporting into `depth`, counting skips into `skipped`.
pub(super) fn new<T>(
    capacity: usize,
    stage: &'static str,
    depth: IntGauge,
    skipped: IntCounter,
) -> (FeedSender<T>, FeedReceiver<T>) {
    let capacity = capacity.max(1);
    let permits = Arc::new(Semaphore::new(capacity));
    let (tx, rx) = mpsc::channel(capacity);
    depth.set(0);
    (
        FeedSender {
            tx,
            permits: permits.clone(),
            capacity,
            depth: depth.clone(),
            skipped,
            stage,
        },
        FeedReceiver {
            rx,
            permits,
            capacity,
            depth,
        },
    )
}

impl<T> FeedSender<T> {
    /// Whether `n` readings would be taken now (a batch larger than the whole feed takes
    /// all of it). Lets the caller skip building a batch that would be dropped.
    pub fn has_room(&self, n: usize) -> bool {
        self.permits.available_permits() >= n.min(self.capacity)
    }

    /// Counts `n` readings the consumer will never see, and logs (limited) that it is behind.
    pub fn skip(&self, n: usize) {
        self.skipped.inc_by(n as u64);
        if let Some(suppressed) = SKIPPING.event() {
            tracing::warn!(
                stage = self.stage,
                readings = n,
                capacity = self.capacity,
                suppressed,
                "after-commit feed full: a committed batch is skipped (drop_newest)"
            );
        }
    }

    /// Queues `item` weighing `n` readings, or counts it as skipped when there is no room
    /// (or the consumer is gone). Returns whether it was queued.
    pub fn offer(&self, item: T, n: usize) -> bool {
        let want = n.min(self.capacity).max(1) as u32;
        let Ok(permit) = self.permits.clone().try_acquire_many_owned(want) else {
            self.skip(n);
            return false;
        };
        if self.tx.try_send((item, permit)).is_err() {
            self.skip(n);
            return false;
        }
        if let Some(failures) = SKIPPING.recovered() {
            tracing::info!(
                stage = self.stage,
                skipped_batches = failures,
                "after-commit feed taking batches again"
            );
        }
        self.depth
            .set((self.capacity - self.permits.available_permits()) as i64);
        true
    }
}

impl<T> FeedReceiver<T> {
    /// The next batch; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        let (item, permit) = self.rx.recv().await?;
        drop(permit);
        self.depth
            .set((self.capacity - self.permits.available_permits()) as i64);
        Some(item)
    }

    /// The next batch if one is queued now.
    pub fn try_recv(&mut self) -> Option<T> {
        let (item, permit) = self.rx.try_recv().ok()?;
        drop(permit);
        self.depth
            .set((self.capacity - self.permits.available_permits()) as i64);
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_feed_skips_and_counts_without_waiting() {
        let depth = IntGauge::new("d", "d").unwrap();
        let skipped = IntCounter::new("s", "s").unwrap();
        let (tx, mut rx) = new::<u32>(10, "rules", depth.clone(), skipped.clone());
        assert!(tx.offer(1, 6));
        assert!(!tx.has_room(5));
        assert!(!tx.offer(2, 5), "no room: dropped");
        assert!(tx.offer(3, 4));
        assert_eq!((depth.get(), skipped.get()), (10, 5));
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(depth.get(), 4);
        assert_eq!(rx.try_recv(), Some(3));
        assert!(
            tx.offer(4, 50),
            "a batch larger than the feed takes all of it"
        );
        assert_eq!(rx.try_recv(), Some(4));
        drop(tx);
        assert_eq!(rx.recv().await, None);
    }
}
