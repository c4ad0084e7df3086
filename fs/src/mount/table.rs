//! The host's table of image mounts: each image mounted once, under one directory, shared by
//! every container and function that runs on it, and cleared of a killed predecessor's.

use super::*;

/// Every image mounted once per host, under one directory (`<cache-dir>/mounts/<hex>`), shared
/// by everything that runs on it. The owner is `lode serve`; containers use these mounts as
/// their overlay lower layer.
pub struct MountTable {
    root: PathBuf,
    cache: Arc<ChunkCache>,
    registry: Arc<dyn BlobAccess>,
    options: MountOptions,
    /// By index and, for an encrypted one, the id of the key it was mounted with: a plain
    /// [`MountTable::mount`] never gets a mount that opens sealed chunks.
    mounts: tokio::sync::Mutex<HashMap<MountKey, Arc<Mount>>>,
}

/// An index, and the id of the key its chunks are opened with (none for a plain index).
type MountKey = (Digest, Option<[u8; 32]>);

impl std::fmt::Debug for MountTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountTable")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl MountTable {
    /// Creates `root` and clears mounts a killed predecessor left under it.
    pub fn new(
        root: &Path,
        cache: Arc<ChunkCache>,
        registry: Arc<dyn BlobAccess>,
        options: MountOptions,
    ) -> std::io::Result<Self> {
        crate::create_private_dir(root)?;
        abort_leftover_connections(root);
        for entry in std::fs::read_dir(root)?.flatten() {
            let path = entry.path();
            if is_stale_mount(&path) {
                tracing::warn!(mount = %path.display(), "clearing a stale mount");
                unmount(&path)?;
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            cache,
            registry,
            options,
            mounts: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The image's mount, mounting it on first use. An encrypted image is refused: see
    /// [`MountTable::mount_encrypted`].
    pub async fn mount(&self, digest: &Digest) -> crate::Result<Arc<Mount>> {
        self.mount_with(digest, None).await
    }

    /// The mount of an encrypted image, whose chunks `cipher` opens.
    pub async fn mount_encrypted(
        &self,
        digest: &Digest,
        cipher: Arc<ChunkCipher>,
    ) -> crate::Result<Arc<Mount>> {
        self.mount_with(digest, Some(cipher)).await
    }

    async fn mount_with(
        &self,
        digest: &Digest,
        cipher: Option<Arc<ChunkCipher>>,
    ) -> crate::Result<Arc<Mount>> {
        let key = (digest.clone(), cipher.as_ref().map(|c| c.id()));
        let mut mounts = self.mounts.lock().await;
        if let Some(mount) = mounts.get(&key) {
            return Ok(mount.clone());
        }
        let index = Index::parse(self.registry.get_index(digest).await?)?;
        if index.encrypted() && cipher.is_none() {
            return Err(crate::Error::Encrypted(digest.clone()));
        }
        let point = match &key.1 {
            // Apart from the image's plain mount, should it have both.
            Some(id) => self.root.join(format!(
                "{}-{}",
                digest.hex(),
                &blake3::Hash::from(*id).to_hex()[..16]
            )),
            None => self.root.join(digest.hex()),
        };
        std::fs::create_dir_all(&point).map_err(crate::Error::io("create directory", &point))?;
        let mount = Mount::new(
            index,
            self.cache.clone(),
            self.registry.clone(),
            &point,
            MountOptions {
                cipher,
                ..self.options.clone()
            },
        )
        .map_err(crate::Error::io("mount", &point))?;
        let mount = Arc::new(mount);
        mounts.insert(key, mount.clone());
        if let Some(after) = self.options.profile_after {
            record_profile_later(&mount, digest, after);
        }
        Ok(mount)
    }

    /// Digests mounted now.
    pub async fn mounted(&self) -> Vec<Digest> {
        self.mounts
            .lock()
            .await
            .keys()
            .map(|(digest, _)| digest.clone())
            .collect()
    }

    /// Saves every mount's access profile and unmounts them all (at shutdown).
    pub async fn close(&self) {
        let mounts: Vec<_> = self.mounts.lock().await.drain().collect();
        for ((digest, _), mount) in mounts {
            if let Err(error) = mount.save_profile().await {
                tracing::warn!(%digest, %error, "could not save the access profile");
            }
            // Dropping the last handle unmounts.
            drop(mount);
        }
    }
}

/// Saves `mount`'s access profile `after` it was mounted (unless the image has a longer one
/// already, from this host or another, or the mount is gone): the first start-up on any host
/// teaches every later mount what to prefetch.
fn record_profile_later(mount: &Arc<Mount>, index: &Digest, after: std::time::Duration) {
    let weak = Arc::downgrade(mount);
    let tag = profile_tag(index);
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let Some(mount) = weak.upgrade() else {
            return;
        };
        match mount.save_profile().await {
            Ok(files) => tracing::debug!(%tag, files, "access profile recorded"),
            Err(error) => tracing::warn!(%tag, %error, "could not save the access profile"),
        }
    });
}
