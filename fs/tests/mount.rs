//! Real FUSE mounts (as root) of images in a registry on loopback.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Registry, registry, special_tree};
use lode_fs::{ChunkCache, Index, IngestOptions, Mount, MountOptions};
use lode_registry::BlobAccess;

struct Mounted {
    mount: Option<Mount>,
    _dirs: tempfile::TempDir,
}

impl Mounted {
    fn path(&self) -> PathBuf {
        self.mount.as_ref().unwrap().mountpoint().to_path_buf()
    }
    fn cache(&self) -> Arc<ChunkCache> {
        self.mount.as_ref().unwrap().cache().clone()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mount) = self.mount.take() {
            mount.unmount().unwrap();
        }
    }
}

async fn ingest(registry: &Registry, tree: &Path) -> Index {
    let report = lode_fs::ingest(tree, registry.client.clone(), IngestOptions::default())
        .await
        .unwrap();
    let bytes = registry
        .client
        .get_index(report.digest.as_ref().unwrap())
        .await
        .unwrap();
    Index::parse(bytes).unwrap()
}

fn mount(registry: &Registry, index: &Index, capacity: u64, options: MountOptions) -> Mounted {
    let dirs = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(&dirs.path().join("chunks"), capacity).unwrap();
    let point = dirs.path().join("mnt");
    std::fs::create_dir(&point).unwrap();
    let mount = Mount::new(
        index.clone(),
        cache,
        registry.client.clone(),
        &point,
        options,
    )
    .unwrap();
    Mounted {
        mount: Some(mount),
        _dirs: dirs,
    }
}

/// Reads a file on a plain thread (FUSE answers on its own threads), bounded by `limit`.
async fn read_in_thread(path: PathBuf, limit: Duration) -> std::io::Result<Vec<u8>> {
    let reader = tokio::task::spawn_blocking(move || std::fs::read(path));
    tokio::time::timeout(limit, reader)
        .await
        .expect("the read did not hang")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_tree_reads_back_identical_through_the_mount() {
    let registry = registry().await;
    let special = tempfile::tempdir().unwrap();
    special_tree(special.path());
    for tree in [
        Path::new("/usr/lib/python3.11").to_path_buf(),
        special.path().to_path_buf(),
    ] {
        let index = ingest(&registry, &tree).await;
        let mounted = mount(&registry, &index, 1 << 30, MountOptions::default());
        let (source, point) = (tree.clone(), mounted.path());
        let differences =
            tokio::task::spawn_blocking(move || lode_fs::tree_differences(&source, &point))
                .await
                .unwrap()
                .unwrap();
        assert!(
            differences.is_empty(),
            "{}: {}",
            tree.display(),
            differences.join("\n")
        );
        assert!(
            mounted
                .cache()
                .stats
                .foreground_fetches
                .load(Ordering::Relaxed)
                > 0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_stays_under_its_bound_with_a_larger_tree() {
    let registry = registry().await;
    let tree = tempfile::tempdir().unwrap();
    let mut expected = Vec::new();
    for i in 0..8u32 {
        let data: Vec<u8> = (0..700_000u32)
            .map(|j| (j.wrapping_mul(2654435761) ^ i) as u8 ^ (j >> 9) as u8)
            .collect();
        std::fs::write(tree.path().join(format!("f{i}")), &data).unwrap();
        expected.push(data);
    }
    let index = ingest(&registry, tree.path()).await;
    let bound = 1 << 20;
    let mounted = mount(&registry, &index, bound, MountOptions::default());
    for (i, data) in expected.iter().enumerate() {
        let read = read_in_thread(
            mounted.path().join(format!("f{i}")),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert!(read == *data, "f{i} differs");
        assert!(
            mounted.cache().used() <= bound,
            "{} > {bound}",
            mounted.cache().used()
        );
    }
    assert!(mounted.cache().stats.evictions.load(Ordering::Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_of_a_missing_chunk_fetch_it_once() {
    let registry = registry().await;
    let tree = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|j| (j.wrapping_mul(40503) >> 5) as u8)
        .collect();
    std::fs::write(tree.path().join("big"), &data).unwrap();
    let index = ingest(&registry, tree.path()).await;
    let chunks = index.chunk_digests().len() as u64;
    let mounted = mount(&registry, &index, 1 << 30, MountOptions::default());
    let readers: Vec<_> = (0..8)
        .map(|_| read_in_thread(mounted.path().join("big"), Duration::from_secs(30)))
        .collect();
    for read in futures::future::join_all(readers).await {
        assert!(read.unwrap() == data);
    }
    let stats = &mounted.cache().stats;
    let fetched = stats.foreground_fetches.load(Ordering::Relaxed)
        + stats.background_fetches.load(Ordering::Relaxed);
    assert_eq!(fetched, chunks, "each chunk fetched once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_registry_fails_reads_with_eio_in_bounded_time() {
    let registry = registry().await;
    let tree = tempfile::tempdir().unwrap();
    std::fs::write(tree.path().join("first"), vec![1u8; 400_000]).unwrap();
    std::fs::write(tree.path().join("second"), vec![2u8; 400_000]).unwrap();
    let index = ingest(&registry, tree.path()).await;
    let options = MountOptions {
        fetch_timeout: Duration::from_millis(1500),
        prefetch: false,
        ..Default::default()
    };
    let mounted = mount(&registry, &index, 1 << 30, options);
    let first = read_in_thread(mounted.path().join("first"), Duration::from_secs(10)).await;
    assert_eq!(first.unwrap(), vec![1u8; 400_000]);
    registry.kill();
    let started = Instant::now();
    let err = read_in_thread(mounted.path().join("second"), Duration::from_secs(10))
        .await
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(started.elapsed() < Duration::from_secs(8));
    // What is cached still reads.
    let again = read_in_thread(mounted.path().join("first"), Duration::from_secs(10)).await;
    assert_eq!(again.unwrap().len(), 400_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_profile_is_prefetched_by_the_next_cold_mount() {
    let registry = registry().await;
    let tree = tempfile::tempdir().unwrap();
    for i in 0..12u32 {
        let data: Vec<u8> = (0..300_000u32)
            .map(|j| (j.wrapping_mul(2246822519) >> 11) as u8 ^ i as u8)
            .collect();
        std::fs::write(tree.path().join(format!("m{i:02}.so")), data).unwrap();
    }
    let index = ingest(&registry, tree.path()).await;
    let wanted = ["m03.so", "m07.so", "m01.so", "m11.so"];

    let first = mount(&registry, &index, 1 << 30, MountOptions::default());
    for name in wanted {
        read_in_thread(first.path().join(name), Duration::from_secs(30))
            .await
            .unwrap();
    }
    let cold = first
        .cache()
        .stats
        .foreground_fetches
        .load(Ordering::Relaxed);
    assert_eq!(
        first.mount.as_ref().unwrap().save_profile().await.unwrap(),
        wanted.len()
    );
    drop(first);

    let second = mount(&registry, &index, 1 << 30, MountOptions::default());
    let cache = second.cache();
    let deadline = Instant::now() + Duration::from_secs(20);
    while cache.stats.background_fetches.load(Ordering::Relaxed) < cold {
        assert!(Instant::now() < deadline, "prefetch did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for name in wanted {
        read_in_thread(second.path().join(name), Duration::from_secs(30))
            .await
            .unwrap();
    }
    let warm = cache.stats.foreground_fetches.load(Ordering::Relaxed);
    assert!(
        warm < cold,
        "foreground fetches: {warm} with the profile, {cold} without"
    );
    assert_eq!(warm, 0);
}

/// Hands out wrong bytes for the first fetch of each blob, as a faulty network or registry
/// would, and the real ones after.
struct CorruptOnce {
    inner: Arc<lode_registry::RegistryClient>,
    served: std::sync::Mutex<std::collections::HashSet<lode_registry::Digest>>,
}

#[async_trait::async_trait]
impl BlobAccess for CorruptOnce {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn parallelism(&self) -> usize {
        self.inner.parallelism()
    }
    async fn missing(
        &self,
        digests: &[lode_registry::Digest],
    ) -> lode_registry::Result<Vec<lode_registry::Digest>> {
        self.inner.missing(digests).await
    }
    async fn put_blob(
        &self,
        digest: &lode_registry::Digest,
        bytes: bytes::Bytes,
    ) -> lode_registry::Result<bool> {
        self.inner.put_blob(digest, bytes).await
    }
    async fn get_blob(
        &self,
        digest: &lode_registry::Digest,
    ) -> lode_registry::Result<bytes::Bytes> {
        let bytes = self.inner.get_blob(digest).await?;
        if self.served.lock().unwrap().insert(digest.clone()) {
            let mut bad = bytes.to_vec();
            bad[0] ^= 0xff;
            return Ok(bad.into());
        }
        Ok(bytes)
    }
    async fn put_index(
        &self,
        digest: &lode_registry::Digest,
        bytes: bytes::Bytes,
    ) -> lode_registry::Result<bool> {
        self.inner.put_index(digest, bytes).await
    }
    async fn get_index(
        &self,
        digest: &lode_registry::Digest,
    ) -> lode_registry::Result<bytes::Bytes> {
        self.inner.get_index(digest).await
    }
    async fn get_tag(&self, name: &str) -> lode_registry::Result<lode_registry::Digest> {
        self.inner.get_tag(name).await
    }
    async fn set_tag(
        &self,
        name: &str,
        digest: &lode_registry::Digest,
        condition: lode_registry::TagUpdate,
    ) -> lode_registry::Result<Option<lode_registry::Digest>> {
        self.inner.set_tag(name, digest, condition).await
    }
    async fn list_tags(
        &self,
        prefix: &str,
    ) -> lode_registry::Result<Vec<(String, lode_registry::Digest)>> {
        self.inner.list_tags(prefix).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_chunk_from_the_network_is_refused_and_fetched_again() {
    let registry = registry().await;
    let tree = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..600_000u32)
        .map(|j| (j.wrapping_mul(97) >> 3) as u8)
        .collect();
    std::fs::write(tree.path().join("lib.so"), &data).unwrap();
    let index = ingest(&registry, tree.path()).await;
    let faulty = Arc::new(CorruptOnce {
        inner: registry.client.clone(),
        served: Default::default(),
    });
    let dirs = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(&dirs.path().join("chunks"), 1 << 30).unwrap();
    let point = dirs.path().join("mnt");
    std::fs::create_dir(&point).unwrap();
    let options = MountOptions {
        prefetch: false,
        ..Default::default()
    };
    let mount = Mount::new(index.clone(), cache.clone(), faulty, &point, options).unwrap();
    let read = read_in_thread(point.join("lib.so"), Duration::from_secs(30)).await;
    let chunks = index.chunk_digests();
    assert!(read.unwrap() == data);
    assert_eq!(
        cache.stats.refused.load(Ordering::Relaxed),
        chunks.len() as u64
    );
    // Only verified bytes were kept.
    for digest in &chunks {
        let hex = digest.hex();
        let kept =
            std::fs::read(dirs.path().join("chunks/blake3").join(&hex[..2]).join(&hex)).unwrap();
        assert_eq!(&lode_registry::Digest::of(&kept), digest);
    }
    mount.unmount().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mount_table_mounts_each_image_once() {
    let registry = registry().await;
    let tree = tempfile::tempdir().unwrap();
    std::fs::write(tree.path().join("app.py"), b"print('hi')\n").unwrap();
    let index = ingest(&registry, tree.path()).await;
    let dirs = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(&dirs.path().join("chunks"), 1 << 30).unwrap();
    let table = lode_fs::MountTable::new(
        &dirs.path().join("mounts"),
        cache,
        registry.client.clone(),
        MountOptions::default(),
    )
    .unwrap();
    let first = table.mount(index.digest()).await.unwrap();
    let second = table.mount(index.digest()).await.unwrap();
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!(
        first.mountpoint(),
        dirs.path().join("mounts").join(index.digest().hex())
    );
    let read = read_in_thread(first.mountpoint().join("app.py"), Duration::from_secs(10)).await;
    assert_eq!(read.unwrap(), b"print('hi')\n");
    assert_eq!(table.mounted().await, vec![index.digest().clone()]);
    let point = first.mountpoint().to_path_buf();
    drop((first, second));
    table.close().await;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(point.to_str().unwrap()), "still mounted");
}
