//! Handing free memory back to the OS, beside the flow: called by each tokio worker when it
//! parks, by the store writer's thread after each store call, and by the blocking thread that
//! answered a query (`api::query`).
//!
//! mimalloc keeps a heap per thread. A block freed by another thread goes back to its owner's
//! heap, and the owner frees the emptied pages, and purges them (returns them to the OS), only
//! when it allocates again or calls `mi_collect`. Three kinds of thread sit on such memory:
//! - **tokio workers** that went idle: after 10 000 WebSocket connections closed, an idle
//!   process kept 190 MiB of free memory resident; with a collect on park, 42 MiB 30 s later
//!   (README, Benchmarks: `ws-rss-10k`);
//! - **the store writer's thread**, whose commit buffers are freed by the ingest threads that
//!   take the acks. When each commit ran with `spawn_blocking`, on whichever pool thread was
//!   idle, a burst that had grown the pool (1 000 token lookups on a cold cache, a burst of
//!   queries) spread the commits' buffers over all its threads, each keeping the pages the
//!   others freed: with 16 extra pool threads, RSS under load was 806 MiB against 211 MiB with
//!   7 threads (2026-12-01, `sluice-sim` per-device shape with tokens). A collect at most every
//!   200 ms per thread bounded that: 237 MiB, and 156 MiB without the burst, at the same
//!   throughput. The writer now has one thread of its own, which collects the same way.
//! - **blocking threads that answer queries**: a page of 10 000 readings decodes whole
//!   chunks into rows, several megabytes that the thread keeps after the answer has gone. A
//!   client reading a fleet back 8 devices at a time (`sluice-sim --verify` after 15 s of
//!   fleet-1k) took peak RSS to 216 and 168 MiB, and 3 s later RSS was 161 and 137 MiB; with
//!   a collect after each page (at most every 200 ms per thread), 165 and 153 MiB, then 122
//!   and 118 MiB (2026-12-02).
//!
//! mimalloc can only collect the calling thread's heap, hence hooks on the threads themselves
//! rather than a task.
//!
//! At start, [`disable_transparent_huge_pages`] keeps the kernel from backing mimalloc's
//! memory with 2 MiB pages, each of which stays resident while any part of it is in use.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How often, at most, a tokio worker collects when it parks.
pub const WORKER_INTERVAL: Duration = Duration::from_secs(10);

/// How often, at most, the store writer's thread collects after a store call.
pub const BLOCKING_INTERVAL: Duration = Duration::from_millis(200);

/// A forced `mi_collect` on the calling thread, at most once per `interval` on that thread:
/// frees its empty pages, including those emptied by frees from other threads, and purges the
/// free memory. Cheap when it is not due (a thread-local time check). Without mimalloc as the
/// global allocator (the library's tests), it collects mimalloc's unused heap: harmless.
pub fn give_back(interval: Duration) {
    thread_local! {
        /// When this thread last collected.
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    if LAST.get().is_none_or(|t| now.duration_since(t) >= interval) {
        LAST.set(Some(now));
        // SAFETY: `mi_collect` takes no pointer and may be called from any thread at any time;
        // it only touches the calling thread's heap and mimalloc's own arenas.
        unsafe { libmimalloc_sys::mi_collect(true) };
    }
}

/// The environment variable that, when set, leaves transparent huge pages to mimalloc's own
/// option of that name (`1` allows them; `0` disables them, as Sluice does by default).
/// mimalloc reads its options' names in any case, and so does Sluice.
pub const ALLOW_THP_ENV: &str = "MIMALLOC_ALLOW_THP";

/// Turns transparent huge pages (THP) off for this process, unless [`ALLOW_THP_ENV`] is set:
/// `prctl(PR_SET_THP_DISABLE)` (Linux 3.15+, inherited by children). Call it first in `main`.
///
/// mimalloc asks for huge pages on the memory it maps (`madvise(MADV_HUGEPAGE)`), and a
/// kernel whose THP mode is `always` gives them unasked. A huge page stays resident whole
/// while any of its 2 MiB is in use, so with 100 000 devices, where the journal's generations
/// are allocated and freed in large pieces, 70 to 88 MiB of the RSS was `AnonHugePages`.
/// Measured with `http-fleet-100k`'s shape (2026-12-02, README "Store engine floors"): peak
/// RSS (`VmHWM`) 271 and 274 MiB with huge pages, 227 and 213 MiB without, at the same
/// throughput.
///
/// Returns whether THP is now off for this process: with [`ALLOW_THP_ENV`] set, as mimalloc
/// (which reads it before `main`) or the parent process left it.
///
/// # Errors
/// The `prctl` error (e.g. on a kernel without it); Sluice then runs as before.
pub fn disable_transparent_huge_pages() -> std::io::Result<bool> {
    let left_to_mimalloc = std::env::vars_os().any(|(k, _)| {
        k.to_str()
            .is_some_and(|k| k.eq_ignore_ascii_case(ALLOW_THP_ENV))
    });
    #[cfg(target_os = "linux")]
    {
        use nix::sys::prctl;
        if left_to_mimalloc {
            return prctl::get_thp_disable().map_err(std::io::Error::from);
        }
        prctl::set_thp_disable(true).map_err(std::io::Error::from)?;
        Ok(true)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = left_to_mimalloc;
        Ok(false)
    }
}
