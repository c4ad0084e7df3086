//! The device allow-list: a container may open the nodes of its own `/dev` and nothing else,
//! whatever nodes an image or a volume holds.
//!
//! cgroup v1 writes it to `devices.deny` and `devices.allow`; v2 has no devices file, only a
//! `BPF_CGROUP_DEVICE` program attached to the group ([`attach_filter`]), which is what
//! runc and crun do too. Both answer the kernel's question "may this process use device
//! type:major:minor?"; with either, opening any other node fails with EPERM.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// Whether a node is a character or a block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A character device.
    Char,
    /// A block device.
    Block,
}

/// A device node the sandbox makes in each container's `/dev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceNode {
    /// Its name under `/dev`.
    pub name: &'static str,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

/// The nodes of a container's `/dev` (all character devices).
pub const CONTAINER_NODES: [DeviceNode; 6] = [
    DeviceNode {
        name: "null",
        major: 1,
        minor: 3,
    },
    DeviceNode {
        name: "zero",
        major: 1,
        minor: 5,
    },
    DeviceNode {
        name: "full",
        major: 1,
        minor: 7,
    },
    DeviceNode {
        name: "random",
        major: 1,
        minor: 8,
    },
    DeviceNode {
        name: "urandom",
        major: 1,
        minor: 9,
    },
    DeviceNode {
        name: "tty",
        major: 5,
        minor: 0,
    },
];

/// A host character device given to one container (a GPU's `/dev/nvidia0`, say): it appears
/// in the container's `/dev` under `name` and its allow-list lets it be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceGrant {
    /// Its name under `/dev` (`nvidia0`, `nvidia-uvm`).
    pub name: String,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl DeviceGrant {
    /// The host's character device at `path`, under its file name.
    pub fn of_host(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::metadata(path)?;
        if !meta.file_type().is_char_device() {
            return Err(io::Error::other(format!(
                "{} is not a character device",
                path.display()
            )));
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| io::Error::other(format!("{} has no usable name", path.display())))?;
        let rdev = meta.rdev();
        Ok(Self {
            name: name.to_string(),
            major: libc::major(rdev),
            minor: libc::minor(rdev),
        })
    }

    /// Its allow-list rule.
    pub fn rule(&self) -> DeviceRule {
        DeviceRule {
            kind: DeviceKind::Char,
            major: self.major,
            minor: Some(self.minor),
        }
    }
}

/// A device a container may read, write and make; the rest are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRule {
    /// Character or block.
    pub kind: DeviceKind,
    /// Major number.
    pub major: u32,
    /// Minor number; `None` is any.
    pub minor: Option<u32>,
}

impl DeviceRule {
    /// The rule as cgroup v1's `devices.allow` takes it, e.g. `c 1:3 rwm`.
    pub fn v1_line(&self) -> String {
        let kind = match self.kind {
            DeviceKind::Char => 'c',
            DeviceKind::Block => 'b',
        };
        match self.minor {
            Some(minor) => format!("{kind} {}:{minor} rwm", self.major),
            None => format!("{kind} {}:* rwm", self.major),
        }
    }
}

/// What a container may use: its `/dev` nodes, plus `/dev/ptmx` (5:2) and the pseudo-terminals
/// of its own devpts (136:*).
pub fn container_rules() -> Vec<DeviceRule> {
    let char_device = |major, minor| DeviceRule {
        kind: DeviceKind::Char,
        major,
        minor,
    };
    CONTAINER_NODES
        .iter()
        .map(|node| char_device(node.major, Some(node.minor)))
        .chain([char_device(5, Some(2)), char_device(136, None)])
        .collect()
}

// eBPF instruction fields (linux/bpf.h).
const BPF_LDX_MEM_W: u8 = 0x61;
const BPF_ALU64_MOV_X: u8 = 0xbf;
const BPF_ALU64_MOV_K: u8 = 0xb7;
const BPF_ALU64_AND_K: u8 = 0x57;
const BPF_ALU64_RSH_K: u8 = 0x77;
const BPF_JMP_JNE_K: u8 = 0x55;
const BPF_JMP_EXIT: u8 = 0x95;
/// `bpf_cgroup_dev_ctx.access_type`'s low half: `BPF_DEVCG_DEV_BLOCK` and `_CHAR`.
const DEVCG_DEV_BLOCK: i32 = 1;
const DEVCG_DEV_CHAR: i32 = 2;

/// One eBPF instruction, laid out as `struct bpf_insn` on a little-endian machine.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | u64::from(dst & 0xf) << 8
        | u64::from(src & 0xf) << 12
        | u64::from(off as u16) << 16
        | u64::from(imm as u32) << 32
}

/// A `BPF_PROG_TYPE_CGROUP_DEVICE` program that returns 1 (allow) for a device matching one of
/// `rules` and 0 (refuse) for every other.
pub fn filter_program(rules: &[DeviceRule]) -> Vec<u64> {
    // r1 is the context: struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }.
    let mut program = vec![
        insn(BPF_LDX_MEM_W, 2, 1, 0, 0),        // r2 = access_type
        insn(BPF_ALU64_MOV_X, 3, 2, 0, 0),      // r3 = r2
        insn(BPF_ALU64_AND_K, 3, 0, 0, 0xffff), // r3 = device type
        insn(BPF_ALU64_RSH_K, 2, 0, 0, 16),     // r2 = access
        insn(BPF_LDX_MEM_W, 4, 1, 4, 0),        // r4 = major
        insn(BPF_LDX_MEM_W, 5, 1, 8, 0),        // r5 = minor
    ];
    for rule in rules {
        let kind = match rule.kind {
            DeviceKind::Char => DEVCG_DEV_CHAR,
            DeviceKind::Block => DEVCG_DEV_BLOCK,
        };
        let mut checks = vec![(3u8, kind), (4, rule.major as i32)];
        if let Some(minor) = rule.minor {
            checks.push((5, minor as i32));
        }
        // Each failed check jumps past the rest of its checks and the two-instruction accept.
        let count = checks.len();
        for (i, (register, value)) in checks.into_iter().enumerate() {
            let skip = (count - 1 - i + 2) as i16;
            program.push(insn(BPF_JMP_JNE_K, register, 0, skip, value));
        }
        program.push(insn(BPF_ALU64_MOV_K, 0, 0, 0, 1));
        program.push(insn(BPF_JMP_EXIT, 0, 0, 0, 0));
    }
    program.push(insn(BPF_ALU64_MOV_K, 0, 0, 0, 0));
    program.push(insn(BPF_JMP_EXIT, 0, 0, 0, 0));
    program
}

/// Loads [`filter_program`] for `rules` and attaches it to the v2 cgroup at `dir`, beside
/// (`BPF_F_ALLOW_MULTI`) any program a group above attached the same way.
pub fn attach_filter(dir: &Path, rules: &[DeviceRule]) -> io::Result<()> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_ATTACH: libc::c_long = 8;
    const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
    const BPF_CGROUP_DEVICE: u32 = 6;
    const BPF_F_ALLOW_MULTI: u32 = 2;
    #[repr(C)]
    #[derive(Default)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    #[repr(C)]
    #[derive(Default)]
    struct ProgAttach {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
        replace_bpf_fd: u32,
    }
    let failed = |what: &str, e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("{what} the device filter for {}: {e}", dir.display()),
        )
    };
    let program = filter_program(rules);
    let license = c"Apache-2.0";
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"lode_device");
    let load = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..ProgLoad::default()
    };
    // SAFETY: bpf(2) with a BPF_PROG_LOAD attribute whose pointers (the program, the license)
    // outlive the call, and its size.
    let prog = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &load as *const ProgLoad,
            std::mem::size_of::<ProgLoad>(),
        )
    };
    if prog < 0 {
        return Err(failed("loading", io::Error::last_os_error()));
    }
    // SAFETY: bpf(2) returned a new descriptor that nothing else owns.
    let prog = unsafe { OwnedFd::from_raw_fd(prog as i32) };
    let group = std::fs::File::open(dir).map_err(|e| failed("opening the group for", e))?;
    let attach = ProgAttach {
        target_fd: group.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        ..ProgAttach::default()
    };
    // SAFETY: bpf(2) with a BPF_PROG_ATTACH attribute naming two descriptors we hold, and its
    // size. The attachment keeps the program alive once our descriptor closes.
    let attached = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attach as *const ProgAttach,
            std::mem::size_of::<ProgAttach>(),
        )
    };
    if attached < 0 {
        return Err(failed("attaching", io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_lines_name_each_allowed_node() {
        let lines: Vec<String> = container_rules().iter().map(DeviceRule::v1_line).collect();
        assert_eq!(
            lines,
            [
                "c 1:3 rwm",
                "c 1:5 rwm",
                "c 1:7 rwm",
                "c 1:8 rwm",
                "c 1:9 rwm",
                "c 5:0 rwm",
                "c 5:2 rwm",
                "c 136:* rwm"
            ]
        );
    }

    #[test]
    fn the_filter_checks_type_major_and_minor_then_refuses() {
        let rules = [
            DeviceRule {
                kind: DeviceKind::Char,
                major: 1,
                minor: Some(3),
            },
            DeviceRule {
                kind: DeviceKind::Char,
                major: 136,
                minor: None,
            },
        ];
        let program = filter_program(&rules);
        // Six set-up instructions, 3 + 2 for the first rule, 2 + 2 for the wildcard, 2 to
        // refuse.
        assert_eq!(program.len(), 6 + 5 + 4 + 2);
        // The first rule's type check skips its two other checks and the accept.
        assert_eq!(program[6], insn(BPF_JMP_JNE_K, 3, 0, 4, DEVCG_DEV_CHAR));
        assert_eq!(program[8], insn(BPF_JMP_JNE_K, 5, 0, 2, 3));
        assert_eq!(program[9], insn(BPF_ALU64_MOV_K, 0, 0, 0, 1));
        assert_eq!(program[11], insn(BPF_JMP_JNE_K, 3, 0, 3, DEVCG_DEV_CHAR));
        assert_eq!(*program.last().unwrap(), insn(BPF_JMP_EXIT, 0, 0, 0, 0));
        assert_eq!(
            program[program.len() - 2],
            insn(BPF_ALU64_MOV_K, 0, 0, 0, 0)
        );
    }
}
