//! The bounded outbox of an action: rule engine → **outbox** → one action's delivery task
//! (webhook, MQTT). The one queue type every in-memory output uses.
//!
//! A fixed number of items (`alerts.queue_capacity`), a named full-policy, and a drop
//! counter: the producer only ever `offer`s, so a dead receiver can never hold up the rule
//! engine (nor, behind it, ingest). What does not fit is dropped and counted, at one place
//! that both logs (limited) and counts.
//!
//! The NATS output does not use it: it must deliver every committed reading at least once,
//! across outages and restarts, so its queue is the store's durable outbox (the journal, or
//! PostgreSQL's `outbox` table), which a full-policy that drops could not honour. Alert events
//! are few, and a missed notification is counted and visible in `sluice_alert_notifications_total`
//! while the alert itself stays in `GET /v1/alerts`.

use prometheus::{IntCounter, IntGauge};
use tokio::sync::mpsc;

use crate::telemetry::log_limit::LogLimit;
use crate::telemetry::metrics::Metrics;

/// What an outbox does with an item when it is full (the vocabulary of `pipeline`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullPolicy {
    /// The new item is not queued; it is counted as dropped. The producer never waits.
    DropNewest,
}

impl FullPolicy {
    /// The policy's name, as logs and ARCHITECTURE.md say it.
    pub fn as_str(self) -> &'static str {
        match self {
            FullPolicy::DropNewest => "drop_newest",
        }
    }
}

/// The producer's end: never waits.
pub struct OutboxSender<T> {
    /// The bounded queue.
    tx: mpsc::Sender<T>,
    /// Items queued (`sluice_alert_queue_depth{action}`).
    depth: IntGauge,
    /// Items dropped (`sluice_alert_notifications_total{action,result="dropped"}`).
    dropped: IntCounter,
    /// The action's name, for logs.
    action: &'static str,
    /// "Queue full" repeats while the receiver is away.
    full: LogLimit,
}

/// The delivery task's end.
pub struct OutboxReceiver<T> {
    /// The bounded queue.
    rx: mpsc::Receiver<T>,
    /// Items queued.
    depth: IntGauge,
    /// Items dropped: the delivery task counts what it gives up on here too.
    pub dropped: IntCounter,
}

/// An outbox of `capacity` items for `action` (`webhook`, `mqtt`), reporting into the
/// `sluice_alert_*` metrics of that action.
pub fn outbox<T>(
    action: &'static str,
    capacity: usize,
    metrics: &Metrics,
) -> (OutboxSender<T>, OutboxReceiver<T>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let depth = metrics.alert_queue_depth.with_label_values(&[action]);
    let dropped = metrics
        .alert_notifications
        .with_label_values(&[action, "dropped"]);
    metrics
        .alert_queue_capacity
        .with_label_values(&[action])
        .set(capacity as i64);
    depth.set(0);
    (
        OutboxSender {
            tx,
            depth: depth.clone(),
            dropped: dropped.clone(),
            action,
            full: LogLimit::new(),
        },
        OutboxReceiver { rx, depth, dropped },
    )
}

impl<T> OutboxSender<T> {
    /// The full-policy of every outbox.
    pub const POLICY: FullPolicy = FullPolicy::DropNewest;

    /// Queues `item`, or drops and counts it when the outbox is full (or its task is gone).
    /// Returns whether it was queued.
    pub fn offer(&self, item: T) -> bool {
        match self.tx.try_send(item) {
            Ok(()) => {
                if let Some(dropped) = self.full.recovered() {
                    tracing::info!(
                        action = self.action,
                        dropped,
                        "alert queue taking events again"
                    );
                }
                self.depth
                    .set((self.tx.max_capacity() - self.tx.capacity()) as i64);
                true
            }
            Err(_) => {
                self.dropped.inc();
                if let Some(suppressed) = self.full.event() {
                    tracing::warn!(
                        action = self.action,
                        capacity = self.tx.max_capacity(),
                        policy = Self::POLICY.as_str(),
                        suppressed,
                        "alert queue full: event dropped"
                    );
                }
                false
            }
        }
    }
}

impl<T> OutboxReceiver<T> {
    /// The next item; `None` when the producer is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        let item = self.rx.recv().await;
        self.depth.set(self.rx.len() as i64);
        item
    }

    /// Drops and counts everything still queued (at shutdown, past the budget). Returns how
    /// many.
    pub fn drop_rest(&mut self) -> u64 {
        self.rx.close();
        let mut n = 0;
        while self.rx.try_recv().is_ok() {
            n += 1;
        }
        self.dropped.inc_by(n);
        self.depth.set(0);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_outbox_drops_the_newest_and_counts() {
        let metrics = Metrics::new();
        let (tx, mut rx) = outbox::<u32>("webhook", 2, &metrics);
        assert!(tx.offer(1) && tx.offer(2));
        assert!(!tx.offer(3));
        let depth = metrics.alert_queue_depth.with_label_values(&["webhook"]);
        assert_eq!((depth.get(), rx.dropped.get()), (2, 1));
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(depth.get(), 1);
        assert_eq!(rx.drop_rest(), 1);
        assert_eq!(rx.dropped.get(), 2);
        assert!(!tx.offer(4), "closed: dropped and counted");
        assert_eq!(rx.dropped.get(), 3);
    }
}
