//! HTTP: `POST /v1/readings` with batches of readings in the `--format` (JSON, CBOR, SenML
//! JSON or CBOR), or InfluxDB line protocol to `POST /api/v2/write`, over a keep-alive pool.
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
//! Answers: 200/422 are settled reading by reading (the answer is JSON, or CBOR when its
//! content type says so); 503/429 wait `Retry-After` and send the same body again; other 4xx
//! give the batch up (its readings can never be taken); network errors and other statuses
//! retry with exponential back-off until the drain timeout.
//!
//! Line protocol answers as InfluxDB does: 204 when every line was stored or was a duplicate
//! (no counts: every reading of the body counts as accepted), 400 naming the first bad line
//! of a partial write (the lines before it are stored, the named one is rejected, the ones
//! after it are unknown and counted as never acknowledged).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, Instant};

use super::{chain, now_ms, Ctx};
use crate::config::DeviceMix;
use crate::encode::{Encoded, Encoder, Format};
use crate::fleet::{mix, Device, Item};
use crate::rate::Pacer;
use crate::stats::{Answer, Rejected};

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
    fn fill(&mut self, k: usize, batch: &mut Encoder) {
        let ts = now_ms();
        for _ in 0..k {
            match self {
                Source::Own { devices, next } => {
                    batch.push(&mut devices[*next], ts);
                    *next = (*next + 1) % devices.len();
                }
                Source::Fleet { devices, rng } => {
                    let d = &devices[rng.random_range(0..devices.len())];
                    // Held only while one reading is written: its seq is taken and used under
                    // the same lock, so each device's seqs are unique and increasing.
                    let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
                    batch.push(&mut d, ts);
                }
            }
        }
    }
}

/// One sender: `share` is how many devices' worth of the fleet rate it generates.
async fn lane(ctx: Arc<Ctx>, client: reqwest::Client, mut source: Source, share: f64) {
    let format = ctx.cfg.format;
    let url = format!("{}{}", ctx.cfg.target, format.http_path());
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
        let mut batch = Encoder::new(format, true, true, b, ctx.cfg.metrics);
        if ctx.paced() {
            let linger_end = Instant::now() + ctx.cfg.linger;
            loop {
                let now = Instant::now();
                let k = pacer.available(now).min((b - batch.len()) as u64);
                source.fill(k as usize, &mut batch);
                pacer.take(k);
                if batch.len() >= b || now >= linger_end || ctx.stop.is_cancelled() {
                    break;
                }
                tokio::select! {
                    _ = sleep_until(pacer.next_at().min(linger_end)) => {}
                    _ = ctx.stop.cancelled() => {}
                }
            }
        } else {
            source.fill(b, &mut batch);
        }
        if !batch.is_empty() {
            post(&ctx, &client, &url, batch.finish()).await;
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
async fn post(ctx: &Ctx, client: &reqwest::Client, url: &str, batch: Encoded) {
    let stats = &ctx.stats;
    let format = ctx.cfg.format;
    let items = &batch.items;
    let mut first = true;
    let mut backoff = Duration::from_millis(50);
    loop {
        if ctx.abort.is_cancelled() {
            stats.give_up(items);
            return;
        }
        stats.wrote(items, first, batch.bytes.len());
        first = false;
        let sent_at = Instant::now();
        let request = client
            .post(url)
            .header(CONTENT_TYPE, format.content_type())
            .body(batch.bytes.clone())
            .send();
        let res = tokio::select! {
            r = request => r,
            _ = ctx.abort.cancelled() => {
                stats.give_up(items);
                return;
            }
        };
        let wait = match res {
            Ok(res) => match (format, res.status().as_u16()) {
                (Format::Line, 200..=299) => {
                    let answer = Answer {
                        accepted: items.len() as u64,
                        ..Answer::default()
                    };
                    stats.settle(items, &answer, sent_at.elapsed());
                    return;
                }
                (Format::Line, 400) => {
                    let text = res.text().await.unwrap_or_default();
                    partial_write(ctx, items, &text, sent_at.elapsed());
                    return;
                }
                (_, 200 | 422) => {
                    let cbor = res
                        .headers()
                        .get(CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with("application/cbor"));
                    let body = res.bytes().await;
                    match body
                        .map_err(|e| chain(&e))
                        .and_then(|b| parse_answer(&b, cbor))
                    {
                        Ok(answer) => {
                            let answer = by_reading(answer, &batch);
                            stats.settle(items, &answer, sent_at.elapsed());
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
                (_, 503 | 429) => {
                    stats.shed.inc();
                    retry_after(&res).unwrap_or(Duration::from_secs(1))
                }
                (_, status @ 400..=499) => {
                    let text = res.text().await.unwrap_or_default();
                    stats.errors.inc();
                    stats.problem(|| format!("HTTP {status}, batch given up: {text}"));
                    stats.give_up(items);
                    return;
                }
                (_, status) => {
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

/// An ingest answer, JSON or CBOR.
fn parse_answer(body: &[u8], cbor: bool) -> Result<Answer, String> {
    if cbor {
        ciborium::from_reader(body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(body).map_err(|e| e.to_string())
    }
}

/// SenML answers name rejected records: each becomes the reading the record belongs to (once).
fn by_reading(mut answer: Answer, batch: &Encoded) -> Answer {
    if batch.record_items.is_empty() || answer.rejected.is_empty() {
        return answer;
    }
    let mut seen = std::collections::BTreeSet::new();
    answer.rejected = answer
        .rejected
        .into_iter()
        .filter_map(|r| {
            let index = batch
                .record_items
                .get(r.index)
                .map_or(usize::MAX, |i| *i as usize);
            seen.insert(index).then_some(Rejected { index, ..r })
        })
        .collect();
    answer
}

/// A line-protocol 400: `{"code": "invalid", "message": …, "line": n}`. The lines before `n`
/// are stored (a partial write), line `n` is rejected, and the lines after it are unknown.
fn partial_write(ctx: &Ctx, items: &[Item], body: &str, latency: Duration) {
    let stats = &ctx.stats;
    #[derive(serde::Deserialize)]
    struct Invalid {
        #[serde(default)]
        message: String,
        #[serde(default)]
        line: Option<usize>,
    }
    let parsed: Option<Invalid> = serde_json::from_str(body).ok();
    let Some((line, message)) = parsed.and_then(|p| Some((p.line?, p.message))) else {
        stats.errors.inc();
        stats.problem(|| format!("HTTP 400, batch given up: {body}"));
        stats.give_up(items);
        return;
    };
    let bad = line.saturating_sub(1).min(items.len());
    let answer = Answer {
        accepted: bad as u64,
        duplicates: 0,
        rejected: (bad < items.len())
            .then_some(Rejected {
                index: bad,
                error: message,
            })
            .into_iter()
            .collect(),
    };
    let known = (bad + 1).min(items.len());
    stats.settle(&items[..known], &answer, latency);
    if known < items.len() {
        stats.problem(|| {
            format!(
                "line-protocol partial write: line {line} rejected, the {} lines after it not known to be stored",
                items.len() - known
            )
        });
        stats.give_up(&items[known..]);
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
            distinct_ts: false,
        }
        .build()
        .into_iter()
        .map(Mutex::new)
        .collect()
    }

    fn batch(source: &mut Source, k: usize) -> (Vec<serde_json::Value>, Vec<Item>) {
        let mut enc = Encoder::new(Format::Json, true, true, k, 4);
        source.fill(k, &mut enc);
        let e = enc.finish();
        (
            serde_json::from_slice(&e.bytes).expect("valid JSON"),
            e.items,
        )
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

    fn ctx() -> Ctx {
        use clap::Parser;
        let cli =
            crate::Cli::try_parse_from(["sluice-sim", "--format", "line", "--verify"]).unwrap();
        Ctx::new(cli.run.resolve().unwrap())
    }

    fn items(n: u64) -> Vec<Item> {
        (1..=n)
            .map(|seq| Item {
                device: 0,
                seq: Some(seq),
                fault: None,
            })
            .collect()
    }

    /// A line-protocol 400 naming line 3 of 5: lines 1–2 stored, 3 rejected, 4–5 unknown.
    #[test]
    fn a_partial_write_acks_the_lines_before_the_bad_one() {
        let ctx = ctx();
        let body = r#"{"code":"invalid","message":"partial write: line 3: fields.x: bad (1 line(s) rejected, the others stored)","line":3}"#;
        partial_write(&ctx, &items(5), body, Duration::from_millis(2));
        let s = &ctx.stats;
        assert_eq!((s.acked.get(), s.accepted.get()), (2, 2));
        assert_eq!((s.rejected.get(), s.rejected_unexpected.get()), (1, 1));
        assert_eq!(s.unacked.get(), 2);
        assert_eq!(s.errors.get(), 0);
        let log = s.acklog.as_ref().unwrap().snapshot();
        assert_eq!(log[0].to_vec(), [1, 2]);
        // A 400 without a line number (not a partial write): the batch is given up.
        let ctx = self::ctx();
        partial_write(
            &ctx,
            &items(4),
            r#"{"code":"invalid","message":"x"}"#,
            Duration::ZERO,
        );
        assert_eq!((ctx.stats.acked.get(), ctx.stats.unacked.get()), (0, 4));
        assert_eq!(ctx.stats.errors.get(), 1);
    }

    /// SenML answers name records; each rejection becomes its reading, once.
    #[test]
    fn senml_record_rejections_map_to_readings() {
        let batch = Encoded {
            bytes: bytes::Bytes::new(),
            items: items(3),
            record_items: vec![0, 0, 0, 1, 1, 1, 2, 2, 2],
        };
        let rejected = |index: usize| Rejected {
            index,
            error: "x: y".into(),
        };
        let answer = Answer {
            accepted: 1,
            duplicates: 0,
            rejected: vec![rejected(4), rejected(5), rejected(6)],
        };
        let a = by_reading(answer, &batch);
        let idx: Vec<usize> = a.rejected.iter().map(|r| r.index).collect();
        assert_eq!(idx, [1, 2]);
    }
}
