//! The PostgreSQL backend (`storage.backend = "postgres"`, SPEC §13): batcher → services →
//! **store** → ack, where the store is one database shared by every replica.
//!
//! - **Commit.** One transaction per group commit: the batch goes by binary `COPY` into a
//!   per-connection temporary staging table, then `INSERT … SELECT … ON CONFLICT (device_id,
//!   seq) DO NOTHING RETURNING device_id, seq` moves it into `readings` and says exactly which
//!   readings were new. (A `COPY` straight into `readings` would abort on the first duplicate.)
//!   The device table is upserted in the same transaction. The ack follows `COMMIT`.
//! - **Order.** Rows are inserted and devices upserted sorted by key, so two replicas committing
//!   overlapping batches take their row locks in the same order; a deadlock or serialization
//!   failure that happens anyway is retried (up to [`MAX_ATTEMPTS`] times).
//! - **Unknown outcome.** A connection lost during `COMMIT` is an error: not acked. If it did
//!   commit, the client's retry finds its readings as duplicates.
//! - **Schema.** Versioned migrations (`migrations/`, run by refinery at open) under a
//!   session advisory lock, so replicas starting together migrate once.
//! - **Retention** deletes expired readings a few hundred devices per transaction, from a
//!   background task, one replica at a time (a transaction-scoped advisory lock).
//! - **Health.** An idle writer checks once a second that the server answers, so `/readyz`
//!   turns 503 in an outage even when nothing is being committed.
//!
//! The [`Store`] interface is synchronous and is called on blocking threads, while
//! tokio-postgres is async: the backend owns a small runtime ([`Driver`], one worker thread)
//! that drives its connections, and each call blocks on it.

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, BytesMut};
use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};
use tokio_postgres::NoTls;

use super::{
    merge_latest, metric_value_from_json, metrics_from_json, tags_from_json, DeviceGlob,
    DeviceLatest, DevicesQuery, Order, OrderedPairs, ReadingsQuery, Store, StoreError, StoreRead,
    StoredRow,
};
use crate::config::StorageSettings;
use crate::reading::{now_ms, MetricValue, PairsAsMap, Reading};
use crate::telemetry::metrics::Metrics;

/// The `store` label of this backend's metrics.
pub const BACKEND: &str = "postgres";

/// Attempts of one group commit that PostgreSQL aborted as a deadlock or serialization
/// failure (both say "retry the transaction").
pub const MAX_ATTEMPTS: usize = 3;

/// Session advisory lock held while migrating (an arbitrary constant: "sluice" in ASCII).
const MIGRATION_LOCK: i64 = 0x736c_7569_6365;
/// Transaction advisory lock of the retention sweep, so one replica sweeps at a time.
const RETENTION_LOCK: i64 = MIGRATION_LOCK + 1;
/// Session lock held by the one replica that publishes the outbox to NATS.
const OUTBOX_LOCK: i64 = MIGRATION_LOCK + 2;
/// Devices whose expired readings one retention transaction deletes (through the
/// `(device_id, ts)` index): bounds its length and locks.
const RETENTION_DEVICES: i64 = 500;
/// How often an idle writer checks that the server still answers, so that `/readyz` turns
/// 503 during an outage even when no reading arrives.
const HEALTH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest that check may take (the writer waits for it).
const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Milliseconds from the Unix epoch to PostgreSQL's (2000-01-01T00:00:00Z).
const PG_EPOCH_MS: i64 = 946_684_800_000;
/// PostgreSQL's finite `timestamptz` range, in its microseconds (`MIN_TIMESTAMP`,
/// `END_TIMESTAMP` in its `datatype/timestamp.h`: 4714-11-24 BC to 294277-01-01 AD).
const PG_MIN_MICROS: i64 = -211_813_488_000_000_000;
const PG_END_MICROS: i64 = 9_223_371_331_200_000_000;

mod alerts;
mod outbox;
mod rollups;
mod tokens;

mod embedded {
    refinery::embed_migrations!("src/store/postgres/migrations");
}

/// The newest schema version this build knows (the last file in `migrations/`).
pub fn schema_version() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0)
}

/// Migrates the database of `settings.postgres.url` up to schema `version` only, as an older
/// Sluice would have left it (tests of upgrades; a step-by-step rollout). [`PgStore::open`]
/// takes it the rest of the way.
pub fn migrate_to(settings: &StorageSettings, version: i32) -> Result<(), StoreError> {
    let config = connect_config(settings)?;
    Driver::new()?.block_on(migrate(&config, Some(version)))
}

fn connect_config(settings: &StorageSettings) -> Result<tokio_postgres::Config, StoreError> {
    let pg = &settings.postgres;
    let mut config = tokio_postgres::Config::from_str(pg.url.expose()).map_err(pg_err)?;
    config.connect_timeout(pg.connect_timeout);
    if config.get_application_name().is_none() {
        config.application_name("sluice");
    }
    // The server's NOTICEs ("relation ... already exists, skipping") are not news to operators.
    if config.get_options().is_none() {
        config.options("-c client_min_messages=warning");
    }
    Ok(config)
}

/// What retrying can never fix, checked once at start-up so that Sluice exits with a
/// configuration error (code 2) instead of staying not ready: the server refuses the user or
/// its password (SQLSTATE 28000, 28P01), the database does not exist (3D000), or it holds a
/// schema migrated by a newer Sluice. `Ok` when the server answers and none of these holds, and
/// also when it cannot be reached yet (replicas may start before their database): the store
/// writer keeps trying then. The `Err` text names the cause and the (redacted) URL.
pub fn preflight(settings: &StorageSettings) -> Result<(), String> {
    let url = &settings.postgres.url;
    let config = connect_config(settings).map_err(|e| format!("`{url}`: {e}"))?;
    let driver = Driver::new().map_err(|e| e.to_string())?;
    driver.block_on(async {
        let (client, connection) = match config.connect(NoTls).await {
            Ok(c) => c,
            Err(e) => {
                let fatal = [
                    SqlState::INVALID_PASSWORD,
                    SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                    SqlState::INVALID_CATALOG_NAME,
                ];
                return match e.code() {
                    Some(code) if fatal.contains(code) => Err(format!(
                        "`{url}`: {} (retrying cannot fix this)",
                        pg_err(e)
                    )),
                    _ => {
                        tracing::warn!(url = %url, error = %pg_err(e), "postgres: not reachable yet; will keep trying");
                        Ok(())
                    }
                };
            }
        };
        let connection = tokio::spawn(connection);
        let found = stored_schema_version(&client).await;
        drop(client);
        let _ = connection.await;
        match found {
            Ok(Some(v)) if v > schema_version() => Err(format!(
                "`{url}`: {}",
                StoreError::TooNew {
                    found: v.into(),
                    supported: schema_version().into(),
                }
            )),
            _ => Ok(()),
        }
    })
}

/// The newest migration recorded in the database, `None` before the first.
async fn stored_schema_version(client: &tokio_postgres::Client) -> Result<Option<i32>, StoreError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('refinery_schema_history') IS NOT NULL",
            &[],
        )
        .await
        .map_err(pg_err)?
        .get(0);
    if !exists {
        return Ok(None);
    }
    client
        .query_one("SELECT max(version) FROM refinery_schema_history", &[])
        .await
        .map_err(pg_err)
        .map(|row| row.get(0))
}

/// Created on every pooled connection: where a group commit lands before its dedupe. Emptied
/// by each transaction's end.
const STAGING_DDL: &str = "CREATE TEMP TABLE IF NOT EXISTS sluice_staging (
        idx       int4        NOT NULL,
        device_id text        NOT NULL,
        seq       int8,
        ts        timestamptz NOT NULL,
        metrics   json        NOT NULL,
        tags      json
    ) ON COMMIT DELETE ROWS";

const COPY_STAGING: &str =
    "COPY sluice_staging (idx, device_id, seq, ts, metrics, tags) FROM STDIN (FORMAT binary)";

const STAGING_TYPES: [Type; 6] = [
    Type::INT4,
    Type::TEXT,
    Type::INT8,
    Type::TIMESTAMPTZ,
    Type::JSON,
    Type::JSON,
];

/// Moves the batch in; the first of equal keys (lowest `idx`) wins, as in every backend.
const INSERT_READINGS: &str = "INSERT INTO readings (device_id, seq, ts, metrics, tags)
     SELECT device_id, seq, ts, metrics, tags FROM sluice_staging
     ORDER BY device_id, seq, idx
     ON CONFLICT (device_id, seq) DO NOTHING
     RETURNING device_id, seq";

/// [`INSERT_READINGS`] with the NATS outbox on: the new readings are also copied to `outbox`,
/// in the same statement (and so the same transaction), in `rid` order.
const INSERT_READINGS_OUTBOX: &str = "WITH ins AS (
         INSERT INTO readings (device_id, seq, ts, metrics, tags)
         SELECT device_id, seq, ts, metrics, tags FROM sluice_staging
         ORDER BY device_id, seq, idx
         ON CONFLICT (device_id, seq) DO NOTHING
         RETURNING rid, device_id, seq, ts, metrics, tags),
     copied AS (
         INSERT INTO outbox (rid, device_id, seq, ts, metrics, tags, origin)
         SELECT rid, device_id, seq, ts, metrics, tags, $1::text FROM ins ORDER BY rid)
     SELECT device_id, seq FROM ins";

/// The device table, in the same transaction: one row per device of the commit (its newest
/// `ts`, its new latest values and the oldest `ts` among them), upserted in id order in one
/// statement, so that replicas
/// committing overlapping devices lock their rows in the same order. (An earlier version
/// updated existing rows first and inserted new ones second: two lock phases, and replicas
/// deadlocked under load with late readings.)
const UPSERT_DEVICES: &str = "INSERT INTO devices
         (device_id, last_seen_ms, last_ts_ms, latest, commit_min_ts_ms)
     SELECT id, $1, max_ts, latest::jsonb, min_ts
     FROM unnest($2::text[], $3::int8[], $4::text[], $5::int8[]) AS u(id, max_ts, latest, min_ts)
     ORDER BY id
     ON CONFLICT (device_id) DO UPDATE SET
         last_seen_ms = greatest(devices.last_seen_ms, excluded.last_seen_ms),
         last_ts_ms = greatest(devices.last_ts_ms, excluded.last_ts_ms),
         latest = CASE WHEN excluded.commit_min_ts_ms >= devices.last_ts_ms
                       THEN devices.latest || excluded.latest
                       ELSE sluice_merge_latest(devices.latest, excluded.latest) END,
         commit_min_ts_ms = excluded.commit_min_ts_ms";

/// Owns the runtime that drives this backend's connections. Dropping it never blocks (so the
/// store may be dropped anywhere, also inside async code).
struct Driver {
    /// One worker thread: it only moves bytes between sockets and the blocked callers.
    rt: Option<tokio::runtime::Runtime>,
}

impl Driver {
    fn new() -> Result<Self, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sluice-postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Postgres(format!("cannot start its runtime: {e}")))?;
        Ok(Self { rt: Some(rt) })
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.rt
            .as_ref()
            .expect("runtime lives as long as the driver")
    }

    /// Runs `f` to completion on this runtime, blocking the calling (non-async) thread.
    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.runtime().block_on(f)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The write side: the pool, and the retention schedule.
pub struct PgStore {
    /// Drives the pool's connections.
    driver: Arc<Driver>,
    /// The commits' own two connections (one commit at a time, and the health check).
    pool: Pool,
    /// Retention settings.
    settings: StorageSettings,
    /// Retention and commit-retry counters.
    metrics: Arc<Metrics>,
    /// Shared with queries.
    reader: Arc<PgReader>,
    /// When the next retention sweep is due.
    next_retention: Instant,
    /// A sweep is running (they never overlap within a replica).
    sweeping: Arc<AtomicBool>,
    /// When the server last answered a health check (see [`HEALTH_INTERVAL`]).
    last_health: Instant,
}

/// The read side.
pub struct PgReader {
    /// Drives the pool's connections.
    driver: Arc<Driver>,
    /// Connections for queries and the retention sweep (`storage.postgres.pool_size`).
    pool: Pool,
    /// The NATS outbox, with `nats.enabled`.
    outbox: Option<Arc<outbox::PgOutbox>>,
}

/// A tokio-postgres or pool error, with the server's SQLSTATE and message when it sent one.
fn pg_err(e: impl StdError) -> StoreError {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // tokio-postgres already prints its cause; add only what is not there yet.
        let more = s.to_string();
        if !text.contains(&more) {
            let _ = write!(text, ": {more}");
        }
        source = s.source();
    }
    StoreError::Postgres(text)
}

/// Whether PostgreSQL asked for this transaction to be retried.
fn should_retry(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    )
}

impl PgStore {
    /// Connects, migrates the schema to this build's version (under an advisory lock, so
    /// concurrent starts migrate once), and reads back the device table.
    ///
    /// Errors: [`StoreError::Postgres`] when the server cannot be reached or refuses (the
    /// writer retries every second), or when the database holds a schema version this build
    /// does not know (a newer Sluice migrated it).
    pub fn open(
        settings: &StorageSettings,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, Vec<DeviceLatest>), StoreError> {
        let pg = &settings.postgres;
        let config = connect_config(settings)?;
        let driver = Arc::new(Driver::new()?);
        driver
            .block_on(migrate(&config, None))
            .map_err(|e| match e {
                StoreError::Postgres(text) => StoreError::Postgres(format!("{}: {text}", pg.url)),
                other => other,
            })?;
        // Two pools, so that queries can never take the connections commits need: commits
        // (and the writer's health checks) get their own two; queries and the retention sweep
        // share `pool_size`.
        let timeout_ms = pg.statement_timeout.as_millis();
        let commit_setup = format!("{STAGING_DDL}; SET statement_timeout = {timeout_ms}");
        let query_setup = format!("SET statement_timeout = {timeout_ms}");
        let pool = build_pool(&config, 2, pg.connect_timeout, commit_setup)?;
        let query_pool = build_pool(&config, pg.pool_size, pg.connect_timeout, query_setup)?;
        let outbox = settings.outbox.then(|| {
            Arc::new(outbox::PgOutbox::new(
                driver.clone(),
                config.clone(),
                query_pool.clone(),
            ))
        });
        let reader = Arc::new(PgReader {
            driver: driver.clone(),
            pool: query_pool,
            outbox,
        });
        let devices = reader.load_devices(&DevicesQuery {
            limit: usize::MAX,
            ..DevicesQuery::default()
        })?;
        Ok((
            Self {
                driver,
                pool,
                settings: settings.clone(),
                metrics,
                reader,
                next_retention: Instant::now(),
                sweeping: Arc::new(AtomicBool::new(false)),
                last_health: Instant::now(),
            },
            devices,
        ))
    }
}

/// A pool of at most `size` connections, each set up by `setup` (SQL) when it is created.
fn build_pool(
    config: &tokio_postgres::Config,
    size: usize,
    timeout: std::time::Duration,
    setup: String,
) -> Result<Pool, StoreError> {
    let manager = Manager::from_config(
        config.clone(),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let setup = Arc::new(setup);
    Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .post_create(Hook::async_fn(move |client, _| {
            let setup = setup.clone();
            Box::pin(async move {
                client
                    .batch_execute(&setup)
                    .await
                    .map_err(HookError::Backend)
            })
        }))
        .build()
        .map_err(pg_err)
}

/// Runs the embedded migrations (all, or up to `target`) on a connection of its own, holding
/// [`MIGRATION_LOCK`].
async fn migrate(config: &tokio_postgres::Config, target: Option<i32>) -> Result<(), StoreError> {
    let (mut client, connection) = config.connect(NoTls).await.map_err(pg_err)?;
    let connection = tokio::spawn(connection);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_err)?;
    if let Some(found) = stored_schema_version(&client).await? {
        if found > schema_version() {
            return Err(StoreError::TooNew {
                found: found.into(),
                supported: schema_version().into(),
            });
        }
    }
    let mut runner = embedded::migrations::runner().set_abort_missing(true);
    if let Some(v) = target {
        runner = runner.set_target(refinery::Target::Version(v));
    }
    let report = runner.run_async(&mut client).await;
    // Closing the connection releases the lock in any case; unlocking is only tidier.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    drop(client);
    let _ = connection.await;
    match report {
        Ok(report) => {
            for m in report.applied_migrations() {
                tracing::info!(version = m.version(), name = m.name(), "postgres: migrated");
            }
            Ok(())
        }
        Err(e) => Err(StoreError::Postgres(format!(
            "schema migration failed: {}",
            pg_err(e)
        ))),
    }
}

/// A reading's metrics and tags, as the JSON text they are stored as.
struct Encoded {
    /// `{"metric": value, ...}` in the device's order.
    metrics: String,
    /// `{"tag": "value", ...}`, or `None` when there are no tags.
    tags: Option<String>,
}

fn encode(r: &Reading) -> Encoded {
    Encoded {
        metrics: serde_json::to_string(&PairsAsMap(&r.metrics)).unwrap_or_default(),
        tags: (!r.tags.is_empty())
            .then(|| serde_json::to_string(&PairsAsMap(&r.tags)).unwrap_or_default()),
    }
}

/// One commit attempt's failure.
enum Attempt {
    /// PostgreSQL asked for a retry (deadlock, serialization failure).
    Retry(tokio_postgres::Error),
    /// Anything else.
    Failed(StoreError),
}

impl From<tokio_postgres::Error> for Attempt {
    fn from(e: tokio_postgres::Error) -> Self {
        if should_retry(&e) {
            Attempt::Retry(e)
        } else {
            Attempt::Failed(pg_err(e))
        }
    }
}

impl PgStore {
    async fn try_commit(
        &self,
        readings: &[&Reading],
        encoded: &[Encoded],
        commit_ms: i64,
    ) -> Result<Vec<bool>, Attempt> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| Attempt::Failed(pg_err(e)))?;
        let tx = client.transaction().await?;
        let sink = tx.copy_in(COPY_STAGING).await?;
        let writer = BinaryCopyInWriter::new(sink, &STAGING_TYPES);
        tokio::pin!(writer);
        for (i, (r, e)) in readings.iter().zip(encoded).enumerate() {
            let idx = i as i32;
            let seq = r.seq.map(|s| s as i64);
            let ts = Timestamp(r.ts_ms);
            let metrics = JsonText(&e.metrics);
            let tags = e.tags.as_deref().map(JsonText);
            writer
                .as_mut()
                .write(&[&idx, &r.device_id.as_str(), &seq, &ts, &metrics, &tags])
                .await?;
        }
        writer.as_mut().finish().await?;
        let inserted = if self.settings.outbox {
            tx.query(INSERT_READINGS_OUTBOX, &[&self.settings.replica])
                .await?
        } else {
            tx.query(INSERT_READINGS, &[]).await?
        };

        // Which readings were new: each returned key claims its first occurrence.
        let mut new_keys: foldhash::HashMap<(&str, i64), u32> = foldhash::HashMap::default();
        for row in &inserted {
            let seq: Option<i64> = row.get(1);
            if let Some(seq) = seq {
                let device: &str = row.get(0);
                *new_keys.entry((device, seq)).or_default() += 1;
            }
        }
        let flags: Vec<bool> = readings
            .iter()
            .map(|r| match r.seq {
                None => true,
                Some(seq) => match new_keys.get_mut(&(r.device_id.as_str(), seq as i64)) {
                    Some(n) if *n > 0 => {
                        *n -= 1;
                        true
                    }
                    _ => false,
                },
            })
            .collect();

        // The device table, in the same transaction, in key order.
        let mut devices: std::collections::BTreeMap<&str, (i64, Latest)> =
            std::collections::BTreeMap::new();
        for (r, _) in readings.iter().zip(&flags).filter(|(_, stored)| **stored) {
            let (last_ts, latest) = devices
                .entry(r.device_id.as_str())
                .or_insert((i64::MIN, Vec::new()));
            *last_ts = (*last_ts).max(r.ts_ms);
            merge_latest(latest, r.ts_ms, &r.metrics);
        }
        if !devices.is_empty() {
            let mut ids = Vec::with_capacity(devices.len());
            let mut max_ts = Vec::with_capacity(devices.len());
            let mut min_ts = Vec::with_capacity(devices.len());
            let mut latest = Vec::with_capacity(devices.len());
            for (id, (ts, values)) in &devices {
                ids.push(*id);
                max_ts.push(*ts);
                min_ts.push(values.iter().map(|v| v.2).min().unwrap_or(*ts));
                latest.push(latest_json(values));
            }
            tx.execute(
                UPSERT_DEVICES,
                &[&commit_ms, &ids, &max_ts, &latest, &min_ts],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(flags)
    }
}

/// A device's latest value of each metric, with the `ts` it was measured at.
type Latest = Vec<(String, MetricValue, i64)>;

/// A device's latest values as the device table keeps them:
/// `{"<metric>": ["<exact JSON text of the value>", <ts ms>], ...}`.
fn latest_json(values: &[(String, MetricValue, i64)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = values
        .iter()
        .map(|(name, value, ts)| {
            let text = serde_json::to_string(value).unwrap_or_default();
            (name.clone(), serde_json::json!([text, ts]))
        })
        .collect();
    serde_json::Value::Object(map).to_string()
}

/// Parses [`latest_json`]'s format.
fn latest_from_json(json: &str) -> Result<Vec<(String, MetricValue, i64)>, String> {
    let pairs: OrderedPairs<(String, i64)> =
        serde_json::from_str(json).map_err(|e| e.to_string())?;
    pairs
        .0
        .into_iter()
        .map(|(name, (text, ts))| {
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            let value = metric_value_from_json(&name, v)?;
            Ok((name, value, ts))
        })
        .collect()
}

impl Store for PgStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn commit(&mut self, readings: &[&Reading], commit_ms: i64) -> Result<Vec<bool>, StoreError> {
        if readings.is_empty() {
            return Ok(Vec::new());
        }
        let encoded: Vec<Encoded> = readings.iter().map(|r| encode(r)).collect();
        let mut attempt = 1;
        loop {
            match self
                .driver
                .block_on(self.try_commit(readings, &encoded, commit_ms))
            {
                Ok(flags) => return Ok(flags),
                Err(Attempt::Retry(e)) if attempt < MAX_ATTEMPTS => {
                    self.metrics
                        .store_commit_retries
                        .with_label_values(&[BACKEND])
                        .inc();
                    tracing::info!(attempt, error = %e, "postgres: commit aborted; retrying");
                    attempt += 1;
                }
                Err(Attempt::Retry(e)) => return Err(pg_err(e)),
                Err(Attempt::Failed(e)) => {
                    // The server may have restarted: the idle connections are likely dead too.
                    forget_idle(&self.pool);
                    forget_idle(&self.reader.pool);
                    return Err(e);
                }
            }
        }
    }

    fn probe(&mut self) -> Result<(), StoreError> {
        forget_idle(&self.pool);
        forget_idle(&self.reader.pool);
        self.driver.block_on(async {
            let client = self.pool.get().await.map_err(pg_err)?;
            let row = client
                .query_one(
                    "SELECT pg_is_in_recovery(),
                            has_table_privilege('readings', 'INSERT'),
                            has_table_privilege('devices', 'INSERT, UPDATE')",
                    &[],
                )
                .await
                .map_err(pg_err)?;
            if row.get::<_, bool>(0) {
                return Err(StoreError::Postgres(
                    "the server is a read-only standby (in recovery)".into(),
                ));
            }
            if !row.get::<_, bool>(1) || !row.get::<_, bool>(2) {
                return Err(StoreError::Postgres(
                    "the user may not insert into readings or update devices".into(),
                ));
            }
            Ok(())
        })
    }

    fn maintain(&mut self) -> Result<(), StoreError> {
        if self.last_health.elapsed() >= HEALTH_INTERVAL {
            self.last_health = Instant::now();
            self.driver.block_on(async {
                let check = async {
                    let client = self.pool.get().await.map_err(pg_err)?;
                    client.simple_query("SELECT 1").await.map_err(pg_err)?;
                    Ok::<_, StoreError>(())
                };
                match tokio::time::timeout(HEALTH_TIMEOUT, check).await {
                    Ok(result) => result,
                    Err(_) => Err(StoreError::Postgres(format!(
                        "no answer to a health check within {HEALTH_TIMEOUT:?}"
                    ))),
                }
            })?;
        }
        if Instant::now() < self.next_retention || self.sweeping.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.next_retention = Instant::now() + self.settings.retention_interval;
        let pool = self.reader.pool.clone();
        let metrics = self.metrics.clone();
        let sweeping = self.sweeping.clone();
        let retention = self.settings.retention;
        self.driver.runtime().spawn(async move {
            let cutoff = now_ms().saturating_sub(retention.as_millis() as i64);
            match sweep(&pool, cutoff, &metrics).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "postgres: retention sweep"),
                Err(e) => {
                    // Every retention interval while the database is away.
                    static SWEEP: crate::telemetry::log_limit::LogLimit =
                        crate::telemetry::log_limit::LogLimit::new();
                    if let Some(suppressed) = SWEEP.event() {
                        tracing::warn!(error = %e, suppressed, "postgres: retention sweep failed");
                    }
                }
            }
            sweeping.store(false, Ordering::Release);
        });
        Ok(())
    }

    fn reader(&self) -> Arc<dyn StoreRead> {
        self.reader.clone()
    }
}

/// Closes every idle pooled connection, so the next use connects afresh (after a failure,
/// the idle ones may be dead without knowing it yet).
fn forget_idle(pool: &Pool) {
    pool.retain(|_, _| false);
}

/// Deletes readings older than `cutoff_ms`, [`RETENTION_DEVICES`] devices per transaction;
/// stops early when another replica holds the sweep lock. Returns how many readings.
async fn sweep(pool: &Pool, cutoff_ms: i64, metrics: &Metrics) -> Result<u64, StoreError> {
    let mut client = pool.get().await.map_err(pg_err)?;
    let mut deleted = 0;
    let mut after = String::new();
    loop {
        let tx = client.transaction().await.map_err(pg_err)?;
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&RETENTION_LOCK])
            .await
            .map_err(pg_err)?
            .get(0);
        if !locked {
            return Ok(deleted);
        }
        // A device with a long expired history may take longer than a query may.
        tx.batch_execute("SET LOCAL statement_timeout = 0")
            .await
            .map_err(pg_err)?;
        let devices: Vec<String> = tx
            .query(
                "SELECT device_id FROM devices WHERE device_id > $1 ORDER BY device_id LIMIT $2",
                &[&after, &RETENTION_DEVICES],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let n = tx
            .execute(
                "DELETE FROM readings WHERE device_id = ANY($1) AND ts < $2",
                &[&devices, &Timestamp(cutoff_ms)],
            )
            .await
            .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        metrics.retention_deleted.inc_by(n);
        deleted += n;
        match devices.last() {
            Some(last) if devices.len() as i64 == RETENTION_DEVICES => after = last.clone(),
            _ => return Ok(deleted),
        }
    }
}

impl PgReader {
    /// The device table: the devices `q` selects, sorted by id. A device whose stored latest
    /// values cannot be read (a row written by hand, say) is listed without them, with a
    /// warning in the log, so one bad row never fails the list or a replica's start.
    fn load_devices(&self, q: &DevicesQuery) -> Result<Vec<DeviceLatest>, StoreError> {
        self.driver.block_on(async {
            let mut client = self.pool.get().await.map_err(pg_err)?;
            let tx = client.transaction().await.map_err(pg_err)?;
            let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
            // The whole table at open may take longer than one query may.
            if q.limit == usize::MAX {
                tx.batch_execute("SET LOCAL statement_timeout = 0")
                    .await
                    .map_err(pg_err)?;
            }
            // LIKE's wildcards cannot occur in a device id except `_`, escaped here.
            let prefix = q
                .prefix
                .as_ref()
                .map(|p| format!("{}%", p.replace('_', "\\_")));
            let glob = q.glob.as_ref().map(DeviceGlob::to_like);
            let rows = tx
                .query(
                    "SELECT device_id, last_seen_ms, last_ts_ms, latest::text FROM devices
                     WHERE ($1::text IS NULL OR device_id = $1)
                       AND ($2::text IS NULL OR device_id LIKE $2)
                       AND ($3::text IS NULL OR device_id > $3)
                       AND ($5::text IS NULL OR device_id LIKE $5)
                     ORDER BY device_id LIMIT $4",
                    &[&q.device, &prefix, &q.after, &limit, &glob],
                )
                .await
                .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)?;
            Ok(rows
                .iter()
                .map(|row| {
                    let device_id: String = row.get(0);
                    let latest: &str = row.get(3);
                    let metrics = latest_from_json(latest).unwrap_or_else(|e| {
                        // At every listing that includes the row.
                        static LATEST: crate::telemetry::log_limit::LogLimit =
                            crate::telemetry::log_limit::LogLimit::new();
                        if let Some(suppressed) = LATEST.event() {
                            tracing::warn!(device = %device_id, error = %e, suppressed, "postgres: unreadable devices.latest; listed without latest values");
                        }
                        Vec::new()
                    });
                    DeviceLatest {
                        device_id,
                        last_seen_ms: row.get(1),
                        last_ts_ms: row.get(2),
                        metrics,
                    }
                })
                .collect())
        })
    }
}

impl StoreRead for PgReader {
    fn readings(&self, q: &ReadingsQuery) -> Result<Option<Vec<StoredRow>>, StoreError> {
        let sql = match q.order {
            Order::Asc => {
                "SELECT rid, ts, seq, metrics::text, tags::text FROM readings
                 WHERE device_id = $1 AND ts >= $2 AND ts < $3
                   AND ($4::text IS NULL OR metrics -> $4 IS NOT NULL)
                   AND ($6::bigint IS NULL OR (ts, rid) > ($7, $6))
                 ORDER BY ts, rid LIMIT $5"
            }
            Order::Desc => {
                "SELECT rid, ts, seq, metrics::text, tags::text FROM readings
                 WHERE device_id = $1 AND ts >= $2 AND ts < $3
                   AND ($4::text IS NULL OR metrics -> $4 IS NOT NULL)
                   AND ($6::bigint IS NULL OR (ts, rid) < ($7, $6))
                 ORDER BY ts DESC, rid DESC LIMIT $5"
            }
        };
        self.driver.block_on(async {
            let client = self.pool.get().await.map_err(pg_err)?;
            let limit = q.limit as i64;
            let (from_ms, to_ms) = q.ts_range();
            // The cursor's rid is the column's own bigint, given back bit for bit.
            let after_rid = q.after.map(|(_, rid)| rid as i64);
            let after_ts = Timestamp(q.after.map_or(0, |(ts, _)| ts));
            let rows = client
                .query(
                    sql,
                    &[
                        &q.device_id,
                        &Timestamp(from_ms),
                        &Timestamp(to_ms),
                        &q.metric,
                        &limit,
                        &after_rid,
                        &after_ts,
                    ],
                )
                .await
                .map_err(pg_err)?;
            if rows.is_empty() {
                let known = client
                    .query_opt(
                        "SELECT 1 FROM devices WHERE device_id = $1",
                        &[&q.device_id],
                    )
                    .await
                    .map_err(pg_err)?;
                return Ok(known.map(|_| Vec::new()));
            }
            let rows = rows
                .iter()
                .map(|row| stored_row(row, 0))
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(Some(q.finish(rows)))
        })
    }

    fn devices(&self, q: &DevicesQuery) -> Option<Result<Vec<DeviceLatest>, StoreError>> {
        Some(self.load_devices(q))
    }

    fn aggregate(
        &self,
        q: &crate::store::rollup::AggQuery,
    ) -> Result<Option<crate::store::rollup::AggAnswer>, StoreError> {
        self.aggregate_raw(q)
    }

    fn outbox(&self) -> Option<Arc<dyn crate::store::Outbox>> {
        self.outbox
            .clone()
            .map(|o| o as Arc<dyn crate::store::Outbox>)
    }

    fn alert_states(&self) -> Result<Vec<crate::store::AlertRow>, StoreError> {
        self.load_alert_states()
    }

    fn apply_alert_changes(
        &self,
        changes: &[crate::store::AlertChange],
    ) -> Result<Vec<bool>, StoreError> {
        self.apply_alerts(changes)
    }

    fn create_token(&self, row: &crate::store::TokenRow) -> Result<(), StoreError> {
        self.insert_token(row)
    }

    fn tokens(&self) -> Result<Vec<crate::store::TokenRow>, StoreError> {
        self.list_tokens()
    }

    fn token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<crate::store::TokenRow>, StoreError> {
        self.find_token(hash)
    }

    fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        self.revoke(id)
    }

    fn revoked_tokens_since(&self, since_ms: i64) -> Result<Vec<(String, i64)>, StoreError> {
        self.revoked_since(since_ms)
    }

    fn touch_tokens(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        self.touch(used)
    }
}

/// A reading from a row whose columns, from `first` on, are `rid, ts, seq, metrics::text,
/// tags::text` (as `readings` and `outbox` keep them).
fn stored_row(row: &tokio_postgres::Row, first: usize) -> Result<StoredRow, StoreError> {
    let rid: i64 = row.get(first);
    let corrupt = |e: String| StoreError::Corrupt(format!("reading {rid}: {e}"));
    let ts: Timestamp = row.get(first + 1);
    let seq: Option<i64> = row.get(first + 2);
    let metrics: &str = row.get(first + 3);
    let tags: Option<&str> = row.get(first + 4);
    Ok(StoredRow {
        rid: rid as u64,
        ts_ms: ts.0,
        seq: seq.map(|s| s as u64),
        metrics: metrics_from_json(metrics).map_err(corrupt)?,
        tags: match tags {
            Some(t) => tags_from_json(t).map_err(corrupt)?,
            None => Vec::new(),
        },
    })
}

/// A `timestamptz` as Unix epoch milliseconds (PostgreSQL keeps microseconds since
/// 2000-01-01; Sluice's readings have millisecond precision, SPEC §1). A bound beyond
/// PostgreSQL's range is sent as `-infinity` / `infinity`.
#[derive(Debug, Clone, Copy)]
struct Timestamp(i64);

impl ToSql for Timestamp {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        // Past the ends of i64 microseconds, PostgreSQL's own -infinity and infinity (i64::MIN,
        // i64::MAX): an open query bound. Readings' ts are validated far inside (SPEC §1).
        let micros = match self.0.saturating_sub(PG_EPOCH_MS).saturating_mul(1000) {
            m if m < PG_MIN_MICROS => i64::MIN,
            m if m >= PG_END_MICROS => i64::MAX,
            m => m,
        };
        out.put_i64(micros);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }

    tokio_postgres::types::to_sql_checked!();
}

impl<'a> FromSql<'a> for Timestamp {
    fn from_sql(_ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        let bytes: [u8; 8] = raw.try_into().map_err(|_| "timestamptz is not 8 bytes")?;
        let micros = i64::from_be_bytes(bytes);
        Ok(Timestamp(micros.div_euclid(1000) + PG_EPOCH_MS))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }
}

/// JSON text sent as `json` (as is) or `jsonb` (format version 1, then the text).
#[derive(Debug)]
struct JsonText<'a>(&'a str);

impl ToSql for JsonText<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        if *ty == Type::JSONB {
            out.put_u8(1);
        }
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSON || *ty == Type::JSONB
    }

    tokio_postgres::types::to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_round_trips_exact_values() {
        let values = vec![
            ("u".to_string(), MetricValue::UInt(u64::MAX), 5),
            ("f".to_string(), MetricValue::Float(1e19), 6),
            ("i".to_string(), MetricValue::Int(-3), 7),
            ("b".to_string(), MetricValue::Bool(true), 8),
        ];
        // jsonb keeps its own key order; the values and their ts are what must match.
        let sorted = |mut v: Vec<(String, MetricValue, i64)>| {
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let back = latest_from_json(&latest_json(&values)).unwrap();
        assert_eq!(sorted(back), sorted(values));
    }

    #[test]
    fn timestamps_convert_both_ways() {
        for ms in [
            0,
            PG_EPOCH_MS,
            PG_EPOCH_MS - 1,
            1_790_000_000_123,
            -86_400_001,
        ] {
            let mut buf = BytesMut::new();
            Timestamp(ms).to_sql(&Type::TIMESTAMPTZ, &mut buf).unwrap();
            let back = Timestamp::from_sql(&Type::TIMESTAMPTZ, &buf).unwrap();
            assert_eq!(back.0, ms);
        }
        // Beyond PostgreSQL's range: -infinity and infinity.
        for (ms, micros) in [
            (i64::MIN, i64::MIN),
            (-9_000_000_000_000_000, i64::MIN),
            (9_224_318_100_000_000, i64::MAX),
            (i64::MAX, i64::MAX),
        ] {
            let mut buf = BytesMut::new();
            Timestamp(ms).to_sql(&Type::TIMESTAMPTZ, &mut buf).unwrap();
            assert_eq!(buf.as_ref(), micros.to_be_bytes(), "{ms}");
        }
    }

    #[test]
    fn schema_version_is_the_newest_migration() {
        assert_eq!(schema_version(), 6);
    }
}
