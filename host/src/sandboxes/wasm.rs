//! The Wasm tier: a sandbox of a Wasm runtime image runs each `exec` as a WASI command, a
//! fresh instance on [`CommandEngine`], over the sandbox's files.
//!
//! Those files are the sandbox's own root, a tmpfs that persists between commands and is
//! bounded like a container's writable layer, with the image's top-level directories
//! (`/usr`, `/etc`, ...) preopened read-only in it from the image's lazy mount. A command
//! starts in `/` as WASI has it, so a relative path lands in the sandbox's own files. File
//! calls resolve paths with cap-std inside the same directories, so `..` and symlinks
//! cannot leave them.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cap_std::fs::{Dir, MetadataExt, OpenOptions};
use lode_native_runner::builder::WASM_WRITABLE;

use crate::native::Refused;
use crate::proto::sandboxes::FileEntry;
use crate::wasm::store::Preopen;

/// The top level of a Wasm image, read once per image: its directories (each a read-only
/// mount point in a sandbox's root) and what else a sandbox's root starts with a copy of.
pub(super) struct ImageRoot {
    dirs: Vec<String>,
    copied: Vec<String>,
}

impl ImageRoot {
    /// Reads the top level of `image`: an entry that is a directory other than the
    /// sandbox's own (`/tmp`, `/work`) is mounted; the rest (those two if not empty, and any
    /// file) is copied.
    pub(super) fn read(image: &lode_fs::Mount) -> std::io::Result<Self> {
        let mut root = Self {
            dirs: Vec::new(),
            copied: Vec::new(),
        };
        for entry in std::fs::read_dir(image.mountpoint())? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let own = WASM_WRITABLE.iter().any(|dir| dir[1..] == name);
            if !entry.file_type()?.is_dir() {
                root.copied.push(name);
            } else if !own {
                root.dirs.push(name);
            } else if std::fs::read_dir(entry.path())?.next().is_some() {
                root.copied.push(name);
            }
        }
        Ok(root)
    }
}

/// A Wasm-tier sandbox's place on the host.
pub(super) struct WasmRoom {
    /// The image's lazy mount, whose top-level directories are preopened read-only.
    image: Arc<lode_fs::Mount>,
    /// The image digest, naming its commands in the cache.
    pub(super) digest: String,
    /// The sandbox's own tmpfs, preopened read-write at `/`.
    layer: PathBuf,
    /// The image's top level: its directories are seen read-only at `/NAME`.
    pub(super) root: Arc<ImageRoot>,
    /// Set when the sandbox ends: running commands stop at the next epoch tick.
    pub(super) ended: Arc<AtomicBool>,
}

impl WasmRoom {
    /// Mounts a tmpfs of `bytes` at `layer` (made here) as the sandbox's root: the image's
    /// top-level directories get a mount point each, and what the image holds at its top
    /// level besides them (`/tmp` and `/work` with their contents) is copied in.
    pub(super) fn make(
        image: Arc<lode_fs::Mount>,
        digest: String,
        root: Arc<ImageRoot>,
        layer: PathBuf,
        bytes: u64,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(&layer)?;
        crate::native::containers::mount_tmpfs(&layer, bytes)?;
        let filled = (|| {
            for name in &root.dirs {
                std::fs::create_dir(layer.join(name))?;
            }
            for name in &root.copied {
                crate::util::copy_tree(&image.mountpoint().join(name), &layer.join(name))?;
            }
            for dir in WASM_WRITABLE {
                std::fs::create_dir_all(layer.join(&dir[1..]))?;
            }
            Ok::<_, std::io::Error>(())
        })();
        if let Err(e) = filled {
            let _ = lode_fs::unmount(&layer);
            let _ = std::fs::remove_dir_all(&layer);
            return Err(e);
        }
        Ok(Self {
            image,
            digest,
            root,
            layer,
            ended: Arc::new(AtomicBool::new(false)),
        })
    }

    /// What a command sees: the sandbox's own root, with the image's directories in it.
    pub(super) fn preopens(&self) -> Vec<Preopen> {
        let mut preopens = vec![Preopen {
            host: self.layer.clone(),
            guest: "/".into(),
            read_only: false,
        }];
        preopens.extend(self.root.dirs.iter().map(|name| Preopen {
            host: self.image.mountpoint().join(name),
            guest: format!("/{name}"),
            read_only: true,
        }));
        preopens
    }

    /// The image directory sandbox `path` lies in, and the rest of the path.
    fn image_part<'p>(&self, path: &'p str) -> Option<(&str, &'p str)> {
        let path = path.trim_start_matches('/');
        let (first, rest) = path.split_once('/').unwrap_or((path, ""));
        self.root
            .dirs
            .iter()
            .find(|dir| *dir == first)
            .map(|dir| (dir.as_str(), rest))
    }

    /// Whether sandbox `path` lies in the image (read-only) rather than the sandbox's own.
    pub(super) fn is_image_path(&self, path: &str) -> bool {
        self.image_part(path).is_some()
    }

    /// The directory holding sandbox `path`, and the path inside it; whether it is writable.
    fn place(&self, path: &str) -> std::io::Result<(Dir, PathBuf, bool)> {
        let ambient = cap_std::ambient_authority();
        if let Some((dir, rest)) = self.image_part(path) {
            let dir = Dir::open_ambient_dir(self.image.mountpoint().join(dir), ambient)?;
            return Ok((dir, relative(rest.trim_start_matches('/')), false));
        }
        let dir = Dir::open_ambient_dir(&self.layer, ambient)?;
        Ok((dir, relative(path.trim_start_matches('/')), true))
    }

    /// Reads the file at sandbox `path`, up to `limit` bytes (more is refused).
    pub(super) fn read(&self, path: &str, limit: u64) -> Result<Vec<u8>, Refused> {
        let (dir, inner, _) = self.place(path).map_err(|e| refused(path, e))?;
        let meta = dir.metadata(&inner).map_err(|e| refused(path, e))?;
        if !meta.is_file() {
            return Err(Refused::new(
                400,
                "wrong_kind",
                format!("{path} is not a regular file"),
            ));
        }
        if meta.len() > limit {
            return Err(too_large(path, limit));
        }
        let mut bytes = Vec::new();
        dir.open(&inner)
            .and_then(|file| file.take(limit + 1).read_to_end(&mut bytes))
            .map_err(|e| refused(path, e))?;
        if bytes.len() as u64 > limit {
            return Err(too_large(path, limit));
        }
        Ok(bytes)
    }

    /// Writes (or appends) `bytes` to the file at sandbox `path`.
    pub(super) fn write(&self, path: &str, bytes: &[u8], append: bool) -> Result<(), Refused> {
        let (dir, inner, _) = self.writable(path)?;
        let mut options = OpenOptions::new();
        options.write(true).create(true);
        if append {
            options.append(true);
        } else {
            options.truncate(true);
        }
        if dir.metadata(&inner).is_ok_and(|m| !m.is_file()) {
            return Err(Refused::new(
                400,
                "wrong_kind",
                format!("{path} is not a regular file"),
            ));
        }
        dir.open_with(&inner, &options)
            .and_then(|mut file| file.write_all(bytes))
            .map_err(|e| refused(path, e))
    }

    /// The entries of the directory at sandbox `path`.
    pub(super) fn list(&self, path: &str) -> Result<Vec<FileEntry>, Refused> {
        let (dir, inner, _) = self.place(path).map_err(|e| refused(path, e))?;
        let mut entries = Vec::new();
        let listing = dir.read_dir(&inner).map_err(|e| refused(path, e))?;
        for entry in listing {
            let entry = entry.map_err(|e| refused(path, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Ok(meta) = entry.metadata() {
                entries.push(file_entry(name, &meta));
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// What is at sandbox `path` (a symlink is described, not followed).
    pub(super) fn stat(&self, path: &str) -> Result<FileEntry, Refused> {
        let (dir, inner, _) = self.place(path).map_err(|e| refused(path, e))?;
        let meta = if inner == Path::new(".") {
            dir.dir_metadata()
        } else {
            dir.symlink_metadata(&inner)
        }
        .map_err(|e| refused(path, e))?;
        let name = path.rsplit('/').next().unwrap_or_default().to_string();
        Ok(file_entry(name, &meta))
    }

    /// Makes the directory at sandbox `path` and its parents.
    pub(super) fn make_dir(&self, path: &str) -> Result<(), Refused> {
        let (dir, inner, _) = self.writable(path)?;
        dir.create_dir_all(&inner).map_err(|e| refused(path, e))
    }

    /// Removes the file, or the directory and everything in it, at sandbox `path`.
    pub(super) fn remove(&self, path: &str) -> Result<(), Refused> {
        let (dir, inner, _) = self.writable(path)?;
        if inner == Path::new(".") {
            return Err(Refused::new(
                403,
                "permission_denied",
                format!(
                    "{path} is a writable directory of the sandbox itself; remove what is in it"
                ),
            ));
        }
        let meta = dir.symlink_metadata(&inner).map_err(|e| refused(path, e))?;
        if meta.is_dir() {
            dir.remove_dir_all(&inner)
        } else {
            dir.remove_file(&inner)
        }
        .map_err(|e| refused(path, e))
    }

    fn writable(&self, path: &str) -> Result<(Dir, PathBuf, bool), Refused> {
        let placed = self.place(path).map_err(|e| refused(path, e))?;
        if !placed.2 {
            return Err(Refused::new(
                403,
                "read_only",
                format!(
                    "{path} is in the image's /{}, which a Wasm sandbox sees read-only; write \
                     anywhere else (/tmp, /work)",
                    self.image_part(path).map_or("", |(dir, _)| dir)
                ),
            ));
        }
        Ok(placed)
    }

    /// What the sandbox changed: its root, to lay over the image in a snapshot.
    pub(super) fn upper(&self) -> &Path {
        &self.layer
    }

    /// The image's top-level directories, which a snapshot leaves as the image has them.
    pub(super) fn image_dirs(&self) -> &[String] {
        &self.root.dirs
    }

    /// Stops its commands and removes its files from the host.
    pub(super) fn terminate(&self) {
        self.ended.store(true, Ordering::Relaxed);
        let _ = lode_fs::unmount(&self.layer);
        let _ = std::fs::remove_dir_all(&self.layer);
    }
}

impl Drop for WasmRoom {
    /// However a room goes (a create that failed or was given up on included), its tmpfs
    /// goes with it.
    fn drop(&mut self) {
        self.terminate();
    }
}

/// `inner` as a path cap-std opens: `.` for the directory itself.
fn relative(inner: &str) -> PathBuf {
    if inner.is_empty() {
        PathBuf::from(".")
    } else {
        PathBuf::from(inner)
    }
}

fn file_entry(name: String, meta: &cap_std::fs::Metadata) -> FileEntry {
    let kind = if meta.is_symlink() {
        "symlink"
    } else if meta.is_dir() {
        "dir"
    } else if meta.is_file() {
        "file"
    } else {
        "other"
    };
    FileEntry {
        name,
        kind: kind.into(),
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        mtime: meta.mtime(),
    }
}

fn too_large(path: &str, limit: u64) -> Refused {
    Refused::new(
        413,
        "file_too_large",
        format!(
            "{path} is larger than this server's limit of {limit} bytes for a file call (lode \
             serve --sandbox-max-file); read it in a process instead"
        ),
    )
}

/// A file call's error, named as the container tier names it.
fn refused(path: &str, e: std::io::Error) -> Refused {
    use std::io::ErrorKind::*;
    match e.kind() {
        NotFound => Refused::new(404, "not_found", format!("no {path} in the sandbox")),
        NotADirectory | IsADirectory | DirectoryNotEmpty => {
            Refused::new(400, "wrong_kind", format!("{path}: {e}"))
        }
        PermissionDenied => Refused::new(
            403,
            "permission_denied",
            format!("{path}: {e} (a path may not lead out of the sandbox, by '..' or a symlink)"),
        ),
        StorageFull | QuotaExceeded => Refused::new(
            507,
            "no_space",
            format!("{path}: {e}: the sandbox's writable layer is full"),
        ),
        _ => Refused::new(400, "file_call_failed", format!("{path}: {e}")),
    }
}
