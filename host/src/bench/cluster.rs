//! `lode bench cluster`: Lode on shared engines against the embedded default, in one run.
//!
//! - a warm Wasm call through the API, on a host whose state is in PostgreSQL, against the
//!   same call on a single host with the embedded state;
//! - a deploy on one host to the first answer of the new version on another;
//! - spawned calls through the queue in PostgreSQL, spread over the hosts' APIs, from the
//!   first spawn to the last result stored;
//! - kill -9 of one host while it holds spawned calls: each ends, run again elsewhere (the
//!   function allows one retry) or as lost by name, none missing;
//! - the rows this build cannot measure yet say so.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use crate::bench::support::{call_api, median, start_server};
use crate::cli::cluster::{ClusterHost, LocalCluster};

/// Settings for `lode bench cluster`.
#[derive(Debug, Args)]
pub struct ClusterBench {
    /// Warm calls timed on each side.
    #[arg(long, default_value_t = 500)]
    calls: usize,
    /// Deploys timed from one host to another.
    #[arg(long, default_value_t = 20)]
    deploys: usize,
    /// Hosts in the cluster.
    #[arg(long, default_value_t = 3)]
    hosts: usize,
    /// Spawned calls pushed through the queue.
    #[arg(long, default_value_t = 5000)]
    spawns: usize,
    /// Where debootstrap bases are kept.
    #[arg(long, default_value = "/var/cache/lode/images/base")]
    image_base_dir: std::path::PathBuf,
    /// Cold starts timed on each side.
    #[arg(long, default_value_t = 3)]
    cold: usize,
}

fn deploy(lode: &Path, config: &Path, path: &str, name: Option<&str>) -> Result<()> {
    let mut command = Command::new(lode);
    command.env("LODE_CONFIG", config).arg("deploy").arg(path);
    if let Some(name) = name {
        command.args(["--name", name]);
    }
    let out = command.output()?;
    if !out.status.success() {
        bail!(
            "deploying {path} failed (run from the repository root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The median and 99th percentile of `calls` warm calls of `target` (`app/function`) with
/// `7` at `api`.
async fn time_calls(
    http: &reqwest::Client,
    api: &str,
    token: &str,
    target: &str,
    calls: usize,
) -> Result<(Duration, Duration)> {
    let mut times = Vec::with_capacity(calls);
    for i in 0..calls + 50 {
        let started = Instant::now();
        call_api(http, api, token, target, json!({"args": [7], "kwargs": {}})).await?;
        // The first 50 warm the connection and the instance pool.
        if i >= 50 {
            times.push(started.elapsed());
        }
    }
    times.sort();
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    Ok((median(times), p99))
}

async fn body(http: &reqwest::Client, url: &str) -> String {
    match http.get(url).send().await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Spawned calls pushed, and when.
struct Spawned {
    ids: Vec<String>,
    started: Instant,
    /// How long the pushes took.
    pushed: Duration,
}

/// Spawns `count` calls of `app/function` with `args`, spread over the hosts' APIs, 64 at a
/// time.
async fn spawn_all(
    http: &reqwest::Client,
    hosts: &[ClusterHost],
    app: &str,
    function: &str,
    args: serde_json::Value,
    count: usize,
) -> Result<Spawned> {
    use futures::StreamExt;
    let body = json!({"args": args, "kwargs": {}});
    let started = Instant::now();
    let ids: Vec<Result<String>> = futures::stream::iter(0..count)
        .map(|i| {
            let host = &hosts[i % hosts.len()];
            let request = http
                .post(format!(
                    "{}/v1/apps/{app}/functions/{function}/spawn",
                    host.api
                ))
                .bearer_auth(&host.token)
                .json(&body);
            async move {
                let answer: serde_json::Value = request.send().await?.json().await?;
                answer["call_id"]
                    .as_str()
                    .map(str::to_string)
                    .with_context(|| format!("a spawn was refused: {answer}"))
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let pushed = started.elapsed();
    Ok(Spawned {
        ids: ids.into_iter().collect::<Result<_>>()?,
        started,
        pushed,
    })
}

/// How spawned calls ended, read from PostgreSQL.
#[derive(Debug)]
struct Finished {
    /// When the last one ended (seen within a few milliseconds).
    at: Instant,
    succeeded: usize,
    lost: usize,
    other: usize,
}

/// Waits (up to `limit`) until none of `ids` is running any more; counts how they ended.
async fn wait_finished(postgres: &str, ids: &[String], limit: Duration) -> Result<Finished> {
    let (url, ids) = (postgres.to_string(), ids.to_vec());
    tokio::task::spawn_blocking(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls)?;
        let deadline = Instant::now() + limit;
        loop {
            let rows = client.query(
                "SELECT convert_from(value, 'UTF8')::jsonb #>> '{status}',                    convert_from(value, 'UTF8')::jsonb #>> '{error,kind}', count(*)                  FROM lode_entries WHERE tbl = 'calls' AND key = ANY($1) GROUP BY 1, 2",
                &[&ids],
            )?;
            let at = Instant::now();
            let mut finished = Finished {
                at,
                succeeded: 0,
                lost: 0,
                other: 0,
            };
            let mut running = ids.len();
            for row in rows {
                let (status, kind, count): (String, Option<String>, i64) =
                    (row.get(0), row.get(1), row.get(2));
                let count = count as usize;
                match (status.as_str(), kind.as_deref()) {
                    ("running", _) => continue,
                    ("succeeded", _) => finished.succeeded += count,
                    (_, Some("lost")) => finished.lost += count,
                    _ => finished.other += count,
                }
                running -= count;
            }
            if running == 0 {
                return Ok(finished);
            }
            if Instant::now() > deadline {
                bail!("{running} of {} spawned calls never ended", ids.len());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    })
    .await?
}

/// Spawns 200 ms naps of a function that allows one retry, kills -9 the last host while it
/// holds some, and checks every one ends: run again elsewhere or lost by name, none missing.
async fn kill_under_load(
    lode: &Path,
    http: &reqwest::Client,
    cluster: &mut LocalCluster,
    work: &Path,
) -> Result<String> {
    let project = work.join("naps");
    std::fs::create_dir_all(&project)?;
    let component = std::env::current_dir()?.join("samples/wasm-limits");
    std::fs::write(
        project.join("lode.toml"),
        format!(
            "app = \"naps\"\n[[function]]\nname = \"probe\"\npath = {:?}\ntimeout = 10\n\
             retries = {{ max_retries = 1, initial_delay = 0.0 }}\n",
            component.display().to_string()
        ),
    )?;
    let config = cluster.hosts[0].data.join("client.json");
    deploy(
        lode,
        &config,
        project.to_str().context("a UTF-8 path")?,
        None,
    )?;
    // Every host serves it before the load starts.
    for host in &cluster.hosts {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let body = json!({"args": ["nap", 1], "kwargs": {}});
            if call_api(http, &host.api, &host.token, "naps/probe", body)
                .await
                .is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("host {} never served naps", host.id);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let count = 1500;
    let survivors = cluster.hosts.len() - 1;
    let spawned = spawn_all(
        http,
        &cluster.hosts[..survivors],
        "naps",
        "probe",
        json!(["nap", 200]),
        count,
    )
    .await?;
    let victim = cluster.hosts.last_mut().context("no hosts")?;
    let victim_id = victim.id.clone();
    let postgres = cluster.postgres.url();
    // Killed while it holds calls: right after it took some.
    let held = {
        let (url, id) = (postgres.clone(), victim_id.clone());
        tokio::task::spawn_blocking(move || {
            let mut client = postgres::Client::connect(&url, postgres::NoTls)?;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let held: i64 = client
                    .query_one(
                        "SELECT count(*) FROM lode_spawned WHERE lease_host = $1",
                        &[&id],
                    )?
                    .get(0);
                if held > 0 {
                    return Ok(held);
                }
                if Instant::now() > deadline {
                    bail!("host {id} never took a call");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
        .await??
    };
    victim.kill();
    let finished = wait_finished(&postgres, &spawned.ids, Duration::from_secs(120)).await?;
    let missing = count - finished.succeeded - finished.lost - finished.other;
    let row = format!(
        "{:<58} {count} naps; {victim_id} killed holding ~{held}: {} succeeded (rerun \
         elsewhere as retries allow), {} lost by name, {} other, {missing} missing",
        "kill -9 of one host of three under spawned load",
        finished.succeeded,
        finished.lost,
        finished.other,
    );
    if finished.other > 0 || missing > 0 {
        bail!("{row}");
    }
    Ok(row)
}

/// The flags of the cluster's hosts.
fn host_flags(base: &str) -> [&str; 4] {
    ["--spawn-lease", "2s", "--image-base-dir", base]
}

/// A cold call of a new Python app's function, each on a host that never ran it and has
/// nothing cached: the embedded host restarted with an empty cache (its registry local),
/// and a new host of the cluster (its registry reading through to S3). The durations of
/// each side's first calls.
async fn cold_starts(
    lode: &Path,
    http: &reqwest::Client,
    cluster: &mut LocalCluster,
    single: &mut crate::bench::support::LodeServer,
    args: &ClusterBench,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let (mut local, mut s3) = (Vec::new(), Vec::new());
    let base = args.image_base_dir.display().to_string();
    let dir = tempfile::tempdir()?;
    for i in 0..args.cold.max(1) {
        let name = format!("cold{i}");
        let path = dir.path().join(format!("{name}.py"));
        std::fs::write(
            &path,
            format!(
                "import lode\napp = lode.App({name:?})\n\n\n@app.function()\n\
                 def square(x: int) -> int:\n    return x * x\n"
            ),
        )?;
        let path = path.to_str().context("a UTF-8 path")?;
        deploy(lode, &single.client_file, path, None)?;
        single.restart_with_empty_cache()?;
        let started = Instant::now();
        single
            .call(http, &format!("{name}/square"), json!({"args": [7]}))
            .await?;
        local.push(started.elapsed());

        let h1 = cluster.hosts[0].data.join("client.json");
        deploy(lode, &h1, path, None)?;
        let flags = host_flags(&base);
        let id = format!("new{i}");
        let host = tokio::task::block_in_place(|| cluster.add_host(&id, &flags))?;
        let started = Instant::now();
        let target = format!("{name}/square");
        call_api(http, &host.api, &host.token, &target, json!({"args": [7]}))
            .await
            .with_context(|| format!("the cold call on {id}"))?;
        s3.push(started.elapsed());
    }
    Ok((local, s3))
}

/// Runs `lode bench cluster`.
pub async fn cluster(args: ClusterBench) -> Result<()> {
    let lode = std::env::current_exe()?;
    let work = tempfile::Builder::new()
        .prefix("lode-bench-cluster")
        .tempdir_in("/var/tmp")?;
    let hosts = args.hosts.max(2);
    println!(
        "lode bench cluster: {hosts} hosts on PostgreSQL and SeaweedFS, against one embedded host"
    );
    let dir = work.path().to_path_buf();
    let base = args.image_base_dir.display().to_string();
    let cluster =
        tokio::task::spawn_blocking(move || LocalCluster::start(&dir, hosts, &host_flags(&base)))
            .await??;
    let single = start_server(&args.image_base_dir)?;
    let (a, b): (&ClusterHost, &ClusterHost) = (&cluster.hosts[0], &cluster.hosts[1]);
    let a_config = a.data.join("client.json");
    deploy(&lode, &a_config, "samples/wasm-fanout", None)?;
    deploy(&lode, &single.client_file, "samples/wasm-fanout", None)?;

    let http = reqwest::Client::new();
    deploy(&lode, &a_config, "samples/python-hello/app.py", None)?;
    deploy(
        &lode,
        &single.client_file,
        "samples/python-hello/app.py",
        None,
    )?;
    for (engine, target) in [("Wasm", "fan/square"), ("Python", "hello-py/square")] {
        let (embedded, embedded_p99) =
            time_calls(&http, &single.api, &single.token, target, args.calls).await?;
        let (shared, shared_p99) = time_calls(&http, &a.api, &a.token, target, args.calls).await?;
        println!(
            "  {:<58} p50 {:>9.2?}  p99 {:>9.2?}",
            format!("warm {engine} call via the API, embedded state (baseline)"),
            embedded,
            embedded_p99
        );
        let delta = shared.as_secs_f64() - embedded.as_secs_f64();
        println!(
            "  {:<58} p50 {:>9.2?}  p99 {:>9.2?}  ({:+.2} ms; target within +0.5 ms)",
            format!("warm {engine} call via the API, PostgreSQL state"),
            shared,
            shared_p99,
            delta * 1e3
        );
    }

    // Deploys alternate between two components under one app; each is a new version.
    let sides = ["samples/hello-http", "samples/stream-echo"];
    let url = format!("{}/prop/", b.http);
    let (mut on_a, mut on_b, mut after_a) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.deploys + 1 {
        let before = body(&http, &url).await;
        let started = Instant::now();
        deploy(&lode, &a_config, sides[i % 2], Some("prop"))?;
        let deployed = Instant::now();
        let deadline = deployed + Duration::from_secs(30);
        loop {
            let now = body(&http, &url).await;
            if !now.is_empty() && now != before && !now.contains("\"error\"") {
                break;
            }
            if Instant::now() > deadline {
                bail!("host {} never served the new version of prop", b.id);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // The first deploy also compiles on the other host; the others hit its cache.
        if i > 0 {
            on_a.push(deployed - started);
            on_b.push(started.elapsed());
            after_a.push(deployed.elapsed());
        }
    }
    let max = *on_b.iter().max().context("no deploys timed")?;
    println!(
        "  {:<58} p50 {:>9.2?}",
        format!("`lode deploy` through {} (the CLI, upload to answer)", a.id),
        median(on_a)
    );
    println!(
        "  {:<58} p50 {:>9.2?}  max {:>9.2?}  (target <= 1 s p50)",
        format!("deploy on {} begun to first answer on {}", a.id, b.id),
        median(on_b),
        max
    );
    println!(
        "  {:<58} p50 {:>9.2?}",
        format!("... of which after {}'s deploy returned", a.id),
        median(after_a)
    );
    let spawned = spawn_all(
        &http,
        &cluster.hosts,
        "fan",
        "square",
        json!([7]),
        args.spawns,
    )
    .await?;
    let postgres = cluster.postgres.url();
    let finished = wait_finished(&postgres, &spawned.ids, Duration::from_secs(120)).await?;
    let took = finished.at - spawned.started;
    println!(
        "  {:<58} {:>9.0}/s  ({} in {:.2?}; pushed at {:.0}/s; target >= 2,000/s)",
        format!("spawned calls through the PostgreSQL queue, {hosts} hosts"),
        spawned.ids.len() as f64 / took.as_secs_f64(),
        spawned.ids.len(),
        took,
        spawned.ids.len() as f64 / spawned.pushed.as_secs_f64(),
    );
    if finished.succeeded != spawned.ids.len() {
        bail!(
            "only {} of {} spawned calls succeeded",
            finished.succeeded,
            spawned.ids.len()
        );
    }

    let mut cluster = cluster;
    println!(
        "  {}",
        kill_under_load(&lode, &http, &mut cluster, work.path()).await?
    );

    let mut single = single;
    let (local, s3) = cold_starts(&lode, &http, &mut cluster, &mut single, &args).await?;
    let (local, s3) = (median(local), median(s3));
    println!(
        "  {:<58} p50 {:>9.2?}",
        "cold Python call, empty cache, registry local (baseline)", local
    );
    println!(
        "  {:<58} p50 {:>9.2?}  ({:.2}x; target within 1.5x)",
        "cold Python call on a new host, chunks from S3",
        s3,
        s3.as_secs_f64() / local.as_secs_f64()
    );
    drop(single);
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}
