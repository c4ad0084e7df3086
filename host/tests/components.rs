//! Components built by other people's tools deploy unchanged: a `wasi:http` handler written
//! in Python and packaged by componentize-py (CPython inside, about 18 MB), built here from
//! `samples/python-http` with the tool `./lode.sh test` installs.

mod harness;

use std::process::Command;

use harness::{Lode, repo_file, text};

/// componentize-py: `LODE_COMPONENTIZE_PY`, else where `./lode.sh test` puts it.
fn componentize_py() -> String {
    let tool = std::env::var("LODE_COMPONENTIZE_PY")
        .unwrap_or_else(|_| "/var/cache/lode/bin/componentize-py".into());
    assert!(
        std::path::Path::new(&tool).exists(),
        "{tool} is missing: run ./lode.sh test, which installs componentize-py"
    );
    tool
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_http_component_from_componentize_py_deploys_and_serves() {
    let out = tempfile::tempdir().unwrap();
    let component = out.path().join("python-http.wasm");
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

    let lode = Lode::start(&[]);
    lode.deploy(&component, "pyhttp");
    // Each request gets a fresh instance of CPython's memory image.
    for path in ["/pyhttp/", "/pyhttp/again?x=1"] {
        let (status, body) = lode.get(path).await;
        assert_eq!(status, 200, "{body}");
        let seen = path.trim_start_matches("/pyhttp");
        assert_eq!(body, format!("hello from python at {seen}\n"));
    }
}
