//! Device state: a post-commit service that remembers each device's `last_seen` and the
//! latest value of each of its metrics. It serves `GET /v1/devices` and `GET /v1/devices/{id}`.
//!
//! State lives in memory. The store persists the same state (the true `last_seen`, the newest
//! `ts` and the latest value of every metric) and hands it back at start-up, so a restart
//! shows each device exactly as before it.

use std::sync::RwLock;

use serde::Serialize;

use super::Service;
use crate::reading::{format_ts, MetricValue, PairsAsMap, Reading};
use crate::store::{merge_latest, DeviceLatest, DevicesQuery};

/// What is known about one device.
#[derive(Debug, Clone, Default)]
struct Entry {
    /// Server time (epoch ms) when a reading of this device was last committed.
    last_seen_ms: i64,
    /// Newest reading timestamp seen.
    last_ts_ms: i64,
    /// Latest value per metric, with the `ts` it was measured at.
    metrics: Vec<(String, MetricValue, i64)>,
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

/// The device-state service.
#[derive(Debug, Default)]
pub struct DeviceState {
    /// Device id → state. Written once per batch by the store writer, read by queries.
    devices: RwLock<foldhash::HashMap<String, Entry>>,
}

impl DeviceState {
    /// Empty state.
    pub fn new() -> Self {
        Self::default()
    }

    fn view(id: &str, e: &Entry) -> DeviceView {
        let pairs: Vec<(String, MetricValue)> =
            e.metrics.iter().map(|(n, v, _)| (n.clone(), *v)).collect();
        DeviceView {
            device_id: id.to_owned(),
            last_seen: format_ts(e.last_seen_ms),
            last_ts: format_ts(e.last_ts_ms),
            metrics: serde_json::to_value(PairsAsMap(&pairs)).unwrap_or_default(),
        }
    }

    /// The API's view of a device as the store's device table has it.
    pub fn view_of(d: &DeviceLatest) -> DeviceView {
        Self::view(
            &d.device_id,
            &Entry {
                last_seen_ms: d.last_seen_ms,
                last_ts_ms: d.last_ts_ms,
                metrics: d.metrics.clone(),
            },
        )
    }

    /// One device, if known.
    pub fn get(&self, id: &str) -> Option<DeviceView> {
        let devices = self.devices.read().expect("device state lock");
        devices.get(id).map(|e| Self::view(id, e))
    }

    /// Every known device, sorted by id.
    pub fn list(&self) -> Vec<DeviceView> {
        let devices = self.devices.read().expect("device state lock");
        let mut out: Vec<DeviceView> = devices.iter().map(|(id, e)| Self::view(id, e)).collect();
        out.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        out
    }

    /// The devices `q` selects, sorted by id, at most `q.limit`.
    pub fn page(&self, q: &DevicesQuery) -> Vec<DeviceView> {
        let devices = self.devices.read().expect("device state lock");
        let mut ids: Vec<&String> = devices.keys().filter(|id| q.selects(id)).collect();
        ids.sort_unstable();
        ids.truncate(q.limit);
        ids.into_iter()
            .map(|id| Self::view(id, &devices[id]))
            .collect()
    }

    /// Number of known devices.
    pub fn len(&self) -> usize {
        self.devices.read().expect("device state lock").len()
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
        for r in stored {
            let entry = match devices.get_mut(r.device_id.as_str()) {
                Some(e) => e,
                None => devices.entry(r.device_id.as_str().to_owned()).or_default(),
            };
            entry.last_seen_ms = now;
            entry.last_ts_ms = entry.last_ts_ms.max(r.ts_ms);
            merge_latest(&mut entry.metrics, r.ts_ms, &r.metrics);
        }
    }

    fn restore(&self, latest: &[DeviceLatest]) {
        let mut devices = self.devices.write().expect("device state lock");
        for l in latest {
            devices.insert(
                l.device_id.clone(),
                Entry {
                    last_seen_ms: l.last_seen_ms,
                    last_ts_ms: l.last_ts_ms,
                    metrics: l.metrics.clone(),
                },
            );
        }
    }
}
