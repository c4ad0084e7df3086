//! The native engine: image builds, the image mounts and the chunk cache, sandboxed containers
//! within the server's [`ContainerBounds`], one-off containers (`containers.rs`) and Python
//! function pools (`pool.rs`). The API's handlers for it are in `api/containers.rs`.

pub mod containers;
pub mod gpus;
pub mod grant;
pub mod pool;
pub mod snapshots;
pub mod tunnel_mirror;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lode_fs::MountTable;
use lode_native_runner::builder::{Builder, read_config};
use lode_native_runner::cgroup::{Hierarchy, Limits};
use lode_native_runner::egress::Egress;
use lode_native_runner::image_spec::ImageSpec;
use lode_native_runner::sandbox::{Network, SandboxSpec};
use lode_native_runner::userns::{CONTAINER_IDS, UserNamespace};
use lode_registry::{BlobAccess, Digest};
use tokio::sync::mpsc;

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
    /// Registries image builds may pull from over plain HTTP (`--insecure-registry`).
    pub insecure_registries: Vec<String>,
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
            insecure_registries: Vec::new(),
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
            devices: Vec::new(),
        }
    }
}

/// Why the native engine refused a request, with the HTTP status the API answers it with.
#[derive(Debug)]
pub struct Refused {
    /// HTTP status.
    pub status: u16,
    /// A short kind, such as `no_containers`.
    pub kind: &'static str,
    /// What went wrong and what to do; for a 500, what the server log gets.
    pub message: String,
}

impl Refused {
    /// A refusal of `kind`, answered with `status`.
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }

    /// A 400 for a request that is not valid.
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request", message)
    }

    /// A failure inside the server: logged under an id, and answered with that id only, so
    /// its details stay in the server log.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        let id = format!("{:016x}", rand::random::<u64>());
        tracing::error!(error_id = id, "internal error: {error}");
        Self::new(
            500,
            "internal",
            format!("internal error {id}; the server log has the details"),
        )
    }
}

/// What image builds read from the rest of the server.
pub struct BuildInputs {
    /// Secrets by name: registry credentials, and variables for `run_function` steps.
    pub secrets: lode_native_runner::builder::SecretLookup,
    /// The Python SDK, which `run_function` steps run with.
    pub sdk_dir: PathBuf,
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
    /// Sandbox tunnels, mirrored into function containers.
    tunnels: Arc<tunnel_mirror::TunnelMirror>,
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
        build_inputs: BuildInputs,
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
        lode_native_runner::sandbox::clean_restore_leftovers(&format!("{scope}-"));
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
            builder.insecure_registries = bounds.insecure_registries.clone();
            builder.secrets = Some(build_inputs.secrets);
            builder.sdk_dir = Some(build_inputs.sdk_dir);
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
            tunnels: Arc::default(),
        })
    }

    /// Sandbox tunnels, as function containers see them.
    pub fn tunnel_mirror(&self) -> &Arc<tunnel_mirror::TunnelMirror> {
        &self.tunnels
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

    /// The cgroup hierarchy containers go in, or the refusal naming why there is none.
    pub fn cgroups(&self) -> Result<&Arc<dyn Hierarchy>, Refused> {
        self.cgroups.as_ref().map_err(|_| self.no_containers())
    }

    fn no_containers(&self) -> Refused {
        let why = match &self.cgroups {
            Err(e) => e.clone(),
            Ok(_) => "the image builder is not set up".into(),
        };
        Refused::new(503, "no_containers", why)
    }

    /// The image `reference` names, with its index.
    async fn resolve(&self, reference: &str) -> Result<(Digest, lode_fs::Index), Refused> {
        let unknown = || {
            Refused::new(
                404,
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
                Err(e) => return Err(Refused::internal(e)),
            },
        };
        let bytes = match self.registry.get_index(&digest).await {
            Ok(bytes) => bytes,
            Err(lode_registry::Error::IndexNotFound(_)) => return Err(unknown()),
            Err(e) => return Err(Refused::internal(e)),
        };
        let index = lode_fs::Index::parse(bytes).map_err(Refused::internal)?;
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
            .map_err(|e| e.message)?;
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
