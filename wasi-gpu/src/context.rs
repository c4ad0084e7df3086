//! One instance's GPU: its backend, its buffers and its memory quota. Every check a backend
//! relies on happens here: views inside their buffers, shapes that fit the op, offsets and
//! lengths in range, and an output that shares no memory with an input (an input in the
//! output's buffer is copied first, so it reads as it was before the op).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::{Backend, Device, Kernel, KernelArg, LaunchShape, Memory};
use crate::tensor::{ErrorCode, GpuError, Layout, Op, check_op};

/// Bytes in use against a quota; shared by an instance's buffers, which give theirs back
/// when dropped.
#[derive(Debug)]
struct Quota {
    limit: u64,
    used: AtomicU64,
}

/// A GPU as one instance sees it.
pub struct Gpu {
    backend: Arc<dyn Backend>,
    quota: Arc<Quota>,
    /// Whether the instance may load and launch PTX kernels, which run raw device code
    /// unchecked: only a function that asks for them (`gpu_kernels`) may.
    kernels: bool,
}

/// A kernel argument as the guest gives it.
pub enum Argument<'a> {
    /// A buffer, passed as its device address.
    Buffer(&'a Buffer),
    /// A signed 32-bit integer.
    I32(i32),
    /// An unsigned 32-bit integer.
    U32(u32),
    /// A 32-bit float.
    F32(f32),
    /// An unsigned 64-bit integer.
    U64(u64),
}

/// Bytes on the instance's device.
pub struct Buffer {
    memory: Mutex<Memory>,
    size: u64,
    quota: Arc<Quota>,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.quota.used.fetch_sub(self.size, Ordering::Relaxed);
    }
}

impl Buffer {
    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn lock(&self) -> MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn range(buffer: &Buffer, offset: u64, len: u64, what: &str) -> Result<(), GpuError> {
    match offset.checked_add(len) {
        Some(end) if end <= buffer.size => Ok(()),
        _ => Err(GpuError::argument(format!(
            "{what}: {len} bytes at offset {offset} run past the end of a {}-byte buffer",
            buffer.size
        ))),
    }
}

impl Gpu {
    /// `backend`, with at most `quota` bytes in buffers at once.
    pub fn new(backend: Arc<dyn Backend>, quota: u64) -> Self {
        Self {
            backend,
            quota: Arc::new(Quota {
                limit: quota,
                used: AtomicU64::new(0),
            }),
            kernels: false,
        }
    }

    /// The same GPU, with PTX kernels allowed or not.
    pub fn with_kernels(mut self, allowed: bool) -> Self {
        self.kernels = allowed;
        self
    }

    /// The CPU backend, with at most `quota` bytes in buffers at once.
    pub fn cpu(quota: u64) -> Self {
        Self::new(Arc::new(crate::backend::cpu::Cpu::default()), quota)
    }

    /// The device, with the memory this instance may hold on it.
    pub fn device(&self) -> Device {
        let mut device = self.backend.device();
        device.memory_bytes = device.memory_bytes.min(self.quota.limit);
        device
    }

    /// Bytes held in buffers now.
    pub fn used(&self) -> u64 {
        self.quota.used.load(Ordering::Relaxed)
    }

    /// A zeroed buffer of `size` bytes, counted against the quota.
    pub fn create(&self, size: u64) -> Result<Buffer, GpuError> {
        let quota = &self.quota;
        quota
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(size).filter(|&total| total <= quota.limit)
            })
            .map_err(|used| {
                GpuError::new(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "a {size}-byte buffer would pass the function's gpu memory quota of {} \
                         bytes ({used} in use); free buffers or ask for more",
                        quota.limit
                    ),
                )
            })?;
        // Counted from here: a failed allocation gives it back as the buffer drops.
        let memory = match self.backend.alloc(size) {
            Ok(memory) => memory,
            Err(e) => {
                quota.used.fetch_sub(size, Ordering::Relaxed);
                return Err(e);
            }
        };
        Ok(Buffer {
            memory: Mutex::new(memory),
            size,
            quota: quota.clone(),
        })
    }

    /// A buffer holding `bytes`.
    pub fn from_bytes(&self, bytes: &[u8]) -> Result<Buffer, GpuError> {
        let buffer = self.create(bytes.len() as u64)?;
        self.write(&buffer, 0, bytes)?;
        Ok(buffer)
    }

    /// Writes `bytes` at `offset`.
    pub fn write(&self, buffer: &Buffer, offset: u64, bytes: &[u8]) -> Result<(), GpuError> {
        range(buffer, offset, bytes.len() as u64, "write")?;
        self.backend.write(&mut buffer.lock(), offset, bytes)
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&self, buffer: &Buffer, offset: u64, len: u64) -> Result<Vec<u8>, GpuError> {
        range(buffer, offset, len, "read")?;
        self.backend.read(&buffer.lock(), offset, len)
    }

    /// Copies `len` bytes from `src` at `src_offset` to `dst` at `dst_offset` (the ranges may
    /// overlap in one buffer).
    pub fn copy(
        &self,
        src: &Buffer,
        src_offset: u64,
        dst: &Buffer,
        dst_offset: u64,
        len: u64,
    ) -> Result<(), GpuError> {
        range(src, src_offset, len, "copy source")?;
        range(dst, dst_offset, len, "copy destination")?;
        if std::ptr::eq(src, dst) {
            let bytes = self.backend.read(&src.lock(), src_offset, len)?;
            return self.backend.write(&mut dst.lock(), dst_offset, &bytes);
        }
        let from = src.lock();
        self.backend
            .copy(&from, src_offset, &mut dst.lock(), dst_offset, len)
    }

    /// Runs `op` on `inputs` into `out`.
    pub fn run(
        &self,
        op: Op,
        inputs: &[(&Buffer, &Layout)],
        out: (&Buffer, &Layout),
    ) -> Result<(), GpuError> {
        for (i, (buffer, layout)) in inputs.iter().enumerate() {
            layout.check(buffer.size, &format!("{op:?} input {i}"))?;
        }
        out.1.check(out.0.size, &format!("{op:?} output"))?;
        let layouts: Vec<&Layout> = inputs.iter().map(|(_, l)| *l).collect();
        let shape = check_op(op, &layouts, out.1)?;
        // An input in the output's buffer is read from a copy, as it was before the op, so
        // the backend never sees an input and its output share memory.
        let mut copies = Vec::new();
        for (i, (buffer, layout)) in inputs.iter().enumerate() {
            if !std::ptr::eq(*buffer, out.0) {
                continue;
            }
            let mut copy = self.backend.alloc(layout.bytes())?;
            self.backend
                .copy(&out.0.lock(), layout.offset, &mut copy, 0, layout.bytes())?;
            copies.push((i, copy));
        }
        let moved: Vec<(usize, Layout)> = copies
            .iter()
            .map(|(i, _)| {
                let at_start = Layout {
                    offset: 0,
                    ..layouts[*i].clone()
                };
                (*i, at_start)
            })
            .collect();
        // Each other buffer locked once, however many inputs view it.
        let mut held: Vec<(&Buffer, MutexGuard<'_, Memory>)> = Vec::new();
        for (buffer, _) in inputs {
            if !std::ptr::eq(*buffer, out.0) && !held.iter().any(|(b, _)| std::ptr::eq(*b, *buffer))
            {
                held.push((*buffer, buffer.lock()));
            }
        }
        let operands: Vec<(&Memory, &Layout)> = inputs
            .iter()
            .enumerate()
            .map(
                |(i, (buffer, layout))| match copies.iter().position(|(j, _)| *j == i) {
                    Some(at) => (&copies[at].1, &moved[at].1),
                    None => {
                        let (_, guard) = held
                            .iter()
                            .find(|(b, _)| std::ptr::eq(*b, *buffer))
                            .expect("every input outside the output's buffer is locked");
                        (&**guard, *layout)
                    }
                },
            )
            .collect();
        let mut target = out.0.lock();
        self.backend.run(op, shape, &operands, (&mut target, out.1))
    }

    /// Waits for every op issued so far.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.backend.synchronize()
    }

    /// Compiles `function` of the PTX module `ptx`, if this instance may run kernels.
    pub fn load_kernel(&self, ptx: &str, function: &str) -> Result<Kernel, GpuError> {
        if !self.kernels {
            return Err(GpuError::new(
                ErrorCode::Unavailable,
                "this function did not ask for PTX kernels: set `gpu_kernels = true` beside                  `gpu` for it in lode.toml (kernels run raw device code, so an app must ask)",
            ));
        }
        if ptx.contains('\0') || function.contains('\0') {
            return Err(GpuError::argument(
                "a PTX module or function name holds a NUL byte".to_string(),
            ));
        }
        self.backend.load_kernel(ptx, function)
    }

    /// Runs `kernel` with `args`. The kernel is raw device code: what it reads and writes
    /// is its own business, which is why loading one takes the capability.
    pub fn launch(
        &self,
        kernel: &Kernel,
        shape: LaunchShape,
        args: &[Argument<'_>],
    ) -> Result<(), GpuError> {
        let (g, b) = (shape.grid, shape.block);
        if [g.0, g.1, g.2, b.0, b.1, b.2].contains(&0) {
            return Err(GpuError::argument(format!(
                "a launch needs at least one block and one thread in each dimension (grid \
                 {g:?}, block {b:?})"
            )));
        }
        let threads = u64::from(b.0) * u64::from(b.1) * u64::from(b.2);
        if threads > 1024 {
            return Err(GpuError::argument(format!(
                "a block of {threads} threads is more than the 1024 a block may have"
            )));
        }
        // Each buffer locked once, however many arguments name it.
        let mut held: Vec<(&Buffer, MutexGuard<'_, Memory>)> = Vec::new();
        for arg in args {
            if let Argument::Buffer(buffer) = arg
                && !held.iter().any(|(b, _)| std::ptr::eq(*b, *buffer))
            {
                held.push((*buffer, buffer.lock()));
            }
        }
        let passed: Vec<KernelArg<'_>> = args
            .iter()
            .map(|arg| match arg {
                Argument::Buffer(buffer) => {
                    let (_, guard) = held
                        .iter()
                        .find(|(b, _)| std::ptr::eq(*b, *buffer))
                        .expect("every buffer argument is locked");
                    KernelArg::Buffer(guard)
                }
                Argument::I32(v) => KernelArg::I32(*v),
                Argument::U32(v) => KernelArg::U32(*v),
                Argument::F32(v) => KernelArg::F32(*v),
                Argument::U64(v) => KernelArg::U64(*v),
            })
            .collect();
        self.backend.launch(kernel, shape, &passed)
    }
}
