//! GPUs for Wasm functions. A function that declares `gpu` gets one device from the host's
//! allocator and computes on it through `lode:gpu`; one that declares none computes on the
//! CPU backend, with the same results.
//!
//! A function's instances share the device they hold: the first instance to need it leases
//! it (waiting, within its deadline, while another function holds every matching one), the
//! others of that function use it too, and the last to end gives it back. Buffers are zeroed
//! when made, freed with their instance, and zeroed again before the device's pool takes them
//! back, so what one holder left on a device never reaches the next, even through a PTX
//! kernel that reads memory it was not given. Each device's backend (a CUDA context, with its kernels compiled once) is kept
//! for later holders, unless a guest's PTX kernel broke it, when the next holder opens a new
//! one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use lode_wasi_gpu::Backend;
use lode_wasi_gpu::inventory::{self, Gpu};
use prometheus_client::metrics::gauge::Gauge;

use crate::function::gpus::{GpuAllocator, GpuLease};

/// What computes the work of a GPU a Wasm function leased.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuCompute {
    /// The device itself, through CUDA.
    Cuda,
    /// The CPU backend, standing in for the leased device: for testing the allocation and
    /// everything around it on a machine without CUDA. Never for production.
    Cpu,
}

/// The host's GPUs as Wasm functions get them.
pub struct WasmGpus {
    allocator: Arc<GpuAllocator>,
    compute: GpuCompute,
    /// Each device's backend, by PCI address, kept between holders.
    opened: Mutex<HashMap<String, Arc<dyn Backend>>>,
}

/// A device one function's instances hold; the last of them to end gives it back.
pub struct HeldGpu {
    backend: Arc<dyn Backend>,
    /// Bytes an instance may hold in buffers on it.
    quota: u64,
    kernels: bool,
    gauge: Gauge,
    _lease: GpuLease,
}

impl Drop for HeldGpu {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl HeldGpu {
    /// The device as one instance sees it.
    pub fn instance_gpu(&self) -> lode_wasi_gpu::Gpu {
        lode_wasi_gpu::Gpu::new(self.backend.clone(), self.quota).with_kernels(self.kernels)
    }
}

/// A deployed Wasm function's GPU: what it asked for, and the device its instances hold now.
pub struct FunctionGpu {
    gpus: Arc<WasmGpus>,
    request: String,
    /// `gpu_memory`, in bytes; the whole device without it.
    quota: Option<u64>,
    kernels: bool,
    gauge: Gauge,
    held: tokio::sync::Mutex<Weak<HeldGpu>>,
}

impl WasmGpus {
    /// Devices from `allocator`, computed on by `compute`.
    pub fn new(allocator: Arc<GpuAllocator>, compute: GpuCompute) -> Arc<Self> {
        Arc::new(Self {
            allocator,
            compute,
            opened: Mutex::new(HashMap::new()),
        })
    }

    /// Why a Wasm function may not declare `request` on this host, if it may not: it asks for
    /// more than one device (`lode:gpu` gives an instance one), the host has no such device,
    /// or nothing here can drive it.
    pub fn check(&self, request: &str) -> Result<(), String> {
        let (_, count) = inventory::parse_request(request)?;
        if count != 1 {
            return Err(format!(
                "gpu {request:?} asks for {count} devices, but a Wasm function gets one \
                 (lode:gpu computes on a single device); ask for one, as gpu = \"any\""
            ));
        }
        if !self.allocator.satisfies(request)? {
            return Err(format!(
                "gpu {request:?} was requested, but this host has {}; remove `gpu` to run \
                 lode:gpu on the CPU backend, or deploy to a host with that GPU",
                self.allocator.describe()
            ));
        }
        match self.compute {
            GpuCompute::Cpu => Ok(()),
            GpuCompute::Cuda => cuda_present().map_err(|why| {
                format!(
                    "this host has the gpu {request:?} asks for, but {why}; install the NVIDIA \
                     driver and the CUDA runtime (cuBLAS, NVRTC), or remove `gpu` to run \
                     lode:gpu on the CPU backend"
                )
            }),
        }
    }

    /// The backend of `gpu`, kept from an earlier holder unless that one broke it.
    fn backend_for(&self, gpu: &Gpu) -> Result<Arc<dyn Backend>, String> {
        let mut opened = self.opened.lock().unwrap();
        if let Some(backend) = opened.get(&gpu.bus_id)
            && !backend.broken()
        {
            return Ok(backend.clone());
        }
        opened.remove(&gpu.bus_id);
        let backend = open(self.compute, gpu)?;
        opened.insert(gpu.bus_id.clone(), backend.clone());
        Ok(backend)
    }
}

#[cfg(feature = "cuda")]
fn cuda_present() -> Result<(), String> {
    lode_wasi_gpu::backend::cuda::probe()
}

#[cfg(not(feature = "cuda"))]
fn cuda_present() -> Result<(), String> {
    Err(WITHOUT_CUDA.into())
}

#[cfg(not(feature = "cuda"))]
const WITHOUT_CUDA: &str = "this lode was built without the `cuda` feature";

fn open(compute: GpuCompute, gpu: &Gpu) -> Result<Arc<dyn Backend>, String> {
    match compute {
        GpuCompute::Cpu => Ok(Arc::new(lode_wasi_gpu::backend::cpu::Cpu::standing_in_for(
            &gpu.model,
        ))),
        #[cfg(feature = "cuda")]
        GpuCompute::Cuda => Ok(Arc::new(lode_wasi_gpu::backend::cuda::Cuda::open_bus(
            &gpu.bus_id,
        )?)),
        #[cfg(not(feature = "cuda"))]
        GpuCompute::Cuda => Err(WITHOUT_CUDA.into()),
    }
}

impl FunctionGpu {
    /// The GPU of a function that asked for `request`, with `gpu_memory` (bytes) per instance
    /// and PTX kernels allowed or not; `gauge` counts the devices it holds.
    pub fn new(
        gpus: Arc<WasmGpus>,
        request: String,
        quota: Option<u64>,
        kernels: bool,
        gauge: Gauge,
    ) -> Arc<Self> {
        Arc::new(Self {
            gpus,
            request,
            quota,
            kernels,
            gauge,
            held: tokio::sync::Mutex::new(Weak::new()),
        })
    }

    /// The device for one more instance: the one this function's instances hold now, or a
    /// new lease, waited for until `deadline`.
    pub async fn hold(&self, deadline: Instant) -> Result<Arc<HeldGpu>, String> {
        // Another instance of this function may be waiting for the device: wait behind it,
        // within this one's own deadline.
        let mut held = tokio::time::timeout_at(deadline.into(), self.held.lock())
            .await
            .map_err(|_| {
                format!(
                    "gpu {:?}: every matching device stayed busy until the deadline",
                    self.request
                )
            })?;
        if let Some(gpu) = held.upgrade() {
            return Ok(gpu);
        }
        let lease = self
            .gpus
            .allocator
            .acquire_by(&self.request, deadline)
            .await?;
        let gpu = lease
            .gpus()
            .next()
            .cloned()
            .ok_or("a lease without a device")?;
        let gpus = self.gpus.clone();
        // Opening a CUDA device compiles Lode's kernels: off the async threads.
        let backend = tokio::task::spawn_blocking(move || gpus.backend_for(&gpu))
            .await
            .map_err(|e| format!("opening the device: {e}"))??;
        let device_memory = backend.device().memory_bytes;
        self.gauge.inc();
        let gpu = Arc::new(HeldGpu {
            quota: self.quota.unwrap_or(device_memory).min(device_memory),
            backend,
            kernels: self.kernels,
            gauge: self.gauge.clone(),
            _lease: lease,
        });
        *held = Arc::downgrade(&gpu);
        Ok(gpu)
    }
}
