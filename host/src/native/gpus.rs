//! GPUs for Python functions: a host-wide allocator that hands out whole devices from the
//! driver's inventory, and what a container of a function with `gpu=` gets, as
//! nvidia-container-toolkit gives it: exactly its devices' nodes (`/dev/nvidiaN`, plus
//! `nvidiactl`, `nvidia-uvm`, `nvidia-uvm-tools` and `nvidia-modeset` where the host has
//! them) in its `/dev` and its device allow-list, the driver's user-space libraries and
//! `nvidia-smi` bound read-only from the host, and `NVIDIA_VISIBLE_DEVICES` (the host's
//! device numbers) and `CUDA_VISIBLE_DEVICES` (the container's own, from 0).
//!
//! Everything is read under a root (`lode serve --gpu-root`, `/` by default): the driver's
//! listing in `proc/driver/nvidia/gpus`, the nodes in `dev`, the libraries in
//! `usr/lib/x86_64-linux-gnu` and `usr/bin/nvidia-smi`. Tests point it at a root of their
//! own with nodes they made, which is how a machine without a GPU checks the wiring.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lode_native_runner::cgroup::devices::DeviceGrant;
use lode_native_runner::sandbox::Volume;
use lode_wasi_gpu::inventory::{self, Gpu};

/// The nodes every GPU container gets besides its own `nvidiaN`, where the host has them.
const CONTROL_NODES: [&str; 4] = [
    "nvidiactl",
    "nvidia-uvm",
    "nvidia-uvm-tools",
    "nvidia-modeset",
];

/// The driver's user-space files a GPU container gets read-only (prefixes of file names
/// under `usr/lib/x86_64-linux-gnu`), as nvidia-container-toolkit's "utility" and
/// "compute" capabilities list them.
const DRIVER_LIBRARIES: [&str; 6] = [
    "libcuda.so",
    "libnvidia-ml.so",
    "libnvidia-ptxjitcompiler.so",
    "libnvidia-nvvm.so",
    "libcudadebugger.so",
    "libnvidia-gpucomp.so",
];

/// The host's GPUs and which are in use.
pub struct GpuAllocator {
    root: PathBuf,
    gpus: Vec<Gpu>,
    busy: Mutex<Vec<bool>>,
    freed: tokio::sync::Notify,
}

/// Devices held by one container; dropped, they are free again.
pub struct GpuLease {
    allocator: Arc<GpuAllocator>,
    held: Vec<usize>,
}

impl Drop for GpuLease {
    fn drop(&mut self) {
        let mut busy = self.allocator.busy.lock().unwrap();
        for &i in &self.held {
            busy[i] = false;
        }
        drop(busy);
        self.allocator.freed.notify_waiters();
    }
}

impl GpuAllocator {
    /// The GPUs the driver lists under `root`.
    pub fn open(root: &Path) -> Arc<Self> {
        let gpus = inventory::inventory_in(&root.join("proc/driver/nvidia/gpus"));
        Arc::new(Self {
            root: root.to_path_buf(),
            busy: Mutex::new(vec![false; gpus.len()]),
            gpus,
            freed: tokio::sync::Notify::new(),
        })
    }

    /// The GPUs, for messages.
    pub fn describe(&self) -> String {
        inventory::describe(&self.gpus)
    }

    /// Whether the host has what `request` asks for (busy or not); an unreadable request is
    /// an error naming it.
    pub fn satisfies(&self, request: &str) -> Result<bool, String> {
        inventory::satisfies(&self.gpus, request)
    }

    /// Devices in use now.
    pub fn in_use(&self) -> usize {
        self.busy.lock().unwrap().iter().filter(|b| **b).count()
    }

    /// Devices for `request` if enough are free now.
    pub fn try_acquire(self: &Arc<Self>, request: &str) -> Result<Option<GpuLease>, String> {
        let (model, count) = inventory::parse_request(request)?;
        let mut busy = self.busy.lock().unwrap();
        let free: Vec<usize> = (0..self.gpus.len())
            .filter(|&i| !busy[i] && inventory::matches(&self.gpus[i], model))
            .take(count)
            .collect();
        if free.len() < count {
            return Ok(None);
        }
        for &i in &free {
            busy[i] = true;
        }
        Ok(Some(GpuLease {
            allocator: self.clone(),
            held: free,
        }))
    }

    /// Devices for `request`, waiting until enough are free (another container stops).
    pub async fn acquire(self: &Arc<Self>, request: &str) -> Result<GpuLease, String> {
        if !self.satisfies(request)? {
            return Err(format!(
                "gpu {request:?} was requested, but this host has {}",
                self.describe()
            ));
        }
        loop {
            let freed = self.freed.notified();
            if let Some(lease) = self.try_acquire(request)? {
                return Ok(lease);
            }
            freed.await;
        }
    }
}

impl GpuLease {
    /// How many GPUs it holds.
    pub fn count(&self) -> usize {
        self.held.len()
    }

    /// The GPUs held, in order.
    fn held(&self) -> impl Iterator<Item = &Gpu> {
        self.held.iter().map(|&i| &self.allocator.gpus[i])
    }

    /// The device nodes the container gets: each GPU's own, then the control nodes the host
    /// has. A GPU whose node is missing is an error naming it.
    pub fn devices(&self) -> Result<Vec<DeviceGrant>, String> {
        let dev = self.allocator.root.join("dev");
        let mut grants = Vec::new();
        for gpu in self.held() {
            let minor = gpu
                .minor
                .ok_or_else(|| format!("the driver lists {} without a device minor", gpu.model))?;
            let node = dev.join(format!("nvidia{minor}"));
            grants.push(
                DeviceGrant::of_host(&node)
                    .map_err(|e| format!("the node of {}: {e}", gpu.model))?,
            );
        }
        for name in CONTROL_NODES {
            if let Ok(grant) = DeviceGrant::of_host(&dev.join(name)) {
                grants.push(grant);
            }
        }
        Ok(grants)
    }

    /// The variables that say which GPUs the container has.
    pub fn env(&self) -> Vec<(String, String)> {
        let host: Vec<String> = self
            .held()
            .filter_map(|gpu| gpu.minor)
            .map(|m| m.to_string())
            .collect();
        let own: Vec<String> = (0..self.held.len()).map(|i| i.to_string()).collect();
        vec![
            ("NVIDIA_VISIBLE_DEVICES".into(), host.join(",")),
            ("CUDA_VISIBLE_DEVICES".into(), own.join(",")),
        ]
    }

    /// The driver's libraries and `nvidia-smi`, read-only at the paths they have on the host.
    pub fn volumes(&self) -> Vec<Volume> {
        let root = &self.allocator.root;
        let lib = "usr/lib/x86_64-linux-gnu";
        let mut files: Vec<String> = std::fs::read_dir(root.join(lib))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|name| DRIVER_LIBRARIES.iter().any(|p| name.starts_with(p)))
                    .map(|name| format!("{lib}/{name}"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files.push("usr/bin/nvidia-smi".into());
        files
            .into_iter()
            .filter_map(|file| {
                Volume::open(root.join(&file), format!("/{file}"), true)
                    .map_err(|e| tracing::debug!(file, "a driver file is not there: {e}"))
                    .ok()
            })
            .collect()
    }
}
