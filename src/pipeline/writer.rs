//! The store writer: batcher → processing services → **store** → ack.
//!
//! One task owns the store (a [`Store`], whichever backend). Every store call runs on a
//! blocking thread (`spawn_blocking`), so an fsync never stalls the event loop. For each batch
//! it:
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

/// How often a down store is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How often an idle store gets its upkeep.
const MAINTAIN_INTERVAL: Duration = Duration::from_secs(1);

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
pub async fn run(mut rx: mpsc::Receiver<Batch>, ctx: Ctx, idle: Arc<Notify>) {
    let ctx = Arc::new(ctx);
    let mut store = open(&ctx).await;
    let mut maintain = tokio::time::interval(MAINTAIN_INTERVAL);
    maintain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe = tokio::time::interval(PROBE_INTERVAL);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let store_depth = ctx.metrics.queue_depth.with_label_values(&["store"]);
    loop {
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                store_depth.set((rx.len()) as i64);
                store = commit(&ctx, store, batch).await;
                if rx.is_empty() {
                    // Tell the batcher to flush what it has gathered now, not at its deadline.
                    idle.notify_one();
                }
            }
            _ = maintain.tick(), if store.is_some() && ctx.health.store_up() => {
                store = upkeep(&ctx, store).await;
            }
            _ = probe.tick(), if !ctx.health.store_up() => {
                store = match store {
                    None => open(&ctx).await,
                    Some(s) => reprobe(&ctx, s).await,
                };
            }
        }
    }
    tracing::info!("store writer stopped");
}

/// Runs `f` with the store on a blocking thread and gives the store back.
async fn blocking<T: Send + 'static>(
    store: Boxed,
    f: impl FnOnce(&mut Boxed) -> T + Send + 'static,
) -> (Option<Boxed>, Option<T>) {
    match tokio::task::spawn_blocking(move || {
        let mut store = store;
        let out = f(&mut store);
        // Commits run on whichever pool thread is idle: each gives back what others freed.
        crate::telemetry::memory::give_back(crate::telemetry::memory::BLOCKING_INTERVAL);
        (store, out)
    })
    .await
    {
        Ok((store, out)) => (Some(store), Some(out)),
        Err(e) => {
            tracing::error!(error = %e, "store task panicked; reopening");
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

async fn open(ctx: &Arc<Ctx>) -> Option<Boxed> {
    let settings = ctx.settings.clone();
    let services = ctx.services.clone();
    let metrics = ctx.metrics.clone();
    let opened = tokio::task::spawn_blocking(move || {
        let opened = crate::store::open(&settings, &metrics)?;
        services.restore(&opened.devices);
        Ok::<_, StoreError>(opened.store)
    })
    .await;
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
        Err(e) => {
            // Say why in /readyz too, not only "not opened yet".
            let e = StoreError::Corrupt(format!("store open panicked: {e}"));
            store_failed(ctx, "open", &e);
            None
        }
    }
}

async fn reprobe(ctx: &Arc<Ctx>, store: Boxed) -> Option<Boxed> {
    let (store, result) = blocking(store, |s| s.probe()).await;
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

async fn upkeep(ctx: &Arc<Ctx>, store: Option<Boxed>) -> Option<Boxed> {
    let store = store?;
    let (store, result) = blocking(store, |s| s.maintain()).await;
    if let Some(Err(e)) = result {
        store_failed(ctx, "upkeep", &e);
    }
    store
}

async fn commit(ctx: &Arc<Ctx>, store: Option<Boxed>, batch: Batch) -> Option<Boxed> {
    let Some(store) = store else {
        refuse(ctx, batch, "store not open");
        return None;
    };
    let delay = ctx.settings.commit_delay;
    let c = ctx.clone();
    let (store, out) = blocking(store, move |s| {
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
    })
    .await;
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
