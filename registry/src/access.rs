//! One async face for "a registry": the stores in this process, or a remote one over gRPC.
//! Ingest, export and image copies are written once against it.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::tags::{LocalTagStore, TagStore, TagUpdate};
use crate::{BlobStore, Digest, Error, LocalDirStore, Result};

/// Checks that index bytes are a well-formed index before they are stored. The registry does
/// not know the index format; the `fs` crate does, and the host wires it in.
pub type IndexValidator = Arc<dyn Fn(&[u8]) -> std::result::Result<(), String> + Send + Sync>;

/// A registry's operations, as both [`RegistryStore`] and [`crate::RegistryClient`] offer them.
#[async_trait]
pub trait BlobAccess: Send + Sync {
    /// Where this registry is, for messages: a URL or a directory.
    fn location(&self) -> String;
    /// How many transfers callers should keep in flight at once.
    fn parallelism(&self) -> usize;
    /// The subset of `digests` the registry does not hold.
    async fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>>;
    /// Stores a blob whose digest the caller computed; returns whether it was present.
    async fn put_blob(&self, digest: &Digest, bytes: Bytes) -> Result<bool>;
    /// Fetches a whole blob, checked against its digest.
    async fn get_blob(&self, digest: &Digest) -> Result<Bytes>;
    /// Stores an index; returns whether it was present.
    async fn put_index(&self, digest: &Digest, bytes: Bytes) -> Result<bool>;
    /// Fetches an index, checked against its digest.
    async fn get_index(&self, digest: &Digest) -> Result<Bytes>;
    /// Where a tag points.
    async fn get_tag(&self, name: &str) -> Result<Digest>;
    /// Points a tag at a digest if `condition` holds; returns where it pointed before.
    async fn set_tag(
        &self,
        name: &str,
        digest: &Digest,
        condition: TagUpdate,
    ) -> Result<Option<Digest>>;
    /// Tags whose names start with `prefix`.
    async fn list_tags(&self, prefix: &str) -> Result<Vec<(String, Digest)>>;
}

/// The registry's stores in this process: blobs, indexes and tags. The gRPC service serves
/// one of these, and `lode serve` shares it with deploys.
#[derive(Clone)]
pub struct RegistryStore {
    /// File chunks, components and other blobs.
    pub blobs: Arc<dyn BlobStore>,
    /// Indexes, kept apart from blobs so they can be listed and collected on their own.
    pub indexes: Arc<dyn BlobStore>,
    /// Tags.
    pub tags: Arc<dyn TagStore>,
    /// Checks index bytes before they are stored, when set.
    pub validator: Option<IndexValidator>,
    location: String,
}

impl std::fmt::Debug for RegistryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryStore")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl RegistryStore {
    /// Opens the local-directory layout under `data_dir`: `blobs/`, `indexes/` and `tags/`.
    pub fn open_dir(data_dir: &Path, validator: Option<IndexValidator>) -> Result<Self> {
        Ok(Self {
            blobs: Arc::new(LocalDirStore::open(data_dir.join("blobs"))?),
            indexes: Arc::new(LocalDirStore::open(data_dir.join("indexes"))?),
            tags: Arc::new(LocalTagStore::open(data_dir.join("tags"))?),
            validator,
            location: data_dir.display().to_string(),
        })
    }

    /// A store of the given parts; `location` names it in messages.
    pub fn from_parts(
        blobs: Arc<dyn BlobStore>,
        indexes: Arc<dyn BlobStore>,
        tags: Arc<dyn TagStore>,
        validator: Option<IndexValidator>,
        location: String,
    ) -> Self {
        Self {
            blobs,
            indexes,
            tags,
            validator,
            location,
        }
    }

    /// A blob's size, without reading it.
    pub async fn blob_size(&self, digest: &Digest) -> Result<u64> {
        let (blobs, digest) = (self.blobs.clone(), digest.clone());
        blocking(move || blobs.size(&digest)).await
    }

    /// Verifies and stores an index (blocking).
    pub fn store_index(&self, digest: &Digest, bytes: &[u8]) -> Result<bool> {
        digest.verify(bytes)?;
        if let Some(validate) = &self.validator {
            validate(bytes).map_err(|reason| Error::InvalidIndex {
                digest: digest.clone(),
                reason,
            })?;
        }
        self.indexes.put_verified(digest, bytes)
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

#[async_trait]
impl BlobAccess for RegistryStore {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn parallelism(&self) -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }

    async fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let blobs = self.blobs.clone();
        let digests = digests.to_vec();
        blocking(move || {
            let mut missing = Vec::new();
            for digest in digests {
                if !blobs.has(&digest)? {
                    missing.push(digest);
                }
            }
            Ok(missing)
        })
        .await
    }

    async fn put_blob(&self, digest: &Digest, bytes: Bytes) -> Result<bool> {
        let (blobs, digest) = (self.blobs.clone(), digest.clone());
        blocking(move || blobs.put_verified(&digest, &bytes)).await
    }

    async fn get_blob(&self, digest: &Digest) -> Result<Bytes> {
        let (blobs, digest) = (self.blobs.clone(), digest.clone());
        blocking(move || blobs.get(&digest).map(Bytes::from)).await
    }

    async fn put_index(&self, digest: &Digest, bytes: Bytes) -> Result<bool> {
        let (store, digest) = (self.clone(), digest.clone());
        blocking(move || store.store_index(&digest, &bytes)).await
    }

    async fn get_index(&self, digest: &Digest) -> Result<Bytes> {
        let (indexes, digest) = (self.indexes.clone(), digest.clone());
        blocking(move || {
            indexes.get(&digest).map(Bytes::from).map_err(|e| match e {
                Error::NotFound(d) => Error::IndexNotFound(d),
                other => other,
            })
        })
        .await
    }

    async fn get_tag(&self, name: &str) -> Result<Digest> {
        let (tags, name) = (self.tags.clone(), name.to_string());
        blocking(move || tags.get(&name)).await
    }

    async fn set_tag(
        &self,
        name: &str,
        digest: &Digest,
        condition: TagUpdate,
    ) -> Result<Option<Digest>> {
        let (tags, name, digest) = (self.tags.clone(), name.to_string(), digest.clone());
        blocking(move || tags.set(&name, &digest, &condition)).await
    }

    async fn list_tags(&self, prefix: &str) -> Result<Vec<(String, Digest)>> {
        let (tags, prefix) = (self.tags.clone(), prefix.to_string());
        blocking(move || tags.list(&prefix)).await
    }
}
