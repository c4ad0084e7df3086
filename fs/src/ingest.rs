//! Ingest: walk a tree, chunk its files, upload only the chunks the registry lacks, and store
//! the index.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use lode_registry::{BlobAccess, Digest};
use tokio::sync::mpsc;

use crate::build::{Body, FileContent, Meta, Node, encode_flagged};
use crate::chunk::Chunking;
use crate::cipher::ChunkCipher;
use crate::index::HEADER_ENCRYPTED;
use crate::{Error, Result};

/// How to ingest.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// How files are cut into chunks.
    pub chunking: Chunking,
    /// Files up to this size live in the index instead of in chunks (none when encrypting).
    pub inline_max: u32,
    /// Seal every chunk with this cipher: the registry, and the chunk cache of any mount,
    /// then hold no file bytes in the clear. The index is marked encrypted.
    pub cipher: Option<Arc<ChunkCipher>>,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            chunking: Chunking::default(),
            inline_max: DEFAULT_INLINE_MAX,
            cipher: None,
        }
    }
}

/// Files this small cost more as a blob (a name, a request) than as bytes in the index.
/// Larger thresholds grow the index fast: at 1 KiB, /usr/share's index triples (15 MB
/// against 5.5 MB), and a lazy mount fetches the whole index before the first read.
pub const DEFAULT_INLINE_MAX: u32 = 256;

/// What an ingest did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestReport {
    /// The index digest: the image's name.
    pub digest: Option<Digest>,
    /// Regular files (each hard-link group once).
    pub files: u64,
    /// Directories, the root included.
    pub dirs: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Devices, pipes and sockets.
    pub special: u64,
    /// Extra names of hard-linked files.
    pub hardlinks: u64,
    /// Bytes in regular files.
    pub file_bytes: u64,
    /// Bytes stored inline in the index.
    pub inline_bytes: u64,
    /// Distinct chunks the tree uses.
    pub chunks: u64,
    /// Chunks the registry lacked and received.
    pub new_chunks: u64,
    /// File bytes uploaded in those chunks.
    pub new_bytes: u64,
    /// Chunked bytes that needed no upload: already in the registry or repeated in the tree.
    pub deduped_bytes: u64,
    /// Size of the index.
    pub index_bytes: u64,
}

struct ChunkOut {
    digest: Digest,
    data: Bytes,
    /// The file bytes it holds (fewer than `data` when sealed).
    length: u64,
}

/// Where chunks go while the walk goes on; bounded so a fast disk cannot outrun the upload.
const PIPELINE_DEPTH: usize = 64;
/// Chunks per `HasBlobs` question. With the pipeline, at most about 128 chunks (32 MiB at
/// the default average size) are held in memory at once.
const BATCH: usize = 64;

/// Ingests the tree at `root` into `registry` and returns the report, whose `digest` names
/// the new index.
pub async fn ingest(
    root: &Path,
    registry: Arc<dyn BlobAccess>,
    options: IngestOptions,
) -> Result<IngestReport> {
    let encrypted = options.cipher.is_some();
    let (tree, report) = upload_tree(root, registry.clone(), options).await?;
    store_index(&tree, report, registry.as_ref(), encrypted).await
}

/// Encodes `tree` (its chunks sealed if `encrypted`), stores its index (after every chunk it
/// names, which the caller uploaded) and completes `report` with it.
pub(crate) async fn store_index(
    tree: &Node,
    mut report: IngestReport,
    registry: &dyn BlobAccess,
    encrypted: bool,
) -> Result<IngestReport> {
    let flags = if encrypted { HEADER_ENCRYPTED } else { 0 };
    let index = encode_flagged(tree, flags)?;
    let digest = index.digest().clone();
    report.index_bytes = index.bytes().len() as u64;
    // Chunks first, index last: an index in the registry always has all its chunks.
    registry.put_index(&digest, index.bytes().clone()).await?;
    report.digest = Some(digest);
    Ok(report)
}

/// Walks the tree at `root` into a [`Node`] tree, uploading the chunks the registry lacks.
pub(crate) async fn upload_tree(
    root: &Path,
    registry: Arc<dyn BlobAccess>,
    options: IngestOptions,
) -> Result<(Node, IngestReport)> {
    let meta = fs::symlink_metadata(root).map_err(Error::io("inspect", root))?;
    if !meta.is_dir() {
        return Err(Error::NotADirectory(root.to_path_buf()));
    }
    let beneath = Beneath::open(root)?;
    let (tx, rx) = mpsc::channel::<ChunkOut>(PIPELINE_DEPTH);
    let uploader = tokio::spawn(upload(rx, registry.clone()));
    let root_path = root.to_path_buf();
    let walk = tokio::task::spawn_blocking(move || {
        let chunking = options.chunking;
        let cipher = options.cipher.clone();
        let mut walker = Walker {
            options,
            report: IngestReport::default(),
            links: HashMap::new(),
            jobs: Vec::new(),
            beneath,
        };
        let mut tree = walker.node(&root_path, Vec::new())?;
        let (contents, distinct) = hash_files(
            &walker.jobs,
            &walker.beneath,
            chunking,
            cipher.as_deref(),
            &tx,
        )?;
        drop(tx);
        walker.report.chunks = distinct;
        fill(&mut tree, &mut contents.into_iter(), &mut HashMap::new());
        Ok::<_, Error>((tree, walker.report))
    });
    let walked = walk.await.expect("the walk does not panic");
    // The walk dropped its sender either way, so the uploader ends.
    let uploaded = uploader.await.expect("the upload does not panic");
    // An upload failure stops the walk, so it is the one to report.
    let ((tree, mut report), (new_chunks, new_bytes)) = match (walked, uploaded) {
        (_, Err(e)) | (Err(e), _) => return Err(e),
        (Ok(walked), Ok(uploaded)) => (walked, uploaded),
    };
    report.new_chunks = new_chunks;
    report.new_bytes = new_bytes;
    report.deduped_bytes = report.file_bytes - report.inline_bytes - new_bytes;
    Ok((tree, report))
}

async fn upload(
    mut rx: mpsc::Receiver<ChunkOut>,
    registry: Arc<dyn BlobAccess>,
) -> Result<(u64, u64)> {
    let (mut count, mut bytes) = (0u64, 0u64);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        batch.clear();
        if rx.recv_many(&mut batch, BATCH).await == 0 {
            return Ok((count, bytes));
        }
        let digests: Vec<Digest> = batch.iter().map(|c| c.digest.clone()).collect();
        let missing: HashSet<Digest> = registry.missing(&digests).await?.into_iter().collect();
        let uploads = batch
            .drain(..)
            .filter(|c| missing.contains(&c.digest))
            .map(|c| {
                let registry = registry.clone();
                async move { registry.put_blob(&c.digest, c.data).await.map(|_| c.length) }
            });
        let mut results = futures::stream::iter(uploads).buffer_unordered(registry.parallelism());
        while let Some(result) = results.next().await {
            bytes += result?;
            count += 1;
        }
    }
}

/// A file whose bytes go into chunks, found by the walk and hashed afterwards in parallel.
struct Job {
    path: PathBuf,
    size: u64,
}

/// The first pass: metadata, symlinks and inline files, in sorted order. Chunked files become
/// jobs, filled in after [`hash_files`] in the same order.
struct Walker {
    options: IngestOptions,
    report: IngestReport,
    /// (device, inode) of multiply-linked files → their group.
    links: HashMap<(u64, u64), u64>,
    jobs: Vec<Job>,
    beneath: Beneath,
}

/// The tree being walked, opened once: every path under it is opened relative to it with
/// no symlink followed on the way and nothing outside it reachable, so a tree that changes
/// while it is walked (a live sandbox's layer, whose processes may swap a directory for a
/// symlink to `/`) can make the walk fail but never read the host's files.
struct Beneath {
    root: std::os::fd::OwnedFd,
    root_path: PathBuf,
}

impl Beneath {
    fn open(root: &Path) -> Result<Self> {
        let fd = rustix::fs::open(
            root,
            rustix::fs::OFlags::PATH
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| Error::io("open", root)(e.into()))?;
        Ok(Self {
            root: fd,
            root_path: root.to_path_buf(),
        })
    }

    /// Opens `path` (under the root) with `flags`, refusing a symlink anywhere in it but as
    /// the last component of an `O_PATH` open, and any way out of the tree.
    fn at(&self, path: &Path, flags: rustix::fs::OFlags) -> Result<File> {
        use rustix::fs::{OFlags, ResolveFlags};
        let relative = path.strip_prefix(&self.root_path).unwrap_or(path);
        let relative = if relative.as_os_str().is_empty() {
            Path::new(".")
        } else {
            relative
        };
        rustix::fs::openat2(
            &self.root,
            relative,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map(File::from)
        .map_err(|e| match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => Error::Changed(path.to_path_buf()),
            e => Error::io("open", path)(e.into()),
        })
    }
}

/// The path that reaches what `file` is, whatever happens to its name meanwhile.
fn proc_path(file: &File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Stands in for a chunked file's content until its job is done.
const PENDING: FileContent = FileContent::Chunks(Vec::new());

impl Walker {
    fn node(&mut self, path: &Path, name: Vec<u8>) -> Result<Node> {
        let handle = self.beneath.at(path, rustix::fs::OFlags::PATH)?;
        let meta = handle.metadata().map_err(Error::io("inspect", path))?;
        let file_type = meta.file_type();
        let xattrs = if file_type.is_symlink() {
            Vec::new()
        } else {
            read_xattrs(&proc_path(&handle), path)?
        };
        let body = if file_type.is_dir() {
            self.report.dirs += 1;
            let mut children = Vec::new();
            let mut names: Vec<_> = fs::read_dir(proc_path(&handle))
                .map_err(Error::io("list", path))?
                .map(|entry| entry.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(Error::io("list", path))?;
            names.sort();
            for child in names {
                children.push(self.node(&path.join(&child), child.as_bytes().to_vec())?);
            }
            Body::Dir(children)
        } else if file_type.is_file() {
            self.file(path, &meta)?
        } else if file_type.is_symlink() {
            self.report.symlinks += 1;
            let target = rustix::fs::readlinkat(&handle, "", Vec::new())
                .map_err(|e| Error::io("read link", path)(e.into()))?;
            Body::Symlink(target.into_bytes())
        } else {
            self.report.special += 1;
            if file_type.is_char_device() {
                Body::CharDevice(meta.rdev())
            } else if file_type.is_block_device() {
                Body::BlockDevice(meta.rdev())
            } else if file_type.is_fifo() {
                Body::Fifo
            } else {
                Body::Socket
            }
        };
        Ok(Node {
            name,
            meta: Meta {
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                mtime_sec: meta.mtime(),
                mtime_nsec: meta.mtime_nsec() as u32,
            },
            xattrs,
            body,
        })
    }

    fn file(&mut self, path: &Path, meta: &fs::Metadata) -> Result<Body> {
        let key = (meta.dev(), meta.ino());
        if meta.nlink() > 1
            && let Some(&group) = self.links.get(&key)
        {
            self.report.hardlinks += 1;
            return Ok(Body::File {
                content: PENDING,
                link_group: Some(group),
            });
        }
        self.report.files += 1;
        let size = meta.len();
        // Sealed trees keep no file bytes in the index, empty files aside.
        let inline_max = match self.options.cipher {
            Some(_) => 0,
            None => self.options.inline_max,
        };
        let content = if size <= u64::from(inline_max) {
            self.report.inline_bytes += size;
            FileContent::Inline(read_small(&self.beneath, path, size)?)
        } else {
            self.jobs.push(Job {
                path: path.to_path_buf(),
                size,
            });
            PENDING
        };
        self.report.file_bytes += size;
        let link_group = (meta.nlink() > 1).then(|| {
            let group = self.links.len() as u64;
            self.links.insert(key, group);
            group
        });
        Ok(Body::File {
            content,
            link_group,
        })
    }
}

/// Opens a file the walk saw as a regular file, refusing it if it, or a directory on its way,
/// was swapped for a symlink since, so ingest never reads outside the tree.
fn open_nofollow(beneath: &Beneath, path: &Path) -> Result<File> {
    let file = beneath.at(
        path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NONBLOCK,
    )?;
    // A FIFO or device swapped in since the walk is not read.
    if !file
        .metadata()
        .map_err(Error::io("inspect", path))?
        .is_file()
    {
        return Err(Error::Changed(path.to_path_buf()));
    }
    Ok(file)
}

fn read_small(beneath: &Beneath, path: &Path, expected: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = open_nofollow(beneath, path)?;
    let mut data = Vec::with_capacity(expected as usize);
    file.take(expected + 1)
        .read_to_end(&mut data)
        .map_err(Error::io("read", path))?;
    if data.len() as u64 != expected {
        return Err(Error::Changed(path.to_path_buf()));
    }
    Ok(data)
}

/// Chunks and hashes every job on all cores, sending chunks not seen before in this run to
/// the uploader. Returns the contents in job order and the number of distinct chunks.
fn hash_files(
    jobs: &[Job],
    beneath: &Beneath,
    chunking: Chunking,
    cipher: Option<&ChunkCipher>,
    tx: &mpsc::Sender<ChunkOut>,
) -> Result<(Vec<FileContent>, u64)> {
    let next = AtomicUsize::new(0);
    let seen = Mutex::new(HashSet::new());
    let results: Vec<Mutex<Option<FileContent>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers.min(jobs.len().max(1)))
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let at = next.fetch_add(1, Ordering::Relaxed);
                        let Some(job) = jobs.get(at) else {
                            return Ok(());
                        };
                        let content = chunk_file(job, beneath, chunking, cipher, tx, &seen);
                        if content.is_err() {
                            // Stop the other workers early.
                            next.store(jobs.len(), Ordering::Relaxed);
                        }
                        *results[at].lock().expect("not poisoned") = Some(content?);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("hashing does not panic"))
    })?;
    let distinct = seen.lock().expect("not poisoned").len() as u64;
    let contents = results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .expect("not poisoned")
                .expect("every job ran")
        })
        .collect();
    Ok((contents, distinct))
}

fn chunk_file(
    job: &Job,
    beneath: &Beneath,
    chunking: Chunking,
    cipher: Option<&ChunkCipher>,
    tx: &mpsc::Sender<ChunkOut>,
    seen: &Mutex<HashSet<Digest>>,
) -> Result<FileContent> {
    let file = open_nofollow(beneath, &job.path)?;
    let mut chunks = Vec::new();
    let mut total = 0u64;
    let mut closed = false;
    chunking
        .split(file, |data| {
            total += data.len() as u64;
            // The index keeps the plain length; the blob is the sealed bytes.
            let length = data.len() as u32;
            let data = match cipher {
                Some(cipher) => cipher.seal(&data),
                None => data,
            };
            let digest = Digest::of(&data);
            chunks.push((digest.clone(), length));
            if seen.lock().expect("not poisoned").insert(digest.clone()) {
                let out = ChunkOut {
                    digest,
                    data: Bytes::from(data),
                    length: length.into(),
                };
                if tx.blocking_send(out).is_err() {
                    closed = true;
                    return Err(std::io::Error::other("upload stopped"));
                }
            }
            Ok(())
        })
        .map_err(|e| {
            if closed {
                Error::UploadStopped
            } else {
                Error::io("read", &job.path)(e)
            }
        })?;
    if total != job.size {
        return Err(Error::Changed(job.path.clone()));
    }
    Ok(FileContent::Chunks(chunks))
}

/// Puts the hashed contents back into the tree, in the walk's order, and gives every hard
/// link its group's content.
fn fill(
    node: &mut Node,
    contents: &mut impl Iterator<Item = FileContent>,
    groups: &mut HashMap<u64, FileContent>,
) {
    match &mut node.body {
        Body::Dir(children) => {
            for child in children {
                fill(child, contents, groups);
            }
        }
        Body::File {
            content,
            link_group,
        } => {
            if let Some(shared) = link_group.and_then(|g| groups.get(&g)) {
                *content = shared.clone();
                return;
            }
            if *content == PENDING {
                *content = contents.next().expect("one content per job");
            }
            if let Some(group) = link_group {
                groups.insert(*group, content.clone());
            }
        }
        _ => {}
    }
}

/// The xattrs of what `handle` (a `/proc/self/fd` path) reaches; `path` names it in errors.
fn read_xattrs(handle: &Path, path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = match xattr::list_deref(handle) {
        Ok(names) => names,
        // Filesystems without xattr support hold none.
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list xattrs of", path)(e)),
    };
    let mut out = Vec::new();
    for name in names {
        if let Some(value) =
            xattr::get_deref(handle, &name).map_err(Error::io("read xattr of", path))?
        {
            out.push((name.as_bytes().to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}
