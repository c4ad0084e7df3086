//! `lode bench gpu`: `lode:gpu` from a Wasm guest (samples/wasm-gpu on a real `lode serve`)
//! against the same backend called from native Rust in this process, and against a plain
//! matmul loop in the guest.
//!
//! - an N x N f32 matmul, timed by the guest around the op calls alone, against the native
//!   backend timed the same way, and against the guest's own i-k-j loop;
//! - the MLP sample's forward pass (its model loaded from the volume once; then the input
//!   uploaded, three layers, the answer read back), timed by the guest, against the same
//!   steps in native Rust;
//! - where this host has a GPU and CUDA, the same matmul through a Wasm function that declares
//!   `gpu` (the CUDA backend) against cuBLAS called natively, and a 1 GiB upload into a buffer
//!   against a pinned `cudaMemcpy`; elsewhere these rows say "not measured" and why. The
//!   safetensors row is not driven yet.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use lode_wasi_gpu::{Buffer, Gpu, Layout, Op};
use serde_json::{Value, json};

use crate::bench::support::{median, start_server};

/// Settings for `lode bench gpu`.
#[derive(Debug, Args)]
pub struct GpuBench {
    /// The matmul's N.
    #[arg(long, default_value_t = 1024)]
    size: u32,
    /// Matmuls per timed run.
    #[arg(long, default_value_t = 5)]
    repeat: u32,
    /// Timed runs of each side (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Where debootstrap bases are kept (unused here; the server wants one).
    #[arg(long, default_value = "/var/cache/lode/images/base")]
    image_base_dir: std::path::PathBuf,
    /// Size of the safetensors model loaded from a lazy mount into GPU memory.
    #[arg(long, default_value = "5G", value_parser = crate::cli::parse::parse_size)]
    model_size: u64,
    /// Work directory on the disk under test: the model, the chunk cache, the mount.
    #[arg(long, default_value = "/var/cache/lode/bench/gpu")]
    work: std::path::PathBuf,
    /// Where there is no GPU, load the model into the CPU backend instead: this times the
    /// lazy mount's side of the load (the disk limit), not PCIe.
    #[arg(long)]
    load_on_cpu: bool,
}

/// The bench MLP: batch, then the layers' widths and activations.
const BATCH: usize = 64;
const LAYERS: [(usize, usize, &str); 3] =
    [(256, 512, "gelu"), (512, 512, "relu"), (512, 10, "softmax")];

/// Runs `lode bench gpu`.
pub async fn gpu(args: GpuBench) -> Result<()> {
    let server = start_server(&args.image_base_dir)?;
    let lode = std::env::current_exe()?;
    let out = Command::new(&lode)
        .args(["--api-url", &server.api, "--token", &server.token, "deploy"])
        .arg(std::env::current_dir()?.join("samples/wasm-gpu"))
        .output()?;
    if !out.status.success() {
        bail!(
            "deploying samples/wasm-gpu failed (run from the repository root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let weights = server
        .client_file
        .parent()
        .context("the server's data dir")?
        .join("volumes/mlp-weights");
    std::fs::create_dir_all(&weights)?;
    let rows = write_model(&weights)?;

    let http = reqwest::Client::new();
    let call = |body: Value| server.call(&http, "wasm-gpu/mlp", body);
    let (n, repeat) = (args.size, args.repeat);
    println!(
        "lode bench gpu: {n} x {n} f32 matmul ({repeat} per run, median of {} runs), MLP \
         {BATCH} x {LAYERS:?}",
        args.runs
    );

    // The matmul: the guest's op calls, against the native backend's.
    let seconds = |v: &Value| v["seconds"].as_f64().unwrap_or(f64::NAN);
    let mut guest = Vec::new();
    let mut native = Vec::new();
    let native_gpu = Gpu::cpu(1 << 32);
    let (a, b) = matrices(n);
    let (ab, bb) = (
        native_gpu.from_bytes(bytemuck::cast_slice(&a))?,
        native_gpu.from_bytes(bytemuck::cast_slice(&b))?,
    );
    let product = native_gpu.create(u64::from(n * n) * 4)?;
    let square = Layout::f32(&[n, n]);
    let mut checksum = 0.0;
    for _ in 0..args.runs + 1 {
        let answer =
            call(json!({"args": [], "kwargs": {"matmul": n, "on": "gpu", "repeat": repeat}}))
                .await?;
        guest.push(Duration::from_secs_f64(
            seconds(&answer) / f64::from(repeat),
        ));
        checksum = answer["checksum"].as_f64().unwrap_or(f64::NAN);
        let started = Instant::now();
        for _ in 0..repeat {
            native_gpu.run(
                Op::Matmul {
                    transpose_a: false,
                    transpose_b: false,
                },
                &[(&ab, &square), (&bb, &square)],
                (&product, &square),
            )?;
        }
        native.push(started.elapsed() / repeat);
    }
    // The first run of each warms caches and threads.
    let (guest, native) = (median(guest[1..].to_vec()), median(native[1..].to_vec()));
    let native_sum: f64 = floats(&native_gpu, &product)?
        .iter()
        .map(|&v| f64::from(v))
        .sum();
    if (native_sum - checksum).abs() > 1e-3 * native_sum.abs().max(1.0) {
        bail!("the guest's product sums to {checksum}, the native one to {native_sum}");
    }
    let looped =
        call(json!({"args": [], "kwargs": {"matmul": n, "on": "loop", "repeat": 1}})).await?;
    let looped = Duration::from_secs_f64(seconds(&looped));
    let gflops = |t: Duration| 2.0 * f64::from(n).powi(3) / t.as_secs_f64() / 1e9;
    println!(
        "  {:<56} {:>10.2?} ({:.1} GFLOP/s)",
        "matmul, native Rust on the CPU backend (baseline)",
        native,
        gflops(native)
    );
    println!(
        "  {:<56} {:>10.2?} ({:.1} GFLOP/s, {:.0}% of native)",
        "matmul, Wasm guest through lode:gpu (CPU backend)",
        guest,
        gflops(guest),
        100.0 * native.as_secs_f64() / guest.as_secs_f64()
    );
    println!(
        "  {:<56} {:>10.2?} ({:.1} GFLOP/s; lode:gpu is {:.0}x faster)",
        "matmul, plain loop in the Wasm guest",
        looped,
        gflops(looped),
        looped.as_secs_f64() / guest.as_secs_f64()
    );

    // The MLP: the sample's forward pass with its model loaded once, against the same steps
    // natively.
    let layers = native_mlp_load(&native_gpu, &weights)?;
    let input: Vec<f32> = rows
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|row| row.as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_f64().map(|v| v as f32))
        .collect();
    let mut guest_mlp = Vec::new();
    let mut native_mlp = Vec::new();
    for _ in 0..args.runs + 1 {
        let answer = call(json!({"args": [rows], "kwargs": {"repeat": 20}})).await?;
        guest_mlp.push(Duration::from_secs_f64(seconds(&answer)));
        let started = Instant::now();
        let mut out = Vec::new();
        for _ in 0..20 {
            out = native_mlp_forward(&native_gpu, &layers, &input)?;
        }
        native_mlp.push(started.elapsed() / 20);
        let got: Vec<f64> = answer["output"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|row| row.as_array().cloned().unwrap_or_default())
            .filter_map(|v| v.as_f64())
            .collect();
        if got.len() != out.len()
            || got
                .iter()
                .zip(&out)
                .any(|(g, n)| (g - f64::from(*n)).abs() > 1e-5)
        {
            bail!("the guest's MLP output differs from the native one");
        }
    }
    let (guest_mlp, native_mlp) = (
        median(guest_mlp[1..].to_vec()),
        median(native_mlp[1..].to_vec()),
    );
    println!(
        "  {:<56} {:>10.2?}",
        "MLP forward, native Rust on the CPU backend (baseline)", native_mlp
    );
    println!(
        "  {:<56} {:>10.2?} ({:.0}% of native)",
        "MLP forward, Wasm guest through lode:gpu (CPU backend)",
        guest_mlp,
        100.0 * native_mlp.as_secs_f64() / guest_mlp.as_secs_f64()
    );
    #[cfg(feature = "cuda")]
    let on_gpu = cuda_rows(&server, &http, n, repeat, args.runs).await;
    #[cfg(not(feature = "cuda"))]
    let on_gpu: Result<(Gpu, Duration), String> =
        Err("this lode was built without the `cuda` feature".into());
    let size = indicatif::HumanBytes(args.model_size);
    let model = format!("{size} safetensors, lazy mount -> GPU memory");
    match on_gpu {
        Ok((device, pinned)) => {
            load_row(&model, device, &args, Some(pinned)).await?;
        }
        Err(why) => {
            for what in [
                "matmul through the CUDA backend, against cuBLAS",
                "1 GiB upload into a buffer, against a pinned cudaMemcpy",
                &model,
            ] {
                println!("  {what:<56} not measured: {why}");
            }
            if args.load_on_cpu {
                let what = format!("{size} safetensors, lazy mount -> CPU backend");
                load_row(&what, Gpu::cpu(u64::MAX), &args, None).await?;
            }
        }
    }
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "  targets: guest matmul >= 95% of native: {}; >= 20x the plain loop: {}; MLP >= 95% \
         of native: {}",
        verdict(native.as_secs_f64() / guest.as_secs_f64() >= 0.95),
        verdict(looped.as_secs_f64() / guest.as_secs_f64() >= 20.0),
        verdict(native_mlp.as_secs_f64() / guest_mlp.as_secs_f64() >= 0.95),
    );
    Ok(())
}

/// Two N x N matrices with the values the sample's timing mode makes.
fn matrices(n: u32) -> (Vec<f32>, Vec<f32>) {
    let count = (n * n) as usize;
    let a = (0..count).map(|i| ((i % 7) as f32) * 0.25).collect();
    let b = (0..count).map(|i| ((i % 5) as f32) * 0.5 - 1.0).collect();
    (a, b)
}

fn floats(gpu: &Gpu, buffer: &Buffer) -> Result<Vec<f32>> {
    Ok(f32s(&gpu.read(buffer, 0, buffer.size())?))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Writes the bench model's weights (fixed pseudo-random values) and `model.json` into
/// `dir`; returns the input batch.
fn write_model(dir: &Path) -> Result<Value> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut layers = Vec::new();
    for (i, (inputs, outputs, activation)) in LAYERS.iter().enumerate() {
        let weights: Vec<f32> = (0..inputs * outputs).map(|_| next() * 0.2).collect();
        let bias: Vec<f32> = (0..*outputs).map(|_| next() * 0.1).collect();
        std::fs::write(
            dir.join(format!("w{i}.f32")),
            bytemuck::cast_slice(&weights),
        )?;
        std::fs::write(dir.join(format!("b{i}.f32")), bytemuck::cast_slice(&bias))?;
        layers.push(
            json!({"weights": format!("w{i}.f32"), "bias": format!("b{i}.f32"),
            "inputs": inputs, "outputs": outputs, "activation": activation}),
        );
    }
    std::fs::write(
        dir.join("model.json"),
        serde_json::to_vec(&json!({ "layers": layers }))?,
    )?;
    let rows: Vec<Vec<f32>> = (0..BATCH)
        .map(|_| (0..LAYERS[0].0).map(|_| next()).collect())
        .collect();
    Ok(json!(rows))
}

/// One layer of the sample's model on the native side, as the guest holds it.
struct NativeLayer {
    inputs: u32,
    outputs: u32,
    weights: Buffer,
    bias: Buffer,
    activation: Option<Op>,
}

/// The sample's model from `dir`, uploaded for `BATCH` rows (the bias tiled per row).
fn native_mlp_load(gpu: &Gpu, dir: &Path) -> Result<Vec<NativeLayer>> {
    let model: Value = serde_json::from_slice(&std::fs::read(dir.join("model.json"))?)?;
    let mut layers = Vec::new();
    for layer in model["layers"].as_array().into_iter().flatten() {
        let file = |key: &str| dir.join(layer[key].as_str().unwrap_or_default());
        let bias = f32s(&std::fs::read(file("bias"))?);
        let tiled: Vec<f32> = (0..BATCH).flat_map(|_| bias.iter().copied()).collect();
        layers.push(NativeLayer {
            inputs: layer["inputs"].as_u64().unwrap_or(0) as u32,
            outputs: layer["outputs"].as_u64().unwrap_or(0) as u32,
            weights: gpu.from_bytes(&std::fs::read(file("weights"))?)?,
            bias: gpu.from_bytes(bytemuck::cast_slice(&tiled))?,
            activation: match layer["activation"].as_str() {
                Some("relu") => Some(Op::Relu),
                Some("gelu") => Some(Op::Gelu),
                Some("softmax") => Some(Op::Softmax { axis: 1 }),
                _ => None,
            },
        });
    }
    Ok(layers)
}

/// The sample's forward pass, step for step, on `gpu` from native Rust.
fn native_mlp_forward(gpu: &Gpu, layers: &[NativeLayer], input: &[f32]) -> Result<Vec<f32>> {
    let batch = BATCH as u32;
    let mut x = gpu.from_bytes(bytemuck::cast_slice(input))?;
    for layer in layers {
        let h = gpu.create(u64::from(batch * layer.outputs) * 4)?;
        let shape = Layout::f32(&[batch, layer.outputs]);
        gpu.run(
            Op::Matmul {
                transpose_a: false,
                transpose_b: false,
            },
            &[
                (&x, &Layout::f32(&[batch, layer.inputs])),
                (&layer.weights, &Layout::f32(&[layer.inputs, layer.outputs])),
            ],
            (&h, &shape),
        )?;
        gpu.run(
            Op::Add,
            &[(&h, &shape), (&layer.bias, &shape)],
            (&h, &shape),
        )?;
        if let Some(op) = layer.activation {
            gpu.run(op, &[(&h, &shape)], (&h, &shape))?;
        }
        x = h;
    }
    floats(gpu, &x)
}

/// The GPU rows, where this host has a GPU and CUDA: the matmul through a Wasm function that
/// declares `gpu` (the CUDA backend) against the same backend called natively (cuBLAS), and
/// a 1 GiB upload into a buffer from guest memory against a pinned `cudaMemcpy`. `Err` says
/// why they cannot be measured here.
#[cfg(feature = "cuda")]
async fn cuda_rows(
    server: &crate::bench::support::LodeServer,
    http: &reqwest::Client,
    n: u32,
    repeat: u32,
    runs: usize,
) -> Result<(Gpu, Duration), String> {
    use lode_wasi_gpu::backend::cuda::Cuda;
    let inventory = lode_wasi_gpu::inventory::inventory();
    let first = inventory.first().ok_or("no GPU on this host")?;
    lode_wasi_gpu::backend::cuda::probe()?;
    let failed = |e: &dyn std::fmt::Display| format!("{e:#}");
    // The same sample, declaring a GPU and room for a 64 MiB chunk in guest memory.
    let project = tempfile::tempdir().map_err(|e| failed(&e))?;
    let sample = std::env::current_dir()
        .map_err(|e| failed(&e))?
        .join("samples/wasm-gpu");
    std::fs::write(
        project.path().join("lode.toml"),
        format!(
            "app = \"wasm-gpu-cuda\"\n[[function]]\nname = \"mlp\"\npath = {:?}\nmemory = 512\n\
             timeout = 300\ngpu = \"any\"\nvolumes = [{{ name = \"mlp-weights\", path = \
             \"/weights\", read_only = true }}]\n",
            sample.display().to_string()
        ),
    )
    .map_err(|e| failed(&e))?;
    let out = Command::new(std::env::current_exe().map_err(|e| failed(&e))?)
        .args(["--api-url", &server.api, "--token", &server.token, "deploy"])
        .arg(project.path())
        .output()
        .map_err(|e| failed(&e))?;
    if !out.status.success() {
        return Err(format!(
            "deploying the sample with gpu = \"any\" failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let cuda: std::sync::Arc<Cuda> = std::sync::Arc::new(Cuda::open_bus(&first.bus_id)?);
    let native_gpu = Gpu::new(cuda.clone(), 1 << 40);
    let card = &first.model;
    let call = |body: Value| server.call(http, "wasm-gpu-cuda/mlp", body);
    let seconds = |v: &Value| v["seconds"].as_f64().unwrap_or(f64::NAN);

    let (a, b) = matrices(n);
    let gpu_err = |e: lode_wasi_gpu::GpuError| e.to_string();
    let (ab, bb) = (
        native_gpu
            .from_bytes(bytemuck::cast_slice(&a))
            .map_err(gpu_err)?,
        native_gpu
            .from_bytes(bytemuck::cast_slice(&b))
            .map_err(gpu_err)?,
    );
    let product = native_gpu.create(u64::from(n * n) * 4).map_err(gpu_err)?;
    let square = Layout::f32(&[n, n]);
    let (mut guest, mut native) = (Vec::new(), Vec::new());
    let mut checksum = 0.0;
    for _ in 0..runs + 1 {
        let answer =
            call(json!({"args": [], "kwargs": {"matmul": n, "on": "gpu", "repeat": repeat}}))
                .await
                .map_err(|e| failed(&e))?;
        guest.push(Duration::from_secs_f64(
            seconds(&answer) / f64::from(repeat),
        ));
        checksum = answer["checksum"].as_f64().unwrap_or(f64::NAN);
        native_gpu.synchronize().map_err(gpu_err)?;
        let started = Instant::now();
        for _ in 0..repeat {
            native_gpu
                .run(
                    Op::Matmul {
                        transpose_a: false,
                        transpose_b: false,
                    },
                    &[(&ab, &square), (&bb, &square)],
                    (&product, &square),
                )
                .map_err(gpu_err)?;
        }
        native_gpu.synchronize().map_err(gpu_err)?;
        native.push(started.elapsed() / repeat);
    }
    let native_sum: f64 = floats(&native_gpu, &product)
        .map_err(|e| failed(&e))?
        .iter()
        .map(|&v| f64::from(v))
        .sum();
    if (native_sum - checksum).abs() > 1e-3 * native_sum.abs().max(1.0) {
        return Err(format!(
            "the guest's CUDA product sums to {checksum}, the native one to {native_sum}"
        ));
    }
    let (guest, native) = (median(guest[1..].to_vec()), median(native[1..].to_vec()));
    let gflops = |t: Duration| 2.0 * f64::from(n).powi(3) / t.as_secs_f64() / 1e9;
    println!(
        "  {:<56} {:>10.2?} ({:.0} GFLOP/s, {card})",
        "matmul, native cuBLAS through the CUDA backend (baseline)",
        native,
        gflops(native)
    );
    println!(
        "  {:<56} {:>10.2?} ({:.0} GFLOP/s, {:.0}% of native; target >= 90%)",
        "matmul, Wasm guest through lode:gpu (CUDA backend)",
        guest,
        gflops(guest),
        100.0 * native.as_secs_f64() / guest.as_secs_f64()
    );

    let (mut guest_up, mut pinned) = (Vec::new(), Vec::new());
    for _ in 0..runs.min(3) + 1 {
        let answer = call(json!({"args": [], "kwargs": {"upload": 1024}}))
            .await
            .map_err(|e| failed(&e))?;
        guest_up.push(Duration::from_secs_f64(seconds(&answer)));
        pinned.push(cuda.time_pinned_upload(1 << 30).map_err(gpu_err)?);
    }
    let (guest_up, pinned) = (median(guest_up[1..].to_vec()), median(pinned[1..].to_vec()));
    let rate = |t: Duration| 1.0 / t.as_secs_f64();
    println!(
        "  {:<56} {:>10.2?} ({:.1} GiB/s, {card})",
        "1 GiB upload, pinned cudaMemcpy (baseline)",
        pinned,
        rate(pinned)
    );
    println!(
        "  {:<56} {:>10.2?} ({:.1} GiB/s, {:.0}% of pinned; target >= 80%)",
        "1 GiB upload, Wasm guest into a lode:gpu buffer",
        guest_up,
        rate(guest_up),
        100.0 * pinned.as_secs_f64() / guest_up.as_secs_f64()
    );
    drop((ab, bb, product));
    Ok((native_gpu, pinned))
}

/// The model-load row: through the lazy mount into `gpu`, against the disk limit and, where
/// `pinned` (a pinned 1 GiB copy) was measured, the PCIe limit.
async fn load_row(what: &str, gpu: Gpu, args: &GpuBench, pinned: Option<Duration>) -> Result<()> {
    let device = gpu.device().name;
    let times =
        crate::bench::gpu_load::load_through_mount(gpu, &args.work, args.model_size).await?;
    let rate = |t: Duration| times.bytes as f64 / t.as_secs_f64() / 1e9;
    let disk = rate(times.disk);
    let pcie = pinned.map(|t| f64::from(1u32 << 30) / t.as_secs_f64() / 1e9);
    let limit = pcie.map_or(disk, |p| p.min(disk));
    println!(
        "  {what:<56} {:>10.2?} ({:.2} GB/s into {device}; disk {disk:.2} GB/s{}; {:.0}% of \
         the lower limit)",
        times.into_buffers,
        rate(times.into_buffers),
        pcie.map(|p| format!(", PCIe {p:.1} GB/s"))
            .unwrap_or_default(),
        100.0 * rate(times.into_buffers) / limit
    );
    Ok(())
}
