//! The Modal-shaped part of `lode bench python`, each path beside a baseline measured in the
//! same run:
//!
//! - a warm `Cls` method call through the API, against a warm function call;
//! - `Dict` put + get and `Queue` put + get through the SDK, against a warm function call
//!   through the SDK;
//! - a FastAPI hello under `wrk` through Lode, against the same app under `uvicorn` on the
//!   host with as many worker processes (one); both have `fastapi[standard]` (uvloop);
//! - `lode dev`: a save of a code-only change to the new code answering a web request;
//! - `uv_pip_install(numpy)` against `pip_install(numpy)`, both cold builds.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::bench::support::{LodeServer, bench_venv, row};

/// The FastAPI app, as Lode serves it and as uvicorn does.
const FASTAPI_APP: &str = r#"
from fastapi import FastAPI

api = FastAPI()


@api.get("/")
def hello():
    return {"hello": "world"}
"#;

const WEB_APP: &str = r#"
import lode

image = (
    lode.Image.debian_slim()
    .uv_pip_install("fastapi[standard]==0.115.12")
    .add_local_python_source("bench_fastapi")
)
app = lode.App("bench-web", image=image)


@app.function(max_containers=1, min_containers=1)
@lode.concurrent(max_inputs=64)
@lode.asgi_app()
def web():
    import bench_fastapi
    return bench_fastapi.api
"#;

const DEV_APP: &str = r#"
import lode

app = lode.App("bench-dev")


@app.function()
@lode.fastapi_endpoint(method="GET")
def version():
    return VERSION


VERSION = 0
"#;

const OBJECTS: &str = r#"
import statistics, sys, time
import lode

n = int(sys.argv[1])
d = lode.Dict.from_name("bench-dict", create_if_missing=True)
q = lode.Queue.from_name("bench-queue", create_if_missing=True)
f = lode.Function.from_name("bench", "square")
d["warm"] = 1; q.put(1); q.get(); f.remote(1)
def timed(step):
    times = []
    for i in range(n):
        t = time.perf_counter(); step(i); times.append(time.perf_counter() - t)
    return statistics.median(times)
def dict_step(i):
    d[f"k{i % 100}"] = {"i": i}
    assert d[f"k{i % 100}"] == {"i": i}
def queue_step(i):
    q.put({"i": i})
    assert q.get(timeout=5) == {"i": i}
print(timed(lambda i: f.remote(i)), timed(dict_step), timed(queue_step))
"#;

/// Runs the Modal-shaped benches against `server`; `warm_call` is the warm function call
/// measured earlier in the run, the baseline for the class method.
pub async fn modal_surface(
    server: &LodeServer,
    work: &Path,
    sdk: &Path,
    warm: usize,
    warm_call: Duration,
    builds: bool,
) -> Result<()> {
    let http = reqwest::Client::new();
    // A warm class method call, through the API.
    let call = |x: i64| {
        let request = http
            .post(format!("{}/v1/apps/bench/functions/Model/call", server.api))
            .bearer_auth(&server.token)
            .json(&serde_json::json!({"args": [x], "method": "predict"}));
        async move {
            let body: Value = request.send().await?.json().await?;
            if body["result"] != serde_json::json!(x * x) {
                bail!("the method call failed: {body}");
            }
            anyhow::Ok(())
        }
    };
    for i in 0..20 {
        call(i).await?;
    }
    let mut times = Vec::new();
    for i in 0..warm {
        let started = Instant::now();
        call(i as i64).await?;
        times.push(started.elapsed());
    }
    let cls_p50 = row(
        "lode: warm Cls method call through the API",
        times,
        Some(warm_call),
    );

    // Dict and Queue through the SDK.
    let script = work.join("objects.py");
    std::fs::write(&script, OBJECTS)?;
    let out = Command::new("python3")
        .arg(&script)
        .arg("300")
        .env("PYTHONPATH", sdk)
        .env("LODE_API", &server.api)
        .env("LODE_TOKEN", &server.token)
        .output()?;
    if !out.status.success() {
        bail!(
            "the Dict/Queue bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let figures: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let [sdk_call, dict, queue] = figures[..] else {
        bail!(
            "the Dict/Queue bench printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    let ms = |s: f64| Duration::from_secs_f64(s);
    println!(
        "  {:<52} p50 {:>9.2?}",
        "sdk: warm function call (baseline)",
        ms(sdk_call)
    );
    println!(
        "  {:<52} p50 {:>9.2?}, {:.1}x the baseline p50",
        "sdk: Dict put + get",
        ms(dict),
        dict / sdk_call
    );
    println!(
        "  {:<52} p50 {:>9.2?}, {:.1}x the baseline p50",
        "sdk: Queue put + get",
        ms(queue),
        queue / sdk_call
    );

    let web = fastapi_under_wrk(server, work, sdk).await?;
    let dev_p50 = dev_loop(server, work).await?;
    let builds = if builds {
        Some(cold_builds(server, work)?)
    } else {
        println!("  (uv against pip builds skipped: --skip-builds)");
        None
    };

    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "  targets: Cls call <= 2 ms p50: {}; Dict and Queue <= 2 ms p50: {}; lode dev <= 1 s p50: {}",
        verdict(cls_p50 <= Duration::from_millis(2)),
        verdict(dict <= 0.002 && queue <= 0.002),
        verdict(dev_p50 <= Duration::from_secs(1)),
    );
    if let Some((lode, uvicorn)) = web {
        println!(
            "  target: FastAPI through Lode >= 50% of uvicorn: {} ({:.0}%)",
            verdict(lode >= uvicorn * 0.5),
            100.0 * lode / uvicorn
        );
    }
    if let Some((uv, pip)) = builds {
        println!("  target: uv faster than pip: {}", verdict(uv < pip));
    }
    Ok(())
}

/// `wrk` against Lode serving the FastAPI app, and against uvicorn serving it on the host
/// with one worker process; returns both in requests per second.
async fn fastapi_under_wrk(
    server: &LodeServer,
    work: &Path,
    sdk: &Path,
) -> Result<Option<(f64, f64)>> {
    if Command::new("wrk").arg("--version").output().is_err() {
        println!("  (FastAPI under wrk skipped: wrk is not installed; apt-get install wrk)");
        return Ok(None);
    }
    let Some(python) = bench_venv(
        "fastapi-venv",
        &["fastapi==0.115.12", "uvicorn[standard]==0.34.0"],
    ) else {
        return Ok(None);
    };
    std::fs::write(work.join("bench_fastapi.py"), FASTAPI_APP)?;
    let app = work.join("bench_web.py");
    std::fs::write(&app, WEB_APP)?;
    deploy(server, &app, sdk, &["--name", "bench-web"])?;
    let public = public_url(server).await?;
    let lode_url = format!("{public}/bench-web/web/");
    wait_for_answer(&lode_url, r#"{"hello":"world"}"#).await?;
    let lode = wrk(&lode_url)?;

    let port = free_port()?;
    let mut uvicorn = Command::new(&python)
        .args([
            "-m",
            "uvicorn",
            "bench_fastapi:api",
            "--workers",
            "1",
            "--log-level",
            "warning",
        ])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .current_dir(work)
        .stdout(Stdio::null())
        .spawn()
        .context("starting uvicorn")?;
    let uvicorn_url = format!("http://127.0.0.1:{port}/");
    let measured = match wait_for_answer(&uvicorn_url, r#"{"hello":"world"}"#).await {
        Ok(()) => wrk(&uvicorn_url),
        Err(e) => Err(e),
    };
    let _ = uvicorn.kill();
    let _ = uvicorn.wait();
    let baseline = measured?;
    println!(
        "  {:<52} {:>8.0} req/s",
        "host: FastAPI under uvicorn, 1 worker (baseline)", baseline
    );
    println!(
        "  {:<52} {:>8.0} req/s, {:.0}% of the baseline",
        "lode: FastAPI as @asgi_app, 1 container",
        lode,
        100.0 * lode / baseline
    );
    Ok(Some((lode, baseline)))
}

/// Saves a code-only change to a `lode dev` app and times it to the new code answering,
/// five times; returns the p50.
async fn dev_loop(server: &LodeServer, work: &Path) -> Result<Duration> {
    let app = work.join("bench_dev.py");
    std::fs::write(&app, DEV_APP)?;
    let mut dev = Command::new(std::env::current_exe()?)
        .args(["--api-url", &server.api, "--token", &server.token, "dev"])
        .arg(&app)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let url = format!("{}/bench-dev-dev/version", public_url(server).await?);
    let result = async {
        wait_for_answer(&url, "0").await?;
        let mut times = Vec::new();
        for version in 1..=5 {
            let started = Instant::now();
            std::fs::write(
                &app,
                DEV_APP.replace("VERSION = 0", &format!("VERSION = {version}")),
            )?;
            wait_for_answer(&url, &version.to_string()).await?;
            times.push(started.elapsed());
        }
        anyhow::Ok(times)
    }
    .await;
    // SAFETY: kill(2) on the pid of a child started here and not yet reaped.
    unsafe { libc::kill(dev.id() as i32, libc::SIGINT) };
    let _ = dev.wait();
    Ok(row(
        "lode dev: save of a code change to the new answer",
        result?,
        None,
    ))
}

/// Cold builds of numpy with uv and with pip (a fresh step each, so nothing is cached);
/// returns both times in seconds.
fn cold_builds(server: &LodeServer, work: &Path) -> Result<(f64, f64)> {
    let mut times = Vec::new();
    for step in ["uv_pip_install", "pip_install"] {
        let spec = work.join(format!("{step}.json"));
        let buster = format!("{:016x}", rand::random::<u64>());
        std::fs::write(
            &spec,
            format!(
                r#"{{"base": {{"debian_slim": {{}}}}, "steps": [{{"env": {{"vars": {{"BENCH": "{buster}"}}}}}}, {{"{step}": {{"packages": ["numpy"]}}}}]}}"#
            ),
        )?;
        let started = Instant::now();
        let out = Command::new(std::env::current_exe()?)
            .args([
                "--api-url",
                &server.api,
                "--token",
                &server.token,
                "image",
                "build",
            ])
            .arg(&spec)
            .output()?;
        if !out.status.success() {
            bail!(
                "the {step} build failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        times.push(started.elapsed().as_secs_f64());
    }
    let (uv, pip) = (times[0], times[1]);
    println!(
        "  {:<52} {:>8.1} s",
        "build: pip_install(numpy), cold (baseline)", pip
    );
    println!(
        "  {:<52} {:>8.1} s, {:.1}x faster",
        "build: uv_pip_install(numpy), cold",
        uv,
        pip / uv
    );
    Ok((uv, pip))
}

fn deploy(server: &LodeServer, app: &Path, sdk: &Path, extra: &[&str]) -> Result<()> {
    let out = Command::new(std::env::current_exe()?)
        .args(["--api-url", &server.api, "--token", &server.token, "deploy"])
        .arg(app)
        .args(extra)
        .env("PYTHONPATH", sdk)
        .output()?;
    if !out.status.success() {
        bail!(
            "deploying {} failed: {}",
            app.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

async fn public_url(server: &LodeServer) -> Result<String> {
    let info: Value = server
        .get(&reqwest::Client::new(), "/v1/info")
        .send()
        .await?
        .json()
        .await?;
    info["http"]
        .as_str()
        .map(str::to_string)
        .context("the server did not say its public URL")
}

/// Polls `url` (every 10 ms, up to 60 s) until it answers 200 with `expected` as its body.
async fn wait_for_answer(url: &str, expected: &str) -> Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = client.get(url).send().await
            && response.status() == reqwest::StatusCode::OK
            && response
                .text()
                .await
                .is_ok_and(|body| body.trim() == expected)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} did not answer with {expected:?} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Requests per second `wrk` measures on `url` over 5 s (after a 1 s warm-up).
fn wrk(url: &str) -> Result<f64> {
    let run = |seconds: &str| {
        Command::new("wrk")
            .args(["-t2", "-c32", "-d", seconds, url])
            .output()
            .context("running wrk")
    };
    run("1s")?;
    let out = run("5s")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") {
        bail!("wrk saw errors from {url}:\n{text}");
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("wrk printed no rate:\n{text}"))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
