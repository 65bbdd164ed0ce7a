//! HTTP: `POST /v1/readings` with JSON arrays of readings, over a keep-alive pool.
//!
//! There are `--connections` lanes. Each owns every `--connections`-th device and sends one
//! batch at a time, like a gateway forwarding its devices' readings: in the paced modes it
//! collects due readings until the batch is full or the oldest has waited `--linger`; in max
//! mode it fills the batch at once and sends again as soon as the answer is in.
//!
//! Answers: 200/422 are settled reading by reading; 503/429 wait `Retry-After` and send the same
//! body again; other 4xx give the batch up (its readings can never be taken); network errors
//! and other statuses retry with exponential back-off until the drain timeout.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, Instant};

use super::{chain, now_ms, Ctx};
use crate::fleet::{Device, Item};
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
    let n = cfg.connections.min(devices.len());
    let mut parts: Vec<Vec<Device>> = (0..n).map(|_| Vec::new()).collect();
    for d in devices {
        parts[d.index as usize % n].push(d);
    }
    for part in parts {
        lanes.spawn(lane(ctx.clone(), client.clone(), part));
    }
    Ok(())
}

/// Appends `k` readings, round-robin over `devices`, to a batch being built.
fn fill(
    devices: &mut [Device],
    next: &mut usize,
    k: usize,
    body: &mut String,
    items: &mut Vec<Item>,
) {
    let ts = now_ms();
    for _ in 0..k {
        if !items.is_empty() {
            body.push(',');
        }
        let len = devices.len();
        items.push(devices[*next].write_reading(ts, true, body));
        *next = (*next + 1) % len;
    }
}

async fn lane(ctx: Arc<Ctx>, client: reqwest::Client, mut devices: Vec<Device>) {
    let url = format!("{}/v1/readings", ctx.cfg.target);
    let share = devices.len() as f64;
    let b = ctx.cfg.batch;
    let (rate, mut generation) = ctx.rate.get();
    let mut pacer = Pacer::new(rate * share, ctx.start);
    let mut next = 0;
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
                fill(&mut devices, &mut next, k as usize, &mut body, &mut items);
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
            fill(&mut devices, &mut next, b, &mut body, &mut items);
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
