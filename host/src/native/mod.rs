//! The native engine's API: image builds (`POST /v1/images/build`) and one-off containers
//! (`POST /v1/containers`), both streamed back as NDJSON. `lode serve` owns the image mounts,
//! the chunk cache and the containers; the CLI is only a client.

pub mod pool;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;

use crate::api::{ApiError, ndjson};
use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use lode_fs::MountTable;
use lode_native_runner::builder::{BuildEvent, Builder, DEFAULT_PATH, read_config};
use lode_native_runner::cgroup::{Hierarchy, Limits};
use lode_native_runner::egress::Egress;
use lode_native_runner::image_spec::ImageSpec;
use lode_native_runner::sandbox::{Network, SandboxSpec, Volume, spawn};
use lode_native_runner::userns::{CONTAINER_IDS, UserNamespace};
use lode_registry::{BlobAccess, Digest, TagUpdate};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Bounds on what one container may ask for, and what it gets when it asks for nothing:
/// every function container, one-off container and build step has a memory, pids and
/// writable-layer cap.
#[derive(Debug, Clone)]
pub struct ContainerBounds {
    /// Memory a container gets when it names none, in MiB.
    pub default_memory_mib: u64,
    /// Most memory, in MiB.
    pub max_memory_mib: u64,
    /// Most CPU, in cores.
    pub max_cpu: f64,
    /// Most processes.
    pub max_pids: u64,
    /// Longest timeout.
    pub max_timeout: Duration,
    /// Processes a container gets when it names no limit (a fork bomb stops here).
    pub default_pids: u64,
    /// Each container's writable layer (a tmpfs, charged to its memory), in bytes.
    pub writable_bytes: u64,
    /// Each container's `/dev/shm`, in bytes.
    pub shm_bytes: u64,
    /// Most containers one function may keep (`min_containers` and `max_containers`).
    pub max_containers: u32,
    /// What one build step may use.
    pub build: lode_native_runner::builder::BuildLimits,
    /// Run containers as the host's uid 0 where the kernel cannot keep them in a user
    /// namespace (`--allow-root-containers`); refused otherwise.
    pub allow_root_containers: bool,
    /// Refused ranges (private, link-local, the host's own addresses) that functions and
    /// containers may be granted (`--allow-net`). Empty: none; the internet needs no grant.
    pub allow_net: Vec<ipnet::IpNet>,
    /// Host directories whose contents may be bind-mounted into containers. Empty: none.
    /// A token holder could otherwise mount `/` and own the host.
    pub volume_roots: Vec<PathBuf>,
}

impl Default for ContainerBounds {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            default_memory_mib: 2048,
            max_memory_mib: host_memory_mib().max(2048),
            max_cpu: cores as f64,
            max_pids: 32_768,
            max_timeout: Duration::from_secs(24 * 3600),
            default_pids: 4096,
            writable_bytes: 1 << 30,
            shm_bytes: lode_native_runner::sandbox::DEFAULT_SHM_BYTES,
            max_containers: 64,
            build: Default::default(),
            allow_root_containers: false,
            allow_net: Vec::new(),
            volume_roots: Vec::new(),
        }
    }
}

/// This machine's memory, in MiB (0 where /proc/meminfo cannot be read).
pub fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib / 1024)
}

impl ContainerBounds {
    /// Problems with what a Python function asks for, each naming the flag that bounds it.
    pub fn check_function(&self, r: &crate::proto::manifest::Resources) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(mib) = r.memory
            && !(4..=self.max_memory_mib).contains(&mib)
        {
            problems.push(format!(
                "memory {mib} MiB must be 4 to {} MiB (lode serve --container-max-memory)",
                self.max_memory_mib
            ));
        }
        if let Some(cpu) = r.cpu
            && !(cpu >= 0.01 && cpu <= self.max_cpu)
        {
            problems.push(format!(
                "cpu {cpu} must be 0.01 to {} cores (lode serve --container-max-cpu)",
                self.max_cpu
            ));
        }
        for (field, value) in [
            ("min_containers", r.min_containers),
            ("max_containers", r.max_containers),
        ] {
            if let Some(n) = value
                && n > self.max_containers
            {
                problems.push(format!(
                    "{field} {n} is above this server's {} (lode serve --max-containers)",
                    self.max_containers
                ));
            }
        }
        problems
    }

    /// Refuses allowances in refused ranges (private, link-local, the host's own addresses)
    /// outside the operator's `--allow-net`.
    pub fn check_allowed(&self, allowed: &[ipnet::IpNet]) -> Result<(), String> {
        let host = lode_native_runner::egress::host_addresses();
        allowed.iter().try_for_each(|net| {
            lode_native_runner::egress::check_grant(net, &host, &self.allow_net)
        })
    }

    /// The cgroup limits of a function container: what it asks for, else the defaults.
    pub fn function_limits(&self, r: &crate::proto::manifest::Resources) -> Limits {
        Limits {
            memory: Some(r.memory.unwrap_or(self.default_memory_mib) << 20),
            cpu: r.cpu,
            pids: Some(self.default_pids),
        }
    }
}

/// The native engine as the server holds it.
pub struct Native {
    /// Starts every container and build group name of this server (a hash of its cache
    /// dir), so clearing leftovers never touches another server's containers.
    scope: String,
    registry: Arc<dyn BlobAccess>,
    mounts: Arc<MountTable>,
    /// `None` where cgroups cannot be used (not root); containers then get a named error.
    cgroups: Result<Arc<dyn Hierarchy>, String>,
    builder: Option<Builder>,
    run_dir: PathBuf,
    bounds: ContainerBounds,
    /// Where containers' uid 0 is an unprivileged host uid; `None` where the kernel has no
    /// user namespaces for us.
    user_namespace: Option<Arc<UserNamespace>>,
    /// The filter on containers' outbound traffic, or why there is none (then nothing gets
    /// outbound network).
    egress: Result<Arc<Egress>, String>,
}

impl Native {
    /// Sets up the engine: finds the cgroup hierarchy, clears what a killed predecessor left
    /// (cgroups, container scratch and build layers), and prepares the builder.
    pub fn new(
        registry: Arc<dyn BlobAccess>,
        mounts: Arc<MountTable>,
        cache_dir: &Path,
        base_dir: PathBuf,
        bounds: ContainerBounds,
    ) -> Arc<Self> {
        let cgroups: Result<Arc<dyn Hierarchy>, String> = lode_native_runner::cgroup::detect()
            .map(Arc::from)
            .map_err(|e| format!("containers need cgroups (run `lode serve` as root): {e}"));
        let canonical = std::fs::canonicalize(cache_dir).unwrap_or_else(|_| cache_dir.into());
        let scope =
            blake3::hash(canonical.as_os_str().as_encoded_bytes()).to_hex()[..8].to_string();
        if let Ok(cgroups) = &cgroups {
            cgroups.clean_leftovers(&format!("{scope}-"));
        }
        let images = cache_dir.join("images");
        let run_dir = cache_dir.join("containers");
        for leftover in [run_dir.clone(), images.join("layers"), images.join("run")] {
            // A killed server's build step can leave its layer disk mounted there.
            for mount in lode_fs::mounts_under(&leftover) {
                let _ = lode_fs::unmount(&mount.point);
            }
            let _ = std::fs::remove_dir_all(&leftover);
        }
        // Image trees (the debootstrap base, build layers) and container roots hold setuid
        // files of the images' own: no other host user may reach them.
        for private in [&images, &run_dir, &base_dir] {
            if let Err(e) = lode_fs::create_private_dir(private) {
                tracing::warn!(dir = %private.display(), "making the directory private: {e}");
            }
        }
        let user_namespace = match UserNamespace::create(CONTAINER_IDS) {
            Ok(userns) => Some(Arc::new(userns)),
            Err(e) => {
                tracing::warn!(
                    "no user namespace ({e}): containers run as the host's uid 0, held in by \
                     their other namespaces, dropped capabilities and seccomp"
                );
                None
            }
        };
        let egress = Egress::install(&scope).map_err(|e| e.to_string());
        if let Err(e) = &egress {
            tracing::warn!("no outbound network for containers or build steps: {e}");
        }
        let builder = cgroups.as_ref().ok().map(|cgroups| {
            let mut builder = Builder::new(
                registry.clone(),
                mounts.clone(),
                cgroups.clone(),
                images,
                base_dir,
                format!("{scope}-build"),
            );
            builder.user_namespace = user_namespace.clone();
            builder.limits = bounds.build;
            builder.egress = egress.as_ref().ok().cloned();
            builder.allow_root = bounds.allow_root_containers;
            builder
        });
        Arc::new(Self {
            scope,
            registry,
            mounts,
            cgroups,
            builder,
            run_dir,
            bounds,
            user_namespace,
            egress,
        })
    }

    /// Outbound network for a container, reaching `allow` (CIDRs, addresses or host names,
    /// resolved now) besides the internet, each inside what the operator opened
    /// ([`ContainerBounds::check_allowed`]); an error names what is wrong or missing.
    pub(crate) async fn outbound(&self, allow: &[String]) -> Result<Network, String> {
        let egress = self.egress.clone().map_err(|e| {
            format!("outbound network needs the egress filter, which did not start: {e}")
        })?;
        let mut allowed = Vec::new();
        for entry in allow {
            match lode_native_runner::egress::parse_cidr(entry) {
                Some(net) => allowed.push(net),
                None => {
                    let addrs =
                        tokio::net::lookup_host((entry.as_str(), 0))
                            .await
                            .map_err(|e| {
                                format!(
                                    "network allow entry {entry:?} is not a CIDR, an address or a \
                                 host name that resolves: {e}"
                                )
                            })?;
                    allowed.extend(addrs.map(|a| ipnet::IpNet::from(a.ip())));
                }
            }
        }
        self.bounds.check_allowed(&allowed)?;
        Ok(Network::Outbound { egress, allowed })
    }

    /// At shutdown: takes the egress table out of the host's ruleset.
    pub(crate) fn shut_down(&self) {
        if let Ok(egress) = &self.egress {
            egress.remove_if_unused();
        }
    }

    fn cgroups(&self) -> Result<&Arc<dyn Hierarchy>, ApiError> {
        self.cgroups
            .as_ref()
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_containers", e))
    }

    /// The image `reference` names, with its index.
    async fn resolve(&self, reference: &str) -> Result<(Digest, lode_fs::Index), ApiError> {
        let unknown = || {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_image",
                format!(
                    "no image {reference:?} in the registry: build one with `lode image build`, \
                     or list tags with `lode image ls`"
                ),
            )
        };
        let digest = match reference.parse::<Digest>() {
            Ok(digest) => digest,
            Err(_) => match self.registry.get_tag(reference).await {
                Ok(digest) => digest,
                Err(lode_registry::Error::TagNotFound(_)) => return Err(unknown()),
                Err(e) => return Err(ApiError::internal(e)),
            },
        };
        let bytes = match self.registry.get_index(&digest).await {
            Ok(bytes) => bytes,
            Err(lode_registry::Error::IndexNotFound(_)) => return Err(unknown()),
            Err(e) => return Err(ApiError::internal(e)),
        };
        let index = lode_fs::Index::parse(bytes).map_err(ApiError::internal)?;
        Ok((digest, index))
    }
}

/// What function pools need from the native engine.
impl Native {
    /// The cgroup hierarchy, or why containers cannot run here.
    pub(crate) fn hierarchy(&self) -> Result<Arc<dyn Hierarchy>, String> {
        self.cgroups.clone()
    }

    /// What containers may ask for and get by default.
    pub(crate) fn bounds(&self) -> &ContainerBounds {
        &self.bounds
    }

    /// The host uid of a container's root, when containers run in a user namespace.
    pub(crate) fn container_root(&self) -> Option<u32> {
        self.user_namespace.as_ref().map(|ns| ns.ids().host_base)
    }

    /// Builds an image (every step cached), sending progress to `events`.
    pub(crate) async fn build_image(
        &self,
        spec: &ImageSpec,
        events: lode_native_runner::builder::Events,
    ) -> Result<Digest, String> {
        let builder = self
            .builder
            .as_ref()
            .ok_or_else(|| self.cgroups.clone().err().unwrap_or_default())?;
        builder.build(spec, events).await.map_err(|e| e.to_string())
    }

    /// The image's mount and its own settings (env, workdir).
    pub(crate) async fn open_image(
        &self,
        digest: &Digest,
    ) -> Result<
        (
            Arc<lode_fs::Mount>,
            lode_native_runner::image_spec::ImageConfig,
        ),
        String,
    > {
        let (digest, index) = self
            .resolve(&digest.to_string())
            .await
            .map_err(|e| e.message().to_string())?;
        let config = read_config(&index, self.registry.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        let mount = self
            .mounts
            .mount(&digest)
            .await
            .map_err(|e| e.to_string())?;
        Ok((mount, config))
    }

    /// The user namespace a container on `mount` runs in, or why it may not run.
    fn user_namespace_for(
        &self,
        mount: &lode_fs::Mount,
    ) -> Result<Option<Arc<UserNamespace>>, String> {
        UserNamespace::for_lower(
            self.user_namespace.as_ref(),
            mount,
            self.bounds.allow_root_containers,
        )
    }

    /// A sandbox on `mount` with a fresh scratch directory under this server's scope.
    pub(crate) fn function_sandbox(&self, mount: &lode_fs::Mount) -> Result<SandboxSpec, String> {
        let id = format!("{}-f-{:016x}", self.scope, rand::random::<u64>());
        let user_namespace = self.user_namespace_for(mount)?;
        Ok(SandboxSpec {
            lower: mount.mountpoint().to_path_buf(),
            scratch: self.run_dir.join(id),
            writable_bytes: self.bounds.writable_bytes,
            shm_bytes: self.bounds.shm_bytes,
            user_namespace,
            ..SandboxSpec::default()
        })
    }
}

/// The routes, for the token-guarded part of the API.
pub fn router(native: Arc<Native>) -> Router {
    Router::new()
        .route("/v1/images/build", post(build))
        .route("/v1/containers", post(run_container))
        .with_state(native)
}

fn json_body<T: for<'de> Deserialize<'de>>(body: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("the {what} is not valid: {e}")))
}

/// `POST /v1/images/build`: `{"spec": <image.json>, "tag": "name"?}`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BuildRequest {
    /// The image, with local parts already uploaded by the client.
    pub spec: ImageSpec,
    /// A tag to point at the result.
    #[serde(default)]
    pub tag: Option<String>,
}

/// What a build streams: the builder's events, then how it ended.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BuildLine {
    /// A step started or was cached, a line of output, or a step's result.
    Event(BuildEvent),
    /// The last line.
    End(BuildEnd),
}

/// How a build ended.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum BuildEnd {
    /// The image.
    Done {
        /// Its index digest.
        digest: String,
        /// Seconds the build took.
        seconds: f64,
    },
    /// The build failed.
    Error {
        /// What failed and what to do.
        message: String,
    },
}

async fn build(State(native): State<Arc<Native>>, body: Bytes) -> Result<Response, ApiError> {
    let request: BuildRequest = json_body(&body, "build request")?;
    request.spec.validate().map_err(ApiError::bad)?;
    if let Some(tag) = &request.tag {
        lode_registry::validate_tag_name(tag).map_err(|e| ApiError::bad(e.to_string()))?;
    }
    native.cgroups()?;
    let (tx, rx) = mpsc::channel::<BuildLine>(1024);
    tokio::spawn(async move {
        let started = Instant::now();
        let events_tx = tx.clone();
        let events: lode_native_runner::builder::Events = Arc::new(move |event: BuildEvent| {
            send_build_line(&events_tx, BuildLine::Event(event));
        });
        let builder = native.builder.as_ref().expect("cgroups were checked");
        let line = match builder.build(&request.spec, events).await {
            Ok(digest) => match &request.tag {
                Some(tag) => match native
                    .registry
                    .set_tag(tag, &digest, TagUpdate::Always)
                    .await
                {
                    Ok(_) => BuildEnd::Done {
                        digest: digest.to_string(),
                        seconds: started.elapsed().as_secs_f64(),
                    },
                    Err(e) => BuildEnd::Error {
                        message: format!("built {digest} but could not tag it {tag}: {e}"),
                    },
                },
                None => BuildEnd::Done {
                    digest: digest.to_string(),
                    seconds: started.elapsed().as_secs_f64(),
                },
            },
            Err(e) => BuildEnd::Error {
                message: e.to_string(),
            },
        };
        let _ = tx.send(BuildLine::End(line)).await;
    });
    Ok(ndjson(ReceiverStream::new(rx).map(|line| {
        serde_json::to_string(&line).expect("serializes")
    })))
}

/// Sends a build's progress to its client. Output lines come from the threads reading a
/// step's pipes: they wait for a slow client (which holds the step back) rather than drop
/// lines or buffer without bound. Step headers come from the build task, where waiting is not
/// allowed; the channel has room for them. A client that went away stops seeing lines; the
/// build still completes and is cached, so a retry is quick.
pub(crate) fn send_build_line<T>(tx: &mpsc::Sender<T>, line: T) {
    if tokio::runtime::Handle::try_current().is_ok() {
        let _ = tx.try_send(line);
    } else {
        let _ = tx.blocking_send(line);
    }
}

/// `POST /v1/containers`: run a command in a new container of an image.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerRequest {
    /// Image digest or tag.
    pub image: String,
    /// The command; empty runs the image's own.
    #[serde(default)]
    pub argv: Vec<String>,
    /// Extra environment, on top of the image's.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Memory limit, MiB.
    #[serde(default)]
    pub memory: Option<u64>,
    /// CPU limit, cores.
    #[serde(default)]
    pub cpu: Option<f64>,
    /// Process limit.
    #[serde(default)]
    pub pids: Option<u64>,
    /// Wall-clock limit, seconds.
    #[serde(default)]
    pub timeout: Option<f64>,
    /// `none` (default) or `outbound`.
    #[serde(default)]
    pub network: Option<String>,
    /// With `outbound`: CIDRs, addresses or host names reachable besides the internet (the
    /// host and private ranges are refused otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_net: Vec<String>,
    /// Host paths to bind.
    #[serde(default)]
    pub volumes: Vec<VolumeRequest>,
    /// Working directory; defaults to the image's.
    #[serde(default)]
    pub workdir: Option<String>,
}

/// One bind mount of a container request.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRequest {
    /// Absolute host path.
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// What a container streams back.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ContainerLine {
    /// The container is running.
    Started {
        /// Its id.
        id: String,
        /// The image digest.
        image: String,
    },
    /// Bytes the command wrote to stdout (base64).
    Stdout {
        /// Base64 of the bytes.
        data: String,
    },
    /// Bytes the command wrote to stderr (base64).
    Stderr {
        /// Base64 of the bytes.
        data: String,
    },
    /// How it ended.
    Exit {
        /// The exit code (128 + signal when killed).
        code: i32,
        /// The limit or timeout that stopped it, named.
        killed_by: Option<String>,
        /// Milliseconds from start to exit.
        duration_ms: u64,
    },
    /// It could not run.
    Error {
        /// What went wrong and what to do.
        message: String,
    },
}

impl Native {
    /// Checks a request's limits, env and volumes; returns the limits, the timeout and the
    /// volumes with their host paths resolved.
    fn check(
        &self,
        request: &ContainerRequest,
    ) -> Result<(Limits, Option<Duration>, Vec<Volume>), ApiError> {
        let b = &self.bounds;
        let range = |what: &str, flag: &str, low: String, high: String| {
            ApiError::bad(format!(
                "{what} must be between {low} and {high} (--{flag})"
            ))
        };
        if let Some(m) = request.memory
            && !(4..=b.max_memory_mib).contains(&m)
        {
            return Err(range(
                "memory",
                "memory",
                "4 MiB".into(),
                format!("{} MiB", b.max_memory_mib),
            ));
        }
        if let Some(c) = request.cpu
            && !(c >= 0.01 && c <= b.max_cpu)
        {
            return Err(range(
                "cpu",
                "cpu",
                "0.01".into(),
                format!("{} cores", b.max_cpu),
            ));
        }
        if let Some(p) = request.pids
            && !(1..=b.max_pids).contains(&p)
        {
            return Err(range("pids", "pids", "1".into(), b.max_pids.to_string()));
        }
        let timeout = match request.timeout {
            Some(t) if !(t > 0.0 && t <= b.max_timeout.as_secs_f64()) => {
                return Err(range(
                    "timeout",
                    "timeout",
                    "0".into(),
                    format!("{} s", b.max_timeout.as_secs()),
                ));
            }
            Some(t) => Some(Duration::from_secs_f64(t)),
            None => None,
        };
        for (name, _) in &request.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(ApiError::bad(format!(
                    "{name:?} is not a variable name (--env NAME=VALUE)"
                )));
            }
        }
        let volumes = request
            .volumes
            .iter()
            .map(|v| {
                let volume = self.allowed_volume(v)?;
                if !v.read_only {
                    self.check_writable(&volume)?;
                }
                Ok(volume)
            })
            .collect::<Result<_, ApiError>>()?;
        Ok((
            Limits {
                memory: Some(request.memory.unwrap_or(b.default_memory_mib) << 20),
                cpu: request.cpu,
                pids: Some(request.pids.unwrap_or(b.default_pids)),
            },
            timeout,
            volumes,
        ))
    }
}

impl Native {
    /// A read-write volume the container's root could not write would fail deep inside the
    /// command with a bare EACCES; this says why before anything starts.
    fn check_writable(&self, volume: &Volume) -> Result<(), ApiError> {
        use std::os::unix::fs::MetadataExt;
        let Some(userns) = &self.user_namespace else {
            return Ok(());
        };
        let root = userns.ids().host_base;
        let source = &volume.source;
        let meta = volume
            .metadata()
            .map_err(|e| ApiError::bad(format!("volume source {}: {e}", source.display())))?;
        let mode = meta.mode();
        let writable = (meta.uid() == root && mode & 0o200 != 0)
            || (meta.gid() == root && mode & 0o020 != 0)
            || mode & 0o002 != 0;
        if writable {
            return Ok(());
        }
        Err(ApiError::bad(format!(
            "volume {} is not writable by the container's root, which is host uid {root}: \
             run `chown {root}:{root} {}` on the host, or mount it read-only with :ro",
            source.display(),
            source.display()
        )))
    }

    /// Opens a volume's host side below the `--allow-volume` root that holds it. The kernel
    /// resolves it beneath that root without following a symlink, and the container's mount
    /// is cloned from the descriptor this returns, so nothing swapped in later can redirect
    /// it.
    fn allowed_volume(&self, request: &VolumeRequest) -> Result<Volume, ApiError> {
        let source = Path::new(&request.source);
        if !source.is_absolute() {
            return Err(ApiError::bad(format!(
                "volume source {:?} must be an absolute host path",
                request.source
            )));
        }
        let not_allowed =
            |why: String| ApiError::new(StatusCode::FORBIDDEN, "volume_not_allowed", why);
        for root in &self.bounds.volume_roots {
            let Ok(real_root) = std::fs::canonicalize(root) else {
                continue;
            };
            let relative = source
                .strip_prefix(root)
                .or_else(|_| source.strip_prefix(&real_root));
            let Ok(relative) = relative else { continue };
            return Volume::beneath(&real_root, relative, &request.target, request.read_only)
                .map_err(|e| match e.kind() {
                    // A symlink on the way, or a path that leaves the root.
                    std::io::ErrorKind::PermissionDenied => not_allowed(e.to_string()),
                    _ => ApiError::bad(e.to_string()),
                });
        }
        Err(not_allowed(format!(
            "host path {} may not be mounted into containers: start `lode serve` with \
             --allow-volume DIR for a directory that holds it",
            source.display()
        )))
    }
}

/// Sets the flag when the response stream is dropped: the client went away.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

async fn run_container(
    State(native): State<Arc<Native>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: ContainerRequest = json_body(&body, "container request")?;
    let (limits, timeout, volumes) = native.check(&request)?;
    let network = match request.network.as_deref() {
        None | Some("none") if request.allow_net.is_empty() => Network::None,
        None | Some("none") => {
            return Err(ApiError::bad(
                "--allow-net needs --net outbound: a container without network reaches nothing",
            ));
        }
        Some("outbound") => native
            .outbound(&request.allow_net)
            .await
            .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, "network_not_allowed", e))?,
        Some(other) => {
            return Err(ApiError::bad(format!(
                "network {other:?} is not one of: none, outbound"
            )));
        }
    };
    let cgroups = native.cgroups()?.clone();
    let (digest, index) = native.resolve(&request.image).await?;
    let config = read_config(&index, native.registry.as_ref())
        .await
        .map_err(ApiError::internal)?;
    let argv = if request.argv.is_empty() {
        config.cmd.clone()
    } else {
        request.argv.clone()
    };
    if argv.is_empty() {
        return Err(ApiError::bad(
            "no command given and the image names none: lode container run IMAGE -- CMD...",
        ));
    }
    let mount = native
        .mounts
        .mount(&digest)
        .await
        .map_err(ApiError::internal)?;
    let mut env = vec![("PATH".to_string(), DEFAULT_PATH.to_string())];
    for (name, value) in config.env.iter().chain(&request.env) {
        lode_native_runner::image_spec::set_env(&mut env, name, value);
    }
    let id = format!("{}-c-{:016x}", native.scope, rand::random::<u64>());
    let spec = SandboxSpec {
        lower: mount.mountpoint().to_path_buf(),
        scratch: native.run_dir.join(&id),
        argv,
        env,
        cwd: request
            .workdir
            .clone()
            .or(config.workdir.clone())
            .unwrap_or_else(|| "/".into()),
        limits,
        timeout,
        volumes,
        network,
        writable_bytes: native.bounds.writable_bytes,
        shm_bytes: native.bounds.shm_bytes,
        user_namespace: native.user_namespace_for(&mount).map_err(|why| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_user_namespace", why)
        })?,
        ..SandboxSpec::default()
    };
    let started = Instant::now();
    let spawned = tokio::task::spawn_blocking(move || {
        spawn(
            &spec,
            cgroups.as_ref(),
            std::process::Stdio::piped(),
            std::process::Stdio::piped(),
        )
    })
    .await
    .map_err(ApiError::internal)?;
    let mut sandbox = spawned.map_err(|e| {
        let status = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidInput => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(
            status,
            "container_failed",
            format!("the container did not start: {e}"),
        )
    })?;
    tracing::info!(%id, image = %digest, "container started");
    let (tx, rx) = mpsc::channel::<ContainerLine>(64);
    let stop = Arc::new(AtomicBool::new(false));
    let _ = tx
        .send(ContainerLine::Started {
            id: id.clone(),
            image: digest.to_string(),
        })
        .await;
    let (stdout, stderr) = sandbox.take_output();
    let pump = |pipe: Option<Box<dyn Read + Send>>, is_stdout: bool| {
        let tx = tx.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let Some(mut pipe) = pipe else { return };
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                let n = match pipe.read(&mut buffer) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let data = base64::engine::general_purpose::STANDARD.encode(&buffer[..n]);
                let line = if is_stdout {
                    ContainerLine::Stdout { data }
                } else {
                    ContainerLine::Stderr { data }
                };
                if tx.blocking_send(line).is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
            }
        })
    };
    let out = pump(stdout.map(|p| Box::new(p) as Box<dyn Read + Send>), true);
    let err = pump(stderr.map(|p| Box::new(p) as Box<dyn Read + Send>), false);
    let waiter_stop = stop.clone();
    std::thread::spawn(move || {
        let finished = sandbox.finish_unless(&waiter_stop);
        let _ = (out.join(), err.join());
        let line = match finished {
            Ok(finished) => ContainerLine::Exit {
                code: finished.code(),
                killed_by: finished.killed_by(),
                duration_ms: started.elapsed().as_millis() as u64,
            },
            Err(e) => ContainerLine::Error {
                message: format!("waiting for the container: {e}"),
            },
        };
        tracing::info!(%id, ?line, "container ended");
        let _ = tx.blocking_send(line);
        // The image stays mounted for the next container; the table owns it.
        drop(mount);
    });
    let guard = StopOnDrop(stop);
    Ok(ndjson(ReceiverStream::new(rx).map(move |line| {
        let _ = &guard;
        serde_json::to_string(&line).expect("serializes")
    })))
}
