//! Volumes: host directories or files opened once, cloned as detached mount trees before
//! the fork, and attached inside the container after its pivot.

use super::*;
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

/// A volume, ready for the child: a detached copy of the host side's mount tree (cloned here
/// through the descriptor opened when the volume was made, never its name), and the target
/// with each of its parent directories so they can be made one by one.
pub(super) struct PreparedVolume {
    pub(super) index: u8,
    tree: OwnedFd,
    target_dirs: Vec<CString>,
    target: CString,
    is_dir: bool,
}

impl PreparedVolume {
    pub(super) fn new(index: u8, volume: &Volume) -> io::Result<Self> {
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

/// Volumes per container; the child keeps their descriptors in a fixed array.
pub const MAX_VOLUMES: usize = 32;

/// A detached, recursive copy of a volume's host mount (through the descriptor opened when
/// the volume was made, never its name), with its flags set. Made in the server's mount
/// namespace, the only one a descriptor from there can be cloned in; the child attaches it.
pub(super) fn clone_tree(volume: &Volume) -> io::Result<OwnedFd> {
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
pub(super) fn attach_volume(volume: &PreparedVolume, owner: Option<u32>) -> io::Result<()> {
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
