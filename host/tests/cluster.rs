//! Lode on shared engines: the state in a real PostgreSQL (Debian's, started by the test in a
//! temporary directory), which outlives any one `lode serve`.

mod harness;

use std::process::Command;

use harness::{LODE, Lode, sample, text};
use lode::store::local_postgres::LocalPostgres;

/// A secrets key every host of a test shares.
fn key_file(dir: &std::path::Path) -> String {
    let path = dir.join("secrets.key");
    std::fs::write(&path, rand::random::<[u8; 32]>()).unwrap();
    path.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_in_postgres_outlives_the_server_and_needs_a_shared_secrets_key() {
    let dir = tempfile::tempdir().unwrap();
    let postgres = LocalPostgres::start(&dir.path().join("pg")).unwrap();
    let url = postgres.url();

    // Without a key every host shares, a shared state is refused before anything starts.
    let out = Command::new(LODE)
        .args(["serve", "--state", &url, "--data-dir"])
        .arg(dir.path().join("refused"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("pass --secrets-key-file"),
        "{}",
        text(&out.stderr)
    );
    let out = Command::new(LODE)
        .args(["serve", "--state", "mysql://db/lode"])
        .output()
        .unwrap();
    assert!(text(&out.stderr).contains("give a postgres:// URL"));

    let key = key_file(dir.path());
    let mut lode = Lode::start(&["--state", &url, "--secrets-key-file", &key]);
    lode.deploy(&sample("hello_http"), "hello");
    lode.cli_ok(&["secret", "create", "api", "TOKEN=abc"]);
    assert_eq!(lode.get("/hello/").await, (200, "hello\n".into()));
    // Nothing of the state is kept in the data dir.
    assert!(!lode.data_dir().join("state").exists());

    lode.restart();
    assert_eq!(lode.get("/hello/").await, (200, "hello\n".into()));
    let secrets = lode.cli_ok(&["secret", "ls"]);
    assert!(
        secrets.contains("api") && secrets.contains("TOKEN"),
        "{secrets}"
    );
}
