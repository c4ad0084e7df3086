//! `lode image build` and `lode container run` against a real `lode serve`, as root: real
//! debootstrap bases, build containers with network, lazy mounts, namespaces and cgroups.

mod harness;

use std::io::Write;
use std::path::Path;
use std::process::Output;

use harness::oci::oci_layout;
use harness::{BASE_DIR, Lode, text, write_spec};

fn start() -> Lode {
    Lode::start(&["--image-base-dir", BASE_DIR, "--allow-volume", "/tmp"])
}

fn build(lode: &Lode, spec: &str, extra: &[&str]) -> (String, String) {
    lode.build_image(spec, extra)
}

fn run(lode: &Lode, args: &[&str]) -> Output {
    lode.container_run(args)
}

fn python_image(lode: &Lode, dir: &Path) -> String {
    lode.python_image(dir)
}

#[test]
fn builds_are_cached_by_step_and_containers_run_on_the_result() {
    let lode = start();
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join("app")).unwrap();
    std::fs::write(work.path().join("app/main.py"), "print('from app')\n").unwrap();
    std::fs::write(work.path().join("settings.toml"), "mode = 'test'\n").unwrap();
    let steps = r#"
        {"run_commands": {"commands": ["echo built > /built.txt", "rm -rf /usr/share/common-licenses"]}},
        {"env": {"vars": {"GREETING": "hello"}}},
        {"add_local_dir": {"local": "app", "remote": "/srv/app"}},
        {"add_local_file": {"local": "settings.toml", "remote": "/etc/app/settings.toml"}},
        {"workdir": {"path": "/srv/app"}},
        {"pip_install": {"packages": ["six"]}},
        {"apt_install": {"packages": ["jq"]}}"#;
    let spec = write_spec(
        work.path(),
        "image.json",
        &format!(
            r#"{{"base": {{"debian_slim": {{"python_version": "3.11"}}}}, "steps": [{steps}]}}"#
        ),
    );
    let (digest, progress) = build(&lode, &spec, &["--tag", "test/app"]);
    assert!(digest.starts_with("blake3:"), "{digest}");
    assert!(
        progress.contains("Successfully installed six"),
        "{progress}"
    );

    // The same spec again: every step comes from the cache, nothing runs.
    let (again, progress) = build(&lode, &spec, &[]);
    assert_eq!(again, digest);
    assert_eq!(progress.matches("(cached)").count(), 8, "{progress}");
    assert!(!progress.contains("Successfully installed"), "{progress}");

    // One more package: everything before it is reused.
    let spec_more = write_spec(
        work.path(),
        "image-more.json",
        &format!(
            r#"{{"base": {{"debian_slim": {{}}}}, "steps": [{steps}, {{"uv_pip_install": {{"packages": ["idna"]}}}}]}}"#
        ),
    );
    let (more, progress) = build(&lode, &spec_more, &[]);
    assert_ne!(more, digest);
    assert_eq!(progress.matches("(cached)").count(), 8, "{progress}");
    // uv installs it, through the host's CA bundle, and leaves nothing of itself behind.
    assert!(progress.contains("+ idna=="), "{progress}");
    let out = run(
        &lode,
        &[
            &more,
            "--",
            "sh",
            "-c",
            "python3 -c 'import idna; print(idna.__name__)'; ls /tmp;              python3 -c 'import uv' 2>/dev/null || echo no-uv",
        ],
    );
    assert_eq!(text(&out.stdout), "idna\nno-uv\n", "{}", text(&out.stderr));

    let out = run(
        &lode,
        &[
            "--env",
            "EXTRA=1",
            "test/app",
            "--",
            "sh",
            "-c",
            "pwd; echo $GREETING $EXTRA; cat /built.txt /etc/app/settings.toml; \
             python3 main.py; python3 -c 'import six; print(six.__version__)'; \
             test -e /usr/share/common-licenses || echo deleted; \
             echo '{\"n\": 41}' | jq '.n + 1'; \
             stat -c '%n=%U:%G' /built.txt /usr/bin/jq /var/cache/apt/archives/partial; exit 7",
        ],
    );
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    for expected in [
        "/srv/app",
        "hello 1",
        "built",
        "mode = 'test'",
        "from app",
        "1.17",
        "deleted",
        "42",
        // Steps ran as a user namespace's ids; the image stores the namespace's own, so
        // root's files and apt's are theirs again when the image runs.
        "/built.txt=root:root",
        "/usr/bin/jq=root:root",
        "/var/cache/apt/archives/partial=_apt:",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?}:\n{stdout}");
    }
    // Build containers lend the host's CA bundle and pip settings; function containers do
    // not get them.
    let out = run(&lode, &["test/app", "--", "sh", "-c", "env; ls /dev"]);
    let stdout = text(&out.stdout);
    assert!(!stdout.contains("PIP_CERT"), "{stdout}");
    assert!(!stdout.contains("lode-build"), "{stdout}");
}

#[test]
fn a_failing_step_shows_its_command_and_output_and_caches_nothing() {
    let lode = start();
    let work = tempfile::tempdir().unwrap();
    let spec = write_spec(
        work.path(),
        "fail.json",
        r#"{"base": {"debian_slim": {}},
            "steps": [{"run_commands": {"commands": ["echo about to fail", "exit 3"]}}]}"#,
    );
    for _ in 0..2 {
        let err = lode.cli_err(&["image", "build", &spec]);
        assert!(err.contains("step 1 (run_commands"), "{err}");
        assert!(err.contains("exit code 3"), "{err}");
        assert!(err.contains("about to fail"), "{err}");
        assert!(err.contains("command: /bin/sh -exc"), "{err}");
        // Nothing was cached: the second attempt runs the step again.
        assert!(!err.contains("exit 3  (cached)"), "{err}");
    }
    let err = lode.cli_err(&[
        "image",
        "build",
        &write_spec(
            work.path(),
            "bad.json",
            r#"{"base": {"debian_slim": {"python_version": "2.7"}}}"#,
        ),
    ]);
    assert!(
        err.contains("supported versions: 3.11 (bookworm), 3.13 (trixie)"),
        "{err}"
    );
    let err = lode.cli_err(&[
        "image",
        "build",
        &write_spec(
            work.path(),
            "unknown.json",
            r#"{"base": {"image": {"reference": "no/such/image"}}}"#,
        ),
    ]);
    assert!(err.contains("no image \"no/such/image\""), "{err}");
}

#[test]
fn containers_are_isolated_and_each_limit_is_named() {
    let lode = start();
    let work = tempfile::tempdir().unwrap();
    python_image(&lode, work.path());
    let marker = work.path().join("host-only-marker");
    std::fs::write(&marker, b"host").unwrap();
    let api_port = lode.api.rsplit(':').next().unwrap().to_string();
    let probe = format!(
        r#"
import ctypes, os, resource, socket
libc = ctypes.CDLL(None, use_errno=True)
print("mount", libc.mount(b"none", b"/mnt", b"tmpfs", 0, None))
print("ptrace", libc.ptrace(0, 0, None, None))
print("unshare", libc.unshare(0x20000000))
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20)); print("rlimit raised")
except (ValueError, OSError):
    print("rlimit refused")
print("pids", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
try:
    socket.create_connection(("127.0.0.1", {api_port}), timeout=1); print("api reached")
except OSError:
    print("api unreachable")
print("host file", os.path.exists({marker:?}))
print("uid", os.getuid(), "host", socket.gethostname())
"#,
        marker = marker.display().to_string()
    );
    let out = run(&lode, &["test/py", "--", "python3", "-c", &probe]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    for expected in [
        "mount -1",
        "ptrace -1",
        "unshare -1",
        "rlimit refused",
        "pids [1]",
        "api unreachable",
        "host file False",
        "host lode",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?}:\n{stdout}");
    }

    let memory = run(
        &lode,
        &[
            "--memory",
            "64",
            "test/py",
            "--",
            "python3",
            "-c",
            "b = bytearray(512 << 20)",
        ],
    );
    assert_eq!(memory.status.code(), Some(137));
    assert!(
        text(&memory.stderr).contains("killed: out of memory (limit 64 MiB)"),
        "{}",
        text(&memory.stderr)
    );
    let forks = run(
        &lode,
        &[
            "--pids",
            "16",
            "test/py",
            "--",
            "python3",
            "-c",
            "import os, time\nfor _ in range(100):\n    if os.fork() == 0:\n        time.sleep(60); os._exit(0)",
        ],
    );
    assert!(
        text(&forks.stderr).contains("process limit reached (limit 16 pids)"),
        "{}",
        text(&forks.stderr)
    );
    let spin = run(
        &lode,
        &[
            "--cpu",
            "0.2",
            "--timeout",
            "1.5",
            "test/py",
            "--",
            "python3",
            "-c",
            "while True: pass",
        ],
    );
    assert_eq!(spin.status.code(), Some(137));
    assert!(
        text(&spin.stderr).contains("killed: timed out after 1.5s"),
        "{}",
        text(&spin.stderr)
    );
    // The host kept serving throughout, and nothing is left behind.
    lode.cli_ok(&["ls"]);
    assert_eq!(lode.leftovers(), Vec::<String>::new());

    // Limits out of range and bad volumes are refused before anything starts.
    let err = text(&run(&lode, &["--cpu", "0", "test/py", "--", "true"]).stderr);
    assert!(err.contains("cpu must be between"), "{err}");
    let bad = run(&lode, &["--volume", "relative:/x", "test/py", "--", "true"]);
    assert_eq!(bad.status.code(), Some(2));
    // Host paths outside --allow-volume are refused: a volume reaches what the server can.
    let err = text(&run(&lode, &["-v", "/etc:/host-etc:ro", "test/py", "--", "true"]).stderr);
    assert!(err.contains("--allow-volume"), "{err}");
    let err = text(&run(&lode, &["no-such-image", "--", "true"]).stderr);
    assert!(err.contains("no image \"no-such-image\""), "{err}");

    // A volume, read-only where asked; writes to the rest land on the host.
    let shared = work.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let ro = format!("{}:/ro:ro", marker.parent().unwrap().display());
    let rw = format!("{}:/data", shared.display());
    // The container's root is an unprivileged host uid, so a volume it may write must be
    // that uid's; the refusal says so before anything starts.
    let refused = run(&lode, &["-v", &rw, "test/py", "--", "true"]);
    assert_eq!(refused.status.code(), Some(125));
    let err = text(&refused.stderr);
    assert!(err.contains("chown 524288:524288"), "{err}");
    std::os::unix::fs::chown(&shared, Some(524_288), Some(524_288)).unwrap();
    let out = run(
        &lode,
        &[
            "-v",
            &ro,
            "-v",
            &rw,
            "test/py",
            "--",
            "sh",
            "-c",
            "cat /ro/host-only-marker; echo saved > /data/out; touch /ro/x 2>/dev/null || echo ro",
        ],
    );
    assert_eq!(text(&out.stdout), "hostro\n", "{}", text(&out.stderr));
    assert_eq!(std::fs::read(shared.join("out")).unwrap(), b"saved\n");
    let owner = std::fs::metadata(shared.join("out")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&owner), 524_288);
    // Inside, it is uid 0 of a user namespace, and the image's files are its own.
    let out = run(
        &lode,
        &[
            "test/py",
            "--",
            "sh",
            "-c",
            "id -u; stat -c %u /usr/bin; tr -s ' ' < /proc/self/uid_map",
        ],
    );
    assert_eq!(
        text(&out.stdout),
        "0\n0\n 0 524288 65536\n",
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_killed_server_leaves_nothing_after_it_restarts() {
    let mut lode = start();
    let work = tempfile::tempdir().unwrap();
    python_image(&lode, work.path());
    // A duration no other run uses, so an earlier run's container cannot be mistaken for it.
    let duration = (1000 + std::process::id() % 100_000).to_string();
    let mut running = std::process::Command::new(harness::LODE)
        .args(["container", "run", "test/py", "--", "sleep", &duration])
        .env("LODE_CONFIG", lode.client_file())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sleeping = || {
        let out = std::process::Command::new("pgrep")
            .args(["-x", "-f", &format!("sleep {duration}")])
            .output()
            .unwrap();
        !out.stdout.is_empty()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !sleeping() {
        assert!(
            std::time::Instant::now() < deadline,
            "the container never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    lode.kill();
    // The client sees its stream end and says so.
    assert_eq!(running.wait().unwrap().code(), Some(125));
    // Its cgroups stay until a server clears them. (Its processes may die on their own: a
    // page fault on the dead server's FUSE mount is SIGBUS.)
    assert!(!lode.leftovers().is_empty());
    lode.restart();
    assert_eq!(lode.leftovers(), Vec::<String>::new());
    assert!(!sleeping());
}

#[test]
fn an_oci_layout_is_imported_built_on_and_run() {
    let lode = start();
    let work = tempfile::tempdir().unwrap();
    oci_layout(&work.path().join("layout"), &[]);
    let spec = write_spec(
        work.path(),
        "oci.json",
        r#"{"base": {"from_oci": {"path": "layout"}},
            "steps": [{"run_commands": {"commands": ["echo step > /step.txt"]}}]}"#,
    );
    let (digest, _) = build(&lode, &spec, &["--tag", "test/oci"]);
    // No command: the image's own, with the image's environment.
    let out = run(&lode, &["test/oci"]);
    assert_eq!(
        text(&out.stdout),
        "from the image cmd yes\n",
        "{}",
        text(&out.stderr)
    );
    let out = run(&lode, &[&digest, "--", "cat", "/step.txt"]);
    assert_eq!(text(&out.stdout), "step\n", "{}", text(&out.stderr));

    // A layer that reaches out of the tree is refused, naming the entry; nothing escapes.
    let evil = work.path().join("evil");
    oci_layout(&evil, &[("../../escaped.txt", b"out")]);
    let tarball = work.path().join("evil.tar");
    let status = std::process::Command::new("tar")
        .args([
            "-C",
            evil.to_str().unwrap(),
            "-cf",
            tarball.to_str().unwrap(),
            ".",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let spec = write_spec(
        work.path(),
        "evil.json",
        &format!(
            r#"{{"base": {{"from_oci": {{"path": {:?}}}}}}}"#,
            tarball.display().to_string()
        ),
    );
    let err = lode.cli_err(&["image", "build", &spec]);
    assert!(err.contains("../../escaped.txt"), "{err}");
    assert!(!work.path().join("escaped.txt").exists());
    assert!(!Path::new("/tmp/escaped.txt").exists());
    let _ = std::io::stderr().flush();
}

#[test]
fn images_are_pulled_from_a_registry_with_token_auth() {
    let registry = harness::oci::TokenRegistry::start("alice", "s3cret");
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    oci_layout(&layout, &[("marker.txt", b"pulled from the registry\n")]);
    registry.push(&layout, "lode/busybox:1", "alice", "s3cret");
    let pushed_tokens = registry
        .tokens_issued
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        pushed_tokens > 0,
        "skopeo's push went through the token server"
    );

    let lode = Lode::start(&[
        "--image-base-dir",
        BASE_DIR,
        "--insecure-registry",
        &registry.address,
    ]);
    let image = format!("{}/lode/busybox:1", registry.address);
    let spec_for = |name: &str, secret: Option<&str>, reference: &str| {
        let secret = secret
            .map(|s| format!(r#", "secret": "{s}""#))
            .unwrap_or_default();
        write_spec(
            work.path(),
            name,
            &format!(
                r#"{{"base": {{"registry": {{"reference": "{reference}"{secret}}}}},
                    "steps": [{{"run_commands": {{"commands": ["echo step > /step.txt"]}}}}]}}"#
            ),
        )
    };

    // Without credentials the registry refuses, and the error says what to give.
    let anonymous = spec_for("anonymous.json", None, &image);
    let err = lode.cli_err(&["image", "build", &anonymous]);
    assert!(
        err.contains("refused an anonymous pull") && err.contains("REGISTRY_PASSWORD"),
        "{err}"
    );
    lode.cli_ok(&[
        "secret",
        "create",
        "wrongcred",
        "REGISTRY_USERNAME=alice",
        "REGISTRY_PASSWORD=nope",
    ]);
    let wrong = spec_for("wrong.json", Some("wrongcred"), &image);
    let err = lode.cli_err(&["image", "build", &wrong]);
    assert!(
        err.contains(r#"refused the credentials from secret "wrongcred""#),
        "{err}"
    );
    assert!(
        !err.contains("nope"),
        "the password stays out of errors: {err}"
    );
    let missing_secret = spec_for("nosecret.json", Some("nosuch"), &image);
    let err = lode.cli_err(&["image", "build", &missing_secret]);
    assert!(err.contains(r#"secret "nosuch" does not exist"#), "{err}");

    // With them, the image is pulled, built on, and runs with its own config.
    lode.cli_ok(&[
        "secret",
        "create",
        "regcred",
        "REGISTRY_USERNAME=alice",
        "REGISTRY_PASSWORD=s3cret",
    ]);
    let good = spec_for("good.json", Some("regcred"), &image);
    let (digest, progress) = build(&lode, &good, &["--tag", "test/pulled"]);
    assert!(
        progress.contains("from_registry") && progress.contains("pulling 1 layers"),
        "{progress}"
    );
    let out = run(
        &lode,
        &["test/pulled", "--", "cat", "/marker.txt", "/step.txt"],
    );
    assert_eq!(
        text(&out.stdout),
        "pulled from the registry\nstep\n",
        "{}",
        text(&out.stderr)
    );
    let out = run(&lode, &["test/pulled"]);
    assert_eq!(
        text(&out.stdout),
        "from the image cmd yes\n",
        "{}",
        text(&out.stderr)
    );

    // A rebuild asks the registry what the tag names now, and pulls nothing more.
    let (again, progress) = build(&lode, &good, &[]);
    assert_eq!(again, digest);
    assert!(
        progress.contains("(cached)") && !progress.contains("pulling"),
        "{progress}"
    );

    // A moved tag is pulled anew.
    let moved = work.path().join("moved");
    oci_layout(&moved, &[("marker.txt", b"the tag moved\n")]);
    registry.push(&moved, "lode/busybox:1", "alice", "s3cret");
    let (moved_digest, _) = build(&lode, &good, &["--tag", "test/moved"]);
    assert_ne!(moved_digest, digest);
    let out = run(&lode, &["test/moved", "--", "cat", "/marker.txt"]);
    assert_eq!(
        text(&out.stdout),
        "the tag moved\n",
        "{}",
        text(&out.stderr)
    );

    // What does not exist, and a registry that is not there, say so.
    let nope = spec_for(
        "nope.json",
        Some("regcred"),
        &format!("{}/lode/nothing:1", registry.address),
    );
    let err = lode.cli_err(&["image", "build", &nope]);
    assert!(err.contains("lode/nothing:1 does not exist"), "{err}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = spec_for(
        "down.json",
        None,
        &format!("127.0.0.1:{closed}/lode/busybox:1"),
    );
    let err = lode.cli_err(&["image", "build", &down]);
    assert!(
        err.contains(&format!("cannot reach registry 127.0.0.1:{closed}"))
            && err.contains("--insecure-registry"),
        "{err}"
    );
    let bad = spec_for("bad.json", None, "UPPER/Case:tag:x");
    let err = lode.cli_err(&["image", "build", &bad]);
    assert!(err.contains("is not an image reference"), "{err}");
}
