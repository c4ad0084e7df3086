//! Live sandboxes (as root, on a busybox root): processes started later enter the same
//! container with no more rights than it has, and file calls stay inside its root.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::{busybox_root, container, scratch};
use lode_native_runner::cgroup::{Limits, V1};
use lode_native_runner::sandbox::{ExecSpec, LiveSandbox};

fn sh(script: &str) -> ExecSpec {
    ExecSpec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![("PATH".into(), "/bin".into())],
        cwd: "/".into(),
        terminal: false,
    }
}

/// Runs `script` in `live` and returns its exit code, stdout and stderr.
fn run(live: &LiveSandbox, script: &str) -> (i32, String, String) {
    let output = live
        .exec(&sh(script), Stdio::null(), Stdio::piped(), Stdio::piped())
        .unwrap()
        .child
        .wait_with_output()
        .unwrap();
    (
        lode_native_runner::sandbox::exit_code(output.status),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn start(dirs: &std::path::Path, label: &str, limits: Limits) -> LiveSandbox {
    let root = dirs.join("root");
    busybox_root(&root);
    let mut spec = container(&root, &scratch(dirs, label), "");
    spec.limits = limits;
    LiveSandbox::start(&spec, &V1::detect().unwrap()).unwrap()
}

#[test]
fn processes_share_the_sandbox_and_its_files_between_commands() {
    let dirs = tempfile::tempdir().unwrap();
    let mut live = start(dirs.path(), "live-share", Limits::default());
    assert!(live.is_running());
    // State a command leaves (a file, a background process) is there for the next one.
    let (code, _, err) = run(&live, "echo kept > /tmp/state; sleep 30 > /dev/null 2>&1 &");
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(
        &live,
        "cat /tmp/state; ps -o pid,comm | grep -c sleep; id -u; cat /proc/1/cmdline | tr '\\0' ' '",
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "kept");
    assert_eq!(
        lines[1], "1",
        "the background sleep runs in the same pid namespace"
    );
    assert_eq!(lines[2], "0", "uid 0 inside, an unprivileged uid outside");
    assert!(lines[3].ends_with("init "), "pid 1 is the helper: {out}");
    // The process is as restricted as the sandbox: no capabilities, no_new_privs, seccomp.
    let (_, out, _) = run(
        &live,
        "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status",
    );
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    // A process still entering (a copy of the server, not dumpable) is invisible in /proc.
    let (_, mounts, _) = run(&live, "grep ' /proc proc ' /proc/mounts");
    assert!(mounts.contains("hidepid=invisible"), "{mounts}");
    // Its exit code comes back, and a missing command is named.
    assert_eq!(run(&live, "exit 7").0, 7);
    let missing = live.exec(
        &ExecSpec {
            argv: vec!["no-such-command".into()],
            env: vec![("PATH".into(), "/bin".into())],
            cwd: "/".into(),
            terminal: false,
        },
        Stdio::null(),
        Stdio::null(),
        Stdio::null(),
    );
    assert!(missing.is_err());
    live.terminate();
}

#[test]
fn stdin_reaches_a_process_and_a_killed_process_leaves_nothing() {
    let dirs = tempfile::tempdir().unwrap();
    let live = start(dirs.path(), "live-stdin", Limits::default());
    let mut child = live
        .exec(
            &sh("read line; echo \"got $line\""),
            Stdio::piped(),
            Stdio::piped(),
            Stdio::null(),
        )
        .unwrap()
        .child;
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), "got hello\n");

    let mut spinning = live
        .exec(
            &sh("exec sleep 1000"),
            Stdio::null(),
            Stdio::null(),
            Stdio::null(),
        )
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(run(&live, "ps -o comm | grep -c '^sleep'").1.trim(), "1");
    spinning.kill().unwrap();
    let status = spinning.child.wait().unwrap();
    assert_eq!(lode_native_runner::sandbox::exit_code(status), 137);
    let mut left = String::new();
    for _ in 0..50 {
        left = run(&live, "ps -o comm | grep -c '^sleep' || true").1;
        if left.trim() == "0" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(left.trim(), "0", "the killed command went with its waiter");
    live.terminate();
}

#[test]
fn file_calls_resolve_inside_the_sandbox_root_with_its_rights() {
    let dirs = tempfile::tempdir().unwrap();
    let live = start(dirs.path(), "live-files", Limits::default());
    let secret = dirs.path().join("host-secret");
    std::fs::write(&secret, "host only").unwrap();

    let file_op = |op: &str, path: &str, input: Option<&[u8]>| {
        let mut child = live
            .file_op(op, path, input.map(|_| Stdio::piped()))
            .unwrap()
            .child;
        if let Some(bytes) = input {
            child.stdin.take().unwrap().write_all(bytes).unwrap();
        }
        let output = child.wait_with_output().unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    assert_eq!(file_op("write", "/tmp/data.csv", Some(b"a,b\n1,2\n")).0, 0);
    assert_eq!(file_op("read", "/tmp/data.csv", None).1, "a,b\n1,2\n");
    assert_eq!(run(&live, "cat /tmp/data.csv").1, "a,b\n1,2\n");
    assert_eq!(file_op("mkdir", "/work/a/b", None).0, 0);
    let (code, listing) = file_op("ls", "/work", None);
    assert_eq!(code, 0);
    assert!(
        listing.starts_with("{\"name\":\"a\",\"kind\":\"dir\""),
        "{listing}"
    );
    assert_eq!(file_op("stat", "/nope", None).0, 2, "not found");
    assert_eq!(
        file_op("read", "/work", None).0,
        3,
        "a directory is not a file"
    );
    // The host's files are not reachable by path, `..` or a symlink planted inside.
    let host_path = secret.to_str().unwrap();
    assert_eq!(file_op("read", host_path, None).0, 2);
    assert_eq!(file_op("read", &format!("/../../..{host_path}"), None).0, 2);
    assert_eq!(run(&live, &format!("ln -s {host_path} /tmp/link")).0, 0);
    assert_eq!(file_op("read", "/tmp/link", None).0, 2);
    // What the image holds read-only stays so for the sandbox's root too: /proc/sys.
    assert_eq!(
        file_op("write", "/proc/sys/kernel/hostname", Some(b"x")).0,
        4,
        "read-only file system"
    );
    assert_eq!(file_op("rm", "/work", None).0, 0);
    assert_eq!(file_op("stat", "/work", None).0, 2);
    live.terminate();
}

#[test]
fn the_sandbox_limits_bound_every_process_in_it() {
    let dirs = tempfile::tempdir().unwrap();
    let mut live = start(
        dirs.path(),
        "live-limits",
        Limits {
            memory: Some(64 << 20),
            pids: Some(32),
            ..Default::default()
        },
    );
    let (_, out, _) = run(&live, "for i in $(seq 1 64); do sleep 5 & done; wait");
    let _ = out;
    assert!(
        live.limit_hit()
            .is_some_and(|hit| hit.to_string().contains("pids")),
        "{:?}",
        live.limit_hit()
    );
    let (code, _, _) = run(&live, "head -c 200000000 /dev/zero | tail > /dev/null");
    assert_ne!(code, 0, "the memory limit holds for a later command too");
    assert!(
        live.is_running(),
        "the sandbox outlives a command the limit killed"
    );
    live.terminate();
}

/// runc's CVE-2024-21626 ("Leaky Vessels"), from inside: until it execs, a joining process
/// (and a container's set-up) still holds the server's descriptors, so a working directory
/// reached through `/proc/self/fd/N` would land on a host directory. The sandbox (or the
/// image) plants the symlink; the working directory it names must be refused, not followed.
#[test]
fn a_working_directory_through_proc_self_fd_never_reaches_the_host() {
    use std::os::fd::AsRawFd;
    let dirs = tempfile::tempdir().unwrap();
    // A host directory the "server" holds open, with a file only the host has.
    let host_dir = dirs.path().join("host-side");
    std::fs::create_dir(&host_dir).unwrap();
    std::fs::write(host_dir.join("host-marker"), "host").unwrap();
    let held = std::fs::File::open(&host_dir).unwrap();
    let fd = held.as_raw_fd();

    // The joined process's working directory.
    let live = start(dirs.path(), "live-leaky", Limits::default());
    assert_eq!(run(&live, &format!("ln -s /proc/self/fd/{fd} /tmp/w")).0, 0);
    let escaped = live.exec(
        &ExecSpec {
            argv: vec!["sh".into(), "-c".into(), "ls; ls ..".into()],
            env: vec![("PATH".into(), "/bin".into())],
            cwd: "/tmp/w".into(),
            terminal: false,
        },
        Stdio::null(),
        Stdio::piped(),
        Stdio::piped(),
    );
    match escaped {
        Err(e) => assert!(e.to_string().contains("working directory"), "{e}"),
        Ok(process) => {
            let out = process.child.wait_with_output().unwrap();
            let seen = String::from_utf8_lossy(&out.stdout);
            assert!(
                !seen.contains("host-marker"),
                "a host directory was reached: {seen}"
            );
        }
    }
    live.terminate();

    // A new container whose image's working directory is such a symlink.
    let root = dirs.path().join("root");
    std::os::unix::fs::symlink(format!("/proc/self/fd/{fd}"), root.join("leak")).unwrap();
    let mut spec = container(&root, &scratch(dirs.path(), "leaky-spawn"), "ls; ls ..");
    spec.cwd = "/leak".into();
    match lode_native_runner::sandbox::spawn(
        &spec,
        &V1::detect().unwrap(),
        Stdio::piped(),
        Stdio::piped(),
    ) {
        Err(e) => assert!(e.to_string().contains("working directory"), "{e}"),
        Ok(sandbox) => {
            let finished = sandbox.finish().unwrap();
            let seen = String::from_utf8_lossy(&finished.stdout);
            assert!(
                !seen.contains("host-marker"),
                "a host directory was reached: {seen}"
            );
        }
    }
    drop(held);
}
