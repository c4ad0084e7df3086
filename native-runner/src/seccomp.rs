//! The container seccomp profile, kept as data in `native-runner/seccomp/default.json`
//! (seccompiler's JSON format) and compiled to BPF before a container starts.
//!
//! It is a deny list over a default of allow: everything Docker's default profile refuses
//! on x86_64 is refused with EPERM (module loading, kexec, mount and namespace calls, ptrace,
//! bpf, perf, keyrings, io_uring, userfaultfd, clock setting, raw I/O, handle-based opens),
//! `clone` with any namespace flag, and `personality` beyond the usual domains. `clone3`
//! answers ENOSYS, because its flags sit behind a pointer seccomp cannot read; libc then
//! falls back to `clone`, which is checked.

use std::io;

use seccompiler::{BpfProgram, TargetArch};

/// The profile, as shipped.
pub const PROFILE: &str = include_str!("../seccomp/default.json");

/// Compiles [`PROFILE`] into the filters to install, in order.
pub fn compile() -> io::Result<Vec<BpfProgram>> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("no seccomp profile for this architecture: {e}"),
        )
    })?;
    let filters = seccompiler::compile_from_json(PROFILE.as_bytes(), arch)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("seccomp profile: {e}")))?;
    let mut ordered: Vec<_> = filters.into_iter().collect();
    ordered.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(ordered.into_iter().map(|(_, program)| program).collect())
}

/// Every syscall the profile refuses outright (no argument conditions), with the errno it
/// answers. Tests call each from inside a container.
pub fn refused() -> Vec<(String, i32)> {
    let profile: serde_json::Value = serde_json::from_str(PROFILE).expect("the profile is JSON");
    let mut out = Vec::new();
    for filter in profile.as_object().into_iter().flat_map(|o| o.values()) {
        let errno = filter["match_action"]["errno"].as_i64().unwrap_or(1) as i32;
        for rule in filter["filter"].as_array().into_iter().flatten() {
            if rule.get("args").is_none()
                && let Some(name) = rule["syscall"].as_str()
            {
                out.push((name.to_string(), errno));
            }
        }
    }
    out
}

/// Installs `programs` in this process. Needs `no_new_privs` (or CAP_SYS_ADMIN); makes no
/// allocation, so it can run between fork and exec.
pub fn install(programs: &[BpfProgram]) -> io::Result<()> {
    for program in programs {
        let fprog = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: prctl(2) with a sock_fprog that points at a live BPF program.
        let result = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const libc::sock_fprog,
            )
        };
        if result == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_compiles_and_covers_the_docker_denials() {
        assert_eq!(compile().unwrap().len(), 2);
        let refused: Vec<String> = refused().into_iter().map(|(name, _)| name).collect();
        for name in [
            "mount",
            "ptrace",
            "bpf",
            "kexec_load",
            "init_module",
            "keyctl",
            "unshare",
            "setns",
            "perf_event_open",
            "io_uring_setup",
            "userfaultfd",
            "clone3",
        ] {
            assert!(refused.iter().any(|r| r == name), "{name} is not refused");
        }
    }
}
