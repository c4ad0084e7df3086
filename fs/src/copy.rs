//! Copying an image between registries: chunks the destination lacks, then the index.

use futures::StreamExt;
use lode_registry::{BlobAccess, Digest};

use crate::Result;
use crate::index::Index;

/// What a copy moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Chunks the image uses.
    pub chunks: u64,
    /// Chunks the destination lacked and received.
    pub copied_chunks: u64,
    /// Bytes in those chunks.
    pub copied_bytes: u64,
}

/// Copies the image `digest` from `source` to `dest`. Every chunk is checked against its
/// digest on the way, and the index goes last, so the destination never holds an index
/// whose chunks it lacks.
pub async fn copy_image(
    source: &dyn BlobAccess,
    dest: &dyn BlobAccess,
    digest: &Digest,
) -> Result<CopyReport> {
    let bytes = source.get_index(digest).await?;
    let index = Index::parse(bytes.clone())?;
    let chunks = index.chunk_digests();
    let missing = dest.missing(&chunks).await?;
    let mut report = CopyReport {
        chunks: chunks.len() as u64,
        copied_chunks: missing.len() as u64,
        ..Default::default()
    };
    let parallelism = source.parallelism().min(dest.parallelism()).max(1);
    let mut copies = futures::stream::iter(missing.iter().map(|chunk| async move {
        let data = source.get_blob(chunk).await?;
        let len = data.len() as u64;
        dest.put_blob(chunk, data).await?;
        Ok::<_, crate::Error>(len)
    }))
    .buffer_unordered(parallelism);
    while let Some(copied) = copies.next().await {
        report.copied_bytes += copied?;
    }
    dest.put_index(digest, bytes).await?;
    Ok(report)
}
