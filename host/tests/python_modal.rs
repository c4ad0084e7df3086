//! The Modal surface of Python functions, through a real `lode serve`: classes, Dicts and
//! Queues, generators, `lode dev`, registry images, `run_function`, and sandboxes made from
//! inside functions.

mod harness;

use std::path::Path;
use std::time::{Duration, Instant};

use harness::python::{run_expecting, start};
use harness::{BASE_DIR, repo_file, text};

#[test]
fn classes_share_a_pool_enter_once_exit_on_scale_down_and_runs_are_ephemeral() {
    let lode = start(&[]);
    let app = repo_file("samples/python-cls/app.py");
    lode.cli_ok(&["deploy", &app]);
    assert_eq!(
        lode.cli_ok(&["call", "python-cls/Model.predict", "7"])
            .trim(),
        "7"
    );
    let info: serde_json::Value =
        serde_json::from_str(&lode.cli_ok(&["call", "python-cls/Model.info"])).unwrap();
    assert_eq!(info["loads"], 1, "{info}");
    // A method the class does not mark is refused by name, and so is a class without one.
    let err = lode.cli(&["call", "python-cls/Model.load"]);
    assert_eq!(err.status.code(), Some(1));
    assert!(
        text(&err.stderr).contains("has no method \"load\" (it has: predict, predict_many, info)"),
        "{}",
        text(&err.stderr)
    );
    let err = lode.cli(&["call", "python-cls/Model"]);
    assert!(
        text(&err.stderr).contains("is a class; name one of its methods"),
        "{}",
        text(&err.stderr)
    );

    // `lode run` deploys its own app: the async entrypoint runs to its end, and the deployed
    // app keeps serving, untouched.
    let stderr = run_expecting(
        &lode,
        &[&app, "--x", "5"],
        &[
            "predict: 5",
            "scaled: 15",
            "map: [0, 1, 2, 3]",
            "many: [5, 6]",
            // Two parameter sets, each entered once, in the one container of the class.
            "loads: 1 1 one container: True",
            "with_options: its own container: True",
        ],
    );
    assert!(stderr.contains("-run-"), "{stderr}");
    let apps = lode.cli_ok(&["ls"]);
    assert!(!apps.contains("-run-"), "the ephemeral app stayed:\n{apps}");
    assert!(apps.contains("python-cls"), "{apps}");
    // Options from a handle to the deployed class: a pool per option set, kept and reused,
    // with the secrets they add; what the server's bounds refuse is named.
    lode.cli_ok(&["secret", "create", "cls-extra", "CLS_EXTRA=from-the-secret"]);
    let out = lode.sdk_python(
        r#"
import lode
Model = lode.Cls.from_name("python-cls", "Model")
base = Model().info.remote()
extra = Model.with_options(memory=320, secrets=[lode.Secret.from_name("cls-extra")])
a = extra().info.remote()
b = extra(scale=2).info.remote()
print("variant:", a["container"] != base["container"], a["container"] == b["container"])
print("secret:", a["extra"], base["extra"])
try:
    Model.with_options(memory=10**7)().info.remote()
except Exception as e:
    print("refused:", e)
"#,
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    for line in [
        "variant: True True",
        "secret: from-the-secret None",
        "refused: invalid_options: with_options:",
        "(lode serve --container-max-memory)",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }

    // One function of a file without an entrypoint is called by name, options by parameter.
    let run = lode.cli(&["run", &format!("{app}::Model.predict"), "--x", "3"]);
    assert_eq!(text(&run.stdout).trim(), "3", "{}", text(&run.stderr));

    // Idle past its window, the container stops gently: the exit hook runs.
    let unloaded = harness::wait_for(Duration::from_secs(20), || {
        let logs = lode.cli_ok(&["logs", "python-cls"]);
        logs.contains("unloading weights for scale=1").then_some(())
    });
    assert!(
        unloaded.is_some(),
        "{}",
        lode.cli_ok(&["logs", "python-cls"])
    );
}

#[test]
fn dicts_queues_and_generators_work_from_client_and_container_and_survive_a_restart() {
    let mut lode = start(&[]);
    let app = repo_file("host/tests/python/objects.py");
    lode.cli_ok(&["deploy", &app]);
    run_expecting(
        &lode,
        &[&app],
        &[
            "put skipped: True",
            "worker saw: 4",
            "result: {'key': 'b', 'factor': 30}",
            "tuple key: b'\\x00bytes'",
            "missing key: 'missing'",
            "not found: True",
            "async worker: 6",
            "empty after timeout",
            "len: 4 0",
            "countdown: [3, 2, 1]",
            "ticks: [0, 10, 20]",
            "relayed: [2, 1]",
            "remote on a generator: Function(",
            "by name: True",
            "flaky: 3",
            "scratch: 14",
            "cancelled: cancelled",
            "gather: ['first', 'third']",
            "second ran: False",
        ],
    );
    // A script that runs itself with `with app.run():` gets an app of its own for the block.
    let script = repo_file("host/tests/python/script_run.py");
    let sdk = lode::sdk::extract(&lode.data_dir().join("script-sdk")).unwrap();
    let ran = std::process::Command::new("python3")
        .arg(&script)
        .env("PYTHONPATH", &sdk)
        .env("LODE_CONFIG", lode.client_file())
        .env("LODE_BIN", harness::LODE)
        .env_remove("LODE_API")
        .env_remove("LODE_TOKEN")
        .output()
        .unwrap();
    assert_eq!(
        text(&ran.stdout),
        "double: 42\nephemeral: True\nafter: False\n",
        "{}",
        text(&ran.stderr)
    );
    assert!(!lode.cli_ok(&["ls"]).contains("script-run"));
    // The CLI reads and writes the same objects, as JSON.
    assert_eq!(
        lode.cli_ok(&["dict", "get", "obj-settings", "a"]).trim(),
        "2"
    );
    let missing = lode.cli(&["dict", "get", "obj-settings", "zzz"]);
    assert_eq!(missing.status.code(), Some(1));
    lode.cli_ok(&["queue", "put", "obj-jobs", "7", "{\"x\": 1}"]);
    assert_eq!(lode.cli_ok(&["queue", "len", "obj-jobs"]).trim(), "2");
    let listed = lode.cli_ok(&["dict", "ls"]);
    assert!(listed.contains("obj-settings"), "{listed}");
    // The function's ephemeral Dict went at the end of its block.
    assert!(!listed.contains("ephemeral-"), "{listed}");

    // Both are durable: a restart keeps them.
    lode.kill();
    lode.restart();
    assert_eq!(
        lode.cli_ok(&["queue", "peek", "obj-jobs"]),
        "7\n{\"x\":1}\n"
    );
    assert_eq!(
        lode.cli_ok(&["dict", "get", "obj-settings", "c"]).trim(),
        "4"
    );
    lode.cli_ok(&["dict", "rm", "obj-settings"]);
    let gone = lode.cli(&["dict", "get", "obj-settings", "c"]);
    assert!(
        text(&gone.stderr).contains("no Dict named"),
        "{}",
        text(&gone.stderr)
    );
}

#[test]
fn lode_dev_redeploys_on_save_keeps_the_last_good_version_and_removes_the_app_at_ctrl_c() {
    let lode = start(&[]);
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("devloop.py");
    let source = |version: &str| {
        format!(
            "import lode\n\nimage = lode.Image.debian_slim().add_local_python_source(\"helper\")\n\
             app = lode.App(\"devloop\", image=image)\n\nwith image.imports():\n    import helper\n\n\n\
             @app.function()\n@lode.fastapi_endpoint(method=\"GET\")\n\
             def hello():\n    return {{\"version\": {version}, \"helper\": helper.NAME}}\n"
        )
    };
    std::fs::write(&file, source("1")).unwrap();
    std::fs::write(work.path().join("helper.py"), "NAME = 'a'\n").unwrap();
    let dev = lode
        .cli_command(&["dev", file.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer = || {
        rt.block_on(async {
            let response = lode
                .public(reqwest::Method::GET, "/devloop-dev/hello")
                .timeout(Duration::from_secs(20))
                .send()
                .await;
            match response {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(e) => e.to_string(),
            }
        })
    };
    let serving = |expected: &str| {
        harness::wait_for(Duration::from_secs(30), || {
            answer().contains(expected).then_some(())
        })
        .is_some()
    };
    assert!(serving(r#""version":1"#), "{}", answer());
    // A save is live again within a second or so (the figure goes to the test log).
    let saved = Instant::now();
    std::fs::write(&file, source("2")).unwrap();
    assert!(serving(r#""version":2"#), "{}", answer());
    eprintln!("save to new code answering: {:?}", saved.elapsed());
    // A local module it imports is watched too.
    std::fs::write(work.path().join("helper.py"), "NAME = 'b'\n").unwrap();
    assert!(serving(r#""helper":"b""#), "{}", answer());
    // A save that does not load is shown; the last good version keeps serving.
    std::fs::write(&file, "import lode\napp = lode.App(\"devloop\"\n").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(answer().contains(r#""version":2"#), "{}", answer());
    std::fs::write(&file, source("3")).unwrap();
    assert!(serving(r#""version":3"#), "{}", answer());
    // Ctrl-C removes the app and exits 0.
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    unsafe { libc::kill(dev.id() as i32, libc::SIGINT) };
    let out = dev.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("SyntaxError"), "{stderr}");
    assert!(
        stderr.contains("the last good version keeps serving"),
        "{stderr}"
    );
    assert!(stderr.contains("devloop-dev removed"), "{stderr}");
    assert!(!lode.cli_ok(&["ls"]).contains("devloop-dev"));
}

#[test]
fn a_function_runs_on_an_image_pulled_from_a_registry() {
    let registry = harness::oci::TokenRegistry::start("bob", "hunter2");
    let lode = start(&["--insecure-registry", &registry.address]);
    let work = tempfile::tempdir().unwrap();
    // The Debian base with Python, made once per machine, pushed as a one-layer image: what
    // `python:3.12-slim` is to Docker Hub.
    lode.python_image(work.path());
    let layout = work.path().join("layout");
    harness::oci::oci_layout_of_tree(
        &layout,
        &Path::new(BASE_DIR).join("bookworm"),
        &[
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "FROM_REGISTRY=yes",
        ],
    );
    registry.push(&layout, "lode/python:3.11", "bob", "hunter2");
    lode.cli_ok(&[
        "secret",
        "create",
        "regcred",
        "REGISTRY_USERNAME=bob",
        "REGISTRY_PASSWORD=hunter2",
    ]);
    let app = work.path().join("registry_app.py");
    std::fs::write(
        &app,
        format!(
            r#"import lode as modal

app = modal.App("from-registry")
image = modal.Image.from_registry(
    "{address}/lode/python:3.11", secret=modal.Secret.from_name("regcred")
).env({{"STEP": "on-top"}})


@app.function(image=image)
def where() -> str:
    import os
    import sys

    debian = open("/etc/debian_version").read().strip().split(".")[0]
    return f"debian {{debian}} {{os.environ['FROM_REGISTRY']}} {{os.environ['STEP']}} python {{sys.version_info[0]}}"


@app.local_entrypoint()
def main():
    print("answer:", where.remote())
"#,
            address = registry.address
        ),
    )
    .unwrap();
    run_expecting(
        &lode,
        &[app.to_str().unwrap()],
        &["answer: debian 12 yes on-top python 3"],
    );
}

#[test]
fn run_function_prepares_an_image_once_and_fails_with_the_functions_error() {
    let lode = start(&[]);
    lode.cli_ok(&["secret", "create", "hub", "MODEL_TOKEN=tok-secret-value"]);
    let work = tempfile::tempdir().unwrap();
    let app = work.path().join("prepared.py");
    let source = std::fs::read_to_string(repo_file("host/tests/python/run_function.py")).unwrap();
    std::fs::write(&app, &source).unwrap();
    let app = app.to_str().unwrap();
    let stderr = run_expecting(&lode, &[app], &["model: tok-xxxx"]);
    assert!(stderr.contains("downloaded tiny in container"), "{stderr}");
    assert!(stderr.contains("with token ***"), "{stderr}");
    assert!(!stderr.contains("tok-secret-value"), "{stderr}");

    // An edit elsewhere in the file leaves the step cached; an edit to the function runs it
    // again.
    std::fs::write(
        app,
        source.replace(
            "print(\"model:\"",
            "print(\"edited\")\n    print(\"model:\"",
        ),
    )
    .unwrap();
    let stderr = run_expecting(&lode, &[app], &["edited", "model: tok-xxxx"]);
    assert!(
        !stderr.contains("downloaded tiny"),
        "the step ran again:\n{stderr}"
    );
    std::fs::write(app, source.replace("\"x\" * size", "\"y\" * size")).unwrap();
    run_expecting(&lode, &[app], &["model: tok-yyyy"]);

    // A function that raises fails the build with its traceback, and the app is not deployed.
    std::fs::write(
        app,
        source
            .replace(
                ".run_function(\n    download,",
                ".run_function(\n    broken,",
            )
            .replace(", args=(\"tiny\",), kwargs={\"size\": 4}", ""),
    )
    .unwrap();
    let out = lode.cli(&["run", app]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("run_function prepared.broken")
            && stderr.contains("RuntimeError: the download failed on purpose"),
        "{stderr}"
    );
}

#[test]
fn functions_make_sandboxes_within_what_they_were_given_and_reach_only_their_own() {
    let lode = start(&[]);
    lode.cli_ok(&["secret", "create", "maker-secret", "MAKER_TOKEN=tok-maker"]);
    lode.cli_ok(&["secret", "create", "other-secret", "OTHER=1"]);
    // The operator's own sandbox, which the app's containers must not reach.
    let image = lode.sdk_python("import lode\nprint(lode.Image.debian_slim()._reference())");
    let image = text(&image.stdout);
    let foreign = lode.cli_ok(&["sandbox", "create", image.trim(), "--app", "operator-app"]);
    let app = repo_file("host/tests/python/sandbox_maker.py");
    run_expecting(
        &lode,
        &[&app, "--", "--foreign", foreign.trim()],
        &[
            // Made inside a function: its secret passed on, its tunnel reached from the
            // function's container and from the client at the same URL, listed alone.
            "secret True",
            "tunnel True",
            "client tunnel True",
            "listed True",
            // Another function of the app reaches it, ends it, and its tunnel goes with it.
            "visit seen True",
            "visit ended True",
            "visit after unreachable",
            // No more than the function was given.
            "other_secret RemoteError: not_allowed_in_container: function \"make\"",
            "secret \"other-secret\" is not one of the function's own",
            "network RemoteError: not_allowed_in_container",
            "the function has no network, so the sandboxes it makes have none either",
            "volume \"maker-vol\" is read-only in the function, so a sandbox gets it read-only too",
            "build RemoteError: build_failed: step 1 (pip_install six) is not in the build cache",
            "lookup NotFoundError: not_found: no app named \"no-such-app\"",
            // The operator's sandbox is not there for it, and its own sandbox has no API.
            &format!(
                "trespass NotFoundError: not_found: no sandbox \"{}\"",
                foreign.trim()
            ),
            "sandbox_api ['ls:', 'cannot', 'access', \"'/lode/run':\"",
            "'[]']",
        ],
    );
    // The operator sees both, and which app's container made the one.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listed: serde_json::Value = rt.block_on(async {
        let response = lode.api(reqwest::Method::GET, "/v1/sandboxes").send();
        response.await.unwrap().json().await.unwrap()
    });
    let made: Vec<_> = listed["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["app"] == "maker-pool")
        .collect();
    assert_eq!(made.len(), 1, "{listed}");
    assert!(
        made[0]["created_by_app"]
            .as_str()
            .is_some_and(|a| a.starts_with("sandbox-maker-run-")),
        "{listed}"
    );
}
