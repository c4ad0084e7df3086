//! `probe("mode")` runs into one limit on purpose:
//! - `recurse`: calls itself through `invoke` until the call-depth limit stops it;
//! - `spawn-recurse`: the same through `spawn` and `await`;
//! - `spin`: loops until the call's deadline interrupts it;
//! - `grow`: allocates until the instance's memory limit refuses more;
//! - `read`: reads a host file, which a function sees only through its preopened volume;
//! - `volume`: writes and reads back a file in its volume at `/data`;
//! - `escape`: climbs out of `/data` with `..`, which is refused;
//! - `connect`: opens a TCP connection, which a function without network cannot;
//! - `config`: returns the app's `greeting` config value.
//!
//!     lode deploy samples/wasm-limits --name limits ; lode call limits/probe recurse

use lode_guest::{Error, Map, Value, json};

struct Probe;

impl lode_guest::Function for Probe {
    fn call(args: Vec<Value>, _kwargs: Map<String, Value>) -> Result<Value, Error> {
        match args.first().and_then(Value::as_str).unwrap_or("") {
            "recurse" => lode_guest::invoke("", "probe", &[json!("recurse")]),
            "spawn-recurse" => {
                let id = lode_guest::spawn("", "probe", &[json!("spawn-recurse")])?;
                lode_guest::wait(&id)
            }
            "spin" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
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
            other => Err(lode_guest::error(
                "invalid_input",
                format!(
                    "unknown mode {other:?}: recurse, spawn-recurse, spin, grow, read, volume, \
                     escape, connect, config"
                ),
            )),
        }
    }
}

lode_guest::function!(Probe);
