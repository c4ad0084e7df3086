//! Python functions end to end, as a user runs them: the real CLI against a real `lode
//! serve`, images built by the native runner, calls served by warm containers; errors,
//! retries, timeouts, the queue and scale-down, secrets and volumes, schedules. The Modal
//! surface is in `python_modal.rs`, web serving in `python_web.rs`.

mod harness;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::python::{run_expecting, start, stats_row};
use harness::{Lode, repo_file, text};

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

/// The number of containers up or starting for `function` of app `snap`.
fn snap_containers(lode: &Lode, rt: &tokio::runtime::Runtime, function: &str) -> u64 {
    let (_, stats) = rt.block_on(lode.api_json(reqwest::Method::GET, "/v1/apps/snap/stats", None));
    stats["functions"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["function"] == function))
        .map_or(0, |row| {
            row["containers"].as_u64().unwrap_or(0) + row["starting"].as_u64().unwrap_or(0)
        })
}

/// A cold call: waits until no container of `function` is up, then calls `target` (the
/// function, or `Class.method`) with `args`.
fn cold_call_of(
    lode: &Lode,
    rt: &tokio::runtime::Runtime,
    function: &str,
    target: &str,
    args: &[&str],
) -> serde_json::Value {
    let gone = harness::wait_for(Duration::from_secs(30), || {
        (snap_containers(lode, rt, function) == 0).then_some(())
    });
    assert!(gone.is_some(), "the last container of {function} stayed up");
    let mut command = vec!["call".to_string(), format!("snap/{target}")];
    command.extend(args.iter().map(|a| a.to_string()));
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let out = lode.cli_ok(&command);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn cold_call(lode: &Lode, rt: &tokio::runtime::Runtime, function: &str) -> serde_json::Value {
    cold_call_of(lode, rt, function, function, &["0"])
}

/// A secret's value, looked for in the snapshot's stored bytes.
const SNAPSHOT_SECRET: &str = "hunter2c0ffee5ecret";

#[test]
fn a_memory_snapshot_restores_the_loaded_module_with_fresh_randomness_and_its_own_token() {
    if lode_native_runner::sandbox::Criu::locate().is_err() {
        println!("SKIPPED: no CRIU 4 here (./lode.sh test builds it)");
        return;
    }
    // Snapshots go to the registry too (the default), as hosts sharing one would have them.
    let lode = start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("snap.py");
    std::fs::write(
        &app,
        r#"
import os, random, lode

app = lode.App("snap")
# Drawn once per import: a restored container shows the snapshot's value.
LOADED = random.random()

@app.function(enable_memory_snapshot=True, scaledown_window=0, secrets=[lode.Secret.from_name("snap")])
def probe(_: int = 0) -> dict:
    return {
        "loaded": LOADED,
        "drawn": random.random(),
        # Not the whole value: the part after "-" must be found only in the snapshot.
        "secret": os.environ.get("SNAP_VALUE").split("-")[0],
        "double": double.remote(21),
    }

@app.function()
def double(x: int) -> int:
    return 2 * x

@app.cls(enable_memory_snapshot=True, scaledown_window=0)
class Model:
    @lode.enter(snap=True)
    def load(self):
        # The slow part (a model's weights): done once, before the snapshot.
        self.weights = random.random()

    @lode.enter()
    def warm(self):
        # Per container: after each restore.
        self.warmed = random.random()

    @lode.method()
    def info(self) -> dict:
        return {"weights": self.weights, "warmed": self.warmed}
"#,
    )
    .unwrap();
    lode.cli_ok(&[
        "secret",
        "create",
        "snap",
        &format!("SNAP_VALUE=one-{SNAPSHOT_SECRET}"),
    ]);
    let deployed = lode.cli_ok(&["deploy", app.to_str().unwrap()]);
    assert!(deployed.contains("deployed snap"), "{deployed}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The first cold start imports, is saved, and serves.
    let first = cold_call(&lode, &rt, "probe");
    // Later cold starts come from the snapshot: the module as it was loaded, but random
    // generators reseeded, and calls out made with the new container's own token.
    let second = cold_call(&lode, &rt, "probe");
    let third = cold_call(&lode, &rt, "probe");
    for restored in [&second, &third] {
        assert_eq!(restored["loaded"], first["loaded"], "{first} {restored}");
        assert_eq!(restored["double"], 42);
        assert_eq!(restored["secret"], "one");
    }
    assert_ne!(second["drawn"], third["drawn"], "{second} {third}");
    // A class's enter(snap=True) hooks ran before its snapshot; its other hooks run after
    // each restore.
    let model: Vec<_> = (0..3)
        .map(|_| cold_call_of(&lode, &rt, "Model", "Model.info", &[]))
        .collect();
    assert_eq!(model[1]["weights"], model[0]["weights"], "{model:?}");
    assert_eq!(model[2]["weights"], model[0]["weights"], "{model:?}");
    assert_ne!(model[1]["warmed"], model[2]["warmed"], "{model:?}");
    let metrics = rt.block_on(lode.metric("lode_memory_snapshots_restored_total"));
    assert_eq!(metrics, Some(4.0));
    // A host without its own copy restores the registry's, mounted lazily...
    let snapshots = lode.data_dir().parent().unwrap().join("cache/snapshots");
    // Each snapshot names its function; the probe's is the one these steps use.
    let owned_by = |name: &str| {
        std::fs::read_dir(&snapshots)
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("lode-owner")).is_ok_and(|o| o == name)
            })
            .map(|e| e.path())
            .collect::<Vec<_>>()
    };
    let probe = owned_by("snap/probe");
    assert_eq!(probe.len(), 1, "{probe:?}");
    let key = probe[0].file_name().unwrap().to_string_lossy().into_owned();
    use lode_registry::BlobAccess;
    // Made inside the runtime: its channel needs the reactor.
    let registry = rt.block_on(async { lode.registry_client() });
    // Its tags are named by a keyed hash of its key (which hashes the secret's value).
    let secrets_key = std::fs::read(lode.data_dir().join("secret.key")).unwrap();
    let keys = lode::store::secrets::SnapshotKeys::derive(&secrets_key.try_into().unwrap());
    let name = lode::native::snapshots::registry_name(&keys.seal, &key);
    let stored = harness::wait_for(Duration::from_secs(30), || {
        rt.block_on(registry.get_tag(&format!("snapshot/{name}")))
            .ok()
    });
    assert!(stored.is_some(), "the snapshot never reached the registry");
    // The memory saved holds the secret's value; the registry's copy holds it nowhere, nor
    // does the chunk cache the restore below fills: both are encrypted.
    let secret = SNAPSHOT_SECRET.as_bytes();
    assert!(!harness::files_containing(&snapshots.join(&key), secret).is_empty());
    let stored_in_clear = |dir: &std::path::Path| {
        ["blobs", "indexes"]
            .iter()
            .flat_map(|sub| harness::files_containing(&dir.join(sub), secret))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        stored_in_clear(&lode.data_dir()),
        Vec::<std::path::PathBuf>::new()
    );
    std::fs::remove_dir_all(snapshots.join(&key)).unwrap();
    let from_registry = cold_call(&lode, &rt, "probe");
    assert_eq!(from_registry["loaded"], first["loaded"], "{from_registry}");
    let chunks = lode.data_dir().parent().unwrap().join("cache/chunks");
    assert_eq!(
        harness::files_containing(&chunks, secret),
        Vec::<std::path::PathBuf>::new()
    );
    // The host keeps a copy of what it restored, for its next starts.
    let copied = harness::wait_for(Duration::from_secs(30), || {
        snapshots
            .join(&key)
            .join("lode-owner")
            .exists()
            .then_some(())
    });
    assert!(
        copied.is_some(),
        "the registry's snapshot was not copied here"
    );
    std::fs::remove_dir_all(snapshots.join(&key)).unwrap();
    // ...but only one sealed with this server's secrets key: CRIU restores whatever a
    // snapshot says, so a forged one (anyone who can write to the registry could make it)
    // is refused, and the start imports afresh.
    let forged = bytes::Bytes::from_static(&[7; 32]);
    let forged_digest = lode_registry::Digest::of(&forged);
    rt.block_on(registry.put_blob(&forged_digest, forged))
        .unwrap();
    rt.block_on(registry.set_tag(
        &format!("snapshot-seal/{name}"),
        &forged_digest,
        lode_registry::TagUpdate::Always,
    ))
    .unwrap();
    let refused = cold_call(&lode, &rt, "probe");
    assert_ne!(
        refused["loaded"], first["loaded"],
        "a forged seal was restored"
    );
    // A new secret value makes a new snapshot: the old one is never restored with it.
    lode.cli_ok(&["secret", "create", "snap", "SNAP_VALUE=two"]);
    lode.cli_ok(&["deploy", app.to_str().unwrap()]);
    let changed = cold_call(&lode, &rt, "probe");
    assert_eq!(changed["secret"], "two");
    assert_ne!(changed["loaded"], first["loaded"], "{changed}");
    // The snapshot made with the old secret is gone from the cache; the new one is there.
    let probe = owned_by("snap/probe");
    assert_eq!(probe.len(), 1, "{probe:?}");
    assert!(!probe[0].ends_with(&key), "{probe:?}");
    // Restored containers leave nothing either: cgroups, scratch, CRIU's staged mounts.
    let mut lode = lode;
    lode.stop();
    assert_eq!(lode.leftovers(), Vec::<String>::new());
    let staged = std::fs::read_dir("/run/lode-restore")
        .map(|dir| dir.count())
        .unwrap_or(0);
    assert_eq!(staged, 0, "restores left staging directories");
}
