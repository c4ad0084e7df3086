//! The conformance suite: every op on every backend present, against a reference computed
//! here in f64, within the tolerances each dtype states; and the buffer rules (quota, ranges,
//! aliasing) that hold whatever the backend. A backend that is not present (CUDA without a
//! GPU) is skipped with the reason printed.

use std::sync::Arc;

use half::{bf16, f16};
use lode_wasi_gpu::{Backend, Buffer, DType, ErrorCode, Gpu, Layout, Op};
use rand::{Rng, SeedableRng};

/// The backends to hold to the reference: the CPU always, CUDA where a GPU is found.
fn backends() -> Vec<(&'static str, Arc<dyn Backend>)> {
    #[allow(unused_mut)]
    let mut found: Vec<(&'static str, Arc<dyn Backend>)> =
        vec![("cpu", Arc::new(lode_wasi_gpu::backend::cpu::Cpu::default()))];
    #[cfg(feature = "cuda")]
    match lode_wasi_gpu::backend::cuda::Cuda::open(0) {
        Ok(cuda) => found.push(("cuda", Arc::new(cuda))),
        Err(why) => skip(&why),
    }
    #[cfg(not(feature = "cuda"))]
    skip("built without the `cuda` feature");
    found
}

/// Says on stderr (not through eprintln!, which the harness captures) that CUDA is skipped.
fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "conformance: skipping the CUDA backend: {why}"
    );
}

/// Largest error allowed, relative to the reference's magnitude (plus an absolute floor).
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
        DType::Bf16 => 3e-2,
    }
}

fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::Bf16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
    }
}

fn decode(bytes: &[u8], dtype: DType) -> Vec<f64> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        DType::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
    }
}

/// Values as the dtype holds them, so the reference starts from what the backend sees.
fn rounded(values: &[f32], dtype: DType) -> Vec<f64> {
    decode(&encode(values, dtype), dtype)
}

fn random(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

/// An elementwise op as the reference computes it.
type Reference = fn(f64) -> f64;

fn layout(dtype: DType, shape: &[u32]) -> Layout {
    Layout {
        dtype,
        shape: shape.to_vec(),
        offset: 0,
    }
}

fn assert_close(name: &str, dtype: DType, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: lengths");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let tol = tolerance(dtype) * scale;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "{name} ({dtype:?}): element {i} is {g}, the reference {w} (tolerance {tol})"
        );
    }
}

/// Runs `op` on `inputs` (shape, values) into a fresh output of `out_shape`, and returns it.
fn run(
    gpu: &Gpu,
    op: Op,
    dtype: DType,
    inputs: &[(&[u32], &[f32])],
    out_shape: &[u32],
) -> Vec<f64> {
    let buffers: Vec<(Buffer, Layout)> = inputs
        .iter()
        .map(|(shape, values)| {
            (
                gpu.from_bytes(&encode(values, dtype)).unwrap(),
                layout(dtype, shape),
            )
        })
        .collect();
    let out_layout = layout(dtype, out_shape);
    let out = gpu.create(out_layout.bytes()).unwrap();
    let refs: Vec<(&Buffer, &Layout)> = buffers.iter().map(|(b, l)| (b, l)).collect();
    gpu.run(op, &refs, (&out, &out_layout)).unwrap();
    gpu.synchronize().unwrap();
    decode(&gpu.read(&out, 0, out.size()).unwrap(), dtype)
}

fn reference_matmul(
    a: &[f64],
    b: &[f64],
    batch: usize,
    (m, k, n): (usize, usize, usize),
    (ta, tb): (bool, bool),
) -> Vec<f64> {
    let mut out = vec![0.0; batch * m * n];
    for p in 0..batch {
        for i in 0..m {
            for j in 0..n {
                out[p * m * n + i * n + j] = (0..k)
                    .map(|x| {
                        let av = if ta {
                            a[p * m * k + x * m + i]
                        } else {
                            a[p * m * k + i * k + x]
                        };
                        let bv = if tb {
                            b[p * k * n + j * k + x]
                        } else {
                            b[p * k * n + x * n + j]
                        };
                        av * bv
                    })
                    .sum();
            }
        }
    }
    out
}

#[test]
fn every_op_matches_the_reference_on_every_backend_and_dtype() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (name, backend) in backends() {
        let gpu = Gpu::new(backend.clone(), 1 << 30);
        let dtypes = gpu.device().dtypes;
        assert!(dtypes.contains(&DType::F32), "{name} lacks f32");
        for &dtype in &dtypes {
            let tag = |op: &str| format!("{name} {op}");
            // matmul, every transpose, with a batch.
            let (batch, m, k, n) = (2, 5, 7, 3);
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = random(&mut rng, batch * m * k);
                let b = random(&mut rng, batch * k * n);
                let a_shape = if ta {
                    [2, k as u32, m as u32]
                } else {
                    [2, m as u32, k as u32]
                };
                let b_shape = if tb {
                    [2, n as u32, k as u32]
                } else {
                    [2, k as u32, n as u32]
                };
                let got = run(
                    &gpu,
                    Op::Matmul {
                        transpose_a: ta,
                        transpose_b: tb,
                    },
                    dtype,
                    &[(&a_shape, &a), (&b_shape, &b)],
                    &[2, m as u32, n as u32],
                );
                let want = reference_matmul(
                    &rounded(&a, dtype),
                    &rounded(&b, dtype),
                    batch,
                    (m, k, n),
                    (ta, tb),
                );
                assert_close(&tag(&format!("matmul {ta}/{tb}")), dtype, &got, &want);
            }
            // Elementwise.
            let shape = [3u32, 17];
            let a = random(&mut rng, 51);
            let b = random(&mut rng, 51);
            let (ra, rb) = (rounded(&a, dtype), rounded(&b, dtype));
            let unary: [(Op, &str, Reference); 4] = [
                (Op::Scale(-1.5), "scale", |x| x * -1.5),
                (Op::Relu, "relu", |x| x.max(0.0)),
                (Op::Gelu, "gelu", |x| {
                    0.5 * x
                        * (1.0
                            + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3)))
                                .tanh())
                }),
                (Op::Scale(0.0), "scale by zero", |_| 0.0),
            ];
            for (op, what, f) in unary {
                let got = run(&gpu, op, dtype, &[(&shape, &a)], &shape);
                let want: Vec<f64> = ra.iter().map(|&x| f(x)).collect();
                assert_close(&tag(what), dtype, &got, &want);
            }
            for (op, what, f) in [
                (Op::Add, "add", (|x, y| x + y) as fn(f64, f64) -> f64),
                (Op::Mul, "mul", |x, y| x * y),
            ] {
                let got = run(&gpu, op, dtype, &[(&shape, &a), (&shape, &b)], &shape);
                let want: Vec<f64> = ra.iter().zip(&rb).map(|(&x, &y)| f(x, y)).collect();
                assert_close(&tag(what), dtype, &got, &want);
            }
            // Along an axis: softmax and sum on every axis of a 3-d tensor.
            let dims = [3usize, 4, 5];
            let shape3 = [3u32, 4, 5];
            let x = random(&mut rng, 60);
            let rx = rounded(&x, dtype);
            let at = |i: usize, j: usize, l: usize| (i * dims[1] + j) * dims[2] + l;
            for axis in 0..3 {
                let got = run(
                    &gpu,
                    Op::Softmax { axis: axis as u32 },
                    dtype,
                    &[(&shape3, &x)],
                    &shape3,
                );
                let mut want = vec![0.0; 60];
                let mut sums_shape = shape3.to_vec();
                sums_shape.remove(axis);
                let mut sums = Vec::new();
                for i in 0..dims[0] {
                    for j in 0..dims[1] {
                        for l in 0..dims[2] {
                            let pos = [i, j, l];
                            if pos[axis] != 0 {
                                continue;
                            }
                            let run_of = |t: usize| {
                                let mut p = pos;
                                p[axis] = t;
                                at(p[0], p[1], p[2])
                            };
                            let max = (0..dims[axis])
                                .map(|t| rx[run_of(t)])
                                .fold(f64::MIN, f64::max);
                            let total: f64 =
                                (0..dims[axis]).map(|t| (rx[run_of(t)] - max).exp()).sum();
                            for t in 0..dims[axis] {
                                want[run_of(t)] = (rx[run_of(t)] - max).exp() / total;
                            }
                            sums.push((0..dims[axis]).map(|t| rx[run_of(t)]).sum::<f64>());
                        }
                    }
                }
                assert_close(&tag(&format!("softmax axis {axis}")), dtype, &got, &want);
                let got = run(
                    &gpu,
                    Op::Sum { axis: axis as u32 },
                    dtype,
                    &[(&shape3, &x)],
                    &sums_shape,
                );
                assert_close(&tag(&format!("sum axis {axis}")), dtype, &got, &sums);
            }
            // Layernorm over the last axis.
            let gamma = random(&mut rng, 5);
            let beta = random(&mut rng, 5);
            let (rg, rbeta) = (rounded(&gamma, dtype), rounded(&beta, dtype));
            let got = run(
                &gpu,
                Op::LayerNorm { eps: 1e-5 },
                dtype,
                &[(&shape3, &x), (&[5], &gamma), (&[5], &beta)],
                &shape3,
            );
            let want: Vec<f64> = rx
                .chunks(5)
                .flat_map(|row| {
                    let mean = row.iter().sum::<f64>() / 5.0;
                    let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 5.0;
                    row.iter()
                        .map(move |v| (v - mean) / (var + 1e-5).sqrt())
                        .collect::<Vec<_>>()
                })
                .enumerate()
                .map(|(i, v)| v * rg[i % 5] + rbeta[i % 5])
                .collect();
            assert_close(&tag("layernorm"), dtype, &got, &want);
        }
        eprintln!("{name}: every op within tolerance for {dtypes:?}");
    }
}

#[test]
fn buffers_count_against_the_quota_and_give_it_back() {
    for (name, backend) in backends() {
        let gpu = Gpu::new(backend, 1000);
        let a = gpu.create(600).unwrap();
        let refused = gpu.create(500).err().expect("past the quota");
        assert_eq!(refused.code, ErrorCode::QuotaExceeded, "{name}: {refused}");
        assert!(refused.message.contains("600 in use"), "{refused}");
        assert_eq!(gpu.used(), 600);
        drop(a);
        assert_eq!(gpu.used(), 0);
        let b = gpu.create(1000).unwrap();
        assert_eq!(gpu.device().memory_bytes, 1000);
        // Ranges past the end are refused by name, and nothing is written.
        let err = gpu.write(&b, 999, &[1, 2]).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadArgument);
        let err = gpu.read(&b, u64::MAX, 2).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadArgument);
        assert_eq!(gpu.read(&b, 990, 10).unwrap(), vec![0; 10]);
        // Copies work within one buffer, overlapping too.
        gpu.write(&b, 0, &[1, 2, 3, 4, 5]).unwrap();
        gpu.copy(&b, 0, &b, 2, 5).unwrap();
        assert_eq!(gpu.read(&b, 0, 7).unwrap(), vec![1, 2, 1, 2, 3, 4, 5]);
    }
}

#[test]
fn an_output_may_be_its_own_input_which_reads_as_before_the_op() {
    for (name, backend) in backends() {
        let gpu = Gpu::new(backend, 1 << 20);
        let values: Vec<f32> = vec![1.0, -2.0, 3.0, -4.0];
        let buffer = gpu.from_bytes(bytemuck::cast_slice(&values)).unwrap();
        let view = Layout::f32(&[2, 2]);
        gpu.run(Op::Relu, &[(&buffer, &view)], (&buffer, &view))
            .unwrap();
        gpu.run(
            Op::Add,
            &[(&buffer, &view), (&buffer, &view)],
            (&buffer, &view),
        )
        .unwrap();
        let got = decode(&gpu.read(&buffer, 0, 16).unwrap(), DType::F32);
        assert_eq!(got, vec![2.0, 0.0, 6.0, 0.0], "{name}");
        // Even a matmul into its own input reads the input as it was before the op.
        gpu.run(
            Op::Matmul {
                transpose_a: false,
                transpose_b: false,
            },
            &[(&buffer, &view), (&buffer, &view)],
            (&buffer, &view),
        )
        .unwrap();
        let got = decode(&gpu.read(&buffer, 0, 16).unwrap(), DType::F32);
        assert_eq!(got, vec![4.0, 0.0, 12.0, 0.0], "{name}");
        // Views side by side in one buffer are fine: [a | out].
        let both = gpu.create(32).unwrap();
        gpu.write(&both, 0, bytemuck::cast_slice(&values)).unwrap();
        let (a, out) = (
            Layout::f32(&[4]),
            Layout {
                offset: 16,
                ..Layout::f32(&[4])
            },
        );
        gpu.run(Op::Scale(2.0), &[(&both, &a)], (&both, &out))
            .unwrap();
        let got = decode(&gpu.read(&both, 16, 16).unwrap(), DType::F32);
        assert_eq!(got, vec![2.0, -4.0, 6.0, -8.0], "{name}");
        // A view past its buffer is a bad shape.
        let err = gpu
            .run(Op::Relu, &[(&both, &Layout::f32(&[9]))], (&both, &out))
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::BadShape, "{name}: {err}");
    }
}

/// A kernel that adds `x` to `n` floats in place, and writes its block size past them.
#[cfg(feature = "cuda")]
const ADD_KERNEL: &str = r#"
extern "C" __global__ void add_x(float* data, float x, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) data[i] += x;
    if (i == 0) data[n] = (float)blockDim.x;
}
"#;

#[test]
fn kernels_take_the_capability_and_run_only_where_a_backend_has_them() {
    for (name, backend) in backends() {
        let gpu = Gpu::new(backend.clone(), 1 << 20);
        let refused = gpu
            .load_kernel(".version 7.0", "f")
            .err()
            .expect("no capability");
        assert_eq!(refused.code, ErrorCode::Unavailable, "{name}");
        assert!(refused.message.contains("gpu_kernels"), "{refused}");
        let gpu = Gpu::new(backend, 1 << 20).with_kernels(true);
        let nul = gpu.load_kernel("a\0b", "f").err().expect("a NUL byte");
        assert_eq!(nul.code, ErrorCode::BadArgument, "{name}: {nul}");
        if name == "cpu" {
            let refused = gpu.load_kernel(".version 7.0", "f").err().expect("CPU");
            assert_eq!(refused.code, ErrorCode::Unavailable);
            assert!(refused.message.contains("CUDA backend"), "{refused}");
            continue;
        }
        #[cfg(feature = "cuda")]
        {
            use lode_wasi_gpu::backend::LaunchShape;
            use lode_wasi_gpu::context::Argument;
            let ptx = cudarc::nvrtc::compile_ptx(ADD_KERNEL).unwrap().to_src();
            let kernel = gpu.load_kernel(&ptx, "add_x").unwrap();
            let missing = gpu.load_kernel(&ptx, "no_such").err().expect("missing");
            assert_eq!(missing.code, ErrorCode::KernelFailed, "{missing}");
            let values: Vec<f32> = (0..1000).map(|i| i as f32).chain([0.0]).collect();
            let data = gpu.from_bytes(bytemuck::cast_slice(&values)).unwrap();
            let shape = LaunchShape {
                grid: (4, 1, 1),
                block: (256, 1, 1),
                shared_bytes: 0,
            };
            let args = [
                Argument::Buffer(&data),
                Argument::F32(0.5),
                Argument::U32(1000),
            ];
            gpu.launch(&kernel, shape, &args).unwrap();
            let got = decode(&gpu.read(&data, 0, 4004).unwrap(), DType::F32);
            assert_eq!(got[999], 999.5);
            assert_eq!(got[1000], 256.0);
            let too_wide = LaunchShape {
                block: (2048, 1, 1),
                ..shape
            };
            let err = gpu.launch(&kernel, too_wide, &args).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadArgument, "{err}");
            // The driver would read past arguments it was not given: counts and sizes are
            // checked against the kernel's own parameters.
            let err = gpu.launch(&kernel, shape, &args[..2]).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadArgument, "{err}");
            let wrong = [
                Argument::Buffer(&data),
                Argument::F32(0.5),
                Argument::U64(1000),
            ];
            let err = gpu.launch(&kernel, shape, &wrong).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadArgument, "{err}");
        }
    }
}
