//! `sluice-sim`: a device fleet, a load generator and a no-loss verifier for Sluice.
//!
//! The flow of a run, and the modules along it:
//!
//! ```text
//! config (CLI → RunConfig) ─▶ fleet (devices, signals, faults) ─▶ rate (pacing)
//!   ─▶ encode (--format: json, cbor, senml-json, senml-cbor, line)
//!   ─▶ transport::{http, ws, mqtt} (lanes: send, retry with the same seq, settle answers)
//!   ─▶ stats (counters, HDR latency) ─▶ summary (table, --json) ─▶ verify (read back)
//! ```
//!
//! [`auth`] gives each device its token (`--token`, `--tokens-file`) for the transports and the
//! verifier, and mints tokens (`sluice-sim tokens`). [`null_sink`] is the other end for
//! measuring the simulator alone. [`run_cli`] is what the
//! binary does; tests call [`run()`] with a [`RunConfig`] built from the same command line.
#![warn(missing_docs)]

pub mod auth;
pub mod config;
pub mod encode;
pub mod faults;
pub mod fleet;
pub mod null_sink;
pub mod rate;
mod run;
pub mod stats;
pub mod summary;
pub mod sys;
pub mod transport;
pub mod verify;

pub use config::{Cli, Command, RunArgs, RunConfig};
pub use run::run;
pub use summary::Summary;

use tokio_util::sync::CancellationToken;

/// Exit code when a check failed (loss, duplication, a fault not rejected as expected).
pub const EXIT_FAILED: i32 = 1;
/// Exit code for bad options or a run that could not start.
pub const EXIT_USAGE: i32 = 2;

/// Runs what the command line asks and returns the process exit code: 0 when every check
/// passed, [`EXIT_FAILED`] when one failed, [`EXIT_USAGE`] for bad options.
pub async fn run_cli(cli: Cli, interrupt: CancellationToken) -> i32 {
    if let Some(Command::Tokens(t)) = &cli.command {
        let args = auth::MintArgs {
            target: t.target.clone(),
            admin_token: t.admin_token.clone(),
            devices: t.devices,
            prefix: t.device_prefix.clone(),
            gateway: t.gateway,
            out: t.out.clone(),
            concurrency: t.concurrency,
        };
        if t.devices == 0 {
            eprintln!("sluice-sim tokens: --devices must be at least 1");
            return EXIT_USAGE;
        }
        return tokio::select! {
            r = auth::mint(&args) => match r {
                Ok(n) => {
                    println!(
                        "sluice-sim tokens: wrote {n} write token{} for {} devices {}-0 … {}-{} to {}",
                        if n == 1 { "" } else { "s" },
                        if t.gateway { "the glob of" } else { "the" },
                        t.device_prefix,
                        t.device_prefix,
                        t.devices - 1,
                        t.out.display()
                    );
                    0
                }
                Err(e) => {
                    eprintln!("sluice-sim tokens: {e:#}");
                    EXIT_FAILED
                }
            },
            _ = interrupt.cancelled() => EXIT_FAILED,
        };
    }
    if let Some(Command::NullSink { listen }) = cli.command {
        return match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => {
                match l.local_addr() {
                    Ok(a) => println!("null-sink listening on http://{a}"),
                    Err(e) => eprintln!("null-sink: {e}"),
                }
                tokio::select! {
                    r = null_sink::serve(l) => match r {
                        Ok(()) => 0,
                        Err(e) => { eprintln!("null-sink: {e}"); EXIT_USAGE }
                    },
                    _ = interrupt.cancelled() => 0,
                }
            }
            Err(e) => {
                eprintln!("null-sink: cannot listen on {listen}: {e}");
                EXIT_USAGE
            }
        };
    }
    let json = cli.run.json.clone();
    let cfg = match cli.run.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice-sim: {e:#}");
            return EXIT_USAGE;
        }
    };
    let summary = match run(cfg.clone(), interrupt).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sluice-sim: {e:#}");
            return EXIT_FAILED;
        }
    };
    print!("{}", summary.table(&cfg));
    if let Some(path) = json {
        if let Err(e) = summary.write_json(&path) {
            eprintln!("sluice-sim: {e:#}");
            return EXIT_FAILED;
        }
    }
    if summary.ok {
        0
    } else {
        EXIT_FAILED
    }
}
