//! The chunk cache on a real disk, against a registry on loopback: extents, restarts,
//! crash leftovers, eviction and large files' own extents.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::{Registry, registry};
use lode_fs::{ChunkCache, FileLayout, Placement, Priority};
use lode_registry::{BlobAccess, Digest};

const WAIT: Duration = Duration::from_secs(10);

/// Stores `count` distinct chunks of `len` bytes; returns them with their digests.
async fn chunks(registry: &Registry, seed: u32, count: u32, len: usize) -> Vec<(Digest, Vec<u8>)> {
    let mut out = Vec::new();
    for i in 0..count {
        let mut bytes = vec![0; len];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .update(&i.to_le_bytes())
            .finalize_xof()
            .fill(&mut bytes);
        let digest = Digest::of(&bytes);
        registry
            .client
            .put_blob(&digest, Bytes::from(bytes.clone()))
            .await
            .unwrap();
        out.push((digest, bytes));
    }
    out
}

async fn get(
    cache: &Arc<ChunkCache>,
    registry: &Registry,
    digest: &Digest,
    placement: Placement<'_>,
) {
    cache
        .get_placed(
            registry.client.as_ref(),
            digest,
            WAIT,
            Priority::Foreground,
            placement,
        )
        .await
        .unwrap();
}

fn read_back(cache: &Arc<ChunkCache>, digest: &Digest) -> Vec<u8> {
    let pinned = cache.pin(digest).expect("cached");
    let mut bytes = vec![0; pinned.size() as usize];
    assert_eq!(pinned.read_at(0, &mut bytes).unwrap(), bytes.len());
    bytes
}

fn extent_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("extents"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_chunks_share_one_extent_and_survive_a_restart() {
    let registry = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let stored = chunks(&registry, 1, 40, 20_000).await;
    {
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        for (digest, _) in &stored {
            get(&cache, &registry, digest, Placement::Packed).await;
        }
        assert_eq!(cache.extent_files(), 1);
        assert_eq!(cache.used(), 40 * 20_000);
    }
    assert_eq!(extent_files(dir.path()).len(), 1);
    let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
    assert_eq!(cache.used(), 40 * 20_000);
    for (digest, bytes) in &stored {
        assert!(read_back(&cache, digest) == *bytes);
        get(&cache, &registry, digest, Placement::Packed).await;
    }
    assert_eq!(
        cache.stats.foreground_fetches.load(Ordering::Relaxed),
        0,
        "a restarted cache fetched what it held"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_a_crash_left_without_a_record_are_dropped_at_open() {
    let registry = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let stored = chunks(&registry, 2, 3, 10_000).await;
    {
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        for (digest, _) in &stored {
            get(&cache, &registry, digest, Placement::Packed).await;
        }
    }
    // A chunk written after the last record, and an extent nothing records.
    let extent = extent_files(dir.path()).remove(0);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&extent)
        .unwrap();
    std::io::Write::write_all(&mut file, &[7; 5000]).unwrap();
    std::fs::write(dir.path().join("extents/999"), b"stray").unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
    assert_eq!(std::fs::metadata(&extent).unwrap().len(), 30_000);
    assert!(!dir.path().join("extents/999").exists());
    // Only the extent holding the chunks is left: none empty.
    assert_eq!(extent_files(dir.path()), vec![extent.clone()]);
    for (digest, bytes) in &stored {
        assert!(read_back(&cache, digest) == *bytes);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_index_starts_the_cache_afresh() {
    let registry = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let stored = chunks(&registry, 3, 2, 10_000).await;
    {
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        get(&cache, &registry, &stored[0].0, Placement::Packed).await;
    }
    std::fs::write(dir.path().join("index.redb"), b"not a database").unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
    assert_eq!(cache.used(), 0);
    assert!(extent_files(dir.path()).is_empty());
    get(&cache, &registry, &stored[1].0, Placement::Packed).await;
    assert!(read_back(&cache, &stored[1].0) == stored[1].1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_cached_elsewhere_is_copied_into_a_large_files_extent() {
    let registry = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let stored = chunks(&registry, 4, 3, 100_000).await;
    let layout = FileLayout::new(
        300_000,
        stored
            .iter()
            .enumerate()
            .map(|(i, (digest, _))| (i as u64 * 100_000, digest.clone())),
    );
    let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
    get(&cache, &registry, &stored[1].0, Placement::Packed).await;
    assert!(cache.complete_file(&layout).is_none());
    for (i, (digest, _)) in stored.iter().enumerate() {
        let placement = Placement::File {
            layout: &layout,
            offset: i as u64 * 100_000,
        };
        get(&cache, &registry, digest, placement).await;
    }
    assert_eq!(cache.stats.foreground_fetches.load(Ordering::Relaxed), 3);
    assert_eq!(cache.stats.local_copies.load(Ordering::Relaxed), 1);
    let complete = cache.complete_file(&layout).expect("every chunk is in");
    let whole = std::fs::read(extent_path(&complete)).unwrap();
    let expected: Vec<u8> = stored.iter().flat_map(|(_, b)| b.clone()).collect();
    assert!(whole == expected, "the extent is not the file");
}

/// The extent a complete file reads from, found through its open descriptor.
fn extent_path(complete: &lode_fs::CompleteFile) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    let file = complete.open().unwrap();
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_frees_disk_and_never_touches_a_file_held_whole() {
    let registry = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let file_chunks = chunks(&registry, 5, 4, 100_000).await;
    let others = chunks(&registry, 6, 8, 100_000).await;
    let layout = FileLayout::new(
        400_000,
        file_chunks
            .iter()
            .enumerate()
            .map(|(i, (digest, _))| (i as u64 * 100_000, digest.clone())),
    );
    let bound = 500_000;
    let cache = ChunkCache::open(dir.path(), bound).unwrap();
    for (i, (digest, _)) in file_chunks.iter().enumerate() {
        let placement = Placement::File {
            layout: &layout,
            offset: i as u64 * 100_000,
        };
        get(&cache, &registry, digest, placement).await;
    }
    let held = cache.complete_file(&layout).expect("complete");
    let path = extent_path(&held);
    for (digest, _) in &others {
        get(&cache, &registry, digest, Placement::Packed).await;
    }
    // Held whole: all 400 KB stay, so only 100 KB of the others fit.
    assert!(cache.stats.evictions.load(Ordering::Relaxed) >= 7);
    assert!(cache.used() <= bound, "{} > {bound}", cache.used());
    let expected: Vec<u8> = file_chunks.iter().flat_map(|(_, b)| b.clone()).collect();
    assert!(std::fs::read(&path).unwrap() == expected);
    // Evicted bytes leave the disk: the packed extent keeps blocks for what is left only.
    let packed = extent_files(dir.path())
        .into_iter()
        .find(|p| *p != path)
        .unwrap();
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&packed).unwrap());
    assert!(
        blocks * 512 <= 2 * 100_000 + 8 * 8192,
        "{} bytes allocated",
        blocks * 512
    );
    // What the kernel holds of a passthrough file (an `mmap` outlives the FUSE file's
    // release): the extent itself, opened.
    let mapped = std::fs::File::open(&path).unwrap();
    drop(held);
    // Released, its chunks are the oldest: the next chunks push the file out entirely.
    let more = chunks(&registry, 7, 4, 100_000).await;
    for (digest, _) in &more {
        get(&cache, &registry, digest, Placement::Packed).await;
    }
    assert!(cache.complete_file(&layout).is_none());
    assert!(!path.exists(), "an emptied file extent was left on disk");
    // Evicted whole, by unlinking: what still holds it reads the file, never a hole.
    let mut still = Vec::new();
    std::io::Read::read_to_end(&mut &mapped, &mut still).unwrap();
    assert!(
        still == expected,
        "an evicted file read back differently through a held descriptor"
    );
    assert!(cache.used() <= bound);
}
