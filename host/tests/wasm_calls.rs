//! Wasm functions called by name (the `lode:function` world), across engines and under
//! limits, through the real CLI against a real `lode serve`.

mod harness;

use std::path::{Path, PathBuf};

use harness::Lode;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn path(relative: &str) -> String {
    repo().join(relative).to_str().unwrap().to_string()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

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
    lode.cli_ok(&["deploy", &path("samples/wasm-fanout"), "--name", "fan"]);
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
    lode.cli_ok(&["deploy", &path("samples/python-hello/app.py")]);
    assert_eq!(
        lode.cli_ok(&[
            "call",
            "fan/main",
            r#"{"n": 4, "target": "hello-py/square"}"#
        ])
        .trim(),
        "14"
    );
    // Python to Wasm: from the SDK on this machine, and from inside a container.
    let sdk = lode::sdk::extract(&lode.dirs.path().join("sdk")).unwrap();
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import lode; print(lode.Function.from_name('fan', 'main').remote({'n': 10}))",
        ])
        .env("PYTHONPATH", &sdk)
        .env("LODE_API", &lode.api)
        .env("LODE_TOKEN", &lode.token)
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "285", "{}", text(&out.stderr));
    lode.cli_ok(&["secret", "create", "feat-api", "TOKEN=x"]);
    lode.cli_ok(&["deploy", &path("host/tests/python/features.py")]);
    assert_eq!(lode.cli_ok(&["call", "feat/wasm_square", "9"]).trim(), "81");

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
    lode.cli_ok(&["deploy", &path("samples/wasm-limits")]);
    assert_eq!(
        lode.cli_ok(&["call", "limits/probe", "config"]).trim(),
        "\"hello from lode.toml\""
    );
    for (mode, expected) in [
        ("recurse", "call_depth: calls nest more than 16 deep"),
        ("spawn-recurse", "call_depth: calls nest more than 16 deep"),
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
