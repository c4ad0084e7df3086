//! Helpers the sandbox test binaries share: a busybox image and containers on it.

#![allow(dead_code)]

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, OnceLock};

use lode_native_runner::cgroup::V1;
use lode_native_runner::sandbox::{Finished, SandboxSpec, spawn};
use lode_native_runner::userns::{CONTAINER_IDS, UserNamespace};

/// The user namespace every container here runs in, as under `lode serve`.
pub fn user_namespace() -> Arc<UserNamespace> {
    static SHARED: OnceLock<Arc<UserNamespace>> = OnceLock::new();
    SHARED
        .get_or_init(|| Arc::new(UserNamespace::create(CONTAINER_IDS).unwrap()))
        .clone()
}

/// A root filesystem holding only a static busybox and its applet links.
pub fn busybox_root(root: &Path) {
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

pub fn container(root: &Path, scratch: &Path, script: &str) -> SandboxSpec {
    SandboxSpec {
        lower: root.to_path_buf(),
        scratch: scratch.to_path_buf(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec![("PATH".into(), "/bin".into())],
        user_namespace: Some(user_namespace()),
        ..Default::default()
    }
}

pub fn finish(spec: &SandboxSpec) -> Finished {
    let cgroups = V1::detect().unwrap();
    spawn(spec, &cgroups, Stdio::piped(), Stdio::piped())
        .unwrap()
        .finish()
        .unwrap()
}

pub fn sh(root: &Path, scratch: &Path, script: &str) -> (i32, String, String) {
    let finished = finish(&container(root, scratch, script));
    (
        finished.code(),
        String::from_utf8_lossy(&finished.stdout).into_owned(),
        String::from_utf8_lossy(&finished.stderr).into_owned(),
    )
}

/// A scratch directory under `dirs` whose name (which names the container's cgroups) no
/// other test running at the same time uses.
pub fn scratch(dirs: &Path, label: &str) -> std::path::PathBuf {
    let unique = dirs.file_name().unwrap().to_str().unwrap();
    dirs.join(format!("{label}{unique}"))
}
