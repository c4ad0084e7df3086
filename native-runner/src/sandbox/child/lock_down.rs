//! The last step before exec: limits, capabilities, `no_new_privs`, the host's descriptors
//! closed at exec, and the seccomp profile.

use super::*;

/// Limits, then no way back to privilege: every capability not asked for dropped (from the
/// bounding set too, so exec cannot give them back) and `no_new_privs`.
pub(in crate::sandbox) fn lock_down(p: &Prepared) -> io::Result<()> {
    restrict(p.max_open_files, p.capabilities, p.seccomp)
}

/// The open-files limit, then every capability but `capabilities` (the bounding set too),
/// `no_new_privs`, and the seccomp `programs` last.
pub(in crate::sandbox) fn restrict(
    max_open_files: u64,
    capabilities: u64,
    programs: &[seccompiler::BpfProgram],
) -> io::Result<()> {
    // Whatever the host process holds open without close-on-exec (a library's descriptor,
    // a parent's jobserver pipe) closes at exec, so it never reaches the command.
    // SAFETY: close_range(2) with plain integers, on this process's own descriptors.
    let marked = check(unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) as libc::c_int
    });
    if marked.is_err() {
        // Before Linux 5.11 (or under a filter that does not know close_range): one by one,
        // up to the open-files limit in force now.
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit(2) writes into the struct we own; fcntl(2) with F_SETFD on
        // descriptor numbers, which fails harmlessly on ones not open.
        unsafe {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            for fd in 3..limit.rlim_cur.min(1 << 20) as libc::c_int {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
    let files = libc::rlimit {
        rlim_cur: max_open_files,
        rlim_max: max_open_files,
    };
    // SAFETY: a valid rlimit pointer.
    check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &files) })?;
    for capability in (0..=63).filter(|bit| capabilities & (1 << bit) == 0) {
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
        let bits = (capabilities >> shift) as u32;
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
    crate::seccomp::install(programs)
}
