//! Lode's content-addressed filesystem.
//!
//! Trees are cut into blake3-addressed chunks ([`Chunking`]) that live in the registry, and
//! described by an [`Index`]: a compact, versioned binary map from each path to its metadata
//! and chunk list (format in `fs/FORMAT.md`). [`ingest`] turns a directory into chunks plus
//! an index, uploading only what the registry lacks; [`export`] turns an index back into an
//! identical tree. [`Mount`] serves an index read-only through FUSE, fetching chunks into a
//! bounded, verified [`ChunkCache`] on first read. A tree that must stay private where its
//! chunks are kept is ingested with a [`ChunkCipher`]: its chunks are sealed, and only a
//! mount given the key reads them.
//!
//! It must not run processes.
#![deny(missing_docs)]

mod build;
mod cache;
mod chunk;
mod cipher;
mod compare;
mod copy;
mod export;
pub mod index;
mod ingest;
mod layer;
mod mount;

pub use build::{Body, FileContent, Meta, Node, encode};
pub use cache::{
    CacheStats, ChunkCache, CompleteFile, FetchError, FileLayout, Pinned, Placement, Priority,
};
pub use chunk::Chunking;
pub use cipher::{ChunkCipher, OpenError, SEAL_OVERHEAD};
pub use compare::tree_differences;
pub use copy::{CopyReport, copy_image};
pub use export::{ExportReport, export};
pub use index::{Content, Entry, Index, IndexError, Kind};
pub use ingest::{DEFAULT_INLINE_MAX, IngestOptions, IngestReport, ingest};
pub use layer::{HostIds, ingest_layer};
pub use mount::{
    Mount, MountEntry, MountOptions, MountTable, is_stale_mount, mounts_under, profile_tag, unmount,
};

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Makes `dir` (and its missing parents) and sets it to mode 0700, also when it existed. For
/// directories that hold image trees or app sources: a setuid-root file inside one (made by a
/// build step, or ingested) must be out of every other host user's reach.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Errors from ingest, export and index handling; each names the path or blob involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Ingest needs a directory.
    #[error("{0} is not a directory; ingest takes the root directory of a tree")]
    NotADirectory(PathBuf),
    /// A file's size changed while it was read.
    #[error("{0} changed while it was being ingested; ingest a tree that is not being written")]
    Changed(PathBuf),
    /// Export writes only into a new or empty directory.
    #[error("{0} is not empty; export into a new or empty directory")]
    TargetNotEmpty(PathBuf),
    /// A chunk is not as long as the index says, so the index does not describe it.
    #[error(
        "{path}: chunk {digest} is {actual} bytes but the index says {expected}; the index is wrong"
    )]
    ChunkLength {
        /// The file being written.
        path: PathBuf,
        /// The chunk.
        digest: lode_registry::Digest,
        /// The length the index gives.
        expected: u32,
        /// The chunk's real length.
        actual: usize,
    },
    /// Another process holds the chunk cache.
    #[error(
        "chunk cache {0} is in use by another lode process (lode serve or lode fs mount); stop \
         it or pass a different --cache-dir"
    )]
    CacheBusy(PathBuf),
    /// The index's chunks are sealed, and this does not take a key.
    #[error(
        "image {0} is encrypted (a memory snapshot, say): its files are read only through a \
         mount given its key, never exported or built upon"
    )]
    Encrypted(lode_registry::Digest),
    /// The upload side of an ingest stopped; its own error says why.
    #[error("the upload stopped")]
    UploadStopped,
    /// The index is malformed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The registry refused or failed a call.
    #[error(transparent)]
    Registry(#[from] lode_registry::Error),
}

impl Error {
    /// Wraps an I/O error with what was being done and where.
    pub fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Checks index bytes for the registry, which stores indexes without knowing their format.
pub fn validate_index(bytes: &[u8]) -> Result<(), String> {
    Index::parse(bytes::Bytes::copy_from_slice(bytes))
        .map(|_| ())
        .map_err(|e| e.0)
}
