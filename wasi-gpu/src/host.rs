//! `lode:gpu` for wasmtime: the `bindgen!` of `wit/gpu.wit` and its host side over a
//! [`Gpu`]. Buffers live in the store's resource table and go with the instance; a handle
//! that is not a buffer of this instance traps, while everything the guest can get wrong
//! (shapes, ranges, the quota) comes back as a `lode:gpu` error it can handle.

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::backend::{Kernel, LaunchShape};
use crate::context::{Argument, Buffer, Gpu};
use crate::tensor::{DType, ErrorCode, GpuError, Layout, Op};

/// The bindings `bindgen!` makes from the WIT (documented there).
#[allow(missing_docs)]
mod generated {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "gpu",
        with: {
            "lode:gpu/types.buffer": crate::context::Buffer,
            "lode:gpu/kernels.kernel": crate::backend::Kernel,
        },
        imports: { default: trappable },
    });
}

use generated::lode::gpu::{devices, kernels, ops, types};

/// What a store hands the `lode:gpu` host functions: the instance's GPU and the store's
/// resource table.
pub struct GpuView<'a> {
    /// The instance's GPU.
    pub gpu: &'a Gpu,
    /// The store's resource table, where buffers live.
    pub table: &'a mut ResourceTable,
}

/// [`HasData`] for [`GpuView`].
pub struct HasGpu;

impl HasData for HasGpu {
    type Data<'a> = GpuView<'a>;
}

/// Adds `lode:gpu` to `linker`; `view` finds the GPU and the table in the store's data.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> GpuView<'_>,
) -> wasmtime::Result<()> {
    types::add_to_linker::<T, HasGpu>(linker, view)?;
    devices::add_to_linker::<T, HasGpu>(linker, view)?;
    ops::add_to_linker::<T, HasGpu>(linker, view)?;
    kernels::add_to_linker::<T, HasGpu>(linker, view)?;
    Ok(())
}

impl From<GpuError> for types::Error {
    fn from(e: GpuError) -> Self {
        types::Error {
            code: match e.code {
                ErrorCode::Unavailable => types::ErrorCode::Unavailable,
                ErrorCode::OutOfMemory => types::ErrorCode::OutOfMemory,
                ErrorCode::QuotaExceeded => types::ErrorCode::QuotaExceeded,
                ErrorCode::BadShape => types::ErrorCode::BadShape,
                ErrorCode::BadArgument => types::ErrorCode::BadArgument,
                ErrorCode::KernelFailed => types::ErrorCode::KernelFailed,
            },
            message: e.message,
        }
    }
}

fn dtype(d: types::Dtype) -> DType {
    match d {
        types::Dtype::F32 => DType::F32,
        types::Dtype::F16 => DType::F16,
        types::Dtype::Bf16 => DType::Bf16,
    }
}

fn wit_dtype(d: DType) -> types::Dtype {
    match d {
        DType::F32 => types::Dtype::F32,
        DType::F16 => types::Dtype::F16,
        DType::Bf16 => types::Dtype::Bf16,
    }
}

type Answer<T> = wasmtime::Result<Result<T, types::Error>>;

fn answer<T>(result: Result<T, GpuError>) -> Answer<T> {
    Ok(result.map_err(types::Error::from))
}

impl types::Host for GpuView<'_> {}

impl types::HostBuffer for GpuView<'_> {
    fn create(&mut self, size: u64) -> Answer<Resource<Buffer>> {
        match self.gpu.create(size) {
            Ok(buffer) => Ok(Ok(self.table.push(buffer)?)),
            Err(e) => answer(Err(e)),
        }
    }

    fn from_bytes(&mut self, bytes: Vec<u8>) -> Answer<Resource<Buffer>> {
        match self.gpu.from_bytes(&bytes) {
            Ok(buffer) => Ok(Ok(self.table.push(buffer)?)),
            Err(e) => answer(Err(e)),
        }
    }

    fn size(&mut self, buffer: Resource<Buffer>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&buffer)?.size())
    }

    fn write(&mut self, buffer: Resource<Buffer>, offset: u64, bytes: Vec<u8>) -> Answer<()> {
        let buffer = self.table.get(&buffer)?;
        answer(self.gpu.write(buffer, offset, &bytes))
    }

    fn read(&mut self, buffer: Resource<Buffer>, offset: u64, len: u64) -> Answer<Vec<u8>> {
        let buffer = self.table.get(&buffer)?;
        answer(self.gpu.read(buffer, offset, len))
    }

    fn drop(&mut self, buffer: Resource<Buffer>) -> wasmtime::Result<()> {
        self.table.delete(buffer)?;
        Ok(())
    }
}

impl devices::Host for GpuView<'_> {
    fn current(&mut self) -> wasmtime::Result<types::Device> {
        let device = self.gpu.device();
        Ok(types::Device {
            name: device.name,
            backend: device.backend.to_string(),
            memory_bytes: device.memory_bytes,
            dtypes: device.dtypes.into_iter().map(wit_dtype).collect(),
        })
    }

    fn synchronize(&mut self) -> Answer<()> {
        answer(self.gpu.synchronize())
    }
}

impl GpuView<'_> {
    /// Runs `op` on the guest's tensors.
    fn run(&mut self, op: Op, inputs: Vec<types::Tensor>, out: types::Tensor) -> Answer<()> {
        let layout = |t: &types::Tensor| Layout {
            dtype: dtype(t.dtype),
            shape: t.shape.clone(),
            offset: t.offset,
        };
        let layouts: Vec<Layout> = inputs.iter().map(layout).collect();
        let out_layout = layout(&out);
        let mut buffers = Vec::with_capacity(inputs.len());
        for tensor in &inputs {
            buffers.push(self.table.get(&tensor.buffer)?);
        }
        let operands: Vec<(&Buffer, &Layout)> = buffers.into_iter().zip(&layouts).collect();
        let out_buffer = self.table.get(&out.buffer)?;
        answer(self.gpu.run(op, &operands, (out_buffer, &out_layout)))
    }
}

impl ops::Host for GpuView<'_> {
    fn matmul(
        &mut self,
        a: types::Tensor,
        b: types::Tensor,
        out: types::Tensor,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Answer<()> {
        let op = Op::Matmul {
            transpose_a,
            transpose_b,
        };
        self.run(op, vec![a, b], out)
    }

    fn add(&mut self, a: types::Tensor, b: types::Tensor, out: types::Tensor) -> Answer<()> {
        self.run(Op::Add, vec![a, b], out)
    }

    fn mul(&mut self, a: types::Tensor, b: types::Tensor, out: types::Tensor) -> Answer<()> {
        self.run(Op::Mul, vec![a, b], out)
    }

    fn scale(&mut self, a: types::Tensor, factor: f32, out: types::Tensor) -> Answer<()> {
        self.run(Op::Scale(factor), vec![a], out)
    }

    fn relu(&mut self, a: types::Tensor, out: types::Tensor) -> Answer<()> {
        self.run(Op::Relu, vec![a], out)
    }

    fn gelu(&mut self, a: types::Tensor, out: types::Tensor) -> Answer<()> {
        self.run(Op::Gelu, vec![a], out)
    }

    fn softmax(&mut self, a: types::Tensor, axis: u32, out: types::Tensor) -> Answer<()> {
        self.run(Op::Softmax { axis }, vec![a], out)
    }

    fn layernorm(
        &mut self,
        a: types::Tensor,
        gamma: types::Tensor,
        beta: types::Tensor,
        eps: f32,
        out: types::Tensor,
    ) -> Answer<()> {
        self.run(Op::LayerNorm { eps }, vec![a, gamma, beta], out)
    }

    fn sum(&mut self, a: types::Tensor, axis: u32, out: types::Tensor) -> Answer<()> {
        self.run(Op::Sum { axis }, vec![a], out)
    }

    fn copy(
        &mut self,
        src: Resource<Buffer>,
        src_offset: u64,
        dst: Resource<Buffer>,
        dst_offset: u64,
        len: u64,
    ) -> Answer<()> {
        let (src, dst) = (self.table.get(&src)?, self.table.get(&dst)?);
        answer(self.gpu.copy(src, src_offset, dst, dst_offset, len))
    }
}

impl kernels::Host for GpuView<'_> {}

impl kernels::HostKernel for GpuView<'_> {
    fn load(&mut self, ptx: String, function: String) -> Answer<Resource<Kernel>> {
        match self.gpu.load_kernel(&ptx, &function) {
            Ok(kernel) => Ok(Ok(self.table.push(kernel)?)),
            Err(e) => answer(Err(e)),
        }
    }

    fn launch(
        &mut self,
        kernel: Resource<Kernel>,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        arguments: Vec<kernels::Argument>,
    ) -> Answer<()> {
        let mut args = Vec::with_capacity(arguments.len());
        for argument in &arguments {
            args.push(match argument {
                kernels::Argument::Buffer(buffer) => Argument::Buffer(self.table.get(buffer)?),
                kernels::Argument::I32(v) => Argument::I32(*v),
                kernels::Argument::U32(v) => Argument::U32(*v),
                kernels::Argument::F32(v) => Argument::F32(*v),
                kernels::Argument::U64(v) => Argument::U64(*v),
            });
        }
        let shape = LaunchShape {
            grid,
            block,
            shared_bytes,
        };
        answer(self.gpu.launch(self.table.get(&kernel)?, shape, &args))
    }

    fn drop(&mut self, kernel: Resource<Kernel>) -> wasmtime::Result<()> {
        self.table.delete(kernel)?;
        Ok(())
    }
}
