//! The container sandbox: a process tree in fresh namespaces whose root is an overlay of an
//! image (the read-only lower layer, usually a lazy FUSE mount) and a size-limited tmpfs.
//!
//! The spawn is `std::process::Command` with a `pre_exec` step. In order, the child:
//! 1. joins the container's cgroups (memory, CPU, pids), so the whole tree is limited and can
//!    be killed at once;
//! 2. unshares the mount, pid, uts, ipc, net and cgroup namespaces, and forks once more so the
//!    command runs as pid 1 of the new pid namespace (the middle process only waits and passes
//!    the exit status up);
//! 3. builds the root (tmpfs, overlay, `/proc`, a minimal `/dev`) and pivots into it;
//! 4. brings up loopback, sets rlimits, drops every capability, sets `no_new_privs`, and
//!    installs the seccomp profile ([`crate::seccomp`]);
//! 5. returns to `std`, which execs the command.
//!
//! Everything in `pre_exec` is a plain syscall on memory prepared before the fork: nothing is
//! allocated after it.
//!
//! Not yet here (issue 5 continues): user namespaces, volumes and outbound network.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::cgroup::{Group, Hierarchy, LimitHit, Limits};

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
    /// Most open files.
    pub max_open_files: u64,
    /// Memory, CPU and pids limits (cgroups).
    pub limits: Limits,
    /// Wall-clock limit; the whole container is killed when it passes.
    pub timeout: Option<Duration>,
}

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
            max_open_files: 1024,
            limits: Limits::default(),
            timeout: None,
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

    /// Waits for the command (killing the whole container at the timeout), collects piped
    /// output, and removes the container's cgroups and scratch directory. The mounts were
    /// private to its mount namespace, so they went with its last process.
    pub fn finish(mut self) -> io::Result<Finished> {
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
            std::thread::sleep(Duration::from_millis(2));
        };
        // Whatever the command left running in the background goes with it.
        self.group.kill_all();
        let limit_hit = self.group.limit_hit();
        self.group.remove();
        let _ = std::fs::remove_dir_all(&self.scratch);
        Ok(Finished {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
            limit_hit,
            timed_out,
        })
    }
}

fn cstring(text: impl AsRef<[u8]>) -> io::Result<CString> {
    CString::new(text.as_ref()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a path or option holds a NUL byte",
        )
    })
}

fn path_cstring(path: &Path) -> io::Result<CString> {
    cstring(path.as_os_str().as_bytes())
}

/// Every string the child needs, built before the fork.
struct Prepared {
    scratch: CString,
    tmpfs_options: CString,
    upper: CString,
    work: CString,
    merged: CString,
    overlay_options: CString,
    proc_dir: CString,
    dev_dir: CString,
    dev_nodes: Vec<(CString, libc::mode_t, libc::dev_t)>,
    dev_shm: CString,
    dev_pts: CString,
    ptmx: CString,
    ptmx_target: CString,
    old_root: CString,
    old_root_in_new: CString,
    cwd: CString,
    hostname: CString,
    max_open_files: u64,
    names: [CString; 6],
    cgroup_procs: Vec<CString>,
    seccomp: Vec<seccompiler::BpfProgram>,
}

impl Prepared {
    fn new(spec: &SandboxSpec, group: &Group) -> io::Result<Self> {
        let join = |rel: &str| path_cstring(&spec.scratch.join(rel));
        let lower = spec.lower.as_os_str().as_bytes();
        if lower.contains(&b',') || lower.contains(&b':') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the image path may not hold ',' or ':' (overlayfs options)",
            ));
        }
        let merged = spec.scratch.join("merged");
        let dev = |name: &str, major: u32, minor: u32| -> io::Result<_> {
            Ok((
                path_cstring(&merged.join("dev").join(name))?,
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            ))
        };
        Ok(Self {
            scratch: path_cstring(&spec.scratch)?,
            tmpfs_options: cstring(format!(
                "size={},mode=0755",
                spec.writable_bytes.max(1 << 20)
            ))?,
            upper: join("upper")?,
            work: join("work")?,
            merged: join("merged")?,
            overlay_options: cstring(format!(
                "lowerdir={},upperdir={},workdir={}",
                spec.lower.display(),
                spec.scratch.join("upper").display(),
                spec.scratch.join("work").display()
            ))?,
            proc_dir: path_cstring(&merged.join("proc"))?,
            dev_dir: path_cstring(&merged.join("dev"))?,
            dev_nodes: vec![
                dev("null", 1, 3)?,
                dev("zero", 1, 5)?,
                dev("full", 1, 7)?,
                dev("random", 1, 8)?,
                dev("urandom", 1, 9)?,
                dev("tty", 5, 0)?,
            ],
            dev_shm: path_cstring(&merged.join("dev/shm"))?,
            dev_pts: path_cstring(&merged.join("dev/pts"))?,
            ptmx: path_cstring(&merged.join("dev/ptmx"))?,
            ptmx_target: cstring("pts/ptmx")?,
            old_root: path_cstring(&merged.join(".lode-old-root"))?,
            old_root_in_new: cstring("/.lode-old-root")?,
            cwd: cstring(&spec.cwd)?,
            hostname: cstring(&spec.hostname)?,
            max_open_files: spec.max_open_files,
            names: [
                cstring("tmpfs")?,
                cstring("overlay")?,
                cstring("proc")?,
                cstring("devpts")?,
                cstring("newinstance,ptmxmode=0666,mode=0620")?,
                cstring("lo")?,
            ],
            cgroup_procs: group
                .procs_files()
                .iter()
                .map(|p| path_cstring(p))
                .collect::<io::Result<_>>()?,
            seccomp: crate::seccomp::compile()?,
        })
    }
}

/// Turns a -1 return into the errno, as `io::Error`.
fn check(result: libc::c_int) -> io::Result<()> {
    if result == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn mount(
    source: &CString,
    target: &CString,
    fstype: Option<&CString>,
    flags: libc::c_ulong,
    data: Option<&CString>,
) -> io::Result<()> {
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null where
    // mount(2) allows it.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    })
}

fn mkdir(path: &CString, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: a NUL-terminated path that outlives the call.
    match check(unsafe { libc::mkdir(path.as_ptr(), mode) }) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// Moves this process into the container's cgroups, before it forks anything.
fn join_cgroups(prepared: &Prepared) -> io::Result<()> {
    for procs in &prepared.cgroup_procs {
        // SAFETY: open/write/close on a NUL-terminated path and a static buffer.
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd == -1 {
                return Err(io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let error = io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(error);
            }
        }
    }
    Ok(())
}

/// Runs in the forked child, before exec: no allocation from here on.
fn enter(prepared: &Prepared) -> io::Result<()> {
    join_cgroups(prepared)?;
    let flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWCGROUP
        | libc::CLONE_NEWPID;
    // SAFETY: unshare(2) takes flags only.
    check(unsafe { libc::unshare(flags) })?;
    // SAFETY: fork(2) in a single-threaded child (the one std forked); both sides only make
    // async-signal-safe calls until exec or _exit.
    let pid = unsafe { libc::fork() };
    if pid == -1 {
        return Err(io::Error::last_os_error());
    }
    if pid > 0 {
        wait_and_exit(pid);
    }
    build_root(prepared)?;
    lock_down(prepared)
}

/// The middle process: closes what std left open (its error pipe must reach EOF once the
/// grandchild execs), waits, and exits with the container's status.
fn wait_and_exit(pid: libc::pid_t) -> ! {
    // SAFETY: close_range(2) on this process's own descriptors above stderr.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    let mut status = 0;
    loop {
        // SAFETY: waitpid(2) on our own child with a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid || (r == -1 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)) {
            break;
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    };
    // SAFETY: _exit(2) ends this process without running Rust destructors, as after a fork.
    unsafe { libc::_exit(code) }
}

fn build_root(p: &Prepared) -> io::Result<()> {
    let root = c"/";
    let none = c"none";
    // Nothing mounted from here on propagates back to the host.
    // SAFETY: static NUL-terminated strings; null fstype and data are allowed here.
    check(unsafe {
        libc::mount(
            none.as_ptr(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
    let [tmpfs, overlay, proc_fs, devpts, devpts_options, _] = &p.names;
    mount(
        tmpfs,
        &p.scratch,
        Some(tmpfs),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&p.tmpfs_options),
    )?;
    mkdir(&p.upper, 0o755)?;
    mkdir(&p.work, 0o755)?;
    mkdir(&p.merged, 0o755)?;
    mount(
        overlay,
        &p.merged,
        Some(overlay),
        0,
        Some(&p.overlay_options),
    )?;
    mkdir(&p.proc_dir, 0o555)?;
    mount(
        proc_fs,
        &p.proc_dir,
        Some(proc_fs),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    mkdir(&p.dev_dir, 0o755)?;
    mount(
        tmpfs,
        &p.dev_dir,
        Some(tmpfs),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
    )?;
    for (path, mode, dev) in &p.dev_nodes {
        // SAFETY: a NUL-terminated path; mknod(2) takes plain integers otherwise.
        check(unsafe { libc::mknod(path.as_ptr(), *mode, *dev) })?;
    }
    mkdir(&p.dev_shm, 0o1777)?;
    mount(
        tmpfs,
        &p.dev_shm,
        Some(tmpfs),
        libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )?;
    mkdir(&p.dev_pts, 0o755)?;
    mount(
        devpts,
        &p.dev_pts,
        Some(devpts),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(devpts_options),
    )?;
    // SAFETY: NUL-terminated strings that outlive the call.
    check(unsafe { libc::symlink(p.ptmx_target.as_ptr(), p.ptmx.as_ptr()) })?;
    mkdir(&p.old_root, 0o700)?;
    // SAFETY: pivot_root(2) with NUL-terminated paths; the new root is a mount point.
    check(unsafe {
        libc::syscall(libc::SYS_pivot_root, p.merged.as_ptr(), p.old_root.as_ptr()) as libc::c_int
    })?;
    // SAFETY: a NUL-terminated path.
    check(unsafe { libc::chdir(root.as_ptr()) })?;
    // SAFETY: a NUL-terminated path; the old root is detached with everything under it.
    check(unsafe { libc::umount2(p.old_root_in_new.as_ptr(), libc::MNT_DETACH) })?;
    // SAFETY: a NUL-terminated path.
    check(unsafe { libc::rmdir(p.old_root_in_new.as_ptr()) })?;
    // SAFETY: a NUL-terminated path.
    check(unsafe { libc::chdir(p.cwd.as_ptr()) })?;
    // SAFETY: a buffer and its length.
    check(unsafe { libc::sethostname(p.hostname.as_ptr(), p.hostname.as_bytes().len()) })?;
    loopback_up(&p.names[5])
}

/// The new network namespace starts with loopback down.
fn loopback_up(name: &CString) -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; all zeros is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    let result = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut request) == -1 {
            -1
        } else {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &request)
        }
    };
    let error = io::Error::last_os_error();
    // SAFETY: closing the descriptor we opened.
    unsafe { libc::close(fd) };
    if result == -1 { Err(error) } else { Ok(()) }
}

/// Limits, then no way back to privilege: every capability dropped and `no_new_privs`.
fn lock_down(p: &Prepared) -> io::Result<()> {
    let files = libc::rlimit {
        rlim_cur: p.max_open_files,
        rlim_max: p.max_open_files,
    };
    // SAFETY: a valid rlimit pointer.
    check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &files) })?;
    for capability in 0..=63 {
        // SAFETY: prctl(2) with integer arguments; EINVAL past the last capability is fine.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, capability, 0, 0, 0) };
    }
    // SAFETY: prctl(2) with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let empty = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset(2) with a v3 header and two data words, all ours.
    check(unsafe { libc::syscall(libc::SYS_capset, &header, empty.as_ptr()) as libc::c_int })?;
    // SAFETY: prctl(2) with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    // Last, so nothing above is filtered: from here on the profile applies.
    crate::seccomp::install(&p.seccomp)
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
    let name = spec
        .scratch
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "scratch needs a UTF-8 name"))?;
    std::fs::create_dir_all(&spec.scratch)?;
    let group = cgroups.create(name, &spec.limits)?;
    let prepared = match Prepared::new(spec, &group) {
        Ok(prepared) => prepared,
        Err(e) => {
            group.remove();
            return Err(e);
        }
    };
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
        command.pre_exec(move || enter(&prepared));
    }
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            group.remove();
            let _ = std::fs::remove_dir_all(&spec.scratch);
            return Err(e);
        }
    };
    Ok(Sandbox {
        child,
        scratch: spec.scratch.clone(),
        group,
        timeout: spec.timeout,
    })
}

/// The exit code a container's status stands for (128 + signal when it was killed).
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}
