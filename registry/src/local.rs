//! The local-directory backend: one file per blob, sharded by digest.
//!
//! Layout: `<root>/blake3/<first two hex>/<full hex>`, with writes staged under `<root>/tmp/`.
//! Two hex characters give 256 shards, which keeps directories small up to millions of blobs.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::{BlobStore, Digest, Error, Result};

/// Blobs as files under one directory; the default [`BlobStore`].
#[derive(Debug, Clone)]
pub struct LocalDirStore {
    root: PathBuf,
}

pub(crate) fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl LocalDirStore {
    /// Opens (creating if needed) a store rooted at `root`, and clears staging files that a
    /// crash may have left behind.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let tmp = root.join("tmp");
        fs::create_dir_all(root.join("blake3")).map_err(io_err("create directory", &root))?;
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err("clear staging directory", &tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io_err("create directory", &tmp))?;
        Ok(Self { root })
    }

    /// The directory this store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with `digest` lives (whether or not it exists yet).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join("blake3").join(&hex[..2]).join(hex)
    }

    /// Moves a corrupt blob out of the way, so `has` reports it missing and a client's next
    /// upload replaces it. The bytes are kept under `corrupt/` for inspection.
    fn quarantine(&self, digest: &Digest, path: &Path) {
        let dir = self.root.join("corrupt");
        let dest = dir.join(digest.hex());
        let moved = fs::create_dir_all(&dir).and_then(|()| fs::rename(path, &dest));
        match moved {
            Ok(()) => tracing::error!(%digest, kept = %dest.display(), "corrupt blob quarantined"),
            Err(error) => {
                tracing::error!(%digest, %error, "corrupt blob could not be moved; removing it");
                let _ = fs::remove_file(path);
            }
        }
    }

    /// Keeps a copy of bytes already checked against `digest` whose original lives
    /// elsewhere: written whole (a rename), but not flushed, as a crash can only cost a copy
    /// that is fetched again (a torn one fails its digest check and is replaced).
    pub fn keep_copy(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        let dest = self.blob_path(digest);
        if dest.exists() {
            return Ok(());
        }
        self.write_atomically(&dest, bytes, false)
    }

    /// Forgets a copy (one that failed its digest check).
    pub fn forget(&self, digest: &Digest) {
        let _ = fs::remove_file(self.blob_path(digest));
    }

    /// Writes `bytes` to `dest` through a temporary file and a rename; `durable` also
    /// flushes the file and the directory entries, so the blob survives a crash.
    fn write_atomically(&self, dest: &Path, bytes: &[u8], durable: bool) -> Result<()> {
        let shard = dest.parent().expect("blob paths have a shard directory");
        if !shard.exists() {
            fs::create_dir_all(shard).map_err(io_err("create directory", shard))?;
            // The new shard's entry must be durable before blobs in it are.
            let top = shard.parent().expect("shards live under blake3/");
            if durable {
                File::open(top)
                    .and_then(|dir| dir.sync_all())
                    .map_err(io_err("fsync directory", top))?;
            }
        }
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{:016x}", rand::random::<u64>()));
        let result = (|| {
            let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
            file.write_all(bytes).map_err(io_err("write", &tmp))?;
            if durable {
                file.sync_all().map_err(io_err("fsync", &tmp))?;
            }
            fs::rename(&tmp, dest).map_err(io_err("rename into place", dest))?;
            if !durable {
                return Ok(());
            }
            // The rename is durable only once the directory entry is.
            File::open(shard)
                .and_then(|dir| dir.sync_all())
                .map_err(io_err("fsync directory", shard))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

impl BlobStore for LocalDirStore {
    fn put(&self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        let dest = self.blob_path(&digest);
        if !dest.exists() {
            self.write_atomically(&dest, bytes, true)?;
        }
        Ok(digest)
    }

    /// Hashes once (the default would hash again in `put`).
    fn put_verified(&self, expected: &Digest, bytes: &[u8]) -> Result<bool> {
        expected.verify(bytes)?;
        let dest = self.blob_path(expected);
        if dest.exists() {
            return Ok(true);
        }
        self.write_atomically(&dest, bytes, true)?;
        Ok(false)
    }

    fn get(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let bytes = fs::read(&path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => Error::NotFound(digest.clone()),
            _ => Error::Io {
                op: "read",
                path: path.clone(),
                source,
            },
        })?;
        let actual = Digest::of(&bytes);
        if &actual != digest {
            self.quarantine(digest, &path);
            return Err(Error::Corrupt {
                digest: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    fn has(&self, digest: &Digest) -> Result<bool> {
        let path = self.blob_path(digest);
        path.try_exists().map_err(io_err("stat", &path))
    }

    fn size(&self, digest: &Digest) -> Result<u64> {
        let path = self.blob_path(digest);
        match fs::metadata(&path) {
            Ok(meta) => Ok(meta.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::NotFound(digest.clone())),
            Err(source) => Err(Error::Io {
                op: "stat",
                path,
                source,
            }),
        }
    }

    fn local_path(&self, digest: &Digest) -> Option<PathBuf> {
        Some(self.blob_path(digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_by_digest_in_shards() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::open(dir.path()).unwrap();
        let digest = store.put(b"component bytes").unwrap();
        assert_eq!(digest, Digest::of(b"component bytes"));
        let hex = digest.hex();
        let expected = dir.path().join("blake3").join(&hex[..2]).join(&hex);
        assert_eq!(store.local_path(&digest).unwrap(), expected);
        assert_eq!(fs::read(expected).unwrap(), b"component bytes");
        assert!(store.has(&digest).unwrap());
        assert_eq!(store.size(&digest).unwrap(), 15);
        assert_eq!(store.get(&digest).unwrap(), b"component bytes");
        // Staging leaves nothing behind.
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn refuses_bytes_under_the_wrong_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::open(dir.path()).unwrap();
        let claimed = Digest::of(b"one thing");
        let err = store.put_verified(&claimed, b"another").unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        assert!(!store.has(&claimed).unwrap());
        assert!(!store.has(&Digest::of(b"another")).unwrap());
    }

    #[test]
    fn missing_blob_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::open(dir.path()).unwrap();
        let digest = Digest::of(b"absent");
        assert!(matches!(store.get(&digest), Err(Error::NotFound(_))));
        assert!(matches!(store.size(&digest), Err(Error::NotFound(_))));
    }

    #[test]
    fn corruption_is_detected_and_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::open(dir.path()).unwrap();
        let digest = store.put(b"precious bytes").unwrap();
        fs::write(store.blob_path(&digest), b"precious bytez").unwrap();
        let err = store.get(&digest).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(&digest.to_string()), "{err}");
        assert!(
            !store.has(&digest).unwrap(),
            "a corrupt blob must read as missing"
        );
        assert!(dir.path().join("corrupt").join(digest.hex()).exists());
        // Uploading the blob again repairs the store.
        assert!(!store.put_verified(&digest, b"precious bytes").unwrap());
        assert_eq!(store.get(&digest).unwrap(), b"precious bytes");
    }

    #[test]
    fn reopening_clears_stale_staging_files() {
        let dir = tempfile::tempdir().unwrap();
        LocalDirStore::open(dir.path()).unwrap();
        fs::write(dir.path().join("tmp").join("half-written"), b"x").unwrap();
        let store = LocalDirStore::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
    }
}
