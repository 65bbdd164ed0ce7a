//! JetStream helper for `scripts/bench` (not a test), with the official client (async-nats):
//!
//! ```text
//! cargo run --release --example nats_stream -- create <nats-url> <stream> <subjects>
//! cargo run --release --example nats_stream -- count  <nats-url> <stream>
//! ```
//!
//! `create` makes a file-backed stream over `subjects` with a 2-minute duplicate window (the
//! setup the README's "NATS" section describes); `count` prints the number of messages the
//! stream holds, so a benchmark can compare what was published with what was acknowledged.

use std::time::Duration;

use async_nats::jetstream;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || -> ! {
        eprintln!("usage: nats_stream create <url> <stream> <subjects> | count <url> <stream>");
        std::process::exit(2);
    };
    if args.len() < 3 {
        usage();
    }
    let client = async_nats::connect(args[1].as_str())
        .await
        .unwrap_or_else(|e| {
            eprintln!("nats_stream: cannot connect to {}: {e}", args[1]);
            std::process::exit(1);
        });
    let js = jetstream::new(client);
    match args[0].as_str() {
        "create" if args.len() == 4 => {
            js.create_stream(jetstream::stream::Config {
                name: args[2].clone(),
                subjects: vec![args[3].clone()],
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| {
                eprintln!("nats_stream: cannot create {}: {e}", args[2]);
                std::process::exit(1);
            });
            // On stderr: scripts read only `count`'s stdout.
            eprintln!(
                "nats_stream: created stream {} over {} (file storage, 2-minute duplicate window)",
                args[2], args[3]
            );
        }
        "count" => {
            let mut stream = js.get_stream(&args[2]).await.unwrap_or_else(|e| {
                eprintln!("nats_stream: no stream {}: {e}", args[2]);
                std::process::exit(1);
            });
            let info = stream.info().await.unwrap_or_else(|e| {
                eprintln!("nats_stream: {e}");
                std::process::exit(1);
            });
            println!("{}", info.state.messages);
        }
        _ => usage(),
    }
}
