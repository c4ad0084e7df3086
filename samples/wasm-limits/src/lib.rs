//! `probe("mode")` runs into one limit on purpose:
//! - `recurse`: calls itself through `invoke` until the call-depth limit stops it;
//! - `spawn-recurse`: the same through `spawn` and `await`;
//! - `spin`: loops until the call's deadline interrupts it, or its `[limits] fuel` runs out;
//! - `grow`: allocates until the instance's memory limit refuses more;
//! - `read`: reads a host file, which a function sees only through its preopened volume;
//! - `volume`: writes and reads back a file in its volume at `/data`;
//! - `escape`: climbs out of `/data` with `..`, which is refused;
//! - `connect`: opens a TCP connection, which a function without network cannot;
//! - `config`: returns the app's `greeting` config value;
//! - `deep N`: recurses N frames in plain Wasm, past a small `wasm_stack_kib`;
//! - `fan N`: invokes itself (`config`) N times, past a small `fan_out`;
//! - `nap N`: sleeps N milliseconds, holding an instance but no CPU (a call that waits on
//!   I/O, for `lode bench cluster`);
//! - `bounce`: calls the Python function `feat/bounce`, which calls back here: a loop across
//!   engines that the call-depth limit stops all the same.
//!
//! Its `init` never finishes, so deploying it with `pre_init = true` runs into the deploy's
//! timeout for the init (the function's `timeout`).
//!
//! It also serves HTTP (`wasi:http/incoming-handler`), so one component takes calls by name
//! and requests at its web route; a request to a path ending in `/spin` spins like `spin`.
//!
//!     lode deploy samples/wasm-limits --name limits ; lode call limits/probe recurse

use std::io::Write as _;

use lode_guest::{Error, Map, Value, json};
use wasip2::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

/// The `N` argument of `deep` and `fan`.
fn count(args: &[Value]) -> Result<u64, Error> {
    args.get(1)
        .and_then(Value::as_u64)
        .ok_or_else(|| lode_guest::error("invalid_input", "this mode takes a count: [mode, N]"))
}

/// Recurses `n` frames of plain Wasm (scalars only, so the frames sit on the wasm stack,
/// not on the shadow stack in linear memory).
fn deep(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    std::hint::black_box(deep(std::hint::black_box(n - 1))) + 1
}

/// Loops until the host stops it.
fn spin() -> ! {
    let mut x: u64 = 0;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

struct Probe;

impl lode_guest::Function for Probe {
    fn init() {
        spin()
    }

    fn call(args: Vec<Value>, _kwargs: Map<String, Value>) -> Result<Value, Error> {
        match args.first().and_then(Value::as_str).unwrap_or("") {
            "recurse" => lode_guest::invoke("", "probe", &[json!("recurse")]),
            "spawn-recurse" => {
                let id = lode_guest::spawn("", "probe", &[json!("spawn-recurse")])?;
                lode_guest::wait(&id)
            }
            "spin" => spin(),
            "grow" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "read" => std::fs::read_to_string("/etc/hostname")
                .map(Value::from)
                .map_err(|e| lode_guest::error("no_filesystem", e.to_string())),
            "volume" => std::fs::write("/data/note.txt", "kept")
                .and_then(|()| std::fs::read_to_string("/data/note.txt"))
                .map(Value::from)
                .map_err(|e| lode_guest::error("volume", e.to_string())),
            "escape" => std::fs::read_to_string("/data/../../../../etc/hostname")
                .map(Value::from)
                .map_err(|e| lode_guest::error("no_filesystem", e.to_string())),
            "connect" => std::net::TcpStream::connect("127.0.0.1:22")
                .map(|_| json!("connected"))
                .map_err(|e| lode_guest::error("no_network", e.to_string())),
            "config" => Ok(lode_guest::config("greeting").map_or(Value::Null, Value::from)),
            "deep" => Ok(json!(deep(count(&args)?))),
            "fan" => {
                for _ in 0..count(&args)? {
                    lode_guest::invoke("", "probe", &[json!("config")])?;
                }
                Ok(json!("done"))
            }
            "bounce" => lode_guest::invoke("feat", "bounce", &[]),
            "nap" => {
                std::thread::sleep(std::time::Duration::from_millis(count(&args)?));
                Ok(json!("rested"))
            }
            other => Err(lode_guest::error(
                "invalid_input",
                format!(
                    "unknown mode {other:?}: recurse, spawn-recurse, spin, grow, read, volume, \
                     escape, connect, config, deep, fan, bounce, nap"
                ),
            )),
        }
    }
}

lode_guest::function!(Probe);

wasip2::http::proxy::export!(Probe);

impl wasip2::exports::http::incoming_handler::Guest for Probe {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        if request.path_with_query().is_some_and(|path| path.ends_with("/spin")) {
            spin();
        }
        let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
            .expect("static headers are valid");
        let response = OutgoingResponse::new(headers);
        let body = response.body().expect("a new response has a body");
        ResponseOutparam::set(response_out, Ok(response));
        let mut out = body.write().expect("the body stream opens once");
        out.write_all(b"probe: POST /v1/apps/limits/functions/probe/call to call me by name\n")
            .expect("writing the body");
        out.flush().expect("flushing the body");
        drop(out);
        OutgoingBody::finish(body, None).expect("finishing the body");
    }
}
