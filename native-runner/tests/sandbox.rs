//! Real containers (as root) on a busybox root filesystem.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{busybox_root, container, finish, sh};
use lode_native_runner::cgroup::{LimitHit, Limits, V1};
use lode_native_runner::egress::Egress;
use lode_native_runner::sandbox::{Network, SandboxSpec, Volume, spawn};
use lode_native_runner::userns::CONTAINER_IDS;

#[test]
fn a_command_runs_isolated_on_an_overlay_of_the_image() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("image");
    busybox_root(&root);
    let scratch = common::scratch(dirs.path(), "scratch");
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
        stat -c 'null=%a shm=%a' /dev/null /dev/shm | tr '\n' ' '; echo
        echo probe > /proc/sys/kernel/hostname 2>/dev/null && echo "sysctl=written"
        awk '$5 == "/proc/sys" { print $5 "=" $6 }' /proc/self/mountinfo
        echo "timer_list=$(head -c 16 /proc/timer_list 2>/dev/null | wc -c)"
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
        // Other users (apt's _apt, say) can write /dev/null and use /dev/shm.
        "null=666",
        "shm=1777",
    ] {
        assert!(
            out.contains(expected),
            "missing {expected:?} in:\n{out}\n{err}"
        );
    }
    assert!(!out.contains("leak="), "{out}");
    // /proc's host-reaching files are read-only or masked.
    assert!(!out.contains("sysctl=written"), "{out}");
    // (This kernel has no sysrq-trigger or kcore; where they exist they are covered too.)
    assert!(out.contains("/proc/sys=ro,"), "{out}");
    assert!(out.contains("timer_list=0"), "{out}");
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
fn the_container_root_is_an_unprivileged_host_uid() {
    use std::os::unix::fs::MetadataExt;
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("image");
    busybox_root(&root);
    // A volume the container's root owns on the host, and one the host's root owns.
    let (owned, hosts) = (dirs.path().join("owned"), dirs.path().join("hosts"));
    std::fs::create_dir(&owned).unwrap();
    std::fs::create_dir(&hosts).unwrap();
    let base = CONTAINER_IDS.host_base;
    std::os::unix::fs::chown(&owned, Some(base), Some(base)).unwrap();
    let mut spec = container(
        &root,
        &common::scratch(dirs.path(), "scratch"),
        r#"
        echo "map=$(cat /proc/self/uid_map | tr -s ' ')"
        echo "id=$(id -u):$(id -g)"
        echo "image=$(stat -c %u:%g /bin/busybox)"
        echo new > /etc/new && echo "new=$(stat -c %u /etc/new)"
        echo top > /top && echo "root=$(stat -c %u:%g /)"
        chown 7:7 /etc/new && echo "chown=$(stat -c %u:%g /etc/new)"
        echo mine > /made/owned/file && echo "owned=ok"
        echo "parent=$(stat -c %u /made)"
        echo host > /hosts/file 2>/dev/null || echo "hosts=refused"
        "#,
    );
    spec.capabilities = lode_native_runner::sandbox::BUILD_CAPABILITIES;
    spec.volumes = vec![
        Volume::open(owned.clone(), "/made/owned", false).unwrap(),
        Volume::open(hosts.clone(), "/hosts", false).unwrap(),
    ];
    let finished = finish(&spec);
    let out = String::from_utf8_lossy(&finished.stdout);
    let err = String::from_utf8_lossy(&finished.stderr);
    assert_eq!(finished.code(), 0, "{out}\n{err}");
    for expected in [
        format!("map= 0 {base} {}", CONTAINER_IDS.count),
        "id=0:0".into(),
        // The image's root-owned files are the container root's own, through the idmap.
        "image=0:0".into(),
        "new=0".into(),
        "root=0:0".into(),
        "chown=7:7".into(),
        "owned=ok".into(),
        "parent=0".into(),
        "hosts=refused".into(),
    ] {
        assert!(
            out.contains(&expected),
            "missing {expected:?} in:\n{out}\n{err}"
        );
    }
    // On the host, what the container's root wrote belongs to an unprivileged uid.
    let file = std::fs::metadata(owned.join("file")).unwrap();
    assert_eq!((file.uid(), file.gid()), (base, base));
    assert!(!hosts.join("file").exists());
}

#[test]
fn a_missing_command_is_an_error_with_its_name() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("image");
    busybox_root(&root);
    let spec = SandboxSpec {
        lower: root,
        scratch: common::scratch(dirs.path(), "scratch"),
        argv: vec!["/no/such/program".into()],
        ..Default::default()
    };
    let err = spawn(&spec, &V1::detect().unwrap(), Stdio::null(), Stdio::null()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
}

#[test]
fn a_memory_bomb_is_killed_and_named() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("image");
    busybox_root(&root);
    // tmpfs pages count against the container's memory group.
    let mut spec = container(
        &root,
        &common::scratch(dirs.path(), "bomb"),
        "head -c 200000000 /dev/zero > /dev/shm/fill; echo survived",
    );
    spec.limits = Limits {
        memory: Some(32 << 20),
        ..Default::default()
    };
    let finished = finish(&spec);
    assert_eq!(
        finished.limit_hit,
        Some(LimitHit::OutOfMemory { limit: 32 << 20 })
    );
    assert_eq!(
        finished.killed_by().unwrap(),
        "killed: out of memory (limit 32 MiB)"
    );
}

#[test]
fn a_fork_bomb_stops_at_the_pids_limit() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("image");
    busybox_root(&root);
    let mut spec = container(
        &root,
        &common::scratch(dirs.path(), "forks"),
        "i=0; while [ $i -lt 100 ]; do sleep 30 & i=$((i+1)); done; wait",
    );
    spec.limits = Limits {
        pids: Some(16),
        ..Default::default()
    };
    spec.timeout = Some(Duration::from_secs(3));
    let finished = finish(&spec);
    assert_eq!(finished.limit_hit, Some(LimitHit::Pids { limit: 16 }));
}

#[test]
fn a_cpu_spin_is_throttled_and_killed_at_the_timeout() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("image");
    busybox_root(&root);
    let mut spec = container(
        &root,
        &common::scratch(dirs.path(), "spin"),
        "while :; do :; done",
    );
    spec.limits = Limits {
        cpu: Some(0.2),
        ..Default::default()
    };
    spec.timeout = Some(Duration::from_millis(800));
    let started = Instant::now();
    let finished = finish(&spec);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(finished.code(), 128 + 9);
    assert_eq!(
        finished.killed_by().unwrap(),
        "killed: timed out after 800ms"
    );
}

/// Copies the syscall probe (an example of this crate) and the shared libraries it needs into
/// the root, so it runs inside the container.
fn install_probe(root: &Path) {
    let deps = std::env::current_exe().unwrap();
    let probe = deps
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples/syscall_probe");
    assert!(probe.exists(), "{} is built by cargo test", probe.display());
    std::fs::copy(&probe, root.join("bin/syscall_probe")).unwrap();
    let ldd = std::process::Command::new("ldd")
        .arg(&probe)
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|word| word.starts_with('/'))
            .map(Path::new);
        if let Some(path) = path {
            let dest = root.join(path.strip_prefix("/").unwrap());
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(path, &dest).unwrap();
        }
    }
}

#[test]
fn every_syscall_the_profile_denies_fails_inside_a_container() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("image");
    busybox_root(&root);
    install_probe(&root);
    // Every number up to past the newest syscall that the compiled filter refuses, as the
    // user-space evaluation of it says: the kernel must answer each the same way.
    let programs = lode_native_runner::seccomp::compile().unwrap();
    let mut refused = lode_native_runner::seccomp::refused(&programs, 470);
    assert!(refused.len() > 100, "{refused:?}");
    // Linux 6.14+ runs uretprobe (335) and uprobe (336) without consulting seccomp at all:
    // they act only when called from a uprobe trampoline, and fail with ENXIO otherwise.
    refused.retain(|(nr, _)| !matches!(nr, 335 | 336));
    let numbers: Vec<String> = refused.iter().map(|(nr, _)| nr.to_string()).collect();
    let script = format!(
        "grep -E '^Seccomp' /proc/self/status; /bin/syscall_probe {}",
        numbers.join(" ")
    );
    let (code, out, err) = sh(&root, &common::scratch(dirs.path(), "probe"), &script);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    for (nr, errno) in &refused {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&nr.to_string()))
            .unwrap_or_else(|| panic!("no result for syscall {nr}:\n{out}"));
        assert_eq!(
            line,
            format!("{nr} {errno}"),
            "syscall {nr} was not refused by the filter"
        );
    }
    // Namespace flags on clone are refused too, while a plain fork works.
    let (code, out, err) = sh(
        &root,
        &common::scratch(dirs.path(), "clone"),
        "unshare -n true && echo escaped; (true) && echo forked",
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("forked") && !out.contains("escaped"),
        "{out}\n{err}"
    );
}

#[test]
fn volumes_mount_read_write_or_read_only_and_stay_inside_the_container() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("image");
    busybox_root(&root);
    // An image symlink to an absolute path: the volume must land in the container's /tmp,
    // never the host's.
    std::os::unix::fs::symlink("/tmp", root.join("sneaky")).unwrap();
    let host_side = Path::new("/tmp").join(format!("lode-vol-{}", std::process::id()));
    let (data, config, secret) = (
        dirs.path().join("data"),
        dirs.path().join("config"),
        dirs.path().join("secret.txt"),
    );
    std::fs::create_dir(&data).unwrap();
    // The container's root may write where its host uid may.
    let base = CONTAINER_IDS.host_base;
    std::os::unix::fs::chown(&data, Some(base), Some(base)).unwrap();
    std::fs::create_dir(&config).unwrap();
    std::fs::write(config.join("settings"), b"read me\n").unwrap();
    std::fs::write(&secret, b"one file\n").unwrap();
    let mut spec = container(
        &root,
        &common::scratch(dirs.path(), "scratch"),
        r#"
        echo kept > /data/out.txt && echo "rw=ok"
        cat /config/settings
        echo nope > /config/settings 2>/dev/null || echo "ro=refused"
        cat /run/secret.txt
        for dir in /tmp/lode-vol-*; do echo inside > $dir/file && echo "sneaky=ok"; done
        "#,
    );
    spec.volumes = vec![
        Volume::open(data.clone(), "/data", false).unwrap(),
        Volume::open(config.clone(), "/config", true).unwrap(),
        Volume::open(secret, "/run/secret.txt", true).unwrap(),
        Volume::open(
            data.clone(),
            format!(
                "/sneaky/{}",
                host_side.file_name().unwrap().to_str().unwrap()
            ),
            false,
        )
        .unwrap(),
    ];
    let finished = finish(&spec);
    let out = String::from_utf8_lossy(&finished.stdout);
    let err = String::from_utf8_lossy(&finished.stderr);
    assert_eq!(finished.code(), 0, "{out}\n{err}");
    for expected in ["rw=ok", "read me", "ro=refused", "one file", "sneaky=ok"] {
        assert!(
            out.contains(expected),
            "missing {expected:?} in:\n{out}\n{err}"
        );
    }
    assert_eq!(std::fs::read(data.join("out.txt")).unwrap(), b"kept\n");
    assert_eq!(
        std::fs::read(config.join("settings")).unwrap(),
        b"read me\n"
    );
    // The symlinked target resolved inside the container's root, not on the host.
    assert_eq!(std::fs::read(data.join("file")).unwrap(), b"inside\n");
    assert!(!host_side.exists());

    // A target under an image symlink that leads nowhere inside the container fails, named.
    std::os::unix::fs::symlink("/no/such/dir", root.join("dangling")).unwrap();
    spec.volumes = vec![Volume::open(data.clone(), "/dangling/vol", false).unwrap()];
    let cgroups = V1::detect().unwrap();
    let err = spawn(&spec, &cgroups, Stdio::null(), Stdio::null()).unwrap_err();
    assert!(
        err.to_string().contains("mounting volume") && err.to_string().contains("/dangling/vol"),
        "{err}"
    );

    spec.volumes = vec![Volume::open(data.clone(), "../escape", false).unwrap()];
    let err = spawn(&spec, &cgroups, Stdio::null(), Stdio::null()).unwrap_err();
    assert!(err.to_string().contains("absolute path"), "{err}");
}

/// A host service on loopback that the container must not reach.
fn host_listener() -> (std::net::TcpListener, u16) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

#[test]
fn the_default_network_is_loopback_only() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("image");
    busybox_root(&root);
    let (_listener, port) = host_listener();
    let script = format!(
        r#"
        ip -o link | cut -d: -f2 | tr -d ' ' | tr '\n' ' '; echo
        nc -w 1 127.0.0.1 {port} </dev/null && echo "host-port=reached"
        nc -w 1 10.0.2.2 {port} </dev/null && echo "gateway=reached"
        true
        "#
    );
    let (code, out, err) = sh(&root, &common::scratch(dirs.path(), "scratch"), &script);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out.lines().next().unwrap().trim(), "lo", "{out}");
    assert!(!out.contains("reached"), "{out}\n{err}");
}

/// The host's first global IPv4 address: where its services bound to 0.0.0.0 answer.
fn host_address() -> String {
    let out = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show", "scope", "global"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|word| *word != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .expect("the host has a global IPv4 address")
        .to_string()
}

#[test]
fn outbound_network_has_a_route_out_but_not_to_the_host() {
    if std::process::Command::new("slirp4netns")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("this test needs slirp4netns: apt-get install slirp4netns (./lode.sh test does)");
    }
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("image");
    busybox_root(&root);
    let (listener, port) = host_listener();
    listener.set_nonblocking(true).unwrap();
    // A service on all the host's addresses, reached at its own global one.
    let everywhere = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let everywhere_port = everywhere.local_addr().unwrap().port();
    let host = host_address();
    let mut spec = container(
        &root,
        &common::scratch(dirs.path(), "scratch"),
        &format!(
            r#"
            ip -o -4 addr show tap0 | grep -o 'inet [0-9./]*'
            ip route | grep -q '^default via 10.0.2.2' && echo "route=default"
            cat /etc/resolv.conf
            nc -w 1 10.0.2.2 {port} </dev/null && echo "host-loopback=reached"
            nc -w 1 127.0.0.1 {port} </dev/null && echo "host-port=reached"
            nc -w 1 {host} {everywhere_port} </dev/null && echo "host-address=reached"
            nc -w 1 169.254.169.254 80 </dev/null && echo "metadata=reached"
            true
            "#
        ),
    );
    let egress = Egress::install(&format!("nrtest{}", std::process::id())).unwrap();
    spec.network = Network::Outbound {
        egress: egress.clone(),
        allowed: Vec::new(),
    };
    let finished = finish(&spec);
    let out = String::from_utf8_lossy(&finished.stdout);
    let err = String::from_utf8_lossy(&finished.stderr);
    assert_eq!(finished.code(), 0, "{out}\n{err}");
    for expected in ["inet 10.0.2.100/24", "route=default", "nameserver 10.0.2.3"] {
        assert!(
            out.contains(expected),
            "missing {expected:?} in:\n{out}\n{err}"
        );
    }
    assert!(!out.contains("reached"), "{out}\n{err}");
    assert!(
        listener.accept().is_err(),
        "the host's loopback listener saw a connection"
    );
    // The user-mode stack went with the container.
    let slirps = std::process::Command::new("pgrep")
        .args([
            "-f",
            &format!("slirp4netns.*/proc/{}/fd/", std::process::id()),
        ])
        .output()
        .unwrap();
    assert!(
        slirps.stdout.is_empty(),
        "slirp4netns outlived the container"
    );

    // Granted explicitly, the host's address is reachable (and only for that container).
    let mut granted = container(
        &root,
        &common::scratch(dirs.path(), "granted"),
        &format!("nc -w 1 {host} {everywhere_port} </dev/null && echo \"host-address=reached\""),
    );
    granted.network = Network::Outbound {
        egress: egress.clone(),
        allowed: vec![host.parse::<std::net::IpAddr>().unwrap().into()],
    };
    everywhere.set_nonblocking(true).unwrap();
    let accepted = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if everywhere.accept().is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    });
    let finished = finish(&granted);
    let out = String::from_utf8_lossy(&finished.stdout);
    assert!(
        out.contains("host-address=reached"),
        "{out}\n{}",
        String::from_utf8_lossy(&finished.stderr)
    );
    assert!(accepted.join().unwrap());
    egress.remove_if_unused();
}

#[test]
fn descriptors_the_host_left_open_do_not_reach_the_container() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("image");
    busybox_root(&root);
    // A host descriptor without close-on-exec, as a library or a parent (make's jobserver)
    // may leave one: a secret file here.
    let secret = dirs.path().join("host-secret");
    std::fs::write(&secret, b"host only\n").unwrap();
    let path = std::ffi::CString::new(secret.to_str().unwrap()).unwrap();
    // SAFETY: open(2) of a NUL-terminated path; the descriptor is closed below.
    let leaked = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
    assert!(leaked > 2);
    let scratch = common::scratch(dirs.path(), "fds");
    let (code, out, err) = sh(
        &root,
        &scratch,
        &format!("ls /proc/self/fd | tr '\\n' ' '; cat /proc/self/fd/{leaked} 2>/dev/null"),
    );
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(leaked) };
    assert!(!out.contains("host only"), "read a host file: {out}");
    let fds: Vec<u32> = out
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // stdio, and the directory ls itself is reading.
    assert!(
        fds.iter().all(|fd| *fd <= 3),
        "fds {fds:?} (code {code}, {err})"
    );
}
