//! Pacing: how many readings (or frames) are due by now, for the open-loop modes.
//!
//! A [`Pacer`] counts what is due from the elapsed time (`due = rate × elapsed`), not from
//! sleeps. A sender that is held up — by the server, by a slow machine — finds the missed
//! readings due at once when it comes back and catches up. That is the open-loop contract: the
//! schedule does not bend to the server, and how far behind the sender fell is a measurement
//! ([`Pacer::behind`]) rather than something hidden.
//!
//! [`RateControl`] is the per-device rate shared by every sender, so the ramp mode can raise it
//! while the run goes on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Counts due events at a fixed rate since an anchor.
#[derive(Debug, Clone)]
pub struct Pacer {
    /// Where the current rate started.
    anchor: Instant,
    /// Events due at `anchor` (carried over from earlier rates).
    anchor_due: u64,
    /// Events per second.
    rate: f64,
    /// Events taken so far.
    taken: u64,
}

impl Pacer {
    /// `rate` events per second from `start` on; none is due before `start`.
    pub fn new(rate: f64, start: Instant) -> Self {
        Self {
            anchor: start,
            anchor_due: 0,
            rate: rate.max(0.0),
            taken: 0,
        }
    }

    /// Events due by `now`, in total.
    pub fn due(&self, now: Instant) -> u64 {
        if now <= self.anchor {
            return self.anchor_due;
        }
        let elapsed = (now - self.anchor).as_secs_f64();
        self.anchor_due + (elapsed * self.rate).floor() as u64
    }

    /// Events due but not taken yet.
    pub fn available(&self, now: Instant) -> u64 {
        self.due(now).saturating_sub(self.taken)
    }

    /// Same as [`Pacer::available`]: how far behind the schedule the sender is, in events.
    pub fn behind(&self, now: Instant) -> u64 {
        self.available(now)
    }

    /// Marks `n` events as taken.
    pub fn take(&mut self, n: u64) {
        self.taken += n;
    }

    /// Events taken so far.
    pub fn taken(&self) -> u64 {
        self.taken
    }

    /// When the next event not yet taken is (or was) due. Far in the future at rate 0.
    pub fn next_at(&self) -> Instant {
        let need = (self.taken + 1).saturating_sub(self.anchor_due);
        if self.rate <= 0.0 {
            return self.anchor + Duration::from_secs(86_400 * 365);
        }
        // The instant `need` events have accumulated, rounded up to the nanosecond; then nudged
        // until `due` (float arithmetic) agrees, so a wake-up at `next_at` always finds one due.
        let secs = need as f64 / self.rate;
        let mut t = self.anchor + Duration::from_nanos((secs * 1e9).ceil() as u64);
        for _ in 0..1000 {
            if self.due(t) > self.taken {
                break;
            }
            t += Duration::from_nanos(1);
        }
        t
    }

    /// The current rate.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Changes the rate from `now` on, keeping what was already due.
    pub fn set_rate(&mut self, rate: f64, now: Instant) {
        let now = now.max(self.anchor);
        self.anchor_due = self.due(now);
        self.anchor = now;
        self.rate = rate.max(0.0);
    }
}

/// The per-device rate in readings per second, shared by all senders.
#[derive(Debug)]
pub struct RateControl {
    /// The rate as f64 bits.
    bits: AtomicU64,
    /// Bumped on every change, so senders notice cheaply.
    generation: AtomicU64,
}

impl RateControl {
    /// Starts at `rate`.
    pub fn new(rate: f64) -> Self {
        Self {
            bits: AtomicU64::new(rate.to_bits()),
            generation: AtomicU64::new(0),
        }
    }

    /// `(rate, generation)`.
    pub fn get(&self) -> (f64, u64) {
        let g = self.generation.load(Ordering::Acquire);
        (f64::from_bits(self.bits.load(Ordering::Acquire)), g)
    }

    /// The generation only.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Sets a new rate.
    pub fn set(&self, rate: f64) {
        self.bits.store(rate.to_bits(), Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With tokio's clock paused, time only moves when every task waits: the pacing arithmetic is
    /// checked exactly, free of any scheduling noise.
    #[tokio::test(start_paused = true)]
    async fn paced_sender_hits_the_rate_exactly_in_virtual_time() {
        let start = Instant::now();
        let mut p = Pacer::new(1000.0, start);
        let end = start + Duration::from_secs(5);
        let mut sent = 0u64;
        loop {
            tokio::time::sleep_until(p.next_at().min(end)).await;
            let now = Instant::now();
            if now >= end {
                break;
            }
            let n = p.available(now);
            assert!(n >= 1, "woken with nothing due");
            p.take(n);
            sent += n;
        }
        assert!((4999..=5000).contains(&sent), "sent {sent}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_sender_catches_up_and_the_lag_is_measured() {
        let start = Instant::now();
        let mut p = Pacer::new(100.0, start);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(p.behind(Instant::now()), 200);
        p.take(200);
        assert_eq!(p.behind(Instant::now()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_changes_keep_what_was_due() {
        let start = Instant::now();
        let mut p = Pacer::new(10.0, start);
        tokio::time::sleep(Duration::from_secs(1)).await;
        p.set_rate(100.0, Instant::now());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(p.due(Instant::now()), 110);
        p.set_rate(0.0, Instant::now());
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert_eq!(p.due(Instant::now()), 110);
    }

    #[test]
    fn next_at_is_when_the_next_event_is_due() {
        let start = Instant::now();
        let mut p = Pacer::new(3.0, start);
        for _ in 0..10 {
            let t = p.next_at();
            assert_eq!(p.available(t), 1, "due exactly at next_at");
            assert_eq!(p.available(t - Duration::from_micros(1)), 0);
            p.take(1);
        }
    }

    /// The rate limiter against the real clock, for 5 s: the count is read at a deadline, and
    /// because the pacer counts from elapsed time (a late wake-up sends more, not fewer), the
    /// achieved rate stays within 5 % however loaded the machine is.
    #[tokio::test]
    async fn real_clock_rate_within_5_percent_over_5_s() {
        let rate = 2000.0;
        let start = Instant::now();
        let deadline = start + Duration::from_secs(5);
        let mut p = Pacer::new(rate, start);
        let mut sent = 0u64;
        while Instant::now() < deadline {
            tokio::time::sleep_until(p.next_at().min(deadline)).await;
            let n = p.available(Instant::now());
            p.take(n);
            sent += n;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let achieved = sent as f64 / elapsed;
        assert!(
            (achieved - rate).abs() / rate < 0.05,
            "achieved {achieved:.0}/s of {rate}/s over {elapsed:.2} s"
        );
    }

    #[test]
    fn rate_control_bumps_its_generation() {
        let c = RateControl::new(1.0);
        let (r, g) = c.get();
        assert_eq!(r, 1.0);
        c.set(2.5);
        assert_eq!(c.get(), (2.5, g + 1));
    }
}
