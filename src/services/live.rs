//! Live fan-out: a post-commit service that copies committed readings to `/v1/live`
//! subscribers (SPEC §5).
//!
//! Each subscriber has its own bounded buffer, counted in readings. Fan-out only ever
//! `try_send`s: a subscriber whose buffer is full misses the reading, the miss is counted,
//! and the subscriber is told `{"type":"lagged","missed":n}` when it catches up. A slow
//! subscriber can therefore never slow ingest or the other subscribers.
//!
//! Alert subscribers (`/v1/live?type=alert`, SPEC §12) are kept in the same registry and get
//! alert events from the rule engine ([`Live::deliver_alert`]) instead of readings, with the
//! same buffer, filters and `lagged` reports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use tokio::sync::mpsc;
use wildmatch::WildMatch;

use super::Service;
use crate::reading::{format_ts, PairsAsMap, Reading};

/// One reading as the live stream sends it; serialised once and shared by every subscriber.
pub type LiveMessage = Arc<str>;

/// A subscriber's filters and its buffer.
pub struct Subscriber {
    /// Unique per subscription, to remove it again.
    id: u64,
    /// `device=` glob; `None` matches every device.
    device: Option<WildMatch>,
    /// `metric=` glob; a reading matches if any of its metric names does.
    metric: Option<WildMatch>,
    /// The bounded buffer.
    tx: mpsc::Sender<LiveMessage>,
    /// Readings dropped because the buffer was full, not yet reported.
    missed: AtomicU64,
    /// Takes alert events (`type=alert`) rather than readings.
    alerts: bool,
}

impl Subscriber {
    fn matches(&self, r: &Reading) -> bool {
        self.matches_parts(
            r.device_id.as_str(),
            r.metrics.iter().map(|(n, _)| n.as_str()),
        )
    }

    /// Whether a reading of `device` carrying metrics named `metrics` passes the filters.
    fn matches_parts<'a>(&self, device: &str, mut metrics: impl Iterator<Item = &'a str>) -> bool {
        self.device.as_ref().is_none_or(|g| g.matches(device))
            && self
                .metric
                .as_ref()
                .is_none_or(|g| metrics.any(|name| g.matches(name)))
    }

    /// Offers `msg`; a full buffer counts a miss.
    fn offer(&self, msg: LiveMessage) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(msg) {
            self.missed.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Takes the count of readings missed since the last call.
    pub fn take_missed(&self) -> u64 {
        self.missed.swap(0, Ordering::AcqRel)
    }
}

/// Removes its subscription when dropped.
pub struct Subscription {
    /// The subscriber, for `take_missed`.
    pub subscriber: Arc<Subscriber>,
    /// The registry to remove it from.
    live: Arc<Live>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let id = self.subscriber.id;
        self.live
            .subscribers
            .write()
            .expect("live lock")
            .retain(|s| s.id != id);
    }
}

/// The live fan-out service.
#[derive(Default)]
pub struct Live {
    /// Current subscribers. Read per batch by the store writer, written on (un)subscribe.
    subscribers: RwLock<Vec<Arc<Subscriber>>>,
    /// Next subscription id.
    next_id: AtomicU64,
}

#[derive(Serialize)]
struct LiveReading<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    device_id: &'a str,
    ts: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    metrics: PairsAsMap<'a, crate::reading::MetricValue>,
    tags: PairsAsMap<'a, String>,
}

impl Live {
    /// A registry with no subscribers.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Subscribes with optional globs and a buffer of `buffer` readings.
    pub fn subscribe(
        self: &Arc<Self>,
        device: Option<&str>,
        metric: Option<&str>,
        buffer: usize,
    ) -> (Subscription, mpsc::Receiver<LiveMessage>) {
        self.add(device, metric, buffer, false)
    }

    /// Subscribes to alert events (`/v1/live?type=alert`): `device` filters the device,
    /// `metric` the metric of the rule (absence rules have none, so a metric filter leaves
    /// them out).
    pub fn subscribe_alerts(
        self: &Arc<Self>,
        device: Option<&str>,
        metric: Option<&str>,
        buffer: usize,
    ) -> (Subscription, mpsc::Receiver<LiveMessage>) {
        self.add(device, metric, buffer, true)
    }

    /// Hands an alert event (already JSON) to the matching alert subscribers; never waits.
    pub fn deliver_alert(&self, device: &str, metric: Option<&str>, msg: LiveMessage) {
        let subscribers = self.subscribers.read().expect("live lock");
        for s in subscribers
            .iter()
            .filter(|s| s.alerts && s.matches_parts(device, metric.into_iter()))
        {
            s.offer(msg.clone());
        }
    }

    fn add(
        self: &Arc<Self>,
        device: Option<&str>,
        metric: Option<&str>,
        buffer: usize,
        alerts: bool,
    ) -> (Subscription, mpsc::Receiver<LiveMessage>) {
        let (tx, rx) = mpsc::channel(buffer);
        let subscriber = Arc::new(Subscriber {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            device: device.map(WildMatch::new),
            metric: metric.map(WildMatch::new),
            tx,
            missed: AtomicU64::new(0),
            alerts,
        });
        self.subscribers
            .write()
            .expect("live lock")
            .push(subscriber.clone());
        (
            Subscription {
                subscriber,
                live: self.clone(),
            },
            rx,
        )
    }

    /// Number of subscribers.
    pub fn len(&self) -> usize {
        self.subscribers.read().expect("live lock").len()
    }

    /// Whether nobody is subscribed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Delivers a reading that another replica committed (received over NATS, already in
    /// the live stream's JSON) to the matching subscribers, as [`Service::after_commit`]
    /// does for this replica's own.
    pub fn deliver_remote<'a>(
        &self,
        device: &str,
        metrics: impl Iterator<Item = &'a str> + Clone,
        msg: LiveMessage,
    ) {
        let subscribers = self.subscribers.read().expect("live lock");
        for s in subscribers
            .iter()
            .filter(|s| !s.alerts && s.matches_parts(device, metrics.clone()))
        {
            s.offer(msg.clone());
        }
    }
}

/// One reading in the live stream's JSON (SPEC §5): `{"type":"reading","device_id","ts",
/// "seq","metrics","tags"}`. Also the payload published to NATS (SPEC §13).
pub fn render_parts(
    device: &str,
    ts_ms: i64,
    seq: Option<u64>,
    metrics: &[(String, crate::reading::MetricValue)],
    tags: &[(String, String)],
) -> LiveMessage {
    let msg = LiveReading {
        kind: "reading",
        device_id: device,
        ts: format_ts(ts_ms),
        seq,
        metrics: PairsAsMap(metrics),
        tags: PairsAsMap(tags),
    };
    serde_json::to_string(&msg).unwrap_or_default().into()
}

fn render(r: &Reading) -> LiveMessage {
    render_parts(r.device_id.as_str(), r.ts_ms, r.seq, &r.metrics, &r.tags)
}

impl Service for Live {
    fn name(&self) -> &'static str {
        "live"
    }

    fn after_commit(&self, stored: &[&Reading], _commit_ms: i64) {
        let subscribers = self.subscribers.read().expect("live lock");
        if subscribers.is_empty() {
            return;
        }
        for r in stored {
            let mut rendered: Option<LiveMessage> = None;
            for s in subscribers.iter().filter(|s| !s.alerts && s.matches(r)) {
                s.offer(rendered.get_or_insert_with(|| render(r)).clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{DeviceId, MetricValue};

    fn r(device: &str, metric: &str) -> Reading {
        Reading {
            device_id: DeviceId::parse(device).unwrap(),
            ts_ms: 0,
            seq: Some(1),
            metrics: vec![(metric.into(), MetricValue::Int(1))],
            tags: vec![],
        }
    }

    #[test]
    fn filters_and_lag() {
        let live = Live::new();
        let (sub, mut rx) = live.subscribe(Some("green*"), Some("temp?"), 2);
        let a = r("greenhouse-1", "temp1");
        let b = r("barn-1", "temp1");
        let c = r("greenhouse-2", "humidity");
        live.after_commit(&[&a, &b, &c, &a, &a], 0);
        let first = rx.try_recv().unwrap();
        assert!(first.contains("\"device_id\":\"greenhouse-1\""), "{first}");
        assert!(first.starts_with("{\"type\":\"reading\""));
        assert!(rx.try_recv().is_ok());
        assert!(
            rx.try_recv().is_err(),
            "only matching readings, and only 2 buffered"
        );
        assert_eq!(sub.subscriber.take_missed(), 1);
        assert_eq!(sub.subscriber.take_missed(), 0);
        assert_eq!(live.len(), 1);
        drop(sub);
        assert_eq!(live.len(), 0);
    }
}
