//! `lode bench`: benchmarks that need the real binary (and often root, `wrk` or pip), each
//! printing its figures and ratios against a baseline measured in the same run. One file per
//! bench; what several share (percentiles, a `lode serve` or registry child) is in
//! `support.rs`.

pub mod build;
pub mod calls;
pub mod cas;
pub mod cluster;
pub mod container;
pub mod fs;
pub mod gpu;
mod gpu_load;
pub mod http;
pub mod python;
mod python_modal;
mod python_snapshot;
pub mod sandbox;
mod sandbox_api;
mod sandbox_wasm;
pub mod support;

use std::net::SocketAddr;

use anyhow::Result;
use clap::Subcommand;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Instantiate latency and HTTP throughput against plain hyper and `wasmtime serve`.
    Http(crate::bench::http::HttpBench),
    /// Ingest, GetBlob and index load throughput, and dedup ratios, against baselines.
    Cas(crate::bench::cas::CasBench),
    /// The lazy mount against native reads and a full pull (needs root).
    Fs(crate::bench::fs::FsBench),
    /// Container start to the exit of `python3 -c pass` (needs root).
    Container(crate::bench::container::ContainerBench),
    /// Image build of debian_slim + pip_install(numpy), cold and warm (needs root).
    Build(crate::bench::build::BuildBench),
    /// Python function calls, cold and warm, and map throughput, against a local Python
    /// process (needs root).
    Python(crate::bench::python::PythonBench),
    /// Wasm functions called by name: API latency, invoke cost, fan-out rate, cross-engine
    /// cost (needs root, run from the repository root).
    Calls(crate::bench::calls::CallsBench),
    /// lode:gpu from a Wasm guest against the same backend from native Rust and a plain
    /// loop in the guest (run from the repository root).
    Gpu(crate::bench::gpu::GpuBench),
    /// Sandboxes (container tier): create and first exec, exec round trip, sandboxes alive
    /// at once and host memory per sandbox, against `lode container run` and a bare `true`
    /// (needs root and a static busybox).
    Sandbox(crate::bench::sandbox::SandboxBench),
    /// Lode on PostgreSQL and SeaweedFS with several hosts, against one embedded host: warm
    /// call latency, deploy on one host to first answer on another (run from the repository
    /// root, as root).
    Cluster(crate::bench::cluster::ClusterBench),
    /// A plain hyper server answering `hello`: the ceiling `lode bench http` compares to.
    #[command(hide = true)]
    HyperHello {
        /// Address to listen on; the bound address is printed.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

/// Runs a benchmark.
pub async fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Http(args) => crate::bench::http::http(args).await,
        BenchCommand::Cas(args) => crate::bench::cas::cas(args).await,
        BenchCommand::Fs(args) => crate::bench::fs::fs(args).await,
        BenchCommand::Container(args) => crate::bench::container::container(args).await,
        BenchCommand::Build(args) => crate::bench::build::build(args).await,
        BenchCommand::Python(args) => crate::bench::python::python(args).await,
        BenchCommand::Calls(args) => crate::bench::calls::calls(args).await,
        BenchCommand::Sandbox(args) => crate::bench::sandbox::sandbox(args).await,
        BenchCommand::Gpu(args) => crate::bench::gpu::gpu(args).await,
        BenchCommand::Cluster(args) => crate::bench::cluster::cluster(args).await,
        BenchCommand::HyperHello { listen } => crate::bench::http::hyper_hello(listen).await,
    }
}
