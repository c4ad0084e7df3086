//! Compares two trees entry by entry, for tests and for checking an export.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

#[derive(Debug, PartialEq, Eq)]
struct Observed {
    kind: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    rdev: u64,
    /// Directory mtimes are compared too: export restores them after filling the directory.
    mtime: (i64, i64),
    size: u64,
    content: Option<blake3::Hash>,
    target: Option<PathBuf>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The first path (in walk order) with the same inode, for hard links.
    link_of: Option<PathBuf>,
}

fn observe(root: &Path) -> Result<BTreeMap<PathBuf, Observed>> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let path = root.join(&relative);
        let meta = fs::symlink_metadata(&path).map_err(Error::io("inspect", &path))?;
        let kind = meta.mode() & libc::S_IFMT;
        let mut content = None;
        let mut target = None;
        let mut link_of = None;
        if meta.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&path)
                .map_err(Error::io("list", &path))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<std::io::Result<_>>()
                .map_err(Error::io("list", &path))?;
            names.sort();
            pending.extend(names.into_iter().rev().map(|n| relative.join(n)));
        } else if meta.is_file() {
            let bytes = fs::read(&path).map_err(Error::io("read", &path))?;
            content = Some(blake3::hash(&bytes));
            if meta.nlink() > 1 {
                let first = inodes
                    .entry((meta.dev(), meta.ino()))
                    .or_insert_with(|| relative.clone());
                if *first != relative {
                    link_of = Some(first.clone());
                }
            }
        } else if meta.file_type().is_symlink() {
            target = Some(fs::read_link(&path).map_err(Error::io("read link", &path))?);
        }
        let mut xattrs = Vec::new();
        if let Ok(names) = xattr::list(&path) {
            for name in names {
                if let Ok(Some(value)) = xattr::get(&path, &name) {
                    xattrs.push((name.as_bytes().to_vec(), value));
                }
            }
        }
        xattrs.sort();
        let observed = Observed {
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: meta.rdev(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            size: if meta.is_dir() { 0 } else { meta.len() },
            content,
            target,
            xattrs,
            link_of,
        };
        out.insert(relative, observed);
    }
    Ok(out)
}

/// Every difference between the trees at `a` and `b`: contents, modes, ownership, symlink
/// targets, hard-link structure, device numbers, xattrs and mtimes. Empty when identical.
pub fn tree_differences(a: &Path, b: &Path) -> Result<Vec<String>> {
    let (left, right) = (observe(a)?, observe(b)?);
    let mut differences = Vec::new();
    for (path, seen) in &left {
        match right.get(path) {
            None => differences.push(format!("{}: only in {}", path.display(), a.display())),
            Some(other) if other != seen => differences.push(format!(
                "{}: {seen:?} != {other:?}",
                if path.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    path
                }
                .display()
            )),
            Some(_) => {}
        }
    }
    for path in right.keys().filter(|p| !left.contains_key(*p)) {
        differences.push(format!("{}: only in {}", path.display(), b.display()));
    }
    Ok(differences)
}
