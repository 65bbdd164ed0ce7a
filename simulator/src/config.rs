//! The command line and the validated run configuration.
//!
//! `sluice-sim [OPTIONS]` runs a fleet against Sluice; `sluice-sim null-sink` serves a sink that
//! only parses. [`RunArgs`] is what clap parses; [`RunArgs::resolve`] checks it and fills in the
//! seed and device prefix, giving the [`RunConfig`] the rest of the crate uses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::auth::{Auth, Secret};
pub use crate::encode::Format;
use crate::fleet::{FleetProfile, FleetSpec};

/// Simulates a fleet of IoT devices streaming readings to Sluice over HTTP, WebSocket or MQTT,
/// measures ack latency, and checks that nothing acknowledged was lost.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// A helper instead of a run.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The run.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Helpers.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve a sink that parses readings and acks them at once (HTTP POST /v1/readings and
    /// GET /v1/ws), to measure the simulator alone.
    NullSink {
        /// Address to listen on (port 0 picks a free port; the address is printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Mint write tokens through Sluice's admin API (`auth.mode = "token"`) and write a
    /// --tokens-file for runs: one token per device `<prefix>-0 … <prefix>-<N-1>` (each may
    /// write, and read back, only its own device), or with --gateway one token whose glob
    /// `<prefix>-*` covers them all. The file holds secrets: it is written readable by its owner
    /// only, and no token is printed.
    ///
    /// Example: sluice-sim tokens --admin-token "$ADMIN" --devices 1000 --device-prefix bench
    /// --out tokens.txt; then sluice-sim --device-prefix bench --devices 1000 --tokens-file
    /// tokens.txt --verify
    Tokens(TokensArgs),
}

/// Options of `sluice-sim tokens`.
#[derive(Args, Debug, Clone)]
pub struct TokensArgs {
    /// Base URL of Sluice.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// Sluice's `auth.admin_token` (its SLUICE__AUTH__ADMIN_TOKEN). Prefer the environment
    /// variable: a command line is visible to other users of the machine.
    #[arg(long, env = "SLUICE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Secret,
    /// Devices to mint tokens for.
    #[arg(long, default_value_t = 100)]
    pub devices: u32,
    /// Device ids are `<prefix>-<n>`: pass the same --device-prefix to the runs.
    #[arg(long)]
    pub device_prefix: String,
    /// One token for the whole fleet (devices glob `<prefix>-*`, like a gateway) instead of
    /// one per device.
    #[arg(long)]
    pub gateway: bool,
    /// The tokens file to write (replaced whole; mode 0600).
    #[arg(long)]
    pub out: PathBuf,
    /// Admin requests at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
}

/// How readings travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// `POST /v1/readings`, batches of readings from many devices, over a keep-alive pool.
    Http,
    /// `GET /v1/ws?device_id=…`, one connection per device, frames pipelined.
    Ws,
    /// One MQTT publish per frame to `devices/<id>/readings`.
    Mqtt,
}

/// How fast.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Open loop: `--rate` readings/s per device on a fixed schedule, whatever the server does.
    Rate,
    /// Closed loop: as fast as the acks allow (`--connections` requests, `--window` frames).
    Max,
    /// Open loop, raising the rate by `--ramp-factor` every `--ramp-step` until the step's p99
    /// exceeds `--p99-bound` or the server falls behind; reports the knee.
    Ramp,
}

/// Which devices an HTTP request carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceMix {
    /// Each sender owns every `--connections`-th device and cycles through them, like a
    /// gateway forwarding its own devices: a request carries at most `--devices / --connections`
    /// devices.
    Gateway,
    /// Each reading of a request is from a device drawn at random (seeded) from the whole
    /// fleet, so a request of 100 readings mixes about 100 devices. Each device still numbers
    /// its readings 1, 2, 3, … whichever sender draws it.
    Random,
}

/// Options of a run.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Base URL of Sluice (HTTP and WebSocket ingest, and reads for --verify).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// A token for Sluice's `auth.mode = "token"` (SPEC §11), sent as `Authorization: Bearer`
    /// on every HTTP request, WebSocket upgrade and --verify read: e.g. a write token whose
    /// devices glob covers the fleet. With --tokens-file, the token of devices the file does
    /// not name. Never printed; prefer the environment variable to the command line.
    #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    /// Per-device tokens: lines `<device_id> <token>` (or `<glob> <token>`, `*` and `?`, for a
    /// token covering several devices; `#` comments). An exact id wins over a glob; globs are
    /// tried in file order. `sluice-sim tokens` writes such a file. Each device sends its own
    /// token, and --verify reads each device back with it (a write token may read its own
    /// devices). With more than one token, an HTTP request carries one device's readings:
    /// each request is a batch of one device (gateway mix: the sender's devices in turn;
    /// random mix: a device drawn at random per request). MQTT ignores tokens (the broker
    /// authenticates) except for --verify.
    #[arg(long, env = "SLUICE_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// http, ws or mqtt.
    #[arg(long, value_enum, default_value_t = Transport::Http)]
    pub transport: Transport,
    /// Wire format. http: json, cbor, senml-json, senml-cbor (POST /v1/readings with
    /// application/json, application/cbor, application/senml+json, application/senml+cbor) or
    /// line (InfluxDB line protocol to POST /api/v2/write, precision ms); ws: json (text
    /// frames) or cbor (binary frames); mqtt: json or senml-json.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// MQTT broker, `mqtt://host:port` (with --transport mqtt).
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    /// Number of devices.
    #[arg(long, default_value_t = 100)]
    pub devices: u32,
    /// Readings per second per device (open-loop modes). 0 = idle connections (ws, mqtt).
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Keep the connections open doing nothing but answer pings (same as --rate 0).
    #[arg(long)]
    pub idle: bool,
    /// How long to generate readings (e.g. 30s, 5m). In-flight readings are then drained.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// rate, max or ramp.
    #[arg(long, value_enum, default_value_t = Mode::Rate)]
    pub mode: Mode,
    /// Metrics per reading (1 to 256; the profile's signals, then aux_<k> random walks).
    #[arg(long, default_value_t = 4)]
    pub metrics: usize,
    /// Device kinds: mixed (4 sensors : 1 tracker), sensor or tracker.
    #[arg(long, value_enum, default_value_t = FleetProfile::Mixed)]
    pub profile: FleetProfile,
    /// HTTP: readings per request.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// HTTP: longest a due reading waits for its batch to fill before the batch is sent anyway.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub linger: Duration,
    /// HTTP: concurrent requests (each a sender owning a share of the devices, or drawing
    /// from the whole fleet with --device-mix random).
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// HTTP: gateway (each sender owns every --connections-th device and cycles through them)
    /// or random (each reading from a random device of the whole fleet, drawn with --seed).
    #[arg(long, value_enum, default_value_t = DeviceMix::Gateway)]
    pub device_mix: DeviceMix,
    /// WebSocket / MQTT: readings per frame or message (1 = a single reading object).
    #[arg(long, default_value_t = 1)]
    pub frame_readings: usize,
    /// WebSocket: frames in flight per connection (Sluice allows ws.max_in_flight, 64 by
    /// default). MQTT: publishes in flight per client.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// MQTT QoS: 0 (no acknowledgement) or 1 (PUBACK).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// MQTT: number of client connections; devices are spread over them (default: one per device).
    #[arg(long)]
    pub mqtt_clients: Option<u32>,
    /// Seed of every random choice (signals, faults, start phases). Default: from the clock; the
    /// summary prints it.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Device ids are `<prefix>-<n>`. Default: `sim-<6 hex digits>`, new for each run.
    #[arg(long)]
    pub device_prefix: Option<String>,
    /// First `seq` of every device (raise it to reuse a prefix without duplicates).
    #[arg(long, default_value_t = 1)]
    pub seq_start: u64,
    /// Share of readings replaced by malformed ones that SPEC §1 rejects (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub bad_ratio: f64,
    /// After the run, read every acknowledged reading back and report lost / duplicated ones;
    /// exit 1 on any.
    #[arg(long)]
    pub verify: bool,
    /// With --verify: how long to wait for acknowledged readings to show up in the store (MQTT
    /// acks come from the broker, before Sluice commits). Default 0 for http/ws, 30s for mqtt.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub verify_wait: Option<Duration>,
    /// Write the summary as JSON to this file (fields: see simulator/README.md).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Ramp: a step whose p99 ack latency exceeds this ends the ramp.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub p99_bound: Duration,
    /// Ramp: length of each step.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub ramp_step: Duration,
    /// Ramp: rate multiplier between steps.
    #[arg(long, default_value_t = 1.5)]
    pub ramp_factor: f64,
    /// Leave answers of the first part of the run out of the latency figures (e.g. while 10 000
    /// connections are still being opened).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// After --duration, how long to wait for outstanding acks before giving up on them.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// HTTP: timeout of one request.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Connections being opened at the same time (WebSocket handshakes, MQTT connects).
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// No progress line.
    #[arg(long, short)]
    pub quiet: bool,
}

/// A checked run configuration.
#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    /// Base URL of Sluice, without a trailing slash.
    pub target: String,
    /// The transport.
    pub transport: Transport,
    /// The wire format.
    pub format: Format,
    /// MQTT broker host.
    #[serde(skip)]
    pub broker: (String, u16),
    /// Devices.
    pub devices: u32,
    /// Readings/s per device (start rate for ramp).
    pub rate: f64,
    /// Idle connections only.
    pub idle: bool,
    /// Generation time.
    #[serde(skip)]
    pub duration: Duration,
    /// The mode.
    pub mode: Mode,
    /// Metrics per reading.
    pub metrics: usize,
    /// Fleet profile.
    pub profile: FleetProfile,
    /// HTTP batch size.
    pub batch: usize,
    /// HTTP linger.
    #[serde(skip)]
    pub linger: Duration,
    /// HTTP senders.
    pub connections: usize,
    /// Which devices an HTTP request carries.
    pub device_mix: DeviceMix,
    /// Readings per WS frame / MQTT message.
    pub frame_readings: usize,
    /// WS frames / MQTT publishes in flight.
    pub window: usize,
    /// MQTT QoS.
    pub qos: u8,
    /// MQTT clients.
    pub mqtt_clients: u32,
    /// Seed.
    pub seed: u64,
    /// Device prefix.
    pub device_prefix: String,
    /// First seq.
    pub seq_start: u64,
    /// Fault ratio.
    pub bad_ratio: f64,
    /// Read back after the run.
    pub verify: bool,
    /// Read-back patience.
    #[serde(skip)]
    pub verify_wait: Duration,
    /// Ramp bound.
    #[serde(skip)]
    pub p99_bound: Duration,
    /// Ramp step.
    #[serde(skip)]
    pub ramp_step: Duration,
    /// Ramp factor.
    pub ramp_factor: f64,
    /// Latency warm-up.
    #[serde(skip)]
    pub warmup: Duration,
    /// Drain patience.
    #[serde(skip)]
    pub drain_timeout: Duration,
    /// Request timeout.
    #[serde(skip)]
    pub request_timeout: Duration,
    /// Parallel connects.
    pub connect_concurrency: usize,
    /// Show progress.
    #[serde(skip)]
    pub progress: bool,
    /// The token each device sends (never serialized).
    #[serde(skip)]
    pub auth: std::sync::Arc<Auth>,
}

impl RunConfig {
    /// The fleet this run drives.
    pub fn fleet(&self) -> FleetSpec {
        FleetSpec {
            prefix: self.device_prefix.clone(),
            devices: self.devices,
            profile: self.profile,
            metrics: self.metrics,
            seed: self.seed,
            seq_start: self.seq_start,
            bad_ratio: self.bad_ratio,
            distinct_ts: self.format.needs_distinct_ts(),
        }
    }

    /// Target readings per second over the whole fleet, in the open-loop modes.
    pub fn target_rate(&self) -> Option<f64> {
        match self.mode {
            Mode::Max => None,
            _ if self.idle => None,
            _ => Some(self.rate * f64::from(self.devices)),
        }
    }
}

/// `http`, `ws` or `mqtt`.
pub fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Http => "http",
        Transport::Ws => "ws",
        Transport::Mqtt => "mqtt",
    }
}

/// Splits `mqtt://host:port` (port defaults to 1883).
fn parse_broker(url: &str) -> anyhow::Result<(String, u16)> {
    let Some(rest) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    else {
        bail!("--broker: `{url}` must start with mqtt:// (TLS is not supported)");
    };
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) => Ok((
            host.trim_matches(['[', ']']).to_string(),
            port.parse()
                .map_err(|_| anyhow::anyhow!("--broker: bad port in `{url}`"))?,
        )),
        None => Ok((rest.to_string(), 1883)),
    }
}

/// A seed from the clock and the process id.
fn clock_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

impl RunArgs {
    /// Checks the options and fills in defaults that depend on the clock.
    pub fn resolve(self) -> anyhow::Result<RunConfig> {
        let target = self.target.trim_end_matches('/').to_string();
        if !target.starts_with("http://") {
            bail!("--target: `{target}` must be an http:// URL (TLS is not supported)");
        }
        let idle = self.idle || self.rate == 0.0;
        if idle && self.transport == Transport::Http {
            bail!("idle connections (--rate 0 / --idle) need --transport ws or mqtt");
        }
        if idle && self.mode != Mode::Rate {
            bail!("--idle / --rate 0 only with --mode rate");
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            bail!("--rate must be a finite number ≥ 0");
        }
        if self.devices == 0 {
            bail!("--devices must be at least 1");
        }
        if !(1..=256).contains(&self.metrics) {
            bail!("--metrics must be 1 to 256");
        }
        if self.batch == 0 || self.frame_readings == 0 || self.window == 0 || self.connections == 0
        {
            bail!("--batch, --frame-readings, --window and --connections must be at least 1");
        }
        if self.device_mix == DeviceMix::Random && self.transport != Transport::Http {
            bail!("--device-mix random is for --transport http (ws and mqtt bind a connection or topic to each device)");
        }
        if self.transport == Transport::Mqtt && self.window > u16::MAX as usize {
            bail!("--window must be at most 65535 with mqtt");
        }
        if !(0.0..=1.0).contains(&self.bad_ratio) {
            bail!("--bad-ratio must be between 0 and 1");
        }
        if !self.format.applies_to(self.transport) {
            bail!(
                "--format {} does not apply to --transport {}; valid pairs: {}",
                self.format.name(),
                transport_name(self.transport),
                Format::valid_pairs()
            );
        }
        if self.bad_ratio > 0.0 && !self.format.carries_faults() {
            bail!(
                "--bad-ratio needs --format json or cbor (the injected faults are JSON-shaped readings; {} has no such shapes)",
                self.format.name()
            );
        }
        if self.mode == Mode::Ramp && (self.ramp_factor.is_nan() || self.ramp_factor <= 1.0) {
            bail!("--ramp-factor must be above 1");
        }
        if self.duration.is_zero() {
            bail!("--duration must be positive");
        }
        let seed = self.seed.unwrap_or_else(clock_seed);
        let device_prefix = match self.device_prefix {
            Some(p) => p,
            None => format!("sim-{:06x}", clock_seed() & 0xff_ffff),
        };
        if crate::fleet::device_id(&device_prefix, self.devices - 1).len() > 128
            || !device_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-'))
            || !device_prefix.starts_with(|c: char| c.is_ascii_alphanumeric())
        {
            bail!("--device-prefix: `{device_prefix}` must make valid device ids (A-Z a-z 0-9 _ : -, starting with a letter or digit, at most 128 characters)");
        }
        let auth = Auth::resolve(
            self.token.as_ref(),
            self.tokens_file.as_deref(),
            &device_prefix,
            self.devices,
        )?;
        let broker = if self.transport == Transport::Mqtt {
            parse_broker(&self.broker)?
        } else {
            (String::new(), 0)
        };
        let mqtt_clients = self
            .mqtt_clients
            .unwrap_or(self.devices)
            .clamp(1, self.devices);
        let verify_wait = self.verify_wait.unwrap_or(match self.transport {
            Transport::Mqtt => Duration::from_secs(30),
            _ => Duration::ZERO,
        });
        Ok(RunConfig {
            target,
            transport: self.transport,
            format: self.format,
            broker,
            devices: self.devices,
            rate: self.rate,
            idle,
            duration: self.duration,
            mode: self.mode,
            metrics: self.metrics,
            profile: self.profile,
            batch: self.batch,
            linger: self.linger,
            connections: self.connections,
            device_mix: self.device_mix,
            frame_readings: self.frame_readings,
            window: self.window,
            qos: self.qos,
            mqtt_clients,
            seed,
            device_prefix,
            seq_start: self.seq_start,
            bad_ratio: self.bad_ratio,
            verify: self.verify,
            verify_wait,
            p99_bound: self.p99_bound,
            ramp_step: self.ramp_step,
            ramp_factor: self.ramp_factor,
            warmup: self.warmup,
            drain_timeout: self.drain_timeout,
            request_timeout: self.request_timeout,
            connect_concurrency: self.connect_concurrency.max(1),
            progress: !self.quiet,
            auth: std::sync::Arc::new(auth),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<RunConfig> {
        let mut v = vec!["sluice-sim"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v)?.run.resolve()
    }

    #[test]
    fn the_readme_commands_parse() {
        let c = parse(&[
            "--target",
            "http://127.0.0.1:8080",
            "--transport",
            "http",
            "--devices",
            "1000",
            "--rate",
            "10",
            "--duration",
            "60s",
        ])
        .unwrap();
        assert_eq!(c.target_rate(), Some(10_000.0));
        assert_eq!(c.duration, Duration::from_secs(60));
        let c = parse(&[
            "--transport",
            "ws",
            "--devices",
            "10000",
            "--rate",
            "1",
            "--duration",
            "5m",
        ])
        .unwrap();
        assert_eq!(c.duration, Duration::from_secs(300));
        let c = parse(&[
            "--transport",
            "mqtt",
            "--broker",
            "mqtt://127.0.0.1:1883",
            "--devices",
            "2000",
            "--rate",
            "5",
        ])
        .unwrap();
        assert_eq!(c.broker, ("127.0.0.1".to_string(), 1883));
        assert_eq!(c.mqtt_clients, 2000);
        assert_eq!(c.verify_wait, Duration::from_secs(30));
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(parse(&["--transport", "http", "--rate", "0"]).is_err());
        assert!(parse(&["--bad-ratio", "1.5"]).is_err());
        assert!(parse(&["--metrics", "0"]).is_err());
        assert!(parse(&["--device-prefix", "has space"]).is_err());
        assert!(parse(&["--target", "https://x"]).is_err());
        assert!(parse(&["--transport", "mqtt", "--broker", "mqtts://x:8883"]).is_err());
        assert!(parse(&["--qos", "2"]).is_err());
        assert!(parse(&["--transport", "ws", "--device-mix", "random"]).is_err());
    }

    #[test]
    fn formats_go_with_their_transports() {
        assert_eq!(parse(&[]).unwrap().format, Format::Json);
        for (transport, format) in [
            ("http", "json"),
            ("http", "cbor"),
            ("http", "senml-json"),
            ("http", "senml-cbor"),
            ("http", "line"),
            ("ws", "json"),
            ("ws", "cbor"),
            ("mqtt", "json"),
            ("mqtt", "senml-json"),
        ] {
            let c = parse(&["--transport", transport, "--format", format]).unwrap();
            assert_eq!(c.format.name(), format);
            assert_eq!(c.fleet().distinct_ts, format.starts_with("senml"));
        }
        for (transport, format) in [
            ("ws", "senml-json"),
            ("ws", "senml-cbor"),
            ("ws", "line"),
            ("mqtt", "cbor"),
            ("mqtt", "senml-cbor"),
            ("mqtt", "line"),
        ] {
            let e = parse(&["--transport", transport, "--format", format]).unwrap_err();
            let e = e.to_string();
            assert!(e.contains("valid pairs: http: json, cbor"), "{e}");
            assert!(
                e.contains(&format!("--format {format} does not apply")),
                "{e}"
            );
        }
        assert!(parse(&["--format", "senml"]).is_err(), "exact value names");
        assert!(parse(&["--format", "line", "--bad-ratio", "0.1"]).is_err());
        assert!(parse(&["--format", "senml-json", "--bad-ratio", "0.1"]).is_err());
        assert!(parse(&["--format", "cbor", "--bad-ratio", "0.1"]).is_ok());
    }

    #[test]
    fn defaults_fill_in_seed_and_prefix() {
        let c = parse(&[]).unwrap();
        assert!(c.device_prefix.starts_with("sim-"));
        let c = parse(&["--seed", "7", "--device-prefix", "lab-a"]).unwrap();
        assert_eq!((c.seed, c.device_prefix.as_str()), (7, "lab-a"));
        assert!(!c.idle && parse(&["--transport", "ws", "--idle"]).unwrap().idle);
        assert_eq!(c.device_mix, DeviceMix::Gateway);
        let c = parse(&["--device-mix", "random", "--devices", "100000"]).unwrap();
        assert_eq!(c.device_mix, DeviceMix::Random);
    }

    #[test]
    fn null_sink_is_a_subcommand() {
        let cli =
            Cli::try_parse_from(["sluice-sim", "null-sink", "--listen", "127.0.0.1:9999"]).unwrap();
        assert!(matches!(cli.command, Some(Command::NullSink { .. })));
    }
}
