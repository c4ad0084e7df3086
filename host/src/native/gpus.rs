//! What the container of a Python function with `gpu=` gets from its lease, as
//! nvidia-container-toolkit gives it: exactly its devices' nodes (`/dev/nvidiaN`, plus
//! `nvidiactl`, `nvidia-uvm`, `nvidia-uvm-tools` and `nvidia-modeset` where the host has
//! them) in its `/dev` and its device allow-list, the driver's user-space libraries and
//! `nvidia-smi` bound read-only from the host, and `NVIDIA_VISIBLE_DEVICES` (the host's
//! device numbers) and `CUDA_VISIBLE_DEVICES` (the container's own, from 0).
//!
//! Everything is read under the allocator's root: the nodes in `dev`, the libraries in
//! `usr/lib/x86_64-linux-gnu` and `usr/bin/nvidia-smi`. Tests point it at a root of their
//! own with nodes they made, which is how a machine without a GPU checks the wiring.

use lode_native_runner::cgroup::devices::DeviceGrant;
use lode_native_runner::sandbox::Volume;

use crate::function::gpus::GpuLease;

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

/// A lease as a container's devices, variables and driver files.
pub trait ContainerGpus {
    /// The device nodes the container gets: each GPU's own, then the control nodes the host
    /// has. A GPU whose node is missing is an error naming it.
    fn devices(&self) -> Result<Vec<DeviceGrant>, String>;
    /// The variables that say which GPUs the container has.
    fn env(&self) -> Vec<(String, String)>;
    /// The driver's libraries and `nvidia-smi`, read-only at the paths they have on the host.
    fn volumes(&self) -> Vec<Volume>;
}

impl ContainerGpus for GpuLease {
    fn devices(&self) -> Result<Vec<DeviceGrant>, String> {
        let dev = self.root().join("dev");
        let mut grants = Vec::new();
        for gpu in self.gpus() {
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

    fn env(&self) -> Vec<(String, String)> {
        let host: Vec<String> = self
            .gpus()
            .filter_map(|gpu| gpu.minor)
            .map(|m| m.to_string())
            .collect();
        let own: Vec<String> = (0..self.count()).map(|i| i.to_string()).collect();
        vec![
            ("NVIDIA_VISIBLE_DEVICES".into(), host.join(",")),
            ("CUDA_VISIBLE_DEVICES".into(), own.join(",")),
        ]
    }

    fn volumes(&self) -> Vec<Volume> {
        let root = self.root();
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
