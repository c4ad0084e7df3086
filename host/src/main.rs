//! The `lode` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use lode::cli::{self, ApiClient};
use lode::client_config::ClientOverrides;
use lode::serve::{ServeOptions, serve};
use lode::server::Limits;

const MIB: u64 = 1024 * 1024;

/// Lode: a self-hosted serverless function host.
///
/// Start a server with `lode serve`, then `lode deploy PATH` a Wasm component, a Cargo crate
/// or a lode.toml project. The CLI finds the server through --api-url/--token, then
/// LODE_API/LODE_TOKEN, then the client.json that `lode serve` writes.
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
    command: Command,
}

#[derive(Debug, Args)]
struct ClientArgs {
    /// API base URL of the server to talk to.
    #[arg(long, global = true, env = "LODE_API")]
    api_url: Option<String>,
    /// API token.
    #[arg(long, global = true, env = "LODE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Client file to read instead of ~/.config/lode/client.json.
    #[arg(long, global = true, env = "LODE_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: API, public HTTP and the Wasm engine.
    Serve(ServeArgs),
    /// Deploy a .wasm component, a Cargo crate directory or a directory with lode.toml.
    Deploy {
        /// What to deploy.
        path: PathBuf,
        /// App name (a DNS label); defaults to the file, crate or lode.toml name.
        #[arg(long)]
        name: Option<String>,
    },
    /// List deployed apps.
    Ls,
    /// Remove an app.
    Rm {
        /// App name.
        app: String,
    },
    /// Show an app's logs: guest stdout/stderr per request, traps, deploys.
    Logs {
        /// App name.
        app: String,
        /// Keep streaming new lines.
        #[arg(short, long)]
        follow: bool,
        /// How many recent lines to show first.
        #[arg(long, default_value_t = 200)]
        tail: usize,
    },
    /// Benchmarks that print figures and ratios against baselines measured in the same run.
    #[command(subcommand)]
    Bench(lode::bench::BenchCommand),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// State, blobs, token and client.json.
    #[arg(long, default_value = "/var/lib/lode")]
    data_dir: PathBuf,
    /// Compiled components and other caches; safe to delete while stopped.
    #[arg(long, default_value = "/var/cache/lode")]
    cache_dir: PathBuf,
    /// API listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7070")]
    api: SocketAddr,
    /// Public HTTP listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Default memory per Wasm instance, in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// Most memory a manifest may give one instance, in MiB.
    #[arg(long, default_value_t = 4096)]
    max_memory: u64,
    /// Default request timeout, e.g. 30s, 500ms.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Largest public request body, in bytes.
    #[arg(long, default_value_t = 16 * MIB)]
    max_body: u64,
    /// Largest component upload, in bytes.
    #[arg(long, default_value_t = 256 * MIB)]
    max_upload: u64,
    /// Wasm instances that can run at once (pooling allocator slots).
    #[arg(long, default_value_t = 1000)]
    instances: u32,
    /// Log lines kept per app.
    #[arg(long, default_value_t = 10_000)]
    log_lines: usize,
    /// Do not write ~/.config/lode/client.json (the data dir copy is always written).
    #[arg(long)]
    no_client_config: bool,
}

fn client(args: &ClientArgs) -> Result<ApiClient> {
    let resolved = ClientOverrides {
        api_url: args.api_url.clone(),
        token: args.token.clone(),
        config: args.config.clone(),
    }
    .resolve()?;
    ApiClient::new(resolved)
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => {
            if args.memory > args.max_memory {
                anyhow::bail!(
                    "--memory {} is above --max-memory {}",
                    args.memory,
                    args.max_memory
                );
            }
            serve(ServeOptions {
                data_dir: args.data_dir,
                cache_dir: args.cache_dir,
                api: args.api,
                http: args.http,
                limits: Limits {
                    default_memory: args.memory * MIB,
                    max_memory: args.max_memory * MIB,
                    default_timeout: args.timeout,
                    max_body: args.max_body,
                    max_upload: args.max_upload,
                },
                max_instances: args.instances,
                log_lines: args.log_lines,
                no_client_config: args.no_client_config,
            })
            .await
        }
        Command::Deploy { path, name } => {
            lode::deploy::deploy(&client(&cli.client)?, &path, name.as_deref()).await
        }
        Command::Ls => cli::list(&client(&cli.client)?).await,
        Command::Rm { app } => cli::remove(&client(&cli.client)?, &app).await,
        Command::Logs { app, follow, tail } => {
            cli::logs(&client(&cli.client)?, &app, follow, tail).await
        }
        Command::Bench(command) => lode::bench::run(command).await,
    }
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
