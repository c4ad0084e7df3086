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
}

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

/// A bind mount from the host into the container.
///
/// The host side is opened once, when the volume is made, and the container's mount is
/// cloned from that descriptor: the name is never resolved again, so a symlink swapped in
/// after a check cannot aim the mount elsewhere.
#[derive(Debug, Clone)]
pub struct Volume {
    /// The host directory or file, as named (for messages).
    pub source: PathBuf,
    /// The host side, opened `O_PATH`.
    opened: Arc<OwnedFd>,
    /// Where it appears in the container (absolute); made if missing.
    pub target: String,
    /// Whether the container may only read it.
    pub read_only: bool,
}

impl Volume {
    /// A volume of `source`, a path Lode itself chose (the SDK, an app's code, a named
    /// volume's directory), opened now.
    pub fn open(
        source: impl Into<PathBuf>,
        target: impl Into<String>,
        read_only: bool,
    ) -> io::Result<Self> {
        let source = source.into();
        let file = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&source)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("volume source {}: {e}", source.display()))
            })?;
        Ok(Self {
            source,
            opened: Arc::new(file.into()),
            target: target.into(),
            read_only,
        })
    }

    /// A volume of `relative` below `root` (an operator's `--allow-volume` directory),
    /// resolved by the kernel without leaving `root` and without following any symlink
    /// (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`).
    pub fn beneath(
        root: &Path,
        relative: &Path,
        target: impl Into<String>,
        read_only: bool,
    ) -> io::Result<Self> {
        let source = root.join(relative);
        // A symlink on the way, or a path that leaves the root, is refused as PermissionDenied.
        let describe = |e: io::Error| {
            let (kind, why) = match e.raw_os_error() {
                Some(libc::ELOOP) => (
                    io::ErrorKind::PermissionDenied,
                    "it passes through a symlink; name the real path".into(),
                ),
                Some(libc::EXDEV) => (
                    io::ErrorKind::PermissionDenied,
                    format!("it leads outside {}", root.display()),
                ),
                _ => (e.kind(), e.to_string()),
            };
            io::Error::new(kind, format!("volume source {}: {why}", source.display()))
        };
        let root_dir = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(root)
            .map_err(describe)?;
        let relative = if relative.as_os_str().is_empty() {
            Path::new(".")
        } else {
            relative
        };
        use rustix::fs::{Mode, OFlags, ResolveFlags};
        let opened = rustix::fs::openat2(
            &root_dir,
            relative,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| describe(e.into()))?;
        Ok(Self {
            source,
            opened: Arc::new(opened),
            target: target.into(),
            read_only,
        })
    }

    /// The host side's metadata, read through its descriptor.
    pub fn metadata(&self) -> io::Result<std::fs::Metadata> {
        std::fs::File::from(self.opened.try_clone()?).metadata()
    }

    /// Whether the host side is a directory (else a file is mounted over a file).
    pub fn is_dir(&self) -> io::Result<bool> {
        Ok(self.metadata()?.is_dir())
    }
}

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

/// The DNS forwarder `slirp4netns` answers on inside the container.
const SLIRP_DNS: &str = "10.0.2.3";

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
}

/// A volume, ready for the child: a detached copy of the host side's mount tree (cloned here
/// through the descriptor opened when the volume was made, never its name), and the target
/// with each of its parent directories so they can be made one by one.
struct PreparedVolume {
    index: u8,
    tree: OwnedFd,
    target_dirs: Vec<CString>,
    target: CString,
    is_dir: bool,
}

impl PreparedVolume {
    fn new(index: u8, volume: &Volume) -> io::Result<Self> {
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        let target = Path::new(&volume.target);
        if !target.is_absolute()
            || target
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(invalid(format!(
                "volume target {:?} must be an absolute path without `..`",
                volume.target
            )));
        }
        if target == Path::new("/") {
            return Err(invalid("a volume cannot be mounted over /".into()));
        }
        let is_dir = volume.is_dir().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("volume source {}: {e}", volume.source.display()),
            )
        })?;
        let mut target_dirs = Vec::new();
        let mut prefix = PathBuf::from("/");
        let parts: Vec<_> = target.components().skip(1).collect();
        for part in &parts[..parts.len() - 1] {
            prefix.push(part);
            target_dirs.push(path_cstring(&prefix)?);
        }
        Ok(Self {
            index,
            tree: clone_tree(volume).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cloning volume source {}: {e}", volume.source.display()),
                )
            })?,
            target_dirs,
            target: path_cstring(target)?,
            is_dir,
        })
    }
}

impl Prepared {
    fn new(
        spec: &SandboxSpec,
        group: &Group,
        netns: Option<OwnedFd>,
        stage_report: OwnedFd,
    ) -> io::Result<Self> {
        let join = |rel: &str| path_cstring(&spec.scratch.join(rel));
        let layer = spec.keep_upper.as_deref().unwrap_or(&spec.scratch);
        let lower = spec.lower.as_os_str().as_bytes();
        if lower.contains(&b',') || lower.contains(&b':') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the image path may not hold ',' or ':' (overlayfs options)",
            ));
        }
        let merged = spec.scratch.join("merged");
        let idmapped_lower = spec.scratch.join("lower");
        let lowerdir = match spec.user_namespace {
            Some(_) => &idmapped_lower,
            None => &spec.lower,
        };
        Ok(Self {
            scratch: path_cstring(&spec.scratch)?,
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
            // The same nodes the cgroup's device allow-list lets it open.
            dev_nodes: CONTAINER_NODES
                .iter()
                .map(|node| {
                    Ok((
                        path_cstring(&merged.join("dev").join(node.name))?,
                        libc::S_IFCHR | 0o666,
                        libc::makedev(node.major, node.minor),
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
        })
    }
}

/// The step of the child's set-up that failed, sent to the parent as one byte.
#[derive(Debug, Clone, Copy)]
enum Stage {
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
}

impl Stage {
    fn code(self) -> u8 {
        match self {
            Self::Cgroups => 1,
            Self::Namespaces => 2,
            Self::Network => 3,
            Self::Root => 4,
            Self::LockDown => 5,
            Self::User => 6,
            Self::Session => 7,
            Self::Volume(i) => 64 + i,
        }
    }

    /// What failed, in words, for the byte the child sent.
    fn describe(code: u8, spec: &SandboxSpec) -> String {
        match code {
            1 => "joining the container's cgroups".into(),
            2 => "creating the container's namespaces".into(),
            3 => "setting up the container's network".into(),
            4 => "building the container's root filesystem".into(),
            5 => "dropping privileges".into(),
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
fn stage<T>(p: &Prepared, step: Stage, result: io::Result<T>) -> io::Result<T> {
    if result.is_err() {
        let code = [step.code()];
        // SAFETY: writing one byte from our buffer to the pipe we hold.
        unsafe { libc::write(p.stage_report.as_raw_fd(), code.as_ptr().cast(), 1) };
    }
    result
}

/// This process's hard limit on open files: a container cannot be given more, since raising
/// it takes `CAP_SYS_RESOURCE`, which the host may not have.
fn open_files_hard_limit() -> u64 {
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
    stage(prepared, Stage::LockDown, lock_down(prepared))
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

/// The root, `/proc` and `/dev`, before the pivot.
fn build_overlay(p: &Prepared) -> io::Result<()> {
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

fn build_overlay_mounts(
    p: &Prepared,
    root: &std::ffi::CStr,
    none: &std::ffi::CStr,
) -> io::Result<()> {
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
        Some(&p.dev_options),
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
const PROC_READ_ONLY: [&str; 5] = ["sys", "sysrq-trigger", "irq", "bus", "fs"];

/// `/proc` files that leak host memory or kernel state (Docker's masked paths, plus
/// `kallsyms`); `/dev/null` is mounted over them.
const PROC_MASKED: [&str; 7] = [
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
const PROC_MASKED_DIRS: [&str; 3] = ["acpi", "asound", "scsi"];

/// Applies [`PROC_READ_ONLY`], [`PROC_MASKED`] and [`PROC_MASKED_DIRS`], as runc does.
/// Entries this kernel lacks are skipped.
fn harden_proc(p: &Prepared) -> io::Result<()> {
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

fn build_root(p: &Prepared) -> io::Result<()> {
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
    stage(p, Stage::Root, finish_root(p))?;
    if let Some(userns) = &p.user_namespace {
        stage(p, Stage::User, become_container_root(userns))?;
    }
    Ok(())
}

/// Clones the image's root as a detached mount whose owners are seen through the user
/// namespace (host uid 0 shows as the namespace's 0, which is `host_base` on the host), and
/// attaches it read-only as the overlay's lower layer.
fn attach_idmapped_lower(p: &Prepared, userns: &UserNamespace) -> io::Result<()> {
    // SAFETY: open_tree(2) with a NUL-terminated path and flags.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            p.lower_source.as_ptr(),
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
    // mount_attr and its size; then move_mount(2) from it to a NUL-terminated path.
    let attached = unsafe {
        check(libc::syscall(
            libc::SYS_mount_setattr,
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr,
            std::mem::size_of::<libc::mount_attr>(),
        ) as libc::c_int)
        .and_then(|()| mkdir(&p.idmapped_lower, 0o755))
        .and_then(|()| {
            check(libc::syscall(
                libc::SYS_move_mount,
                fd,
                c"".as_ptr(),
                libc::AT_FDCWD,
                p.idmapped_lower.as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH,
            ) as libc::c_int)
        })
    };
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    attached
}

/// Joins the user namespace and takes its uid and gid 0. Everything the container needed
/// the host's root for is done by now, and its namespaces stay owned by the host's: from
/// here the process holds capabilities only over what the namespace maps.
fn become_container_root(userns: &UserNamespace) -> io::Result<()> {
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
fn pivot(p: &Prepared) -> io::Result<()> {
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
fn finish_root(p: &Prepared) -> io::Result<()> {
    // SAFETY: a NUL-terminated path.
    check(unsafe { libc::chdir(p.cwd.as_ptr()) })?;
    // SAFETY: a buffer and its length.
    check(unsafe { libc::sethostname(p.hostname.as_ptr(), p.hostname.as_bytes().len()) })?;
    loopback_up(&p.names[5])
}

/// Volumes per container; the child keeps their descriptors in a fixed array.
pub const MAX_VOLUMES: usize = 32;

/// A detached, recursive copy of a volume's host mount (through the descriptor opened when
/// the volume was made, never its name), with its flags set. Made in the server's mount
/// namespace, the only one a descriptor from there can be cloned in; the child attaches it.
fn clone_tree(volume: &Volume) -> io::Result<OwnedFd> {
    // SAFETY: open_tree(2) on a descriptor we hold, with an empty path and flags.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            volume.opened.as_raw_fd(),
            c"".as_ptr(),
            libc::OPEN_TREE_CLONE
                | libc::OPEN_TREE_CLOEXEC
                | libc::AT_EMPTY_PATH as libc::c_uint
                | libc::AT_RECURSIVE as libc::c_uint,
        )
    } as libc::c_int;
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut attr_set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    if volume.read_only {
        attr_set |= libc::MOUNT_ATTR_RDONLY;
    }
    // SAFETY: mount_attr is plain data; all zeros is a valid value.
    let mut attr: libc::mount_attr = unsafe { std::mem::zeroed() };
    attr.attr_set = attr_set;
    // SAFETY: mount_setattr(2) on the descriptor just made, with an empty path, a valid
    // mount_attr and its size.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    } as libc::c_int)?;
    Ok(tree)
}

/// Makes the volume's target inside the new root and attaches the cloned tree there. What
/// it makes belongs to `owner` (the container's root, in a user namespace), as if the
/// container had made it.
fn attach_volume(volume: &PreparedVolume, owner: Option<u32>) -> io::Result<()> {
    let made = |path: &CString| -> io::Result<()> {
        if let Some(uid) = owner {
            // SAFETY: a NUL-terminated path and plain integers.
            check(unsafe { libc::lchown(path.as_ptr(), uid, uid) })?;
        }
        Ok(())
    };
    for dir in volume
        .target_dirs
        .iter()
        .chain(volume.is_dir.then_some(&volume.target))
    {
        // SAFETY: a NUL-terminated path that outlives the call.
        match check(unsafe { libc::mkdir(dir.as_ptr(), 0o755) }) {
            Ok(()) => made(dir)?,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
    }
    if !volume.is_dir {
        // SAFETY: open(2) on a NUL-terminated path; the descriptor is closed at once.
        let file = unsafe {
            // Read-only and non-blocking: a FIFO in the image at the target must not hang the
            // start, and an existing file must not be copied up for a write.
            libc::open(
                volume.target.as_ptr(),
                libc::O_RDONLY
                    | libc::O_CREAT
                    | libc::O_EXCL
                    | libc::O_NONBLOCK
                    | libc::O_NOCTTY
                    | libc::O_CLOEXEC,
                0o644,
            )
        };
        if file == -1 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EEXIST) {
                return Err(error);
            }
        } else {
            // SAFETY: closing the descriptor just opened.
            unsafe { libc::close(file) };
            made(&volume.target)?;
        }
    }
    // SAFETY: move_mount(2) from the detached tree's descriptor to a NUL-terminated path.
    // The descriptor closes at exec.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            volume.tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            volume.target.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    } as libc::c_int)
}

/// Points the container's resolver at the user-mode stack's DNS forwarder. It runs after the
/// pivot, so whatever `/etc/resolv.conf` is in the image resolves inside the container.
fn write_resolv_conf(p: &Prepared, text: &CString) -> io::Result<()> {
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

/// Limits, then no way back to privilege: every capability not asked for dropped (from the
/// bounding set too, so exec cannot give them back) and `no_new_privs`.
fn lock_down(p: &Prepared) -> io::Result<()> {
    let files = libc::rlimit {
        rlim_cur: p.max_open_files,
        rlim_max: p.max_open_files,
    };
    // SAFETY: a valid rlimit pointer.
    check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &files) })?;
    for capability in (0..=63).filter(|bit| p.capabilities & (1 << bit) == 0) {
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
    let word = |shift: u32| {
        let bits = (p.capabilities >> shift) as u32;
        Data {
            effective: bits,
            permitted: bits,
            inheritable: bits,
        }
    };
    let kept = [word(0), word(32)];
    // SAFETY: capset(2) with a v3 header and two data words, all ours.
    check(unsafe { libc::syscall(libc::SYS_capset, &header, kept.as_ptr()) as libc::c_int })?;
    // SAFETY: prctl(2) with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    // Last, so nothing above is filtered: from here on the profile applies.
    crate::seccomp::install(p.seccomp)
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
        command.pre_exec(move || enter(&prepared));
    }
    let spawned = command.spawn();
    // The parent's copy of the write end goes with the command, so this read ends.
    drop(command);
    let child = spawned.map_err(|e| {
        let mut code = [0u8; 1];
        match stage_read.read(&mut code) {
            Ok(1) => io::Error::new(e.kind(), format!("{}: {e}", Stage::describe(code[0], spec))),
            _ => e,
        }
    })?;
    let (group, slirp) = partial.disarm();
    Ok(Sandbox {
        child,
        scratch: spec.scratch.clone(),
        group,
        timeout: spec.timeout,
        slirp,
        finished: false,
    })
}

/// What a start has made so far; dropped before [`Partial::disarm`], it removes it all.
struct Partial {
    scratch: PathBuf,
    group: Option<Group>,
    slirp: Option<Slirp>,
}

impl Partial {
    /// The start succeeded: the sandbox owns the group and the network from here.
    fn disarm(mut self) -> (Group, Option<Slirp>) {
        let group = self.group.take().expect("made before the spawn");
        let slirp = self.slirp.take();
        self.scratch = PathBuf::new();
        (group, slirp)
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

/// A fresh network namespace, made on a short-lived thread so this process keeps its own.
fn new_net_namespace() -> io::Result<OwnedFd> {
    std::thread::spawn(|| {
        // SAFETY: unshare(2) with a flag; it changes only this thread's namespace.
        check(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
        Ok(OwnedFd::from(std::fs::File::open(
            "/proc/thread-self/ns/net",
        )?))
    })
    .join()
    .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

/// A `slirp4netns` process serving one container's network namespace. It exits when the
/// write end of its exit pipe closes, so it never outlives this process. It runs with its
/// grant's group, which the egress filter knows it by.
#[derive(Debug)]
struct Slirp {
    process: Child,
    exit: Option<io::PipeWriter>,
    /// Dropped only after the process is gone, so it is never unfiltered.
    grant: Option<crate::egress::Grant>,
}

/// How long `slirp4netns` may take to configure the namespace.
const SLIRP_READY: Duration = Duration::from_secs(5);

impl Slirp {
    fn start(netns: &OwnedFd, grant: crate::egress::Grant) -> io::Result<Self> {
        let (mut ready_read, ready_write) = io::pipe()?;
        let (exit_read, exit_write) = io::pipe()?;
        let netns_path = format!("/proc/{}/fd/{}", std::process::id(), netns.as_raw_fd());
        let (ready_fd, exit_fd) = (ready_write.as_raw_fd(), exit_read.as_raw_fd());
        let gid = grant.gid();
        let mut command = Command::new("slirp4netns");
        command
            .args([
                "--configure",
                "--mtu=65520",
                "--disable-host-loopback",
                "--enable-sandbox",
                "--enable-seccomp",
                "--netns-type=path",
                "--ready-fd=3",
                "--exit-fd=4",
                &netns_path,
                "tap0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: setgroups/setresgid with plain integers, then fcntl(2) and dup2(2) only, on
        // descriptors this process holds, between fork and exec. Both are first copied above
        // 10, so neither can be overwritten by the other on its way to 3 or 4, and dup2 then
        // always clears close-on-exec.
        unsafe {
            command.pre_exec(move || {
                // Its group marks every socket it opens for the egress filter; it stays uid 0
                // (with its capabilities) to join the container's namespace.
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setresgid(gid, gid, gid))?;
                let ready = libc::fcntl(ready_fd, libc::F_DUPFD_CLOEXEC, 10);
                let exit = libc::fcntl(exit_fd, libc::F_DUPFD_CLOEXEC, 10);
                check(ready)?;
                check(exit)?;
                check(libc::dup2(ready, 3))?;
                check(libc::dup2(exit, 4))
            });
        }
        let mut process = command.spawn().map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                io::Error::new(
                    e.kind(),
                    "--net outbound needs slirp4netns on the host: apt-get install slirp4netns",
                )
            } else {
                e
            }
        })?;
        drop((ready_write, exit_read));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            let _ = tx.send(ready_read.read(&mut byte).map(|n| n == 1));
        });
        let ready = rx.recv_timeout(SLIRP_READY);
        if !matches!(ready, Ok(Ok(true))) {
            let _ = process.kill();
            let _ = process.wait();
            let mut stderr = String::new();
            if let Some(mut pipe) = process.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            return Err(io::Error::other(format!(
                "slirp4netns did not set up the container's network within {SLIRP_READY:?}: {}",
                stderr.trim()
            )));
        }
        // It logs little after start-up, but a full pipe would stall it.
        if let Some(mut pipe) = process.stderr.take() {
            std::thread::spawn(move || io::copy(&mut pipe, &mut io::sink()));
        }
        Ok(Self {
            process,
            exit: Some(exit_write),
            grant: Some(grant),
        })
    }
}

impl Drop for Slirp {
    /// Stops the process, then takes its group out of the filter.
    fn drop(&mut self) {
        drop(self.exit.take());
        if !matches!(self.process.try_wait(), Ok(Some(_))) {
            let _ = self.process.kill();
        }
        let _ = self.process.wait();
        drop(self.grant.take());
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
