//! The CUDA backend (feature `cuda`): buffers in device memory through cudarc, loaded at run
//! time (dynamic loading), so it builds and starts anywhere and answers `unavailable` where no
//! driver is found. Matmul is cuBLAS's sgemm (row-major through the usual swap of operands);
//! the other ops are small kernels compiled by NVRTC when the backend opens. f32 only for now.
//!
//! cudarc panics on a call without a driver rather than returning an error, so every library
//! is checked with `is_culib_present` before anything else touches it.

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, LaunchConfig,
    PushKernelArg,
};

use super::{Backend, Device, Kernel, KernelArg, LaunchShape, Memory, Operand, foreign};
use crate::tensor::{DType, ErrorCode, GpuError, Layout, Op, Shape};

/// Device memory.
pub struct CudaMemory {
    slice: std::mem::ManuallyDrop<CudaSlice<u8>>,
    size: u64,
}

impl Drop for CudaMemory {
    /// Zeroed before it goes back to the device's memory pool, where freed memory stays
    /// mapped: a later holder's PTX kernel could otherwise read what this one left there.
    /// Where zeroing fails (a broken context), the memory is leaked rather than freed
    /// unzeroed; the broken context is replaced anyway.
    fn drop(&mut self) {
        let stream = self.slice.stream().clone();
        if stream.memset_zeros(&mut *self.slice).is_ok() {
            // SAFETY: dropped once, here, and never used again.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.slice) };
        }
    }
}

impl CudaMemory {
    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// The kernels for every op but matmul.
const KERNELS: &str = r#"
typedef unsigned long long u64;
__device__ u64 index() { return blockIdx.x * (u64)blockDim.x + threadIdx.x; }
extern "C" __global__ void add_f32(const float* a, const float* b, float* out, u64 n) {
    u64 i = index(); if (i < n) out[i] = a[i] + b[i];
}
extern "C" __global__ void mul_f32(const float* a, const float* b, float* out, u64 n) {
    u64 i = index(); if (i < n) out[i] = a[i] * b[i];
}
extern "C" __global__ void scale_f32(const float* a, float factor, float* out, u64 n) {
    u64 i = index(); if (i < n) out[i] = a[i] * factor;
}
extern "C" __global__ void relu_f32(const float* a, float* out, u64 n) {
    u64 i = index(); if (i < n) out[i] = fmaxf(a[i], 0.0f);
}
extern "C" __global__ void gelu_f32(const float* a, float* out, u64 n) {
    u64 i = index();
    if (i < n) { float x = a[i]; out[i] = 0.5f * x * (1.0f + tanhf(0.7978846f * (x + 0.044715f * x * x * x))); }
}
extern "C" __global__ void softmax_f32(const float* a, float* out, u64 outer, u64 len, u64 inner) {
    u64 r = index(); if (r >= outer * inner) return;
    u64 base = (r / inner) * len * inner + r % inner;
    float m = -INFINITY;
    for (u64 j = 0; j < len; j++) m = fmaxf(m, a[base + j * inner]);
    float total = 0.0f;
    for (u64 j = 0; j < len; j++) { float e = expf(a[base + j * inner] - m); out[base + j * inner] = e; total += e; }
    for (u64 j = 0; j < len; j++) out[base + j * inner] /= total;
}
extern "C" __global__ void layernorm_f32(const float* a, const float* g, const float* b, float eps, float* out, u64 rows, u64 len) {
    u64 r = index(); if (r >= rows) return;
    const float* x = a + r * len; float* y = out + r * len;
    float mean = 0.0f; for (u64 j = 0; j < len; j++) mean += x[j]; mean /= len;
    float var = 0.0f; for (u64 j = 0; j < len; j++) { float d = x[j] - mean; var += d * d; } var /= len;
    float s = rsqrtf(var + eps);
    for (u64 j = 0; j < len; j++) y[j] = (x[j] - mean) * s * g[j] + b[j];
}
extern "C" __global__ void sum_f32(const float* a, float* out, u64 outer, u64 len, u64 inner) {
    u64 r = index(); if (r >= outer * inner) return;
    u64 base = (r / inner) * len * inner + r % inner;
    float total = 0.0f;
    for (u64 j = 0; j < len; j++) total += a[base + j * inner];
    out[r] = total;
}
"#;

struct Kernels {
    add: CudaFunction,
    mul: CudaFunction,
    scale: CudaFunction,
    relu: CudaFunction,
    gelu: CudaFunction,
    softmax: CudaFunction,
    layernorm: CudaFunction,
    sum: CudaFunction,
}

/// One CUDA device.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    /// Set when a guest's kernel faulted, which poisons a CUDA context for good.
    broken: std::sync::atomic::AtomicBool,
}

fn unavailable(what: impl std::fmt::Display) -> String {
    format!("the CUDA backend is unavailable: {what}")
}

fn failed(e: impl std::fmt::Debug) -> GpuError {
    GpuError::new(ErrorCode::KernelFailed, format!("CUDA: {e:?}"))
}

/// Whether the CUDA libraries this backend loads are on this host: the driver, cuBLAS and
/// NVRTC. Safe to call anywhere; nothing else in cudarc is touched before it says yes.
pub fn probe() -> Result<(), String> {
    // SAFETY: these only try to load the libraries.
    let present = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
        )
    };
    match present {
        (false, _, _) => Err(unavailable("no CUDA driver (libcuda.so) on this host")),
        (_, false, _) => Err(unavailable("no cuBLAS (libcublas.so) on this host")),
        (_, _, false) => Err(unavailable("no NVRTC (libnvrtc.so) on this host")),
        _ => Ok(()),
    }
}

/// A kernel loaded from a guest's PTX: the module stays loaded while it lives.
pub struct CudaKernel {
    function: CudaFunction,
    /// Each parameter's size in bytes, as the driver reads them: a launch must pass exactly
    /// these, or the driver would read past the arguments it was given.
    params: Vec<usize>,
    _module: Arc<CudaModule>,
}

/// The sizes of `function`'s parameters, from the driver (`cuFuncGetParamInfo`, CUDA 12.4).
/// An older driver lacks the call, and cudarc panics on a missing symbol: that is caught and
/// answered as a refusal, since a launch whose arguments cannot be checked is not safe.
fn parameter_sizes(function: &CudaFunction) -> Result<Vec<usize>, GpuError> {
    use cudarc::driver::sys::{CUresult, cuFuncGetParamInfo};
    let raw = function.cu_function();
    let described = std::panic::catch_unwind(|| {
        let mut sizes = Vec::new();
        loop {
            let (mut offset, mut size) = (0usize, 0usize);
            // SAFETY: a function the driver loaded; two out-parameters of the right type.
            let got = unsafe { cuFuncGetParamInfo(raw, sizes.len(), &mut offset, &mut size) };
            match got {
                CUresult::CUDA_SUCCESS => sizes.push(size),
                CUresult::CUDA_ERROR_INVALID_VALUE => return Ok(sizes),
                other => return Err(other),
            }
            if sizes.len() > 4096 {
                return Ok(sizes);
            }
        }
    });
    match described {
        Ok(Ok(sizes)) => Ok(sizes),
        Ok(Err(e)) => Err(failed(e)),
        Err(_) => Err(GpuError::new(
            ErrorCode::Unavailable,
            "this NVIDIA driver is older than CUDA 12.4 and cannot describe a kernel's \
             parameters, so a launch's arguments cannot be checked; PTX kernels need a newer \
             driver",
        )),
    }
}

/// The bytes an argument takes.
fn argument_size(arg: &KernelArg<'_>) -> usize {
    match arg {
        KernelArg::Buffer(_) | KernelArg::U64(_) => 8,
        KernelArg::I32(_) | KernelArg::U32(_) | KernelArg::F32(_) => 4,
    }
}

impl Cuda {
    /// The device at PCI address `bus_id` (`0000:3b:00.0`, as the driver's listing names
    /// it): CUDA numbers its devices in an order of its own, so the address is what ties
    /// the device the allocator leased to CUDA's.
    pub fn open_bus(bus_id: &str) -> Result<Self, String> {
        probe()?;
        let count = CudaContext::device_count().map_err(unavailable)?;
        for ordinal in 0..count.max(0) {
            let device = cudarc::driver::result::device::get(ordinal).map_err(unavailable)?;
            let mut name = [0 as std::ffi::c_char; 32];
            // SAFETY: a buffer of the length passed; the driver writes a NUL-terminated id.
            let got =
                unsafe { cudarc::driver::sys::cuDeviceGetPCIBusId(name.as_mut_ptr(), 32, device) };
            if got != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
                return Err(unavailable(format!(
                    "the PCI address of device {ordinal}: {got:?}"
                )));
            }
            // SAFETY: NUL-terminated within the buffer, as above.
            let id = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy();
            if id.eq_ignore_ascii_case(bus_id) {
                return Self::open(ordinal as usize);
            }
        }
        Err(unavailable(format!(
            "CUDA lists no device at PCI address {bus_id} ({count} device(s) seen)"
        )))
    }

    /// Device `ordinal` in CUDA's numbering, or why it cannot be used here.
    pub fn open(ordinal: usize) -> Result<Self, String> {
        probe()?;
        let count = CudaContext::device_count().map_err(unavailable)?;
        if ordinal >= count.max(0) as usize {
            return Err(unavailable(format!(
                "device {ordinal} asked for, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(unavailable)?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(unavailable)?;
        let ptx = cudarc::nvrtc::compile_ptx(KERNELS).map_err(unavailable)?;
        let module = ctx.load_module(ptx).map_err(unavailable)?;
        let load = |name: &str| module.load_function(name).map_err(unavailable);
        let kernels = Kernels {
            add: load("add_f32")?,
            mul: load("mul_f32")?,
            scale: load("scale_f32")?,
            relu: load("relu_f32")?,
            gelu: load("gelu_f32")?,
            softmax: load("softmax_f32")?,
            layernorm: load("layernorm_f32")?,
            sum: load("sum_f32")?,
        };
        Ok(Self {
            ctx,
            stream,
            blas,
            kernels,
            broken: Default::default(),
        })
    }
}

impl Cuda {
    /// The seconds a copy of `bytes` from pinned host memory into device memory takes: the
    /// baseline `lode bench gpu` holds a buffer upload to.
    pub fn time_pinned_upload(&self, bytes: usize) -> Result<std::time::Duration, GpuError> {
        // SAFETY: the pinned memory is written in full before it is read.
        let mut pinned = unsafe { self.ctx.alloc_pinned::<u8>(bytes) }.map_err(failed)?;
        pinned.as_mut_slice().map_err(failed)?.fill(7);
        let mut device = self.stream.alloc_zeros::<u8>(bytes).map_err(failed)?;
        self.stream.synchronize().map_err(failed)?;
        let started = std::time::Instant::now();
        self.stream
            .memcpy_htod(&pinned, &mut device)
            .map_err(failed)?;
        self.stream.synchronize().map_err(failed)?;
        Ok(started.elapsed())
    }
}

fn cuda(memory: &Memory) -> Result<&CudaMemory, GpuError> {
    match memory {
        Memory::Cuda(m) => Ok(m),
        _ => Err(foreign()),
    }
}

fn cuda_mut(memory: &mut Memory) -> Result<&mut CudaMemory, GpuError> {
    match memory {
        Memory::Cuda(m) => Ok(m),
        _ => Err(foreign()),
    }
}

/// A view's elements as f32 on the device.
fn floats<'a>(memory: &'a CudaMemory, layout: &Layout) -> Result<CudaView<'a, f32>, GpuError> {
    let start = layout.offset as usize;
    let view = memory.slice.slice(start..start + layout.bytes() as usize);
    // SAFETY: the view is inside the memory (checked by the context), 4-byte aligned (the
    // offset is a multiple of the dtype's size), and any bytes are a valid f32.
    unsafe { view.transmute::<f32>(layout.elements() as usize) }
        .ok_or_else(|| GpuError::shape("a view does not hold whole f32 values".to_string()))
}

fn launch_config(n: usize) -> LaunchConfig {
    LaunchConfig::for_num_elems(u32::try_from(n).unwrap_or(u32::MAX))
}

impl Backend for Cuda {
    fn device(&self) -> Device {
        Device {
            name: self.ctx.name().unwrap_or_else(|_| "CUDA device".into()),
            backend: "cuda",
            memory_bytes: self.ctx.total_mem().unwrap_or(0) as u64,
            dtypes: vec![DType::F32],
        }
    }

    fn alloc(&self, bytes: u64) -> Result<Memory, GpuError> {
        let slice = self.stream.alloc_zeros::<u8>(bytes as usize).map_err(|e| {
            GpuError::new(
                ErrorCode::OutOfMemory,
                format!("the device has no room for {bytes} more bytes ({e:?})"),
            )
        })?;
        Ok(Memory::Cuda(CudaMemory {
            slice: std::mem::ManuallyDrop::new(slice),
            size: bytes,
        }))
    }

    fn write(&self, memory: &mut Memory, offset: u64, bytes: &[u8]) -> Result<(), GpuError> {
        let memory = cuda_mut(memory)?;
        let at = offset as usize;
        let mut view = memory.slice.slice_mut(at..at + bytes.len());
        self.stream.memcpy_htod(bytes, &mut view).map_err(failed)
    }

    fn read(&self, memory: &Memory, offset: u64, len: u64) -> Result<Vec<u8>, GpuError> {
        let memory = cuda(memory)?;
        let at = offset as usize;
        let view = memory.slice.slice(at..at + len as usize);
        self.stream.clone_dtoh(&view).map_err(failed)
    }

    fn copy(
        &self,
        src: &Memory,
        src_offset: u64,
        dst: &mut Memory,
        dst_offset: u64,
        len: u64,
    ) -> Result<(), GpuError> {
        let (s, d, n) = (src_offset as usize, dst_offset as usize, len as usize);
        let from = cuda(src)?.slice.slice(s..s + n);
        let mut to = cuda_mut(dst)?.slice.slice_mut(d..d + n);
        self.stream.memcpy_dtod(&from, &mut to).map_err(failed)
    }

    fn run(
        &self,
        op: Op,
        shape: Shape,
        inputs: &[Operand<'_>],
        out: (&mut Memory, &Layout),
    ) -> Result<(), GpuError> {
        if inputs.iter().any(|(_, l)| l.dtype != DType::F32) || out.1.dtype != DType::F32 {
            return Err(GpuError::argument(
                "the CUDA backend takes f32 tensors only so far".to_string(),
            ));
        }
        let ins = inputs
            .iter()
            .map(|(m, l)| cuda(m).and_then(|m| floats(m, l)))
            .collect::<Result<Vec<_>, _>>()?;
        let layout = out.1;
        let memory = cuda_mut(out.0)?;
        let start = layout.offset as usize;
        let mut bytes = memory
            .slice
            .slice_mut(start..start + layout.bytes() as usize);
        let count = layout.elements() as usize;
        // SAFETY: as in `floats`.
        let mut dst = unsafe { bytes.transmute_mut::<f32>(count) }
            .ok_or_else(|| GpuError::shape("the output does not hold whole f32 values"))?;
        let n = count as u64;
        let stream = &self.stream;
        let k = &self.kernels;
        // Each launch: the kernels read and write within the views' element counts, which the
        // arguments carry, and the output never overlaps an input.
        let launched = match (op, shape) {
            (
                Op::Matmul {
                    transpose_a,
                    transpose_b,
                },
                Shape::Matmul(d),
            ) => {
                // Row-major C = A x B is column-major C^T = B^T x A^T: B goes first.
                let (m, kk, nn) = (d.m as i32, d.k as i32, d.n as i32);
                let op_of = |t: bool| {
                    if t {
                        cublasOperation_t::CUBLAS_OP_T
                    } else {
                        cublasOperation_t::CUBLAS_OP_N
                    }
                };
                let cfg = GemmConfig {
                    transa: op_of(transpose_b),
                    transb: op_of(transpose_a),
                    m: nn,
                    n: m,
                    k: kk,
                    alpha: 1.0f32,
                    lda: if transpose_b { kk } else { nn },
                    ldb: if transpose_a { m } else { kk },
                    beta: 0.0f32,
                    ldc: nn,
                };
                let (a_len, b_len, c_len) = (d.m * d.k, d.k * d.n, d.m * d.n);
                for i in 0..d.batch {
                    let a = ins[0].slice(i * a_len..(i + 1) * a_len);
                    let b = ins[1].slice(i * b_len..(i + 1) * b_len);
                    let mut c = dst.slice_mut(i * c_len..(i + 1) * c_len);
                    // SAFETY: sizes and leading dimensions fit the three views.
                    unsafe { self.blas.gemm(cfg, &b, &a, &mut c) }.map_err(failed)?;
                }
                return Ok(());
            }
            (Op::Add | Op::Mul, _) => {
                let f = if op == Op::Add { &k.add } else { &k.mul };
                let mut args = stream.launch_builder(f);
                args.arg(&ins[0]).arg(&ins[1]).arg(&mut dst).arg(&n);
                // SAFETY: the arguments match the kernel's, within the views' counts.
                unsafe { args.launch(launch_config(count)) }
            }
            (Op::Scale(factor), _) => {
                let mut args = stream.launch_builder(&k.scale);
                args.arg(&ins[0]).arg(&factor).arg(&mut dst).arg(&n);
                // SAFETY: the arguments match the kernel's, within the views' counts.
                unsafe { args.launch(launch_config(count)) }
            }
            (Op::Relu | Op::Gelu, _) => {
                let f = if op == Op::Relu { &k.relu } else { &k.gelu };
                let mut args = stream.launch_builder(f);
                args.arg(&ins[0]).arg(&mut dst).arg(&n);
                // SAFETY: the arguments match the kernel's, within the views' counts.
                unsafe { args.launch(launch_config(count)) }
            }
            (Op::Softmax { .. } | Op::Sum { .. }, Shape::Axis(d)) => {
                let f = if matches!(op, Op::Softmax { .. }) {
                    &k.softmax
                } else {
                    &k.sum
                };
                let (outer, len, inner) = (d.outer as u64, d.len as u64, d.inner as u64);
                let mut args = stream.launch_builder(f);
                args.arg(&ins[0])
                    .arg(&mut dst)
                    .arg(&outer)
                    .arg(&len)
                    .arg(&inner);
                // SAFETY: the arguments match the kernel's, within the views' counts.
                unsafe { args.launch(launch_config(d.outer * d.inner)) }
            }
            (Op::LayerNorm { eps }, Shape::Axis(d)) => {
                let (rows, len) = ((d.outer * d.inner) as u64, d.len as u64);
                let mut args = stream.launch_builder(&k.layernorm);
                args.arg(&ins[0])
                    .arg(&ins[1])
                    .arg(&ins[2])
                    .arg(&eps)
                    .arg(&mut dst)
                    .arg(&rows)
                    .arg(&len);
                // SAFETY: the arguments match the kernel's, within the views' counts.
                unsafe { args.launch(launch_config(rows as usize)) }
            }
            (op, shape) => unreachable!("check_op gave {shape:?} for {op:?}"),
        };
        launched.map(|_| ()).map_err(failed)
    }

    fn synchronize(&self) -> Result<(), GpuError> {
        self.stream.synchronize().map_err(failed)
    }

    fn load_kernel(&self, ptx: &str, function: &str) -> Result<Kernel, GpuError> {
        let compile = |e: &dyn std::fmt::Debug| {
            GpuError::new(
                ErrorCode::KernelFailed,
                format!("loading {function:?} from the PTX: {e:?}"),
            )
        };
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| compile(&e))?;
        let loaded = module.load_function(function).map_err(|e| compile(&e))?;
        let params = parameter_sizes(&loaded)?;
        Ok(Kernel::Cuda(CudaKernel {
            function: loaded,
            params,
            _module: module,
        }))
    }

    fn launch(
        &self,
        kernel: &Kernel,
        shape: LaunchShape,
        args: &[KernelArg<'_>],
    ) -> Result<(), GpuError> {
        let Kernel::Cuda(kernel) = kernel;
        if args.len() != kernel.params.len() {
            return Err(GpuError::argument(format!(
                "the kernel takes {} arguments and {} were given",
                kernel.params.len(),
                args.len()
            )));
        }
        for (i, (arg, want)) in args.iter().zip(&kernel.params).enumerate() {
            if argument_size(arg) != *want {
                return Err(GpuError::argument(format!(
                    "argument {i} is {} bytes, and the kernel's parameter {i} takes {want}",
                    argument_size(arg)
                )));
            }
        }
        let mut slices = Vec::new();
        for arg in args {
            if let KernelArg::Buffer(memory) = arg {
                slices.push(&*cuda(memory)?.slice);
            }
        }
        let mut launch = self.stream.launch_builder(&kernel.function);
        let mut next_slice = slices.iter();
        for arg in args {
            match arg {
                KernelArg::Buffer(_) => {
                    launch.arg(*next_slice.next().expect("one slice per buffer argument"));
                }
                KernelArg::I32(v) => {
                    launch.arg(v);
                }
                KernelArg::U32(v) => {
                    launch.arg(v);
                }
                KernelArg::F32(v) => {
                    launch.arg(v);
                }
                KernelArg::U64(v) => {
                    launch.arg(v);
                }
            }
        }
        let config = LaunchConfig {
            grid_dim: shape.grid,
            block_dim: shape.block,
            shared_mem_bytes: shape.shared_bytes,
        };
        // SAFETY: the arguments match the kernel's parameters in number and size (checked
        // above against the driver's description), so the driver reads only what was given.
        // What the kernel does on the device is the guest's own code, which is why an app must
        // ask for kernels; a fault is reported at the synchronize below, as a kernel failure.
        let ran = unsafe { launch.launch(config) }
            .map(|_| ())
            .and_then(|()| self.stream.synchronize());
        // A kernel's faults surface here rather than in a later, innocent op; they leave the
        // context unusable, so the backend says it is broken and its holder opens another.
        ran.map_err(|e| {
            self.broken
                .store(true, std::sync::atomic::Ordering::Relaxed);
            failed(e)
        })
    }

    fn broken(&self) -> bool {
        self.broken.load(std::sync::atomic::Ordering::Relaxed)
    }
}
