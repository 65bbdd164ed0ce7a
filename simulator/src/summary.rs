//! The end of a run: the summary table and its JSON form (`--json FILE`).
//!
//! The JSON fields are documented in simulator/README.md; [`Summary::FIELDS`] lists the
//! top-level ones, and a test keeps the two in step.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::config::{Format, Mode, RunConfig, Transport};
use crate::stats::Percentiles;
use crate::verify::VerifyReport;

/// One step of a ramp.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RampStep {
    /// Readings/s per device asked.
    pub rate_per_device: f64,
    /// Readings/s asked of the whole fleet.
    pub target_rate: f64,
    /// Readings/s acknowledged during the step.
    pub achieved_rate: f64,
    /// p99 ack latency during the step, ms.
    pub p99_ms: f64,
    /// Within the p99 bound and at least 90 % of the target.
    pub ok: bool,
}

/// The ramp's outcome.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RampReport {
    /// Every step, in order.
    pub steps: Vec<RampStep>,
    /// Fleet rate of the last step that met the bound (`null` if the first did not).
    pub knee_rate: Option<f64>,
    /// Why the ramp ended.
    pub stopped_because: String,
    /// The p99 bound, ms.
    pub p99_bound_ms: f64,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// `http`, `ws` or `mqtt`.
    pub transport: Transport,
    /// `json`, `cbor`, `senml-json`, `senml-cbor` or `line`.
    pub format: Format,
    /// `rate`, `max` or `ramp`.
    pub mode: Mode,
    /// Sluice base URL (or the broker, for MQTT).
    pub target: String,
    /// Devices simulated.
    pub devices: u32,
    /// Readings/s per device asked (start rate for ramp; 0 for idle).
    pub rate_per_device: f64,
    /// Readings/s asked of the fleet; `null` in max mode and for idle connections.
    pub target_rate: Option<f64>,
    /// Idle connections only.
    pub idle: bool,
    /// Seconds of generation.
    pub duration_s: f64,
    /// Seconds from start to the last answer (generation + drain).
    pub elapsed_s: f64,
    /// Seed, to reproduce the run.
    pub seed: u64,
    /// Device ids are `<device_prefix>-<n>`.
    pub device_prefix: String,
    /// Readings written for the first time (valid and faulty).
    pub sent: u64,
    /// Readings written again after a refusal or a lost connection.
    pub resent: u64,
    /// Valid readings acknowledged (MQTT QoS 1: PUBACKed by the broker).
    pub acked: u64,
    /// Sum of the server's `accepted` counts.
    pub accepted: u64,
    /// Sum of the server's `duplicates` counts.
    pub duplicates: u64,
    /// Readings the server rejected (all reasons).
    pub rejected: u64,
    /// Injected faults rejected naming the expected field.
    pub rejected_expected: u64,
    /// Injected faults rejected naming another field.
    pub rejected_wrong_field: u64,
    /// Valid readings rejected.
    pub rejected_unexpected: u64,
    /// Rejections by the server's `reason` label (`unexpected` for the two kinds above).
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Injected faults sent.
    pub bad_sent: u64,
    /// Injected faults accepted as valid.
    pub bad_accepted: u64,
    /// Answers refusing for load (HTTP 503, WebSocket overloaded/unavailable).
    pub shed: u64,
    /// Readings refused for their device's rate limit (HTTP 429 or a `rate_limited`
    /// rejection, a WebSocket `rate_limited` error ack), each sent again after the wait.
    pub rate_limited: u64,
    /// Answers refusing the credentials: HTTP 401/403, WebSocket upgrades refused with
    /// 401/403, WebSocket closes with 1008. Any fails the run.
    pub auth_failures: u64,
    /// Which tokens were sent: `none`, `--token …`, `--tokens-file FILE (…)`.
    pub auth: String,
    /// Transport errors (failed requests, lost connections, unexpected answers).
    pub errors: u64,
    /// Valid readings never acknowledged (refused as a whole, or unanswered at the drain timeout).
    pub unacked: u64,
    /// Readings due but not sent when generation stopped (open loop: the sender fell behind).
    pub behind_schedule: u64,
    /// Acknowledged readings per second, from the first send to the last ack (connect time and
    /// idle drain excluded).
    pub readings_per_s: f64,
    /// Readings sent (first time) per second over `duration_s`.
    pub sent_per_s: f64,
    /// Bytes on the wire: HTTP request bodies, WebSocket frame payloads, MQTT payloads (every
    /// write, resends included).
    pub wire_bytes: u64,
    /// `wire_bytes` / readings in those writes.
    pub bytes_per_reading: f64,
    /// Successful connects (reconnects included).
    pub connects: u64,
    /// Failed connects.
    pub connect_errors: u64,
    /// Most connections open at once.
    pub connections_peak: u64,
    /// Send → ack latency per reading, ms (answers during `--warmup` left out).
    pub latency_ms: Percentiles,
    /// Valid readings acknowledged in each second of the run, from its start (generation, then
    /// drain): element `i` counts acks in `[i s, i+1 s)`; the last one the final part-second.
    /// They add up to `acked`.
    pub acked_per_s: Vec<u64>,
    /// Seconds at the start left out of `latency_ms`.
    pub warmup_s: f64,
    /// The ramp, in ramp mode.
    pub ramp: Option<RampReport>,
    /// The read-back, with `--verify`.
    pub verify: Option<VerifyReport>,
    /// A few problems seen, for a first look.
    pub problems: Vec<String>,
    /// CPU seconds the simulator used.
    pub sim_cpu_s: f64,
    /// Peak resident memory of the simulator, MiB.
    pub sim_peak_rss_mb: Option<f64>,
    /// No check failed: nothing lost or duplicated (with --verify), every fault rejected as
    /// expected, no valid reading rejected.
    pub ok: bool,
}

impl Summary {
    /// The top-level JSON fields, as documented in simulator/README.md.
    pub const FIELDS: &'static [&'static str] = &[
        "transport",
        "format",
        "mode",
        "target",
        "devices",
        "rate_per_device",
        "target_rate",
        "idle",
        "duration_s",
        "elapsed_s",
        "seed",
        "device_prefix",
        "sent",
        "resent",
        "acked",
        "accepted",
        "duplicates",
        "rejected",
        "rejected_expected",
        "rejected_wrong_field",
        "rejected_unexpected",
        "rejected_by_reason",
        "bad_sent",
        "bad_accepted",
        "shed",
        "rate_limited",
        "auth_failures",
        "auth",
        "errors",
        "unacked",
        "behind_schedule",
        "readings_per_s",
        "sent_per_s",
        "wire_bytes",
        "bytes_per_reading",
        "connects",
        "connect_errors",
        "connections_peak",
        "latency_ms",
        "acked_per_s",
        "warmup_s",
        "ramp",
        "verify",
        "problems",
        "sim_cpu_s",
        "sim_peak_rss_mb",
        "ok",
    ];

    /// Whether every check passed; sets `ok`. A run that sent readings, had none
    /// acknowledged and saw errors or missing answers (no server, or a server that refused
    /// everything) fails too. (MQTT at QoS 0 has no acknowledgements and no errors.)
    pub fn judge(&mut self) -> bool {
        let nothing_acked =
            self.sent > 0 && self.acked == 0 && (self.errors > 0 || self.unacked > 0);
        if nothing_acked {
            self.problems.push(format!(
                "none of the {} readings sent was acknowledged ({} errors)",
                self.sent, self.errors
            ));
        }
        if self.auth_failures > 0 {
            self.problems.push(format!(
                "{} answers refused the credentials (HTTP 401/403, WebSocket 1008; tokens: {})",
                self.auth_failures, self.auth
            ));
        }
        self.ok = self.rejected_wrong_field == 0
            && self.auth_failures == 0
            && self.rejected_unexpected == 0
            && self.bad_accepted == 0
            && !nothing_acked
            && self.verify.as_ref().is_none_or(|v| v.ok());
        self.ok
    }

    /// The result line: `FAILED`, or `ok` with what it does not cover (no `--verify`) and
    /// what went wrong without failing a check (errors, readings never acknowledged).
    pub fn verdict(&self) -> String {
        if !self.ok {
            return "FAILED".into();
        }
        let mut caveats = Vec::new();
        if self.verify.is_none() && self.acked > 0 {
            caveats
                .push("NOT VERIFIED: acked readings were not read back (add --verify)".to_string());
        }
        if self.errors > 0 || self.unacked > 0 {
            caveats.push(format!(
                "{} errors, {} readings never acknowledged",
                self.errors, self.unacked
            ));
        }
        if caveats.is_empty() {
            "ok".into()
        } else {
            format!("ok, but {}", caveats.join("; "))
        }
    }

    /// Writes the JSON summary.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// The human-readable table.
    pub fn table(&self, cfg: &RunConfig) -> String {
        let mut t = String::new();
        let rate = match (self.idle, self.target_rate) {
            (true, _) => "idle connections".to_string(),
            (false, Some(r)) => format!(
                "{} devices × {}/s = {}/s",
                self.devices,
                self.rate_per_device,
                fmt_rate(r)
            ),
            (false, None) => format!("{} devices, as fast as acks allow", self.devices),
        };
        let _ = writeln!(
            t,
            "\nsluice-sim: {} {} {} against {} — {rate}, {:.1} s (+{:.1} s drain), seed {}, prefix {}",
            name(&self.transport),
            self.format.name(),
            name(&self.mode),
            self.target,
            self.duration_s,
            (self.elapsed_s - self.duration_s).max(0.0),
            self.seed,
            self.device_prefix
        );
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "  {k:<16} {v}");
        };
        row("sent", format!("{}  (+{} resent)", self.sent, self.resent));
        row(
            "on the wire",
            format!(
                "{:.1} bytes per reading ({} {}, {} bytes in all)",
                self.bytes_per_reading,
                self.format.name(),
                match self.transport {
                    Transport::Http => "request bodies",
                    Transport::Ws => "frame payloads",
                    Transport::Mqtt => "payloads",
                },
                self.wire_bytes
            ),
        );
        let ack_note = match (cfg.transport, cfg.qos) {
            (Transport::Mqtt, 1) => "  (PUBACKs from the broker)".to_string(),
            (Transport::Mqtt, _) => "  (QoS 0: nothing is acknowledged)".to_string(),
            _ if self.format == Format::Line => format!(
                "  (stored or duplicates {}: a line-protocol 204 has no counts)",
                self.accepted
            ),
            _ => format!(
                "  (accepted {}, duplicates {})",
                self.accepted, self.duplicates
            ),
        };
        row("acked", format!("{}{ack_note}", self.acked));
        row(
            "rejected",
            format!(
                "{}  (faults as expected {}, naming another field {}, valid readings {})",
                self.rejected,
                self.rejected_expected,
                self.rejected_wrong_field,
                self.rejected_unexpected
            ),
        );
        if self.bad_sent > 0 {
            let reasons: Vec<String> = self
                .rejected_by_reason
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            row(
                "faults",
                format!(
                    "{} sent, {} accepted; by reason: {}",
                    self.bad_sent,
                    self.bad_accepted,
                    reasons.join(", ")
                ),
            );
        }
        row(
            "shed / errors",
            format!(
                "{} refusals for load, {} errors, {} readings never acked",
                self.shed, self.errors, self.unacked
            ),
        );
        if self.auth != "none" || self.auth_failures > 0 || self.rate_limited > 0 {
            row(
                "auth / limits",
                format!(
                    "tokens: {}; {} auth failures; {} readings rate-limited (sent again)",
                    self.auth, self.auth_failures, self.rate_limited
                ),
            );
        }
        row(
            "connections",
            match self.transport {
                // reqwest pools its connections and does not report them.
                Transport::Http => {
                    "HTTP keep-alive, pooled by the client (not counted)".to_string()
                }
                _ => format!(
                    "{} connects, {} failed, {} open at most",
                    self.connects, self.connect_errors, self.connections_peak
                ),
            },
        );
        let mut throughput = format!(
            "{}/s acknowledged, {}/s sent",
            fmt_rate(self.readings_per_s),
            fmt_rate(self.sent_per_s)
        );
        if let Some(target) = self.target_rate {
            let _ = write!(throughput, " of {}/s asked", fmt_rate(target));
            let secs = self.behind_schedule as f64 / target.max(1.0);
            // Readings due in the instant generation stopped, or a scheduler hiccup, are not
            // falling behind: report it only past a second, or 5 % of the run.
            if secs >= 1.0 || secs >= 0.05 * self.duration_s {
                // Waits the server asked for (its rate limit) are not the server falling behind.
                let why = if self.rate_limited > 0 {
                    "the devices' rate limits held them back"
                } else {
                    "the server could not keep up"
                };
                let _ = write!(
                    throughput,
                    "; {why}: {} readings ({secs:.1} s) behind schedule",
                    self.behind_schedule
                );
            }
        }
        row("throughput", throughput);
        let l = &self.latency_ms;
        row(
            "latency ms",
            format!(
                "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  (send → ack, {} readings{})",
                l.p50,
                l.p90,
                l.p99,
                l.p999,
                l.max,
                l.count,
                if self.warmup_s > 0.0 {
                    format!(", after a {:.0} s warm-up", self.warmup_s)
                } else {
                    String::new()
                }
            ),
        );
        if let Some(r) = &self.ramp {
            for s in &r.steps {
                row(
                    "ramp step",
                    format!(
                        "{}/s asked, {}/s acked, p99 {:.2} ms {}",
                        fmt_rate(s.target_rate),
                        fmt_rate(s.achieved_rate),
                        s.p99_ms,
                        if s.ok { "ok" } else { "✗" }
                    ),
                );
            }
            row(
                "knee",
                match r.knee_rate {
                    Some(k) => format!("{}/s ({})", fmt_rate(k), r.stopped_because),
                    None => format!("below the first step ({})", r.stopped_because),
                },
            );
        }
        if let Some(v) = &self.verify {
            row(
                "verify",
                format!(
                    "acked {}, stored {}, lost {}, duplicated {}, wrong metric names {}  ({} devices; {} stored but not acked)",
                    v.acked, v.stored, v.lost, v.duplicated, v.wrong_metrics, v.devices, v.extra
                ),
            );
            for e in &v.examples {
                row("", e.clone());
            }
        }
        row(
            "simulator",
            format!(
                "{:.1} CPU s ({:.0} % of one core), peak RSS {}",
                self.sim_cpu_s,
                100.0 * self.sim_cpu_s / self.elapsed_s.max(0.001),
                self.sim_peak_rss_mb
                    .map(|m| format!("{m:.0} MiB"))
                    .unwrap_or_else(|| "n/a".into())
            ),
        );
        for p in &self.problems {
            row("problem", p.clone());
        }
        row("result", self.verdict());
        t
    }
}

fn name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// `123456.7` → `123 457`.
pub fn fmt_rate(r: f64) -> String {
    let n = r.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_grouped() {
        assert_eq!(fmt_rate(0.2), "0");
        assert_eq!(fmt_rate(999.0), "999");
        assert_eq!(fmt_rate(123_456.7), "123 457");
        assert_eq!(fmt_rate(1_000_000.0), "1 000 000");
    }

    /// The README documents every JSON field: FIELDS is the list, and the README names each.
    #[test]
    fn readme_documents_every_field() {
        let readme = include_str!("../README.md");
        for f in Summary::FIELDS {
            assert!(
                readme.contains(&format!("`{f}`")),
                "simulator/README.md lacks `{f}`"
            );
        }
    }
}
