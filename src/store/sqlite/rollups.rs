//! Rollups of the embedded store (SPEC §12): journal → compaction → **chunks + rollups**, and
//! the aggregation queries that read them.
//!
//! Rollups are derived during compaction, from the readings the generation moves into chunks,
//! in the same SQLite transaction as those chunks ([`Deriver::derive`]): rollups and chunks
//! commit together or not at all, so after a kill -9 they still agree, and a commit (the
//! journal append) writes nothing more. Duplicates never reach a chunk, so they never count.
//! A late reading whose bucket already has a row is merged into it ([`Agg::merge`]).
//!
//! A query ([`aggregate`]) reads, in one read transaction, `meta.compacted_gen` and the rollup
//! rows (or chunks, for a step no level divides); readings still in the journal, in
//! generations after `compacted_gen`, are aggregated from raw and merged in. So every reading
//! is counted once: either its generation was compacted in the snapshot (it is in the
//! rollups), or it was not (it is in the journal copy taken before the snapshot).
//!
//! Tables (schema version 3):
//! - `rollups(device, level, bucket, data)`, `WITHOUT ROWID`, keyed by device, level (ms) and
//!   bucket number (bucket start / level): one row per device, level and bucket, all metrics
//!   in `data` ([`encode`]). A device's rows of one level are contiguous, so compaction
//!   dirties about one page per device and level, and a query reads one range.
//! - `metric_names(id, name)`: metric names interned for `data`.
//! - `rollup_levels(level)`: the levels whose rows are complete. A level added to
//!   `rollups.levels` is built once ([`Deriver::reconcile`]: from a finer level that divides
//!   it, else from the chunks); until then queries compute its steps from raw. A level
//!   removed from the configuration is deleted.
//!
//! Retention ([`Deriver::retention`]) runs beside raw retention and deletes level buckets that
//! ended before `now − rollups.retention`.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::chunk::put_varint;
use super::schema::decode_chunk;
use crate::config::rollups::RollupSettings;
use crate::reading::MetricValue;
use crate::store::rollup::{
    bucket_start, plan, Agg, AggAnswer, AggQuery, AggSource, SeriesBuilder,
};
use crate::store::{StoreError, StoredRow};

/// The tables of schema version 3 (idempotent).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS metric_names (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS rollups (
    device INTEGER NOT NULL,
    level  INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    data   BLOB NOT NULL,
    PRIMARY KEY (device, level, bucket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollup_levels (
    level INTEGER PRIMARY KEY
);
CREATE INDEX IF NOT EXISTS chunks_device_tmin ON chunks (device, t_min);
";

/// One metric's aggregates of one bucket, by interned metric id.
type Aggs = Vec<(i64, Agg)>;

/// Derives and keeps the rollups; owned by the compaction thread (the only writer).
#[derive(Debug)]
pub struct Deriver {
    /// `rollups.levels` in ms, finest first.
    levels: Vec<i64>,
    /// `rollups.retention` in ms.
    retention_ms: i64,
    /// Metric name → id, as committed (plus `fresh`).
    names: foldhash::HashMap<String, i64>,
    /// Names inserted by the transaction in progress: forgotten if it does not commit.
    fresh: Vec<String>,
}

impl Deriver {
    /// A deriver for `settings` (names load at [`Deriver::reconcile`]).
    pub fn new(settings: &RollupSettings) -> Self {
        Self {
            levels: settings.level_ms(),
            retention_ms: settings.retention_ms(),
            names: Default::default(),
            fresh: Vec::new(),
        }
    }

    /// Starts a compaction transaction's work: names a failed one inserted are forgotten.
    pub fn begin(&mut self) {
        for n in self.fresh.drain(..) {
            self.names.remove(&n);
        }
    }

    /// The transaction committed: its new names are now the database's.
    pub fn committed(&mut self) {
        self.fresh.clear();
    }

    fn name_id(&mut self, tx: &Connection, name: &str) -> Result<i64, StoreError> {
        if let Some(id) = self.names.get(name) {
            return Ok(*id);
        }
        tx.prepare_cached("INSERT OR IGNORE INTO metric_names (name) VALUES (?1)")?
            .execute(params![name])?;
        let id: i64 = tx
            .prepare_cached("SELECT id FROM metric_names WHERE name = ?1")?
            .query_row(params![name], |r| r.get(0))?;
        self.names.insert(name.to_owned(), id);
        self.fresh.push(name.to_owned());
        Ok(id)
    }

    /// Brings the rollup tables to the configured levels, once, before the first compaction:
    /// deletes levels no longer configured, and builds each configured level that is not
    /// complete (from the coarsest complete level dividing it, else from every chunk). One
    /// transaction; on error nothing changed.
    pub fn reconcile(&mut self, conn: &mut Connection) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        self.begin();
        self.names = tx
            .prepare("SELECT name, id FROM metric_names")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let have: Vec<i64> = tx
            .prepare("SELECT level FROM rollup_levels ORDER BY level")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut complete = Vec::new();
        for level in have {
            if self.levels.contains(&level) {
                complete.push(level);
            } else {
                let n = tx.execute("DELETE FROM rollups WHERE level = ?1", params![level])?;
                tx.execute("DELETE FROM rollup_levels WHERE level = ?1", params![level])?;
                tracing::info!(
                    level_ms = level,
                    rows = n,
                    "rollup level no longer configured: deleted"
                );
            }
        }
        let mut built = Vec::new();
        for level in self.levels.clone() {
            if complete.contains(&level) {
                continue;
            }
            tx.execute("DELETE FROM rollups WHERE level = ?1", params![level])?;
            let source = complete.iter().copied().filter(|c| level % c == 0).max();
            let rows = match source {
                Some(finer) => self.build_from_level(&tx, level, finer)?,
                None => self.build_from_chunks(&tx, level)?,
            };
            tx.execute(
                "INSERT INTO rollup_levels (level) VALUES (?1)",
                params![level],
            )?;
            complete.push(level);
            built.push((level, source, rows));
        }
        tx.commit()?;
        self.committed();
        for (level, source, rows) in built {
            tracing::info!(
                level_ms = level,
                from_level_ms = source,
                rows,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "rollup level built"
            );
        }
        Ok(())
    }

    /// Builds `level` from the complete level `finer` (which divides it). Returns rows written.
    fn build_from_level(
        &mut self,
        tx: &Transaction<'_>,
        level: i64,
        finer: i64,
    ) -> Result<u64, StoreError> {
        let mut written = 0;
        let mut select = tx.prepare(
            "SELECT device, bucket, data FROM rollups WHERE level = ?1 ORDER BY device, bucket",
        )?;
        let mut q = select.query(params![finer])?;
        let mut current: Option<(i64, i64, Aggs)> = None; // device, bucket, aggs
        while let Some(r) = q.next()? {
            let (device, bucket): (i64, i64) = (r.get(0)?, r.get(1)?);
            let start = bucket.saturating_mul(finer);
            let aggs = decode(r.get_ref(2)?.as_blob().map_err(corrupt_row)?, start)?;
            let coarse = start.div_euclid(level);
            match &mut current {
                Some((d, b, acc)) if *d == device && *b == coarse => merge_aggs(acc, &aggs),
                _ => {
                    if let Some((d, b, acc)) = current.take() {
                        write(tx, d, level, b, &acc, false)?;
                        written += 1;
                    }
                    current = Some((device, coarse, aggs));
                }
            }
        }
        if let Some((d, b, acc)) = current.take() {
            write(tx, d, level, b, &acc, false)?;
            written += 1;
        }
        Ok(written)
    }

    /// Builds `level` from every chunk. A device's chunks are read by `t_min`, so a bucket
    /// that ends before the next chunk's `t_min` is final and written at once: memory holds
    /// only the buckets a chunk overlaps.
    fn build_from_chunks(&mut self, tx: &Transaction<'_>, level: i64) -> Result<u64, StoreError> {
        let devices: Vec<i64> = tx
            .prepare("SELECT id FROM devices ORDER BY id")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut written = 0;
        for device in devices {
            let mut open: BTreeMap<i64, Aggs> = BTreeMap::new();
            let mut select = tx.prepare_cached(
                "SELECT id, t_min, data FROM chunks WHERE device = ?1 ORDER BY t_min",
            )?;
            let mut chunks = select.query(params![device])?;
            while let Some(c) = chunks.next()? {
                let (id, t_min): (i64, i64) = (c.get(0)?, c.get(1)?);
                let first_open = t_min.div_euclid(level);
                while let Some(entry) = open.first_entry() {
                    if *entry.key() >= first_open {
                        break;
                    }
                    let (b, aggs) = entry.remove_entry();
                    write(tx, device, level, b, &aggs, false)?;
                    written += 1;
                }
                let data = c.get_ref(2)?.as_blob().map_err(corrupt_row)?;
                for row in decode_chunk(id, data)? {
                    let b = row.ts_ms.div_euclid(level);
                    for (name, value) in &row.metrics {
                        let mid = self.name_id(tx, name)?;
                        add_value(open.entry(b).or_default(), mid, *value, row.ts_ms, row.rid);
                    }
                }
            }
            for (b, aggs) in open {
                write(tx, device, level, b, &aggs, false)?;
                written += 1;
            }
        }
        Ok(written)
    }

    /// Folds one device's readings of a generation (sorted by `(ts, rid)`) into its rollup
    /// rows of every level, merging with the rows already there. Runs inside the compaction
    /// transaction. Returns the rows written.
    pub fn derive(
        &mut self,
        tx: &Transaction<'_>,
        device: i64,
        rows: &[StoredRow],
    ) -> Result<u64, StoreError> {
        let Some(&finest) = self.levels.first() else {
            return Ok(0);
        };
        // The finest level from the readings; rows are in time order, so buckets are runs.
        let mut level: Vec<(i64, Aggs)> = Vec::new();
        // A device's readings mostly carry the same metrics in the same order: the previous
        // row's names and ids, by position, spare a hash lookup per value.
        let mut previous: Vec<(&str, i64)> = Vec::new();
        let mut ids: Vec<i64> = Vec::new();
        for row in rows {
            let b = row.ts_ms.div_euclid(finest);
            if level.last().is_none_or(|(lb, _)| *lb != b) {
                level.push((b, Vec::new()));
            }
            ids.clear();
            for (k, (name, _)) in row.metrics.iter().enumerate() {
                let id = match previous.get(k) {
                    Some(&(n, id)) if n == name.as_str() => id,
                    _ => {
                        let id = self.name_id(tx, name)?;
                        previous.truncate(k);
                        previous.push((name.as_str(), id));
                        id
                    }
                };
                ids.push(id);
            }
            if let Some((_, aggs)) = level.last_mut() {
                for ((_, value), &mid) in row.metrics.iter().zip(&ids) {
                    add_value(aggs, mid, *value, row.ts_ms, row.rid);
                }
            }
        }
        let mut written = 0;
        let mut width = finest;
        for (i, &l) in self.levels.iter().enumerate() {
            if i > 0 {
                // Each level is a multiple of the one before: merge its buckets.
                let mut coarser: Vec<(i64, Aggs)> = Vec::new();
                for (b, aggs) in &level {
                    let cb = b.saturating_mul(width).div_euclid(l);
                    match coarser.last_mut() {
                        Some((lb, acc)) if *lb == cb => merge_aggs(acc, aggs),
                        _ => coarser.push((cb, aggs.clone())),
                    }
                }
                level = coarser;
                width = l;
            }
            for (b, aggs) in &level {
                write(tx, device, l, *b, aggs, true)?;
                written += 1;
            }
        }
        Ok(written)
    }

    /// Deletes level buckets that ended before `now_ms − rollups.retention`. Returns rows.
    pub fn retention(&self, tx: &Transaction<'_>, now_ms: i64) -> Result<u64, StoreError> {
        if self.levels.is_empty() {
            return Ok(0);
        }
        let cutoff = now_ms.saturating_sub(self.retention_ms);
        let devices: Vec<i64> = tx
            .prepare_cached("SELECT id FROM devices")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut delete = tx.prepare_cached(
            "DELETE FROM rollups WHERE device = ?1 AND level = ?2 AND bucket < ?3",
        )?;
        let mut deleted = 0;
        for device in devices {
            for &l in &self.levels {
                // Bucket b ends at (b + 1) × l: gone when that is at or before the cutoff.
                deleted += delete.execute(params![device, l, cutoff.div_euclid(l)])? as u64;
            }
        }
        Ok(deleted)
    }
}

/// Adds one value of metric `mid` to a bucket's aggregates.
fn add_value(aggs: &mut Aggs, mid: i64, value: MetricValue, ts_ms: i64, rid: u64) {
    match aggs.iter_mut().find(|(m, _)| *m == mid) {
        Some((_, a)) => a.add(value, ts_ms, rid),
        None => aggs.push((mid, Agg::of(value, ts_ms, rid))),
    }
}

/// Merges `more` (of disjoint readings) into `acc`, metric by metric.
fn merge_aggs(acc: &mut Aggs, more: &Aggs) {
    for (mid, a) in more {
        match acc.iter_mut().find(|(m, _)| m == mid) {
            Some((_, b)) => b.merge(a),
            None => acc.push((*mid, *a)),
        }
    }
}

fn corrupt_row(e: rusqlite::types::FromSqlError) -> StoreError {
    StoreError::Corrupt(format!("rollup row: {e}"))
}

/// Writes one rollup row, merged with the stored row when `merge` (the stored readings are
/// older generations: their rid, not stored, reads as 0, which keeps ties of `ts` in order).
fn write(
    tx: &Connection,
    device: i64,
    level: i64,
    bucket: i64,
    aggs: &Aggs,
    merge: bool,
) -> Result<(), StoreError> {
    let start = bucket.saturating_mul(level);
    let data = if merge {
        let stored: Option<Vec<u8>> = tx
            .prepare_cached(
                "SELECT data FROM rollups WHERE device = ?1 AND level = ?2 AND bucket = ?3",
            )?
            .query_row(params![device, level, bucket], |r| r.get(0))
            .optional()?;
        match stored {
            Some(b) => {
                let mut old = decode(&b, start)?;
                merge_aggs(&mut old, aggs);
                encode(&old, start)
            }
            None => encode(aggs, start),
        }
    } else {
        encode(aggs, start)
    };
    tx.prepare_cached(
        "INSERT OR REPLACE INTO rollups (device, level, bucket, data) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![device, level, bucket, data])?;
    Ok(())
}

/// A bucket's aggregates as stored: `varint n`, then per metric `varint id, varint count,
/// f64 sum (LE), value min, value max, varint first ts − start, value first, varint last ts −
/// start, value last`; a value is a kind byte (0 int, 1 uint, 2 float, 3 false, 4 true) and
/// its payload (zigzag varint, varint, 8 bytes LE, nothing). Rids are not kept (see [`write`]).
pub fn encode(aggs: &Aggs, start_ms: i64) -> Vec<u8> {
    let mut b = Vec::with_capacity(aggs.len() * 32 + 1);
    put_varint(&mut b, aggs.len() as u64);
    for (mid, a) in aggs {
        put_varint(&mut b, *mid as u64);
        put_varint(&mut b, a.count);
        b.extend_from_slice(&a.sum.to_le_bytes());
        put_value(&mut b, a.min);
        put_value(&mut b, a.max);
        put_varint(&mut b, a.first.0.wrapping_sub(start_ms) as u64);
        put_value(&mut b, a.first.2);
        put_varint(&mut b, a.last.0.wrapping_sub(start_ms) as u64);
        put_value(&mut b, a.last.2);
    }
    b
}

/// The inverse of [`encode`]; every read is bounds-checked.
pub fn decode(data: &[u8], start_ms: i64) -> Result<Aggs, StoreError> {
    let mut out = Vec::new();
    decode_into(data, start_ms, &mut out)?;
    Ok(out)
}

/// [`decode`] into `out` (cleared first), so that a scan over many rows reuses one buffer.
fn decode_into(data: &[u8], start_ms: i64, out: &mut Aggs) -> Result<(), StoreError> {
    out.clear();
    let mut d = Reader {
        b: data,
        pos: 0,
        why: "truncated",
    };
    // The reader's steps return `Option` (small, in registers); the error is built once here.
    match decode_rows(&mut d, start_ms, out) {
        Some(()) => Ok(()),
        None => Err(d.err()),
    }
}

fn decode_rows(d: &mut Reader<'_>, start_ms: i64, out: &mut Aggs) -> Option<()> {
    let n = d.varint()? as usize;
    if n > d.b.len() {
        d.why = "metric count beyond the row";
        return None;
    }
    out.reserve(n);
    for _ in 0..n {
        let mid = d.varint()? as i64;
        let count = d.varint()?;
        let sum = f64::from_le_bytes(d.take8()?);
        let min = d.value()?;
        let max = d.value()?;
        let first_ts = start_ms.wrapping_add(d.varint()? as i64);
        let first = d.value()?;
        let last_ts = start_ms.wrapping_add(d.varint()? as i64);
        let last = d.value()?;
        out.push((
            mid,
            Agg {
                count,
                sum,
                min,
                max,
                first: (first_ts, 0, first),
                last: (last_ts, 0, last),
            },
        ));
    }
    Some(())
}

fn put_value(out: &mut Vec<u8>, v: MetricValue) {
    match v {
        MetricValue::Int(i) => {
            out.push(0);
            put_varint(out, ((i << 1) ^ (i >> 63)) as u64);
        }
        MetricValue::UInt(u) => {
            out.push(1);
            put_varint(out, u);
        }
        MetricValue::Float(f) => {
            out.push(2);
            out.extend_from_slice(&f.to_le_bytes());
        }
        MetricValue::Bool(b) => out.push(3 + u8::from(b)),
    }
}

/// A bounds-checked reader of [`encode`]'s bytes. A step that fails returns `None` and leaves
/// `why` and `pos` for [`Reader::err`].
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    why: &'static str,
}

impl Reader<'_> {
    fn err(&self) -> StoreError {
        StoreError::Corrupt(format!("rollup row at byte {}: {}", self.pos, self.why))
    }

    #[inline]
    fn u8(&mut self) -> Option<u8> {
        let v = *self.b.get(self.pos)?;
        self.pos += 1;
        Some(v)
    }

    #[inline]
    fn take8(&mut self) -> Option<[u8; 8]> {
        let a: [u8; 8] = self.b.get(self.pos..self.pos + 8)?.try_into().ok()?;
        self.pos += 8;
        Some(a)
    }

    #[inline(always)]
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        let mut shift = 0u32;
        loop {
            let b = self.u8()?;
            if shift == 63 && b > 1 {
                self.why = "varint overflows 64 bits";
                return None;
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
            shift += 7;
        }
    }

    #[inline(always)]
    fn value(&mut self) -> Option<MetricValue> {
        Some(match self.u8()? {
            0 => {
                let z = self.varint()?;
                MetricValue::Int(((z >> 1) as i64) ^ -((z & 1) as i64))
            }
            1 => MetricValue::UInt(self.varint()?),
            2 => MetricValue::Float(f64::from_le_bytes(self.take8()?)),
            3 => MetricValue::Bool(false),
            4 => MetricValue::Bool(true),
            _ => {
                self.why = "unknown value kind";
                return None;
            }
        })
    }
}

/// Answers `q` on `conn` (a reader's connection) with `journal`, the device's rows in the
/// in-memory generations, copied before this call; `known`: whether the journal knows the
/// device. See the module documentation for why no reading counts twice.
pub fn aggregate(
    conn: &Connection,
    q: &AggQuery,
    journal: Vec<StoredRow>,
    known: bool,
    settings: &RollupSettings,
    now_ms: i64,
) -> Result<Option<AggAnswer>, StoreError> {
    // One read transaction: the snapshot of compacted_gen, chunks and rollups.
    let tx = conn.unchecked_transaction()?;
    let compacted: i64 = tx
        .prepare_cached("SELECT value FROM meta WHERE key = 'compacted_gen'")?
        .query_row([], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let journal: Vec<StoredRow> = journal
        .into_iter()
        .filter(|r| (r.rid >> 32) as i64 > compacted)
        .collect();
    let device: Option<i64> = tx
        .prepare_cached("SELECT id FROM devices WHERE name = ?1")?
        .query_row(params![q.device_id], |r| r.get(0))
        .optional()?;
    if device.is_none() && !known {
        return Ok(None);
    }
    let configured = settings.level_ms();
    let complete: Vec<i64> = tx
        .prepare_cached("SELECT level FROM rollup_levels ORDER BY level")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<Vec<i64>, _>>()?
        .into_iter()
        .filter(|l| configured.contains(l))
        .collect();
    let extent = if q.from_ms.is_some() && q.to_ms.is_some() {
        None
    } else {
        extent(&tx, device, &journal, complete.first().copied())?
    };
    let plan = match plan(q, extent, &complete, settings.retention_ms(), now_ms) {
        Ok(p) => p,
        Err(answer) => return Ok(Some(answer)),
    };
    let mut series = SeriesBuilder::new(q.step_ms, q.metric.clone());
    for r in &journal {
        if r.ts_ms >= plan.from_ms && r.ts_ms < plan.to_ms {
            series.add_row(r.ts_ms, r.rid, &r.metrics);
        }
    }
    let Some(device) = device else {
        return Ok(Some(AggAnswer::Series(series.finish(AggSource::Raw))));
    };
    let raw_to = plan.level_from_ms.min(plan.to_ms);
    if plan.from_ms < raw_to {
        let mut stmt = tx.prepare_cached(
            "SELECT id, data FROM chunks WHERE device = ?1 AND t_max >= ?2 AND t_min < ?3",
        )?;
        let mut chunks = stmt.query(params![device, plan.from_ms, raw_to])?;
        while let Some(c) = chunks.next()? {
            let id: i64 = c.get(0)?;
            let data = c
                .get_ref(1)?
                .as_blob()
                .map_err(|e| StoreError::Corrupt(format!("chunk {id}: {e}")))?;
            for r in decode_chunk(id, data)? {
                if r.ts_ms >= plan.from_ms && r.ts_ms < raw_to {
                    series.add_row(r.ts_ms, r.rid, &r.metrics);
                }
            }
        }
    }
    let source = match plan.level_ms {
        Some(level) if plan.level_from_ms < plan.to_ms => {
            level_rows(&tx, device, level, &plan, &mut series)?;
            AggSource::Level(level)
        }
        _ => AggSource::Raw,
    };
    drop(tx);
    Ok(Some(AggAnswer::Series(series.finish(source))))
}

/// Merges the level's rows of `[plan.level_from_ms, plan.to_ms)` into `series`.
fn level_rows(
    tx: &Connection,
    device: i64,
    level: i64,
    plan: &crate::store::rollup::Plan,
    series: &mut SeriesBuilder,
) -> Result<(), StoreError> {
    let from = plan.level_from_ms.max(plan.from_ms);
    // Metric id → the series' name index, looked up once per id.
    let mut names: foldhash::HashMap<i64, Option<u32>> = Default::default();
    let mut lookup = tx.prepare_cached("SELECT name FROM metric_names WHERE id = ?1")?;
    let mut stmt = tx.prepare_cached(
        "SELECT bucket, data FROM rollups
         WHERE device = ?1 AND level = ?2 AND bucket >= ?3 AND bucket < ?4 ORDER BY bucket",
    )?;
    let mut rows = stmt.query(params![
        device,
        level,
        from.div_euclid(level),
        plan.to_ms.div_euclid(level)
    ])?;
    let mut aggs = Vec::new();
    while let Some(r) = rows.next()? {
        let bucket: i64 = r.get(0)?;
        let start = bucket.saturating_mul(level);
        decode_into(
            r.get_ref(1)?.as_blob().map_err(corrupt_row)?,
            start,
            &mut aggs,
        )?;
        for &(mid, ref agg) in &aggs {
            let ix = match names.get(&mid) {
                Some(ix) => *ix,
                None => {
                    let name: Option<String> =
                        lookup.query_row(params![mid], |r| r.get(0)).optional()?;
                    let ix = match name {
                        Some(n) if series.wants(&n) => Some(series.name_index(&n)),
                        _ => None,
                    };
                    names.insert(mid, ix);
                    ix
                }
            };
            if let Some(ix) = ix {
                series.add_agg(bucket_start(start, level), ix, agg);
            }
        }
    }
    Ok(())
}

/// The device's oldest and newest stored `ts`: chunks, the journal, and the finest level's
/// buckets (which may outlive raw readings).
fn extent(
    tx: &Connection,
    device: Option<i64>,
    journal: &[StoredRow],
    finest: Option<i64>,
) -> Result<Option<(i64, i64)>, StoreError> {
    let mut lo: Option<i64> = journal.iter().map(|r| r.ts_ms).min();
    let mut hi: Option<i64> = journal.iter().map(|r| r.ts_ms).max();
    let mut widen = |l: Option<i64>, h: Option<i64>| {
        if let Some(l) = l {
            lo = Some(lo.map_or(l, |x| x.min(l)));
        }
        if let Some(h) = h {
            hi = Some(hi.map_or(h, |x| x.max(h)));
        }
    };
    if let Some(device) = device {
        let l: Option<i64> = tx
            .prepare_cached("SELECT min(t_min) FROM chunks WHERE device = ?1")?
            .query_row(params![device], |r| r.get(0))?;
        let h: Option<i64> = tx
            .prepare_cached("SELECT max(t_max) FROM chunks WHERE device = ?1")?
            .query_row(params![device], |r| r.get(0))?;
        widen(l, h);
        if let Some(level) = finest {
            let (l, h): (Option<i64>, Option<i64>) = tx
                .prepare_cached(
                    "SELECT min(bucket), max(bucket) FROM rollups WHERE device = ?1 AND level = ?2",
                )?
                .query_row(params![device, level], |r| Ok((r.get(0)?, r.get(1)?)))?;
            widen(
                l.map(|b| b.saturating_mul(level)),
                h.map(|b| b.saturating_add(1).saturating_mul(level) - 1),
            );
        }
    }
    Ok(lo.zip(hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_every_kind() {
        let start = 1_790_000_040_000;
        let mut a = Agg::of(MetricValue::Int(-5), start + 3, 9);
        a.add(MetricValue::UInt(u64::MAX), start + 59_999, 10);
        a.add(MetricValue::Float(-0.0), start, 11);
        let mut b = Agg::of(MetricValue::Bool(true), start + 1, 1);
        b.add(MetricValue::Bool(false), start + 2, 2);
        let aggs = vec![(3, a), (70_000, b)];
        let back = decode(&encode(&aggs, start), start).unwrap();
        assert_eq!(back.len(), 2);
        for ((m, x), (n, y)) in aggs.iter().zip(&back) {
            assert_eq!(m, n);
            assert_eq!(x.count, y.count);
            assert_eq!(x.sum.to_bits(), y.sum.to_bits());
            assert_eq!((x.min, x.max), (y.min, y.max));
            assert_eq!((x.first.0, x.first.2), (y.first.0, y.first.2));
            assert_eq!((x.last.0, x.last.2), (y.last.0, y.last.2));
        }
        assert!(decode(&[5, 1], start).is_err());
        assert!(decode(&encode(&aggs, start)[..20], start).is_err());
    }
}
