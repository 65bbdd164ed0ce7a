//! MQTT: devices publish to `devices/<id>/readings` through a broker, QoS 0 or 1.
//!
//! There are `--mqtt-clients` lanes (one per device by default), each a rumqttc client with its
//! own connection, publishing for its devices round-robin. A payload is one reading object or,
//! with `--frame-readings k`, an array of `k`. Readings carry `device_id` (matching the topic).
//! With `--format senml-json` the payload is a SenML pack whose base name is `<device_id>/`.
//!
//! Acknowledgement: with QoS 1 a reading counts as acknowledged at the broker's PUBACK — for a
//! device, that is the end of the line (Sluice's own PUBACK to the broker comes after its commit,
//! SPEC §6). With QoS 0 nothing is ever acknowledged; readings are only counted as sent.
//!
//! Bookkeeping: rumqttc assigns packet ids inside its event loop, and reports each publish it
//! writes as `Outgoing::Publish(pkid)`, in request order. The lane keeps its publishes in that
//! order (`queued`), pairs each with its pkid when the event comes, and settles it at the PUBACK.
//! The lane publishes only while connected, with a clean session: when the connection breaks,
//! rumqttc drops what it held, and the lane sends every unacknowledged publish again itself.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{Notify, Semaphore, SemaphorePermit};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, Instant};

use super::{now_ms, Ctx, Ended};
use crate::encode::{Encoder, Format};
use crate::fleet::{Device, Item};
use crate::rate::Pacer;

/// Largest MQTT packet either way.
const MAX_PACKET: usize = 4 << 20;

/// Starts the lanes.
pub fn spawn(ctx: &Arc<Ctx>, lanes: &mut JoinSet<()>) {
    let gate = Arc::new(Semaphore::new(ctx.cfg.connect_concurrency));
    let n = ctx.cfg.mqtt_clients as usize;
    let mut parts: Vec<Vec<Device>> = (0..n).map(|_| Vec::new()).collect();
    for d in ctx.cfg.fleet().build() {
        parts[d.index as usize % n].push(d);
    }
    for (i, part) in parts.into_iter().enumerate() {
        lanes.spawn(lane(ctx.clone(), gate.clone(), i, part));
    }
}

/// The topic of `device`.
pub fn topic(device: &str) -> String {
    format!("devices/{device}/readings")
}

/// One publish and what it carries.
#[derive(Debug)]
struct Msg {
    /// Creation order, to resend in order.
    order: u64,
    topic: String,
    payload: Bytes,
    items: Vec<Item>,
    attempts: u32,
    sent_at: Instant,
}

#[derive(Default)]
struct Shared {
    /// Handed to rumqttc, waiting for their `Outgoing::Publish`, in order.
    queued: VecDeque<Msg>,
    /// Written with QoS 1, waiting for the PUBACK, by pkid.
    inflight: HashMap<u16, Msg>,
    /// To publish again (after a lost connection), oldest first.
    resend: VecDeque<Msg>,
    /// Between ConnAck and the next connection error.
    connected: bool,
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn lane(ctx: Arc<Ctx>, gate: Arc<Semaphore>, index: usize, mut devices: Vec<Device>) {
    let cfg = &ctx.cfg;
    let (host, port) = cfg.broker.clone();
    let mut opts = MqttOptions::new(format!("{}-c{index}", cfg.device_prefix), host, port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_inflight(cfg.window as u16)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    let (client, mut events) = AsyncClient::new(opts, cfg.window);
    let qos = if cfg.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let topics: Vec<String> = devices.iter().map(|d| topic(&d.id)).collect();
    let share = devices.len() as f64;
    let k = cfg.frame_readings as f64;
    let (rate, generation) = ctx.rate.get();
    let mut pacer = Pacer::new(rate * share / k, ctx.start);
    let shared = Mutex::new(Shared::default());
    let window = Semaphore::new(cfg.window);
    let wake = Notify::new();

    let end = {
        let publisher = publish(
            &ctx,
            &client,
            &mut devices,
            &topics,
            qos,
            &mut pacer,
            generation,
            &shared,
            &window,
            &wake,
        );
        let poller = poll(&ctx, &mut events, &gate, qos, &shared, &window, &wake);
        tokio::select! {
            e = publisher => e,
            e = poller => e,
        }
    };
    if matches!(end, Ended::Done) {
        // Send DISCONNECT and let the event loop write it.
        if client.disconnect().await.is_ok() {
            let _ = timeout(Duration::from_secs(1), async {
                loop {
                    match events.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
    }
    let s = shared.into_inner().unwrap_or_else(|e| e.into_inner());
    if s.connected {
        ctx.stats.connections.dec();
    }
    if qos == QoS::AtLeastOnce {
        for m in s
            .queued
            .iter()
            .chain(s.inflight.values())
            .chain(s.resend.iter())
        {
            ctx.stats.give_up(&m.items);
        }
    }
    if ctx.paced() && !cfg.idle {
        ctx.stats
            .behind
            .add(pacer.behind(ctx.stopped_at()) * cfg.frame_readings as u64);
    }
}

/// Generates and publishes, while connected, until everything is acknowledged.
#[allow(clippy::too_many_arguments)]
async fn publish(
    ctx: &Ctx,
    client: &AsyncClient,
    devices: &mut [Device],
    topics: &[String],
    qos: QoS,
    pacer: &mut Pacer,
    mut generation: u64,
    shared: &Mutex<Shared>,
    window: &Semaphore,
    wake: &Notify,
) -> Ended {
    let far = Duration::from_secs(86_400);
    let k = ctx.cfg.frame_readings;
    let share = devices.len() as f64;
    let mut next = 0usize;
    let mut order = 0u64;
    let mut started = false;
    loop {
        let slot: SemaphorePermit<'_> = tokio::select! {
            p = window.acquire() => match p { Ok(p) => p, Err(_) => return Ended::Aborted },
            _ = ctx.abort.cancelled() => return Ended::Aborted,
        };
        slot.forget(); // given back at the PUBACK (QoS 1) or when written (QoS 0)
        let msg = loop {
            let now = Instant::now();
            let finished = ctx.stop.is_cancelled();
            let generating = !finished && !ctx.cfg.idle;
            {
                let mut s = lock(shared);
                let outstanding = !s.resend.is_empty()
                    || !s.queued.is_empty()
                    || (qos == QoS::AtLeastOnce && !s.inflight.is_empty());
                if finished && !outstanding {
                    return Ended::Done;
                }
                if s.connected && !started {
                    // The schedule starts at the first connection (no burst after a slow connect).
                    *pacer = Pacer::new(pacer.rate(), now);
                    started = true;
                }
                if s.connected {
                    if let Some(m) = s.resend.pop_front() {
                        break m;
                    }
                    if generating {
                        if ctx.rate.generation() != generation {
                            let (rate, g) = ctx.rate.get();
                            pacer.set_rate(rate * share / k as f64, now);
                            generation = g;
                        }
                        if !ctx.paced() || pacer.available(now) > 0 {
                            if ctx.paced() {
                                pacer.take(1);
                            }
                            drop(s);
                            let i = next;
                            next = (next + 1) % devices.len();
                            order += 1;
                            break new_msg(
                                &mut devices[i],
                                topics[i].clone(),
                                k,
                                order,
                                ctx.cfg.format,
                                ctx.cfg.metrics,
                            );
                        }
                    }
                }
            }
            let until = if generating && ctx.paced() {
                pacer.next_at()
            } else {
                now + far
            };
            tokio::select! {
                _ = wake.notified() => {}
                _ = sleep_until(until) => {}
                _ = ctx.stop.cancelled(), if !finished => {}
                _ = ctx.abort.cancelled() => return Ended::Aborted,
            }
        };
        ctx.stats
            .wrote(&msg.items, msg.attempts == 0, msg.payload.len());
        let (topic, payload) = (msg.topic.clone(), msg.payload.clone());
        lock(shared).queued.push_back(msg);
        // The window never exceeds the request channel's capacity, so this does not wait.
        if client
            .publish_bytes(topic, qos, false, payload)
            .await
            .is_err()
        {
            return Ended::Lost("the MQTT event loop stopped".into());
        }
    }
}

fn new_msg(
    dev: &mut Device,
    topic: String,
    k: usize,
    order: u64,
    format: Format,
    metrics: usize,
) -> Msg {
    let ts = now_ms();
    let mut enc = Encoder::new(format, true, k > 1, k, metrics);
    for _ in 0..k {
        enc.push(dev, ts);
    }
    let e = enc.finish();
    Msg {
        order,
        topic,
        payload: e.bytes,
        items: e.items,
        attempts: 0,
        sent_at: Instant::now(),
    }
}

/// Drives the event loop: connects (through the connect gate), pairs publishes with pkids,
/// settles PUBACKs, and on a broken connection puts everything unacknowledged up for resending.
async fn poll(
    ctx: &Ctx,
    events: &mut EventLoop,
    gate: &Semaphore,
    qos: QoS,
    shared: &Mutex<Shared>,
    window: &Semaphore,
    wake: &Notify,
) -> Ended {
    let stats = &ctx.stats;
    let mut backoff = Duration::from_millis(100);
    let mut slot = tokio::select! {
        p = gate.acquire() => p.ok(),
        _ = ctx.abort.cancelled() => return Ended::Aborted,
    };
    loop {
        let event = tokio::select! {
            e = events.poll() => e,
            _ = ctx.abort.cancelled() => return Ended::Aborted,
        };
        match event {
            Ok(event) => handle(ctx, event, qos, shared, window, wake, &mut slot),
            Err(e) => {
                // Events rumqttc read before the failure are real (e.g. PUBACKs): take them first.
                for event in std::mem::take(&mut events.state.events) {
                    handle(ctx, event, qos, shared, window, wake, &mut slot);
                }
                // The clean session drops what rumqttc holds; the lane resends it itself.
                events.pending.clear();
                let was_connected = {
                    let mut s = lock(shared);
                    let was = std::mem::replace(&mut s.connected, false);
                    let mut back: Vec<Msg> = s.inflight.drain().map(|(_, m)| m).collect();
                    back.extend(s.queued.drain(..));
                    back.sort_by_key(|m| m.order);
                    let n = back.len();
                    for mut m in back.into_iter().rev() {
                        m.attempts += 1;
                        s.resend.push_front(m);
                    }
                    window.add_permits(n);
                    was
                };
                if was_connected {
                    stats.connections.dec();
                    stats.errors.inc();
                    stats.problem(|| format!("MQTT connection lost: {e}"));
                } else {
                    stats.connect_errors.inc();
                    stats.problem(|| {
                        format!(
                            "MQTT connect to {}:{}: {e}",
                            ctx.cfg.broker.0, ctx.cfg.broker.1
                        )
                    });
                }
                wake.notify_one();
                drop(slot.take()); // other clients may connect during the back-off
                tokio::select! {
                    _ = sleep(backoff) => {}
                    _ = ctx.abort.cancelled() => return Ended::Aborted,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                slot = tokio::select! {
                    p = gate.acquire() => p.ok(),
                    _ = ctx.abort.cancelled() => return Ended::Aborted,
                };
            }
        }
    }
}

fn handle(
    ctx: &Ctx,
    event: Event,
    qos: QoS,
    shared: &Mutex<Shared>,
    window: &Semaphore,
    wake: &Notify,
    slot: &mut Option<tokio::sync::SemaphorePermit<'_>>,
) {
    match event {
        Event::Incoming(Packet::ConnAck(_)) => {
            *slot = None;
            ctx.stats.connected();
            lock(shared).connected = true;
            wake.notify_one();
        }
        Event::Outgoing(Outgoing::Publish(pkid)) => {
            let mut s = lock(shared);
            let Some(mut m) = s.queued.pop_front() else {
                return;
            };
            if qos == QoS::AtMostOnce {
                drop(s);
                window.add_permits(1);
                wake.notify_one();
            } else {
                m.sent_at = Instant::now();
                s.inflight.insert(pkid, m);
            }
        }
        Event::Incoming(Packet::PubAck(ack)) => {
            let m = lock(shared).inflight.remove(&ack.pkid);
            if let Some(m) = m {
                ctx.stats.settle_all(&m.items, m.sent_at.elapsed());
                window.add_permits(1);
                wake.notify_one();
            }
        }
        _ => {}
    }
}
