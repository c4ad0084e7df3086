//! The Wasm tier of sandboxes through a real `lode serve`: an image made with
//! `{"base": {"wasm": {}}}` and a WASI command in it, run through the CLI, the API and the
//! Python SDK as the container tier is; its limits stop commands by name, and the attacks
//! of the security suite fail inside it while the host serves throughout.

mod harness;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use harness::{Lode, sample, text, wait_for, write_spec};
use reqwest::Method;
use serde_json::Value;

/// A server with the `wasi-tools` sample in a Wasm image tagged `test/wasm`.
fn server(extra: &[&str]) -> (Lode, tempfile::TempDir) {
    let lode = Lode::start(extra);
    let work = tempfile::tempdir().unwrap();
    std::fs::copy(sample("wasi-tools"), work.path().join("wasi-tools.wasm")).unwrap();
    std::fs::write(work.path().join("junk.wasm"), b"not wasm at all").unwrap();
    let spec = write_spec(
        work.path(),
        "image.json",
        r#"{"base": {"wasm": {}}, "steps": [
            {"add_local_file": {"local": "wasi-tools.wasm", "remote": "/usr/local/bin/wasi-tools.wasm"}},
            {"add_local_file": {"local": "junk.wasm", "remote": "/usr/local/bin/junk.wasm"}}
        ]}"#,
    );
    lode.build_image(&spec, &["--tag", "test/wasm"]);
    (lode, work)
}

fn create(lode: &Lode, args: &[&str]) -> String {
    let mut all = vec!["sandbox", "create", "test/wasm"];
    all.extend_from_slice(args);
    lode.cli_ok(&all).trim().to_string()
}

fn tools(lode: &Lode, id: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["sandbox", "exec", id, "--", "wasi-tools"];
    all.extend_from_slice(args);
    lode.cli(&all)
}

async fn info(lode: &Lode, id: &str) -> Value {
    lode.api(Method::GET, &format!("/v1/sandboxes/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_wasm_sandbox_runs_commands_over_its_image_and_keeps_its_files() {
    let (lode, work) = server(&[]);
    let id = create(&lode, &["--app", "grader", "--tag", "run=1"]);
    assert_eq!(info(&lode, &id).await["tier"], "wasm");

    // One command leaves a file; the next reads it. Exit codes and stderr come back.
    let out = tools(&lode, &id, &["write", "/work/n.txt", "41"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = tools(&lode, &id, &["cat", "/work/n.txt"]);
    assert_eq!(text(&out.stdout), "41\n");
    let out = tools(&lode, &id, &["exit", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let out = tools(&lode, &id, &["nope"]);
    assert_eq!(text(&out.stderr), "wasi-tools nope: no tool \"nope\"\n");
    // Its environment is the image's and the request's, with its working directory.
    let out = lode.cli_ok(&[
        "sandbox",
        "exec",
        &id,
        "-e",
        "GREETING=hi",
        "--",
        "wasi-tools",
        "env",
    ]);
    assert_eq!(
        out,
        "PATH=/usr/local/bin:/usr/bin:/bin\nGREETING=hi\nPWD=/work\n"
    );

    // Files in and out through the files API and `lode sandbox cp`.
    let local = work.path().join("data.csv");
    std::fs::write(&local, "a,b\n1,2\n").unwrap();
    lode.cli_ok(&[
        "sandbox",
        "cp",
        local.to_str().unwrap(),
        &format!("{id}:/tmp/data.csv"),
    ]);
    let out = tools(&lode, &id, &["cat", "/tmp/data.csv"]);
    assert_eq!(text(&out.stdout), "a,b\n1,2\n");
    let back = work.path().join("back.txt");
    lode.cli_ok(&[
        "sandbox",
        "cp",
        &format!("{id}:/work/n.txt"),
        back.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "41\n");
    let files =
        |method: Method, query: &str| lode.api(method, &format!("/v1/sandboxes/{id}/files{query}"));
    let made = lode
        .api(
            Method::POST,
            &format!("/v1/sandboxes/{id}/files/mkdir?path=/work/a/b"),
        )
        .send()
        .await
        .unwrap();
    assert!(made.status().is_success());
    let listing: Value = files(Method::GET, "?path=/work&op=ls")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "n.txt"]);
    let stat: Value = files(Method::GET, "?path=/usr/local/bin/wasi-tools.wasm&op=stat")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stat["kind"], "file");
    // The image's directories are read-only; the rest of the tree is the sandbox's own, and a
    // command starts in its root, so a relative path lands there.
    let refused = files(Method::PUT, "?path=/usr/local/bin/x")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    assert!(refused.text().await.unwrap().contains("read-only"));
    let out = tools(&lode, &id, &["write", "/usr/x", "no"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let out = tools(&lode, &id, &["write", "notes.txt", "relative"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let read = files(Method::GET, "?path=/notes.txt").send().await.unwrap();
    assert_eq!(read.text().await.unwrap(), "relative\n");
    let out = tools(&lode, &id, &["ls", "/"]);
    assert_eq!(text(&out.stdout), "etc\nnotes.txt\ntmp\nusr\nwork\n");
    let removed = files(Method::DELETE, "?path=/work/a").send().await.unwrap();
    assert!(removed.status().is_success());
    assert_eq!(
        files(Method::GET, "?path=/work/a&op=stat")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // What is not a command is named.
    let err = lode.cli_err(&["sandbox", "exec", &id, "--", "python"]);
    assert!(err.contains("no command \"python\""), "{err}");
    let err = lode.cli_err(&["sandbox", "exec", &id, "--", "junk"]);
    assert!(err.contains("is not a WASI command"), "{err}");
    // The container tier's options are refused by name, never ignored.
    let err = lode.cli_err(&["sandbox", "create", "test/wasm", "--cpu", "1"]);
    assert!(
        err.contains("cpu is not available in the Wasm tier"),
        "{err}"
    );
    let err = lode.cli_err(&["sandbox", "create", "test/wasm", "--net", "outbound"]);
    assert!(err.contains("network is not available"), "{err}");
    let err = lode.cli_err(&["sandbox", "exec", "-t", &id, "--", "wasi-tools", "true"]);
    assert!(err.contains("a WASI command has no terminal"), "{err}");

    // The SDK drives it as it drives a container sandbox.
    let out = lode.sdk_python(&format!(
        r#"
import lode
sb = lode.Sandbox.from_id("{id}")
p = sb.exec("wasi-tools", "cat", "/tmp/data.csv")
print("out", p.stdout.read().strip().replace("\n", "|"), "code", p.wait())
with sb.open("/work/sdk.txt", "w") as f:
    f.write("from the sdk")
print("read", sb.exec("wasi-tools", "cat", "/work/sdk.txt").stdout.read())
img = sb.snapshot_filesystem()
sb.terminate()
print("ended", sb.poll() is not None)
again = lode.Sandbox.create(app="grader", image=img)
print("snapshot", again.exec("wasi-tools", "cat", "/work/sdk.txt", "/work/n.txt").stdout.read().replace("\n", "|"))
"#
    ));
    assert_eq!(
        text(&out.stdout),
        "out a,b|1,2 code 0\nread from the sdk\nended True\nsnapshot from the sdk41|\n",
        "{}",
        text(&out.stderr)
    );
    assert_eq!(info(&lode, &id).await["ended_by"], "terminated");
}

#[tokio::test]
async fn stdin_streams_to_a_long_running_command() {
    let (lode, _work) = server(&[]);
    let id = create(&lode, &[]);
    // A session that keeps state between inputs, as a code interpreter does.
    let mut child = lode
        .cli_command(&["sandbox", "exec", "-i", &id, "--", "wasi-tools", "session"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"1\n2\nx\n3\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert_eq!(
        text(&out.stdout),
        "total 1\ntotal 3\nnot a number: x\ntotal 3\ntotal 6\n"
    );
}

#[tokio::test]
async fn limits_stop_commands_by_name_and_the_host_serves_throughout() {
    let (mut lode, _work) = server(&["--sandbox-max-output", "1M"]);
    let id = create(&lode, &["--memory", "32"]);
    let stopped = |args: &[&str]| {
        let out = tools(&lode, &id, args);
        assert_eq!(
            out.status.code(),
            Some(137),
            "{args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stderr)
    };
    // Memory, fuel and its timeout each stop a command, named; the sandbox lives on.
    assert!(stopped(&["alloc", "64"]).contains("out of memory"));
    let out = lode.cli(&[
        "sandbox",
        "exec",
        &id,
        "--fuel",
        "1000000",
        "--",
        "wasi-tools",
        "spin",
    ]);
    assert!(
        text(&out.stderr).contains("out of fuel (1000000 units)"),
        "{}",
        text(&out.stderr)
    );
    let out = lode.cli(&[
        "sandbox",
        "exec",
        &id,
        "--timeout",
        "300ms",
        "--",
        "wasi-tools",
        "spin",
    ]);
    assert!(
        text(&out.stderr).contains("timed out after 0.3s"),
        "{}",
        text(&out.stderr)
    );
    // A command waiting in a host call (here, for stdin that never comes) is stopped too.
    let mut waiting = lode
        .cli_command(&[
            "sandbox",
            "exec",
            "-i",
            &id,
            "--timeout",
            "300ms",
            "--",
            "wasi-tools",
            "cat",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let held_stdin = waiting.stdin.take();
    let out = waiting.wait_with_output().unwrap();
    drop(held_stdin);
    assert_eq!(out.status.code(), Some(137));
    assert!(
        text(&out.stderr).contains("timed out after 0.3s"),
        "{}",
        text(&out.stderr)
    );
    let err = lode.cli_err(&[
        "sandbox",
        "exec",
        &id,
        "-w",
        "/work",
        "--",
        "wasi-tools",
        "true",
    ]);
    assert!(
        err.contains("workdir is not available in the Wasm tier"),
        "{err}"
    );
    // Output past the server's limit per process is dropped and counted.
    let out = tools(&lode, &id, &["spew", "3"]);
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), 1 << 20);
    assert!(
        text(&out.stderr).contains("2097152 bytes of output were dropped"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(info(&lode, &id).await["status"], "running");
    // The host answers its API while a command spins.
    let spinning = lode
        .cli_command(&["sandbox", "exec", &id, "--", "wasi-tools", "spin"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let listed = lode.api(Method::GET, "/v1/sandboxes").send().await.unwrap();
    assert_eq!(listed.status(), 200);
    // Terminating the sandbox stops what runs in it, named.
    lode.cli_ok(&["sandbox", "rm", &id]);
    let out = spinning.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(137));
    assert!(
        text(&out.stderr).contains("the sandbox ended (terminated)"),
        "{}",
        text(&out.stderr)
    );
    let err = lode.cli_err(&["sandbox", "exec", &id, "--", "wasi-tools", "echo"]);
    assert!(err.contains("has ended (terminated)"), "{err}");

    // Its lifetime ends it by name, and a restart leaves nothing of it on the host.
    let short = create(&lode, &["--timeout", "1s"]);
    let ended = wait_for(Duration::from_secs(10), || {
        let out = lode.cli_ok(&["sandbox", "ls"]);
        out.lines()
            .any(|l| l.contains(&short) && l.contains("timeout (1s)"))
            .then_some(())
    });
    assert!(ended.is_some(), "{}", lode.cli_ok(&["sandbox", "ls"]));
    let running = create(&lode, &[]);
    tools(&lode, &running, &["write", "/tmp/x", "y"]);
    lode.kill();
    lode.restart();
    assert_eq!(info(&lode, &running).await["ended_by"], "restart");
    assert!(lode.leftovers().is_empty(), "{:?}", lode.leftovers());
}

#[tokio::test]
async fn attacks_from_inside_the_wasm_tier_fail() {
    let (lode, _work) = server(&["--container-disk", "64M"]);
    let id = create(&lode, &[]);
    let fails = |args: &[&str]| {
        let out = tools(&lode, &id, args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?} succeeded: {}",
            text(&out.stdout)
        );
        text(&out.stderr)
    };
    // No host file: not by path, not by '..', not through /proc.
    for path in ["/etc/passwd", "/proc/self/environ", "/../../../etc/passwd"] {
        fails(&["read", path]);
    }
    assert!(fails(&["read", "/work/../../etc/passwd"]).contains("not permitted"));
    // No sockets: not to the host's loopback, not anywhere.
    for target in ["127.0.0.1:22", "10.0.0.1:80"] {
        fails(&["connect", target]);
    }
    // No host environment: only what the image and the request give.
    let env = text(&tools(&lode, &id, &["env"]).stdout);
    assert!(!env.contains("LODE") && !env.contains("HOME"), "{env}");
    // The writable layer is bounded: filling it fails the write, not the host.
    let files = |query: &str| lode.api(Method::PUT, &format!("/v1/sandboxes/{id}/files{query}"));
    let big = vec![b'x'; 16 << 20];
    let mut filled = 0;
    for i in 0..10 {
        let response = files(&format!("?path=/tmp/fill{i}"))
            .body(big.clone())
            .send()
            .await
            .unwrap();
        if response.status() == 507 {
            break;
        }
        assert!(response.status().is_success(), "{}", response.status());
        filled += 1;
    }
    assert!(filled < 10, "the writable layer took 160 MB past its 64 MB");
    // And the sandbox still answers.
    assert_eq!(
        text(&tools(&lode, &id, &["echo", "alive"]).stdout),
        "alive\n"
    );
}

/// Python in both tiers: `samples/sandbox-grader` grades its submissions in each, one
/// sandbox per submission and tier, in parallel; `samples/code-interpreter` keeps a session's
/// globals in each; and the Wasm tier's Python imports numpy.
#[test]
fn python_runs_in_both_tiers_for_the_grader_and_the_code_interpreter() {
    // The interpreter compiles once per machine (a minute or two): the cache is shared.
    let lode = Lode::start(&[
        "--image-base-dir",
        harness::BASE_DIR,
        "--command-cache",
        "/var/cache/lode/compiled-commands",
    ]);
    let work = tempfile::tempdir().unwrap();
    lode.python_image(work.path());
    let spec = write_spec(
        work.path(),
        "wasm-py.json",
        r#"{"base": {"wasm_python": {}}}"#,
    );
    lode.build_image(&spec, &["--tag", "test/wasm-py"]);
    // The scientific stack comes with the Wasm tier's Python; this first command also loads
    // (or compiles) the interpreter, before the samples time their sandboxes.
    let id = lode
        .cli_ok(&["sandbox", "create", "test/wasm-py", "--timeout", "20m"])
        .trim()
        .to_string();
    let out = lode.cli_ok(&[
        "sandbox",
        "exec",
        &id,
        "--",
        "python",
        "-c",
        "import numpy; print(numpy.arange(6).reshape(2, 3).sum())",
    ]);
    assert_eq!(out, "15\n");
    let sample = |path: &str, args: &str| {
        let path = harness::repo_file(path);
        let out = lode.sdk_python(&format!(
            "import runpy, sys; sys.argv = [{path:?}, '--image', 'test/py', '--wasm-image', \
             'test/wasm-py'{args}]; runpy.run_path({path:?}, run_name='__main__')"
        ));
        let shown = text(&out.stdout);
        assert!(out.status.success(), "{shown}\n{}", text(&out.stderr));
        shown
    };

    let table = sample("samples/sandbox-grader/grade.py", "");
    for tier in ["container", "wasm"] {
        let verdict = |name: &str| {
            table
                .lines()
                .find(|l| l.starts_with(name) && l.contains(tier))
                .unwrap_or_else(|| panic!("no row for {name} in {tier}:\n{table}"))
                .to_string()
        };
        assert!(
            verdict("correct").contains("3/3") && verdict("correct").ends_with("pass"),
            "{table}"
        );
        assert!(verdict("off_by_one").contains("wrong: '8'"), "{table}");
        assert!(verdict("crashes").contains("ZeroDivisionError"), "{table}");
        assert!(
            verdict("never_ends").contains("killed (time limit)"),
            "{table}"
        );
        assert!(
            verdict("escapes").ends_with("pass"),
            "the escapes found nothing: {table}"
        );
    }
    let listed = lode.cli_ok(&["sandbox", "ls", "--app", "grader"]);
    assert!(!listed.contains("running"), "{listed}");

    let session = sample("samples/code-interpreter/interpreter.py", "");
    let expected = "x = 6                            -> -\n\
                    print(y)                         -> 42\n\
                    print(statistics.mean([x, y]))   -> 24\n\
                    print(undefined_name)            -> - ! NameError: name 'undefined_name' is not defined\n\
                    print('still here, x =', x)      -> still here, x = 6\n";
    assert_eq!(
        session,
        format!("== container\n{expected}== wasm\n{expected}"),
    );
}
