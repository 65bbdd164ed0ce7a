//! Stores: the durable end of the pipeline. batcher → services → **store** → ack. Only after a
//! store commit is anything acknowledged (SPEC §2).
//!
//! This module is the store *interface*: the writer, queries and start-up go through
//! [`Store`], [`StoreRead`] and [`open`], whose types carry no backend's details. Backends:
//! - [`sqlite`]: the embedded default for a single machine. A journal for the commit,
//!   compaction into compressed per-device chunks in the background (see ARCHITECTURE.md).
//! - [`postgres`]: one PostgreSQL database shared by stateless replicas (SPEC §13). Each group
//!   commit is one transaction; dedupe is the database's unique key.
//!
//! Every backend must pass the conformance suite in `tests/store_conformance.rs`.

pub mod postgres;
pub mod rollup;
pub mod sqlite;

use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::config::{Backend, StorageSettings};
use crate::reading::{format_ts, MetricValue, PairsAsMap, Reading};
use crate::telemetry::metrics::Metrics;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// A store operation that failed. The pipeline answers 503 and never acks on any of these.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory or database could not be created or opened.
    #[error("cannot open {path}: {reason}")]
    Open {
        /// The database file or directory.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// SQLite refused a statement.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL could not be reached, or refused a statement or the commit. A commit whose
    /// connection dropped during `COMMIT` lands here too: its outcome is unknown, so it is not
    /// acked, and a retry finds its readings as duplicates if it did commit.
    #[error("postgres: {0}")]
    Postgres(String),
    /// Writing or syncing the journal failed (the message names the file).
    #[error("journal: {0}")]
    Journal(String),
    /// Stored bytes could not be decoded (a damaged file, or a bug).
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    /// The database was written by a newer Sluice (schema version too high).
    #[error("database schema version {found} is newer than this Sluice supports ({supported})")]
    TooNew {
        /// Version found in the file.
        found: i64,
        /// Highest version this build knows.
        supported: i64,
    },
    /// Compaction is behind: the journal holds `storage.journal_max_readings`. The commit is
    /// refused (503, retry later) but the store stays up.
    #[error(
        "journal full: {held} readings wait for compaction (storage.journal_max_readings = {max})"
    )]
    JournalFull {
        /// Uncompacted readings now.
        held: u64,
        /// The limit.
        max: u64,
    },
    /// The store has not been opened yet (or could not be).
    #[error("store not open")]
    NotOpen,
}

impl StoreError {
    /// Whether the store itself is fine and only this commit was refused for load.
    pub fn is_overload(&self) -> bool {
        matches!(self, StoreError::JournalFull { .. })
    }
}

/// The write side of a backend, owned by the store writer task and only used on a blocking
/// thread.
pub trait Store: Send + 'static {
    /// The backend's name: the `store` label of `sluice_store_*` metrics.
    fn backend(&self) -> &'static str;

    /// Makes `readings` durable, in one group commit at server time `commit_ms` (epoch ms,
    /// kept as each device's `last_seen`). Returns, per reading and in order, `true` if it
    /// was stored and `false` if it duplicated a committed `(device_id, seq)` (including an
    /// earlier reading of this same call). On error nothing is committed.
    fn commit(&mut self, readings: &[&Reading], commit_ms: i64) -> Result<Vec<bool>, StoreError>;

    /// A write that touches the disk, to learn whether a failed store has recovered.
    fn probe(&mut self) -> Result<(), StoreError>;

    /// Periodic upkeep on the writer's thread, between commits (about once a second): e.g.
    /// sealing a journal generation that has reached its age. Must be quick.
    fn maintain(&mut self) -> Result<(), StoreError>;

    /// A handle for queries, usable from any thread while the store runs.
    fn reader(&self) -> Arc<dyn StoreRead>;
}

/// The read side of a backend.
pub trait StoreRead: Send + Sync {
    /// Runs a readings query. `Ok(None)` when the device has never been stored.
    fn readings(&self, q: &ReadingsQuery) -> Result<Option<Vec<StoredRow>>, StoreError>;

    /// Runs an aggregation query (SPEC §12, [`rollup`]): the non-empty buckets of the range,
    /// from a rollup level where the step allows it, else from raw readings; or
    /// [`rollup::AggAnswer::TooManyBuckets`] before reading anything. `Ok(None)` when the
    /// device has never been stored.
    fn aggregate(&self, q: &rollup::AggQuery) -> Result<Option<rollup::AggAnswer>, StoreError>;

    /// The device table, for a backend whose device state every replica shares: the devices
    /// `q` selects, sorted by id. `None` when the backend keeps no shared table, and the
    /// device-state service (memory) answers.
    fn devices(&self, _q: &DevicesQuery) -> Option<Result<Vec<DeviceLatest>, StoreError>> {
        None
    }

    /// The outbox of committed readings not yet published to NATS, when the store keeps one
    /// (`storage.outbox`, set by `nats.enabled`).
    fn outbox(&self) -> Option<Arc<dyn Outbox>> {
        None
    }

    /// Every persisted alert state: the (rule, device)s that were pending or firing (SPEC §12).
    /// Read once by the rule engine at start, so that a restart neither announces a firing
    /// alert again nor forgets a pending one.
    fn alert_states(&self) -> Result<Vec<AlertRow>, StoreError>;

    /// Applies the rule engine's state changes in one transaction and says, per change,
    /// whether it took effect: a [`AlertChange::Set`] unless the stored row already has that
    /// state (or is `firing` and the change is to `pending`), a [`AlertChange::Clear`] if a
    /// row in state `was` was deleted. With a database shared by replicas, only the replica
    /// whose change took effect announces the event.
    fn apply_alert_changes(&self, changes: &[AlertChange]) -> Result<Vec<bool>, StoreError>;

    /// Stores a new access token (SPEC §11): its SHA-256, never the secret.
    fn create_token(&self, row: &TokenRow) -> Result<(), StoreError>;

    /// Every token not revoked, oldest first, for `GET /v1/admin/tokens`.
    fn tokens(&self) -> Result<Vec<TokenRow>, StoreError>;

    /// The token whose secret hashes to `hash`, revoked or not (`revoked_ms` says). One index
    /// lookup whatever the answer, so an unknown and a revoked token take the same path.
    fn token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<TokenRow>, StoreError>;

    /// Revokes the active token `id` at the store's clock; `false` if there is none.
    fn revoke_token(&self, id: &str) -> Result<bool, StoreError>;

    /// Tokens revoked at or after `since_ms` (the store's clock), as `(id, revoked_ms)`: how a
    /// replica learns of revocations made on another one.
    fn revoked_tokens_since(&self, since_ms: i64) -> Result<Vec<(String, i64)>, StoreError>;

    /// Records when tokens were last used, `(id, epoch ms)`, keeping the later of the stored
    /// and the given time. Called in batches, never once per request.
    fn touch_tokens(&self, used: &[(String, i64)]) -> Result<(), StoreError>;
}

/// An access token as the store keeps it (SPEC §11): table `tokens` (SQLite: schema version 4;
/// PostgreSQL: migration `V6__tokens.sql`). The secret itself is never stored, only its
/// SHA-256, so a copy of the database grants nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    /// Public id (`tok_…`), for listing and revoking.
    pub id: String,
    /// SHA-256 of the secret.
    pub hash: [u8; 32],
    /// The administrator's name for it.
    pub name: String,
    /// `write` or `read`.
    pub scope: String,
    /// Glob of the device ids it may write (and, for `write`, read).
    pub devices: String,
    /// Creation time, epoch ms.
    pub created_ms: i64,
    /// Last use, epoch ms, to within the access layer's flush interval; none if never used.
    pub last_used_ms: Option<i64>,
    /// Revocation time (the store's clock), epoch ms; none while active.
    pub revoked_ms: Option<i64>,
}

/// A (rule, device) that is not inactive (SPEC §12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    /// The condition holds, for less than `for` so far.
    Pending,
    /// The rule fired and has not resolved.
    Firing,
}

impl AlertState {
    /// `pending` or `firing`: the `state` label of `sluice_alerts`, and the stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Pending => "pending",
            AlertState::Firing => "firing",
        }
    }

    /// Parses [`AlertState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(AlertState::Pending),
            "firing" => Some(AlertState::Firing),
            _ => None,
        }
    }
}

/// One persisted alert state: table `alert_states` (SQLite: created by the first rule engine
/// that runs; PostgreSQL: migration `V5__alert_states.sql`).
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRow {
    /// Rule name.
    pub rule: String,
    /// Device id.
    pub device_id: String,
    /// Pending or firing.
    pub state: AlertState,
    /// Server time (epoch ms) the condition began to hold (absence: the device's last commit).
    pub since_ms: i64,
    /// Server time it fired; 0 while pending.
    pub fired_ms: i64,
    /// The value that put it in this state (none for absence rules).
    pub value: Option<MetricValue>,
    /// That value's reading `ts` (epoch ms): older readings are ignored.
    pub ts_ms: i64,
}

/// A change of alert state, as the rule engine asks the store for it.
#[derive(Debug, Clone, PartialEq)]
pub enum AlertChange {
    /// Upsert this row (see [`StoreRead::apply_alert_changes`]).
    Set(AlertRow),
    /// Delete the row of (rule, device) if its state is `was`.
    Clear {
        /// Rule name.
        rule: String,
        /// Device id.
        device_id: String,
        /// The state left.
        was: AlertState,
    },
}

/// The stored text of an alert value: its JSON (`31.5`, `true`), or none.
pub fn alert_value_text(v: &Option<MetricValue>) -> Option<String> {
    v.as_ref().and_then(|v| serde_json::to_string(v).ok())
}

/// Parses [`alert_value_text`]; a damaged value reads as none.
pub fn alert_value_from_text(t: Option<String>) -> Option<MetricValue> {
    let v = serde_json::from_str::<serde_json::Value>(&t?).ok()?;
    metric_value_from_json("value", v).ok()
}

/// The durable outbox (SPEC §13): what the store committed that NATS has not acknowledged.
///
/// A position is an opaque `u64` that only grows, in commit order. The NATS publisher reads a
/// run of readings after its position, publishes them, and calls [`Outbox::advance`] only
/// once NATS has acknowledged every one of them, so a crash re-sends (at-least-once) and never
/// skips. Compaction and retention never remove what is not yet advanced past.
pub trait Outbox: Send + Sync {
    /// Where publication resumes: the position of the first reading not yet acknowledged.
    fn start(&self) -> Result<u64, StoreError>;

    /// Up to `max` committed readings at or after position `from`, in commit order, each with
    /// the position just past it. Empty when nothing more is committed yet.
    fn read(&self, from: u64, max: usize) -> Result<Vec<OutboxItem>, StoreError>;

    /// Records that every reading before position `to` is acknowledged by NATS; the store may
    /// now forget them. Persisted, possibly a little later (a crash then re-sends them).
    fn advance(&self, to: u64) -> Result<(), StoreError>;

    /// Readings committed and not yet advanced past (`sluice_nats_outbox_lag`).
    fn lag(&self) -> Result<u64, StoreError>;

    /// Makes the latest [`Outbox::advance`] durable now (at shutdown).
    fn persist(&self) -> Result<(), StoreError>;

    /// Forgets what was read and not advanced past: after a failed publication, the next read
    /// starts again at the first unacknowledged reading.
    fn rewind(&self) {}

    /// Lets another replica publish, where replicas share one outbox (PostgreSQL): called
    /// when this replica cannot reach NATS.
    fn release(&self) {}
}

/// One committed reading on its way to NATS.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxItem {
    /// The device it belongs to.
    pub device_id: String,
    /// The reading as stored (its `rid` names a reading without `seq`).
    pub row: StoredRow,
    /// The position just past this reading: pass it to [`Outbox::advance`] once this and
    /// everything before it is acknowledged.
    pub next: u64,
    /// An id for the reading unique across stores, for the `Nats-Msg-Id` of a reading without
    /// seq: `<store id>-<rid>` with SQLite (the store id is random per data directory),
    /// the rid with PostgreSQL (one sequence for every replica).
    pub unsequenced_id: String,
    /// The replica that committed it, when the store records it (PostgreSQL, where one
    /// replica publishes for all); `None` for this process.
    pub origin: Option<String>,
}

/// A device's state as the store knows it, for the device-state service at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceLatest {
    /// Device id.
    pub device_id: String,
    /// Server time (epoch ms) its newest reading was committed.
    pub last_seen_ms: i64,
    /// Its newest reading's `ts` (epoch ms).
    pub last_ts_ms: i64,
    /// The latest value of every metric it ever reported, with the `ts` of that value.
    pub metrics: Vec<(String, MetricValue, i64)>,
}

/// Updates the latest value of each metric in `metrics` measured at `ts` (a newer or equal
/// `ts` wins, so the last committed of equal timestamps is kept).
pub fn merge_latest(
    latest: &mut Vec<(String, MetricValue, i64)>,
    ts: i64,
    metrics: &[(String, MetricValue)],
) {
    for (name, value) in metrics {
        match latest.iter_mut().find(|(n, _, _)| n == name) {
            Some(slot) if slot.2 <= ts => {
                slot.1 = *value;
                slot.2 = ts;
            }
            Some(_) => {}
            None => latest.push((name.clone(), *value, ts)),
        }
    }
}

/// An opened store and the device state it restored.
pub struct Opened {
    /// The write side.
    pub store: Box<dyn Store>,
    /// Every known device.
    pub devices: Vec<DeviceLatest>,
}

/// Opens the backend named by `settings.backend`: a SQLite store in `storage.data_dir`, or a
/// connection pool to `storage.postgres.url` (migrating its schema first).
pub fn open(settings: &StorageSettings, metrics: &Arc<Metrics>) -> Result<Opened, StoreError> {
    match settings.backend {
        Backend::Sqlite => {
            let (store, devices) = SqliteStore::open(settings, metrics.clone())?;
            Ok(Opened {
                store: Box::new(store),
                devices,
            })
        }
        Backend::Postgres => {
            let (store, devices) = PgStore::open(settings, metrics.clone())?;
            Ok(Opened {
                store: Box::new(store),
                devices,
            })
        }
    }
}

/// Where queries find the store's reader once the writer has opened it. Before that (or while
/// the store cannot be opened) queries get [`StoreError::NotOpen`].
#[derive(Default)]
pub struct ReaderSlot {
    /// Set by the store writer after each successful open.
    inner: RwLock<Option<Arc<dyn StoreRead>>>,
    /// The configured backend keeps a device table shared by replicas (PostgreSQL), so device
    /// queries must come from it, and fail with the store rather than fall back to memory.
    shared_devices: bool,
}

impl ReaderSlot {
    /// An empty slot for the configured backend.
    pub fn new(backend: Backend) -> Self {
        Self {
            inner: RwLock::new(None),
            shared_devices: backend == Backend::Postgres,
        }
    }

    /// Devices from the store's shared device table (see [`StoreRead::devices`]); `None` when
    /// the backend has none and the device-state service answers from memory.
    pub fn devices(&self, q: &DevicesQuery) -> Option<Result<Vec<DeviceLatest>, StoreError>> {
        if !self.shared_devices {
            return None;
        }
        let reader = self.inner.read().expect("reader slot lock").clone();
        match reader {
            Some(r) => r.devices(q),
            None => Some(Err(StoreError::NotOpen)),
        }
    }

    /// Installs the reader of a freshly opened store.
    pub fn set(&self, reader: Arc<dyn StoreRead>) {
        *self.inner.write().expect("reader slot lock") = Some(reader);
    }

    /// The open store's outbox, if it keeps one (see [`StoreRead::outbox`]).
    pub fn outbox(&self) -> Option<Arc<dyn Outbox>> {
        self.inner
            .read()
            .expect("reader slot lock")
            .as_ref()?
            .outbox()
    }

    /// The open store's persisted alert states ([`StoreRead::alert_states`]).
    pub fn alert_states(&self) -> Result<Vec<AlertRow>, StoreError> {
        self.current()?.alert_states()
    }

    /// Applies alert state changes to the open store ([`StoreRead::apply_alert_changes`]).
    pub fn apply_alert_changes(&self, changes: &[AlertChange]) -> Result<Vec<bool>, StoreError> {
        self.current()?.apply_alert_changes(changes)
    }

    /// The open store's reader, or [`StoreError::NotOpen`].
    pub fn current(&self) -> Result<Arc<dyn StoreRead>, StoreError> {
        self.inner
            .read()
            .expect("reader slot lock")
            .clone()
            .ok_or(StoreError::NotOpen)
    }

    /// Runs an aggregation query against the open store ([`StoreRead::aggregate`]).
    pub fn aggregate(&self, q: &rollup::AggQuery) -> Result<Option<rollup::AggAnswer>, StoreError> {
        self.current()?.aggregate(q)
    }

    /// Runs a readings query against the open store.
    pub fn readings(&self, q: &ReadingsQuery) -> Result<Option<Vec<StoredRow>>, StoreError> {
        let reader = self
            .inner
            .read()
            .expect("reader slot lock")
            .clone()
            .ok_or(StoreError::NotOpen)?;
        reader.readings(q)
    }
}

/// `GET /v1/devices?prefix=&limit=&cursor=` and `GET /v1/devices/{id}` (SPEC §3), already
/// validated. Devices come sorted by id.
#[derive(Debug, Clone, Default)]
pub struct DevicesQuery {
    /// Exactly this device (then the other fields are ignored).
    pub device: Option<String>,
    /// Only ids that start with this.
    pub prefix: Option<String>,
    /// Only ids after this one: the previous page's last id (the cursor).
    pub after: Option<String>,
    /// Only ids this glob matches: a write token's devices (SPEC §11).
    pub glob: Option<DeviceGlob>,
    /// At most this many.
    pub limit: usize,
}

/// A device glob (`*` any run of characters, `?` one; SPEC §11), compiled once.
#[derive(Debug, Clone)]
pub struct DeviceGlob {
    pattern: String,
    matcher: wildmatch::WildMatch,
}

impl DeviceGlob {
    /// `pattern`, a glob of device-id characters and `*` `?`.
    pub fn new(pattern: &str) -> Self {
        Self {
            pattern: pattern.to_owned(),
            matcher: wildmatch::WildMatch::new(pattern),
        }
    }

    /// Whether it matches `id`.
    pub fn matches(&self, id: &str) -> bool {
        self.matcher.matches(id)
    }

    /// The part before the first wildcard: every id it matches starts with this.
    pub fn literal_prefix(&self) -> &str {
        &self.pattern[..self.pattern.find(['*', '?']).unwrap_or(self.pattern.len())]
    }

    /// The same pattern for SQL `LIKE` with `\` as the escape character: `*` → `%`, `?` → `_`,
    /// and a literal `%`, `_` or `\` escaped.
    pub fn to_like(&self) -> String {
        let mut out = String::with_capacity(self.pattern.len() + 4);
        for c in self.pattern.chars() {
            match c {
                '*' => out.push('%'),
                '?' => out.push('_'),
                '%' | '_' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                c => out.push(c),
            }
        }
        out
    }
}

impl DevicesQuery {
    /// Whether `id` is selected, apart from the limit.
    pub fn selects(&self, id: &str) -> bool {
        match &self.device {
            Some(d) => d == id,
            None => {
                self.prefix.as_deref().is_none_or(|p| id.starts_with(p))
                    && self.after.as_deref().is_none_or(|a| id > a)
                    && self.glob.as_ref().is_none_or(|g| g.matches(id))
            }
        }
    }
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
    /// Inclusive lower bound on `ts` (epoch ms).
    pub from_ms: i64,
    /// Exclusive upper bound on `ts` (epoch ms).
    pub to_ms: i64,
    /// Only readings that carry this metric, narrowed to it.
    pub metric: Option<String>,
    /// At most this many readings.
    pub limit: usize,
    /// Sort order by `(ts, rid)`.
    pub order: Order,
    /// Where the previous page ended, as `(ts_ms, rid)` of its last reading: only readings
    /// strictly beyond it in `order` are answered. `None` starts at the beginning. Both
    /// parts are stable (a rid never changes, also across compaction), so paging sees every
    /// reading once even while the store reorganises (SPEC §3, `next` and `cursor`).
    pub after: Option<(i64, u64)>,
}

impl ReadingsQuery {
    /// The time range left to answer, `[from, to)` in epoch ms: the query's own range,
    /// narrowed by `after`. Backends use it to skip chunks and index ranges; the exact
    /// `(ts, rid)` cut is [`ReadingsQuery::wanted`].
    pub fn ts_range(&self) -> (i64, i64) {
        match (self.after, self.order) {
            (None, _) => (self.from_ms, self.to_ms),
            (Some((ts, _)), Order::Asc) => (self.from_ms.max(ts), self.to_ms),
            (Some((ts, _)), Order::Desc) => (self.from_ms, self.to_ms.min(ts.saturating_add(1))),
        }
    }

    /// Whether the reading at `(ts_ms, rid)` is in the range and beyond the cursor.
    pub fn wanted(&self, ts_ms: i64, rid: u64) -> bool {
        let (from, to) = self.ts_range();
        ts_ms >= from
            && ts_ms < to
            && match (self.after, self.order) {
                (None, _) => true,
                (Some(a), Order::Asc) => (ts_ms, rid) > a,
                (Some(a), Order::Desc) => (ts_ms, rid) < a,
            }
    }

    /// Applies the query to rows of its device gathered from anywhere in a store: filters by
    /// time, cursor and metric, sorts by `(ts, rid)` in the asked order, and keeps `limit`. Backends
    /// share it so they answer alike.
    pub fn finish(&self, rows: Vec<StoredRow>) -> Vec<StoredRow> {
        let mut rows: Vec<StoredRow> = rows
            .into_iter()
            .filter(|r| self.wanted(r.ts_ms, r.rid))
            .filter_map(|mut r| match &self.metric {
                None => Some(r),
                Some(m) => {
                    let v = r.metrics.iter().find(|(n, _)| n == m)?.1;
                    r.metrics = vec![(m.clone(), v)];
                    Some(r)
                }
            })
            .collect();
        // Sorted straight into the asked order: rows gathered already in it are one run,
        // which the sort passes over once. That is the newest-first page of the SQLite
        // reader (its journal rows, usually the newest, then chunks newest first, each
        // reversed); an ascending page with journal rows is not, and is sorted in full.
        match self.order {
            Order::Asc => rows.sort_unstable_by_key(|r| (r.ts_ms, r.rid)),
            Order::Desc => rows.sort_unstable_by_key(|r| std::cmp::Reverse((r.ts_ms, r.rid))),
        }
        rows.truncate(self.limit);
        rows
    }
}

/// One stored reading of a known device, as the store keeps it: in a journal generation or
/// inside a compacted chunk. The device is implied by where the row lives.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    /// Store-assigned reading id, unique in the store and never reused. It orders readings
    /// with equal `ts` (a stable order) and names readings that have no `seq`. SQLite assigns
    /// it in commit order; PostgreSQL numbers a commit's readings from a sequence value drawn
    /// by the commit (`value × 2^24 + position`), so there it follows commit order only
    /// within one replica.
    pub rid: u64,
    /// Device timestamp, Unix epoch milliseconds.
    pub ts_ms: i64,
    /// The device's sequence number, if it gave one.
    pub seq: Option<u64>,
    /// Metric values in the order the device sent them (1 to 256 entries).
    pub metrics: Vec<(String, MetricValue)>,
    /// Tags in the order the device sent them (0 to 16 entries).
    pub tags: Vec<(String, String)>,
}

/// The query API's JSON for one stored reading (SPEC §3):
/// `{"ts": <RFC 3339, ms, UTC>, "seq": <u64 or null>, "metrics": {...}, "tags": {...}}`.
impl Serialize for StoredRow {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("ts", &format_ts(self.ts_ms))?;
        m.serialize_entry("seq", &self.seq)?;
        m.serialize_entry("metrics", &PairsAsMap(&self.metrics))?;
        m.serialize_entry("tags", &PairsAsMap(&self.tags))?;
        m.end()
    }
}

/// Parses a metrics object stored as JSON text, keeping the order and the exact value: an
/// integer that fits `i64` is [`MetricValue::Int`], a larger one up to `u64::MAX`
/// [`MetricValue::UInt`], anything else with a fraction or exponent [`MetricValue::Float`].
pub fn metrics_from_json(json: &str) -> Result<Vec<(String, MetricValue)>, String> {
    let pairs: OrderedPairs<serde_json::Value> =
        serde_json::from_str(json).map_err(|e| e.to_string())?;
    pairs
        .0
        .into_iter()
        .map(|(k, v)| {
            let value = metric_value_from_json(&k, v)?;
            Ok((k, value))
        })
        .collect()
}

/// One stored metric value (see [`metrics_from_json`]); `name` is for the error only.
pub fn metric_value_from_json(name: &str, v: serde_json::Value) -> Result<MetricValue, String> {
    Ok(match v {
        serde_json::Value::Bool(b) => MetricValue::Bool(b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => MetricValue::Int(i),
            (None, Some(u), _) => MetricValue::UInt(u),
            (_, _, Some(f)) => MetricValue::Float(f),
            _ => return Err(format!("{name}: not a number")),
        },
        other => return Err(format!("{name}: unexpected {other}")),
    })
}

/// Parses a tags object stored as JSON text, in order.
pub fn tags_from_json(json: &str) -> Result<Vec<(String, String)>, String> {
    serde_json::from_str::<OrderedPairs<String>>(json)
        .map(|p| p.0)
        .map_err(|e| e.to_string())
}

/// A JSON object read as its pairs in document order (serde_json's map would sort them).
struct OrderedPairs<V>(Vec<(String, V)>);

impl<'de, V: serde::Deserialize<'de>> serde::Deserialize<'de> for OrderedPairs<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: serde::Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
            type Value = OrderedPairs<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(kv) = map.next_entry::<String, V>()? {
                    out.push(kv);
                }
                Ok(OrderedPairs(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// Maps a `u64` seq onto `i64` keeping its order, so SQL comparisons and `max()` over seqs
/// stored as SQLite integers stay right above `i64::MAX`.
pub fn seq_key(seq: u64) -> i64 {
    (seq ^ (1 << 63)) as i64
}

/// The inverse of [`seq_key`].
pub fn seq_from_key(key: i64) -> u64 {
    (key as u64) ^ (1 << 63)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_glob_matches_lists_and_translates_to_like() {
        let g = DeviceGlob::new("gh_1-?-*");
        assert!(g.matches("gh_1-a-") && g.matches("gh_1-b-xyz"));
        assert!(!g.matches("ghx1-a-1") && !g.matches("gh_1-ab-1"));
        assert_eq!(g.literal_prefix(), "gh_1-");
        assert_eq!(g.to_like(), r"gh\_1-_-%");
        assert_eq!(DeviceGlob::new("exact").literal_prefix(), "exact");
        let q = DevicesQuery {
            prefix: Some("gh_1-a".into()),
            after: Some("gh_1-a-1".into()),
            glob: Some(g),
            limit: 10,
            ..DevicesQuery::default()
        };
        assert!(q.selects("gh_1-a-2"));
        assert!(!q.selects("gh_1-a-0") && !q.selects("gh_1-b-9") && !q.selects("gh_1-a"));
    }
}
