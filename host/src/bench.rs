//! `lode bench http`: instantiate latency in process, then end-to-end HTTP throughput against a
//! plain hyper server (the ceiling) and `wasmtime serve` (the baseline), all in one run.

use anyhow::Result;
use clap::Subcommand;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Instantiate latency and HTTP throughput against plain hyper and `wasmtime serve`.
    Http,
}

/// Runs a benchmark.
pub async fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Http => Ok(()),
    }
}
