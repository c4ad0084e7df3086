//! `lode bench python`: Python function calls through a real `lode serve` (started here on
//! loopback with its own dirs), beside the same work done by a bare local Python process.
//!
//! - cold call: no warm container (the image is cached), timed from the API request to its
//!   answer, against `python3` starting, importing the same module and calling it;
//! - warm call: a container is up, against the same call inside one Python process;
//! - `map` over 1,000 inputs with `max_containers=4`, through the SDK, against a local loop;
//! - then the Modal-shaped paths of `python_modal.rs`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::bench::support::{call_square, live_containers, row, start_server};
use anyhow::{Result, bail};
use clap::Args;

/// Settings for `lode bench python`.
#[derive(Debug, Args)]
pub struct PythonBench {
    /// Cold calls to time (each waits for the last container to go first).
    #[arg(long, default_value_t = 20)]
    cold: usize,
    /// Warm calls to time.
    #[arg(long, default_value_t = 500)]
    warm: usize,
    /// Inputs for the map run.
    #[arg(long, default_value_t = 1000)]
    map_inputs: usize,
    /// Where debootstrap bases are kept.
    #[arg(long, default_value = "/var/cache/lode/images/base")]
    image_base_dir: PathBuf,
    /// Leave out the cold uv and pip builds of numpy (they download it twice).
    #[arg(long)]
    skip_builds: bool,
    /// Cold calls per memory-snapshot row (0 leaves the rows out).
    #[arg(long, default_value_t = 5)]
    snapshot_cold: usize,
    /// Only the memory-snapshot rows.
    #[arg(long)]
    only_snapshot: bool,
}

const APP: &str = r#"
import lode

app = lode.App("bench")


@app.function(min_containers=1)
def square(x):
    return x * x


@app.function(max_containers=4, concurrency=1)
def mapped(x):
    return x * x


@app.function(scaledown_window=0)
def cold(x):
    return x * x


@app.cls(min_containers=1)
class Model:
    @lode.enter()
    def load(self):
        self.power = 2

    @lode.method()
    def predict(self, x):
        return x ** self.power
"#;

/// What the bare local process runs: the same module, imported and called.
const LOCAL: &str = r#"
import sys, time
sys.path.insert(0, sys.argv[1])
import lode  # the SDK, as the container has it
import bench_app
mode = sys.argv[2]
if mode == "call":
    bench_app.square.local(4)
elif mode == "warm":
    n = int(sys.argv[3])
    times = []
    for i in range(n):
        t = time.perf_counter()
        bench_app.square.local(i)
        times.append(time.perf_counter() - t)
    times.sort()
    print(times[len(times) // 2], times[int((len(times) - 1) * 0.99)])
elif mode == "map":
    n = int(sys.argv[3])
    t = time.perf_counter()
    list(map(bench_app.mapped.local, range(n)))
    print(time.perf_counter() - t)
elif mode == "remote-map":
    n = int(sys.argv[3])
    f = lode.Function.from_name("bench", "mapped")
    t = time.perf_counter()
    out = list(f.map(range(n)))
    assert out == [i * i for i in range(n)], "wrong results"
    print(time.perf_counter() - t)
"#;

/// Runs `lode bench python`.
pub async fn python(args: PythonBench) -> Result<()> {
    let mut server = start_server(&args.image_base_dir)?;
    let work = tempfile::tempdir()?;
    let app_file = work.path().join("bench_app.py");
    std::fs::write(&app_file, APP)?;
    let local_file = work.path().join("local.py");
    std::fs::write(&local_file, LOCAL)?;
    let sdk = crate::sdk::extract(&work.path().join("sdk"))?;
    let lode = std::env::current_exe()?;
    let deploy = Command::new(&lode)
        .args(["--api-url", &server.api, "--token", &server.token, "deploy"])
        .arg(&app_file)
        .output()?;
    if !deploy.status.success() {
        bail!(
            "deploying the bench app failed: {}",
            String::from_utf8_lossy(&deploy.stderr)
        );
    }
    if args.only_snapshot {
        return crate::bench::python_snapshot::snapshot_rows(
            &mut server,
            work.path(),
            args.snapshot_cold.max(1),
        )
        .await;
    }
    println!(
        "lode bench python: {} cold and {} warm calls, map over {} inputs (max_containers=4)",
        args.cold, args.warm, args.map_inputs
    );
    let python = |extra: &[&str]| -> Result<std::process::Output> {
        let out = Command::new("python3")
            .arg(&local_file)
            .arg(work.path())
            .args(extra)
            .env("PYTHONPATH", &sdk)
            .env("LODE_API", &server.api)
            .env("LODE_TOKEN", &server.token)
            .output()?;
        if !out.status.success() {
            bail!("python3 failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(out)
    };

    // Cold: a bare process importing the module and calling it, against a call with no
    // container up.
    let mut local_cold = Vec::new();
    for _ in 0..args.cold {
        let started = Instant::now();
        python(&["call"])?;
        local_cold.push(started.elapsed());
    }
    let local_cold = row(
        "local: python3 starts, imports the app, calls (baseline)",
        local_cold,
        None,
    );
    let http = reqwest::Client::new();
    let call = |function: &'static str, x: i64| call_square(&http, &server, "bench", function, x);
    let containers = |function: &'static str| live_containers(&http, &server, "bench", function);
    // The first start mounts the image and warms the page cache; it is not counted.
    call("cold", 1).await?;
    let mut cold = Vec::new();
    for i in 0..args.cold {
        let deadline = Instant::now() + Duration::from_secs(30);
        while containers("cold").await? > 0 {
            if Instant::now() > deadline {
                bail!("the cold function's container did not stop");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = Instant::now();
        call("cold", i as i64).await?;
        cold.push(started.elapsed());
    }
    let cold_p50 = row(
        "lode: cold call (image cached, no container)",
        cold,
        Some(local_cold),
    );

    // Warm: the in-process call, against a call to a container that is up.
    let out = python(&["warm", &args.warm.to_string()])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text
        .split_whitespace()
        .filter_map(|v| v.parse::<f64>().ok());
    let (local_p50, local_p99) = (parts.next().unwrap_or(0.0), parts.next().unwrap_or(0.0));
    println!(
        "  {:<52} p50 {:>9.2?}  p99 {:>9.2?}",
        "local: the same call in one Python process (baseline)",
        Duration::from_secs_f64(local_p50),
        Duration::from_secs_f64(local_p99)
    );
    for i in 0..20 {
        call("square", i).await?;
    }
    let mut warm = Vec::new();
    for i in 0..args.warm {
        let started = Instant::now();
        call("square", i as i64).await?;
        warm.push(started.elapsed());
    }
    let warm_p50 = row("lode: warm call through the API", warm, None);

    // Map: the SDK's map over the inputs, against a local loop.
    let n = args.map_inputs.to_string();
    let local_map: f64 = String::from_utf8_lossy(&python(&["map", &n])?.stdout)
        .trim()
        .parse()
        .unwrap_or(0.0);
    // Once to start the four containers, then timed.
    python(&["remote-map", "64"])?;
    let remote_map: f64 = String::from_utf8_lossy(&python(&["remote-map", &n])?.stdout)
        .trim()
        .parse()
        .unwrap_or(0.0);
    let inputs = args.map_inputs as f64;
    println!(
        "  {:<52} {:>8.0} inputs/s (local loop: {:.0} inputs/s)",
        "lode: map through the SDK, 4 warm containers",
        inputs / remote_map,
        inputs / local_map.max(1e-9)
    );
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "  targets: cold <= 150 ms p50: {}; warm <= 2 ms p50: {}",
        verdict(cold_p50 <= Duration::from_millis(150)),
        verdict(warm_p50 <= Duration::from_millis(2))
    );
    crate::bench::python_modal::modal_surface(
        &server,
        work.path(),
        &sdk,
        args.warm,
        warm_p50,
        !args.skip_builds,
    )
    .await?;
    if args.snapshot_cold > 0 {
        crate::bench::python_snapshot::snapshot_rows(&mut server, work.path(), args.snapshot_cold)
            .await?;
    }
    Ok(())
}
