//! End-to-end tests: a real `lode serve`, the real CLI, real HTTP on loopback.

mod harness;

use std::time::Duration;

use futures::StreamExt;
use harness::{Lode, misbehave, misbehave_project, sample, sample_dir};
use reqwest::Method;
use serde_json::Value;

/// Sends blob + manifest straight to the API and returns the deploy's NDJSON events.
async fn deploy_raw(lode: &Lode, app: &str, bytes: Vec<u8>) -> (u16, Vec<Value>) {
    let digest = lode.upload(bytes).await;
    let manifest = serde_json::json!({
        "app": app,
        "functions": [{"name": app, "runtime": "wasm", "component": digest, "web": {"path": "/"}}]
    });
    let response = lode
        .api(Method::PUT, &format!("/v1/apps/{app}"))
        .json(&manifest)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let events = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| serde_json::json!({"raw": l})))
        .collect();
    (status, events)
}

fn last_message(events: &[Value]) -> String {
    let last = events.last().expect("at least one event");
    assert_eq!(
        last["event"], "error",
        "expected a failed deploy: {events:?}"
    );
    last["message"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_a_crate_and_routes_by_path_and_host() {
    let lode = Lode::start(&[]);
    let out = lode.deploy(&sample_dir("hello-http"), "hello");
    assert!(out.contains(&format!("{}/hello/", lode.http)), "{out}");

    assert_eq!(lode.get("/hello/").await, (200, "hello\n".into()));
    assert_eq!(lode.get("/hello").await, (200, "hello\n".into()));
    let by_host = lode
        .public(Method::GET, "/")
        .header("host", "hello.lode.localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(by_host.status(), 200);
    assert!(by_host.headers().contains_key("x-lode-request-id"));
    assert_eq!(by_host.text().await.unwrap(), "hello\n");

    lode.deploy(&misbehave(), "probe");
    let (status, body) = lode.get("/probe/headers?a=1").await;
    assert_eq!(status, 200);
    assert!(body.contains("path=/headers?a=1\n"), "{body}");
    assert!(body.contains("prefix=/probe\n"), "{body}");

    // A client cannot pass its own prefix off as Lode's.
    let spoofed = lode
        .public(Method::GET, "/headers")
        .header("host", "probe.lode.localhost")
        .header("x-forwarded-prefix", "/evil")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(spoofed.contains("prefix=\n"), "{spoofed}");

    let (status, body) = lode.get("/nope/").await;
    assert_eq!(status, 404);
    assert!(
        body.contains("no app named \\\"nope\\\"") && body.contains("lode ls"),
        "{body}"
    );
    assert_eq!(lode.get("/").await.0, 404);

    let listing = lode.cli_ok(&["ls"]);
    assert!(
        listing.contains("hello") && listing.contains("probe"),
        "{listing}"
    );
    lode.cli_ok(&["rm", "hello"]);
    assert_eq!(lode.get("/hello/").await.0, 404);
    let err = lode.cli_err(&["rm", "hello"]);
    assert!(err.contains("no app named \"hello\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_get_clear_answers() {
    let lode = Lode::start(&["--timeout", "1s", "--max-body", "4096", "--memory", "64"]);
    lode.deploy(&misbehave(), "bad");

    let (status, body) = lode.get("/bad/spin").await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("timeout"), "{body}");
    let (status, _) = lode.get("/bad/sleep?ms=10000").await;
    assert_eq!(status, 504);

    let trap = lode.public(Method::GET, "/bad/trap").send().await.unwrap();
    assert_eq!(trap.status(), 500);
    let request_id = trap.headers()["x-lode-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = trap.json().await.unwrap();
    assert_eq!(body["error"]["kind"], "trap");
    assert_eq!(body["error"]["request_id"], request_id.as_str());
    let logs = lode.cli_ok(&["logs", "bad"]);
    let trap_lines: Vec<&str> = logs.lines().filter(|l| l.contains(&request_id)).collect();
    assert!(
        trap_lines.iter().any(|l| l.contains("deliberate trap")),
        "{logs}"
    );
    assert!(
        trap_lines.iter().any(|l| l.contains("unreachable")),
        "{logs}"
    );
    assert!(
        trap_lines.iter().any(|l| l.contains("wasm function")),
        "no backtrace: {logs}"
    );

    // 64 MiB per instance by flag: 16 MiB fits, 100 MiB does not.
    assert_eq!(lode.get("/bad/alloc?mb=16").await.0, 200);
    assert_eq!(lode.get("/bad/alloc?mb=100").await.0, 500);
    let logs = lode.cli_ok(&["logs", "bad", "--tail", "50"]);
    assert!(
        logs.contains("memory"),
        "the log should name the memory limit: {logs}"
    );

    let small = lode
        .public(Method::POST, "/bad/body")
        .body(vec![7u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(small.text().await.unwrap(), "1000 bytes\n");
    let big = lode
        .public(Method::POST, "/bad/body")
        .body(vec![7u8; 10_000])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    // Without Content-Length the limit still holds as the body streams in.
    let chunks = futures::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![1u8; 1000])));
    let streamed = lode
        .public(Method::POST, "/bad/body")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 413);

    // The server still serves after all that.
    assert_eq!(lode.get("/bad/").await, (200, "misbehave\n".into()));
    assert_eq!(
        lode.metric("lode_http_errors_total{app=\"bad\",kind=\"trap\"}")
            .await,
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_limits_override_server_defaults() {
    let lode = Lode::start(&["--memory", "32", "--timeout", "1s"]);
    let dir = misbehave_project(
        "app = \"roomy\"\n[[function]]\nname = \"web\"\npath = \"m.wasm\"\nmemory = 128\ntimeout = \"3s\"\n",
    );
    lode.cli_ok(&["deploy", dir.path().to_str().unwrap()]);
    assert_eq!(lode.get("/roomy/alloc?mb=64").await.0, 200);
    assert_eq!(
        lode.get("/roomy/sleep?ms=1500").await,
        (200, "slept\n".into())
    );
}

/// The attack on a kept instance: a request that sends its response but never finishes or
/// drops the body. Kept, the instance would hold that client waiting for the body's end;
/// Lode drops it instead, so the client's response ends and the next request starts fresh.
/// A trap drops a kept instance too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_instance_is_dropped_when_it_leaves_a_body_open_or_traps() {
    let lode = Lode::start(&[]);
    let dir = misbehave_project(
        "app = \"kept\"\n[[function]]\nname = \"web\"\npath = \"m.wasm\"\ninstance_reuse = 10\n",
    );
    lode.cli_ok(&["deploy", dir.path().to_str().unwrap()]);
    let served = |expected: u32| (200, format!("served {expected}\n"));
    assert_eq!(lode.get("/kept/served").await, served(1));
    assert_eq!(lode.get("/kept/served").await, served(2));

    let response = lode
        .public(reqwest::Method::GET, "/kept/leave-open")
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The body ends (cut short or not) instead of waiting on the instance.
    if let Err(e) = response.text().await {
        assert!(!e.is_timeout(), "{e}");
    }
    assert_eq!(lode.get("/kept/served").await, served(1));
    assert_eq!(lode.get("/kept/served").await, served(2));

    assert_eq!(lode.get("/kept/trap").await.0, 500);
    assert_eq!(lode.get("/kept/served").await, served(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deploys_get_clear_errors_and_leave_nothing() {
    let lode = Lode::start(&["--max-blob", "1000000"]);

    let (status, events) = deploy_raw(&lode, "core", wat::parse_str("(module)").unwrap()).await;
    assert_eq!(status, 200);
    assert!(
        last_message(&events).contains("core Wasm module"),
        "{events:?}"
    );

    let (_, events) = deploy_raw(&lode, "garbage", b"\0asm\x0d\0\x01\0garbage".to_vec()).await;
    assert!(
        last_message(&events).contains("invalid component"),
        "{events:?}"
    );
    let (_, events) = deploy_raw(&lode, "text", b"hello, not wasm".to_vec()).await;
    assert!(last_message(&events).contains("magic bytes"), "{events:?}");

    let imports = wat::parse_str(
        r#"(component
             (import "acme:widgets/frobnicate@1.0.0" (instance))
             (import "acme:widgets/polish" (instance)))"#,
    )
    .unwrap();
    let (_, events) = deploy_raw(&lode, "imports", imports).await;
    let message = last_message(&events);
    assert!(
        message.contains("acme:widgets/frobnicate@1.0.0"),
        "{message}"
    );
    assert!(message.contains("acme:widgets/polish"), "{message}");

    let (_, events) = deploy_raw(&lode, "nohttp", wat::parse_str("(component)").unwrap()).await;
    assert!(
        last_message(&events).contains("wasi:http/incoming-handler"),
        "{events:?}"
    );

    // The CLI refuses a core module before uploading, with the same advice.
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("module.wasm");
    std::fs::write(&module, wat::parse_str("(module)").unwrap()).unwrap();
    let err = lode.cli_err(&["deploy", module.to_str().unwrap()]);
    assert!(
        err.contains("core Wasm module") && err.contains("wasm32-wasip2"),
        "{err}"
    );

    let err = lode.cli_err(&[
        "deploy",
        sample("hello_http").to_str().unwrap(),
        "--name",
        "Bad_Name",
    ]);
    assert!(err.contains("invalid app name \"Bad_Name\""), "{err}");

    use lode_registry::{BlobAccess, Digest};
    let registry = lode.registry_client();
    let big = vec![0u8; 2_000_000];
    let err = registry
        .put_blob(&Digest::of(&big), big.into())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--max-blob"), "{err}");
    let err = registry
        .put_blob(&Digest::of(b"claimed"), b"abc".to_vec().into())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("digest mismatch"), "{err}");

    let response = lode
        .api(Method::PUT, "/v1/apps/x")
        .json(&serde_json::json!({"app": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("functions"));

    let missing = serde_json::json!({"app": "x", "functions": [{"name": "x", "runtime": "wasm",
        "component": format!("blake3:{}", "1".repeat(64)), "web": {"path": "/"}}]});
    let response = lode
        .api(Method::PUT, "/v1/apps/x")
        .json(&missing)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("not uploaded"));

    let listing = lode.cli_ok(&["ls"]);
    assert!(listing.contains("no apps deployed"), "{listing}");
    // Nothing was recorded either: a restart restores no apps.
    let mut lode = lode;
    lode.restart();
    assert!(lode.cli_ok(&["ls"]).contains("no apps deployed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_the_token() {
    let lode = Lode::start(&[]);
    let client = lode.client();
    let none = client
        .get(format!("{}/v1/apps", lode.api))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 401);
    assert!(none.text().await.unwrap().contains("missing API token"));
    let wrong = client
        .get(format!("{}/v1/apps", lode.api))
        .bearer_auth("lode_wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let metrics = client
        .get(format!("{}/metrics", lode.api))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 401);
    assert_eq!(
        lode.api(Method::GET, "/v1/apps")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let out = std::process::Command::new(harness::LODE)
        .args(["ls", "--token", "lode_wrong"])
        .env("LODE_CONFIG", lode.client_file())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token is wrong"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_again_without_recompiling() {
    let mut lode = Lode::start(&[]);
    lode.deploy(&sample("hello_http"), "hello");
    assert_eq!(
        lode.metric("lode_component_compiles_total{app=\"hello\"}")
            .await,
        Some(1.0)
    );

    // Same bytes again: a no-op that keeps the version.
    let out = lode.deploy(&sample("hello_http"), "hello");
    assert!(out.contains("unchanged"), "{out}");
    assert_eq!(
        lode.metric("lode_component_compiles_total{app=\"hello\"}")
            .await,
        Some(1.0)
    );

    lode.restart();
    assert_eq!(lode.get("/hello/").await, (200, "hello\n".into()));
    assert_eq!(
        lode.metric("lode_component_compiles_total{app=\"hello\"}")
            .await,
        None
    );
    assert_eq!(
        lode.metric("lode_component_cache_loads_total{app=\"hello\"}")
            .await,
        Some(1.0)
    );

    // With the compiled cache gone, the restart compiles again and still serves.
    std::fs::remove_dir_all(lode.dirs.path().join("cache/compiled")).unwrap();
    lode.restart();
    assert_eq!(lode.get("/hello/").await, (200, "hello\n".into()));
    assert_eq!(
        lode.metric("lode_component_compiles_total{app=\"hello\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_components_no_app_uses_are_pruned() {
    let mut lode = Lode::start(&["--compiled-cache-ttl", "0s"]);
    let compiled_dir = lode.dirs.path().join("cache/compiled");
    let compiled = || {
        let mut names: Vec<String> = std::fs::read_dir(&compiled_dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".cwasm"))
            .collect();
        names.sort();
        names
    };
    lode.deploy(&sample("hello_http"), "site");
    let first = compiled();
    assert_eq!(first.len(), 1, "{first:?}");
    // New bytes for the app: the old version's compiled form is used by no app now.
    lode.deploy(&sample("stream_echo"), "site");
    let pruned = harness::wait_for(Duration::from_secs(10), || {
        let now = compiled();
        (now.len() == 1 && now != first).then_some(now)
    });
    assert!(pruned.is_some(), "{:?}", compiled());
    // What the live version uses stays, so a restart loads it rather than compiling.
    lode.restart();
    assert_eq!(
        lode.metric("lode_component_cache_loads_total{app=\"site\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(compiled(), pruned.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_bytes_switch_atomically_and_in_flight_requests_finish() {
    let lode = Lode::start(&["--timeout", "10s"]);
    lode.deploy(&misbehave(), "swap");
    let response = lode
        .public(Method::GET, "/swap/slow?chunks=6&ms=250")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut received = Vec::new();
    while !received.ends_with(b"\n") {
        received.extend_from_slice(&body.next().await.unwrap().unwrap());
    }
    assert!(received.starts_with(b"misbehave chunk 0\n"), "{received:?}");

    let out = lode.deploy(&sample("hello_http"), "swap");
    assert!(out.contains("version 2"), "{out}");
    assert_eq!(lode.get("/swap/").await, (200, "hello\n".into()));

    while let Some(chunk) = body.next().await {
        received.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(received).unwrap();
    assert!(
        text.ends_with("misbehave chunk 5\n"),
        "the old version should finish: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_and_guest_output_reaches_the_logs() {
    let lode = Lode::start(&[]);
    lode.deploy(&sample_dir("stream-echo"), "echo");

    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let response = lode
        .public(Method::POST, "/echo/echo?times=4")
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    let request_id = response.headers()["x-lode-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body = response.bytes().await.unwrap();
    assert_eq!(body.len(), 400_000);
    assert!(body.chunks(100_000).all(|c| c == payload.as_slice()));

    let (status, lines) = lode.get("/echo/lines?n=20000").await;
    assert_eq!(status, 200);
    assert_eq!(lines.lines().count(), 20_000);
    assert_eq!(lines.lines().last(), Some("line 19999"));

    let logs = lode.cli_ok(&["logs", "echo"]);
    let line = logs
        .lines()
        .find(|l| l.contains("echo: received 100000 bytes"))
        .unwrap_or_else(|| panic!("no echo line in {logs}"));
    assert!(
        line.contains(&request_id) && line.contains(" out "),
        "{line}"
    );

    // --follow streams lines logged after it started.
    let mut follower = std::process::Command::new(harness::LODE)
        .args(["logs", "echo", "--follow", "--tail", "0"])
        .env("LODE_CONFIG", lode.client_file())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("lines: streaming 7 lines"))
    });
    for _ in 0..50 {
        assert_eq!(lode.get("/echo/lines?n=7").await.0, 200);
        if reader.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    follower.kill().unwrap();
    follower.wait().unwrap();
    assert!(
        reader.join().unwrap().is_some(),
        "--follow showed no new line"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_reach_only_allow_listed_hosts_and_never_lode() {
    // Loopback is opened to grants by the operator, as a test stand-in for a private service.
    let lode = Lode::start(&["--allow-net", "127.0.0.0/8"]);
    // A loopback server of the test's own stands in for an outside host.
    let outside = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let outside_port = outside.local_addr().unwrap().port();
    tokio::spawn(async move {
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "outside" }));
        axum::serve(outside, app).await.unwrap();
    });

    lode.deploy(&misbehave(), "closed");
    let (_, body) = lode
        .get(&format!(
            "/closed/fetch?url=http://127.0.0.1:{outside_port}/"
        ))
        .await;
    assert!(body.contains("HttpRequestDenied"), "{body}");

    let api_port = lode.api.rsplit(':').next().unwrap().to_string();
    let http_port = lode.http.rsplit(':').next().unwrap().to_string();
    // A name that resolves to loopback is refused unless the address is named too; an
    // entry without a port opens 80 and 443 only.
    let dir = misbehave_project(&format!(
        "[[function]]\nname = \"web\"\npath = \"m.wasm\"\n\
         network = {{ allow = [\"localhost:{outside_port}\", \"127.0.0.2\"] }}\n"
    ));
    lode.cli_ok(&["deploy", dir.path().to_str().unwrap(), "--name", "named"]);
    let (_, body) = lode
        .get(&format!(
            "/named/fetch?url=http://localhost:{outside_port}/"
        ))
        .await;
    assert!(body.contains("DestinationIpProhibited"), "{body}");
    let (_, body) = lode
        .get(&format!(
            "/named/fetch?url=http://127.0.0.2:{outside_port}/"
        ))
        .await;
    assert!(body.contains("HttpRequestDenied"), "{body}");

    let mut allow = vec![format!("127.0.0.1:{outside_port}")];
    for port in [&api_port, &http_port] {
        allow.push(format!("127.0.0.1:{port}"));
        allow.push(format!("localhost:{port}"));
    }
    let dir = misbehave_project(&format!(
        "[[function]]\nname = \"web\"\npath = \"m.wasm\"\n\
         network = {{ allow = {allow:?} }}\n"
    ));
    lode.cli_ok(&["deploy", dir.path().to_str().unwrap(), "--name", "open"]);
    let (_, body) = lode
        .get(&format!("/open/fetch?url=http://127.0.0.1:{outside_port}/"))
        .await;
    assert_eq!(body, "status 200\n");
    for port in [&api_port, &http_port] {
        for host in ["127.0.0.1", "localhost"] {
            let (_, body) = lode
                .get(&format!("/open/fetch?url=http://{host}:{port}/v1/apps"))
                .await;
            assert!(
                body.contains("DestinationIpProhibited"),
                "{host}:{port}: {body}"
            );
        }
    }
}

/// A component big enough that compiling it takes a while: one core module with many
/// functions, wrapped as a component that exports nothing Lode can serve.
fn large_component(functions: usize) -> Vec<u8> {
    let mut wat = String::from("(component (core module $m (memory 1)\n");
    for i in 0..functions {
        wat.push_str(&format!(
            "(func $f{i} (param i32) (result i32) local.get 0 i32.const {i} i32.add i32.const 3 i32.mul \
             local.get 0 i32.xor i32.const 7 i32.rem_u (if (result i32) (then i32.const 1) (else local.get 0 i32.const 2 i32.shl)))\n"
        ));
    }
    wat.push_str(") (core instance (instantiate $m)))");
    wat::parse_str(&wat).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_compile_reports_progress_and_blocks_nothing_else() {
    let lode = Lode::start(&[]);
    lode.deploy(&sample("hello_http"), "hello");
    let digest = lode.upload(large_component(30_000)).await;
    let manifest = serde_json::json!({"app": "big", "functions": [{"name": "big", "runtime": "wasm",
        "component": digest, "web": {"path": "/"}}]});
    let response = lode
        .api(Method::PUT, "/v1/apps/big")
        .json(&manifest)
        .send()
        .await
        .unwrap();
    let mut events = harness_lines(response);

    let first = events.next().await.unwrap();
    assert_eq!(first["event"], "compiling", "{first}");
    // While it compiles, other API calls and other apps' traffic are answered.
    assert_eq!(lode.get("/hello/").await, (200, "hello\n".into()));
    let apps = lode.api(Method::GET, "/v1/apps").send().await.unwrap();
    assert_eq!(apps.status(), 200);
    let others_answered = std::time::Instant::now();

    let mut rest = Vec::new();
    let mut compiled_arrived = None;
    while let Some(event) = events.next().await {
        if event["event"] == "compiled" {
            compiled_arrived = Some(std::time::Instant::now());
        }
        rest.push(event);
    }
    let compiled_at = rest.iter().position(|e| e["event"] == "compiled");
    assert!(compiled_at.is_some(), "{rest:?}");
    assert!(
        others_answered < compiled_arrived.unwrap(),
        "other requests waited for the compile to finish"
    );
    assert!(
        rest[..compiled_at.unwrap()]
            .iter()
            .all(|e| e["event"] == "progress"),
        "{rest:?}"
    );
    assert!(
        last_message(&rest).contains("wasi:http/incoming-handler"),
        "{rest:?}"
    );
}

fn harness_lines(response: reqwest::Response) -> impl futures::Stream<Item = Value> + Unpin {
    lode::cli::ndjson_lines::<Value>(response).map(|r| r.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_instance_pool_answers_503() {
    let lode = Lode::start(&["--instances", "1", "--timeout", "10s"]);
    lode.deploy(&misbehave(), "one");
    let busy = lode
        .public(Method::GET, "/one/slow?chunks=4&ms=250")
        .send()
        .await
        .unwrap();
    let mut body = busy.bytes_stream();
    body.next().await.unwrap().unwrap();
    let refused = lode.public(Method::GET, "/one/").send().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert!(refused.text().await.unwrap().contains("--instances"));
    while body.next().await.is_some() {}
    assert_eq!(lode.get("/one/").await, (200, "misbehave\n".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_that_does_not_parse_is_refused_in_json_by_name() {
    let lode = Lode::start(&[]);
    for path in [
        "/v1/apps/x/calls?limit=lots",
        "/v1/calls/c-1?wait=soon",
        "/v1/apps/x/logs?tail=-1",
    ] {
        let response = lode.api(Method::GET, path).send().await.unwrap();
        assert_eq!(response.status(), 400, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["kind"], "invalid_request", "{path}: {body}");
        let parameter = path.split(['?', '=']).nth(1).unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(parameter), "{path}: {message}");
    }
}
