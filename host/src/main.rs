//! The `lode` binary: parse the command line, run it. Commands live in `lode::cli`, benchmarks
//! in `lode::bench`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lode::cli::args::{ClientArgs, Command};

/// Lode: a self-hosted serverless function host.
///
/// Start a server with `lode serve`, then `lode deploy PATH` a Wasm component, a Cargo crate,
/// a lode.toml project or a Python app (`lode run app.py` also runs its local entrypoint).
/// The CLI finds the server through --api-url/--token, then
/// LODE_API/LODE_TOKEN, then the client.json that `lode serve` writes. Image commands find
/// the registry through --registry, then LODE_REGISTRY, then client.json.
#[derive(Debug, Parser)]
#[command(
    name = "lode",
    version,
    max_term_width = 100,
    args_override_self = true
)]
struct Cli {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: TopCommand,
}

// Parsed once per process: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum TopCommand {
    #[command(flatten)]
    Client(Command),
    /// Benchmarks that print figures and ratios against baselines measured in the same run.
    #[command(subcommand)]
    Bench(lode::bench::BenchCommand),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LODE_LOG")
                .unwrap_or_else(|_| "lode=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    lode_native_runner::oci::pull::install_tls_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the tokio runtime");
    match runtime.block_on(async {
        match cli.command {
            TopCommand::Client(command) => lode::cli::run(cli.client, command).await,
            TopCommand::Bench(command) => lode::bench::run(command).await,
        }
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
