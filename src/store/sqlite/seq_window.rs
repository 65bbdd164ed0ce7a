//! The writer's per-device seq window: the dedupe decision for most readings, with no lookup.
//! batcher → services → **commit: is `(device, seq)` new?** → journal.
//!
//! A window holds a device's highest committed seq and, for each of the 63 seqs below it,
//! whether it is committed and whether that is known. A seq above the high-water is new; one
//! inside the window is answered from its bits; anything else (below the window, or a bit not
//! known since the last restart) needs the exact lookup in the journal and chunks, whose answer
//! the window then keeps. This is the anti-replay window of IPsec (RFC 4303 §3.4.3) with a
//! second mask for what is known: a fleet behind 32 connections commits each device's readings
//! a few seqs out of order, and each of those would otherwise walk the device's journal
//! entries to prove it absent.
//!
//! The window is exact only if every committed seq passes through [`SeqWindow::commit`] (the
//! writer is the only committer of its store, and it records a batch after its frame is
//! durable), and if it forgets what it knew when retention deletes chunks ([`SeqWindow::forget`],
//! when the writer sees `JournalState::retention_epoch` move): a deleted reading is no longer
//! stored, so a resend of it is new.

/// Bits in a window: bit `i` is seq `max - i`.
const WIDTH: u64 = 64;

/// One device's window. 24 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqWindow {
    /// The highest committed seq.
    max: u64,
    /// Bit `i`: seq `max - i` is committed (meaningful where `known` is set).
    seen: u64,
    /// Bit `i`: whether seq `max - i` is committed is known.
    known: u64,
}

/// What a window can say about a seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Not committed.
    New,
    /// Committed.
    Duplicate,
    /// Needs the exact lookup.
    Unknown,
}

impl SeqWindow {
    /// The window of a device whose first committed seq is `max`: no other seq is committed.
    pub fn first(max: u64) -> Self {
        Self {
            max,
            seen: 1,
            known: !0,
        }
    }

    /// The window restored at start-up from a high-water: nothing below or at it is known
    /// (retention may have deleted any committed seq, `max` included).
    pub fn restored(max: u64) -> Self {
        Self {
            max,
            seen: 0,
            known: 0,
        }
    }

    /// Forgets what is known at and below the high-water, after retention deleted chunks: a
    /// deleted reading is no longer stored, so a resend of it is new again.
    pub fn forget(&mut self) {
        *self = Self::restored(self.max);
    }

    /// What the window knows of `seq`.
    pub fn check(&self, seq: u64) -> Check {
        if seq > self.max {
            return Check::New;
        }
        let d = self.max - seq;
        if d >= WIDTH || self.known & (1 << d) == 0 {
            Check::Unknown
        } else if self.seen & (1 << d) != 0 {
            Check::Duplicate
        } else {
            Check::New
        }
    }

    /// Keeps the answer of an exact lookup of `seq` made while the window was as it is.
    pub fn learn(&mut self, seq: u64, committed: bool) {
        if let Some(d) = self.max.checked_sub(seq).filter(|d| *d < WIDTH) {
            self.known |= 1 << d;
            if committed {
                self.seen |= 1 << d;
            }
        }
    }

    /// Records that `seq` is now committed.
    pub fn commit(&mut self, seq: u64) {
        if seq > self.max {
            let shift = seq - self.max;
            if shift >= WIDTH {
                (self.seen, self.known) = (1, !0);
            } else {
                // The seqs between the old high-water and `seq` are known not committed: the
                // old high-water was the highest.
                self.seen = (self.seen << shift) | 1;
                self.known = (self.known << shift) | ((1 << shift) - 1);
            }
            self.max = seq;
        } else {
            self.learn(seq, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Against a model (the set of committed seqs), over random commits and checks: the window
    /// never answers wrongly, and answers most of a shuffled stream without a lookup.
    #[test]
    fn answers_agree_with_the_set_of_committed_seqs() {
        let mut next = crate::test_rng::xorshift(0x9e37_79b9_7f4a_7c15);
        for restart_at in [None, Some(500u64)] {
            let mut committed = BTreeSet::new();
            let mut w: Option<SeqWindow> = None;
            let (mut unknown, mut asked) = (0, 0);
            for step in 0..20_000u64 {
                if Some(step) == restart_at {
                    w = w.map(|w| SeqWindow::restored(w.max));
                }
                // Mostly near the top, as a shuffled fleet sends; sometimes far below or above.
                let top = committed.last().copied().unwrap_or(1000);
                let seq = match next(10) {
                    0 => next(top + 1),
                    1 => top + next(200),
                    _ => (top + 5).saturating_sub(next(40)),
                };
                let truth = committed.contains(&seq);
                let answer = w.map_or(Check::New, |w| w.check(seq));
                asked += 1;
                match answer {
                    Check::New => assert!(!truth, "seq {seq} called new at step {step}"),
                    Check::Duplicate => assert!(truth, "seq {seq} called a duplicate"),
                    Check::Unknown => {
                        unknown += 1;
                        if let Some(w) = w.as_mut() {
                            w.learn(seq, truth);
                        }
                    }
                }
                if !truth && next(2) == 0 {
                    committed.insert(seq);
                    match w.as_mut() {
                        Some(w) => w.commit(seq),
                        None => w = Some(SeqWindow::first(seq)),
                    }
                }
            }
            assert!(unknown * 5 < asked, "{unknown} of {asked} needed a lookup");
        }
    }

    #[test]
    fn a_jump_past_the_window_forgets_nothing_it_needs() {
        let mut w = SeqWindow::first(10);
        w.commit(8);
        assert_eq!(w.check(8), Check::Duplicate);
        assert_eq!(w.check(9), Check::New);
        w.commit(10 + 64);
        assert_eq!(w.check(10), Check::Unknown, "below the window");
        assert_eq!(w.check(11), Check::New);
        assert_eq!(w.check(74), Check::Duplicate);
        assert_eq!(w.check(u64::MAX), Check::New);
        w.commit(u64::MAX);
        assert_eq!(w.check(u64::MAX), Check::Duplicate);
        assert_eq!(w.check(u64::MAX - 1), Check::New);
        let mut r = SeqWindow::restored(5);
        assert_eq!(
            (r.check(5), r.check(4), r.check(6)),
            (Check::Unknown, Check::Unknown, Check::New)
        );
        r.commit(6);
        r.learn(5, true);
        assert_eq!(r.check(5), Check::Duplicate);
        r.forget();
        assert_eq!((r.check(6), r.check(5)), (Check::Unknown, Check::Unknown));
    }
}
