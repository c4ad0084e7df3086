//! The backends behind `lode:gpu`, one per cargo feature (as `wasmtime-wasi-nn` lays out
//! its own): [`cpu`] always, `cuda` with the `cuda` feature. A backend gets only checked
//! calls: views inside their buffers, shapes that fit their op, and an output that never
//! shares memory with an input ([`crate::Gpu`] sees to all three).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::tensor::{DType, GpuError, Layout, Op, Shape};

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
}

/// A memory of another backend's kind, which a backend cannot use.
pub(crate) fn foreign() -> GpuError {
    GpuError::argument("a buffer of another backend was passed".to_string())
}
