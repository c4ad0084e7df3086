//! Export: materialise an index as a real tree, identical in content and metadata.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use lode_registry::{BlobAccess, Digest};
use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps};

use crate::index::{Content, Index, Kind};
use crate::{Error, Result};

/// What an export did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportReport {
    /// Entries created, the root included.
    pub entries: u64,
    /// Bytes written to regular files.
    pub file_bytes: u64,
    /// Distinct chunks fetched.
    pub chunks_fetched: u64,
    /// Entries whose owner could not be set (not running as root).
    pub ownership_skipped: u64,
    /// Extended attributes that could not be set (a filesystem without them, or a
    /// privileged namespace while not root).
    pub xattrs_skipped: u64,
}

/// Writes the tree of `index` into `target`, which must not exist or be an empty directory.
/// Chunks come from `registry`, each checked against its digest on the way.
pub async fn export(
    index: &Index,
    registry: Arc<dyn BlobAccess>,
    target: &Path,
) -> Result<ExportReport> {
    if index.encrypted() {
        return Err(Error::Encrypted(index.digest().clone()));
    }
    prepare_target(target)?;
    let walk = index.walk();
    let mut report = ExportReport::default();
    // Where each chunk must be written: digest → [(file, offset, length)].
    let mut wanted: HashMap<Digest, Vec<(usize, u64, u32)>> = HashMap::new();
    let mut files: Vec<PathBuf> = Vec::new();
    let mut first_link: HashMap<u32, PathBuf> = HashMap::new();
    for (relative, entry) in &walk {
        let path = target.join(relative);
        report.entries += 1;
        match entry.kind() {
            Kind::Dir if entry.id() == crate::index::ROOT => {}
            Kind::Dir => fs::DirBuilder::new()
                .mode(0o700)
                .create(&path)
                .map_err(Error::io("create directory", &path))?,
            Kind::File => {
                if let Some(group) = entry.link_primary() {
                    if let Some(first) = first_link.get(&group) {
                        fs::hard_link(first, &path).map_err(Error::io("hard-link", &path))?;
                        continue;
                    }
                    first_link.insert(group, path.clone());
                }
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(Error::io("create", &path))?;
                report.file_bytes += entry.size();
                match entry.content().expect("files have content") {
                    Content::Inline(data) => file
                        .write_all_at(data, 0)
                        .map_err(Error::io("write", &path))?,
                    Content::Chunks(chunks) => {
                        file.set_len(entry.size())
                            .map_err(Error::io("size", &path))?;
                        files.push(path.clone());
                        for chunk in chunks {
                            wanted.entry(chunk.digest()).or_default().push((
                                files.len() - 1,
                                chunk.offset(),
                                chunk.length(),
                            ));
                        }
                    }
                }
            }
            Kind::Symlink => {
                let target_bytes = entry.symlink_target().expect("symlinks have targets");
                std::os::unix::fs::symlink(OsStr::from_bytes(target_bytes), &path)
                    .map_err(Error::io("create symlink", &path))?
            }
            kind => {
                let file_type = match kind {
                    Kind::CharDevice => FileType::CharacterDevice,
                    Kind::BlockDevice => FileType::BlockDevice,
                    Kind::Fifo => FileType::Fifo,
                    _ => FileType::Socket,
                };
                rustix::fs::mknodat(
                    CWD,
                    &path,
                    file_type,
                    Mode::from_raw_mode(0o600),
                    entry.rdev(),
                )
                .map_err(|e| Error::io("create special file", &path)(e.into()))?
            }
        }
    }
    report.chunks_fetched = fetch_chunks(registry, wanted, Arc::new(files)).await?;
    // Children before parents, so writing into a directory never disturbs its mtime again.
    for (relative, entry) in walk.iter().rev() {
        apply_metadata(&target.join(relative), entry, &mut report)?;
    }
    Ok(report)
}

fn prepare_target(target: &Path) -> Result<()> {
    match fs::read_dir(target) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Error::TargetNotEmpty(target.to_path_buf()));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(Error::io("create directory", parent))?;
            }
            fs::create_dir(target).map_err(Error::io("create directory", target))
        }
        Err(e) => Err(Error::io("open export target", target)(e)),
    }
}

async fn fetch_chunks(
    registry: Arc<dyn BlobAccess>,
    wanted: HashMap<Digest, Vec<(usize, u64, u32)>>,
    files: Arc<Vec<PathBuf>>,
) -> Result<u64> {
    let fetched = wanted.len() as u64;
    let jobs = wanted.into_iter().map(|(digest, places)| {
        let (registry, files) = (registry.clone(), files.clone());
        async move {
            let data = registry.get_blob(&digest).await?;
            tokio::task::spawn_blocking(move || {
                for (file, offset, length) in places {
                    let path = &files[file];
                    // The digest vouches for the bytes, not for the length the index gives.
                    if data.len() != length as usize {
                        return Err(Error::ChunkLength {
                            path: path.clone(),
                            digest: digest.clone(),
                            expected: length,
                            actual: data.len(),
                        });
                    }
                    OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(path)
                        .and_then(|f| f.write_all_at(&data, offset))
                        .map_err(Error::io("write", path))?;
                }
                Ok::<_, Error>(())
            })
            .await
            .expect("writing chunks does not panic")
        }
    });
    let parallelism = registry.parallelism();
    let mut results = futures::stream::iter(jobs).buffer_unordered(parallelism);
    while let Some(result) = results.next().await {
        result?;
    }
    Ok(fetched)
}

fn apply_metadata(
    path: &Path,
    entry: &crate::index::Entry<'_>,
    report: &mut ExportReport,
) -> Result<()> {
    // Owner first: chown clears setuid bits and file capabilities, which come after.
    match std::os::unix::fs::lchown(path, Some(entry.uid()), Some(entry.gid())) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => report.ownership_skipped += 1,
        Err(e) => return Err(Error::io("set owner of", path)(e)),
    }
    if entry.kind() != Kind::Symlink {
        fs::set_permissions(path, fs::Permissions::from_mode(entry.mode()))
            .map_err(Error::io("set mode of", path))?;
    }
    for (name, value) in entry.xattrs() {
        match xattr::set(path, OsStr::from_bytes(name), value) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EPERM | libc::ENOTSUP | libc::EACCES)
                ) =>
            {
                report.xattrs_skipped += 1
            }
            Err(e) => return Err(Error::io("set xattr on", path)(e)),
        }
    }
    let (sec, nsec) = entry.mtime();
    let time = Timespec {
        tv_sec: sec,
        tv_nsec: nsec.into(),
    };
    rustix::fs::utimensat(
        CWD,
        path,
        &Timestamps {
            last_access: time,
            last_modification: time,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| Error::io("set times of", path)(e.into()))
}
