//! What several benches share: percentiles, and the `lode serve` and `lode registry serve`
//! children they measure against, stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lode_registry::{ClientOptions, RegistryClient};
use serde_json::Value;

/// The `p` quantile (0 to 1) of `sorted`, nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Prints a timing row: p50, p99 and the ratio to a baseline.
pub fn row(name: &str, mut times: Vec<Duration>, baseline: Option<Duration>) -> Duration {
    times.sort();
    let p50 = percentile(&times, 0.5);
    let ratio = baseline.map_or(String::new(), |b| {
        let ratio = p50.as_secs_f64() / b.as_secs_f64();
        if ratio < 0.1 {
            format!(", 1/{:.0} of the baseline p50", 1.0 / ratio)
        } else {
            format!(", {ratio:.1}x the baseline p50")
        }
    });
    println!(
        "  {name:<52} p50 {:>9.2?}  p99 {:>9.2?}{ratio}",
        p50,
        percentile(&times, 0.99)
    );
    p50
}

/// A `lode registry serve` child on a fresh data dir, killed on drop.
pub struct Registry {
    child: Child,
    /// A client for it, with its token.
    pub client: Arc<RegistryClient>,
    _dir: tempfile::TempDir,
    /// Its data directory.
    pub data: PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `lode registry serve` on a fresh data dir.
pub fn start_registry() -> Result<Registry> {
    let dir = tempfile::Builder::new()
        .prefix("lode-bench-cas")
        .tempdir()?;
    let data = dir.path().join("registry");
    let (child, url) = crate::cli::serve::spawn_registry(&std::env::current_exe()?, &data)?;
    let token = std::fs::read_to_string(data.join("token"))?;
    let client = RegistryClient::new(&url, Some(token.trim()), ClientOptions::default())?;
    Ok(Registry {
        child,
        client: Arc::new(client),
        _dir: dir,
        data,
    })
}

/// Megabytes (10^6 bytes) per second.
pub fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e6
}

/// The middle of `values`.
pub fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

/// Calls `target` (`app/function`) through the API at `api` with `body` (`{"args",
/// "kwargs"}`); its result, or an error with the answer when it failed.
pub fn call_api(
    http: &reqwest::Client,
    api: &str,
    token: &str,
    target: &str,
    body: Value,
) -> impl std::future::Future<Output = Result<Value>> + use<> {
    let (app, function) = target.split_once('/').expect("app/function");
    let request = http
        .post(format!("{api}/v1/apps/{app}/functions/{function}/call"))
        .bearer_auth(token)
        .json(&body);
    async move {
        let response = request.send().await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            bail!("the call failed: {body}");
        }
        Ok(body["result"].clone())
    }
}

/// A `lode serve` the bench started, stopped with SIGTERM when dropped.
pub struct LodeServer {
    child: Child,
    /// Its API URL.
    pub api: String,
    /// Its API token.
    pub token: String,
    /// The client file it wrote, for the CLI (`LODE_CONFIG`).
    pub client_file: PathBuf,
    base_dir: PathBuf,
    extra: Vec<String>,
    /// Cache dirs used so far.
    caches: usize,
    _dirs: tempfile::TempDir,
}

impl LodeServer {
    /// Stops the server (SIGTERM) and starts it again on the same data with an empty cache
    /// dir: its registry and state as they were, no chunk or compiled code cached.
    pub fn restart_with_empty_cache(&mut self) -> Result<()> {
        self.stop();
        self.caches += 1;
        let home = self._dirs.path();
        let cache = home.join(format!("cache-{}", self.caches));
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let (child, api, token, client_file) = spawn_server(home, &cache, &self.base_dir, &extra)?;
        (self.child, self.api, self.token, self.client_file) = (child, api, token, client_file);
        Ok(())
    }

    /// A GET of `path` (`/v1/...`) on its API, with its token.
    pub fn get(&self, http: &reqwest::Client, path: &str) -> reqwest::RequestBuilder {
        http.get(format!("{}{path}", self.api))
            .bearer_auth(&self.token)
    }

    /// The cache dir it runs with now.
    pub fn cache_dir(&self) -> PathBuf {
        match self.caches {
            0 => self._dirs.path().join("cache"),
            n => self._dirs.path().join(format!("cache-{n}")),
        }
    }

    fn stop(&mut self) {
        // SIGTERM, so it unmounts its images and stops its containers.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }

    /// Calls `app/function` through the API with `body` (`{"args", "kwargs"}`); its result.
    pub fn call(
        &self,
        http: &reqwest::Client,
        target: &str,
        body: Value,
    ) -> impl std::future::Future<Output = Result<Value>> + use<> {
        call_api(http, &self.api, &self.token, target, body)
    }

    /// The server's resident memory now, in bytes.
    pub fn rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

impl Drop for LodeServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `lode serve` on loopback with its own dirs.
pub fn start_server(base_dir: &Path) -> Result<LodeServer> {
    start_server_with(base_dir, &[])
}

/// [`start_server`] with more `lode serve` flags.
pub fn start_server_with(base_dir: &Path, extra: &[&str]) -> Result<LodeServer> {
    let dirs = tempfile::tempdir()?;
    let (child, api, token, client_file) =
        spawn_server(dirs.path(), &dirs.path().join("cache"), base_dir, extra)?;
    Ok(LodeServer {
        child,
        api,
        token,
        client_file,
        base_dir: base_dir.to_path_buf(),
        extra: extra.iter().map(|s| s.to_string()).collect(),
        caches: 0,
        _dirs: dirs,
    })
}

/// Spawns `lode serve` with its data in `home/data` and its cache in `cache`; waits until it
/// wrote its client file.
fn spawn_server(
    home: &Path,
    cache: &Path,
    base_dir: &Path,
    extra: &[&str],
) -> Result<(Child, String, String, PathBuf)> {
    let data = home.join("data");
    let _ = std::fs::remove_file(data.join("client.json"));
    let mut child = Command::new(std::env::current_exe()?)
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .arg("--cache-dir")
        .arg(cache)
        .arg("--image-base-dir")
        .arg(base_dir)
        .args(["--api", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--registry-listen", "127.0.0.1:0", "--no-client-config"])
        .args(extra)
        .env("LODE_LOG", "lode=warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting lode serve")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let client: Value = loop {
        if let Ok(bytes) = std::fs::read(data.join("client.json"))
            && let Ok(value) = serde_json::from_slice(&bytes)
        {
            break value;
        }
        if child.try_wait()?.is_some() || Instant::now() > deadline {
            bail!("lode serve did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok((
        child,
        client["api_url"].as_str().unwrap_or_default().to_string(),
        client["token"].as_str().unwrap_or_default().to_string(),
        data.join("client.json"),
    ))
}

/// A Python virtual environment under `/var/cache/lode/bench/NAME` with `packages`, for a
/// baseline that runs outside Lode; made once. `None` (with the reason printed) where it
/// cannot be made here.
pub fn bench_venv(name: &str, packages: &[&str]) -> Option<PathBuf> {
    let venv = Path::new("/var/cache/lode/bench").join(name);
    let python = venv.join("bin/python");
    if !python.exists() {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(&python)
                .args(["-m", "pip", "install", "-q"])
                .args(packages)
                .status()
                .is_ok_and(|s| s.success());
        if !made {
            println!("  (no baseline: pip install {} failed)", packages.join(" "));
            let _ = std::fs::remove_dir_all(&venv);
            return None;
        }
    }
    Some(python)
}

/// Calls `app`'s `function` with `x` through the API; fails unless it answers `x * x`.
pub(super) async fn call_square(
    http: &reqwest::Client,
    server: &LodeServer,
    app: &str,
    function: &str,
    x: i64,
) -> Result<()> {
    let response = http
        .post(format!(
            "{}/v1/apps/{app}/functions/{function}/call",
            server.api
        ))
        .bearer_auth(&server.token)
        .json(&serde_json::json!({"args": [x]}))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    if !status.is_success() || body["result"] != serde_json::json!(x * x) {
        bail!("the call failed: {body}");
    }
    Ok(())
}

/// Containers of `app`'s `function` up or starting, from the API's stats.
pub(super) async fn live_containers(
    http: &reqwest::Client,
    server: &LodeServer,
    app: &str,
    function: &str,
) -> Result<u64> {
    let stats: Value = server
        .get(http, &format!("/v1/apps/{app}/stats"))
        .send()
        .await?
        .json()
        .await?;
    let row = stats["functions"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["function"] == function))
        .cloned()
        .unwrap_or_default();
    Ok(row["containers"].as_u64().unwrap_or(0) + row["starting"].as_u64().unwrap_or(0))
}
