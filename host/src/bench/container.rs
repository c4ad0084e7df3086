//! `lode bench container`: container start to the exit of `python3 -c pass`, against bare
//! `python3 -c pass` on the host, in one run. The image is the Debian Python rootfs that
//! `lode bench fs` builds, used as a plain directory and as a lazy mount whose chunks are
//! cached (the image is cached, as in production).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use lode_fs::{ChunkCache, Index, IngestOptions, Mount, MountOptions};
use lode_native_runner::cgroup::V1;
use lode_native_runner::sandbox::{SandboxSpec, spawn};
use lode_native_runner::userns::{CONTAINER_IDS, UserNamespace};
use lode_registry::BlobAccess;

use crate::bench::support::percentile;
use crate::bench::support::start_registry;

/// Settings for `lode bench container`.
#[derive(Debug, Args)]
pub struct ContainerBench {
    /// Starts to time per variant.
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// A Debian rootfs with python3 (`lode bench fs` builds it).
    #[arg(long, default_value = "/var/cache/lode/bench/rootfs-bookworm-python")]
    rootfs: PathBuf,
    /// Scratch space for containers and the chunk cache.
    #[arg(long, default_value = "/var/cache/lode/bench/container")]
    work: PathBuf,
}

fn report(name: &str, mut times: Vec<Duration>, baseline: Option<Duration>) -> Duration {
    times.sort();
    let p50 = percentile(&times, 0.5);
    let ratio = baseline.map_or(String::new(), |b| {
        format!(", {:.2}x the bare p50", p50.as_secs_f64() / b.as_secs_f64())
    });
    println!(
        "  {name:<44} p50 {:>8.2?}  p99 {:>8.2?}{ratio}",
        p50,
        percentile(&times, 0.99)
    );
    p50
}

fn time_containers(
    lower: &Path,
    work: &Path,
    runs: usize,
    cgroups: &V1,
    user_namespace: Option<&Arc<UserNamespace>>,
) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs + 1 {
        let spec = SandboxSpec {
            lower: lower.to_path_buf(),
            scratch: work.join(format!("c{i}")),
            argv: vec!["/usr/bin/python3".into(), "-c".into(), "pass".into()],
            user_namespace: user_namespace.cloned(),
            ..SandboxSpec::default()
        };
        let started = Instant::now();
        let finished = spawn(&spec, cgroups, Stdio::null(), Stdio::piped())?.finish()?;
        let elapsed = started.elapsed();
        if finished.code() != 0 {
            bail!(
                "python3 -c pass failed in the container: {}",
                String::from_utf8_lossy(&finished.stderr)
            );
        }
        // The first start warms caches; it is not counted. What it (and the ingest before
        // it) wrote is flushed first, so writeback does not compete with the timed starts.
        if i == 0 {
            rustix::fs::sync();
        } else {
            times.push(elapsed);
        }
    }
    Ok(times)
}

/// Runs `lode bench container`.
pub async fn container(args: ContainerBench) -> Result<()> {
    if !args.rootfs.join("usr/bin/python3").exists() {
        bail!(
            "{} has no python3; run `lode bench fs` once to build it",
            args.rootfs.display()
        );
    }
    let cgroups = V1::detect().context("cgroups (run as root)")?;
    std::fs::create_dir_all(&args.work)?;
    println!(
        "lode bench container: {} starts of `python3 -c pass` each, image {}",
        args.runs,
        args.rootfs.display()
    );
    let mut bare = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let started = Instant::now();
        // The host's Debian python3: the same release the image holds.
        let status = Command::new("/usr/bin/python3")
            .args(["-c", "pass"])
            .stdout(Stdio::null())
            .status()?;
        bare.push(started.elapsed());
        if !status.success() {
            bail!("python3 -c pass failed on the host");
        }
    }
    let baseline = report("bare python3 -c pass on the host (baseline)", bare, None);

    // As `lode serve` runs them: the container's root is an unprivileged host uid.
    let userns = Arc::new(UserNamespace::create(CONTAINER_IDS).context("a user namespace")?);
    let dir = args.work.join("dir");
    let times = time_containers(&args.rootfs, &dir, args.runs, &cgroups, Some(&userns))?;
    report(
        "container, image as a plain directory",
        times,
        Some(baseline),
    );

    // The same image through the lazy mount, chunks already cached.
    let registry = start_registry()?;
    let report_ingest = lode_fs::ingest(
        &args.rootfs,
        registry.client.clone(),
        IngestOptions::default(),
    )
    .await?;
    let digest = report_ingest.digest.expect("ingest names its index");
    let index = Index::parse(registry.client.get_index(&digest).await?)?;
    let cache_dir = args.work.join("chunks");
    let _ = std::fs::remove_dir_all(&cache_dir);
    let cache = ChunkCache::open(&cache_dir, 16 << 30)?;
    let point = args.work.join("mnt");
    std::fs::create_dir_all(&point)?;
    let mount = Mount::new(
        index,
        cache,
        registry.client.clone(),
        &point,
        MountOptions::default(),
    )?;
    let lazy = args.work.join("lazy");
    if !mount.idmappable() {
        bail!("this kernel cannot idmap the FUSE mount (Linux 6.12+ is needed)");
    }
    let (point_for_runs, runs) = (point.clone(), args.runs);
    let (times, without_userns) = tokio::task::spawn_blocking(move || {
        let cgroups = V1::detect()?;
        let with = time_containers(&point_for_runs, &lazy, runs, &cgroups, Some(&userns))?;
        let without = time_containers(&point_for_runs, &lazy, runs, &cgroups, None)?;
        anyhow::Ok((with, without))
    })
    .await
    .expect("timing does not panic")?;
    let p50 = report(
        "container, image as a lazy mount (cached)",
        times,
        Some(baseline),
    );
    report(
        "  the same without a user namespace",
        without_userns,
        Some(baseline),
    );
    tokio::task::spawn_blocking(move || mount.unmount())
        .await
        .expect("unmounting does not panic")?;
    println!(
        "  target: container start to exit <= 60 ms p50: {}",
        if p50 <= Duration::from_millis(60) {
            "met"
        } else {
            "missed"
        }
    );
    Ok(())
}
