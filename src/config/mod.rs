//! Configuration: read once at start, before anything else runs.
//!
//! Layers, lowest first: the built-in defaults below, the TOML file from `--config FILE` or
//! `SLUICE_CONFIG`, then environment variables `SLUICE__SECTION__KEY`. Every struct denies
//! unknown fields, so a typo stops the start (exit code 2) instead of being silently ignored.
//! [`Settings::validate`] checks the relations between keys that serde cannot see.

pub mod access;
pub mod duration;
pub mod mqtt;
pub mod rollups;
pub mod rules;
pub mod tls;

pub use mqtt::MqttSettings;
pub use rules::{AlertsSettings, RuleSettings};

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "SLUICE";
/// Separator between prefix, section and key: `SLUICE__SERVER__LISTEN`.
pub const ENV_SEPARATOR: &str = "__";

/// The whole effective configuration.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// HTTP listener and shutdown.
    pub server: ServerSettings,
    /// Limits applied to every reading and request at the edge.
    pub limits: LimitSettings,
    /// Sizes of the admission queue and the batcher.
    pub pipeline: PipelineSettings,
    /// The store: embedded SQLite (default) or a shared PostgreSQL database.
    pub storage: StorageSettings,
    /// Device WebSocket ingest and live streams.
    pub ws: WsSettings,
    /// The MQTT source.
    pub mqtt: MqttSettings,
    /// Logging.
    pub log: LogSettings,
    /// Event-loop telemetry.
    pub telemetry: TelemetrySettings,
    /// Publishing committed readings to NATS, and the fleet-wide live stream.
    pub nats: NatsSettings,
    /// Options of the wire formats other than JSON (SPEC §10).
    pub formats: FormatsSettings,
    /// `[[rules]]`: alert rules (SPEC §12), checked by [`rules::validate`].
    pub rules: Vec<RuleSettings>,
    /// `[alerts]`: where alert events go (webhook, MQTT) and the queues on the way.
    pub alerts: AlertsSettings,
    /// `[rollups]`: the aggregate levels the store keeps (SPEC §12), see [`rollups`].
    pub rollups: rollups::RollupSettings,
    /// `[auth]`: token checks and the admin token (SPEC §11), see [`access`].
    pub auth: access::AuthSettings,
    /// `[rate_limit]`: readings per device per replica (SPEC §11), see [`access`].
    pub rate_limit: access::RateLimitSettings,
}

/// `[formats]`: options of the other wire formats (SPEC §10).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FormatsSettings {
    /// InfluxDB line protocol on `POST /write` and `POST /api/v2/write`.
    pub line_protocol: LineProtocolSettings,
}

/// `[formats.line_protocol]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LineProtocolSettings {
    /// The tag whose value is a line's device id; without it, the tag `host` is used.
    pub device_tag: String,
}

impl Default for LineProtocolSettings {
    fn default() -> Self {
        Self {
            device_tag: "device_id".into(),
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address the HTTP (and WebSocket) listener binds: an IP address and port. Port 0 picks
    /// a free port.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Longest time a graceful shutdown may take before Sluice gives up and exits non-zero.
    #[serde(with = "crate::config::duration")]
    pub shutdown_timeout: Duration,
    /// Longest time to receive a request's headers (from the moment the connection is ready
    /// for them), and then, separately, its body. Slow headers close the connection; a slow
    /// body gets 408. Bounds what a slow client (slowloris) can hold.
    #[serde(with = "crate::config::duration")]
    pub request_timeout: Duration,
    /// Most open HTTP connections (WebSocket connections leave this count once upgraded; they
    /// have `ws.max_connections`). Past it, new connections wait in the listen backlog.
    pub max_connections: usize,
    /// An idle keep-alive connection is closed after this long, or after `request_timeout`
    /// if that is shorter: hyper runs one timer from the end of a response to the end of the
    /// next request's headers.
    #[serde(with = "crate::config::duration")]
    pub keep_alive_timeout: Duration,
    /// `[server.tls]`: HTTPS and WSS, see [`tls`].
    pub tls: tls::ServerTlsSettings,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            shutdown_timeout: Duration::from_secs(25),
            request_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            keep_alive_timeout: Duration::from_secs(75),
            tls: tls::ServerTlsSettings::default(),
        }
    }
}

impl ServerSettings {
    /// The timeout given to hyper's header-read timer: it runs from the moment a connection
    /// is ready for a request (accepted, or its previous response sent) until that request's
    /// headers are complete, so it bounds both the keep-alive idle time and the headers.
    pub fn header_read_timeout(&self) -> Duration {
        self.request_timeout.min(self.keep_alive_timeout)
    }
}

/// `[limits]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Largest request body, counted after gzip decompression.
    pub max_body_bytes: usize,
    /// Most readings one request (or frame, or MQTT message) may carry.
    pub max_readings_per_request: usize,
    /// How far in the future a reading's `ts` may be.
    #[serde(with = "crate::config::duration")]
    pub max_future_skew: Duration,
    /// How far in the past a reading's `ts` may be.
    #[serde(with = "crate::config::duration")]
    pub max_age: Duration,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            max_readings_per_request: 10_000,
            max_future_skew: Duration::from_secs(5 * 60),
            max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// `[pipeline]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineSettings {
    /// Readings admitted but not yet committed. When full, ingest is shed (503).
    pub queue_capacity: usize,
    /// The batcher flushes once a batch holds this many readings.
    pub batch_max: usize,
    /// ... or once the oldest reading in the batch has waited this long.
    #[serde(with = "crate::config::duration")]
    pub batch_max_delay: Duration,
    /// The `Retry-After` given to shed clients.
    #[serde(with = "crate::config::duration")]
    pub retry_after: Duration,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            queue_capacity: 100_000,
            batch_max: 5_000,
            batch_max_delay: Duration::from_millis(5),
            retry_after: Duration::from_secs(1),
        }
    }
}

/// SQLite `synchronous` pragma: how hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// No fsync: fastest, loses recent commits on power loss (and not only then).
    Off,
    /// WAL is synced at checkpoints only: survives a process crash, not a power loss.
    Normal,
    /// Every commit is synced: survives a kill -9 and a power loss. The default.
    Full,
    /// As `full`, and also syncs the directory after a WAL reset.
    Extra,
}

impl Synchronous {
    /// The pragma value.
    pub fn as_sql(self) -> &'static str {
        match self {
            Synchronous::Off => "OFF",
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
        }
    }
}

/// `storage.backend`: where group commits go (SPEC §8, §13).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded store in `storage.data_dir`: one process, no other service.
    #[default]
    Sqlite,
    /// One PostgreSQL database shared by every replica (`[storage.postgres]`).
    #[serde(alias = "postgresql")]
    Postgres,
}

impl Backend {
    /// The name used in config and as the `store` label of `sluice_store_*` metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// `[storage]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    /// `"sqlite"` (default) or `"postgres"`.
    pub backend: Backend,
    /// `[storage.postgres]`: used when `backend = "postgres"`.
    pub postgres: PostgresSettings,
    /// Directory holding `sluice.db` (and its WAL). Created if missing.
    pub data_dir: PathBuf,
    /// Durability of each commit. See [`Synchronous`].
    pub synchronous: Synchronous,
    /// Readings whose `ts` is older than this are deleted.
    #[serde(with = "crate::config::duration")]
    pub retention: Duration,
    /// How often the retention sweep runs.
    #[serde(with = "crate::config::duration")]
    pub retention_interval: Duration,
    /// Fault injection: an artificial pause before each commit. Zero in production; tests and
    /// demos use it to show what a slow disk does to the pipeline.
    #[serde(with = "crate::config::duration")]
    pub commit_delay: Duration,
    /// The journal's active generation is sealed and compacted into chunks at least this
    /// often (when it holds anything).
    #[serde(with = "crate::config::duration")]
    pub compaction_interval: Duration,
    /// ...or as soon as it holds this many readings. Bigger generations make bigger, better
    /// compressed chunks, and cost this many readings' worth of memory (about 130 bytes each
    /// for 4 metrics).
    pub journal_seal_readings: u32,
    /// Past this many uncompacted readings (every generation not yet compacted), group
    /// commits are refused (503) until compaction catches up: the bound on journal memory.
    pub journal_max_readings: u64,
    /// Fault injection: a pause between the steps of each compaction (chunks written, then
    /// committed, then the segment deleted), so that tests can kill Sluice inside one.
    #[serde(with = "crate::config::duration")]
    pub compaction_pause: Duration,
    /// Keep committed readings for the NATS publisher until it has published them (the
    /// outbox, SPEC §13). Not a configuration key: set from `nats.enabled` at start.
    #[serde(skip)]
    pub outbox: bool,
    /// This process's replica id (`Sluice-Replica`), recorded with what it commits to a
    /// shared outbox. Not a configuration key: random per process, set at start.
    #[serde(skip)]
    pub replica: String,
    /// `[rollups]`, which the store keeps during compaction. Not a `[storage]` key: copied
    /// from `rollups` at start.
    #[serde(skip)]
    pub rollups: rollups::RollupSettings,
}

impl StorageSettings {
    /// The database file inside `data_dir`.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("sluice.db")
    }

    /// The journal's segment files live here, inside `data_dir`.
    pub fn journal_dir(&self) -> PathBuf {
        self.data_dir.join("journal")
    }
}

/// `[storage.postgres]`: the shared database of `storage.backend = "postgres"` (SPEC §13).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresSettings {
    /// `postgres://user:password@host:port/database` or the `host=… dbname=…` key-value form
    /// (libpq's syntax, as tokio-postgres parses it). The password is redacted in logs and
    /// `--check-config`. Plain connections only (no TLS).
    pub url: DbUrl,
    /// Connections for queries and the retention sweep. Commits have two more of their own, so
    /// that queries can never starve them.
    pub pool_size: usize,
    /// Longest wait to connect (and to get a pooled connection) before the attempt fails and
    /// the store is marked down.
    #[serde(with = "crate::config::duration")]
    pub connect_timeout: Duration,
    /// Longest time one statement of a commit or a query may take (PostgreSQL's
    /// `statement_timeout`), lock waits included: a table locked by someone else fails the
    /// commit (503, the store is probed) instead of holding ingest indefinitely.
    #[serde(with = "crate::config::duration")]
    pub statement_timeout: Duration,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self {
            url: DbUrl(String::new()),
            pool_size: 4,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(10),
        }
    }
}

/// A database connection string whose password never appears in logs, `Debug` output or
/// `--check-config` (shown as `<redacted>`, the rest kept so that a wrong host is visible).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct DbUrl(String);

impl DbUrl {
    /// Wraps a connection string.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The string itself, with its password, for the one place that connects.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether none was given.
    pub fn is_empty(&self) -> bool {
        self.0.trim().is_empty()
    }

    /// The string with the password replaced by `<redacted>`: in any `scheme://user:pass@host`
    /// form the part between `user:` and the last `@` of the authority (a password may itself
    /// hold `@`, `:` or `/`), and the value of every `password=` pair (URL query or libpq's
    /// key-value form).
    pub fn redacted(&self) -> String {
        let s = &self.0;
        if s.starts_with("nats://") {
            // NATS: one or more URLs; a user name alone may be a token, so the whole user
            // part of each is hidden.
            return s
                .split(',')
                .map(|part| match (part.find("://"), part.rfind('@')) {
                    (Some(i), Some(at)) if at > i + 3 => {
                        format!("{}<redacted>{}", &part[..i + 3], &part[at..])
                    }
                    _ => part.to_string(),
                })
                .collect::<Vec<_>>()
                .join(",");
        }
        let Some(scheme_end) = s.find("://").map(|i| i + 3) else {
            return redact_pairs(s);
        };
        let (scheme, rest) = s.split_at(scheme_end);
        // The userinfo ends at the last `@` before the query string.
        let query = rest.find('?').unwrap_or(rest.len());
        let Some(at) = rest[..query].rfind('@') else {
            return redact_pairs(s);
        };
        let userinfo = &rest[..at];
        let user = match userinfo.find(':') {
            Some(colon) => format!("{}:<redacted>", &userinfo[..colon]),
            None => userinfo.to_string(),
        };
        redact_pairs(&format!("{scheme}{user}{}", &rest[at..]))
    }
}

/// Replaces the value of every `password=` pair (after a space, `&`, `?` or at the start) with
/// `<redacted>`; a quoted value ('...') is replaced whole.
fn redact_pairs(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("password=") {
        let at_boundary = i == 0 || matches!(rest.as_bytes()[i - 1], b' ' | b'&' | b'?' | b'\t');
        out.push_str(&rest[..i + "password=".len()]);
        rest = &rest[i + "password=".len()..];
        if at_boundary {
            let end = if let Some(quoted) = rest.strip_prefix('\'') {
                quoted.find('\'').map_or(rest.len(), |j| j + 2)
            } else {
                rest.find([' ', '&', '\t']).unwrap_or(rest.len())
            };
            out.push_str("<redacted>");
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for DbUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            backend: Backend::Sqlite,
            postgres: PostgresSettings::default(),
            data_dir: PathBuf::from("./data"),
            synchronous: Synchronous::Full,
            // As long as limits.max_age (SPEC §1: 30 days), so that no reading is acknowledged
            // only to be deleted by the next sweep.
            retention: Duration::from_secs(30 * 24 * 3600),
            retention_interval: Duration::from_secs(60),
            commit_delay: Duration::ZERO,
            compaction_interval: Duration::from_secs(10),
            journal_seal_readings: 262_144,
            journal_max_readings: 2_000_000,
            compaction_pause: Duration::ZERO,
            outbox: false,
            replica: String::new(),
            rollups: rollups::RollupSettings::default(),
        }
    }
}

/// `[ws]`: device WebSocket ingest (`/v1/ws`) and live streams (`/v1/live`), SPEC §4–5.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WsSettings {
    /// Unacknowledged frames per device connection; past this the server stops reading.
    pub max_in_flight: usize,
    /// Largest message; a bigger one closes the connection with 1009.
    pub max_message_bytes: usize,
    /// Open WebSocket connections (device and live together); the next one is closed with 1013.
    pub max_connections: usize,
    /// How often the server pings.
    #[serde(with = "crate::config::duration")]
    pub ping_interval: Duration,
    /// A peer silent this long (no frame, no pong) is closed.
    #[serde(with = "crate::config::duration")]
    pub idle_timeout: Duration,
    /// Per-connection read buffer. tungstenite's default of 128 KiB, allocated up front,
    /// would make 10 000 idle connections cost over a gigabyte.
    pub read_buffer_bytes: usize,
    /// Per-connection write buffer before a flush.
    pub write_buffer_bytes: usize,
    /// Readings buffered per live subscriber; past this it gets `{"type":"lagged"}`.
    pub live_buffer: usize,
}

impl Default for WsSettings {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            max_message_bytes: 1024 * 1024,
            max_connections: 10_000,
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            read_buffer_bytes: 4 * 1024,
            write_buffer_bytes: 4 * 1024,
            live_buffer: 1024,
        }
    }
}

/// Parses an IP address and port, echoing a bad value with what is accepted.
fn socket_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "`{text}` is not an IP address and port (e.g. 0.0.0.0:8080, 127.0.0.1:9000 or \
             [::1]:8080); host names such as localhost are not resolved"
        ))
    })
}

/// The values each configuration enum accepts, by its type name, for error messages.
const ENUM_VALUES: &[(&str, &str)] = &[
    ("Synchronous", "off, normal, full, extra"),
    ("Backend", "sqlite, postgres"),
    ("LogFormat", "text, json"),
    ("NatsMode", "auto, jetstream, core"),
    ("AuthMode", "none, token"),
];

/// Rewrites the config crate's message for a bad enum value ("enum Synchronous does not have
/// variant constructor fast for key …") into one that echoes the value and lists what is
/// accepted. Other messages pass unchanged.
fn explain(message: &str) -> String {
    let rewritten = message.strip_prefix("enum ").and_then(|rest| {
        let (name, rest) = rest.split_once(" does not have variant constructor ")?;
        let (value, key) = rest.split_once(" for key ")?;
        let accepted = ENUM_VALUES.iter().find(|(n, _)| *n == name)?.1;
        Some(format!(
            "`{value}` is not one of: {accepted}, for key {key}"
        ))
    });
    // serde's "unknown field `listn`, expected one of `listen`, … for key `server`" names the
    // section; name the key itself, as written in the file (`server.listn`) or the environment
    // (SLUICE__SERVER__LISTN).
    let rewritten = rewritten.or_else(|| {
        let rest = message.strip_prefix("unknown field `")?;
        let (field, rest) = rest.split_once('`')?;
        let expected = rest.strip_prefix(", ")?;
        let (expected, section) = match expected.rsplit_once(" for key `") {
            Some((e, key)) => (e, Some(key.trim_end_matches('`'))),
            None => (expected, None),
        };
        let key = section.map_or(field.to_owned(), |s| format!("{s}.{field}"));
        let env = format!(
            "{ENV_PREFIX}{ENV_SEPARATOR}{}",
            key.replace('.', ENV_SEPARATOR).to_ascii_uppercase()
        );
        // Array entries (`rules[0]`) exist only in the file.
        let (place, from) = match section {
            None => (
                "the top level".to_owned(),
                format!(" (from the file, or {env})"),
            ),
            Some(s) if s.contains('[') => (s.to_owned(), String::new()),
            Some(s) => (format!("[{s}]"), format!(" (from the file, or {env})")),
        };
        Some(format!(
            "unknown key `{key}`{from}: {place} takes {}",
            expected
                .strip_prefix("expected one of ")
                .unwrap_or(expected)
        ))
    });
    rewritten.unwrap_or_else(|| message.to_string())
}

/// A secret value: kept out of logs, `Debug` output and `--check-config`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A `tracing` filter such as `info` or `sluice=debug,info`. `RUST_LOG` wins when set.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// `[telemetry]`: event-loop load metrics (`sluice_runtime_*`, `sluice_event_loop_lag_seconds`,
/// `sluice_task_*`). The pipeline and process metrics are always on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// Export runtime metrics, run the lag probe and measure task families. `false` only to
    /// measure their overhead, or as an escape hatch.
    pub runtime: bool,
    /// A poll longer than this counts in `sluice_task_slow_polls_total`: it held a worker from
    /// every other task for that long.
    #[serde(with = "crate::config::duration")]
    pub slow_poll_threshold: Duration,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            runtime: true,
            slow_poll_threshold: Duration::from_millis(1),
        }
    }
}

/// How the NATS publisher learns that NATS has a reading (`nats.mode`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NatsMode {
    /// JetStream when a stream captures `<subject_prefix>.>` (checked at each connect), else
    /// core NATS.
    Auto,
    /// Always publish to JetStream and wait for its PubAck. Without a stream for the
    /// subjects, nothing is acknowledged and the outbox grows (and is alerted on).
    Jetstream,
    /// Core NATS: publish, then flush. The server has the message, but no subscriber may.
    Core,
}

/// `[nats]`: every committed reading published to NATS from a durable outbox, and the
/// fleet-wide live stream (SPEC §13).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// Publish at all. Off by default: Sluice needs no other service.
    pub enabled: bool,
    /// `nats://[user:password@]host:port`, or several separated by commas. The password
    /// is redacted in logs and `--check-config`.
    pub url: DbUrl,
    /// Readings go to `<subject_prefix>.<device_id>`.
    pub subject_prefix: String,
    /// JetStream PubAcks, core NATS, or whichever the server offers.
    pub mode: NatsMode,
    /// Most publications awaiting their PubAck at once: more hides the round trip.
    pub max_in_flight: usize,
    /// Past this many unpublished readings, Sluice warns (and `SluiceNatsOutboxBacklog`
    /// alerts). The outbox is on disk, so it keeps them all: nothing is dropped and ingest is
    /// never refused for NATS.
    pub max_outbox: u64,
    /// With NATS enabled, subscribe to `<subject_prefix>.>` and feed `/v1/live` with the
    /// readings other replicas commit.
    pub fleet_live: bool,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            url: DbUrl::new("nats://127.0.0.1:4222"),
            subject_prefix: "sluice.readings".into(),
            mode: NatsMode::Auto,
            max_in_flight: 4096,
            max_outbox: 10_000_000,
            fleet_live: true,
        }
    }
}

/// A configuration that cannot be used. The message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, or a key is unknown or has a bad value.
    #[error("{0}")]
    Load(String),
    /// Keys that parse but do not make sense together.
    #[error("{key}: {reason}")]
    Invalid {
        /// Dotted key, e.g. `pipeline.batch_max`.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl Settings {
    /// Layers defaults, the optional TOML file and `SLUICE__*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given explicitly (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let defaults = config::Config::try_from(&Settings::default())
            .map_err(|e| ConfigError::Load(format!("built-in defaults: {e}")))?;
        let mut builder = config::Config::builder().add_source(defaults);
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::Load(format!(
                    "config file {}: not found or not a regular file",
                    path.display()
                )));
            }
            builder = builder.add_source(
                config::File::from(path.to_path_buf()).format(config::FileFormat::Toml),
            );
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}{ENV_SEPARATOR}")))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator(ENV_SEPARATOR)
                .separator(ENV_SEPARATOR)
                .try_parsing(true)
                // The one list key: SLUICE__ROLLUPS__LEVELS=1m,1h (empty for none).
                .list_separator(",")
                .with_list_parse_key("rollups.levels")
                .source(Some(env)),
        );
        let mut settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Load(explain(&e.to_string())))?;
        // `SLUICE__ROLLUPS__LEVELS=` splits into one empty level: no levels.
        if settings.rollups.levels.iter().all(|l| l.trim().is_empty()) {
            settings.rollups.levels.clear();
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Checks relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        let tag = &self.formats.line_protocol.device_tag;
        if let Err(reason) = crate::reading::check_metric_name(tag) {
            return invalid(
                "formats.line_protocol.device_tag",
                format!("`{tag}`: {reason} (a tag key, e.g. device_id)"),
            );
        }
        if self.nats.enabled {
            let nats = &self.nats;
            for url in nats.url.expose().split(',') {
                let url = url.trim();
                let shown = DbUrl::new(format!(
                    "nats://{}",
                    url.strip_prefix("nats://").unwrap_or(url)
                ));
                if !url.starts_with("nats://") {
                    return invalid(
                        "nats.url",
                        format!(
                            "`{shown}` is not a nats:// URL (e.g. nats://127.0.0.1:4222; TLS is not built in)"
                        ),
                    );
                }
                match url.parse::<async_nats::ServerAddr>() {
                    Ok(addr) if !addr.host().is_empty() => {}
                    Ok(_) => {
                        return invalid("nats.url", format!("`{shown}` names no host"));
                    }
                    Err(e) => {
                        return invalid("nats.url", format!("`{shown}`: {e}"));
                    }
                }
            }
            let p = &nats.subject_prefix;
            if p.is_empty()
                || p.split('.').any(|t| {
                    t.is_empty()
                        || t.contains(['*', '>'])
                        || t.contains(|c: char| c.is_whitespace() || c.is_control())
                })
            {
                return invalid(
                    "nats.subject_prefix",
                    format!("`{p}` is not a NATS subject without wildcards (dot-separated tokens, e.g. sluice.readings)"),
                );
            }
            if nats.max_in_flight == 0 || nats.max_in_flight > 65_536 {
                return invalid(
                    "nats.max_in_flight",
                    format!("is {}; must be 1 to 65536", nats.max_in_flight),
                );
            }
        }
        if self.server.shutdown_timeout.is_zero() {
            return invalid(
                "server.shutdown_timeout",
                "is 0s; must be a duration of more than 0s, e.g. 25s (a graceful shutdown drains \
                 in-flight readings and needs a moment)"
                    .into(),
            );
        }
        if self.server.request_timeout.is_zero() {
            return invalid(
                "server.request_timeout",
                "is 0s; must be a duration of more than 0s, e.g. 30s".into(),
            );
        }
        if self.server.max_connections == 0
            || self.server.max_connections > tokio::sync::Semaphore::MAX_PERMITS
        {
            return invalid(
                "server.max_connections",
                format!(
                    "is {}; must be from 1 to {} (open HTTP connections)",
                    self.server.max_connections,
                    tokio::sync::Semaphore::MAX_PERMITS
                ),
            );
        }
        if self.server.keep_alive_timeout.is_zero() {
            return invalid(
                "server.keep_alive_timeout",
                "is 0s; must be a duration of more than 0s, e.g. 30s".into(),
            );
        }
        if self.limits.max_readings_per_request == 0 {
            return invalid(
                "limits.max_readings_per_request",
                "must be at least 1".into(),
            );
        }
        if self.limits.max_body_bytes < 64 {
            return invalid("limits.max_body_bytes", "must be at least 64".into());
        }
        if self.pipeline.queue_capacity < self.limits.max_readings_per_request {
            return invalid(
                "pipeline.queue_capacity",
                format!(
                    "must be at least limits.max_readings_per_request ({}), or a full request could never be admitted",
                    self.limits.max_readings_per_request
                ),
            );
        }
        if self.pipeline.batch_max == 0 {
            return invalid("pipeline.batch_max", "must be at least 1".into());
        }
        if self.pipeline.retry_after.is_zero() {
            return invalid("pipeline.retry_after", "must be more than 0s".into());
        }
        if self.storage.backend == Backend::Postgres {
            let pg = &self.storage.postgres;
            if pg.url.is_empty() {
                return invalid(
                    "storage.postgres.url",
                    "is required with storage.backend = \"postgres\" (e.g. postgres://sluice@db:5432/sluice, or SLUICE__STORAGE__POSTGRES__URL)".into(),
                );
            }
            let accepted = "use postgres://user:password@host:port/database (URL form) or \
                            host=... port=... user=... password=... dbname=... (key-value form)";
            let parsed = match pg.url.expose().parse::<tokio_postgres::Config>() {
                Ok(c) => c,
                // tokio-postgres's message never quotes the string; ours shows it redacted.
                Err(e) => {
                    return invalid(
                        "storage.postgres.url",
                        format!(
                            "`{}` is not a PostgreSQL connection string ({e}); {accepted}",
                            pg.url
                        ),
                    )
                }
            };
            if parsed.get_hosts().is_empty() {
                return invalid(
                    "storage.postgres.url",
                    format!("`{}` names no host; {accepted}", pg.url),
                );
            }
            if parsed.get_dbname().is_none() {
                return invalid(
                    "storage.postgres.url",
                    format!(
                        "`{}` names no database (PostgreSQL would pick one named after the user); \
                         give Sluice a database of its own, e.g. postgres://user@host:5432/sluice",
                        pg.url
                    ),
                );
            }
            if matches!(
                parsed.get_ssl_mode(),
                tokio_postgres::config::SslMode::Require
            ) {
                return invalid(
                    "storage.postgres.url",
                    format!(
                        "`{}` asks for TLS (sslmode=require), which this build does not support; \
                         use sslmode=disable or prefer and keep the database on a private network",
                        pg.url
                    ),
                );
            }
            if pg.pool_size == 0 {
                return invalid(
                    "storage.postgres.pool_size",
                    "must be at least 1 (connections for queries; commits have their own)".into(),
                );
            }
            if pg.statement_timeout < Duration::from_millis(100) {
                return invalid(
                    "storage.postgres.statement_timeout",
                    format!(
                        "is {:?}; must be at least 100ms (a group commit takes tens of ms)",
                        pg.statement_timeout
                    ),
                );
            }
            if pg.connect_timeout.is_zero() {
                return invalid(
                    "storage.postgres.connect_timeout",
                    "must be more than 0s".into(),
                );
            }
        }
        if self.storage.retention.is_zero() {
            return invalid("storage.retention", "must be more than 0s".into());
        }
        if self.storage.retention_interval.is_zero() {
            return invalid("storage.retention_interval", "must be more than 0s".into());
        }
        if self.storage.compaction_interval.is_zero() {
            return invalid("storage.compaction_interval", "must be more than 0s".into());
        }
        if self.storage.journal_seal_readings == 0 {
            return invalid("storage.journal_seal_readings", "must be at least 1".into());
        }
        if self.storage.journal_max_readings
            < u64::from(self.storage.journal_seal_readings) + self.pipeline.queue_capacity as u64
        {
            return invalid(
                "storage.journal_max_readings",
                format!(
                    "must be at least storage.journal_seal_readings + pipeline.queue_capacity ({})",
                    u64::from(self.storage.journal_seal_readings)
                        + self.pipeline.queue_capacity as u64
                ),
            );
        }
        if self.ws.max_in_flight == 0 {
            return invalid("ws.max_in_flight", "must be at least 1".into());
        }
        if self.ws.max_message_bytes < 64 {
            return invalid("ws.max_message_bytes", "must be at least 64".into());
        }
        if self.ws.ping_interval.is_zero() || self.ws.ping_interval >= self.ws.idle_timeout {
            return invalid(
                "ws.ping_interval",
                "must be more than 0s and less than ws.idle_timeout".into(),
            );
        }
        if self.ws.live_buffer == 0 {
            return invalid("ws.live_buffer", "must be at least 1".into());
        }
        if self.telemetry.slow_poll_threshold.is_zero() {
            return invalid(
                "telemetry.slow_poll_threshold",
                "must be more than 0s".into(),
            );
        }
        if let Err((key, reason)) = tls::validate(&self.server.tls) {
            return invalid(key, reason);
        }
        if let Err((key, reason)) = mqtt::validate(&self.mqtt, &self.limits) {
            return invalid(key, reason);
        }
        if let Err((key, reason)) = rules::validate(&self.rules, &self.alerts) {
            return invalid(key, reason);
        }
        if let Err((key, reason)) = rollups::validate(&self.rollups) {
            return invalid(key, reason);
        }
        if let Err((key, reason)) = access::validate(&self.auth, &self.rate_limit) {
            return invalid(key, reason);
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return invalid(
                "log.level",
                format!("`{}` is not a valid filter", self.log.level),
            );
        }
        Ok(())
    }

    /// Valid but probably not meant: one sentence each, naming the keys. Logged as warnings at
    /// start, and printed to stderr by `--check-config`.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.limits.max_age > self.storage.retention {
            out.push(format!(
                "limits.max_age ({}) is longer than storage.retention ({}): a reading older than \
                 the retention is acknowledged, then deleted by the next sweep",
                duration::format(self.limits.max_age),
                duration::format(self.storage.retention)
            ));
        }
        if self.storage.backend == Backend::Sqlite && !self.storage.postgres.url.is_empty() {
            out.push(
                "storage.postgres.url is set but storage.backend is \"sqlite\": the URL is not used"
                    .into(),
            );
        }
        out
    }

    /// The effective configuration as TOML, with secrets redacted, for `--check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_spec() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.server.listen.port(), 8080);
        assert_eq!(s.storage.db_path(), PathBuf::from("./data/sluice.db"));
        assert_eq!(s.storage.synchronous, Synchronous::Full);
        assert_eq!(s.limits.max_body_bytes, 4 * 1024 * 1024);
        assert_eq!(s.storage.retention, Duration::from_secs(30 * 86400));
        assert!(s.limits.max_age <= s.storage.retention);
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn env_overrides_file_and_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "[pipeline]\nbatch_max = 7\n[server]\nlisten = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let s = Settings::load_from(
            Some(&path),
            env(&[
                ("SLUICE__SERVER__LISTEN", "127.0.0.1:9"),
                ("SLUICE__STORAGE__RETENTION", "1h"),
            ]),
        )
        .unwrap();
        assert_eq!(s.pipeline.batch_max, 7);
        assert_eq!(s.server.listen.port(), 9);
        assert_eq!(s.storage.retention, Duration::from_secs(3600));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let err = Settings::load_from(None, env(&[("SLUICE__SERVER__LISTENN", "x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listenn"), "{err}");
        let err = Settings::load_from(None, env(&[("SLUICE__PIPELINE__BATCH_MAX", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch_max"), "{err}");
        let err = Settings::load_from(None, env(&[("SLUICE__PIPELINE__QUEUE_CAPACITY", "10")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("pipeline.queue_capacity"), "{err}");
    }

    #[test]
    fn warnings_name_the_keys_that_conflict() {
        assert!(Settings::load_from(None, env(&[]))
            .unwrap()
            .warnings()
            .is_empty());
        let s = Settings::load_from(None, env(&[("SLUICE__STORAGE__RETENTION", "1day")])).unwrap();
        let w = s.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("limits.max_age (30days)") && w[0].contains("storage.retention (1day)"),
            "{w:?}"
        );
    }

    #[test]
    fn an_unknown_key_is_named_in_full() {
        let err = Settings::load_from(None, env(&[("SLUICE__SERVER__LISTN", "x")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown key `server.listn`")
                && err.contains("SLUICE__SERVER__LISTN")
                && err.contains("[server] takes `listen`"),
            "{err}"
        );
    }

    #[test]
    fn rollup_levels_come_from_the_environment_as_a_comma_separated_list() {
        let s =
            Settings::load_from(None, env(&[("SLUICE__ROLLUPS__LEVELS", "1m,1h,1day")])).unwrap();
        assert_eq!(s.rollups.levels, ["1m", "1h", "1day"]);
        let s = Settings::load_from(None, env(&[("SLUICE__ROLLUPS__LEVELS", "")])).unwrap();
        assert!(s.rollups.levels.is_empty());
        let err = Settings::load_from(None, env(&[("SLUICE__ROLLUPS__LEVELS", "1m,7s")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("rollups.levels"), "{err}");
        // Other string keys stay strings, commas and all.
        let s = Settings::load_from(
            None,
            env(&[("SLUICE__MQTT__TOPIC", "devices/+/readings,x")]),
        )
        .unwrap();
        assert_eq!(s.mqtt.topic, "devices/+/readings,x");
    }

    #[test]
    fn server_timeouts_and_connection_limit_are_checked() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.server.request_timeout, Duration::from_secs(30));
        assert_eq!(s.server.max_connections, 10_000);
        assert_eq!(s.server.keep_alive_timeout, Duration::from_secs(75));
        assert_eq!(s.server.header_read_timeout(), Duration::from_secs(30));
        for (key, value, named) in [
            (
                "SLUICE__SERVER__REQUEST_TIMEOUT",
                "0s",
                "server.request_timeout",
            ),
            (
                "SLUICE__SERVER__MAX_CONNECTIONS",
                "0",
                "server.max_connections",
            ),
            (
                "SLUICE__SERVER__KEEP_ALIVE_TIMEOUT",
                "0s",
                "server.keep_alive_timeout",
            ),
            ("SLUICE__SERVER__REQUEST_TIMEOUT", "soon", "request_timeout"),
            (
                "SLUICE__SERVER__SHUTDOWN_TIMEOUT",
                "0s",
                "server.shutdown_timeout",
            ),
            (
                "SLUICE__PIPELINE__BATCH_MAX_DELAY",
                "18446744073709551615s",
                "batch_max_delay",
            ),
            ("SLUICE__LIMITS__MAX_AGE", "101years", "max_age"),
            ("SLUICE__SERVER__MAX_CONNECTIONS", "-1", "max_connections"),
        ] {
            let err = Settings::load_from(None, env(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{key}={value}: {err}");
        }
        let s = Settings::load_from(
            None,
            env(&[
                ("SLUICE__SERVER__REQUEST_TIMEOUT", "10s"),
                ("SLUICE__SERVER__KEEP_ALIVE_TIMEOUT", "2s"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.header_read_timeout(), Duration::from_secs(2));
    }

    #[test]
    fn effective_config_round_trips_through_toml() {
        let s = Settings::default();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("effective.toml");
        std::fs::write(&path, s.to_toml()).unwrap();
        assert_eq!(Settings::load_from(Some(&path), env(&[])).unwrap(), s);
    }

    #[test]
    fn database_passwords_are_redacted_everywhere() {
        for (url, shown) in [
            (
                "postgres://sluice:s3cr%40t@db:5432/sluice",
                "postgres://sluice:<redacted>@db:5432/sluice",
            ),
            (
                "postgresql://sluice@db/sluice",
                "postgresql://sluice@db/sluice",
            ),
            (
                "postgres://db/sluice?user=u&password=s3cret&application_name=x",
                "postgres://db/sluice?user=u&password=<redacted>&application_name=x",
            ),
            (
                "host=db user=sluice password='s3 cret' dbname=sluice",
                "host=db user=sluice password=<redacted> dbname=sluice",
            ),
            ("host=db password=s3cret", "host=db password=<redacted>"),
            // A password holding @, : and / (not percent-encoded), and schemes we do not take.
            (
                "postgres://postgres:p@s3:w/rd@127.0.0.1/x",
                "postgres://postgres:<redacted>@127.0.0.1/x",
            ),
            ("postgress://u:s3cret@h/x", "postgress://u:<redacted>@h/x"),
            (
                "mysql://u:s3cret@h/x?password=s3cret",
                "mysql://u:<redacted>@h/x?password=<redacted>",
            ),
        ] {
            let u = DbUrl::new(url);
            assert_eq!(u.redacted(), shown);
            assert!(!format!("{u:?} {u}").contains("s3"), "{u:?}");
        }
        let s = Settings::load_from(
            None,
            env(&[
                ("SLUICE__STORAGE__BACKEND", "postgres"),
                ("SLUICE__STORAGE__POSTGRES__URL", "postgres://u:s3cret@db/x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.storage.backend, Backend::Postgres);
        assert_eq!(s.storage.postgres.url.expose(), "postgres://u:s3cret@db/x");
        let shown = s.to_toml();
        assert!(shown.contains("postgres://u:<redacted>@db/x"), "{shown}");
        assert!(!shown.contains("s3cret") && !format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn postgres_backend_needs_a_usable_url() {
        let err = |pairs: &[(&str, &str)]| {
            let mut all = vec![("SLUICE__STORAGE__BACKEND", "postgres")];
            all.extend_from_slice(pairs);
            Settings::load_from(None, env(&all))
                .unwrap_err()
                .to_string()
        };
        let e = err(&[]);
        assert!(
            e.contains("storage.postgres.url") && e.contains("required"),
            "{e}"
        );
        let e = err(&[(
            "SLUICE__STORAGE__POSTGRES__URL",
            "postgres://u:s3cret@db:notaport/x",
        )]);
        assert!(
            e.contains("storage.postgres.url") && !e.contains("s3cret"),
            "{e}"
        );
        let e = err(&[
            ("SLUICE__STORAGE__POSTGRES__URL", "postgres://db/x"),
            ("SLUICE__STORAGE__POSTGRES__POOL_SIZE", "0"),
        ]);
        assert!(e.contains("storage.postgres.pool_size"), "{e}");
        let e = Settings::load_from(None, env(&[("SLUICE__STORAGE__BACKEND", "mysql")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("backend") && e.contains("mysql"), "{e}");
    }

    #[test]
    fn bad_values_are_echoed_with_what_is_accepted() {
        let err = |k: &str, v: &str| {
            Settings::load_from(None, env(&[(k, v)]))
                .unwrap_err()
                .to_string()
        };
        let e = err("SLUICE__STORAGE__SYNCHRONOUS", "fast");
        assert!(
            e.contains("`fast`")
                && e.contains("off, normal, full, extra")
                && e.contains("storage.synchronous"),
            "{e}"
        );
        let e = err("SLUICE__LOG__FORMAT", "xml");
        assert!(e.contains("`xml`") && e.contains("text, json"), "{e}");
        let e = err("SLUICE__STORAGE__BACKEND", "mysql");
        assert!(
            e.contains("`mysql`") && e.contains("sqlite, postgres"),
            "{e}"
        );
        let e = err("SLUICE__SERVER__LISTEN", "localhost:9000");
        assert!(
            e.contains("`localhost:9000`")
                && e.contains("IP address and port")
                && e.contains("server.listen"),
            "{e}"
        );
        // Every variant named in ENUM_VALUES is accepted.
        for (key, values) in [
            ("SLUICE__STORAGE__SYNCHRONOUS", ENUM_VALUES[0].1),
            ("SLUICE__LOG__FORMAT", ENUM_VALUES[2].1),
        ] {
            for v in values.split(", ") {
                Settings::load_from(None, env(&[(key, v)]))
                    .unwrap_or_else(|e| panic!("{key}={v}: {e}"));
            }
        }
        let ok = Settings::load_from(None, env(&[("SLUICE__SERVER__LISTEN", "[::1]:0")])).unwrap();
        assert!(ok.server.listen.is_ipv6());
    }

    #[test]
    fn nats_keys_are_checked_and_the_password_is_redacted() {
        let s = Settings::load_from(
            None,
            env(&[
                ("SLUICE__NATS__ENABLED", "true"),
                ("SLUICE__NATS__URL", "nats://sluice:s3cret@nats:4222"),
                ("SLUICE__NATS__MODE", "core"),
            ]),
        )
        .unwrap();
        assert_eq!(s.nats.mode, NatsMode::Core);
        assert!(!s.to_toml().contains("s3cret"), "{}", s.to_toml());
        assert!(!format!("{s:?}").contains("s3cret"));
        assert!(s.to_toml().contains("nats://<redacted>@nats:4222"));
        let err = |pairs: &[(&str, &str)]| {
            let mut all = vec![("SLUICE__NATS__ENABLED", "true")];
            all.extend_from_slice(pairs);
            Settings::load_from(None, env(&all))
                .unwrap_err()
                .to_string()
        };
        let e = err(&[("SLUICE__NATS__URL", "tls://u:pw@h:4222")]);
        assert!(e.contains("nats.url") && !e.contains("pw"), "{e}");
        for bad in [
            "nats://127.0.0.1:99999",
            "nats://a b:4222",
            "nats://",
            "nats://:4222",
        ] {
            let e = err(&[("SLUICE__NATS__URL", bad)]);
            assert!(e.contains("nats.url"), "{bad}: {e}");
        }
        // A token alone, and every URL of a list, are redacted; hosts stay visible.
        for (url, secret) in [
            ("nats://tok3nsecret@h1:4222", "tok3nsecret"),
            ("nats://h1:4222,nats://u:p2secret@h2:4222", "p2secret"),
        ] {
            let shown = DbUrl::new(url).to_string();
            assert!(
                !shown.contains(secret) && shown.contains("h1:4222"),
                "{shown}"
            );
        }
        let e = err(&[("SLUICE__NATS__SUBJECT_PREFIX", "sluice.*")]);
        assert!(e.contains("nats.subject_prefix"), "{e}");
        let e = err(&[("SLUICE__NATS__SUBJECT_PREFIX", "a..b")]);
        assert!(e.contains("nats.subject_prefix"), "{e}");
        let e = err(&[("SLUICE__NATS__MAX_IN_FLIGHT", "0")]);
        assert!(e.contains("nats.max_in_flight"), "{e}");
        let e = err(&[("SLUICE__NATS__MODE", "fast")]);
        assert!(
            e.contains("`fast`") && e.contains("auto, jetstream, core"),
            "{e}"
        );
        // Disabled, the keys are not checked: a leftover URL does not stop the start.
        Settings::load_from(None, env(&[("SLUICE__NATS__URL", "bogus")])).unwrap();
    }
}
