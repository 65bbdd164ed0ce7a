//! The no-loss verifier (`--verify`): every acknowledged `(device_id, seq)` must be stored once.
//!
//! During the run, [`AckLog`] records the `seq` of each reading the server acknowledged. After
//! it, [`verify`] reads every device back through `GET /v1/devices/{id}/readings`, following
//! its `next` cursor (10 000 rows a page, SPEC §3), and compares:
//! - **lost**: acknowledged, not stored — the one thing Sluice must never do;
//! - **duplicated**: a `seq` stored more than once;
//! - **extra**: stored but never acknowledged to us (sent, committed, and the answer lost with
//!   a connection, or a reading of an earlier run with the same device prefix). Not an error;
//! - **wrong metric names**: a stored reading whose metric names are not the ones the device
//!   sent, under the names its `--format` gives them ([`MetricNames`]: line protocol stores
//!   field `f` of measurement `m` as `m.f`).
//!
//! With tokens (SPEC §11), each device is read with its own token (`--tokens-file`; a write
//! token may read its own devices) or `--token`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};

use reqwest::header::{HeaderValue, AUTHORIZATION};

use crate::auth::Auth;
use crate::config::{Format, RunConfig};
use crate::fleet::{device_id, metric_names, FleetProfile};

/// Rows asked for per page (the server's maximum).
const PAGE: usize = 10_000;
/// Devices read back at the same time.
const PARALLEL: usize = 8;

/// `seq`s acknowledged per device, as sorted runs of consecutive numbers.
///
/// A device's acks come nearly in `seq` order, so each device holds one run or a few (a gap
/// lasts only until the request that carries it is answered): memory stays bounded by the
/// number of devices, not by the number of readings, even in a ten-minute run at 400 000/s.
#[derive(Debug)]
pub struct AckLog {
    devices: Vec<Mutex<Runs>>,
}

/// Sorted, disjoint, non-adjacent half-open ranges `[start, end)` of `seq`s.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Runs(Vec<(u64, u64)>);

impl Runs {
    /// Adds `seq` (a repeat is ignored).
    pub fn insert(&mut self, seq: u64) {
        let r = &mut self.0;
        match r.last_mut() {
            None => {
                r.push((seq, seq + 1));
                return;
            }
            Some(last) if seq == last.1 => {
                last.1 += 1;
                return;
            }
            Some(last) if seq > last.1 => {
                r.push((seq, seq + 1));
                return;
            }
            Some(_) => {}
        }
        // The first run starting after `seq`; the one before it may hold or touch `seq`.
        let i = r.partition_point(|&(start, _)| start <= seq);
        if i > 0 && seq < r[i - 1].1 {
            return;
        }
        let joins_prev = i > 0 && r[i - 1].1 == seq;
        let joins_next = i < r.len() && r[i].0 == seq + 1;
        match (joins_prev, joins_next) {
            (true, true) => {
                r[i - 1].1 = r[i].1;
                r.remove(i);
            }
            (true, false) => r[i - 1].1 += 1,
            (false, true) => r[i].0 = seq,
            (false, false) => r.insert(i, (seq, seq + 1)),
        }
    }

    /// Distinct `seq`s held.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|(a, b)| b - a).sum()
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every `seq`, sorted.
    pub fn to_vec(&self) -> Vec<u64> {
        let mut v = Vec::with_capacity(self.len() as usize);
        for &(a, b) in &self.0 {
            v.extend(a..b);
        }
        v
    }

    /// The runs, `[start, end)`.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }
}

impl AckLog {
    /// An empty log for `devices` devices.
    pub fn new(devices: u32) -> Self {
        Self {
            devices: (0..devices).map(|_| Mutex::new(Runs::default())).collect(),
        }
    }

    /// Device `device` had `seq` acknowledged.
    pub fn record(&self, device: u32, seq: u64) {
        if let Some(d) = self.devices.get(device as usize) {
            d.lock().unwrap_or_else(|e| e.into_inner()).insert(seq);
        }
    }

    /// A copy of every device's runs.
    pub fn snapshot(&self) -> Vec<Runs> {
        self.devices
            .iter()
            .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }
}

/// What the read-back found. Counts are of readings.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct VerifyReport {
    /// Devices with at least one acknowledged reading.
    pub devices: u64,
    /// Distinct `(device, seq)` acknowledged.
    pub acked: u64,
    /// Of those, how many are stored.
    pub stored: u64,
    /// Acknowledged but not stored.
    pub lost: u64,
    /// Extra copies of a stored `seq` (0 when each is stored once).
    pub duplicated: u64,
    /// Stored but never acknowledged to the simulator.
    pub extra: u64,
    /// Stored readings whose metric names are not the ones sent (in the format's naming).
    pub wrong_metrics: u64,
    /// A few lost or duplicated `device_id/seq`, for a first look.
    pub examples: Vec<String>,
}

impl VerifyReport {
    /// Nothing lost, nothing stored twice, every metric under the name it was sent as.
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.wrong_metrics == 0
    }

    fn add(&mut self, id: &str, t: &Tally) {
        self.devices += 1;
        self.acked += t.acked;
        self.stored += t.stored;
        self.lost += t.lost;
        self.duplicated += t.duplicated;
        self.extra += t.extra;
        self.wrong_metrics += t.wrong_metrics;
        for (what, seq) in &t.examples {
            if self.examples.len() < 10 {
                self.examples.push(format!("{what} {id}/{seq}"));
            }
        }
        if let Some(m) = &t.metrics_example {
            if self.examples.len() < 10 {
                self.examples.push(format!("wrong metric names {id}/{m}"));
            }
        }
    }
}

/// One device's comparison.
#[derive(Debug, Default, PartialEq)]
struct Tally {
    acked: u64,
    stored: u64,
    lost: u64,
    duplicated: u64,
    extra: u64,
    wrong_metrics: u64,
    examples: Vec<(&'static str, u64)>,
    /// `<seq>: stored [..], sent [..]` of the first reading with wrong metric names.
    metrics_example: Option<String>,
}

/// The metric names each device's readings are stored under.
#[derive(Debug, Clone)]
pub struct MetricNames {
    /// Sensors, trackers or both.
    pub profile: FleetProfile,
    /// Metrics per reading.
    pub metrics: usize,
    /// The format they were sent in.
    pub format: Format,
}

impl MetricNames {
    /// The names of the run `cfg`.
    pub fn of(cfg: &RunConfig) -> Self {
        Self {
            profile: cfg.profile,
            metrics: cfg.metrics,
            format: cfg.format,
        }
    }

    /// Device `n`'s stored metric names, sorted.
    pub fn expected(&self, n: u32) -> Vec<String> {
        let mut v: Vec<String> = metric_names(self.profile, n, self.metrics)
            .into_iter()
            .map(|m| self.format.stored_name(m))
            .collect();
        v.sort_unstable();
        v
    }
}

/// A stored reading's metric names, sorted, compared with the expected ones; `None` if they
/// match.
fn metrics_mismatch(stored: &mut [Cow<'_, str>], expected: &[String]) -> Option<String> {
    stored.sort_unstable();
    if stored.len() == expected.len() && stored.iter().zip(expected).all(|(a, b)| a == b) {
        return None;
    }
    Some(format!("stored {stored:?}, sent {expected:?}"))
}

/// Compares the acknowledged `seq`s (sorted, distinct) with those read back.
fn tally(acked: &[u64], stored: &[u64]) -> Tally {
    let mut counts: HashMap<u64, u64> = HashMap::with_capacity(stored.len());
    for s in stored {
        *counts.entry(*s).or_default() += 1;
    }
    let mut t = Tally {
        acked: acked.len() as u64,
        ..Tally::default()
    };
    for seq in acked {
        match counts.get(seq) {
            Some(_) => t.stored += 1,
            None => {
                t.lost += 1;
                if t.examples.len() < 3 {
                    t.examples.push(("lost", *seq));
                }
            }
        }
    }
    for (seq, n) in &counts {
        if *n > 1 {
            t.duplicated += n - 1;
            if t.examples.len() < 3 {
                t.examples.push(("duplicated", *seq));
            }
        }
        if acked.binary_search(seq).is_err() {
            t.extra += 1;
        }
    }
    t
}

#[derive(Deserialize)]
struct Page<'a> {
    #[serde(borrow)]
    readings: Vec<Row<'a>>,
    /// The cursor of the next page, present when more readings match.
    #[serde(default)]
    next: Option<String>,
}

#[derive(Deserialize)]
struct Row<'a> {
    #[serde(default)]
    seq: Option<u64>,
    #[serde(borrow, default)]
    metrics: MetricKeys<'a>,
}

/// The names of a stored reading's `metrics` object (values skipped).
#[derive(Default)]
struct MetricKeys<'a>(Vec<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for MetricKeys<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Keys<'a> {
            type Value = MetricKeys<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a metrics object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut keys = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(k) = map.next_key::<Cow<'de, str>>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    keys.push(k);
                }
                Ok(MetricKeys(keys))
            }
        }
        d.deserialize_map(Keys(std::marker::PhantomData))
    }
}

/// Every stored `seq` of `device`, in store order.
pub async fn stored_seqs(
    client: &reqwest::Client,
    base: &str,
    device: &str,
) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::new();
    read_back(client, base, device, None, |seq, _| out.extend(seq)).await?;
    Ok(out)
}

/// Reads every stored reading of `device`, in store order, handing `on_row` its `seq` and
/// metric names.
async fn read_back(
    client: &reqwest::Client,
    base: &str,
    device: &str,
    token: Option<&HeaderValue>,
    mut on_row: impl FnMut(Option<u64>, &mut [Cow<'_, str>]),
) -> anyhow::Result<()> {
    let url = format!("{base}/v1/devices/{device}/readings");
    let mut cursor: Option<String> = None;
    loop {
        let mut query: Vec<(&str, String)> =
            vec![("limit", PAGE.to_string()), ("order", "asc".into())];
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        let mut attempt = 0;
        let res = loop {
            attempt += 1;
            let mut req = client.get(&url).query(&query);
            if let Some(t) = token {
                req = req.header(AUTHORIZATION, t.clone());
            }
            let res = req.send().await;
            match res {
                Ok(r) if matches!(r.status().as_u16(), 503 | 429) && attempt < 10 => {}
                Ok(r) => break r,
                Err(_) if attempt < 10 => {}
                Err(e) => return Err(e).with_context(|| format!("GET {url}")),
            }
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        };
        if res.status() == 404 {
            return Ok(()); // no reading of this device was ever stored
        }
        let status = res.status().as_u16();
        if matches!(status, 401 | 403) {
            bail!(
                "GET {url}: {}: {} (--verify reads each device with its token: a write token may read its own devices, a read token all)",
                res.status(),
                crate::transport::http::auth_hint(status, token.is_some())
            );
        }
        if !res.status().is_success() {
            bail!("GET {url}: {}", res.status());
        }
        let body = res.bytes().await?;
        let page: Page<'_> =
            serde_json::from_slice(&body).with_context(|| format!("GET {url}: unexpected body"))?;
        for mut r in page.readings {
            on_row(r.seq, &mut r.metrics.0);
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok(()),
        }
    }
}

/// Reads every device with acknowledged readings back from `base` and compares. With `wait`,
/// devices still missing readings are read again until nothing is lost or `wait` is over (for
/// MQTT, where the broker's PUBACK comes before Sluice has committed).
pub async fn verify(
    base: &str,
    prefix: &str,
    acked: Vec<Runs>,
    wait: Duration,
    names: &MetricNames,
    auth: &Auth,
) -> anyhow::Result<VerifyReport> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .context("HTTP client")?;
    let deadline = tokio::time::Instant::now() + wait;
    let work: Vec<(u32, Runs)> = acked
        .into_iter()
        .enumerate()
        .filter(|(_, runs)| !runs.is_empty())
        .map(|(n, runs)| (n as u32, runs))
        .collect();
    let results: Vec<anyhow::Result<(String, Tally)>> = stream::iter(work)
        .map(|(n, runs)| {
            let client = &client;
            let id = device_id(prefix, n);
            let expected = names.expected(n);
            async move {
                // Expanded only while this device is being compared.
                let seqs = runs.to_vec();
                loop {
                    let mut stored = Vec::new();
                    let (mut wrong, mut example) = (0, None);
                    read_back(client, base, &id, auth.for_device(n), |seq, metrics| {
                        stored.extend(seq);
                        if let Some(m) = metrics_mismatch(metrics, &expected) {
                            wrong += 1;
                            if example.is_none() {
                                let seq = seq.map_or("-".to_string(), |s| s.to_string());
                                example = Some(format!("{seq}: {m}"));
                            }
                        }
                    })
                    .await?;
                    let mut t = tally(&seqs, &stored);
                    t.wrong_metrics = wrong;
                    t.metrics_example = example;
                    if t.lost == 0 || tokio::time::Instant::now() >= deadline {
                        return Ok((id, t));
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let mut report = VerifyReport::default();
    let mut tallies = Vec::with_capacity(results.len());
    for r in results {
        tallies.push(r?);
    }
    tallies.sort_by(|a, b| a.0.cmp(&b.0));
    for (id, t) in &tallies {
        report.add(id, t);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_finds_lost_duplicated_and_extra() {
        let t = tally(&[1, 2, 3, 4], &[1, 2, 2, 4, 9]);
        assert_eq!(t.acked, 4);
        assert_eq!(t.stored, 3);
        assert_eq!(t.lost, 1);
        assert_eq!(t.duplicated, 1);
        assert_eq!(t.extra, 1);
        assert!(t.examples.contains(&("lost", 3)));
        assert!(t.examples.contains(&("duplicated", 2)));
    }

    #[test]
    fn metric_names_follow_the_format() {
        let names = |format| MetricNames {
            profile: FleetProfile::Mixed,
            metrics: 5,
            format,
        };
        assert_eq!(
            names(Format::Json).expected(0),
            ["aux_1", "battery", "door_open", "humidity", "temperature"]
        );
        assert_eq!(
            names(Format::Line).expected(4),
            ["m.battery", "m.heading", "m.lat", "m.lon", "m.speed"]
        );
        let want = names(Format::Line).expected(0);
        let mut stored: Vec<Cow<'_, str>> = [
            "m.temperature",
            "m.humidity",
            "m.battery",
            "m.door_open",
            "m.aux_1",
        ]
        .into_iter()
        .map(Cow::Borrowed)
        .collect();
        assert_eq!(metrics_mismatch(&mut stored, &want), None);
        let mut plain: Vec<Cow<'_, str>> = vec!["temperature".into()];
        assert!(metrics_mismatch(&mut plain, &want)
            .unwrap()
            .contains("stored [\"temperature\"]"));
    }

    #[test]
    fn a_page_gives_seqs_and_metric_names() {
        let body = br#"{"device_id":"d","readings":[{"ts":"x","seq":3,"metrics":{"a":1,"b\u0020c":true},"tags":{}},
            {"ts":"y","seq":null,"metrics":{}}],"next":"c1"}"#;
        let page: Page<'_> = serde_json::from_slice(body).unwrap();
        assert_eq!(page.next.as_deref(), Some("c1"));
        assert_eq!(page.readings[0].seq, Some(3));
        assert_eq!(page.readings[0].metrics.0, ["a", "b c"]);
        assert_eq!(page.readings[1].seq, None);
        assert!(page.readings[1].metrics.0.is_empty());
    }

    #[test]
    fn clean_tally() {
        let t = tally(&[5, 6], &[6, 5]);
        assert_eq!((t.stored, t.lost, t.duplicated, t.extra), (2, 0, 0, 0));
    }

    #[test]
    fn ack_log_keeps_each_device_apart() {
        let log = AckLog::new(3);
        log.record(2, 10);
        log.record(0, 1);
        log.record(2, 9);
        log.record(2, 9); // a repeat: held once
        log.record(7, 1); // out of range: ignored
        let snap = log.snapshot();
        let seqs: Vec<Vec<u64>> = snap.iter().map(Runs::to_vec).collect();
        assert_eq!(seqs, vec![vec![1], vec![], vec![9, 10]]);
        assert_eq!(snap[2].ranges(), &[(9, 11)]);
    }

    #[test]
    fn runs_merge_in_any_order_and_stay_few() {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        // Acks out of order, within a window of 64, with repeats: as from 32 lanes.
        let mut seqs: Vec<u64> = (1..=10_000).collect();
        for chunk in seqs.chunks_mut(64) {
            chunk.shuffle(&mut rng);
        }
        let mut runs = Runs::default();
        let mut most = 0;
        for (i, &s) in seqs.iter().enumerate() {
            runs.insert(s);
            if i % 7 == 0 {
                runs.insert(s); // repeat
            }
            most = most.max(runs.ranges().len());
        }
        assert_eq!(runs.ranges(), &[(1, 10_001)]);
        assert_eq!(runs.len(), 10_000);
        assert!(most <= 64, "{most} runs at once");
        // Every case of insert: before, between, joining, inside.
        let mut r = Runs::default();
        for s in [10, 12, 5, 11, 7, 6, 4, 20, 11, 3] {
            r.insert(s);
        }
        assert_eq!(r.ranges(), &[(3, 8), (10, 13), (20, 21)]);
        assert_eq!(r.to_vec(), vec![3, 4, 5, 6, 7, 10, 11, 12, 20]);
    }
}
