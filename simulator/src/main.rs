//! `sluice-sim`: the device fleet simulator. The real load generator arrives with its own issue;
//! this placeholder only documents its command line so the workspace layout is in place.
use clap::Parser;

/// Simulates a fleet of devices streaming readings to Sluice (placeholder: no traffic yet).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Base URL of the Sluice server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    target: String,
}

fn main() {
    let args = Args::parse();
    eprintln!(
        "sluice-sim: the load generator is not implemented yet (target {}); see README",
        args.target
    );
    std::process::exit(2);
}
