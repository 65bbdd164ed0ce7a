//! HTTP: `POST /v1/readings` with JSON arrays of readings, over a keep-alive pool.
//!
//! There are `--connections` lanes, each sending one batch at a time: in the paced modes it
//! collects due readings until the batch is full or the oldest has waited `--linger`; in max
//! mode it fills the batch at once and sends again as soon as the answer is in. Where the
//! readings come from is `--device-mix`:
//! - `gateway` (default): a lane owns every `--connections`-th device and takes them in turn,
//!   like a gateway forwarding its own devices' readings;
//! - `random`: the fleet is shared, and each reading comes from a device drawn at random by the
//!   lane's own generator (seeded from `--seed` and the lane number). A device is locked only
//!   while one reading is written, so its `seq`s stay unique and increasing whichever lane draws
//!   it; a device's readings may then be committed out of `seq` order, as from a real fleet
//!   behind several gateways.
//!
//! Answers: 200/422 are settled reading by reading; 503/429 wait `Retry-After` and send the same
//! body again; other 4xx give the batch up (its readings can never be taken); network errors
//! and other statuses retry with exponential back-off until the drain timeout.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, Instant};

use super::{chain, now_ms, Ctx};
use crate::config::DeviceMix;
use crate::fleet::{mix, Device, Item};
use crate::rate::Pacer;
use crate::stats::Answer;

/// Starts the lanes.
pub fn spawn(ctx: &Arc<Ctx>, lanes: &mut JoinSet<()>) -> anyhow::Result<()> {
    let cfg = &ctx.cfg;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(cfg.connections)
        .tcp_nodelay(true)
        .timeout(cfg.request_timeout)
        .build()?;
    let devices = cfg.fleet().build();
    match cfg.device_mix {
        DeviceMix::Gateway => {
            let n = cfg.connections.min(devices.len());
            let mut parts: Vec<Vec<Device>> = (0..n).map(|_| Vec::new()).collect();
            for d in devices {
                parts[d.index as usize % n].push(d);
            }
            for part in parts {
                let share = part.len() as f64;
                let source = Source::Own {
                    devices: part,
                    next: 0,
                };
                lanes.spawn(lane(ctx.clone(), client.clone(), source, share));
            }
        }
        DeviceMix::Random => {
            let n = cfg.connections;
            let share = devices.len() as f64 / n as f64;
            let fleet: Arc<[Mutex<Device>]> = devices.into_iter().map(Mutex::new).collect();
            for k in 0..n {
                let source = Source::Fleet {
                    devices: fleet.clone(),
                    rng: SmallRng::seed_from_u64(lane_seed(cfg.seed, k)),
                };
                lanes.spawn(lane(ctx.clone(), client.clone(), source, share));
            }
        }
    }
    Ok(())
}

/// The seed of lane `k`'s device draws: independent of the devices' own generators.
fn lane_seed(seed: u64, k: usize) -> u64 {
    mix(mix(seed ^ 0x6c61_6e65) ^ mix(k as u64))
}

/// Where a lane's readings come from (`--device-mix`).
enum Source {
    /// Its own devices, in turn.
    Own { devices: Vec<Device>, next: usize },
    /// The whole fleet, one device drawn at random for each reading.
    Fleet {
        devices: Arc<[Mutex<Device>]>,
        rng: SmallRng,
    },
}

impl Source {
    /// Appends `k` readings to a batch being built.
    fn fill(&mut self, k: usize, body: &mut String, items: &mut Vec<Item>) {
        let ts = now_ms();
        for _ in 0..k {
            if !items.is_empty() {
                body.push(',');
            }
            let item = match self {
                Source::Own { devices, next } => {
                    let item = devices[*next].write_reading(ts, true, body);
                    *next = (*next + 1) % devices.len();
                    item
                }
                Source::Fleet { devices, rng } => {
                    let d = &devices[rng.random_range(0..devices.len())];
                    // Held only while one reading is written: its seq is taken and used under
                    // the same lock, so each device's seqs are unique and increasing.
                    let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
                    d.write_reading(ts, true, body)
                }
            };
            items.push(item);
        }
    }
}

/// One sender: `share` is how many devices' worth of the fleet rate it generates.
async fn lane(ctx: Arc<Ctx>, client: reqwest::Client, mut source: Source, share: f64) {
    let url = format!("{}/v1/readings", ctx.cfg.target);
    let b = ctx.cfg.batch;
    let (rate, mut generation) = ctx.rate.get();
    let mut pacer = Pacer::new(rate * share, ctx.start);
    while !ctx.stop.is_cancelled() {
        if ctx.paced() {
            if ctx.rate.generation() != generation {
                let (rate, g) = ctx.rate.get();
                pacer.set_rate(rate * share, Instant::now());
                generation = g;
            }
            if pacer.available(Instant::now()) == 0 {
                tokio::select! {
                    _ = sleep_until(pacer.next_at()) => {}
                    _ = ctx.stop.cancelled() => {}
                }
                continue;
            }
        }
        let mut body = String::with_capacity(b * 170 + 2);
        let mut items = Vec::with_capacity(b);
        body.push('[');
        if ctx.paced() {
            let linger_end = Instant::now() + ctx.cfg.linger;
            loop {
                let now = Instant::now();
                let k = pacer.available(now).min((b - items.len()) as u64);
                source.fill(k as usize, &mut body, &mut items);
                pacer.take(k);
                if items.len() >= b || now >= linger_end || ctx.stop.is_cancelled() {
                    break;
                }
                tokio::select! {
                    _ = sleep_until(pacer.next_at().min(linger_end)) => {}
                    _ = ctx.stop.cancelled() => {}
                }
            }
        } else {
            source.fill(b, &mut body, &mut items);
        }
        body.push(']');
        if !items.is_empty() {
            post(&ctx, &client, &url, Bytes::from(body), items).await;
        }
    }
    if ctx.paced() {
        ctx.stats.behind.add(pacer.behind(ctx.stopped_at()));
    }
}

/// `Retry-After` in seconds, if present.
fn retry_after(res: &reqwest::Response) -> Option<Duration> {
    let v = res.headers().get(RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Posts one batch until it is answered, refused for good, or the drain timeout runs out.
async fn post(ctx: &Ctx, client: &reqwest::Client, url: &str, body: Bytes, items: Vec<Item>) {
    let stats = &ctx.stats;
    let mut first = true;
    let mut backoff = Duration::from_millis(50);
    loop {
        if ctx.abort.is_cancelled() {
            stats.give_up(&items);
            return;
        }
        stats.wrote(&items, first);
        first = false;
        let sent_at = Instant::now();
        let request = client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send();
        let res = tokio::select! {
            r = request => r,
            _ = ctx.abort.cancelled() => {
                stats.give_up(&items);
                return;
            }
        };
        let wait = match res {
            Ok(res) => match res.status().as_u16() {
                200 | 422 => {
                    let body = res.bytes().await;
                    match body.map_err(|e| chain(&e)).and_then(|b| {
                        serde_json::from_slice::<Answer>(&b).map_err(|e| e.to_string())
                    }) {
                        Ok(answer) => {
                            stats.settle(&items, &answer, sent_at.elapsed());
                            return;
                        }
                        Err(e) => {
                            // The batch may be committed; sending it again is safe (same seqs).
                            stats.errors.inc();
                            stats.problem(|| format!("HTTP answer unreadable: {e}"));
                            backoff
                        }
                    }
                }
                503 | 429 => {
                    stats.shed.inc();
                    retry_after(&res).unwrap_or(Duration::from_secs(1))
                }
                status @ 400..=499 => {
                    let text = res.text().await.unwrap_or_default();
                    stats.errors.inc();
                    stats.problem(|| format!("HTTP {status}, batch given up: {text}"));
                    stats.give_up(&items);
                    return;
                }
                status => {
                    stats.errors.inc();
                    stats.problem(|| format!("HTTP {status}"));
                    backoff
                }
            },
            Err(e) => {
                stats.errors.inc();
                stats.problem(|| format!("POST {url}: {}", chain(&e)));
                backoff
            }
        };
        backoff = (backoff * 2).min(Duration::from_secs(2));
        tokio::select! {
            _ = sleep(wait) => {}
            _ = ctx.abort.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{FleetProfile, FleetSpec};

    fn fleet(devices: u32) -> Arc<[Mutex<Device>]> {
        FleetSpec {
            prefix: "mix".into(),
            devices,
            profile: FleetProfile::Mixed,
            metrics: 4,
            seed: 7,
            seq_start: 1,
            bad_ratio: 0.0,
        }
        .build()
        .into_iter()
        .map(Mutex::new)
        .collect()
    }

    fn batch(source: &mut Source, k: usize) -> (Vec<serde_json::Value>, Vec<Item>) {
        let mut body = String::from("[");
        let mut items = Vec::new();
        source.fill(k, &mut body, &mut items);
        body.push(']');
        (serde_json::from_str(&body).expect("valid JSON"), items)
    }

    #[test]
    fn random_mix_spreads_a_batch_over_the_fleet_and_keeps_seqs_per_device() {
        let devices = fleet(1000);
        let mut lanes: Vec<Source> = (0..4)
            .map(|k| Source::Fleet {
                devices: devices.clone(),
                rng: SmallRng::seed_from_u64(lane_seed(7, k)),
            })
            .collect();
        let mut last_seq = std::collections::HashMap::new();
        for round in 0..50 {
            for lane in &mut lanes {
                let (readings, items) = batch(lane, 100);
                let ids: std::collections::HashSet<&str> = readings
                    .iter()
                    .map(|r| r["device_id"].as_str().unwrap())
                    .collect();
                // 100 draws from 1000 devices: about 95 distinct on average.
                assert!(ids.len() >= 85, "round {round}: {} devices", ids.len());
                for (r, item) in readings.iter().zip(&items) {
                    assert_eq!(r["metrics"].as_object().unwrap().len(), 4);
                    let seq = r["seq"].as_u64().unwrap();
                    assert_eq!(item.seq, Some(seq));
                    let id = format!("mix-{}", item.device);
                    assert_eq!(r["device_id"], id.as_str());
                    // Consecutive per device, whichever lane drew it.
                    let prev = last_seq.insert(item.device, seq).unwrap_or(0);
                    assert_eq!(seq, prev + 1, "{id}");
                }
            }
        }
    }

    #[test]
    fn random_mix_is_repeatable_with_the_seed() {
        let draws = |seed: u64| {
            let mut s = Source::Fleet {
                devices: fleet(100_000),
                rng: SmallRng::seed_from_u64(lane_seed(seed, 3)),
            };
            batch(&mut s, 200)
                .1
                .iter()
                .map(|i| i.device)
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(1), draws(1));
        assert_ne!(draws(1), draws(2));
    }
}
