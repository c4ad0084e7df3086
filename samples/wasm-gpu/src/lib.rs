//! `mlp(rows)`: an MLP forward pass on `lode:gpu`, with its weights read from the volume at
//! `/weights`. `model.json` there lists the layers in order:
//!
//! ```json
//! {"layers": [{"weights": "w0.f32", "bias": "b0.f32", "inputs": 16, "outputs": 32, "activation": "gelu"},
//!             {"weights": "w1.f32", "bias": "b1.f32", "inputs": 32, "outputs": 4, "activation": "softmax"}]}
//! ```
//!
//! Each `.f32` file is little-endian f32, the weights row-major [inputs, outputs]. The call
//! takes a batch of rows and answers the last layer's rows. Activations: `relu`, `gelu`,
//! `softmax` (over each row) or `none`.
//!
//! With `{"kwargs": {"repeat": R}}` it answers `{"seconds", "output"}`: the model loaded
//! once, then the forward pass's mean time over R runs. With `{"kwargs": {"matmul": N, "on": "gpu"|"loop", "repeat": R}}`
//! it times an N x N f32 matmul instead, through `lode:gpu` or as a plain loop in the guest.
//! `lode bench gpu` uses both.
//!
//! Two more show how a device is shared and what kernels need:
//! `{"kwargs": {"busy": S}}` keeps the device busy with small matmuls for S seconds (at most
//! 60) and answers how many ran; `{"kwargs": {"ptx": TEXT, "entry": NAME, "n": N}}` loads a
//! PTX kernel (the function needs `gpu_kernels = true`), launches it on N zeroed f32 and the
//! count N, and answers the values (a CUDA device only); `{"kwargs": {"upload": MIB}}` writes
//! MIB MiB into a buffer from guest memory, 64 MiB at a time, and answers the seconds it took.

use lode_guest::gpu::{self, Buffer};
use lode_guest::{Error, Map, Value, error, json};

struct Mlp;

fn bad(message: impl Into<String>) -> Error {
    error("invalid_input", message)
}

fn read_f32(path: &str, expected: usize) -> Result<Vec<f32>, Error> {
    let bytes = std::fs::read(path).map_err(|e| bad(format!("reading {path}: {e}")))?;
    if bytes.len() != expected * 4 {
        return Err(bad(format!(
            "{path} holds {} bytes, not the {expected} f32 values the model names",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn field<'a>(layer: &'a Value, key: &str) -> Result<&'a Value, Error> {
    layer
        .get(key)
        .ok_or_else(|| bad(format!("a layer in model.json has no {key:?}")))
}

fn size(layer: &Value, key: &str) -> Result<u32, Error> {
    field(layer, key)?
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n > 0)
        .ok_or_else(|| bad(format!("{key:?} must be a positive integer")))
}

/// One layer's weights and bias on the device, the bias tiled once per row of the batch.
struct Layer {
    inputs: u32,
    outputs: u32,
    weights: Buffer,
    bias: Buffer,
    activation: Activation,
}

#[derive(Clone, Copy)]
enum Activation {
    Relu,
    Gelu,
    Softmax,
    None,
}

fn gpu_err(what: &'static str) -> impl Fn(gpu::Error) -> Error {
    move |e| gpu::failed(what, e)
}

/// The model in `/weights`, uploaded for a batch of `batch` rows.
fn load(batch: u32) -> Result<Vec<Layer>, Error> {
    let model: Value = serde_json_from(&std::fs::read("/weights/model.json").map_err(|e| {
        bad(format!(
            "reading /weights/model.json: {e} (put the model in the mlp-weights volume)"
        ))
    })?)?;
    let layers = model
        .get("layers")
        .and_then(Value::as_array)
        .filter(|layers| !layers.is_empty())
        .ok_or_else(|| bad("model.json has no \"layers\" list"))?;
    let mut loaded: Vec<Layer> = Vec::new();
    for layer in layers {
        let (inputs, outputs) = (size(layer, "inputs")?, size(layer, "outputs")?);
        if let Some(before) = loaded.last()
            && before.outputs != inputs
        {
            return Err(bad(format!(
                "a layer takes {inputs} inputs after one that gives {}",
                before.outputs
            )));
        }
        let name = |key: &str| -> Result<String, Error> {
            let file = field(layer, key)?
                .as_str()
                .filter(|f| !f.contains('/'))
                .ok_or_else(|| bad(format!("{key:?} must name a file beside model.json")))?;
            Ok(format!("/weights/{file}"))
        };
        let weights = read_f32(&name("weights")?, (inputs * outputs) as usize)?;
        let bias = read_f32(&name("bias")?, outputs as usize)?;
        // The bias once per row, so one elementwise add applies it to the whole batch.
        let tiled: Vec<f32> = (0..batch).flat_map(|_| bias.iter().copied()).collect();
        let activation = match field(layer, "activation")?.as_str() {
            Some("relu") => Activation::Relu,
            Some("gelu") => Activation::Gelu,
            Some("softmax") => Activation::Softmax,
            Some("none") => Activation::None,
            other => {
                return Err(bad(format!(
                    "activation {other:?} is not one of relu, gelu, softmax, none"
                )));
            }
        };
        loaded.push(Layer {
            inputs,
            outputs,
            weights: gpu::upload(&weights).map_err(gpu_err("uploading weights"))?,
            bias: gpu::upload(&tiled).map_err(gpu_err("uploading a bias"))?,
            activation,
        });
    }
    Ok(loaded)
}

/// The rows as one row-major batch of `width` columns.
fn batch_of(rows: &[Value], width: u32) -> Result<Vec<f32>, Error> {
    let mut input = Vec::with_capacity(rows.len() * width as usize);
    for row in rows {
        let row = row
            .as_array()
            .filter(|r| r.len() == width as usize)
            .ok_or_else(|| bad(format!("each row must be a list of {width} numbers")))?;
        for x in row {
            input.push(x.as_f64().ok_or_else(|| bad("rows hold numbers only"))? as f32);
        }
    }
    Ok(input)
}

/// The forward pass of `input` (`batch` rows) through `layers`: the last layer's rows.
fn forward(layers: &[Layer], input: &[f32], batch: u32) -> Result<Vec<f32>, Error> {
    let mut x: Buffer = gpu::upload(input).map_err(gpu_err("uploading the input"))?;
    for layer in layers {
        let shape = [batch, layer.outputs];
        let h = Buffer::create(u64::from(batch * layer.outputs) * 4)
            .map_err(gpu_err("allocating"))?;
        gpu::ops::matmul(
            &gpu::f32(&x, &[batch, layer.inputs]),
            &gpu::f32(&layer.weights, &[layer.inputs, layer.outputs]),
            &gpu::f32(&h, &shape),
            false,
            false,
        )
        .map_err(gpu_err("matmul"))?;
        let (hv, bv) = (gpu::f32(&h, &shape), gpu::f32(&layer.bias, &shape));
        gpu::ops::add(&hv, &bv, &hv).map_err(gpu_err("adding the bias"))?;
        match layer.activation {
            Activation::Relu => gpu::ops::relu(&hv, &hv).map_err(gpu_err("relu"))?,
            Activation::Gelu => gpu::ops::gelu(&hv, &hv).map_err(gpu_err("gelu"))?,
            Activation::Softmax => gpu::ops::softmax(&hv, 1, &hv).map_err(gpu_err("softmax"))?,
            Activation::None => {}
        }
        x = h;
    }
    gpu::download(&x).map_err(gpu_err("reading the output"))
}

fn rows_of(out: &[f32], width: u32) -> Value {
    Value::Array(out.chunks(width as usize).map(|row| json!(row)).collect())
}

fn serde_json_from(bytes: &[u8]) -> Result<Value, Error> {
    serde_json::from_slice(bytes).map_err(|e| bad(format!("model.json is not JSON: {e}")))
}

/// Two N x N matrices with known values, multiplied `repeat` times; the seconds the
/// multiplications took (nothing else) and a checksum.
fn time_matmul(n: u32, on: &str, repeat: u32) -> Result<Value, Error> {
    let count = (n * n) as usize;
    let a: Vec<f32> = (0..count).map(|i| ((i % 7) as f32) * 0.25).collect();
    let b: Vec<f32> = (0..count).map(|i| ((i % 5) as f32) * 0.5 - 1.0).collect();
    let mut product = vec![0.0f32; count];
    let seconds = match on {
        "gpu" => {
            let (ab, bb) = (
                gpu::upload(&a).map_err(gpu_err("upload"))?,
                gpu::upload(&b).map_err(gpu_err("upload"))?,
            );
            let out = Buffer::create(count as u64 * 4).map_err(gpu_err("allocating"))?;
            let shape = [n, n];
            let started = std::time::Instant::now();
            for _ in 0..repeat {
                gpu::ops::matmul(
                    &gpu::f32(&ab, &shape),
                    &gpu::f32(&bb, &shape),
                    &gpu::f32(&out, &shape),
                    false,
                    false,
                )
                .map_err(gpu_err("matmul"))?;
            }
            gpu::devices::synchronize().map_err(gpu_err("synchronize"))?;
            let seconds = started.elapsed().as_secs_f64();
            product = gpu::download(&out).map_err(gpu_err("download"))?;
            seconds
        }
        "loop" => {
            let n = n as usize;
            let started = std::time::Instant::now();
            for _ in 0..repeat {
                // i-k-j order, the fastest plain loop: rows of b stream through the cache.
                product.fill(0.0);
                for i in 0..n {
                    for k in 0..n {
                        let x = a[i * n + k];
                        let (row, out) = (&b[k * n..][..n], &mut product[i * n..][..n]);
                        for (o, y) in out.iter_mut().zip(row) {
                            *o += x * y;
                        }
                    }
                }
            }
            started.elapsed().as_secs_f64()
        }
        other => return Err(bad(format!("on={other:?}: use \"gpu\" or \"loop\""))),
    };
    let checksum: f64 = product.iter().map(|&v| f64::from(v)).sum();
    Ok(json!({"seconds": seconds, "checksum": checksum, "device": gpu::devices::current().name}))
}

/// Small matmuls on the device until `seconds` have passed.
fn keep_busy(seconds: f64) -> Result<Value, Error> {
    let values = vec![1.0f32; 64 * 64];
    let (a, out) = (
        gpu::upload(&values).map_err(gpu_err("upload"))?,
        Buffer::create(64 * 64 * 4).map_err(gpu_err("allocating"))?,
    );
    let started = std::time::Instant::now();
    let mut matmuls = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        let t = gpu::f32(&a, &[64, 64]);
        gpu::ops::matmul(&t, &t, &gpu::f32(&out, &[64, 64]), false, false)
            .map_err(gpu_err("matmul"))?;
        matmuls += 1;
    }
    gpu::devices::synchronize().map_err(gpu_err("synchronize"))?;
    Ok(json!({"matmuls": matmuls, "device": gpu::devices::current().name}))
}

/// `entry` of the PTX module `ptx`, run over `n` zeroed floats with `n` as its second
/// argument, one thread per value.
fn run_ptx(ptx: &str, entry: &str, n: u32) -> Result<Value, Error> {
    use gpu::kernels::{Argument, Kernel};
    let kernel = Kernel::load(ptx, entry).map_err(gpu_err("loading the kernel"))?;
    let data = Buffer::create(u64::from(n) * 4).map_err(gpu_err("allocating"))?;
    kernel
        .launch(
            (n.div_ceil(256), 1, 1),
            (256, 1, 1),
            0,
            &[Argument::Buffer(&data), Argument::U32(n)],
        )
        .map_err(gpu_err("launching the kernel"))?;
    Ok(json!(gpu::download(&data).map_err(gpu_err("download"))?))
}

/// `mib` MiB written into a new buffer from guest memory, 64 MiB (or less) at a time; the
/// seconds the writes took, synchronized.
fn time_upload(mib: u64) -> Result<Value, Error> {
    let total = mib << 20;
    let chunk: Vec<u8> = (0..total.min(64 << 20)).map(|i| i as u8).collect();
    let buffer = Buffer::create(total).map_err(gpu_err("allocating"))?;
    let started = std::time::Instant::now();
    let mut at = 0;
    while at < total {
        let len = chunk.len().min((total - at) as usize);
        buffer
            .write(at, &chunk[..len])
            .map_err(gpu_err("writing"))?;
        at += len as u64;
    }
    gpu::devices::synchronize().map_err(gpu_err("synchronize"))?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(json!({"seconds": seconds, "bytes": total, "device": gpu::devices::current().name}))
}

impl lode_guest::Function for Mlp {
    fn call(args: Vec<Value>, kwargs: Map<String, Value>) -> Result<Value, Error> {
        if let Some(mib) = kwargs.get("upload") {
            let mib = mib
                .as_u64()
                .filter(|&m| m > 0 && m <= 16 << 10)
                .ok_or_else(|| bad("upload must be MiB from 1 to 16384"))?;
            return time_upload(mib);
        }
        if let Some(seconds) = kwargs.get("busy") {
            let seconds = seconds
                .as_f64()
                .filter(|s| (0.0..=60.0).contains(s))
                .ok_or_else(|| bad("busy must be seconds from 0 to 60"))?;
            return keep_busy(seconds);
        }
        if let Some(ptx) = kwargs.get("ptx").and_then(Value::as_str) {
            let entry = kwargs.get("entry").and_then(Value::as_str).unwrap_or("main");
            let n = kwargs
                .get("n")
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n > 0 && n <= 1 << 20)
                .ok_or_else(|| bad("n must be a count from 1 to 1048576"))?;
            return run_ptx(ptx, entry, n);
        }
        if let Some(n) = kwargs.get("matmul") {
            let n = n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n > 0 && n <= 4096)
                .ok_or_else(|| bad("matmul must be a size from 1 to 4096"))?;
            let on = kwargs.get("on").and_then(Value::as_str).unwrap_or("gpu");
            let repeat = kwargs
                .get("repeat")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .clamp(1, 1000) as u32;
            return time_matmul(n, on, repeat);
        }
        let rows = args
            .first()
            .and_then(Value::as_array)
            .filter(|rows| !rows.is_empty())
            .ok_or_else(|| bad("pass a non-empty list of rows: mlp([[x0, x1, ...], ...])"))?;
        let batch = rows.len() as u32;
        let layers = load(batch)?;
        let input = batch_of(rows, layers[0].inputs)?;
        let width = layers[layers.len() - 1].outputs;
        let Some(repeat) = kwargs.get("repeat").and_then(Value::as_u64) else {
            return Ok(rows_of(&forward(&layers, &input, batch)?, width));
        };
        // Timed as a server would run it: the model loaded once, then forward passes (the
        // input uploaded, the layers run, the answer read back).
        let repeat = repeat.clamp(1, 1000);
        let started = std::time::Instant::now();
        let mut output = Vec::new();
        for _ in 0..repeat {
            output = forward(&layers, &input, batch)?;
        }
        let seconds = started.elapsed().as_secs_f64() / repeat as f64;
        Ok(json!({"seconds": seconds, "output": rows_of(&output, width)}))
    }
}

lode_guest::function!(Mlp);
