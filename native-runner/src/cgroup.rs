//! Resource limits through cgroups: memory, CPU quota and pids, one group per container.
//!
//! This machine has the cgroup v1 controllers mounted (a v1/v2 hybrid with no free v2
//! controllers), so [`V1`] is the implementation that runs. The current process may already
//! sit in a memory group: each controller's container groups are created beneath the path
//! `/proc/self/cgroup` names for it, under a `lode` group.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Limits for one container. `None` leaves a resource unlimited.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Memory, in bytes.
    pub memory: Option<u64>,
    /// CPU, in cores (0.5 is half a core).
    pub cpu: Option<f64>,
    /// Processes and threads.
    pub pids: Option<u64>,
}

/// Which limit a container ran into, for a message that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitHit {
    /// The kernel killed a process for memory.
    OutOfMemory {
        /// The limit, in bytes.
        limit: u64,
    },
    /// A fork or clone was refused at the pids limit.
    Pids {
        /// The limit.
        limit: u64,
    },
}

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OutOfMemory { limit } => {
                write!(f, "killed: out of memory (limit {} MiB)", limit >> 20)
            }
            Self::Pids { limit } => write!(f, "process limit reached (limit {limit} pids)"),
        }
    }
}

/// A cgroup hierarchy that containers' groups are made in: v1 ([`V1`], what runs on this
/// machine) or v2.
pub trait Hierarchy: Send + Sync + std::fmt::Debug {
    /// Creates `name`'s groups and sets `limits`.
    fn create(&self, name: &str, limits: &Limits) -> io::Result<Group>;
    /// Removes groups a crashed run left behind, killing what is still in them.
    fn clean_leftovers(&self);
}

/// The CFS period the CPU quota is expressed in.
const CPU_PERIOD: Duration = Duration::from_millis(100);

/// A cgroup v1 hierarchy: one directory per controller.
#[derive(Debug, Clone)]
pub struct V1 {
    /// Controller name → the directory container groups go under.
    parents: Vec<(&'static str, PathBuf)>,
}

/// One container's groups.
#[derive(Debug)]
pub struct Group {
    dirs: Vec<(&'static str, PathBuf)>,
    limits: Limits,
}

const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", path.display()),
        )
    })
}

impl V1 {
    /// Finds each controller's mount under `/sys/fs/cgroup` and this process's place in it.
    pub fn detect() -> io::Result<Self> {
        Self::detect_in(
            Path::new("/sys/fs/cgroup"),
            &fs::read_to_string("/proc/self/cgroup")?,
        )
    }

    /// [`V1::detect`] against another root and membership text, for tests.
    pub fn detect_in(root: &Path, self_cgroup: &str) -> io::Result<Self> {
        let mut parents = Vec::new();
        for controller in CONTROLLERS {
            // Lines read `ID:controller[,controller...]:/path`.
            let own = self_cgroup
                .lines()
                .filter_map(|line| {
                    let mut parts = line.splitn(3, ':');
                    let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
                    names.split(',').any(|n| n == controller).then_some(path)
                })
                .next()
                .unwrap_or("/");
            let mount = root.join(controller);
            if !mount.join("cgroup.procs").exists() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "the cgroup v1 {controller} controller is not mounted at {}",
                        mount.display()
                    ),
                ));
            }
            parents.push((
                controller,
                mount.join(own.trim_start_matches('/')).join("lode"),
            ));
        }
        Ok(Self { parents })
    }

}

impl Hierarchy for V1 {
    fn create(&self, name: &str, limits: &Limits) -> io::Result<Group> {
        let mut group = Group {
            dirs: Vec::new(),
            limits: limits.clone(),
        };
        for (controller, parent) in &self.parents {
            let dir = parent.join(name);
            fs::create_dir_all(&dir).map_err(|e| {
                io::Error::new(e.kind(), format!("creating cgroup {}: {e}", dir.display()))
            })?;
            group.dirs.push((controller, dir.clone()));
            match *controller {
                "memory" => {
                    if let Some(bytes) = limits.memory {
                        write(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                        // No swap beyond the memory limit, where swap accounting exists.
                        let memsw = dir.join("memory.memsw.limit_in_bytes");
                        if memsw.exists() {
                            write(&memsw, &bytes.to_string())?;
                        }
                    }
                }
                "cpu" => {
                    if let Some(cores) = limits.cpu {
                        let period = CPU_PERIOD.as_micros() as u64;
                        let quota = ((cores * period as f64) as u64).max(1000);
                        write(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
                        write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                    }
                }
                _ => {
                    if let Some(pids) = limits.pids {
                        write(&dir.join("pids.max"), &pids.to_string())?;
                    }
                }
            }
        }
        Ok(group)
    }

    fn clean_leftovers(&self) {
        for (_, parent) in &self.parents {
            let Ok(entries) = fs::read_dir(parent) else {
                continue;
            };
            for entry in entries.flatten().filter(|e| e.path().is_dir()) {
                let group = Group {
                    dirs: vec![("leftover", entry.path())],
                    limits: Limits::default(),
                };
                group.kill_all();
                group.remove();
            }
        }
    }
}

/// Reads `key N` from a cgroup file of such lines; 0 when absent.
fn counter(path: &Path, key: &str) -> u64 {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

impl Group {
    /// The `cgroup.procs` files a process writes `0` to in order to join every group.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, dir)| dir.join("cgroup.procs"))
            .collect()
    }

    /// Pids in the group.
    pub fn pids(&self) -> Vec<i32> {
        let Some((_, dir)) = self.dirs.first() else {
            return Vec::new();
        };
        fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGKILLs every process in the group until it is empty (new forks included).
    pub fn kill_all(&self) {
        for _ in 0..100 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                // SAFETY: kill(2) with an integer pid and signal.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Which limit, if any, was hit.
    pub fn limit_hit(&self) -> Option<LimitHit> {
        for (controller, dir) in &self.dirs {
            match *controller {
                "memory" if counter(&dir.join("memory.oom_control"), "oom_kill") > 0 => {
                    return Some(LimitHit::OutOfMemory {
                        limit: self.limits.memory.unwrap_or(0),
                    });
                }
                "pids" if counter(&dir.join("pids.events"), "max") > 0 => {
                    return Some(LimitHit::Pids {
                        limit: self.limits.pids.unwrap_or(0),
                    });
                }
                _ => {}
            }
        }
        None
    }

    /// Kills what is left and removes the groups.
    pub fn remove(&self) {
        self.kill_all();
        for (_, dir) in &self.dirs {
            // A group empties a moment after its last process is reaped.
            for _ in 0..100 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_go_beneath_the_process_own_memory_group() {
        let root = tempfile::tempdir().unwrap();
        for controller in CONTROLLERS {
            fs::create_dir_all(root.path().join(controller)).unwrap();
            fs::write(root.path().join(controller).join("cgroup.procs"), "").unwrap();
        }
        let membership = "4:memory:/process_api/abc\n1:cpu,cpuacct:/\n8:pids:/\n0::/\n";
        let v1 = V1::detect_in(root.path(), membership).unwrap();
        let limits = Limits {
            memory: Some(256 << 20),
            cpu: Some(0.5),
            pids: Some(64),
        };
        let group = v1.create("c1", &limits).unwrap();
        let memory = root.path().join("memory/process_api/abc/lode/c1");
        assert_eq!(
            fs::read_to_string(memory.join("memory.limit_in_bytes")).unwrap(),
            "268435456"
        );
        let cpu = root.path().join("cpu/lode/c1");
        assert_eq!(
            fs::read_to_string(cpu.join("cpu.cfs_quota_us")).unwrap(),
            "50000"
        );
        assert_eq!(
            fs::read_to_string(cpu.join("cpu.cfs_period_us")).unwrap(),
            "100000"
        );
        assert_eq!(
            fs::read_to_string(root.path().join("pids/lode/c1/pids.max")).unwrap(),
            "64"
        );
        assert_eq!(group.procs_files().len(), 3);
        assert_eq!(
            LimitHit::OutOfMemory { limit: 256 << 20 }.to_string(),
            "killed: out of memory (limit 256 MiB)"
        );
    }
}
