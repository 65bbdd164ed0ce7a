//! The SQLite file's schema, its versions, and the upgrade of older files in place at start.
//!
//! Version 4 (this build), in `PRAGMA user_version`, is version 3 plus the access tokens
//! (`tokens.rs`, SPEC §11): `tokens(id, hash, name, scope, devices, created_ms, last_used_ms,
//! revoked_ms)`, holding the SHA-256 of each secret, never the secret.
//!
//! Version 3, in `PRAGMA user_version`, is version 2 plus the rollups
//! (`rollups.rs`): `rollups(device, level, bucket, data)`, `metric_names(id, name)` and
//! `rollup_levels(level)`. A version 2 file gets the tables at start, and its rollups are built
//! from its chunks (`rollups::reconcile`).
//!
//! Version 2, in `PRAGMA user_version`:
//! - `devices(id, name, max_seq, last_seen, last_ts, latest)`: interned device ids, plus what
//!   start-up needs without reading any reading: the highest compacted `seq` (as
//!   [`seq_key`]) and the device state (true `last_seen`, newest `ts`, latest value of every
//!   metric, encoded by [`encode_latest`]).
//! - `chunks(id, device, gen, t_min, t_max, seq_min, seq_max, n, data)`: compacted readings,
//!   one device per chunk, time-ordered, column-encoded and compressed (`chunk.rs`). The time
//!   and seq ranges let queries and duplicate lookups skip chunks; `gen` is the journal
//!   generation the chunk came from (0 for readings upgraded from version 1).
//! - `meta(key, value)`: `compacted_gen`, the newest journal generation whose chunks are
//!   committed. Segments up to it are deleted at start, never replayed.
//!
//! Version 1 (the first release) kept every reading as a row of `readings`, clustered by
//! `(device, ts, id)`, with a unique `(device, seq)` index. [`migrate`] turns those rows into
//! chunks in one transaction and drops the table.

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::chunk;
use super::journal::{put_str8, put_value, Dec};
use crate::reading::MetricValue;
use crate::store::{merge_latest, seq_key, StoreError, StoredRow};

/// The schema version this build writes.
pub const VERSION: i64 = 4;

/// Most rows in one chunk: bounds what one query or duplicate lookup decodes.
pub const CHUNK_ROWS: usize = 8192;

const V2: &str = "
CREATE TABLE IF NOT EXISTS devices (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id      INTEGER PRIMARY KEY,
    device  INTEGER NOT NULL,
    gen     INTEGER NOT NULL,
    t_min   INTEGER NOT NULL,
    t_max   INTEGER NOT NULL,
    seq_min INTEGER,
    seq_max INTEGER,
    n       INTEGER NOT NULL,
    data    BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_device_time ON chunks (device, t_max);
CREATE INDEX IF NOT EXISTS chunks_time ON chunks (t_max);
CREATE INDEX IF NOT EXISTS chunks_device_seq ON chunks (device, seq_max);
";

/// What version 3 adds: the rollups (see `rollups.rs`).
const V3: &str = super::rollups::SCHEMA;

/// What version 4 adds: the access tokens (see `tokens.rs`).
const V4: &str = super::tokens::SCHEMA;

/// Columns version 2 adds to version 1's `devices`.
const DEVICE_COLUMNS: [&str; 4] = [
    "max_seq INTEGER",
    "last_seen INTEGER",
    "last_ts INTEGER",
    "latest BLOB",
];

/// Brings the file to [`VERSION`], whatever version it has (an empty file is version 0).
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > VERSION {
        return Err(StoreError::TooNew {
            found: version,
            supported: VERSION,
        });
    }
    if version == VERSION {
        // Every statement of V2, V3 and V4 is idempotent: a file made by an earlier build of
        // this version gets any index added since.
        conn.execute_batch(V2)?;
        conn.execute_batch(V3)?;
        conn.execute_batch(V4)?;
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(V2)?;
    tx.execute_batch(V3)?;
    tx.execute_batch(V4)?;
    let has_column = |tx: &Transaction<'_>, col: &str| -> Result<bool, StoreError> {
        Ok(tx
            .prepare("SELECT 1 FROM pragma_table_info('devices') WHERE name = ?1")?
            .query_row(params![col], |_| Ok(()))
            .optional()?
            .is_some())
    };
    for col in DEVICE_COLUMNS {
        let name = col.split(' ').next().unwrap_or(col);
        if !has_column(&tx, name)? {
            tx.execute_batch(&format!("ALTER TABLE devices ADD COLUMN {col}"))?;
        }
    }
    let legacy: bool = tx
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'readings'",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    let mut first_free_gen = 0i64;
    if legacy {
        first_free_gen = upgrade_v1_readings(&tx)?;
    }
    tx.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('compacted_gen', ?1)",
        params![first_free_gen],
    )?;
    tx.execute_batch(&format!("PRAGMA user_version = {VERSION}"))?;
    tx.commit()?;
    Ok(())
}

/// Moves version 1's `readings` rows into chunks, device by device, and drops the table.
/// Returns the generation after which journal reading ids cannot collide with the old ids.
fn upgrade_v1_readings(tx: &Transaction<'_>) -> Result<i64, StoreError> {
    let started = std::time::Instant::now();
    let devices: Vec<(i64, String)> = tx
        .prepare("SELECT id, name FROM devices ORDER BY id")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut max_id = 0i64;
    let mut moved = 0u64;
    let mut select = tx.prepare(
        "SELECT ts, id, seq, metrics, tags FROM readings WHERE device = ?1 ORDER BY ts, id",
    )?;
    for (device, name) in &devices {
        let mut rows = Vec::new();
        let mut q = select.query(params![device])?;
        while let Some(r) = q.next()? {
            let id: i64 = r.get(1)?;
            max_id = max_id.max(id);
            let metrics: String = r.get(3)?;
            let tags: Option<String> = r.get(4)?;
            rows.push(StoredRow {
                rid: id as u64,
                ts_ms: r.get(0)?,
                // Version 1 stored a u64 seq as its i64 bit pattern.
                seq: r.get::<_, Option<i64>>(2)?.map(|s| s as u64),
                metrics: crate::store::metrics_from_json(&metrics)
                    .map_err(|e| StoreError::Corrupt(format!("device {name}: metrics: {e}")))?,
                tags: match tags {
                    None => Vec::new(),
                    Some(t) => crate::store::tags_from_json(&t)
                        .map_err(|e| StoreError::Corrupt(format!("device {name}: tags: {e}")))?,
                },
            });
        }
        if rows.is_empty() {
            continue;
        }
        moved += rows.len() as u64;
        insert_chunks(tx, *device, 0, &rows)?;
        let mut state = DeviceRow::default();
        for r in &rows {
            state.absorb(r, r.ts_ms);
        }
        state.write(tx, *device)?;
    }
    drop(select);
    tx.execute_batch(
        "DROP INDEX IF EXISTS readings_device_seq; DROP TABLE readings; DELETE FROM meta WHERE key = 'next_id';",
    )?;
    tracing::info!(
        readings = moved,
        devices = devices.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "upgraded the database from schema version 1: readings moved into chunks"
    );
    Ok(max_id >> 32)
}

/// Writes `rows` (one device's, sorted by `(ts, rid)`) as chunks of at most [`CHUNK_ROWS`].
/// Returns how many chunks.
pub fn insert_chunks(
    tx: &Transaction<'_>,
    device: i64,
    gen: u64,
    rows: &[StoredRow],
) -> Result<usize, StoreError> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO chunks (device, gen, t_min, t_max, seq_min, seq_max, n, data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    let mut chunks = 0;
    for part in rows.chunks(CHUNK_ROWS) {
        let t_min = part.iter().map(|r| r.ts_ms).min().unwrap_or(0);
        let t_max = part.iter().map(|r| r.ts_ms).max().unwrap_or(0);
        let seqs = part.iter().filter_map(|r| r.seq.map(seq_key));
        let (seq_min, seq_max) =
            seqs.fold((None, None), |(lo, hi): (Option<i64>, Option<i64>), s| {
                (
                    Some(lo.map_or(s, |l| l.min(s))),
                    Some(hi.map_or(s, |h| h.max(s))),
                )
            });
        let data = chunk::encode(part);
        insert.execute(params![
            device,
            gen as i64,
            t_min,
            t_max,
            seq_min,
            seq_max,
            part.len() as i64,
            data
        ])?;
        chunks += 1;
    }
    Ok(chunks)
}

/// A device's row as start-up and compaction see it.
#[derive(Debug, Default, Clone)]
pub struct DeviceRow {
    /// Highest compacted seq.
    pub max_seq: Option<u64>,
    /// Commit time of its newest reading (epoch ms).
    pub last_seen_ms: i64,
    /// Newest `ts`.
    pub last_ts_ms: Option<i64>,
    /// Latest value and its `ts`, per metric, in first-seen order.
    pub latest: Vec<(String, MetricValue, i64)>,
}

impl DeviceRow {
    /// Device `name`'s id and row, creating the device if it is new (one lookup by name).
    pub fn load_or_create(tx: &Connection, name: &str) -> Result<(i64, Self), StoreError> {
        let row = tx
            .prepare_cached(
                "SELECT id, max_seq, last_seen, last_ts, latest FROM devices WHERE name = ?1",
            )?
            .query_row(params![name], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<Vec<u8>>>(4)?,
                ))
            })
            .optional()?;
        let Some((id, max_seq, last_seen, last_ts, latest)) = row else {
            tx.prepare_cached("INSERT INTO devices (name) VALUES (?1)")?
                .execute(params![name])?;
            return Ok((tx.last_insert_rowid(), Self::default()));
        };
        Ok((
            id,
            Self {
                max_seq: max_seq.map(crate::store::seq_from_key),
                last_seen_ms: last_seen.unwrap_or(0),
                last_ts_ms: last_ts,
                latest: match latest {
                    Some(b) => decode_latest(&b)?,
                    None => Vec::new(),
                },
            },
        ))
    }

    /// Folds in one reading committed at `commit_ms`.
    pub fn absorb(&mut self, r: &StoredRow, commit_ms: i64) {
        if let Some(s) = r.seq {
            self.max_seq = Some(self.max_seq.map_or(s, |m| m.max(s)));
        }
        self.last_seen_ms = self.last_seen_ms.max(commit_ms);
        self.last_ts_ms = Some(self.last_ts_ms.map_or(r.ts_ms, |t| t.max(r.ts_ms)));
        merge_latest(&mut self.latest, r.ts_ms, &r.metrics);
    }

    /// Writes it back to device `id`.
    pub fn write(&self, tx: &Connection, id: i64) -> Result<(), StoreError> {
        tx.prepare_cached(
            "UPDATE devices SET max_seq = ?2, last_seen = ?3, last_ts = ?4, latest = ?5 WHERE id = ?1",
        )?
        .execute(params![
            id,
            self.max_seq.map(seq_key),
            self.last_seen_ms,
            self.last_ts_ms,
            encode_latest(&self.latest)
        ])?;
        Ok(())
    }
}

/// `u16 n | (name str8, value, ts i64) × n`.
pub fn encode_latest(latest: &[(String, MetricValue, i64)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(latest.len() * 24 + 2);
    b.extend_from_slice(&(latest.len().min(u16::MAX as usize) as u16).to_le_bytes());
    for (name, value, ts) in latest.iter().take(u16::MAX as usize) {
        put_str8(&mut b, name);
        put_value(&mut b, *value);
        b.extend_from_slice(&ts.to_le_bytes());
    }
    b
}

/// The inverse of [`encode_latest`].
pub fn decode_latest(b: &[u8]) -> Result<Vec<(String, MetricValue, i64)>, StoreError> {
    let mut d = Dec::new(b);
    let n = d.u16()? as usize;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let name = d.str8()?.to_owned();
        let value = d.value()?;
        out.push((name, value, d.i64()?));
    }
    Ok(out)
}

/// Decodes a chunk blob, naming the chunk in the error.
pub fn decode_chunk(id: i64, data: &[u8]) -> Result<Vec<StoredRow>, StoreError> {
    chunk::decode(data).map_err(|e| StoreError::Corrupt(format!("chunk {id}: {e}")))
}
