//! Lode on shared engines: the state in a real PostgreSQL (Debian's, started by the test in a
//! temporary directory), which outlives any one `lode serve`, and blobs in a real S3 store
//! (SeaweedFS), so several hosts serve the same apps.

mod harness;

use std::process::Command;
use std::time::{Duration, Instant};

use harness::{LODE, Lode, sample, text};
use lode::store::local::{LocalPostgres, LocalS3};

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

/// The shared PostgreSQL and S3 of a test, and the secrets key its hosts share.
struct Engines {
    postgres: LocalPostgres,
    s3: LocalS3,
    key: String,
    dir: tempfile::TempDir,
}

impl Engines {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Engines {
            postgres: LocalPostgres::start(&dir.path().join("pg")).unwrap(),
            s3: LocalS3::start(&dir.path().join("s3")).unwrap(),
            key: key_file(dir.path()),
            dir,
        }
    }

    /// A host `id` on them.
    fn host(&self, id: &str) -> Lode {
        self.host_with(id, &[])
    }

    /// Writes the project of app `name`: `samples/wasm-gpu`'s `work` (which keeps busy for
    /// `{"busy": S}` seconds), with `retries` (a lode.toml line, or empty). Its directory.
    fn busy_app(&self, name: &str, retries: &str) -> std::path::PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("lode.toml"),
            format!(
                "app = \"{name}\"\n[[function]]\nname = \"work\"\npath = \"{}\"\ntimeout = 60\n\
                 {retries}volumes = [{{ name = \"mlp-weights\", path = \"/weights\", \
                 read_only = true, create_if_missing = true }}]\n",
                harness::repo_file("samples/wasm-gpu")
            ),
        )
        .unwrap();
        dir
    }

    /// A host `id` on them, with more flags.
    fn host_with(&self, id: &str, flags: &[&str]) -> Lode {
        host(id, &self.postgres, &self.s3, &self.key, flags)
    }
}

/// A host on the shared PostgreSQL and S3 of a test.
fn host(id: &str, postgres: &LocalPostgres, s3: &LocalS3, key: &str, flags: &[&str]) -> Lode {
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (state, blobs) = (postgres.url(), s3.url());
    let mut args = vec![
        "--state",
        &state,
        "--blobs",
        &blobs,
        "--secrets-key-file",
        key,
        "--state-poll",
        "30s",
        "--host-id",
        id,
        "--heartbeat",
        "200ms",
    ];
    args.extend_from_slice(flags);
    Lode::start_with_env(&args, &env)
}

/// Waits (at most 20 s) until `path` on `lode` answers `status`; the body then.
async fn answers(lode: &Lode, path: &str, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (got, body) = lode.get(path).await;
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still answers {got} ({body}), not {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (at most 20 s) until `lode hosts` on `lode` lists `want` ("ID STATE" rows); the
/// listing it last saw, if it never did.
fn hosts_become(lode: &Lode, want: &[&str]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let hosts = lode.cli_ok(&["hosts"]);
        let rows: Vec<String> = hosts
            .lines()
            .skip(1)
            .map(|line| {
                let id = line.split_whitespace().next().unwrap_or("");
                let state = line.rsplit("  ").next().unwrap_or("").trim();
                format!("{id} {state}")
            })
            .collect();
        if rows == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(hosts);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two hosts on one PostgreSQL and one S3 store: a deploy, a redeploy and a removal on one are
/// live on the other through PostgreSQL's notifications (its poll is set to 30 s, so the test
/// would time out waiting for it); a host that joins later serves every app at once, its
/// component read from S3 into its own empty data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_host_serves_what_another_deployed() {
    let engines = Engines::start();
    let a = engines.host("a");
    let mut b = engines.host("b");

    // A second host with a live host's id is refused: it would take that host's calls.
    let out = Command::new(LODE)
        .args(["serve", "--data-dir"])
        .arg(engines.dir.path().join("twin"))
        .args(["--api", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--registry-listen", "127.0.0.1:0", "--no-client-config"])
        .args(["--state", &engines.postgres.url(), "--host-id", "a"])
        .args(["--secrets-key-file", &engines.key])
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains("host id \"a\" is in use by a live host"),
        "{}",
        text(&out.stderr)
    );

    a.deploy(&sample("hello_http"), "site");
    assert_eq!(answers(&b, "/site/", 200).await, "hello\n");
    let logs = b.cli_ok(&["logs", "site"]);
    assert!(
        logs.contains("deployed on another host, is live here"),
        "{logs}"
    );

    b.deploy(&sample("stream_echo"), "site");
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.get("/site/").await.1 == "hello\n" {
        assert!(Instant::now() < deadline, "a kept the old version");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut c = engines.host("c");
    assert_eq!(c.get("/site/").await, a.get("/site/").await);

    a.cli_ok(&["rm", "site"]);
    answers(&b, "/site/", 404).await;
    answers(&c, "/site/", 404).await;

    // Every host lists the others; one killed goes silent, one stopped cleanly goes away.
    let listed = hosts_become(&a, &["a alive (this host)", "b alive", "c alive"]);
    assert!(
        listed.is_ok(),
        "{listed:?}; b ended: {:?}, c ended: {:?}",
        b.exited(),
        c.exited()
    );
    b.kill();
    c.stop();
    hosts_become(&a, &["a alive (this host)", "b silent"]).unwrap();
}

/// Spawned calls go through the queue in PostgreSQL, which every host takes from (here one
/// call at a time each, so three calls land on three hosts). When the hosts running two of
/// them are killed, the third takes both once their leases run out: the one whose function
/// allows a retry runs again there and succeeds; the one without ends as lost, naming the
/// host it was on. A call cancelled through one host is stopped on the host running it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_calls_are_shared_and_a_killed_hosts_calls_run_again_or_end_lost() {
    let engines = Engines::start();
    let slots = ["--spawn-slots", "1", "--spawn-lease", "2s"];
    let mut hosts = vec![
        engines.host_with("a", &slots),
        engines.host_with("b", &slots),
        engines.host_with("c", &slots),
    ];
    let once = engines.busy_app("once", "");
    let again = engines.busy_app(
        "again",
        "retries = { max_retries = 1, initial_delay = 0.0 }\n",
    );
    hosts[0].cli_ok(&["deploy", once.to_str().unwrap()]);
    hosts[0].cli_ok(&["deploy", again.to_str().unwrap()]);
    for lode in &hosts {
        answers_call(lode, "once").await;
        answers_call(lode, "again").await;
    }

    let spawn = async |lode: &Lode, app: &str, seconds: u32| -> String {
        let (_, spawned) = spawn_busy(lode, app, seconds).await;
        spawned["call_id"].as_str().expect("a call id").to_string()
    };
    // All three spawned through one host; each host has room for one.
    let once_id = spawn(&hosts[0], "once", 40).await;
    let again_id = spawn(&hosts[0], "again", 3).await;
    let idle_id = spawn(&hosts[0], "once", 40).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let placed = loop {
        let mut placed = Vec::new();
        for id in [&once_id, &again_id, &idle_id] {
            let seen = call_record(&hosts[1], id).await;
            assert_eq!(seen["status"], "running", "{seen}");
            placed.push(seen["host"].as_str().unwrap_or("").to_string());
        }
        if placed.iter().all(|h| !h.is_empty()) {
            break placed;
        }
        assert!(Instant::now() < deadline, "not all taken: {placed:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut distinct = placed.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct, ["a", "b", "c"], "one call per host: {placed:?}");

    // The third call is cancelled through a host that does not run it; its own host stops
    // it at its next renewal, which frees its slot for the calls of the hosts killed next.
    let index = |id: &str| ["a", "b", "c"].iter().position(|h| *h == id).unwrap();
    let idle_host = index(&placed[2]);
    let other = (idle_host + 1) % 3;
    let (_, cancelled) = hosts[other]
        .api_json(
            reqwest::Method::POST,
            &format!("/v1/calls/{idle_id}/cancel"),
            None,
        )
        .await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");

    hosts[index(&placed[0])].kill();
    hosts[index(&placed[1])].kill();
    let survivor = &hosts[idle_host];
    let deadline = Instant::now() + Duration::from_secs(40);
    let (lost, rerun) = loop {
        let (lost, rerun) = (
            call_record(survivor, &once_id).await,
            call_record(survivor, &again_id).await,
        );
        if lost["status"] != "running" && rerun["status"] != "running" {
            break (lost, rerun);
        }
        assert!(Instant::now() < deadline, "still running: {lost} {rerun}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(lost["status"], "failed", "{lost}");
    assert_eq!(lost["error"]["kind"], "lost", "{lost}");
    let message = lost["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("host {} stopped answering", placed[0]))
            && message.contains("no retries"),
        "{lost}"
    );
    assert_eq!(rerun["status"], "succeeded", "{rerun}");
    assert_eq!(rerun["host"], placed[2].as_str(), "{rerun}");
    let cancelled = call_record(survivor, &idle_id).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
}

/// Spawns `app/work` on `lode`, busy for `seconds`: the status and the answer.
async fn spawn_busy(lode: &Lode, app: &str, seconds: u32) -> (u16, serde_json::Value) {
    let body = serde_json::json!({"args": [], "kwargs": {"busy": seconds}});
    lode.api_json(
        reqwest::Method::POST,
        &format!("/v1/apps/{app}/functions/work/spawn"),
        Some(body),
    )
    .await
}

/// Spawned call `id`'s record as `lode` reads it now.
async fn call_record(lode: &Lode, id: &str) -> serde_json::Value {
    let path = format!("/v1/calls/{id}?wait=0");
    lode.api_json(reqwest::Method::GET, &path, None).await.1
}

/// Waits until `app/work` answers on `lode` (its deploy followed there).
async fn answers_call(lode: &Lode, app: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = lode.cli(&["call", &format!("{app}/work"), "--", "[[1, 2]]"]);
        if !text(&out.stderr).contains("not deployed") && !text(&out.stderr).contains("no app") {
            return;
        }
        assert!(Instant::now() < deadline, "{}", text(&out.stderr));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A sandbox runs on the host that made it: a host that starts later leaves its record as it
/// is (before hosts were named, a starting host marked every running sandbox ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_host_leaves_other_hosts_sandboxes_running() {
    let engines = Engines::start();
    let a = engines.host("a");
    let work = tempfile::tempdir().unwrap();
    std::fs::copy(sample("wasi-tools"), work.path().join("wasi-tools.wasm")).unwrap();
    let spec = harness::write_spec(
        work.path(),
        "image.json",
        r#"{"base": {"wasm": {}}, "steps": [
            {"add_local_file": {"local": "wasi-tools.wasm", "remote": "/usr/local/bin/wasi-tools.wasm"}}
        ]}"#,
    );
    a.build_image(&spec, &["--tag", "test/wasm"]);
    let id = a
        .cli_ok(&["sandbox", "create", "test/wasm"])
        .trim()
        .to_string();
    let info = |lode: &Lode| {
        lode.api(reqwest::Method::GET, &format!("/v1/sandboxes/{id}"))
            .send()
    };
    let before: serde_json::Value = info(&a).await.unwrap().json().await.unwrap();
    assert_eq!(before["host"], "a", "{before}");

    // The record as every host reads it (b holds no sandbox of its own to answer from).
    let b = engines.host("b");
    let after: serde_json::Value = info(&b).await.unwrap().json().await.unwrap();
    assert_eq!(after["status"], "running", "{after}");
    assert_eq!(after["host"], "a", "{after}");
    let out = a.cli(&[
        "sandbox",
        "exec",
        &id,
        "--",
        "wasi-tools",
        "echo",
        "still here",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A volume two hosts share, on Modal's model: a function's write on one host reaches the
/// other after `commit()` there and `reload()` here (not before); two hosts that commit
/// different files both keep theirs; where both commit one file, the later commit wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_reach_other_hosts_through_commit_and_reload() {
    let engines = Engines::start();
    let python = ["--image-base-dir", harness::BASE_DIR];
    let a = engines.host_with("a", &python);
    let b = engines.host_with("b", &python);
    a.cli_ok(&["deploy", &harness::repo_file("host/tests/python/notes.py")]);
    let call = async |lode: &Lode, function: &str, args: serde_json::Value| {
        let (status, answer) = call_notes(lode, function, args.clone()).await;
        assert_eq!(status, 200, "{function}{args}: {answer}");
        answer["result"].clone()
    };
    use serde_json::json;
    // b's copy was synced when b mounted it, before the write: only a reload brings it in.
    assert_eq!(call(&b, "peek", json!(["x.txt"])).await, json!(null));
    call(&a, "write", json!(["x.txt", "from a"])).await;
    assert_eq!(call(&b, "peek", json!(["x.txt"])).await, json!(null));
    assert_eq!(call(&b, "read", json!(["x.txt"])).await, json!("from a"));

    // Different files: both kept. One file: the later commit wins, on both hosts.
    call(&a, "write", json!(["p.txt", "a's"])).await;
    call(&b, "write", json!(["q.txt", "b's"])).await;
    call(&a, "write", json!(["same.txt", "a first"])).await;
    call(&b, "write", json!(["same.txt", "b last"])).await;
    for lode in [&a, &b] {
        assert_eq!(call(lode, "read", json!(["p.txt"])).await, json!("a's"));
        assert_eq!(call(lode, "read", json!(["q.txt"])).await, json!("b's"));
        assert_eq!(
            call(lode, "read", json!(["same.txt"])).await,
            json!("b last")
        );
    }
    // Every host lists the volume, whichever made it.
    assert!(b.cli_ok(&["volume", "ls"]).contains("notes-vol"));
}

/// Calls `notes/function` on `lode` with `args`, waiting (at most 2 minutes) for the deploy
/// to be followed there; the status and the answer.
async fn call_notes(
    lode: &Lode,
    function: &str,
    args: serde_json::Value,
) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, answer) = lode
            .api_json(
                reqwest::Method::POST,
                &format!("/v1/apps/notes/functions/{function}/call"),
                Some(serde_json::json!({ "args": args })),
            )
            .await;
        if status == 404 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        return (status, answer);
    }
}

/// A Python call that lands on a host with no warm container for its function goes to the
/// host that has one (no cold start where it landed); when that host is killed while it
/// runs a call sent to it, the call fails with an error that names the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_calls_go_to_a_warm_host_and_fail_by_name_when_it_dies() {
    let engines = Engines::start();
    let python = ["--image-base-dir", harness::BASE_DIR];
    let mut a = engines.host_with("a", &python);
    let b = engines.host_with("b", &python);
    a.cli_ok(&["deploy", &harness::repo_file("host/tests/python/notes.py")]);
    assert_eq!(call_notes(&a, "nap", serde_json::json!([0])).await.0, 200);
    // b learns from a's heartbeat that a has a warm container for nap.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, hosts) = b.api_json(reqwest::Method::GET, "/v1/hosts", None).await;
        let warm_on_a =
            hosts["hosts"].as_array().unwrap().iter().any(|h| {
                h["id"] == "a" && h["warm"].as_array().unwrap().contains(&"notes/nap".into())
            });
        if warm_on_a {
            break;
        }
        assert!(Instant::now() < deadline, "a never showed warm: {hosts}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, answer) = call_notes(&b, "nap", serde_json::json!([0])).await;
    assert_eq!(
        (status, &answer["result"]),
        (200, &"rested".into()),
        "{answer}"
    );
    let on_b = harness::python::stats_row(&b, "notes", "nap");
    assert_eq!(
        (on_b[1].as_str(), on_b[5].as_str()),
        ("0", "0"),
        "no container, no cold start on b: {on_b:?}"
    );

    // a dies while it runs a call b sent it.
    let slow = tokio::spawn({
        let b_api = b.api(reqwest::Method::POST, "/v1/apps/notes/functions/nap/call");
        async move {
            let response = b_api
                .json(&serde_json::json!({"args": [30]}))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.kill();
    let (status, answer) = tokio::time::timeout(Duration::from_secs(20), slow)
        .await
        .expect("the call ends when its host dies")
        .unwrap();
    assert_eq!(status, 502, "{answer}");
    assert_eq!(answer["error"]["kind"], "host_lost", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("host a stopped answering"),
        "{answer}"
    );
}

/// PostgreSQL briefly down under a running host: public Wasm requests keep being served; a
/// spawn is refused with an error that names the database; a spawned call that finishes
/// meanwhile keeps its result and stores it once the database is back; then spawns work
/// again. Then S3 briefly down: served apps keep serving, a deploy fails by name and
/// works once S3 is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brief_postgres_or_s3_outage_loses_nothing() {
    let mut engines = Engines::start();
    let a = engines.host("a");
    a.deploy(&sample("hello_http"), "site");
    let project = engines.busy_app("busy", "");
    a.cli_ok(&["deploy", project.to_str().unwrap()]);
    let spawn = async |seconds: u32| spawn_busy(&a, "busy", seconds).await;
    let (status, spawned) = spawn(3).await;
    assert_eq!(status, 200, "{spawned}");
    let id = spawned["call_id"].as_str().unwrap().to_string();
    let poll = async || call_record(&a, &id).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while poll().await["host"] != "a" {
        assert!(Instant::now() < deadline, "never taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    engines.postgres.stop_now().unwrap();
    assert_eq!(a.get("/site/").await, (200, "hello\n".into()));
    let (status, refused) = spawn(0).await;
    assert_eq!(status, 503, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("PostgreSQL") && message.contains("retry"),
        "{message}"
    );
    // The running call finishes while the database is away.
    tokio::time::sleep(Duration::from_secs(5)).await;
    engines.postgres.resume().unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        let seen = poll().await;
        if seen["status"] != "running" {
            break seen;
        }
        assert!(Instant::now() < deadline, "still running: {seen}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(spawn(0).await.0, 200);

    // S3 away: what is served keeps being served from this host's copies; a deploy of new
    // code fails by name, stores nothing, and works once S3 is back.
    engines.s3.stop_now();
    assert_eq!(a.get("/site/").await, (200, "hello\n".into()));
    let out = a.cli(&[
        "deploy",
        sample("stream_echo").to_str().unwrap(),
        "--name",
        "late",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("object store s3://"),
        "{}",
        text(&out.stderr)
    );
    assert!(!a.cli_ok(&["ls"]).contains("late"));
    engines.s3.resume().unwrap();
    a.deploy(&sample("stream_echo"), "late");
    assert!(!answers(&a, "/late/lines?n=1", 200).await.is_empty());
}
