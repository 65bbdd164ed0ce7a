//! What the run has seen so far: counters, latency histograms, and a few sample problems.
//!
//! Every transport reports here through [`Stats::settle`] (an answer that covers some readings)
//! or the plain counters. The progress line, the ramp controller and the final
//! [`crate::summary::Summary`] all read from it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::fleet::Item;
use crate::verify::AckLog;

/// Longest latency the histograms hold, in microseconds (10 minutes); longer ones are clamped.
const MAX_LATENCY_US: u64 = 600_000_000;
/// How many problem descriptions are kept for the summary.
const MAX_SAMPLES: usize = 10;

/// A counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Subtracts one.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }
    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
    /// Raises the value to `v` if it is lower.
    pub fn max(&self, v: u64) {
        self.0.fetch_max(v, Relaxed);
    }
}

/// The server's answer to one request or frame that was taken (HTTP 200/422, a WebSocket ack).
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct Answer {
    /// Readings committed.
    #[serde(default)]
    pub accepted: u64,
    /// Readings that repeated a stored `(device_id, seq)`.
    #[serde(default)]
    pub duplicates: u64,
    /// Readings refused, by index in the request or frame.
    #[serde(default)]
    pub rejected: Vec<Rejected>,
}

/// One entry of `rejected`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Rejected {
    /// Index of the reading in its request or frame.
    pub index: usize,
    /// `field: reason`.
    pub error: String,
    /// The server's `reason` label (`invalid_ts`, `rate_limited`, …), when it gives one.
    #[serde(default)]
    pub reason: Option<String>,
}

impl Rejected {
    /// Refused for the device's rate limit (SPEC §11): to be sent again later, not a failure.
    pub fn is_rate_limited(&self) -> bool {
        self.reason.as_deref() == Some("rate_limited") || self.error.contains("rate_limited")
    }
}

/// All counters of a run. Counts are of readings unless the name says otherwise.
#[derive(Debug)]
pub struct Stats {
    /// Readings written to the wire for the first time (valid and injected faults).
    pub sent: Counter,
    /// Readings written again after a refusal or a lost connection.
    pub resent: Counter,
    /// Valid readings acknowledged (accepted or duplicate; for MQTT, PUBACKed by the broker).
    pub acked: Counter,
    /// The server's `accepted` counts, summed.
    pub accepted: Counter,
    /// The server's `duplicates` counts, summed.
    pub duplicates: Counter,
    /// Readings the server listed in `rejected`.
    pub rejected: Counter,
    /// Injected faults rejected naming the expected field.
    pub rejected_expected: Counter,
    /// Injected faults rejected, but naming another field.
    pub rejected_wrong_field: Counter,
    /// Valid readings the server rejected.
    pub rejected_unexpected: Counter,
    /// Injected faults sent.
    pub bad_sent: Counter,
    /// Injected faults the server took as valid.
    pub bad_accepted: Counter,
    /// Answers that refused for load (HTTP 503, WebSocket `overloaded`/`unavailable`).
    pub shed: Counter,
    /// Readings refused for their device's rate limit (HTTP 429 or a `rate_limited`
    /// rejection, a WebSocket `rate_limited` error ack): each is sent again after the wait.
    pub rate_limited: Counter,
    /// Answers refusing the credentials: HTTP 401/403, a WebSocket upgrade refused with
    /// 401/403, a WebSocket closed with 1008 (policy).
    pub auth_failures: Counter,
    /// Transport errors: failed connects, lost connections, unexpected statuses and frames.
    pub errors: Counter,
    /// Readings given up on: refused as a whole for their content, or still unanswered when
    /// the drain timeout ran out.
    pub unacked: Counter,
    /// Open connections now.
    pub connections: Counter,
    /// Most connections open at once.
    pub connections_peak: Counter,
    /// Successful connects, reconnects included.
    pub connects: Counter,
    /// Failed connects.
    pub connect_errors: Counter,
    /// Readings that were due but not yet sent when generation stopped (open-loop modes).
    pub behind: Counter,
    /// Bytes on the wire: request bodies, WebSocket frame payloads, MQTT payloads (every
    /// write, resends included).
    pub wire_bytes: Counter,
    /// Readings in those writes (resends included).
    pub wire_readings: Counter,
    /// First write of the run, µs after `origin`.
    first_write_us: AtomicU64,
    /// Latest acknowledgement, µs after `origin`.
    last_ack_us: AtomicU64,
    /// Where the two above count from.
    origin: std::time::Instant,
    /// Answers before this much time into the run are not measured (`--warmup`).
    warmup: Duration,
    /// Rejections by the server's `reason` label (injected faults rejected as expected; other
    /// rejections under `unexpected`).
    rejected_by_reason: Mutex<BTreeMap<String, u64>>,
    /// Send → ack latency per reading, whole run (after the warm-up).
    total: Mutex<Histogram<u64>>,
    /// Same, since the progress line last looked.
    tick: Mutex<Histogram<u64>>,
    /// Same, since the ramp step began.
    step: Mutex<Histogram<u64>>,
    /// First few problems, for the summary.
    samples: Mutex<Vec<String>>,
    /// `(device, seq)` of every acknowledged reading, with `--verify`.
    pub acklog: Option<AckLog>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq)]
pub struct Percentiles {
    /// Readings measured.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

impl Stats {
    /// Empty stats; `verify` keeps an [`AckLog`] for `devices` devices.
    pub fn new(devices: u32, verify: bool, warmup: Duration) -> Self {
        Self {
            sent: Counter::default(),
            resent: Counter::default(),
            acked: Counter::default(),
            accepted: Counter::default(),
            duplicates: Counter::default(),
            rejected: Counter::default(),
            rejected_expected: Counter::default(),
            rejected_wrong_field: Counter::default(),
            rejected_unexpected: Counter::default(),
            bad_sent: Counter::default(),
            bad_accepted: Counter::default(),
            shed: Counter::default(),
            rate_limited: Counter::default(),
            auth_failures: Counter::default(),
            errors: Counter::default(),
            unacked: Counter::default(),
            connections: Counter::default(),
            connections_peak: Counter::default(),
            connects: Counter::default(),
            connect_errors: Counter::default(),
            behind: Counter::default(),
            wire_bytes: Counter::default(),
            wire_readings: Counter::default(),
            first_write_us: AtomicU64::new(u64::MAX),
            last_ack_us: AtomicU64::new(0),
            origin: std::time::Instant::now(),
            warmup,
            rejected_by_reason: Mutex::new(BTreeMap::new()),
            total: Mutex::new(histogram()),
            tick: Mutex::new(histogram()),
            step: Mutex::new(histogram()),
            samples: Mutex::new(Vec::new()),
            acklog: verify.then(|| AckLog::new(devices)),
        }
    }

    /// Records `count` readings answered `latency` after they were sent.
    pub fn record_latency(&self, latency: Duration, count: u64) {
        if count == 0 {
            return;
        }
        let since_start = self.origin.elapsed();
        self.last_ack_us
            .fetch_max(since_start.as_micros() as u64, Relaxed);
        if since_start < self.warmup {
            return;
        }
        let us = (latency.as_micros() as u64).clamp(1, MAX_LATENCY_US);
        for h in [&self.total, &self.tick, &self.step] {
            let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
            let _ = h.record_n(us, count);
        }
    }

    /// Keeps `what` if fewer than a handful of problems were kept so far.
    pub fn problem(&self, what: impl FnOnce() -> String) {
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() < MAX_SAMPLES {
            s.push(what());
        }
    }

    /// The kept problems.
    pub fn samples(&self) -> Vec<String> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Connection opened.
    pub fn connected(&self) {
        self.connects.inc();
        self.connections.inc();
        self.connections_peak.max(self.connections.get());
    }

    /// Checks one answer against what was sent: `items[i]` is the i-th reading of the request
    /// or frame. Acknowledged valid readings go to the ack log; injected faults must be rejected
    /// naming their field. Returns the indexes refused for their device's rate limit (counted
    /// in `rate_limited`, not in `rejected`): the caller sends them again later.
    #[must_use = "rate-limited readings are to be sent again"]
    pub fn settle(&self, items: &[Item], answer: &Answer, latency: Duration) -> Vec<usize> {
        self.accepted.add(answer.accepted);
        self.duplicates.add(answer.duplicates);
        let mut rejected = vec![false; items.len()];
        let mut limited = Vec::new();
        for r in &answer.rejected {
            let Some(item) = items.get(r.index) else {
                self.errors.inc();
                self.problem(|| format!("rejected index {} out of range: {}", r.index, r.error));
                continue;
            };
            if rejected[r.index] {
                continue;
            }
            rejected[r.index] = true;
            if r.is_rate_limited() && item.fault.is_none() {
                limited.push(r.index);
                continue;
            }
            self.rejected.inc();
            let reason = match item.fault {
                Some(f) if f.check(&r.error) => {
                    self.rejected_expected.inc();
                    f.reason()
                }
                Some(f) => {
                    self.rejected_wrong_field.inc();
                    self.problem(|| {
                        format!(
                            "{f:?} rejected naming another field (want `{}: …`): {}",
                            f.expected_field(),
                            r.error
                        )
                    });
                    "unexpected"
                }
                None => {
                    self.rejected_unexpected.inc();
                    self.problem(|| format!("valid reading rejected: {}", r.error));
                    "unexpected"
                }
            };
            *self
                .rejected_by_reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(reason.to_string())
                .or_default() += 1;
        }
        let mut acked = 0;
        for (item, rejected) in items.iter().zip(rejected) {
            if rejected {
                continue;
            }
            match (item.fault, item.seq) {
                (Some(f), _) => {
                    self.bad_accepted.inc();
                    self.problem(|| format!("{f:?} was accepted"));
                }
                (None, Some(seq)) => {
                    acked += 1;
                    if let Some(log) = &self.acklog {
                        log.record(item.device, seq);
                    }
                }
                (None, None) => {}
            }
        }
        self.acked.add(acked);
        let taken = items.len() as u64 - answer.rejected.len() as u64;
        if answer.accepted + answer.duplicates != taken {
            self.errors.inc();
            self.problem(|| {
                format!(
                    "answer counts {} accepted + {} duplicates for {taken} readings taken",
                    answer.accepted, answer.duplicates
                )
            });
        }
        self.rate_limited.add(limited.len() as u64);
        self.record_latency(latency, (items.len() - limited.len()) as u64);
        limited.sort_unstable();
        limited
    }

    /// Bytes on the wire per reading written (0 before any write).
    pub fn bytes_per_reading(&self) -> f64 {
        let n = self.wire_readings.get();
        if n == 0 {
            0.0
        } else {
            self.wire_bytes.get() as f64 / n as f64
        }
    }

    /// Every valid reading in `items` acknowledged (MQTT PUBACK, a line-protocol 204): no
    /// per-reading answer exists.
    pub fn settle_all(&self, items: &[Item], latency: Duration) {
        let mut acked = 0;
        for item in items {
            if let (None, Some(seq)) = (item.fault, item.seq) {
                acked += 1;
                if let Some(log) = &self.acklog {
                    log.record(item.device, seq);
                }
            }
        }
        self.acked.add(acked);
        self.record_latency(latency, items.len() as u64);
    }

    /// Counts readings as sent (first time) or resent, in a body, frame or payload of `bytes`.
    pub fn wrote(&self, items: &[Item], first: bool, bytes: usize) {
        self.wire_bytes.add(bytes as u64);
        self.wire_readings.add(items.len() as u64);
        self.first_write_us
            .fetch_min(self.origin.elapsed().as_micros() as u64, Relaxed);
        let n = items.len() as u64;
        if first {
            self.sent.add(n);
            self.bad_sent
                .add(items.iter().filter(|i| i.fault.is_some()).count() as u64);
        } else {
            self.resent.add(n);
        }
    }

    /// Readings given up on.
    pub fn give_up(&self, items: &[Item]) {
        self.unacked
            .add(items.iter().filter(|i| i.fault.is_none()).count() as u64);
    }

    /// Seconds from the first write to the latest acknowledgement (0 if none).
    pub fn active_secs(&self) -> f64 {
        let first = self.first_write_us.load(Relaxed);
        let last = self.last_ack_us.load(Relaxed);
        if first == u64::MAX || last <= first {
            return 0.0;
        }
        (last - first) as f64 / 1e6
    }

    /// Rejections by reason.
    pub fn rejected_by_reason(&self) -> BTreeMap<String, u64> {
        self.rejected_by_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Latency over the whole run.
    pub fn latency(&self) -> Percentiles {
        Percentiles::of(&self.total.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Latency since the last call (for the progress line); resets the window.
    pub fn take_tick(&self) -> Percentiles {
        let mut h = self.tick.lock().unwrap_or_else(|e| e.into_inner());
        let p = Percentiles::of(&h);
        h.reset();
        p
    }

    /// Latency since the last call (for a ramp step); resets the window.
    pub fn take_step(&self) -> Percentiles {
        let mut h = self.step.lock().unwrap_or_else(|e| e.into_inner());
        let p = Percentiles::of(&h);
        h.reset();
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::Fault;

    fn item(device: u32, seq: Option<u64>, fault: Option<Fault>) -> Item {
        Item { device, seq, fault }
    }

    #[test]
    fn settle_sorts_every_reading_out() {
        let s = Stats::new(2, true, Duration::ZERO);
        let items = [
            item(0, Some(1), None),
            item(1, None, Some(Fault::FutureTs)),
            item(1, Some(7), None),
            item(0, None, Some(Fault::EmptyMetrics)),
            item(0, Some(2), None),
            item(1, None, Some(Fault::UnknownField)),
        ];
        let answer = Answer {
            accepted: 3,
            duplicates: 0,
            rejected: vec![
                Rejected {
                    index: 1,
                    error: "ts: far in the future".into(),
                    reason: None,
                },
                Rejected {
                    index: 3,
                    error: "metrics.x: wrong".into(),
                    reason: None,
                },
                Rejected {
                    index: 4,
                    error: "metrics: what".into(),
                    reason: None,
                },
            ],
        };
        assert!(s
            .settle(&items, &answer, Duration::from_millis(3))
            .is_empty());
        assert_eq!(s.acked.get(), 2, "seq 1 and 7; seq 2 was rejected");
        assert_eq!(s.rejected.get(), 3);
        assert_eq!(s.rejected_expected.get(), 1);
        assert_eq!(s.rejected_wrong_field.get(), 1);
        assert_eq!(s.rejected_unexpected.get(), 1);
        assert_eq!(s.bad_accepted.get(), 1, "the unknown field went through");
        assert_eq!(
            s.errors.get(),
            0,
            "3 taken: seq 1, seq 7 and the unknown field"
        );
        let by = s.rejected_by_reason();
        assert_eq!(by.get("invalid_ts"), Some(&1));
        assert_eq!(by.get("unexpected"), Some(&2));
        let log = s.acklog.as_ref().unwrap().snapshot();
        let log: Vec<Vec<u64>> = log.iter().map(|r| r.to_vec()).collect();
        assert_eq!(log, vec![vec![1], vec![7]]);
        assert_eq!(s.latency().count, 6);
        assert!((s.latency().p50 - 3.0).abs() < 0.01);
    }

    #[test]
    fn counts_that_do_not_add_up_are_errors() {
        let s = Stats::new(1, false, Duration::ZERO);
        let items = [item(0, Some(1), None)];
        let answer = Answer {
            accepted: 5,
            ..Answer::default()
        };
        let _ = s.settle(&items, &answer, Duration::from_millis(1));
        assert_eq!(s.errors.get(), 1);
        assert_eq!(s.samples().len(), 1);
    }

    /// Readings refused for their device's rate limit are neither acked nor rejected: they
    /// come back to be sent again, and count in `rate_limited`.
    #[test]
    fn rate_limited_readings_come_back_to_be_resent() {
        let s = Stats::new(2, true, Duration::ZERO);
        let items = [
            item(0, Some(1), None),
            item(1, Some(1), None),
            item(1, Some(2), None),
        ];
        let limited = |index: usize, reason: Option<&str>, error: &str| Rejected {
            index,
            error: error.into(),
            reason: reason.map(str::to_string),
        };
        let answer = Answer {
            accepted: 1,
            duplicates: 0,
            rejected: vec![
                limited(2, Some("rate_limited"), "device_id: over 50/s"),
                limited(1, None, "rate_limited: over 50/s"),
            ],
        };
        let again = s.settle(&items, &answer, Duration::from_millis(2));
        assert_eq!(again, [1, 2]);
        assert_eq!((s.acked.get(), s.rate_limited.get()), (1, 2));
        assert_eq!((s.rejected.get(), s.rejected_unexpected.get()), (0, 0));
        assert_eq!(s.errors.get(), 0);
        assert_eq!(s.latency().count, 1);
    }
}
