//! `lode serve` and `lode registry serve`: their flags, checked and turned into the options
//! the composition root (`crate::serve`) starts from.

// Doc comments on these types are what `--help` prints, so each says what a user needs and
// nothing else; types and flattened fields that print nothing carry none.
#![allow(missing_docs)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::cli::parse::parse_size;
use crate::serve::{RegistryOptions, RegistryServeOptions, ServeOptions};
use crate::wasm::WasmBounds;

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// State, blobs, token and client.json.
    #[arg(long, default_value = "/var/lib/lode")]
    pub data_dir: PathBuf,
    /// Compiled components and other caches; safe to delete while stopped.
    #[arg(long, default_value = "/var/cache/lode")]
    pub cache_dir: PathBuf,
    /// API listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub api: SocketAddr,
    /// Public HTTP listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Default memory per Wasm instance, in MiB.
    #[arg(long, default_value_t = 128)]
    pub memory: u64,
    /// Most memory a manifest may give one instance, in MiB.
    #[arg(long, default_value_t = 4096)]
    pub max_memory: u64,
    /// Default request timeout, e.g. 30s, 500ms.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Largest public request body, in bytes.
    #[arg(long, default_value_t = 16 * MIB)]
    pub max_body: u64,
    /// Registry (gRPC) listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7071")]
    pub registry_listen: SocketAddr,
    /// Most bytes the chunk cache (<cache-dir>/chunks) holds.
    #[arg(long, default_value = "20G", value_parser = parse_size)]
    pub cache_size: u64,
    /// Where debootstrap bases for `debian_slim` images are kept [default:
    /// <cache-dir>/images/base].
    #[arg(long)]
    pub image_base_dir: Option<PathBuf>,
    /// Where the NVIDIA driver's files are read from: its GPU listing
    /// (proc/driver/nvidia/gpus), device nodes (dev/nvidia*), libraries
    /// (usr/lib/x86_64-linux-gnu) and usr/bin/nvidia-smi. Tests point it at a root of their
    /// own.
    #[arg(long, default_value = "/")]
    pub gpu_root: PathBuf,
    /// Keep apps, secrets, schedules, calls, sandboxes, Dicts and Queues in this PostgreSQL
    /// database (`postgres://user[:password]@host[:port]/db`) rather than in the data dir, so
    /// several hosts share them. Needs --secrets-key-file. TLS is not spoken: reach the
    /// database over a private network or a socket (`?host=/run/postgresql`).
    #[arg(long = "state", value_name = "URL")]
    pub state_url: Option<String>,
    /// With --state: how often to look for apps other hosts deployed or removed, besides
    /// PostgreSQL's notifications (which make a deploy live here within a second).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub state_poll: std::time::Duration,
    /// This host's id among the hosts sharing --state [default: the machine's name].
    #[arg(long, value_name = "ID")]
    pub host_id: Option<String>,
    /// The API URL the other hosts sharing --state reach this one at [default: the API
    /// listener's address, which must then be one they can reach].
    #[arg(long, value_name = "URL")]
    pub advertise: Option<String>,
    /// With --state: how often this host writes its heartbeat (`lode hosts` shows a host
    /// silent for three of these as not alive).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub heartbeat: std::time::Duration,
    /// With --state: how long a spawned call this host took stays its own without a renewal
    /// (renewed every third of it). When this host dies, other hosts take its calls after
    /// this long and run them again as the function's retries allow.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub spawn_lease: std::time::Duration,
    /// With --state: spawned calls this host takes from the shared queue and runs at once;
    /// the rest wait there for this host or another.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000), value_name = "N")]
    pub spawn_slots: u32,
    /// Keep blobs (components, image chunks, indexes) in this S3-compatible bucket,
    /// `s3://bucket[/prefix]?endpoint=http://host:port[&region=R][&retry_timeout=SECONDS]`,
    /// shared with other hosts; this host keeps read-through copies in its data dir. The
    /// credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. With --state, the
    /// registry's tags live in PostgreSQL too.
    #[arg(long = "blobs", value_name = "URL")]
    pub blobs_url: Option<String>,
    /// Store functions' memory snapshots in the registry too, so hosts sharing it (and the
    /// secrets key) restore them lazily instead of taking their own. They are stored
    /// encrypted and sealed with keys derived from the secrets key; `=false` keeps them on
    /// this host.
    #[arg(
        long,
        value_name = "BOOL",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub share_memory_snapshots: bool,
    /// The 32-byte key secrets are sealed with [default: <data-dir>/secret.key, made if
    /// missing]. Hosts that share --state must all have the same file; it is never made.
    #[arg(long, value_name = "FILE")]
    pub secrets_key_file: Option<PathBuf>,
    /// What computes the GPU a Wasm function leases: `cuda`, or `cpu`, which leases the
    /// device as usual but computes on the CPU backend, to test GPU deploys on a machine
    /// without CUDA (never for production).
    #[arg(long, value_enum, default_value = "cuda", value_name = "BACKEND")]
    pub wasm_gpu_compute: crate::wasm::gpu::GpuCompute,
    /// A host directory whose contents `lode container run -v` may mount (repeatable).
    /// None by default: a host volume can reach anything the server can.
    #[arg(long = "allow-volume", value_name = "DIR")]
    pub allow_volume: Vec<PathBuf>,
    /// Memory for a Python function's container, a one-off container or a sandbox that
    /// names none, in MiB.
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    pub container_memory: u64,
    /// Most memory one container may ask for, in MiB [default: this machine's memory].
    #[arg(long, value_name = "MIB")]
    pub container_max_memory: Option<u64>,
    /// Most CPU one container may ask for, in cores [default: this machine's cores].
    #[arg(long, value_name = "CORES")]
    pub container_max_cpu: Option<f64>,
    /// Processes and threads one container (or build step) may run.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub container_pids: u64,
    /// Each container's writable layer (RAM-backed, counted in its memory), e.g. 1G.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub container_disk: u64,
    /// Each container's /dev/shm (counted in its memory), e.g. 64M.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub shm_size: u64,
    /// Most containers one function may ask for (min_containers and max_containers).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_containers: u32,
    /// Memory for one image build step, in MiB.
    #[arg(long, default_value_t = 4096, value_name = "MIB")]
    pub build_memory: u64,
    /// Disk for one build step's changes (a loop-mounted ext4, sparse), e.g. 16G; 0 leaves
    /// them uncapped on the cache dir's disk.
    #[arg(long, default_value = "16G", value_parser = parse_size)]
    pub build_disk: u64,
    /// A private, link-local or host address range (CIDR) that functions and containers may
    /// be granted with network.allow or --allow-net (repeatable). None by default: the
    /// internet needs no grant, and the host and its neighbours stay out of reach.
    #[arg(long = "allow-net", value_name = "CIDR", value_parser = parse_cidr)]
    pub allow_net: Vec<ipnet::IpNet>,
    /// Run containers and build steps as the host's uid 0 where the kernel cannot keep them
    /// in a user namespace (FUSE idmapped mounts need Linux 6.12+). Only for trusted code:
    /// refused by default.
    #[arg(long)]
    pub allow_root_containers: bool,
    /// A registry (`HOST:PORT`, as image references write it) that image builds may pull
    /// from over plain HTTP, such as one on this machine (repeatable). Every other registry
    /// is reached over HTTPS and verified against the system's certificate roots.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registry: Vec<String>,
    /// Sandboxes running at once on this server.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_sandboxes: usize,
    /// Sandboxes running at once per app.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub max_sandboxes_per_app: usize,
    /// The longest lifetime a sandbox may ask for, e.g. 24h.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_sandbox_timeout: Duration,
    /// The largest file one sandbox file call reads or writes, e.g. 64M.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub sandbox_max_file: u64,
    /// Where Wasm sandboxes' compiled commands are cached [default: <cache-dir>/compiled-commands].
    /// Servers of one Lode build may share it; it must be writable by Lode alone.
    #[arg(long)]
    pub command_cache: Option<PathBuf>,
    /// Output one sandbox process may send (stdout and stderr together), e.g. 64M; the rest
    /// is dropped and counted in its exit.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub sandbox_max_output: u64,
    #[command(flatten)]
    pub registry: RegistryFlags,
    /// Wasm instances that can run at once (pooling allocator slots of the default engine;
    /// apps with their own `wasm_stack_kib` or `fuel` get a pool of a quarter of this per
    /// engine kind).
    #[arg(long, default_value_t = 1000)]
    pub instances: u32,
    /// Wasm stack per call, in KiB; deeper recursion traps as stack_overflow. An app may ask
    /// for less with `[limits] wasm_stack_kib`.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(64..=16384))]
    pub max_wasm_stack: u32,
    /// How long a compiled component (or pre-init snapshot note) that no deployed app uses
    /// stays in <cache-dir>/compiled, e.g. 7d, 12h; pruned after start-up and each deploy.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub compiled_cache_ttl: Duration,
    /// Log lines kept per app.
    #[arg(long, default_value_t = 10_000)]
    pub log_lines: usize,
    /// Do not write ~/.config/lode/client.json (the data dir copy is always written).
    #[arg(long)]
    pub no_client_config: bool,
    /// Inputs a Python function may hold queued before calls are answered 429.
    #[arg(long, default_value_t = 1000)]
    pub max_queue: usize,
    /// How long a function container may take to import its module, e.g. 60s.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub container_start_timeout: Duration,
}

fn parse_cidr(text: &str) -> Result<ipnet::IpNet, String> {
    lode_native_runner::egress::parse_cidr(text)
        .ok_or_else(|| format!("{text:?} is not a CIDR such as 10.1.0.0/16, or an address"))
}

/// What `lode serve`'s container flags allow, checked against each other.
fn container_bounds(args: &ServeArgs) -> Result<crate::native::ContainerBounds> {
    let defaults = crate::native::ContainerBounds::default();
    let bounds = crate::native::ContainerBounds {
        default_memory_mib: args.container_memory,
        max_memory_mib: args.container_max_memory.unwrap_or(defaults.max_memory_mib),
        max_cpu: args.container_max_cpu.unwrap_or(defaults.max_cpu),
        default_pids: args.container_pids,
        max_pids: defaults.max_pids.max(args.container_pids),
        writable_bytes: args.container_disk,
        shm_bytes: args.shm_size,
        max_containers: args.max_containers,
        build: lode_native_runner::builder::BuildLimits {
            memory: args.build_memory << 20,
            pids: args.container_pids,
            disk: (args.build_disk > 0).then_some(args.build_disk),
        },
        volume_roots: args.allow_volume.clone(),
        insecure_registries: args.insecure_registry.clone(),
        allow_root_containers: args.allow_root_containers,
        allow_net: args.allow_net.clone(),
        ..defaults
    };
    if bounds.default_memory_mib < 4 || bounds.default_memory_mib > bounds.max_memory_mib {
        anyhow::bail!(
            "--container-memory {} MiB must be 4 to --container-max-memory ({} MiB)",
            bounds.default_memory_mib,
            bounds.max_memory_mib
        );
    }
    if bounds.build.memory < 64 << 20 {
        anyhow::bail!("--build-memory {} MiB is below 64 MiB", args.build_memory);
    }
    if bounds.build.disk.is_some_and(|bytes| bytes < 16 << 20) {
        anyhow::bail!("--build-disk must be at least 16M (or 0 to leave build layers uncapped)");
    }
    if bounds.writable_bytes < 1 << 20 || bounds.shm_bytes < 1 << 20 {
        anyhow::bail!("--container-disk and --shm-size must be at least 1M");
    }
    if bounds.max_cpu.is_nan() || bounds.max_cpu <= 0.0 {
        anyhow::bail!("--container-max-cpu must be above 0");
    }
    Ok(bounds)
}

/// `lode serve`: checks the flags, then runs the server until it is stopped.
pub async fn run(args: ServeArgs) -> Result<()> {
    if args.memory > args.max_memory {
        anyhow::bail!(
            "--memory {} is above --max-memory {}",
            args.memory,
            args.max_memory
        );
    }
    if let Some(url) = &args.state_url {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            anyhow::bail!(
                "--state {url:?}: give a postgres:// URL (without --state, the state lives in \
                 the data dir)"
            );
        }
        if args.secrets_key_file.is_none() {
            anyhow::bail!(
                "--state is shared with other hosts, so secrets must be sealed with a key they \
                 all have: pass --secrets-key-file (make one with `head -c 32 /dev/urandom > \
                 FILE`, mode 0600, and give every host the same file)"
            );
        }
    }
    let container_bounds = container_bounds(&args)?;
    crate::serve::serve(ServeOptions {
        data_dir: args.data_dir,
        cache_dir: args.cache_dir,
        api: args.api,
        http: args.http,
        registry: args.registry_listen,
        registry_options: args.registry.options(),
        cache_size: args.cache_size,
        image_base_dir: args.image_base_dir,
        gpu_root: args.gpu_root,
        state_url: args.state_url,
        blobs_url: args.blobs_url,
        share_memory_snapshots: args.share_memory_snapshots,
        state_poll: args.state_poll,
        host_id: args.host_id,
        advertise: args.advertise,
        heartbeat: args.heartbeat,
        spawn_lease: args.spawn_lease,
        spawn_slots: args.spawn_slots as usize,
        secrets_key_file: args.secrets_key_file,
        wasm_gpu_compute: args.wasm_gpu_compute,
        container_bounds,
        limits: WasmBounds {
            default_memory: args.memory * MIB,
            max_memory: args.max_memory * MIB,
            default_timeout: args.timeout,
            max_body: args.max_body,
        },
        max_instances: args.instances,
        wasm_stack: args.max_wasm_stack as usize * 1024,
        compiled_cache_ttl: args.compiled_cache_ttl,
        log_lines: args.log_lines,
        no_client_config: args.no_client_config,
        max_queue: args.max_queue.max(1),
        sandbox_bounds: crate::sandboxes::SandboxBounds {
            max_timeout: args.max_sandbox_timeout,
            max_running: args.max_sandboxes,
            max_per_app: args.max_sandboxes_per_app,
            max_file_bytes: args.sandbox_max_file,
            max_output_bytes: args.sandbox_max_output,
        },
        container_start_timeout: args.container_start_timeout,
        command_cache: args.command_cache,
    })
    .await
}

/// `lode registry serve`: a registry on its own.
pub async fn run_registry(
    data_dir: PathBuf,
    listen: SocketAddr,
    registry: &RegistryFlags,
) -> Result<()> {
    crate::serve::serve_registry(RegistryServeOptions {
        data_dir,
        listen,
        registry: registry.options(),
    })
    .await
}

/// Spawns `exe registry serve` on `data` and an ephemeral port; returns it and its URL.
/// Its stdout keeps being drained, so it never writes into a closed pipe.
pub fn spawn_registry(exe: &Path, data: &Path) -> Result<(Child, String)> {
    let mut child = Command::new(exe)
        .args(["registry", "serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("LODE_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting lode registry serve")?;
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    let url = lines
        .by_ref()
        .find_map(|line| {
            Some(
                line.ok()?
                    .trim()
                    .strip_prefix("registry")?
                    .trim()
                    .to_string(),
            )
        })
        .context("lode registry serve did not print its URL")?;
    std::thread::spawn(move || lines.for_each(drop));
    Ok((child, url))
}

#[derive(Debug, Args)]
pub struct RegistryFlags {
    /// Let anyone read blobs, indexes and tags; writes still need the token.
    #[arg(long)]
    pub public_read: bool,
    /// Largest blob the registry accepts, in bytes.
    #[arg(long, default_value_t = 256 * MIB)]
    pub max_blob: u64,
}

impl RegistryFlags {
    /// The registry options these flags ask for.
    pub fn options(&self) -> RegistryOptions {
        RegistryOptions {
            public_read: self.public_read,
            max_blob: self.max_blob,
        }
    }
}
