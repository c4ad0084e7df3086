//! The deploy path: check, compile (or load from the cache) and pre-initialize Wasm
//! components, start Python pools, record, then switch the app's live version atomically.
//! Restore runs the same build for every recorded app at start.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lode_registry::Digest;
use tokio::sync::mpsc;

use crate::control::{Control, LiveApp, PythonRoute};
use crate::function::CallLimits;
use crate::native::pool::Pool;
use crate::proto::deploy::DeployEvent;
use crate::proto::log::Stream;
use crate::proto::manifest::{FunctionSpec, Manifest, Runtime};
use crate::proto::schedule::Schedule;
use crate::store::state::AppRecord;
use crate::telemetry::metrics::Metrics;
use crate::wasm::engine::{CompileProgress, ComponentError, EngineClass, LoadKind};
use crate::wasm::function::WasmFunction;
use crate::wasm::gpu::FunctionGpu;
use crate::wasm::http::HttpFunction;
use crate::wasm::outbound::OutboundPolicy;
use crate::wasm::reuse::InstancePool;
use crate::wasm::store::{Preopen, WasmGuest};

const MIB: u64 = 1024 * 1024;

/// Awaits `job`, sending a progress event for `function` every half second meanwhile, so a
/// client streaming the deploy (and any proxy in between) sees it alive through a long
/// compile or init.
async fn with_heartbeat<T>(
    mut job: tokio::task::JoinHandle<T>,
    function: &str,
    started: Instant,
    progress: Option<&mpsc::Sender<DeployEvent>>,
    compiled: impl Fn() -> Option<(u64, u64)>,
) -> Result<T, tokio::task::JoinError> {
    let mut heartbeat = tokio::time::interval(Duration::from_millis(500));
    heartbeat.tick().await;
    loop {
        tokio::select! {
            result = &mut job => return result,
            _ = heartbeat.tick() => {
                if let Some(tx) = progress {
                    let so_far = compiled();
                    let _ = tx.send(DeployEvent::Progress {
                        function: function.to_string(),
                        elapsed_ms: started.elapsed().as_millis() as u64,
                        compiled: so_far.map(|(done, _)| done),
                        functions: so_far.map(|(_, total)| total),
                    }).await;
                }
            }
        }
    }
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

/// What a deploy made ready: Wasm routes and Python pools.
#[derive(Default)]
struct Built {
    routes: Vec<Arc<HttpFunction>>,
    pools: HashMap<String, Arc<Pool>>,
    wasm_functions: HashMap<String, Arc<WasmFunction>>,
    python_routes: Vec<PythonRoute>,
    schedules: Vec<(String, Schedule)>,
    images: HashMap<String, Digest>,
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
            images: std::mem::take(&mut self.images),
            variants: Default::default(),
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

impl Control {
    /// Builds a recorded app as it was deployed (no progress to report), with its secrets'
    /// digest.
    async fn load_record(
        self: &Arc<Self>,
        record: &AppRecord,
    ) -> Result<(Built, String), DeployError> {
        let digest = self.secrets_digest(&record.manifest)?;
        let built = self.build_live(&record.manifest, None).await?;
        Ok((built, digest))
    }

    /// Loads every recorded app, from the compiled cache where possible. An app that cannot
    /// be loaded is logged and skipped; its record stays so a fix (or redeploy) can recover it.
    pub async fn restore(self: &Arc<Self>) -> anyhow::Result<usize> {
        let records = self.state.list_apps()?;
        let mut loaded = 0;
        for record in records {
            let app = record.manifest.app.clone();
            match self.load_record(&record).await {
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

    /// Follows the apps other hosts deploy and remove in a shared state: at each change the
    /// store reports (PostgreSQL's notifications) and every `poll` besides, in case one was
    /// missed. Runs until the server is dropped.
    pub async fn follow(self: Arc<Self>, poll: Duration) {
        let changed = Arc::new(tokio::sync::Notify::new());
        let notify = changed.clone();
        self.state.watch_apps(Arc::new(move || notify.notify_one()));
        let control = Arc::downgrade(&self);
        drop(self);
        // Versions that failed to load here, so a poll does not try them again and again.
        let mut failed = HashMap::new();
        loop {
            tokio::select! {
                _ = changed.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
            let Some(control) = control.upgrade() else {
                return;
            };
            if let Err(e) = control.sync_apps(&mut failed).await {
                tracing::warn!(error = %e, "could not read the apps other hosts deployed");
            }
        }
    }

    /// Makes the apps live here what the shared state records: a newer version of an app is
    /// built and published, an app no longer recorded is taken down. `failed` holds the
    /// versions that could not be built here, which are not tried again.
    async fn sync_apps(self: &Arc<Self>, failed: &mut HashMap<String, u64>) -> anyhow::Result<()> {
        // A round trip to the database: off the async threads.
        let state = self.state.clone();
        let records = tokio::task::spawn_blocking(move || state.list_apps()).await??;
        let _guard = self.commit_lock.lock().await;
        for record in &records {
            let app = record.manifest.app.clone();
            let live = self.app(&app).map_or(0, |live| live.record.version);
            if live >= record.version || failed.get(&app) == Some(&record.version) {
                continue;
            }
            match self.load_record(record).await {
                Ok((built, digest)) => {
                    let version = record.version;
                    self.publish(&app, Arc::new(built.into_live(record.clone(), digest)));
                    failed.remove(&app);
                    self.logs.push(
                        &app,
                        None,
                        Stream::System,
                        format!("version {version}, deployed on another host, is live here"),
                    );
                    tracing::info!(app, version, "followed a deploy on another host");
                }
                Err(e) => {
                    failed.insert(app.clone(), record.version);
                    tracing::error!(app, error = %e, "could not load a version deployed on another host");
                    self.logs.push(
                        &app,
                        None,
                        Stream::System,
                        format!(
                            "version {} could not be loaded on this host: {e}",
                            record.version
                        ),
                    );
                }
            }
        }
        let recorded: std::collections::HashSet<&str> =
            records.iter().map(|r| r.manifest.app.as_str()).collect();
        let gone: Vec<String> = self
            .apps()
            .iter()
            .map(|live| live.record.manifest.app.clone())
            .filter(|app| !recorded.contains(app.as_str()))
            .collect();
        if !gone.is_empty() {
            self.apps.rcu(|apps| {
                let mut apps = HashMap::clone(apps);
                for app in &gone {
                    apps.remove(app);
                }
                apps
            });
            for app in &gone {
                self.logs.remove(app);
                tracing::info!(app, "removed on another host");
            }
        }
        Ok(())
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

    pub(super) fn check_engine_fits(&self, function: &FunctionSpec) -> Result<(), DeployError> {
        let name = &function.name;
        if let Some(gpu) = &function.resources.gpu {
            if function.runtime == Runtime::Wasm {
                // Its own check: one device, on this host, and something to drive it.
                self.functions
                    .wasm_gpus
                    .check(gpu)
                    .map_err(|why| DeployError::Unsupported(format!("function {name:?}: {why}")))?;
            } else {
                let gpus = &self.functions.pools.gpus;
                let fits = gpus.satisfies(gpu).map_err(|why| {
                    DeployError::Invalid(vec![format!("function {name:?}: {why}")])
                })?;
                if !fits {
                    return Err(DeployError::Unsupported(format!(
                        "function {name:?}: gpu {gpu:?} was requested, but this host has {}; \
                         remove `gpu` to run on the CPU, or deploy to a host with that GPU",
                        gpus.describe()
                    )));
                }
            }
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
            && mib.saturating_mul(MIB) > self.wasm_bounds.max_memory
        {
            return Err(DeployError::Unsupported(format!(
                "function {name:?}: memory {mib} MiB is above this server's limit of {} MiB \
                 (lode serve --max-memory)",
                self.wasm_bounds.max_memory / MIB
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
            for (class_method, web) in function.web_routes() {
                built.python_routes.push(PythonRoute {
                    path: web.path.clone(),
                    method: web.method.clone(),
                    function: function.name.clone(),
                    class_method: class_method.map(str::to_string),
                    serve: web.serve,
                    port: web.port,
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
        built.images = images;
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
                .unwrap_or(self.wasm_bounds.default_memory);
            if function.pre_init {
                digest = self
                    .pre_initialize(&class, &app, function, &digest, memory, progress)
                    .await?;
            }
            let component = self
                .load_component(&class, &app, &function.name, &digest, progress)
                .await?;
            // One per function, so its HTTP route and its calls by name share a device.
            let gpu = function.resources.gpu.as_ref().map(|request| {
                let labels = crate::telemetry::metrics::FunctionLabels {
                    app: app.to_string(),
                    function: function.name.clone(),
                    engine: "wasm",
                };
                FunctionGpu::new(
                    self.functions.wasm_gpus.clone(),
                    request.clone(),
                    function.gpu_memory.map(|mib| mib * MIB),
                    function.gpu_kernels,
                    self.metrics.gpus.get_or_create(&labels).clone(),
                )
            });
            let guest = || WasmGuest {
                app: app.clone(),
                name: function.name.clone(),
                engine: class.clone(),
                timeout: function.timeout_or(self.wasm_bounds.default_timeout),
                fuel: manifest.limits.fuel,
                memory,
                outbound: OutboundPolicy::new(&function.network.allow, self.protected.clone()),
                gpu: gpu.clone(),
            };
            // A component exporting lode:function takes calls by name; one that serves HTTP
            // needs a route. Either is enough, both are fine.
            match class.prepare_function(&component) {
                Ok(pre) => {
                    let mut preopens = Vec::new();
                    for volume in &function.volumes {
                        let dir = self.volume_dir(function, volume)?;
                        preopens.push(Preopen {
                            host: dir,
                            guest: volume.path.clone(),
                            read_only: volume.read_only,
                        });
                    }
                    let mut config = manifest.config.clone();
                    for secret in &function.secrets {
                        config.extend(self.secret_of(function, secret)?);
                    }
                    built.wasm_functions.insert(
                        function.name.clone(),
                        Arc::new(WasmFunction {
                            guest: guest(),
                            pre,
                            config: Arc::new(config),
                            preopens,
                            limits: CallLimits::of(&manifest.limits),
                            series: self.metrics.function_series(&app, &function.name, "wasm"),
                            retries: function.retries,
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
                guest: guest(),
                path: web.path.clone(),
                pre,
                series: self.metrics.app_series(&app),
                reuse: function.instance_reuse.map(|limit| {
                    // Enough idle instances for every core to find one; more would only hold
                    // pool slots and memory.
                    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
                    let pool = InstancePool::new(limit, cores * 2);
                    pool.sweep_idle();
                    pool
                }),
            }));
        }
        built
            .routes
            .sort_by_key(|f| std::cmp::Reverse(f.path.trim_end_matches('/').len()));
        Ok(built)
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
        // The init runs with no network, and unmetered: its deadline alone bounds it.
        let guest = WasmGuest {
            app: app.clone(),
            name: function.name.clone(),
            engine: class.clone(),
            timeout: function.timeout_or(self.wasm_bounds.default_timeout),
            fuel: None,
            memory,
            outbound: OutboundPolicy::new(&[], self.protected.clone()),
            // The init computes lode:gpu on the CPU: a snapshot cannot hold device memory.
            gpu: None,
        };
        let (runtime, blobs, logs) = (
            tokio::runtime::Handle::current(),
            self.blobs.clone(),
            self.logs.clone(),
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
                        .block_on(crate::wasm::preinit::snapshot(&guest, &logs, &wasm))
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
        let made = with_heartbeat(job, &function.name, started, progress, || None)
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
        let (job_class, blobs) = (class.clone(), self.blobs.clone());
        let blob = digest.clone();
        let compile = Arc::new(CompileProgress::default());
        let job_compile = compile.clone();
        let job = tokio::task::spawn_blocking(move || {
            job_class.load(
                &blob,
                || blobs.get(&blob).map_err(anyhow::Error::from),
                &job_compile,
            )
        });
        let so_far = || class.compiled_so_far(&compile);
        let (component, kind) = with_heartbeat(job, function, started, progress, so_far)
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
}
