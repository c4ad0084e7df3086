//! Pre-initialization (`pre_init = true`): a function's start-up work runs once at deploy and
//! the instance is snapshotted with wasmtime's Wizer, so every call's fresh instance starts
//! where that work left off.
//!
//! The host instruments the component, instantiates it on the function's engine, calls
//! `handler.call` with [`INIT_INPUT`] (a payload the API refuses from callers), and rewrites
//! the component with the instance's memories and globals as its initial state. The init runs
//! with no config, secrets, files or network, so none of those are baked into the snapshot;
//! whatever it does read (random seeds, say) is, and every call starts from the same bytes.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures::FutureExt;

use anyhow::{Context, Result, anyhow, bail};
use wasmtime::Store;
use wasmtime::component::{Instance, Lift, WasmList};
use wasmtime_wizer::{ComponentInstanceState, Wizer};

use std::sync::Arc;

use crate::telemetry::logs::LogStore;
use crate::wasm::guest::GuestState;
use crate::wasm::store::WasmGuest;
use crate::wasm::trap::{Stop, classify};

/// What the init call receives; `lode-guest` runs `Function::init` on it.
pub const INIT_INPUT: &[u8] = br#"{"lode_init":true}"#;

/// Runs the init of `wasm` as `guest` (its output in `logs` under `<function>-init`), for at
/// most the guest's timeout once the instance starts, and returns the snapshotted component.
/// Panics inside Wizer come back as errors, so a bad component fails its deploy, not the
/// server.
pub async fn snapshot(guest: &WasmGuest, logs: &Arc<LogStore>, wasm: &[u8]) -> Result<Vec<u8>> {
    AssertUnwindSafe(run(guest, logs, wasm))
        .catch_unwind()
        .await
        .map_err(|_| anyhow!("Wizer could not instrument or read the component"))?
}

async fn run(guest: &WasmGuest, logs: &Arc<LogStore>, wasm: &[u8]) -> Result<Vec<u8>> {
    let (class, timeout) = (&guest.engine, guest.timeout);
    let wizer = Wizer::new();
    let (context, instrumented) = wizer
        .instrument_component(wasm)
        .map_err(|e| anyhow!("{e:#}"))
        .context("instrumenting the component for pre-initialization")?;
    let component = class.compile(&instrumented)?;
    let pre = class
        .link(&component)
        .map_err(|e| anyhow!("{e}"))
        .context("linking the instrumented component")?;
    // The deadline stops running Wasm (epochs); the timeout also stops host waits.
    let deadline = Instant::now() + timeout;
    let request_id = Arc::from(format!("{}-init", guest.name));
    let mut store = guest
        .store(logs, request_id, &[], deadline)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let init = async {
        let instance = pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| trapped(e, timeout))
            .context("instantiating the component for its init")?;
        let function = crate::wasm::bindings::Function::new(&mut store, &instance)
            .map_err(|e| anyhow!("{e:#}"))
            .context("the component does not export lode:function/handler")?;
        let answer = function
            .lode_function_handler()
            .call_call(&mut store, INIT_INPUT)
            .await
            .map_err(|e| trapped(e, timeout))
            .context("the init call trapped")?;
        if let Err(error) = answer {
            bail!("the init call failed: {}: {}", error.kind, error.message);
        }
        Ok(instance)
    };
    let instance = tokio::time::timeout_at(deadline.into(), init)
        .await
        .map_err(|_| anyhow!("the init timed out after {timeout:?} (the function's timeout)"))??;
    let mut access = Access {
        store: &mut store,
        instance,
    };
    wizer
        .snapshot_component(&context, &mut access)
        .await
        .map_err(|e| anyhow!("{e:#}"))
        .context("snapshotting the initialized instance")
}

/// A trap as an error, with the deadline's interrupt named as the timeout it is.
fn trapped(error: wasmtime::Error, timeout: Duration) -> anyhow::Error {
    match classify(&error) {
        Stop::Timeout => anyhow!("the init timed out after {timeout:?} (the function's timeout)"),
        _ => anyhow!("{error:#}"),
    }
}

/// Reads the instrumented instance's state for Wizer, through the accessors it exported.
struct Access<'a> {
    store: &'a mut Store<GuestState>,
    instance: Instance,
}

impl Access<'_> {
    /// Calls `instance#func`, an accessor Wizer added, and hands its result to `use_ret`.
    ///
    /// The accessors exist because instrumenting added them, and they only read, so a
    /// failure here is a bug in Wizer's instrumentation: it panics, as Wizer's own driver
    /// does, and [`snapshot`] turns that into an error.
    async fn call<R, R2>(
        &mut self,
        instance: &str,
        func: &str,
        use_ret: impl FnOnce(&mut Store<GuestState>, R) -> R2,
    ) -> R2
    where
        R: Lift + 'static,
    {
        let (_, exported) = self
            .instance
            .get_export(&mut *self.store, None, instance)
            .expect("the instrumented component exports Wizer's accessors");
        let (_, func) = self
            .instance
            .get_export(&mut *self.store, Some(&exported), func)
            .expect("the accessor instance exports each accessor");
        let func = self
            .instance
            .get_typed_func::<(), (R,)>(&mut *self.store, func)
            .expect("accessors have the types Wizer gave them");
        let (ret,) = func
            .call_async(&mut *self.store, ())
            .await
            .expect("accessors only read state");
        use_ret(&mut *self.store, ret)
    }
}

impl ComponentInstanceState for Access<'_> {
    async fn call_func_ret_list_u8(
        &mut self,
        instance: &str,
        func: &str,
        contents: impl FnOnce(&[u8]) + Send,
    ) {
        self.call(instance, func, |store, list: WasmList<u8>| {
            contents(list.as_le_slice(&store));
        })
        .await
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func, |_, value| value).await
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func, |_, value| value).await
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call(instance, func, |_, value: f32| value.to_bits())
            .await
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call(instance, func, |_, value: f64| value.to_bits())
            .await
    }
}
