//! Long-lived sandboxes: a container whose pid 1 is the helper's `init` (a static program of
//! Lode's own, so any image works), and processes started in it later. A process enters the
//! sandbox the way its pid 1 was made, and with no more: the sandbox's cgroups, its net, uts,
//! ipc, cgroup, pid and mount namespaces, its user namespace as uid 0 there, then the same
//! open-files limit, capabilities, `no_new_privs` and seccomp profile. The host's files are
//! out of reach because the mount namespace's root is the container's.
//!
//! File calls run the helper the same way (`read`, `write`, `ls`, ...), so a path resolves
//! inside the sandbox's root with the sandbox's rights, symlinks and `..` included.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::child::{
    Stage, become_container_root, chdir_inside_root, check, cstring, fork_waiting,
    join_cgroup_files, named_failure, report_stage, restrict,
};
use super::{Sandbox, SandboxSpec, spawn};
use crate::cgroup::{Hierarchy, LimitHit};
use crate::userns::UserNamespace;

/// The helper, built by `build.rs` from `helper/main.rs`.
const HELPER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/lode-sandbox-helper"));

/// The namespaces a process joins, in order; the pid namespace takes effect for the child
/// forked after it, and the mount namespace moves the root into the container's.
const NAMESPACES: [(&str, libc::c_int); 6] = [
    ("net", libc::CLONE_NEWNET),
    ("uts", libc::CLONE_NEWUTS),
    ("ipc", libc::CLONE_NEWIPC),
    ("cgroup", libc::CLONE_NEWCGROUP),
    ("pid", libc::CLONE_NEWPID),
    ("mnt", libc::CLONE_NEWNS),
];

/// How long a new sandbox's pid 1 may take to be running.
const START_LIMIT: Duration = Duration::from_secs(30);

/// The helper as a sealed in-memory file, made once per process. It is executed through
/// `/proc/self/fd/N` from inside the container, so the image needs nothing of Lode's, and
/// its descriptor closes on exec, so nothing in the sandbox holds it.
fn helper() -> io::Result<&'static OwnedFd> {
    static HELPER_FD: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = HELPER_FD.get() {
        return Ok(fd);
    }
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create(
        "lode-sandbox-helper",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let mut written = 0;
    while written < HELPER.len() {
        written += rustix::io::write(&fd, &HELPER[written..])?;
    }
    rustix::fs::fcntl_add_seals(
        &fd,
        SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
    )?;
    Ok(HELPER_FD.get_or_init(|| fd))
}

/// The helper's path as a process about to exec sees it.
fn helper_path() -> io::Result<String> {
    Ok(format!("/proc/self/fd/{}", helper()?.as_raw_fd()))
}

/// A running sandbox that takes processes until it is terminated or its pid 1 ends.
#[derive(Debug)]
pub struct LiveSandbox {
    sandbox: Sandbox,
    /// Its pid 1, as the host sees it.
    init: libc::pid_t,
    /// Its root directory, as its pid 1 had it at the start.
    root: OwnedFd,
    namespaces: Vec<(OwnedFd, libc::c_int)>,
    cgroup_procs: Vec<CString>,
    user_namespace: Option<Arc<UserNamespace>>,
    max_open_files: u64,
    capabilities: u64,
}

/// A process to start in a live sandbox.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// The command; a bare name is looked up in `env`'s `PATH`, inside the sandbox.
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    pub cwd: String,
    /// Whether its stdin is a terminal ([`LiveSandbox::open_terminal`]'s) to make its
    /// controlling terminal, in a session of its own.
    pub terminal: bool,
}

/// A pseudo-terminal of a live sandbox: the master stays with the host, the slave becomes a
/// process's stdio.
#[derive(Debug)]
pub struct Terminal {
    /// The host's end: the process's output to read, its input to write, its size to set.
    pub master: OwnedFd,
    /// The process's end.
    pub slave: OwnedFd,
}

impl Terminal {
    /// Tells the process its terminal is `rows` by `cols`.
    pub fn resize(master: &impl AsRawFd, rows: u16, cols: u16) -> io::Result<()> {
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ on a pty master we hold, with a valid winsize.
        check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) }).map(drop)
    }
}

impl LiveSandbox {
    /// Starts a sandbox of `spec` (its `argv` is ignored: pid 1 is the helper's `init`) and
    /// waits until its pid 1 runs.
    pub fn start(spec: &SandboxSpec, cgroups: &dyn Hierarchy) -> io::Result<Self> {
        let mut spec = spec.clone();
        spec.argv = vec![helper_path()?, "init".into()];
        let mut sandbox = spawn(&spec, cgroups, Stdio::null(), Stdio::null())?;
        let init = wait_for_init(&mut sandbox)?;
        // Its root, held from now on: a pid read later could be another process's.
        let root = OwnedFd::from(std::fs::File::open(format!("/proc/{init}/root"))?);
        let namespaces = NAMESPACES
            .iter()
            .map(|(name, kind)| {
                let fd = std::fs::File::open(format!("/proc/{init}/ns/{name}"))?;
                Ok((OwnedFd::from(fd), *kind))
            })
            .collect::<io::Result<_>>()?;
        let cgroup_procs = sandbox
            .group
            .procs_files()
            .iter()
            .map(|p| super::child::path_cstring(p))
            .collect::<io::Result<_>>()?;
        Ok(Self {
            sandbox,
            init,
            root,
            namespaces,
            cgroup_procs,
            user_namespace: spec.user_namespace.clone(),
            max_open_files: spec
                .max_open_files
                .min(super::child::open_files_hard_limit()),
            capabilities: spec.capabilities,
        })
    }

    /// The sandbox's network namespace, held open, for [`connect_inside`].
    pub fn network(&self) -> io::Result<OwnedFd> {
        let (fd, _) = self
            .namespaces
            .iter()
            .find(|(_, kind)| *kind == libc::CLONE_NEWNET)
            .ok_or_else(|| io::Error::other("the sandbox has no network namespace"))?;
        fd.try_clone()
    }

    /// The host pid of the sandbox's pid 1.
    pub fn init_pid(&self) -> u32 {
        self.init as u32
    }

    /// Whether its pid 1 still runs (a sandbox whose pid 1 ended has ended).
    pub fn is_running(&mut self) -> bool {
        matches!(self.sandbox.child.try_wait(), Ok(None))
    }

    /// The limit the sandbox ran into, if any (the memory limit kills its largest process).
    pub fn limit_hit(&self) -> Option<LimitHit> {
        self.sandbox.group.limit_hit()
    }

    /// Starts `exec` in the sandbox with the given stdio.
    pub fn exec(
        &self,
        exec: &ExecSpec,
        stdin: Stdio,
        stdout: Stdio,
        stderr: Stdio,
    ) -> io::Result<Process> {
        let Some((program, args)) = exec.argv.split_first() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no command to run",
            ));
        };
        let (mut stage_read, stage_write) = io::pipe()?;
        let joining = Joining {
            namespaces: self
                .namespaces
                .iter()
                .map(|(fd, kind)| (fd.as_raw_fd(), *kind))
                .collect(),
            cgroup_procs: self.cgroup_procs.clone(),
            cwd: cstring(&exec.cwd)?,
            user_namespace: self.user_namespace.clone(),
            max_open_files: self.max_open_files,
            capabilities: self.capabilities,
            seccomp: crate::seccomp::compiled()?,
            stage_report: stage_write.into(),
            terminal: exec.terminal,
        };
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .env_clear()
            .envs(exec.env.iter().map(|(k, v)| (k, v)));
        // SAFETY: `enter_live` only makes raw syscalls on memory prepared before the fork.
        unsafe {
            command.pre_exec(move || enter_live(&joining));
        }
        let spawned = command.spawn();
        drop(command);
        spawned
            .map(|child| Process { child })
            .map_err(|e| named_failure(e, &mut stage_read, &SandboxSpec::default()))
    }

    /// A new pseudo-terminal in the sandbox's own `/dev/pts` (so the process sees a
    /// `/dev/pts/N` of its sandbox), `rows` by `cols`. The master is opened through the
    /// sandbox's root with every path component resolved inside it, the slave from the
    /// master (never by path; a node planted at that path is no pty master and fails there),
    /// and the slave is handed to the sandbox's root user.
    pub fn open_terminal(&self, rows: u16, cols: u16) -> io::Result<Terminal> {
        let root = &self.root;
        let path = cstring("dev/pts/ptmx")?;
        // SAFETY: an all-zero open_how is valid ("no flags"); the fields are then set.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) as u64;
        how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: openat2(2) with a descriptor we hold, a NUL-terminated path and a valid
        // open_how of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        let master = owned(fd)?;
        let unlock: libc::c_int = 0;
        // SAFETY: TIOCSPTLCK with a pointer to an int, on the master we just opened.
        check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })?;
        // SAFETY: TIOCGPTPEER (Linux 4.13) opens the slave of this master; no path involved.
        let slave = unsafe {
            libc::ioctl(
                master.as_raw_fd(),
                libc::TIOCGPTPEER,
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        };
        let slave = owned(slave as libc::c_long)?;
        if let Some(userns) = &self.user_namespace {
            let root = userns.ids().host_base;
            // SAFETY: fchown(2) on the slave we hold.
            check(unsafe { libc::fchown(slave.as_raw_fd(), root, root) })?;
        }
        Terminal::resize(&master, rows, cols)?;
        Ok(Terminal { master, slave })
    }

    /// Starts the helper's `op` (`read`, `write`, `append`, `ls`, `stat`, `mkdir`, `rm`) on
    /// `path` inside the sandbox, `input` as its stdin, stdout and stderr piped. Its exit
    /// code says how it went: 0 done, 2 not found, 3 wrong kind, 4 permission denied, 5 no
    /// space left, 1 anything else (with the reason on stderr).
    pub fn file_op(&self, op: &str, path: &str, input: Option<Stdio>) -> io::Result<Process> {
        let exec = ExecSpec {
            argv: vec![helper_path()?, op.into(), path.into()],
            env: Vec::new(),
            cwd: "/".into(),
            terminal: false,
        };
        self.exec(
            &exec,
            input.unwrap_or_else(Stdio::null),
            Stdio::piped(),
            Stdio::piped(),
        )
    }

    /// Ends the sandbox now: every process in it is killed, and its cgroups, network and
    /// scratch directory go.
    pub fn terminate(self) {
        drop(self.sandbox);
    }
}

/// A process started in a live sandbox. `child` is its waiter: the process outside the
/// sandbox's pid namespace that waits for the command and exits with its status (128 +
/// signal when it was killed); its stdio is the command's.
#[derive(Debug)]
pub struct Process {
    /// The waiter.
    pub child: Child,
}

impl Process {
    /// Waits up to `limit` for the command to end; `None` if it still runs. The wait wakes
    /// as the waiter exits (a pidfd), not at the next poll.
    pub fn wait_timeout(
        &mut self,
        limit: Duration,
    ) -> io::Result<Option<std::process::ExitStatus>> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(Some(status));
        }
        // SAFETY: pidfd_open(2) on our own child's pid, which is not reaped until we wait.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.child.id() as libc::pid_t, 0) };
        if fd >= 0 {
            // SAFETY: the syscall returned a new descriptor that nothing else owns.
            let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
            let mut poll = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let millis = limit.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: poll(2) on one pollfd we own.
            unsafe { libc::poll(&mut poll, 1, millis) };
        } else {
            std::thread::sleep(limit.min(Duration::from_millis(2)));
        }
        self.child.try_wait()
    }

    /// Kills the command (not what it left running in the background); the waiter then
    /// reaps it and exits with 137. Killing the waiter itself would leave the command to be
    /// reaped outside the sandbox.
    pub fn kill(&mut self) -> io::Result<()> {
        let waiter = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{waiter}/task/{waiter}/children"))
            .unwrap_or_default();
        let mut killed = false;
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2) with a pid and a signal number.
            killed |= unsafe { libc::kill(pid, libc::SIGKILL) } == 0;
        }
        if !killed && self.child.try_wait()?.is_none() {
            // Still setting up: the command does not exist yet, and dies with its waiter
            // (PR_SET_PDEATHSIG) if it is forked after all.
            self.child.kill()?;
        }
        Ok(())
    }
}

/// A TCP connection from the host to `port` on the loopback of the sandbox whose network
/// namespace is `network` (a tunnel into it). A thread of its own joins that namespace for
/// the connect alone and then ends, so the socket lives inside the sandbox's network and no
/// thread of the host's is ever left in it.
pub fn connect_inside(
    network: OwnedFd,
    port: u16,
    timeout: Duration,
) -> io::Result<std::net::TcpStream> {
    let connecting = std::thread::Builder::new()
        .name("lode-tunnel".into())
        .spawn(move || {
            // SAFETY: setns(2) on a namespace fd we own, for this thread only; the thread
            // ends right after the connect.
            if unsafe { libc::setns(network.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            std::net::TcpStream::connect_timeout(&address, timeout)
        })?;
    connecting
        .join()
        .map_err(|_| io::Error::other("the tunnel's connecting thread panicked"))?
}

/// A TCP listener on `address` inside the network namespace `network` (a host's tunnel
/// mirrored into a container). As with [`connect_inside`], a thread of its own joins the
/// namespace for the bind alone, so the socket lives there and no host thread stays.
pub fn listen_inside(
    network: &OwnedFd,
    address: std::net::SocketAddr,
) -> io::Result<std::net::TcpListener> {
    let network = network.try_clone()?;
    let binding = std::thread::Builder::new()
        .name("lode-tunnel".into())
        .spawn(move || {
            // SAFETY: setns(2) on a namespace fd we own, for this thread only; the thread
            // ends right after the bind.
            if unsafe { libc::setns(network.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            std::net::TcpListener::bind(address)
        })?;
    binding
        .join()
        .map_err(|_| io::Error::other("the tunnel's binding thread panicked"))?
}

/// Waits until the sandbox's pid 1 has exec'd the helper, and returns its host pid.
fn wait_for_init(sandbox: &mut Sandbox) -> io::Result<libc::pid_t> {
    let middle = sandbox.child.id();
    let deadline = Instant::now() + START_LIMIT;
    loop {
        if let Some(status) = sandbox.child.try_wait()? {
            return Err(io::Error::other(format!(
                "the sandbox's pid 1 ended as it started ({status})"
            )));
        }
        let children = std::fs::read_to_string(format!("/proc/{middle}/task/{middle}/children"))
            .unwrap_or_default();
        if let Some(pid) = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.starts_with(b"/proc/self/fd/") && cmdline.ends_with(b"\0init\0") {
                return Ok(pid);
            }
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the sandbox's pid 1 did not start",
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A descriptor a syscall returned, or its error.
fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as libc::c_int) })
}

/// What a process entering a live sandbox needs, prepared before the fork.
struct Joining {
    namespaces: Vec<(libc::c_int, libc::c_int)>,
    cgroup_procs: Vec<CString>,
    cwd: CString,
    user_namespace: Option<Arc<UserNamespace>>,
    max_open_files: u64,
    capabilities: u64,
    seccomp: &'static [seccompiler::BpfProgram],
    stage_report: OwnedFd,
    terminal: bool,
}

/// Runs in the forked child, before exec: no allocation from here on.
fn enter_live(j: &Joining) -> io::Result<()> {
    let report = &j.stage_report;
    // Until it execs, this is a copy of the server: nothing in the sandbox may read its
    // memory or files through /proc, whatever uid it runs as on the way.
    // SAFETY: prctl(2) with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) })?;
    // SAFETY: setsid(2) takes no arguments.
    report_stage(report, Stage::Session, check(unsafe { libc::setsid() }))?;
    report_stage(report, Stage::Cgroups, join_cgroup_files(&j.cgroup_procs))?;
    for (fd, kind) in &j.namespaces {
        // SAFETY: setns(2) on a namespace descriptor the parent holds open.
        let joined = check(unsafe { libc::setns(*fd, *kind) });
        report_stage(report, Stage::Namespaces, joined)?;
    }
    fork_waiting()?;
    if j.terminal {
        // The command leads a session of its own, with its stdin as the controlling terminal.
        // SAFETY: setsid(2) takes no arguments; TIOCSCTTY on fd 0 with an int argument.
        let controlled = check(unsafe { libc::setsid() })
            .and_then(|_| check(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) }));
        report_stage(report, Stage::Session, controlled)?;
    }
    report_stage(report, Stage::Workdir, chdir_inside_root(&j.cwd))?;
    if let Some(userns) = &j.user_namespace {
        report_stage(report, Stage::User, become_container_root(userns))?;
    }
    // The uid change reset both: not dumpable until exec (`fs.suid_dumpable` may say
    // otherwise), and killing the waiter kills the command.
    // SAFETY: prctl(2) with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) })?;
    // SAFETY: as above.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) })?;

    report_stage(
        report,
        Stage::LockDown,
        restrict(j.max_open_files, j.capabilities, j.seccomp),
    )
}
