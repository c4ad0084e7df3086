//! Checkpoint and restore of a running container with CRIU: its memory, open files,
//! namespaces and writable tmpfs contents saved to a directory of images, and started again
//! from them as a new container.
//!
//! Only a container spawned with [`SandboxSpec::checkpointable`] can be saved; CRIU 4 is
//! needed (`./lode.sh` builds 4.1.1 under `/var/cache/lode`: Debian bookworm's 3.17 fails its
//! own check on this kernel's vDSO).
//!
//! A restore is a container like any other: it gets its own cgroups (CRIU runs inside them,
//! so the restored tree lands there), its own scratch directory, and a waiter process that
//! is the restored pid 1's parent and exits with its status, so [`Sandbox::finish`] works
//! as for a spawned one. The image comes in as an idmapped clone attached under the scratch
//! directory; CRIU makes it the root of the new mount namespace.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use super::*;

/// Where `./lode.sh` installs CRIU.
const BUNDLED: &str = "/var/cache/lode/criu-4.1.1/sbin/criu";
/// Descriptors of the container's pid 1 that CRIU hands back on restore when they are pipes.
const STDIO: [i32; 3] = [0, 1, 2];
/// Which of pid 1's descriptors were pipes at the dump, and each pipe's id (`pipe:[N]`).
const STDIO_FILE: &str = "lode-stdio";
/// The waiter's exit code when CRIU itself failed (its log says why).
pub const RESTORE_FAILED: i32 = 125;
/// Where a restore's root and external mounts are bound for CRIU (see [`Criu::restore`]).
const RESTORE_STAGE: &str = "/run/lode-restore";
/// Longest a restore may take before it is given up.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

/// A CRIU binary that can checkpoint and restore Lode's containers.
#[derive(Debug, Clone)]
pub struct Criu {
    binary: PathBuf,
    version: String,
}

/// How long a dump took and what it wrote.
#[derive(Debug, Clone)]
pub struct DumpReport {
    /// Wall time of `criu dump`.
    pub took: Duration,
    /// Bytes of images written.
    pub bytes: u64,
}

/// What to restore, and the new container's settings.
#[derive(Debug, Clone)]
pub struct RestoreSpec {
    /// The images [`Criu::dump`] wrote.
    pub images: PathBuf,
    /// The image's root, as for [`SandboxSpec::lower`].
    pub lower: PathBuf,
    /// An empty host directory for this container; removed by [`Sandbox::finish`].
    pub scratch: PathBuf,
    /// The user namespace the container ran in (its id mapping is restored from the images).
    pub user_namespace: Arc<UserNamespace>,
    /// Host directories for the external mounts named at the dump, by key.
    pub externals: BTreeMap<String, PathBuf>,
    /// Memory, CPU and pids limits.
    pub limits: Limits,
    /// Wall-clock limit.
    pub timeout: Option<Duration>,
}

impl Criu {
    /// Finds CRIU 4 or later: `LODE_CRIU`, then the copy `./lode.sh` builds, then `criu` on
    /// the `PATH`.
    pub fn locate() -> io::Result<Self> {
        let candidates = std::env::var_os("LODE_CRIU")
            .map(PathBuf::from)
            .into_iter()
            .chain([PathBuf::from(BUNDLED), PathBuf::from("criu")]);
        let mut seen = Vec::new();
        for binary in candidates {
            let Ok(output) = Command::new(&binary).arg("--version").output() else {
                continue;
            };
            let text = String::from_utf8_lossy(&output.stdout);
            let version = text
                .lines()
                .find_map(|l| l.strip_prefix("Version: "))
                .unwrap_or("")
                .trim()
                .to_string();
            let major = version
                .split('.')
                .next()
                .and_then(|m| m.parse::<u32>().ok());
            if major.is_some_and(|m| m >= 4) {
                return Ok(Self { binary, version });
            }
            seen.push(format!("{} is {version:?}", binary.display()));
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "memory snapshots need CRIU 4 or later ({}); `./lode.sh deps` builds 4.1.1 \
                 into /var/cache/lode, or set LODE_CRIU",
                if seen.is_empty() {
                    "none found".to_string()
                } else {
                    seen.join(", ")
                }
            ),
        ))
    }

    /// The version, as `criu --version` prints it.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Saves the container whose pid 1 is host pid `pid` into `images` (an empty
    /// directory). `externals` names mounts (by their path inside the container) that a
    /// restore takes from elsewhere, each under a key; the host's device nodes are found by
    /// themselves. With `leave_running` the container goes on afterwards; otherwise it is
    /// gone.
    pub fn dump(
        &self,
        pid: u32,
        images: &Path,
        externals: &[(&str, &str)],
        leave_running: bool,
    ) -> io::Result<DumpReport> {
        std::fs::create_dir_all(images)?;
        let mut stdio = String::new();
        for fd in STDIO {
            if let Ok(target) = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                && let Some(id) = target.to_str().filter(|t| t.starts_with("pipe:["))
            {
                stdio.push_str(&format!("{fd} {id}\n"));
            }
        }
        std::fs::write(images.join(STDIO_FILE), stdio)?;
        let mut command = Command::new(&self.binary);
        command
            .arg("dump")
            .arg("-t")
            .arg(pid.to_string())
            .arg("-D")
            .arg(images)
            .args(["-o", "dump.log", "-v2"])
            // Mounts from outside (the host's device nodes) are found by themselves; the
            // named ones get their key.
            .arg("--external")
            .arg("mnt[]");
        for (mountpoint, key) in externals {
            command
                .arg("--external")
                .arg(format!("mnt[{mountpoint}]:{key}"));
        }
        if leave_running {
            command.arg("--leave-running");
        }
        let started = Instant::now();
        let status = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        let took = started.elapsed();
        if !status.success() {
            return Err(failure("dump", &images.join("dump.log")));
        }
        Ok(DumpReport {
            took,
            bytes: dir_bytes(images),
        })
    }

    /// Starts a container from `spec.images`, with the restored pid 1's pipes at stdio
    /// replaced by `stdout` and `stderr`. Returns once the restore is done, with the
    /// restored pid 1's host pid in [`Sandbox::init_pid`], or with the error lines of
    /// CRIU's log.
    pub fn restore(
        &self,
        spec: &RestoreSpec,
        cgroups: &dyn Hierarchy,
        stdout: Stdio,
        stderr: Stdio,
    ) -> io::Result<Sandbox> {
        let name = spec
            .scratch
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "scratch needs a UTF-8 name")
            })?;
        let mut partial = Partial {
            scratch: spec.scratch.clone(),
            group: None,
            slirp: None,
        };
        std::fs::create_dir_all(&spec.scratch)?;
        // CRIU mounts the root and the external mounts from inside the container's user
        // namespace, whose root cannot pass Lode's private directories: they are bound
        // under a directory it can pass, and nothing else is there.
        let stage = Path::new(RESTORE_STAGE).join(name);
        let mut host_mounts = HostMounts(vec![stage.clone()]);
        std::fs::create_dir_all(RESTORE_STAGE)?;
        std::fs::set_permissions(RESTORE_STAGE, std::fs::Permissions::from_mode(0o711))?;
        std::fs::create_dir(&stage)?;
        // Only the container's root (CRIU, inside its user namespace) and the host's root
        // may pass it: the app's code and its socket are below.
        let owner = spec.user_namespace.ids().host_base;
        std::os::unix::fs::chown(&stage, Some(owner), Some(owner))?;
        std::fs::set_permissions(&stage, std::fs::Permissions::from_mode(0o700))?;
        let root = stage.join("root");
        std::fs::create_dir(&root)?;
        host_mounts.0.insert(0, root.clone());
        let image = clone_idmapped(&path_cstring(&spec.lower)?, &spec.user_namespace)?;
        move_detached(image, &path_cstring(&root)?)?;
        let mut externals = Vec::new();
        for (key, source) in &spec.externals {
            let target = stage.join(key);
            std::fs::create_dir(&target)?;
            host_mounts.0.insert(0, target.clone());
            let (source, c_target) = (path_cstring(source)?, path_cstring(&target)?);
            mount(&source, &c_target, None, libc::MS_BIND | libc::MS_REC, None)?;
            // Read-only here too, whatever CRIU makes of the dumped flags.
            let read_only = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
            mount(&source, &c_target, None, read_only, None)?;
            externals.push((key, target));
        }
        let group = partial.group.insert(cgroups.create(name, &spec.limits)?);
        let procs = group
            .procs_files()
            .iter()
            .map(|p| path_cstring(p))
            .collect::<io::Result<Vec<_>>>()?;
        let mut command = Command::new(&self.binary);
        command
            .arg("restore")
            .arg("-D")
            .arg(&spec.images)
            .arg("--root")
            .arg(&root)
            .arg("-o")
            .arg(spec.scratch.join("restore.log"))
            .arg("-v2")
            .arg("--pidfile")
            .arg(spec.scratch.join("pid"))
            // The restored pid 1 becomes the waiter's child, and lands in the cgroups CRIU
            // runs in: this container's.
            .args(["--restore-detached", "--restore-sibling"])
            .arg("--manage-cgroups=ignore")
            .args(["--ext-mount-map", "auto"]);
        for (key, path) in &externals {
            command
                .arg("--external")
                .arg(format!("mnt[{key}]:{}", path.display()));
        }
        let stdio = std::fs::read_to_string(spec.images.join(STDIO_FILE)).unwrap_or_default();
        for line in stdio.lines() {
            if let Some((fd, id)) = line.split_once(' ') {
                command.arg("--inherit-fd").arg(format!("fd[{fd}]:{id}"));
            }
        }
        command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .env_clear()
            // CRIU runs iptables-restore and ip to bring the network namespace back.
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        // SAFETY: only raw syscalls on memory prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                check(libc::setsid())?;
                join_cgroup_files(&procs)?;
                fork_restoring()
            });
        }
        let mut child = command.spawn()?;
        // Done when CRIU writes the pid file; a waiter that exits first means CRIU failed.
        let pid_file = spec.scratch.join("pid");
        let deadline = Instant::now() + RESTORE_TIMEOUT;
        let init = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|text| text.trim().parse::<u32>().ok())
            {
                break pid;
            }
            if let Some(status) = child.try_wait()? {
                let error = if exit_code(status) == RESTORE_FAILED {
                    restore_failure(&spec.scratch)
                } else {
                    io::Error::other(format!("the restore's waiter exited: {status}"))
                };
                return Err(error);
            }
            if Instant::now() >= deadline {
                group.kill_all();
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("criu restore did not finish within {RESTORE_TIMEOUT:?}"),
                ));
            }
            std::thread::sleep(Duration::from_micros(500));
        };
        // The container has its own copies of those mounts now; the staged ones go at once,
        // so the app's code is reachable through them only while CRIU runs.
        drop(host_mounts);
        Ok(partial.into_sandbox(child, spec.timeout, Some(init)))
    }
}

/// Host-side mounts a restore made, detached if it fails before a sandbox owns them.
struct HostMounts(Vec<PathBuf>);

impl Drop for HostMounts {
    fn drop(&mut self) {
        detach_all(&self.0);
    }
}

/// Removes what restores left staged under [`RESTORE_STAGE`] for containers whose scratch
/// name starts with `prefix` (a server that was killed during a restore).
pub fn clean_restore_leftovers(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(RESTORE_STAGE) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let stage = entry.path();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&stage)
            .map(|inner| inner.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        paths.push(stage);
        detach_all(&paths);
    }
}

/// Lazily unmounts each path (what is still using it keeps it until done) and removes its
/// directory, in order: mount points first, then the directories holding them.
pub(super) fn detach_all(paths: &[PathBuf]) {
    for path in paths {
        if let Ok(c_path) = path_cstring(path) {
            // SAFETY: a NUL-terminated path.
            unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(path);
    }
}

/// In the forked child before exec: forks once more; the child returns (and becomes CRIU),
/// this process waits for it, then for the restored pid 1 CRIU makes its sibling, and exits
/// with that one's status. Never returns in the waiter.
fn fork_restoring() -> io::Result<()> {
    // SAFETY: fork(2) in the single-threaded child std forked.
    let criu = unsafe { libc::fork() };
    if criu == -1 {
        return Err(io::Error::last_os_error());
    }
    if criu == 0 {
        return Ok(());
    }
    // SAFETY: close_range(2) on this process's own descriptors above stderr.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    let mut status = 0;
    // SAFETY: waitpid(2) on our own child with a valid out pointer.
    while unsafe { libc::waitpid(criu, &mut status, 0) } == -1 {
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        // SAFETY: _exit(2), as after a fork.
        unsafe { libc::_exit(RESTORE_FAILED) };
    }
    // The restored pid 1 is now this process's only child.
    loop {
        // SAFETY: waitpid(2) for any child, with a valid out pointer.
        if unsafe { libc::waitpid(-1, &mut status, 0) } > 0 {
            exit_as(status);
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: _exit(2), as after a fork.
            unsafe { libc::_exit(RESTORE_FAILED) };
        }
    }
}

/// Error lines CRIU logs on every run here that are not why it failed.
const NOISE: [&str; 3] = ["RLIMIT_NOFILE", "Unable to create tun", "already assigned"];

/// Why a CRIU run failed: the error lines of its log, or where the log is.
fn failure(what: &str, log: &Path) -> io::Error {
    let errors: Vec<String> = std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Error") && !NOISE.iter().any(|n| l.contains(n)))
        .take(5)
        .map(str::to_string)
        .collect();
    io::Error::other(format!(
        "criu {what} failed ({}): {}",
        log.display(),
        if errors.is_empty() {
            "no error line in its log".to_string()
        } else {
            errors.join("; ")
        }
    ))
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Why a restore failed: the error lines of CRIU's log in `scratch`.
fn restore_failure(scratch: &Path) -> io::Error {
    failure("restore", &scratch.join("restore.log"))
}
