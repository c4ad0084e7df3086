//! `lode bench http`: instantiate latency in process, then end-to-end HTTP throughput of the
//! same `hello` component under `lode serve` and `wasmtime serve`, with a plain hyper server as
//! the ceiling, all measured in one run with one load generator (`wrk`). Then the same for
//! two components with large memory images built by other people's tools (componentize-py's
//! CPython, componentize-js's StarlingMonkey), fresh per request and reusing instances.
//!
//! Servers run pinned to one core and `wrk` to another (`taskset`), so the figures compare
//! servers, not schedulers.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use wasmtime_wasi::WasiCtxBuilder;

use crate::wasm::engine::{EngineSettings, WasmEngine};
use crate::wasm::guest::GuestState;
use crate::wasm::outbound::OutboundPolicy;

use crate::bench::support::percentile;

/// Settings for `lode bench http`.
#[derive(Debug, Args)]
pub struct HttpBench {
    /// The component to serve; default: samples/hello-http, built if needed.
    #[arg(long)]
    pub component: Option<PathBuf>,
    /// Instantiations to time in process.
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// Length of each wrk run, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Open connections held by wrk.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// `wasmtime` 48.0.8 binary for the baseline; default: the cached one, then PATH.
    #[arg(long)]
    wasmtime: Option<PathBuf>,
    /// CPU the servers are pinned to.
    #[arg(long, default_value_t = 1)]
    server_cpu: u32,
    /// CPU wrk is pinned to.
    #[arg(long, default_value_t = 0)]
    client_cpu: u32,
    /// Skip the in-process instantiate measurement.
    #[arg(long)]
    skip_instantiate: bool,
    /// A componentize-py build of samples/python-http; default: built here when
    /// componentize-py is found (`LODE_COMPONENTIZE_PY`, else where `./lode.sh` puts it).
    #[arg(long)]
    python_component: Option<PathBuf>,
    /// A componentize-js build of samples/js-http; default: built here when componentize-js
    /// is found (`LODE_COMPONENTIZE_JS`, else where `./lode.sh` puts it).
    #[arg(long)]
    js_component: Option<PathBuf>,
    /// Requests per instance for the `instance_reuse` rows (and wasmtime serve's
    /// `--max-instance-reuse-count` beside them).
    #[arg(long, default_value_t = 1000)]
    reuse: u32,
    /// Only the small component's rows.
    #[arg(long)]
    skip_heavy: bool,
}

/// A plain hyper server answering `hello`, the ceiling the bench compares to.
pub async fn hyper_hello(listen: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_req| async {
                let mut response = hyper::Response::new(Full::new(Bytes::from_static(b"hello\n")));
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain"),
                );
                Ok::<_, std::convert::Infallible>(response)
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn measure_instantiate(component: &Path, iterations: usize) -> Result<(Duration, Duration)> {
    let cache = tempfile::tempdir()?;
    let engine = WasmEngine::new(&EngineSettings {
        compiled_dir: cache.path().to_path_buf(),
        max_instances: 100,
        max_memory: 128 << 20,
        wasm_stack: crate::wasm::engine::DEFAULT_WASM_STACK,
        compiled_ttl: Duration::MAX,
    })?;
    let engine = engine.default_class();
    let digest = lode_registry::Digest::of(&std::fs::read(component)?);
    let (compiled, _) = engine
        .load(
            &digest,
            || Ok(std::fs::read(component)?),
            &Default::default(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let pre = engine
        .prepare_proxy(&compiled)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let policy = OutboundPolicy::new(&[], Arc::new(vec![]));
    let mut phases: [Vec<Duration>; 4] = Default::default();
    let deadline = Instant::now() + Duration::from_secs(3600);
    for i in 0..iterations + iterations / 10 {
        let started = Instant::now();
        let wasi = WasiCtxBuilder::new().build();
        let built = Instant::now();
        let mut store = engine.new_store(
            GuestState::new(wasi, 128 << 20, policy.clone()),
            deadline,
            None,
        );
        let stored = Instant::now();
        pre.instantiate_async(&mut store)
            .await
            .map_err(anyhow::Error::from)?;
        let instantiated = Instant::now();
        drop(store);
        // The first tenth warms the pool and caches.
        if i >= iterations / 10 {
            phases[0].push(instantiated - started);
            phases[1].push(built - started);
            phases[2].push(stored - built);
            phases[3].push(instantiated - stored);
        }
    }
    let [total, wasi, store, instance] = phases.map(|mut samples| {
        samples.sort();
        (percentile(&samples, 0.5), percentile(&samples, 0.99))
    });
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "  p50 by phase: WasiCtx build {:.1} µs, Store::new {:.1} µs, instantiate_async {:.1} µs",
        us(wasi.0),
        us(store.0),
        us(instance.0)
    );
    Ok(total)
}

/// One wrk run's figures.
#[derive(Debug, Clone)]
struct Load {
    requests_per_sec: f64,
    p50: String,
    p99: String,
    errors: String,
}

fn run_wrk(args: &HttpBench, url: &str) -> Result<Load> {
    let output = Command::new("taskset")
        .args([
            "-c",
            &args.client_cpu.to_string(),
            "wrk",
            "--latency",
            "-t1",
        ])
        .arg(format!("-c{}", args.connections))
        .arg(format!("-d{}s", args.duration.as_secs().max(1)))
        .arg(url)
        .output()
        .context("running wrk (install it with `apt-get install wrk`)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let field = |prefix: &str| {
        text.lines().find_map(|l| {
            l.trim()
                .strip_prefix(prefix)
                .map(|rest| rest.trim().to_string())
        })
    };
    let requests_per_sec = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    Ok(Load {
        requests_per_sec,
        p50: field("50%").unwrap_or_default(),
        p99: field("99%").unwrap_or_default(),
        errors: text
            .lines()
            .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("; "),
    })
}

/// A server process pinned to the server CPU, killed on drop.
struct Pinned(Child);

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pinned(cpu: u32, program: &Path, args: &[&str]) -> Result<Pinned> {
    let child = Command::new("taskset")
        .arg("-c")
        .arg(cpu.to_string())
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} under taskset", program.display()))?;
    Ok(Pinned(child))
}

fn free_port() -> Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn wait_for(url: &str) -> Result<()> {
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if let Ok(response) = client.get(url).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{url} did not answer within 15 s")
}

fn default_component() -> Result<PathBuf> {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/hello-http");
    crate::cli::deploy::build_crate(&crate_dir)
}

fn find_wasmtime(explicit: Option<PathBuf>) -> Option<PathBuf> {
    explicit
        .or_else(|| {
            let cached = PathBuf::from("/var/cache/lode/tools/wasmtime-48.0.8/bin/wasmtime");
            cached.exists().then_some(cached)
        })
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join("wasmtime"))
                    .find(|p| p.exists())
            })
        })
}

/// `lode serve` on the server CPU with `component` deployed as app `hello`, with
/// `instance_reuse` if `reuse` is given; returns the server and the app's URL.
async fn lode_serve_url(
    args: &HttpBench,
    component: &Path,
    reuse: Option<u32>,
    dirs: &Path,
) -> Result<(Pinned, String)> {
    let exe = std::env::current_exe()?;
    let data = dirs.join("data");
    let data_arg = data.to_string_lossy().into_owned();
    let cache_arg = dirs.join("cache").to_string_lossy().into_owned();
    let server = pinned(
        args.server_cpu,
        &exe,
        &[
            "serve",
            "--data-dir",
            &data_arg,
            "--cache-dir",
            &cache_arg,
            "--api",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--registry-listen",
            "127.0.0.1:0",
            "--no-client-config",
        ],
    )?;
    let client_file = data.join("client.json");
    for _ in 0..600 {
        if client_file.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let overrides = crate::proto::client_file::ClientOverrides {
        config: Some(client_file),
        ..Default::default()
    };
    let resolved = overrides.resolve()?;
    let http_url = resolved
        .http_url
        .clone()
        .context("client.json has no HTTP URL")?;
    let client = crate::cli::client::ApiClient::new(resolved)?;
    let registry = std::sync::Arc::new(crate::cli::client::connect(&client.registry().await?)?);
    let deployed = match reuse {
        None => component.to_path_buf(),
        Some(reuse) => {
            let project = dirs.join("project");
            std::fs::create_dir_all(&project)?;
            std::fs::copy(component, project.join("app.wasm"))?;
            std::fs::write(
                project.join("lode.toml"),
                format!(
                    "[[function]]\nname = \"web\"\npath = \"app.wasm\"\ninstance_reuse = {reuse}\n"
                ),
            )?;
            project
        }
    };
    crate::cli::deploy::deploy(&client, registry, &deployed, Some("hello")).await?;
    Ok((server, format!("{http_url}/hello/")))
}

/// Runs `lode bench http`.
pub async fn http(args: HttpBench) -> Result<()> {
    let component = match &args.component {
        Some(path) => path.clone(),
        None => default_component()?,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "lode bench http: {} ({} bytes), {} connections, {:?} per run, servers on CPU {}, wrk on CPU {} ({cores} CPUs)",
        component.display(),
        std::fs::metadata(&component)?.len(),
        args.connections,
        args.duration,
        args.server_cpu,
        args.client_cpu
    );

    if !args.skip_instantiate {
        let (p50, p99) = measure_instantiate(&component, args.iterations).await?;
        println!(
            "instantiate (Store::new + ProxyPre::instantiate_async, pooling): p50 {:.1} µs, p99 {:.1} µs over {} runs (target p50 <= 10 µs)",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            args.iterations
        );
    }

    let exe = std::env::current_exe()?;
    let mut hyper_server = pinned(args.server_cpu, &exe, &["bench", "hyper-hello"])?;
    let mut line = String::new();
    {
        use std::io::BufRead;
        let stdout = hyper_server.0.stdout.take().context("hyper-hello stdout")?;
        std::io::BufReader::new(stdout).read_line(&mut line)?;
    }
    let hyper_url = format!("http://{}/", line.trim());
    wait_for(&hyper_url).await?;
    let hyper_load = run_wrk(&args, &hyper_url)?;
    drop(hyper_server);

    let wasmtime = find_wasmtime(args.wasmtime.clone());
    if wasmtime.is_none() {
        println!(
            "wasmtime serve: skipped, no wasmtime binary found (cargo install wasmtime-cli \
             --version 48.0.8 --locked --root /var/cache/lode/tools/wasmtime-48.0.8, or pass --wasmtime)"
        );
    }
    let lode_load = serve_lode(&args, &component, None).await?;
    let wasmtime_load = match &wasmtime {
        Some(wasmtime) => Some(serve_wasmtime(&args, wasmtime, &component, None).await?),
        None => None,
    };

    println!();
    print_header("server (fresh instance per request)");
    row("plain hyper hello (ceiling)", &hyper_load);
    row("lode serve", &lode_load);
    if let Some((version, load)) = &wasmtime_load {
        row(&format!("wasmtime serve ({version})"), load);
    }
    println!();
    println!(
        "lode / plain hyper   = {:.2} (target >= 0.40)",
        lode_load.requests_per_sec / hyper_load.requests_per_sec
    );
    if let Some((_, load)) = &wasmtime_load {
        println!(
            "lode / wasmtime serve = {:.2} (target >= 1.50)",
            lode_load.requests_per_sec / load.requests_per_sec
        );
    }
    if args.skip_heavy {
        return Ok(());
    }
    let built = tempfile::tempdir()?;
    let heavy = [
        (
            "python-http (componentize-py)",
            args.python_component.clone(),
            build_python_http as fn(&Path) -> Result<PathBuf>,
        ),
        (
            "js-http (componentize-js)",
            args.js_component.clone(),
            build_js_http,
        ),
    ];
    for (name, given, build) in heavy {
        let component = match given {
            Some(path) => path,
            None => match build(built.path()) {
                Ok(path) => path,
                Err(e) => {
                    println!("\n{name}: skipped: {e:#}");
                    continue;
                }
            },
        };
        heavy_rows(&args, name, &component, wasmtime.as_deref()).await?;
    }
    Ok(())
}

/// The rows for a component with a large memory image: lode and wasmtime serve with a fresh
/// instance per request, then each reusing instances.
async fn heavy_rows(
    args: &HttpBench,
    name: &str,
    component: &Path,
    wasmtime: Option<&Path>,
) -> Result<()> {
    let size = std::fs::metadata(component)?.len();
    let reuse = args.reuse;
    let lode_fresh = serve_lode(args, component, None).await?;
    let lode_reused = serve_lode(args, component, Some(reuse)).await?;
    let (wasmtime_fresh, wasmtime_reused) = match wasmtime {
        Some(wasmtime) => (
            Some(serve_wasmtime(args, wasmtime, component, None).await?),
            Some(serve_wasmtime(args, wasmtime, component, Some(reuse)).await?),
        ),
        None => (None, None),
    };
    println!();
    print_header(&format!("{name}, {:.1} MB", size as f64 / 1e6));
    row("lode serve, fresh instance", &lode_fresh);
    row(
        &format!("lode serve, instance_reuse = {reuse}"),
        &lode_reused,
    );
    if let (Some((version, fresh)), Some((_, reused))) = (&wasmtime_fresh, &wasmtime_reused) {
        row(&format!("wasmtime serve ({version})"), fresh);
        row(
            &format!("wasmtime serve --max-instance-reuse-count {reuse}"),
            reused,
        );
        println!();
        println!(
            "lode fresh / wasmtime serve          = {:.2} (target >= 3)",
            lode_fresh.requests_per_sec / fresh.requests_per_sec
        );
        println!(
            "lode instance_reuse / wasmtime serve = {:.2} (target >= 10)",
            lode_reused.requests_per_sec / fresh.requests_per_sec
        );
        println!(
            "lode instance_reuse / wasmtime serve reusing too = {:.2}",
            lode_reused.requests_per_sec / reused.requests_per_sec
        );
    }
    Ok(())
}

/// Serves `component` with `lode serve` (reusing instances if `reuse`) and loads it.
async fn serve_lode(args: &HttpBench, component: &Path, reuse: Option<u32>) -> Result<Load> {
    let dirs = tempfile::tempdir()?;
    let (server, url) = lode_serve_url(args, component, reuse, dirs.path()).await?;
    wait_for(&url).await?;
    let load = run_wrk(args, &url)?;
    drop(server);
    Ok(load)
}

/// Serves `component` with `wasmtime serve` (reusing instances if `reuse`) and loads it;
/// returns its version beside the figures.
async fn serve_wasmtime(
    args: &HttpBench,
    wasmtime: &Path,
    component: &Path,
    reuse: Option<u32>,
) -> Result<(String, Load)> {
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let component_arg = component.to_string_lossy().into_owned();
    let reuse_arg = reuse.map(|n| n.to_string());
    let mut serve_args = vec!["serve", "-Scli", "--addr", &addr];
    if let Some(reuse) = &reuse_arg {
        serve_args.extend(["--max-instance-reuse-count", reuse]);
    }
    serve_args.push(&component_arg);
    let server = pinned(args.server_cpu, wasmtime, &serve_args)?;
    let url = format!("http://{addr}/");
    wait_for(&url).await?;
    let load = run_wrk(args, &url)?;
    drop(server);
    let version = Command::new(wasmtime).arg("--version").output().ok();
    let version = version
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Ok((version, load))
}

fn print_header(first: &str) {
    println!(
        "{first:<48} {:>10} {:>10} {:>10}  notes",
        "req/s", "p50", "p99"
    );
}

fn row(name: &str, load: &Load) {
    println!(
        "{name:<48} {:>10.0} {:>10} {:>10}  {}",
        load.requests_per_sec, load.p50, load.p99, load.errors
    );
}

/// A tool `./lode.sh` installs: `variable` if set, else its place in the cache.
fn installed_tool(variable: &str, default: &str) -> Result<PathBuf> {
    let tool = std::env::var_os(variable).map_or_else(|| PathBuf::from(default), PathBuf::from);
    if !tool.exists() {
        bail!(
            "{} is missing (set {variable}, or run ./lode.sh bench http, which installs it)",
            tool.display()
        );
    }
    Ok(tool)
}

/// Builds samples/python-http with componentize-py into `dir`.
fn build_python_http(dir: &Path) -> Result<PathBuf> {
    let tool = installed_tool(
        "LODE_COMPONENTIZE_PY",
        "/var/cache/lode/bin/componentize-py",
    )?;
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/python-http");
    let out = dir.join("python-http.wasm");
    let status = Command::new(tool)
        .arg("-d")
        .arg(sample.join("wit"))
        .args(["-w", "wasi:http/proxy@0.2.12", "componentize", "-p"])
        .arg(&sample)
        .arg("app")
        .arg("-o")
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .context("running componentize-py")?;
    if !status.success() {
        bail!("componentize-py failed building {}", sample.display());
    }
    Ok(out)
}

/// Builds samples/js-http with componentize-js into `dir`.
fn build_js_http(dir: &Path) -> Result<PathBuf> {
    let tool = installed_tool(
        "LODE_COMPONENTIZE_JS",
        "/var/cache/lode/componentize-js-0.23.0/node_modules/.bin/componentize-js",
    )?;
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples");
    let out = dir.join("js-http.wasm");
    let status = Command::new(tool)
        .arg(samples.join("js-http/app.js"))
        .arg("-w")
        .arg(samples.join("python-http/wit"))
        .args(["-n", "wasi:http/proxy@0.2.12", "-o"])
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .context("running componentize-js")?;
    if !status.success() {
        bail!("componentize-js failed building samples/js-http");
    }
    Ok(out)
}
