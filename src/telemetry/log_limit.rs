//! Rate limits for log lines that can repeat. Beside the flow, like the rest of `telemetry`.
//!
//! A condition that lasts (a store that stays down, a broker that refuses connections, no file
//! descriptors left for `accept`) would otherwise log the same line every time the loop around
//! it retries: once a second for the store writer's probe, ten times a second for the WAL
//! checkpointer. The rule, for every line that can repeat:
//! - the **first** event is logged at once, with `suppressed=0`;
//! - after that, **at most one line per [`LOG_INTERVAL`]** (30 s), carrying `suppressed`, the
//!   number of events that were not logged since the line before;
//! - when the call site sees the condition clear, **one line at info** carrying `failures`, the
//!   number of events in the streak. It is logged only if the streak's failure was, so a
//!   condition that flaps cannot log more than two lines per interval either: the interval
//!   counts from the last failure line, whatever happened between.
//!
//! Metrics are not limited: the call sites count every event, logged or not.
//!
//! One [`LogLimit`] per condition: a field of the task that meets it, a local of the loop that
//! retries, or a `static` at the call site when the code around it keeps no state of its own
//! (then it is shared by every instance in the process, which is one in production). Using it:
//! ```
//! # use sluice::telemetry::log_limit::LogLimit;
//! static COMMIT: LogLimit = LogLimit::new();
//! # let result: Result<(), String> = Err("disk full".into());
//! match result {
//!     Err(e) => {
//!         if let Some(suppressed) = COMMIT.event() {
//!             tracing::error!(error = %e, suppressed, "commit failed");
//!         }
//!     }
//!     Ok(()) => {
//!         if let Some(failures) = COMMIT.recovered() {
//!             tracing::info!(failures, "commits work again");
//!         }
//!     }
//! }
//! ```

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The least time between two lines of one [`LogLimit`]: 30 s.
pub const LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Decides which events of one repeating condition are logged. Cheap: one uncontended lock
/// per event, no allocation, no task. See the module documentation for the rule.
#[derive(Debug, Default)]
pub struct LogLimit {
    /// Behind a lock because the events of one condition may come from several threads (the
    /// writer's task and its blocking calls).
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the last failure line was let through; `None` before the first.
    last_line: Option<Instant>,
    /// Events not logged since that line, for the next line's `suppressed`.
    suppressed: u64,
    /// Events since the condition last cleared (or since the start), for `failures`.
    streak: u64,
    /// Whether a failure line of the current streak was logged, so that its recovery is too.
    streak_logged: bool,
}

impl LogLimit {
    /// A limiter that has seen nothing: its first event is logged. `const`, so it can be a
    /// `static` at a call site.
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(State {
                last_line: None,
                suppressed: 0,
                streak: 0,
                streak_logged: false,
            }),
        }
    }

    /// Records one event (a failure). `Some(suppressed)` when this one is to be logged, with
    /// the number of events not logged since the previous line (0 for the first); `None` when
    /// it is to be left out.
    pub fn event(&self) -> Option<u64> {
        self.event_at(Instant::now())
    }

    /// Records that the condition cleared. `Some(failures)`, the events of the streak that
    /// ended, when a failure line of that streak was logged and so its end should be too
    /// (at info); `None` when there was no streak, or it was not logged.
    pub fn recovered(&self) -> Option<u64> {
        let mut st = self.lock();
        let failures = std::mem::take(&mut st.streak);
        std::mem::take(&mut st.streak_logged).then_some(failures)
    }

    /// [`LogLimit::event`] at a given time, so tests need no clock.
    fn event_at(&self, now: Instant) -> Option<u64> {
        let mut st = self.lock();
        st.streak += 1;
        let due = st
            .last_line
            .is_none_or(|t| now.saturating_duration_since(t) >= LOG_INTERVAL);
        if due {
            st.last_line = Some(now);
            st.streak_logged = true;
            Some(std::mem::take(&mut st.suppressed))
        } else {
            st.suppressed += 1;
            None
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a few counters, valid whatever a panicking holder left.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn first_event_then_one_line_per_interval_with_the_count() {
        let limit = LogLimit::new();
        let t0 = Instant::now();
        assert_eq!(limit.event_at(t0), Some(0));
        // Every 100 ms for 30 s, as the checkpointer retried: nothing until the interval.
        let mut logged = Vec::new();
        for i in 1..=600u32 {
            if let Some(n) = limit.event_at(t0 + i * Duration::from_millis(100)) {
                logged.push((i, n));
            }
        }
        // At 30 s (event 300) with the 299 between, then at 60 s with 299 again.
        assert_eq!(logged, vec![(300, 299), (600, 299)]);
    }

    #[test]
    fn an_event_after_a_long_quiet_time_is_logged_at_once() {
        let limit = LogLimit::new();
        let t0 = Instant::now();
        assert_eq!(limit.event_at(t0), Some(0));
        assert_eq!(limit.event_at(t0 + S), None);
        assert_eq!(limit.event_at(t0 + 300 * S), Some(1));
    }

    #[test]
    fn recovery_is_reported_with_the_streak_and_a_new_condition_is_logged() {
        let limit = LogLimit::new();
        assert_eq!(limit.recovered(), None, "no streak, nothing to report");
        let t0 = Instant::now();
        assert_eq!(limit.event_at(t0), Some(0));
        for i in 1..5 {
            assert_eq!(limit.event_at(t0 + i * S), None);
        }
        assert_eq!(limit.recovered(), Some(5));
        assert_eq!(limit.recovered(), None, "reported once");
        // A new condition a minute later starts with a line; its `suppressed` says what was
        // left out since the last line (the 4 of the first streak).
        assert_eq!(limit.event_at(t0 + 60 * S), Some(4));
        assert_eq!(limit.recovered(), Some(1));
    }

    #[test]
    fn a_flapping_condition_logs_at_most_two_lines_per_interval() {
        let limit = LogLimit::new();
        let t0 = Instant::now();
        let mut lines = 0;
        // Fails and clears every second for 29 s.
        for i in 0..29 {
            lines += usize::from(limit.event_at(t0 + i * S).is_some());
            lines += usize::from(limit.recovered().is_some());
        }
        assert_eq!(lines, 2, "the first failure and its recovery");
        // At 30 s the next failure is logged, with the 28 quiet ones before it.
        assert_eq!(limit.event_at(t0 + 30 * S), Some(28));
        assert_eq!(limit.recovered(), Some(1));
    }

    #[test]
    fn a_static_limiter_works_across_threads() {
        static LIMIT: LogLimit = LogLimit::new();
        let logged: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..100).filter(|_| LIMIT.event().is_some()).count() as u64))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(logged, 1, "400 events within the interval: one line");
        assert_eq!(LIMIT.recovered(), Some(400));
    }
}
