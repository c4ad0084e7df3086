//! The lazy mount: an index served read-only through FUSE. Metadata comes from the index;
//! file bytes come from the chunk cache, fetched from the registry on first read.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request, SessionACL,
};
use lode_registry::{BlobAccess, Digest, TagUpdate};

use crate::cache::{ChunkCache, CompleteFile, FetchError, FileLayout, Pinned, Placement, Priority};
use crate::cipher::ChunkCipher;
use crate::index::{Content, Entry, Index, Kind, RawChunk};

mod ahead;
mod kernel;
mod table;

use ahead::Profile;
pub use ahead::profile_tag;
use kernel::*;
pub use kernel::{MountEntry, is_stale_mount, mounts_under, unmount};
pub use table::MountTable;

/// The content never changes, so the kernel may keep names and attributes for a long time.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// Files at least this large get an extent of their own in the chunk cache, laid out as the
/// file, so that once fully cached the kernel reads them directly (FUSE passthrough). Smaller
/// files' chunks are packed together.
const FILE_EXTENT_MIN: u64 = 1 << 20;
thread_local! {
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Opened chunks of an encrypted image kept for the next reads: a sequential reader's 1 MiB
/// requests would otherwise open the same chunk again and again.
const OPENED_CHUNKS: usize = 8;

/// Blocks reported by `stat`; the unit of `st_blocks` is 512 bytes.
const BLOCK: u64 = 512;

/// How a mount behaves.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Longest a read waits for the registry before it fails with EIO.
    pub fetch_timeout: Duration,
    /// Threads serving FUSE requests.
    pub threads: usize,
    /// Prefetch the image's recorded access profile, when there is one.
    pub prefetch: bool,
    /// Concurrent prefetch fetches: few where chunks come from a disk nearby, so prefetch
    /// never starves the foreground; more where each fetch waits on a network store.
    pub prefetch_parallelism: usize,
    /// How long after mounting an image with no recorded profile a [`MountTable`] records
    /// the one its first users made (their start-up reads), so mounts elsewhere prefetch it
    /// (`None`: only at close).
    pub profile_after: Option<Duration>,
    /// Let the kernel read fully cached large files from their extents (FUSE passthrough),
    /// where it offers that.
    pub passthrough: bool,
    /// Opens the chunks of an encrypted index (and only such an index is mounted with one).
    /// The cache keeps them sealed; reads open each chunk they touch.
    pub cipher: Option<Arc<ChunkCipher>>,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            fetch_timeout: Duration::from_secs(10),
            threads: 8,
            prefetch: true,
            prefetch_parallelism: 4,
            profile_after: Some(Duration::from_secs(5)),
            passthrough: true,
            cipher: None,
        }
    }
}

/// Shared by the FUSE threads and the mount's owner.
struct Image {
    index: Index,
    cache: Arc<ChunkCache>,
    registry: Arc<dyn BlobAccess>,
    runtime: tokio::runtime::Handle,
    options: MountOptions,
    /// Names per hard-link group (the group's first id → count).
    links: HashMap<u32, u32>,
    profile: Mutex<Profile>,
    /// Per file: where the last read ended, to spot sequential readers.
    last_end: Mutex<HashMap<u32, u64>>,
    reads: AtomicU64,
    /// Large files' layouts in the chunk cache, by entry id.
    layouts: Mutex<HashMap<u32, Arc<FileLayout>>>,
    /// Open large files by inode. The kernel serves an inode either through this server or
    /// from one backing file, never both at once (a mismatch fails the open with EIO), so
    /// every open of an inode follows the first one until all are released.
    opens: Mutex<HashMap<INodeNo, InodeOpens>>,
    /// Opens served by passthrough so far.
    passthrough_opens: AtomicU64,
    /// Whether the kernel agreed to FUSE passthrough.
    passthrough: AtomicBool,
    /// Whether the kernel lets this mount be cloned idmapped (`FUSE_ALLOW_IDMAP`, Linux 6.12+).
    idmappable: AtomicBool,
    /// An encrypted image's chunks opened last, newest first.
    opened: Mutex<std::collections::VecDeque<(Digest, Arc<[u8]>)>>,
}

/// The opens of one large file.
struct InodeOpens {
    count: u32,
    /// The backing file the kernel reads, and the hold that keeps it whole in the cache.
    passthrough: Option<(fuser::BackingId, CompleteFile)>,
}

/// A mounted image. Dropping it unmounts.
pub struct Mount {
    image: Arc<Image>,
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mount")
            .field("mountpoint", &self.mountpoint)
            .field("index", self.image.index.digest())
            .finish_non_exhaustive()
    }
}

impl Mount {
    /// Mounts `index` read-only at `mountpoint` (an existing directory; a stale mount left
    /// there by a killed process is cleared first). Must be called inside a tokio runtime:
    /// fetches run on it.
    pub fn new(
        index: Index,
        cache: Arc<ChunkCache>,
        registry: Arc<dyn BlobAccess>,
        mountpoint: &Path,
        options: MountOptions,
    ) -> std::io::Result<Self> {
        match (index.encrypted(), &options.cipher) {
            (true, None) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    crate::Error::Encrypted(index.digest().clone()).to_string(),
                ));
            }
            (false, Some(_)) => {
                // A key given for a plain index means the caller expected secrecy it lacks.
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "image {} is not encrypted, but was to be mounted with a key",
                        index.digest()
                    ),
                ));
            }
            _ => {}
        }
        if is_stale_mount(mountpoint) {
            tracing::warn!(mountpoint = %mountpoint.display(), "clearing a stale mount");
            unmount(mountpoint)?;
        }
        let mut links = HashMap::new();
        for entry in index.entries() {
            if let Some(first) = entry.link_primary() {
                *links.entry(first).or_insert(0) += 1;
            }
        }
        let entries = index.len();
        let image = Arc::new(Image {
            cache,
            registry,
            runtime: tokio::runtime::Handle::current(),
            links,
            profile: Mutex::new(Profile {
                seen: vec![false; entries],
                order: Vec::new(),
            }),
            last_end: Mutex::new(HashMap::new()),
            reads: AtomicU64::new(0),
            layouts: Mutex::new(HashMap::new()),
            opens: Mutex::new(HashMap::new()),
            passthrough_opens: AtomicU64::new(0),
            passthrough: AtomicBool::new(false),
            idmappable: AtomicBool::new(false),
            opened: Mutex::new(Default::default()),
            options: options.clone(),
            index,
        });
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::RO,
            MountOption::FSName(format!("lode:{}", &image.index.digest().hex()[..16])),
            MountOption::Subtype("lode".into()),
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
            // Device nodes and setuid bits in an image stay metadata: they mean nothing here,
            // to the host's users or to a container on this mount.
            MountOption::NoDev,
            MountOption::NoSuid,
        ];
        config.acl = SessionACL::All;
        config.n_threads = Some(options.threads.max(1));
        config.clone_fd = true;
        let session = fuser::spawn_mount(Fs(image.clone()), mountpoint, &config)?;
        // The first request waits for FUSE_INIT, so what it agreed is known after this.
        std::fs::metadata(mountpoint)?;
        widen_read_ahead(mountpoint);
        if options.prefetch {
            image.clone().start_prefetch();
        }
        Ok(Self {
            image,
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    /// The digest of the image's index.
    pub fn index_digest(&self) -> &Digest {
        self.image.index.digest()
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Whether a container may see it through an idmapped clone (a user namespace's view).
    pub fn idmappable(&self) -> bool {
        self.image.idmappable.load(Ordering::Relaxed)
    }

    /// The chunk cache behind it.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.image.cache
    }

    /// File reads served so far.
    pub fn reads(&self) -> u64 {
        self.image.reads.load(Ordering::Relaxed)
    }

    /// Opens the kernel served from a backing file (FUSE passthrough) so far.
    pub fn passthrough_opens(&self) -> u64 {
        self.image.passthrough_opens.load(Ordering::Relaxed)
    }

    /// Whether the kernel agreed to FUSE passthrough for this mount.
    pub fn passthrough(&self) -> bool {
        self.image.passthrough.load(Ordering::Relaxed)
    }

    /// Whether the mount has gone away (unmounted from outside, or its session ended).
    pub fn is_finished(&self) -> bool {
        self.session
            .as_ref()
            .is_none_or(|session| session.guard.is_finished())
    }

    /// Unmounts and waits for the FUSE threads to finish.
    pub fn unmount(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(session) => session.umount_and_join(),
            None => Ok(()),
        }
    }

    /// Waits until the mount goes away (an external `umount`).
    pub fn join(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(session) => session.join(),
            None => Ok(()),
        }
    }
}

impl Image {
    fn entry(&self, ino: INodeNo) -> Option<Entry<'_>> {
        let id = u32::try_from(ino.0.checked_sub(1)?).ok()?;
        ((id as usize) < self.index.len()).then(|| self.index.entry(id))
    }

    /// Hard links share the inode number of their group's first entry.
    fn ino(entry: &Entry<'_>) -> INodeNo {
        INodeNo(u64::from(entry.link_primary().unwrap_or(entry.id())) + 1)
    }

    fn attr(&self, entry: &Entry<'_>) -> FileAttr {
        let (sec, nsec) = entry.mtime();
        let time = if sec >= 0 {
            UNIX_EPOCH + Duration::new(sec as u64, nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec.into())
        };
        let kind = file_type(entry.kind());
        let nlink = match entry.kind() {
            Kind::Dir => 2,
            _ => entry
                .link_primary()
                .and_then(|first| self.links.get(&first).copied())
                .unwrap_or(1),
        };
        let size = entry.size();
        FileAttr {
            ino: Self::ino(entry),
            size,
            blocks: size.div_ceil(BLOCK),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm: entry.mode() as u16,
            nlink,
            uid: entry.uid(),
            gid: entry.gid(),
            rdev: entry.rdev() as u32,
            blksize: 4096,
            flags: 0,
        }
    }

    /// A directory's entries for readdir: `.`, `..`, then its children in name order.
    fn listing(&self, ino: INodeNo) -> Result<Vec<(&[u8], Entry<'_>)>, Errno> {
        let dir = self.entry(ino).ok_or(Errno::ENOENT)?;
        let children = dir.children().ok_or(Errno::ENOTDIR)?;
        let parent = self.index.entry(dir.parent());
        let mut listing: Vec<(&[u8], Entry<'_>)> = vec![(b".", dir), (b"..", parent)];
        listing.extend(children.map(|id| {
            let child = self.index.entry(id);
            (child.name(), child)
        }));
        Ok(listing)
    }

    /// A large file's layout in the chunk cache; `None` for files whose chunks are packed.
    /// Sealed chunks are never laid out as the file: their bytes are not the file's.
    fn layout(&self, entry: &Entry<'_>) -> Option<Arc<FileLayout>> {
        if entry.size() < FILE_EXTENT_MIN || self.index.encrypted() {
            return None;
        }
        let Some(Content::Chunks(chunks)) = entry.content() else {
            return None;
        };
        let mut layouts = self.layouts.lock().expect("not poisoned");
        let layout = layouts.entry(entry.id()).or_insert_with(|| {
            Arc::new(FileLayout::new(
                entry.size(),
                chunks.iter().map(|c| (c.offset(), c.digest())),
            ))
        });
        Some(layout.clone())
    }

    /// Reads `size` bytes at `offset` of a chunked file, fetching missing chunks.
    fn read_chunks(
        &self,
        path: &dyn Fn() -> PathBuf,
        chunks: &[RawChunk],
        layout: Option<&FileLayout>,
        offset: u64,
        size: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), Errno> {
        let first = chunks.partition_point(|c| c.offset() + u64::from(c.length()) <= offset);
        let end = offset + size;
        out.clear();
        for chunk in &chunks[first..] {
            if chunk.offset() >= end {
                break;
            }
            let digest = chunk.digest();
            let from = offset.max(chunk.offset());
            let to = end.min(chunk.offset() + u64::from(chunk.length()));
            if let Some(cipher) = &self.options.cipher {
                let plain = match self.opened_chunk(&digest) {
                    Some(plain) => plain,
                    None => {
                        let pinned = self.pin_or_fetch(path, &digest, placement(layout, chunk))?;
                        self.open_chunk(cipher, &digest, &pinned, chunk.length())
                            .map_err(|e| {
                                tracing::error!(path = %path().display(), %digest, error = %e, "sealed chunk unreadable: EIO");
                                Errno::EIO
                            })?
                    }
                };
                let within = (from - chunk.offset()) as usize..(to - chunk.offset()) as usize;
                out.extend_from_slice(&plain[within]);
                continue;
            }
            let pinned = self.pin_or_fetch(path, &digest, placement(layout, chunk))?;
            let start = out.len();
            out.resize(start + (to - from) as usize, 0);
            let n = pinned
                .read_at(from - chunk.offset(), &mut out[start..])
                .map_err(|e| {
                    tracing::error!(path = %path().display(), %digest, error = %e, "cached chunk unreadable: EIO");
                    Errno::EIO
                })?;
            if n != (to - from) as usize {
                tracing::error!(path = %path().display(), %digest, "cached chunk is short: EIO");
                return Err(Errno::EIO);
            }
        }
        Ok(())
    }

    /// The chunk, pinned where `placement` wants it: a cached one right here, and only a miss
    /// through the runtime (a fetch within the mount's timeout, or EIO).
    fn pin_or_fetch(
        &self,
        path: &dyn Fn() -> PathBuf,
        digest: &Digest,
        placement: Placement<'_>,
    ) -> Result<Pinned, Errno> {
        if let Some(pinned) = self.cache.pin_placed(digest, placement) {
            return Ok(pinned);
        }
        self.runtime
            .block_on(self.cache.get_placed(
                self.registry.as_ref(),
                digest,
                self.options.fetch_timeout,
                Priority::Foreground,
                placement,
            ))
            .map_err(|e| {
                let kind = match &e {
                    FetchError::TimedOut { .. } => "timed out",
                    _ => "failed",
                };
                tracing::error!(path = %path().display(), %digest, error = %e, "read {kind}: EIO");
                Errno::EIO
            })
    }

    /// A sealed chunk opened lately, if it was.
    fn opened_chunk(&self, digest: &Digest) -> Option<Arc<[u8]>> {
        let opened = self.opened.lock().expect("not poisoned");
        opened
            .iter()
            .find(|(d, _)| d == digest)
            .map(|(_, plain)| plain.clone())
    }

    /// Opens the sealed chunk `pinned` and keeps it for the next reads.
    fn open_chunk(
        &self,
        cipher: &ChunkCipher,
        digest: &Digest,
        pinned: &Pinned,
        length: u32,
    ) -> Result<Arc<[u8]>, String> {
        let mut sealed = vec![0; pinned.size() as usize];
        let read = pinned.read_at(0, &mut sealed).map_err(|e| e.to_string())?;
        if read != sealed.len() {
            return Err("the cached chunk is short".into());
        }
        let plain = cipher.open(&sealed).map_err(|e| e.to_string())?;
        if plain.len() != length as usize {
            return Err(format!(
                "it opens to {} bytes, but the index says {length}",
                plain.len()
            ));
        }
        let plain: Arc<[u8]> = plain.into();
        let mut opened = self.opened.lock().expect("not poisoned");
        opened.push_front((digest.clone(), plain.clone()));
        opened.truncate(OPENED_CHUNKS);
        Ok(plain)
    }

    /// Opens a large file. The first open of an inode whose chunks are all cached hands the
    /// kernel the file's extent (passthrough); later opens follow the first until all close.
    fn open_large(&self, entry: &Entry<'_>, layout: &FileLayout, reply: ReplyOpen) {
        let ino = Self::ino(entry);
        let mut opens = self.opens.lock().expect("not poisoned");
        if let Some(open) = opens.get_mut(&ino) {
            open.count += 1;
            match &open.passthrough {
                Some((backing, _)) => {
                    self.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                    reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), backing);
                }
                None => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            }
            return;
        }
        let passthrough = self
            .passthrough
            .load(Ordering::Relaxed)
            .then(|| self.cache.complete_file(layout))
            .flatten()
            .and_then(|complete| {
                let backing = complete
                    .open()
                    .map_err(std::io::Error::other)
                    .and_then(|file| reply.open_backing(&file));
                match backing {
                    Ok(backing) => Some((backing, complete)),
                    Err(e) => {
                        tracing::debug!(path = %self.path_of(entry.id()).display(), error = %e, "no passthrough; serving reads");
                        None
                    }
                }
            });
        match &passthrough {
            Some((backing, _)) => {
                self.record_first_read(entry.id());
                self.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), backing);
            }
            None => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
        }
        opens.insert(
            ino,
            InodeOpens {
                count: 1,
                passthrough,
            },
        );
    }

    fn path_of(&self, id: u32) -> PathBuf {
        let mut parts = Vec::new();
        let mut at = id;
        while at != crate::index::ROOT {
            let entry = self.index.entry(at);
            parts.push(entry.name().to_vec());
            at = entry.parent();
        }
        parts.iter().rev().map(|p| OsStr::from_bytes(p)).collect()
    }
}

struct Fs(Arc<Image>);

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // 1 MiB requests: max_pages follows the larger of max_write and max_readahead.
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        // Containers in a user namespace see the image through an idmapped clone of this
        // mount; the kernel needs the server's consent (and default_permissions).
        let idmap = config.add_capabilities(InitFlags::FUSE_ALLOW_IDMAP).is_ok();
        self.0.idmappable.store(idmap, Ordering::Relaxed);
        // Fully cached large files are read by the kernel from their extents. Depth 1: the
        // extents are on a plain filesystem, and containers stack overlayfs on this mount.
        let passthrough = self.0.options.passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        self.0.passthrough.store(passthrough, Ordering::Relaxed);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let image = &self.0;
        let Some(dir) = image.entry(parent) else {
            return reply.error(Errno::ENOENT);
        };
        match image.index.lookup(dir.id(), name.as_bytes()) {
            Some(entry) => reply.entry(&TTL, &image.attr(&entry), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.entry(ino) {
            Some(entry) => reply.attr(&TTL, &self.0.attr(&entry)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.0.entry(ino).and_then(|e| e.symlink_target()) {
            Some(target) => reply.data(target),
            None => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(entry) = self.0.entry(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if entry.kind() != Kind::File {
            return reply.error(Errno::EINVAL);
        }
        match self.0.layout(&entry) {
            Some(layout) => self.0.open_large(&entry, &layout, reply),
            None => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        let mut opens = self.0.opens.lock().expect("not poisoned");
        if let Some(open) = opens.get_mut(&ino) {
            open.count -= 1;
            if open.count == 0 {
                opens.remove(&ino);
            }
        }
        drop(opens);
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let image = &self.0;
        let Some(entry) = image.entry(ino) else {
            return reply.error(Errno::ENOENT);
        };
        image.reads.fetch_add(1, Ordering::Relaxed);
        image.record_first_read(entry.id());
        let file_size = entry.size();
        if offset >= file_size {
            return reply.data(&[]);
        }
        let len = u64::from(size).min(file_size - offset);
        match entry.content() {
            Some(Content::Inline(data)) => {
                reply.data(&data[offset as usize..(offset + len) as usize])
            }
            Some(Content::Chunks(chunks)) => {
                let id = entry.id();
                let path = || image.path_of(id);
                let layout = image.layout(&entry);
                // One buffer per FUSE thread: a fresh 1 MiB Vec per request is an mmap,
                // 256 page faults and an munmap each time.
                READ_BUFFER.with_borrow_mut(|buffer| {
                    match image.read_chunks(&path, chunks, layout.as_deref(), offset, len, buffer) {
                        Ok(()) => {
                            reply.data(buffer);
                            image.read_ahead(id, chunks, layout.as_ref(), offset + len);
                        }
                        Err(errno) => reply.error(errno),
                    }
                });
            }
            None => reply.error(Errno::EINVAL),
        }
    }

    /// No ioctls (Python asks whether files are terminals).
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    /// Nothing to write back: the mount is read-only.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listing = match self.0.listing(ino) {
            Ok(listing) => listing,
            Err(errno) => return reply.error(errno),
        };
        for (i, (name, entry)) in listing.into_iter().enumerate().skip(offset as usize) {
            let kind = file_type(entry.kind());
            if reply.add(
                Image::ino(&entry),
                (i + 1) as u64,
                kind,
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let image = &self.0;
        let listing = match image.listing(ino) {
            Ok(listing) => listing,
            Err(errno) => return reply.error(errno),
        };
        for (i, (name, entry)) in listing.into_iter().enumerate().skip(offset as usize) {
            let attr = image.attr(&entry);
            if reply.add(
                attr.ino,
                (i + 1) as u64,
                OsStr::from_bytes(name),
                &TTL,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let index = &self.0.index;
        let blocks = index.file_bytes().div_ceil(4096);
        reply.statfs(blocks, 0, 0, index.len() as u64, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(entry) = self.0.entry(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let Some((_, value)) = entry.xattrs().find(|(n, _)| *n == name.as_bytes()) else {
            return reply.error(Errno::NO_XATTR);
        };
        reply_sized(reply, size, value);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(entry) = self.0.entry(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut names = Vec::new();
        for (name, _) in entry.xattrs() {
            names.extend_from_slice(name);
            names.push(0);
        }
        reply_sized(reply, size, &names);
    }
}

/// Where a chunk of a file goes in the cache: in the file's own extent for a large file.
fn placement<'a>(layout: Option<&'a FileLayout>, chunk: &RawChunk) -> Placement<'a> {
    match layout {
        Some(layout) => Placement::File {
            layout,
            offset: chunk.offset(),
        },
        None => Placement::Packed,
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
    }
}

/// Answers an xattr query: the size when asked for 0 bytes, else the data if it fits.
fn reply_sized(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() <= size as usize {
        reply.data(data);
    } else {
        reply.error(Errno::ERANGE);
    }
}
