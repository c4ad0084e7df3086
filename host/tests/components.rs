//! Components built by other people's tools deploy unchanged: `wasi:http` handlers written
//! in Python and packaged by componentize-py (CPython inside, about 18 MB), and in JavaScript
//! and packaged by componentize-js (StarlingMonkey inside, about 13 MB), built here from
//! `samples/python-http` and `samples/js-http` with the tools `./lode.sh test` installs.

mod harness;

use std::path::Path;
use std::process::Command;

use harness::{Lode, repo_file, text};

/// componentize-py: `LODE_COMPONENTIZE_PY`, else where `./lode.sh test` puts it.
fn componentize_py() -> String {
    let tool = std::env::var("LODE_COMPONENTIZE_PY")
        .unwrap_or_else(|_| "/var/cache/lode/bin/componentize-py".into());
    assert!(
        Path::new(&tool).exists(),
        "{tool} is missing: run ./lode.sh test, which installs componentize-py"
    );
    tool
}

/// Builds `samples/python-http` into `dir` as `python-http.wasm`.
fn build_python_http(dir: &Path) -> std::path::PathBuf {
    let component = dir.join("python-http.wasm");
    let sample = repo_file("samples/python-http");
    let built = Command::new(componentize_py())
        .args([
            "-d",
            &format!("{sample}/wit"),
            "-w",
            "wasi:http/proxy@0.2.12",
        ])
        .args(["componentize", "-p", &sample, "app", "-o"])
        .arg(&component)
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", text(&built.stderr));
    assert!(std::fs::metadata(&component).unwrap().len() > 10 << 20);
    component
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_http_component_from_componentize_py_deploys_and_serves() {
    let out = tempfile::tempdir().unwrap();
    let component = build_python_http(out.path());

    let mut lode = Lode::start(&[]);
    // Compiling CPython takes seconds; the API answers meanwhile and the deploy shows how far
    // the compile got.
    let mut deploy = lode
        .cli_command(&["deploy", component.to_str().unwrap(), "--name", "pyhttp"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut answered_while_deploying = 0;
    let deploy = loop {
        let (status, _) = lode.api_json(reqwest::Method::GET, "/v1/apps", None).await;
        assert_eq!(status, 200);
        if deploy.try_wait().unwrap().is_none() {
            answered_while_deploying += 1;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        } else {
            break deploy.wait_with_output().unwrap();
        }
    };
    let said = text(&deploy.stderr);
    assert!(deploy.status.success(), "{said}");
    assert!(answered_while_deploying >= 3, "{said}");
    assert!(
        said.contains("functions (") && said.contains("compiled pyhttp in"),
        "{said}"
    );
    // Each request gets a fresh instance of CPython's memory image: its counter starts over.
    for path in ["/pyhttp/", "/pyhttp/again?x=1", "/pyhttp/"] {
        let (status, body) = lode.get(path).await;
        assert_eq!(status, 200, "{body}");
        let seen = path.trim_start_matches("/pyhttp");
        assert_eq!(
            body,
            format!("hello from python at {seen} (request 1 of this instance)\n")
        );
    }

    // The sample's lode.toml opts in to reuse; here with 3 requests per instance, one
    // request at a time, so one instance serves them in turn.
    let project = out.path().join("project");
    std::fs::create_dir(&project).unwrap();
    std::fs::copy(&component, project.join("python-http.wasm")).unwrap();
    let toml = std::fs::read_to_string(repo_file("samples/python-http/lode.toml")).unwrap();
    let toml = toml.replace("instance_reuse = 100", "instance_reuse = 3");
    assert!(toml.contains("instance_reuse = 3"));
    std::fs::write(project.join("lode.toml"), toml).unwrap();
    lode.deploy(&project, "reused");
    let mut counts = Vec::new();
    for _ in 0..4 {
        let (status, body) = lode.get("/reused/").await;
        assert_eq!(status, 200, "{body}");
        counts.push(served_count(&body));
    }
    assert_eq!(
        counts,
        [1, 2, 3, 1],
        "three requests, then a fresh instance"
    );
    // A request that raises traps its instance, which is dropped: the next starts over.
    let (status, body) = lode.get("/reused/fail").await;
    assert_eq!(status, 500, "{body}");
    let (status, body) = lode.get("/reused/").await;
    assert_eq!((status, served_count(&body)), (200, 1), "{body}");
    let logs = lode.cli_ok(&["logs", "reused"]);
    assert!(logs.contains("asked to fail"), "{logs}");

    // A restart loads the compiled code instead of compiling again.
    lode.restart();
    let (status, body) = lode.get("/pyhttp/").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        lode.metric("lode_component_compiles_total{app=\"pyhttp\"}")
            .await,
        None
    );
    assert_eq!(
        lode.metric("lode_component_cache_loads_total{app=\"pyhttp\"}")
            .await,
        Some(1.0)
    );
}

/// componentize-js: `LODE_COMPONENTIZE_JS`, else where `./lode.sh test` puts it.
fn componentize_js() -> String {
    let tool = std::env::var("LODE_COMPONENTIZE_JS").unwrap_or_else(|_| {
        "/var/cache/lode/componentize-js-0.23.0/node_modules/.bin/componentize-js".into()
    });
    assert!(
        Path::new(&tool).exists(),
        "{tool} is missing: run ./lode.sh test, which installs componentize-js"
    );
    tool
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_http_component_from_componentize_js_deploys_and_serves() {
    let out = tempfile::tempdir().unwrap();
    let component = out.path().join("js-http.wasm");
    let built = Command::new(componentize_js())
        .arg(repo_file("samples/js-http/app.js"))
        .args([
            "-w",
            &repo_file("samples/python-http/wit"),
            "-n",
            "wasi:http/proxy@0.2.12",
            "-o",
        ])
        .arg(&component)
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", text(&built.stderr));
    assert!(std::fs::metadata(&component).unwrap().len() > 10 << 20);

    let lode = Lode::start(&[]);
    lode.deploy(&component, "jshttp");
    for path in ["/jshttp/", "/jshttp/again?x=1"] {
        let (status, body) = lode.get(path).await;
        assert_eq!(status, 200, "{body}");
        let seen = path.trim_start_matches("/jshttp");
        assert_eq!(
            body,
            format!("hello from javascript at {seen} (request 1 of this instance)\n")
        );
    }
}

/// The `request N of this instance` the sample answers with.
fn served_count(body: &str) -> u32 {
    let (_, rest) = body
        .split_once("(request ")
        .unwrap_or_else(|| panic!("{body}"));
    rest.split_once(' ').unwrap().0.parse().unwrap()
}
