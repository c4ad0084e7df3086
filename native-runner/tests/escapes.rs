//! Escapes tried against the sandbox's own mechanisms, each from a real container or a real
//! cgroup (as root): device nodes, the device allow-list on v1 and v2, volumes swapped after
//! their check, `/proc` masks and the sizes of `/dev` and `/dev/shm`. The same attacks through
//! `lode serve` are in the host's security suite.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{busybox_root, container, finish, sh};
use lode_native_runner::cgroup::devices::{attach_filter, container_rules};
use lode_native_runner::cgroup::{Hierarchy, Limits, V1};
use lode_native_runner::sandbox::Volume;

/// Makes a character device node at `path`.
fn mknod(path: &Path, major: u32, minor: u32) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mknod(2) on a NUL-terminated path with plain integers.
    let made = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(major, minor),
        )
    };
    assert_eq!(
        made,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

#[test]
fn a_device_node_in_the_image_opens_nothing() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("image");
    busybox_root(&root);
    // 1:3 is /dev/null, which the device allow-list lets through: only `nodev` on the root
    // stops it. 1:11 is the host's kernel log, which both stop.
    mknod(&root.join("etc/null-copy"), 1, 3);
    mknod(&root.join("etc/kmsg-copy"), 1, 11);
    let (code, out, err) = sh(
        &root,
        &common::scratch(dirs.path(), "scratch"),
        r#"
        ls -l /etc/null-copy /etc/kmsg-copy >/dev/null && echo "listed"
        echo x > /etc/null-copy 2>/dev/null && echo "null-copy=opened"
        (: < /etc/kmsg-copy) 2>/dev/null && echo "kmsg-copy=opened"
        echo x > /dev/null && echo "own-null=ok"
        "#,
    );
    assert_eq!(code, 0, "{out}\n{err}");
    // The nodes are there, as the image has them, but none opens; the container's own do.
    assert!(
        out.contains("listed") && out.contains("own-null=ok"),
        "{out}\n{err}"
    );
    assert!(!out.contains("null-copy=opened"), "{out}");
    assert!(!out.contains("kmsg-copy=opened"), "{out}");
}

/// Opens `device` for reading on the host as a member of the groups whose `cgroup.procs`
/// files are given, and says whether the open succeeded (the device check is at open).
fn opens_as_member(procs: &[PathBuf], device: &str) -> bool {
    let procs = procs.to_vec();
    let mut command = Command::new("sh");
    command
        .args(["-c", &format!(": < {device}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only writes to files between fork and exec; nothing is allocated that matters
    // if the child is torn down mid-way.
    unsafe {
        command.pre_exec(move || {
            for file in &procs {
                std::fs::write(file, "0")?;
            }
            Ok(())
        });
    }
    command.status().unwrap().success()
}

#[test]
fn the_v1_device_list_lets_a_group_open_only_the_container_nodes() {
    let cgroups = V1::detect().unwrap();
    let name = format!("escape-test-devices-{}", std::process::id());
    let group = cgroups.create(&name, &Limits::default()).unwrap();
    let procs = group.procs_files();
    assert!(
        procs
            .iter()
            .any(|p| p.starts_with("/sys/fs/cgroup/devices"))
    );
    // Outside the group the host reads its kernel log; inside, only the allowed nodes open.
    assert!(opens_as_member(&[], "/dev/kmsg"));
    assert!(!opens_as_member(&procs, "/dev/kmsg"));
    assert!(opens_as_member(&procs, "/dev/zero"));
    group.remove();
}

#[test]
fn the_v2_device_program_lets_a_group_open_only_the_container_nodes() {
    // This machine's cgroup v2 mount has no controllers to delegate, but device programs
    // need none: a group there with the program attached is the v2 path for real.
    let unified = Path::new("/sys/fs/cgroup/unified");
    if !unified.join("cgroup.procs").exists() {
        eprintln!("skipped: no cgroup v2 mount at {}", unified.display());
        return;
    }
    let dir = unified.join(format!("escape-test-devices-{}", std::process::id()));
    std::fs::create_dir(&dir).unwrap();
    attach_filter(&dir, &container_rules()).unwrap();
    let procs = [dir.join("cgroup.procs")];
    let denied = opens_as_member(&procs, "/dev/kmsg");
    let allowed = opens_as_member(&procs, "/dev/urandom");
    std::fs::remove_dir(&dir).unwrap();
    assert!(!denied, "/dev/kmsg opened under the device program");
    assert!(
        allowed,
        "/dev/urandom did not open under the device program"
    );
}

#[test]
fn a_volume_is_the_directory_that_was_opened_whatever_its_name_leads_to_later() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("image");
    busybox_root(&root);
    let allowed = dirs.path().join("allowed");
    let checked = allowed.join("data");
    std::fs::create_dir_all(&checked).unwrap();
    std::fs::write(checked.join("file"), b"checked\n").unwrap();
    let elsewhere = dirs.path().join("host-secrets");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("file"), b"host secret\n").unwrap();

    let volume = Volume::beneath(&allowed, Path::new("data"), "/data", true).unwrap();
    // The race: after the check, the name is swapped for a symlink to somewhere else.
    std::fs::rename(&checked, allowed.join("moved")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &checked).unwrap();
    let mut spec = container(
        &root,
        &common::scratch(dirs.path(), "scratch"),
        "cat /data/file",
    );
    spec.volumes = vec![volume];
    let finished = finish(&spec);
    let out = String::from_utf8_lossy(&finished.stdout);
    assert_eq!(
        out,
        "checked\n",
        "{}",
        String::from_utf8_lossy(&finished.stderr)
    );

    // Resolving the swapped name now is refused: no symlink is followed below the root.
    let err = Volume::beneath(&allowed, Path::new("data"), "/data", true).unwrap_err();
    assert!(err.to_string().contains("symlink"), "{err}");
    let err = Volume::beneath(&allowed, Path::new("../host-secrets"), "/x", true).unwrap_err();
    assert!(err.to_string().contains("host-secrets"), "{err}");
}

#[test]
fn proc_hides_what_docker_hides_and_dev_is_small() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("image");
    busybox_root(&root);
    let (code, out, err) = sh(
        &root,
        &common::scratch(dirs.path(), "scratch"),
        r#"
        for f in kcore keys latency_stats timer_list timer_stats sched_debug kallsyms; do
            [ -e /proc/$f ] && echo "$f=$(head -c 64 /proc/$f 2>/dev/null | wc -c)"
        done
        for d in acpi asound scsi; do
            [ -e /proc/$d ] && echo "$d=$(ls -A /proc/$d | wc -l)"
        done
        df -k /dev /dev/shm | awk 'NR > 1 { print $6 "=" $2 }'
        dd if=/dev/zero of=/dev/shm/fill bs=1M count=100 2>/dev/null; echo "shm-wrote=$(du -m /dev/shm/fill | cut -f1)"
        "#,
    );
    assert_eq!(code, 0, "{out}\n{err}");
    for line in out.lines() {
        if let Some((name, value)) = line.split_once('=')
            && !matches!(name, "/dev" | "/dev/shm" | "shm-wrote")
        {
            assert_eq!(value, "0", "/proc/{name} shows something: {out}");
        }
    }
    assert!(out.contains("/dev=64\n"), "{out}");
    assert!(out.contains("/dev/shm=65536\n"), "{out}");
    // /dev/shm stops at its size (64 MiB), not at half the host's memory.
    assert!(out.contains("shm-wrote=64\n"), "{out}");
}
