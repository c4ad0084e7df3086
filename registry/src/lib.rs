//! Content-addressed blob storage for Lode.
//!
//! This crate owns where bytes live once they are named by their blake3 digest: the
//! [`BlobStore`] trait, which every other crate goes through, and its backends. The local
//! directory backend ([`LocalDirStore`]) is the default; an S3-compatible backend and the
//! gRPC service that hosts fetch from build on the same trait.
//!
//! It must not know about containers or Wasm: a blob is only bytes and a digest.
//!
//! ```no_run
//! use lode_registry::{BlobStore, Digest, LocalDirStore};
//! let store = LocalDirStore::open("/var/lib/lode/blobs")?;
//! let digest = store.put(b"hello")?;
//! assert_eq!(store.get(&digest)?, b"hello");
//! # Ok::<(), lode_registry::Error>(())
//! ```
#![deny(missing_docs)]

mod digest;
mod local;

pub use digest::Digest;
pub use local::LocalDirStore;

use std::io;
use std::path::PathBuf;

/// Errors from blob storage. Each names the blob or path involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The text is not a blake3 digest in the form `blake3:<64 hex>`.
    #[error("invalid digest {0:?}: expected \"blake3:\" followed by 64 lowercase hex characters")]
    InvalidDigest(String),
    /// The store holds no blob with this digest.
    #[error("blob {0} not found")]
    NotFound(Digest),
    /// Bytes offered under a digest hash to something else; nothing was stored.
    #[error("digest mismatch: expected {expected}, content hashes to {actual}")]
    DigestMismatch {
        /// The digest the caller claimed.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where blobs live, keyed by the blake3 digest of their content.
///
/// Writes are idempotent (the same bytes always land under the same name) and durable once
/// they return: a crash never leaves a partial blob under a valid digest.
pub trait BlobStore: Send + Sync + 'static {
    /// Stores `bytes` and returns their digest. Storing bytes already present is a no-op.
    fn put(&self, bytes: &[u8]) -> Result<Digest>;

    /// Stores `bytes` only if they hash to `expected`; otherwise stores nothing.
    fn put_verified(&self, expected: &Digest, bytes: &[u8]) -> Result<()> {
        let actual = Digest::of(bytes);
        if &actual != expected {
            return Err(Error::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        self.put(bytes).map(|_| ())
    }

    /// Reads a whole blob.
    fn get(&self, digest: &Digest) -> Result<Vec<u8>>;

    /// Whether the blob is present.
    fn has(&self, digest: &Digest) -> Result<bool>;

    /// The blob's size in bytes.
    fn size(&self, digest: &Digest) -> Result<u64>;

    /// A local file holding the blob, when the backend keeps one; callers can then mmap it
    /// instead of copying. Remote backends return `None`.
    fn local_path(&self, digest: &Digest) -> Option<PathBuf>;
}
