//! `lode bench cas`: the content-addressed store against baselines measured in the same run.
//!
//! - ingest throughput of a real tree into a `lode registry serve` on loopback, against
//!   `tar cf - TREE | b3sum` (read and hash everything, store nothing);
//! - `GetBlob` throughput over loopback, against reading the same blob files from local disk;
//! - index load time for a tree of 50k+ entries;
//! - the dedup ratio of two Python trees that differ by one pip package, and how each
//!   chunking scheme fares on a package version bump (the measurement behind the default).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use lode_fs::{Chunking, Index, IngestOptions};
use lode_registry::{BlobAccess, Digest, TagUpdate};

use crate::bench::support::{mb_per_s, median, start_registry};

/// Settings for `lode bench cas`.
#[derive(Debug, Args)]
pub struct CasBench {
    /// A real tree to ingest and fetch back.
    #[arg(long, default_value = "/usr/lib/python3.11")]
    tree: PathBuf,
    /// Trees of 50k+ entries whose index load time is measured (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "/usr/share,/usr")]
    index_trees: Vec<PathBuf>,
    /// Index loads to time.
    #[arg(long, default_value_t = 30)]
    loads: usize,
    /// Where the pip trees for the dedup figures are built and kept.
    #[arg(long, default_value = "/var/cache/lode/bench/pytrees")]
    pytrees: PathBuf,
    /// Chunking schemes to compare on the dedup trees (comma separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fixed:1M,fixed:256K,cdc:16K/64K/256K,cdc:64K/256K/1M"
    )]
    schemes: Vec<Chunking>,
}

/// Runs `lode bench cas`.
pub async fn cas(args: CasBench) -> Result<()> {
    println!("lode bench cas ({} CPUs)", num_cpus());
    ingest_and_fetch(&args.tree).await?;
    for tree in &args.index_trees {
        index_load(tree, args.loads).await?;
    }
    match python_trees(&args.pytrees) {
        Ok(trees) => dedup(&trees, &args.schemes).await?,
        Err(e) => println!("\ndedup: skipped, the pip trees could not be built: {e:#}"),
    }
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Reads every file once so the first measured pass does not pay for a cold disk.
fn warm(tree: &Path) -> Result<()> {
    let status = Command::new("sh")
        .arg("-c")
        .arg("tar cf - -C \"$1\" . | cat > /dev/null")
        .arg("sh")
        .arg(tree)
        .status()?;
    if !status.success() {
        bail!("reading {} with tar failed", tree.display());
    }
    Ok(())
}

async fn ingest_and_fetch(tree: &Path) -> Result<()> {
    println!(
        "\ningest: {} (page cache warm for every run)",
        tree.display()
    );
    warm(tree)?;
    let baseline = Instant::now();
    let b3sum = Command::new("sh")
        .arg("-c")
        .arg("tar cf - -C \"$1\" . | b3sum")
        .arg("sh")
        .arg(tree)
        .stdout(Stdio::null())
        .status();
    let baseline = match b3sum {
        Ok(status) if status.success() => Some(baseline.elapsed()),
        _ => {
            println!(
                "  baseline skipped: b3sum is missing (apt-get install b3sum; ./lode.sh bench installs it)"
            );
            None
        }
    };
    let registry = start_registry()?;
    let started = Instant::now();
    let report = lode_fs::ingest(tree, registry.client.clone(), IngestOptions::default()).await?;
    let cold = started.elapsed();
    let started = Instant::now();
    let again = lode_fs::ingest(tree, registry.client.clone(), IngestOptions::default()).await?;
    let warm_run = started.elapsed();
    let bytes = report.file_bytes;
    println!(
        "  tree: {} files, {} dirs, {:.1} MB; {} chunks ({}), index {:.1} KB",
        report.files,
        report.dirs,
        bytes as f64 / 1e6,
        report.chunks,
        Chunking::default(),
        report.index_bytes as f64 / 1e3
    );
    println!(
        "  lode image ingest, empty registry:    {:7.1} MB/s ({cold:.2?})",
        mb_per_s(bytes, cold)
    );
    println!(
        "  lode image ingest, all chunks known:  {:7.1} MB/s ({warm_run:.2?}, {} bytes uploaded)",
        mb_per_s(bytes, warm_run),
        again.new_bytes
    );
    if let Some(baseline) = baseline {
        println!(
            "  tar cf - | b3sum (baseline):          {:7.1} MB/s ({baseline:.2?})",
            mb_per_s(bytes, baseline)
        );
        println!(
            "  ratio ingest/baseline: {:.2} (empty registry), {:.2} (all known)",
            baseline.as_secs_f64() / cold.as_secs_f64(),
            baseline.as_secs_f64() / warm_run.as_secs_f64()
        );
    }

    // GetBlob over loopback against reading the same blob files.
    let digest = report.digest.expect("ingest names its index");
    let index = Index::parse(registry.client.get_index(&digest).await?)?;
    let chunks = index.chunk_digests();
    let client = registry.client.clone();
    let started = Instant::now();
    let mut fetches = futures::stream::iter(chunks.iter().map(|d| {
        let client = client.clone();
        async move { client.get_blob(d).await.map(|b| b.len() as u64) }
    }))
    .buffer_unordered(client.parallelism());
    let mut fetched = 0u64;
    while let Some(len) = fetches.next().await {
        fetched += len?;
    }
    let over_grpc = started.elapsed();
    let blobs = registry.data.join("blobs").join("blake3");
    let started = Instant::now();
    let mut read = 0u64;
    for chunk in &chunks {
        let hex = chunk.hex();
        read += std::fs::read(blobs.join(&hex[..2]).join(&hex))?.len() as u64;
    }
    let from_disk = started.elapsed();
    println!(
        "\nGetBlob: {} chunks, {:.1} MB",
        chunks.len(),
        fetched as f64 / 1e6
    );
    println!(
        "  GetBlob over loopback (verified both ends): {:7.1} MB/s ({over_grpc:.2?})",
        mb_per_s(fetched, over_grpc)
    );
    println!(
        "  read the blob files from disk (baseline):   {:7.1} MB/s ({from_disk:.2?})",
        mb_per_s(read, from_disk)
    );
    println!(
        "  ratio GetBlob/disk: {:.2}",
        from_disk.as_secs_f64() / over_grpc.as_secs_f64()
    );
    Ok(())
}

/// Accepts every chunk without storing it and keeps indexes in memory, so a large tree's
/// index can be built (real digests, real metadata) without writing gigabytes.
#[derive(Default)]
struct IndexOnly {
    indexes: Mutex<HashMap<Digest, Bytes>>,
}

#[async_trait]
impl BlobAccess for IndexOnly {
    fn location(&self) -> String {
        "memory (chunks discarded)".into()
    }
    fn parallelism(&self) -> usize {
        1
    }
    async fn missing(&self, _: &[Digest]) -> lode_registry::Result<Vec<Digest>> {
        Ok(Vec::new())
    }
    async fn put_blob(&self, _: &Digest, _: Bytes) -> lode_registry::Result<bool> {
        Ok(true)
    }
    async fn get_blob(&self, digest: &Digest) -> lode_registry::Result<Bytes> {
        Err(lode_registry::Error::NotFound(digest.clone()))
    }
    async fn put_index(&self, digest: &Digest, bytes: Bytes) -> lode_registry::Result<bool> {
        let mut indexes = self.indexes.lock().expect("not poisoned");
        Ok(indexes.insert(digest.clone(), bytes).is_some())
    }
    async fn get_index(&self, digest: &Digest) -> lode_registry::Result<Bytes> {
        let indexes = self.indexes.lock().expect("not poisoned");
        indexes
            .get(digest)
            .cloned()
            .ok_or_else(|| lode_registry::Error::IndexNotFound(digest.clone()))
    }
    async fn get_tag(&self, name: &str) -> lode_registry::Result<Digest> {
        Err(lode_registry::Error::TagNotFound(name.into()))
    }
    async fn set_tag(
        &self,
        _: &str,
        _: &Digest,
        _: TagUpdate,
    ) -> lode_registry::Result<Option<Digest>> {
        Ok(None)
    }
    async fn list_tags(&self, _: &str) -> lode_registry::Result<Vec<(String, Digest)>> {
        Ok(Vec::new())
    }
}

async fn index_load(tree: &Path, loads: usize) -> Result<()> {
    println!("\nindex load: {}", tree.display());
    let sink = Arc::new(IndexOnly::default());
    let started = Instant::now();
    let report = lode_fs::ingest(tree, sink.clone(), IngestOptions::default()).await?;
    let built = started.elapsed();
    let digest = report.digest.expect("ingest names its index");
    let bytes = sink.get_index(&digest).await?;
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), &bytes)?;
    let mut from_memory = Vec::with_capacity(loads);
    let mut from_file = Vec::with_capacity(loads);
    let mut hashing = Vec::with_capacity(loads);
    let mut entries = 0;
    for _ in 0..loads {
        let started = Instant::now();
        std::hint::black_box(Digest::of(&bytes));
        hashing.push(started.elapsed());
        let started = Instant::now();
        let index = Index::parse(bytes.clone())?;
        from_memory.push(started.elapsed());
        entries = index.len();
        let started = Instant::now();
        let index = Index::parse(Bytes::from(std::fs::read(file.path())?))?;
        from_file.push(started.elapsed());
        std::hint::black_box(index.resolve("lib/os-release"));
    }
    println!(
        "  {entries} entries ({} files, {} dirs, {} symlinks), index {:.1} MB, built in {built:.2?}",
        report.files,
        report.dirs,
        report.symlinks,
        bytes.len() as f64 / 1e6
    );
    println!(
        "  Index::parse p50 over {loads} loads: {:.2?} from memory, {:.2?} reading the file \
         first (target <= 10 ms); of which hashing the index: {:.2?}",
        median(from_memory),
        median(from_file),
        median(hashing)
    );
    Ok(())
}

/// Two pip trees that differ by exactly one package, plus a version bump, built once.
struct PythonTrees {
    base: PathBuf,
    plus_one: PathBuf,
    bumped: PathBuf,
    extra: &'static str,
}

const BASE_PACKAGES: &[&str] = &[
    "numpy==2.1.2",
    "requests==2.32.3",
    "urllib3==2.2.3",
    "idna==3.10",
    "certifi==2024.8.30",
    "charset-normalizer==3.4.0",
];
const EXTRA_PACKAGE: &str = "rich==13.9.4";
const BUMPED: &str = "numpy==2.1.3";

fn pip_tree(dir: &Path, packages: &[&str]) -> Result<()> {
    if dir.join(".complete").exists() {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(dir);
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-compile",
            "--target",
        ])
        .arg(dir)
        .args(packages)
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!("pip install {} failed", packages.join(" "));
    }
    std::fs::write(dir.join(".complete"), b"")?;
    Ok(())
}

fn python_trees(root: &Path) -> Result<PythonTrees> {
    let base = root.join("base");
    let plus_one = root.join("plus-one");
    let bumped = root.join("bumped");
    pip_tree(&base, BASE_PACKAGES)?;
    pip_tree(&plus_one, &[BASE_PACKAGES, &[EXTRA_PACKAGE]].concat())?;
    let mut bumped_set = BASE_PACKAGES.to_vec();
    bumped_set[0] = BUMPED;
    pip_tree(&bumped, &bumped_set)?;
    Ok(PythonTrees {
        base,
        plus_one,
        bumped,
        extra: EXTRA_PACKAGE,
    })
}

async fn dedup(trees: &PythonTrees, schemes: &[Chunking]) -> Result<()> {
    println!(
        "\ndedup: pip trees {} (base: {})",
        trees
            .base
            .parent()
            .map_or(String::new(), |p| p.display().to_string()),
        BASE_PACKAGES.join(" ")
    );
    println!(
        "  {:<18} {:>9} {:>8} {:>10} {:>22} {:>22}",
        "chunking",
        "ingest",
        "chunks",
        "index",
        format!("+ {}", trees.extra),
        format!("{BUMPED} bump")
    );
    for &chunking in schemes {
        let options = IngestOptions {
            chunking,
            ..Default::default()
        };
        let registry = start_registry()?;
        let started = Instant::now();
        let base = lode_fs::ingest(&trees.base, registry.client.clone(), options.clone()).await?;
        let rate = mb_per_s(base.file_bytes, started.elapsed());
        let plus =
            lode_fs::ingest(&trees.plus_one, registry.client.clone(), options.clone()).await?;
        let bumped = lode_fs::ingest(&trees.bumped, registry.client.clone(), options).await?;
        let figure = |r: &lode_fs::IngestReport| {
            format!(
                "{:.2} MB new, {:.1}x",
                r.new_bytes as f64 / 1e6,
                (r.file_bytes - r.inline_bytes) as f64 / r.new_bytes.max(1) as f64
            )
        };
        println!(
            "  {:<18} {:>5.0} MB/s {:>8} {:>7.0} KB {:>22} {:>22}",
            chunking.to_string(),
            rate,
            base.chunks,
            base.index_bytes as f64 / 1e3,
            figure(&plus),
            figure(&bumped)
        );
    }
    println!(
        "  (\"N MB new\": bytes the second tree uploaded; \"Nx\": its chunked bytes over those, \
         the dedup ratio)"
    );
    Ok(())
}
