//! The container seccomp profile, kept as data in `native-runner/seccomp/default.json`
//! (seccompiler's JSON format) and compiled to BPF before a container starts.
//!
//! It is an allow-list with a default of EPERM, in Docker's shape: the calls Docker's default
//! profile allows unconditionally on amd64, less `name_to_handle_at` and `clock_adjtime`, plus
//! `chroot` (Docker allows it with `CAP_SYS_CHROOT`, which only build steps keep). Three
//! filters, applied together (the strictest answer wins):
//! 1. `1-allow`: the list. `clone` is allowed without namespace flags only, `personality`
//!    for the usual domains only. Before the list, any number with bit 30 set (the x32 ABI,
//!    whose numbers match no rule) is refused: [`X32_SYSCALL_BIT`].
//! 2. `2-socket-families`: `socket` outside AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK, and
//!    `socketpair` outside AF_UNIX, answer EAFNOSUPPORT (AF_VSOCK reaches hypervisor services
//!    past any network namespace; AF_TIPC makes pairs).
//! 3. `3-clone3`: ENOSYS, because its flags sit behind a pointer seccomp cannot read; libc
//!    then falls back to `clone`, which is checked.
//!
//! [`verdict`] runs the compiled filters in user space, as the kernel would, so tests can
//! check rules this kernel never exercises (it has x32 off).

use std::io;

use seccompiler::{BpfProgram, TargetArch, sock_filter};

/// The profile, as shipped.
pub const PROFILE: &str = include_str!("../seccomp/default.json");

/// Set in the syscall numbers of the x32 ABI.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// `AUDIT_ARCH_X86_64`, what the kernel reports for native 64-bit calls.
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;

// Classic BPF opcodes (linux/bpf_common.h) and seccomp return values (linux/seccomp.h).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGT_K: u16 = 0x25;
const BPF_JMP_JGE_K: u16 = 0x35;
const BPF_JMP_JSET_K: u16 = 0x45;
const BPF_RET_K: u16 = 0x06;
const BPF_ALU_AND_K: u16 = 0x54;
const SECCOMP_RET_ACTION_FULL: u32 = 0xFFFF_0000;
const SECCOMP_RET_DATA: u32 = 0x0000_FFFF;

/// The compiled profile, made once per process: every container installs the same filters.
pub fn compiled() -> io::Result<&'static [BpfProgram]> {
    static COMPILED: std::sync::OnceLock<Result<Vec<BpfProgram>, String>> =
        std::sync::OnceLock::new();
    match COMPILED.get_or_init(|| compile().map_err(|e| e.to_string())) {
        Ok(programs) => Ok(programs),
        Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e.clone())),
    }
}

/// Compiles [`PROFILE`] into the filters to install, in order.
pub fn compile() -> io::Result<Vec<BpfProgram>> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("no seccomp profile for this architecture: {e}"),
        )
    })?;
    if std::env::consts::ARCH != "x86_64" {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the container seccomp profile is written for x86_64",
        ));
    }
    let filters = seccompiler::compile_from_json(PROFILE.as_bytes(), arch)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("seccomp profile: {e}")))?;
    let mut ordered: Vec<_> = filters.into_iter().collect();
    ordered.sort_by(|a, b| a.0.cmp(&b.0));
    let mut programs: Vec<BpfProgram> = ordered.into_iter().map(|(_, program)| program).collect();
    if let Some(first) = programs.first_mut() {
        refuse_x32(first)?;
    }
    Ok(programs)
}

fn statement(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

/// Puts "a number with bit 30 set answers EPERM" right after the program's architecture check
/// (three instructions: load, compare, kill), before any rule. Every jump in the program is
/// relative and forward, so instructions before the rules move nothing they aim at.
fn refuse_x32(program: &mut BpfProgram) -> io::Result<()> {
    let arch_check = [
        statement(BPF_LD_W_ABS, 4),
        sock_filter {
            code: BPF_JMP_JEQ_K,
            jt: 1,
            jf: 0,
            k: AUDIT_ARCH_X86_64,
        },
    ];
    let starts_with_arch_check = program.len() > 3
        && program[..2]
            .iter()
            .zip(&arch_check)
            .all(|(a, b)| (a.code, a.jt, a.jf, a.k) == (b.code, b.jt, b.jf, b.k));
    if !starts_with_arch_check {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the compiled seccomp filter does not start with seccompiler's architecture check",
        ));
    }
    let x32 = [
        statement(BPF_LD_W_ABS, 0),
        sock_filter {
            code: BPF_JMP_JGE_K,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        statement(BPF_RET_K, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
    ];
    program.splice(3..3, x32);
    Ok(())
}

/// What the profile answers a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It runs.
    Allow,
    /// It fails with this errno without running.
    Errno(i32),
    /// The process is killed (a call from another architecture).
    Kill,
}

/// What `programs` answer the call `nr(args)` from a native x86_64 process, evaluated in user
/// space with the kernel's rule for several filters: the strictest action wins, and among
/// equal ones the filter installed last.
pub fn verdict(programs: &[BpfProgram], nr: u32, args: [u64; 6]) -> Verdict {
    verdict_for_arch(programs, AUDIT_ARCH_X86_64, nr, args)
}

/// [`verdict`] for a call that reports `arch` (`AUDIT_ARCH_I386` for `int 0x80`, say).
pub fn verdict_for_arch(programs: &[BpfProgram], arch: u32, nr: u32, args: [u64; 6]) -> Verdict {
    // struct seccomp_data: nr, arch, instruction_pointer, args[6], as 32-bit words.
    let mut data = [0u32; 16];
    data[0] = nr;
    data[1] = arch;
    for (i, arg) in args.iter().enumerate() {
        data[4 + 2 * i] = *arg as u32;
        data[5 + 2 * i] = (*arg >> 32) as u32;
    }
    // Precedence, strictest first: KILL_PROCESS, KILL_THREAD, TRAP, ERRNO, ..., ALLOW.
    let rank = |ret: u32| match ret & SECCOMP_RET_ACTION_FULL {
        libc::SECCOMP_RET_KILL_PROCESS => 0,
        libc::SECCOMP_RET_KILL_THREAD => 1,
        libc::SECCOMP_RET_TRAP => 2,
        libc::SECCOMP_RET_ERRNO => 3,
        libc::SECCOMP_RET_ALLOW => 9,
        _ => 4,
    };
    let ret = programs
        .iter()
        .map(|program| run(program, &data))
        .rev()
        .min_by_key(|ret| rank(*ret))
        .unwrap_or(libc::SECCOMP_RET_ALLOW);
    match ret & SECCOMP_RET_ACTION_FULL {
        libc::SECCOMP_RET_ALLOW => Verdict::Allow,
        libc::SECCOMP_RET_ERRNO => Verdict::Errno((ret & SECCOMP_RET_DATA) as i32),
        _ => Verdict::Kill,
    }
}

/// Runs one classic BPF program over `data`. Supports what seccompiler emits; anything else,
/// or a jump out of the program, kills, as the kernel's verifier would have refused it.
fn run(program: &[sock_filter], data: &[u32; 16]) -> u32 {
    let mut accumulator = 0u32;
    let mut pc = 0usize;
    while let Some(insn) = program.get(pc) {
        pc += 1;
        let jump = |taken: bool| usize::from(if taken { insn.jt } else { insn.jf });
        match insn.code {
            BPF_LD_W_ABS => match data.get(insn.k as usize / 4) {
                Some(word) if insn.k % 4 == 0 => accumulator = *word,
                _ => return libc::SECCOMP_RET_KILL_PROCESS,
            },
            BPF_ALU_AND_K => accumulator &= insn.k,
            BPF_JMP_JA => pc += insn.k as usize,
            BPF_JMP_JEQ_K => pc += jump(accumulator == insn.k),
            BPF_JMP_JGT_K => pc += jump(accumulator > insn.k),
            BPF_JMP_JGE_K => pc += jump(accumulator >= insn.k),
            BPF_JMP_JSET_K => pc += jump(accumulator & insn.k != 0),
            BPF_RET_K => return insn.k,
            _ => return libc::SECCOMP_RET_KILL_PROCESS,
        }
    }
    libc::SECCOMP_RET_KILL_PROCESS
}

/// Every syscall number up to `max` that the profile refuses outright when called with
/// all-zero arguments, with its errno. Tests call each from inside a container.
pub fn refused(programs: &[BpfProgram], max: u32) -> Vec<(u32, i32)> {
    (0..=max)
        .filter_map(|nr| match verdict(programs, nr, [0; 6]) {
            Verdict::Errno(errno) => Some((nr, errno)),
            _ => None,
        })
        .collect()
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

    fn nr(number: libc::c_long) -> u32 {
        number as u32
    }

    #[test]
    fn everyday_calls_run_and_the_escape_list_is_refused() {
        let programs = compile().unwrap();
        assert_eq!(programs.len(), 3);
        for allowed in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_openat,
            libc::SYS_mmap,
            libc::SYS_execve,
            libc::SYS_futex,
            libc::SYS_epoll_wait,
            libc::SYS_exit_group,
        ] {
            assert_eq!(verdict(&programs, nr(allowed), [0; 6]), Verdict::Allow);
        }
        for refused in [
            libc::SYS_mount,
            libc::SYS_ptrace,
            libc::SYS_bpf,
            libc::SYS_kexec_load,
            libc::SYS_init_module,
            libc::SYS_keyctl,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_perf_event_open,
            libc::SYS_io_uring_setup,
            libc::SYS_userfaultfd,
            libc::SYS_open_by_handle_at,
            libc::SYS_name_to_handle_at,
            libc::SYS_process_vm_writev,
            libc::SYS_sethostname,
        ] {
            assert_eq!(
                verdict(&programs, nr(refused), [0; 6]),
                Verdict::Errno(libc::EPERM),
                "syscall {refused}"
            );
        }
        // A number no kernel has yet (past the table) is refused by default.
        assert_eq!(
            verdict(&programs, 1000, [0; 6]),
            Verdict::Errno(libc::EPERM)
        );
        assert_eq!(
            verdict(&programs, nr(libc::SYS_clone3), [0; 6]),
            Verdict::Errno(libc::ENOSYS)
        );
    }

    #[test]
    fn x32_numbers_are_refused_before_any_rule() {
        // This kernel has x32 off, so the rule is checked on the compiled filter: an allowed
        // call and the x32 alias of it.
        let programs = compile().unwrap();
        let read = nr(libc::SYS_read);
        assert_eq!(verdict(&programs, read, [0; 6]), Verdict::Allow);
        for number in [
            read,
            nr(libc::SYS_socket),
            nr(libc::SYS_clone3),
            0x3fff_ffff,
        ] {
            assert_eq!(
                verdict(&programs, X32_SYSCALL_BIT | number, [0; 6]),
                Verdict::Errno(libc::EPERM),
                "x32 syscall {number}"
            );
        }
        // Its rule is the first thing after the architecture check, in the first filter.
        let first = &programs[0];
        assert_eq!(
            (first[4].code, first[4].k),
            (BPF_JMP_JGE_K, X32_SYSCALL_BIT)
        );
        // Another architecture (int 0x80) is killed outright.
        assert_eq!(
            verdict_for_arch(&programs, 0x4000_0003, read, [0; 6]),
            Verdict::Kill
        );
    }

    #[test]
    fn sockets_open_for_four_families_only() {
        let programs = compile().unwrap();
        let socket = nr(libc::SYS_socket);
        for family in [
            libc::AF_UNIX,
            libc::AF_INET,
            libc::AF_INET6,
            libc::AF_NETLINK,
        ] {
            let args = [family as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0];
            assert_eq!(verdict(&programs, socket, args), Verdict::Allow);
        }
        for family in [
            libc::AF_VSOCK,
            libc::AF_ALG,
            libc::AF_PACKET,
            libc::AF_BLUETOOTH,
            libc::AF_KEY,
            libc::AF_XDP,
        ] {
            let args = [family as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0];
            assert_eq!(
                verdict(&programs, socket, args),
                Verdict::Errno(libc::EAFNOSUPPORT),
                "family {family}"
            );
        }
        let pair = nr(libc::SYS_socketpair);
        let unix = [libc::AF_UNIX as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0];
        assert_eq!(verdict(&programs, pair, unix), Verdict::Allow);
        let tipc = [libc::AF_TIPC as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0];
        assert_eq!(
            verdict(&programs, pair, tipc),
            Verdict::Errno(libc::EAFNOSUPPORT)
        );
    }

    #[test]
    fn clone_makes_threads_but_no_namespaces() {
        let programs = compile().unwrap();
        let clone = nr(libc::SYS_clone);
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD) as u64;
        assert_eq!(
            verdict(&programs, clone, [thread, 0, 0, 0, 0, 0]),
            Verdict::Allow
        );
        for namespace in [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWCGROUP,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
        ] {
            let flags = libc::SIGCHLD as u64 | namespace as u64;
            assert_eq!(
                verdict(&programs, clone, [flags, 0, 0, 0, 0, 0]),
                Verdict::Errno(libc::EPERM),
                "flag {namespace:#x}"
            );
        }
        let personality = nr(libc::SYS_personality);
        assert_eq!(
            verdict(&programs, personality, [0xffff_ffff, 0, 0, 0, 0, 0]),
            Verdict::Allow
        );
        // READ_IMPLIES_EXEC and friends are not usual domains.
        assert_eq!(
            verdict(&programs, personality, [0x0040_0000, 0, 0, 0, 0, 0]),
            Verdict::Errno(libc::EPERM)
        );
    }

    #[test]
    fn refused_lists_what_a_container_may_probe() {
        let programs = compile().unwrap();
        let refused = refused(&programs, 470);
        assert!(refused.contains(&(nr(libc::SYS_mount), libc::EPERM)));
        assert!(refused.contains(&(nr(libc::SYS_clone3), libc::ENOSYS)));
        // socket(0, ...) has family 0, which is not allowed.
        assert!(refused.contains(&(nr(libc::SYS_socket), libc::EAFNOSUPPORT)));
        assert!(!refused.iter().any(|(n, _)| *n == nr(libc::SYS_read)));
    }
}
