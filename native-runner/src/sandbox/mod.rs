//! The container sandbox: a process tree in fresh namespaces whose root is an overlay of an
//! image (the read-only lower layer, usually a lazy FUSE mount) and a size-limited tmpfs.
//!
//! The spawn is `std::process::Command` with a `pre_exec` step. In order, the child:
//! 1. joins the container's cgroups (memory, CPU, pids), so the whole tree is limited and can
//!    be killed at once;
//! 2. unshares the mount, pid, uts, ipc, net and cgroup namespaces, and forks once more so the
//!    command runs as pid 1 of the new pid namespace (the middle process only waits and passes
//!    the exit status up);
//! 3. builds the root (tmpfs, overlay, `/proc`, a minimal `/dev`), clones each volume's
//!    host directory as a detached mount, pivots into the root, and only then attaches the
//!    volumes, so their targets resolve inside the container (an image symlink cannot aim a
//!    volume at a host path);
//! 4. brings up loopback and, given a user namespace, joins it as its root;
//! 5. sets rlimits, drops every capability, sets `no_new_privs`, and installs the seccomp
//!    profile ([`crate::seccomp`]);
//! 6. returns to `std`, which execs the command.
//!
//! Everything in `pre_exec` is a plain syscall on memory prepared before the fork: nothing is
//! allocated after it.
//!
//! With [`Network::Outbound`] the net namespace is made first, on a thread of the host, and
//! `slirp4netns` gives it a user-mode TCP/IP stack with the host's loopback cut off; the child
//! joins it instead of making its own.
//!
//! With a [`UserNamespace`] (what `lode serve` uses wherever the kernel allows), the child
//! does all of the above as the host's root, with the image's root attached as an idmapped
//! clone, and only then joins the namespace as its uid 0 ([`crate::userns`]). The
//! container's root is then host uid 524288: its namespaces stay owned by the host's, so it
//! holds no capability over its mounts, hostname or network even before they are dropped.
//! Without one, the container's uid 0 is the host's, held in by the other namespaces, empty
//! capability sets, `no_new_privs`, seccomp and a read-only `/proc/sys`.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::cgroup::devices::CONTAINER_NODES;
use crate::cgroup::{Group, Hierarchy, LimitHit, Limits};
use crate::userns::UserNamespace;

mod child;
mod live;
mod network;
mod snapshot;
mod volume;

use child::*;
pub use live::{ExecSpec, LiveSandbox, Process, Terminal, connect_inside, listen_inside};
use network::*;
pub use snapshot::{Criu, DumpReport, RESTORE_FAILED, RestoreSpec, clean_restore_leftovers};
use volume::*;
pub use volume::{MAX_VOLUMES, Volume};

/// What to run, and on what.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// The image's root: the overlay's read-only lower layer.
    pub lower: PathBuf,
    /// An empty host directory for this container's mounts; removed by [`Sandbox::finish`].
    pub scratch: PathBuf,
    /// The command; a bare name is looked up in the container's `PATH`.
    pub argv: Vec<String>,
    /// The whole environment: nothing is inherited from the host.
    pub env: Vec<(String, String)>,
    /// Working directory inside the container.
    pub cwd: String,
    /// Hostname inside the container.
    pub hostname: String,
    /// Size of the writable layer (tmpfs), in bytes.
    pub writable_bytes: u64,
    /// Size of `/dev/shm`, in bytes (its pages count against the memory limit too).
    pub shm_bytes: u64,
    /// Most open files.
    pub max_open_files: u64,
    /// Memory, CPU and pids limits (cgroups).
    pub limits: Limits,
    /// Wall-clock limit; the whole container is killed when it passes.
    pub timeout: Option<Duration>,
    /// Host directories or files bind-mounted into the container.
    pub volumes: Vec<Volume>,
    /// The network the container gets.
    pub network: Network,
    /// A host directory for the writable layer (`upper/` and `work/` inside it) instead of a
    /// tmpfs, so what the command wrote outlives it: image builds diff it into a new layer.
    pub keep_upper: Option<PathBuf>,
    /// Capabilities the command keeps, as a bit mask (bit N is capability N). Function
    /// containers keep none; build steps keep [`BUILD_CAPABILITIES`] so `apt-get` and `dpkg`
    /// can change owners and drop to their own users.
    pub capabilities: u64,
    /// The user namespace to run in, its uid 0 being an unprivileged host uid; `None` runs
    /// as the host's uid 0, held in by the other namespaces alone. The lower layer is then
    /// mounted idmapped, so its filesystem must allow that (FUSE with `FUSE_ALLOW_IDMAP`,
    /// ext4, xfs, btrfs, tmpfs).
    pub user_namespace: Option<Arc<UserNamespace>>,
    /// Built so CRIU can checkpoint and restore it ([`crate::snapshot`]): its namespaces are
    /// made inside the user namespace (CRIU restores them from there), pid 1 leads its own
    /// session, and the root is the image itself, idmapped and read-only, with a tmpfs on
    /// each of `/tmp`, `/var/tmp`, `/root` and `/run` that the image has (overlayfs hides
    /// the mounts that mapped files sit on, which CRIU must find). Needs a user namespace,
    /// no network and no devices.
    pub checkpointable: bool,
}

/// Directories that get a tmpfs of their own in a checkpointable container, with its mode.
pub const CHECKPOINTABLE_WRITABLE: [(&str, u32); 4] = [
    ("tmp", 0o1777),
    ("var/tmp", 0o1777),
    ("root", 0o700),
    ("run", 0o755),
];

/// What a build step keeps: Docker's default set, less `NET_RAW` and `MKNOD`. It holds only
/// inside the container's namespaces, under `no_new_privs` and the seccomp profile.
pub const BUILD_CAPABILITIES: u64 = 1 << 0 // CHOWN
    | 1 << 1 // DAC_OVERRIDE
    | 1 << 3 // FOWNER
    | 1 << 4 // FSETID
    | 1 << 5 // KILL
    | 1 << 6 // SETGID
    | 1 << 7 // SETUID
    | 1 << 8 // SETPCAP
    | 1 << 10 // NET_BIND_SERVICE
    | 1 << 18 // SYS_CHROOT
    | 1 << 29 // AUDIT_WRITE
    | 1 << 31; // SETFCAP

/// A container's network.
#[derive(Debug, Clone, Default)]
pub enum Network {
    /// Loopback only: nothing outside the container can be reached, the host's ports
    /// included.
    #[default]
    None,
    /// Egress through `slirp4netns`, a user-mode stack, filtered by `egress`: the internet,
    /// but not the host, its loopback or its private and link-local neighbours, except the
    /// `allowed` ranges ([`crate::egress`]).
    Outbound {
        /// This server's filter.
        egress: Arc<crate::egress::Egress>,
        /// Ranges reachable besides the internet.
        allowed: Vec<ipnet::IpNet>,
    },
}

/// `/dev/shm` unless asked otherwise: Docker's default.
pub const DEFAULT_SHM_BYTES: u64 = 64 << 20;

impl Default for SandboxSpec {
    fn default() -> Self {
        Self {
            lower: PathBuf::new(),
            scratch: PathBuf::new(),
            argv: Vec::new(),
            env: vec![(
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            )],
            cwd: "/".into(),
            hostname: "lode".into(),
            writable_bytes: 256 << 20,
            shm_bytes: DEFAULT_SHM_BYTES,
            max_open_files: 1024,
            limits: Limits::default(),
            timeout: None,
            volumes: Vec::new(),
            network: Network::None,
            keep_upper: None,
            capabilities: 0,
            user_namespace: None,
            checkpointable: false,
        }
    }
}

/// A running container.
#[derive(Debug)]
pub struct Sandbox {
    child: Child,
    scratch: PathBuf,
    group: Group,
    timeout: Option<Duration>,
    /// The user-mode network stack, when the container has one.
    slirp: Option<Slirp>,
    /// Its pid 1's host pid, when known from the start (a restore's).
    init: Option<u32>,
    /// Set once [`Sandbox::finish`] has cleaned up; until then, dropping kills and cleans.
    finished: bool,
}

impl Drop for Sandbox {
    /// A sandbox dropped without [`Sandbox::finish`] (its caller went away or failed) still
    /// leaves nothing: the whole container is killed and its cgroups, network and scratch go.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.group.kill_all();
        let _ = self.child.wait();
        self.group.remove();
        drop(self.slirp.take());
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// How a container ended.
#[derive(Debug)]
pub struct Finished {
    /// The command's exit status (see [`Finished::code`]).
    pub status: ExitStatus,
    /// Its stdout, when piped.
    pub stdout: Vec<u8>,
    /// Its stderr, when piped.
    pub stderr: Vec<u8>,
    /// The limit it ran into, if any.
    pub limit_hit: Option<LimitHit>,
    /// The timeout, when it killed the container.
    pub timed_out: Option<Duration>,
}

impl Finished {
    /// The exit code the status stands for (128 + signal when killed).
    pub fn code(&self) -> i32 {
        exit_code(self.status)
    }

    /// Why the container was stopped, named: a limit or the timeout; `None` if it exited.
    pub fn killed_by(&self) -> Option<String> {
        match (&self.timed_out, &self.limit_hit) {
            (Some(after), _) => Some(format!("killed: timed out after {after:?}")),
            (None, Some(limit)) => Some(limit.to_string()),
            (None, None) => None,
        }
    }
}

impl Sandbox {
    /// The host pid of the process that waits for the container (not the container's pid 1).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The host pid of the container's pid 1 (the waiter's only child), once it runs.
    pub fn init_pid(&self) -> Option<u32> {
        if self.init.is_some() {
            return self.init;
        }
        let waiter = self.child.id();
        std::fs::read_to_string(format!("/proc/{waiter}/task/{waiter}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Takes the piped stdout and stderr, to stream them; [`Sandbox::finish`] then returns
    /// them empty.
    pub fn take_output(&mut self) -> (Option<ChildStdout>, Option<ChildStderr>) {
        (self.child.stdout.take(), self.child.stderr.take())
    }

    /// Waits for the command (killing the whole container at the timeout), collects piped
    /// output, and removes the container's cgroups and scratch directory. The mounts were
    /// private to its mount namespace, so they went with its last process.
    pub fn finish(self) -> io::Result<Finished> {
        self.finish_unless(&AtomicBool::new(false))
    }

    /// [`Sandbox::finish`], but the whole container is killed as soon as `stop` is set (the
    /// caller went away); it is then reported as killed by SIGKILL.
    pub fn finish_unless(mut self, stop: &AtomicBool) -> io::Result<Finished> {
        fn drain(pipe: Option<impl io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut bytes);
                }
                bytes
            })
        }
        let stdout = drain(self.child.stdout.take());
        let stderr = drain(self.child.stderr.take());
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let mut timed_out = None;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if timed_out.is_none() && deadline.is_some_and(|d| Instant::now() >= d) {
                timed_out = self.timeout;
                self.group.kill_all();
            }
            if stop.load(Ordering::Relaxed) {
                self.group.kill_all();
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        // Whatever the command left running in the background goes with it.
        self.group.kill_all();
        let limit_hit = self.group.limit_hit();
        self.group.remove();
        drop(self.slirp.take());
        let _ = std::fs::remove_dir_all(&self.scratch);
        self.finished = true;
        Ok(Finished {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
            limit_hit,
            timed_out,
        })
    }
}

/// Starts `spec.argv` in a new sandbox with the given stdout and stderr (stdin is empty).
/// Its cgroups go under `cgroups`, named after the scratch directory.
pub fn spawn(
    spec: &SandboxSpec,
    cgroups: &dyn Hierarchy,
    stdout: Stdio,
    stderr: Stdio,
) -> io::Result<Sandbox> {
    let Some((program, args)) = spec.argv.split_first() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no command to run",
        ));
    };
    if spec.volumes.len() > MAX_VOLUMES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_VOLUMES} volumes per container"),
        ));
    }
    if spec.checkpointable {
        check_checkpointable(spec)?;
    }
    let name = spec
        .scratch
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "scratch needs a UTF-8 name"))?;
    // Whatever is made from here on is undone if the start fails.
    let mut partial = Partial {
        scratch: spec.scratch.clone(),
        group: None,
        slirp: None,
    };
    let netns = match &spec.network {
        Network::None => None,
        Network::Outbound { egress, allowed } => {
            let netns = new_net_namespace()?;
            partial.slirp = Some(Slirp::start(&netns, egress.grant(allowed)?)?);
            Some(netns)
        }
    };
    std::fs::create_dir_all(&spec.scratch)?;
    let group = partial.group.insert(cgroups.create(name, &spec.limits)?);
    let (mut stage_read, stage_write) = io::pipe()?;
    let prepared = Prepared::new(spec, group, netns, stage_write.into())?;
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)));
    // SAFETY: `enter` only makes raw syscalls on memory prepared before the fork, which is
    // what pre_exec requires.
    unsafe {
        command.pre_exec(move || match &prepared.checkpointable {
            Some(userns) => enter_checkpointable(&prepared, userns),
            None => enter(&prepared),
        });
    }
    let spawned = command.spawn();
    // The parent's copy of the write end goes with the command, so this read ends.
    drop(command);
    let child = spawned.map_err(|e| named_failure(e, &mut stage_read, spec))?;
    Ok(partial.into_sandbox(child, spec.timeout, None))
}

/// Refuses, by name, what a checkpointable container cannot have.
fn check_checkpointable(spec: &SandboxSpec) -> io::Result<()> {
    let refuse = |why: &str| {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("a container that can be snapshotted {why}"),
        ))
    };
    if spec.user_namespace.is_none() {
        return refuse("needs a user namespace, which this host did not give Lode");
    }
    if !matches!(spec.network, Network::None) {
        return refuse("has no network yet: CRIU cannot restore the user-mode stack's link");
    }
    if spec.keep_upper.is_some() {
        return refuse("has no kept writable layer (its root is the image, read-only)");
    }
    if !spec.limits.devices.is_empty() {
        return refuse("has no devices: CRIU cannot save a GPU's state");
    }
    for dir in ["proc", "dev"] {
        if !spec.lower.join(dir).is_dir() {
            return refuse(&format!(
                "needs /{dir} in its image (its root is read-only, so it cannot be made)"
            ));
        }
    }
    Ok(())
}

/// What a start has made so far; dropped before [`Partial::disarm`], it removes it all.
struct Partial {
    scratch: PathBuf,
    group: Option<Group>,
    slirp: Option<Slirp>,
}

impl Partial {
    /// The start succeeded: the sandbox owns the group, the network and the scratch
    /// directory from here.
    fn into_sandbox(
        mut self,
        child: Child,
        timeout: Option<Duration>,
        init: Option<u32>,
    ) -> Sandbox {
        Sandbox {
            child,
            scratch: std::mem::take(&mut self.scratch),
            group: self.group.take().expect("made before the start"),
            timeout,
            slirp: self.slirp.take(),
            init,
            finished: false,
        }
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(group) = self.group.take() {
            group.remove();
        }
        drop(self.slirp.take());
        if !self.scratch.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.scratch);
        }
    }
}

/// The longest line of a container's output kept as one line (a log line, a build line);
/// longer runs without a newline are cut into lines of this size.
pub const MAX_OUTPUT_LINE: usize = 16 << 10;

/// Calls `each` with every line `pipe` yields, without its newline, until it ends. A run
/// longer than [`MAX_OUTPUT_LINE`] is cut, so what a container prints never grows the
/// reader's memory past that.
pub fn for_each_line(pipe: impl Read, mut each: impl FnMut(&[u8])) {
    use std::io::BufRead;
    let mut reader = io::BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_OUTPUT_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => break,
            Ok(_) => each(line.strip_suffix(b"\n").unwrap_or(&line)),
        }
    }
}

/// The exit code a container's status stands for (128 + signal when it was killed).
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}
