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
//! With tokens (`--token`, `--tokens-file`, SPEC §11) every request carries
//! `Authorization: Bearer`. When devices have different tokens, a request carries one device's
//! readings, sent with its token: a lane takes its own devices in turn, one batch each
//! (gateway), or draws one device per batch (random).
//!
//! Answers: 200/422 are settled reading by reading (the answer is JSON, or CBOR when its
//! content type says so), and readings rejected as `rate_limited` are sent again, alone, after
//! `Retry-After` (or the `RateLimit` header's reset, else a second); 503/429 wait `Retry-After`
//! and send the same body again; 401/403 count as auth failures and give the batch up; other
//! 4xx give the batch up (its readings can never be taken); network errors and other statuses
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
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
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
    let per_device = cfg.auth.per_device();
    match cfg.device_mix {
        DeviceMix::Gateway => {
            let n = cfg.connections.min(devices.len());
            let mut parts: Vec<Vec<Device>> = (0..n).map(|_| Vec::new()).collect();
            for d in devices {
                parts[d.index as usize % n].push(d);
            }
            let lanes_n = parts.len();
            for (k, part) in parts.into_iter().enumerate() {
                let share = part.len() as f64;
                let source = Source {
                    pick: Pick::Own {
                        devices: part,
                        next: 0,
                    },
                    per_device,
                    current: 0,
                };
                let phase = Phase { k, n: lanes_n };
                lanes.spawn(lane(ctx.clone(), client.clone(), source, share, phase));
            }
        }
        DeviceMix::Random => {
            let n = cfg.connections;
            let share = devices.len() as f64 / n as f64;
            let fleet: Arc<[Mutex<Device>]> = devices.into_iter().map(Mutex::new).collect();
            for k in 0..n {
                let source = Source {
                    pick: Pick::Fleet {
                        devices: fleet.clone(),
                        rng: SmallRng::seed_from_u64(lane_seed(cfg.seed, k)),
                    },
                    per_device,
                    current: 0,
                };
                let phase = Phase { k, n };
                lanes.spawn(lane(ctx.clone(), client.clone(), source, share, phase));
            }
        }
    }
    Ok(())
}

/// Lane `k` of `n`: where its paced schedule starts within one batch period.
#[derive(Clone, Copy)]
struct Phase {
    k: usize,
    n: usize,
}

impl Phase {
    /// Lane `k` starts `k / n` of a period late, the period being how often it sends: the
    /// time its rate takes to fill a batch, or `--linger` if that is shorter. Without it every
    /// lane fills its first batch at the same moment and keeps that step: at 100 000
    /// readings/s, 32 lanes of 100 readings each sent all 32 requests within a millisecond
    /// every 32 ms (3 200 readings at once) instead of one request a millisecond, and the ack
    /// latency measured that burst, not the rate.
    fn offset(self, rate: f64, batch: usize, linger: Duration) -> Duration {
        if rate <= 0.0 || self.n == 0 {
            return Duration::ZERO;
        }
        let period = (batch as f64 / rate).min(linger.as_secs_f64());
        Duration::from_secs_f64(period * self.k as f64 / self.n as f64)
    }
}

/// The seed of lane `k`'s device draws: independent of the devices' own generators.
fn lane_seed(seed: u64, k: usize) -> u64 {
    mix(mix(seed ^ 0x6c61_6e65) ^ mix(k as u64))
}

/// Where a lane's readings come from (`--device-mix`).
enum Pick {
    /// Its own devices, in turn.
    Own { devices: Vec<Device>, next: usize },
    /// The whole fleet, one device drawn at random for each reading.
    Fleet {
        devices: Arc<[Mutex<Device>]>,
        rng: SmallRng,
    },
}

/// A lane's readings: from which devices, and whether a request carries one device only (its
/// devices have tokens of their own).
struct Source {
    pick: Pick,
    per_device: bool,
    /// With `per_device`: the device of the batch being built (an index into the devices).
    current: usize,
}

impl Source {
    /// Starts a batch: with `per_device`, chooses its device (the next of the lane's own, or
    /// one drawn from the fleet).
    fn begin(&mut self) {
        if !self.per_device {
            return;
        }
        match &mut self.pick {
            Pick::Own { devices, next } => {
                self.current = *next;
                *next = (*next + 1) % devices.len();
            }
            Pick::Fleet { devices, rng } => self.current = rng.random_range(0..devices.len()),
        }
    }

    /// Appends `k` readings to a batch being built.
    fn fill(&mut self, k: usize, batch: &mut Encoder) {
        let ts = now_ms();
        if self.per_device {
            match &mut self.pick {
                Pick::Own { devices, .. } => {
                    for _ in 0..k {
                        batch.push(&mut devices[self.current], ts);
                    }
                }
                Pick::Fleet { devices, .. } => {
                    let mut d = devices[self.current]
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    for _ in 0..k {
                        batch.push(&mut d, ts);
                    }
                }
            }
            return;
        }
        for _ in 0..k {
            match &mut self.pick {
                Pick::Own { devices, next } => {
                    batch.push(&mut devices[*next], ts);
                    *next = (*next + 1) % devices.len();
                }
                Pick::Fleet { devices, rng } => {
                    let d = &devices[rng.random_range(0..devices.len())];
                    // Held only while one reading is written: its seq is taken and used under
                    // the same lock, so each device's seqs are unique and increasing.
                    let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
                    batch.push(&mut d, ts);
                }
            }
        }
    }

    /// The fleet index of the batch's device (with `per_device`).
    fn device(&self) -> u32 {
        match &self.pick {
            Pick::Own { devices, .. } => devices[self.current].index,
            Pick::Fleet { .. } => self.current as u32,
        }
    }
}

/// One sender: `share` is how many devices' worth of the fleet rate it generates; `phase` staggers
/// its paced schedule against the other lanes'.
async fn lane(
    ctx: Arc<Ctx>,
    client: reqwest::Client,
    mut source: Source,
    share: f64,
    phase: Phase,
) {
    let format = ctx.cfg.format;
    let url = format!("{}{}", ctx.cfg.target, format.http_path());
    let b = ctx.cfg.batch;
    let (rate, mut generation) = ctx.rate.get();
    let mut pacer = Pacer::new(
        rate * share,
        ctx.start + phase.offset(rate * share, b, ctx.cfg.linger),
    );
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
        source.begin();
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
            let token = if source.per_device {
                ctx.cfg.auth.for_device(source.device())
            } else {
                ctx.cfg.auth.for_device(0)
            };
            post(&ctx, &client, &url, batch.finish(), token).await;
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

/// How long to wait before sending rate-limited readings again: `Retry-After`, else the reset
/// `t=` of the IETF `RateLimit` header (draft-ietf-httpapi-ratelimit-headers), else a second.
fn rate_limit_wait(headers: &reqwest::header::HeaderMap) -> Duration {
    let secs = |v: &str| v.trim().parse::<u64>().ok();
    if let Some(s) = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(secs)
    {
        return Duration::from_secs(s);
    }
    headers
        .get("ratelimit")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(';')
                .find_map(|p| p.trim().strip_prefix("t=").and_then(secs))
        })
        .map_or(Duration::from_secs(1), |s| Duration::from_secs(s.max(1)))
}

/// What a 401/403 means, for the summary (never quoting a token).
pub fn auth_hint(status: u16, token_sent: bool) -> &'static str {
    match (status, token_sent) {
        (401, false) => "Sluice wants a token (auth.mode = \"token\"): pass --token (or SLUICE_TOKEN) or --tokens-file",
        (401, true) => "the token was refused: unknown, revoked or malformed",
        (_, false) => "forbidden, and no token was sent",
        _ => "the token may not do this: its scope (write/read) or its devices glob does not cover the device",
    }
}

/// Posts one batch until it is answered, refused for good, or the drain timeout runs out.
/// Readings refused for their rate limit are sent again, alone, after the wait.
async fn post(
    ctx: &Ctx,
    client: &reqwest::Client,
    url: &str,
    mut batch: Encoded,
    token: Option<&HeaderValue>,
) {
    let stats = &ctx.stats;
    let format = ctx.cfg.format;
    let mut first = true;
    let mut backoff = Duration::from_millis(50);
    loop {
        let items = &batch.items;
        if ctx.abort.is_cancelled() {
            stats.give_up(items);
            return;
        }
        stats.wrote(items, first, batch.bytes.len());
        first = false;
        let sent_at = Instant::now();
        let mut request = client.post(url).header(CONTENT_TYPE, format.content_type());
        if let Some(t) = token {
            request = request.header(AUTHORIZATION, t.clone());
        }
        let request = request.body(batch.bytes.clone()).send();
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
                    let _none = stats.settle(items, &answer, sent_at.elapsed());
                    return;
                }
                (Format::Line, 400) => {
                    let wait = rate_limit_wait(res.headers());
                    let text = res.text().await.unwrap_or_default();
                    let again = partial_write(ctx, items, &text, sent_at.elapsed());
                    if again.is_empty() {
                        return;
                    }
                    batch = batch.subset(&again);
                    backoff = Duration::from_millis(50);
                    tokio::select! {
                        _ = sleep(wait) => {}
                        _ = ctx.abort.cancelled() => {}
                    }
                    continue;
                }
                (_, 200 | 422) => {
                    let cbor = res
                        .headers()
                        .get(CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with("application/cbor"));
                    let wait = rate_limit_wait(res.headers());
                    let body = res.bytes().await;
                    match body
                        .map_err(|e| chain(&e))
                        .and_then(|b| parse_answer(&b, cbor))
                    {
                        Ok(answer) => {
                            let answer = by_reading(answer, &batch);
                            let again = stats.settle(items, &answer, sent_at.elapsed());
                            if again.is_empty() {
                                return;
                            }
                            // Sent again (counted in `resent`) with the same seqs, alone.
                            batch = batch.subset(&again);
                            backoff = Duration::from_millis(50);
                            tokio::select! {
                                _ = sleep(wait) => {}
                                _ = ctx.abort.cancelled() => {}
                            }
                            continue;
                        }
                        Err(e) => {
                            // The batch may be committed; sending it again is safe (same seqs).
                            stats.errors.inc();
                            stats.problem(|| format!("HTTP answer unreadable: {e}"));
                            backoff
                        }
                    }
                }
                (_, 503) => {
                    stats.shed.inc();
                    retry_after(&res).unwrap_or(Duration::from_secs(1))
                }
                (_, 429) => {
                    stats.rate_limited.add(items.len() as u64);
                    rate_limit_wait(res.headers())
                }
                (_, status @ (401 | 403)) => {
                    let text = res.text().await.unwrap_or_default();
                    stats.auth_failures.inc();
                    stats.problem(|| {
                        format!(
                            "HTTP {status}, batch given up: {}: {}",
                            auth_hint(status, token.is_some()),
                            text.chars().take(300).collect::<String>()
                        )
                    });
                    stats.give_up(items);
                    return;
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
/// When line `n` is over its device's rate limit, it and the lines after it are to be sent
/// again (those of them that were stored then count as duplicates): their indexes are returned.
fn partial_write(ctx: &Ctx, items: &[Item], body: &str, latency: Duration) -> Vec<usize> {
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
        return Vec::new();
    };
    let bad = line.saturating_sub(1).min(items.len());
    if message.contains("rate_limited") && items[bad..].iter().all(|i| i.fault.is_none()) {
        let answer = Answer {
            accepted: bad as u64,
            ..Answer::default()
        };
        let _none = stats.settle(&items[..bad], &answer, latency);
        stats.rate_limited.add((items.len() - bad) as u64);
        return (bad..items.len()).collect();
    }
    let answer = Answer {
        accepted: bad as u64,
        duplicates: 0,
        rejected: (bad < items.len())
            .then_some(Rejected {
                index: bad,
                error: message,
                reason: None,
            })
            .into_iter()
            .collect(),
    };
    let known = (bad + 1).min(items.len());
    let _none = stats.settle(&items[..known], &answer, latency);
    if known < items.len() {
        stats.problem(|| {
            format!(
                "line-protocol partial write: line {line} rejected, the {} lines after it not known to be stored",
                items.len() - known
            )
        });
        stats.give_up(&items[known..]);
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{FleetProfile, FleetSpec};

    #[test]
    fn lanes_start_spread_over_one_send_period() {
        let linger = Duration::from_millis(50);
        // 100 000 readings/s over 32 lanes: 3 125/s each, a batch of 100 every 32 ms.
        let at = |k| Phase { k, n: 32 }.offset(3125.0, 100, linger);
        assert_eq!(at(0), Duration::ZERO);
        assert_eq!(at(16), Duration::from_millis(16));
        assert_eq!(at(31), Duration::from_millis(31));
        // A slow lane sends at --linger, so its phase stays within that.
        let slow = Phase { k: 2, n: 3 }.offset(20.0, 100, linger);
        assert!(slow > Duration::from_millis(33) && slow < Duration::from_millis(34));
        // Unpaced: no offset.
        assert_eq!(
            Phase { k: 5, n: 8 }.offset(0.0, 100, linger),
            Duration::ZERO
        );
    }

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
        source.begin();
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
            .map(|k| Source {
                pick: Pick::Fleet {
                    devices: devices.clone(),
                    rng: SmallRng::seed_from_u64(lane_seed(7, k)),
                },
                per_device: false,
                current: 0,
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

    /// With a token per device, a request carries one device: the lane's own in turn
    /// (gateway), or one drawn per batch (random); seqs stay consecutive per device.
    #[test]
    fn per_device_batches_carry_one_device() {
        let devices = fleet(50);
        let mut random = Source {
            pick: Pick::Fleet {
                devices,
                rng: SmallRng::seed_from_u64(lane_seed(7, 0)),
            },
            per_device: true,
            current: 0,
        };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..40 {
            let (readings, items) = batch(&mut random, 20);
            assert!(items.iter().all(|i| i.device == items[0].device));
            assert_eq!(random.device(), items[0].device);
            assert_eq!(readings[0]["device_id"], format!("mix-{}", items[0].device));
            let seqs: Vec<u64> = items.iter().map(|i| i.seq.unwrap()).collect();
            assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
            seen.insert(items[0].device);
        }
        assert!(
            seen.len() > 20,
            "draws spread over the fleet: {}",
            seen.len()
        );
        let own: Vec<Device> = FleetSpec {
            prefix: "mix".into(),
            devices: 6,
            profile: FleetProfile::Mixed,
            metrics: 4,
            seed: 7,
            seq_start: 1,
            bad_ratio: 0.0,
            distinct_ts: false,
        }
        .build()
        .into_iter()
        .filter(|d| d.index % 2 == 1)
        .collect();
        let mut gateway = Source {
            pick: Pick::Own {
                devices: own,
                next: 0,
            },
            per_device: true,
            current: 0,
        };
        let order: Vec<u32> = (0..6)
            .map(|_| {
                let (_, items) = batch(&mut gateway, 3);
                assert!(items.iter().all(|i| i.device == items[0].device));
                assert_eq!(gateway.device(), items[0].device);
                items[0].device
            })
            .collect();
        assert_eq!(order, [1, 3, 5, 1, 3, 5]);
    }

    #[test]
    fn rate_limit_waits_follow_the_headers() {
        use reqwest::header::HeaderMap;
        let mut h = HeaderMap::new();
        assert_eq!(rate_limit_wait(&h), Duration::from_secs(1));
        h.insert("ratelimit", "\"default\";r=0;t=3".parse().unwrap());
        assert_eq!(rate_limit_wait(&h), Duration::from_secs(3));
        h.insert(RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(rate_limit_wait(&h), Duration::from_secs(2));
    }

    #[test]
    fn random_mix_is_repeatable_with_the_seed() {
        let draws = |seed: u64| {
            let mut s = Source {
                pick: Pick::Fleet {
                    devices: fleet(100_000),
                    rng: SmallRng::seed_from_u64(lane_seed(seed, 3)),
                },
                per_device: false,
                current: 0,
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
        assert!(partial_write(&ctx, &items(5), body, Duration::from_millis(2)).is_empty());
        let s = &ctx.stats;
        assert_eq!((s.acked.get(), s.accepted.get()), (2, 2));
        assert_eq!((s.rejected.get(), s.rejected_unexpected.get()), (1, 1));
        assert_eq!(s.unacked.get(), 2);
        assert_eq!(s.errors.get(), 0);
        let log = s.acklog.as_ref().unwrap().snapshot();
        assert_eq!(log[0].to_vec(), [1, 2]);
        // A 400 without a line number (not a partial write): the batch is given up.
        let ctx = self::ctx();
        let again = partial_write(
            &ctx,
            &items(4),
            r#"{"code":"invalid","message":"x"}"#,
            Duration::ZERO,
        );
        assert!(again.is_empty());
        assert_eq!((ctx.stats.acked.get(), ctx.stats.unacked.get()), (0, 4));
        assert_eq!(ctx.stats.errors.get(), 1);
        // Line 2 over its device's rate limit: line 1 stored, lines 2–4 to be sent again.
        let ctx = self::ctx();
        let body = r#"{"code":"invalid","message":"partial write: line 2: rate_limited: device `d` is over rate_limit.per_device; retry in 20 ms (3 line(s) rejected, the others stored)","line":2}"#;
        let again = partial_write(&ctx, &items(4), body, Duration::ZERO);
        assert_eq!(again, [1, 2, 3]);
        let s = &ctx.stats;
        assert_eq!((s.acked.get(), s.rate_limited.get()), (1, 3));
        assert_eq!(
            (s.rejected.get(), s.unacked.get(), s.errors.get()),
            (0, 0, 0)
        );
    }

    /// SenML answers name records; each rejection becomes its reading, once.
    #[test]
    fn senml_record_rejections_map_to_readings() {
        let batch = Encoded {
            bytes: bytes::Bytes::new(),
            items: items(3),
            record_items: vec![0, 0, 0, 1, 1, 1, 2, 2, 2],
            spans: Vec::new(),
            format: Format::SenmlJson,
        };
        let rejected = |index: usize| Rejected {
            index,
            error: "x: y".into(),
            reason: None,
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
