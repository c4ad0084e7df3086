//! The kernel's side of mounts: unmounting (lazily when busy), the mounts under a directory
//! from `/proc/self/mountinfo`, stale FUSE mounts, their connections aborted, and the
//! read-ahead window a new mount gets.

use super::*;

/// Unmounts `path` if it is a mount, lazily when it is busy, and reports whether there was
/// one. A FUSE mount whose process died answers ENOTCONN; this is how it is cleared.
pub fn unmount(path: &Path) -> std::io::Result<bool> {
    use rustix::mount::{UnmountFlags, unmount as umount2};
    match umount2(path, UnmountFlags::empty()) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::INVAL) => Ok(false),
        Err(rustix::io::Errno::BUSY) => umount2(path, UnmountFlags::DETACH)
            .map(|()| true)
            .map_err(Into::into),
        Err(e) => Err(e.into()),
    }
}

/// The mount's read-ahead window. The kernel's default (128 KiB) makes sequential reads
/// arrive as 128 KiB requests, one at a time. A wider window arrives as 1 MiB requests (what
/// `max_pages` allows), several in flight, so the FUSE threads read chunk files in parallel.
pub(super) const READ_AHEAD_KB: &str = "8192";

/// Widens the mount's bdi read-ahead window to [`READ_AHEAD_KB`]. Best effort: without root
/// it stays as it is.
pub(super) fn widen_read_ahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let bdi = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    if let Err(error) = std::fs::write(&bdi, READ_AHEAD_KB) {
        tracing::debug!(%bdi, %error, "could not widen the read-ahead window");
    }
}

/// Aborts the FUSE connection of every mount under `root`, through the kernel's fusectl
/// files. A killed server's mounts can stay connected: a process it forked (a container
/// still setting up) holds a copy of the device descriptor, and requests then wait forever,
/// `statfs` included. The caller holds the cache dir's lock, so every mount there is a
/// leftover. Best effort: without fusectl the stale check below still clears most cases.
pub(super) fn abort_leftover_connections(root: &Path) {
    for mount in mounts_under(root) {
        if !(mount.fstype == "fuse" || mount.fstype.starts_with("fuse.")) {
            continue;
        }
        if let Some(minor) = mount.device.split(':').nth(1) {
            let abort = format!("/sys/fs/fuse/connections/{minor}/abort");
            match std::fs::write(&abort, b"1") {
                Ok(()) => {
                    tracing::warn!(mount = %mount.point.display(), "aborted a leftover FUSE connection")
                }
                Err(error) => tracing::debug!(%abort, %error, "could not abort a FUSE connection"),
            }
        }
    }
}

/// A mount in this process's mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub point: PathBuf,
    /// `major:minor` of its device.
    pub device: String,
    /// Its filesystem type, e.g. `fuse` or `proc`.
    pub fstype: String,
}

/// The mounts at or below `dir` (resolved first), from `/proc/self/mountinfo`, deepest first
/// so they can be unmounted in order. Empty when `dir` does not exist.
pub fn mounts_under(dir: &Path) -> Vec<MountEntry> {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return Vec::new();
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<MountEntry> = mountinfo
        .lines()
        .filter_map(|line| {
            // id parent major:minor root mountpoint options [optional...] - fstype source ...
            let fields: Vec<&str> = line.split(' ').collect();
            let separator = fields.iter().position(|f| *f == "-")?;
            Some(MountEntry {
                point: PathBuf::from(fields.get(4)?),
                device: fields.get(2)?.to_string(),
                fstype: fields.get(separator + 1)?.to_string(),
            })
        })
        .filter(|mount| mount.point.starts_with(&dir))
        .collect();
    mounts.sort_by_key(|mount| std::cmp::Reverse(mount.point.components().count()));
    mounts
}

/// Whether `path` is a FUSE mount whose server is gone. `statfs` always reaches the server
/// (attributes may be answered from the kernel's cache), so it is what notices.
pub fn is_stale_mount(path: &Path) -> bool {
    matches!(rustix::fs::statfs(path), Err(rustix::io::Errno::NOTCONN))
}
