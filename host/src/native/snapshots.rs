//! Memory snapshots of Python function containers (`enable_memory_snapshot`).
//!
//! The first cold start of such a function saves its container with CRIU once the module has
//! loaded, and goes on serving; later cold starts restore that container instead of starting
//! Python and importing again. A snapshot is keyed by everything its memory was made from:
//! the image, the app's code, the SDK, the function and its settings, the environment with
//! its secret values, and CRIU, the kernel and Lode themselves. So a snapshot taken with one
//! image, code or secret set is never restored with another.
//!
//! Snapshots live under `<cache-dir>/snapshots/<key>` and, once taken, are stored in the
//! registry, so another host sharing it restores them without taking its own, through a lazy
//! mount, and keeps a copy for its next starts. What the registry holds is made with keys
//! derived from the secrets key ([`SnapshotKeys`]), so only hosts that share that key can use
//! it:
//! - its chunks are encrypted, and so are the chunk cache's copies: a snapshot holds the
//!   process's memory, secret values included;
//! - its tags (`snapshot/<name>`, `snapshot-seal/<name>`) are named by a keyed hash of the
//!   key, which itself hashes secret values;
//! - it is restored only with a seal over its index: CRIU restores as root whatever a
//!   snapshot says, credentials included.
//!
//! A snapshot that fails to restore is dropped here and taken again.

use prometheus_client::metrics::counter::Counter;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lode_native_runner::agent::SnapshotMode;
use lode_native_runner::sandbox::{Criu, DumpReport};
use lode_registry::{BlobAccess, TagUpdate};

use crate::store::secrets::SnapshotKeys;

/// Names the function a snapshot directory belongs to (`app/function`).
const OWNER_FILE: &str = "lode-owner";

/// Counts in `/metrics`.
#[derive(Debug, Default)]
pub struct SnapshotStats {
    /// Snapshots saved.
    pub taken: Counter,
    /// Containers started from a snapshot.
    pub restored: Counter,
    /// Saves or restores that failed (the container started without).
    pub failed: Counter,
}

/// The server's snapshots.
pub struct Snapshots {
    dir: PathBuf,
    criu: Result<Criu, String>,
    registry: Arc<dyn BlobAccess>,
    /// What every key includes besides the function: CRIU's version, the kernel, Lode's.
    environment: String,
    /// Keys whose snapshot failed to restore here: taken again rather than fetched again.
    broken: Mutex<HashSet<String>>,
    /// Seals snapshots stored in the registry and names their tags (see [`Snapshots::seal`]).
    seal_key: [u8; 32],
    /// Encrypts their chunks.
    cipher: Arc<lode_fs::ChunkCipher>,
    /// Where a snapshot only the registry has is mounted lazily from.
    mounts: Arc<lode_fs::MountTable>,
    /// Whether snapshots go to the registry (`lode serve --share-memory-snapshots=false`
    /// keeps them on this host).
    share: bool,
    /// Counters.
    pub stats: SnapshotStats,
}

/// What a function's snapshot is made from.
pub struct KeyParts<'a> {
    /// The app and the function.
    pub app: &'a str,
    /// The function.
    pub function: &'a str,
    /// The module the agent imports.
    pub module: &'a str,
    /// The image's index digest.
    pub image: &'a lode_registry::Digest,
    /// The app's code directory (named by the code's digest).
    pub app_dir: &'a Path,
    /// The SDK directory (named by its digest).
    pub sdk_dir: &'a Path,
    /// The container's environment, secret values included.
    pub env: &'a [(String, String)],
    /// Inputs served at once (the agent reads it at start).
    pub concurrency: u32,
}

impl Snapshots {
    /// Snapshots under `dir`; CRIU is looked for once, and its absence is kept as the reason
    /// functions start without.
    pub fn new(
        dir: PathBuf,
        registry: Arc<dyn BlobAccess>,
        keys: SnapshotKeys,
        mounts: Arc<lode_fs::MountTable>,
        share: bool,
    ) -> Self {
        // A snapshot holds a process's memory, secrets included: Lode's alone, or none.
        let private = lode_fs::create_private_dir(&dir).map_err(|e| {
            format!(
                "the snapshot directory {} cannot be made private: {e}",
                dir.display()
            )
        });
        // Partial snapshots a killed server left.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().contains('.') {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let criu = private.and_then(|()| Criu::locate().map_err(|e| e.to_string()));
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let environment = format!(
            "criu {}; kernel {}; lode {}",
            criu.as_ref().map_or("-", |c| c.version()),
            kernel.trim(),
            env!("CARGO_PKG_VERSION")
        );
        Self {
            dir,
            criu,
            registry,
            environment,
            broken: Mutex::new(HashSet::new()),
            seal_key: keys.seal,
            cipher: Arc::new(lode_fs::ChunkCipher::new(&keys.cipher)),
            mounts,
            share,
            stats: SnapshotStats::default(),
        }
    }

    /// The key of a function's snapshot: a blake3 over every part, hex.
    pub fn key(&self, parts: &KeyParts<'_>) -> String {
        let mut hasher = blake3::Hasher::new();
        let mut field = |bytes: &[u8]| {
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        field(b"lode memory snapshot 1");
        field(self.environment.as_bytes());
        field(parts.app.as_bytes());
        field(parts.function.as_bytes());
        field(parts.module.as_bytes());
        field(parts.image.as_bytes());
        for dir in [parts.app_dir, parts.sdk_dir] {
            field(dir.file_name().unwrap_or_default().as_encoded_bytes());
        }
        let mut env: Vec<_> = parts.env.iter().collect();
        env.sort();
        for (name, value) in env {
            field(name.as_bytes());
            field(value.as_bytes());
        }
        field(&parts.concurrency.to_le_bytes());
        hasher.finalize().to_hex().to_string()
    }

    fn tag(&self, key: &str) -> String {
        format!("snapshot/{}", registry_name(&self.seal_key, key))
    }

    fn seal_tag(&self, key: &str) -> String {
        format!("snapshot-seal/{}", registry_name(&self.seal_key, key))
    }

    /// What proves a snapshot in the registry was stored by a host holding the secrets key:
    /// CRIU restores, as root, whatever a snapshot says (credentials included), so one that
    /// anyone who can write to the registry made must never be restored.
    fn seal(&self, key: &str, index: &lode_registry::Digest) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new_keyed(&self.seal_key);
        hasher.update(key.as_bytes());
        hasher.update(index.as_bytes());
        hasher.finalize()
    }

    /// How a container of the function keyed `key` starts: from its snapshot (here, or
    /// fetched from the registry), or taking one. `Err` says why it cannot have one (no
    /// CRIU); it then starts as usual.
    pub async fn mode(&self, key: &str) -> Result<SnapshotMode, String> {
        let criu = self.criu.clone()?;
        let images = self.dir.join(key);
        let broken = self.broken.lock().unwrap().contains(key);
        if !broken {
            if images.is_dir() {
                return Ok(SnapshotMode::Restore { criu, images });
            }
            if self.share
                && let Ok(digest) = self.registry.get_tag(&self.tag(key)).await
            {
                match self.mount(key, &digest).await {
                    Ok(images) => return Ok(SnapshotMode::Restore { criu, images }),
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "snapshot in the registry unusable; taking one")
                    }
                }
            }
        }
        let taking = self
            .dir
            .join(format!("{key}.taking-{:016x}", rand::random::<u64>()));
        Ok(SnapshotMode::Take {
            criu,
            images: taking,
        })
    }

    /// Mounts the snapshot indexed `digest` (its chunks fetched from the registry and opened
    /// as CRIU reads them, and all prefetched), once its seal checks; returns where.
    async fn mount(&self, key: &str, digest: &lode_registry::Digest) -> anyhow::Result<PathBuf> {
        let sealed = self.registry.get_tag(&self.seal_tag(key)).await?;
        let seal = self.registry.get_blob(&sealed).await?;
        // blake3's Hash compares in constant time.
        let stored = <[u8; 32]>::try_from(&seal[..]).ok().map(blake3::Hash::from);
        if stored != Some(self.seal(key, digest)) {
            anyhow::bail!("its seal does not match this server's secrets key; not restored");
        }
        let mount = self
            .mounts
            .mount_encrypted(digest, self.cipher.clone())
            .await?;
        // CRIU reads nearly all of it.
        mount.prefetch_all();
        Ok(mount.mountpoint().to_path_buf())
    }

    /// After a start in `mode`: keeps a snapshot just taken (and stores it in the registry
    /// in the background), or drops one that failed.
    pub fn started(
        self: &Arc<Self>,
        key: &str,
        owner: &str,
        mode: &SnapshotMode,
        taken: Option<Result<DumpReport, String>>,
    ) {
        match (mode, taken) {
            (SnapshotMode::Restore { images, .. }, _) => {
                self.stats.restored.inc();
                if !images.starts_with(&self.dir) {
                    self.keep_copy(key, owner, images);
                }
            }
            (SnapshotMode::Take { images, .. }, Some(Ok(report))) => {
                self.stats.taken.inc();
                let kept = self.dir.join(key);
                self.broken.lock().unwrap().remove(key);
                let _ = std::fs::write(images.join(OWNER_FILE), owner);
                self.drop_older(key, owner);
                if kept.exists() {
                    // Another start saved one first; others may be restoring from it.
                    let _ = std::fs::remove_dir_all(images);
                    return;
                }
                if let Err(e) = std::fs::rename(images, &kept) {
                    tracing::warn!(%key, error = %e, "could not keep the snapshot");
                    let _ = std::fs::remove_dir_all(images);
                    return;
                }
                tracing::info!(%key, bytes = report.bytes, took = ?report.took, "memory snapshot taken");
                if !self.share {
                    return;
                }
                let this = self.clone();
                let key = key.to_string();
                tokio::spawn(async move {
                    if let Err(e) = this.store(&key, &kept).await {
                        tracing::warn!(%key, error = %e, "snapshot not stored in the registry; this host keeps it");
                    }
                });
            }
            (SnapshotMode::Take { images, .. }, _) => {
                self.stats.failed.inc();
                let _ = std::fs::remove_dir_all(images);
            }
            (SnapshotMode::Off, _) => {}
        }
    }

    /// After a restore from the registry's copy (mounted at `mounted`), copies it here in
    /// the background, so this host's later starts restore from its own disk instead of
    /// through the mount. Made private like a snapshot taken here; synced before it is named.
    fn keep_copy(self: &Arc<Self>, key: &str, owner: &str, mounted: &Path) {
        let (this, key, owner) = (self.clone(), key.to_string(), owner.to_string());
        let mounted = mounted.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let kept = this.dir.join(&key);
            if kept.exists() {
                return;
            }
            let copying = this
                .dir
                .join(format!("{key}.copying-{:016x}", rand::random::<u64>()));
            let copied = crate::util::copy_tree(&mounted, &copying)
                .and_then(|()| std::fs::write(copying.join(OWNER_FILE), &owner))
                .and_then(|()| {
                    let dir = std::fs::File::open(&copying)?;
                    rustix::fs::syncfs(&dir).map_err(std::io::Error::from)
                })
                .and_then(|()| std::fs::rename(&copying, &kept));
            match copied {
                Ok(()) => {
                    this.drop_older(&key, &owner);
                    tracing::info!(%key, "the registry's memory snapshot is kept on this host too");
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&copying);
                    // A start restoring at the same time may have kept it first.
                    if !kept.exists() {
                        tracing::warn!(%key, error = %e, "could not keep a copy of the registry's snapshot; restores go on through the mount");
                    }
                }
            }
        });
    }

    /// Removes the function's snapshots other than `key`'s: made from an older image, code
    /// or secret, they are never restored again.
    fn drop_older(&self, key: &str, owner: &str) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let stale = name.to_str().is_some_and(|n| n != key && !n.contains('.'))
                && std::fs::read_to_string(path.join(OWNER_FILE)).is_ok_and(|o| o == owner);
            if stale {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }

    /// A container that was to be saved did not start; it starts again without.
    pub fn failed_take(&self, function: &str, mode: &SnapshotMode, why: &str) {
        self.stats.failed.inc();
        if let SnapshotMode::Take { images, .. } = mode {
            let _ = std::fs::remove_dir_all(images);
        }
        tracing::warn!(%function, error = %why, "could not start a container to snapshot; starting without a memory snapshot");
    }

    /// A restore from `key`'s snapshot failed: it is dropped, and the next start takes one.
    pub fn failed_restore(&self, key: &str, why: &str) {
        self.stats.failed.inc();
        tracing::warn!(%key, error = %why, "restoring the memory snapshot failed; starting without it, and taking a new one");
        self.broken.lock().unwrap().insert(key.to_string());
        let _ = std::fs::remove_dir_all(self.dir.join(key));
    }

    async fn store(&self, key: &str, images: &Path) -> anyhow::Result<()> {
        let options = lode_fs::IngestOptions {
            cipher: Some(self.cipher.clone()),
            ..Default::default()
        };
        let report = lode_fs::ingest(images, self.registry.clone(), options).await?;
        let digest = report
            .digest
            .ok_or_else(|| anyhow::anyhow!("ingest named no index"))?;
        let seal = bytes::Bytes::copy_from_slice(self.seal(key, &digest).as_bytes());
        let sealed = lode_registry::Digest::of(&seal);
        self.registry.put_blob(&sealed, seal).await?;
        self.registry
            .set_tag(&self.seal_tag(key), &sealed, TagUpdate::Always)
            .await?;
        self.registry
            .set_tag(&self.tag(key), &digest, TagUpdate::Always)
            .await?;
        Ok(())
    }
}

/// The name a snapshot's tags have in the registry: a keyed hash of its key, which hashes
/// secret values (a guessable one could be found from the key by trying).
pub fn registry_name(seal_key: &[u8; 32], key: &str) -> String {
    blake3::keyed_hash(seal_key, key.as_bytes())
        .to_hex()
        .to_string()
}
