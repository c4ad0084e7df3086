//! The server's shared state and the deploy path: validate, compile (or load from cache),
//! record, then switch the app's live version atomically.

pub mod calls;
pub mod history;
pub mod schedule;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use lode_registry::{BlobStore, Digest};
use serde::Serialize;
use tokio::sync::mpsc;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::control::calls::Calls;
use crate::control::history::CallHistory;
use crate::proto::schedule::Schedule;
use crate::native::pool::{Pool, PoolContext, PoolSpec};
use crate::proto::manifest::{FunctionSpec, Manifest, Runtime};
use crate::store::secrets::Secrets;
use crate::store::state::{AppRecord, StateStore};
use crate::telemetry::logs::{LogStore, Stream};
use crate::telemetry::metrics::Metrics;
use crate::wasm::engine::{ComponentError, EngineClass, GuestState, LoadKind, WasmEngine};
use crate::wasm::function::{CallLimits, WasmFunction};
use crate::wasm::outbound::OutboundPolicy;
use lode_native_runner::builder::BuildEvent;
use lode_native_runner::image_spec::ImageSpec;
use std::path::PathBuf;

const MIB: u64 = 1024 * 1024;

/// The base URLs of a server's public listeners, for what it prints and tells clients.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Urls {
    /// Public HTTP, e.g. `http://127.0.0.1:8080`.
    pub http: String,
    /// The embedded registry, e.g. `http://127.0.0.1:7071`.
    pub registry: String,
}

/// Server-wide limits and defaults, from `lode serve` flags.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Memory per instance when the manifest names none, in bytes.
    pub default_memory: u64,
    /// The most memory a manifest may ask for, in bytes.
    pub max_memory: u64,
    /// Request timeout when the manifest names none.
    pub default_timeout: Duration,
    /// Largest request body the public listener accepts, in bytes.
    pub max_body: u64,
}

/// A Wasm function that serves public HTTP.
pub struct HttpFunction {
    /// Owning app.
    pub app: Arc<str>,
    /// Function name.
    pub name: String,
    /// Path prefix within the app.
    pub path: String,
    /// Pre-linked component.
    pub pre: ProxyPre<GuestState>,
    /// The engine it was prepared on (kept ticking while this lives).
    pub engine: Arc<EngineClass>,
    /// Wall-clock limit per request.
    pub timeout: Duration,
    /// Fuel per request on a metered engine (`[limits] fuel`).
    pub fuel: Option<u64>,
    /// Memory limit per instance, in bytes.
    pub memory: u64,
    /// Outbound HTTP rules.
    pub outbound: OutboundPolicy,
    /// Metric series this function's requests update.
    pub series: crate::telemetry::metrics::AppSeries,
}

/// One deployed version of an app, ready to serve.
pub struct LiveApp {
    /// What was recorded.
    pub record: AppRecord,
    /// HTTP functions, longest path first.
    pub routes: Vec<Arc<HttpFunction>>,
    /// Python functions' container pools, by function name.
    pub pools: HashMap<String, Arc<Pool>>,
    /// Wasm functions that take calls by name (`lode:function`), by function name.
    pub wasm_functions: HashMap<String, Arc<WasmFunction>>,
    /// Python web endpoints, longest path first.
    pub python_routes: Vec<PythonRoute>,
    /// Scheduled Python functions, parsed once at deploy.
    pub schedules: Vec<(String, Schedule)>,
    /// A digest of the secret values its functions were given: a redeploy after a secret
    /// changed restarts the pools even when the manifest is the same.
    pub secrets_digest: String,
}

/// A Python function that answers public HTTP: the JSON body is its one argument.
#[derive(Debug, Clone)]
pub struct PythonRoute {
    /// Path within the app.
    pub path: String,
    /// Allowed method; `None` allows any.
    pub method: Option<String>,
    /// The function.
    pub function: String,
}

/// What a deploy made ready: Wasm routes and Python pools.
#[derive(Default)]
struct Built {
    routes: Vec<Arc<HttpFunction>>,
    pools: HashMap<String, Arc<Pool>>,
    wasm_functions: HashMap<String, Arc<WasmFunction>>,
    python_routes: Vec<PythonRoute>,
    schedules: Vec<(String, Schedule)>,
}

impl Built {
    fn into_live(mut self, record: AppRecord, secrets_digest: String) -> LiveApp {
        LiveApp {
            record,
            routes: std::mem::take(&mut self.routes),
            pools: std::mem::take(&mut self.pools),
            wasm_functions: std::mem::take(&mut self.wasm_functions),
            python_routes: std::mem::take(&mut self.python_routes),
            schedules: std::mem::take(&mut self.schedules),
            secrets_digest,
        }
    }
}

impl Drop for Built {
    /// A deploy that failed after some pools started: they stop (their minimum too).
    fn drop(&mut self) {
        for pool in self.pools.values() {
            pool.close();
        }
    }
}

impl Drop for LiveApp {
    /// A version that is replaced or removed takes no more inputs; its containers stop
    /// once they finish what they hold.
    fn drop(&mut self) {
        for pool in self.pools.values() {
            pool.close();
        }
    }
}

/// What Python functions need beside the Wasm engine.
pub struct Functions {
    /// Shared by every pool.
    pub pools: Arc<PoolContext>,
    /// Secrets, for their environments.
    pub secrets: Arc<Secrets>,
    /// Named volumes, one directory each.
    pub volumes_dir: PathBuf,
    /// Users' module files, by source digest.
    pub apps_dir: PathBuf,
}

/// A Python function's timeout when it names none.
pub const PYTHON_DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// A Python function's `max_containers` when it names none.
pub const PYTHON_DEFAULT_MAX_CONTAINERS: u32 = 10;
/// A Python function's `scaledown_window` when it names none.
pub const PYTHON_DEFAULT_SCALEDOWN: Duration = Duration::from_secs(60);

impl LiveApp {
    /// The Python web endpoint for `path`: the longest path prefix at a segment boundary.
    pub fn python_route(&self, path: &str) -> Option<&PythonRoute> {
        self.python_routes
            .iter()
            .find(|r| prefix_matches(&r.path, path))
    }

    /// The function whose web path is the longest prefix of `path` at a segment boundary.
    pub fn route(&self, path: &str) -> Option<&Arc<HttpFunction>> {
        self.routes.iter().find(|f| prefix_matches(&f.path, path))
    }
}

fn prefix_matches(route: &str, path: &str) -> bool {
    let prefix = route.trim_end_matches('/');
    prefix.is_empty()
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Awaits `job`, sending a progress event for `function` every half second meanwhile, so a
/// client streaming the deploy (and any proxy in between) sees it alive through a long
/// compile or init.
async fn with_heartbeat<T>(
    mut job: tokio::task::JoinHandle<T>,
    function: &str,
    started: Instant,
    progress: Option<&mpsc::Sender<DeployEvent>>,
) -> Result<T, tokio::task::JoinError> {
    let mut heartbeat = tokio::time::interval(Duration::from_millis(500));
    heartbeat.tick().await;
    loop {
        tokio::select! {
            result = &mut job => return result,
            _ = heartbeat.tick() => {
                if let Some(tx) = progress {
                    let _ = tx.send(DeployEvent::Progress {
                        function: function.to_string(),
                        elapsed_ms: started.elapsed().as_millis() as u64,
                    }).await;
                }
            }
        }
    }
}

/// Progress of a deploy, streamed to the CLI as NDJSON.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum DeployEvent {
    /// Compilation of a function's component started.
    Compiling {
        /// Function name.
        function: String,
        /// Component size.
        bytes: u64,
    },
    /// Still compiling or pre-initializing, sent every half second.
    Progress {
        /// Function name.
        function: String,
        /// Time since that step started.
        elapsed_ms: u64,
    },
    /// A function's `pre_init` step started: its init runs now, unless an earlier deploy's
    /// snapshot of the same component is found.
    PreInitializing {
        /// Function name.
        function: String,
    },
    /// A function's init ran and its instance was snapshotted.
    PreInitialized {
        /// Function name.
        function: String,
        /// The snapshot's size.
        bytes: u64,
        /// Time taken (0 when an earlier deploy's snapshot was reused).
        ms: u64,
    },
    /// A component is ready.
    Compiled {
        /// Function name.
        function: String,
        /// Whether it came from the compiled cache.
        cached: bool,
        /// Time taken.
        ms: u64,
    },
    /// The same manifest is already live; nothing changed.
    Unchanged {
        /// App name.
        app: String,
        /// Live version.
        version: u64,
        /// Public URLs.
        urls: Vec<String>,
    },
    /// The new version is live.
    Deployed {
        /// App name.
        app: String,
        /// New version.
        version: u64,
        /// Public URLs.
        urls: Vec<String>,
    },
    /// A line of a Python function's image build.
    Image {
        /// Function name.
        function: String,
        /// What the builder said.
        line: String,
    },
    /// The deploy failed; the old version (if any) still serves.
    Error {
        /// What went wrong and what to do.
        message: String,
    },
}

/// A deploy refused before anything changed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The manifest is invalid.
    #[error("invalid manifest:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
    /// Blobs the manifest names were not uploaded.
    #[error("blobs not uploaded: {}; push them to the registry first (`lode deploy` does)", .0.join(", "))]
    MissingBlobs(Vec<String>),
    /// Something no engine on this host can run.
    #[error("{0}")]
    Unsupported(String),
    /// A component was refused.
    #[error("function {function:?}: {source}")]
    Component {
        /// Function name.
        function: String,
        /// Why.
        source: ComponentError,
    },
    /// Storage failed.
    #[error("{0:#}")]
    Internal(anyhow::Error),
}

/// Everything the API and the public listener share.
pub struct Server {
    /// Wasm engine.
    pub engine: WasmEngine,
    /// Blob store.
    pub blobs: Arc<dyn BlobStore>,
    /// Durable state.
    pub state: Arc<dyn StateStore>,
    /// Logs.
    pub logs: Arc<LogStore>,
    /// Metrics.
    pub metrics: Metrics,
    /// Limits.
    pub limits: Limits,
    /// Lode's own listeners, unreachable from guests.
    pub protected: Arc<Vec<SocketAddr>>,
    /// Where clients reach this server's listeners.
    pub urls: Urls,
    /// Python functions' side.
    pub functions: Functions,
    /// Spawned calls.
    pub calls: Calls,
    /// Every call's summary.
    pub history: CallHistory,
    apps: ArcSwap<HashMap<String, Arc<LiveApp>>>,
    /// Serializes the record-and-swap step of deploys and removals (not compilation).
    commit_lock: tokio::sync::Mutex<()>,
}

impl Server {
    /// Assembles a server; call [`Server::restore`] before serving.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: WasmEngine,
        blobs: Arc<dyn BlobStore>,
        state: Arc<dyn StateStore>,
        logs: Arc<LogStore>,
        limits: Limits,
        protected: Vec<SocketAddr>,
        urls: Urls,
        functions: Functions,
    ) -> Arc<Self> {
        let calls = Calls::persistent(state.clone());
        let metrics = Metrics::default();
        let history = CallHistory::start(state.clone(), metrics.call_records_dropped.clone());
        let server = Arc::new(Self {
            engine,
            blobs,
            state,
            logs,
            metrics,
            history,
            limits,
            protected: Arc::new(protected),
            urls,
            functions,
            calls,
            apps: ArcSwap::from_pointee(HashMap::new()),
            commit_lock: tokio::sync::Mutex::new(()),
        });
        let _ = server.functions.pools.server.set(Arc::downgrade(&server));
        server
    }

    /// The live version of `app`.
    pub fn app(&self, app: &str) -> Option<Arc<LiveApp>> {
        self.apps.load().get(app).cloned()
    }

    /// Every live app, sorted by name.
    pub fn apps(&self) -> Vec<Arc<LiveApp>> {
        let mut apps: Vec<_> = self.apps.load().values().cloned().collect();
        apps.sort_by(|a, b| a.record.manifest.app.cmp(&b.record.manifest.app));
        apps
    }

    /// Public URLs of an app's web functions.
    pub fn urls(&self, manifest: &Manifest) -> Vec<String> {
        manifest
            .functions
            .iter()
            .filter_map(|f| f.web.as_ref())
            .map(|web| format!("{}/{}{}", self.urls.http, manifest.app, web.path))
            .collect()
    }

    /// Makes `live` the version new requests see; requests in flight keep theirs.
    fn publish(&self, app: &str, live: Arc<LiveApp>) {
        self.apps.rcu(|apps| {
            let mut apps = HashMap::clone(apps);
            apps.insert(app.to_string(), live.clone());
            apps
        });
    }

    /// Loads every recorded app, from the compiled cache where possible. An app that cannot
    /// be loaded is logged and skipped; its record stays so a fix (or redeploy) can recover it.
    pub async fn restore(self: &Arc<Self>) -> anyhow::Result<usize> {
        let records = self.state.list_apps()?;
        let mut loaded = 0;
        for record in records {
            let app = record.manifest.app.clone();
            let built = match self.secrets_digest(&record.manifest) {
                Ok(digest) => self
                    .build_live(&record.manifest, None)
                    .await
                    .map(|built| (built, digest)),
                Err(e) => Err(e),
            };
            match built {
                Ok((built, digest)) => {
                    let live = Arc::new(built.into_live(record, digest));
                    self.publish(&app, live);
                    loaded += 1;
                }
                Err(e) => {
                    tracing::error!(app, error = %e, "could not restore app; redeploy it");
                    self.logs
                        .push(&app, None, Stream::System, format!("restore failed: {e}"));
                }
            }
        }
        Ok(loaded)
    }

    /// Checks what can be checked without compiling; on success the deploy may start
    /// streaming progress.
    pub fn precheck(&self, manifest: &Manifest) -> Result<(), DeployError> {
        manifest.validate().map_err(DeployError::Invalid)?;
        if manifest
            .functions
            .iter()
            .any(|f| f.runtime == Runtime::Wasm)
        {
            self.engine
                .check(
                    manifest.limits.wasm_stack_kib,
                    manifest.limits.fuel.is_some(),
                )
                .map_err(DeployError::Unsupported)?;
        }
        let mut missing = Vec::new();
        for function in &manifest.functions {
            self.check_engine_fits(function)?;
            let source = function.python.as_ref().map(|p| &p.source);
            for digest in function.component.iter().chain(source) {
                let digest: Digest = digest
                    .parse()
                    .map_err(|e: lode_registry::Error| DeployError::Invalid(vec![e.to_string()]))?;
                if !self
                    .blobs
                    .has(&digest)
                    .map_err(|e| DeployError::Internal(e.into()))?
                {
                    missing.push(digest.to_string());
                }
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(DeployError::MissingBlobs(missing))
        }
    }

    fn check_engine_fits(&self, function: &FunctionSpec) -> Result<(), DeployError> {
        let name = &function.name;
        if let Some(gpu) = &function.resources.gpu {
            let inventory = lode_wasi_gpu::inventory::inventory();
            let fits = lode_wasi_gpu::inventory::satisfies(&inventory, gpu)
                .map_err(|why| DeployError::Invalid(vec![format!("function {name:?}: {why}")]))?;
            if !fits {
                return Err(DeployError::Unsupported(format!(
                    "function {name:?}: gpu {gpu:?} was requested, but this host has {}; \
                     remove `gpu` to run on the CPU, or deploy to a host with that GPU",
                    lode_wasi_gpu::inventory::describe(&inventory)
                )));
            }
            return Err(DeployError::Unsupported(format!(
                "function {name:?}: this host has the gpu {gpu:?} asks for, but attaching GPUs \
                 to functions (lode:gpu for Wasm, device nodes for containers) is not built \
                 yet; remove `gpu`"
            )));
        }
        if function.runtime == Runtime::Python {
            if let Err(why) = self.functions.pools.native.hierarchy() {
                return Err(DeployError::Unsupported(format!(
                    "function {name:?}: Python functions run in containers, and {why}"
                )));
            }
            let problems = self
                .functions
                .pools
                .native
                .bounds()
                .check_function(&function.resources);
            if !problems.is_empty() {
                return Err(DeployError::Invalid(
                    problems
                        .into_iter()
                        .map(|p| format!("function {name:?}: {p}"))
                        .collect(),
                ));
            }
            return Ok(());
        }
        // Addresses a Wasm guest names in a refused range must lie inside what the operator
        // opened, as a container's grants must.
        let named: Vec<_> = function
            .network
            .allow
            .iter()
            .filter_map(|entry| {
                crate::proto::host_pattern::HostPattern::parse(entry)
                    .ok()?
                    .range()
            })
            .collect();
        self.functions
            .pools
            .native
            .bounds()
            .check_allowed(&named)
            .map_err(|why| {
                DeployError::Invalid(vec![format!("function {name:?}: network.allow: {why}")])
            })?;
        if let Some(mib) = function.resources.memory
            && mib.saturating_mul(MIB) > self.limits.max_memory
        {
            return Err(DeployError::Unsupported(format!(
                "function {name:?}: memory {mib} MiB is above this server's limit of {} MiB \
                 (lode serve --max-memory)",
                self.limits.max_memory / MIB
            )));
        }
        Ok(())
    }

    /// Compiles or loads each function and links it; sends progress when asked to.
    async fn build_live(
        self: &Arc<Self>,
        manifest: &Manifest,
        progress: Option<&mpsc::Sender<DeployEvent>>,
    ) -> Result<Built, DeployError> {
        let app: Arc<str> = Arc::from(manifest.app.as_str());
        let mut built = Built::default();
        let has_wasm = manifest
            .functions
            .iter()
            .any(|f| f.runtime == Runtime::Wasm);
        let class = if has_wasm {
            self.engine
                .class(
                    manifest.limits.wasm_stack_kib,
                    manifest.limits.fuel.is_some(),
                )
                .map_err(DeployError::Unsupported)?
        } else {
            self.engine.default_class().clone()
        };
        let mut images = HashMap::new();
        for function in manifest
            .functions
            .iter()
            .filter(|f| f.runtime == Runtime::Python)
        {
            let pool = self
                .build_python(
                    &app,
                    CallLimits::of(&manifest.limits),
                    function,
                    progress,
                    &mut images,
                )
                .await?;
            if let Some(web) = &function.web {
                built.python_routes.push(PythonRoute {
                    path: web.path.clone(),
                    method: web.method.clone(),
                    function: function.name.clone(),
                });
            }
            if let Some(schedule) = function
                .parsed_schedule()
                .map_err(|why| DeployError::Invalid(vec![why]))?
            {
                built.schedules.push((function.name.clone(), schedule));
            }
            built.pools.insert(function.name.clone(), pool);
        }
        built
            .python_routes
            .sort_by_key(|r| std::cmp::Reverse(r.path.trim_end_matches('/').len()));
        for function in &manifest.functions {
            let Some(digest) = &function.component else {
                continue;
            };
            let mut digest: Digest = digest
                .parse()
                .map_err(|e: lode_registry::Error| DeployError::Invalid(vec![e.to_string()]))?;
            let refused = |source| DeployError::Component {
                function: function.name.clone(),
                source,
            };
            let memory = function
                .resources
                .memory
                .map(|mib| mib * MIB)
                .unwrap_or(self.limits.default_memory);
            if function.pre_init {
                digest = self
                    .pre_initialize(&class, &app, function, &digest, memory, progress)
                    .await?;
            }
            let component = self
                .load_component(&class, &app, &function.name, &digest, progress)
                .await?;
            // A component exporting lode:function takes calls by name; one that serves HTTP
            // needs a route. Either is enough, both are fine.
            match class.prepare_function(&component) {
                Ok(pre) => {
                    let mut preopens = Vec::new();
                    for volume in &function.volumes {
                        let dir = self.volume_dir(function, volume)?;
                        preopens.push((dir, volume.path.clone(), volume.read_only));
                    }
                    let mut config = manifest.config.clone();
                    for secret in &function.secrets {
                        config.extend(self.secret_of(function, secret)?);
                    }
                    built.wasm_functions.insert(
                        function.name.clone(),
                        Arc::new(WasmFunction {
                            app: app.clone(),
                            name: function.name.clone(),
                            pre,
                            timeout: function.timeout_or(self.limits.default_timeout),
                            fuel: manifest.limits.fuel,
                            memory,
                            outbound: OutboundPolicy::new(
                                &function.network.allow,
                                self.protected.clone(),
                            ),
                            config: Arc::new(config),
                            preopens,
                            limits: CallLimits::of(&manifest.limits),
                            engine: class.clone(),
                            series: self.metrics.function_series(&app, &function.name, "wasm"),
                        }),
                    );
                }
                Err(e) if function.web.is_none() => return Err(refused(e)),
                Err(_) => {}
            }
            let Some(web) = &function.web else {
                continue;
            };
            let pre = class.prepare_proxy(&component).map_err(refused)?;
            built.routes.push(Arc::new(HttpFunction {
                app: app.clone(),
                name: function.name.clone(),
                path: web.path.clone(),
                pre,
                engine: class.clone(),
                timeout: function.timeout_or(self.limits.default_timeout),
                fuel: manifest.limits.fuel,
                memory,
                outbound: OutboundPolicy::new(&function.network.allow, self.protected.clone()),
                series: self.metrics.app_series(&app),
            }));
        }
        built
            .routes
            .sort_by_key(|f| std::cmp::Reverse(f.path.trim_end_matches('/').len()));
        Ok(built)
    }

    /// The directory of a volume `function` mounts, made when it may be.
    fn volume_dir(
        &self,
        function: &FunctionSpec,
        volume: &crate::proto::manifest::VolumeMount,
    ) -> Result<PathBuf, DeployError> {
        crate::store::volumes::open(
            &self.functions.volumes_dir,
            &volume.name,
            volume.create_if_missing,
            self.functions.pools.native.container_root(),
        )
        .map_err(|e| DeployError::Invalid(vec![format!("function {:?}: {e}", function.name)]))
    }

    /// The variables of a secret `function` declares; a missing one fails the deploy by name.
    fn secret_of(
        &self,
        function: &FunctionSpec,
        secret: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, DeployError> {
        self.functions
            .secrets
            .get(secret)
            .map_err(DeployError::Internal)?
            .ok_or_else(|| {
                DeployError::Invalid(vec![format!(
                    "function {:?}: secret {secret:?} does not exist; create it with \
                     `lode secret create {secret} NAME=VALUE`",
                    function.name
                )])
            })
    }

    /// A digest of the values of every secret the app's functions name (missing ones too),
    /// so a changed secret is a change to deploy.
    fn secrets_digest(&self, manifest: &Manifest) -> Result<String, DeployError> {
        let names: std::collections::BTreeSet<&String> =
            manifest.functions.iter().flat_map(|f| &f.secrets).collect();
        let mut hasher = blake3::Hasher::new();
        for name in names {
            let values = self
                .functions
                .secrets
                .get(name)
                .map_err(DeployError::Internal)?;
            let bytes = serde_json::to_vec(&values).map_err(|e| DeployError::Internal(e.into()))?;
            hasher.update(name.as_bytes());
            hasher.update(&[0]);
            hasher.update(&bytes);
            hasher.update(&[0]);
        }
        Ok(hasher.finalize().to_hex().to_string())
    }

    /// Builds (or finds in the step cache) a Python function's image, writes its module,
    /// gathers its secrets and volumes, and starts its pool.
    async fn build_python(
        &self,
        app: &Arc<str>,
        call_limits: CallLimits,
        function: &FunctionSpec,
        progress: Option<&mpsc::Sender<DeployEvent>>,
        images: &mut HashMap<String, Digest>,
    ) -> Result<Arc<Pool>, DeployError> {
        let name = &function.name;
        let python = function
            .python
            .as_ref()
            .ok_or_else(|| DeployError::Invalid(vec![format!("function {name:?}: no python")]))?;
        let invalid = |why: String| DeployError::Invalid(vec![format!("function {name:?}: {why}")]);
        let spec: ImageSpec = if python.image.is_null() {
            ImageSpec {
                base: lode_native_runner::image_spec::Base::DebianSlim {
                    python_version: None,
                },
                steps: Vec::new(),
            }
        } else {
            serde_json::from_value(python.image.clone())
                .map_err(|e| invalid(format!("image spec: {e}")))?
        };
        spec.validate()
            .map_err(|e| invalid(format!("image: {e}")))?;
        let key = serde_json::to_string(&spec).expect("serializes");
        let image = match images.get(&key) {
            Some(digest) => digest.clone(),
            None => {
                let events: lode_native_runner::builder::Events = match progress {
                    Some(tx) => {
                        let tx = tx.clone();
                        let function = name.clone();
                        Arc::new(move |event: BuildEvent| {
                            if let Some(line) = event.line() {
                                let event = DeployEvent::Image {
                                    function: function.clone(),
                                    line,
                                };
                                crate::native::send_build_line(&tx, event);
                            }
                        })
                    }
                    None => Arc::new(|_| {}),
                };
                let digest = self
                    .functions
                    .pools
                    .native
                    .build_image(&spec, events)
                    .await
                    .map_err(|e| invalid(format!("building its image: {e}")))?;
                images.insert(key, digest.clone());
                digest
            }
        };
        let (mount, config) = self
            .functions
            .pools
            .native
            .open_image(&image)
            .await
            .map_err(|e| DeployError::Internal(anyhow::anyhow!("opening image {image}: {e}")))?;
        let source: Digest = python
            .source
            .parse()
            .map_err(|e: lode_registry::Error| invalid(e.to_string()))?;
        let bytes = self
            .blobs
            .get(&source)
            .map_err(|e| DeployError::Internal(e.into()))?;
        let app_dir = lode_native_runner::agent::app_dir(
            &self.functions.apps_dir,
            &source.hex(),
            &python.module,
            &bytes,
        )
        .map_err(|e| DeployError::Internal(anyhow::anyhow!("writing the module: {e}")))?;

        let mut env = vec![(
            "PATH".to_string(),
            lode_native_runner::builder::DEFAULT_PATH.to_string(),
        )];
        for (key, value) in &config.env {
            lode_native_runner::image_spec::set_env(&mut env, key, value);
        }
        let mut secret_values = Vec::new();
        for secret in &function.secrets {
            for (key, value) in self.secret_of(function, secret)? {
                secret_values.push(value.clone());
                lode_native_runner::image_spec::set_env(&mut env, &key, &value);
            }
        }
        let mut volumes = Vec::new();
        for volume in &function.volumes {
            let dir = self.volume_dir(function, volume)?;
            let opened =
                lode_native_runner::sandbox::Volume::open(dir, &volume.path, volume.read_only)
                    .map_err(|e| {
                        DeployError::Invalid(vec![format!("function {:?}: {e}", function.name)])
                    })?;
            volumes.push(opened);
        }
        let r = &function.resources;
        let spec = PoolSpec {
            app: app.clone(),
            function: name.clone(),
            mount,
            module: python.module.clone(),
            app_dir,
            concurrency: r.concurrency.unwrap_or(1),
            min_containers: r.min_containers.unwrap_or(0),
            max_containers: r
                .max_containers
                .unwrap_or(PYTHON_DEFAULT_MAX_CONTAINERS)
                .max(1),
            scaledown_window: r
                .scaledown_window
                .map(Duration::from_secs_f64)
                .unwrap_or(PYTHON_DEFAULT_SCALEDOWN),
            timeout: function.timeout_or(PYTHON_DEFAULT_TIMEOUT),
            limits: self.functions.pools.native.bounds().function_limits(r),
            retries: function.retries,
            env,
            secret_values,
            volumes,
            network: match function.network.mode {
                crate::proto::manifest::NetworkMode::None => {
                    lode_native_runner::sandbox::Network::None
                }
                crate::proto::manifest::NetworkMode::Outbound => self
                    .functions
                    .pools
                    .native
                    .outbound(&function.network.allow)
                    .await
                    .map_err(|e| DeployError::Invalid(vec![format!("function {name:?}: {e}")]))?,
            },
            workdir: config.workdir.clone().unwrap_or_else(|| "/".into()),
            call_limits,
            series: self.metrics.function_series(app, name, "python"),
        };
        Ok(Pool::start(spec, self.functions.pools.clone()))
    }

    /// The digest of `function`'s pre-initialized component: its init run on `class` and
    /// the instance snapshotted (Wizer), kept as a blob and noted beside the compiled cache,
    /// so a redeploy or restart with the same memory and stack reuses it.
    async fn pre_initialize(
        self: &Arc<Self>,
        class: &Arc<EngineClass>,
        app: &Arc<str>,
        function: &FunctionSpec,
        digest: &Digest,
        memory: u64,
        progress: Option<&mpsc::Sender<DeployEvent>>,
    ) -> Result<Digest, DeployError> {
        let started = Instant::now();
        let wasi = self
            .logs
            .guest_wasi(app.clone(), Arc::from(format!("{}-init", function.name)))
            .build();
        let state = GuestState::new(
            wasi,
            memory,
            OutboundPolicy::new(&[], self.protected.clone()),
        );
        let timeout = function.timeout_or(self.limits.default_timeout);
        let (runtime, class, blobs) = (
            tokio::runtime::Handle::current(),
            class.clone(),
            self.blobs.clone(),
        );
        let note = class.preinit_path(digest, memory);
        let original = digest.clone();
        if let Some(tx) = progress {
            let _ = tx
                .send(DeployEvent::PreInitializing {
                    function: function.name.clone(),
                })
                .await;
        }
        // Files, blobs, compiling and the init all block: none of it runs on the async threads.
        let job = tokio::task::spawn_blocking(move || -> Result<(Digest, u64), ComponentError> {
            let internal = |e: anyhow::Error| ComponentError::Invalid(e);
            let noted = std::fs::read_to_string(&note)
                .ok()
                .and_then(|text| text.trim().parse::<Digest>().ok())
                .filter(|snapshot| blobs.has(snapshot).unwrap_or(false));
            let snapshot = match noted {
                Some(snapshot) => {
                    crate::util::mark_used(&note);
                    snapshot
                }
                None => {
                    let wasm = blobs.get(&original).map_err(|e| internal(e.into()))?;
                    let snapshotted = runtime
                        .block_on(crate::wasm::preinit::snapshot(
                            &class, &wasm, state, timeout,
                        ))
                        .map_err(ComponentError::PreInit)?;
                    let snapshot = blobs.put(&snapshotted).map_err(|e| internal(e.into()))?;
                    crate::util::write_atomic(&note, snapshot.to_string().as_bytes(), 0o644)
                        .map_err(|e| internal(e.into()))?;
                    snapshot
                }
            };
            let bytes = blobs.size(&snapshot).unwrap_or(0);
            Ok((snapshot, bytes))
        });
        let made = with_heartbeat(job, &function.name, started, progress)
            .await
            .map_err(|e| DeployError::Internal(anyhow::anyhow!("pre-init task failed: {e}")))?;
        let (snapshot, bytes) = made.map_err(|source| DeployError::Component {
            function: function.name.clone(),
            source,
        })?;
        if let Some(tx) = progress {
            let _ = tx
                .send(DeployEvent::PreInitialized {
                    function: function.name.clone(),
                    bytes,
                    ms: started.elapsed().as_millis() as u64,
                })
                .await;
        }
        Ok(snapshot)
    }

    async fn load_component(
        self: &Arc<Self>,
        class: &Arc<EngineClass>,
        app: &str,
        function: &str,
        digest: &Digest,
        progress: Option<&mpsc::Sender<DeployEvent>>,
    ) -> Result<wasmtime::component::Component, DeployError> {
        let started = Instant::now();
        let size = self.blobs.size(digest).unwrap_or(0);
        if let Some(tx) = progress {
            let _ = tx
                .send(DeployEvent::Compiling {
                    function: function.to_string(),
                    bytes: size,
                })
                .await;
        }
        let (class, blobs) = (class.clone(), self.blobs.clone());
        let blob = digest.clone();
        let job = tokio::task::spawn_blocking(move || {
            class.load(&blob, || blobs.get(&blob).map_err(anyhow::Error::from))
        });
        let (component, kind) = with_heartbeat(job, function, started, progress)
            .await
            .map_err(|e| DeployError::Internal(anyhow::anyhow!("compile task failed: {e}")))?
            .map_err(|source| DeployError::Component {
                function: function.to_string(),
                source,
            })?;
        let labels = Metrics::app(app);
        match kind {
            LoadKind::Compiled => self.metrics.compiles.get_or_create(&labels).inc(),
            LoadKind::Cached => self.metrics.cache_loads.get_or_create(&labels).inc(),
        };
        if let Some(tx) = progress {
            let _ = tx
                .send(DeployEvent::Compiled {
                    function: function.to_string(),
                    cached: kind == LoadKind::Cached,
                    ms: started.elapsed().as_millis() as u64,
                })
                .await;
        }
        Ok(component)
    }

    /// Deploys `manifest` (already prechecked), streaming progress; the final event says
    /// whether it went live. In-flight requests finish on the version they started with.
    pub async fn deploy(self: Arc<Self>, manifest: Manifest, progress: mpsc::Sender<DeployEvent>) {
        let app = manifest.app.clone();
        let event = match self.deploy_inner(manifest, &progress).await {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(app, error = %e, "deploy failed");
                DeployEvent::Error {
                    message: e.to_string(),
                }
            }
        };
        let _ = progress.send(event).await;
    }

    async fn deploy_inner(
        self: &Arc<Self>,
        manifest: Manifest,
        progress: &mpsc::Sender<DeployEvent>,
    ) -> Result<DeployEvent, DeployError> {
        let secrets_digest = self.secrets_digest(&manifest)?;
        if let Some(live) = self.app(&manifest.app)
            && live.record.manifest == manifest
            && live.secrets_digest == secrets_digest
        {
            return Ok(DeployEvent::Unchanged {
                urls: self.urls(&manifest),
                app: manifest.app,
                version: live.record.version,
            });
        }
        let built = self.build_live(&manifest, Some(progress)).await?;

        let _guard = self.commit_lock.lock().await;
        // The record outlives a live app that failed to restore; never reuse its numbers.
        let recorded = self
            .state
            .list_apps()
            .map_err(DeployError::Internal)?
            .into_iter()
            .find(|r| r.manifest.app == manifest.app)
            .map_or(0, |r| r.version);
        let live = self.app(&manifest.app).map_or(0, |a| a.record.version);
        let version = recorded.max(live) + 1;
        let record = AppRecord {
            manifest,
            version,
            deployed_at_ms: crate::util::now_ms(),
        };
        self.state.put_app(&record).map_err(DeployError::Internal)?;
        let app = record.manifest.app.clone();
        let urls = self.urls(&record.manifest);
        let live = Arc::new(built.into_live(record, secrets_digest));
        self.publish(&app, live);
        self.logs.push(
            &app,
            None,
            Stream::System,
            format!("deployed version {version}"),
        );
        tracing::info!(app, version, "deployed");
        tokio::spawn(self.clone().prune_compiled());
        Ok(DeployEvent::Deployed { app, version, urls })
    }

    /// Drops compiled components and snapshot notes that no recorded app has used for the
    /// cache's TTL (`lode serve --compiled-cache-ttl`). Apps that failed to restore keep
    /// theirs, since their records remain.
    pub async fn prune_compiled(self: Arc<Self>) {
        let pruned = tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
            let in_use = self
                .state
                .list_apps()?
                .iter()
                .flat_map(|record| &record.manifest.functions)
                .filter_map(|function| function.component.as_deref())
                .filter_map(|digest| digest.parse::<Digest>().ok())
                .map(|digest| digest.hex())
                .collect();
            Ok(self.engine.prune_compiled(&in_use)?)
        })
        .await;
        match pruned {
            Ok(Ok(0)) => {}
            Ok(Ok(removed)) => tracing::info!(removed, "pruned unused compiled components"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not prune the compiled cache"),
            Err(e) => tracing::warn!(error = %e, "the compiled cache prune task failed"),
        }
    }

    /// Stops every function container and waits (boundedly) until they are cleaned up, so a
    /// stopped server leaves no cgroups or processes and its image mounts can go.
    pub async fn shut_down(&self) {
        // Live versions' pools and those still draining after a redeploy.
        let pools = self.functions.pools.pools();
        let limit = Duration::from_secs(10);
        futures::future::join_all(pools.iter().map(|pool| pool.shut_down(limit))).await;
    }

    /// Removes an app; in-flight requests finish. Returns whether it existed.
    pub async fn remove(&self, app: &str) -> anyhow::Result<bool> {
        let _guard = self.commit_lock.lock().await;
        let existed = self.state.delete_app(app)?;
        let mut was_live = false;
        self.apps.rcu(|apps| {
            let mut apps = HashMap::clone(apps);
            was_live = apps.remove(app).is_some();
            apps
        });
        if existed || was_live {
            self.logs.remove(app);
            tracing::info!(app, "removed");
        }
        Ok(existed || was_live)
    }
}
