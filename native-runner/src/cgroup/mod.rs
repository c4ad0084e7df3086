//! Resource limits through cgroups: memory, CPU quota, pids and the device allow-list
//! ([`devices`]), one group per container.
//!
//! This machine has the cgroup v1 controllers mounted (a v1/v2 hybrid with no free v2
//! controllers), so [`V1`] is the implementation that runs. The current process may already
//! sit in a memory group: each controller's container groups are created beneath the path
//! `/proc/self/cgroup` names for it, under a `lode` group.
//!
//! [`V2`] is the unified-hierarchy implementation that [`detect`] picks on a pure v2 mount.
//! It cannot run for real on this machine, so it is unit-tested through a recording double of
//! [`CgroupFs`], the file and signal operations all cgroup code goes through.

pub mod devices;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    /// Host devices it may use besides its own `/dev` nodes (the GPUs it was given); each
    /// also appears in its `/dev`.
    pub devices: Vec<devices::DeviceGrant>,
}

impl Limits {
    /// The device allow-list: the container's own nodes and its grants.
    pub fn device_rules(&self) -> Vec<devices::DeviceRule> {
        let mut rules = devices::container_rules();
        rules.extend(self.devices.iter().map(devices::DeviceGrant::rule));
        rules
    }
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
/// machine) or v2 ([`V2`]).
pub trait Hierarchy: Send + Sync + std::fmt::Debug {
    /// Creates `name`'s groups and sets `limits`.
    fn create(&self, name: &str, limits: &Limits) -> io::Result<Group>;
    /// Removes groups a crashed run left behind, killing what is still in them.
    /// Removes groups whose names start with `prefix` that a crashed run left behind,
    /// killing what is still in them. Each server names its groups with its own prefix, so
    /// one never clears another's.
    fn clean_leftovers(&self, prefix: &str);
}

/// The file and signal operations the cgroup code performs, so that the hierarchies can be
/// tested without real cgroups ([`V2`] cannot run on this v1 machine at all).
pub trait CgroupFs: Send + Sync + std::fmt::Debug {
    /// Creates a directory and its missing parents (a cgroup is made by `mkdir`).
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Writes `value` to an existing control file.
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
    /// Reads a control file.
    fn read_to_string(&self, path: &Path) -> io::Result<String>;
    /// Whether a file or directory exists (optional control files vary by kernel).
    fn exists(&self, path: &Path) -> bool;
    /// Removes an empty directory (a cgroup is removed by `rmdir`).
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    /// Names of the subdirectories of `path`: the child groups.
    fn read_dir_names(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Sends `signal` to `pid`.
    fn kill(&self, pid: i32, signal: i32) -> io::Result<()>;
    /// Lets the v2 group at `dir` use only the devices `rules` allow (a `BPF_CGROUP_DEVICE`
    /// program: v2 has no devices file).
    fn restrict_devices(&self, dir: &Path, rules: &[devices::DeviceRule]) -> io::Result<()>;
}

/// The real [`CgroupFs`]: `std::fs` and kill(2), what production uses for both hierarchies.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl CgroupFs for RealFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        fs::write(path, value)
    }

    fn read_to_string(&self, path: &Path) -> io::Result<String> {
        fs::read_to_string(path)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir(path)
    }

    fn read_dir_names(&self, path: &Path) -> io::Result<Vec<String>> {
        Ok(fs::read_dir(path)?
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect())
    }

    fn kill(&self, pid: i32, signal: i32) -> io::Result<()> {
        // SAFETY: kill(2) with an integer pid and signal.
        if unsafe { libc::kill(pid, signal) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn restrict_devices(&self, dir: &Path, rules: &[devices::DeviceRule]) -> io::Result<()> {
        devices::attach_filter(dir, rules)
    }
}

/// The CFS period the CPU quota is expressed in.
const CPU_PERIOD: Duration = Duration::from_millis(100);

/// The CPU quota, in µs per [`CPU_PERIOD`], for `cores`; the kernel refuses less than 1 ms.
fn cpu_quota(cores: f64) -> (u64, u64) {
    let period = CPU_PERIOD.as_micros() as u64;
    (((cores * period as f64) as u64).max(1000), period)
}

/// A cgroup v1 hierarchy: one directory per controller.
#[derive(Debug, Clone)]
pub struct V1 {
    /// Controller name → the directory container groups go under.
    parents: Vec<(&'static str, PathBuf)>,
    fs: Arc<dyn CgroupFs>,
}

/// A cgroup v2 (unified) hierarchy: one directory per container with every controller.
///
/// Not exercised on this machine (its v2 mount has no free controllers); the unit tests drive
/// it through a recording [`CgroupFs`] double instead.
#[derive(Debug, Clone)]
pub struct V2 {
    /// `<mount>/<own group>/lode`, the directory container groups go under.
    parent: PathBuf,
    fs: Arc<dyn CgroupFs>,
}

/// Which hierarchy a [`Group`] lives in: the control files differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// One container's groups.
#[derive(Debug)]
pub struct Group {
    /// One directory per controller (v1), or the single unified directory (v2).
    dirs: Vec<(&'static str, PathBuf)>,
    limits: Limits,
    version: Version,
    fs: Arc<dyn CgroupFs>,
}

/// The controllers a v2 mount must list; v2 restricts devices without a controller.
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// The v1 controllers a container's groups go in.
const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "pids", "devices"];

/// Where a pure v2 mount lists the controllers it has.
const V2_CONTROLLERS_FILE: &str = "cgroup.controllers";

fn write(fs: &dyn CgroupFs, path: &Path, value: &str) -> io::Result<()> {
    fs.write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", path.display()),
        )
    })
}

fn create_dir(fs: &dyn CgroupFs, dir: &Path) -> io::Result<()> {
    fs.create_dir_all(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("creating cgroup {}: {e}", dir.display())))
}

/// Picks the hierarchy this machine has: [`V2`] on a pure v2 mount whose
/// `/sys/fs/cgroup/cgroup.controllers` lists memory, cpu and pids, [`V1`] otherwise.
pub fn detect() -> io::Result<Box<dyn Hierarchy>> {
    detect_in(
        Path::new("/sys/fs/cgroup"),
        &fs::read_to_string("/proc/self/cgroup")?,
        Arc::new(RealFs),
    )
}

/// [`detect`] against another root, membership text (`/proc/self/cgroup`) and filesystem,
/// for tests.
pub fn detect_in(
    root: &Path,
    self_cgroup: &str,
    fs: Arc<dyn CgroupFs>,
) -> io::Result<Box<dyn Hierarchy>> {
    let listing = root.join(V2_CONTROLLERS_FILE);
    let mut v2_missing = None;
    if fs.exists(&listing) {
        let listed = fs
            .read_to_string(&listing)
            .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", listing.display())))?;
        let listed: Vec<&str> = listed.split_whitespace().collect();
        match CONTROLLERS.iter().find(|c| !listed.contains(c)) {
            None => return Ok(Box::new(V2::detect_in(root, self_cgroup, fs)?)),
            Some(missing) => v2_missing = Some(*missing),
        }
    }
    V1::detect_with(root, self_cgroup, fs)
        .map(|v1| Box::new(v1) as Box<dyn Hierarchy>)
        .map_err(|e| match v2_missing {
            Some(missing) => io::Error::new(
                e.kind(),
                format!(
                    "the cgroup v2 {missing} controller is not listed in {}, and {e}",
                    listing.display()
                ),
            ),
            None => e,
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
        Self::detect_with(root, self_cgroup, Arc::new(RealFs))
    }

    /// [`V1::detect_in`] through another [`CgroupFs`], so tests can record what it does.
    pub fn detect_with(root: &Path, self_cgroup: &str, fs: Arc<dyn CgroupFs>) -> io::Result<Self> {
        let mut parents = Vec::new();
        for controller in V1_CONTROLLERS {
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
            if !fs.exists(&mount.join("cgroup.procs")) {
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
        Ok(Self { parents, fs })
    }
}

impl Hierarchy for V1 {
    fn create(&self, name: &str, limits: &Limits) -> io::Result<Group> {
        let fs = &*self.fs;
        let mut group = Group {
            dirs: Vec::new(),
            limits: limits.clone(),
            version: Version::V1,
            fs: self.fs.clone(),
        };
        // A group made halfway (a write refused) is removed, not left for the next start.
        let made = self.parents.iter().try_for_each(|(controller, parent)| {
            let dir = parent.join(name);
            create_dir(fs, &dir)?;
            group.dirs.push((controller, dir.clone()));
            match *controller {
                "memory" => {
                    if let Some(bytes) = limits.memory {
                        write(fs, &dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                        // No swap beyond the memory limit, where swap accounting exists.
                        let memsw = dir.join("memory.memsw.limit_in_bytes");
                        if fs.exists(&memsw) {
                            write(fs, &memsw, &bytes.to_string())?;
                        }
                    }
                }
                "cpu" => {
                    if let Some(cores) = limits.cpu {
                        let (quota, period) = cpu_quota(cores);
                        write(fs, &dir.join("cpu.cfs_period_us"), &period.to_string())?;
                        write(fs, &dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                    }
                }
                "pids" => {
                    if let Some(pids) = limits.pids {
                        write(fs, &dir.join("pids.max"), &pids.to_string())?;
                    }
                }
                _ => {
                    // Nothing first, then exactly the container's own nodes.
                    write(fs, &dir.join("devices.deny"), "a")?;
                    for rule in limits.device_rules() {
                        write(fs, &dir.join("devices.allow"), &rule.v1_line())?;
                    }
                }
            }
            io::Result::Ok(())
        });
        if let Err(e) = made {
            group.remove();
            return Err(e);
        }
        Ok(group)
    }

    fn clean_leftovers(&self, prefix: &str) {
        for (_, parent) in &self.parents {
            clean_under(&self.fs, parent, prefix, Version::V1);
        }
    }
}

impl V2 {
    /// Finds this process's group on the v2 `mount` from its membership text, whose v2 line
    /// reads `0::/path`; container groups go under `<mount>/<path>/lode/<name>`.
    pub fn detect_in(mount: &Path, self_cgroup: &str, fs: Arc<dyn CgroupFs>) -> io::Result<Self> {
        let own = self_cgroup
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "no cgroup v2 line (0::/path) in the process's cgroup membership \
                         (/proc/self/cgroup), for the v2 mount at {}",
                        mount.display()
                    ),
                )
            })?;
        let parent = mount.join(own.trim().trim_start_matches('/')).join("lode");
        Ok(Self { parent, fs })
    }
}

impl Hierarchy for V2 {
    fn create(&self, name: &str, limits: &Limits) -> io::Result<Group> {
        let fs = &*self.fs;
        create_dir(fs, &self.parent)?;
        // Children only get the controllers their parent enables in `cgroup.subtree_control`.
        // This works only if the parent's parent (the process's own group) delegates them in
        // its own `cgroup.subtree_control`, e.g. systemd's `Delegate=yes`, and, by v2's
        // no-internal-processes rule, the process then sits in a leaf below it.
        let subtree = self.parent.join("cgroup.subtree_control");
        fs.write(&subtree, "+memory +cpu +pids").map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "enabling memory, cpu and pids in {} (the group above must list them in \
                     its cgroup.subtree_control): {e}",
                    subtree.display()
                ),
            )
        })?;
        let dir = self.parent.join(name);
        create_dir(fs, &dir)?;
        let group = Group {
            dirs: vec![("unified", dir.clone())],
            limits: limits.clone(),
            version: Version::V2,
            fs: self.fs.clone(),
        };
        let limited = (|| {
            if let Some(bytes) = limits.memory {
                write(fs, &dir.join("memory.max"), &bytes.to_string())?;
                // No swap beyond the memory limit, where swap accounting exists.
                let swap = dir.join("memory.swap.max");
                if fs.exists(&swap) {
                    write(fs, &swap, "0")?;
                }
            }
            if let Some(cores) = limits.cpu {
                let (quota, period) = cpu_quota(cores);
                write(fs, &dir.join("cpu.max"), &format!("{quota} {period}"))?;
            }
            if let Some(pids) = limits.pids {
                write(fs, &dir.join("pids.max"), &pids.to_string())?;
            }
            fs.restrict_devices(&dir, &limits.device_rules())
        })();
        // A group made halfway is removed, not left for the next start.
        if let Err(e) = limited {
            group.remove();
            return Err(e);
        }
        Ok(group)
    }

    fn clean_leftovers(&self, prefix: &str) {
        clean_under(&self.fs, &self.parent, prefix, Version::V2);
    }
}

/// Kills and removes every group under `parent` whose name starts with `prefix`.
fn clean_under(fs: &Arc<dyn CgroupFs>, parent: &Path, prefix: &str, version: Version) {
    let Ok(names) = fs.read_dir_names(parent) else {
        return;
    };
    for name in names.into_iter().filter(|n| n.starts_with(prefix)) {
        let group = Group {
            dirs: vec![("leftover", parent.join(name))],
            limits: Limits::default(),
            version,
            fs: fs.clone(),
        };
        group.kill_all();
        group.remove();
    }
}

impl Group {
    /// Reads `key N` from a cgroup file of such lines; 0 when absent.
    fn counter(&self, path: &Path, key: &str) -> u64 {
        self.fs
            .read_to_string(path)
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(' '))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

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
        self.fs
            .read_to_string(&dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGKILLs every process in the group until it is empty (new forks included).
    ///
    /// On v2 with `cgroup.kill` (Linux 5.14+) the kernel kills the whole group, forks racing
    /// it included; older kernels fall back to signalling pid by pid.
    pub fn kill_all(&self) {
        if self.version == Version::V2 && self.cgroup_kill() {
            return;
        }
        for _ in 0..100 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                let _ = self.fs.kill(pid, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Writes `1` to v2's `cgroup.kill` and waits for the group to empty; false when the
    /// file is absent or the group does not empty, so the caller signals pid by pid.
    fn cgroup_kill(&self) -> bool {
        let Some((_, dir)) = self.dirs.first() else {
            return true;
        };
        let kill = dir.join("cgroup.kill");
        if !self.fs.exists(&kill) || self.fs.write(&kill, "1").is_err() {
            return false;
        }
        for _ in 0..100 {
            if self.pids().is_empty() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Which limit, if any, was hit.
    pub fn limit_hit(&self) -> Option<LimitHit> {
        let oom_file = match self.version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        for (controller, dir) in &self.dirs {
            let (memory, pids) = match (*controller, self.version) {
                (_, Version::V2) => (true, true),
                ("memory", _) => (true, false),
                ("pids", _) => (false, true),
                _ => (false, false),
            };
            if memory && self.counter(&dir.join(oom_file), "oom_kill") > 0 {
                return Some(LimitHit::OutOfMemory {
                    limit: self.limits.memory.unwrap_or(0),
                });
            }
            if pids && self.counter(&dir.join("pids.events"), "max") > 0 {
                return Some(LimitHit::Pids {
                    limit: self.limits.pids.unwrap_or(0),
                });
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
                if self.fs.remove_dir(dir).is_ok() || !self.fs.exists(dir) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

#[cfg(test)]
mod tests;
