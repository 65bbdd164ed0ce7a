//! The embedded store: a journal for the commit, compressed chunks in SQLite for the rest.
//! The last step of the flow before the ack.
//!
//! ```text
//! commit ──▶ journal segment (append + fdatasync) ──▶ ack
//!              │ sealed every storage.compaction_interval or journal_seal_readings
//!              ▼
//!        compaction thread ──▶ SQLite: chunks (per device, time-ordered, compressed),
//!                              devices (seq high-water, device state), meta (compacted_gen)
//! ```
//!
//! - [`SqliteStore`] is the single writer, owned by the store writer task and only used on a
//!   blocking thread. A group commit costs one sequential append of the bytes received
//!   ([`journal`]), whatever the number of devices: no B-tree page is dirtied per device.
//! - Duplicates are decided without a random write: each device's highest committed `seq` is
//!   kept in memory (restored at start) with a window of what is known below it
//!   ([`seq_window`]). A reading above it is new; one inside the window is answered from it;
//!   only the rest is looked up exactly, in the journal's in-memory index and then in that
//!   device's chunks.
//! - Compaction ([`compaction`]) moves each sealed generation into chunks in one SQLite
//!   transaction, on its own thread and connection. Commits never wait for it: they touch no
//!   SQLite page. The journal's size is bounded by `storage.journal_max_readings`.
//! - Queries ([`reader`]) merge the in-memory generations with the chunks.
//! - The schema is versioned and older files are upgraded at start ([`schema`]).

mod alerts;
pub mod chunk;
mod compaction;
pub mod journal;
pub mod outbox;
mod reader;
mod rollups;
pub mod schema;
mod seq_window;
mod tokens;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use self::compaction::Compactor;
use self::journal::{FrameBuilder, Gen, Segment};
use self::outbox::{OutboxState, SqliteOutbox};
use self::reader::SqliteReader;
use self::schema::DeviceRow;
use self::seq_window::{Check, SeqWindow};
use super::{seq_key, DeviceLatest, Store, StoreError, StoreRead};
use crate::config::{StorageSettings, Synchronous};
use crate::reading::{now_ms, Reading};
use crate::telemetry::metrics::Metrics;

/// The `store` label of this backend's metrics.
pub const BACKEND: &str = "sqlite";

/// A generation is sealed at this many bytes of records and device names whatever their count
/// (entries and slots hold u32 offsets into them).
const ARENA_SEAL_BYTES: usize = 1 << 30;

/// Chunks whose seq columns the duplicate lookup keeps decoded.
const SEQ_CACHE_CHUNKS: usize = 32;

/// The journal as queries, duplicate lookups and compaction see it.
#[derive(Debug, Default)]
pub struct JournalState {
    /// The generation commits append to.
    pub active: Gen,
    /// Sealed generations waiting for (or in) compaction, oldest first. A generation leaves
    /// this list only after its chunks are committed.
    pub sealed: Vec<Arc<Gen>>,
    /// Device id → highest seq among its readings that are in chunks and no longer in memory
    /// (raised by compaction as it drops a generation). A seq above it cannot be in a chunk
    /// that memory does not also hold, so its duplicate check needs no SQLite lookup: the
    /// common case of a fleet whose connections commit a device's readings out of order.
    pub compacted_max: foldhash::HashMap<String, u64>,
    /// Bumped by each retention sweep that deleted chunks. When the writer sees it move, its
    /// seq windows and chunk-seq cache forget what they knew below each high-water: a deleted
    /// reading is no longer stored, so a resend of it is new.
    pub retention_epoch: u64,
}

impl JournalState {
    /// Readings not yet compacted.
    pub fn held(&self) -> u64 {
        u64::from(self.active.readings)
            + self
                .sealed
                .iter()
                .map(|g| u64::from(g.readings))
                .sum::<u64>()
    }

    /// Whether any in-memory generation holds `(device, seq)`.
    pub fn contains(&self, device: &str, seq: u64) -> bool {
        self.active.contains(device, seq) || self.sealed.iter().any(|g| g.contains(device, seq))
    }

    /// Whether `(device, seq)` could be in a chunk that no in-memory generation also holds.
    pub fn maybe_only_in_chunks(&self, device: &str, seq: u64) -> bool {
        self.compacted_max.get(device).is_some_and(|&m| seq <= m)
    }
}

/// State shared by the writer, the compaction thread and the readers.
pub type Shared = Arc<RwLock<JournalState>>;

/// The single writer.
pub struct SqliteStore {
    /// Journal thresholds, durability and paths.
    settings: StorageSettings,
    /// The in-memory journal.
    shared: Shared,
    /// The active generation's segment file.
    segment: Segment,
    /// When the active generation received its first reading since it was created.
    active_since: Option<Instant>,
    /// Device id → its seq window: the highest committed `seq` (journal and chunks) and
    /// what is known of the 63 below it. Devices that never sent a seq are absent.
    max_seq: foldhash::HashMap<String, SeqWindow>,
    /// The `JournalState::retention_epoch` the windows and `seq_cache` are up to date with.
    retention_epoch: u64,
    /// A read connection for exact duplicate lookups in chunks.
    lookup: Connection,
    /// The sorted seqs of recently looked-up chunks (chunk id → seqs), oldest first. Chunks
    /// never change once written; the cache is cleared when retention drops chunks.
    seq_cache: Vec<(i64, Arc<Vec<u64>>)>,
    /// The compaction thread.
    compactor: Compactor,
    /// Where the journal gauge and refusals are counted.
    metrics: Arc<Metrics>,
    /// Query side, sharing `shared`.
    reader: Arc<SqliteReader>,
    /// Copies the WAL into the database in the background; stopped when the store is dropped.
    _checkpointer: Checkpointer,
    /// The exclusive lock on `data_dir/LOCK`. Declared last, so it is released only after the
    /// compaction and checkpoint threads have stopped.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// With NATS disabled, a leftover outbox is not published: say so once at start.
fn warn_unpublished(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let kept = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".seg")))
        .count();
    if kept > 0 {
        tracing::warn!(
            dir = %dir.display(),
            segments = kept,
            "nats.enabled is false, but the NATS outbox holds unpublished readings: they are published when NATS is enabled again (delete the directory to discard them)"
        );
    }
}

/// Takes the exclusive lock that makes `data_dir` this process's alone. Two processes on one
/// store would each replay and delete the other's journal segments. The lock is released by
/// the kernel when the process dies, so a kill -9 leaves nothing to clean up.
fn lock_data_dir(
    settings: &StorageSettings,
) -> Result<nix::fcntl::Flock<std::fs::File>, StoreError> {
    let path = settings.data_dir.join("LOCK");
    let err = |reason: String| StoreError::Open {
        path: path.clone(),
        reason,
    };
    std::fs::create_dir_all(&settings.data_dir).map_err(|e| err(e.to_string()))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| err(e.to_string()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => err(
                "another Sluice process is using this data directory (storage.data_dir); \
                 waiting for it to stop"
                    .into(),
            ),
            other => err(format!("cannot lock: {other}")),
        },
    )
}

/// WAL pages after which the compaction connection checkpoints by itself (64 MiB at 4 KiB
/// pages). The background checkpointer does most of the copying; this bounds the WAL file.
const WRITER_AUTOCHECKPOINT_PAGES: u32 = 16_384;
/// How often the background checkpointer runs.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// A thread with its own connection that runs `PRAGMA wal_checkpoint(PASSIVE)` periodically,
/// so that copying compaction's pages into the database file never happens inside a
/// compaction transaction.
struct Checkpointer {
    /// Dropping it stops the thread.
    stop: Option<std::sync::mpsc::Sender<()>>,
    /// The thread, joined on drop.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn spawn(path: &Path, settings: &StorageSettings) -> Result<Self, StoreError> {
        let conn = open_connection(path, settings)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sluice-checkpoint".into())
            .spawn(move || {
                // Tried ten times a second: one line when it starts failing, then at most one
                // per 30 s with a count, and one when it works again.
                let failing = crate::telemetry::log_limit::LogLimit::new();
                loop {
                    match stopped.recv_timeout(CHECKPOINT_INTERVAL) {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        Err(e) => {
                            if let Some(suppressed) = failing.event() {
                                tracing::warn!(error = %e, suppressed, "background checkpoint failed; will retry");
                            }
                        }
                        Ok(()) => {
                            if let Some(failures) = failing.recovered() {
                                tracing::info!(failures, "background checkpoint works again");
                            }
                        }
                    }
                }
            })
            .map_err(|e| StoreError::Open {
                path: path.to_path_buf(),
                reason: format!("cannot start the checkpoint thread: {e}"),
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens a connection to the database file with the pragmas every connection uses.
pub(crate) fn open_connection(
    path: &Path,
    settings: &StorageSettings,
) -> Result<Connection, StoreError> {
    let open_err = |reason: String| StoreError::Open {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| open_err(format!("cannot create {}: {e}", dir.display())))?;
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| open_err(e.to_string()))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(open_err(format!("cannot enable WAL (journal_mode={mode})")));
    }
    conn.execute_batch(&format!(
        "PRAGMA synchronous={}; PRAGMA cache_size=-16000; PRAGMA temp_store=MEMORY;",
        settings.synchronous.as_sql()
    ))?;
    Ok(conn)
}

/// Whether each journal frame is synced before the ack: with `full` and `extra`. With
/// `normal` and `off` a frame reaches the OS page cache, which survives a crash of Sluice
/// but not of the machine (as SQLite's own `normal` in WAL mode).
fn syncs(s: Synchronous) -> bool {
    matches!(s, Synchronous::Full | Synchronous::Extra)
}

impl SqliteStore {
    /// Opens (creating or upgrading) the store in `settings.data_dir`: migrates the schema,
    /// deletes journal segments that were already compacted, replays the others (cutting a
    /// torn tail), and restores every device's seq high-water and state. Returns the store
    /// and the device state for the device-state service.
    pub fn open(
        settings: &StorageSettings,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, Vec<DeviceLatest>), StoreError> {
        let started = Instant::now();
        let lock = lock_data_dir(settings)?;
        let path = settings.db_path();
        let dir = settings.journal_dir();
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::Open {
            path: dir.clone(),
            reason: e.to_string(),
        })?;
        let mut conn = open_connection(&path, settings)?;
        schema::migrate(&mut conn)?;
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)?;
        let compacted_gen: u64 = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'compacted_gen'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .unwrap_or(0) as u64;

        let segments = journal::list_segments(&dir)?;
        let mut last_gen = segments
            .iter()
            .map(|(id, _)| *id)
            .fold(compacted_gen, u64::max);
        let outbox_dir = settings.data_dir.join("outbox");
        let outbox = if settings.outbox {
            Some(Arc::new(OutboxState::open(&outbox_dir, last_gen + 1)?))
        } else {
            warn_unpublished(&outbox_dir);
            None
        };
        let mut sealed = Vec::new();
        for (id, seg) in segments {
            if id <= compacted_gen {
                // Its chunks are committed; the crash came before the file was deleted (or
                // moved to the NATS outbox, which still needs it if it is not published).
                if let Some(o) = &outbox {
                    let (gen, _) = journal::replay(&seg, id, true)?;
                    if !o.published(id, gen.readings) {
                        o.keep(&seg, id, gen.readings)?;
                        continue;
                    }
                }
                std::fs::remove_file(&seg).map_err(|e| journal::io_err(&seg, e))?;
                continue;
            }
            let (gen, _) = journal::replay(&seg, id, true)?;
            if gen.readings == 0 {
                std::fs::remove_file(&seg).map_err(|e| journal::io_err(&seg, e))?;
                continue;
            }
            sealed.push(Arc::new(gen));
        }
        last_gen = last_gen.max(compacted_gen);
        let segment = Segment::create(&dir, last_gen + 1, syncs(settings.synchronous))?;

        // Device state and seq high-water: the compacted part from `devices`, then the journal.
        let mut rows: HashMap<String, DeviceRow> = HashMap::new();
        {
            let mut stmt =
                conn.prepare("SELECT name, max_seq, last_seen, last_ts, latest FROM devices")?;
            let mut q = stmt.query([])?;
            while let Some(r) = q.next()? {
                let latest: Option<Vec<u8>> = r.get(4)?;
                rows.insert(
                    r.get(0)?,
                    DeviceRow {
                        max_seq: r.get::<_, Option<i64>>(1)?.map(super::seq_from_key),
                        last_seen_ms: r.get::<_, Option<i64>>(2)?.unwrap_or(0),
                        last_ts_ms: r.get(3)?,
                        latest: match latest {
                            Some(b) => schema::decode_latest(&b)?,
                            None => Vec::new(),
                        },
                    },
                );
            }
        }
        let compacted_max: foldhash::HashMap<String, u64> = rows
            .iter()
            .filter_map(|(n, r)| r.max_seq.map(|s| (n.clone(), s)))
            .collect();
        let mut replayed = 0u64;
        for gen in &sealed {
            for dev in gen.devices() {
                let row = rows.entry(dev.name().to_owned()).or_default();
                for (idx, _) in dev.entries() {
                    row.absorb(&gen.row(idx)?, dev.last_seen_ms());
                    replayed += 1;
                }
            }
        }
        let max_seq = rows
            .iter()
            .filter_map(|(n, r)| r.max_seq.map(|s| (n.clone(), SeqWindow::restored(s))))
            .collect();
        let devices: Vec<DeviceLatest> = rows
            .into_iter()
            .filter_map(|(device_id, r)| {
                Some(DeviceLatest {
                    device_id,
                    last_seen_ms: r.last_seen_ms,
                    last_ts_ms: r.last_ts_ms?,
                    metrics: r.latest,
                })
            })
            .collect();

        let shared: Shared = Arc::new(RwLock::new(JournalState {
            active: Gen::new(last_gen + 1),
            sealed: sealed.clone(),
            compacted_max,
            retention_epoch: 0,
        }));
        metrics.store_journal_readings.set(replayed as i64);
        metrics
            .store_journal_capacity
            .set(settings.journal_max_readings.min(i64::MAX as u64) as i64);
        let checkpointer = Checkpointer::spawn(&path, settings)?;
        let compactor = Compactor::spawn(
            conn,
            settings,
            shared.clone(),
            metrics.clone(),
            outbox.clone(),
        )?;
        for gen in sealed {
            compactor.compact(gen);
        }
        let lookup = open_connection(&path, settings)?;
        let outbox = outbox.map(|o| Arc::new(SqliteOutbox::new(o, shared.clone())));
        let reader = Arc::new(SqliteReader::new(&path, settings, shared.clone(), outbox));
        tracing::info!(
            devices = devices.len(),
            journal_readings = replayed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "store restored"
        );
        Ok((
            Self {
                settings: settings.clone(),
                shared,
                segment,
                active_since: None,
                max_seq,
                retention_epoch: 0,
                lookup,
                seq_cache: Vec::new(),
                compactor,
                metrics,
                reader,
                _checkpointer: checkpointer,
                _lock: lock,
            },
            devices,
        ))
    }

    /// Whether `(device, seq)`, at or below the device's high-water, is in a chunk.
    ///
    /// Only chunks whose seq range covers `seq` are read, and their decoded seq columns are
    /// kept in a small cache, so a client resending thousands of old readings costs one
    /// decode per chunk, not one per reading. A chunk that cannot be decoded is logged and
    /// counted, and the reading is taken as new: a duplicate stored (at-least-once) rather
    /// than every device's commits failing over one damaged chunk.
    fn in_chunks(&mut self, device: &str, seq: u64) -> Result<bool, StoreError> {
        let key = seq_key(seq);
        let candidates: Vec<i64> = {
            let mut stmt = self.lookup.prepare_cached(
                "SELECT c.id FROM chunks c JOIN devices d ON d.id = c.device
                 WHERE d.name = ?1 AND c.seq_min <= ?2 AND c.seq_max >= ?2",
            )?;
            let ids = stmt.query_map(params![device, key], |r| r.get(0))?;
            ids.collect::<Result<_, _>>()?
        };
        for id in candidates {
            let seqs = match self.seq_cache.iter().position(|(c, _)| *c == id) {
                Some(i) => self.seq_cache[i].1.clone(),
                None => {
                    let data: Vec<u8> = self.lookup.query_row(
                        "SELECT data FROM chunks WHERE id = ?1",
                        params![id],
                        |r| r.get(0),
                    )?;
                    let mut seqs: Vec<u64> = match chunk::decode_seqs(&data) {
                        Ok(s) => s.into_iter().flatten().collect(),
                        Err(e) => {
                            // Every resend that looks it up fails alike.
                            static UNDECODABLE: crate::telemetry::log_limit::LogLimit =
                                crate::telemetry::log_limit::LogLimit::new();
                            if let Some(suppressed) = UNDECODABLE.event() {
                                tracing::error!(chunk = id, device, error = %e, suppressed,
                                    "cannot decode a chunk for a duplicate lookup; taking the reading as new");
                            }
                            self.metrics
                                .store_errors
                                .with_label_values(&[BACKEND])
                                .inc();
                            continue;
                        }
                    };
                    seqs.sort_unstable();
                    let seqs = Arc::new(seqs);
                    if self.seq_cache.len() == SEQ_CACHE_CHUNKS {
                        self.seq_cache.remove(0);
                    }
                    self.seq_cache.push((id, seqs.clone()));
                    seqs
                }
            };
            if seqs.binary_search(&seq).is_ok() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Seals the active generation when it is big or old enough, and hands it to compaction.
    fn maybe_seal(&mut self) -> Result<(), StoreError> {
        let (readings, id, arena) = {
            let st = self.shared.read().expect("journal lock");
            (st.active.readings, st.active.id, st.active.arena_len())
        };
        let old_enough = self
            .active_since
            .is_some_and(|t| t.elapsed() >= self.settings.compaction_interval);
        // Entries and slots address records and names with u32 offsets: seal long before 4 GiB.
        let big = readings >= self.settings.journal_seal_readings || arena >= ARENA_SEAL_BYTES;
        if readings == 0 || !(big || old_enough) {
            return Ok(());
        }
        let segment = Segment::create(
            &self.settings.journal_dir(),
            id + 1,
            syncs(self.settings.synchronous),
        )?;
        // Built before the write lock, which queries wait on: only this thread (commits and
        // seals, `&mut self`) changes the active generation, so it is still the one sized.
        let next = self.shared.read().expect("journal lock").active.successor();
        let sealed = {
            let mut st = self.shared.write().expect("journal lock");
            let gen = Arc::new(std::mem::replace(&mut st.active, next));
            st.sealed.push(gen.clone());
            gen
        };
        self.segment = segment;
        self.active_since = None;
        tracing::debug!(gen = id, readings, "journal generation sealed");
        self.compactor.compact(sealed);
        Ok(())
    }
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn commit(&mut self, readings: &[&Reading], commit_ms: i64) -> Result<Vec<bool>, StoreError> {
        self.compactor.check()?;
        let (held, first_idx, epoch) = {
            let st = self.shared.read().expect("journal lock");
            (st.held(), st.active.readings, st.retention_epoch)
        };
        if epoch != self.retention_epoch {
            for w in self.max_seq.values_mut() {
                w.forget();
            }
            self.seq_cache.clear();
            self.retention_epoch = epoch;
        }
        let max = self.settings.journal_max_readings;
        if held + readings.len() as u64 > max {
            self.metrics.store_journal_full.inc();
            return Err(StoreError::JournalFull { held, max });
        }
        let mut frame = FrameBuilder::new(commit_ms, first_idx);
        let mut flags = Vec::with_capacity(readings.len());
        // Seqs taken by this batch so far (recorded in the windows on success), and what
        // exact lookups found (`(device, seq, committed)`), kept in the windows either way.
        let mut taken: foldhash::HashSet<(&str, u64)> = Default::default();
        let mut learned: Vec<(&str, u64, bool)> = Vec::new();
        {
            let shared = self.shared.clone();
            let st = shared.read().expect("journal lock");
            for (pos, r) in readings.iter().enumerate() {
                let new = match r.seq {
                    None => true,
                    Some(s) => {
                        let dev = r.device_id.as_str();
                        let check = self.max_seq.get(dev).map_or(Check::New, |w| w.check(s));
                        let new = match check {
                            // Not committed: only this batch can hold it.
                            Check::New => !taken.contains(&(dev, s)),
                            Check::Duplicate => false,
                            Check::Unknown => {
                                let committed = st.contains(dev, s)
                                    || (st.maybe_only_in_chunks(dev, s)
                                        && self.in_chunks(dev, s)?);
                                learned.push((dev, s, committed));
                                !(committed || taken.contains(&(dev, s)))
                            }
                        };
                        if new {
                            taken.insert((dev, s));
                        }
                        new
                    }
                };
                if new {
                    frame.push(pos, r);
                }
                flags.push(new);
            }
        }
        for (dev, s, committed) in learned {
            if let Some(w) = self.max_seq.get_mut(dev) {
                w.learn(s, committed);
            }
        }
        if frame.count() > 0 {
            // The durability point: nothing below runs unless the frame is on disk.
            self.segment.append(frame.finish())?;
            let mut st = self.shared.write().expect("journal lock");
            frame.apply(&mut st.active, |pos| readings[pos]);
            self.metrics.store_journal_readings.set(st.held() as i64);
            drop(st);
            for (dev, s) in taken {
                match self.max_seq.get_mut(dev) {
                    Some(w) => w.commit(s),
                    None => {
                        self.max_seq.insert(dev.to_owned(), SeqWindow::first(s));
                    }
                }
            }
            if self.active_since.is_none() {
                self.active_since = Some(Instant::now());
            }
        }
        // The batch is durable: a failure to start the next segment must not turn it into an
        // error (the readings would be refused yet stored). It is retried at the next commit
        // or `maintain`, which reports it.
        if let Err(e) = self.maybe_seal() {
            // Retried at every commit while it lasts.
            static SEAL: crate::telemetry::log_limit::LogLimit =
                crate::telemetry::log_limit::LogLimit::new();
            if let Some(suppressed) = SEAL.event() {
                tracing::warn!(error = %e, suppressed, "cannot seal the journal generation; will retry");
            }
        }
        Ok(flags)
    }

    fn probe(&mut self) -> Result<(), StoreError> {
        self.compactor.check()?;
        let first_idx = self.shared.read().expect("journal lock").active.readings;
        // An empty frame: a real append and sync, which replay skips.
        self.segment
            .append(FrameBuilder::new(now_ms(), first_idx).finish())
    }

    fn maintain(&mut self) -> Result<(), StoreError> {
        self.compactor.check()?;
        self.maybe_seal()
    }

    fn reader(&self) -> Arc<dyn StoreRead> {
        self.reader.clone()
    }
}
