//! Python functions end to end, as a user runs them: the real CLI against a real `lode
//! serve`, images built by the native runner, calls served by warm containers.

mod harness;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::{BASE_DIR, Lode, repo_file, text};

fn start(extra: &[&str]) -> Lode {
    let mut args = vec!["--image-base-dir", BASE_DIR];
    args.extend_from_slice(extra);
    Lode::start(&args)
}

/// `lode run ARGS...`: it succeeds and its stdout holds every `expected` line; returns its
/// stderr (where the app's logs stream).
fn run_expecting(lode: &Lode, args: &[&str], expected: &[&str]) -> String {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    let run = lode.cli(&all);
    let (stdout, stderr) = (text(&run.stdout), text(&run.stderr));
    assert!(run.status.success(), "{stdout}\n{stderr}");
    for line in expected {
        assert!(
            stdout.contains(line),
            "missing {line:?}:\n{stdout}\n{stderr}"
        );
    }
    stderr
}

fn stats_row(lode: &Lode, app: &str, function: &str) -> Vec<String> {
    let out = lode.cli_ok(&["stats", app]);
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(function))
        .unwrap_or_else(|| panic!("no row for {function} in:\n{out}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn python_hello_deploys_calls_maps_spawns_serves_http_and_ticks() {
    let lode = start(&[]);
    let app = repo_file("samples/python-hello/app.py");
    let deployed = lode.cli_ok(&["deploy", &app]);
    assert!(
        deployed.contains("deployed hello-py version 1"),
        "{deployed}"
    );
    assert!(deployed.contains("/hello-py/echo"), "{deployed}");

    assert_eq!(lode.cli_ok(&["call", "hello-py/square", "4"]).trim(), "16");
    let started = Instant::now();
    // Redeploying the same file changes nothing and takes well under a second.
    let again = lode.cli_ok(&["deploy", &app]);
    assert!(again.contains("unchanged"), "{again}");
    eprintln!("unchanged redeploy took {:?}", started.elapsed());

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, body) = rt.block_on(async {
        let response = lode
            .public(reqwest::Method::POST, "/hello-py/echo")
            .body(r#"{"a": 1}"#)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    });
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, r#"{"you_sent":{"a":1}}"#);
    // The route takes POST only.
    let (status, _) = rt.block_on(lode.get("/hello-py/echo"));
    assert_eq!(status, 405);

    let stderr = run_expecting(
        &lode,
        &[&app, "--", "5"],
        &[
            "square(4) = 16",
            "squares: [0, 1, 4, 9, 16]",
            "spawned square(7) = 49",
            "HELLO!",
        ],
    );
    // The function's own print reached this terminal through the log stream.
    assert!(stderr.contains("shouting 'hello'"), "{stderr}");

    // The period schedule (every 5 s) fires by itself.
    let ticked = harness::wait_for(Duration::from_secs(15), || {
        let logs = lode.cli_ok(&["logs", "hello-py"]);
        logs.contains(" tick").then_some(logs)
    });
    assert!(ticked.is_some(), "{}", lode.cli_ok(&["logs", "hello-py"]));
}

#[test]
fn python_numpy_runs_in_its_image_and_never_on_the_host() {
    let lode = start(&[]);
    let app = repo_file("samples/python-numpy/app.py");
    // The host has no numpy: collect skips the `image.imports()` block.
    let deployed = lode.cli(&["deploy", &app]);
    assert!(
        deployed.status.success(),
        "{}\n{}",
        text(&deployed.stdout),
        text(&deployed.stderr)
    );
    let out = lode.cli_ok(&["call", "numpy-demo/stats", "[1, 2, 3, 4]"]);
    let value: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(value["mean"], 2.5);
    assert!(value["numpy"].as_str().unwrap().starts_with('2'), "{value}");
    let trace = lode.cli_ok(&["call", "numpy-demo/matmul", "3"]);
    // trace(A·Aᵀ) for A = [[0,1,2],[3,4,5],[6,7,8]] is the sum of squares 0..8.
    assert_eq!(trace.trim(), "204.0");
}

#[test]
fn errors_retries_timeouts_and_calls_from_inside() {
    let lode = start(&[]);
    let app = repo_file("host/tests/python/features.py");
    lode.cli_ok(&["secret", "create", "feat-api", "TOKEN=s3cr3t-value-42"]);
    lode.cli_ok(&["deploy", &app]);

    run_expecting(
        &lode,
        &[&app],
        &[
            // Same type, remote traceback attached.
            "caught ValueError: bad 3; remote traceback: True",
            "caught Custom: raised in the container",
            "caught RemoteError Ghost",
            "return_exceptions: ['ValueError', 'ValueError']",
            "starmap: [3, 7]",
            "unordered: [11, 22, 33]",
            // add(10, 1) + add(10, 2), called from inside a container.
            "caller: 23",
            "pickle: [1, 2, 3]",
        ],
    );

    // The CLI shows a remote error with its traceback and exits 1.
    let failed = lode.cli(&["call", "feat/fail", "7"]);
    assert_eq!(failed.status.code(), Some(1));
    let err = text(&failed.stderr);
    assert!(err.contains("ValueError: bad 7"), "{err}");
    assert!(err.contains("Traceback"), "{err}");

    // The first attempt kills its container; Retries runs it again in a new one.
    assert_eq!(
        lode.cli_ok(&["call", "feat/crash_once", "t1"]).trim(),
        "\"recovered t1\""
    );
    let crashed = lode.cli(&["call", "feat/crash_always"]);
    assert_eq!(crashed.status.code(), Some(1));
    assert!(
        text(&crashed.stderr).contains("exited with code 4"),
        "{}",
        text(&crashed.stderr)
    );
    let logs = lode.cli_ok(&["logs", "feat"]);
    assert!(logs.contains("retrying input (attempt 2 of 3)"), "{logs}");

    // A timeout fails the input by name.
    let slow = lode.cli(&["call", "feat/sleepy", "5"]);
    assert_eq!(slow.status.code(), Some(1));
    assert!(
        text(&slow.stderr).contains("TimeoutError: feat/sleepy timed out after 1s"),
        "{}",
        text(&slow.stderr)
    );
    assert_eq!(
        lode.cli_ok(&["call", "feat/sleepy", "0"]).trim(),
        "\"woke\""
    );

    // A public web endpoint that raises answers 500 with the kind only; the details go to
    // the app's logs.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, body) = rt.block_on(async {
        let response = lode
            .public(reqwest::Method::POST, "/feat/boom")
            .body("{}")
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    });
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("RuntimeError") && !body.contains("internal detail"),
        "{body}"
    );
    assert!(lode.cli_ok(&["logs", "feat"]).contains("internal detail"));

    // Malformed calls get errors, not crashes.
    let missing = lode.cli(&["call", "feat/no_such_function"]);
    assert!(
        text(&missing.stderr).contains("has no function"),
        "{}",
        text(&missing.stderr)
    );
}

#[test]
fn a_full_queue_answers_429_and_idle_containers_scale_down() {
    let mut lode = start(&["--max-queue", "1"]);
    lode.cli_ok(&["secret", "create", "feat-api", "TOKEN=x"]);
    let deployed = lode.cli_ok(&["deploy", &repo_file("host/tests/python/features.py")]);
    assert!(deployed.contains("deployed feat"), "{deployed}");
    // One container at most (max_containers=1), one input queued: of five at once, three or
    // more are turned away with 429 and a Retry-After.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let statuses = rt.block_on(async {
        let calls = (0..5).map(|_| async {
            let response = lode
                .api(reqwest::Method::POST, "/v1/apps/feat/functions/slow/call")
                .json(&serde_json::json!({"args": [1.5]}))
                .send()
                .await
                .unwrap();
            let retry_after = response.headers().get("retry-after").is_some();
            (response.status().as_u16(), retry_after)
        });
        futures::future::join_all(calls).await
    });
    let rejected = statuses.iter().filter(|(s, _)| *s == 429).count();
    assert!(rejected >= 3, "{statuses:?}");
    assert!(statuses.iter().filter(|(s, _)| *s == 429).all(|(_, r)| *r));
    assert!(statuses.iter().any(|(s, _)| *s == 200), "{statuses:?}");

    // min_containers are started at deploy and kept, with no call made.
    let warm = harness::wait_for(Duration::from_secs(20), || {
        (stats_row(&lode, "feat", "kept_warm")[1] == "1").then_some(())
    });
    assert!(
        warm.is_some(),
        "{:?}",
        stats_row(&lode, "feat", "kept_warm")
    );

    // The container that served stays warm, then goes after its 1 s window.
    let row = stats_row(&lode, "feat", "slow");
    assert_eq!(row[5], "1", "one cold start: {row:?}");
    let gone = harness::wait_for(Duration::from_secs(10), || {
        (stats_row(&lode, "feat", "slow")[1] == "0").then_some(())
    });
    assert!(gone.is_some(), "{:?}", stats_row(&lode, "feat", "slow"));

    // A server that stops takes its containers with it: no cgroups or scratch dirs stay.
    lode.cli_ok(&["call", "feat/add", "1", "2"]);
    assert!(!lode.leftovers().is_empty());
    lode.stop();
    assert_eq!(lode.leftovers(), Vec::<String>::new());
}

#[test]
fn inputs_queued_on_a_replaced_version_still_finish() {
    let lode = start(&[]);
    lode.cli_ok(&["secret", "create", "feat-api", "TOKEN=x"]);
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("features.py");
    let source = std::fs::read_to_string(repo_file("host/tests/python/features.py")).unwrap();
    std::fs::write(&app, &source).unwrap();
    let app = app.to_str().unwrap().to_string();
    lode.cli_ok(&["deploy", &app]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let statuses = rt.block_on(async {
        // `slow` has one container: the first call runs, the second waits in its queue.
        let call = |seconds: f64| {
            lode.api(reqwest::Method::POST, "/v1/apps/feat/functions/slow/call")
                .json(&serde_json::json!({"args": [seconds]}))
                .send()
        };
        let first = tokio::spawn(call(1.5));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let second = tokio::spawn(call(0.1));
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A new version replaces the pool while the second call is queued on the old one.
        std::fs::write(&app, format!("{source}\n# version 2\n")).unwrap();
        let redeployed = lode.cli(&["deploy", &app]);
        assert!(
            text(&redeployed.stdout).contains("deployed feat version 2"),
            "{}",
            text(&redeployed.stderr)
        );
        let mut statuses = Vec::new();
        for call in [first, second] {
            let response = call.await.unwrap().unwrap();
            statuses.push((response.status().as_u16(), response.text().await.unwrap()));
        }
        statuses
    });
    assert_eq!(
        statuses[0],
        (200, r#"{"result":1.5}"#.to_string()),
        "{statuses:?}"
    );
    assert_eq!(
        statuses[1],
        (200, r#"{"result":0.1}"#.to_string()),
        "{statuses:?}"
    );
}

#[test]
fn secrets_stay_out_of_logs_and_volumes_survive_a_restart() {
    let mut lode = start(&[]);
    let app = repo_file("host/tests/python/features.py");
    let created = lode.cli_ok(&["secret", "create", "feat-api", "TOKEN=s3cr3t-value-42"]);
    assert!(!created.contains("s3cr3t"), "{created}");
    let listed = lode.cli_ok(&["secret", "ls"]);
    assert!(
        listed.contains("feat-api") && listed.contains("TOKEN"),
        "{listed}"
    );
    assert!(!listed.contains("s3cr3t"), "{listed}");
    lode.cli_ok(&["deploy", &app]);

    // Secret.from_dict: the CLI stored it as a secret of its own at deploy.
    assert_eq!(
        lode.cli_ok(&["call", "feat/inline_secret"]).trim(),
        "\"inline-mode\""
    );
    assert!(lode.cli_ok(&["secret", "ls"]).contains("inline-"));

    // The function sees the value; what it prints of it is masked in the logs.
    assert_eq!(lode.cli_ok(&["call", "feat/use_secret"]).trim(), "15");
    let logs = lode.cli_ok(&["logs", "feat"]);
    assert!(logs.contains("the token is ***"), "{logs}");
    assert!(!logs.contains("s3cr3t"), "{logs}");
    // Nothing under the data dir holds the value in the clear.
    for entry in walk(&lode.data_dir()) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !bytes.windows(12).any(|w| w == b"s3cr3t-value"),
            "{} holds the secret",
            entry.display()
        );
    }

    assert_eq!(
        lode.cli_ok(&["call", "feat/save", "k", "kept"]).trim(),
        "\"kept\""
    );
    lode.restart();
    // After a restart the app is restored, and the volume still holds what was written.
    // Read-only where the function asked: its write was refused.
    assert_eq!(
        lode.cli_ok(&["call", "feat/load", "k"]).trim(),
        "\"kept (refused)\""
    );
    let on_host = lode.data_dir().join("volumes/feat-data/k");
    assert_eq!(std::fs::read_to_string(on_host).unwrap(), "kept");
    // And the secret still opens: the key in the data dir survived too.
    assert_eq!(lode.cli_ok(&["call", "feat/use_secret"]).trim(), "15");

    // A changed secret is a change: the same file deploys again, with the new value.
    lode.cli_ok(&["secret", "create", "feat-api", "TOKEN=rotated"]);
    let redeployed = lode.cli_ok(&["deploy", &app]);
    assert!(
        redeployed.contains("deployed feat version 2"),
        "{redeployed}"
    );
    assert_eq!(lode.cli_ok(&["call", "feat/use_secret"]).trim(), "7");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Times the `beat` function (every 2 s) wrote into its volume.
fn beats(lode: &Lode) -> Vec<f64> {
    std::fs::read_to_string(lode.data_dir().join("volumes/feat-data/beats"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

#[test]
fn a_period_schedule_fires_across_restarts_without_double_or_burst_runs() {
    let mut lode = start(&[]);
    lode.cli_ok(&["secret", "create", "feat-api", "TOKEN=x"]);
    lode.cli_ok(&["deploy", &repo_file("host/tests/python/features.py")]);
    assert!(
        harness::wait_for(Duration::from_secs(20), || (beats(&lode).len() >= 2)
            .then_some(()))
        .is_some(),
        "{:?}",
        beats(&lode)
    );
    // A quick restart: the schedule carries on where it was.
    lode.restart();
    let before = beats(&lode).len();
    assert!(
        harness::wait_for(Duration::from_secs(20), || (beats(&lode).len()
            >= before + 2)
            .then_some(()))
        .is_some(),
        "{:?}",
        beats(&lode)
    );
    // Down for three periods: the missed runs are logged, not replayed in a burst.
    lode.stop();
    std::thread::sleep(Duration::from_secs(7));
    let at_restart = beats(&lode).len();
    lode.restart();
    assert!(
        harness::wait_for(Duration::from_secs(20), || (beats(&lode).len()
            > at_restart)
            .then_some(()))
        .is_some()
    );
    std::thread::sleep(Duration::from_millis(500));
    let logs = lode.cli_ok(&["logs", "feat"]);
    assert!(
        logs.contains("were missed while the host was down"),
        "{logs}"
    );
    let times = beats(&lode);
    // No two runs of one slot, and no burst: consecutive runs are most of a period apart.
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] > 1.2,
            "runs too close together: {times:?}"
        );
    }
}

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
fn asgi_wsgi_and_web_servers_stream_both_ways_and_take_websockets() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let lode = start(&[]);
    let app = repo_file("samples/python-web/app.py");
    let deployed = lode.cli_ok(&["deploy", &app]);
    assert!(
        deployed.contains("python-web--web.lode.localhost"),
        "{deployed}"
    );
    // A client that only knows the names asks the server for the URL.
    let looked_up = lode.sdk_python(
        "import lode\nprint(lode.Function.from_name('python-web', 'web').get_web_url())",
    );
    assert_eq!(
        text(&looked_up.stdout).trim(),
        format!("{}/python-web/web", lode.http),
        "{}",
        text(&looked_up.stderr)
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // By path, the app sees its prefix as its root path; by host, it is at the root.
        let (status, body) = lode.get("/python-web/web/").await;
        assert_eq!((status, body.as_str()), (200, r#"{"hello":"world"}"#));
        let by_host = lode
            .public(reqwest::Method::GET, "/")
            .header("host", "python-web--web.lode.localhost")
            .send()
            .await
            .unwrap();
        assert_eq!(by_host.text().await.unwrap(), r#"{"hello":"world"}"#);
        // A large body reaches the app in parts.
        let echoed = lode
            .public(reqwest::Method::POST, "/python-web/web/echo")
            .body(vec![b'x'; 300_000])
            .send()
            .await
            .unwrap();
        assert_eq!(
            echoed.text().await.unwrap(),
            r#"{"bytes":300000,"root_path":"/python-web/web"}"#
        );
        // A streamed response arrives in parts, as the app yields them.
        let mut streamed = lode
            .public(reqwest::Method::GET, "/python-web/web/stream?n=4")
            .send()
            .await
            .unwrap();
        assert!(streamed.headers().get("content-length").is_none());
        let mut parts = Vec::new();
        while let Some(chunk) = streamed.chunk().await.unwrap() {
            parts.push(String::from_utf8(chunk.to_vec()).unwrap());
        }
        assert_eq!(parts.concat(), "chunk 0\nchunk 1\nchunk 2\nchunk 3\n");
        assert!(parts.len() > 1, "{parts:?}");
        let (status, _) = lode.get("/python-web/web/nothing-here").await;
        assert_eq!(status, 404);

        // A WebSocket, both ways, then closed by the client.
        let url = format!("{}/python-web/web/ws", lode.http.replacen("http", "ws", 1));
        let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        for word in ["hello", "lode"] {
            socket.send(Message::text(word)).await.unwrap();
            let answer = socket.next().await.unwrap().unwrap();
            assert_eq!(answer.into_text().unwrap().as_str(), word.to_uppercase());
        }
        socket.close(None).await.unwrap();

        // WSGI: SCRIPT_NAME is the mount, PATH_INFO the rest.
        let wsgi = lode
            .public(reqwest::Method::POST, "/python-web/legacy/a/b?x=1")
            .body("12345")
            .send()
            .await
            .unwrap();
        assert_eq!(wsgi.text().await.unwrap(), "/python-web/legacy /a/b x=1 5");
        // A server started in the container, reached through it.
        let (status, body) = lode.get("/python-web/files/hello.txt").await;
        assert_eq!((status, body.as_str()), (200, "hello from a file\n"));
        // A FastAPI-style endpoint converts its query parameters by annotation.
        let (status, body) = lode.get("/python-web/add?a=2&b=40").await;
        assert_eq!((status, body.as_str()), (200, r#"{"sum":42}"#));
        // A class's web methods: one instance, entered once, serves both.
        let (status, body) = lode.get("/python-web/Greeter-greet?name=lode").await;
        assert_eq!(
            (status, body.as_str()),
            (200, r#"{"greeting":"hello lode","entered":1}"#)
        );
        let by_host = lode
            .public(reqwest::Method::GET, "/")
            .header("host", "python-web--greeter-api.lode.localhost")
            .send()
            .await
            .unwrap();
        assert_eq!(
            by_host.text().await.unwrap(),
            r#"{"greeting":"hello","entered":1}"#
        );
    });
    assert!(deployed.contains("/python-web/Greeter-greet"), "{deployed}");
    let urls = run_expecting(&lode, &[&app], &["web: http://127.0.0.1:"]);
    drop(urls);
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
fn a_module_that_fails_to_import_fails_every_request_with_the_reason() {
    let lode = start(&[]);
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("broken.py");
    // The helper is next to the file here, but not in the image: the container cannot
    // import it (Modal 1.x semantics: add_local_python_source ships it).
    std::fs::write(
        &file,
        "import lode\nimport helper_here_only\napp = lode.App(\"broken\")\n\n\
         @app.function()\n@lode.fastapi_endpoint(method=\"GET\")\ndef hello():\n    return 1\n",
    )
    .unwrap();
    std::fs::write(work.path().join("helper_here_only.py"), "X = 1\n").unwrap();
    lode.cli_ok(&["deploy", file.to_str().unwrap()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The second request comes while starts back off: it fails at once with the reason
    // too, rather than wait in the queue for a start.
    for _ in 0..2 {
        let (status, body) = rt.block_on(lode.get("/broken/hello"));
        assert_eq!(status, 500, "{body}");
        assert!(body.contains("ModuleNotFoundError"), "{body}");
    }
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
fn web_inputs_end_when_their_app_returns_and_abandoned_ones_never_run() {
    let lode = start(&[]);
    lode.cli_ok(&["deploy", &repo_file("host/tests/python/web_queue.py")]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (status, body) = lode.get("/webqueue/slow?tag=warm").await;
        assert_eq!((status, body.as_str()), (200, r#"{"tag":"warm"}"#));
        // The one container is busy for a while; a second request waits, and its client
        // gives up.
        let busy = lode.public(reqwest::Method::GET, "/webqueue/slow?tag=first&sleep=3");
        let first = tokio::spawn(busy.send());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let gone = lode
            .public(reqwest::Method::GET, "/webqueue/slow?tag=gone")
            .timeout(Duration::from_millis(500))
            .send()
            .await;
        assert!(gone.is_err(), "{gone:?}");
        let first = first.await.unwrap().unwrap();
        assert_eq!(first.text().await.unwrap(), r#"{"tag":"first"}"#);
        let (status, _) = lode.get("/webqueue/slow?tag=last").await;
        assert_eq!(status, 200);
        // The answer comes at once; the work after it still holds the container, which
        // scales down only once the app returns.
        let (status, body) = lode.get("/webqueue/after").await;
        assert_eq!((status, body.as_str()), (200, "answered"));
    });
    // The answer came before the work after it ended.
    let logs = lode.cli_ok(&["logs", "webqueue"]);
    assert!(!logs.contains("background done"), "{logs}");
    let finished = harness::wait_for(Duration::from_secs(10), || {
        let logs = lode.cli_ok(&["logs", "webqueue"]);
        logs.contains("background done").then_some(())
    });
    assert!(finished.is_some(), "{}", lode.cli_ok(&["logs", "webqueue"]));
    let logs = lode.cli_ok(&["logs", "webqueue"]);
    assert!(
        logs.contains("ran first") && logs.contains("ran last"),
        "{logs}"
    );
    assert!(
        !logs.contains("ran gone"),
        "the abandoned request ran:\n{logs}"
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
