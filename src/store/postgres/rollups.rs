//! Aggregation queries of the PostgreSQL backend (SPEC §12): api::query →
//! [`StoreRead::aggregate`](crate::store::StoreRead::aggregate) → here, on the query pool.
//!
//! This backend keeps no rollup rows: every `agg` query is computed from the chunk rows of its
//! range, read through the `(device_id, bucket, rid)` index a page at a time in one read-only
//! `REPEATABLE READ` transaction, decoded, and folded by the same code as the embedded store's
//! raw path ([`SeriesBuilder`]), so both backends answer alike. Memory stays bounded by a page
//! of chunks and the answer, whatever the range.
//!
//! Why not rollup rows updated in each commit (from the readings it found new): a commit
//! would upsert at least one more row per device and level
//! (1 000 devices × 2 levels per group commit of the fleet shape) on the one primary every
//! replica commits to, doubling what a commit writes (one chunk row and one device row per
//! device; ARCHITECTURE.md, "Why PostgreSQL looks like this").
//! Rollups there would be derived off the commit path instead (a fold of committed readings
//! into rollup rows, queries covering what is not folded yet), as the embedded store does
//! during compaction; that is not built.

use tokio_postgres::IsolationLevel;

use super::chunks::{self, Direction};
use super::{pg_err, PgReader};
use crate::store::rollup::{plan, AggAnswer, AggQuery, AggSource, SeriesBuilder};
use crate::store::StoreError;

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
                chunks::extent(&tx, &q.device_id).await?
            };
            let plan = match plan(q, extent, &[], i64::MAX, 0) {
                Ok(p) => p,
                Err(answer) => return Ok(Some(answer)),
            };
            let mut series = SeriesBuilder::new(q.step_ms, q.metric.clone());
            if plan.from_ms < plan.to_ms {
                let range = (
                    chunks::bucket_of(plan.from_ms),
                    chunks::bucket_of(plan.to_ms - 1),
                );
                chunks::walk(&tx, &q.device_id, range, Direction::Forward, |_, rows| {
                    for r in rows
                        .iter()
                        .filter(|r| r.ts_ms >= plan.from_ms && r.ts_ms < plan.to_ms)
                    {
                        series.add_row(r.ts_ms, r.rid, &r.metrics);
                    }
                    true
                })
                .await?;
            }
            tx.commit().await.map_err(pg_err)?;
            Ok(Some(AggAnswer::Series(series.finish(AggSource::Raw))))
        })
    }
}
