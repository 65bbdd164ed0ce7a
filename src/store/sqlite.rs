//! The embedded store: SQLite in WAL mode. The last step of the flow before the ack.
//!
//! [`SqliteStore`] is the single writer. It is owned by the store writer task and only ever
//! used on a blocking thread. [`StoreReader`] serves queries from its own connections, which WAL
//! lets run alongside the writer.
//!
//! Schema (see ARCHITECTURE.md for why):
//! - `devices(id, name)` interns device ids, so the big indexes hold integers.
//! - `readings` is a `WITHOUT ROWID` table clustered on `(device, ts, id)`: a device's readings
//!   in a time range are one contiguous range scan. `id` is a store-wide counter that keeps
//!   readings with equal timestamps apart.
//! - A partial unique index on `(device, seq)` detects duplicates: `INSERT OR IGNORE` that
//!   changes nothing *is* a duplicate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::config::StorageSettings;
use crate::reading::{format_ts, PairsAsMap, Reading};

/// A store operation that failed. The pipeline answers 503 and never acks on any of these.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory or database could not be created or opened.
    #[error("cannot open {path}: {reason}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// SQLite refused a statement.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS readings (
    device  INTEGER NOT NULL,
    ts      INTEGER NOT NULL,
    id      INTEGER NOT NULL,
    seq     INTEGER,
    metrics TEXT NOT NULL,
    tags    TEXT,
    PRIMARY KEY (device, ts, id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS readings_device_seq ON readings (device, seq) WHERE seq IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('next_id', 1);
";

const INSERT_READING: &str = "INSERT OR IGNORE INTO readings (device, ts, id, seq, metrics, tags) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// The latest reading of a device as found in the store at start-up.
#[derive(Debug)]
pub struct StoredLatest {
    /// Device id.
    pub device_id: String,
    /// Its newest `ts`.
    pub ts_ms: i64,
    /// The metrics JSON of that reading.
    pub metrics_json: String,
}

/// The single writer.
pub struct SqliteStore {
    /// The write connection.
    conn: Connection,
    /// Device name → interned id, for devices known to be committed.
    devices: HashMap<String, i64>,
    /// Next value of the `id` tiebreaker column.
    next_id: i64,
    /// Copies the WAL into the database in the background; stopped when the store is dropped.
    _checkpointer: Checkpointer,
}

/// WAL pages after which the writer checkpoints by itself (64 MiB at 4 KiB pages). Under a
/// steady load the background checkpointer cannot finish between two commits, so the WAL only
/// restarts after a writer checkpoint; by then the background one has copied most pages, so the
/// writer's is short. This bounds the WAL file.
const WRITER_AUTOCHECKPOINT_PAGES: u32 = 16_384;
/// How often the background checkpointer runs.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// A thread with its own connection that runs `PRAGMA wal_checkpoint(PASSIVE)` periodically.
///
/// SQLite's default is for the committing connection to checkpoint every 1000 WAL pages, which
/// puts a copy of the pages into the database file, and its fsync, inside an ingest commit: the
/// cause of long commit-latency spikes. A passive checkpoint on another connection never blocks
/// the writer, and once it has caught up the writer restarts the WAL from its beginning.
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
            .spawn(move || loop {
                match stopped.recv_timeout(CHECKPOINT_INTERVAL) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "background checkpoint failed");
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

fn open_connection(path: &Path, settings: &StorageSettings) -> Result<Connection, StoreError> {
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

impl SqliteStore {
    /// Opens (creating if needed) the database in `settings.data_dir`.
    pub fn open(settings: &StorageSettings) -> Result<Self, StoreError> {
        let path = settings.db_path();
        let conn = open_connection(&path, settings)?;
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)?;
        let checkpointer = Checkpointer::spawn(&path, settings)?;
        let next_id: i64 =
            conn.query_row("SELECT value FROM meta WHERE key = 'next_id'", [], |r| {
                r.get(0)
            })?;
        let mut devices = HashMap::new();
        {
            let mut stmt = conn.prepare("SELECT name, id FROM devices")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (name, id) = row?;
                devices.insert(name, id);
            }
        }
        Ok(Self {
            conn,
            devices,
            next_id,
            _checkpointer: checkpointer,
        })
    }

    /// Commits readings in one transaction. Returns, per reading and in order, `true` if it was
    /// stored and `false` if it duplicated a stored `(device_id, seq)` (including an earlier
    /// reading of this same call). On error nothing is committed.
    pub fn commit<'a>(
        &mut self,
        readings: impl Iterator<Item = &'a Reading>,
    ) -> Result<Vec<bool>, StoreError> {
        let tx = self.conn.transaction()?;
        let mut new_devices: Vec<(String, i64)> = Vec::new();
        let mut inserted = Vec::new();
        let mut next_id = self.next_id;
        {
            let mut insert = tx.prepare_cached(INSERT_READING)?;
            let mut metrics_buf = Vec::with_capacity(256);
            let mut tags_buf = Vec::new();
            for r in readings {
                let name = r.device_id.as_str();
                let device = match self.devices.get(name) {
                    Some(&id) => id,
                    None => match new_devices.iter().find(|(n, _)| n == name) {
                        Some(&(_, id)) => id,
                        None => {
                            let id = intern_device(&tx, name)?;
                            new_devices.push((name.to_owned(), id));
                            id
                        }
                    },
                };
                metrics_buf.clear();
                serde_json::to_writer(&mut metrics_buf, &PairsAsMap(&r.metrics))
                    .expect("metrics serialise");
                let tags = if r.tags.is_empty() {
                    None
                } else {
                    tags_buf.clear();
                    serde_json::to_writer(&mut tags_buf, &PairsAsMap(&r.tags))
                        .expect("tags serialise");
                    Some(std::str::from_utf8(&tags_buf).expect("json is utf-8"))
                };
                let metrics = std::str::from_utf8(&metrics_buf).expect("json is utf-8");
                let changed = insert.execute(params![
                    device,
                    r.ts_ms,
                    next_id,
                    r.seq.map(|s| s as i64),
                    metrics,
                    tags
                ])?;
                next_id += 1;
                inserted.push(changed == 1);
            }
        }
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'next_id'",
            params![next_id],
        )?;
        tx.commit()?;
        self.next_id = next_id;
        self.devices.extend(new_devices);
        Ok(inserted)
    }

    /// A write that touches the disk, to learn whether the store has recovered.
    pub fn probe(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch(
            "BEGIN IMMEDIATE; UPDATE meta SET value = value WHERE key = 'next_id'; COMMIT;",
        )?;
        Ok(())
    }

    /// Deletes readings older than `cutoff_ms`, device by device (each delete is a range scan of
    /// the clustered key). Returns how many were deleted.
    pub fn sweep_retention(&mut self, cutoff_ms: i64) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let mut deleted = 0u64;
        {
            let mut stmt =
                tx.prepare_cached("DELETE FROM readings WHERE device = ?1 AND ts < ?2")?;
            for &id in self.devices.values() {
                deleted += stmt.execute(params![id, cutoff_ms])? as u64;
            }
        }
        tx.commit()?;
        Ok(deleted)
    }

    /// The newest reading of every device, for the device-state service at start-up.
    pub fn latest_per_device(&self) -> Result<Vec<StoredLatest>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT d.name, r.ts, r.metrics FROM devices d
             JOIN readings r ON r.device = d.id
             AND r.ts = (SELECT max(ts) FROM readings WHERE device = d.id)",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(StoredLatest {
                device_id: r.get(0)?,
                ts_ms: r.get(1)?,
                metrics_json: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn intern_device(tx: &rusqlite::Transaction<'_>, name: &str) -> Result<i64, StoreError> {
    let existing: Option<i64> = tx
        .prepare_cached("SELECT id FROM devices WHERE name = ?1")?
        .query_row(params![name], |r| r.get(0))
        .optional()?;
    if let Some(id) = existing {
        return Ok(id);
    }
    tx.prepare_cached("INSERT INTO devices (name) VALUES (?1)")?
        .execute(params![name])?;
    Ok(tx.last_insert_rowid())
}

/// Sort order of a readings query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Oldest first.
    Asc,
    /// Newest first.
    Desc,
}

/// `GET /v1/devices/{id}/readings` parameters, already validated.
#[derive(Debug, Clone)]
pub struct ReadingsQuery {
    /// Which device.
    pub device_id: String,
    /// Inclusive lower bound on `ts`.
    pub from_ms: i64,
    /// Exclusive upper bound on `ts`.
    pub to_ms: i64,
    /// Only readings that carry this metric, narrowed to it.
    pub metric: Option<String>,
    /// At most this many readings.
    pub limit: usize,
    /// Sort order by `ts`.
    pub order: Order,
}

/// One stored reading as the query API returns it.
#[derive(Debug, Serialize)]
pub struct StoredReading {
    /// RFC 3339, millisecond precision, UTC.
    pub ts: String,
    /// The device's sequence number, if it gave one.
    pub seq: Option<u64>,
    /// Metric values as stored.
    pub metrics: Box<RawValue>,
    /// Tags (an empty object when there were none).
    pub tags: Box<RawValue>,
}

/// Read-only access for queries, with a small pool of connections.
pub struct StoreReader {
    /// The database file.
    path: PathBuf,
    /// Settings used to open connections.
    settings: StorageSettings,
    /// Idle connections, reused across queries.
    pool: Mutex<Vec<Connection>>,
}

impl StoreReader {
    /// A reader for the database in `settings.data_dir`. Connections open lazily.
    pub fn new(settings: &StorageSettings) -> Self {
        Self {
            path: settings.db_path(),
            settings: settings.clone(),
            pool: Mutex::new(Vec::new()),
        }
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.pool.lock().expect("pool lock").pop();
        let conn = match conn {
            Some(c) => c,
            None => open_connection(&self.path, &self.settings)?,
        };
        let result = f(&conn);
        if result.is_ok() {
            let mut pool = self.pool.lock().expect("pool lock");
            if pool.len() < 4 {
                pool.push(conn);
            }
        }
        result
    }

    /// Runs a readings query. `Ok(None)` when the device has never been stored.
    pub fn readings(&self, q: &ReadingsQuery) -> Result<Option<Vec<StoredReading>>, StoreError> {
        self.with_conn(|conn| {
            let device: Option<i64> = conn
                .prepare_cached("SELECT id FROM devices WHERE name = ?1")?
                .query_row(params![q.device_id], |r| r.get(0))
                .optional()?;
            let Some(device) = device else {
                return Ok(None);
            };
            let dir = match q.order {
                Order::Asc => "ASC",
                Order::Desc => "DESC",
            };
            let map_row = |r: &rusqlite::Row<'_>| -> rusqlite::Result<StoredReading> {
                let metrics: String = r.get(2)?;
                let tags: Option<String> = r.get(3)?;
                Ok(StoredReading {
                    ts: format_ts(r.get(0)?),
                    seq: r.get::<_, Option<i64>>(1)?.map(|s| s as u64),
                    metrics: RawValue::from_string(metrics)
                        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?,
                    tags: RawValue::from_string(tags.unwrap_or_else(|| "{}".into()))
                        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?,
                })
            };
            let rows = match &q.metric {
                None => {
                    let sql = format!(
                        "SELECT ts, seq, metrics, tags FROM readings
                         WHERE device = ?1 AND ts >= ?2 AND ts < ?3
                         ORDER BY ts {dir}, id {dir} LIMIT ?4"
                    );
                    let mut stmt = conn.prepare_cached(&sql)?;
                    let rows = stmt
                        .query_map(params![device, q.from_ms, q.to_ms, q.limit as i64], map_row)?;
                    rows.collect::<Result<Vec<_>, _>>()?
                }
                Some(metric) => {
                    let sql = format!(
                        "SELECT ts, seq, json_object(?5, json(metrics -> ?6)), tags FROM readings
                         WHERE device = ?1 AND ts >= ?2 AND ts < ?3 AND (metrics -> ?6) IS NOT NULL
                         ORDER BY ts {dir}, id {dir} LIMIT ?4"
                    );
                    let path = format!("$.\"{metric}\"");
                    let mut stmt = conn.prepare_cached(&sql)?;
                    let rows = stmt.query_map(
                        params![device, q.from_ms, q.to_ms, q.limit as i64, metric, path],
                        map_row,
                    )?;
                    rows.collect::<Result<Vec<_>, _>>()?
                }
            };
            Ok(Some(rows))
        })
    }
}
