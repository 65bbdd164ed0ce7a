//! `sluice-sim`: parse the command line, run, exit with the verdict. See the library docs.

use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() {
    let cli = sluice_sim::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice-sim: cannot start the runtime: {e}");
            std::process::exit(sluice_sim::EXIT_USAGE);
        }
    };
    let code = runtime.block_on(async {
        let interrupt = CancellationToken::new();
        let on_signal = interrupt.clone();
        tokio::spawn(async move {
            // First Ctrl-C / SIGTERM: stop generating, drain, summarise. Second: leave now.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let sigterm = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = sigterm => {}
            }
            eprintln!("sluice-sim: stopping (again to quit at once)");
            on_signal.cancel();
            let _ = tokio::signal::ctrl_c().await;
            std::process::exit(130);
        });
        sluice_sim::run_cli(cli, interrupt).await
    });
    std::process::exit(code);
}
