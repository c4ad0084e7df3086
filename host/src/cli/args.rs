//! The `lode` command line's arguments (clap): the client flags every command takes, and
//! each command with its own. `lode serve`'s flags are in `serve.rs`.

// Doc comments on these types are what `--help` prints, so each says what a user needs and
// nothing else; types and flattened fields that print nothing carry none.
#![allow(missing_docs)]

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::cli::parse::{parse_env, parse_named_volume, parse_size, parse_volume};
use crate::cli::serve::{RegistryFlags, ServeArgs};

use std::net::SocketAddr;

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// API base URL of the server to talk to.
    #[arg(long, global = true, env = "LODE_API")]
    pub api_url: Option<String>,
    /// Token for the API and the registry (both use the one `lode serve` created).
    #[arg(long, global = true, env = "LODE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Client file to read instead of ~/.config/lode/client.json.
    #[arg(long, global = true, env = "LODE_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: API, public HTTP, the Wasm engine and the Python function pools.
    Serve(Box<ServeArgs>),
    /// Lode on several hosts, all on this machine: PostgreSQL and SeaweedFS (S3) started in
    /// --dir, and --hosts `lode serve` processes on loopback sharing them; runs until Ctrl-C
    /// (`./lode.sh cluster` deploys a sample too).
    Cluster(crate::cli::cluster::ClusterArgs),
    /// Deploy a .wasm component, a Cargo crate directory, a directory with lode.toml, or a
    /// Python file (its lode.App: images are built, functions get container pools).
    Deploy {
        /// What to deploy.
        path: PathBuf,
        /// App name (a DNS label); defaults to the file, crate or lode.toml name.
        #[arg(long)]
        name: Option<String>,
        /// Deploy a Python app as an ephemeral run of itself, under a new name printed on
        /// stdout (what `with app.run():` does); remove it with `lode rm NAME`.
        #[arg(long, conflicts_with = "name", hide = true)]
        ephemeral: bool,
        #[command(flatten)]
        registry: RegistryArg,
    },
    /// Run a Python app as `modal run` does: deploy it as an ephemeral app (a deployed app of
    /// the same name is left alone), run its local entrypoint here with the function logs
    /// streaming into this terminal, then remove the app. FILE::NAME picks a local
    /// entrypoint, a function or Class.method to call; a file with one function and no
    /// entrypoint calls that function. Options after FILE go to it by parameter name
    /// (`lode run app.py::square --x 4`); plain words go positionally.
    Run {
        /// The Python file, optionally with ::NAME.
        file: String,
        /// Which @app.local_entrypoint() to run (the same as FILE::NAME).
        #[arg(long)]
        entrypoint: Option<String>,
        /// Arguments for the entrypoint or function: `--name value` or positional words.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
        #[command(flatten)]
        registry: RegistryArg,
    },
    /// Serve a Python app while you edit it, as `modal serve` does: deploy it as APP-dev,
    /// redeploy on every save of its file, the local modules it imports or the local files
    /// its images copy in, and stream its logs here. Web functions keep their URLs; a save
    /// that does not load is shown and the last good version keeps serving; Ctrl-C removes
    /// the app.
    Dev {
        /// The Python file.
        file: PathBuf,
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
    /// Dicts: named, durable key-value maps (`lode.Dict` in the SDK).
    #[command(subcommand)]
    Dict(DictCommand),
    /// Queues: named, durable FIFO queues (`lode.Queue` in the SDK).
    #[command(subcommand)]
    Queue(QueueCommand),
    /// List deployed apps.
    Ls,
    /// The hosts sharing this server's state (`lode serve --state`): id, API address, last
    /// heartbeat, containers, Wasm instances, GPUs, load, and which are alive.
    Hosts,
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
    /// Sandboxes: long-lived containers for untrusted code, one command after another, with
    /// files that persist between them.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Mount an image read-only through FUSE, fetching files lazily on first read.
    #[command(subcommand)]
    Fs(FsCommand),
    /// Run a standalone registry (`lode serve` embeds one).
    #[command(subcommand)]
    Registry(RegistryCommand),
}

#[derive(Debug, Args)]
pub struct RegistryArg {
    /// Registry URL; defaults to LODE_REGISTRY, then the registry in client.json (for
    /// deploy: the server's own registry).
    #[arg(long, env = "LODE_REGISTRY")]
    pub registry: Option<String>,
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Image digest (blake3:...) or tag; a tag is set on the other side too.
    pub reference: String,
    /// The other registry.
    #[arg(long)]
    pub registry: String,
    /// Token for the other registry (the local token is never sent to it).
    #[arg(long, env = "LODE_REMOTE_TOKEN", hide_env_values = true)]
    pub remote_token: Option<String>,
    /// The local registry; defaults to LODE_REGISTRY, then the registry in client.json.
    #[arg(long, env = "LODE_REGISTRY")]
    pub local: Option<String>,
}

// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Start a sandbox of IMAGE and print its id.
    ///
    /// It runs until its --timeout, --idle-timeout (no command running and no call for that
    /// long) or `lode sandbox rm`, isolated as `lode container run` is: no network unless
    /// --net outbound, limits on memory, CPU, processes and its writable layer.
    Create {
        /// Image digest or tag.
        image: String,
        /// The app it belongs to (sandboxes are listed by app).
        #[arg(long, default_value = "default")]
        app: String,
        /// CPU limit, in cores.
        #[arg(long)]
        cpu: Option<f64>,
        /// Memory limit, in MiB [default: the server's --container-memory].
        #[arg(long, value_name = "MIB")]
        memory: Option<u64>,
        /// Process limit [default: the server's --container-pids].
        #[arg(long)]
        pids: Option<u64>,
        /// Lifetime, e.g. 10m [default: 5m].
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// End it after this long with no command running and no call, e.g. 2m.
        #[arg(long, value_parser = humantime::parse_duration)]
        idle_timeout: Option<Duration>,
        /// `none` (loopback only) or `outbound` (the internet, but not the host or its
        /// private neighbours).
        #[arg(long, default_value = "none")]
        net: String,
        /// With --net outbound: a range reachable besides the internet (repeatable).
        #[arg(long = "allow", value_name = "CIDR")]
        allow: Vec<String>,
        /// A label to list it by, KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_env)]
        tags: Vec<(String, String)>,
        /// NAME=VALUE in every process's environment (repeatable).
        #[arg(short, long = "env", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// HOSTDIR:/path[:ro], a bind mount within the server's --allow-volume roots.
        #[arg(short, long = "volume", value_parser = parse_volume)]
        volume: Vec<crate::proto::containers::VolumeRequest>,
        /// NAME:/path[:ro], a Lode volume (`lode volume create`) mounted at /path (repeatable).
        #[arg(long = "lode-volume", value_name = "NAME:/PATH[:ro]", value_parser = parse_named_volume)]
        lode_volume: Vec<crate::proto::manifest::VolumeMount>,
        /// A secret (`lode secret create`) whose variables every process gets (repeatable).
        #[arg(long = "secret", value_name = "NAME")]
        secret: Vec<String>,
        /// A TCP port inside the sandbox to open to the outside (repeatable): Lode listens on
        /// a port of its own beside its public HTTP listener and relays connections into it.
        #[arg(short, long = "port", value_name = "PORT")]
        port: Vec<u16>,
        /// Working directory of its processes [default: the image's].
        #[arg(short, long)]
        workdir: Option<String>,
    },
    /// Run CMD in sandbox ID, streaming its output; exits with its exit code.
    Exec {
        /// The sandbox.
        id: String,
        /// Send this terminal's stdin to the command.
        #[arg(short, long)]
        interactive: bool,
        /// Give the command a terminal (container tier): your keys go to it as typed, and its size
        /// follows this window's.
        #[arg(short, long)]
        tty: bool,
        /// Working directory [default: the sandbox's].
        #[arg(short, long)]
        workdir: Option<String>,
        /// NAME=VALUE added to its environment (repeatable).
        #[arg(short, long = "env", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Kill it after this long, e.g. 30s.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Wasm sandboxes: the fuel the command may burn (a count of Wasm work, the same on
        /// every run).
        #[arg(long)]
        fuel: Option<u64>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List sandboxes, newest first: running ones and those ended in the last day.
    Ls {
        /// Only this app's.
        #[arg(long)]
        app: Option<String>,
        /// Only those with this label, KEY=VALUE (repeatable; all must match).
        #[arg(long = "tag", value_parser = parse_env)]
        tags: Vec<(String, String)>,
    },
    /// Copy a file into or out of a sandbox: `cp LOCAL ID:/path` or `cp ID:/path LOCAL`.
    Cp {
        /// Where from.
        source: String,
        /// Where to.
        dest: String,
    },
    /// Save a running sandbox's files as a new image and print its digest; a new sandbox
    /// (or container) can start from it.
    Snapshot {
        /// The sandbox.
        id: String,
        /// Also point this tag at the image.
        #[arg(long)]
        tag: Option<String>,
    },
    /// End a sandbox now; everything in it stops and its files go.
    Rm {
        /// The sandbox.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ContainerCommand {
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
        #[arg(short, long = "env", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// HOSTDIR:/path[:ro], a bind mount (repeatable). The container's root is host uid
        /// 524288, so a writable HOSTDIR must be writable by it.
        #[arg(short, long = "volume", value_parser = parse_volume)]
        volume: Vec<crate::proto::containers::VolumeRequest>,
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
pub enum ImageCommand {
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
pub enum FsCommand {
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
        #[arg(long, default_value = "20G", value_parser = parse_size)]
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
pub enum SecretCommand {
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
pub enum VolumeCommand {
    /// Create a volume (functions may also declare create_if_missing=True).
    Create {
        /// Volume name (a DNS label).
        name: String,
    },
    /// List volumes.
    Ls,
}

#[derive(Debug, Subcommand)]
pub enum DictCommand {
    /// List Dicts with their sizes.
    Ls,
    /// Make a Dict (the SDK's create_if_missing=True does too).
    Create {
        /// Its name: letters, digits, '.', '_' and '-'.
        name: String,
    },
    /// Print a key's value as JSON; exits 1 when the key is not there.
    Get {
        /// The Dict.
        name: String,
        /// The key: JSON, or else a string.
        key: String,
    },
    /// Store a value under a key.
    Put {
        /// The Dict.
        name: String,
        /// The key: JSON, or else a string.
        key: String,
        /// The value: JSON, or else a string.
        value: String,
    },
    /// Print the entries, one `KEY<TAB>VALUE` line each, in key order.
    Items {
        /// The Dict.
        name: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Remove every entry.
    Clear {
        /// The Dict.
        name: String,
    },
    /// Delete a Dict and its entries.
    Rm {
        /// The Dict.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// List Queues with their lengths.
    Ls,
    /// Make a Queue (the SDK's create_if_missing=True does too).
    Create {
        /// Its name: letters, digits, '.', '_' and '-'.
        name: String,
    },
    /// Print how many items it holds (in all partitions, or in one).
    Len {
        /// The Queue.
        name: String,
        /// Only this partition.
        #[arg(long)]
        partition: Option<String>,
    },
    /// Print the oldest items as JSON without taking them.
    Peek {
        /// The Queue.
        name: String,
        /// How many.
        #[arg(short, default_value_t = 10)]
        n: usize,
        /// The partition (default: the default one).
        #[arg(long)]
        partition: Option<String>,
    },
    /// Put items at the back.
    Put {
        /// The Queue.
        name: String,
        /// The items: each JSON, or else a string.
        #[arg(required = true)]
        values: Vec<String>,
        /// The partition.
        #[arg(long)]
        partition: Option<String>,
    },
    /// Remove every item (of one partition, with --partition).
    Clear {
        /// The Queue.
        name: String,
        /// Only this partition.
        #[arg(long)]
        partition: Option<String>,
    },
    /// Delete a Queue and its items.
    Rm {
        /// The Queue.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
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
