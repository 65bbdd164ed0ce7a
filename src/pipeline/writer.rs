//! The store writer: batcher → processing services → **store** → ack.
//!
//! One task owns the [`SqliteStore`]. Every store call runs on a blocking thread
//! (`spawn_blocking`), so an fsync never stalls the event loop. For each batch it:
//! 1. runs the processing services' pre-commit hooks;
//! 2. commits every reading in one transaction;
//! 3. runs the post-commit hooks (device state);
//! 4. acks each submission with its own counts, and only then releases its admission permits.
//!
//! If the store cannot be opened or a commit fails, the batch is answered "unavailable" (never
//! acked), the store is marked down (so `/readyz` and admission refuse), and the writer probes
//! it once a second until it works again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::batcher::Batch;
use super::{Ack, Admission, Health, Unavailable};
use crate::config::StorageSettings;
use crate::reading::{now_ms, Reading};
use crate::services::Services;
use crate::store::{SqliteStore, StoreError};
use crate::telemetry::metrics::Metrics;

/// Batches that may wait for the writer. Two lets the batcher fill the next batch while one
/// commits, without letting batches (and memory) pile up behind a slow disk.
pub const BATCH_QUEUE: usize = 2;

/// How often a down store is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Everything the writer needs besides the store itself.
struct Ctx {
    settings: StorageSettings,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    services: Arc<Services>,
    admission: Admission,
}

/// Runs until the batcher has stopped and every batch is answered.
pub async fn run(
    mut rx: mpsc::Receiver<Batch>,
    settings: StorageSettings,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    services: Arc<Services>,
    admission: Admission,
) {
    let ctx = Arc::new(Ctx {
        settings,
        metrics,
        health,
        services,
        admission,
    });
    let mut store = open(&ctx).await;
    let mut retention = tokio::time::interval(ctx.settings.retention_interval);
    retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe = tokio::time::interval(PROBE_INTERVAL);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let store_depth = ctx.metrics.queue_depth.with_label_values(&["store"]);
    loop {
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                store_depth.set((rx.len()) as i64);
                store = commit(&ctx, store, batch).await;
            }
            _ = retention.tick(), if store.is_some() && ctx.health.store_up() => {
                store = sweep(&ctx, store).await;
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
    store: SqliteStore,
    f: impl FnOnce(&mut SqliteStore) -> T + Send + 'static,
) -> (Option<SqliteStore>, Option<T>) {
    match tokio::task::spawn_blocking(move || {
        let mut store = store;
        let out = f(&mut store);
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
    tracing::error!(error = %e, "store {what} failed");
    ctx.metrics
        .store_errors
        .with_label_values(&["sqlite"])
        .inc();
    ctx.metrics.store_up.set(0);
    ctx.health.set_store_down(e.to_string());
}

async fn open(ctx: &Arc<Ctx>) -> Option<SqliteStore> {
    let settings = ctx.settings.clone();
    let services = ctx.services.clone();
    let opened = tokio::task::spawn_blocking(move || {
        let store = SqliteStore::open(&settings)?;
        let latest = store.latest_per_device()?;
        services.restore(&latest);
        Ok::<_, StoreError>(store)
    })
    .await;
    match opened {
        Ok(Ok(store)) => {
            tracing::info!(path = %ctx.settings.db_path().display(), "store open");
            ctx.metrics.store_up.set(1);
            ctx.health.set_store_up();
            Some(store)
        }
        Ok(Err(e)) => {
            store_failed(ctx, "open", &e);
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "store open panicked");
            None
        }
    }
}

async fn reprobe(ctx: &Arc<Ctx>, store: SqliteStore) -> Option<SqliteStore> {
    let (store, result) = blocking(store, |s| s.probe()).await;
    match result {
        Some(Ok(())) => {
            tracing::info!("store recovered");
            ctx.metrics.store_up.set(1);
            ctx.health.set_store_up();
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "store still unavailable");
        }
        None => {}
    }
    store
}

async fn sweep(ctx: &Arc<Ctx>, store: Option<SqliteStore>) -> Option<SqliteStore> {
    let store = store?;
    let cutoff = now_ms() - ctx.settings.retention.as_millis() as i64;
    let (store, result) = blocking(store, move |s| s.sweep_retention(cutoff)).await;
    match result {
        Some(Ok(n)) => {
            if n > 0 {
                tracing::info!(deleted = n, "retention sweep");
            }
            ctx.metrics.retention_deleted.inc_by(n);
        }
        Some(Err(e)) => store_failed(ctx, "retention sweep", &e),
        None => {}
    }
    store
}

async fn commit(ctx: &Arc<Ctx>, store: Option<SqliteStore>, batch: Batch) -> Option<SqliteStore> {
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
        let started = Instant::now();
        let result = s.commit(batch.submissions.iter().flat_map(|sub| sub.readings.iter()));
        let elapsed = started.elapsed();
        if let Ok(inserted) = &result {
            let stored: Vec<&Reading> = batch
                .submissions
                .iter()
                .flat_map(|sub| sub.readings.iter())
                .zip(inserted)
                .filter_map(|(r, stored)| stored.then_some(r))
                .collect();
            c.services.after_commit(&stored);
        }
        (batch, result, elapsed)
    })
    .await;
    let Some((batch, result, elapsed)) = out else {
        return store;
    };
    match result {
        Ok(inserted) => {
            ctx.metrics
                .store_commit_seconds
                .with_label_values(&["sqlite"])
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
