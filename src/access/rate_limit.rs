//! Per-device rate limits (SPEC §11): device → handler → codec → **rate limit** → admission.
//!
//! Applied at the edge, after parsing and the token's device check, one reading at a time, on
//! every transport: HTTP and WebSocket reject readings over the limit by index
//! (`rate_limited`; the InfluxDB endpoints refuse such a batch whole), MQTT waits
//! ([`DeviceLimiter::until_ready`]) before it admits a message, so its PUBACK is withheld until
//! the device is under its limit again, for at most `rate_limit.mqtt_max_wait`
//! ([`DeviceLimiter::try_take`] first; past the bound the message is dead-lettered).
//!
//! The limiter is `governor`'s keyed GCRA: per device, one `u64` key and one `AtomicU64` of
//! state (the theoretical arrival time), updated with a compare-and-swap and no lock, in a
//! sharded `DashMap`. The key is a per-process seeded 64-bit hash of the device id, not the
//! id: 8 bytes instead of a `String` (24 bytes plus the id on the heap). Two devices whose
//! ids collide would share one allowance; with a million devices the chance that any pair does
//! is about 3 in 100 million.
//!
//! **Memory.** A device is in the map only while its allowance is not full again: a sweep every
//! `rate_limit.sweep_interval` (`retain_recent`) forgets devices whose state is the same as a
//! fresh one's. So the map holds the devices that sent within the last `burst / rate` seconds
//! plus one interval: measured about 40 bytes per device (`tests::memory_per_device`), about
//! 40 MB for a million devices all sending at once.

use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::config::access::Rate;

/// The keyed GCRA limiter, with the middleware that reports the remaining allowance.
type Limiter =
    RateLimiter<u64, DefaultKeyedStateStore<u64>, DefaultClock, StateInformationMiddleware>;

/// The limit of each device, on this replica.
pub struct DeviceLimiter {
    /// One GCRA state per device that sent recently, keyed by [`DeviceLimiter::key`].
    limiter: Limiter,
    /// Seeds the device-id hash; random per process so that ids cannot be crafted to collide.
    hasher: foldhash::fast::RandomState,
    /// The configured rate, for the `RateLimit-Policy` header and the error texts.
    rate: Rate,
}

/// The outcome of one reading's check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Taken; `remaining` more readings could go at once.
    Allowed {
        /// The allowance left after this reading.
        remaining: u32,
    },
    /// Over the limit: the next reading of this device is allowed in `retry`.
    Limited {
        /// How long until the device may send one more reading.
        retry: Duration,
    },
}

impl DeviceLimiter {
    /// A limiter for `rate`.
    pub fn new(rate: Rate) -> Self {
        let count = rate.count.max(1);
        let interval = (rate.period / count).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(rate.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(interval)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        Self {
            limiter: RateLimiter::dashmap(quota).with_middleware::<StateInformationMiddleware>(),
            hasher: foldhash::fast::RandomState::default(),
            rate,
        }
    }

    /// The configured rate.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    fn key(&self, device: &str) -> u64 {
        self.hasher.hash_one(device)
    }

    /// Takes one reading of `device` from its allowance, or says how long until it may.
    pub fn check(&self, device: &str) -> Verdict {
        match self.limiter.check_key(&self.key(device)) {
            Ok(snapshot) => Verdict::Allowed {
                remaining: snapshot.remaining_burst_capacity(),
            },
            Err(not_until) => Verdict::Limited {
                retry: not_until
                    .wait_time_from(self.limiter.clock().now())
                    .max(Duration::from_millis(1)),
            },
        }
    }

    /// Takes `n` readings of `device` from its allowance if they are there now; otherwise
    /// takes nothing. More than the burst is never there at once.
    pub fn try_take(&self, device: &str, n: usize) -> bool {
        let Some(cells) = u32::try_from(n).ok().and_then(NonZeroU32::new) else {
            return true;
        };
        matches!(
            self.limiter.check_key_n(&self.key(device), cells),
            Ok(Ok(_))
        )
    }

    /// Waits until `device` may send `n` readings, then takes them (MQTT: the message is
    /// admitted only then); whether it had to wait. More than the burst is taken one burst at
    /// a time. Cancel-safe: dropped while waiting, nothing more is taken.
    pub async fn until_ready(&self, device: &str, n: usize) -> bool {
        let key = self.key(device);
        let mut waited = false;
        let mut left = n;
        while left > 0 {
            let step = left.min(self.rate.burst.max(1) as usize);
            let cells = NonZeroU32::new(step as u32).unwrap_or(NonZeroU32::MIN);
            match self.limiter.check_key_n(&key, cells) {
                Ok(Ok(_)) => left -= step,
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(self.limiter.clock().now());
                    waited = true;
                    tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
                }
                // More than the burst: cannot happen, `step` is at most the burst.
                Err(_) => left -= step,
            }
        }
        waited
    }

    /// Seconds until the allowance of a device with `remaining` left is full again: the `t` of
    /// the `RateLimit` header.
    pub fn reset_after(&self, remaining: u32) -> Duration {
        self.rate.interval() * self.rate.burst.saturating_sub(remaining)
    }

    /// Forgets devices whose allowance is full again (they would start afresh anyway), and
    /// gives the map's spare capacity back. Called every `rate_limit.sweep_interval`.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Devices held in memory now.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    /// Whether no device is held.
    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }

    /// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-10): the quota `q` over the
    /// window `w` in seconds, e.g. `"per-device";q=50;w=1`. GCRA's quota is the burst, and its
    /// window the time a spent burst takes to come back (`burst / rate`, rounded up to whole
    /// seconds, at least 1), so the `r` of [`DeviceLimiter::state_header`] never exceeds `q`:
    /// `"10/min"` with `burst = 20` is `q=20;w=120`.
    pub fn policy_header(&self) -> String {
        let burst = self.rate.burst.max(1);
        let window = (self.rate.interval() * burst).as_secs_f64().ceil() as u64;
        format!("\"per-device\";q={burst};w={}", window.max(1))
    }

    /// `RateLimit`: `r` readings left now, and `t` seconds (rounded up) until the allowance is
    /// full again, e.g. `"per-device";r=0;t=1`.
    pub fn state_header(&self, remaining: u32, reset: Duration) -> String {
        format!(
            "\"per-device\";r={remaining};t={}",
            reset.as_secs_f64().ceil() as u64
        )
    }
}

/// Whole seconds, rounded up, at least 1: `Retry-After`.
pub fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs_f64().ceil() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(count: u32, burst: u32) -> DeviceLimiter {
        DeviceLimiter::new(Rate {
            count,
            period: Duration::from_secs(1),
            burst,
        })
    }

    #[test]
    fn a_device_gets_its_burst_then_waits_and_others_are_not_touched() {
        let l = limiter(10, 3);
        for left in [2, 1, 0] {
            assert_eq!(l.check("a"), Verdict::Allowed { remaining: left });
        }
        match l.check("a") {
            Verdict::Limited { retry } => assert!(retry <= Duration::from_millis(100), "{retry:?}"),
            v => panic!("{v:?}"),
        }
        assert_eq!(l.check("b"), Verdict::Allowed { remaining: 2 });
        assert_eq!(l.policy_header(), "\"per-device\";q=3;w=1");
        let slow = DeviceLimiter::new(Rate {
            count: 10,
            period: Duration::from_secs(60),
            burst: 20,
        });
        assert_eq!(slow.policy_header(), "\"per-device\";q=20;w=120");
        assert_eq!(
            l.state_header(0, l.reset_after(0)),
            "\"per-device\";r=0;t=1"
        );
    }

    #[tokio::test]
    async fn until_ready_waits_for_the_allowance() {
        let l = limiter(100, 5);
        let start = std::time::Instant::now();
        l.until_ready("m", 5).await;
        l.until_ready("m", 5).await;
        // The second five come at 10 ms each.
        assert!(
            start.elapsed() >= Duration::from_millis(40),
            "{:?}",
            start.elapsed()
        );
    }

    /// Prints the memory one device costs in the limiter (run with `--ignored --nocapture`).
    #[test]
    #[ignore = "a measurement, not a check: prints the bytes per device (README); run with --ignored --nocapture"]
    fn memory_per_device() {
        fn rss_kib() -> u64 {
            std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap()
        }
        let l = limiter(1, 1);
        let before = rss_kib();
        for i in 0..1_000_000 {
            l.check(&format!("device-{i}"));
        }
        let after = rss_kib();
        println!(
            "{} devices: {} bytes per device",
            l.len(),
            (after - before) * 1024 / 1_000_000
        );
    }
}
