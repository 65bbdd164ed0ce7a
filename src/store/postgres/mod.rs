//! The PostgreSQL backend (`storage.backend = "postgres"`, SPEC §13): batcher → services →
//! **store** → ack, where the store is one database shared by every replica.
//!
//! - **Commit.** One transaction per group commit, or two side by side on their own
//!   connections when it holds [`SHARD_MIN_READINGS`] or more, split by a hash of the device
//!   id ([`COMMIT_SHARDS`]). Each locks its devices' rows (`SELECT … FOR UPDATE` in id order,
//!   inserting rows for new devices first), decides which readings are new against each row's
//!   seq high-water mark and, for seqs at or below it, the device's chunks; binary-`COPY`s one
//!   `chunks` row per device and minute holding the new readings in the embedded store's chunk
//!   format ([`chunks`]); and updates the device rows (latest values merged here, under the
//!   lock). The ack follows `COMMIT` (of every shard).
//! - **Order.** Device rows are locked in id order, so replicas committing overlapping
//!   devices wait rather than deadlock; a deadlock or serialization failure that happens
//!   anyway is retried (up to [`MAX_ATTEMPTS`] times).
//! - **Unknown outcome.** A connection lost during `COMMIT` is an error: not acked. If it did
//!   commit, the client's retry finds its readings as duplicates.
//! - **Schema.** Versioned migrations (`migrations/`, run by refinery at open) under a
//!   session advisory lock, so replicas starting together migrate once.
//! - **Retention** deletes expired minutes of chunks a few hundred devices per transaction,
//!   from a background task, one replica at a time (a transaction-scoped advisory lock).
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
    merge_latest, metric_value_from_json, metrics_from_json, seq_key, tags_from_json, DeviceGlob,
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
mod chunks;
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

/// Locks the commit's device rows, in id order (so replicas committing overlapping devices
/// lock them in the same order), and reads what the commit decides against: the seq
/// high-water mark (a [`seq_key`]), the newest ts and the latest values.
const LOCK_DEVICES: &str = "SELECT device_id, max_seq, last_ts_ms, latest FROM devices
     WHERE device_id = ANY($1) ORDER BY device_id FOR UPDATE";

/// Rows for devices not known to exist, in id order, inserted before [`LOCK_DEVICES`] locks
/// them with the others. Filled in by [`UPDATE_DEVICES`] before the same commit ends; another
/// replica that inserts the same device at the same time waits for this transaction, then
/// skips it.
const INSERT_DEVICES: &str = "INSERT INTO devices (device_id, last_seen_ms, last_ts_ms, latest)
     SELECT id, 0, -9223372036854775808, '{}' FROM unnest($1::text[]) AS u(id) ORDER BY id
     ON CONFLICT (device_id) DO NOTHING";

/// Which of these `(device, seq key)` pairs a stored chunk already holds: the dedupe of
/// readings at or below their device's high-water mark (late ones and re-sends). The device
/// rows are locked, so every chunk of these devices committed before is visible. A lateral
/// subquery per pair: an index scan of `chunks_device_seq` over the max_seqs from the seq to
/// the end of its block (`k | 15`), at most 16 chunks (see `chunks::SEQ_BLOCK_BITS`). (As a
/// semi-join the planner scanned the whole table; bounded by `max_seq >= k` alone, a back-fill
/// read every chunk above the seq.)
const STORED_SEQS: &str = "SELECT q.id, q.k FROM unnest($1::text[], $2::int8[]) AS q(id, k)
     CROSS JOIN LATERAL (SELECT 1 FROM chunks c
                         WHERE c.device_id = q.id AND c.max_seq >= q.k
                           AND c.max_seq <= (q.k | $3) AND c.min_seq <= q.k
                           AND (q.k # (-9223372036854775808)) = ANY (c.seqs)
                         LIMIT 1) AS hit";

/// The device rows after the commit, as Sluice merged them under the row locks.
const UPDATE_DEVICES: &str = "UPDATE devices AS d SET
         last_seen_ms = greatest(d.last_seen_ms, $1),
         last_ts_ms = u.last_ts,
         latest = u.latest,
         max_seq = u.max_seq
     FROM unnest($2::text[], $3::int8[], $4::text[], $5::int8[])
         AS u(id, last_ts, latest, max_seq)
     WHERE d.device_id = u.id";

/// The NATS outbox rows of a commit's new readings, in rid order.
const COPY_OUTBOX: &str =
    "COPY outbox (rid, device_id, seq, ts, metrics, tags, origin) FROM STDIN (FORMAT binary)";

const OUTBOX_TYPES: [Type; 7] = [
    Type::INT8,
    Type::TEXT,
    Type::INT8,
    Type::TIMESTAMPTZ,
    Type::JSON,
    Type::JSON,
    Type::TEXT,
];

/// Transactions one group commit is split into, by a hash of the device id, committed side by
/// side on their own connections: their device sets are disjoint, so they never wait for each
/// other, and PostgreSQL works on them with as many backends (one core each). Shards of
/// successive commits meet on the same devices and follow each other in lock order.
const COMMIT_SHARDS: usize = 2;

/// A commit of fewer readings stays one transaction.
const SHARD_MIN_READINGS: usize = 256;

/// Readings one commit may number: its rids are `commit number × 2^24 + position`.
const COMMIT_RIDS: usize = 1 << 24;

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
    /// The commits' own connections (one per shard of a commit, and the health check).
    pool: Pool,
    /// Hashes of the device ids known to have a row (read at open, or committed since): a
    /// commit inserts the rows of the others before it locks any, so that all its locks are
    /// taken in id order. A hash collision only sends a new device down the slower path that
    /// inserts after locking (deadlock-prone with other replicas, retried).
    known: std::sync::Mutex<foldhash::HashSet<u64>>,
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
        let commit_setup = format!("SET statement_timeout = {timeout_ms}");
        let query_setup = format!("SET statement_timeout = {timeout_ms}");
        let pool = build_pool(&config, COMMIT_SHARDS + 1, pg.connect_timeout, commit_setup)?;
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
                known: std::sync::Mutex::new(
                    devices.iter().map(|d| id_hash(&d.device_id)).collect(),
                ),
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
    let mut report = runner
        .run_async(&mut client)
        .await
        .map_err(|e| StoreError::Postgres(format!("schema migration failed: {}", pg_err(e))));
    // Version 6's rows into chunks (once; version 7 renamed their table), still under the lock.
    if report.is_ok() && target.is_none_or(|v| v >= 7) {
        match chunks::convert_v6(&mut client).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                readings = n,
                "postgres: moved version 6 readings into chunks"
            ),
            Err(e) => report = Err(e),
        }
    }
    // Closing the connection releases the lock in any case; unlocking is only tidier.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    drop(client);
    let _ = connection.await;
    for m in report?.applied_migrations() {
        tracing::info!(version = m.version(), name = m.name(), "postgres: migrated");
    }
    Ok(())
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

/// A device id's hash in [`PgStore::known`].
fn id_hash(id: &str) -> u64 {
    std::hash::BuildHasher::hash_one(&foldhash::fast::FixedState::with_seed(0), id)
}

/// What one commit knows and decides about one of its devices.
struct DeviceCommit {
    /// The locked row's seq high-water mark (a [`seq_key`]), `None` before any seq.
    max_seq: Option<i64>,
    /// The locked row's newest ts, raised by the new readings.
    last_ts: i64,
    /// The locked row's latest values as stored, parsed only if the device gets new readings.
    stored_latest: String,
    /// The new readings, numbered.
    new: Vec<StoredRow>,
    /// Positions in the commit of readings whose seq is at or below `max_seq`: stored already
    /// unless no chunk holds them.
    late: Vec<usize>,
}

impl PgStore {
    async fn try_commit(
        &self,
        readings: &[&Reading],
        commit_ms: i64,
    ) -> Result<Vec<bool>, Attempt> {
        if readings.len() > COMMIT_RIDS {
            return Err(Attempt::Failed(StoreError::Postgres(format!(
                "a commit of {} readings is over the {COMMIT_RIDS} one commit can number",
                readings.len()
            ))));
        }
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| Attempt::Failed(pg_err(e)))?;
        let tx = client.transaction().await?;
        // Prepared once per connection: each statement is then one round trip, not two.
        let lock_devices = tx.prepare_cached(LOCK_DEVICES).await?;

        // Lock every device of the commit, in id order, and draw the commit's number, in one
        // round trip.
        let mut ids: Vec<&str> = readings.iter().map(|r| r.device_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        // Rows for devices not known to exist, inserted before any lock is taken (in id
        // order, like the locks): a row inserted after locking others could be one another
        // replica has just inserted and locked, and the two would deadlock.
        let unknown: Vec<&str> = {
            let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            ids.iter()
                .copied()
                .filter(|id| !known.contains(&id_hash(id)))
                .collect()
        };
        if !unknown.is_empty() {
            let insert = tx.prepare_cached(INSERT_DEVICES).await?;
            tx.execute(&insert, &[&unknown]).await?;
        }
        let next_commit = tx
            .prepare_cached("SELECT nextval('reading_commits')")
            .await?;
        let lock_params: [&(dyn ToSql + Sync); 1] = [&ids];
        let (locked, number) = tokio::join!(
            tx.query(&lock_devices, &lock_params),
            tx.query_one(&next_commit, &[])
        );
        let mut locked = locked?;
        let rid_base = number?.get::<_, i64>(0).saturating_mul(COMMIT_RIDS as i64);
        if locked.len() < ids.len() {
            // Only after a hash collision in `known`: insert after locking.
            let found: foldhash::HashSet<&str> = locked.iter().map(|r| r.get(0)).collect();
            let missing: Vec<&str> = ids
                .iter()
                .copied()
                .filter(|id| !found.contains(id))
                .collect();
            let insert = tx.prepare_cached(INSERT_DEVICES).await?;
            tx.execute(&insert, &[&missing]).await?;
            locked.extend(tx.query(&lock_devices, &[&missing]).await?);
        }
        let mut devices: foldhash::HashMap<&str, DeviceCommit> =
            foldhash::HashMap::with_capacity_and_hasher(ids.len(), Default::default());
        for row in &locked {
            let Ok(at) = ids.binary_search(&row.get::<_, &str>(0)) else {
                continue;
            };
            devices.insert(
                ids[at],
                DeviceCommit {
                    max_seq: row.get(1),
                    last_ts: row.get(2),
                    stored_latest: row.get(3),
                    new: Vec::new(),
                    late: Vec::new(),
                },
            );
        }

        // Which readings are new: above the high-water mark, or not in any chunk; the first
        // of equal keys in the commit wins, as in every backend.
        let mut flags = vec![false; readings.len()];
        let mut seen: foldhash::HashSet<(&str, u64)> =
            foldhash::HashSet::with_capacity_and_hasher(readings.len(), Default::default());
        for (i, r) in readings.iter().enumerate() {
            let id = r.device_id.as_str();
            let Some(device) = devices.get_mut(id) else {
                return Err(Attempt::Failed(StoreError::Postgres(format!(
                    "device {id} has no row after it was inserted"
                ))));
            };
            match r.seq {
                Some(seq) if !seen.insert((id, seq)) => {}
                Some(seq) if device.max_seq.is_some_and(|m| seq_key(seq) <= m) => {
                    device.late.push(i)
                }
                _ => flags[i] = true,
            }
        }
        let late: Vec<(&str, i64)> = devices
            .iter()
            .flat_map(|(id, d)| {
                d.late
                    .iter()
                    .map(|&i| (*id, seq_key(readings[i].seq.unwrap_or(0))))
            })
            .collect();
        if !late.is_empty() {
            let (late_ids, late_keys): (Vec<&str>, Vec<i64>) = late.into_iter().unzip();
            let block_mask: i64 = (1 << chunks::SEQ_BLOCK_BITS) - 1;
            let stored_seqs = tx.prepare_cached(STORED_SEQS).await?;
            let stored: foldhash::HashSet<(String, i64)> = tx
                .query(&stored_seqs, &[&late_ids, &late_keys, &block_mask])
                .await?
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect();
            for d in devices.values() {
                for &i in &d.late {
                    let r = readings[i];
                    let key = (r.device_id.to_string(), seq_key(r.seq.unwrap_or(0)));
                    flags[i] = !stored.contains(&key);
                }
            }
        }

        // The new readings, numbered in commit order.
        for (i, r) in readings.iter().enumerate().filter(|(i, _)| flags[*i]) {
            if let Some(d) = devices.get_mut(r.device_id.as_str()) {
                d.new.push(StoredRow {
                    rid: (rid_base + i as i64) as u64,
                    ts_ms: r.ts_ms,
                    seq: r.seq,
                    metrics: r.metrics.clone(),
                    tags: r.tags.clone(),
                });
            }
        }
        if self.settings.outbox {
            self.copy_outbox(&tx, readings, &flags, rid_base).await?;
        }
        // Chunks per device and minute, each sent as soon as it is encoded, so PostgreSQL
        // inserts while Sluice encodes the next; device rows merged on the way.
        let copy = tx.prepare_cached(chunks::COPY_CHUNKS).await?;
        let mut writer = chunks::Writer::new(tx.copy_in(&copy).await?);
        let mut update = DeviceUpdate::default();
        let mut chunk_rows = Vec::new();
        for id in &ids {
            let Some(d) = devices.remove(id) else {
                continue;
            };
            if d.new.is_empty() {
                continue;
            }
            // A row written by hand that does not parse starts afresh, said in the log.
            let mut latest = latest_from_json(&d.stored_latest).unwrap_or_else(|e| {
                static LATEST: crate::telemetry::log_limit::LogLimit =
                    crate::telemetry::log_limit::LogLimit::new();
                if let Some(suppressed) = LATEST.event() {
                    tracing::warn!(device = %id, error = %e, suppressed, "postgres: unreadable devices.latest; replaced by this commit's values");
                }
                Vec::new()
            });
            let mut last_ts = d.last_ts;
            let mut max_seq = d.max_seq;
            for r in &d.new {
                last_ts = last_ts.max(r.ts_ms);
                merge_latest(&mut latest, r.ts_ms, &r.metrics);
                if let Some(seq) = r.seq {
                    max_seq = max_seq.max(Some(seq_key(seq)));
                }
            }
            update.ids.push(*id);
            update.last_ts.push(last_ts);
            update.latest.push(latest_json(&latest));
            update.max_seq.push(max_seq);
            chunk_rows.clear();
            chunks::build(id, d.new, &mut chunk_rows);
            for c in &chunk_rows {
                writer.write(c).await?;
            }
        }
        writer.finish().await?;
        if !update.ids.is_empty() {
            let update_devices = tx.prepare_cached(UPDATE_DEVICES).await?;
            tx.execute(
                &update_devices,
                &[
                    &commit_ms,
                    &update.ids,
                    &update.last_ts,
                    &update.latest,
                    &update.max_seq,
                ],
            )
            .await?;
        }
        tx.commit().await?;
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(ids.iter().map(|id| id_hash(id)));
        Ok(flags)
    }

    /// Commits one shard of a group commit, retrying what PostgreSQL asks to retry.
    async fn commit_shard(
        &self,
        readings: &[&Reading],
        commit_ms: i64,
    ) -> Result<Vec<bool>, StoreError> {
        let mut attempt = 1;
        loop {
            match self.try_commit(readings, commit_ms).await {
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
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
    }

    /// Copies a commit's new readings into the NATS outbox, in the same transaction.
    async fn copy_outbox(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        readings: &[&Reading],
        flags: &[bool],
        rid_base: i64,
    ) -> Result<(), tokio_postgres::Error> {
        let copy = tx.prepare_cached(COPY_OUTBOX).await?;
        let sink = tx.copy_in(&copy).await?;
        let writer = BinaryCopyInWriter::new(sink, &OUTBOX_TYPES);
        tokio::pin!(writer);
        for (i, r) in readings.iter().enumerate().filter(|(i, _)| flags[*i]) {
            let e = encode(r);
            let rid = rid_base + i as i64;
            let seq = r.seq.map(|s| s as i64);
            let tags = e.tags.as_deref().map(JsonText);
            writer
                .as_mut()
                .write(&[
                    &rid,
                    &r.device_id.as_str(),
                    &seq,
                    &Timestamp(r.ts_ms),
                    &JsonText(&e.metrics),
                    &tags,
                    &self.settings.replica,
                ])
                .await?;
        }
        writer.as_mut().finish().await?;
        Ok(())
    }
}

/// The `UPDATE_DEVICES` parameters, one entry per device with new readings, in id order.
#[derive(Default)]
struct DeviceUpdate<'a> {
    ids: Vec<&'a str>,
    last_ts: Vec<i64>,
    latest: Vec<String>,
    max_seq: Vec<Option<i64>>,
}

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
        // Shards by device, committed side by side on their own connections (see
        // [`COMMIT_SHARDS`]); a commit of few devices stays one transaction.
        let shards = if readings.len() >= SHARD_MIN_READINGS {
            COMMIT_SHARDS
        } else {
            1
        };
        let mut parts: Vec<(Vec<usize>, Vec<&Reading>)> = vec![Default::default(); shards];
        for (i, r) in readings.iter().enumerate() {
            let shard = (id_hash(r.device_id.as_str()) as usize) % shards;
            parts[shard].0.push(i);
            parts[shard].1.push(r);
        }
        let results = self.driver.block_on(futures_util::future::join_all(
            parts
                .iter()
                .filter(|(at, _)| !at.is_empty())
                .map(|(_, part)| self.commit_shard(part, commit_ms)),
        ));
        let mut flags = vec![false; readings.len()];
        let mut failed = None;
        for ((at, _), result) in parts.iter().filter(|(at, _)| !at.is_empty()).zip(results) {
            match result {
                Ok(part_flags) => {
                    for (i, stored) in at.iter().zip(part_flags) {
                        flags[*i] = stored;
                    }
                }
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            None => Ok(flags),
            // What the other shards committed is stored and not acked: retries find it as
            // duplicates, as after a commit whose outcome is unknown.
            Some(e) => {
                // The server may have restarted: the idle connections are likely dead too.
                forget_idle(&self.pool);
                forget_idle(&self.reader.pool);
                Err(e)
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
                            has_table_privilege('chunks', 'INSERT'),
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
                    "the user may not insert into chunks or update devices".into(),
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
        // Whole minutes: a reading outlives the cutoff by less than a minute.
        let n: i64 = tx
            .query_one(
                "WITH gone AS (DELETE FROM chunks WHERE device_id = ANY($1) AND bucket < $2
                               RETURNING n)
                 SELECT coalesce(sum(n), 0)::int8 FROM gone",
                &[&devices, &chunks::bucket_of(cutoff_ms)],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        let n = n as u64;
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
        let (from_ms, to_ms) = q.ts_range();
        let dir = match q.order {
            Order::Asc => chunks::Direction::Forward,
            Order::Desc => chunks::Direction::Backward,
        };
        self.driver.block_on(async {
            let mut client = self.pool.get().await.map_err(pg_err)?;
            // One snapshot for every page of chunks.
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg_err)?;
            let mut rows = Vec::new();
            if from_ms < to_ms {
                // Chunks come a minute at a time in the asked order; once a new minute comes
                // up, every wanted reading before it is final, so `limit` of those suffice.
                let mut current = None;
                let range = (chunks::bucket_of(from_ms), chunks::bucket_of(to_ms - 1));
                chunks::walk(&tx, &q.device_id, range, dir, |bucket, chunk| {
                    if current != Some(bucket) {
                        if rows.len() >= q.limit {
                            return false;
                        }
                        current = Some(bucket);
                    }
                    rows.extend(chunk.into_iter().filter(|r| {
                        q.wanted(r.ts_ms, r.rid)
                            && q.metric
                                .as_ref()
                                .is_none_or(|m| r.metrics.iter().any(|(n, _)| n == m))
                    }));
                    true
                })
                .await?;
            }
            if rows.is_empty() {
                let known = tx
                    .query_opt(
                        "SELECT 1 FROM devices WHERE device_id = $1",
                        &[&q.device_id],
                    )
                    .await
                    .map_err(pg_err)?;
                tx.commit().await.map_err(pg_err)?;
                return Ok(known.map(|_| Vec::new()));
            }
            tx.commit().await.map_err(pg_err)?;
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
/// tags::text` (as `outbox` keeps them).
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
        assert_eq!(schema_version(), 7);
    }
}
