//! Real containers (as root) on a busybox root filesystem.

use std::path::Path;
use std::process::Stdio;

use lode_native_runner::sandbox::{SandboxSpec, exit_code, spawn};

/// A root filesystem holding only a static busybox and its applet links.
fn busybox_root(root: &Path) {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "these tests need a static busybox: apt-get install busybox-static (./lode.sh test does)"
    );
    for dir in ["bin", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    let list = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        // Relative links, so they resolve inside the container.
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
    }
    std::fs::write(root.join("etc/marker"), b"from the image\n").unwrap();
}

fn sh(root: &Path, scratch: &Path, script: &str) -> (i32, String, String) {
    let spec = SandboxSpec {
        lower: root.to_path_buf(),
        scratch: scratch.to_path_buf(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec![("PATH".into(), "/bin".into())],
        ..Default::default()
    };
    let output = spawn(&spec, Stdio::piped(), Stdio::piped())
        .unwrap()
        .output()
        .unwrap();
    (
        exit_code(output.status),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_command_runs_isolated_on_an_overlay_of_the_image() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("image");
    busybox_root(&root);
    let scratch = dirs.path().join("scratch");
    let script = r#"
        echo "pid=$$"
        echo "host=$(hostname)"
        echo "marker=$(cat /etc/marker)"
        test -e /work && echo "leak=/work"
        test -e /proc/1/exe && echo "proc=yes"
        grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status
        echo "files=$(ulimit -n)"
        echo written > /etc/marker && echo "write=$(cat /etc/marker)"
        mount -t tmpfs none /tmp 2>/dev/null && echo "mount=allowed"
        ls /dev | tr '\n' ' '; echo
        ip link show lo | grep -q UP && echo "lo=up"
        exit 3
    "#;
    let (code, out, err) = sh(&root, &scratch, script);
    assert_eq!(code, 3, "stdout: {out}\nstderr: {err}");
    for expected in [
        "pid=1",
        "host=lode",
        "marker=from the image",
        "proc=yes",
        "CapEff:\t0000000000000000",
        "CapBnd:\t0000000000000000",
        "NoNewPrivs:\t1",
        "files=1024",
        "write=written",
        "null",
        "urandom",
        "lo=up",
    ] {
        assert!(
            out.contains(expected),
            "missing {expected:?} in:\n{out}\n{err}"
        );
    }
    assert!(!out.contains("leak="), "{out}");
    assert!(!out.contains("mount=allowed"), "{out}");
    // The image is untouched; the write went to the container's own layer.
    assert_eq!(
        std::fs::read(root.join("etc/marker")).unwrap(),
        b"from the image\n"
    );
    // Nothing is left: no scratch directory, no mounts.
    assert!(!scratch.exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(scratch.to_str().unwrap()), "{mounts}");
}

#[test]
fn a_missing_command_is_an_error_with_its_name() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("image");
    busybox_root(&root);
    let spec = SandboxSpec {
        lower: root,
        scratch: dirs.path().join("scratch"),
        argv: vec!["/no/such/program".into()],
        ..Default::default()
    };
    let err = spawn(&spec, Stdio::null(), Stdio::null()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
}
