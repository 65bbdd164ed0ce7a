//! The MQTT processor task: held messages in arrival order → parse at the edge ([`decide`])
//! → dead-letter what can never be taken → admission → commit → PUBACKs strictly in arrival
//! order (see the parent module for the whole picture).

use super::dead_letter::{DeadLetter, DeadReading, MessageError, INVALID_DEVICE_LEVEL};
use super::{Answered, Ctx, Taken};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, StreamExt};
use rumqttc::{Publish, QoS};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{LimitSettings, Settings};
use crate::ingest::{parse_readings, Format, INLINE_PARSE_BYTES};
use crate::reading::{self, format_ts, BatchError, DeviceId, ParsedBatch, RejectReason};
use crate::telemetry::metrics::Transport;

/// First delay before resubmitting a refused message; doubles up to `pipeline.retry_after`.
const RETRY_MIN: Duration = Duration::from_millis(10);
/// Messages being answered at once (parsed, submitted, awaiting their commit); later held
/// messages wait unparsed. Enough to fill the largest batches the batcher makes.
const ACTIVE_MESSAGES: usize = 4096;

/// Takes messages from the connection task, answers each, and sends PUBACKs in arrival order.
///
/// At most [`ACTIVE_MESSAGES`] are being answered at a time (parsed, submitted, awaiting their
/// commit); the rest of the held messages wait, unparsed, in arrival order. That keeps a
/// broker's flood from turning into tens of thousands of futures and retries against a full
/// pipeline: a waiting message costs its payload and little more.
///
/// On shutdown, the active messages are answered and PUBACKed; the waiting ones were never
/// started and are left for the broker to redeliver. Ends after asking for DISCONNECT.
pub(super) async fn run_processor(
    ctx: Arc<Ctx>,
    mut rx: mpsc::Receiver<Taken>,
    mut stop: watch::Receiver<bool>,
    done: oneshot::Sender<()>,
) {
    let mut active = FuturesOrdered::new();
    let mut waiting: VecDeque<Taken> = VecDeque::new();
    let mut open = true;
    let mut stopping = false;
    loop {
        // In arrival order: everything waiting arrived after everything active.
        while active.len() < ACTIVE_MESSAGES {
            let Some(t) = waiting.pop_front() else { break };
            if t.generation < ctx.shared.resumed.load(Ordering::Acquire) {
                // A later connection resumed the session: the broker redelivers this one.
                ctx.abandon(&t);
            } else {
                active.push_back(answer(ctx.clone(), t));
            }
        }
        tokio::select! {
            taken = rx.recv(), if open => match taken {
                Some(t) if stopping => ctx.abandon(&t),
                Some(t) => waiting.push_back(t),
                None => open = false,
            },
            Some(answered) = active.next(), if !active.is_empty() => ctx.puback(answered),
            _ = stop.changed(), if !stopping => {
                stopping = true;
                ctx.shared.stopping.store(true, Ordering::Release);
                // Nothing more is taken; what was not started is left for redelivery.
                rx.close();
                for t in waiting.drain(..) {
                    ctx.abandon(&t);
                }
                tracing::info!(
                    answering = active.len(),
                    "MQTT: no longer taking messages; answering those started"
                );
            }
        }
        if !open && active.is_empty() && waiting.is_empty() {
            break;
        }
    }
    if tokio::time::timeout(Duration::from_secs(5), ctx.client.disconnect())
        .await
        .is_err()
    {
        tracing::warn!("MQTT DISCONNECT could not be queued");
    }
    drop(done);
}

impl Ctx {
    /// Sends the PUBACK for the oldest answered message, if it is due one and its connection is
    /// still the live one.
    fn puback(&self, answered: Answered) {
        if let Some(publish) = answered.ack {
            let live = self.shared.live.lock().expect("mqtt live lock");
            if *live == Some(answered.generation) {
                // Counted before queuing: the connection task may write it at once.
                self.shared.unwritten_acks.fetch_add(1, Ordering::AcqRel);
                match self.client.try_ack(&publish) {
                    Ok(()) => {
                        self.ack_latency
                            .observe(answered.received.elapsed().as_secs_f64());
                    }
                    Err(e) => {
                        self.shared.unwritten_acks.fetch_sub(1, Ordering::AcqRel);
                        if let Some(suppressed) = self.puback_failing.event() {
                            tracing::warn!(
                                error = %e,
                                suppressed,
                                "PUBACK could not be queued; the broker will redeliver the message"
                            );
                        }
                    }
                }
            }
        }
        self.shared
            .held_bytes
            .fetch_sub(answered.bytes, Ordering::AcqRel);
        self.shared.held.fetch_sub(1, Ordering::AcqRel);
        self.metrics.mqtt_unacked.set(self.shared.unacked() as i64);
    }

    /// Lets go of a message that was never started: no PUBACK, so the broker redelivers it.
    fn abandon(&self, t: &Taken) {
        self.shared
            .held_bytes
            .fetch_sub(t.publish.payload.len(), Ordering::AcqRel);
        self.shared.held.fetch_sub(1, Ordering::AcqRel);
        self.metrics.mqtt_unacked.set(self.shared.unacked() as i64);
    }

    /// Counts readings received and rejected under `transport="mqtt"`.
    fn count(&self, received: usize, rejected: impl IntoIterator<Item = RejectReason>) {
        self.received.inc_by(received as u64);
        for reason in rejected {
            self.metrics.rejected(Transport::Mqtt, reason, 1);
        }
    }

    /// Republishes (QoS 1) what could not be taken, with its error.
    async fn dead_letter(&self, device: Option<&DeviceId>, t: &Taken, letter: DeadLetter<'_>) {
        let topic = format!(
            "{}/{}",
            self.settings.mqtt.dead_letter_topic,
            device.map(DeviceId::as_str).unwrap_or(INVALID_DEVICE_LEVEL)
        );
        let body = match serde_json::to_vec(&letter) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a dead letter");
                return;
            }
        };
        tracing::debug!(topic = %t.publish.topic, dead_letter = %topic, "MQTT payload dead-lettered");
        match self
            .client
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
        {
            Ok(()) => self.metrics.mqtt_dead_letters.inc(),
            Err(e) => {
                if let Some(suppressed) = self.dead_letter_failing.event() {
                    tracing::warn!(error = %e, suppressed, "cannot queue a dead letter");
                }
            }
        }
    }
}

/// The device id from the topic's `+` level (`device_level`, counted from 0).
fn device_of(topic: &str, device_level: usize) -> Result<DeviceId, String> {
    let level = topic.split('/').nth(device_level).ok_or_else(|| {
        format!(
            "topic `{topic}` has no level {} for the device id",
            device_level + 1
        )
    })?;
    DeviceId::parse(level)
        .map_err(|e| format!("device id in topic level {}: {e}", device_level + 1))
}

/// What one message comes to, decided from its topic and payload alone: the pure part of
/// [`answer`], with no I/O, so that it can be tested and fuzzed on its own.
#[derive(Debug)]
pub enum Verdict {
    /// The message can never be taken: it is PUBACKed, counted as `readings` rejected for
    /// `reason`, and dead-lettered with `detail`.
    Refused {
        /// The device from the topic; `None` when that level is not a valid device id.
        device: Option<DeviceId>,
        /// The `reason` label it is counted under.
        reason: RejectReason,
        /// What is wrong, for the device's developer.
        detail: String,
        /// Readings it is counted as (1 when the payload could not be split).
        readings: usize,
    },
    /// The payload parsed: `parsed.readings` go on to be committed, and `parsed.rejected`, if
    /// any, are dead-lettered beside them.
    Parsed {
        /// The device from the topic.
        device: DeviceId,
        /// What the edge parser made of the payload.
        parsed: ParsedBatch,
    },
}

/// Decides what a message on `topic` with `payload`, received at `received_ms`, comes to:
/// the device from topic level `device_level`, then the size limit, then the format's parser
/// ([`Format::of_mqtt`]: Sluice's JSON, one reading or an array, or a SenML pack; the device
/// bound to the topic, one leading byte-order mark ignored). Pure and synchronous; [`answer`] runs it on a blocking thread for large payloads.
pub fn decide(
    topic: &str,
    payload: &[u8],
    device_level: usize,
    limits: &LimitSettings,
    received_ms: i64,
) -> Verdict {
    let device = match device_of(topic, device_level) {
        Ok(d) => d,
        Err(detail) => {
            return Verdict::Refused {
                device: None,
                reason: RejectReason::InvalidDeviceId,
                detail,
                readings: 1,
            }
        }
    };
    if payload.len() > limits.max_body_bytes {
        return Verdict::Refused {
            device: Some(device),
            reason: RejectReason::TooLarge,
            detail: format!(
                "payload of {} bytes exceeds limits.max_body_bytes ({})",
                payload.len(),
                limits.max_body_bytes
            ),
            readings: 1,
        };
    }
    let ctx = reading::ParseContext {
        now_ms: received_ms,
        max_future_skew: limits.max_future_skew,
        max_age: limits.max_age,
        max_readings: limits.max_readings_per_request,
        bound_device: Some(&device),
        token_device: None,
    };
    let parsed = Format::of_mqtt(topic, payload).parse(payload, &ctx);
    match parsed {
        Ok(parsed) => Verdict::Parsed { device, parsed },
        Err(BatchError::Malformed(detail)) => Verdict::Refused {
            device: Some(device),
            reason: RejectReason::Malformed,
            detail,
            readings: 1,
        },
        Err(e @ BatchError::TooMany { count, .. }) => Verdict::Refused {
            device: Some(device),
            reason: RejectReason::TooManyReadings,
            detail: e.to_string(),
            readings: count,
        },
    }
}

impl Verdict {
    /// The device from the topic, if it is a valid id.
    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            Verdict::Refused { device, .. } => device.as_ref(),
            Verdict::Parsed { device, .. } => Some(device),
        }
    }

    /// The dead letter to republish for this message, if any: always for a refused message,
    /// and for a parsed one when some of its readings were rejected. `max_body_bytes` bounds the
    /// payload copied into it.
    pub fn dead_letter<'a>(
        &'a self,
        topic: &'a str,
        payload: &'a [u8],
        received_ms: i64,
        max_body_bytes: usize,
    ) -> Option<DeadLetter<'a>> {
        let base = DeadLetter {
            topic,
            device_id: self.device().map(DeviceId::as_str),
            received_at: format_ts(received_ms),
            payload_bytes: payload.len(),
            payload: (payload.len() <= max_body_bytes)
                .then(|| std::str::from_utf8(payload).ok())
                .flatten(),
            error: None,
            rejected: Vec::new(),
            taken: 0,
        };
        match self {
            Verdict::Refused { reason, detail, .. } => Some(DeadLetter {
                error: Some(MessageError {
                    reason: reason.as_str(),
                    detail: detail.clone(),
                }),
                ..base
            }),
            Verdict::Parsed { parsed, .. } if !parsed.rejected.is_empty() => Some(DeadLetter {
                rejected: parsed
                    .rejected
                    .iter()
                    .map(|r| DeadReading {
                        index: r.index,
                        reason: r.error.kind.as_str(),
                        error: r.error.to_string(),
                    })
                    .collect(),
                taken: parsed.readings.len(),
                ..base
            }),
            Verdict::Parsed { .. } => None,
        }
    }
}

/// Parses a payload bound to `device` in its format (for a resubmission).
async fn parse(
    settings: &Arc<Settings>,
    device: &DeviceId,
    topic: &str,
    payload: &Bytes,
    received_ms: i64,
) -> Result<ParsedBatch, BatchError> {
    parse_readings(
        settings,
        payload.clone(),
        Format::of_mqtt(topic, payload),
        crate::reading::Binding::Transport(device.clone()),
        received_ms,
    )
    .await
}

/// Answers one message: dead-letters what can never be taken, and commits the rest, retrying
/// while the pipeline refuses. Resolves when the message may be PUBACKed, or when it is left
/// for the broker to redeliver.
async fn answer(ctx: Arc<Ctx>, t: Taken) -> Answered {
    let answered = |acked: bool| Answered {
        ack: (acked && t.publish.qos != QoS::AtMostOnce).then(|| {
            let mut p = Publish::new("", t.publish.qos, Vec::new());
            p.pkid = t.publish.pkid;
            p
        }),
        generation: t.generation,
        received: t.received,
        bytes: t.publish.payload.len(),
    };
    let limits = &ctx.settings.limits;
    let payload = &t.publish.payload;
    let level = ctx.device_level;
    let verdict = if payload.len() > INLINE_PARSE_BYTES {
        // A large payload is parsed on a blocking thread, as for the other transports.
        let (topic, bytes, lim, ms) = (
            t.publish.topic.clone(),
            payload.clone(),
            limits.clone(),
            t.received_ms,
        );
        tokio::task::spawn_blocking(move || decide(&topic, &bytes, level, &lim, ms))
            .await
            .unwrap_or_else(|e| Verdict::Refused {
                device: device_of(&t.publish.topic, level).ok(),
                reason: RejectReason::Malformed,
                detail: format!("parser failed: {e}"),
                readings: 1,
            })
    } else {
        decide(&t.publish.topic, payload, level, limits, t.received_ms)
    };
    // The device's rate limit: wait for its allowance (PUBACK withheld), or, when that would
    // take longer than rate_limit.mqtt_max_wait, refuse the whole message.
    let verdict = match verdict {
        Verdict::Parsed { device, parsed } if !parsed.readings.is_empty() => {
            match rate_gate(&ctx, &device, parsed.readings.len()).await {
                Gate::Go => Verdict::Parsed { device, parsed },
                Gate::Stopped => return answered(false),
                Gate::Refused(wait) => {
                    let readings = parsed.total();
                    ctx.metrics
                        .readings_rate_limited
                        .with_label_values(&[Transport::Mqtt.as_str()])
                        .inc_by(readings as u64);
                    Verdict::Refused {
                        detail: format!(
                            "device `{device}` is over rate_limit.per_device: its readings would wait {} ms, longer than rate_limit.mqtt_max_wait ({} ms)",
                            wait.as_millis(),
                            ctx.settings.rate_limit.mqtt_max_wait.as_millis()
                        ),
                        device: Some(device),
                        reason: RejectReason::RateLimited,
                        readings,
                    }
                }
            }
        }
        other => other,
    };
    match &verdict {
        Verdict::Refused {
            reason, readings, ..
        } => {
            ctx.count(*readings, []);
            ctx.metrics
                .rejected(Transport::Mqtt, *reason, *readings as u64);
        }
        Verdict::Parsed { parsed, .. } => {
            ctx.count(parsed.total(), parsed.rejected.iter().map(|r| r.error.kind))
        }
    }
    if let Some(dl) = verdict.dead_letter(
        &t.publish.topic,
        payload,
        t.received_ms,
        limits.max_body_bytes,
    ) {
        ctx.dead_letter(verdict.device(), &t, dl).await;
    }
    let (device, readings) = match verdict {
        Verdict::Parsed { device, parsed } if !parsed.readings.is_empty() => {
            (device, parsed.readings)
        }
        _ => return answered(true),
    };
    let committed = commit(&ctx, &t, &device, readings).await;
    answered(committed)
}

/// What the rate limit makes of a message.
enum Gate {
    /// Under the limit, or waited for it: go on and commit.
    Go,
    /// Over the limit by more than `rate_limit.mqtt_max_wait` (this long): refuse it.
    Refused(Duration),
    /// Shutdown came while waiting: leave the message for the broker to redeliver.
    Stopped,
}

/// Takes `n` readings of `device` from its allowance, waiting for it when the wait is within
/// `rate_limit.mqtt_max_wait`. The wait is bounded from above by the readings of that device
/// already waiting plus these, at the configured rate: over its device's limit, a message
/// waits here, unadmitted, and its PUBACK (and those after it, which must follow in order)
/// with it, while other devices' messages are parsed and committed meanwhile. Bounding it
/// keeps one device with a deep backlog from filling `mqtt.max_unacked` and stalling the
/// connection for everyone else (the bound is what SPEC §11's "PUBACK withheld" can give on a
/// connection that all devices share). A message of more readings than the burst, from a
/// device with nothing waiting, takes what the allowance has at once and waits for the rest;
/// if the rest would take too long, the allowance taken is spent and the whole message is
/// dead-lettered.
async fn rate_gate(ctx: &Ctx, device: &DeviceId, n: usize) -> Gate {
    let Some(limiter) = &ctx.limiter else {
        return Gate::Go;
    };
    let (wait, n) = {
        let mut waiting = ctx.rate_waiting.lock().unwrap_or_else(|e| e.into_inner());
        let ahead = waiting.get(device.as_str()).copied().unwrap_or(0);
        // Nothing of this device waiting: take what the allowance has now, up to the burst
        // (a message of more readings than the burst takes a whole burst, and waits for the
        // rest). Otherwise behind those waiting, in turn.
        let burst = limiter.rate().burst.max(1) as usize;
        let now = n.min(burst);
        let left = if ahead == 0 && limiter.try_take(device.as_str(), now) {
            n - now
        } else {
            n
        };
        if left == 0 {
            return Gate::Go;
        }
        // At most this long: from an empty allowance, one interval per reading.
        let wait = limiter
            .rate()
            .interval()
            .saturating_mul(u32::try_from(ahead + left).unwrap_or(u32::MAX));
        if wait > ctx.settings.rate_limit.mqtt_max_wait {
            return Gate::Refused(wait);
        }
        *waiting.entry(device.as_str().to_owned()).or_default() += left;
        (wait, left)
    };
    // Whatever happens next (taken, shutdown, this future dropped), the readings stop waiting.
    struct Waiting<'a>(&'a Ctx, &'a str, usize);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            let mut waiting = self
                .0
                .rate_waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(left) = waiting.get_mut(self.1) {
                *left = left.saturating_sub(self.2);
                if *left == 0 {
                    waiting.remove(self.1);
                }
            }
        }
    }
    let _waiting = Waiting(ctx, device.as_str(), n);
    tracing::trace!(device = %device, readings = n, wait_ms = wait.as_millis() as u64, "MQTT message waits for its device's rate limit");
    let mut stop = ctx.stop.clone();
    tokio::select! {
        waited = limiter.until_ready(device.as_str(), n) => {
            if waited {
                ctx.metrics
                    .readings_rate_limited
                    .with_label_values(&[Transport::Mqtt.as_str()])
                    .inc_by(n as u64);
            }
            Gate::Go
        }
        _ = stop.wait_for(|s| *s) => Gate::Stopped,
    }
}

/// Submits the readings and waits for their commit, resubmitting after a refusal or a failed
/// commit. `true` once committed (or known duplicates); `false` when given up, which happens
/// only on shutdown or when the broker will redeliver the message to a resumed session.
async fn commit(ctx: &Ctx, t: &Taken, device: &DeviceId, readings: Vec<reading::Reading>) -> bool {
    let mut readings = Some(readings);
    let mut delay = RETRY_MIN;
    let cap = ctx.settings.pipeline.retry_after.max(RETRY_MIN);
    let mut stop = ctx.stop.clone();
    loop {
        let batch = match readings.take() {
            Some(r) => r,
            // `submit` consumed them. The same payload and receive time parse to the same
            // readings, so a retry stores exactly what the first attempt would have.
            None => match parse(
                &ctx.settings,
                device,
                &t.publish.topic,
                &t.publish.payload,
                t.received_ms,
            )
            .await
            {
                Ok(p) => p.readings,
                Err(_) => return false,
            },
        };
        match ctx.admission.submit(Transport::Mqtt, batch) {
            Ok(ack) => match ack.await {
                Ok(Ok(_)) => return true,
                Ok(Err(e)) => tracing::debug!(error = %e, "MQTT message not committed; retrying"),
                Err(_) => tracing::debug!("MQTT message dropped by the pipeline; retrying"),
            },
            Err(refusal) => tracing::debug!(%refusal, "MQTT message refused; retrying"),
        }
        if ctx.shared.stopping.load(Ordering::Acquire) {
            return false;
        }
        if t.generation < ctx.shared.resumed.load(Ordering::Acquire) {
            // A later connection resumed the session: the broker redelivers this message.
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return false,
        }
        delay = (delay * 2).min(cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitSettings;
    use crate::reading::now_ms;

    #[test]
    fn decide_refuses_or_parses_and_dead_letters_only_what_was_refused() {
        let limits = LimitSettings {
            max_body_bytes: 256,
            ..LimitSettings::default()
        };
        let now = now_ms();
        let topic = "devices/d1/readings";
        let decide = |topic: &str, payload: &[u8]| decide(topic, payload, 1, &limits, now);

        let ok = b"\xEF\xBB\xBF{\"seq\":1,\"metrics\":{\"x\":18446744073709551615}}";
        let v = decide(topic, ok);
        assert!(matches!(&v, Verdict::Parsed { parsed, .. } if parsed.readings.len() == 1));
        assert!(v.dead_letter(topic, ok, now, 256).is_none());

        let partial = br#"[{"metrics":{"x":1}},{"metrics":{"x":-9223372036854775809}}]"#;
        let v = decide(topic, partial);
        let dl = serde_json::to_value(v.dead_letter(topic, partial, now, 256).unwrap()).unwrap();
        assert_eq!(dl["taken"], 1);
        assert_eq!(dl["rejected"][0]["index"], 1);
        assert_eq!(dl["rejected"][0]["reason"], "invalid_metrics");
        assert_eq!(dl["payload"], std::str::from_utf8(partial).unwrap());

        let refused = |topic: &str, payload: &[u8]| match decide(topic, payload) {
            Verdict::Refused {
                reason,
                detail,
                device,
                ..
            } => (reason, detail, device),
            other => panic!("{other:?}"),
        };
        let (reason, detail, device) = refused(topic, b"\xEF\xBB\xBF\xEF\xBB\xBF{}");
        assert_eq!(
            (reason, device.unwrap().as_str()),
            (RejectReason::Malformed, "d1")
        );
        assert!(
            detail.contains("unexpected byte 0xEF (a UTF-8 byte-order mark?)"),
            "{detail}"
        );
        let (reason, _, device) = refused("devices/a+b/readings", b"{}");
        assert_eq!((reason, device), (RejectReason::InvalidDeviceId, None));
        let (reason, ..) = refused(topic, &[b' '; 300]);
        assert_eq!(reason, RejectReason::TooLarge);
        let (reason, detail, _) = refused(topic, b"[1, \xFF]");
        assert_eq!(
            (reason, detail.as_str()),
            (
                RejectReason::Malformed,
                "not UTF-8: invalid byte 0xFF at offset 4"
            )
        );
    }

    #[test]
    fn dead_letter_shape() {
        let dl = DeadLetter {
            topic: "devices/d1/readings",
            device_id: Some("d1"),
            received_at: format_ts(0),
            payload_bytes: 3,
            payload: Some("{x}"),
            error: Some(MessageError {
                reason: "malformed",
                detail: "bad".into(),
            }),
            rejected: vec![],
            taken: 0,
        };
        let v: serde_json::Value = serde_json::to_value(&dl).unwrap();
        assert_eq!(v["error"]["reason"], "malformed");
        assert_eq!(v["device_id"], "d1");
        assert_eq!(v["received_at"], "1970-01-01T00:00:00.000Z");
        let dl = DeadLetter {
            payload: None,
            error: None,
            device_id: None,
            ..dl
        };
        let v: serde_json::Value = serde_json::to_value(&dl).unwrap();
        assert!(v.get("error").is_none() && v.get("payload").is_none());
        assert!(v["device_id"].is_null());
    }
}
