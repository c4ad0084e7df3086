//! Every run's store, set up in one place: [`WasmGuest`] is the part of a deployed function
//! that HTTP routes and functions called by name share, and its stdout and stderr go into the
//! app's log.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmtime::Store;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

use crate::proto::log::Stream;
use crate::telemetry::logs::{LogStore, RequestOutput};
use crate::wasm::engine::EngineClass;
use crate::wasm::gpu::FunctionGpu;
use crate::wasm::guest::GuestState;
use crate::wasm::outbound::OutboundPolicy;

/// A deployed Wasm function as every run of it needs it, whichever world it serves.
pub struct WasmGuest {
    /// Owning app.
    pub app: Arc<str>,
    /// Function name.
    pub name: String,
    /// The engine its component was prepared on; holding it keeps that engine's epochs
    /// ticking while the function or a run of it lives.
    pub engine: Arc<EngineClass>,
    /// Wall-clock limit per run.
    pub timeout: Duration,
    /// Fuel per run on a metered engine (`[limits] fuel`).
    pub fuel: Option<u64>,
    /// Memory limit per instance, in bytes.
    pub memory: u64,
    /// Outbound HTTP rules.
    pub outbound: OutboundPolicy,
    /// The GPU it declared (`gpu`); `None` computes `lode:gpu` on the CPU backend.
    pub gpu: Option<Arc<FunctionGpu>>,
}

/// Why a run's store could not be made.
#[derive(Debug)]
pub enum StoreError {
    /// A preopened directory could not be opened.
    Volume(String),
    /// The function's GPU could not be had by the deadline, or opened.
    Gpu(String),
}

impl StoreError {
    /// The error's kind, as a call's outcome names it.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Volume(_) => "volume_failed",
            StoreError::Gpu(_) => "no_gpu",
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Volume(why) | StoreError::Gpu(why) => f.write_str(why),
        }
    }
}

/// A directory a guest sees: the host directory, where the guest finds it, and whether it is
/// read-only. The guest sees no other files; `..` out of it is refused (cap-std).
#[derive(Debug, Clone)]
pub struct Preopen {
    /// The directory on the host.
    pub host: PathBuf,
    /// Where the guest finds it.
    pub guest: String,
    /// Whether writes are refused.
    pub read_only: bool,
}

impl WasmGuest {
    /// The store for one run, `request_id` naming its output in the app's log, with
    /// `preopens` as its only files, its memory limit, fuel, its GPU if it declared one, and
    /// `deadline`. Fails when a preopened directory cannot be opened, or the GPU cannot be
    /// had by the deadline; the error says which.
    pub async fn store(
        &self,
        logs: &Arc<LogStore>,
        request_id: Arc<str>,
        preopens: &[Preopen],
        deadline: Instant,
    ) -> Result<Store<GuestState>, StoreError> {
        let (store, _) = self
            .store_with_output(logs, request_id, preopens, deadline)
            .await?;
        Ok(store)
    }

    /// [`Self::store`], with the handle that points its output at another request's id.
    pub async fn store_with_output(
        &self,
        logs: &Arc<LogStore>,
        request_id: Arc<str>,
        preopens: &[Preopen],
        deadline: Instant,
    ) -> Result<(Store<GuestState>, RunOutput), StoreError> {
        let held_gpu = match &self.gpu {
            Some(gpu) => Some(gpu.hold(deadline).await.map_err(StoreError::Gpu)?),
            None => None,
        };
        let output = RunOutput::new(logs, self.app.clone(), request_id);
        let mut wasi = guest_wasi(&output);
        for preopen in preopens {
            let perms = if preopen.read_only {
                wasmtime_wasi::FsPerms::ReadOnly
            } else {
                wasmtime_wasi::FsPerms::ReadWrite
            };
            if let Err(e) = wasi.preopened_dir(&preopen.host, &preopen.guest, perms) {
                return Err(StoreError::Volume(format!(
                    "opening volume {} for {}: {e}",
                    preopen.host.display(),
                    preopen.guest
                )));
            }
        }
        let mut state = GuestState::new(wasi.build(), self.memory, self.outbound.clone());
        state.held_gpu = held_gpu;
        Ok((self.engine.new_store(state, deadline, self.fuel), output))
    }
}

/// A run's stdout and stderr, into the app's log under its request id. A kept instance
/// (`instance_reuse`) is pointed at each new request's id before it serves it.
pub struct RunOutput {
    logs: Arc<LogStore>,
    app: Arc<str>,
    stdout: GuestOutput,
    stderr: GuestOutput,
}

impl RunOutput {
    fn new(logs: &Arc<LogStore>, app: Arc<str>, request_id: Arc<str>) -> Self {
        let output =
            |stream| GuestOutput::new(logs.request_output(app.clone(), request_id.clone(), stream));
        Self {
            stdout: output(Stream::Stdout),
            stderr: output(Stream::Stderr),
            logs: logs.clone(),
            app,
        }
    }

    /// Sends what the guest writes from now on under `request_id`; a partial line of the
    /// last request is logged under that request's id first.
    pub fn retarget(&self, request_id: Arc<str>) {
        for (sink, stream) in [
            (&self.stdout, Stream::Stdout),
            (&self.stderr, Stream::Stderr),
        ] {
            *sink.inner.lock().unwrap() =
                self.logs
                    .request_output(self.app.clone(), request_id.clone(), stream);
        }
    }
}

/// The WASI context every guest run starts from: stdout and stderr into `output`, and no
/// sockets or name lookups.
fn guest_wasi(output: &RunOutput) -> wasmtime_wasi::WasiCtxBuilder {
    let mut builder = wasmtime_wasi::WasiCtxBuilder::new();
    builder
        .stdout(output.stdout.clone())
        .stderr(output.stderr.clone())
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    builder
}

/// Where a guest's output goes: the app's log for a request, an exec's stream for a
/// sandbox command.
pub trait OutputSink: Send + 'static {
    /// Takes bytes the guest wrote; never blocks it.
    fn write(&mut self, bytes: &[u8]);
}

impl OutputSink for RequestOutput {
    fn write(&mut self, bytes: &[u8]) {
        RequestOutput::write(self, bytes);
    }
}

/// A guest's stdout or stderr: always ready, never blocks the guest.
pub struct GuestOutput<S = RequestOutput> {
    inner: Arc<Mutex<S>>,
}

impl<S> Clone for GuestOutput<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S: OutputSink> GuestOutput<S> {
    /// Output into `sink`.
    pub fn new(sink: S) -> Self {
        Self {
            inner: Arc::new(Mutex::new(sink)),
        }
    }
}

impl<S> IsTerminal for GuestOutput<S> {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl<S: OutputSink> StdoutStream for GuestOutput<S> {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl<S: OutputSink> OutputStream for GuestOutput<S> {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.inner.lock().unwrap().write(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl<S: OutputSink> Pollable for GuestOutput<S> {
    async fn ready(&mut self) {}
}

impl<S: OutputSink> tokio::io::AsyncWrite for GuestOutput<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.inner.lock().unwrap().write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
