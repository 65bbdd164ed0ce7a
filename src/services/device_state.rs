//! Device state: a post-commit service that remembers each device's `last_seen` and the
//! latest value of each of its metrics. It serves `GET /v1/devices` and `GET /v1/devices/{id}`.
//!
//! State lives in memory. The store persists the same state (the true `last_seen`, the newest
//! `ts` and the latest value of every metric) and hands it back at start-up, so a restart
//! shows each device exactly as before it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;

use super::Service;
use crate::reading::{format_ts, MetricValue, PairsAsMap, Reading};
use crate::store::{DeviceLatest, DevicesQuery};

/// The latest value of one metric of one device: 40 bytes, its name shared with every other
/// device that reports a metric of that name (see [`Devices::names`]).
#[derive(Debug, Clone)]
struct Latest {
    /// The metric name, interned.
    name: Arc<str>,
    /// Its latest value.
    value: MetricValue,
    /// The `ts` (epoch ms) that value was measured at.
    ts_ms: i64,
}

/// What is known about one device.
#[derive(Debug, Clone)]
struct Entry {
    /// Server time (epoch ms) when a reading of this device was last committed.
    last_seen_ms: i64,
    /// Newest reading timestamp seen.
    last_ts_ms: i64,
    /// Latest value per metric, in the order first reported, with no spare capacity.
    metrics: Vec<Latest>,
}

impl Default for Entry {
    /// Before its first reading: any `ts`, 1970 or earlier included, is newer.
    fn default() -> Self {
        Self {
            last_seen_ms: 0,
            last_ts_ms: i64::MIN,
            metrics: Vec::new(),
        }
    }
}

/// A device as the API shows it.
#[derive(Debug, Serialize)]
pub struct DeviceView {
    /// The device id.
    pub device_id: String,
    /// When its last reading was committed (server time, RFC 3339).
    pub last_seen: String,
    /// Timestamp of its newest reading.
    pub last_ts: String,
    /// Latest value of each metric it has reported.
    pub metrics: serde_json::Value,
}

/// How many recently committed devices [`DeviceState::recent`] can list.
pub const RECENT_CAPACITY: usize = 16;

/// The devices and the metric names they share, under one lock.
///
/// This is the one structure that grows with the fleet on every path, so it is kept small.
/// With 100 000 devices of four metrics each, heaptrack's peaks for it were 32 MB when each
/// device held its own `String` per metric name (a 48-byte slot plus the name's heap block),
/// and 25 MB with names interned (a 40-byte slot) and the key a `Box<str>`.
#[derive(Debug, Default)]
struct Devices {
    /// Device id → state.
    by_id: foldhash::HashMap<Box<str>, Entry>,
    /// Every metric name some device has reported, once. Names are never removed: a name
    /// stays as long as a device that reported it, and devices are never forgotten.
    names: foldhash::HashSet<Arc<str>>,
}

/// The shared copy of `name` in `names`, added if new.
fn intern(names: &mut foldhash::HashSet<Arc<str>>, name: &str) -> Arc<str> {
    if let Some(n) = names.get(name) {
        return n.clone();
    }
    let n: Arc<str> = Arc::from(name);
    names.insert(n.clone());
    n
}

impl Devices {
    /// Updates the latest value of each of `metrics`, measured at `ts_ms`, in `entry` (a
    /// newer or equal `ts` wins, as `crate::store::merge_latest` does for the store's copy).
    fn merge(
        names: &mut foldhash::HashSet<Arc<str>>,
        entry: &mut Entry,
        ts_ms: i64,
        metrics: &[(String, MetricValue)],
    ) {
        let mut added = false;
        for (name, value) in metrics {
            match entry.metrics.iter_mut().find(|l| *l.name == **name) {
                Some(l) if l.ts_ms <= ts_ms => {
                    l.value = *value;
                    l.ts_ms = ts_ms;
                }
                Some(_) => {}
                None => {
                    entry.metrics.push(Latest {
                        name: intern(names, name),
                        value: *value,
                        ts_ms,
                    });
                    added = true;
                }
            }
        }
        if added {
            // A device's metrics rarely change: exact capacity, once, not a doubled Vec.
            entry.metrics.shrink_to_fit();
        }
    }
}

/// The device-state service.
#[derive(Debug, Default)]
pub struct DeviceState {
    /// Device id → state. Written once per batch by the store writer, read by queries.
    devices: RwLock<Devices>,
    /// The devices of the latest commits, newest first, without repeats, at most
    /// [`RECENT_CAPACITY`]: for the status page, which must not scan every device.
    recent: Mutex<VecDeque<String>>,
}

impl DeviceState {
    /// Empty state.
    pub fn new() -> Self {
        Self::default()
    }

    fn view(id: &str, e: &Entry) -> DeviceView {
        let pairs: Vec<(String, MetricValue)> = e
            .metrics
            .iter()
            .map(|l| (l.name.to_string(), l.value))
            .collect();
        Self::view_parts(id, e.last_seen_ms, e.last_ts_ms, &pairs)
    }

    fn view_parts(
        id: &str,
        last_seen_ms: i64,
        last_ts_ms: i64,
        pairs: &[(String, MetricValue)],
    ) -> DeviceView {
        DeviceView {
            device_id: id.to_owned(),
            last_seen: format_ts(last_seen_ms),
            last_ts: format_ts(last_ts_ms),
            metrics: serde_json::to_value(PairsAsMap(pairs)).unwrap_or_default(),
        }
    }

    /// The API's view of a device as the store's device table has it.
    pub fn view_of(d: &DeviceLatest) -> DeviceView {
        let pairs: Vec<(String, MetricValue)> =
            d.metrics.iter().map(|(n, v, _)| (n.clone(), *v)).collect();
        Self::view_parts(&d.device_id, d.last_seen_ms, d.last_ts_ms, &pairs)
    }

    /// One device, if known.
    pub fn get(&self, id: &str) -> Option<DeviceView> {
        let devices = self.devices.read().expect("device state lock");
        devices.by_id.get(id).map(|e| Self::view(id, e))
    }

    /// Every known device, sorted by id.
    pub fn list(&self) -> Vec<DeviceView> {
        let devices = self.devices.read().expect("device state lock");
        let mut out: Vec<DeviceView> = devices
            .by_id
            .iter()
            .map(|(id, e)| Self::view(id, e))
            .collect();
        out.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        out
    }

    /// The devices `q` selects, sorted by id, at most `q.limit`: one pass over the known
    /// devices that keeps the `q.limit` smallest ids in a heap, O(n log limit) under the read
    /// lock, whatever the prefix or glob. Callers run it off the event loop.
    pub fn page(&self, q: &DevicesQuery) -> Vec<DeviceView> {
        let devices = self.devices.read().expect("device state lock");
        let mut smallest: std::collections::BinaryHeap<&Box<str>> =
            std::collections::BinaryHeap::with_capacity(q.limit.min(devices.by_id.len()) + 1);
        for id in devices.by_id.keys() {
            if smallest.len() == q.limit && smallest.peek().is_none_or(|max| id >= *max) {
                continue;
            }
            if !q.selects(id) {
                continue;
            }
            smallest.push(id);
            if smallest.len() > q.limit {
                smallest.pop();
            }
        }
        smallest
            .into_sorted_vec()
            .into_iter()
            .map(|id| Self::view(id, &devices.by_id[id]))
            .collect()
    }

    /// Up to `n` (at most [`RECENT_CAPACITY`]) devices of the latest commits, the most
    /// recently committed first, with their state.
    pub fn recent(&self, n: usize) -> Vec<DeviceView> {
        let ids: Vec<String> = {
            let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            recent.iter().take(n).cloned().collect()
        };
        ids.iter().filter_map(|id| self.get(id)).collect()
    }

    /// Number of known devices.
    pub fn len(&self) -> usize {
        self.devices.read().expect("device state lock").by_id.len()
    }

    /// Whether no device is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Service for DeviceState {
    fn name(&self) -> &'static str {
        "device_state"
    }

    fn after_commit(&self, stored: &[&Reading], commit_ms: i64) {
        if stored.is_empty() {
            return;
        }
        let now = commit_ms;
        let mut devices = self.devices.write().expect("device state lock");
        let Devices { by_id, names } = &mut *devices;
        for r in stored {
            let entry = match by_id.get_mut(r.device_id.as_str()) {
                Some(e) => e,
                None => by_id.entry(r.device_id.as_str().into()).or_default(),
            };
            entry.last_seen_ms = now;
            entry.last_ts_ms = entry.last_ts_ms.max(r.ts_ms);
            Devices::merge(names, entry, r.ts_ms, &r.metrics);
        }
        drop(devices);
        // The batch's last distinct devices go in front: a few comparisons per batch, not per
        // reading.
        let mut newest: Vec<&str> = Vec::with_capacity(RECENT_CAPACITY);
        for r in stored.iter().rev() {
            let id = r.device_id.as_str();
            if !newest.contains(&id) {
                newest.push(id);
                if newest.len() == RECENT_CAPACITY {
                    break;
                }
            }
        }
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.retain(|id| !newest.contains(&id.as_str()));
        for id in newest.into_iter().rev() {
            recent.push_front(id.to_owned());
        }
        recent.truncate(RECENT_CAPACITY);
    }

    fn restore(&self, latest: &[DeviceLatest]) {
        // The most recently seen devices of the store seed the recent list.
        let mut by_seen: Vec<&DeviceLatest> = latest.iter().collect();
        let n = by_seen.len().min(RECENT_CAPACITY);
        if n > 0 {
            by_seen.select_nth_unstable_by(n - 1, |a, b| b.last_seen_ms.cmp(&a.last_seen_ms));
            by_seen.truncate(n);
            by_seen.sort_by_key(|d| std::cmp::Reverse(d.last_seen_ms));
            *self.recent.lock().unwrap_or_else(|e| e.into_inner()) =
                by_seen.iter().map(|d| d.device_id.clone()).collect();
        }
        let mut devices = self.devices.write().expect("device state lock");
        let Devices { by_id, names } = &mut *devices;
        for l in latest {
            let metrics: Vec<Latest> = l
                .metrics
                .iter()
                .map(|(name, value, ts_ms)| Latest {
                    name: intern(names, name),
                    value: *value,
                    ts_ms: *ts_ms,
                })
                .collect();
            by_id.insert(
                l.device_id.as_str().into(),
                Entry {
                    last_seen_ms: l.last_seen_ms,
                    last_ts_ms: l.last_ts_ms,
                    metrics,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{DeviceId, MetricValue};

    fn reading(device: &str) -> Reading {
        Reading {
            device_id: DeviceId::parse(device).unwrap(),
            ts_ms: 1,
            seq: None,
            metrics: vec![("t".into(), MetricValue::Int(1))],
            tags: vec![],
        }
    }

    #[test]
    fn a_page_is_the_smallest_selected_ids_in_order() {
        let state = DeviceState::new();
        // Ids in a scrambled order, so the heap sees them unsorted.
        let batch: Vec<Reading> = (0..500u64)
            .map(|i| reading(&format!("d{:03}", (i * 7919) % 500)))
            .collect();
        state.after_commit(&batch.iter().collect::<Vec<_>>(), 10);
        let ids = |q: &DevicesQuery| -> Vec<String> {
            state.page(q).into_iter().map(|d| d.device_id).collect()
        };
        let q = DevicesQuery {
            prefix: Some("d1".into()),
            after: Some("d104".into()),
            glob: Some(crate::store::DeviceGlob::new("d1?5")),
            limit: 3,
            ..DevicesQuery::default()
        };
        assert_eq!(ids(&q), ["d105", "d115", "d125"]);
        let all = DevicesQuery {
            limit: usize::MAX,
            ..DevicesQuery::default()
        };
        let listed = ids(&all);
        assert_eq!(listed.len(), 500);
        assert!(listed.windows(2).all(|w| w[0] < w[1]));
        assert!(ids(&DevicesQuery { limit: 0, ..all }).is_empty());
    }

    /// A device whose only readings are from before 1970 shows the newest of them.
    #[test]
    fn last_ts_may_be_before_1970() {
        let state = DeviceState::new();
        let mut old = reading("old");
        old.ts_ms = -1_500;
        let mut older = reading("old");
        older.ts_ms = -86_400_000;
        state.after_commit(&[&older, &old], 10);
        assert_eq!(
            state.get("old").unwrap().last_ts,
            "1969-12-31T23:59:58.500Z"
        );
    }

    /// The newest `ts` wins per metric (ties go to the later commit), metrics missing from
    /// a reading keep their value, and a name is stored once for all devices.
    #[test]
    fn latest_values_merge_by_ts_and_names_are_shared() {
        let state = DeviceState::new();
        let at = |device: &str, ts_ms: i64, metrics: &[(&str, MetricValue)]| Reading {
            device_id: DeviceId::parse(device).unwrap(),
            ts_ms,
            seq: None,
            metrics: metrics.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect(),
            tags: vec![],
        };
        let first = [
            at(
                "a",
                10,
                &[("t", MetricValue::Int(1)), ("h", MetricValue::Float(0.5))],
            ),
            at("b", 10, &[("t", MetricValue::UInt(u64::MAX))]),
        ];
        state.after_commit(&first.iter().collect::<Vec<_>>(), 100);
        let later = [
            // Older than what `a` has for `t`: ignored; `v` is new.
            at(
                "a",
                5,
                &[("t", MetricValue::Int(2)), ("v", MetricValue::Bool(true))],
            ),
            // Same `ts` as the stored `h`: the later commit wins.
            at("a", 10, &[("h", MetricValue::Float(-0.0))]),
        ];
        state.after_commit(&later.iter().collect::<Vec<_>>(), 200);
        let a = state.get("a").unwrap();
        assert_eq!(
            a.metrics,
            serde_json::json!({"t": 1, "h": -0.0, "v": true}),
            "{a:?}"
        );
        assert_eq!(a.last_seen, format_ts(200));
        assert_eq!(a.last_ts, format_ts(10));
        assert_eq!(
            state.get("b").unwrap().metrics,
            serde_json::json!({"t": u64::MAX})
        );
        let devices = state.devices.read().unwrap();
        let t_of = |id: &str| devices.by_id[id].metrics[0].name.clone();
        assert!(Arc::ptr_eq(&t_of("a"), &t_of("b")));
        assert_eq!(devices.names.len(), 3);
        assert!(devices
            .by_id
            .values()
            .all(|e| e.metrics.capacity() == e.metrics.len()));
    }

    #[test]
    fn recent_devices_are_the_latest_committed_first_without_repeats() {
        let state = DeviceState::new();
        let batch: Vec<Reading> = (0..20).map(|i| reading(&format!("d{i}"))).collect();
        state.after_commit(&batch.iter().collect::<Vec<_>>(), 10);
        let ids = |n| -> Vec<String> { state.recent(n).into_iter().map(|d| d.device_id).collect() };
        assert_eq!(ids(3), ["d19", "d18", "d17"]);
        assert_eq!(ids(100).len(), RECENT_CAPACITY);
        let again = [reading("d5"), reading("x"), reading("d5")];
        state.after_commit(&again.iter().collect::<Vec<_>>(), 11);
        assert_eq!(ids(4), ["d5", "x", "d19", "d18"]);
        // A restart seeds the list from the store's last_seen.
        let restored = DeviceState::new();
        restored.restore(&[
            DeviceLatest {
                device_id: "old".into(),
                last_seen_ms: 1,
                last_ts_ms: 1,
                metrics: vec![],
            },
            DeviceLatest {
                device_id: "new".into(),
                last_seen_ms: 9,
                last_ts_ms: 1,
                metrics: vec![],
            },
        ]);
        let ids: Vec<String> = restored
            .recent(5)
            .into_iter()
            .map(|d| d.device_id)
            .collect();
        assert_eq!(ids, ["new", "old"]);
    }
}
