//! The `lode` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use lode::cli::image;
use lode::cli::{self, ApiClient};
use lode::proto::client_file::{ClientOverrides, RegistryTarget};
use lode::serve::{RegistryOptions, RegistryServeOptions, ServeOptions, serve, serve_registry};
use lode::wasm::WasmBounds;
use lode_registry::RegistryClient;
use std::sync::Arc;

const MIB: u64 = 1024 * 1024;

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
    command: Command,
}

#[derive(Debug, Args)]
struct ClientArgs {
    /// API base URL of the server to talk to.
    #[arg(long, global = true, env = "LODE_API")]
    api_url: Option<String>,
    /// Token for the API and the registry (both use the one `lode serve` created).
    #[arg(long, global = true, env = "LODE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Client file to read instead of ~/.config/lode/client.json.
    #[arg(long, global = true, env = "LODE_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: API, public HTTP, the Wasm engine and the Python function pools.
    Serve(ServeArgs),
    /// Deploy a .wasm component, a Cargo crate directory, a directory with lode.toml, or a
    /// Python file (its lode.App: images are built, functions get container pools).
    Deploy {
        /// What to deploy.
        path: PathBuf,
        /// App name (a DNS label); defaults to the file, crate or lode.toml name.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        registry: RegistryArg,
    },
    /// Deploy a Python app, then run its local entrypoint here; function logs stream into
    /// this terminal.
    Run {
        /// The Python file.
        file: PathBuf,
        /// Which @app.local_entrypoint() to run, when there are several.
        #[arg(long)]
        entrypoint: Option<String>,
        /// Arguments for the entrypoint.
        #[arg(last = true)]
        args: Vec<String>,
        #[command(flatten)]
        registry: RegistryArg,
    },
    /// Call a function: each ARG is JSON, or else a string (`lode call demo/square 4`).
    Call {
        /// APP/FUNCTION.
        target: String,
        /// Positional arguments.
        args: Vec<String>,
    },
    /// A deployed app's functions: containers, queue depth, cold starts.
    Stats {
        /// App name.
        app: String,
    },
    /// An app's recent calls, newest first: function, engine, status, duration, error.
    /// Kept 24 h (at most 100,000 in all); a Wasm function's calls to other Wasm functions
    /// are counted in /metrics instead.
    Calls {
        /// App name.
        app: String,
        /// How many to show (1-1000).
        #[arg(long, short = 'n', default_value_t = 20)]
        limit: usize,
        /// Print the records as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Secrets: named sets of environment variables, encrypted at rest.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Volumes: persistent directories mounted into functions.
    #[command(subcommand)]
    Volume(VolumeCommand),
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
    /// Images in the registry: ingest a tree, export it, tag, list, push and pull.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Run a command in a sandboxed container of an image (on `lode serve`).
    #[command(subcommand)]
    Container(ContainerCommand),
    /// Mount an image read-only through FUSE, fetching files lazily on first read.
    #[command(subcommand)]
    Fs(FsCommand),
    /// Run a standalone registry (`lode serve` embeds one).
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// Benchmarks that print figures and ratios against baselines measured in the same run.
    #[command(subcommand)]
    Bench(lode::bench::BenchCommand),
}

#[derive(Debug, Args)]
struct RegistryArg {
    /// Registry URL; defaults to LODE_REGISTRY, then the registry in client.json (for
    /// deploy: the server's own registry).
    #[arg(long, env = "LODE_REGISTRY")]
    registry: Option<String>,
}

#[derive(Debug, Args)]
struct CopyArgs {
    /// Image digest (blake3:...) or tag; a tag is set on the other side too.
    reference: String,
    /// The other registry.
    #[arg(long)]
    registry: String,
    /// Token for the other registry (the local token is never sent to it).
    #[arg(long, env = "LODE_REMOTE_TOKEN", hide_env_values = true)]
    remote_token: Option<String>,
    /// The local registry; defaults to LODE_REGISTRY, then the registry in client.json.
    #[arg(long, env = "LODE_REGISTRY")]
    local: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ContainerCommand {
    /// Start a container of IMAGE, stream its output, and exit with its exit code.
    ///
    /// The container gets new namespaces, a private root (the image, lazily mounted, under a
    /// size-limited writable layer), no capabilities, a seccomp filter and no network unless
    /// --net outbound. A container stopped by a limit says which; one that could not start
    /// exits 125.
    #[command(
        after_help = "Example:\n  lode container run --memory 256 --timeout 10 py -- python3 -c 'print(1)'"
    )]
    Run {
        /// Memory limit in MiB.
        #[arg(long)]
        memory: Option<u64>,
        /// CPU limit in cores (0.5 is half a core).
        #[arg(long)]
        cpu: Option<f64>,
        /// Most processes and threads [default: 4096].
        #[arg(long)]
        pids: Option<u64>,
        /// Kill the container after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
        /// none (loopback only) or outbound (the internet through slirp4netns; the host, its
        /// loopback and private, CGNAT and link-local addresses stay unreachable).
        #[arg(long, default_value = "none", value_parser = ["none", "outbound"])]
        net: String,
        /// With --net outbound, a CIDR, address or host name to reach besides the internet,
        /// e.g. 10.1.0.0/16 or db.internal (repeatable).
        #[arg(long = "allow-net", value_name = "CIDR|HOST")]
        allow_net: Vec<String>,
        /// NAME=VALUE, added to the image's environment (repeatable).
        #[arg(short, long = "env", value_parser = lode::cli::container::parse_env)]
        env: Vec<(String, String)>,
        /// HOSTDIR:/path[:ro], a bind mount (repeatable). The container's root is host uid
        /// 524288, so a writable HOSTDIR must be writable by it.
        #[arg(short, long = "volume", value_parser = lode::cli::container::parse_volume)]
        volume: Vec<lode::proto::containers::VolumeRequest>,
        /// Working directory [default: the image's, else /].
        #[arg(short, long)]
        workdir: Option<String>,
        /// Image digest or tag.
        image: String,
        /// The command and its arguments, after `--` [default: the image's command].
        #[arg(last = true)]
        command: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Build an image from an image.json spec on `lode serve`; print its index digest.
    ///
    /// Each step is cached by the hash of its parent and itself, so a rebuild runs only
    /// what changed. Local files (add_local_dir/add_local_file) and OCI layouts (from_oci)
    /// are uploaded from here first. The schema is in docs/manifest.md.
    Build {
        /// The image.json spec.
        file: PathBuf,
        /// Also point this tag at the image.
        #[arg(long)]
        tag: Option<String>,
        /// Show step headers only, not each step's output.
        #[arg(short, long)]
        quiet: bool,
        #[command(flatten)]
        registry: RegistryArg,
    },
    /// Chunk a directory tree into the registry and print its index digest. Only chunks the
    /// registry lacks are uploaded.
    Ingest {
        /// Root of the tree.
        path: PathBuf,
        /// Also point this tag at the new index.
        #[arg(long)]
        tag: Option<String>,
        /// fixed:SIZE or cdc:MIN/AVG/MAX.
        #[arg(long, default_value_t = lode_fs::Chunking::default(), value_parser = |s: &str| s.parse::<lode_fs::Chunking>())]
        chunking: lode_fs::Chunking,
        /// Files up to this many bytes are stored inside the index.
        #[arg(long, default_value_t = lode_fs::DEFAULT_INLINE_MAX)]
        inline_max: u32,
        /// Print the report as one JSON object on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: RegistryArg,
    },
    /// Write an image's tree into a new or empty directory, byte- and metadata-identical.
    Export {
        /// Image digest or tag.
        reference: String,
        /// Directory to create.
        out: PathBuf,
        #[command(flatten)]
        registry: RegistryArg,
    },
    /// Point a tag at an image.
    Tag {
        /// Image digest or existing tag.
        reference: String,
        /// Tag name: segments of [A-Za-z0-9._:@+-] separated by '/'.
        name: String,
        /// Update only if the tag points at this digest now ("none": only if it is new).
        #[arg(long)]
        expect: Option<String>,
        #[command(flatten)]
        registry: RegistryArg,
    },
    /// Remove a tag (the image stays).
    Untag {
        /// Tag name.
        name: String,
        #[command(flatten)]
        registry: RegistryArg,
    },
    /// List tags and the images they name.
    Ls {
        /// Only tags starting with this.
        #[arg(default_value = "")]
        prefix: String,
        #[command(flatten)]
        registry: RegistryArg,
    },
    /// Copy an image from the local registry to another (--registry).
    Push(CopyArgs),
    /// Copy an image from another registry (--registry) into the local one.
    Pull(CopyArgs),
}

#[derive(Debug, Subcommand)]
enum FsCommand {
    /// Mount an image in the foreground until Ctrl-C or `lode fs umount`. Nothing is
    /// downloaded up front: each chunk is fetched on first read, verified and cached.
    Mount {
        /// Image digest or tag.
        reference: String,
        /// An existing directory.
        mountpoint: PathBuf,
        /// Cache dir (locked while mounted); chunks go to its chunks/ directory.
        #[arg(long, default_value = "/var/cache/lode")]
        cache_dir: PathBuf,
        /// Most bytes the chunk cache holds; least recently used chunks go first.
        #[arg(long, default_value = "20G", value_parser = lode::cli::fs::parse_size)]
        cache_size: u64,
        /// How long a read waits for the registry before it fails with EIO.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        fetch_timeout: Duration,
        /// Do not prefetch the image's recorded access profile.
        #[arg(long)]
        no_prefetch: bool,
        /// Threads serving FUSE requests.
        #[arg(long, default_value_t = 8)]
        threads: usize,
        #[command(flatten)]
        registry: RegistryArg,
    },
    /// Unmount, or clear a mount whose process was killed.
    Umount {
        /// The mount point.
        mountpoint: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum SecretCommand {
    /// Store a secret (replacing one of the same name): lode secret create api TOKEN=abc.
    Create {
        /// Secret name.
        name: String,
        /// KEY=VALUE pairs, injected as environment variables.
        #[arg(required = true)]
        pairs: Vec<String>,
    },
    /// List secrets and their variable names (never the values).
    Ls,
    /// Remove a secret.
    Rm {
        /// Secret name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a volume (functions may also declare create_if_missing=True).
    Create {
        /// Volume name (a DNS label).
        name: String,
    },
    /// List volumes.
    Ls,
}

#[derive(Debug, Subcommand)]
enum RegistryCommand {
    /// Serve blobs, indexes and tags over gRPC. The token is created in DATA_DIR/token.
    Serve {
        /// Blobs, indexes, tags and the token.
        #[arg(long, default_value = "/var/lib/lode-registry")]
        data_dir: PathBuf,
        /// Listen address (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:7071")]
        listen: SocketAddr,
        #[command(flatten)]
        registry: RegistryFlags,
    },
}

#[derive(Debug, Args)]
struct RegistryFlags {
    /// Let anyone read blobs, indexes and tags; writes still need the token.
    #[arg(long)]
    public_read: bool,
    /// Largest blob the registry accepts, in bytes.
    #[arg(long, default_value_t = 256 * MIB)]
    max_blob: u64,
}

impl RegistryFlags {
    fn options(&self) -> RegistryOptions {
        RegistryOptions {
            public_read: self.public_read,
            max_blob: self.max_blob,
        }
    }
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
    /// Registry (gRPC) listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7071")]
    registry_listen: SocketAddr,
    /// Most bytes the chunk cache (<cache-dir>/chunks) holds.
    #[arg(long, default_value = "20G", value_parser = lode::cli::fs::parse_size)]
    cache_size: u64,
    /// Where debootstrap bases for `debian_slim` images are kept [default:
    /// <cache-dir>/images/base].
    #[arg(long)]
    image_base_dir: Option<PathBuf>,
    /// A host directory whose contents `lode container run -v` may mount (repeatable).
    /// None by default: a host volume can reach anything the server can.
    #[arg(long = "allow-volume", value_name = "DIR")]
    allow_volume: Vec<PathBuf>,
    /// Memory for a Python function's container, a one-off container or a sandbox that
    /// names none, in MiB.
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    container_memory: u64,
    /// Most memory one container may ask for, in MiB [default: this machine's memory].
    #[arg(long, value_name = "MIB")]
    container_max_memory: Option<u64>,
    /// Most CPU one container may ask for, in cores [default: this machine's cores].
    #[arg(long, value_name = "CORES")]
    container_max_cpu: Option<f64>,
    /// Processes and threads one container (or build step) may run.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    container_pids: u64,
    /// Each container's writable layer (RAM-backed, counted in its memory), e.g. 1G.
    #[arg(long, default_value = "1G", value_parser = lode::cli::fs::parse_size)]
    container_disk: u64,
    /// Each container's /dev/shm (counted in its memory), e.g. 64M.
    #[arg(long, default_value = "64M", value_parser = lode::cli::fs::parse_size)]
    shm_size: u64,
    /// Most containers one function may ask for (min_containers and max_containers).
    #[arg(long, default_value_t = 64, value_name = "N")]
    max_containers: u32,
    /// Memory for one image build step, in MiB.
    #[arg(long, default_value_t = 4096, value_name = "MIB")]
    build_memory: u64,
    /// Disk for one build step's changes (a loop-mounted ext4, sparse), e.g. 16G; 0 leaves
    /// them uncapped on the cache dir's disk.
    #[arg(long, default_value = "16G", value_parser = lode::cli::fs::parse_size)]
    build_disk: u64,
    /// A private, link-local or host address range (CIDR) that functions and containers may
    /// be granted with network.allow or --allow-net (repeatable). None by default: the
    /// internet needs no grant, and the host and its neighbours stay out of reach.
    #[arg(long = "allow-net", value_name = "CIDR", value_parser = parse_cidr)]
    allow_net: Vec<ipnet::IpNet>,
    /// Run containers and build steps as the host's uid 0 where the kernel cannot keep them
    /// in a user namespace (FUSE idmapped mounts need Linux 6.12+). Only for trusted code:
    /// refused by default.
    #[arg(long)]
    allow_root_containers: bool,
    #[command(flatten)]
    registry: RegistryFlags,
    /// Wasm instances that can run at once (pooling allocator slots of the default engine;
    /// apps with their own `wasm_stack_kib` or `fuel` get a pool of a quarter of this per
    /// engine kind).
    #[arg(long, default_value_t = 1000)]
    instances: u32,
    /// Wasm stack per call, in KiB; deeper recursion traps as stack_overflow. An app may ask
    /// for less with `[limits] wasm_stack_kib`.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(64..=16384))]
    max_wasm_stack: u32,
    /// How long a compiled component (or pre-init snapshot note) that no deployed app uses
    /// stays in <cache-dir>/compiled, e.g. 7d, 12h; pruned after start-up and each deploy.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    compiled_cache_ttl: Duration,
    /// Log lines kept per app.
    #[arg(long, default_value_t = 10_000)]
    log_lines: usize,
    /// Do not write ~/.config/lode/client.json (the data dir copy is always written).
    #[arg(long)]
    no_client_config: bool,
    /// Inputs a Python function may hold queued before calls are answered 429.
    #[arg(long, default_value_t = 1000)]
    max_queue: usize,
    /// How long a function container may take to import its module, e.g. 60s.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    container_start_timeout: Duration,
}

fn parse_cidr(text: &str) -> Result<ipnet::IpNet, String> {
    lode_native_runner::egress::parse_cidr(text)
        .ok_or_else(|| format!("{text:?} is not a CIDR such as 10.1.0.0/16, or an address"))
}

/// What `lode serve`'s container flags allow, checked against each other.
fn container_bounds(args: &ServeArgs) -> Result<lode::native::ContainerBounds> {
    let defaults = lode::native::ContainerBounds::default();
    let bounds = lode::native::ContainerBounds {
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

/// Where deploys upload: the server's own registry, unless one is named.
async fn deploy_registry(
    args: &ClientArgs,
    api: &cli::ApiClient,
    flag: &RegistryArg,
) -> Result<Arc<lode_registry::RegistryClient>> {
    match &flag.registry {
        Some(_) => registry(args, &flag.registry),
        None => Ok(Arc::new(image::connect(&api.registry().await?)?)),
    }
}

fn overrides(args: &ClientArgs, registry: Option<&str>) -> ClientOverrides {
    ClientOverrides {
        api_url: args.api_url.clone(),
        token: args.token.clone(),
        config: args.config.clone(),
        registry: registry.map(str::to_string),
    }
}

fn client(args: &ClientArgs) -> Result<ApiClient> {
    ApiClient::new(overrides(args, None).resolve()?)
}

fn registry(args: &ClientArgs, flag: &Option<String>) -> Result<Arc<RegistryClient>> {
    let target = overrides(args, flag.as_deref()).resolve_registry()?;
    Ok(Arc::new(image::connect(&target)?))
}

/// The local and the other registry of a push or pull.
fn registry_pair(args: &ClientArgs, copy: &CopyArgs) -> Result<(RegistryClient, RegistryClient)> {
    let local = registry(args, &copy.local)?;
    let other = image::connect(&RegistryTarget {
        url: copy.registry.clone(),
        token: copy.remote_token.clone(),
    })?;
    Ok((Arc::unwrap_or_clone(local), other))
}

async fn run_image(client: &ClientArgs, command: ImageCommand) -> Result<()> {
    match command {
        ImageCommand::Build {
            file,
            tag,
            quiet,
            registry: flag,
        } => {
            let api = self::client(client)?;
            let registry: Arc<dyn lode_registry::BlobAccess> = match &flag.registry {
                Some(_) => registry(client, &flag.registry)?,
                None => Arc::new(image::connect(&api.registry().await?)?),
            };
            lode::cli::container::build(&api, registry, &file, tag, quiet).await
        }
        ImageCommand::Ingest {
            path,
            tag,
            chunking,
            inline_max,
            json,
            registry: flag,
        } => {
            let options = lode_fs::IngestOptions {
                chunking,
                inline_max,
            };
            let target = registry(client, &flag.registry)?;
            image::ingest(target, &path, tag.as_deref(), options, json).await
        }
        ImageCommand::Export {
            reference,
            out,
            registry: flag,
        } => image::export(registry(client, &flag.registry)?, &reference, &out).await,
        ImageCommand::Tag {
            reference,
            name,
            expect,
            registry: flag,
        } => {
            let target = registry(client, &flag.registry)?;
            image::tag(target.as_ref(), &reference, &name, expect.as_deref()).await
        }
        ImageCommand::Untag {
            name,
            registry: flag,
        } => image::untag(&*registry(client, &flag.registry)?, &name).await,
        ImageCommand::Ls {
            prefix,
            registry: flag,
        } => image::list(registry(client, &flag.registry)?.as_ref(), &prefix).await,
        ImageCommand::Push(copy) => {
            let (local, other) = registry_pair(client, &copy)?;
            image::copy(&local, &other, &copy.reference).await
        }
        ImageCommand::Pull(copy) => {
            let (local, other) = registry_pair(client, &copy)?;
            image::copy(&other, &local, &copy.reference).await
        }
    }
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
            let container_bounds = container_bounds(&args)?;
            serve(ServeOptions {
                data_dir: args.data_dir,
                cache_dir: args.cache_dir,
                api: args.api,
                http: args.http,
                registry: args.registry_listen,
                registry_options: args.registry.options(),
                cache_size: args.cache_size,
                image_base_dir: args.image_base_dir,
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
                container_start_timeout: args.container_start_timeout,
            })
            .await
        }
        Command::Deploy {
            path,
            name,
            registry: flag,
        } => {
            let api = client(&cli.client)?;
            let registry = deploy_registry(&cli.client, &api, &flag).await?;
            if lode::cli::python::is_python_app(&path) {
                lode::cli::python::deploy(&api, registry, &path, name.as_deref())
                    .await
                    .map(|_| ())
            } else {
                lode::cli::deploy::deploy(&api, registry, &path, name.as_deref()).await
            }
        }
        Command::Run {
            file,
            entrypoint,
            args,
            registry: flag,
        } => {
            let api = client(&cli.client)?;
            let registry = deploy_registry(&cli.client, &api, &flag).await?;
            let code =
                lode::cli::python::run(&api, registry, &file, entrypoint.as_deref(), &args).await?;
            std::process::exit(code);
        }
        Command::Call { target, args } => {
            let code = lode::cli::calls::call(&client(&cli.client)?, &target, &args).await?;
            std::process::exit(code);
        }
        Command::Stats { app } => lode::cli::calls::stats(&client(&cli.client)?, &app).await,
        Command::Calls { app, limit, json } => {
            lode::cli::calls::calls(&client(&cli.client)?, &app, limit, json).await
        }
        Command::Secret(command) => {
            let api = client(&cli.client)?;
            match command {
                SecretCommand::Create { name, pairs } => {
                    lode::cli::secrets::create(&api, &name, &pairs).await
                }
                SecretCommand::Ls => lode::cli::secrets::list(&api).await,
                SecretCommand::Rm { name } => lode::cli::secrets::remove(&api, &name).await,
            }
        }
        Command::Volume(command) => {
            let api = client(&cli.client)?;
            match command {
                VolumeCommand::Create { name } => lode::cli::volumes::create(&api, &name).await,
                VolumeCommand::Ls => lode::cli::volumes::list(&api).await,
            }
        }
        Command::Ls => cli::apps::list(&client(&cli.client)?).await,
        Command::Rm { app } => cli::apps::remove(&client(&cli.client)?, &app).await,
        Command::Logs { app, follow, tail } => {
            cli::apps::logs(&client(&cli.client)?, &app, follow, tail).await
        }
        Command::Image(command) => run_image(&cli.client, command).await,
        Command::Container(ContainerCommand::Run {
            memory,
            cpu,
            pids,
            timeout,
            net,
            allow_net,
            env,
            volume,
            workdir,
            image,
            command,
        }) => {
            let request = lode::proto::containers::ContainerRequest {
                image,
                argv: command,
                env,
                memory,
                cpu,
                pids,
                timeout,
                network: Some(net),
                allow_net,
                volumes: volume,
                workdir,
            };
            let code = match lode::cli::container::run(&client(&cli.client)?, request).await {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    i32::from(lode::cli::container::COULD_NOT_RUN)
                }
            };
            std::process::exit(code)
        }
        Command::Fs(FsCommand::Mount {
            reference,
            mountpoint,
            cache_dir,
            cache_size,
            fetch_timeout,
            no_prefetch,
            threads,
            registry: flag,
        }) => {
            let args = lode::cli::fs::MountArgs {
                reference,
                mountpoint,
                cache_dir,
                cache_size,
                options: lode_fs::MountOptions {
                    fetch_timeout,
                    threads,
                    prefetch: !no_prefetch,
                },
            };
            lode::cli::fs::mount(registry(&cli.client, &flag.registry)?, args).await
        }
        Command::Fs(FsCommand::Umount { mountpoint }) => lode::cli::fs::umount(&mountpoint),
        Command::Registry(RegistryCommand::Serve {
            data_dir,
            listen,
            registry,
        }) => {
            serve_registry(RegistryServeOptions {
                data_dir,
                listen,
                registry: registry.options(),
            })
            .await
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
