//! Starts real `lode serve` processes on ephemeral ports and builds the guest programs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod oci;
pub mod python;
pub mod testhost;

pub const LODE: &str = env!("CARGO_BIN_EXE_lode");

/// Debootstrap bases are kept here across runs (CI caches it), so only the first run on a
/// machine pays for debootstrap.
pub const BASE_DIR: &str = "/var/cache/lode/images/base";

/// Writes `json` to `dir/name` and returns the path, for `lode image build`.
pub fn write_spec(dir: &Path, name: &str, json: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, json).unwrap();
    path.display().to_string()
}

/// A root filesystem holding only a static busybox and its applet links: an image that
/// runs without debootstrap.
pub fn busybox_tree(root: &Path) {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "these tests need a static busybox: apt-get install busybox-static (./lode.sh test does)"
    );
    for dir in ["bin", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    let list = Command::new(busybox).arg("--list").output().unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds a guest workspace once per test binary and returns its release dir.
fn build_guests(workspace: &str) -> PathBuf {
    let dir = repo_root().join(workspace);
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--target", "wasm32-wasip2", "--quiet"])
        .current_dir(&dir)
        .status()
        .expect("running cargo for the guest programs");
    assert!(
        status.success(),
        "building {workspace} for wasm32-wasip2 failed"
    );
    dir.join("target/wasm32-wasip2/release")
}

/// A file or directory in the repository, as a CLI argument.
pub fn repo_file(relative: &str) -> String {
    repo_root().join(relative).to_str().unwrap().to_string()
}

/// Output bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Polls `check` until it returns `Some`, for at most `limit`.
pub fn wait_for<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Regular files under `root` (a missing root has none) whose bytes hold `needle`.
pub fn files_containing(root: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => found.extend(files_containing(&path, needle)),
            Ok(kind) if kind.is_file() => {
                let bytes = std::fs::read(&path).unwrap_or_default();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(path);
                }
            }
            _ => {}
        }
    }
    found
}

/// Path to a built sample component, e.g. `sample("hello_http")`.
pub fn sample(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_guests("samples"))
        .join(format!("{name}.wasm"))
}

/// Path to the misbehaving test component.
pub fn misbehave() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_guests("host/test-programs"))
        .join("misbehave.wasm")
}

/// Path to a sample crate directory, for `lode deploy DIR`.
pub fn sample_dir(name: &str) -> PathBuf {
    repo_root().join("samples").join(name)
}

/// A directory holding the misbehave component as `m.wasm` and a `lode.toml` of `toml`.
pub fn misbehave_project(toml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(misbehave(), dir.path().join("m.wasm")).unwrap();
    std::fs::write(dir.path().join("lode.toml"), toml).unwrap();
    dir
}

/// A running `lode serve` with its own data and cache dirs.
pub struct Lode {
    pub dirs: tempfile::TempDir,
    pub api: String,
    pub http: String,
    pub registry: String,
    pub token: String,
    extra_args: Vec<String>,
    /// Extra environment for the server.
    env: Vec<(String, String)>,
    /// Started under `script`, with a pseudo-terminal as its controlling terminal.
    terminal: bool,
    child: Option<Child>,
}

impl Lode {
    /// Starts a server with short limits suited to tests, plus `extra` flags.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with(extra, &[], false)
    }

    /// [`Lode::start`] with extra environment variables for the server.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_with(extra, env, false)
    }

    /// [`Lode::start`] from an operator's terminal: under `script`, whose pseudo-terminal
    /// is the server's controlling terminal.
    pub fn start_under_terminal(extra: &[&str]) -> Self {
        Self::start_with(extra, &[], true)
    }

    fn start_with(extra: &[&str], env: &[(&str, &str)], terminal: bool) -> Self {
        let dirs = tempfile::tempdir().unwrap();
        let mut lode = Lode {
            dirs,
            api: String::new(),
            http: String::new(),
            registry: String::new(),
            token: String::new(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            terminal,
            child: None,
        };
        lode.spawn();
        lode
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dirs.path().join("data")
    }

    pub fn client_file(&self) -> PathBuf {
        self.data_dir().join("client.json")
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.client_file());
        let mut command = Command::new(LODE);
        command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--cache-dir")
            .arg(self.dirs.path().join("cache"))
            .args([
                "--api",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--registry-listen",
                "127.0.0.1:0",
                "--no-client-config",
            ])
            .args(["--timeout", "2s", "--instances", "64"])
            .args(&self.extra_args)
            .env("LODE_LOG", "lode=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if self.terminal {
            let quote = |word: &std::ffi::OsStr| {
                format!("'{}'", word.to_string_lossy().replace('\'', r"'\''"))
            };
            let line = std::iter::once(quote(command.get_program()))
                .chain(command.get_args().map(quote))
                .collect::<Vec<_>>()
                .join(" ");
            let mut wrapped = Command::new("script");
            wrapped
                .args(["-qec", &line, "/dev/null"])
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .env("LODE_LOG", "lode=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            command = wrapped;
        }
        let mut child = command.spawn().expect("starting lode serve");
        let deadline = Instant::now() + Duration::from_secs(60);
        let client: Value = loop {
            if let Ok(bytes) = std::fs::read(self.client_file())
                && let Ok(value) = serde_json::from_slice(&bytes)
            {
                break value;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("lode serve exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "lode serve did not write client.json in 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.api = client["api_url"].as_str().unwrap().to_string();
        self.http = client["http_url"].as_str().unwrap().to_string();
        self.registry = client["registry_url"].as_str().unwrap().to_string();
        self.token = client["token"].as_str().unwrap().to_string();
        self.child = Some(child);
    }

    /// Stops the server with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Under `script`, the server is script's child: it gets the signal.
            let pid = if self.terminal {
                let out = Command::new("pgrep")
                    .args(["-P", &child.id().to_string()])
                    .output()
                    .unwrap();
                text(&out.stdout)
                    .trim()
                    .parse()
                    .unwrap_or(child.id() as i32)
            } else {
                child.id() as i32
            };
            // SAFETY: kill(2) on a pid of ours; no memory is touched.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// How the server ended, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok()?
    }

    /// Kills the server with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts again on the same dirs (new ports).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The CLI pointed at this server, to spawn with pipes of the caller's choosing.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(LODE);
        command
            .args(args)
            .env("LODE_CONFIG", self.client_file())
            .env_remove("LODE_API")
            .env_remove("LODE_TOKEN")
            .env_remove("LODE_REGISTRY")
            .env_remove("LODE_REMOTE_TOKEN");
        command
    }

    /// Runs the CLI against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args).output().expect("running lode")
    }

    /// Runs the CLI and expects success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "lode {args:?} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the CLI and expects failure; returns stderr.
    pub fn cli_err(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "lode {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// `lode image build SPEC EXTRA...`, expected to succeed: the digest it printed, and its
    /// progress output.
    pub fn build_image(&self, spec: &str, extra: &[&str]) -> (String, String) {
        let mut args = vec!["image", "build", spec];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "build failed:\n{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        (text(&out.stdout).trim().to_string(), text(&out.stderr))
    }

    /// `lode container run ARGS...`.
    pub fn container_run(&self, args: &[&str]) -> Output {
        let mut all = vec!["container", "run"];
        all.extend_from_slice(args);
        self.cli(&all)
    }

    /// The Debian base with Python, built (or found cached) and tagged `test/py`.
    pub fn python_image(&self, dir: &Path) -> String {
        let spec = write_spec(
            dir,
            "py.json",
            r#"{"base": {"debian_slim": {"python_version": "3.11"}}}"#,
        );
        self.build_image(&spec, &["--tag", "test/py"]).0
    }

    /// Runs a Python `script` on this machine with the SDK on its path, pointed at this
    /// server as a developer's laptop would be.
    pub fn sdk_python(&self, script: &str) -> Output {
        let sdk = lode::sdk::extract(&self.dirs.path().join("sdk")).unwrap();
        Command::new("python3")
            .args(["-c", script])
            .env("PYTHONPATH", &sdk)
            .env("LODE_API", &self.api)
            .env("LODE_TOKEN", &self.token)
            .output()
            .unwrap()
    }

    /// `root` ingested and tagged `tag`, to run containers of.
    pub fn ingest_image(&self, root: &Path, tag: &str) -> String {
        self.cli_ok(&["image", "ingest", root.to_str().unwrap(), "--tag", tag])
            .trim()
            .to_string()
    }

    /// A gRPC client for this server's embedded registry.
    pub fn registry_client(&self) -> lode_registry::RegistryClient {
        lode_registry::RegistryClient::new(&self.registry, Some(&self.token), Default::default())
            .unwrap()
    }

    /// Uploads a blob to the embedded registry and returns its digest text.
    pub async fn upload(&self, bytes: Vec<u8>) -> String {
        use lode_registry::BlobAccess;
        let digest = lode_registry::Digest::of(&bytes);
        self.registry_client()
            .put_blob(&digest, bytes.into())
            .await
            .unwrap();
        digest.to_string()
    }

    /// Deploys a file or directory under `name`.
    pub fn deploy(&self, path: &Path, name: &str) -> String {
        self.cli_ok(&["deploy", path.to_str().unwrap(), "--name", name])
    }

    pub fn client(&self) -> reqwest::Client {
        lode_native_runner::oci::pull::install_tls_provider();
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    /// A request to the public listener.
    pub fn public(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client()
            .request(method, format!("{}{path}", self.http))
    }

    /// GET on the public listener.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .public(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    /// An authorized API request.
    pub fn api(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client()
            .request(method, format!("{}{path}", self.api))
            .bearer_auth(&self.token)
    }

    /// An authorized API request with an optional JSON body: its status and JSON answer.
    pub async fn api_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut request = self.api(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// The cgroup directories and scratch dirs this server's containers would leave.
    pub fn leftovers(&self) -> Vec<String> {
        let cache = std::fs::canonicalize(self.dirs.path().join("cache")).unwrap();
        let scope = &blake3::hash(cache.as_os_str().as_encoded_bytes()).to_hex()[..8];
        let mut found = Vec::new();
        for controller in ["memory", "cpu", "pids"] {
            let own = std::fs::read_to_string("/proc/self/cgroup")
                .unwrap()
                .lines()
                .find_map(|line| {
                    let mut parts = line.splitn(3, ':');
                    let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
                    names
                        .split(',')
                        .any(|n| n == controller)
                        .then(|| path.to_string())
                })
                .unwrap_or_default();
            let parent = Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(own.trim_start_matches('/'))
                .join("lode");
            for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(scope) {
                    found.push(entry.path().display().to_string());
                }
            }
        }
        let containers = self.dirs.path().join("cache/containers");
        for entry in std::fs::read_dir(containers)
            .into_iter()
            .flatten()
            .flatten()
        {
            found.push(entry.path().display().to_string());
        }
        found
    }

    /// The value of a metric series, e.g. `lode_component_compiles_total{app="hello"}`.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self
            .api(reqwest::Method::GET, "/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    }
}

impl Drop for Lode {
    /// Stops the server as an operator would (SIGTERM), so it unmounts its images: a SIGKILL
    /// would leave its FUSE mounts in the host's mount table, and every later container start
    /// copies that table.
    fn drop(&mut self) {
        self.stop();
        for mount in lode_fs::mounts_under(&self.dirs.path().join("cache")) {
            let _ = lode_fs::unmount(&mount.point);
        }
    }
}

/// A standalone `lode registry serve` on an ephemeral port.
pub struct StandaloneRegistry {
    pub data: PathBuf,
    pub url: String,
    pub token: String,
    child: Option<Child>,
}

impl StandaloneRegistry {
    /// Starts a registry on `data` (created if needed).
    pub fn start(data: &Path) -> Self {
        let (child, url) = lode::cli::serve::spawn_registry(Path::new(LODE), data).unwrap();
        let token = std::fs::read_to_string(data.join("token")).unwrap();
        StandaloneRegistry {
            data: data.to_path_buf(),
            url,
            token: token.trim().to_string(),
            child: Some(child),
        }
    }

    /// Stops it with SIGTERM and waits.
    pub fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on a child pid we own; no memory is touched.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait().unwrap();
            assert!(status.success(), "lode registry serve exited with {status}");
        }
    }
}

impl Drop for StandaloneRegistry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
