//! A PostgreSQL server of its own in a directory, started from Debian's package (`initdb` and
//! `pg_ctl`), on a loopback port: what the tests, `lode bench cluster` and `./lode.sh cluster`
//! run Lode's shared state on. PostgreSQL refuses to run as root, so as root it runs as the
//! package's `postgres` user, which owns the directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::free_ports;

/// A running PostgreSQL; stopped when dropped.
pub struct LocalPostgres {
    bin: PathBuf,
    data: PathBuf,
    dir: PathBuf,
    port: u16,
    running: bool,
}

/// The newest installed PostgreSQL's `bin` directory.
fn bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).context(
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): apt-get install \
         postgresql (./lode.sh test does)",
    )
}

impl LocalPostgres {
    /// Makes a database cluster in `dir` (or uses the one there) and starts it.
    pub fn start(dir: &Path) -> Result<Self> {
        let bin = bin_dir()?;
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let data = dir.join("data");
        let mut postgres = Self {
            bin,
            data,
            dir,
            port: free_ports(1)?[0],
            running: false,
        };
        if rustix::process::geteuid().is_root() {
            // The postgres user owns the cluster and must reach its directory.
            let user = system_user("postgres")?;
            rustix::fs::chown(&postgres.dir, Some(user.0), Some(user.1))?;
            let mut parent = postgres.dir.parent();
            while let Some(dir) = parent {
                let mode = std::fs::metadata(dir)?.permissions();
                use std::os::unix::fs::PermissionsExt;
                if mode.mode() & 0o001 == 0 {
                    bail!(
                        "{} is not searchable by others, so PostgreSQL (user postgres) cannot \
                         reach {}; put it elsewhere",
                        dir.display(),
                        postgres.dir.display()
                    );
                }
                parent = dir.parent();
            }
        }
        if !postgres.data.join("PG_VERSION").exists() {
            let data = postgres.data.to_str().context("a UTF-8 path")?.to_string();
            postgres.tool(
                "initdb",
                &[
                    "-D",
                    &data,
                    "-A",
                    "trust",
                    "-U",
                    "lode",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
            )?;
        }
        postgres.resume()?;
        Ok(postgres)
    }

    /// Runs one of PostgreSQL's tools, as the postgres user when this is root.
    fn tool(&self, name: &str, args: &[&str]) -> Result<()> {
        let program = self.bin.join(name);
        let mut command = if rustix::process::geteuid().is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            Command::new(&program)
        };
        let out = command
            .args(args)
            .current_dir(&self.dir)
            .output()
            .with_context(|| format!("running {}", program.display()))?;
        if !out.status.success() {
            bail!(
                "{name} failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(())
    }

    /// The URL Lode connects with.
    pub fn url(&self) -> String {
        format!("postgres://lode@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops it at once, as a crash would (`pg_ctl stop -m immediate`).
    pub fn stop_now(&mut self) -> Result<()> {
        if self.running {
            let data = self.data.to_str().context("a UTF-8 path")?.to_string();
            self.tool("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])?;
            self.running = false;
        }
        Ok(())
    }

    /// Starts it again on the same port.
    pub fn resume(&mut self) -> Result<()> {
        let data = self.data.to_str().context("a UTF-8 path")?.to_string();
        let log = self.dir.join("postgres.log");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300",
            self.port,
            self.dir.display()
        );
        self.tool(
            "pg_ctl",
            &[
                "-D",
                &data,
                "-l",
                log.to_str().context("a UTF-8 path")?,
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .with_context(|| format!("starting PostgreSQL (its log: {})", log.display()))?;
        self.running = true;
        Ok(())
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        let _ = self.stop_now();
    }
}

/// The uid and gid of `name`.
fn system_user(name: &str) -> Result<(rustix::fs::Uid, rustix::fs::Gid)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let fields = passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&name) && f.len() > 3)
        .with_context(|| format!("no user {name:?}: apt-get install postgresql makes it"))?;
    let uid: u32 = fields[2].parse()?;
    let gid: u32 = fields[3].parse()?;
    Ok((
        rustix::fs::Uid::from_raw(uid),
        rustix::fs::Gid::from_raw(gid),
    ))
}
