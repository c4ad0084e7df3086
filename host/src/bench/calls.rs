//! `lode bench calls`: Wasm functions called by name (samples/wasm-fanout), through a real
//! `lode serve` on loopback.
//!
//! - call latency through the API, against a Python function's warm call in the same run;
//! - in-process `invoke` cost: `main` calling `square` 10,000 times, each call timed by
//!   `main`'s own clock (each gets a fresh instance of `square`);
//! - fanned-out calls per second over 10,000 calls;
//! - the cross-engine cost: `main` invoking a Python function, per call, against calling
//!   that Python function straight through the API;
//! - pre-initialization (samples/wasm-preinit): a call whose start-up work was snapshotted at
//!   deploy, against the same component doing it in every call;
//! - fuel metering (`[limits] fuel`): that CPU-bound cold call on a metered engine, against
//!   the same call unmetered.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::bench::support::{row, start_server};

/// Settings for `lode bench calls`.
#[derive(Debug, Args)]
pub struct CallsBench {
    /// Calls timed through the API.
    #[arg(long, default_value_t = 1000)]
    calls: usize,
    /// Calls `main` fans out to.
    #[arg(long, default_value_t = 10_000)]
    fan_out: u64,
    /// Where debootstrap bases are kept (the Python side needs one).
    #[arg(long, default_value = "/var/cache/lode/images/base")]
    image_base_dir: PathBuf,
}

/// Runs `lode bench calls`.
pub async fn calls(args: CallsBench) -> Result<()> {
    let server = start_server(&args.image_base_dir)?;
    let lode = std::env::current_exe()?;
    let repo = std::env::current_dir()?;
    // The prime sieve again, as an app whose calls are metered with fuel.
    let metered = tempfile::tempdir()?;
    std::fs::write(
        metered.path().join("lode.toml"),
        format!(
            "app = \"primes-fuel\"\n[limits]\nfuel = 1_000_000_000_000\n\
             [[function]]\nname = \"nth-cold\"\npath = {:?}\nmemory = 64\n",
            repo.join("samples/wasm-preinit")
        ),
    )?;
    for (what, name) in [
        (repo.join("samples/wasm-fanout"), "fan"),
        (repo.join("samples/python-hello/app.py"), "hello-py"),
        (repo.join("samples/wasm-preinit"), "primes"),
        (metered.path().to_path_buf(), "primes-fuel"),
    ] {
        let out = Command::new(&lode)
            .args(["--api-url", &server.api, "--token", &server.token, "deploy"])
            .arg(&what)
            .args(["--name", name])
            .output()?;
        if !out.status.success() {
            bail!(
                "deploying {} failed (run from the repository root): {}",
                what.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let http = reqwest::Client::new();
    let call = |target: &str, arg: Value| server.call(&http, target, json!({ "args": [arg] }));
    println!(
        "lode bench calls: {} API calls, main fanning out to {} calls",
        args.calls, args.fan_out
    );
    for i in 0..50 {
        call("fan/square", json!(i)).await?;
        call("hello-py/square", json!(i)).await?;
    }
    let mut python = Vec::new();
    let mut wasm = Vec::new();
    for i in 0..args.calls {
        let started = Instant::now();
        call("hello-py/square", json!(i)).await?;
        python.push(started.elapsed());
        let started = Instant::now();
        call("fan/square", json!(i)).await?;
        wasm.push(started.elapsed());
    }
    let python_p50 = row(
        "Python function, warm, through the API (baseline)",
        python,
        None,
    );
    row("Wasm function through the API", wasm, Some(python_p50));

    // Per invoke, as the calling guest sees it: JSON in and out, a fresh instance, the call.
    let timed = call("fan/main", json!({ "n": 10_000, "timed": true })).await?;
    let invokes: Vec<Duration> = timed["nanos"]
        .as_array()
        .map(|nanos| {
            nanos
                .iter()
                .filter_map(Value::as_u64)
                .map(Duration::from_nanos)
                .collect()
        })
        .unwrap_or_default();
    if invokes.len() != 10_000 {
        bail!("main returned {} timings, not 10000", invokes.len());
    }
    let invoke_p50 = row(
        "in-process invoke, Wasm to Wasm (fresh instance each)",
        invokes,
        None,
    );

    let n = args.fan_out;
    let started = Instant::now();
    let sum = call("fan/main", json!({ "n": n })).await?;
    let elapsed = started.elapsed();
    let expected = (0..n as i128).map(|i| i * i).sum::<i128>();
    if sum.as_i64().map(i128::from) != Some(expected) {
        bail!("main returned {sum}, not {expected}");
    }
    println!(
        "  {:<52} {:.0} calls/s ({n} calls in {:.2?}, {:.2?} each)",
        "fan-out, main invoking square",
        n as f64 / elapsed.as_secs_f64(),
        elapsed,
        elapsed / n as u32,
    );

    let cross = 200u64;
    let started = Instant::now();
    call(
        "fan/main",
        json!({ "n": cross, "target": "hello-py/square" }),
    )
    .await?;
    let per_cross = started.elapsed() / cross as u32;
    println!(
        "  {:<52} {:>9.2?} per call, against {:.2?} for the same call through the API",
        "cross-engine invoke, Wasm to Python", per_cross, python_p50
    );
    // Pre-initialization: the same component with its start-up (a 5-million prime sieve)
    // snapshotted at deploy, against building it in every call's fresh instance.
    let mut snapshotted = Vec::new();
    let mut cold = Vec::new();
    let mut fueled = Vec::new();
    for i in 0..50 {
        let started = Instant::now();
        call("primes/nth-cold", json!(i + 1)).await?;
        cold.push(started.elapsed());
        let started = Instant::now();
        call("primes/nth", json!(i + 1)).await?;
        snapshotted.push(started.elapsed());
        let started = Instant::now();
        call("primes-fuel/nth-cold", json!(i + 1)).await?;
        fueled.push(started.elapsed());
    }
    let cold_p50 = row(
        "start-up work in every call (primes/nth-cold, baseline)",
        cold,
        None,
    );
    row(
        "the same, pre-initialized at deploy (primes/nth)",
        snapshotted,
        Some(cold_p50),
    );
    row(
        "the same cold call, metered with fuel",
        fueled,
        Some(cold_p50),
    );

    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "  targets: invoke p50 <= 20 us: {} ({invoke_p50:.2?}); cross-engine adds <= 1 ms over \
         the callee: {} (the Python call's own API round trip is {python_p50:.2?})",
        verdict(invoke_p50 <= Duration::from_micros(20)),
        verdict(per_cross <= python_p50 + Duration::from_millis(1)),
    );
    Ok(())
}
