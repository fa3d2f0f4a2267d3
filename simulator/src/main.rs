//! The `simulator` binary: subcommands over the simulator library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Emulates every system around the metrics collector.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A whole cluster in one process: DNS, agent, scheduler, broker,
    /// module producers, collector, sample-producer and verifier.
    Up(simulator::up::UpOptions),
    /// Load harness: drives the collector binary and measures it.
    Bench(simulator::bench::BenchOptions),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("simulator: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(options) => {
                let report = simulator::up::run(options, async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
                simulator::up::print_report(&report);
                if report.passed() {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("verification failed"))
                }
            }
            Command::Bench(options) => simulator::bench::run(options).await.map(|_| ()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("simulator: {error:#}");
            ExitCode::FAILURE
        }
    }
}
