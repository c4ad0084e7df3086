//! Wasm functions called by name: the `lode:function` world (`host/wit/lode-function`).
//!
//! A call gets a fresh instance from a pre-linked component, with the function's memory limit
//! and a wall-clock deadline (epochs), and runs `handler.call` on the JSON call payload. The
//! guest's imports go back through the one router: `invoke` and `spawn` reach any function,
//! Wasm or Python, with the call depth and the number of calls one top-level call may fan
//! out to bounded (per app, `[limits]`), so a component that calls itself forever is stopped
//! by name.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Instant;

use lode_native_runner::agent::{ErrorInfo, Outcome};

use crate::function::{CallLimits, CallTree, Dispatch};
use crate::proto::calls::CallStatus;
use crate::proto::log::Stream;
use crate::telemetry::logs::LogStore;
use crate::wasm::guest::{CallContext, GuestState};
use crate::wasm::store::{Preopen, WasmGuest};
use crate::wasm::trap::{Stop, classify, describe};

use crate::wasm::bindings::FunctionPre;
use crate::wasm::bindings::lode;
use lode::function::types::Error as GuestError;

/// A deployed Wasm function that takes calls.
pub struct WasmFunction {
    /// What every run of it needs: app, name, engine, timeout, fuel, memory, outbound.
    pub guest: WasmGuest,
    /// The pre-linked component.
    pub pre: FunctionPre<GuestState>,
    /// The app's config and the function's secrets, for `config.get`.
    pub config: Arc<BTreeMap<String, String>>,
    /// Volumes preopened for it, its only files.
    pub preopens: Vec<Preopen>,
    /// Its app's bounds on nested calls.
    pub limits: CallLimits,
    /// Its call series in `/metrics`.
    pub series: crate::telemetry::metrics::FunctionSeries,
    /// Runs of a spawned call again after its host died.
    pub retries: Option<crate::proto::manifest::Retries>,
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

    fn dispatch(&self) -> Result<Arc<dyn Dispatch>, GuestError> {
        self.dispatch
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
        let dispatch = ctx.dispatch()?;
        let app = ctx.target_app(app);
        let outcome = dispatch
            .call(&app, &function, &body, Some(tree), Some(&ctx.app))
            .await;
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
        let dispatch = ctx.dispatch()?;
        let app = ctx.target_app(app);
        dispatch
            .spawn(&app, &function, body, Some(tree), Some(&ctx.app))
            .await
            .map_err(|e| guest_error(&e.error.kind, e.error.message))
    }

    async fn await_(&mut self, call_id: String) -> Result<Vec<u8>, GuestError> {
        let ctx = context(self)?;
        let dispatch = ctx.dispatch()?;
        loop {
            let record = dispatch
                .wait(&ctx.app, &call_id, crate::proto::calls::MAX_WAIT)
                .await
                .map_err(|e| guest_error(&e.kind, e.message))?;
            if record.status != CallStatus::Running {
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
        if let Some(ctx) = &self.calls {
            use lode::function::log::Level;
            let level = match level {
                Level::Trace => "trace",
                Level::Debug => "debug",
                Level::Info => "info",
                Level::Warn => "warn",
                Level::Error => "error",
            };
            ctx.logs.push(
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

/// Runs one call of a Wasm function, at its place in a call tree (`None`: a call from
/// outside, which starts one with the function's limits). Its imports call other functions
/// through `dispatch` and log into `logs`.
pub async fn run(
    function: Arc<WasmFunction>,
    body: &serde_json::Value,
    tree: Option<CallTree>,
    dispatch: Weak<dyn Dispatch>,
    logs: &Arc<LogStore>,
) -> Outcome {
    let guest = &function.guest;
    let request_id: Arc<str> = Arc::from(format!("{}-{:08x}", guest.name, rand::random::<u32>()));
    let deadline = Instant::now() + guest.timeout;
    let mut store = match guest
        .store(logs, request_id, &function.preopens, deadline)
        .await
    {
        Ok(store) => store,
        Err(why) => return Outcome::failed(ErrorInfo::lode(why.kind(), why.to_string())),
    };
    store.data_mut().calls = Some(CallContext {
        dispatch,
        logs: logs.clone(),
        app: guest.app.clone(),
        tree: CallTree::enter(tree, function.limits),
        fan_out: function.limits.fan_out,
        config: function.config.clone(),
    });
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
                guest.app, guest.name, guest.timeout
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
                format!("{} returned bytes that are not JSON: {e}", guest.name),
            )),
        },
        Ok(Ok(Err(error))) => Outcome::failed(ErrorInfo::lode(&error.kind, error.message)),
        Ok(Err(e)) => match classify(&e) {
            Stop::Timeout => timed_out(),
            Stop::OutOfFuel => Outcome::failed(ErrorInfo::lode(
                "fuel_exhausted",
                format!(
                    "{} used up its fuel of {} units (`[limits] fuel` sets it)",
                    guest.name,
                    guest.fuel.unwrap_or_default()
                ),
            )),
            Stop::StackOverflow => Outcome::failed(ErrorInfo::lode(
                "stack_overflow",
                format!(
                    "{} ran out of wasm stack ({} KiB; `[limits] wasm_stack_kib` sets it)",
                    guest.name,
                    guest.engine.stack() >> 10
                ),
            )),
            Stop::OutOfMemory => Outcome::failed(ErrorInfo::lode(
                "out_of_memory",
                format!(
                    "{} went past its memory limit of {} MiB",
                    guest.name,
                    guest.memory >> 20
                ),
            )),
            Stop::Overloaded | Stop::Trap => Outcome::failed(ErrorInfo::lode(
                "trap",
                format!("{} trapped: {}", guest.name, describe(e)),
            )),
        },
    }
}
