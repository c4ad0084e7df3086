//! Wasm functions called by name: the `lode:function` world (`host/wit/lode-function`).
//!
//! A call gets a fresh instance from a pre-linked component, with the function's memory limit
//! and a wall-clock deadline (epochs), and runs `handler.call` on the JSON call payload. The
//! guest's imports go back through the one router: `invoke` and `spawn` reach any function,
//! Wasm or Python, with the call depth and the number of calls one top-level call may fan
//! out to bounded (per app, `[limits]`), so a component that calls itself forever is stopped
//! by name.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use lode_native_runner::agent::{ErrorInfo, Outcome};
use wasmtime::Trap;

use crate::control::Server;
use crate::telemetry::logs::Stream;
use crate::wasm::engine::GuestState;
use crate::wasm::outbound::OutboundPolicy;

/// The bindings `bindgen!` makes from the WIT (documented there).
#[allow(missing_docs)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "wit/lode-function",
        world: "function",
        imports: { default: async },
        exports: { default: async },
    });
}

use bindings::lode;
pub use bindings::{Function, FunctionPre};
use lode::function::types::Error as GuestError;

/// How deep calls through `invoke` may nest (a call from the API is depth 0), unless the
/// app's `[limits] call_depth` says otherwise.
pub const DEFAULT_CALL_DEPTH: u32 = 16;

/// How many calls one top-level call may make in all, nested ones included, unless the
/// app's `[limits] fan_out` says otherwise.
pub const DEFAULT_FAN_OUT: u32 = 100_000;

/// Where a call sits in the tree of calls that one call from outside led to.
#[derive(Clone)]
pub struct CallTree {
    /// 0 for the call from outside.
    depth: u32,
    /// The tightest `call_depth` of the apps on the way down.
    max_depth: u32,
    /// Calls made in the whole tree so far, and the root app's `fan_out`.
    made: Arc<AtomicU32>,
    max_made: u32,
    /// Made by a Wasm function (in-process), rather than from outside or a container.
    from_wasm: bool,
}

impl CallTree {
    /// 0 for the call from outside, one more for each call on the way down.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Whether a Wasm function made the call, in-process.
    pub fn from_wasm(&self) -> bool {
        self.from_wasm
    }

    /// Where a call to a function of an app with `limits` stands: at the root of a new tree
    /// when it came from outside (`None`), or where its caller put it, with this app's
    /// depth bound folded in.
    pub fn enter(tree: Option<CallTree>, limits: CallLimits) -> Self {
        match tree {
            Some(tree) => Self {
                max_depth: tree.max_depth.min(limits.call_depth),
                ..tree
            },
            None => Self {
                depth: 0,
                max_depth: limits.call_depth,
                made: Arc::default(),
                max_made: limits.fan_out,
                from_wasm: false,
            },
        }
    }

    /// Takes one more call, one level deeper, from a function (a Wasm one: `from_wasm`) whose
    /// app allows `fan_out` calls; returns the callee's place, or the named error when a
    /// bound is hit.
    pub fn admit(&self, fan_out: u32, from_wasm: bool) -> Result<CallTree, ErrorInfo> {
        if self.depth >= self.max_depth {
            return Err(ErrorInfo::lode(
                "call_depth",
                format!(
                    "calls nest more than {} deep (a function calling itself without end? \
                     `[limits] call_depth` sets the bound)",
                    self.max_depth
                ),
            ));
        }
        let max_made = self.max_made.min(fan_out);
        if self.made.fetch_add(1, Ordering::Relaxed) >= max_made {
            return Err(ErrorInfo::lode(
                "fan_out",
                format!(
                    "one call may lead to at most {max_made} calls in all (`[limits] fan_out` \
                     sets the bound)"
                ),
            ));
        }
        Ok(CallTree {
            depth: self.depth + 1,
            from_wasm,
            ..self.clone()
        })
    }
}

/// An app's bounds on the calls its functions make.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    /// How deep calls may nest.
    pub call_depth: u32,
    /// How many calls one call from outside may lead to.
    pub fan_out: u32,
}

impl CallLimits {
    /// The app's `[limits]`, with the defaults where it names none.
    pub fn of(limits: &crate::proto::manifest::AppLimits) -> Self {
        Self {
            call_depth: limits.call_depth.unwrap_or(DEFAULT_CALL_DEPTH),
            fan_out: limits.fan_out.unwrap_or(DEFAULT_FAN_OUT),
        }
    }
}

/// A deployed Wasm function that takes calls.
pub struct WasmFunction {
    /// Owning app.
    pub app: Arc<str>,
    /// Function name.
    pub name: String,
    /// The pre-linked component.
    pub pre: FunctionPre<GuestState>,
    /// Wall-clock limit per call.
    pub timeout: Duration,
    /// Fuel per call on a metered engine (`[limits] fuel`).
    pub fuel: Option<u64>,
    /// Memory limit per instance, in bytes.
    pub memory: u64,
    /// Outbound HTTP rules.
    pub outbound: OutboundPolicy,
    /// The app's config and the function's secrets, for `config.get`.
    pub config: Arc<BTreeMap<String, String>>,
    /// Volumes preopened for it: host directory, guest path, read-only. It sees no other
    /// files; `..` out of a preopen is refused (cap-std).
    pub preopens: Vec<(std::path::PathBuf, String, bool)>,
    /// Its app's bounds on nested calls.
    pub limits: CallLimits,
    /// The engine its component was prepared on; holding it keeps that engine's epochs
    /// ticking while the function or a call of it lives.
    pub engine: Arc<crate::wasm::engine::EngineClass>,
    /// Its call series in `/metrics`.
    pub series: crate::telemetry::metrics::FunctionSeries,
}

/// What a running call knows about where it is, for its imports.
pub struct CallContext {
    server: Weak<Server>,
    app: Arc<str>,
    /// This call's place in its tree, with this app's limits folded in.
    tree: CallTree,
    /// This app's `fan_out`, checked against the whole tree's count.
    fan_out: u32,
    config: Arc<BTreeMap<String, String>>,
}

fn guest_error(kind: &str, message: impl Into<String>) -> GuestError {
    GuestError {
        kind: kind.into(),
        message: message.into(),
    }
}

/// An outcome as the guest sees it: the result's JSON bytes, or the error.
fn to_guest(outcome: Outcome) -> Result<Vec<u8>, GuestError> {
    match outcome.error {
        Some(error) => Err(guest_error(&error.kind, error.message)),
        None => {
            let value = outcome.result.unwrap_or(serde_json::Value::Null);
            Ok(serde_json::to_vec(&value).expect("JSON values encode"))
        }
    }
}

impl CallContext {
    /// The call tree's budget: one more call, one level deeper. Returns the callee's place.
    fn admit(&self) -> Result<CallTree, GuestError> {
        self.tree
            .admit(self.fan_out, true)
            .map_err(|e| guest_error(&e.kind, e.message))
    }

    fn server(&self) -> Result<Arc<Server>, GuestError> {
        self.server
            .upgrade()
            .ok_or_else(|| guest_error("unavailable", "the server is shutting down"))
    }

    fn target_app(&self, app: String) -> String {
        if app.is_empty() {
            self.app.to_string()
        } else {
            app
        }
    }
}

fn payload(input: &[u8]) -> Result<serde_json::Value, GuestError> {
    serde_json::from_slice(input)
        .map_err(|e| guest_error("invalid_input", format!("the call input is not JSON: {e}")))
}

fn context(state: &GuestState) -> Result<&CallContext, GuestError> {
    state
        .calls
        .as_ref()
        .ok_or_else(|| guest_error("unavailable", "calls are only made from a function call"))
}

impl lode::function::types::Host for GuestState {}

impl lode::function::invoke::Host for GuestState {
    async fn invoke(
        &mut self,
        app: String,
        function: String,
        input: Vec<u8>,
    ) -> Result<Vec<u8>, GuestError> {
        let ctx = context(self)?;
        let tree = ctx.admit()?;
        let body = payload(&input)?;
        let server = ctx.server()?;
        let app = ctx.target_app(app);
        let outcome =
            Box::pin(server.call_within(&app, &function, &body, Some(tree), Some(&ctx.app))).await;
        match outcome {
            Ok(outcome) => to_guest(outcome),
            Err(e) => Err(guest_error(&e.error.kind, e.error.message)),
        }
    }

    async fn spawn(
        &mut self,
        app: String,
        function: String,
        input: Vec<u8>,
    ) -> Result<String, GuestError> {
        let ctx = context(self)?;
        let tree = ctx.admit()?;
        let body = payload(&input)?;
        let server = ctx.server()?;
        let app = ctx.target_app(app);
        server
            .spawn_call_within(&app, &function, body, Some(tree), Some(&ctx.app))
            .map_err(|e| guest_error(&e.error.kind, e.error.message))
    }

    async fn await_(&mut self, call_id: String) -> Result<Vec<u8>, GuestError> {
        let ctx = context(self)?;
        let server = ctx.server()?;
        loop {
            let record = server
                .wait_as(&ctx.app, &call_id, crate::control::calls::MAX_WAIT)
                .await
                .map_err(|e| guest_error(&e.kind, e.message))?;
            if record.status != crate::control::calls::CallStatus::Running {
                return match record.error {
                    Some(error) => Err(guest_error(&error.kind, error.message)),
                    None => Ok(serde_json::to_vec(&record.result.unwrap_or_default())
                        .expect("JSON values encode")),
                };
            }
        }
    }
}

impl lode::function::log::Host for GuestState {
    async fn log(&mut self, level: lode::function::log::Level, message: String) {
        if let Some(ctx) = &self.calls
            && let Some(server) = ctx.server.upgrade()
        {
            use lode::function::log::Level;
            let level = match level {
                Level::Trace => "trace",
                Level::Debug => "debug",
                Level::Info => "info",
                Level::Warn => "warn",
                Level::Error => "error",
            };
            server.logs.push(
                &ctx.app,
                None,
                Stream::Stdout,
                format!("[{level}] {message}"),
            );
        }
    }
}

impl lode::function::config::Host for GuestState {
    async fn get(&mut self, key: String) -> Option<String> {
        self.calls.as_ref()?.config.get(&key).cloned()
    }
}

impl Server {
    /// Runs one call of a Wasm function, at its place in a call tree (`None`: a call from
    /// outside, which starts one with the function's limits).
    pub(crate) async fn run_wasm(
        self: &Arc<Self>,
        function: Arc<WasmFunction>,
        body: &serde_json::Value,
        tree: Option<CallTree>,
    ) -> Outcome {
        let request_id: Arc<str> =
            Arc::from(format!("{}-{:08x}", function.name, rand::random::<u32>()));
        let mut wasi = self.logs.guest_wasi(function.app.clone(), request_id);
        for (host, guest, read_only) in &function.preopens {
            let perms = if *read_only {
                wasmtime_wasi::FsPerms::ReadOnly
            } else {
                wasmtime_wasi::FsPerms::ReadWrite
            };
            if let Err(e) = wasi.preopened_dir(host, guest, perms) {
                return Outcome::failed(ErrorInfo::lode(
                    "volume_failed",
                    format!("opening volume {} for {guest}: {e}", host.display()),
                ));
            }
        }
        let wasi = wasi.build();
        let mut state = GuestState::new(wasi, function.memory, function.outbound.clone());
        state.calls = Some(CallContext {
            server: Arc::downgrade(self),
            app: function.app.clone(),
            tree: CallTree::enter(tree, function.limits),
            fan_out: function.limits.fan_out,
            config: function.config.clone(),
        });
        let deadline = Instant::now() + function.timeout;
        let mut store = function.engine.new_store(state, deadline, function.fuel);
        let input = serde_json::to_vec(body).expect("JSON values encode");
        let run = async {
            let instance = function.pre.instantiate_async(&mut store).await?;
            instance
                .lode_function_handler()
                .call_call(&mut store, &input)
                .await
        };
        let timed_out = || {
            Outcome::failed(ErrorInfo {
                kind: "TimeoutError".into(),
                module: Some("builtins".into()),
                message: format!(
                    "{}/{} timed out after {:?}",
                    function.app, function.name, function.timeout
                ),
                traceback: None,
            })
        };
        match tokio::time::timeout_at(deadline.into(), run).await {
            Err(_) => timed_out(),
            Ok(Ok(Ok(output))) => match serde_json::from_slice(&output) {
                Ok(value) => Outcome::value(value),
                Err(e) => Outcome::failed(ErrorInfo::lode(
                    "invalid_output",
                    format!("{} returned bytes that are not JSON: {e}", function.name),
                )),
            },
            Ok(Ok(Err(error))) => Outcome::failed(ErrorInfo::lode(&error.kind, error.message)),
            Ok(Err(e)) => match e.downcast_ref::<Trap>() {
                Some(Trap::Interrupt) => timed_out(),
                Some(Trap::OutOfFuel) => Outcome::failed(ErrorInfo::lode(
                    "fuel_exhausted",
                    format!(
                        "{} used up its fuel of {} units (`[limits] fuel` sets it)",
                        function.name,
                        function.fuel.unwrap_or_default()
                    ),
                )),
                Some(Trap::StackOverflow) => Outcome::failed(ErrorInfo::lode(
                    "stack_overflow",
                    format!(
                        "{} ran out of wasm stack ({} KiB; `[limits] wasm_stack_kib` sets it)",
                        function.name,
                        function.engine.stack() >> 10
                    ),
                )),
                // The limiter refuses the growth and traps (`trap_on_grow_failure`), with
                // wasmtime's "forcing trap when growing memory to N bytes".
                _ if format!("{e:?}").contains("growing memory") => {
                    Outcome::failed(ErrorInfo::lode(
                        "out_of_memory",
                        format!(
                            "{} went past its memory limit of {} MiB",
                            function.name,
                            function.memory >> 20
                        ),
                    ))
                }
                _ => Outcome::failed(ErrorInfo::lode(
                    "trap",
                    format!("{} trapped: {:#}", function.name, anyhow::Error::from(e)),
                )),
            },
        }
    }
}
