//! The host's GPUs, shared by both engines: a host-wide allocator that hands out whole
//! devices from the driver's inventory, read under a root (`lode serve --gpu-root`, `/` by
//! default; tests point it at a root of their own). A Python function's container holds its
//! lease until it stops; a Wasm function's instances hold theirs while any of them runs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lode_wasi_gpu::inventory::{self, Gpu};

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

    /// Devices this host has.
    pub fn count(&self) -> usize {
        self.gpus.len()
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

    /// Devices for `request`, waiting until enough are free (another holder lets go), or
    /// until `deadline` passes.
    pub async fn acquire_by(
        self: &Arc<Self>,
        request: &str,
        deadline: Instant,
    ) -> Result<GpuLease, String> {
        match tokio::time::timeout_at(deadline.into(), self.acquire(request)).await {
            Ok(lease) => lease,
            Err(_) => Err(format!(
                "gpu {request:?}: every matching device stayed busy until the deadline ({} in \
                 use of {})",
                self.in_use(),
                self.describe()
            )),
        }
    }

    /// Devices for `request`, waiting until enough are free (another holder lets go).
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
    pub fn gpus(&self) -> impl Iterator<Item = &Gpu> {
        self.held.iter().map(|&i| &self.allocator.gpus[i])
    }

    /// The root the driver's files are read under.
    pub fn root(&self) -> &Path {
        &self.allocator.root
    }
}
