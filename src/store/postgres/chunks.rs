//! The `chunks` table of the PostgreSQL backend (schema version 7): commit → **chunk rows** →
//! queries, aggregation and retention.
//!
//! A group commit writes one row per device and minute it brings new readings for (and per
//! block of 16 seqs, see [`SEQ_BLOCK_BITS`]), holding those readings in the embedded store's
//! chunk format ([`chunk::encode`], sorted by `(ts, rid)`), instead of one row per reading. Reading a device's range walks its chunk rows in
//! `(bucket, rid)` order through the `(device_id, bucket, rid)` index, a page at a time, and
//! decodes them; every reading of a bucket lies in that minute, so once a later bucket comes
//! up, everything before it is complete.
//!
//! Version 6 kept a row per reading; [`convert_v6`] moves such rows into chunks once, at
//! open, under the migration lock.

use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use super::{pg_err, Timestamp};
use crate::store::sqlite::chunk;
use crate::store::{metrics_from_json, seq_key, tags_from_json, StoreError, StoredRow};

/// Width of a chunk's time bucket: one minute (epoch ms). Small enough that the newest
/// readings of a device sending many per second are a few hundred rows away, large enough
/// that a commit's readings of one device (measured within a second of each other) are one
/// chunk.
pub(super) const BUCKET_MS: i64 = 60_000;

/// At most this many readings per chunk row (the embedded store's compaction chunk size,
/// which [`chunk::MAX_UNCOMPRESSED_LEN`] always fits).
const CHUNK_ROWS: usize = 8192;

/// Chunk rows fetched per round trip while walking a device's range.
const PAGE_CHUNKS: i64 = 256;

/// The bucket (minute since the epoch) of a reading at `ts_ms`.
pub(super) fn bucket_of(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(BUCKET_MS)
}

/// One row of `chunks`, ready to be copied in.
pub(super) struct ChunkRow<'a> {
    /// Whose readings.
    pub device_id: &'a str,
    /// Their minute ([`bucket_of`]).
    pub bucket: i64,
    /// The smallest rid among them.
    pub rid: i64,
    /// Lowest seq as a [`seq_key`]; `None` when no reading has a seq.
    pub min_seq: Option<i64>,
    /// Highest seq as a [`seq_key`]; `None` when no reading has a seq.
    pub max_seq: Option<i64>,
    /// Every reading's seq bit-cast to `bigint`, in the chunk's order.
    pub seqs: Vec<Option<i64>>,
    /// The chunk blob.
    pub body: Vec<u8>,
}

/// Seq keys per seq block: 2^`SEQ_BLOCK_BITS`.
pub(super) const SEQ_BLOCK_BITS: u32 = 4;

/// The seq block of a seq: its [`seq_key`] over 16. A chunk's seqs all lie in one block, and
/// a device stores each seq once, so at most 16 of a device's chunks can have their highest
/// seq in any block: what bounds a late reading's dedupe lookup (`STORED_SEQS`).
fn seq_block(seq: u64) -> i64 {
    seq_key(seq) >> SEQ_BLOCK_BITS
}

/// Turns one device's new readings (any order) into chunk rows: one per bucket and seq block
/// they fall in (readings without seq apart), split every [`CHUNK_ROWS`], each sorted by `(ts,
/// rid)`. Appends them to `out`.
pub(super) fn build<'a>(device_id: &'a str, mut rows: Vec<StoredRow>, out: &mut Vec<ChunkRow<'a>>) {
    let group = |r: &StoredRow| (bucket_of(r.ts_ms), r.seq.map(seq_block));
    rows.sort_unstable_by_key(|r| (group(r), r.ts_ms, r.rid));
    let mut rest = &rows[..];
    while let Some(first) = rest.first() {
        let key = group(first);
        let same = rest
            .iter()
            .take(CHUNK_ROWS)
            .take_while(|r| group(r) == key)
            .count();
        let (part, tail) = rest.split_at(same);
        rest = tail;
        let keys = part.iter().filter_map(|r| r.seq.map(seq_key));
        out.push(ChunkRow {
            device_id,
            bucket: key.0,
            rid: part.iter().map(|r| r.rid as i64).min().unwrap_or(0),
            min_seq: keys.clone().min(),
            max_seq: keys.max(),
            seqs: part.iter().map(|r| r.seq.map(|s| s as i64)).collect(),
            body: chunk::encode(part),
        });
    }
}

/// The `COPY` that [`Writer`] feeds.
pub(super) const COPY_CHUNKS: &str =
    "COPY chunks (device_id, bucket, rid, min_seq, max_seq, seqs, n, body)
     FROM STDIN (FORMAT binary)";

const CHUNK_TYPES: [Type; 8] = [
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8_ARRAY,
    Type::INT4,
    Type::BYTEA,
];

/// Chunk rows into a `COPY chunks ... FROM STDIN (FORMAT binary)` (no unique key, so nothing
/// can abort it); rows leave in 4 KiB messages as they are written.
pub(super) struct Writer {
    inner: std::pin::Pin<Box<BinaryCopyInWriter>>,
}

impl Writer {
    /// Over the sink of a [`COPY_CHUNKS`] statement.
    pub(super) fn new(sink: tokio_postgres::CopyInSink<bytes::Bytes>) -> Self {
        Self {
            inner: Box::pin(BinaryCopyInWriter::new(sink, &CHUNK_TYPES)),
        }
    }

    /// Sends one row.
    pub(super) async fn write(&mut self, c: &ChunkRow<'_>) -> Result<(), tokio_postgres::Error> {
        let n = c.seqs.len() as i32;
        let values: [&(dyn ToSql + Sync); 8] = [
            &c.device_id,
            &c.bucket,
            &c.rid,
            &c.min_seq,
            &c.max_seq,
            &c.seqs,
            &n,
            &c.body,
        ];
        self.inner.as_mut().write(&values).await
    }

    /// Ends the `COPY`; returns how many rows it took.
    pub(super) async fn finish(mut self) -> Result<u64, tokio_postgres::Error> {
        self.inner.as_mut().finish().await
    }
}

/// Copies `rows` into `chunks` within `tx`.
async fn copy_in(
    tx: &tokio_postgres::Transaction<'_>,
    rows: &[ChunkRow<'_>],
) -> Result<(), tokio_postgres::Error> {
    let mut writer = Writer::new(tx.copy_in(COPY_CHUNKS).await?);
    for c in rows {
        writer.write(c).await?;
    }
    writer.finish().await?;
    Ok(())
}

/// Decodes a chunk row's blob; damage names the device and bucket.
fn decode(device_id: &str, bucket: i64, body: &[u8]) -> Result<Vec<StoredRow>, StoreError> {
    chunk::decode(body).map_err(|e| {
        StoreError::Corrupt(format!(
            "chunk of device {device_id} at minute {bucket}: {e}"
        ))
    })
}

/// Which way [`walk`] goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    /// Oldest bucket first.
    Forward,
    /// Newest bucket first.
    Backward,
}

/// Walks `device_id`'s chunks whose bucket is in `[lo, hi]`, in bucket order (and by rid
/// within a bucket) in `dir`, a page at a time, handing each decoded chunk and its bucket to
/// `visit`, until `visit` returns `false` or the range ends.
pub(super) async fn walk(
    client: &tokio_postgres::Transaction<'_>,
    device_id: &str,
    (lo, hi): (i64, i64),
    dir: Direction,
    mut visit: impl FnMut(i64, Vec<StoredRow>) -> bool,
) -> Result<(), StoreError> {
    let sql = match dir {
        Direction::Forward => {
            "SELECT bucket, rid, body FROM chunks
             WHERE device_id = $1 AND bucket >= $2 AND bucket <= $3 AND (bucket, rid) > ($4, $5)
             ORDER BY bucket, rid LIMIT $6"
        }
        Direction::Backward => {
            "SELECT bucket, rid, body FROM chunks
             WHERE device_id = $1 AND bucket >= $2 AND bucket <= $3 AND (bucket, rid) < ($4, $5)
             ORDER BY bucket DESC, rid DESC LIMIT $6"
        }
    };
    let mut after = match dir {
        Direction::Forward => (i64::MIN, i64::MIN),
        Direction::Backward => (i64::MAX, i64::MAX),
    };
    loop {
        let rows = client
            .query(
                sql,
                &[&device_id, &lo, &hi, &after.0, &after.1, &PAGE_CHUNKS],
            )
            .await
            .map_err(pg_err)?;
        for row in &rows {
            let bucket: i64 = row.get(0);
            after = (bucket, row.get(1));
            if !visit(bucket, decode(device_id, bucket, row.get(2))?) {
                return Ok(());
            }
        }
        if (rows.len() as i64) < PAGE_CHUNKS {
            return Ok(());
        }
    }
}

/// The ts of `device_id`'s oldest and newest stored reading, `None` when it has none.
pub(super) async fn extent(
    client: &tokio_postgres::Transaction<'_>,
    device_id: &str,
) -> Result<Option<(i64, i64)>, StoreError> {
    let row = client
        .query_one(
            "SELECT min(bucket), max(bucket) FROM chunks WHERE device_id = $1",
            &[&device_id],
        )
        .await
        .map_err(pg_err)?;
    let (Some(first), Some(last)) = (row.get::<_, Option<i64>>(0), row.get(1)) else {
        return Ok(None);
    };
    // The oldest reading is in the first minute, the newest in the last.
    let (mut lo, mut hi) = (i64::MAX, i64::MIN);
    let ends = if first == last {
        &[first][..]
    } else {
        &[first, last][..]
    };
    for &bucket in ends {
        walk(
            client,
            device_id,
            (bucket, bucket),
            Direction::Forward,
            |_, rows| {
                for r in &rows {
                    lo = lo.min(r.ts_ms);
                    hi = hi.max(r.ts_ms);
                }
                true
            },
        )
        .await?;
    }
    Ok((lo <= hi).then_some((lo, hi)))
}

/// Readings of version 6 moved per transaction by [`convert_v6`].
const CONVERT_ROWS: i64 = 20_000;

/// Moves every row of version 6's `readings_v6` (one row per reading) into chunk rows, and
/// drops that table; nothing to do when it is gone. Runs at open under the migration lock, a
/// transaction per [`CONVERT_ROWS`] readings, so an interrupted conversion resumes at the next
/// open where it stopped. Returns how many readings it moved.
pub(super) async fn convert_v6(client: &mut tokio_postgres::Client) -> Result<u64, StoreError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('readings_v6') IS NOT NULL", &[])
        .await
        .map_err(pg_err)?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let mut moved = 0;
    loop {
        let tx = client.transaction().await.map_err(pg_err)?;
        tx.batch_execute("SET LOCAL statement_timeout = 0")
            .await
            .map_err(pg_err)?;
        let rows = tx
            .query(
                "DELETE FROM readings_v6 WHERE ctid = ANY(ARRAY(
                     SELECT ctid FROM readings_v6 LIMIT $1))
                 RETURNING device_id, rid, ts, seq, metrics::text, tags::text",
                &[&CONVERT_ROWS],
            )
            .await
            .map_err(pg_err)?;
        if rows.is_empty() {
            tx.batch_execute("DROP TABLE readings_v6")
                .await
                .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)?;
            return Ok(moved);
        }
        let mut by_device: std::collections::BTreeMap<String, Vec<StoredRow>> = Default::default();
        for row in &rows {
            let rid: i64 = row.get(1);
            let corrupt = |e: String| StoreError::Corrupt(format!("reading {rid}: {e}"));
            let ts: Timestamp = row.get(2);
            let seq: Option<i64> = row.get(3);
            let tags: Option<&str> = row.get(5);
            by_device.entry(row.get(0)).or_default().push(StoredRow {
                rid: rid as u64,
                ts_ms: ts.0,
                seq: seq.map(|s| s as u64),
                metrics: metrics_from_json(row.get(4)).map_err(corrupt)?,
                tags: match tags {
                    Some(t) => tags_from_json(t).map_err(corrupt)?,
                    None => Vec::new(),
                },
            });
        }
        let mut chunks = Vec::new();
        for (device, readings) in &mut by_device {
            build(device, std::mem::take(readings), &mut chunks);
        }
        copy_in(&tx, &chunks).await.map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        moved += rows.len() as u64;
    }
}
