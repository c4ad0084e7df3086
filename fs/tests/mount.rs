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
        let pinned = cache.pin(digest).expect("cached");
        let mut kept = vec![0; pinned.size() as usize];
        assert_eq!(pinned.read_at(0, &mut kept).unwrap(), kept.len());
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
    let table = mount_table(&registry, dirs.path());
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

/// A mount table under `dir` (`mounts/`), its chunk cache in `chunks/`.
fn mount_table(registry: &Registry, dir: &Path) -> lode_fs::MountTable {
    let cache = ChunkCache::open(&dir.join("chunks"), 1 << 30).unwrap();
    lode_fs::MountTable::new(
        &dir.join("mounts"),
        cache,
        registry.client.clone(),
        MountOptions::default(),
    )
    .unwrap()
}

/// A tree of `files`, ingested and mounted on an empty cache without prefetch.
async fn mount_files(registry: &Registry, files: &[(&str, &[u8])]) -> Mounted {
    let tree = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        std::fs::write(tree.path().join(name), bytes).unwrap();
    }
    let index = ingest(registry, tree.path()).await;
    let options = MountOptions {
        prefetch: false,
        ..Default::default()
    };
    mount(registry, &index, 1 << 30, options)
}

/// Bytes that neither repeat nor compress, different per `seed`.
fn noise(seed: u32, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fully_cached_large_file_is_read_by_the_kernel_from_its_extent() {
    let registry = registry().await;
    let large = noise(1, 5 << 20);
    let small = noise(2, 300_000);
    let mounted = mount_files(&registry, &[("model.bin", &large), ("small.py", &small)]).await;
    let mount = mounted.mount.as_ref().unwrap();
    let model = mounted.path().join("model.bin");
    // The first open finds nothing cached: reads come through the mount and fill the extent.
    let first = read_in_thread(model.clone(), Duration::from_secs(30)).await;
    assert!(first.unwrap() == large);
    assert_eq!(mount.passthrough_opens(), 0);
    if !mount.passthrough() {
        println!("SKIPPED passthrough checks: this kernel did not agree to FUSE_PASSTHROUGH");
        return;
    }
    // Mmap and read through a passthrough open, with a second open of the same inode alive.
    let reads_before = mount.reads();
    let held = std::fs::File::open(&model).unwrap();
    let second = read_in_thread(model.clone(), Duration::from_secs(30)).await;
    assert!(second.unwrap() == large);
    let mapped = memmap_read(&held, large.len());
    assert!(mapped == large, "mmap through passthrough differs");
    assert_eq!(mount.passthrough_opens(), 2);
    assert_eq!(
        mount.reads(),
        reads_before,
        "a passthrough read reached the server"
    );
    // The extent is exactly the file: reading past its end gives nothing more.
    let mut tail = Vec::new();
    let mut file = std::fs::File::open(&model).unwrap();
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(large.len() as u64 - 10)).unwrap();
    std::io::Read::read_to_end(&mut file, &mut tail).unwrap();
    assert_eq!(tail, large[large.len() - 10..]);
    drop((held, file));
    // A small file is served by the mount as before, from a packed extent.
    let read = read_in_thread(mounted.path().join("small.py"), Duration::from_secs(30)).await;
    assert!(read.unwrap() == small);
    assert!(mount.reads() > reads_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_that_began_uncached_keeps_the_inode_served_by_the_mount() {
    let registry = registry().await;
    let large = noise(3, 3 << 20);
    let mounted = mount_files(&registry, &[("weights", &large)]).await;
    let mount = mounted.mount.as_ref().unwrap();
    let path = mounted.path().join("weights");
    // Held open while the file becomes fully cached: the kernel would refuse a passthrough
    // open of the same inode now (EIO), so later opens must follow this one.
    let held = std::fs::File::open(&path).unwrap();
    let mut whole = Vec::new();
    std::io::Read::read_to_end(&mut &held, &mut whole).unwrap();
    assert!(whole == large);
    let again = read_in_thread(path.clone(), Duration::from_secs(30)).await;
    assert!(again.unwrap() == large);
    assert_eq!(mount.passthrough_opens(), 0);
    drop(held);
    // With every open released, the next one may pass through.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let read = read_in_thread(path.clone(), Duration::from_secs(30)).await;
        assert!(read.unwrap() == large);
        if !mount.passthrough() || mount.passthrough_opens() > 0 {
            break;
        }
        // The kernel sends RELEASE after close returns.
        assert!(
            Instant::now() < deadline,
            "never passed through after release"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Copies `len` bytes out of a shared read-only mapping of `file`.
fn memmap_read(file: &std::fs::File, len: usize) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh read-only mapping of `len` bytes of a file at least that long, read
    // once and unmapped before returning; nothing else refers to it.
    unsafe {
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(ptr, libc::MAP_FAILED, "mmap failed");
        let out = std::slice::from_raw_parts(ptr as *const u8, len).to_vec();
        libc::munmap(ptr, len);
        out
    }
}

/// What a memory snapshot might hold: a secret value, in files small, medium and large.
const SECRET: &[u8] = b"hunter2-c0ffee-secret-value";

fn secret_tree(root: &Path) {
    let mut small = b"TOKEN=".to_vec();
    small.extend_from_slice(SECRET);
    std::fs::write(root.join("small"), &small).unwrap();
    for (name, len) in [("medium", 300_000), ("large", 3 << 20)] {
        let mut bytes = noise(len as u32, len);
        for at in [100, len / 2, len - 100] {
            bytes[at..at + SECRET.len()].copy_from_slice(SECRET);
        }
        std::fs::write(root.join(name), bytes).unwrap();
    }
    std::fs::write(root.join("empty"), b"").unwrap();
    std::os::unix::fs::symlink("large", root.join("link")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_tree_reads_back_only_through_a_mount_with_its_key() {
    let tree = tempfile::tempdir().unwrap();
    secret_tree(tree.path());
    // Plain, the secret is in the registry's files (so the scan below can see it)...
    let plain = registry().await;
    ingest(&plain, tree.path()).await;
    assert!(!common::files_containing(plain.dir(), SECRET).is_empty());
    // ...sealed, it is nowhere in them: not in a chunk, not inline in the index.
    let registry = registry().await;
    let cipher = Arc::new(lode_fs::ChunkCipher::new(&[9; 32]));
    let options = IngestOptions {
        cipher: Some(cipher.clone()),
        ..Default::default()
    };
    let report = lode_fs::ingest(tree.path(), registry.client.clone(), options)
        .await
        .unwrap();
    assert_eq!(report.inline_bytes, 0);
    let digest = report.digest.unwrap();
    let index = Index::parse(registry.client.get_index(&digest).await.unwrap()).unwrap();
    assert!(index.encrypted());
    assert_eq!(
        common::files_containing(registry.dir(), SECRET),
        Vec::<PathBuf>::new()
    );
    // A mount with the key reads the tree as it was, twice; the chunk cache keeps the
    // chunks sealed, and no large file is handed to the kernel as it is cached.
    let dirs = tempfile::tempdir().unwrap();
    let table = mount_table(&registry, dirs.path());
    let opened = table.mount_encrypted(&digest, cipher).await.unwrap();
    for _ in 0..2 {
        let (source, point) = (tree.path().to_path_buf(), opened.mountpoint().to_path_buf());
        let differences =
            tokio::task::spawn_blocking(move || lode_fs::tree_differences(&source, &point))
                .await
                .unwrap()
                .unwrap();
        assert!(differences.is_empty(), "{}", differences.join("\n"));
    }
    assert_eq!(opened.passthrough_opens(), 0);
    assert_eq!(
        common::files_containing(&dirs.path().join("chunks"), SECRET),
        Vec::<PathBuf>::new()
    );
    // Without the key: refused, by name. The keyed mount is never handed out for it.
    let refused = table.mount(&digest).await.unwrap_err().to_string();
    assert!(refused.contains("encrypted"), "{refused}");
    let target = tempfile::tempdir().unwrap();
    let export = lode_fs::export(&index, registry.client.clone(), &target.path().join("out"))
        .await
        .unwrap_err()
        .to_string();
    assert!(export.contains("encrypted"), "{export}");
    // With another key: the mount comes up, and reads fail.
    let wrong = MountOptions {
        cipher: Some(Arc::new(lode_fs::ChunkCipher::new(&[8; 32]))),
        prefetch: false,
        ..Default::default()
    };
    let mounted = mount(&registry, &index, 1 << 30, wrong);
    let read = read_in_thread(mounted.path().join("medium"), Duration::from_secs(10)).await;
    assert_eq!(read.unwrap_err().raw_os_error(), Some(libc::EIO));
    // And a key given for a plain index is refused: the caller expected secrecy it lacks.
    let plain_index = ingest(&registry, tree.path()).await;
    let dirs = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(&dirs.path().join("chunks"), 1 << 30).unwrap();
    let keyed = MountOptions {
        cipher: Some(Arc::new(lode_fs::ChunkCipher::new(&[9; 32]))),
        ..Default::default()
    };
    let error = Mount::new(
        plain_index,
        cache,
        registry.client.clone(),
        dirs.path(),
        keyed,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("not encrypted"), "{error}");
    drop(opened);
    table.close().await;
}
