//! The child's set-up for a checkpointable container ([`SandboxSpec::checkpointable`]): the
//! steps of [`enter`] in the order CRIU can save and restore, on a read-only image root.

use super::*;

/// [`enter`] for a checkpointable container: the image is cloned idmapped while this is still
/// the host's root; then the user namespace is joined first, so the namespaces made next are
/// its own (CRIU makes them again from inside it on restore). Capabilities, `no_new_privs`
/// and seccomp are set as for any container, so the rights its root holds over its own
/// namespaces are gone before the command runs.
pub(in crate::sandbox) fn enter_checkpointable(
    p: &Prepared,
    userns: &UserNamespace,
) -> io::Result<()> {
    // SAFETY: setsid(2) takes no arguments; std's child is not a process group leader.
    stage(p, Stage::Session, check(unsafe { libc::setsid() }))?;
    stage(p, Stage::Cgroups, join_cgroups(p))?;
    let image = stage(p, Stage::Root, clone_idmapped(&p.lower_source, userns))?;
    if let Some(dir) = &p.scratch_dir {
        // SAFETY: fchdir(2) on a descriptor we hold.
        let moved = check(unsafe { libc::fchdir(dir.as_raw_fd()) });
        stage(p, Stage::Root, moved)?;
    }
    stage(p, Stage::User, become_container_root(userns))?;
    let flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWCGROUP
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET;
    // SAFETY: unshare(2) takes flags only.
    let unshared = check(unsafe { libc::unshare(flags) });
    stage(p, Stage::Namespaces, unshared)?;
    fork_waiting()?;
    // CRIU dumps a tree whose session leader is inside its pid namespace: pid 1 leads.
    // SAFETY: as above; a fresh child is not a process group leader.
    stage(p, Stage::Session, check(unsafe { libc::setsid() }))?;
    stage(p, Stage::Root, build_checkpointable_root(p, image))?;
    stage(p, Stage::Root, reopen_null_stdio())?;
    for volume in &p.volumes {
        stage(p, Stage::Volume(volume.index), attach_volume(volume, None))?;
    }
    stage(p, Stage::Workdir, chdir_inside_root(&p.cwd))?;
    stage(p, Stage::Root, finish_root(p))?;
    stage(p, Stage::LockDown, lock_down(p))
}

/// The root of a checkpointable container: the idmapped image, read-only, with a tmpfs on
/// each writable directory, `/proc` and `/dev` as in [`build_overlay`] (the host's nodes
/// bound in), then the pivot.
pub(super) fn build_checkpointable_root(p: &Prepared, image: libc::c_int) -> io::Result<()> {
    // SAFETY: umask(2) takes and returns plain integers.
    unsafe { libc::umask(0) };
    let built = checkpointable_mounts(p, image);
    // SAFETY: as above.
    unsafe { libc::umask(0o022) };
    built?;
    // SAFETY: NUL-terminated paths; pivot_root(".", ".") stacks the old root under the new
    // one, and the lazy unmount then detaches it with everything under it.
    unsafe {
        check(libc::chdir(p.merged.as_ptr()))?;
        check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)?;
        check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
        check(libc::chdir(c"/".as_ptr()))
    }
}

/// Points stdio that is the host's `/dev/null` at the container's own: CRIU can only save a
/// file whose mount is in the container.
fn reopen_null_stdio() -> io::Result<()> {
    // SAFETY: open(2) of a NUL-terminated literal; fstat(2) and dup2(2) on descriptors this
    // process holds, into a stat buffer it owns; then close(2) of the one it opened.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null == -1 {
            return Err(io::Error::last_os_error());
        }
        let mut result = Ok(());
        for fd in 0..=2 {
            let mut stat: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut stat) == 0
                && stat.st_mode & libc::S_IFMT == libc::S_IFCHR
                && libc::dup2(null, fd) == -1
            {
                result = Err(io::Error::last_os_error());
            }
        }
        libc::close(null);
        result
    }
}

fn checkpointable_mounts(p: &Prepared, image: libc::c_int) -> io::Result<()> {
    let tmpfs = &p.names[0];
    let staged = private_scratch(p, c"/", c"none").and_then(|()| mkdir(&p.merged, 0o755));
    if let Err(e) = staged {
        // SAFETY: closing the descriptor clone_idmapped opened.
        unsafe { libc::close(image) };
        return Err(e);
    }
    move_detached(image, &p.merged)?;
    for (dir, options) in &p.writable_dirs {
        mount(
            tmpfs,
            dir,
            Some(tmpfs),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(options),
        )?;
    }
    proc_and_dev(p)
}
