//! Working ahead of readers: the access profile a mount records (which files a start-up read,
//! in order) and stores for later mounts, its prefetch, and read-ahead after sequential reads.

use super::*;

/// Chunks worked ahead of a sequential reader: fetched if missing, read ahead from disk if
/// cached. Eight average chunks are 2 MiB, two FUSE requests.
const READ_AHEAD_CHUNKS: usize = 8;

/// The tag under which an image's access profile is stored.
pub fn profile_tag(index: &Digest) -> String {
    format!("profile/{}", index.hex())
}

const PROFILE_MAGIC: &[u8; 8] = b"LODEPRF1";

/// The order in which files were first read during a mount.
#[derive(Debug, Default)]
pub(super) struct Profile {
    pub(super) seen: Vec<bool>,
    pub(super) order: Vec<u32>,
}

impl Mount {
    /// The entry ids in the order files were first read.
    pub fn profile(&self) -> Vec<u32> {
        self.image
            .profile
            .lock()
            .expect("not poisoned")
            .order
            .clone()
    }

    /// Stores the access profile as a blob tagged `profile/<index digest>`, so the next
    /// mount on an empty cache can prefetch in that order. Returns how many files it holds.
    /// A profile no longer than the one recorded already (from this host or another) is not
    /// stored: a mount that read little (or nothing) must not replace what a full start-up
    /// taught.
    pub async fn save_profile(&self) -> lode_registry::Result<usize> {
        let order = self.profile();
        let tag = profile_tag(self.image.index.digest());
        let registry = &self.image.registry;
        if let Ok(kept) = registry.get_tag(&tag).await {
            let files = match registry.get_blob(&kept).await {
                Ok(bytes) => bytes.len().saturating_sub(PROFILE_MAGIC.len()) / 4,
                Err(_) => 0,
            };
            if files >= order.len() {
                return Ok(files);
            }
        } else if order.is_empty() {
            return Ok(0);
        }
        let mut bytes = PROFILE_MAGIC.to_vec();
        for id in &order {
            bytes.extend_from_slice(&id.to_le_bytes());
        }
        let digest = Digest::of(&bytes);
        registry.put_blob(&digest, Bytes::from(bytes)).await?;
        registry.set_tag(&tag, &digest, TagUpdate::Always).await?;
        Ok(order.len())
    }

    /// Fetches every file's chunks not cached yet, in the background: for an image whose
    /// reader reads nearly all of it (CRIU restoring a memory snapshot), so its reads find the
    /// chunks fetched, or in flight, instead of fetching one after another.
    pub fn prefetch_all(&self) {
        let image = self.image.clone();
        let ids = 0..image.index.len() as u32;
        self.image.runtime.spawn(async move {
            let count = image.clone().prefetch_files(ids).await;
            tracing::debug!(index = %image.index.digest(), count, "whole-image prefetch done");
        });
    }
}

impl Image {
    pub(super) fn record_first_read(&self, id: u32) {
        let mut profile = self.profile.lock().expect("not poisoned");
        if let Some(seen) = profile.seen.get_mut(id as usize)
            && !*seen
        {
            *seen = true;
            profile.order.push(id);
        }
    }

    /// After a sequential read, fetches the next chunks in the background.
    pub(super) fn read_ahead(
        self: &Arc<Self>,
        id: u32,
        chunks: &[RawChunk],
        layout: Option<&Arc<FileLayout>>,
        end: u64,
    ) {
        let sequential = {
            let mut last = self.last_end.lock().expect("not poisoned");
            let previous = last.insert(id, end);
            previous.is_some()
        };
        if !sequential {
            return;
        }
        let next = chunks.partition_point(|c| c.offset() < end);
        let mut ahead = Vec::new();
        for chunk in chunks[next..].iter().take(READ_AHEAD_CHUNKS) {
            let digest = chunk.digest();
            let placement = placement(layout.map(|l| &**l), chunk);
            match self.cache.pin_placed(&digest, placement) {
                Some(cached) => cached.will_need(),
                None => ahead.push((digest, chunk.offset())),
            }
        }
        for (digest, offset) in ahead {
            let image = self.clone();
            let layout = layout.cloned();
            self.runtime.spawn(async move {
                image.fetch_placed(digest, layout, offset).await;
            });
        }
    }

    /// Fetches, in the background, the chunks of the files a recorded profile lists, in
    /// order and a few at a time. Foreground reads do not wait behind it.
    pub(super) fn start_prefetch(self: Arc<Self>) {
        let runtime = self.runtime.clone();
        runtime.spawn(async move {
            let tag = profile_tag(self.index.digest());
            let Ok(digest) = self.registry.get_tag(&tag).await else {
                return;
            };
            let Ok(bytes) = self.registry.get_blob(&digest).await else {
                tracing::warn!(%tag, "access profile unreadable; no prefetch");
                return;
            };
            let Some(ids) = bytes.strip_prefix(PROFILE_MAGIC) else {
                tracing::warn!(%tag, "access profile has an unknown format; no prefetch");
                return;
            };
            let ids = ids
                .chunks_exact(4)
                .map(|id| u32::from_le_bytes(id.try_into().expect("4 bytes")));
            let count = self.clone().prefetch_files(ids).await;
            tracing::debug!(%tag, count, "prefetch done");
        });
    }

    /// Fetches the chunks of the files `ids` names (in that order, a few at a time) that are
    /// not cached yet; returns how many chunks it went through.
    async fn prefetch_files(self: Arc<Self>, ids: impl Iterator<Item = u32>) -> usize {
        let mut chunks = Vec::new();
        for id in ids {
            if (id as usize) >= self.index.len() {
                continue;
            }
            let entry = self.index.entry(id);
            if let Some(Content::Chunks(list)) = entry.content() {
                let layout = self.layout(&entry);
                chunks.extend(
                    list.iter()
                        .map(|c| (c.digest(), layout.clone(), c.offset())),
                );
            }
        }
        let count = chunks.len();
        use futures::StreamExt;
        futures::stream::iter(chunks)
            .for_each_concurrent(
                self.options.prefetch_parallelism.max(1),
                |(digest, layout, offset)| self.clone().fetch_placed(digest, layout, offset),
            )
            .await;
        count
    }

    /// Works ahead of a reader: the chunk into the cache where its file wants it.
    async fn fetch_placed(
        self: Arc<Self>,
        digest: Digest,
        layout: Option<Arc<FileLayout>>,
        offset: u64,
    ) {
        let placement = match &layout {
            Some(layout) => Placement::File { layout, offset },
            None => Placement::Packed,
        };
        if self.cache.pin_placed(&digest, placement).is_some() {
            return;
        }
        let _ = self
            .cache
            .get_placed(
                self.registry.as_ref(),
                &digest,
                self.options.fetch_timeout,
                Priority::Background,
                placement,
            )
            .await;
    }
}
