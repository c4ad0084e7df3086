//! Wasm functions called by name (the `lode:function` world), across engines and under
//! limits, through the real CLI against a real `lode serve`.

mod harness;

use std::time::Duration;

use serde_json::json;

use harness::{Lode, repo_file, text};

/// `lode call` that is expected to fail: its stderr.
fn call_err(lode: &Lode, args: &[&str]) -> String {
    let mut full = vec!["call"];
    full.extend_from_slice(args);
    let out = lode.cli(&full);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    text(&out.stderr)
}

#[test]
fn fan_out_spawn_and_calls_across_engines() {
    let lode = Lode::start(&["--image-base-dir", "/var/cache/lode/images/base"]);
    lode.cli_ok(&["deploy", &repo_file("samples/wasm-fanout"), "--name", "fan"]);
    // main invokes square 1000 times in process: the sum of squares of 0..999.
    assert_eq!(
        lode.cli_ok(&["call", "fan/main", r#"{"n": 1000}"#]).trim(),
        "332833500"
    );
    assert_eq!(
        lode.cli_ok(&["call", "fan/main", r#"{"n": 10, "spawn": true}"#])
            .trim(),
        "285"
    );
    assert_eq!(lode.cli_ok(&["call", "fan/square", "12"]).trim(), "144");

    // Wasm to Python: main fans out to a Python function.
    lode.cli_ok(&["deploy", &repo_file("samples/python-hello/app.py")]);
    assert_eq!(
        lode.cli_ok(&[
            "call",
            "fan/main",
            r#"{"n": 4, "target": "hello-py/square"}"#
        ])
        .trim(),
        "14"
    );
    // Python to Wasm: from the SDK on this machine (remote, map, spawn), and from inside a
    // container.
    let script = "import lode\n\
                  print(lode.Function.from_name('fan', 'main').remote({'n': 10}))\n\
                  square = lode.Function.from_name('fan', 'square')\n\
                  print(list(square.map([1, 2, 3])))\n\
                  print(square.spawn(7).get(timeout=30))\n\
                  try:\n    square.remote('x')\n\
                  except lode.RemoteError as e:\n    print(e.kind)\n";
    let out = lode.sdk_python(script);
    assert_eq!(
        text(&out.stdout).lines().collect::<Vec<_>>(),
        ["285", "[1, 4, 9]", "49", "invalid_input"],
        "{}",
        text(&out.stderr)
    );
    lode.cli_ok(&["secret", "create", "feat-api", "TOKEN=x"]);
    lode.cli_ok(&["deploy", &repo_file("host/tests/python/features.py")]);
    assert_eq!(lode.cli_ok(&["call", "feat/wasm_square", "9"]).trim(), "81");

    // A loop across engines (limits/probe calls feat/bounce, which calls it back) is stopped
    // by the Wasm app's call_depth of 6: a container's calls carry their input's depth.
    lode.cli_ok(&["deploy", &repo_file("samples/wasm-limits")]);
    let err = call_err(&lode, &["limits/probe", "bounce"]);
    assert!(
        err.contains("call_depth: calls nest more than 6 deep"),
        "{err}"
    );

    // Calls are recorded: main's from outside, the Wasm-to-Python ones and the one from
    // feat/wasm_square's container; square's 1000-odd in-process calls from main are
    // counted in /metrics instead.
    let records = |app: &str| -> Vec<serde_json::Value> {
        lode.cli_ok(&["calls", app, "--json", "-n", "1000"])
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };
    let fan = harness::wait_for(Duration::from_secs(10), || {
        let fan = records("fan");
        (fan.iter().filter(|r| r["function"] == "main").count() >= 4).then_some(fan)
    })
    .expect("main's calls are recorded");
    let first = fan.iter().rfind(|r| r["function"] == "main").unwrap();
    assert_eq!(
        (&first["status"], &first["engine"], &first["depth"]),
        (&json!("succeeded"), &json!("wasm"), &json!(0))
    );
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0, "{first}");
    let nested: Vec<_> = fan
        .iter()
        .filter(|r| r["function"] == "square" && r["depth"] != 0)
        .collect();
    assert_eq!(nested.len(), 1, "only the container's call: {nested:?}");
    let python = records("hello-py");
    assert!(
        python
            .iter()
            .any(|r| r["function"] == "square" && r["depth"] == 1 && r["engine"] == "python"),
        "{python:?}"
    );

    // /metrics counts calls per function and engine, and the Python side's cold starts.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let wasm_calls = rt
        .block_on(
            lode.metric(r#"lode_function_calls_total{app="fan",function="square",engine="wasm"}"#),
        )
        .unwrap_or(0.0);
    assert!(wasm_calls >= 1001.0, "{wasm_calls}");
    let cold = rt
        .block_on(lode.metric(
            r#"lode_function_cold_starts_total{app="hello-py",function="square",engine="python"}"#,
        ))
        .unwrap_or(0.0);
    assert!(cold >= 1.0, "{cold}");

    // Malformed input gets an error, not a crash.
    let err = call_err(&lode, &["fan/square", "not-a-number"]);
    assert!(
        err.contains("invalid_input: argument 0 must be an integer"),
        "{err}"
    );
    let err = call_err(&lode, &["fan/nope"]);
    assert!(err.contains("has no function \"nope\""), "{err}");
}

#[test]
fn each_limit_stops_a_call_by_name_and_config_reads_lode_toml() {
    let lode = Lode::start(&[]);
    lode.cli_ok(&["deploy", &repo_file("samples/wasm-limits")]);
    // One component, both worlds: it takes calls by name and serves HTTP at its route.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, body) = rt.block_on(lode.get("/limits/"));
    assert_eq!((status, body.starts_with("probe: ")), (200, true), "{body}");
    assert_eq!(
        lode.cli_ok(&["call", "limits/probe", "config"]).trim(),
        "\"hello from lode.toml\""
    );
    // lode.toml's [limits]: call_depth 6, fan_out 50, wasm_stack_kib 128.
    assert_eq!(
        lode.cli_ok(&["call", "limits/probe", "fan", "10"]).trim(),
        "\"done\""
    );
    assert_eq!(
        lode.cli_ok(&["call", "limits/probe", "deep", "1000"])
            .trim(),
        "1000"
    );
    for (args, expected) in [
        (
            ["fan", "100"],
            "fan_out: one call may lead to at most 50 calls in all",
        ),
        (
            ["deep", "8000"],
            "stack_overflow: probe ran out of wasm stack (128 KiB",
        ),
    ] {
        let err = call_err(&lode, &["limits/probe", args[0], args[1]]);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    // The limits are the app's: the same component without them gets the server's
    // defaults (a 512 KiB stack).
    let roomy = tempfile::tempdir().unwrap();
    let toml = |limits: &str| {
        format!(
            "app = \"roomy\"\n{limits}\n[[function]]\nname = \"probe\"\npath = {:?}\n",
            repo_file("samples/wasm-limits")
        )
    };
    std::fs::write(roomy.path().join("lode.toml"), toml("")).unwrap();
    lode.cli_ok(&["deploy", roomy.path().to_str().unwrap()]);
    assert_eq!(
        lode.cli_ok(&["call", "roomy/probe", "deep", "8000"]).trim(),
        "8000"
    );
    // A stack above the server's is refused at deploy, by name.
    std::fs::write(
        roomy.path().join("lode.toml"),
        toml("[limits]\nwasm_stack_kib = 1024"),
    )
    .unwrap();
    let err = lode.cli_err(&["deploy", roomy.path().to_str().unwrap()]);
    assert!(
        err.contains("wasm_stack_kib 1024 is above this server's 512 KiB"),
        "{err}"
    );
    // Fuel bounds the work a call does, the same on any machine: `spin` uses it up long
    // before any timeout, by name and over HTTP too, while a call with less work fits.
    std::fs::write(
        roomy.path().join("lode.toml"),
        toml("[limits]\nfuel = 20_000_000"),
    )
    .unwrap();
    lode.cli_ok(&["deploy", roomy.path().to_str().unwrap()]);
    let err = call_err(&lode, &["roomy/probe", "spin"]);
    assert!(
        err.contains("fuel_exhausted: probe used up its fuel of 20000000 units"),
        "{err}"
    );
    let (status, body) = rt.block_on(lode.get("/roomy/spin"));
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("fuel_exhausted"), "{body}");
    assert_eq!(
        lode.cli_ok(&["call", "roomy/probe", "deep", "1000"]).trim(),
        "1000"
    );
    for (mode, expected) in [
        ("recurse", "call_depth: calls nest more than 6 deep"),
        ("spawn-recurse", "call_depth: calls nest more than 6 deep"),
        ("spin", "TimeoutError: limits/probe timed out after 2s"),
        (
            "grow",
            "out_of_memory: probe went past its memory limit of 32 MiB",
        ),
        ("read", "no_filesystem:"),
        ("escape", "no_filesystem:"),
        ("connect", "no_network:"),
    ] {
        let err = call_err(&lode, &["limits/probe", mode]);
        assert!(err.contains(expected), "{mode}: {err}");
    }
    // Its volume is the one directory it sees, and what it writes lands there.
    assert_eq!(
        lode.cli_ok(&["call", "limits/probe", "volume"]).trim(),
        "\"kept\""
    );
    let note = lode.data_dir().join("volumes/limits-data/note.txt");
    assert_eq!(std::fs::read_to_string(note).unwrap(), "kept");
    // The server kept serving throughout.
    assert_eq!(
        lode.cli_ok(&["call", "limits/probe", "config"]).trim(),
        "\"hello from lode.toml\""
    );
}

#[test]
fn pre_init_runs_start_up_work_once_at_deploy() {
    let mut lode = Lode::start(&[]);
    lode.cli_ok(&["deploy", &repo_file("samples/wasm-preinit")]);
    // Both functions answer alike; only the pre-initialized one finds its table built.
    for (function, ready) in [("primes/nth", true), ("primes/nth-cold", false)] {
        let answer: serde_json::Value =
            serde_json::from_str(&lode.cli_ok(&["call", function, "100000"])).unwrap();
        assert_eq!(
            answer,
            json!({"prime": 1_299_709, "table_ready_at_start": ready}),
            "{function}"
        );
    }
    // Each call gets a fresh instance of the snapshot, not of a warmed-up instance: a call
    // cannot leave state behind for the next.
    let again = lode.cli_ok(&["call", "primes/nth-cold", "1"]);
    assert!(again.contains("\"table_ready_at_start\":false"), "{again}");
    // The snapshot is kept, so a restart serves it without running the init again.
    let noted = std::fs::read_dir(lode.dirs.path().join("cache/compiled"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("preinit".as_ref()))
        .count();
    assert_eq!(noted, 1);
    lode.restart();
    let answer = lode.cli_ok(&["call", "primes/nth", "1"]);
    assert!(answer.contains("\"table_ready_at_start\":true"), "{answer}");

    // A component without lode:function cannot be pre-initialized: the deploy says so.
    let project = harness::misbehave_project(
        "app = \"bad-init\"\n[[function]]\nname = \"m\"\npath = \"m.wasm\"\npre_init = true\n",
    );
    let err = lode.cli_err(&["deploy", project.path().to_str().unwrap()]);
    assert!(err.contains("pre-initialization failed"), "{err}");

    // An init that never finishes is stopped by the function's timeout, and the deploy
    // fails saying so; the server goes on serving what it had.
    let spinning = tempfile::tempdir().unwrap();
    std::fs::write(
        spinning.path().join("lode.toml"),
        format!(
            "app = \"spin-init\"\n[[function]]\nname = \"probe\"\npath = {:?}\n\
             pre_init = true\ntimeout = \"300ms\"\n",
            repo_file("samples/wasm-limits")
        ),
    )
    .unwrap();
    let err = lode.cli_err(&["deploy", spinning.path().to_str().unwrap()]);
    assert!(
        err.contains("pre-initialization failed") && err.contains("the init timed out after 300ms"),
        "{err}"
    );
    assert!(!lode.cli_ok(&["ls"]).contains("spin-init"));
    let answer = lode.cli_ok(&["call", "primes/nth", "1"]);
    assert!(answer.contains("\"table_ready_at_start\":true"), "{answer}");
}
