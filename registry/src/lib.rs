//! Content-addressed blob storage for Lode, and the gRPC registry that serves it.
//!
//! This crate owns where bytes live once they are named by their blake3 digest:
//! - the [`BlobStore`] trait, which every other crate goes through, and its local directory
//!   backend ([`LocalDirStore`]), the default;
//! - [`TagStore`]: names that point at index digests, updated atomically with
//!   compare-and-swap;
//! - [`RegistryService`], the tonic service (`registry/proto/`) that hosts fetch from, and
//!   [`RegistryClient`], which reuses connections, retries transient errors, bounds parallel
//!   fetches and checks the digest of every blob it receives.
//!
//! An S3-compatible backend slots in behind the same two traits (the `object_store` crate's
//! conditional puts cover tag compare-and-swap); only the local directory exists today.
//!
//! It must not know about containers, Wasm or the index format: a blob is only bytes and a
//! digest. Hosts that know the index format pass a validator to the service.
//!
//! ```no_run
//! use lode_registry::{BlobStore, Digest, LocalDirStore};
//! let store = LocalDirStore::open("/var/lib/lode/blobs")?;
//! let digest = store.put(b"hello")?;
//! assert_eq!(store.get(&digest)?, b"hello");
//! # Ok::<(), lode_registry::Error>(())
//! ```
#![deny(missing_docs)]

mod access;
mod client;
mod digest;
mod local;
mod s3;
mod server;
mod tags;

/// Generated protobuf and tonic types for `lode.registry.v1`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("lode.registry.v1");
}

pub use access::{BlobAccess, IndexValidator, RegistryStore};
pub use client::{ClientOptions, RegistryClient};
pub use digest::Digest;
pub use local::LocalDirStore;
pub use s3::{S3BlobStore, S3Bucket};
pub use server::{RegistryService, ServiceOptions};
pub use tags::{LocalTagStore, TagStore, TagUpdate, check_update, validate_tag_name};

use std::io;
use std::path::PathBuf;

/// Errors from blob storage and the registry. Each names the blob, tag or path involved.
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
    /// A stored blob no longer hashes to its name (disk corruption). It was moved aside and
    /// is reported missing from now on, so uploading it again repairs the store.
    #[error(
        "blob {digest} is corrupt on disk (its content hashes to {actual}); it was quarantined \
         and must be uploaded again"
    )]
    Corrupt {
        /// The blob's name.
        digest: Digest,
        /// What its bytes hash to now.
        actual: Digest,
    },
    /// The registry holds no index with this digest.
    #[error("index {0} not found; ingest or push the image first")]
    IndexNotFound(Digest),
    /// Bytes offered as an index are not a well-formed index; nothing was stored.
    #[error("index {digest} is not a valid Lode index: {reason}")]
    InvalidIndex {
        /// The index's digest.
        digest: Digest,
        /// What is wrong with it.
        reason: String,
    },
    /// A tag name that is empty, too long, or not made of `[A-Za-z0-9._:@+-]` segments
    /// separated by `/`.
    #[error("invalid tag name {name:?}: {reason}")]
    InvalidTag {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No tag with this name.
    #[error("tag {0:?} not found")]
    TagNotFound(String),
    /// A compare-and-swap tag update lost: the tag moved since the caller read it.
    #[error(
        "tag {name:?} was not updated: expected it to point at {}, but it points at {}",
        expected.as_ref().map_or("nothing".to_string(), Digest::to_string),
        actual.as_ref().map_or("nothing".to_string(), Digest::to_string)
    )]
    TagConflict {
        /// The tag.
        name: String,
        /// Where the caller expected it to point (`None`: absent).
        expected: Option<Digest>,
        /// Where it points (`None`: absent).
        actual: Option<Digest>,
    },
    /// A blob or message over a configured limit.
    #[error("{what} of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
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
    /// A shared store (S3, PostgreSQL) failed or cannot be reached, or its URL is not usable.
    #[error("{location}: {message}")]
    Unavailable {
        /// The store's URL.
        location: String,
        /// What failed.
        message: String,
    },
    /// A call to a remote registry failed.
    #[error("registry {url}: {op} failed: {message}")]
    Remote {
        /// The registry's URL.
        url: String,
        /// The call.
        op: &'static str,
        /// The gRPC status code.
        code: tonic::Code,
        /// The server's message, or the transport error.
        message: String,
    },
}

/// HTTP/2 flow-control windows. The 64 KiB default stalls a 1 MiB chunk on round trips
/// for window updates; these let several chunks stream at once.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where blobs live, keyed by the blake3 digest of their content.
///
/// Writes are idempotent (the same bytes always land under the same name) and durable once
/// they return: a crash never leaves a partial blob under a valid digest. Reads verify the
/// digest, so corruption is reported and never served.
pub trait BlobStore: Send + Sync + 'static {
    /// Stores `bytes` and returns their digest. Storing bytes already present is a no-op.
    fn put(&self, bytes: &[u8]) -> Result<Digest>;

    /// Stores `bytes` only if they hash to `expected`; otherwise stores nothing. Returns
    /// whether the blob was already present.
    fn put_verified(&self, expected: &Digest, bytes: &[u8]) -> Result<bool> {
        expected.verify(bytes)?;
        let existed = self.has(expected)?;
        if !existed {
            self.put(bytes)?;
        }
        Ok(existed)
    }

    /// Reads a whole blob and checks it against its digest.
    fn get(&self, digest: &Digest) -> Result<Vec<u8>>;

    /// Whether the blob is present.
    fn has(&self, digest: &Digest) -> Result<bool>;

    /// The blob's size in bytes.
    fn size(&self, digest: &Digest) -> Result<u64>;

    /// A local file holding the blob, when the backend keeps one; callers can then mmap it
    /// instead of copying. Remote backends return `None`.
    fn local_path(&self, digest: &Digest) -> Option<PathBuf>;
}
