//! Write a Lode function in a few lines: implement [`Function`] on JSON values and name the
//! type in [`function!`]. The component then exports `lode:function/handler` and can call
//! other functions, Wasm or Python, through [`invoke`].
//!
//! ```ignore
//! struct Square;
//! impl lode_guest::Function for Square {
//!     fn call(args: Vec<Value>, _kwargs: Map<String, Value>) -> Result<Value, Error> {
//!         let x = lode_guest::arg_i64(&args, 0)?;
//!         Ok((x * x).into())
//!     }
//! }
//! lode_guest::function!(Square);
//! ```

wit_bindgen::generate!({
    path: "../../host/wit/lode-function",
    world: "function",
    pub_export_macro: true,
    default_bindings_module: "lode_guest",
});

pub use lode::function::types::Error;
pub use serde_json::{Map, Value, json};

/// A function on the call payload: positional and keyword arguments in, a JSON value out.
pub trait Function {
    /// Runs one call.
    fn call(args: Vec<Value>, kwargs: Map<String, Value>) -> Result<Value, Error>;

    /// Heavy start-up work (tables, parsed data). With `pre_init = true` in lode.toml, Lode
    /// runs it once at deploy and snapshots the result, so calls start with it done. It
    /// sees no config, secrets, files or network; it should not print or draw random seeds
    /// (a `HashMap`'s, say), which the snapshot would freeze for every call.
    fn init() {}
}

/// An error of `kind` saying `message`.
pub fn error(kind: &str, message: impl Into<String>) -> Error {
    Error {
        kind: kind.into(),
        message: message.into(),
    }
}

/// Decodes the payload, runs `F`, encodes the result: what [`function!`] exports.
pub fn dispatch<F: Function>(input: &[u8]) -> Result<Vec<u8>, Error> {
    let payload: Value = serde_json::from_slice(input)
        .map_err(|e| error("invalid_input", format!("the input is not JSON: {e}")))?;
    // The host's pre-initialization call (`pre_init`); callers cannot send this field.
    if payload.get("lode_init") == Some(&Value::Bool(true)) {
        F::init();
        return Ok(b"null".to_vec());
    }
    let args = match payload.get("args") {
        None => Vec::new(),
        Some(Value::Array(args)) => args.clone(),
        Some(_) => return Err(error("invalid_input", "\"args\" must be an array")),
    };
    let kwargs = match payload.get("kwargs") {
        None => Map::new(),
        Some(Value::Object(kwargs)) => kwargs.clone(),
        Some(_) => return Err(error("invalid_input", "\"kwargs\" must be an object")),
    };
    let result = F::call(args, kwargs)?;
    serde_json::to_vec(&result).map_err(|e| error("invalid_output", e.to_string()))
}

/// Argument `index` as an integer, or a named error.
pub fn arg_i64(args: &[Value], index: usize) -> Result<i64, Error> {
    args.get(index).and_then(Value::as_i64).ok_or_else(|| {
        error(
            "invalid_input",
            format!("argument {index} must be an integer"),
        )
    })
}

/// Calls `app/function` (an empty app is this one) with positional `args` and waits.
pub fn invoke(app: &str, function: &str, args: &[Value]) -> Result<Value, Error> {
    let input = serde_json::to_vec(&json!({"args": args, "kwargs": {}})).expect("JSON encodes");
    let output = lode::function::invoke::invoke(app, function, &input)?;
    serde_json::from_slice(&output).map_err(|e| error("invalid_output", e.to_string()))
}

/// Starts `app/function` with `args`; [`wait`] gets its result.
pub fn spawn(app: &str, function: &str, args: &[Value]) -> Result<String, Error> {
    let input = serde_json::to_vec(&json!({"args": args, "kwargs": {}})).expect("JSON encodes");
    lode::function::invoke::spawn(app, function, &input)
}

/// Waits for a spawned call's result.
pub fn wait(call_id: &str) -> Result<Value, Error> {
    let output = lode::function::invoke::await_(call_id)?;
    serde_json::from_slice(&output).map_err(|e| error("invalid_output", e.to_string()))
}

/// A line in `lode logs`.
pub fn log(message: &str) {
    lode::function::log::log(lode::function::log::Level::Info, message);
}

/// A value from the app's config or the function's secrets.
pub fn config(key: &str) -> Option<String> {
    lode::function::config::get(key)
}

/// Exports `$ty` (a [`Function`]) as the component's `lode:function/handler`.
#[macro_export]
macro_rules! function {
    ($ty:ty) => {
        struct __LodeFunction;
        impl $crate::exports::lode::function::handler::Guest for __LodeFunction {
            fn call(input: Vec<u8>) -> Result<Vec<u8>, $crate::Error> {
                $crate::dispatch::<$ty>(&input)
            }
        }
        $crate::export!(__LodeFunction with_types_in $crate);
    };
}

/// `lode:gpu`: host-owned buffers and tensor ops. A function that declares no `gpu` runs them
/// on the host's CPU backend, with the same results as on a GPU; either way its buffers count
/// against a quota the size of its memory limit.
///
/// ```ignore
/// use lode_guest::gpu;
/// let a = gpu::upload(&[1.0, 2.0, 3.0, 4.0])?;
/// let out = gpu::Buffer::create(16)?;
/// gpu::ops::matmul(&gpu::f32(&a, &[2, 2]), &gpu::f32(&a, &[2, 2]), &gpu::f32(&out, &[2, 2]), false, false)?;
/// let product = gpu::download(&out)?;
/// ```
pub mod gpu {
    #[allow(missing_docs)]
    mod bindings {
        wit_bindgen::generate!({
            path: "../../wasi-gpu/wit",
            world: "gpu",
        });
    }

    pub use bindings::lode::gpu::types::{Buffer, Device, Dtype, Error, ErrorCode, Tensor};
    pub use bindings::lode::gpu::{devices, kernels, ops};

    /// A buffer holding `values` as f32.
    pub fn upload(values: &[f32]) -> Result<Buffer, Error> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Buffer::from_bytes(&bytes)
    }

    /// A buffer's bytes read back as f32.
    pub fn download(buffer: &Buffer) -> Result<Vec<f32>, Error> {
        let bytes = buffer.read(0, buffer.size())?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// The whole of `buffer` (from its start) as an f32 tensor of `shape`.
    pub fn f32<'a>(buffer: &'a Buffer, shape: &[u32]) -> Tensor<'a> {
        Tensor {
            buffer,
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            offset: 0,
        }
    }

    /// A guest error naming what the GPU call was and what went wrong.
    pub fn failed(what: &str, e: Error) -> super::Error {
        super::error("gpu", format!("{what}: {:?}: {}", e.code, e.message))
    }
}
