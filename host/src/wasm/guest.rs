//! What one guest run holds in its store: WASI and HTTP contexts, its resource table, its
//! memory limiter, its outbound rules, its `lode:gpu` device (made on its first use), and
//! for a call by name, where it sits in its call tree.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use wasmtime::StoreLimits;
use wasmtime::StoreLimitsBuilder;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::function::{CallTree, Dispatch};
use crate::telemetry::logs::LogStore;
use crate::wasm::outbound::OutboundPolicy;

/// Per-request store data.
pub struct GuestState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    pub(super) limits: StoreLimits,
    outbound: OutboundPolicy,
    /// Set for a call by name: where it sits in its call tree, for `invoke` and `config`.
    pub(crate) calls: Option<CallContext>,
    /// The `lode:gpu` device, made at the first call to it; its buffers live in `table`.
    gpu: Option<lode_wasi_gpu::Gpu>,
    /// The leased device of a function that declares `gpu`, held while this store lives;
    /// without one, `lode:gpu` computes on the CPU backend.
    pub(crate) held_gpu: Option<Arc<crate::wasm::gpu::HeldGpu>>,
    /// Bytes the guest may hold in `lode:gpu` buffers.
    gpu_memory: u64,
}

/// Guest stores alive now, across every engine class.
static LIVE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Wasm instances (their stores) alive now on this host.
pub fn live_instances() -> u64 {
    LIVE.load(std::sync::atomic::Ordering::Relaxed)
}

impl Drop for GuestState {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl GuestState {
    /// Fresh state for one request.
    pub fn new(wasi: WasiCtx, memory_limit: u64, outbound: OutboundPolicy) -> Self {
        LIVE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            wasi,
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(usize::try_from(memory_limit).unwrap_or(usize::MAX))
                .trap_on_grow_failure(true)
                .build(),
            outbound,
            calls: None,
            gpu: None,
            held_gpu: None,
            // Buffers are the guest's memory too: the same limit again, on the device.
            gpu_memory: memory_limit,
        }
    }

    /// `lode:gpu` as the host functions see it: the leased device of a function that
    /// declares `gpu`; for one that declares none, the CPU backend, which gives the same
    /// results (the conformance suite holds them to it).
    pub fn gpu_view(&mut self) -> lode_wasi_gpu::host::GpuView<'_> {
        let (quota, held) = (self.gpu_memory, &self.held_gpu);
        lode_wasi_gpu::host::GpuView {
            gpu: self.gpu.get_or_insert_with(|| match held {
                Some(held) => held.instance_gpu(),
                None => lode_wasi_gpu::Gpu::cpu(quota),
            }),
            table: &mut self.table,
        }
    }
}

impl GuestState {
    /// After a request on an instance that may serve another: releases the body of any
    /// request handle the guest still holds (a garbage-collected guest drops its handles
    /// late; the body would hold the client's connection), and returns how many resources
    /// the host holds for the guest and whether one is a response, a body or an outgoing
    /// request still open, which would leave a client or a call waiting.
    pub fn settle_after_request(&mut self) -> (usize, bool) {
        use wasmtime_wasi_http::p2::{body, types};
        let (mut count, mut open) = (0, false);
        for entry in self.table.iter_mut() {
            count += 1;
            if let Some(request) = entry.downcast_mut::<types::HostIncomingRequest>() {
                request.body = None;
                continue;
            }
            let entry: &dyn std::any::Any = entry;
            open |= entry.is::<types::HostResponseOutparam>()
                || entry.is::<types::HostOutgoingResponse>()
                || entry.is::<types::HostOutgoingRequest>()
                || entry.is::<types::HostIncomingResponse>()
                || entry.is::<types::HostFutureIncomingResponse>()
                || entry.is::<body::HostIncomingBody>()
                || entry.is::<body::HostOutgoingBody>()
                || entry.is::<body::HostFutureTrailers>();
        }
        (count, open)
    }
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for GuestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

/// What a running call knows about where it is, for its imports.
pub struct CallContext {
    pub(super) dispatch: Weak<dyn Dispatch>,
    pub(super) logs: Arc<LogStore>,
    pub(super) app: Arc<str>,
    /// This call's place in its tree, with this app's limits folded in.
    pub(super) tree: CallTree,
    /// This app's `fan_out`, checked against the whole tree's count.
    pub(super) fan_out: u32,
    pub(super) config: Arc<BTreeMap<String, String>>,
}
