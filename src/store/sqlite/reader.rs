//! Queries of the embedded store: `GET /v1/devices/{id}/readings` reads here, never through
//! the writer.
//!
//! A query merges two sources: the journal's in-memory generations (readings not yet
//! compacted) and the device's chunks in SQLite, read on this reader's own connections (WAL
//! lets them run beside compaction). To see each reading exactly once while compaction moves
//! it, the query first notes which generations are in memory and copies their matching rows,
//! then reads only chunks from *other* generations. A generation leaves memory only after its
//! chunks are committed, so a reading is always in one of the two views.
//!
//! Chunks are visited newest first for `order=desc` (oldest first for `asc`) and the visit
//! stops once `limit` rows are certain: "the last 1000 readings" decodes only the newest
//! chunks.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use super::journal::{decode_bytes, Entry, Gen};
use super::outbox::SqliteOutbox;
use super::schema::decode_chunk;
use super::{open_connection, Shared};
use crate::config::StorageSettings;
use crate::store::{Order, Outbox, ReadingsQuery, StoreError, StoreRead, StoredRow};

/// Idle read connections kept for reuse.
const POOL: usize = 4;

/// Read-only access for queries, with a small pool of connections.
pub struct SqliteReader {
    /// The database file.
    path: PathBuf,
    /// Settings used to open connections.
    settings: StorageSettings,
    /// The in-memory journal.
    shared: Shared,
    /// Idle connections, reused across queries.
    pool: Mutex<Vec<Connection>>,
    /// The NATS outbox over the same journal, when enabled.
    outbox: Option<Arc<SqliteOutbox>>,
}

impl SqliteReader {
    /// A reader for the database at `path`, sharing the writer's journal. Connections open
    /// lazily.
    pub fn new(
        path: &Path,
        settings: &StorageSettings,
        shared: Shared,
        outbox: Option<Arc<SqliteOutbox>>,
    ) -> Self {
        Self {
            path: path.to_path_buf(),
            settings: settings.clone(),
            shared,
            pool: Mutex::new(Vec::new()),
            outbox,
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
            if pool.len() < POOL {
                pool.push(conn);
            }
        }
        result
    }

    /// The device's rows in the in-memory generations, within the query's time range; the
    /// generations seen; and whether any of them knows the device.
    ///
    /// The journal lock (which the writer needs to file each commit) is held only to clone
    /// the sealed generations' `Arc`s and to copy the active generation's matching readings
    /// (re-encoded with their metric names, [`Gen::copy_row`]); sealed generations never
    /// change, so they are read and everything is decoded after the lock is released. Without a metric filter only the `limit` first entries in the
    /// query's order can matter, so only those are copied or decoded.
    fn journal_rows(
        &self,
        q: &ReadingsQuery,
    ) -> Result<(Vec<StoredRow>, HashSet<u64>, bool), StoreError> {
        let mut gens = HashSet::new();
        let mut known = false;
        let mut copied: Vec<(u64, usize, usize)> = Vec::new(); // rid, start, end in `bytes`
        let mut bytes = Vec::new();
        let sealed: Vec<Arc<Gen>> = {
            let st = self.shared.read().expect("journal lock");
            gens.insert(st.active.id);
            if let Some(picked) = pick(&st.active, q) {
                known = true;
                for (idx, _) in picked {
                    let start = bytes.len();
                    st.active.copy_row(idx, &mut bytes)?;
                    copied.push((st.active.rid(idx), start, bytes.len()));
                }
            }
            st.sealed.clone()
        };
        let mut rows = copied
            .into_iter()
            .map(|(rid, start, end)| decode_bytes(&bytes[start..end], rid))
            .collect::<Result<Vec<_>, _>>()?;
        for gen in &sealed {
            gens.insert(gen.id);
            if let Some(picked) = pick(gen, q) {
                known = true;
                for (idx, _) in picked {
                    rows.push(gen.row(idx)?);
                }
            }
        }
        Ok((rows, gens, known))
    }
}

/// The device's entries of `gen` that the query can use (`None` if the device is not in it):
/// those in its time range and past its cursor, and without a metric filter only the `limit` first in its order.
fn pick(gen: &Gen, q: &ReadingsQuery) -> Option<Vec<(u32, Entry)>> {
    let mut c: Vec<(u32, Entry)> = gen
        .device(&q.device_id)?
        .entries()
        .filter(|(idx, e)| q.wanted(e.ts_ms, gen.rid(*idx)))
        .collect();
    if q.metric.is_none() && c.len() > q.limit {
        let key = |(idx, e): &(u32, Entry)| (e.ts_ms, *idx);
        match q.order {
            Order::Asc => c.select_nth_unstable_by_key(q.limit, key),
            Order::Desc => c.select_nth_unstable_by_key(q.limit, |e| std::cmp::Reverse(key(e))),
        };
        c.truncate(q.limit);
    }
    Some(c)
}

impl StoreRead for SqliteReader {
    fn outbox(&self) -> Option<Arc<dyn Outbox>> {
        self.outbox.clone().map(|o| o as Arc<dyn Outbox>)
    }

    fn alert_states(&self) -> Result<Vec<crate::store::AlertRow>, StoreError> {
        self.with_conn(super::alerts::load)
    }

    fn apply_alert_changes(
        &self,
        changes: &[crate::store::AlertChange],
    ) -> Result<Vec<bool>, StoreError> {
        self.with_conn(|conn| super::alerts::apply(conn, changes))
    }

    fn create_token(&self, row: &crate::store::TokenRow) -> Result<(), StoreError> {
        self.with_conn(|conn| super::tokens::create(conn, row))
    }

    fn tokens(&self) -> Result<Vec<crate::store::TokenRow>, StoreError> {
        self.with_conn(super::tokens::list)
    }

    fn token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<crate::store::TokenRow>, StoreError> {
        self.with_conn(|conn| super::tokens::by_hash(conn, hash))
    }

    fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        self.with_conn(|conn| super::tokens::revoke(conn, id))
    }

    fn revoked_tokens_since(&self, since_ms: i64) -> Result<Vec<(String, i64)>, StoreError> {
        self.with_conn(|conn| super::tokens::revoked_since(conn, since_ms))
    }

    fn touch_tokens(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        self.with_conn(|conn| super::tokens::touch(conn, used))
    }

    fn aggregate(
        &self,
        q: &crate::store::rollup::AggQuery,
    ) -> Result<Option<crate::store::rollup::AggAnswer>, StoreError> {
        // The device's journal rows first (any bucket the answer may widen to), then the
        // snapshot: see `rollups::aggregate` for why no reading counts twice.
        let step = q.step_ms.max(1);
        let (journal, _, known) = self.journal_rows(&ReadingsQuery {
            device_id: q.device_id.clone(),
            from_ms: q.from_ms.map_or(i64::MIN, |f| f.saturating_sub(step)),
            to_ms: q.to_ms.map_or(i64::MAX, |t| t.saturating_add(step)),
            metric: None,
            limit: usize::MAX,
            order: Order::Asc,
            after: None,
        })?;
        let now = crate::reading::now_ms();
        self.with_conn(|conn| {
            super::rollups::aggregate(conn, q, journal, known, &self.settings.rollups, now)
        })
    }

    fn readings(&self, q: &ReadingsQuery) -> Result<Option<Vec<StoredRow>>, StoreError> {
        let (journal, in_memory, known) = self.journal_rows(q)?;
        self.merge_chunks(q, journal, &in_memory, known)
    }
}

impl SqliteReader {
    /// The second half of a query: `journal` (the rows [`Self::journal_rows`] copied from the
    /// generations `in_memory`) merged with the device's chunks of every other generation.
    /// `None` if the device is unknown to both.
    fn merge_chunks(
        &self,
        q: &ReadingsQuery,
        journal: Vec<StoredRow>,
        in_memory: &HashSet<u64>,
        known: bool,
    ) -> Result<Option<Vec<StoredRow>>, StoreError> {
        let mut rows = q.finish(journal);
        self.with_conn(|conn| {
            let device: Option<i64> = conn
                .prepare_cached("SELECT id FROM devices WHERE name = ?1")?
                .query_row(params![q.device_id], |r| r.get(0))
                .optional()?;
            let Some(device) = device else {
                return Ok(known.then_some(rows));
            };
            let sql = match q.order {
                Order::Desc => {
                    "SELECT id, gen, t_min, t_max, data FROM chunks
                     WHERE device = ?1 AND t_max >= ?2 AND t_min < ?3 ORDER BY t_max DESC"
                }
                Order::Asc => {
                    "SELECT id, gen, t_min, t_max, data FROM chunks
                     WHERE device = ?1 AND t_max >= ?2 AND t_min < ?3 ORDER BY t_min ASC"
                }
            };
            let mut stmt = conn.prepare_cached(sql)?;
            let (from_ms, to_ms) = q.ts_range();
            let mut chunks = stmt.query(params![device, from_ms, to_ms])?;
            // Whether `rows` is `q.finish`'s output. Chunks' rows are gathered unsorted and
            // finished (filtered, sorted, cut to `limit`) only when `limit` rows may be in
            // hand, before the next chunk is looked at, and at the end: the same rows as
            // finishing after every chunk, with no sort for the chunks that fill the first
            // `limit` rows (usually the next chunk then lies beyond them, and the visit ends).
            let mut finished = true;
            while let Some(c) = chunks.next()? {
                let gen: i64 = c.get(1)?;
                if in_memory.contains(&(gen as u64)) {
                    // Seen in memory already (compaction committed meanwhile). A chunk of a
                    // batch names its first generation: see `compaction.rs`.
                    continue;
                }
                let (t_min, t_max): (i64, i64) = (c.get(2)?, c.get(3)?);
                // Once `limit` rows are in hand, a chunk entirely beyond the worst of them
                // cannot contribute, nor can any later one (the visit is ordered).
                if rows.len() >= q.limit && !finished {
                    rows = q.finish(rows);
                    finished = true;
                }
                if rows.len() >= q.limit {
                    let worst = rows.last().map(|r| r.ts_ms).unwrap_or_default();
                    let beyond = match q.order {
                        Order::Desc => t_max < worst,
                        Order::Asc => t_min > worst,
                    };
                    if beyond {
                        break;
                    }
                }
                let id: i64 = c.get(0)?;
                let data = c
                    .get_ref(4)?
                    .as_blob()
                    .map_err(|e| StoreError::Corrupt(format!("chunk {id}: {e}")))?;
                let mut decoded = decode_chunk(id, data)?;
                if q.order == Order::Desc {
                    // A chunk is in ascending `(ts, rid)` order: reversed, the chunks visited
                    // newest first follow on from each other (see `ReadingsQuery::finish`).
                    decoded.reverse();
                }
                rows.extend(decoded);
                finished = false;
            }
            if !finished {
                rows = q.finish(rows);
            }
            // A device with a row is known, even with nothing in range (or all retired).
            Ok(Some(rows))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::reading::{DeviceId, MetricValue, Reading};
    use crate::store::Store;
    use crate::telemetry::metrics::Metrics;

    fn reading(dev: &str, seq: u64) -> Reading {
        Reading {
            device_id: DeviceId::parse(dev).expect("device"),
            ts_ms: 1_790_000_000_000 + seq as i64,
            seq: Some(seq),
            metrics: vec![("v".into(), MetricValue::UInt(seq))],
            tags: Vec::new(),
        }
    }

    fn commit(store: &mut super::super::SqliteStore, dev: &str, seqs: std::ops::Range<u64>) {
        let batch: Vec<Reading> = seqs.map(|s| reading(dev, s)).collect();
        let refs: Vec<&Reading> = batch.iter().collect();
        let flags = store.commit(&refs, 1).expect("commit");
        assert!(flags.iter().all(|&new| new));
    }

    /// Found by a review of batched compaction: a query that noted generation A while it was
    /// still active, then read chunks after A and the next generation were compacted in one
    /// batch, got A's rows twice when the batch's chunks named its last generation. They
    /// name its first, so the query skips them.
    #[test]
    fn a_query_racing_a_batched_compaction_sees_each_reading_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = StorageSettings {
            data_dir: dir.path().to_path_buf(),
            journal_seal_readings: 10,
            compaction_interval: Duration::from_secs(3600),
            // Each compaction takes at least 2 × 200 ms, so what is sealed meanwhile queues.
            compaction_pause: Duration::from_millis(200),
            ..StorageSettings::default()
        };
        let metrics = Arc::new(Metrics::new());
        let (mut store, _) =
            super::super::SqliteStore::open(&settings, metrics.clone()).expect("store opens");
        // Generation 1 fills and is sealed: its compaction starts, slowly.
        commit(&mut store, "other", 0..10);
        // Generation 2, still active, holds 5 readings of "d"; the query notes it.
        commit(&mut store, "d", 0..5);
        let q = ReadingsQuery {
            device_id: "d".into(),
            from_ms: i64::MIN,
            to_ms: i64::MAX,
            metric: None,
            limit: 1000,
            order: Order::Asc,
            after: None,
        };
        let (journal, in_memory, known) = store.reader.journal_rows(&q).expect("journal rows");
        assert_eq!(journal.len(), 5);
        // Generations 2 and 3 are sealed behind generation 1's compaction, then compacted
        // together.
        commit(&mut store, "d", 5..10);
        commit(&mut store, "d", 10..20);
        // The counter of compacted readings is updated last in a compaction, after its
        // time is observed.
        let deadline = Instant::now() + Duration::from_secs(20);
        while metrics.store_compacted_readings.get() != 30 {
            assert!(Instant::now() < deadline, "the journal was not compacted");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            metrics.store_compaction_seconds.get_sample_count() < 3,
            "generations 2 and 3 were not compacted in one batch; the test shows nothing"
        );
        let second_half = |journal, in_memory: &HashSet<u64>, known| -> Vec<u64> {
            let rows = store
                .reader
                .merge_chunks(&q, journal, in_memory, known)
                .expect("query")
                .expect("known");
            rows.iter().map(|r| r.seq.expect("seq")).collect()
        };
        // The query's second half: the rows it copied, and no chunk holding them again.
        assert_eq!(
            second_half(journal, &in_memory, known),
            (0..5).collect::<Vec<u64>>()
        );
        // A query from now on sees all of them, once.
        let (journal, in_memory, known) = store.reader.journal_rows(&q).expect("journal rows");
        assert_eq!(
            second_half(journal, &in_memory, known),
            (0..20).collect::<Vec<u64>>()
        );
    }
}
