//! Compaction and retention: journal → **chunks**, in the background, on their own thread and
//! SQLite connection. Commits never wait for this thread; they do not touch SQLite.
//!
//! Compacting a sealed generation, or a batch of them (those that queued up while the last
//! compaction ran, oldest first; see [`MAX_BATCH_GENS`]), is one SQLite transaction:
//! 1. for each device of the batch (in name order: each generation's devices are grouped and
//!    sorted by `Gen::by_device`, and the batch's lists merged), decode its readings from
//!    every generation of the batch, sort them by `(ts, rid)`, and insert them as chunks
//!    (`schema::insert_chunks`), each naming the batch's first generation;
//! 2. fold them into the device's row: seq high-water, true `last_seen`, newest `ts`, latest
//!    value of every metric;
//! 3. set `meta.compacted_gen` to the (last) generation, and commit;
//! 4. only then drop the batch from memory, all of it under one write lock (a query skips
//!    chunks of generations it found in memory, so it must find all of a batch or none), and
//!    delete the segment files (or, while the NATS outbox still needs them, move them to the
//!    outbox directory first: see [`super::outbox`]).
//!
//! A crash before 3 leaves the segment, which start-up replays and compacts again; a crash
//! after 3 leaves a segment at or below `compacted_gen`, which start-up deletes. Either way each
//! reading is stored exactly once. `storage.compaction_pause` pauses between the steps, so
//! tests can kill Sluice inside them.
//!
//! Rollups (`rollups.rs`, SPEC §12) are derived in step 1 from the same sorted readings, in the
//! same transaction, so they commit with the chunks or not at all. Before the first
//! compaction the thread brings the rollup tables to the configured levels
//! (`Deriver::reconcile`), retrying until it can: nothing is compacted before that.
//!
//! Retention runs here too, every `storage.retention_interval`: it drops whole chunks whose
//! newest reading is older than `storage.retention`. A dropped reading is no longer stored, so
//! a late resend of it is taken as new (and dropped again by the next sweep, its `ts` being
//! as old). Keeping a high-water mark of dropped seqs instead would refuse, as duplicates,
//! readings that were never stored: a device whose counter restarted, or a backfill.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};

use super::journal::{self, Gen};
use super::outbox::OutboxState;
use super::rollups::Deriver;
use super::schema::{insert_chunks, DeviceRow};
use super::{Shared, BACKEND};
use crate::config::StorageSettings;
use crate::reading::now_ms;
use crate::store::StoreError;
use crate::telemetry::metrics::Metrics;

/// How long a failed compaction waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// Most sealed generations compacted together. A compaction's cost is mostly per device
/// (its row read and written, a chunk and its index entries, its rollup buckets), so when
/// generations queue up behind a compaction, as they do with 100 000 devices of ~3 readings
/// each per generation, taking them together divides that cost by their number. With one
/// generation waiting or none, a batch is one generation, as before. Bounded so that one
/// transaction, which holds SQLite's write lock, stays under the 5 s `busy_timeout` that the
/// other writers (tokens, alert states) wait: four generations of 100 000 devices took 3.7 to
/// 4.3 s on the 2-core bench machine.
const MAX_BATCH_GENS: usize = 4;

/// Handle to the compaction thread. Dropping it stops the thread (an unfinished compaction is
/// rolled back; its segment stays for the next start) and joins it.
pub struct Compactor {
    /// Sealed generations to compact, in order.
    jobs: Option<mpsc::Sender<Arc<Gen>>>,
    /// Set on drop: abandon work between steps.
    stop: Arc<AtomicBool>,
    /// The thread.
    thread: Option<JoinHandle<()>>,
}

impl Compactor {
    /// Starts the thread with `conn` as the only SQLite writer.
    pub fn spawn(
        conn: Connection,
        settings: &StorageSettings,
        shared: Shared,
        metrics: Arc<Metrics>,
        outbox: Option<Arc<OutboxState>>,
    ) -> Result<Self, StoreError> {
        let (tx, rx) = mpsc::channel::<Arc<Gen>>();
        let stop = Arc::new(AtomicBool::new(false));
        let mut worker = Worker {
            conn,
            settings: settings.clone(),
            shared,
            metrics,
            outbox,
            stop: stop.clone(),
            rollups: Deriver::new(&settings.rollups),
        };
        let thread = std::thread::Builder::new()
            .name("sluice-compact".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| StoreError::Open {
                path: settings.db_path(),
                reason: format!("cannot start the compaction thread: {e}"),
            })?;
        Ok(Self {
            jobs: Some(tx),
            stop,
            thread: Some(thread),
        })
    }

    /// Queues a sealed generation (already in the shared sealed list).
    pub fn compact(&self, gen: Arc<Gen>) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(gen);
        }
    }

    /// An error if the thread has died (it only ends on drop otherwise).
    pub fn check(&self) -> Result<(), StoreError> {
        match &self.thread {
            Some(t) if !t.is_finished() => Ok(()),
            _ => Err(StoreError::Journal(
                "the compaction thread has stopped; see the log".into(),
            )),
        }
    }
}

impl Drop for Compactor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sleeps for `d`, waking early if `stop` is set; returns whether to stop.
fn pause(stop: &AtomicBool, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::SeqCst) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10).min(until - Instant::now()));
    }
    stop.load(Ordering::SeqCst)
}

/// The fault-injection pause between compaction steps (`storage.compaction_pause`).
fn step(stop: &AtomicBool, d: Duration) -> Result<(), Abandoned> {
    if stop.load(Ordering::SeqCst) || (!d.is_zero() && pause(stop, d)) {
        return Err(Abandoned::Stopping);
    }
    Ok(())
}

/// The thread's state.
struct Worker {
    /// The only connection that writes the database.
    conn: Connection,
    /// Retention, pauses, paths.
    settings: StorageSettings,
    /// The journal, to drop compacted generations from.
    shared: Shared,
    /// Compaction and retention counters.
    metrics: Arc<Metrics>,
    /// The NATS outbox, when enabled: compacted segments it still needs are kept for it.
    outbox: Option<Arc<OutboxState>>,
    /// Set when the store is dropped.
    stop: Arc<AtomicBool>,
    /// Derives rollups in each compaction, and sweeps them with retention.
    rollups: Deriver,
}

/// Why a compaction did not finish.
enum Abandoned {
    /// The store is closing; the generation stays in its segment.
    Stopping,
    /// An error; retried.
    Failed(StoreError),
}

impl From<StoreError> for Abandoned {
    fn from(e: StoreError) -> Self {
        Abandoned::Failed(e)
    }
}

impl From<rusqlite::Error> for Abandoned {
    fn from(e: rusqlite::Error) -> Self {
        Abandoned::Failed(e.into())
    }
}

impl Worker {
    fn run(&mut self, rx: mpsc::Receiver<Arc<Gen>>) {
        // Rollups must be complete for every configured level before a generation adds to them.
        while let Err(e) = self.rollups.reconcile(&mut self.conn) {
            self.failed("rollups", &e);
            if self.pause(RETRY) {
                return;
            }
        }
        let mut next_retention = Instant::now();
        loop {
            if Instant::now() >= next_retention {
                if let Err(e) = self.retention() {
                    self.failed("retention", &e);
                }
                next_retention = Instant::now() + self.settings.retention_interval;
            }
            let wait = next_retention.saturating_duration_since(Instant::now());
            let gen = match rx.recv_timeout(wait) {
                Ok(gen) => gen,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            // Generations that queued up while the last compaction ran join this one: see
            // `MAX_BATCH_GENS`.
            let mut batch = vec![gen];
            while batch.len() < MAX_BATCH_GENS {
                match rx.try_recv() {
                    Ok(gen) => batch.push(gen),
                    Err(_) => break,
                }
            }
            loop {
                match self.compact(&batch) {
                    Ok(()) => break,
                    Err(Abandoned::Stopping) => return,
                    Err(Abandoned::Failed(e)) => {
                        self.failed("compaction", &e);
                        if self.pause(RETRY) {
                            return;
                        }
                    }
                }
            }
        }
    }

    fn failed(&self, what: &str, e: &StoreError) {
        // Compaction is retried every second while it fails: one line, then one per 30 s.
        static COMPACTION: crate::telemetry::log_limit::LogLimit =
            crate::telemetry::log_limit::LogLimit::new();
        static RETENTION: crate::telemetry::log_limit::LogLimit =
            crate::telemetry::log_limit::LogLimit::new();
        let limit = if what == "retention" {
            &RETENTION
        } else {
            &COMPACTION
        };
        if let Some(suppressed) = limit.event() {
            tracing::error!(error = %e, suppressed, "store {what} failed; will retry");
        }
        self.metrics
            .store_errors
            .with_label_values(&[BACKEND])
            .inc();
    }

    /// Sleeps for `d` unless stopping; returns whether to stop.
    fn pause(&self, d: Duration) -> bool {
        pause(&self.stop, d)
    }

    /// Compacts `batch` (consecutive sealed generations, oldest first) in one transaction.
    fn compact(&mut self, batch: &[Arc<Gen>]) -> Result<(), Abandoned> {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return Ok(());
        };
        let started = Instant::now();
        let readings: u64 = batch.iter().map(|g| u64::from(g.readings)).sum();
        // Every device of the batch once, in name order, with its readings from each
        // generation: a merge of the generations' device lists, each sorted by name. Grouped
        // before the transaction: it needs nothing of SQLite, whose write lock others wait for.
        let grouped = batch
            .iter()
            .map(|g| g.by_device())
            .collect::<Result<Vec<_>, _>>()?;
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut heads = vec![0usize; batch.len()];
        // The device at the head of generation `pos`'s list, if any is left.
        let head = |heads: &[usize], pos: usize| {
            grouped[pos]
                .by_name()
                .get(heads[pos])
                .and_then(|&slot| Some((slot, batch[pos].device_at(slot)?)))
        };
        let mut devices = 0usize;
        let mut chunks = 0usize;
        // Per device, the highest seq this batch moves into chunks.
        let mut maxima: Vec<(&str, u64)> = Vec::new();
        self.rollups.begin();
        let mut rollup_rows = 0u64;
        let mut rows = Vec::new();
        while let Some(name) = (0..batch.len())
            .filter_map(|pos| head(&heads, pos).map(|(_, d)| d.name()))
            .min()
        {
            if self.stop.load(Ordering::SeqCst) {
                return Err(Abandoned::Stopping);
            }
            devices += 1;
            rows.clear();
            // Warm the devices to come in each generation: the records of the one after the
            // head (its entries were warmed an iteration ago) and the entries of the next.
            for (pos, g) in batch.iter().enumerate() {
                let ahead = |k: usize| {
                    let names = grouped[pos].by_name();
                    names
                        .get(heads[pos] + k)
                        .map(|&slot| grouped[pos].slot(slot as usize))
                };
                if let Some(idxs) = ahead(1) {
                    g.prefetch_rows(idxs, true);
                }
                if let Some(idxs) = ahead(2) {
                    g.prefetch_rows(idxs, false);
                }
            }
            let mut last_seen_ms = i64::MIN;
            for pos in 0..batch.len() {
                let Some((slot, dev)) = head(&heads, pos) else {
                    continue;
                };
                if dev.name() != name {
                    continue;
                }
                batch[pos].rows_into(grouped[pos].slot(slot as usize), &mut rows)?;
                last_seen_ms = last_seen_ms.max(dev.last_seen_ms());
                heads[pos] += 1;
            }
            let (id, mut state) = DeviceRow::load_or_create(&tx, name)?;
            rows.sort_unstable_by_key(|r| (r.ts_ms, r.rid));
            for r in &rows {
                state.absorb(r, last_seen_ms);
            }
            if let Some(m) = rows.iter().filter_map(|r| r.seq).max() {
                maxima.push((name, m));
            }
            // A chunk names the batch's *first* generation. A query notes the generations in
            // memory, copies their rows, then reads chunks, skipping those named after a
            // generation it noted. If it noted the first, it copied every row of the batch
            // that existed then (the batch leaves memory as one, below); if not, the batch
            // had left memory before, or was all sealed after it looked. Naming the last
            // would let a query that noted the first generation while it was still active
            // read the chunk too, and return those rows twice.
            chunks += insert_chunks(&tx, id, first.id, &rows)?;
            rollup_rows += self.rollups.derive(&tx, id, &rows)?;
            state.write(&tx, id)?;
        }
        step(&self.stop, self.settings.compaction_pause)?;
        tx.execute(
            "UPDATE meta SET value = max(value, ?1) WHERE key = 'compacted_gen'",
            params![last.id as i64],
        )?;
        tx.commit()?;
        self.rollups.committed();
        self.metrics.rollup_rows_written.inc_by(rollup_rows);
        step(&self.stop, self.settings.compaction_pause)?;
        let dir = self.settings.journal_dir();
        // Each segment is moved before the batch leaves memory, so the publisher finds it in
        // one place. The chunks are committed: a failure from here on must not redo this
        // compaction. If a move fails, the whole batch stays in memory (queries skip its
        // chunks, and the publisher reads it there) and start-up moves the segment.
        let mut kept = Vec::with_capacity(batch.len());
        for gen in batch {
            let seg = journal::segment_path(&dir, gen.id);
            match &self.outbox {
                Some(o) if !o.published(gen.id, gen.readings) => {
                    if let Err(e) = o.keep(&seg, gen.id, gen.readings) {
                        // The same for every generation while it lasts.
                        static KEEP: crate::telemetry::log_limit::LogLimit =
                            crate::telemetry::log_limit::LogLimit::new();
                        if let Some(suppressed) = KEEP.event() {
                            tracing::error!(segment = %seg.display(), error = %e, suppressed, "cannot move a compacted segment to the NATS outbox; it stays in memory until restart");
                        }
                        return Ok(());
                    }
                    kept.push(true);
                }
                _ => kept.push(false),
            }
        }
        {
            let mut st = self.shared.write().expect("journal lock");
            for (name, m) in &maxima {
                match st.compacted_max.get_mut(*name) {
                    Some(c) => *c = (*c).max(*m),
                    None => {
                        st.compacted_max.insert((*name).to_owned(), *m);
                    }
                }
            }
            st.sealed.retain(|g| !batch.iter().any(|b| b.id == g.id));
            self.metrics.store_journal_readings.set(st.held() as i64);
        }
        // A file left behind is deleted at the next start (its generation is compacted).
        for (gen, kept) in batch.iter().zip(kept) {
            if kept {
                continue;
            }
            let seg = journal::segment_path(&dir, gen.id);
            if let Err(e) = std::fs::remove_file(&seg) {
                static REMOVE: crate::telemetry::log_limit::LogLimit =
                    crate::telemetry::log_limit::LogLimit::new();
                if let Some(suppressed) = REMOVE.event() {
                    tracing::warn!(segment = %seg.display(), error = %e, suppressed, "cannot delete a compacted segment");
                }
            }
        }
        let elapsed = started.elapsed();
        self.metrics
            .store_compaction_seconds
            .observe(elapsed.as_secs_f64());
        self.metrics.store_compacted_readings.inc_by(readings);
        tracing::debug!(
            gens = ?batch.iter().map(|g| g.id).collect::<Vec<_>>(),
            readings,
            devices,
            chunks,
            elapsed_ms = elapsed.as_millis() as u64,
            "journal generations compacted"
        );
        Ok(())
    }

    /// Drops whole chunks older than `storage.retention`, and rollup buckets older than
    /// `rollups.retention`. Returns readings dropped.
    fn retention(&mut self) -> Result<u64, StoreError> {
        let cutoff = now_ms().saturating_sub(self.settings.retention.as_millis() as i64);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let dropped: i64 = tx.query_row(
            "SELECT coalesce(sum(n), 0) FROM chunks WHERE t_max < ?1",
            params![cutoff],
            |r| r.get(0),
        )?;
        tx.execute("DELETE FROM chunks WHERE t_max < ?1", params![cutoff])?;
        let rollup_rows = self.rollups.retention(&tx, now_ms())?;
        tx.commit()?;
        self.metrics.rollup_retention_deleted.inc_by(rollup_rows);
        if dropped > 0 {
            tracing::info!(deleted = dropped, "retention dropped chunks");
            // The writer's seq windows may hold a deleted seq as committed.
            self.shared.write().expect("journal lock").retention_epoch += 1;
        }
        self.metrics.retention_deleted.inc_by(dropped as u64);
        Ok(dropped as u64)
    }
}
