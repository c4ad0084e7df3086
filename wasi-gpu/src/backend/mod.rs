//! The backends behind `lode:gpu`, one per cargo feature (as `wasmtime-wasi-nn` lays out
//! its own): [`cpu`] always, `cuda` with the `cuda` feature. A backend gets only checked
//! calls: views inside their buffers, shapes that fit their op, and an output that never
//! shares memory with an input ([`crate::Gpu`] sees to all three).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::tensor::{DType, ErrorCode, GpuError, Layout, Op, Shape};

/// A device a backend computes on.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// `cpu`, or the GPU's own name.
    pub name: String,
    /// `cpu` or `cuda`.
    pub backend: &'static str,
    /// Memory it has for buffers, in bytes.
    pub memory_bytes: u64,
    /// The dtypes its ops take.
    pub dtypes: Vec<DType>,
}

/// Memory a backend allocated, of its own kind.
pub enum Memory {
    /// Host memory.
    Cpu(cpu::CpuMemory),
    /// Device memory on a CUDA GPU.
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaMemory),
}

impl Memory {
    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Memory::Cpu(m) => m.size(),
            #[cfg(feature = "cuda")]
            Memory::Cuda(m) => m.size(),
        }
    }
}

/// A kernel a backend compiled from PTX. Only the CUDA backend has them; without it this
/// type has no values.
pub enum Kernel {
    /// A CUDA module's entry point.
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaKernel),
}

/// A kernel argument, passed by value; a buffer is passed as its device address.
pub enum KernelArg<'a> {
    /// A buffer's memory.
    Buffer(&'a Memory),
    /// A signed 32-bit integer.
    I32(i32),
    /// An unsigned 32-bit integer.
    U32(u32),
    /// A 32-bit float.
    F32(f32),
    /// An unsigned 64-bit integer.
    U64(u64),
}

/// Where and how wide a kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchShape {
    /// Blocks in the grid, per dimension.
    pub grid: (u32, u32, u32),
    /// Threads in a block, per dimension.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, in bytes.
    pub shared_bytes: u32,
}

/// One input or the output of an op: memory and the view of it.
pub type Operand<'a> = (&'a Memory, &'a Layout);

/// A place ops run and buffers live.
pub trait Backend: Send + Sync {
    /// The device.
    fn device(&self) -> Device;
    /// Zeroed memory of `bytes`.
    fn alloc(&self, bytes: u64) -> Result<Memory, GpuError>;
    /// Writes `bytes` at `offset` (inside the memory).
    fn write(&self, memory: &mut Memory, offset: u64, bytes: &[u8]) -> Result<(), GpuError>;
    /// Reads `len` bytes at `offset` (inside the memory).
    fn read(&self, memory: &Memory, offset: u64, len: u64) -> Result<Vec<u8>, GpuError>;
    /// Copies `len` bytes between two memories (both ranges inside).
    fn copy(
        &self,
        src: &Memory,
        src_offset: u64,
        dst: &mut Memory,
        dst_offset: u64,
        len: u64,
    ) -> Result<(), GpuError>;
    /// Runs `op`, whose sizes are `shape`, on `inputs` into `out`.
    fn run(
        &self,
        op: Op,
        shape: Shape,
        inputs: &[Operand<'_>],
        out: (&mut Memory, &Layout),
    ) -> Result<(), GpuError>;
    /// Waits for every op issued so far.
    fn synchronize(&self) -> Result<(), GpuError>;
    /// Compiles `function` of the PTX module `ptx`. Backends without kernels say so.
    fn load_kernel(&self, ptx: &str, function: &str) -> Result<Kernel, GpuError> {
        let _ = (ptx, function);
        Err(GpuError::new(
            ErrorCode::Unavailable,
            format!(
                "PTX kernels need the CUDA backend; this instance runs on {}",
                self.device().backend
            ),
        ))
    }
    /// Whether the device can no longer be used (a guest's kernel faulted): whoever keeps
    /// this backend for later instances opens a new one instead.
    fn broken(&self) -> bool {
        false
    }
    /// Runs `kernel` (one this backend loaded) with `args`.
    fn launch(
        &self,
        kernel: &Kernel,
        shape: LaunchShape,
        args: &[KernelArg<'_>],
    ) -> Result<(), GpuError> {
        let _ = (shape, args);
        match *kernel {
            #[cfg(feature = "cuda")]
            Kernel::Cuda(_) => Err(foreign_kernel()),
        }
    }
}

/// A kernel of another backend's kind.
#[cfg(feature = "cuda")]
pub(crate) fn foreign_kernel() -> GpuError {
    GpuError::argument("a kernel of another backend was passed".to_string())
}

/// A memory of another backend's kind, which a backend cannot use.
pub(crate) fn foreign() -> GpuError {
    GpuError::argument("a buffer of another backend was passed".to_string())
}
