//! The local chunk cache: verified chunks on disk, bounded in size, evicted least recently
//! used first, never while a chunk is being read, and fetched once however many readers
//! miss it at the same time.
//!
//! Chunks live in extent files under `<dir>/extents/`, so a cached file is read from a few
//! large files rather than thousands of small ones:
//! - a *packed* extent holds small files' chunks back to back in the order they arrived, so
//!   an image's neighbours (a start-up's reads, a prefetched profile) stay neighbours on disk;
//! - a *file* extent holds one large file's chunks at their offsets in that file. Once every
//!   chunk is in, the extent is byte for byte the file, and the mount hands it to the kernel
//!   (FUSE passthrough) so reads no longer come through the mount at all.
//!
//! `<dir>/index.redb` records where each chunk lies. A record is committed only after its
//! bytes are synced, and removed before its bytes are punched out, so a crash never leaves a
//! record that points at bytes that are not there.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use lode_registry::{BlobAccess, Digest};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{Error, Result};

mod load;

/// (extent, offset) → (digest, length, insertion order).
const CHUNKS: TableDefinition<(u64, u64), ([u8; 32], u32, u64)> = TableDefinition::new("chunks");
/// Extent → (the layout key of its file, or empty for a packed extent; the file's size).
const EXTENTS: TableDefinition<u64, (&[u8], u64)> = TableDefinition::new("extents");

/// A packed extent takes no more chunks past this size.
const PACKED_EXTENT_BYTES: u64 = 64 << 20;
/// Extent files kept open beyond those being read; more are closed and opened again on use.
const OPEN_EXTENTS: usize = 256;

type ExtentId = u64;

/// Where one chunk lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct At {
    extent: ExtentId,
    offset: u64,
}

#[derive(Debug)]
struct Unit {
    digest: Digest,
    len: u32,
    last_use: u64,
}

#[derive(Debug)]
struct Extent {
    /// The layout of the file this extent holds; `None` for a packed extent.
    file: Option<FileLayout>,
    /// Bytes of live chunks in it.
    live: u64,
    /// Readers and writers using it now; its chunks are not evicted meanwhile.
    pins: u32,
    /// When it was last opened whole (reads the kernel serves directly touch no chunk).
    last_use: u64,
    /// Where the next chunk goes, while a packed extent still takes chunks.
    append_at: Option<u64>,
    handle: Option<Arc<File>>,
}

#[derive(Debug, Default)]
struct State {
    units: HashMap<At, Unit>,
    by_digest: HashMap<Digest, Vec<At>>,
    extents: HashMap<ExtentId, Extent>,
    /// Layout key → its file extent.
    files: HashMap<Digest, ExtentId>,
    /// The packed extent taking chunks now.
    packing: Option<ExtentId>,
    next_extent: ExtentId,
    used: u64,
    clock: u64,
    seq: u64,
    open_handles: usize,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn locate(&self, digest: &Digest) -> Option<At> {
        self.by_digest.get(digest)?.first().copied()
    }

    /// Where `digest` lies for `placement`, if it is there already.
    fn locate_placed(&self, digest: &Digest, placement: &Placement) -> Option<At> {
        match placement {
            Placement::Packed => self.locate(digest),
            Placement::File { layout, offset } => {
                let at = At {
                    extent: *self.files.get(&layout.key)?,
                    offset: *offset,
                };
                (self.units.get(&at)?.digest == *digest).then_some(at)
            }
        }
    }

    /// Knows an extent that holds no chunks yet.
    fn add_extent(&mut self, id: ExtentId, file: Option<FileLayout>) {
        if let Some(layout) = &file {
            self.files.insert(layout.key.clone(), id);
        }
        let extent = Extent {
            file,
            live: 0,
            pins: 0,
            last_use: 0,
            append_at: None,
            handle: None,
        };
        self.extents.insert(id, extent);
    }

    fn forget(&mut self, at: At) -> Option<Unit> {
        let unit = self.units.remove(&at)?;
        if let Some(places) = self.by_digest.get_mut(&unit.digest) {
            places.retain(|p| *p != at);
            if places.is_empty() {
                self.by_digest.remove(&unit.digest);
            }
        }
        if let Some(extent) = self.extents.get_mut(&at.extent) {
            extent.live -= u64::from(unit.len);
        }
        self.used -= u64::from(unit.len);
        Some(unit)
    }
}

/// Counters a test or benchmark can read.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Chunks fetched because a read needed them.
    pub foreground_fetches: AtomicU64,
    /// Chunks fetched by prefetch or read-ahead.
    pub background_fetches: AtomicU64,
    /// Bytes fetched from the registry.
    pub fetched_bytes: AtomicU64,
    /// Chunks evicted to stay under the bound.
    pub evictions: AtomicU64,
    /// Chunks from the network refused for a wrong digest.
    pub refused: AtomicU64,
    /// Chunks cached already, copied into a large file's extent rather than fetched again.
    pub local_copies: AtomicU64,
}

/// The identity of a large file's content: a digest of its chunk list, and its size.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileLayout {
    key: Digest,
    size: u64,
}

impl FileLayout {
    /// The layout of a file of `size` bytes made of `chunks` (offset and digest, in order).
    pub fn new(size: u64, chunks: impl IntoIterator<Item = (u64, Digest)>) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"lode file layout\0");
        hasher.update(&size.to_le_bytes());
        for (offset, digest) in chunks {
            hasher.update(&offset.to_le_bytes());
            hasher.update(digest.as_bytes());
        }
        Self {
            key: Digest::from_hash(*hasher.finalize().as_bytes()),
            size,
        }
    }

    /// The file's size.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// Where a chunk that is not cached yet is written.
#[derive(Debug, Clone, Copy)]
pub enum Placement<'a> {
    /// In a packed extent, after the chunks fetched before it.
    Packed,
    /// At `offset` in the extent of the large file laid out as `layout`.
    File {
        /// The file.
        layout: &'a FileLayout,
        /// The chunk's offset in the file.
        offset: u64,
    },
}

/// Chunks on local disk, packed into extent files under `<dir>/extents`.
#[derive(Debug)]
pub struct ChunkCache {
    dir: PathBuf,
    capacity: u64,
    db: Database,
    state: Mutex<State>,
    /// Digest → the lock that makes concurrent misses fetch once.
    inflight: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// Counters.
    pub stats: CacheStats,
    _lock: File,
}

/// A chunk held in the cache; nothing in its extent is evicted while this lives.
#[derive(Debug)]
pub struct Pinned {
    cache: Arc<ChunkCache>,
    extent: ExtentId,
    file: Arc<File>,
    offset: u64,
    size: u64,
}

impl Pinned {
    /// Reads from the chunk at `offset` into `buf`; returns the bytes read. The extent's
    /// pages stay in the page cache (clean, so the kernel reclaims them first): dropping them
    /// after each read made every container start re-read its files from disk.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let want = (buf.len() as u64).min(self.size.saturating_sub(offset)) as usize;
        let mut done = 0;
        while done < want {
            let n = self
                .file
                .read_at(&mut buf[done..want], self.offset + offset + done as u64)
                .map_err(|e| Error::Io {
                    op: "read cached chunk",
                    path: self.cache.extent_path(self.extent),
                    source: e,
                })?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    /// The chunk's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Tells the kernel this chunk will be read soon, so the disk reads it ahead while
    /// earlier chunks are being served.
    pub fn will_need(&self) {
        let len = std::num::NonZeroU64::new(self.size);
        let _ = rustix::fs::fadvise(&*self.file, self.offset, len, rustix::fs::Advice::WillNeed);
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.cache.unpin(self.extent);
    }
}

/// A large file whose every chunk is cached, held whole: nothing in it is evicted while
/// this lives, so the kernel may read its extent directly.
#[derive(Debug)]
pub struct CompleteFile {
    cache: Arc<ChunkCache>,
    extent: ExtentId,
}

impl CompleteFile {
    /// Opens the extent read-only; its bytes are exactly the file's.
    pub fn open(&self) -> Result<File> {
        let path = self.cache.extent_path(self.extent);
        File::open(&path).map_err(Error::io("open file extent", &path))
    }
}

impl Drop for CompleteFile {
    fn drop(&mut self) {
        self.cache.unpin(self.extent);
    }
}

/// Why a chunk could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The registry did not answer in time.
    #[error("chunk {digest}: the registry did not answer within {timeout:?}")]
    TimedOut {
        /// The chunk.
        digest: Digest,
        /// The bound.
        timeout: Duration,
    },
    /// The registry answered with an error, or with the wrong bytes twice.
    #[error("chunk {digest}: {source}")]
    Registry {
        /// The chunk.
        digest: Digest,
        /// What went wrong.
        source: lode_registry::Error,
    },
    /// Local disk.
    #[error(transparent)]
    Local(#[from] Error),
}

/// Whether a fetch serves a read now, or works ahead of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A read is waiting.
    Foreground,
    /// Prefetch or read-ahead.
    Background,
}

/// Removes the records of `chunks` and `extents` from the index, in one transaction.
fn remove_records(
    db: &redb::Database,
    chunks: &[At],
    extents: &[ExtentId],
) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut chunk_table = txn.open_table(CHUNKS)?;
        for at in chunks {
            chunk_table.remove((at.extent, at.offset))?;
        }
        let mut extent_table = txn.open_table(EXTENTS)?;
        for id in extents {
            extent_table.remove(id)?;
        }
    }
    txn.commit()?;
    Ok(())
}

fn index_error(path: &Path) -> impl FnOnce(redb::Error) -> Error + '_ {
    move |e| Error::Io {
        op: "update chunk cache index",
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    }
}

impl ChunkCache {
    /// Opens the cache in `dir`, holding at most `capacity` bytes. Takes an exclusive lock,
    /// so two processes never share a cache, and indexes what a previous run left. An index
    /// that cannot be read is started afresh (its chunks are fetched again on use).
    pub fn open(dir: &Path, capacity: u64) -> Result<Arc<Self>> {
        fs::create_dir_all(dir).map_err(Error::io("create directory", dir))?;
        let lock_path = dir.join(".lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(Error::io("open", &lock_path))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|_| Error::CacheBusy(dir.to_path_buf()))?;
        // Left by the layout before extents: one file per chunk.
        for old in ["blake3", "tmp"] {
            if dir.join(old).exists() {
                tracing::info!(dir = %dir.join(old).display(), "removing chunks cached in the old one-file-per-chunk layout; they are fetched again on use");
                let _ = fs::remove_dir_all(dir.join(old));
            }
        }
        let extents = dir.join("extents");
        fs::create_dir_all(&extents).map_err(Error::io("create directory", &extents))?;
        let db_path = dir.join("index.redb");
        let db = match Database::create(&db_path) {
            Ok(db) => db,
            Err(e) => {
                tracing::warn!(path = %db_path.display(), error = %e, "chunk cache index unreadable; starting the cache afresh");
                let _ = fs::remove_file(&db_path);
                let _ = fs::remove_dir_all(&extents);
                fs::create_dir_all(&extents).map_err(Error::io("create directory", &extents))?;
                Database::create(&db_path).map_err(|e| index_error(&db_path)(e.into()))?
            }
        };
        let state = Self::load(&db, &db_path, &extents)?;
        let cache = Arc::new(Self {
            dir: dir.to_path_buf(),
            capacity,
            db,
            state: Mutex::new(state),
            inflight: Mutex::new(HashMap::new()),
            stats: CacheStats::default(),
            _lock: lock,
        });
        cache.evict(&mut cache.state.lock().expect("not poisoned"));
        Ok(cache)
    }

    fn extent_path(&self, id: ExtentId) -> PathBuf {
        self.dir.join("extents").join(id.to_string())
    }

    fn db_path(&self) -> PathBuf {
        self.dir.join("index.redb")
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.state.lock().expect("not poisoned").used
    }

    /// The bound.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the chunk is cached (it may be evicted right after).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.state
            .lock()
            .expect("not poisoned")
            .by_digest
            .contains_key(digest)
    }

    /// Extent files on disk now.
    pub fn extent_files(&self) -> usize {
        self.state.lock().expect("not poisoned").extents.len()
    }

    /// The extent's open file, opening it if it is not; pins the extent.
    fn pin_extent(&self, state: &mut State, id: ExtentId) -> Result<Arc<File>> {
        if let Some(handle) = state.extents.get(&id).and_then(|e| e.handle.clone()) {
            state.extents.get_mut(&id).expect("present").pins += 1;
            return Ok(handle);
        }
        if state.open_handles >= OPEN_EXTENTS {
            // Readers hold their own references; only idle extents' handles are let go.
            for extent in state.extents.values_mut() {
                if extent.pins == 0 && extent.handle.take().is_some() {
                    state.open_handles -= 1;
                }
            }
        }
        let path = self.extent_path(id);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map(Arc::new)
            .map_err(Error::io("open extent", &path))?;
        let extent = state.extents.get_mut(&id).expect("present");
        extent.handle = Some(file.clone());
        extent.pins += 1;
        state.open_handles += 1;
        Ok(file)
    }

    fn pin_at(self: &Arc<Self>, state: &mut State, at: At) -> Option<Pinned> {
        let clock = state.tick();
        let unit = state.units.get_mut(&at)?;
        unit.last_use = clock;
        let size = u64::from(unit.len);
        let file = self
            .pin_extent(state, at.extent)
            .inspect_err(|e| tracing::warn!(error = %e, "cached chunk unreadable"))
            .ok()?;
        Some(Pinned {
            cache: self.clone(),
            extent: at.extent,
            file,
            offset: at.offset,
            size,
        })
    }

    fn unpin(&self, id: ExtentId) {
        let mut state = self.state.lock().expect("not poisoned");
        if let Some(extent) = state.extents.get_mut(&id) {
            extent.pins -= 1;
        }
        self.evict(&mut state);
    }

    /// Pins a cached chunk, wherever it lies.
    pub fn pin(self: &Arc<Self>, digest: &Digest) -> Option<Pinned> {
        let mut state = self.state.lock().expect("not poisoned");
        let at = state.locate(digest)?;
        self.pin_at(&mut state, at)
    }

    /// Pins a cached chunk where `placement` wants it: for a large file, only in its extent.
    pub fn pin_placed(self: &Arc<Self>, digest: &Digest, placement: Placement) -> Option<Pinned> {
        let mut state = self.state.lock().expect("not poisoned");
        let at = state.locate_placed(digest, &placement)?;
        self.pin_at(&mut state, at)
    }

    /// The large file laid out as `layout`, when every chunk of it is in its extent; it is
    /// held whole, and counts as used now, until the returned value is dropped.
    pub fn complete_file(self: &Arc<Self>, layout: &FileLayout) -> Option<CompleteFile> {
        let mut state = self.state.lock().expect("not poisoned");
        let id = *state.files.get(&layout.key)?;
        let extent = state.extents.get_mut(&id)?;
        if extent.live != layout.size {
            return None;
        }
        extent.pins += 1;
        let clock = state.tick();
        state.extents.get_mut(&id).expect("present").last_use = clock;
        Some(CompleteFile {
            cache: self.clone(),
            extent: id,
        })
    }

    /// Drops least recently used chunks in unpinned extents until the cache fits its bound;
    /// pinned extents may keep it over the bound until they are released. Records go first,
    /// then the bytes; an extent with nothing left goes too.
    fn evict(&self, state: &mut State) {
        if state.used <= self.capacity {
            return;
        }
        // A packed extent gives up chunks one by one; a large file's extent goes whole, by
        // unlinking it: the kernel may still map it (passthrough `mmap` holds the extent, not
        // the FUSE file, so its RELEASE comes at `close`), and a punched hole would read
        // back as zeros there, while an unlinked file keeps its bytes until unmapped.
        let mut candidates: Vec<(u64, Vec<At>, u64)> = Vec::new();
        let mut whole: HashMap<ExtentId, (u64, Vec<At>, u64)> = HashMap::new();
        for (at, unit) in &state.units {
            let Some(extent) = state.extents.get(&at.extent).filter(|e| e.pins == 0) else {
                continue;
            };
            let last_use = unit.last_use.max(extent.last_use);
            let len = u64::from(unit.len);
            if extent.file.is_some() {
                let file = whole.entry(at.extent).or_insert((0, Vec::new(), 0));
                file.0 = file.0.max(last_use);
                file.1.push(*at);
                file.2 += len;
            } else {
                candidates.push((last_use, vec![*at], len));
            }
        }
        candidates.extend(whole.into_values());
        candidates
            .sort_unstable_by_key(|(last_use, ats, _)| (*last_use, ats[0].extent, ats[0].offset));
        let mut victims = Vec::new();
        let mut used = state.used;
        for (_, ats, len) in candidates {
            if used <= self.capacity {
                break;
            }
            used -= len;
            victims.extend(ats);
        }
        if victims.is_empty() {
            return;
        }
        let mut emptied = Vec::new();
        {
            let mut live: HashMap<ExtentId, u64> = HashMap::new();
            for at in &victims {
                let len = u64::from(state.units[at].len);
                *live
                    .entry(at.extent)
                    .or_insert_with(|| state.extents[&at.extent].live) -= len;
            }
            for (id, left) in live {
                let extent = &state.extents[&id];
                if left == 0 && extent.append_at.is_none() {
                    emptied.push(id);
                }
            }
        }
        let db_path = self.db_path();
        let committed = remove_records(&self.db, &victims, &emptied);
        if let Err(e) = committed {
            // The bytes stay, so the records on disk stay true; the next start counts them.
            tracing::warn!(error = %index_error(&db_path)(e), "chunk cache eviction not recorded; keeping the chunks on disk");
            return;
        }
        for at in victims {
            let Some(unit) = state.forget(at) else {
                continue;
            };
            if !emptied.contains(&at.extent) {
                let path = self.extent_path(at.extent);
                match &state.extents[&at.extent].handle {
                    Some(handle) => punch_hole(handle, at.offset, u64::from(unit.len)),
                    None => {
                        if let Ok(file) = fs::OpenOptions::new().write(true).open(&path) {
                            punch_hole(&file, at.offset, u64::from(unit.len));
                        }
                    }
                }
            }
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
        for id in emptied {
            if let Some(extent) = state.extents.remove(&id) {
                if extent.handle.is_some() {
                    state.open_handles -= 1;
                }
                if let Some(layout) = extent.file {
                    state.files.remove(&layout.key);
                }
            }
            let _ = fs::remove_file(self.extent_path(id));
        }
    }

    /// Chooses where `len` new bytes go and pins that extent; creates the extent (and its
    /// record) when there is none yet.
    fn reserve(
        &self,
        state: &mut State,
        len: u64,
        placement: &Placement,
    ) -> Result<(At, Arc<File>)> {
        let (id, offset) = match placement {
            Placement::File { layout, offset } => match state.files.get(&layout.key) {
                Some(id) => (*id, *offset),
                None => {
                    let id = self.create_extent(state, Some((*layout).clone()))?;
                    (id, *offset)
                }
            },
            Placement::Packed => {
                let open = state
                    .packing
                    .and_then(|id| Some((id, state.extents.get(&id)?.append_at?)))
                    .filter(|(_, end)| *end < PACKED_EXTENT_BYTES);
                let (id, end) = match open {
                    Some(open) => open,
                    None => {
                        if let Some(old) = state.packing.and_then(|id| state.extents.get_mut(&id)) {
                            old.append_at = None;
                        }
                        let id = self.create_extent(state, None)?;
                        state.packing = Some(id);
                        (id, 0)
                    }
                };
                state.extents.get_mut(&id).expect("present").append_at = Some(end + len);
                (id, end)
            }
        };
        let file = self.pin_extent(state, id)?;
        Ok((At { extent: id, offset }, file))
    }

    /// Creates an empty extent file (a large file's, sized as the file) and records it.
    fn create_extent(&self, state: &mut State, file: Option<FileLayout>) -> Result<ExtentId> {
        let id = state.next_extent;
        state.next_extent += 1;
        let path = self.extent_path(id);
        let created = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|f| f.set_len(file.as_ref().map_or(0, |l| l.size)))
            .and_then(|()| File::open(self.dir.join("extents"))?.sync_all());
        if let Err(e) = created {
            let _ = fs::remove_file(&path);
            return Err(Error::io("create extent", &path)(e));
        }
        let db_path = self.db_path();
        let recorded = (|| -> Result<(), redb::Error> {
            let txn = self.db.begin_write()?;
            {
                let mut extents = txn.open_table(EXTENTS)?;
                let key: &[u8] = file.as_ref().map_or(&[], |l| l.key.as_bytes());
                extents.insert(id, (key, file.as_ref().map_or(0, |l| l.size)))?;
            }
            txn.commit()?;
            Ok(())
        })();
        if let Err(e) = recorded {
            let _ = fs::remove_file(&path);
            return Err(index_error(&db_path)(e));
        }
        state.add_extent(id, file);
        Ok(id)
    }

    /// Keeps bytes already checked against `digest` where `placement` wants them: written,
    /// synced, then recorded, so a crash never leaves a record of bytes not on disk.
    fn insert(
        self: &Arc<Self>,
        digest: &Digest,
        bytes: &[u8],
        placement: Placement,
    ) -> Result<Pinned> {
        let len = bytes.len() as u64;
        let (at, file) = {
            let mut state = self.state.lock().expect("not poisoned");
            self.reserve(&mut state, len, &placement)?
        };
        let path = self.extent_path(at.extent);
        let written = file
            .write_all_at(bytes, at.offset)
            .and_then(|()| file.sync_data())
            .map_err(Error::io("write extent", &path))
            .and_then(|()| {
                let mut state = self.state.lock().expect("not poisoned");
                state.seq += 1;
                let seq = state.seq;
                drop(state);
                (|| -> Result<(), redb::Error> {
                    let txn = self.db.begin_write()?;
                    {
                        let mut chunks = txn.open_table(CHUNKS)?;
                        chunks.insert(
                            (at.extent, at.offset),
                            (*digest.as_bytes(), len as u32, seq),
                        )?;
                    }
                    txn.commit()?;
                    Ok(())
                })()
                .map_err(index_error(&self.db_path()))
            });
        let mut state = self.state.lock().expect("not poisoned");
        if let Err(e) = written {
            punch_hole(&file, at.offset, len);
            drop(state);
            self.unpin(at.extent);
            return Err(e);
        }
        let clock = state.tick();
        match state.units.get_mut(&at) {
            // Kept already (its pin failed to open the extent, say): counted once.
            Some(unit) if unit.digest == *digest => unit.last_use = clock,
            _ => {
                state.used += len;
                state.by_digest.entry(digest.clone()).or_default().push(at);
                state.units.insert(
                    at,
                    Unit {
                        digest: digest.clone(),
                        len: len as u32,
                        last_use: clock,
                    },
                );
                state.extents.get_mut(&at.extent).expect("pinned").live += len;
            }
        }
        let pinned = Pinned {
            cache: self.clone(),
            extent: at.extent,
            file,
            offset: at.offset,
            size: len,
        };
        self.evict(&mut state);
        Ok(pinned)
    }

    /// The chunk, from disk or else from `registry` within `timeout`, in a packed extent.
    pub async fn get(
        self: &Arc<Self>,
        registry: &dyn BlobAccess,
        digest: &Digest,
        timeout: Duration,
        priority: Priority,
    ) -> Result<Pinned, FetchError> {
        self.get_placed(registry, digest, timeout, priority, Placement::Packed)
            .await
    }

    /// The chunk where `placement` wants it. Concurrent callers for one missing chunk share
    /// one fetch; a chunk cached elsewhere is copied rather than fetched again. Bytes that do
    /// not match the digest are refused and fetched once more; they are never kept.
    pub async fn get_placed(
        self: &Arc<Self>,
        registry: &dyn BlobAccess,
        digest: &Digest,
        timeout: Duration,
        priority: Priority,
        placement: Placement<'_>,
    ) -> Result<Pinned, FetchError> {
        if let Some(pinned) = self.pin_placed(digest, placement) {
            return Ok(pinned);
        }
        let gate = self
            .inflight
            .lock()
            .expect("not poisoned")
            .entry(digest.clone())
            .or_default()
            .clone();
        let result = async {
            let _turn = gate.lock().await;
            if let Some(pinned) = self.pin_placed(digest, placement) {
                return Ok(pinned);
            }
            let owned = match placement {
                Placement::Packed => None,
                Placement::File { layout, offset } => Some((layout.clone(), offset)),
            };
            let cache = self.clone();
            let wanted = digest.clone();
            if let Some(elsewhere) = self.pin(digest) {
                return tokio::task::spawn_blocking(move || {
                    let mut bytes = vec![0; elsewhere.size() as usize];
                    let n = elsewhere.read_at(0, &mut bytes)?;
                    drop(elsewhere);
                    if n != bytes.len() {
                        return Err(Error::Io {
                            op: "copy cached chunk",
                            path: cache.dir.join("extents"),
                            source: std::io::ErrorKind::UnexpectedEof.into(),
                        });
                    }
                    cache.stats.local_copies.fetch_add(1, Ordering::Relaxed);
                    cache.insert(&wanted, &bytes, placement_of(&owned))
                })
                .await
                .expect("caching does not panic")
                .map_err(FetchError::Local);
            }
            let fetched = tokio::time::timeout(timeout, self.fetch(registry, digest))
                .await
                .map_err(|_| FetchError::TimedOut {
                    digest: digest.clone(),
                    timeout,
                })??;
            let counter = match priority {
                Priority::Foreground => &self.stats.foreground_fetches,
                Priority::Background => &self.stats.background_fetches,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            self.stats
                .fetched_bytes
                .fetch_add(fetched.len() as u64, Ordering::Relaxed);
            tokio::task::spawn_blocking(move || {
                cache.insert(&wanted, &fetched, placement_of(&owned))
            })
            .await
            .expect("caching does not panic")
            .map_err(FetchError::Local)
        }
        .await;
        let mut inflight = self.inflight.lock().expect("not poisoned");
        // The map and this caller hold the gate: nobody else waits on it.
        if Arc::strong_count(&gate) == 2 {
            inflight.remove(digest);
        }
        result
    }

    async fn fetch(&self, registry: &dyn BlobAccess, digest: &Digest) -> Result<Bytes, FetchError> {
        let mut attempt = 0;
        loop {
            // Checked here too, whatever the registry client does, before anything is kept.
            let fetched = registry
                .get_blob(digest)
                .await
                .and_then(|bytes| digest.verify(&bytes).map(|()| bytes));
            match fetched {
                Ok(bytes) => return Ok(bytes),
                Err(lode_registry::Error::DigestMismatch { actual, .. }) if attempt == 0 => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%digest, %actual, "refused a corrupt chunk from the registry; fetching again");
                    attempt += 1;
                }
                Err(source) => {
                    return Err(FetchError::Registry {
                        digest: digest.clone(),
                        source,
                    });
                }
            }
        }
    }
}

fn placement_of(owned: &Option<(FileLayout, u64)>) -> Placement<'_> {
    match owned {
        None => Placement::Packed,
        Some((layout, offset)) => Placement::File {
            layout,
            offset: *offset,
        },
    }
}

/// Frees the disk blocks of a range and reads it back as zeros; the file keeps its size.
fn punch_hole(file: &File, offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
    if let Err(e) = rustix::fs::fallocate(file, flags, offset, len) {
        tracing::warn!(error = %e, offset, len, "could not free evicted bytes in an extent");
    }
}
