//! The security suite: each escape a review found, tried as an attacker would, from inside a
//! real container (or function, or guest) started through a real `lode serve`, as root.
//! Each test failed before its fix; the mechanisms themselves are also tested where they live
//! (`native-runner/tests/escapes.rs`, the seccomp and egress unit tests).

mod harness;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use harness::testhost::TestHost;
use harness::{BASE_DIR, Lode, busybox_tree, text, write_spec};

fn start(extra: &[&str]) -> Lode {
    let mut args = vec!["--image-base-dir", BASE_DIR];
    args.extend_from_slice(extra);
    Lode::start(&args)
}

/// Makes a character device node.
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
    assert_eq!(made, 0, "{}", std::io::Error::last_os_error());
}

/// The `mountinfo` line of the FUSE mount of the image `digest`.
fn image_mount_line(digest: &str) -> String {
    let hex = &digest.trim_start_matches("blake3:")[..16];
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|line| line.contains(&format!("lode:{hex}")))
        .unwrap_or_else(|| panic!("no mount of {digest}"))
        .to_string()
}

#[test]
fn device_nodes_and_setuid_files_in_an_image_reach_nothing_on_the_host() {
    let lode = start(&[]);
    // The test's own directories are open to everyone, as /var/cache is: only what Lode
    // makes private keeps other users out.
    std::fs::set_permissions(lode.dirs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("image");
    busybox_tree(&root);
    // 1:3 is null, which the device allow-list lets through (only nodev stops it); 1:11 is
    // the host's kernel log. And a setuid-root `id`, as a build step or pip package makes.
    mknod(&root.join("etc/null-copy"), 1, 3);
    mknod(&root.join("etc/kmsg-copy"), 1, 11);
    std::fs::copy("/usr/bin/id", root.join("bin/suid-id")).unwrap();
    std::fs::set_permissions(
        root.join("bin/suid-id"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    let digest = lode.ingest_image(&root, "test/nodes");

    let out = lode.container_run(&[
        "test/nodes",
        "--",
        "/bin/sh",
        "-c",
        "ls /etc/null-copy /etc/kmsg-copy >/dev/null && echo listed; \
         (echo x > /etc/null-copy) 2>/dev/null && echo null-copy=opened; \
         (: < /etc/kmsg-copy) 2>/dev/null && echo kmsg-copy=opened; \
         echo x > /dev/null && echo own-null=ok",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.contains("listed") && stdout.contains("own-null=ok"),
        "{stdout}"
    );
    assert!(!stdout.contains("opened"), "{stdout}");

    // The image's mount means nothing to the host either: nosuid, nodev, and its directory
    // is root's alone.
    let line = image_mount_line(&digest);
    assert!(line.contains("nosuid") && line.contains("nodev"), "{line}");
    let mounts = lode.dirs.path().join("cache/mounts");
    let mode = std::fs::metadata(&mounts).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{}", mounts.display());
    let hex = digest.trim_start_matches("blake3:");
    let suid = mounts.join(hex).join("bin/suid-id");
    // Another local user, from a shell, tries the setuid-root file.
    let as_nobody = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
        ])
        .arg(format!("{} -u", suid.display()))
        .output()
        .unwrap();
    assert!(!as_nobody.status.success(), "{}", text(&as_nobody.stdout));
    assert_ne!(text(&as_nobody.stdout).trim(), "0");
}

#[test]
fn containers_cannot_reach_the_operators_terminal() {
    // A server started from an operator's shell: `script` gives it a pseudo-terminal as its
    // controlling terminal, as an interactive shell would.
    let lode = Lode::start_under_terminal(&["--image-base-dir", BASE_DIR]);
    let work = tempfile::tempdir().unwrap();
    lode.python_image(work.path());
    let probe = r#"
import fcntl, os, termios
try:
    fd = os.open("/dev/tty", os.O_RDWR)
except OSError as e:
    print("tty", e.errno)
else:
    try:
        fcntl.ioctl(fd, termios.TIOCSTI, b"x")
        print("tiocsti pushed a keystroke")
    except OSError as e:
        print("tiocsti", e.errno)
print("sid", os.getsid(0), "pgid", os.getpgid(0))
"#;
    let out = lode.container_run(&["test/py", "--", "python3", "-c", probe]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    // No controlling terminal at all: /dev/tty answers ENXIO.
    assert!(stdout.contains(&format!("tty {}", libc::ENXIO)), "{stdout}");
    assert!(!stdout.contains("pushed"), "{stdout}");
}

#[test]
fn seccomp_refuses_x32_exotic_sockets_and_the_escape_list_and_proc_hides_the_host() {
    let lode = start(&[]);
    let work = tempfile::tempdir().unwrap();
    lode.python_image(work.path());
    let probe = r#"
import ctypes, errno, os, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(nr, *args):
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return 0 if r >= 0 else ctypes.get_errno()
# x32: getpid's x32 number (bit 30 set) must be refused by the filter itself.
print("x32-getpid", call(0x40000000 | 39))
for name, family in [("vsock", 40), ("alg", 38), ("packet", 17), ("bluetooth", 31), ("key", 15)]:
    try:
        socket.socket(family, socket.SOCK_DGRAM if family != 38 else socket.SOCK_SEQPACKET).close()
        print(name, "opened")
    except OSError as e:
        print(name, e.errno)
for name, nr in [("mount", 165), ("ptrace", 101), ("unshare", 272), ("bpf", 321), ("keyctl", 250),
                 ("io_uring_setup", 425), ("userfaultfd", 323), ("open_by_handle_at", 304),
                 ("kexec_load", 246), ("init_module", 175), ("perf_event_open", 298)]:
    print(name, call(nr, 0, 0, 0, 0, 0, 0))
for f in ["kcore", "keys", "latency_stats", "timer_list", "timer_stats", "sched_debug", "kallsyms"]:
    path = "/proc/" + f
    if os.path.exists(path):
        with open(path, "rb") as fh:
            print("proc", f, len(fh.read(64)))
for d in ["acpi", "asound", "scsi"]:
    if os.path.exists("/proc/" + d):
        print("proc", d, len(os.listdir("/proc/" + d)))
st = os.statvfs("/dev/shm")
print("shm-mib", st.f_blocks * st.f_frsize >> 20)
"#;
    let out = lode.container_run(&["test/py", "--", "python3", "-c", probe]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let value = |key: &str| -> Vec<String> {
        stdout
            .lines()
            .filter(|l| l.starts_with(&format!("{key} ")))
            .map(|l| l.rsplit(' ').next().unwrap().to_string())
            .collect()
    };
    assert_eq!(value("x32-getpid"), [libc::EPERM.to_string()], "{stdout}");
    for family in ["vsock", "alg", "packet", "bluetooth", "key"] {
        assert_eq!(value(family), [libc::EAFNOSUPPORT.to_string()], "{stdout}");
    }
    for call in [
        "mount",
        "ptrace",
        "unshare",
        "bpf",
        "keyctl",
        "io_uring_setup",
        "userfaultfd",
        "open_by_handle_at",
        "kexec_load",
        "init_module",
        "perf_event_open",
    ] {
        assert_eq!(value(call), [libc::EPERM.to_string()], "{call}: {stdout}");
    }
    assert!(value("proc").iter().all(|n| n == "0"), "{stdout}");
    assert_eq!(value("shm-mib"), ["64"], "{stdout}");
}

/// An app whose module, once the agent has imported it, forges every JSON result into a
/// pickle that runs `touch MARKER` wherever it is unpickled.
fn forging_app(dir: &Path, marker: &Path) -> String {
    let source = format!(
        r#"
import base64, os, pickle, sys
import lode

app = lode.App("forger")


class Boom:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))


agent = sys.modules.get("__main__")
if agent is not None and hasattr(agent, "encode") and "lode" in getattr(agent, "__file__", ""):
    real = agent.encode

    def forged(msg):
        if msg.get("type") == "output" and "result" in msg:
            data = base64.b64encode(pickle.dumps(Boom())).decode()
            msg = {{"type": "output", "id": msg["id"], "result_pickled": data}}
        return real(msg)

    agent.encode = forged


@app.function()
def hello():
    return "hi"
"#,
        marker = marker.display()
    );
    let path = dir.join("forger.py");
    std::fs::write(&path, source).unwrap();
    path.display().to_string()
}

#[test]
fn pickles_reach_only_pickle_handles_and_apps_call_only_apps_that_allow_them() {
    let lode = start(&[]);
    let work = tempfile::tempdir().unwrap();
    let marker = work.path().join("unpickled-on-the-caller");

    // A JSON function whose container answers with a pickle: the server drops it.
    lode.cli_ok(&["deploy", &forging_app(work.path(), &marker)]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let body: serde_json::Value = rt.block_on(async {
        lode.api(
            reqwest::Method::POST,
            "/v1/apps/forger/functions/hello/call",
        )
        .json(&serde_json::json!({"args": []}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
    });
    assert!(body.get("result_pickled").is_none(), "{body}");
    assert_eq!(body["error"]["kind"], "invalid_result", "{body}");
    // Through the SDK on the developer's machine: an error, and nothing ran here.
    let out = lode.sdk_python(
        "import lode\n\
         try:\n    print(lode.Function.from_name('forger', 'hello').remote())\n\
         except lode.RemoteError as e:\n    print('refused', e.kind)\n",
    );
    assert_eq!(
        text(&out.stdout).trim(),
        "refused invalid_result",
        "{}",
        text(&out.stderr)
    );
    assert!(!marker.exists(), "the forged pickle ran on the caller");

    // Calls between apps: refused unless the callee names the caller, and never for pickle.
    let victim = |allow: &str| {
        let path = work.path().join("victim.py");
        std::fs::write(
            &path,
            format!(
                "import lode\napp = lode.App('victim', allow_callers=[{allow}])\n\
                 @app.function()\ndef secret():\n    return 'victim data'\n\
                 @app.function(serialization='pickle')\ndef objects(x):\n    return {{x}}\n"
            ),
        )
        .unwrap();
        lode.cli_ok(&["deploy", path.to_str().unwrap()]);
    };
    victim("");
    let attacker = work.path().join("attacker.py");
    std::fs::write(
        &attacker,
        "import lode\napp = lode.App('attacker')\n\
         @app.function()\ndef steal(fn):\n    try:\n\
         \x20       args = [1] if fn == 'objects' else []\n\
         \x20       h = lode.Function.from_name('victim', fn, serialization='pickle' if args else 'json')\n\
         \x20       return repr(h.remote(*args))\n\
         \x20   except lode.RemoteError as e:\n        return 'refused ' + e.kind + ': ' + str(e)\n",
    )
    .unwrap();
    lode.cli_ok(&["deploy", attacker.to_str().unwrap()]);
    let stolen = lode.cli_ok(&["call", "attacker/steal", "secret"]);
    assert!(stolen.contains("refused forbidden"), "{stolen}");
    assert!(stolen.contains("allow_callers"), "{stolen}");
    // A Wasm guest of another app is refused the same way.
    lode.cli_ok(&[
        "deploy",
        &harness::repo_file("samples/wasm-fanout"),
        "--name",
        "fan",
    ]);
    let out = lode.cli(&["call", "fan/main", r#"{"n": 1, "target": "victim/secret"}"#]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("forbidden"),
        "{}",
        text(&out.stderr)
    );

    // Named by the callee, the JSON function answers; the pickle one still never does.
    victim("'attacker'");
    let allowed = lode.cli_ok(&["call", "attacker/steal", "secret"]);
    assert_eq!(allowed.trim(), "\"'victim data'\"");
    let pickled = lode.cli_ok(&["call", "attacker/steal", "objects"]);
    assert!(
        pickled.contains("refused forbidden") && pickled.contains("pickle"),
        "{pickled}"
    );
    // The operator's token reaches every function.
    assert_eq!(
        lode.cli_ok(&["call", "victim/secret"]).trim(),
        "\"victim data\""
    );
}

#[test]
fn outbound_reaches_the_internet_but_not_the_host_its_neighbours_or_metadata() {
    let test_host = TestHost::start(true);
    // The operator opens the test host's private range to grants; nothing else.
    let lode = start(&["--allow-net", &test_host.private_cidr]);
    let work = tempfile::tempdir().unwrap();
    busybox_tree(&work.path().join("image"));
    lode.ingest_image(&work.path().join("image"), "test/net");
    // An HTTP GET with busybox nc (its wget crashes in a static build).
    let get = |address: &str| format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {address} 80");
    let fetch = |address: &str, extra: &[&str]| -> String {
        let mut args = vec!["--net", "outbound"];
        args.extend_from_slice(extra);
        let script = get(address);
        args.extend_from_slice(&["test/net", "--", "sh", "-c", &script]);
        let out = lode.container_run(&args);
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    };
    // "The internet": a public address, routed to the test host.
    let public = fetch(&test_host.public, &[]);
    assert!(public.contains("test host"), "{public}");
    // Its neighbours, the metadata address and the host's own address: refused.
    for refused in [
        test_host.private.as_str(),
        "169.254.169.254",
        test_host.host_side.as_str(),
    ] {
        let out = fetch(refused, &[]);
        assert!(!out.contains("test host"), "{refused}: {out}");
    }
    // A container without network reaches nothing at all.
    let out = lode.container_run(&["test/net", "--", "sh", "-c", &get(&test_host.public)]);
    assert!(!text(&out.stdout).contains("test host"));
    // Allowed by CIDR, the neighbour answers (and only for that container).
    let allowed = fetch(
        &test_host.private,
        &["--allow-net", &test_host.private_cidr],
    );
    assert!(allowed.contains("test host"), "{allowed}");
    let again = fetch(&test_host.private, &[]);
    assert!(!again.contains("test host"), "{again}");
    // A tenant cannot grant itself what the operator did not open: metadata, the host.
    for grab in ["169.254.169.254", "127.0.0.1", "0.0.0.0/0"] {
        let out = fetch("169.254.169.254", &["--allow-net", grab]);
        assert!(
            out.contains("--allow-net CIDR covering it"),
            "{grab}: {out}"
        );
        assert!(!out.contains("test host"), "{grab}: {out}");
    }
    // --allow-net without --net outbound is a mistake, said so.
    let out = lode.container_run(&["--allow-net", "10.0.0.0/8", "test/net", "--", "true"]);
    assert!(
        text(&out.stderr).contains("--net outbound"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn limits_hold_by_default_and_manifests_stay_within_the_servers_bounds() {
    let lode = start(&[
        "--container-memory",
        "64",
        "--container-pids",
        "32",
        "--container-max-memory",
        "1024",
        "--max-containers",
        "4",
        "--allow-volume",
        "/tmp",
    ]);
    let work = tempfile::tempdir().unwrap();
    busybox_tree(&work.path().join("image"));
    lode.ingest_image(&work.path().join("image"), "test/limits");
    // No --memory: the server's default holds (the writable layer counts in it).
    let out = lode.container_run(&[
        "test/limits",
        "--",
        "dd",
        "if=/dev/zero",
        "of=/big",
        "bs=1M",
        "count=200",
    ]);
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("killed: out of memory (limit 64 MiB)"),
        "{}",
        text(&out.stderr)
    );
    // No --pids: a fork bomb stops at the server's default.
    let out = lode.container_run(&[
        "test/limits",
        "--",
        "sh",
        "-c",
        "for i in $(seq 100); do sleep 30 & done; wait",
    ]);
    assert!(
        text(&out.stderr).contains("process limit reached (limit 32 pids)"),
        "{}",
        text(&out.stderr)
    );
    // Asking past the server's maximum is refused before anything starts.
    let err = text(
        &lode
            .container_run(&["--memory", "4096", "test/limits", "--", "true"])
            .stderr,
    );
    assert!(
        err.contains("memory must be between 4 MiB and 1024 MiB"),
        "{err}"
    );
    let app = work.path().join("greedy.py");
    std::fs::write(
        &app,
        "import lode\napp = lode.App('greedy')\n\
         @app.function(memory=100000, max_containers=1000)\ndef f():\n    return 1\n",
    )
    .unwrap();
    let err = lode.cli_err(&["deploy", app.to_str().unwrap()]);
    assert!(err.contains("--container-max-memory"), "{err}");
    assert!(err.contains("--max-containers"), "{err}");

    // A volume whose path passes through a symlink is refused: it would be resolved again
    // when the container starts, after the check.
    let allowed = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::create_dir(allowed.path().join("real")).unwrap();
    std::os::unix::fs::symlink("/etc", allowed.path().join("link")).unwrap();
    // (The CLI resolves paths before it sends them; an API client need not.)
    let refused = |source: String| -> serde_json::Value {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let response = lode
                .api(reqwest::Method::POST, "/v1/containers")
                .json(
                    &serde_json::json!({"image": "test/limits", "argv": ["ls", "/x"],
                    "volumes": [{"source": source, "target": "/x", "read_only": true}]}),
                )
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(status, 403, "{body}");
            body
        })
    };
    let body = refused(allowed.path().join("link").display().to_string());
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("symlink"),
        "{body}"
    );
    let body = refused(format!("{}/real/../../../etc", allowed.path().display()));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outside"),
        "{body}"
    );
}

#[test]
fn build_steps_are_capped_and_leave_the_hosts_settings_out_of_the_image() {
    let lode = Lode::start_with_env(
        &[
            "--image-base-dir",
            BASE_DIR,
            "--build-memory",
            "128",
            "--build-disk",
            "64M",
        ],
        &[("NO_PROXY", "lode-test-proxy-marker.invalid")],
    );
    let work = tempfile::tempdir().unwrap();
    let failing = |name: &str, command: &str| {
        let spec = write_spec(
            work.path(),
            name,
            &format!(
                r#"{{"base": {{"debian_slim": {{"python_version": "3.11"}}}},
                    "steps": [{{"run_commands": {{"commands": [{command:?}]}}}}]}}"#
            ),
        );
        text(&lode.cli(&["image", "build", &spec]).stderr)
    };
    let err = failing("memory.json", "python3 -c 'b = bytearray(400 << 20)'");
    assert!(err.contains("out of memory (limit 128 MiB)"), "{err}");
    let err = failing("disk.json", "dd if=/dev/zero of=/big bs=1M count=200");
    assert!(err.contains("No space left on device"), "{err}");
    // A line with no end is cut, not held whole.
    let err = failing(
        "line.json",
        "head -c 100000 /dev/zero | tr '\\\\0' x; exit 1",
    );
    let longest = err.lines().map(str::len).max().unwrap_or(0);
    assert!(longest <= (16 << 10) + 64, "a {longest}-byte line");

    // A step that uses the host's pip settings and CA bundle: none of it stays in the image.
    let spec = write_spec(
        work.path(),
        "pip.json",
        r#"{"base": {"debian_slim": {"python_version": "3.11"}},
            "steps": [{"pip_install": {"packages": ["six"]}}]}"#,
    );
    let (digest, _) = lode.build_image(&spec, &[]);
    let out = work.path().join("export");
    lode.cli_ok(&["image", "export", &digest, out.to_str().unwrap()]);
    let host_bundle = std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap();
    let host_pip = std::fs::read("/etc/pip.conf").ok();
    let mut stack = vec![out.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                assert_ne!(
                    bytes,
                    host_bundle,
                    "{} is the host's CA bundle",
                    path.display()
                );
                if let Some(pip) = &host_pip {
                    assert_ne!(&bytes, pip, "{} is the host's pip.conf", path.display());
                }
                assert!(
                    !bytes
                        .windows(b"lode-test-proxy-marker".len())
                        .any(|w| w == b"lode-test-proxy-marker"),
                    "{} holds the host's proxy settings",
                    path.display()
                );
            }
        }
    }
    assert!(!out.join("dev/lode-build").exists());
}

/// The same attacks from inside a sandbox (the container tier): its processes join a running
/// container, so this also tries what only joining allows, reading a process that is still
/// the server's copy while it enters (`/proc/N/environ`, `mem`, `exe`), with the host serving
/// throughout.
#[test]
fn a_sandbox_holds_as_a_container_does_while_processes_join_it() {
    let lode = Lode::start_under_terminal(&["--image-base-dir", BASE_DIR]);
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("image");
    busybox_tree(&root);
    mknod(&root.join("etc/kmsg-copy"), 1, 11);
    lode.ingest_image(&root, "test/sbx");
    let id = lode
        .cli_ok(&["sandbox", "create", "test/sbx"])
        .trim()
        .to_string();
    let exec = |script: &str| lode.cli(&["sandbox", "exec", &id, "--", "sh", "-c", script]);
    // A watcher reads every process it can see, over and over, while others join.
    let watcher = "while :; do for p in /proc/[0-9]*; do \
         cat $p/environ >> /tmp/seen 2>/dev/null; \
         readlink $p/exe >> /tmp/seen 2>/dev/null; \
         tr '\\0' ' ' < $p/cmdline >> /tmp/seen 2>/dev/null; echo >> /tmp/seen; \
         done; done > /dev/null 2>&1 &";
    assert!(exec(watcher).status.success());
    for _ in 0..30 {
        assert!(exec("true").status.success());
    }
    let seen = exec("cat /tmp/seen; :");
    let seen = String::from_utf8_lossy(&seen.stdout).into_owned();
    let lode_binary = std::fs::canonicalize(harness::LODE).unwrap();
    for leak in [
        "LODE_LOG",
        lode_binary.to_str().unwrap(),
        "serve",
        "--data-dir",
    ] {
        let at = seen.find(leak);
        assert!(
            at.is_none(),
            "{leak:?} read from a joining process: {}",
            &seen[at.unwrap_or(0).saturating_sub(100)..][..200.min(seen.len())]
        );
    }
    // The hardening's attacks, from a joined process.
    let out = exec(
        "(: < /etc/kmsg-copy) 2>/dev/null && echo kmsg=opened; \
         (echo x > /dev/tty) 2>/dev/null && echo tty=opened; \
         mknod /tmp/n c 1 3 2>/dev/null && echo mknod=made; \
         mount -t tmpfs x /mnt 2>/dev/null && echo mount=done; \
         (echo 1 > /proc/sys/kernel/sysrq) 2>/dev/null && echo sysrq=written; \
         ls / | tr '\\n' ' '",
    );
    let stdout = text(&out.stdout);
    for opened in ["kmsg=", "tty=", "mknod=", "mount=", "sysrq="] {
        assert!(!stdout.contains(opened), "{stdout}");
    }
    assert!(!stdout.contains("lode-old-root"), "{stdout}");
    // The host's own files, by path, are nothing inside.
    let host_file = lode.dirs.path().join("data/token");
    let out = exec(&format!("cat {} || echo absent", host_file.display()));
    assert!(
        text(&out.stdout).contains("absent"),
        "{}",
        text(&out.stdout)
    );
    // And the server kept serving.
    lode.cli_ok(&["sandbox", "rm", &id]);
    lode.cli_ok(&["ls"]);
}

/// A snapshot walks a live sandbox's writable layer while its processes run. A process that
/// keeps swapping a directory for a symlink to `/` must not get the host's files into the
/// image: the walk opens every path beneath the layer with no symlink followed, so a swap
/// makes a snapshot fail as changed, or stores the symlink as a symlink.
#[tokio::test]
async fn a_snapshot_of_a_sandbox_swapping_in_symlinks_stores_nothing_of_the_host() {
    let lode = start(&[]);
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("image");
    busybox_tree(&root);
    lode.ingest_image(&root, "test/swap");
    let id = lode
        .cli_ok(&["sandbox", "create", "test/swap"])
        .trim()
        .to_string();
    // A decoy as large as the host's /etc/passwd: chunked files are read after the walk, by
    // then through whatever `a` has become; the files of /y make the walk long.
    let host = std::fs::read("/etc/passwd").unwrap();
    let decoy = vec![b'x'; host.len()];
    let swapper = format!(
        "mkdir -p /x/a/etc /y && head -c {} /dev/zero | tr '\\0' x > /x/a/etc/passwd && \
         i=0; while [ $i -lt 3000 ]; do : > /y/f$i; i=$((i+1)); done; cd /x && \
         (while :; do mv a b; ln -s / a; usleep 3000; rm a; mv b a; usleep 3000; done) \
         > /dev/null 2>&1 &",
        host.len()
    );
    let started = lode.cli(&["sandbox", "exec", &id, "--", "sh", "-c", &swapper]);
    assert!(started.status.success(), "{}", text(&started.stderr));
    let registry = lode.registry_client();
    let (mut stored, mut refused) = (0, 0);
    for _ in 0..40 {
        let out = lode.cli(&["sandbox", "snapshot", &id]);
        if !out.status.success() {
            let why = text(&out.stderr);
            assert!(why.contains("changed its files"), "{why}");
            refused += 1;
            continue;
        }
        stored += 1;
        let digest: lode_registry::Digest = text(&out.stdout).trim().parse().unwrap();
        let bytes = lode_registry::BlobAccess::get_index(&registry, &digest)
            .await
            .unwrap();
        let index = lode_fs::Index::parse(bytes).unwrap();
        for dir in ["x/a", "x/b"] {
            assert!(
                index.resolve(&format!("{dir}/proc")).is_none(),
                "snapshot {digest} holds the host's root at /{dir}"
            );
            let held = index
                .resolve(&format!("{dir}/etc/passwd"))
                .and_then(|entry| match entry.content() {
                    Some(lode_fs::Content::Chunks(chunks)) => {
                        Some(chunks.iter().map(|c| c.digest()).collect::<Vec<_>>())
                    }
                    _ => None,
                });
            if let Some(held) = held {
                assert_eq!(
                    held,
                    vec![lode_registry::Digest::of(&decoy)],
                    "snapshot {digest} holds the host's /etc/passwd ({stored} stored, {refused} \
                     refused)"
                );
            }
        }
    }
    assert!(stored > 0, "every snapshot was refused");
    eprintln!("{stored} snapshots stored, {refused} refused as changed");
}
