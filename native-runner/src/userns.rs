//! The user namespace containers run in, so a container's uid 0 is an unprivileged host uid.
//!
//! One namespace serves every container of a server, as Docker's `userns-remap` does: each
//! container still has its own mount, pid, net, ipc, uts and cgroup namespaces, so the shared
//! ids meet no file, process or socket of another container's. What they do share are the
//! kernel's per-user counts (inotify instances and watches, pipe buffer pages, POSIX message
//! queue bytes): one container can use up those for the others. A range per container would
//! separate them too; volumes, owned by one uid today, would then need idmapped mounts. Those namespaces are made, and the root is built,
//! while the child is still the host's root; only then does it join this namespace and become
//! its uid 0 (see [`crate::sandbox`]). The container's root therefore holds no capability
//! over its own mounts, hostname or network, only over files whose owners are mapped.
//! A checkpointable container ([`crate::sandbox::SandboxSpec::checkpointable`]) is the
//! exception: CRIU can only save and restore namespaces owned by the process's user
//! namespace, so it joins this namespace first and makes the others from inside it. Its
//! root's rights over them end when every capability is dropped (the bounding set too,
//! under `no_new_privs` and seccomp) before the command runs.
//!
//! The image's files (owned by uid 0 and friends on the shared FUSE mount) reach the
//! container through an idmapped clone of the lower layer, so they show as the container's
//! own. FUSE allows that from Linux 6.12, when the server asks for `FUSE_ALLOW_IDMAP`.
//! Volumes are not idmapped: a file the container writes there belongs to
//! [`CONTAINER_IDS`]`.host_base` on the host, and a setuid bit set inside cannot become a
//! setuid-root file on the host.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// Container ids `0..count` are host ids `host_base..host_base + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    /// The host uid and gid of the container's root.
    pub host_base: u32,
    /// How many ids are mapped: 65536 covers every id a Debian package uses.
    pub count: u32,
}

/// The range Lode maps: the start of the one systemd leaves to containers
/// (524288–1879048191), so it meets no login user.
pub const CONTAINER_IDS: IdMap = IdMap {
    host_base: 524_288,
    count: 65_536,
};

/// A user namespace, held open by its descriptor.
#[derive(Debug)]
pub struct UserNamespace {
    fd: OwnedFd,
    ids: IdMap,
}

impl UserNamespace {
    /// Makes a namespace with `ids` mapped for both uids and gids. A short-lived child
    /// unshares it (a multi-threaded process cannot) and waits while this process writes
    /// its maps and opens it; then the child exits and the descriptor keeps it alive.
    pub fn create(ids: IdMap) -> io::Result<Self> {
        let (ready_read, ready_write) = io::pipe()?;
        let (go_read, go_write) = io::pipe()?;
        let (ready_fd, go_fd) = (ready_write.as_raw_fd(), go_read.as_raw_fd());
        // SAFETY: fork(2) from a multi-threaded process: the child makes only
        // async-signal-safe calls (unshare, write, read, _exit) on descriptors made before
        // the fork, and allocates nothing.
        let pid = unsafe { libc::fork() };
        if pid == -1 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: as above; the child sends errno (0 on success) and waits for one byte.
            unsafe {
                let status = if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                    0u8
                } else {
                    *libc::__errno_location() as u8
                };
                libc::write(ready_fd, (&status as *const u8).cast(), 1);
                let mut byte = 0u8;
                libc::read(go_fd, (&mut byte as *mut u8).cast(), 1);
                libc::_exit(0);
            }
        }
        drop((ready_write, go_read));
        let made = Self::adopt(pid, ids, ready_read);
        // A byte, not EOF: the child holds a copy of the write end too.
        let _ = (&go_write).write(&[1]);
        drop(go_write);
        let mut status = 0;
        // SAFETY: waitpid(2) on the child forked above, with a valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        made
    }

    fn adopt(pid: libc::pid_t, ids: IdMap, mut ready: io::PipeReader) -> io::Result<Self> {
        use std::io::Read;
        let mut status = [0u8; 1];
        if ready.read(&mut status)? != 1 {
            return Err(io::Error::other("the user namespace helper exited early"));
        }
        if status[0] != 0 {
            return Err(io::Error::from_raw_os_error(i32::from(status[0])));
        }
        let line = format!("0 {} {}\n", ids.host_base, ids.count);
        for map in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{pid}/{map}"), &line)
                .map_err(|e| io::Error::new(e.kind(), format!("writing {map}: {e}")))?;
        }
        let fd = OwnedFd::from(File::open(format!("/proc/{pid}/ns/user"))?);
        Ok(Self { fd, ids })
    }

    /// The namespace's descriptor, for `setns(2)` and idmapped mounts.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The ids it maps.
    pub fn ids(&self) -> IdMap {
        self.ids
    }

    /// The namespace a container on `lower` runs in: `userns`, where the kernel lets the
    /// mount be idmapped. Otherwise the container would run as the host's uid 0 (held in only
    /// by its other namespaces, seccomp and no capabilities): refused, naming the kernel
    /// feature, unless the operator opted in with `allow_root`.
    pub fn for_lower(
        userns: Option<&Arc<UserNamespace>>,
        lower: &lode_fs::Mount,
        allow_root: bool,
    ) -> Result<Option<Arc<UserNamespace>>, String> {
        Self::choose(userns, lower.idmappable(), allow_root)
    }

    /// [`UserNamespace::for_lower`] with the mount's idmap support as a flag.
    pub fn choose(
        userns: Option<&Arc<UserNamespace>>,
        idmappable: bool,
        allow_root: bool,
    ) -> Result<Option<Arc<UserNamespace>>, String> {
        let why = match (userns, idmappable) {
            (Some(userns), true) => return Ok(Some(userns.clone())),
            _ if allow_root => return Ok(None),
            (None, _) => "this server could not make a user namespace for containers",
            (Some(_), false) => {
                "this kernel cannot idmap the image's FUSE mount (idmapped FUSE mounts need \
                 Linux 6.12 or later, whose FUSE_ALLOW_IDMAP Lode asks for)"
            }
        };
        Err(format!(
            "{why}, so the container would run as the host's uid 0; upgrade the kernel, or start \
             lode serve with --allow-root-containers to accept that for trusted code"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_run_as_host_root_only_when_the_operator_says_so() {
        let userns = Arc::new(UserNamespace::create(CONTAINER_IDS).unwrap());
        assert!(
            UserNamespace::choose(Some(&userns), true, false)
                .unwrap()
                .is_some()
        );
        let err = UserNamespace::choose(Some(&userns), false, false).unwrap_err();
        assert!(
            err.contains("Linux 6.12") && err.contains("--allow-root-containers"),
            "{err}"
        );
        let err = UserNamespace::choose(None, true, false).unwrap_err();
        assert!(err.contains("user namespace"), "{err}");
        assert!(
            UserNamespace::choose(Some(&userns), false, true)
                .unwrap()
                .is_none()
        );
    }
}
