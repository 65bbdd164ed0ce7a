//! The ways readings travel: **transports** → Sluice (or a broker) → answers → [`crate::stats`].
//!
//! Each transport runs *lanes*: tasks that own some devices, generate their readings on the
//! schedule of the mode, send them, and settle each answer against what was sent.
//! - [`http`]: a lane per concurrent request (`--connections`), each owning a share of the
//!   devices and posting one batch at a time over a shared keep-alive pool.
//! - [`ws`]: a lane per device, one connection each, up to `--window` frames in flight.
//! - [`mqtt`]: a lane per client (`--mqtt-clients`), QoS 0 or 1.
//!
//! Every lane resends refused readings with the same `seq` after the server's back-off
//! (HTTP `Retry-After`, WebSocket `retry_after_ms`), and after a lost connection resends what
//! was not acknowledged: the server counts repeats as duplicates, so nothing is stored twice.

pub mod http;
pub mod mqtt;
pub mod ws;

use std::error::Error;
use std::sync::OnceLock;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::RunConfig;
use crate::rate::RateControl;
use crate::stats::Stats;

/// What every lane shares.
#[derive(Debug)]
pub struct Ctx {
    /// The run's configuration.
    pub cfg: RunConfig,
    /// Counters and histograms.
    pub stats: Stats,
    /// Cancelled when generation ends: lanes then only finish what is in flight.
    pub stop: CancellationToken,
    /// Cancelled when the drain timeout runs out: lanes give up on what is still unanswered.
    pub abort: CancellationToken,
    /// The per-device rate (raised by the ramp).
    pub rate: RateControl,
    /// When the run began; every pacer counts from here.
    pub start: Instant,
    /// When generation stopped, to measure how far behind the schedule lanes were.
    stopped_at: OnceLock<Instant>,
}

impl Ctx {
    /// A context for `cfg`, starting now.
    pub fn new(cfg: RunConfig) -> Self {
        Self {
            stats: Stats::new(cfg.devices, cfg.verify, cfg.warmup),
            rate: RateControl::new(cfg.rate),
            cfg,
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            start: Instant::now(),
            stopped_at: OnceLock::new(),
        }
    }

    /// Ends generation.
    pub fn stop_generating(&self) {
        let _ = self.stopped_at.set(Instant::now());
        self.stop.cancel();
    }

    /// When generation ended (now if it has not).
    pub fn stopped_at(&self) -> Instant {
        self.stopped_at.get().copied().unwrap_or_else(Instant::now)
    }

    /// Whether lanes pace themselves (rate, ramp) rather than send as fast as acks allow.
    pub fn paced(&self) -> bool {
        self.cfg.mode != crate::config::Mode::Max
    }
}

/// How a connection (or a lane) ended.
#[derive(Debug)]
pub enum Ended {
    /// Everything generated was answered.
    Done,
    /// The connection broke; what was not acknowledged is sent again on the next one.
    Lost(String),
    /// The drain timeout ran out.
    Aborted,
}

/// Unix epoch milliseconds, for `ts`.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An error with its causes, `a: b: c`.
pub fn chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
