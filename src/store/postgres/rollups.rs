//! Aggregation queries of the PostgreSQL backend (SPEC §12): api::query →
//! [`StoreRead::aggregate`](crate::store::StoreRead::aggregate) → here, on the query pool.
//!
//! This backend keeps no rollup rows: every `agg` query is computed from the `readings` rows of
//! its range, read through the `(device_id, ts)` index in one read-only `REPEATABLE READ`
//! transaction and folded by the same code as the embedded store's raw path
//! ([`SeriesBuilder`]), so both backends answer alike. Rows are fetched 10 000 at a time
//! through a portal, so memory stays bounded whatever the range.
//!
//! Why not rollup rows updated in each commit (from the `RETURNING` rows, which would keep
//! duplicates out): a commit would upsert at least one more row per device and level
//! (1 000 devices × 2 levels per group commit of the fleet shape) on the one primary every
//! replica commits to, roughly doubling what a commit writes besides the readings (the device
//! upsert is already a quarter of a commit; ARCHITECTURE.md, "Why PostgreSQL looks like this").
//! Rollups there would be derived off the commit path instead (a fold of committed readings
//! into rollup rows, queries covering what is not folded yet), as the embedded store does
//! during compaction; that is not built.

use tokio_postgres::IsolationLevel;

use super::{pg_err, PgReader, Timestamp};
use crate::store::rollup::{plan, AggAnswer, AggQuery, AggSource, SeriesBuilder};
use crate::store::{metric_value_from_json, metrics_from_json, StoreError};

/// Rows fetched per round trip.
const FETCH_ROWS: i32 = 10_000;

impl PgReader {
    /// Answers `q` from raw readings.
    pub(super) fn aggregate_raw(&self, q: &AggQuery) -> Result<Option<AggAnswer>, StoreError> {
        self.driver.block_on(async {
            let mut client = self.pool.get().await.map_err(pg_err)?;
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg_err)?;
            let known = tx
                .query_opt(
                    "SELECT 1 FROM devices WHERE device_id = $1",
                    &[&q.device_id],
                )
                .await
                .map_err(pg_err)?
                .is_some();
            if !known {
                return Ok(None);
            }
            let extent = if q.from_ms.is_some() && q.to_ms.is_some() {
                None
            } else {
                let row = tx
                    .query_one(
                        "SELECT min(ts), max(ts) FROM readings WHERE device_id = $1",
                        &[&q.device_id],
                    )
                    .await
                    .map_err(pg_err)?;
                let lo: Option<Timestamp> = row.get(0);
                let hi: Option<Timestamp> = row.get(1);
                lo.zip(hi).map(|(l, h)| (l.0, h.0))
            };
            let plan = match plan(q, extent, &[], i64::MAX, 0) {
                Ok(p) => p,
                Err(answer) => return Ok(Some(answer)),
            };
            let mut series = SeriesBuilder::new(q.step_ms, q.metric.clone());
            let (from, to) = (Timestamp(plan.from_ms), Timestamp(plan.to_ms));
            let portal = match &q.metric {
                Some(m) => {
                    tx.bind(
                        "SELECT rid, ts, (metrics -> $4)::text FROM readings
                         WHERE device_id = $1 AND ts >= $2 AND ts < $3 AND metrics -> $4 IS NOT NULL",
                        &[&q.device_id, &from, &to, m],
                    )
                    .await
                }
                None => {
                    tx.bind(
                        "SELECT rid, ts, metrics::text FROM readings
                         WHERE device_id = $1 AND ts >= $2 AND ts < $3",
                        &[&q.device_id, &from, &to],
                    )
                    .await
                }
            }
            .map_err(pg_err)?;
            loop {
                let rows = tx
                    .query_portal(&portal, FETCH_ROWS)
                    .await
                    .map_err(pg_err)?;
                for row in &rows {
                    let rid: i64 = row.get(0);
                    let ts: Timestamp = row.get(1);
                    let text: &str = row.get(2);
                    let corrupt = |e: String| StoreError::Corrupt(format!("reading {rid}: {e}"));
                    let metrics = match &q.metric {
                        Some(m) => {
                            let v: serde_json::Value = serde_json::from_str(text)
                                .map_err(|e| corrupt(e.to_string()))?;
                            vec![(m.clone(), metric_value_from_json(m, v).map_err(corrupt)?)]
                        }
                        None => metrics_from_json(text).map_err(corrupt)?,
                    };
                    series.add_row(ts.0, rid as u64, &metrics);
                }
                if rows.len() < FETCH_ROWS as usize {
                    break;
                }
            }
            tx.commit().await.map_err(pg_err)?;
            Ok(Some(AggAnswer::Series(series.finish(AggSource::Raw))))
        })
    }
}
