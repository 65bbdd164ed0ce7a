//! The store writer: batcher → processing services → **store** → ack.
//!
//! One thread, `sluice-writer`, owns the store (a [`Store`], whichever backend), so an fsync
//! never stalls the event loop. For each batch it:
//! 1. runs the processing services' pre-commit hooks;
//! 2. commits every reading in one group commit;
//! 3. runs the post-commit hooks (device state);
//! 4. acks each submission with its own counts, and only then releases its admission permits.
//!
//! If the store cannot be opened or a commit fails, the batch is answered "unavailable" (never
//! acked), the store is marked down (so `/readyz` and admission refuse), and the writer probes
//! it once a second until it works again. A commit refused for load (the journal is full while
//! compaction catches up) is answered "unavailable" too, and counted as shed, but the store
//! stays up. Between batches, about once a second, the writer gives the store its upkeep
//! ([`Store::maintain`]).
//!
//! A store that stays down fails every second (each open or probe), and a full journal refuses
//! every batch: those lines are limited ([`Logs`], the rule in [`crate::telemetry::log_limit`]),
//! the counters are not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use super::batcher::Batch;
use super::{Ack, Admission, Health, Unavailable};
use crate::config::{Backend, StorageSettings};
use crate::reading::{now_ms, Reading};
use crate::services::Services;
use crate::store::{ReaderSlot, Store, StoreError};
use crate::telemetry::log_limit::LogLimit;
use crate::telemetry::metrics::Metrics;

/// The open store, as the writer holds it.
type Boxed = Box<dyn Store>;

/// Batches that may wait for the writer. Two lets the batcher fill the next batch while one
/// commits, without letting batches (and memory) pile up behind a slow disk.
pub const BATCH_QUEUE: usize = 2;

/// Everything the writer needs besides the store itself.
pub struct Ctx {
    /// Which store to open, and how.
    pub settings: StorageSettings,
    /// Commit, shed and store counters.
    pub metrics: Arc<Metrics>,
    /// Store up or down, for `/readyz` and admission.
    pub health: Arc<Health>,
    /// Processing services run around each commit; restored at open.
    pub services: Arc<Services>,
    /// To update the admission depth gauge after acks release permits.
    pub admission: Admission,
    /// Where queries find the store's reader once it is open.
    pub reader: Arc<ReaderSlot>,
    /// Limits the lines of failures that repeat while they last.
    pub logs: Logs,
}

/// The writer's repeating conditions, one [`LogLimit`] each (first line at once, then at most
/// one per 30 s with `suppressed`, and a line when it clears).
#[derive(Debug, Default)]
pub struct Logs {
    /// The store is down: failed opens, commits and upkeep, and each probe that still fails
    /// (one a second). Cleared when the store is up again (`store recovered`).
    pub store_down: LogLimit,
    /// Commits refused for load (a full journal): every batch while compaction catches up.
    /// Cleared by the next commit that is taken.
    pub overload: LogLimit,
}

/// Runs until the batcher has stopped and every batch is answered. `idle` is notified each
/// time the writer has finished a batch and none is queued.
///
/// The store is owned by one thread, `sluice-writer`, which takes batches straight from the
/// batcher's channel: under load it finds the next batch queued when a commit ends, and
/// starts on it at once. Each commit used to be a `spawn_blocking` from this task, so every
/// batch crossed two threads (the blocking pool's, then back to an event-loop worker
/// busy with ingest before the next batch could be taken): about 1.6 ms of a 6 ms commit
/// cycle at fleet-1k load was that hand-off. A tokio task ticks once a second for the store's
/// upkeep and, while it is down, its probe; the thread waits on channels only (no timer), so
/// it ends cleanly whenever the runtime does.
pub async fn run(rx: mpsc::Receiver<Batch>, ctx: Ctx, idle: Arc<Notify>) {
    let (tick_tx, tick_rx) = mpsc::channel::<()>(1);
    let ticker = tokio::spawn(async move {
        let mut every = tokio::time::interval(TICK_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            // A tick already waiting is enough: the writer is busy.
            if let Err(mpsc::error::TrySendError::Closed(())) = tick_tx.try_send(()) {
                break;
            }
        }
    });
    let handle = tokio::runtime::Handle::current();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("sluice-writer".into())
        .spawn(move || {
            write_loop(&handle, rx, tick_rx, &ctx, &idle);
            let _ = done_tx.send(());
        });
    match spawned {
        Ok(_) => {
            // Dropped unsent only if the thread panicked outside a store call (the panic
            // hook has printed it).
            if done_rx.await.is_err() {
                tracing::error!("store writer thread stopped unexpectedly");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot start the store writer thread"),
    }
    ticker.abort();
    tracing::info!("store writer stopped");
}

/// How often the writer gives an open store its upkeep, or probes a down one.
const TICK_INTERVAL: Duration = Duration::from_secs(1);

/// The writer thread's loop: a batch if one is queued, else whichever comes first of a batch
/// and a tick.
fn write_loop(
    rt: &tokio::runtime::Handle,
    mut rx: mpsc::Receiver<Batch>,
    mut ticks: mpsc::Receiver<()>,
    ctx: &Ctx,
    idle: &Notify,
) {
    let mut store = open(ctx);
    let store_depth = ctx.metrics.queue_depth.with_label_values(&["store"]);
    let mut ticking = true;
    loop {
        let batch = match rx.try_recv() {
            Ok(batch) => batch,
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            // Channels only: their wakers need no driver, so this works on any runtime
            // flavour and returns once the batcher is gone.
            Err(mpsc::error::TryRecvError::Empty) => match rt.block_on(async {
                tokio::select! {
                    biased;
                    batch = rx.recv() => Woke::Batch(batch),
                    tick = ticks.recv(), if ticking => Woke::Tick(tick.is_some()),
                }
            }) {
                Woke::Batch(Some(batch)) => batch,
                Woke::Batch(None) => break,
                Woke::Tick(true) => {
                    store = tick(ctx, store);
                    continue;
                }
                // The ticker is gone (the runtime is being dropped): wait for batches only.
                Woke::Tick(false) => {
                    ticking = false;
                    continue;
                }
            },
        };
        store_depth.set(rx.len() as i64);
        store = commit(ctx, store, batch);
        if rx.is_empty() {
            // Tell the batcher to flush what it has gathered now, not at its deadline.
            idle.notify_one();
        }
        // Under load the channel is never empty: ticks are taken between batches.
        if ticking {
            match ticks.try_recv() {
                Ok(()) => store = tick(ctx, store),
                Err(mpsc::error::TryRecvError::Disconnected) => ticking = false,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
        }
    }
}

/// What woke the writer thread when no batch was queued.
enum Woke {
    /// The batch channel: a batch, or `None` once the batcher has stopped.
    Batch(Option<Batch>),
    /// The tick channel: `true` for a tick, `false` once the ticker is gone.
    Tick(bool),
}

/// The message of a caught panic, when it is a string (as `panic!` makes it).
fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Once a second: upkeep for an open store, a probe for a down one, and a new open when
/// there is none (it failed to open, or a call panicked).
fn tick(ctx: &Ctx, store: Option<Boxed>) -> Option<Boxed> {
    match store {
        None => open(ctx),
        Some(s) if ctx.health.store_up() => upkeep(ctx, Some(s)),
        Some(s) => reprobe(ctx, s),
    }
}

/// Runs `f` with the store. A panic drops the store and marks it down (so `/readyz` and
/// admission refuse) instead of ending the writer; the next tick opens it again.
fn guarded<T>(
    ctx: &Ctx,
    store: Boxed,
    f: impl FnOnce(&mut Boxed) -> T,
) -> (Option<Boxed>, Option<T>) {
    let mut store = store;
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut store)));
    // The writer thread's heap gets back what ingest threads freed of its buffers.
    crate::telemetry::memory::give_back(crate::telemetry::memory::BLOCKING_INTERVAL);
    match out {
        Ok(out) => (Some(store), Some(out)),
        Err(payload) => {
            drop(store);
            let e = StoreError::Corrupt(format!(
                "a store call panicked ({}); reopening",
                panic_text(&*payload)
            ));
            store_failed(ctx, "call", &e);
            (None, None)
        }
    }
}

fn store_failed(ctx: &Ctx, what: &str, e: &StoreError) {
    if let Some(suppressed) = ctx.logs.store_down.event() {
        tracing::error!(error = %e, suppressed, "store {what} failed");
    }
    ctx.metrics
        .store_errors
        .with_label_values(&[backend_label(ctx)])
        .inc();
    ctx.metrics.store_up.set(0);
    ctx.health.set_store_down(e.to_string());
}

/// The `store` label before a store is open: the configured backend's name.
fn backend_label(ctx: &Ctx) -> &'static str {
    ctx.settings.backend.as_str()
}

fn open(ctx: &Ctx) -> Option<Boxed> {
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let opened = crate::store::open(&ctx.settings, &ctx.metrics)?;
        ctx.services.restore(&opened.devices);
        Ok::<_, StoreError>(opened.store)
    }));
    match opened {
        Ok(Ok(store)) => {
            if let Some(failures) = ctx.logs.store_down.recovered() {
                tracing::info!(failures, "store recovered");
            }
            ctx.reader.set(store.reader());
            match ctx.settings.backend {
                Backend::Sqlite => tracing::info!(
                    backend = store.backend(),
                    path = %ctx.settings.db_path().display(),
                    "store open"
                ),
                Backend::Postgres => tracing::info!(
                    backend = store.backend(),
                    url = %ctx.settings.postgres.url,
                    "store open"
                ),
            }
            ctx.metrics.store_up.set(1);
            ctx.health.set_store_up();
            Some(store)
        }
        Ok(Err(e)) => {
            store_failed(ctx, "open", &e);
            None
        }
        Err(payload) => {
            // Say why in /readyz too, not only "not opened yet".
            let e = StoreError::Corrupt(format!("store open panicked: {}", panic_text(&*payload)));
            store_failed(ctx, "open", &e);
            None
        }
    }
}

fn reprobe(ctx: &Ctx, store: Boxed) -> Option<Boxed> {
    let (store, result) = guarded(ctx, store, |s| s.probe());
    match result {
        Some(Ok(())) => {
            if let Some(failures) = ctx.logs.store_down.recovered() {
                tracing::info!(failures, "store recovered");
            }
            ctx.metrics.store_up.set(1);
            ctx.health.set_store_up();
        }
        Some(Err(e)) => {
            if let Some(suppressed) = ctx.logs.store_down.event() {
                tracing::warn!(error = %e, suppressed, "store still unavailable");
            }
        }
        None => {}
    }
    store
}

fn upkeep(ctx: &Ctx, store: Option<Boxed>) -> Option<Boxed> {
    let store = store?;
    let (store, result) = guarded(ctx, store, |s| s.maintain());
    if let Some(Err(e)) = result {
        store_failed(ctx, "upkeep", &e);
    }
    store
}

fn commit(ctx: &Ctx, store: Option<Boxed>, batch: Batch) -> Option<Boxed> {
    let Some(store) = store else {
        refuse(ctx, batch, "store not open");
        return None;
    };
    let delay = ctx.settings.commit_delay;
    let c = ctx;
    let (store, out) = guarded(ctx, store, move |s| {
        let mut batch = batch;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        for sub in &mut batch.submissions {
            c.services.before_commit(&mut sub.readings);
        }
        let all: Vec<&Reading> = batch
            .submissions
            .iter()
            .flat_map(|sub| sub.readings.iter())
            .collect();
        let started = Instant::now();
        let commit_ms = now_ms();
        let result = s.commit(&all, commit_ms);
        let elapsed = started.elapsed();
        if let Ok(inserted) = &result {
            let stored: Vec<&Reading> = all
                .iter()
                .zip(inserted)
                .filter_map(|(r, stored)| stored.then_some(*r))
                .collect();
            c.services.after_commit(&stored, commit_ms);
        }
        drop(all);
        (batch, result, elapsed, s.backend())
    });
    let Some((batch, result, elapsed, backend)) = out else {
        return store;
    };
    match result {
        Ok(inserted) => {
            if let Some(refused) = ctx.logs.overload.recovered() {
                tracing::info!(refused, "commits taken again");
            }
            ctx.metrics
                .store_commit_seconds
                .with_label_values(&[backend])
                .observe(elapsed.as_secs_f64());
            ctx.metrics.batch_size.observe(batch.readings as f64);
            let mut flags = inserted.into_iter();
            for sub in batch.submissions {
                let n = sub.readings.len();
                let accepted = flags.by_ref().take(n).filter(|f| *f).count();
                let ack = Ack {
                    accepted,
                    duplicates: n - accepted,
                };
                let t = sub.transport.as_str();
                ctx.metrics
                    .readings_accepted
                    .with_label_values(&[t])
                    .inc_by(ack.accepted as u64);
                ctx.metrics
                    .readings_duplicate
                    .with_label_values(&[t])
                    .inc_by(ack.duplicates as u64);
                let _ = sub.ack.send(Ok(ack));
                drop(sub.permit);
            }
        }
        Err(e) if e.is_overload() => {
            if let Some(suppressed) = ctx.logs.overload.event() {
                tracing::warn!(error = %e, suppressed, "commit refused for load");
            }
            refuse(ctx, batch, &e.to_string());
        }
        Err(e) => {
            store_failed(ctx, "commit", &e);
            refuse(ctx, batch, &e.to_string());
        }
    }
    ctx.admission.update_depth();
    store
}

/// Answers every submission of `batch` with "unavailable"; counts its readings as shed.
fn refuse(ctx: &Ctx, batch: Batch, why: &str) {
    for sub in batch.submissions {
        ctx.metrics
            .readings_shed
            .with_label_values(&[sub.transport.as_str()])
            .inc_by(sub.readings.len() as u64);
        let _ = sub.ack.send(Err(Unavailable(why.to_string())));
    }
    ctx.admission.update_depth();
}
