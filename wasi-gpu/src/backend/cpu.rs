//! The CPU backend: buffers in host memory, matmul on `matrixmultiply`'s threaded sgemm
//! (transposes are strides, so they cost nothing), the rest in plain loops. f16 and bf16 are
//! computed in f32 and rounded on the way out, so every dtype gives the f32 path's results.

use std::borrow::Cow;

use half::{bf16, f16};

use super::{Backend, Device, Memory, Operand, foreign};
use crate::tensor::{AxisDims, DType, GpuError, Layout, MatmulDims, Op, Shape};

/// Host memory, 4-byte aligned so f32 views need no copy.
pub struct CpuMemory {
    words: Vec<u32>,
    size: u64,
}

impl CpuMemory {
    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.size as usize]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.size as usize]
    }
}

/// The CPU backend.
#[derive(Debug)]
pub struct Cpu {
    name: String,
}

impl Default for Cpu {
    fn default() -> Self {
        Self { name: "cpu".into() }
    }
}

impl Cpu {
    /// The CPU, computing the work of a GPU the host leased but cannot drive (no CUDA), so
    /// the lease and everything around it can be tested on any machine; its device name says
    /// so.
    pub fn standing_in_for(model: &str) -> Self {
        Self {
            name: format!("cpu (standing in for {model})"),
        }
    }
}

fn cpu(memory: &Memory) -> Result<&CpuMemory, GpuError> {
    match memory {
        Memory::Cpu(m) => Ok(m),
        // Another backend's memory, once there are others.
        #[allow(unreachable_patterns)]
        _ => Err(foreign()),
    }
}

fn cpu_mut(memory: &mut Memory) -> Result<&mut CpuMemory, GpuError> {
    match memory {
        Memory::Cpu(m) => Ok(m),
        // Another backend's memory, once there are others.
        #[allow(unreachable_patterns)]
        _ => Err(foreign()),
    }
}

/// A view's elements as f32: borrowed for f32, converted for the others.
fn floats<'a>(memory: &'a CpuMemory, layout: &Layout) -> Cow<'a, [f32]> {
    let (first, count) = (layout.first(), layout.elements() as usize);
    match layout.dtype {
        DType::F32 => {
            Cow::Borrowed(&bytemuck::cast_slice::<u32, f32>(&memory.words)[first..first + count])
        }
        DType::F16 => Cow::Owned(
            halves::<f16>(memory, first, count)
                .iter()
                .map(|h| h.to_f32())
                .collect(),
        ),
        DType::Bf16 => Cow::Owned(
            halves::<bf16>(memory, first, count)
                .iter()
                .map(|h| h.to_f32())
                .collect(),
        ),
    }
}

fn halves<T: bytemuck::Pod>(memory: &CpuMemory, first: usize, count: usize) -> &[T] {
    &bytemuck::cast_slice::<u32, T>(&memory.words)[first..first + count]
}

/// Rounds `values` into the view.
fn store(memory: &mut CpuMemory, layout: &Layout, values: &[f32]) {
    let first = layout.first();
    match layout.dtype {
        DType::F32 => bytemuck::cast_slice_mut::<u32, f32>(&mut memory.words)
            [first..first + values.len()]
            .copy_from_slice(values),
        DType::F16 => {
            let out = &mut bytemuck::cast_slice_mut::<u32, f16>(&mut memory.words)
                [first..first + values.len()];
            for (o, v) in out.iter_mut().zip(values) {
                *o = f16::from_f32(*v);
            }
        }
        DType::Bf16 => {
            let out = &mut bytemuck::cast_slice_mut::<u32, bf16>(&mut memory.words)
                [first..first + values.len()];
            for (o, v) in out.iter_mut().zip(values) {
                *o = bf16::from_f32(*v);
            }
        }
    }
}

impl Backend for Cpu {
    fn device(&self) -> Device {
        Device {
            name: self.name.clone(),
            backend: "cpu",
            memory_bytes: host_memory(),
            dtypes: vec![DType::F32, DType::F16, DType::Bf16],
        }
    }

    fn alloc(&self, bytes: u64) -> Result<Memory, GpuError> {
        let words = usize::try_from(bytes.div_ceil(4)).map_err(|_| too_big(bytes))?;
        let mut vec = Vec::new();
        vec.try_reserve_exact(words).map_err(|_| too_big(bytes))?;
        vec.resize(words, 0);
        Ok(Memory::Cpu(CpuMemory {
            words: vec,
            size: bytes,
        }))
    }

    fn write(&self, memory: &mut Memory, offset: u64, bytes: &[u8]) -> Result<(), GpuError> {
        let at = offset as usize;
        cpu_mut(memory)?.bytes_mut()[at..at + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn read(&self, memory: &Memory, offset: u64, len: u64) -> Result<Vec<u8>, GpuError> {
        let at = offset as usize;
        Ok(cpu(memory)?.bytes()[at..at + len as usize].to_vec())
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
        cpu_mut(dst)?.bytes_mut()[d..d + n].copy_from_slice(&cpu(src)?.bytes()[s..s + n]);
        Ok(())
    }

    fn run(
        &self,
        op: Op,
        shape: Shape,
        inputs: &[Operand<'_>],
        out: (&mut Memory, &Layout),
    ) -> Result<(), GpuError> {
        let ins = inputs
            .iter()
            .map(|(m, l)| cpu(m).map(|m| floats(m, l)))
            .collect::<Result<Vec<_>, _>>()?;
        let (memory, layout) = (cpu_mut(out.0)?, out.1);
        let count = layout.elements() as usize;
        if layout.dtype == DType::F32 {
            let first = layout.first();
            let dst =
                &mut bytemuck::cast_slice_mut::<u32, f32>(&mut memory.words)[first..first + count];
            compute(op, shape, &ins, dst);
        } else {
            let mut dst = vec![0.0; count];
            compute(op, shape, &ins, &mut dst);
            store(memory, layout, &dst);
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<(), GpuError> {
        Ok(())
    }
}

fn too_big(bytes: u64) -> GpuError {
    GpuError::new(
        crate::tensor::ErrorCode::OutOfMemory,
        format!("the host has no room for {bytes} more bytes"),
    )
}

/// The host's memory, which is what the CPU backend's buffers live in.
fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// The op in f32, from `ins` into `out`.
fn compute(op: Op, shape: Shape, ins: &[Cow<'_, [f32]>], out: &mut [f32]) {
    match (op, shape) {
        (
            Op::Matmul {
                transpose_a,
                transpose_b,
            },
            Shape::Matmul(dims),
        ) => matmul(&ins[0], &ins[1], out, dims, transpose_a, transpose_b),
        (Op::Add, _) => zip_into(&ins[0], &ins[1], out, |a, b| a + b),
        (Op::Mul, _) => zip_into(&ins[0], &ins[1], out, |a, b| a * b),
        (Op::Scale(factor), _) => map_into(&ins[0], out, |a| a * factor),
        (Op::Relu, _) => map_into(&ins[0], out, |a| a.max(0.0)),
        (Op::Gelu, _) => map_into(&ins[0], out, gelu),
        (Op::Softmax { .. }, Shape::Axis(dims)) => softmax(&ins[0], out, dims),
        (Op::LayerNorm { eps }, Shape::Axis(dims)) => {
            layernorm(&ins[0], &ins[1], &ins[2], eps, out, dims)
        }
        (Op::Sum { .. }, Shape::Axis(dims)) => sum(&ins[0], out, dims),
        (op, shape) => unreachable!("check_op gave {shape:?} for {op:?}"),
    }
}

/// The tanh approximation of GELU, as PyTorch's `gelu(approximate="tanh")`.
pub fn gelu(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

fn map_into(a: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32) {
    for (o, &x) in out.iter_mut().zip(a) {
        *o = f(x);
    }
}

fn zip_into(a: &[f32], b: &[f32], out: &mut [f32], f: impl Fn(f32, f32) -> f32) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = f(x, y);
    }
}

fn matmul(
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    d: MatmulDims,
    transpose_a: bool,
    transpose_b: bool,
) {
    let (m, k, n) = (d.m, d.k, d.n);
    // Row and column strides of op(a) [m, k] and op(b) [k, n] in their row-major storage.
    let (rsa, csa) = if transpose_a { (1, m) } else { (k, 1) };
    let (rsb, csb) = if transpose_b { (1, k) } else { (n, 1) };
    for i in 0..d.batch {
        let (a, b) = (&a[i * m * k..][..m * k], &b[i * k * n..][..k * n]);
        let c = &mut out[i * m * n..][..m * n];
        // SAFETY: the pointers cover [m, k], [k, n] and [m, n] elements as the strides walk
        // them (check_op and the layout checks bound every view), and `c` does not overlap
        // `a` or `b` (the caller copies an aliased input first).
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.as_ptr(),
                rsa as isize,
                csa as isize,
                b.as_ptr(),
                rsb as isize,
                csb as isize,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    }
}

/// Each run along the axis: its elements' positions.
fn runs(d: AxisDims) -> impl Iterator<Item = impl Iterator<Item = usize> + Clone> {
    (0..d.outer).flat_map(move |o| {
        (0..d.inner).map(move |i| (0..d.len).map(move |j| (o * d.len + j) * d.inner + i))
    })
}

fn softmax(a: &[f32], out: &mut [f32], d: AxisDims) {
    for run in runs(d) {
        let max = run.clone().map(|p| a[p]).fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f32;
        for p in run.clone() {
            out[p] = (a[p] - max).exp();
            total += out[p];
        }
        for p in run {
            out[p] /= total;
        }
    }
}

fn layernorm(a: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32], d: AxisDims) {
    let len = d.len as f32;
    for run in runs(d) {
        let mean = run.clone().map(|p| a[p]).sum::<f32>() / len;
        let var = run.clone().map(|p| (a[p] - mean).powi(2)).sum::<f32>() / len;
        let scale = 1.0 / (var + eps).sqrt();
        for (j, p) in run.enumerate() {
            out[p] = (a[p] - mean) * scale * gamma[j] + beta[j];
        }
    }
}

fn sum(a: &[f32], out: &mut [f32], d: AxisDims) {
    for (slot, run) in runs(d).enumerate() {
        out[slot] = run.map(|p| a[p]).sum();
    }
}
