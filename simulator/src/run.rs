//! One run, start to end: start the lanes, drive the mode, stop, drain, summarise, verify.
//!
//! ```text
//! start lanes ─▶ rate/max: wait --duration │ ramp: raise the rate step by step
//!             ─▶ stop generating ─▶ drain in-flight (≤ --drain-timeout, then give up)
//!             ─▶ summary ─▶ --verify: read every acknowledged reading back
//! ```

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::{Mode, RunConfig, Transport};
use crate::summary::{fmt_rate, RampReport, RampStep, Summary};
use crate::transport::{self, Ctx};
use crate::{sys, verify};

/// Runs the fleet described by `cfg`. `interrupt` ends generation early (Ctrl-C); the run then
/// drains and summarises as usual.
pub async fn run(cfg: RunConfig, interrupt: CancellationToken) -> anyhow::Result<Summary> {
    sys::raise_fd_limit();
    let cpu0 = sys::cpu_seconds();
    let ctx = Arc::new(Ctx::new(cfg));
    let mut lanes = JoinSet::new();
    match ctx.cfg.transport {
        Transport::Http => transport::http::spawn(&ctx, &mut lanes)?,
        Transport::Ws => transport::ws::spawn(&ctx, &mut lanes),
        Transport::Mqtt => transport::mqtt::spawn(&ctx, &mut lanes),
    }
    let progress_done = CancellationToken::new();
    let progress = ctx
        .cfg
        .progress
        .then(|| tokio::spawn(progress(ctx.clone(), progress_done.clone())));
    let timeline = tokio::spawn(timeline(ctx.clone(), progress_done.clone()));
    // Ends generation early: Ctrl-C, or every answer refusing the credentials.
    let halt = CancellationToken::new();
    let guard = tokio::spawn(auth_guard(
        ctx.clone(),
        interrupt.clone(),
        halt.clone(),
        progress_done.clone(),
    ));

    let end = ctx.start + ctx.cfg.duration;
    let ramp = match ctx.cfg.mode {
        Mode::Ramp => Some(ramp(&ctx, end, &halt).await),
        _ => {
            tokio::select! {
                _ = sleep_until(end) => {}
                _ = halt.cancelled() => {}
            }
            None
        }
    };
    ctx.stop_generating();
    let duration = ctx.start.elapsed();

    // Drain: lanes finish what is in flight, then give up at the drain timeout.
    let drained = timeout(ctx.cfg.drain_timeout, async {
        while lanes.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        ctx.abort.cancel();
        if timeout(Duration::from_secs(5), async {
            while lanes.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            lanes.abort_all();
        }
    }
    let elapsed = ctx.start.elapsed();
    progress_done.cancel();
    if let Some(p) = progress {
        let _ = p.await;
    }
    let acked_per_s = timeline.await.unwrap_or_default();
    let fatal = guard.await.ok().flatten();

    let s = &ctx.stats;
    let mut summary = Summary {
        transport: ctx.cfg.transport,
        format: ctx.cfg.format,
        mode: ctx.cfg.mode,
        target: match ctx.cfg.transport {
            Transport::Mqtt => format!("mqtt://{}:{}", ctx.cfg.broker.0, ctx.cfg.broker.1),
            _ => ctx.cfg.target.clone(),
        },
        devices: ctx.cfg.devices,
        rate_per_device: if ctx.cfg.idle { 0.0 } else { ctx.cfg.rate },
        target_rate: ctx.cfg.target_rate(),
        idle: ctx.cfg.idle,
        duration_s: duration.as_secs_f64(),
        elapsed_s: elapsed.as_secs_f64(),
        seed: ctx.cfg.seed,
        device_prefix: ctx.cfg.device_prefix.clone(),
        sent: s.sent.get(),
        resent: s.resent.get(),
        acked: s.acked.get(),
        accepted: s.accepted.get(),
        duplicates: s.duplicates.get(),
        rejected: s.rejected.get(),
        rejected_expected: s.rejected_expected.get(),
        rejected_wrong_field: s.rejected_wrong_field.get(),
        rejected_unexpected: s.rejected_unexpected.get(),
        rejected_by_reason: s.rejected_by_reason(),
        bad_sent: s.bad_sent.get(),
        bad_accepted: s.bad_accepted.get(),
        shed: s.shed.get(),
        rate_limited: s.rate_limited.get(),
        auth_failures: s.auth_failures.get(),
        auth: ctx.cfg.auth.describe.clone(),
        errors: s.errors.get(),
        unacked: s.unacked.get(),
        behind_schedule: s.behind.get(),
        readings_per_s: s.acked.get() as f64 / s.active_secs().max(1e-3),
        sent_per_s: s.sent.get() as f64 / duration.as_secs_f64().max(1e-9),
        wire_bytes: s.wire_bytes.get(),
        bytes_per_reading: s.bytes_per_reading(),
        connects: s.connects.get(),
        connect_errors: s.connect_errors.get(),
        connections_peak: s.connections_peak.get(),
        latency_ms: s.latency(),
        acked_per_s,
        warmup_s: ctx.cfg.warmup.as_secs_f64(),
        ramp,
        verify: None,
        problems: fatal.into_iter().chain(s.samples()).collect(),
        sim_cpu_s: sys::cpu_seconds() - cpu0,
        sim_peak_rss_mb: sys::peak_rss_mb(),
        ok: false,
    };
    if ctx.cfg.verify {
        if let Some(log) = &s.acklog {
            if ctx.cfg.progress {
                eprintln!("verifying: reading every acknowledged reading back …");
            }
            let names = verify::MetricNames::of(&ctx.cfg);
            let report = verify::verify(
                &ctx.cfg.target,
                &ctx.cfg.device_prefix,
                log.snapshot(),
                ctx.cfg.verify_wait,
                &names,
                &ctx.cfg.auth,
            )
            .await?;
            summary.verify = Some(report);
        }
    }
    summary.judge();
    Ok(summary)
}

/// Answers refusing the credentials before any reading was acknowledged: this many end the
/// run at once (a missing or wrong token would only repeat them).
const AUTH_FAILURES_TO_STOP: u64 = 5;

/// Until `done`: cancels `halt` on `interrupt`, or when the first [`AUTH_FAILURES_TO_STOP`]
/// answers all refused the credentials (then it also aborts what is in flight, and returns why).
async fn auth_guard(
    ctx: Arc<Ctx>,
    interrupt: CancellationToken,
    halt: CancellationToken,
    done: CancellationToken,
) -> Option<String> {
    let s = &ctx.stats;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = interrupt.cancelled() => {
                halt.cancel();
                return None;
            }
            _ = done.cancelled() => return None,
        }
        let answered = s.acked.get() + s.accepted.get() + s.duplicates.get() + s.rejected.get();
        if s.auth_failures.get() >= AUTH_FAILURES_TO_STOP && answered == 0 {
            let why = format!(
                "stopped: the first {} answers all refused the credentials (HTTP 401/403 or WebSocket 1008) and nothing was acknowledged; tokens sent: {}. See the problems below.",
                s.auth_failures.get(),
                ctx.cfg.auth.describe
            );
            eprintln!("sluice-sim: {why}");
            halt.cancel();
            ctx.stop_generating();
            ctx.abort.cancel();
            return Some(why);
        }
    }
}

/// Raises the rate every `--ramp-step` until a step misses the p99 bound or 90 % of its
/// target, or the duration is over.
async fn ramp(ctx: &Ctx, end: Instant, interrupt: &CancellationToken) -> RampReport {
    let cfg = &ctx.cfg;
    let devices = f64::from(cfg.devices);
    let bound_ms = cfg.p99_bound.as_secs_f64() * 1000.0;
    let mut rate = cfg.rate;
    let mut steps = Vec::new();
    let mut knee = None;
    let stopped_because;
    ctx.stats.take_step();
    loop {
        ctx.rate.set(rate);
        let acked0 = ctx.stats.acked.get();
        let t0 = Instant::now();
        let interrupted = tokio::select! {
            _ = sleep(cfg.ramp_step) => false,
            _ = interrupt.cancelled() => true,
        };
        let secs = t0.elapsed().as_secs_f64();
        let p = ctx.stats.take_step();
        let target = rate * devices;
        let achieved = (ctx.stats.acked.get() - acked0) as f64 / secs;
        let ok = p.count > 0 && p.p99 <= bound_ms && achieved >= 0.9 * target;
        steps.push(RampStep {
            rate_per_device: rate,
            target_rate: target,
            achieved_rate: achieved,
            p99_ms: p.p99,
            ok,
        });
        if interrupted {
            stopped_because = "interrupted".to_string();
            break;
        }
        if !ok {
            stopped_because = if p.count > 0 && p.p99 > bound_ms {
                format!(
                    "p99 {:.2} ms over the {bound_ms:.2} ms bound at {}/s",
                    p.p99,
                    fmt_rate(target)
                )
            } else {
                format!(
                    "only {}/s of {}/s acknowledged",
                    fmt_rate(achieved),
                    fmt_rate(target)
                )
            };
            break;
        }
        knee = Some(target);
        if Instant::now() + cfg.ramp_step > end {
            stopped_because = "duration over before the bound was reached".to_string();
            break;
        }
        rate *= cfg.ramp_factor;
    }
    RampReport {
        steps,
        knee_rate: knee,
        stopped_because,
        p99_bound_ms: bound_ms,
    }
}

/// Readings acknowledged in each second since the start, until `done`; the last element holds
/// the part of a second before `done`, so the elements add up to every ack.
async fn timeline(ctx: Arc<Ctx>, done: CancellationToken) -> Vec<u64> {
    let second = Duration::from_secs(1);
    let mut tick = tokio::time::interval_at(ctx.start + second, second);
    let mut out = Vec::new();
    let mut last = 0;
    loop {
        let end = tokio::select! {
            _ = tick.tick() => false,
            _ = done.cancelled() => true,
        };
        let acked = ctx.stats.acked.get();
        out.push(acked - last);
        last = acked;
        if end {
            return out;
        }
    }
}

/// The live line: sent, acked, rejected, errors, readings/s and p99 over the last second. A
/// spinner on a terminal; a plain line every 5 s otherwise.
async fn progress(ctx: Arc<Ctx>, done: CancellationToken) {
    let tty = std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let b = ProgressBar::new_spinner();
        b.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        b
    });
    let s = &ctx.stats;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = (Instant::now(), 0u64);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.cancelled() => break,
        }
        n += 1;
        let now = Instant::now();
        let acked = s.acked.get();
        let rate = (acked - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-3);
        last = (now, acked);
        let p = ctx.stats.take_tick();
        let phase = if ctx.stop.is_cancelled() {
            "draining · "
        } else {
            ""
        };
        // HTTP connections are the client's pool, which does not report them.
        let conns = match ctx.cfg.transport {
            Transport::Http => String::new(),
            _ => format!(" conns {}", s.connections.get()),
        };
        let msg = format!(
            "{phase}sent {} acked {} rejected {} errors {} shed {}{conns} · {}/s · p99 {:.1} ms",
            s.sent.get(),
            acked,
            s.rejected.get(),
            s.errors.get(),
            s.shed.get(),
            fmt_rate(rate),
            p.p99
        );
        match &bar {
            Some(b) => {
                b.set_message(msg);
                b.tick();
            }
            None if n % 5 == 0 => {
                eprintln!("[{:>6.1}s] {msg}", ctx.start.elapsed().as_secs_f64())
            }
            None => {}
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}
