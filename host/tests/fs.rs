//! `lode fs mount` and `lode fs umount` as a user runs them, against `lode serve`.

mod harness;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::{LODE, Lode};

fn mounted(point: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let point = point.to_str().unwrap();
    mounts
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(point))
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn_mount(lode: &Lode, reference: &str, point: &Path, cache: &Path) -> Child {
    let child = Command::new(LODE)
        .args([
            "fs",
            "mount",
            reference,
            point.to_str().unwrap(),
            "--fetch-timeout",
            "2s",
        ])
        .arg("--cache-dir")
        .arg(cache)
        .env("LODE_CONFIG", lode.client_file())
        .env("LODE_LOG", "lode=warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // A stale mount is listed too, until the new process clears it.
    wait_for("the mount", || {
        mounted(point) && !lode_fs::is_stale_mount(point)
    });
    child
}

/// Clears the mount point however the test ends, so a failure leaves no mount behind.
struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = lode_fs::unmount(self.0);
    }
}

#[test]
fn mount_read_unmount_and_recover_from_a_killed_mount() {
    let lode = Lode::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("pkg")).unwrap();
    std::fs::write(tree.join("pkg/module.py"), b"VALUE = 42\n".repeat(100)).unwrap();
    std::fs::write(tree.join("data.bin"), vec![7u8; 900_000]).unwrap();
    std::os::unix::fs::symlink("pkg/module.py", tree.join("link.py")).unwrap();
    lode.cli_ok(&[
        "image",
        "ingest",
        tree.to_str().unwrap(),
        "--tag",
        "fs-test",
    ]);

    let point = work.path().join("mnt");
    std::fs::create_dir(&point).unwrap();
    let _cleanup = Unmount(&point);
    let cache = work.path().join("cache");
    let mut child = spawn_mount(&lode, "fs-test", &point, &cache);
    assert_eq!(
        std::fs::read(point.join("data.bin")).unwrap(),
        vec![7u8; 900_000]
    );
    assert_eq!(
        std::fs::read(point.join("link.py")).unwrap(),
        std::fs::read(tree.join("pkg/module.py")).unwrap()
    );
    // Read-only.
    assert!(std::fs::write(point.join("new"), b"x").is_err());

    // Two processes never share one cache.
    let second = Command::new(LODE)
        .args(["fs", "mount", "fs-test", work.path().to_str().unwrap()])
        .arg("--cache-dir")
        .arg(&cache)
        .env("LODE_CONFIG", lode.client_file())
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use"));

    lode.cli_ok(&["fs", "umount", point.to_str().unwrap()]);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!mounted(&point));
    // Unmounting saved the access profile for the next cold mount.
    assert!(
        lode.cli_ok(&["image", "ls", "profile/"])
            .contains("profile/")
    );

    // A mount whose process is killed is cleared by `lode fs umount`...
    let mut child = spawn_mount(&lode, "fs-test", &point, &cache);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(lode_fs::is_stale_mount(&point));
    let out = lode.cli_ok(&["fs", "umount", point.to_str().unwrap()]);
    assert!(out.contains("stale"), "{out}");
    assert!(!mounted(&point));

    // ...and by the next mount on the same point.
    let mut child = spawn_mount(&lode, "fs-test", &point, &cache);
    child.kill().unwrap();
    child.wait().unwrap();
    let mut child = spawn_mount(&lode, "fs-test", &point, &cache);
    assert_eq!(
        std::fs::read(point.join("data.bin")).unwrap().len(),
        900_000
    );
    // SAFETY: kill(2) on a child pid we own; no memory is touched.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(!mounted(&point));

    let err = lode.cli_err(&["fs", "umount", point.to_str().unwrap()]);
    assert!(err.contains("nothing is mounted"), "{err}");
}
