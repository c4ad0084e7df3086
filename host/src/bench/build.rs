//! `lode bench build`: `debian_slim + pip_install(numpy)` built cold (a fresh registry, so no
//! step is cached) and warm (everything cached), against `pip install` of the same packages
//! straight on the host in the same run.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use lode_fs::{ChunkCache, MountOptions, MountTable};
use lode_native_runner::builder::{BuildEvent, Builder};
use lode_native_runner::image_spec::{Base, ImageSpec, Step};
use lode_registry::BlobAccess;

use crate::bench::support::start_registry;

/// Settings for `lode bench build`.
#[derive(Debug, Args)]
pub struct BuildBench {
    /// Packages for the pip_install step.
    #[arg(long, value_delimiter = ',', default_value = "numpy")]
    packages: Vec<String>,
    /// Where debootstrap bases are kept (empty: the cold build runs debootstrap too).
    #[arg(long, default_value = "/var/cache/lode/images/base")]
    base_dir: PathBuf,
    /// Scratch space: chunk cache, mounts, build layers.
    #[arg(long, default_value = "/var/cache/lode/bench/build")]
    work: PathBuf,
}

/// Builds `spec`, printing each step's time; returns the total.
async fn timed_build(builder: &Builder, spec: &ImageSpec, label: &str) -> Result<Duration> {
    let marks: Arc<Mutex<Vec<(Instant, String, bool)>>> = Arc::default();
    let sink = marks.clone();
    let events: lode_native_runner::builder::Events = Arc::new(move |event| {
        if let BuildEvent::Step {
            description,
            cached,
            ..
        } = event
        {
            sink.lock()
                .expect("marks lock")
                .push((Instant::now(), description, cached));
        }
    });
    let started = Instant::now();
    builder
        .build(spec, events)
        .await
        .with_context(|| format!("the {label} build"))?;
    let total = started.elapsed();
    let marks = marks.lock().expect("marks lock");
    println!("  {label}: {total:.2?}");
    for (i, (at, description, cached)) in marks.iter().enumerate() {
        let end = marks.get(i + 1).map_or(started + total, |next| next.0);
        let note = if *cached { " (cached)" } else { "" };
        println!("    {:>9.2?}  {description}{note}", end - *at);
    }
    Ok(total)
}

/// Runs `lode bench build`.
pub async fn build(args: BuildBench) -> Result<()> {
    let cgroups: Arc<dyn lode_native_runner::cgroup::Hierarchy> =
        Arc::from(lode_native_runner::cgroup::detect().context("cgroups (run as root)")?);
    let _ = std::fs::remove_dir_all(&args.work);
    std::fs::create_dir_all(&args.work)?;
    println!(
        "lode bench build: debian_slim + pip_install({})",
        args.packages.join(", ")
    );

    // Baseline: the same packages installed by the host's pip, same network path.
    let target = args.work.join("host-pip");
    let started = Instant::now();
    let status = Command::new("python3")
        .args(["-m", "pip", "install", "-q", "--no-cache-dir", "--target"])
        .arg(&target)
        .args(&args.packages)
        .stdout(Stdio::null())
        .status()?;
    let baseline = started.elapsed();
    if !status.success() {
        bail!("pip install on the host failed; is PyPI reachable?");
    }
    println!("  baseline, pip install on the host: {baseline:.2?}");

    let registry = start_registry()?;
    let access: Arc<dyn BlobAccess> = registry.client.clone();
    let cache = ChunkCache::open(&args.work.join("chunks"), 16 << 30)?;
    let mounts = Arc::new(MountTable::new(
        &args.work.join("mounts"),
        cache,
        access.clone(),
        MountOptions::default(),
    )?);
    let builder = Builder::new(
        access,
        mounts.clone(),
        cgroups,
        args.work.join("images"),
        args.base_dir.clone(),
        "bench-build".into(),
    );
    let spec = ImageSpec {
        base: Base::DebianSlim {
            python_version: None,
        },
        steps: vec![Step::PipInstall {
            packages: args.packages.clone(),
        }],
    };
    let cold = timed_build(&builder, &spec, "cold (empty registry)").await?;
    let warm = timed_build(&builder, &spec, "warm (every step cached)").await?;
    println!(
        "  cold build {:.2}x the host pip install; warm build {:.2?} ({:.0}x faster than cold)",
        cold.as_secs_f64() / baseline.as_secs_f64(),
        warm,
        cold.as_secs_f64() / warm.as_secs_f64().max(1e-9)
    );
    mounts.close().await;
    Ok(())
}
