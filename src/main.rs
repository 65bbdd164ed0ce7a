//! `sluice`: command line → configuration → telemetry → [`Application`] → run until a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use mimalloc::MiMalloc;
use sluice::app::shutdown_signal;
use sluice::telemetry::{logging, memory};
use sluice::{Application, Settings};

/// Every allocation goes through mimalloc (see ARCHITECTURE.md, "Why these crates").
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// Run by each tokio worker when it runs out of work (`on_thread_park`): see
/// [`sluice::telemetry::memory`].
fn give_back_memory() {
    memory::give_back(memory::WORKER_INTERVAL);
}

/// High-concurrency IoT ingestion: readings over HTTP, WebSocket and MQTT into a durable
/// store, acknowledged only after commit.
///
/// Configuration is layered: built-in defaults, then the TOML file from --config (or
/// SLUICE_CONFIG), then SLUICE__SECTION__KEY environment variables, e.g.
/// SLUICE__SERVER__LISTEN=127.0.0.1:9000. With no configuration at all Sluice listens on
/// 0.0.0.0:8080 and stores to ./data/sluice.db (the embedded SQLite store). For several
/// replicas sharing one PostgreSQL database, set SLUICE__STORAGE__BACKEND=postgres and
/// SLUICE__STORAGE__POSTGRES__URL=postgres://user:password@host:5432/database. A bad
/// configuration (including a database that refuses the user) exits with code 2 and names the
/// key.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, short, env = "SLUICE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Print the effective configuration (defaults, file and environment merged) and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    // Before the allocations that last: see `memory::disable_transparent_huge_pages`.
    let thp = memory::disable_transparent_huge_pages();
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sluice: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        // The files it names are opened too, as the start would (exit 2 naming the key).
        if let Err(e) = sluice::tls::check_files(&settings) {
            eprintln!("sluice: invalid configuration: {e}");
            return ExitCode::from(2);
        }
        for warning in settings.warnings() {
            eprintln!("sluice: warning: {warning}");
        }
        print!("{}", settings.to_toml());
        return ExitCode::SUCCESS;
    }
    logging::init(&settings.log);
    match thp {
        Ok(off) => tracing::debug!(transparent_huge_pages_off = off, "memory"),
        Err(e) => tracing::warn!("cannot turn transparent huge pages off ({e}): RSS may be higher"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sluice-worker")
        .on_thread_park(give_back_memory)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let app = Application::build(settings).await?;
        app.run_until(shutdown_signal()).await
    });
    // Everything that was acknowledged is committed by now. A store call still blocked (a
    // database that does not answer) holds nothing acknowledged: do not wait for it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Found at start-up, e.g. a database that refuses the configured user.
        Err(e) if e.downcast_ref::<sluice::config::ConfigError>().is_some() => {
            eprintln!("sluice: invalid configuration: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "sluice stopped with an error");
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}
