//! What the child does between fork and exec, and everything it needs built before the fork
//! ([`Prepared`]). No allocation happens here. The set-up, in order, as [`enter`] and
//! [`build_root`] run it; each step's failure reaches the parent as its [`Stage`]:
//!
//! 1. `setsid`: a session of its own, away from the server's terminal (Session).
//! 2. Join the container's cgroups (Cgroups).
//! 3. Join its network namespace, or unshare a fresh one (Network).
//! 4. Unshare mount, UTS, IPC, cgroup and pid namespaces (Namespaces), then fork: the
//!    grandchild is pid 1, the middle process waits and passes its status on.
//! 5. Build the overlay root on the image, with its own `/proc` (masked), `/dev` and
//!    `/dev/shm`, and pivot into it (Root).
//! 6. Attach each volume, cloned before the fork, at its target inside (Volume).
//! 7. Write `/etc/resolv.conf` for outbound network (Network).
//! 8. The working directory, resolved inside the root and never through a magic link
//!    (Workdir); then the host name and loopback up (Root).
//! 9. Join the user namespace and become its root (User).
//! 10. Lock down: the open-files limit, capabilities, `no_new_privs`, and seccomp last
//!     (LockDown); std then execs the command.

use super::*;

mod checkpointable;
mod lock_down;
pub(super) use checkpointable::enter_checkpointable;
pub(super) use lock_down::{lock_down, restrict};

pub(super) fn cstring(text: impl AsRef<[u8]>) -> io::Result<CString> {
    CString::new(text.as_ref()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a path or option holds a NUL byte",
        )
    })
}

pub(super) fn path_cstring(path: &Path) -> io::Result<CString> {
    cstring(path.as_os_str().as_bytes())
}

/// Every string the child needs, built before the fork.
pub(super) struct Prepared {
    scratch: CString,
    tmpfs_options: CString,
    upper: CString,
    work: CString,
    merged: CString,
    overlay_options: CString,
    proc_dir: CString,
    /// `/proc` shows only processes this one could trace: a process still entering the
    /// container (a copy of the server, not dumpable until it execs) stays invisible.
    proc_options: CString,
    /// `/proc` entries remounted read-only, files hidden behind `/dev/null`, and directories
    /// hidden behind an empty read-only tmpfs.
    proc_read_only: Vec<CString>,
    proc_masked: Vec<CString>,
    proc_masked_dirs: Vec<CString>,
    masked_dir_options: CString,
    dev_options: CString,
    shm_options: CString,
    dev_null: CString,
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
    capabilities: u64,
    seccomp: &'static [seccompiler::BpfProgram],
    volumes: Vec<PreparedVolume>,
    /// The namespace to join, for [`Network::Outbound`]; `None` makes a fresh one.
    netns: Option<OwnedFd>,
    /// Where the child says which step failed, since `pre_exec` passes only an errno back.
    stage_report: OwnedFd,
    etc: CString,
    resolv_conf: CString,
    resolv_conf_text: Option<CString>,
    /// With a user namespace: the image's root, and where its idmapped clone is attached
    /// inside the scratch tmpfs to serve as the overlay's lower layer.
    user_namespace: Option<Arc<UserNamespace>>,
    lower_source: CString,
    idmapped_lower: CString,
    /// For a checkpointable container: the user namespace its namespaces are made in.
    pub(super) checkpointable: Option<Arc<UserNamespace>>,
    /// Its tmpfs mounts over the read-only image: where, and the options.
    writable_dirs: Vec<(CString, CString)>,
    /// Its `/dev` nodes: the host's, bind-mounted (no `mknod` inside a user namespace).
    dev_binds: Vec<(CString, CString)>,
    /// Its scratch directory, opened while this is the host's root: the child works from
    /// there with relative paths, since the container's uid cannot pass the private
    /// directories above it.
    scratch_dir: Option<OwnedFd>,
}

impl Prepared {
    pub(super) fn new(
        spec: &SandboxSpec,
        group: &Group,
        netns: Option<OwnedFd>,
        stage_report: OwnedFd,
    ) -> io::Result<Self> {
        // A checkpointable container is built from inside its scratch directory.
        let scratch_dir = if spec.checkpointable {
            let stage = spec.scratch.join("stage");
            std::fs::create_dir_all(&stage)?;
            let dir = std::fs::File::options()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                .open(&spec.scratch)?;
            Some(OwnedFd::from(dir))
        } else {
            None
        };
        let base = match scratch_dir {
            Some(_) => PathBuf::from("stage"),
            None => spec.scratch.clone(),
        };
        let join = |rel: &str| path_cstring(&base.join(rel));
        let layer = spec.keep_upper.as_deref().unwrap_or(&spec.scratch);
        let lower = spec.lower.as_os_str().as_bytes();
        if lower.contains(&b',') || lower.contains(&b':') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the image path may not hold ',' or ':' (overlayfs options)",
            ));
        }
        let merged = base.join("merged");
        let idmapped_lower = spec.scratch.join("lower");
        let lowerdir = match spec.user_namespace {
            Some(_) => &idmapped_lower,
            None => &spec.lower,
        };
        Ok(Self {
            scratch: path_cstring(&base)?,
            tmpfs_options: cstring(format!(
                "size={},mode=0755",
                spec.writable_bytes.max(1 << 20)
            ))?,
            upper: path_cstring(&layer.join("upper"))?,
            work: path_cstring(&layer.join("work"))?,
            merged: join("merged")?,
            overlay_options: cstring(format!(
                "lowerdir={},upperdir={},workdir={}{}",
                lowerdir.display(),
                layer.join("upper").display(),
                layer.join("work").display(),
                // A kept upper dir (a build step's) must hold whole files and plain
                // directories for the layer merge to read: no redirects, metacopy or index,
                // whatever the kernel's defaults. Function containers keep the defaults,
                // which mount measurably faster.
                if spec.keep_upper.is_some() {
                    ",redirect_dir=off,metacopy=off,index=off"
                } else {
                    ""
                }
            ))?,
            proc_dir: path_cstring(&merged.join("proc"))?,
            proc_options: cstring("hidepid=invisible")?,
            proc_read_only: PROC_READ_ONLY
                .iter()
                .map(|rel| path_cstring(&merged.join("proc").join(rel)))
                .collect::<io::Result<_>>()?,
            proc_masked: PROC_MASKED
                .iter()
                .map(|rel| path_cstring(&merged.join("proc").join(rel)))
                .collect::<io::Result<_>>()?,
            proc_masked_dirs: PROC_MASKED_DIRS
                .iter()
                .map(|rel| path_cstring(&merged.join("proc").join(rel)))
                .collect::<io::Result<_>>()?,
            masked_dir_options: cstring("size=4k,nr_inodes=1,mode=0555")?,
            // Device nodes take no space; the bound is for files a container might write.
            dev_options: cstring("size=64k,nr_inodes=1024")?,
            shm_options: cstring(format!("size={}", spec.shm_bytes.max(1 << 20)))?,
            dev_null: path_cstring(&merged.join("dev/null"))?,
            dev_dir: path_cstring(&merged.join("dev"))?,
            // The same nodes the cgroup's device allow-list lets it open: its own, then the
            // host devices it was given.
            dev_nodes: CONTAINER_NODES
                .iter()
                .map(|node| (node.name, node.major, node.minor))
                .chain(
                    spec.limits
                        .devices
                        .iter()
                        .map(|grant| (grant.name.as_str(), grant.major, grant.minor)),
                )
                .map(|(name, major, minor)| {
                    Ok((
                        path_cstring(&merged.join("dev").join(name))?,
                        libc::S_IFCHR | 0o666,
                        libc::makedev(major, minor),
                    ))
                })
                .collect::<io::Result<_>>()?,
            dev_shm: path_cstring(&merged.join("dev/shm"))?,
            dev_pts: path_cstring(&merged.join("dev/pts"))?,
            ptmx: path_cstring(&merged.join("dev/ptmx"))?,
            ptmx_target: cstring("pts/ptmx")?,
            old_root: path_cstring(&merged.join(".lode-old-root"))?,
            old_root_in_new: cstring("/.lode-old-root")?,
            cwd: cstring(&spec.cwd)?,
            hostname: cstring(&spec.hostname)?,
            max_open_files: spec.max_open_files.min(open_files_hard_limit()),
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
            capabilities: spec.capabilities,
            seccomp: crate::seccomp::compiled()?,
            volumes: spec
                .volumes
                .iter()
                .enumerate()
                .map(|(i, volume)| PreparedVolume::new(i as u8, volume))
                .collect::<io::Result<_>>()?,
            netns,
            stage_report,
            etc: cstring("/etc")?,
            resolv_conf: cstring("/etc/resolv.conf")?,
            resolv_conf_text: match spec.network {
                Network::None => None,
                Network::Outbound { .. } => Some(cstring(format!("nameserver {SLIRP_DNS}\n"))?),
            },
            user_namespace: spec.user_namespace.clone(),
            lower_source: path_cstring(&spec.lower)?,
            idmapped_lower: path_cstring(&idmapped_lower)?,
            checkpointable: spec
                .checkpointable
                .then(|| spec.user_namespace.clone())
                .flatten(),
            writable_dirs: CHECKPOINTABLE_WRITABLE
                .iter()
                .filter(|(dir, _)| spec.checkpointable && spec.lower.join(dir).is_dir())
                .map(|(dir, mode)| {
                    Ok((
                        path_cstring(&merged.join(dir))?,
                        cstring(format!(
                            "size={},mode={mode:o}",
                            spec.writable_bytes.max(1 << 20)
                        ))?,
                    ))
                })
                .collect::<io::Result<_>>()?,
            dev_binds: CONTAINER_NODES
                .iter()
                .filter(|_| spec.checkpointable)
                .map(|node| {
                    Ok((
                        path_cstring(&Path::new("/dev").join(node.name))?,
                        path_cstring(&merged.join("dev").join(node.name))?,
                    ))
                })
                .collect::<io::Result<_>>()?,
            scratch_dir,
        })
    }
}

/// The step of the child's set-up that failed, sent to the parent as one byte.
#[derive(Debug, Clone, Copy)]
pub(super) enum Stage {
    /// Leaving the server's session and terminal.
    Session,
    Cgroups,
    Namespaces,
    Network,
    Root,
    /// Joining the user namespace and becoming its root.
    User,
    /// Attaching it inside the container, after the pivot.
    Volume(u8),
    LockDown,
    /// Moving to the working directory.
    Workdir,
}

impl Stage {
    fn code(self) -> u8 {
        match self {
            Self::Cgroups => 1,
            Self::Namespaces => 2,
            Self::Network => 3,
            Self::Root => 4,
            Self::LockDown => 5,
            Self::Workdir => 8,
            Self::User => 6,
            Self::Session => 7,
            Self::Volume(i) => 64 + i,
        }
    }

    /// What failed, in words, for the byte the child sent.
    pub(super) fn describe(code: u8, spec: &SandboxSpec) -> String {
        match code {
            1 => "joining the container's cgroups".into(),
            2 => "creating the container's namespaces".into(),
            3 => "setting up the container's network".into(),
            4 => "building the container's root filesystem".into(),
            5 => "dropping privileges".into(),
            8 => "entering the working directory (a directory inside the container; a path \
                  through /proc/self/fd is refused)"
                .into(),
            6 => "entering the container's user namespace".into(),
            7 => "starting a session of the container's own".into(),
            64..128 => match spec.volumes.get(usize::from(code - 64)) {
                Some(v) => format!(
                    "mounting volume {} at {} (a missing parent, or an image symlink that leads \
                     nowhere inside the container?)",
                    v.source.display(),
                    v.target
                ),
                None => "mounting a volume".into(),
            },
            _ => "starting the container".into(),
        }
    }
}

/// Passes `result` through, telling the parent which step it was when it failed.
pub(super) fn stage<T>(p: &Prepared, step: Stage, result: io::Result<T>) -> io::Result<T> {
    report_stage(&p.stage_report, step, result)
}

/// [`stage`] for any child: `report` is the pipe the parent reads the failed step from.
pub(super) fn report_stage<T>(
    report: &OwnedFd,
    step: Stage,
    result: io::Result<T>,
) -> io::Result<T> {
    if result.is_err() {
        let code = [step.code()];
        // SAFETY: writing one byte from our buffer to the pipe we hold.
        unsafe { libc::write(report.as_raw_fd(), code.as_ptr().cast(), 1) };
    }
    result
}

/// This process's hard limit on open files: a container cannot be given more, since raising
/// it takes `CAP_SYS_RESOURCE`, which the host may not have.
pub(super) fn open_files_hard_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == -1 {
        return u64::MAX;
    }
    limit.rlim_max
}

/// Turns a -1 return into the errno, as `io::Error`.
pub(super) fn check(result: libc::c_int) -> io::Result<()> {
    if result == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub(super) fn mount(
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

pub(super) fn mkdir(path: &CString, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: a NUL-terminated path that outlives the call.
    match check(unsafe { libc::mkdir(path.as_ptr(), mode) }) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// Moves this process into the container's cgroups, before it forks anything.
pub(super) fn join_cgroups(prepared: &Prepared) -> io::Result<()> {
    join_cgroup_files(&prepared.cgroup_procs)
}

/// Moves this process into the cgroups whose `cgroup.procs` files are `procs_files`.
pub(super) fn join_cgroup_files(procs_files: &[CString]) -> io::Result<()> {
    for procs in procs_files {
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
pub(super) fn enter(prepared: &Prepared) -> io::Result<()> {
    // First, a session of its own: the server's controlling terminal (an operator's shell)
    // is then out of reach, so no `/dev/tty` to write to or push keystrokes into with
    // TIOCSTI.
    // SAFETY: setsid(2) takes no arguments; std's child is not a process group leader.
    stage(prepared, Stage::Session, check(unsafe { libc::setsid() }))?;
    stage(prepared, Stage::Cgroups, join_cgroups(prepared))?;
    let mut flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWCGROUP
        | libc::CLONE_NEWPID;
    match &prepared.netns {
        Some(netns) => {
            // SAFETY: setns(2) on a namespace descriptor we hold.
            let joined = check(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) });
            stage(prepared, Stage::Network, joined)?;
        }
        None => flags |= libc::CLONE_NEWNET,
    }
    // SAFETY: unshare(2) takes flags only.
    let unshared = check(unsafe { libc::unshare(flags) });
    stage(prepared, Stage::Namespaces, unshared)?;
    fork_waiting()?;
    build_root(prepared)?;
    stage(prepared, Stage::LockDown, lock_down(prepared))
}

/// Forks once more, so what follows runs as a child in the pid namespace just made or
/// joined; this process stays outside it as the waiter ([`wait_and_exit`]) and never
/// returns. Returns in the child.
pub(super) fn fork_waiting() -> io::Result<()> {
    // SAFETY: fork(2) in a single-threaded child (the one std forked); both sides only make
    // async-signal-safe calls until exec or _exit.
    let pid = unsafe { libc::fork() };
    if pid == -1 {
        return Err(io::Error::last_os_error());
    }
    if pid > 0 {
        wait_and_exit(pid);
    }
    Ok(())
}

/// A failed spawn's error, with the set-up step the child reported on `stage_read` named.
pub(super) fn named_failure(
    error: io::Error,
    stage_read: &mut io::PipeReader,
    spec: &SandboxSpec,
) -> io::Error {
    let mut code = [0u8; 1];
    match stage_read.read(&mut code) {
        Ok(1) => io::Error::new(
            error.kind(),
            format!("{}: {error}", Stage::describe(code[0], spec)),
        ),
        _ => error,
    }
}

/// The middle process: closes what std left open (its error pipe must reach EOF once the
/// grandchild execs), waits, and exits with the container's status.
pub(super) fn wait_and_exit(pid: libc::pid_t) -> ! {
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
    exit_as(status)
}

/// Exits as a child that ended with wait `status` did (128 + signal when killed).
pub(super) fn exit_as(status: libc::c_int) -> ! {
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

/// The root, `/proc` and `/dev`, before the pivot.
pub(super) fn build_overlay(p: &Prepared) -> io::Result<()> {
    let root = c"/";
    let none = c"none";
    // Device nodes and /dev/shm get exactly the modes asked for (0666, 1777); the command
    // starts with the usual 022.
    // SAFETY: umask(2) takes and returns plain integers.
    unsafe { libc::umask(0) };
    let built = build_overlay_mounts(p, root, none);
    // SAFETY: as above.
    unsafe { libc::umask(0o022) };
    built
}

/// Makes every mount private, so nothing mounted from here on propagates back to the host,
/// and puts the scratch tmpfs up.
fn private_scratch(p: &Prepared, root: &std::ffi::CStr, none: &std::ffi::CStr) -> io::Result<()> {
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
    let tmpfs = &p.names[0];
    mount(
        tmpfs,
        &p.scratch,
        Some(tmpfs),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&p.tmpfs_options),
    )
}

pub(super) fn build_overlay_mounts(
    p: &Prepared,
    root: &std::ffi::CStr,
    none: &std::ffi::CStr,
) -> io::Result<()> {
    private_scratch(p, root, none)?;
    let overlay = &p.names[1];
    mkdir(&p.upper, 0o755)?;
    mkdir(&p.work, 0o755)?;
    mkdir(&p.merged, 0o755)?;
    if let Some(userns) = &p.user_namespace {
        // The upper directory is the root the container sees: its root's, not the host's.
        let root = userns.ids().host_base;
        // SAFETY: a NUL-terminated path and plain integers.
        check(unsafe { libc::chown(p.upper.as_ptr(), root, root) })?;
        attach_idmapped_lower(p, userns)?;
    }
    // No device node and no setuid bit in the image or the writable layer means anything
    // here: a node in an image (a crafted index, an ingested tree) would reach the host's
    // device, since the cgroup's allow-list is the only other guard.
    mount(
        overlay,
        &p.merged,
        Some(overlay),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&p.overlay_options),
    )?;
    proc_and_dev(p)
}

/// `/proc` (hardened) and a minimal `/dev` inside the new root: its device nodes made, or in
/// a checkpointable container (no `mknod` inside a user namespace) the host's bound in.
fn proc_and_dev(p: &Prepared) -> io::Result<()> {
    let [tmpfs, _, proc_fs, devpts, devpts_options, _] = &p.names;
    mkdir(&p.proc_dir, 0o555)?;
    mount(
        proc_fs,
        &p.proc_dir,
        Some(proc_fs),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(&p.proc_options),
    )?;
    mkdir(&p.dev_dir, 0o755)?;
    mount(
        tmpfs,
        &p.dev_dir,
        Some(tmpfs),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(&p.dev_options),
    )?;
    if p.checkpointable.is_none() {
        for (path, mode, dev) in &p.dev_nodes {
            // SAFETY: a NUL-terminated path; mknod(2) takes plain integers otherwise.
            check(unsafe { libc::mknod(path.as_ptr(), *mode, *dev) })?;
        }
    }
    for (host, node) in &p.dev_binds {
        // SAFETY: open(2) of a NUL-terminated path, closed at once: the mount point.
        let fd = unsafe {
            libc::open(
                node.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                0o666,
            )
        };
        if fd == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: closing the descriptor just opened.
        unsafe { libc::close(fd) };
        mount(host, node, None, libc::MS_BIND, None)?;
    }
    mkdir(&p.dev_shm, 0o1777)?;
    mount(
        tmpfs,
        &p.dev_shm,
        Some(tmpfs),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&p.shm_options),
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
    harden_proc(p)
}

/// `/proc` entries a container's uid 0 could write to reach the host: sysctls (a
/// `core_pattern` pipe runs as root on the host), SysRq, IRQ affinity and the like. Writing
/// them checks the uid, not a capability, so they are remounted read-only.
pub(super) const PROC_READ_ONLY: [&str; 5] = ["sys", "sysrq-trigger", "irq", "bus", "fs"];

/// `/proc` files that leak host memory or kernel state (Docker's masked paths, plus
/// `kallsyms`); `/dev/null` is mounted over them.
pub(super) const PROC_MASKED: [&str; 7] = [
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "kallsyms",
];

/// `/proc` directories that show host hardware (Docker's masked paths); an empty read-only
/// tmpfs is mounted over them.
pub(super) const PROC_MASKED_DIRS: [&str; 3] = ["acpi", "asound", "scsi"];

/// Applies [`PROC_READ_ONLY`], [`PROC_MASKED`] and [`PROC_MASKED_DIRS`], as runc does.
/// Entries this kernel lacks are skipped.
pub(super) fn harden_proc(p: &Prepared) -> io::Result<()> {
    let missing = |e: &io::Error| e.raw_os_error() == Some(libc::ENOENT);
    for path in &p.proc_read_only {
        match mount(path, path, None, libc::MS_BIND | libc::MS_REC, None) {
            Err(e) if missing(&e) => continue,
            other => other?,
        }
        mount(
            path,
            path,
            None,
            libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC,
            None,
        )?;
    }
    for path in &p.proc_masked {
        match mount(&p.dev_null, path, None, libc::MS_BIND, None) {
            Err(e) if missing(&e) => {}
            other => other?,
        }
    }
    let tmpfs = &p.names[0];
    for path in &p.proc_masked_dirs {
        let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        match mount(tmpfs, path, Some(tmpfs), flags, Some(&p.masked_dir_options)) {
            Err(e) if missing(&e) => {}
            other => other?,
        }
    }
    Ok(())
}

pub(super) fn build_root(p: &Prepared) -> io::Result<()> {
    stage(p, Stage::Root, build_overlay(p))?;
    stage(p, Stage::Root, pivot(p))?;
    // Volumes were cloned before the fork; they are attached after the pivot, so their
    // targets resolve inside the container.
    for volume in &p.volumes {
        let owner = p.user_namespace.as_ref().map(|ns| ns.ids().host_base);
        stage(p, Stage::Volume(volume.index), attach_volume(volume, owner))?;
    }
    if let Some(text) = &p.resolv_conf_text {
        stage(p, Stage::Network, write_resolv_conf(p, text))?;
    }
    stage(p, Stage::Workdir, chdir_inside_root(&p.cwd))?;
    stage(p, Stage::Root, finish_root(p))?;
    if let Some(userns) = &p.user_namespace {
        stage(p, Stage::User, become_container_root(userns))?;
    }
    Ok(())
}

/// Clones the image's root as a detached mount whose owners are seen through the user
/// namespace (host uid 0 shows as the namespace's 0, which is `host_base` on the host), and
/// attaches it read-only as the overlay's lower layer.
pub(super) fn attach_idmapped_lower(p: &Prepared, userns: &UserNamespace) -> io::Result<()> {
    let tree = clone_idmapped(&p.lower_source, userns)?;
    match mkdir(&p.idmapped_lower, 0o755) {
        Ok(()) => move_detached(tree, &p.idmapped_lower),
        Err(e) => {
            // SAFETY: closing the descriptor clone_idmapped opened.
            unsafe { libc::close(tree) };
            Err(e)
        }
    }
}

/// A detached, read-only clone of the tree at `source` whose owners are seen through
/// `userns`. Making it takes the host's root, so it is made before joining the namespace.
pub(super) fn clone_idmapped(source: &CString, userns: &UserNamespace) -> io::Result<libc::c_int> {
    // SAFETY: open_tree(2) with a NUL-terminated path and flags.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            source.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
        )
    } as libc::c_int;
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: mount_attr is plain data; all zeros is a valid value.
    let mut attr: libc::mount_attr = unsafe { std::mem::zeroed() };
    attr.attr_set = libc::MOUNT_ATTR_IDMAP
        | libc::MOUNT_ATTR_RDONLY
        | libc::MOUNT_ATTR_NODEV
        | libc::MOUNT_ATTR_NOSUID;
    attr.userns_fd = userns.fd().as_raw_fd() as u64;
    // SAFETY: mount_setattr(2) on the descriptor just made, with an empty path, a valid
    // mount_attr and its size.
    let set = check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr,
            std::mem::size_of::<libc::mount_attr>(),
        ) as libc::c_int
    });
    if let Err(e) = set {
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    Ok(fd)
}

/// Attaches the detached tree `fd` at `target`, and closes `fd`.
pub(super) fn move_detached(fd: libc::c_int, target: &CString) -> io::Result<()> {
    // SAFETY: move_mount(2) from a detached tree's descriptor to a NUL-terminated path.
    let moved = check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd,
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        ) as libc::c_int
    });
    // SAFETY: closing the descriptor we were given.
    unsafe { libc::close(fd) };
    moved
}

/// Joins the user namespace and takes its uid and gid 0. Everything the container needed
/// the host's root for is done by now, and its namespaces stay owned by the host's: from
/// here the process holds capabilities only over what the namespace maps.
pub(super) fn become_container_root(userns: &UserNamespace) -> io::Result<()> {
    // SAFETY: setns(2) on a namespace descriptor we hold, from this single-threaded child;
    // then setgroups/setresgid/setresuid with plain integers and a null list.
    unsafe {
        check(libc::setns(userns.fd().as_raw_fd(), libc::CLONE_NEWUSER))?;
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setresgid(0, 0, 0))?;
        check(libc::setresuid(0, 0, 0))
    }
}

/// Swaps the new root in and detaches the host's.
pub(super) fn pivot(p: &Prepared) -> io::Result<()> {
    let root = c"/";
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
    check(unsafe { libc::rmdir(p.old_root_in_new.as_ptr()) })
}

/// Working directory, hostname and loopback, inside the new root.
pub(super) fn finish_root(p: &Prepared) -> io::Result<()> {
    // SAFETY: a buffer and its length.
    check(unsafe { libc::sethostname(p.hostname.as_ptr(), p.hostname.as_bytes().len()) })?;
    loopback_up(&p.names[5])
}

/// Changes to `cwd`, resolved inside this process's root and never through a magic link.
/// Until exec this process still holds the server's descriptors, so a path (or a symlink the
/// image or the sandbox planted) through `/proc/self/fd/N` would otherwise land on a host
/// directory (runc's CVE-2024-21626).
pub(super) fn chdir_inside_root(cwd: &CString) -> io::Result<()> {
    // SAFETY: open(2) of a NUL-terminated literal.
    let root = unsafe {
        libc::open(
            c"/".as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if root == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: an all-zero open_how is valid ("no flags"); the fields are then set.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2(2) with a descriptor we hold, a NUL-terminated path and a valid
    // open_how of the size passed.
    let dir = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root,
            cwd.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    } as libc::c_int;
    let error = io::Error::last_os_error();
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(root) };
    if dir == -1 {
        return Err(error);
    }
    // SAFETY: fchdir(2) then close(2) on the descriptor openat2 returned.
    let moved = check(unsafe { libc::fchdir(dir) });
    // SAFETY: as above.
    unsafe { libc::close(dir) };
    moved
}

/// Points the container's resolver at the user-mode stack's DNS forwarder. It runs after the
/// pivot, so whatever `/etc/resolv.conf` is in the image resolves inside the container.
pub(super) fn write_resolv_conf(p: &Prepared, text: &CString) -> io::Result<()> {
    mkdir(&p.etc, 0o755)?;
    // SAFETY: unlink(2) on a NUL-terminated path; a missing file is fine.
    unsafe { libc::unlink(p.resolv_conf.as_ptr()) };
    // SAFETY: open(2) on a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            p.resolv_conf.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    let bytes = text.as_bytes();
    // SAFETY: writing our own buffer to the descriptor just opened, then closing it.
    let written = unsafe {
        let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        libc::close(fd);
        n
    };
    if written != bytes.len() as isize {
        // No allocation after the fork: an errno, not a message.
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

/// The new network namespace starts with loopback down.
pub(super) fn loopback_up(name: &CString) -> io::Result<()> {
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
