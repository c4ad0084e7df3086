//! `lode cluster`: Lode on several hosts, all on this machine, to try what a cluster does
//! (and what `lode bench cluster` measures): PostgreSQL for the state and SeaweedFS for the
//! blobs, each started in a directory of its own, and N `lode serve` hosts on loopback ports
//! sharing them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

use crate::store::local::{LocalPostgres, LocalS3};

/// Settings for `lode cluster`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Where PostgreSQL, SeaweedFS and each host keep their data and logs (reused across
    /// runs: the apps deployed last time are served again).
    #[arg(long, default_value = "/var/lib/lode-cluster")]
    pub dir: PathBuf,
    /// How many hosts.
    #[arg(long, default_value_t = 3)]
    pub hosts: usize,
    /// Paths to deploy through the first host once all are up (repeatable).
    #[arg(long, value_name = "PATH")]
    pub deploy: Vec<PathBuf>,
    /// Where the hosts keep debootstrap bases for Python image builds, shared so the base is
    /// made once.
    #[arg(long, default_value = "/var/cache/lode/images/base")]
    pub image_base_dir: PathBuf,
}

/// One `lode serve` of a local cluster.
pub struct ClusterHost {
    /// Its id.
    pub id: String,
    /// Its data dir, with its `client.json`.
    pub data: PathBuf,
    /// Its API URL.
    pub api: String,
    /// Its public HTTP URL.
    pub http: String,
    /// Its API token.
    pub token: String,
    child: Child,
}

impl ClusterHost {
    /// The CLI pointed at this host.
    pub fn cli(&self) -> Result<Command> {
        let mut command = Command::new(std::env::current_exe()?);
        command.env("LODE_CONFIG", self.data.join("client.json"));
        Ok(command)
    }

    /// Stops it as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PostgreSQL, SeaweedFS and hosts sharing them; everything stops when dropped.
pub struct LocalCluster {
    /// The hosts, in the order started.
    pub hosts: Vec<ClusterHost>,
    /// The shared state.
    pub postgres: LocalPostgres,
    /// The shared blobs.
    pub s3: LocalS3,
    dir: PathBuf,
    key: PathBuf,
}

impl LocalCluster {
    /// Starts the engines and `count` hosts under `dir`, each with `extra` flags.
    pub fn start(dir: &Path, count: usize, extra: &[&str]) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let postgres = LocalPostgres::start(&dir.join("postgres"))?;
        let s3 = LocalS3::start(&dir.join("s3"))?;
        let key = dir.join("secrets.key");
        if !key.exists() {
            crate::util::write_atomic(&key, &rand::random::<[u8; 32]>(), 0o600)?;
        }
        let mut cluster = Self {
            hosts: Vec::new(),
            postgres,
            s3,
            dir,
            key,
        };
        let starting: Vec<(String, PathBuf, Child)> = (1..=count)
            .map(|n| cluster.spawn_host(&format!("h{n}"), extra))
            .collect::<Result<_>>()?;
        for (id, data, child) in starting {
            cluster.hosts.push(wait_ready(id, data, child)?);
        }
        Ok(cluster)
    }

    /// Starts one more host, `id`, and waits until it serves.
    pub fn add_host(&mut self, id: &str, extra: &[&str]) -> Result<&ClusterHost> {
        let (id, data, child) = self.spawn_host(id, extra)?;
        self.hosts.push(wait_ready(id, data, child)?);
        Ok(self.hosts.last().expect("just pushed"))
    }

    fn spawn_host(&self, id: &str, extra: &[&str]) -> Result<(String, PathBuf, Child)> {
        let home = self.dir.join(id);
        let data = home.join("data");
        std::fs::create_dir_all(&data)?;
        let _ = std::fs::remove_file(data.join("client.json"));
        let log = std::fs::File::create(home.join("serve.log"))?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .arg("--cache-dir")
            .arg(home.join("cache"))
            .args(["--api", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .args(["--registry-listen", "127.0.0.1:0", "--no-client-config"])
            .args(["--state", &self.postgres.url(), "--blobs", &self.s3.url()])
            .arg("--secrets-key-file")
            .arg(&self.key)
            .args(["--host-id", id])
            .args(extra)
            .envs(self.s3.env())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command.spawn().context("starting lode serve")?;
        Ok((id.to_string(), data, child))
    }
}

/// Waits until a host wrote its `client.json`.
fn wait_ready(id: String, data: PathBuf, mut child: Child) -> Result<ClusterHost> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let client: Value = loop {
        if let Ok(bytes) = std::fs::read(data.join("client.json"))
            && let Ok(value) = serde_json::from_slice(&bytes)
        {
            break value;
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "host {id} exited ({status}); its log is {}",
                data.with_file_name("serve.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!("host {id} did not start in 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let field = |key: &str| client[key].as_str().unwrap_or_default().to_string();
    Ok(ClusterHost {
        id,
        api: field("api_url"),
        http: field("http_url"),
        token: field("token"),
        data,
        child,
    })
}

impl Drop for LocalCluster {
    /// Stops every host as an operator would (SIGTERM, so each unmounts and leaves), then
    /// the engines.
    fn drop(&mut self) {
        for host in &self.hosts {
            // SAFETY: kill(2) on a child of ours; no memory is touched.
            unsafe { libc::kill(host.child.id() as i32, libc::SIGTERM) };
        }
        for host in &mut self.hosts {
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(host.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            host.kill();
        }
    }
}

/// `lode cluster`: starts it, deploys, says how to reach it, and runs until Ctrl-C.
pub async fn run(args: ClusterArgs) -> Result<()> {
    if args.hosts == 0 {
        bail!("--hosts must be at least 1");
    }
    let (dir, count) = (args.dir.clone(), args.hosts);
    println!(
        "starting PostgreSQL, SeaweedFS and {count} hosts under {}",
        dir.display()
    );
    let base = args.image_base_dir.display().to_string();
    let cluster = tokio::task::spawn_blocking(move || {
        LocalCluster::start(&dir, count, &["--image-base-dir", &base])
    })
    .await??;
    for path in &args.deploy {
        let out = cluster.hosts[0].cli()?.arg("deploy").arg(path).output()?;
        if !out.status.success() {
            bail!(
                "deploying {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    println!("\nstate   {}", cluster.postgres.url());
    println!("blobs   {}", cluster.s3.url());
    for host in &cluster.hosts {
        println!(
            "{:<6}  API {}  HTTP {}  (LODE_CONFIG={}/client.json)",
            host.id,
            host.api,
            host.http,
            host.data.display()
        );
    }
    let hosts = cluster.hosts[0].cli()?.arg("hosts").output()?;
    println!("\n{}", String::from_utf8_lossy(&hosts.stdout));
    println!(
        "every host serves every app; try `LODE_CONFIG={}/client.json lode deploy PATH` and \
         the app on another host's HTTP URL. Ctrl-C stops the cluster.",
        cluster.hosts[0].data.display()
    );
    tokio::signal::ctrl_c().await?;
    println!("stopping");
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}
