//! The Wasm engine: wasmtime `Engine`s with the pooling allocator (one per wasm stack size and
//! fuel metering in use), a compiled-component cache on disk, and pre-instantiated components.
//!
//! Compiling is the slow part (tens of ms to seconds), so it happens once per component digest
//! and engine build: the `.cwasm` lands in `<cache-dir>/compiled/` and later loads mmap it.
//! Instantiation is the hot part: every request gets a fresh `Store` and instance from a
//! `ProxyPre`, with copy-on-write memory images from the pool.

use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use lode_registry::Digest;
use wasmtime::UpdateDeadline;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::wasm::function_cache::{FunctionCache, count_functions};
use crate::wasm::guest::GuestState;

/// How often the epoch advances; the granularity of request timeouts and of yields that keep
/// a busy guest from starving others on its thread.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Packages whose 0.2 interfaces the linker provides.
const PROVIDED_PACKAGES: &[&str] = &[
    "wasi:cli",
    "wasi:io",
    "wasi:clocks",
    "wasi:random",
    "wasi:filesystem",
    "wasi:sockets",
    "wasi:http",
    "lode:function",
    "lode:gpu",
];

/// The wasm stack a guest gets unless `lode serve --max-wasm-stack` says otherwise; deeper
/// recursion traps as a stack overflow.
pub const DEFAULT_WASM_STACK: usize = 512 << 10;

/// Stack room for the host functions a guest calls, beside its wasm stack.
const HOST_STACK: usize = 1536 << 10;

/// Distinct engine kinds (wasm stack size, fuel metering) one server runs at once.
const MAX_ENGINE_KINDS: usize = 4;

/// Core instances (and tables) one component may hold in the pool.
const CORE_INSTANCES_PER_COMPONENT: u32 = 16;

/// Engine settings chosen at `lode serve` start.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// `<cache-dir>/compiled`.
    pub compiled_dir: PathBuf,
    /// Instances (hence concurrent requests) the pool holds at once.
    pub max_instances: u32,
    /// The largest linear memory any instance may have, in bytes.
    pub max_memory: u64,
    /// The wasm stack guests get by default, and the most an app may ask for, in bytes.
    pub wasm_stack: usize,
    /// How long a compiled component or snapshot note no recorded app uses stays cached.
    pub compiled_ttl: Duration,
}

/// How far one compile has got: set when it begins, read while it runs.
#[derive(Debug, Default)]
pub struct CompileProgress {
    /// Functions the component defines.
    total: AtomicU64,
    /// The engine's lookup count when it began.
    start: AtomicU64,
}

impl CompileProgress {
    fn begin(&self, total: u64, start: u64) {
        self.start.store(start, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }
}

/// Whether a component came from the compiler or the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadKind {
    /// Compiled now.
    Compiled,
    /// Deserialized from `<cache-dir>/compiled/`.
    Cached,
}

/// Why a deploy's component was refused. The message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    /// A core module, not a component.
    #[error(
        "this is a core Wasm module, not a component; build a component for wasm32-wasip2 \
         (`cargo build --target wasm32-wasip2` with the `wasip2` crate)"
    )]
    CoreModule,
    /// Not Wasm at all.
    #[error("not a WebAssembly component: the file does not start with the Wasm magic bytes")]
    NotWasm,
    /// Wasm that wasmtime could not compile.
    #[error("invalid component: {0:#}")]
    Invalid(anyhow::Error),
    /// Imports nothing in Lode provides.
    #[error(
        "the component imports {} that Lode does not provide (it provides wasi:cli, wasi:io, \
         wasi:clocks, wasi:random, wasi:filesystem, wasi:sockets and wasi:http at 0.2.x, and \
         lode:function@0.1.0 and lode:gpu@0.1.0)",
        .0.join(", ")
    )]
    UnknownImports(Vec<String>),
    /// Imports that do not link (versions or types differ).
    #[error("the component's imports do not link: {0:#}")]
    Link(anyhow::Error),
    /// Not a `wasi:http/proxy` component.
    #[error(
        "the component does not export wasi:http/incoming-handler@0.2.x, so it cannot serve \
         HTTP; build it with `wasip2::http::proxy::export!` (or any wasi:http/proxy toolchain): \
         {0:#}"
    )]
    NotHttp(anyhow::Error),
    /// Does not export `lode:function/handler`, and has no web route either.
    #[error(
        "the component takes no calls: it does not export lode:function/handler (write it with \
         the samples/lode-guest crate), and it has no `web` route: {0:#}"
    )]
    NotFunction(anyhow::Error),
    /// Its `pre_init` call failed, or its state could not be snapshotted.
    #[error(
        "pre-initialization failed (pre_init = true runs the function's init at deploy with no \
         config, secrets, files or network, within the function's timeout; remove pre_init, fix \
         the init, or raise the timeout if it needs longer): {0:#}"
    )]
    PreInit(anyhow::Error),
}

/// Checks the header: Wasm magic, then the layer field that tells modules from components.
pub fn check_component_header(bytes: &[u8]) -> Result<(), ComponentError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(ComponentError::NotWasm);
    }
    // Bytes 4..6 are the version, 6..8 the layer: 0 for core modules, 1 for components.
    match (bytes[6], bytes[7]) {
        (0, 0) => Err(ComponentError::CoreModule),
        (1, 0) => Ok(()),
        _ => Err(ComponentError::NotWasm),
    }
}

/// The digest hex a compiled-cache file is named by (`<hex>-….cwasm`, `<hex>-….preinit`);
/// `None` for anything else, which pruning leaves alone.
fn cache_file_digest(path: &Path) -> Option<&str> {
    let extension = path.extension()?;
    if extension != "cwasm" && extension != "preinit" {
        return None;
    }
    let (hex, _) = path.file_name()?.to_str()?.split_once('-')?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

/// Whether the running kernel has the `PAGEMAP_SCAN` ioctl (Linux 6.7).
fn kernel_has_pagemap_scan() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 7)
}

/// What wasmtime fixes per engine and apps may choose: the wasm stack, and whether calls are
/// metered with fuel (which compiles different code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct EngineKind {
    stack: usize,
    fuel: bool,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} KiB", self.stack >> 10)?;
        if self.fuel {
            f.write_str(" with fuel")?;
        }
        Ok(())
    }
}

/// Engines for apps that asked for a smaller stack or for fuel, by kind. Each lives while a
/// deployed function (or a call still running on one) holds it.
type OtherEngines = Arc<Mutex<BTreeMap<EngineKind, Weak<EngineClass>>>>;

/// Advances every live engine's epoch each [`EPOCH_TICK`] until dropped.
pub(crate) struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    /// Ticks `engine` alone.
    pub(crate) fn for_engine(engine: Engine) -> Self {
        Self::start(engine, OtherEngines::default())
    }

    fn start(default: Engine, others: OtherEngines) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("lode-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    default.increment_epoch();
                    for class in others.lock().unwrap().values() {
                        if let Some(class) = class.upgrade() {
                            class.engine.increment_epoch();
                        }
                    }
                }
            })
            .expect("spawning the epoch thread");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The Wasm engine: one wasmtime engine per wasm stack size and fuel metering in use, because
/// wasmtime sets both per engine. Apps that name neither `wasm_stack_kib` nor `fuel` share the
/// default one.
pub struct WasmEngine {
    settings: EngineSettings,
    /// Cranelift's results per function, shared by every engine kind.
    functions: Arc<FunctionCache>,
    default: Arc<EngineClass>,
    others: OtherEngines,
    _ticker: EpochTicker,
}

impl WasmEngine {
    /// Builds the default engine and starts the epoch ticker.
    pub fn new(settings: &EngineSettings) -> Result<Self> {
        let kind = EngineKind {
            stack: settings.wasm_stack,
            fuel: false,
        };
        std::fs::create_dir_all(&settings.compiled_dir).with_context(|| {
            format!(
                "creating cache directory {}",
                settings.compiled_dir.display()
            )
        })?;
        // One file for every engine kind: redb holds it open exclusively.
        let functions = Arc::new(FunctionCache::open(
            &settings.compiled_dir.join("functions.redb"),
        ));
        let default = Arc::new(EngineClass::new(
            settings,
            kind,
            settings.max_instances,
            functions.clone(),
        )?);
        let others = OtherEngines::default();
        Ok(Self {
            settings: settings.clone(),
            functions,
            _ticker: EpochTicker::start(default.engine.clone(), others.clone()),
            default,
            others,
        })
    }

    /// Removes compiled components and pre-init notes of digests outside `in_use` (by hex)
    /// that have not been used for the cache's TTL, and returns how many files went. The
    /// snapshots that `in_use` components' notes name are kept with them, and everything kept
    /// is marked used now, so the TTL counts from when the last app let go of it. Blocking.
    ///
    /// A deploy still in progress is not in `in_use`; what it compiled is younger than any
    /// sensible TTL, and if pruned anyway its loaded component keeps working and a restart
    /// compiles it again.
    pub fn prune_compiled(&self, in_use: &HashSet<String>) -> std::io::Result<usize> {
        let dir = &self.settings.compiled_dir;
        let mut keep = in_use.clone();
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(hex) = cache_file_digest(&path) else {
                continue;
            };
            if in_use.contains(hex) && path.extension() == Some("preinit".as_ref()) {
                let noted = std::fs::read_to_string(&path).unwrap_or_default();
                if let Ok(snapshot) = noted.trim().parse::<Digest>() {
                    keep.insert(snapshot.hex());
                }
            }
            files.push(path);
        }
        let now = std::time::SystemTime::now();
        let mut removed = 0;
        for path in files {
            if cache_file_digest(&path).is_some_and(|hex| keep.contains(hex)) {
                crate::util::mark_used(&path);
                continue;
            }
            let unused_for = std::fs::metadata(&path)
                .and_then(|meta| meta.modified())
                .map(|modified| now.duration_since(modified).unwrap_or_default());
            if unused_for.is_ok_and(|age| age >= self.settings.compiled_ttl)
                && std::fs::remove_file(&path).is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The engine apps get when they name no stack size and no fuel.
    pub fn default_class(&self) -> &Arc<EngineClass> {
        &self.default
    }

    /// Whether an app's `wasm_stack_kib` (and fuel metering, if `metered`) can be served,
    /// without making its engine; the error says what to do.
    pub fn check(&self, stack_kib: Option<u32>, metered: bool) -> Result<(), String> {
        self.lookup(stack_kib, metered, false).map(drop)
    }

    /// The engine for an app's `wasm_stack_kib` and fuel metering, made on first use. A stack
    /// above the server's, or one engine kind too many, is refused with what to do.
    pub fn class(&self, stack_kib: Option<u32>, metered: bool) -> Result<Arc<EngineClass>, String> {
        self.lookup(stack_kib, metered, true)
            .map(|class| class.expect("made when asked to"))
    }

    fn lookup(
        &self,
        stack_kib: Option<u32>,
        metered: bool,
        make: bool,
    ) -> Result<Option<Arc<EngineClass>>, String> {
        let max = self.settings.wasm_stack;
        let stack = stack_kib.map_or(max, |kib| kib as usize * 1024);
        let kind = EngineKind {
            stack,
            fuel: metered,
        };
        if kind == self.default.kind {
            return Ok(Some(self.default.clone()));
        }
        if stack > max {
            return Err(format!(
                "limits: wasm_stack_kib {} is above this server's {} KiB \
                 (lode serve --max-wasm-stack)",
                stack >> 10,
                max >> 10
            ));
        }
        let mut others = self.others.lock().unwrap();
        others.retain(|_, class| class.strong_count() > 0);
        if let Some(class) = others.get(&kind).and_then(Weak::upgrade) {
            return Ok(Some(class));
        }
        if others.len() + 1 >= MAX_ENGINE_KINDS {
            let kinds: Vec<String> = std::iter::once(self.default.kind)
                .chain(others.keys().copied())
                .map(|kind| kind.to_string())
                .collect();
            return Err(format!(
                "limits: this server already runs {MAX_ENGINE_KINDS} engine kinds (wasm stack, \
                 fuel) for the apps deployed: {}; pick the stack and fuel metering of one of \
                 them, or leave wasm_stack_kib and fuel out",
                kinds.join(", ")
            ));
        }
        if !make {
            return Ok(None);
        }
        let slots = (self.settings.max_instances / 4).max(8);
        let class = Arc::new(
            EngineClass::new(&self.settings, kind, slots, self.functions.clone())
                .map_err(|e| format!("{e:#}"))?,
        );
        others.insert(kind, Arc::downgrade(&class));
        Ok(Some(class))
    }
}

/// One wasmtime engine with the pooling allocator, its linker, and its part of the compiled
/// cache. Every component it runs gets the same wasm stack, and is metered with fuel or not.
pub struct EngineClass {
    engine: Engine,
    /// Cranelift's results per function, shared by every compile on this engine.
    functions: Arc<FunctionCache>,
    linker: Linker<GuestState>,
    compiled_dir: PathBuf,
    fingerprint: String,
    kind: EngineKind,
}

/// A pool for `slots` component instances at once, each with up to `max_memory` bytes.
/// One wasip2 component instance holds several core instances (the program plus adapter
/// shims) and tables, but usually one memory; the pools are sized so that `slots` runs
/// really can happen at once.
pub(crate) fn component_pool(slots: u32, max_memory: u64) -> PoolingAllocationConfig {
    let n = slots;
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
        .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
        .total_memories(n.saturating_mul(2))
        .max_memories_per_component(2)
        .total_tables(n.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
        .max_tables_per_component(CORE_INSTANCES_PER_COMPONENT)
        .total_stacks(n)
        .max_memory_size(usize::try_from(max_memory).unwrap_or(usize::MAX))
        .table_keep_resident(64 << 10);
    pool
}

/// Memory a slot keeps resident between instances, reset by copying back only the pages the
/// last instance dirtied.
const KEEP_RESIDENT: usize = 8 << 20;

/// How a slot's memory is reset for its next instance. `madvise` costs a syscall, a TLB
/// flush on every core (an IPI each) and a copy-on-write fault per page the next instance
/// writes. With PAGEMAP_SCAN (Linux >= 6.7) only the pages an instance dirtied are found and
/// copied back from the image, up to [`KEEP_RESIDENT`], so a slot's working set stays mapped;
/// without it, wasmtime would memset the whole resident range every time, so keep it small.
/// (Our copy of wasmtime finishes the scan past its 32-region buffer: third_party/README.md.)
pub(crate) fn reset_in_place(pool: &mut PoolingAllocationConfig) {
    if kernel_has_pagemap_scan() {
        pool.pagemap_scan(wasmtime::Enabled::Auto)
            .linear_memory_keep_resident(KEEP_RESIDENT);
    } else {
        pool.linear_memory_keep_resident(64 << 10);
    }
}

impl EngineClass {
    /// Builds an engine of `kind`, with `slots` instances in its pool, compiling through
    /// `functions`.
    fn new(
        settings: &EngineSettings,
        kind: EngineKind,
        slots: u32,
        functions: Arc<FunctionCache>,
    ) -> Result<Self> {
        let stack = kind.stack;
        let mut pool = component_pool(slots, settings.max_memory);
        reset_in_place(&mut pool);
        let mut config = Config::new();
        config
            .enable_incremental_compilation(functions.clone())
            .map_err(anyhow::Error::from)?;
        config
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .epoch_interruption(true)
            // Fuel counts the work a call does, the same on every run, where a wall-clock
            // deadline depends on the machine; it costs some speed, so only apps that ask pay.
            .consume_fuel(kind.fuel)
            .memory_init_cow(true)
            .max_wasm_stack(stack)
            // The fiber a call runs on holds the wasm stack plus the host calls made from it.
            .async_stack_size(stack + HOST_STACK)
            .wasm_backtrace_max_frames(std::num::NonZeroUsize::new(64));
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .context("creating the wasmtime engine")?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(anyhow::Error::from)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)?;
        crate::wasm::bindings::Function::add_to_linker::<_, wasmtime::component::HasSelf<_>>(
            &mut linker,
            |state: &mut GuestState| state,
        )
        .map_err(anyhow::Error::from)?;
        lode_wasi_gpu::host::add_to_linker(&mut linker, GuestState::gpu_view)
            .map_err(anyhow::Error::from)?;

        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let fingerprint = format!("{:016x}", hasher.finish());

        Ok(Self {
            engine,
            functions,
            linker,
            compiled_dir: settings.compiled_dir.clone(),
            fingerprint,
            kind,
        })
    }

    /// The wasm stack its guests get, in bytes.
    pub fn stack(&self) -> usize {
        self.kind.stack
    }

    /// Whether calls on it are metered with fuel.
    pub fn metered(&self) -> bool {
        self.kind.fuel
    }

    /// A store for one request on this engine (the one its component was prepared on), with
    /// its memory limit and a wall-clock deadline enforced through epoch interruption.
    /// Between ticks a running guest yields, so one busy request cannot starve the others on
    /// its thread. On a metered engine it gets `fuel` (`None`: as good as unmetered, for work
    /// the deadline alone bounds, such as a pre-init).
    pub fn new_store(
        &self,
        state: GuestState,
        deadline: Instant,
        fuel: Option<u64>,
    ) -> Store<GuestState> {
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        self.arm(&mut store, deadline, fuel);
        store
    }

    /// Gives `store` a new run's fuel and deadline: for a new store, and for a kept instance
    /// before each request it serves.
    pub fn arm(&self, store: &mut Store<GuestState>, deadline: Instant, fuel: Option<u64>) {
        if self.kind.fuel {
            store
                .set_fuel(fuel.unwrap_or(u64::MAX))
                .expect("the engine consumes fuel");
        }
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
    }

    /// Where the digest of `digest`'s pre-initialized snapshot is noted, for an instance of
    /// `memory` bytes on this engine's stack: the snapshot's memory starts as large as the
    /// init left it, so it belongs to those limits (and to this Wizer's snapshot format).
    pub fn preinit_path(&self, digest: &Digest, memory: u64) -> PathBuf {
        self.compiled_dir.join(format!(
            "{}-m{}-s{}-wizer48.preinit",
            digest.hex(),
            memory >> 20,
            self.kind.stack >> 10
        ))
    }

    /// Where the compiled form of `digest` is cached.
    pub fn cache_path(&self, digest: &Digest) -> PathBuf {
        self.compiled_dir
            .join(format!("{}-{}.cwasm", digest.hex(), self.fingerprint))
    }

    /// Loads a component from the compiled cache if present; otherwise compiles `source()`
    /// and caches it, counting its functions into `progress` as they are compiled.
    /// Blocking: run it off the async threads.
    pub fn load(
        &self,
        digest: &Digest,
        source: impl FnOnce() -> Result<Vec<u8>>,
        progress: &CompileProgress,
    ) -> Result<(Component, LoadKind), ComponentError> {
        let path = self.cache_path(digest);
        if path.exists() {
            match self.deserialize(&path) {
                Ok(component) => {
                    crate::util::mark_used(&path);
                    return Ok((component, LoadKind::Cached));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "compiled cache entry unusable; recompiling");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let bytes = source().map_err(ComponentError::Invalid)?;
        check_component_header(&bytes)?;
        progress.begin(count_functions(&bytes), self.functions.looked_up());
        let compiled = self.engine.precompile_component(&bytes);
        self.functions.flush();
        let compiled = compiled.map_err(|e| ComponentError::Invalid(anyhow!(e)))?;
        crate::util::write_atomic(&path, &compiled, 0o644)
            .with_context(|| format!("writing compiled cache {}", path.display()))
            .map_err(ComponentError::Invalid)?;
        let component = self.deserialize(&path).map_err(ComponentError::Invalid)?;
        Ok((component, LoadKind::Compiled))
    }

    fn deserialize(&self, path: &Path) -> Result<Component> {
        // SAFETY: the file is one a Lode engine wrote into Lode's own cache directory (temp
        // file, fsync, rename), named by the component digest and the fingerprint of engines
        // that can load it (fuel metering is part of it; the stack size is not, as it does not
        // change the code), and wasmtime checks its header and compatibility before use. The
        // cache dir must be writable only by Lode, as documented for `--cache-dir`.
        unsafe { Component::deserialize_file(&self.engine, path) }
            .map_err(|e| anyhow!(e))
            .with_context(|| format!("loading compiled component {}", path.display()))
    }

    /// Functions of `progress`'s compile done so far, and its total; `None` before the
    /// compile began (or when the component came from the cache).
    pub fn compiled_so_far(&self, progress: &CompileProgress) -> Option<(u64, u64)> {
        let total = progress.total.load(Ordering::Relaxed);
        if total == 0 {
            return None;
        }
        let start = progress.start.load(Ordering::Relaxed);
        // Other compiles on this engine at the same time count too; never claim the end
        // before it came.
        let done = self.functions.looked_up().saturating_sub(start);
        Some((done.min(total.saturating_sub(1)), total))
    }

    /// Links a component as a `wasi:http/proxy`, naming whatever is missing.
    pub fn prepare_proxy(
        &self,
        component: &Component,
    ) -> Result<ProxyPre<GuestState>, ComponentError> {
        let instance_pre = self.link(component)?;
        ProxyPre::new(instance_pre).map_err(|e| ComponentError::NotHttp(anyhow!(e)))
    }

    /// Links a component that exports `lode:function/handler`, naming whatever is missing.
    pub fn prepare_function(
        &self,
        component: &Component,
    ) -> Result<crate::wasm::bindings::FunctionPre<GuestState>, ComponentError> {
        let instance_pre = self.link(component)?;
        crate::wasm::bindings::FunctionPre::new(instance_pre)
            .map_err(|e| ComponentError::NotFunction(anyhow!(e)))
    }

    /// Compiles `bytes` in memory, without caching: for components used once (the
    /// instrumented copy that pre-initialization runs).
    pub fn compile(&self, bytes: &[u8]) -> Result<Component> {
        Component::new(&self.engine, bytes)
            .map_err(|e| anyhow!("{e:#}"))
            .context("compiling the component")
    }

    /// Links a component against everything Lode provides, naming what is missing.
    pub fn link(
        &self,
        component: &Component,
    ) -> Result<wasmtime::component::InstancePre<GuestState>, ComponentError> {
        let unknown: Vec<String> = component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name.to_string())
            .filter(|name| {
                let package = name.split('/').next().unwrap_or(name);
                !PROVIDED_PACKAGES.contains(&package)
            })
            .collect();
        if !unknown.is_empty() {
            return Err(ComponentError::UnknownImports(unknown));
        }
        self.linker
            .instantiate_pre(component)
            .map_err(|e| ComponentError::Link(anyhow!(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small engine caching in `dir`, pruning what went unused for an hour.
    fn test_engine(dir: &Path) -> WasmEngine {
        WasmEngine::new(&EngineSettings {
            compiled_dir: dir.to_path_buf(),
            max_instances: 8,
            max_memory: 16 << 20,
            wasm_stack: DEFAULT_WASM_STACK,
            compiled_ttl: Duration::from_secs(3600),
        })
        .unwrap()
    }

    #[test]
    fn engines_per_kind_are_bounded_and_freed_with_their_apps() {
        let dir = tempfile::tempdir().unwrap();
        let engine = test_engine(dir.path());
        assert!(Arc::ptr_eq(
            &engine.class(None, false).unwrap(),
            engine.default_class()
        ));
        assert!(Arc::ptr_eq(
            &engine.class(Some(512), false).unwrap(),
            engine.default_class()
        ));
        let err = engine.check(Some(1024), false).unwrap_err();
        assert!(err.contains("above this server's 512 KiB"), "{err}");

        let small = engine.class(Some(64), false).unwrap();
        assert_eq!((small.stack(), small.metered()), (64 << 10, false));
        assert!(Arc::ptr_eq(&engine.class(Some(64), false).unwrap(), &small));
        // Fuel metering is a kind of its own, at the default stack too.
        let metered = engine.class(None, true).unwrap();
        assert_eq!((metered.stack(), metered.metered()), (512 << 10, true));
        assert!(!Arc::ptr_eq(&metered, engine.default_class()));
        let held = [small, metered, engine.class(Some(128), false).unwrap()];
        // Checking makes nothing, and a fourth kind beside the default is refused by name.
        let err = engine.check(Some(192), false).unwrap_err();
        assert!(
            err.contains(": 512 KiB, 64 KiB, 128 KiB, 512 KiB with fuel;"),
            "{err}"
        );
        assert!(engine.class(Some(64), true).is_err());
        // Once no app holds a kind, its engine goes and another fits.
        drop(held);
        engine.check(Some(192), true).unwrap();
        let class = engine.class(Some(192), true).unwrap();
        assert_eq!((class.stack(), class.metered()), (192 << 10, true));
    }

    #[test]
    fn pruning_keeps_what_apps_use_and_what_was_used_lately() {
        let dir = tempfile::tempdir().unwrap();
        let engine = test_engine(dir.path());
        let hex = |byte: &str| byte.repeat(32);
        let (used, snapshot, stale, recent) = (hex("aa"), hex("bb"), hex("cc"), hex("dd"));
        let file = |name: String, text: &str, age: Duration| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let file = std::fs::File::open(&path).unwrap();
            file.set_modified(std::time::SystemTime::now() - age)
                .unwrap();
        };
        let day = Duration::from_secs(86_400);
        file(format!("{used}-f1.cwasm"), "", day);
        file(
            format!("{used}-m64-s512-wizer48.preinit"),
            &format!("blake3:{snapshot}\n"),
            day,
        );
        file(format!("{snapshot}-f1.cwasm"), "", day);
        file(format!("{stale}-f1.cwasm"), "", day);
        file(format!("{stale}-m64-s512-wizer48.preinit"), "", day);
        file(format!("{recent}-f1.cwasm"), "", Duration::ZERO);
        file("notes.txt".into(), "", day);

        let in_use = HashSet::from([used.clone()]);
        assert_eq!(engine.prune_compiled(&in_use).unwrap(), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                format!("{used}-f1.cwasm"),
                format!("{used}-m64-s512-wizer48.preinit"),
                format!("{snapshot}-f1.cwasm"),
                format!("{recent}-f1.cwasm"),
                "functions.redb".into(),
                "notes.txt".into(),
            ]
        );
        // What an app holds counts as used now: once let go, it gets the whole TTL.
        let held_since = std::fs::metadata(dir.path().join(format!("{snapshot}-f1.cwasm")))
            .unwrap()
            .modified()
            .unwrap();
        assert!(held_since.elapsed().unwrap_or_default() < Duration::from_secs(3600));
        assert_eq!(
            engine.prune_compiled(&HashSet::new()).unwrap(),
            0,
            "just let go of"
        );
    }

    /// A slot's memory after an instance that dirtied thousands of scattered pages, past the
    /// scan's region buffer and past the resident budget, reads as the pristine image to the
    /// next instance in that slot: nothing one request wrote reaches the next.
    #[test]
    fn a_reused_slot_starts_from_the_pristine_image() {
        const PAGE: usize = 4096;
        const MEMORY: usize = 32 << 20;
        const IMAGE: usize = 256 << 10;
        let mut pool = component_pool(1, MEMORY as u64);
        reset_in_place(&mut pool);
        let mut config = Config::new();
        config
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_init_cow(true);
        let engine = Engine::new(&config).unwrap();
        let wat = format!(
            r#"(module
                (memory (export "memory") {pages})
                (data (i32.const 0) "{image}")
                (func (export "scribble") (param $from i32) (param $stride i32) (param $end i32)
                  (loop $next
                    (i32.store (local.get $from) (i32.const 0x5ec2e75))
                    (local.set $from (i32.add (local.get $from) (local.get $stride)))
                    (br_if $next (i32.lt_u (local.get $from) (local.get $end))))))"#,
            pages = MEMORY >> 16,
            image = "\\2a".repeat(IMAGE),
        );
        let module = wasmtime::Module::new(&engine, wat::parse_str(&wat).unwrap()).unwrap();
        let pristine = |byte: usize| if byte < IMAGE { 0x2a } else { 0 };
        // Every other page of the whole memory (4,096 runs, 16 MiB dirty), then every third
        // page of the first MiB, then one contiguous stretch across the image's end; the last
        // round only checks.
        let rounds = [
            (0, 2 * PAGE, MEMORY),
            (100, 3 * PAGE, 1 << 20),
            (IMAGE - 8 * PAGE, 4, IMAGE + 8 * PAGE),
            (0, 4, 4),
        ];
        for (round, (from, stride, end)) in rounds.into_iter().enumerate() {
            let mut store = Store::new(&engine, ());
            let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
            let memory = instance.get_memory(&mut store, "memory").unwrap();
            let stale = memory
                .data(&store)
                .iter()
                .enumerate()
                .position(|(at, &byte)| byte != pristine(at));
            assert_eq!(stale, None, "round {round}: a byte the last instance wrote");
            instance
                .get_typed_func::<(i32, i32, i32), ()>(&mut store, "scribble")
                .unwrap()
                .call(&mut store, (from as i32, stride as i32, end as i32))
                .unwrap();
            assert_eq!(
                memory.data(&store)[from..from + 4],
                0x5ec2e75_u32.to_le_bytes()
            );
        }
    }

    #[test]
    fn tells_modules_from_components() {
        let module = wat::parse_str("(module)").unwrap();
        assert!(matches!(
            check_component_header(&module),
            Err(ComponentError::CoreModule)
        ));
        let component = wat::parse_str("(component)").unwrap();
        assert!(check_component_header(&component).is_ok());
        assert!(matches!(
            check_component_header(b"#!/bin/sh\necho hi\n"),
            Err(ComponentError::NotWasm)
        ));
        assert!(matches!(
            check_component_header(b""),
            Err(ComponentError::NotWasm)
        ));
    }
}
