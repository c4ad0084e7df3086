//! Image builds: a base, then each step run or applied on top, every result cached by the
//! hash of its parent and the step (tag `build-cache/<key>` in the registry, so the cache
//! survives a deleted cache dir and is shared by every host using the registry).
//!
//! - `pip_install`, `apt_install` and `run_commands` run in a build container on the
//!   parent's lazy mount, with network (`slirp4netns`), Docker's default capabilities, and
//!   the host's CA bundle, pip configuration and proxy variables (see `build_env.rs`). The
//!   container's upper directory, deletions included, is merged into a new flattened index.
//! - `env`, `workdir`, `add_local_dir` and `add_local_file` change the tree directly: no
//!   container is started.
//! - A step that fails reports its command and the end of its output, and caches nothing.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lode_fs::{Body, FileContent, HostIds, IngestOptions, Meta, MountTable, Node};
use lode_registry::{BlobAccess, Digest, TagUpdate};

use crate::cgroup::{Hierarchy, Limits};
use crate::image_spec::{
    Base, CONFIG_PATH, ImageConfig, ImageSpec, Step, debian_release, set_env, step_key,
};
use crate::sandbox::{BUILD_CAPABILITIES, Network, SandboxSpec, Volume, spawn};
use crate::userns::UserNamespace;

/// Where build containers find what they inherit from the host.
pub(crate) const BUILD_ENV_MOUNT: &str = "/dev/lode-build";

/// Paths a build container gets as mount points, which are not part of any step's result.
const MOUNT_POINTS: [&str; 3] = ["etc/resolv.conf", "proc", "dev"];

/// The `PATH` containers get when the image names none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Lines of a failed step's output kept for its error.
const TAIL_LINES: usize = 40;

/// What a build reports as it goes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum BuildEvent {
    /// A step starts (0 is the base), or was found in the cache.
    Step {
        /// 0 for the base, then 1.. for the steps.
        number: usize,
        /// How many steps there are, the base not counted.
        of: usize,
        /// What it does.
        description: String,
        /// Whether its result came from the cache.
        cached: bool,
    },
    /// A line of a step's output (stdout and stderr together).
    Log {
        /// The line, without its newline.
        line: String,
    },
    /// A step's result.
    Layer {
        /// Its step number.
        number: usize,
        /// The index digest after it.
        digest: String,
    },
}

impl BuildEvent {
    /// The event as a progress line (`[2/5] pip_install numpy  (cached)`, or a step's output
    /// indented); `None` for a layer, which progress does not show.
    pub fn line(&self) -> Option<String> {
        match self {
            Self::Step {
                number,
                of,
                description,
                cached,
            } => {
                let note = if *cached { "  (cached)" } else { "" };
                Some(format!("[{number}/{of}] {description}{note}"))
            }
            Self::Log { line } => Some(format!("    {line}")),
            Self::Layer { .. } => None,
        }
    }
}

/// Why a build failed; each names the step and what to do.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The spec is wrong.
    #[error("{0}")]
    Spec(String),
    /// A step's command failed.
    #[error(
        "step {number} ({description}) failed: {reason}\n  command: {command}\n--- last {TAIL_LINES} lines of output ---\n{output}"
    )]
    StepFailed {
        /// Its step number.
        number: usize,
        /// The step.
        description: String,
        /// The command line.
        command: String,
        /// Exit code or the limit that stopped it.
        reason: String,
        /// The end of its output.
        output: String,
    },
    /// Reading or writing images.
    #[error(transparent)]
    Fs(#[from] lode_fs::Error),
    /// The registry.
    #[error(transparent)]
    Registry(#[from] lode_registry::Error),
    /// Anything else, with its context.
    #[error("{0}")]
    Other(String),
}

/// A sink for [`BuildEvent`]s.
pub type Events = Arc<dyn Fn(BuildEvent) + Send + Sync>;

/// Builds images into a registry.
pub struct Builder {
    registry: Arc<dyn BlobAccess>,
    mounts: Arc<MountTable>,
    cgroups: Arc<dyn Hierarchy>,
    /// Build scratch space (`<cache>/images`).
    work_dir: PathBuf,
    /// Base root filesystems made by debootstrap, kept so a rebuild skips it.
    base_dir: PathBuf,
    /// Starts the names of build containers (and so of their cgroups).
    name_prefix: String,
    /// Wall-clock limit for one step.
    pub step_timeout: Duration,
    /// The user namespace build steps run in (see [`crate::userns`]); `None` runs them as
    /// the host's root.
    pub user_namespace: Option<Arc<UserNamespace>>,
    /// What one build step may use.
    pub limits: BuildLimits,
    /// The filter on build steps' network; without one, steps that need the network fail.
    pub egress: Option<Arc<crate::egress::Egress>>,
    /// Run steps as the host's uid 0 where no user namespace can hold them (the operator's
    /// choice; refused otherwise).
    pub allow_root: bool,
}

/// What one build step may use: memory and pids always, a disk where loop devices allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildLimits {
    /// Memory, in bytes.
    pub memory: u64,
    /// Processes and threads.
    pub pids: u64,
    /// The step's writable layer, in bytes ([`crate::layer_disk`]); `None` leaves it on the
    /// host's disk uncapped, where loop devices are missing.
    pub disk: Option<u64>,
}

impl Default for BuildLimits {
    fn default() -> Self {
        Self {
            memory: 4 << 30,
            pids: 4096,
            disk: Some(16 << 30),
        }
    }
}

impl Builder {
    /// A builder that writes into `registry`, mounts parents through `mounts`, and keeps its
    /// scratch space under `work_dir` and debootstrap bases under `base_dir`. Build
    /// containers are named `<name_prefix>-<random>`.
    pub fn new(
        registry: Arc<dyn BlobAccess>,
        mounts: Arc<MountTable>,
        cgroups: Arc<dyn Hierarchy>,
        work_dir: PathBuf,
        base_dir: PathBuf,
        name_prefix: String,
    ) -> Self {
        Self {
            registry,
            mounts,
            cgroups,
            work_dir,
            base_dir,
            name_prefix,
            step_timeout: Duration::from_secs(30 * 60),
            user_namespace: None,
            limits: BuildLimits::default(),
            egress: None,
            allow_root: false,
        }
    }

    /// Builds `spec` and returns the final index digest.
    pub async fn build(&self, spec: &ImageSpec, events: Events) -> Result<Digest, BuildError> {
        spec.validate().map_err(BuildError::Spec)?;
        let of = spec.steps.len();
        let mut parent = match &spec.base {
            Base::DebianSlim { python_version } => {
                let release =
                    debian_release(python_version.as_deref()).map_err(BuildError::Spec)?;
                self.debian_base(release, of, &events).await?
            }
            Base::FromOci { path, digest } => {
                let digest = digest.as_deref().ok_or_else(|| {
                    BuildError::Spec(format!(
                        "from_oci {} was not uploaded: `lode image build` imports OCI layouts \
                         on the client",
                        path.display()
                    ))
                })?;
                events(BuildEvent::Step {
                    number: 0,
                    of,
                    description: format!("from_oci {}", path.display()),
                    cached: true,
                });
                self.existing(digest).await?
            }
            Base::Image { reference } => {
                events(BuildEvent::Step {
                    number: 0,
                    of,
                    description: format!("image {reference}"),
                    cached: true,
                });
                self.existing(reference).await?
            }
        };
        for (i, step) in spec.steps.iter().enumerate() {
            let number = i + 1;
            let key = step_key(&parent.hex(), step);
            let tag = format!("build-cache/{key}");
            let cached = self.cached(&tag).await?;
            events(BuildEvent::Step {
                number,
                of,
                description: step.describe(),
                cached: cached.is_some(),
            });
            parent = match cached {
                Some(digest) => digest,
                None => {
                    let digest = self.apply(number, &parent, step, &events).await?;
                    self.registry
                        .set_tag(&tag, &digest, TagUpdate::Always)
                        .await?;
                    digest
                }
            };
            events(BuildEvent::Layer {
                number,
                digest: parent.hex(),
            });
        }
        Ok(parent)
    }

    /// The cached result under `tag`, if its index is still in the registry.
    async fn cached(&self, tag: &str) -> Result<Option<Digest>, BuildError> {
        match self.registry.get_tag(tag).await {
            Ok(digest) => Ok(self
                .registry
                .get_index(&digest)
                .await
                .is_ok()
                .then_some(digest)),
            Err(lode_registry::Error::TagNotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// An index already in the registry, by digest or tag.
    async fn existing(&self, reference: &str) -> Result<Digest, BuildError> {
        let digest = match reference.parse::<Digest>() {
            Ok(digest) => digest,
            Err(_) => match self.registry.get_tag(reference).await {
                Ok(digest) => digest,
                Err(lode_registry::Error::TagNotFound(_)) => {
                    return Err(BuildError::Spec(format!(
                        "no image {reference:?} in the registry (`lode image ls` lists tags)"
                    )));
                }
                Err(e) => return Err(e.into()),
            },
        };
        self.registry
            .get_index(&digest)
            .await
            .map_err(|e| BuildError::Spec(format!("image {reference}: {e}")))?;
        Ok(digest)
    }

    async fn load(&self, digest: &Digest) -> Result<lode_fs::Index, BuildError> {
        let bytes = self.registry.get_index(digest).await?;
        lode_fs::Index::parse(bytes).map_err(|e| BuildError::Other(format!("image {digest}: {e}")))
    }

    async fn apply(
        &self,
        number: usize,
        parent: &Digest,
        step: &Step,
        events: &Events,
    ) -> Result<Digest, BuildError> {
        let index = self.load(parent).await?;
        let mut config = read_config(&index, self.registry.as_ref()).await?;
        let quote = |items: &[String]| items.iter().map(|p| shell_quote(p)).collect::<Vec<_>>();
        let command = match step {
            Step::PipInstall { packages } => {
                let mut argv: Vec<String> = ["python3", "-m", "pip", "install", "--no-cache-dir"]
                    .map(String::from)
                    .to_vec();
                argv.extend(packages.iter().cloned());
                argv
            }
            Step::AptInstall { packages } => vec![
                "/bin/sh".into(),
                "-ec".into(),
                format!(
                    "apt-get update -q\napt-get install -y -q --no-install-recommends {}\n\
                     apt-get clean\nrm -rf /var/lib/apt/lists/*",
                    quote(packages).join(" ")
                ),
            ],
            Step::RunCommands { commands } => {
                vec!["/bin/sh".into(), "-exc".into(), commands.join("\n")]
            }
            Step::Env { vars } => {
                for (name, value) in vars {
                    config.set_env(name, value);
                }
                let mut tree = index.to_tree();
                write_config(&mut tree, &config)?;
                return self.store(&tree).await;
            }
            Step::Workdir { path } => {
                config.workdir = Some(path.clone());
                let mut tree = index.to_tree();
                ensure_dir(&mut tree, path)?;
                write_config(&mut tree, &config)?;
                return self.store(&tree).await;
            }
            Step::AddLocalDir {
                remote,
                digest,
                local,
            }
            | Step::AddLocalFile {
                remote,
                digest,
                local,
            } => {
                let digest = digest.as_deref().ok_or_else(|| {
                    BuildError::Spec(format!(
                        "step {number}: {} was not uploaded (`lode image build` does this)",
                        local.display()
                    ))
                })?;
                let added = self.load(&self.existing(digest).await?).await?.to_tree();
                let node = if matches!(step, Step::AddLocalFile { .. }) {
                    match added.body {
                        Body::Dir(mut children) if children.len() == 1 => children.remove(0),
                        _ => {
                            return Err(BuildError::Spec(format!(
                                "step {number}: the upload for {} holds no single file",
                                local.display()
                            )));
                        }
                    }
                } else {
                    added
                };
                let mut tree = index.to_tree();
                place(&mut tree, remote, node)?;
                return self.store(&tree).await;
            }
        };
        self.run_in_container(number, step, &index, parent, &config, command, events)
            .await
    }

    async fn store(&self, tree: &Node) -> Result<Digest, BuildError> {
        let index = lode_fs::encode(tree).map_err(|e| BuildError::Other(e.to_string()))?;
        let digest = index.digest().clone();
        self.registry
            .put_index(&digest, index.bytes().clone())
            .await?;
        Ok(digest)
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_in_container(
        &self,
        number: usize,
        step: &Step,
        index: &lode_fs::Index,
        parent: &Digest,
        config: &ImageConfig,
        argv: Vec<String>,
        events: &Events,
    ) -> Result<Digest, BuildError> {
        let mount = self.mounts.mount(parent).await?;
        let name = format!("{}-{}", self.name_prefix, random_hex());
        let layer = self.work_dir.join("layers").join(&name);
        let inherit = self.work_dir.join("build-env");
        let other = |what: &str, path: &Path| {
            let what = what.to_string();
            let path = path.to_path_buf();
            move |e: std::io::Error| BuildError::Other(format!("{what} {}: {e}", path.display()))
        };
        let network = match &self.egress {
            // The package registries, and the host's proxy where it names one: a proxy on a
            // private address is reachable from build steps only (all of its ports).
            Some(egress) => Network::Outbound {
                egress: egress.clone(),
                allowed: tokio::task::spawn_blocking(crate::build_env::proxy_addresses)
                    .await
                    .unwrap_or_default(),
            },
            None => {
                return Err(BuildError::Other(format!(
                    "step {number} ({}) needs the network, and this server has no egress \
                     filter for it (see lode serve's log; apt-get install nftables)",
                    step.describe()
                )));
            }
        };
        let user_namespace =
            UserNamespace::for_lower(self.user_namespace.as_ref(), &mount, self.allow_root)
                .map_err(|why| {
                    BuildError::Other(format!("step {number} ({}): {why}", step.describe()))
                })?;
        let inherited =
            crate::build_env::prepare_build_env(&inherit).map_err(other("preparing", &inherit))?;
        let mut env = vec![("PATH".to_string(), DEFAULT_PATH.to_string())];
        for (name, value) in &config.env {
            set_env(&mut env, name, value);
        }
        for (name, value) in crate::build_env::build_env(&inherited) {
            set_env(&mut env, &name, &value);
        }
        let build_env_volume =
            Volume::open(&inherit, BUILD_ENV_MOUNT, true).map_err(other("opening", &inherit))?;
        // Last, once nothing else can refuse the step: the layer's directory and disk, gone
        // however this function returns.
        let layer_dir =
            crate::layer_disk::LayerDir::make(&layer, self.limits.disk).map_err(|e| {
                BuildError::Other(format!(
                    "step {number} ({}): {e}; or start lode serve with --build-disk 0 to leave \
                 build layers uncapped",
                    step.describe()
                ))
            })?;
        let host_ids = user_namespace.as_ref().map(|userns| HostIds {
            base: userns.ids().host_base,
            count: userns.ids().count,
        });
        let spec = SandboxSpec {
            lower: mount.mountpoint().to_path_buf(),
            scratch: self.work_dir.join("run").join(&name),
            argv: argv.clone(),
            env,
            cwd: config.workdir.clone().unwrap_or_else(|| "/".into()),
            hostname: "lode-build".into(),
            max_open_files: 65536,
            limits: Limits {
                memory: Some(self.limits.memory),
                pids: Some(self.limits.pids),
                ..Limits::default()
            },
            timeout: Some(self.step_timeout),
            volumes: vec![build_env_volume],
            network,
            keep_upper: Some(layer.clone()),
            capabilities: BUILD_CAPABILITIES,
            user_namespace,
            ..SandboxSpec::default()
        };
        let cgroups = self.cgroups.clone();
        let log_events = events.clone();
        let ran =
            tokio::task::spawn_blocking(move || run_logged(&spec, cgroups.as_ref(), log_events))
                .await
                .map_err(|e| BuildError::Other(format!("the build container task failed: {e}")))?;
        let result = match ran {
            Ok((None, _)) => {
                let upper = layer.join("upper");
                lode_fs::ingest_layer(
                    index,
                    &upper,
                    &MOUNT_POINTS,
                    host_ids,
                    self.registry.clone(),
                    IngestOptions::default(),
                )
                .await
                .map_err(BuildError::from)
                .and_then(|report| {
                    report
                        .digest
                        .ok_or_else(|| BuildError::Other("the layer stored no index".into()))
                })
            }
            Ok((Some(reason), tail)) => Err(BuildError::StepFailed {
                number,
                description: step.describe(),
                command: argv.join(" "),
                reason,
                output: tail,
            }),
            Err(e) => Err(BuildError::Other(format!(
                "step {number} ({}): could not start the build container: {e}",
                step.describe()
            ))),
        };
        drop(layer_dir);
        result
    }

    /// Debian minbase with python3, pip and CA certificates for `release`: debootstrap once
    /// into the base dir, then ingest, cached by release.
    async fn debian_base(
        &self,
        release: &str,
        of: usize,
        events: &Events,
    ) -> Result<Digest, BuildError> {
        let key = blake3::hash(format!("lode debian_slim v1 {release}").as_bytes()).to_hex();
        let tag = format!("build-cache/{key}");
        let cached = self.cached(&tag).await?;
        events(BuildEvent::Step {
            number: 0,
            of,
            description: format!("debian_slim ({release})"),
            cached: cached.is_some(),
        });
        if let Some(digest) = cached {
            return Ok(digest);
        }
        let rootfs = self.base_dir.join(release);
        let base_dir = self.base_dir.clone();
        let release_name = release.to_string();
        let log_events = events.clone();
        // Held until the base is ingested, so no other build rewrites it meanwhile.
        let _lock = tokio::task::spawn_blocking(move || {
            let lock = lock_base(&base_dir, &release_name)?;
            if !base_dir.join(format!("{release_name}.done")).exists() {
                debootstrap(&base_dir, &release_name, log_events)?;
            }
            Ok::<_, BuildError>(lock)
        })
        .await
        .map_err(|e| BuildError::Other(format!("debootstrap task failed: {e}")))??;
        let report =
            lode_fs::ingest(&rootfs, self.registry.clone(), IngestOptions::default()).await?;
        let digest = report
            .digest
            .ok_or_else(|| BuildError::Other("the base stored no index".into()))?;
        self.registry
            .set_tag(&tag, &digest, TagUpdate::Always)
            .await?;
        Ok(digest)
    }
}

pub(crate) fn random_hex() -> String {
    let mut bytes = [0u8; 8];
    getrandom(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    if let Ok(mut urandom) = std::fs::File::open("/dev/urandom") {
        let _ = urandom.read_exact(buf);
    }
}

/// Quotes a word for `sh`.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Runs a build container, sending each output line as an event. Returns why it failed
/// (`None` when it exited 0) and the last lines of its output.
fn run_logged(
    spec: &SandboxSpec,
    cgroups: &dyn Hierarchy,
    events: Events,
) -> std::io::Result<(Option<String>, String)> {
    let mut sandbox = spawn(spec, cgroups, Stdio::piped(), Stdio::piped())?;
    let (stdout, stderr) = sandbox.take_output();
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
    let pump = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        let tail = tail.clone();
        let events = events.clone();
        std::thread::spawn(move || {
            let Some(pipe) = pipe else { return };
            crate::sandbox::for_each_line(pipe, |line| {
                let line = String::from_utf8_lossy(line).trim_end().to_string();
                {
                    let mut tail = tail.lock().expect("tail lock");
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line.clone());
                }
                events(BuildEvent::Log { line });
            });
        })
    };
    let out = pump(stdout.map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let err = pump(stderr.map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let finished = sandbox.finish()?;
    let _ = (out.join(), err.join());
    let tail = tail.lock().expect("tail lock");
    let output = tail.iter().cloned().collect::<Vec<_>>().join("\n");
    let reason = match (finished.killed_by(), finished.code()) {
        (Some(killed), _) => Some(killed),
        (None, 0) => None,
        (None, code) => Some(format!("exit code {code}")),
    };
    Ok((reason, output))
}

/// The Debian mirror the host's apt uses, or Debian's own.
fn debian_mirror() -> String {
    if let Ok(mirror) = std::env::var("LODE_DEBIAN_MIRROR") {
        return mirror;
    }
    let deb822 =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let from_deb822 = deb822
        .lines()
        .filter_map(|l| l.strip_prefix("URIs:"))
        .flat_map(str::split_whitespace)
        .find(|uri| uri.ends_with("/debian") || uri.ends_with("/debian/"));
    let legacy = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    let from_legacy = legacy
        .lines()
        .filter(|l| l.starts_with("deb "))
        .flat_map(|l| l.split_whitespace().nth(1))
        .find(|uri| uri.ends_with("/debian") || uri.ends_with("/debian/"));
    from_deb822
        .or(from_legacy)
        .unwrap_or("http://deb.debian.org/debian")
        .to_string()
}

/// Takes `<base_dir>/<release>.lock`, waiting for another build (or server) making the same
/// base.
fn lock_base(base_dir: &Path, release: &str) -> Result<std::fs::File, BuildError> {
    let fail = |e: std::io::Error| {
        BuildError::Other(format!(
            "locking the {release} base in {}: {e}",
            base_dir.display()
        ))
    };
    // The base holds real setuid-root files (su, mount): out of other users' reach.
    lode_fs::create_private_dir(base_dir).map_err(fail)?;
    let file = std::fs::File::create(base_dir.join(format!("{release}.lock"))).map_err(fail)?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| fail(e.into()))?;
    Ok(file)
}

/// Runs debootstrap into `<base_dir>/<release>`, prunes what images do not need, and marks
/// it done.
fn debootstrap(base_dir: &Path, release: &str, events: Events) -> Result<(), BuildError> {
    let target = base_dir.join(format!("{release}.partial"));
    // A debootstrap that was killed can leave /proc or /sys mounted inside its target;
    // deleting through those would reach the host's.
    unmount_under(&target);
    let _ = std::fs::remove_dir_all(&target);
    std::fs::create_dir_all(base_dir)
        .map_err(|e| BuildError::Other(format!("creating {}: {e}", base_dir.display())))?;
    let mirror = debian_mirror();
    let argv = [
        "debootstrap".to_string(),
        "--variant=minbase".into(),
        "--include=python3,python3-pip,ca-certificates".into(),
        release.into(),
        target.display().to_string(),
        mirror,
    ];
    events(BuildEvent::Log {
        line: argv.join(" "),
    });
    let mut child = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            BuildError::Other(format!(
                "debian_slim needs debootstrap on the host ({e}): apt-get install debootstrap"
            ))
        })?;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let err_tail = tail.clone();
    let stderr = child.stderr.take();
    let err_thread = std::thread::spawn(move || {
        if let Some(pipe) = stderr {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut tail = err_tail.lock().expect("tail lock");
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
    });
    if let Some(pipe) = child.stdout.take() {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            events(BuildEvent::Log { line });
        }
    }
    let status = child
        .wait()
        .map_err(|e| BuildError::Other(format!("waiting for debootstrap: {e}")))?;
    let _ = err_thread.join();
    if !status.success() {
        let mut output = tail
            .lock()
            .expect("tail lock")
            .iter()
            .cloned()
            .collect::<Vec<_>>();
        if let Ok(log) = std::fs::read_to_string(target.join("debootstrap/debootstrap.log")) {
            output.extend(
                log.lines()
                    .rev()
                    .take(TAIL_LINES)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .map(String::from),
            );
        }
        return Err(BuildError::StepFailed {
            number: 0,
            description: format!("debian_slim ({release})"),
            command: argv.join(" "),
            reason: format!("debootstrap exited with {status}"),
            output: output.join("\n"),
        });
    }
    prune(&target).map_err(|e| BuildError::Other(format!("pruning the base: {e}")))?;
    let rootfs = base_dir.join(release);
    let _ = std::fs::remove_dir_all(&rootfs);
    std::fs::rename(&target, &rootfs)
        .and_then(|()| std::fs::write(base_dir.join(format!("{release}.done")), b""))
        .map_err(|e| BuildError::Other(format!("keeping the base: {e}")))
}

/// Detaches every mount at or below `dir`, deepest first.
fn unmount_under(dir: &Path) {
    for mount in lode_fs::mounts_under(dir) {
        let _ = rustix::mount::unmount(&mount.point, rustix::mount::UnmountFlags::DETACH);
    }
}

/// Removes package lists and caches, docs and locales, and the host's resolver and name.
fn prune(root: &Path) -> std::io::Result<()> {
    for dir in [
        "var/lib/apt/lists",
        "var/cache/apt",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/locale",
    ] {
        let dir = root.join(dir);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else if entry.file_name() != "lock" {
                std::fs::remove_file(&path)?;
            }
        }
    }
    std::fs::write(root.join("etc/resolv.conf"), b"")?;
    std::fs::write(root.join("etc/hostname"), b"lode\n")?;
    let config = ImageConfig {
        env: vec![
            ("PATH".into(), DEFAULT_PATH.into()),
            ("LANG".into(), "C.UTF-8".into()),
        ],
        ..ImageConfig::default()
    };
    let path = root.join(CONFIG_PATH);
    std::fs::create_dir_all(path.parent().expect("config has a parent"))?;
    std::fs::write(
        path,
        serde_json::to_vec_pretty(&config).expect("config serializes"),
    )
}

/// Reads an image's [`ImageConfig`]; an image without one gets the defaults.
pub async fn read_config(
    index: &lode_fs::Index,
    registry: &dyn BlobAccess,
) -> Result<ImageConfig, BuildError> {
    let Some(entry) = index.resolve(CONFIG_PATH) else {
        return Ok(ImageConfig::default());
    };
    let bytes = match entry.content() {
        Some(lode_fs::Content::Inline(bytes)) => bytes.to_vec(),
        Some(lode_fs::Content::Chunks(chunks)) => {
            let mut bytes = Vec::new();
            for chunk in chunks {
                bytes.extend_from_slice(&registry.get_blob(&chunk.digest()).await?);
            }
            bytes
        }
        None => return Ok(ImageConfig::default()),
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| BuildError::Other(format!("the image's /{CONFIG_PATH} is not valid: {e}")))
}

/// A directory made by a step: root-owned, 0755, at the epoch, so builds are repeatable.
fn new_dir(name: &[u8]) -> Node {
    Node {
        name: name.to_vec(),
        meta: Meta {
            mode: 0o755,
            ..Meta::default()
        },
        xattrs: Vec::new(),
        body: Body::Dir(Vec::new()),
    }
}

/// The directory at `path` in `tree`, made (with its parents) where missing. A component
/// that is something else, a symlink included, is an error: the step names a real path.
fn dir_at<'a>(tree: &'a mut Node, path: &str) -> Result<&'a mut Vec<Node>, BuildError> {
    let mut node = tree;
    let mut walked = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        walked.push('/');
        walked.push_str(part);
        let Body::Dir(children) = &mut node.body else {
            unreachable!("only directories are walked into")
        };
        let at = match children.iter().position(|c| c.name == part.as_bytes()) {
            Some(at) => at,
            None => {
                children.push(new_dir(part.as_bytes()));
                children.len() - 1
            }
        };
        node = &mut children[at];
        if !matches!(node.body, Body::Dir(_)) {
            return Err(BuildError::Spec(format!(
                "{walked} is not a directory in the image (a symlink or file); name the real path"
            )));
        }
    }
    let Body::Dir(children) = &mut node.body else {
        unreachable!("checked above")
    };
    Ok(children)
}

fn ensure_dir(tree: &mut Node, path: &str) -> Result<(), BuildError> {
    dir_at(tree, path).map(|_| ())
}

/// Puts `node` at `path`, replacing what was there.
fn place(tree: &mut Node, path: &str, mut node: Node) -> Result<(), BuildError> {
    let path = path.trim_end_matches('/');
    let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
    node.name = name.as_bytes().to_vec();
    let children = dir_at(tree, parent)?;
    children.retain(|c| c.name != node.name);
    children.push(node);
    Ok(())
}

fn write_config(tree: &mut Node, config: &ImageConfig) -> Result<(), BuildError> {
    let bytes = serde_json::to_vec_pretty(config).expect("config serializes");
    let node = Node {
        name: Vec::new(),
        meta: Meta {
            mode: 0o644,
            ..Meta::default()
        },
        xattrs: Vec::new(),
        body: Body::File {
            content: FileContent::Inline(bytes),
            link_group: None,
        },
    };
    place(tree, &format!("/{CONFIG_PATH}"), node)
}
