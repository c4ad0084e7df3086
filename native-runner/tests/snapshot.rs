//! Checkpoint and restore of real containers (as root) with CRIU, on a busybox image.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{busybox_root, container, user_namespace};
use lode_native_runner::cgroup::V1;
use lode_native_runner::sandbox::{Criu, RestoreSpec, spawn};

/// CRIU, or the reason the test cannot run, printed.
fn criu() -> Option<Criu> {
    match Criu::locate() {
        Ok(criu) => Some(criu),
        Err(e) => {
            println!("SKIPPED: {e}");
            None
        }
    }
}

/// Binds `source` at `target`, read-only.
fn mount_read_only(source: &Path, target: &Path) {
    for args in [
        vec!["--bind", source.to_str().unwrap(), target.to_str().unwrap()],
        vec!["-o", "remount,bind,ro", target.to_str().unwrap()],
    ] {
        let status = std::process::Command::new("mount")
            .args(&args)
            .status()
            .unwrap();
        assert!(status.success(), "mount {args:?}");
    }
}

fn unmount(target: &Path) {
    let status = std::process::Command::new("umount")
        .arg(target)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A busybox image with the directories a checkpointable container needs.
fn image(root: &Path) {
    busybox_root(root);
    for dir in ["proc", "dev", "run", "root", "mnt"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads a file in the container of host pid `pid`, through its root.
fn inside(pid: u32, path: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/root{path}")).unwrap_or_default()
}

/// Counts in memory, writing each value to /tmp/count and stdout; on SIGUSR1, tries what a
/// container must not do and writes what happened to /tmp/attacks.
const COUNTER: &str = r#"
i=0
probe=0
trap 'probe=1' USR1
while :; do
    i=$((i+1))
    echo $i > /tmp/count
    echo "tick $i"
    if [ "$probe" = 1 ]; then
        probe=0
        {
            mount -t tmpfs none /mnt 2>/dev/null && echo "mount=allowed"
            echo x > /bin/planted 2>/dev/null && echo "image=written"
            grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status
            echo "uid=$(id -u)"
            cat /proc/self/uid_map
            echo "hostname=$(hostname)"
            ls /proc | grep -E '^[0-9]+$' | tr '\n' ' '
            echo
            echo "done"
        } > /tmp/attacks.tmp 2>&1
        mv /tmp/attacks.tmp /tmp/attacks
    fi
    sleep 0.02
done
"#;

#[test]
fn a_checkpointable_container_is_restored_with_its_memory_and_its_isolation() {
    let Some(criu) = criu() else { return };
    let dirs = tempfile::tempdir().unwrap();
    // Private, as the server's container directory is: the container's uid cannot pass it.
    std::fs::set_permissions(dirs.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let root = dirs.path().join("image");
    image(&root);
    let cgroups = V1::detect().unwrap();
    let mut spec = container(&root, &common::scratch(dirs.path(), "first"), COUNTER);
    spec.checkpointable = true;
    spec.hostname = "snap".into();
    let first = spawn(&spec, &cgroups, Stdio::piped(), Stdio::piped()).unwrap();
    let pid = first.init_pid().expect("pid 1 runs");
    wait_for("the counter", Duration::from_secs(10), || {
        inside(pid, "/tmp/count").trim().parse::<u32>().unwrap_or(0) >= 5
    });
    let images = dirs.path().join("images");
    let report = criu.dump(pid, &images, &[], false).unwrap();
    assert!(report.bytes > 0);
    let finished = first.finish().unwrap();
    // The dump ended it (SIGKILL after the images were written).
    assert_ne!(finished.code(), 0);
    let last_seen = String::from_utf8_lossy(&finished.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse::<u32>().ok())
        .max()
        .unwrap();

    // Restored from a read-only view of the images, as from a lazy mount of the registry's
    // copy on another host.
    let read_only = dirs.path().join("images-ro");
    std::fs::create_dir(&read_only).unwrap();
    mount_read_only(&images, &read_only);
    let restore = RestoreSpec {
        images: read_only.clone(),
        lower: root.clone(),
        scratch: common::scratch(dirs.path(), "second"),
        user_namespace: user_namespace(),
        externals: BTreeMap::new(),
        limits: Default::default(),
        timeout: Some(Duration::from_secs(60)),
    };
    let mut second = criu
        .restore(&restore, &cgroups, Stdio::piped(), Stdio::piped())
        .unwrap();
    let pid = second.init_pid().unwrap();
    // Its memory came back: the count goes on from where it was, not from 1.
    let mut stdout = second.take_output().0.unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8];
    while !line.ends_with(b"\n") {
        assert_eq!(
            stdout.read(&mut byte).unwrap(),
            1,
            "the restored output ended"
        );
        line.push(byte[0]);
    }
    let resumed: u32 = String::from_utf8_lossy(&line)
        .trim()
        .strip_prefix("tick ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        resumed > last_seen,
        "restored at {resumed}, dumped after {last_seen}"
    );
    // Its isolation came back too: the same attacks fail as before the dump.
    // SAFETY: kill(2) with a pid and a signal number.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGUSR1) }, 0);
    wait_for("the probes", Duration::from_secs(10), || {
        inside(pid, "/tmp/attacks").contains("done")
    });
    let attacks = inside(pid, "/tmp/attacks");
    for expected in [
        "CapEff:\t0000000000000000",
        "CapBnd:\t0000000000000000",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
        "uid=0",
        "0     524288      65536",
        "hostname=snap",
    ] {
        assert!(
            attacks.contains(expected),
            "missing {expected:?}:\n{attacks}"
        );
    }
    assert!(!attacks.contains("mount=allowed"), "{attacks}");
    assert!(!attacks.contains("image=written"), "{attacks}");
    assert!(!root.join("bin/planted").exists());
    // Its own pid namespace: pid 1 and its children only.
    let pids = attacks.lines().find(|l| l.starts_with("1 ")).unwrap_or("");
    assert!(
        pids.split_whitespace()
            .all(|p| p.parse::<u32>().unwrap() < 100),
        "{attacks}"
    );
    drop(stdout);
    let scratch = restore.scratch.clone();
    unmount(&read_only);
    // Stopped at once: the whole restored tree goes, with its cgroup and root mount.
    let stop = std::sync::atomic::AtomicBool::new(true);
    second.finish_unless(&stop).unwrap();
    assert!(!scratch.exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(scratch.to_str().unwrap()), "{mounts}");
}

#[test]
fn a_checkpointable_container_refuses_what_criu_cannot_restore_by_name() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("image");
    image(&root);
    let cgroups = V1::detect().unwrap();
    let mut spec = container(&root, &common::scratch(dirs.path(), "refused"), "true");
    spec.checkpointable = true;
    spec.user_namespace = None;
    let error = spawn(&spec, &cgroups, Stdio::null(), Stdio::null()).unwrap_err();
    assert!(error.to_string().contains("user namespace"), "{error}");
    spec.user_namespace = Some(user_namespace());
    std::fs::remove_dir(root.join("proc")).unwrap();
    let error = spawn(&spec, &cgroups, Stdio::null(), Stdio::null()).unwrap_err();
    assert!(error.to_string().contains("/proc"), "{error}");
}
