//! Tags: names that point at digests, such as `python:3.11` or `profile/<index digest>`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::local::io_err;
use crate::{Digest, Error, Result};

/// How a tag update is conditioned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagUpdate {
    /// Set the tag whatever it points at now.
    Always,
    /// Set it only if it does not exist yet.
    IfAbsent,
    /// Set it only if it points at this digest now (compare-and-swap).
    IfEquals(Digest),
}

/// Named pointers to digests, updated atomically.
pub trait TagStore: Send + Sync + 'static {
    /// Where the tag points.
    fn get(&self, name: &str) -> Result<Digest>;
    /// Points `name` at `digest` if `condition` holds; returns where it pointed before.
    fn set(&self, name: &str, digest: &Digest, condition: &TagUpdate) -> Result<Option<Digest>>;
    /// Removes the tag if `condition` holds (`IfAbsent` is meaningless here and refused).
    fn delete(&self, name: &str, condition: &TagUpdate) -> Result<()>;
    /// Every tag whose name starts with `prefix`, sorted by name.
    fn list(&self, prefix: &str) -> Result<Vec<(String, Digest)>>;
}

/// Whether `condition` lets a tag now at `current` change; the conflict names both sides.
pub fn check_update(name: &str, current: &Option<Digest>, condition: &TagUpdate) -> Result<()> {
    let expected = match condition {
        TagUpdate::Always => return Ok(()),
        TagUpdate::IfAbsent => None,
        TagUpdate::IfEquals(digest) => Some(digest.clone()),
    };
    if *current == expected {
        Ok(())
    } else {
        Err(Error::TagConflict {
            name: name.to_string(),
            expected,
            actual: current.clone(),
        })
    }
}

/// Longest tag name, in bytes.
const MAX_TAG_LEN: usize = 255;

/// Checks a tag name: `/`-separated segments of `[A-Za-z0-9._:@+-]`, none empty, none
/// starting with a dot, at most 255 bytes. Tags become paths in the local backend, so this
/// is also what keeps them inside its directory.
pub fn validate_tag_name(name: &str) -> Result<()> {
    let invalid = |reason| Error::InvalidTag {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.len() > MAX_TAG_LEN {
        return Err(invalid("it is longer than 255 bytes"));
    }
    for segment in name.split('/') {
        if segment.is_empty() {
            return Err(invalid(
                "it has an empty segment (leading, trailing or double '/')",
            ));
        }
        if segment.starts_with('.') {
            return Err(invalid("a segment starts with '.'"));
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@+-".contains(&b))
        {
            return Err(invalid(
                "segments may only hold letters, digits and . _ : @ + -",
            ));
        }
    }
    Ok(())
}

/// Tags as small files under one directory: `<root>/<name>` holds the digest text. Updates
/// are written to a temp file, fsynced and renamed, under a lock that makes compare-and-swap
/// atomic within the process that owns the directory.
#[derive(Debug)]
pub struct LocalTagStore {
    root: PathBuf,
    update: Mutex<()>,
}

impl LocalTagStore {
    /// Opens (creating) the tag directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|source| Error::Io {
            op: "create directory",
            path: root.clone(),
            source,
        })?;
        Ok(Self {
            root,
            update: Mutex::new(()),
        })
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        validate_tag_name(name)?;
        Ok(self.root.join(name))
    }

    fn read(path: &Path) -> Result<Option<Digest>> {
        match fs::read_to_string(path) {
            Ok(text) => text.trim().parse().map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            // A name that prefixes other tags is a directory, and no tag itself.
            Err(_) if path.is_dir() => Ok(None),
            Err(source) => Err(Error::Io {
                op: "read tag",
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Creates the directories a nested tag (`profile/x`) needs, fsyncing each new one's
    /// parent so the tag cannot vanish in a crash after `set` returns.
    fn create_dirs_durably(&self, dir: &Path) -> Result<()> {
        let relative = dir
            .strip_prefix(&self.root)
            .expect("tag paths live under the root");
        let mut at = self.root.clone();
        for component in relative.components() {
            let parent = at.clone();
            at.push(component);
            match fs::create_dir(&at) {
                Ok(()) => fs::File::open(&parent)
                    .and_then(|d| d.sync_all())
                    .map_err(io_err("fsync directory", &parent))?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && at.is_dir() => {}
                Err(e) => return Err(io_err("create directory", &at)(e)),
            }
        }
        Ok(())
    }
}

impl TagStore for LocalTagStore {
    fn get(&self, name: &str) -> Result<Digest> {
        let path = self.path(name)?;
        Self::read(&path)?.ok_or_else(|| Error::TagNotFound(name.to_string()))
    }

    fn set(&self, name: &str, digest: &Digest, condition: &TagUpdate) -> Result<Option<Digest>> {
        let path = self.path(name)?;
        let _guard = self.update.lock().unwrap_or_else(|e| e.into_inner());
        let current = Self::read(&path)?;
        check_update(name, &current, condition)?;
        let dir = path.parent().expect("tag paths live under the root");
        self.create_dirs_durably(dir)?;
        let tmp = dir.join(format!(".tmp-{:016x}", rand::random::<u64>()));
        let result = (|| {
            fs::write(&tmp, format!("{digest}\n")).map_err(io_err("write", &tmp))?;
            fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io_err("fsync", &tmp))?;
            fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("fsync directory", dir))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| current)
    }

    fn delete(&self, name: &str, condition: &TagUpdate) -> Result<()> {
        let path = self.path(name)?;
        let _guard = self.update.lock().unwrap_or_else(|e| e.into_inner());
        let current = Self::read(&path)?;
        if current.is_none() {
            return Err(Error::TagNotFound(name.to_string()));
        }
        check_update(name, &current, condition)?;
        fs::remove_file(&path).map_err(io_err("remove tag", &path))?;
        let dir = path.parent().expect("tag paths live under the root");
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync directory", dir))
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Digest)>> {
        let mut tags = Vec::new();
        let mut pending = vec![(self.root.clone(), String::new())];
        while let Some((dir, name_prefix)) = pending.pop() {
            for entry in fs::read_dir(&dir).map_err(io_err("list tags in", &dir))? {
                let entry = entry.map_err(io_err("list tags in", &dir))?;
                let file_name = entry.file_name().to_string_lossy().into_owned();
                if file_name.starts_with('.') {
                    continue; // staging files
                }
                let name = format!("{name_prefix}{file_name}");
                let path = entry.path();
                if path.is_dir() {
                    pending.push((path, format!("{name}/")));
                } else if name.starts_with(prefix)
                    && let Some(digest) = Self::read(&path)?
                {
                    tags.push((name, digest));
                }
            }
        }
        tags.sort();
        Ok(tags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_are_refused() {
        for bad in [
            "", "/abs", "a//b", "a/", "..", "a/../b", ".hidden", "a b", "a\\b", "ü",
        ] {
            assert!(validate_tag_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "python:3.11",
            "profile/blake3:00ff",
            "team/app@v1.2+build-3",
        ] {
            validate_tag_name(good).unwrap();
        }
    }

    #[test]
    fn compare_and_swap() {
        let dir = tempfile::tempdir().unwrap();
        let tags = LocalTagStore::open(dir.path()).unwrap();
        let (one, two) = (Digest::of(b"one"), Digest::of(b"two"));
        assert_eq!(tags.set("base", &one, &TagUpdate::IfAbsent).unwrap(), None);
        let err = tags.set("base", &two, &TagUpdate::IfAbsent).unwrap_err();
        assert!(matches!(err, Error::TagConflict { .. }), "{err}");
        let err = tags
            .set("base", &two, &TagUpdate::IfEquals(two.clone()))
            .unwrap_err();
        assert!(err.to_string().contains(&one.to_string()), "{err}");
        assert_eq!(
            tags.set("base", &two, &TagUpdate::IfEquals(one.clone()))
                .unwrap(),
            Some(one.clone())
        );
        assert_eq!(tags.get("base").unwrap(), two);
        tags.set("profile/x", &one, &TagUpdate::Always).unwrap();
        assert_eq!(
            tags.list("").unwrap(),
            vec![
                ("base".into(), two.clone()),
                ("profile/x".into(), one.clone())
            ]
        );
        assert_eq!(tags.list("prof").unwrap().len(), 1);
        tags.delete("base", &TagUpdate::Always).unwrap();
        assert!(matches!(tags.get("base"), Err(Error::TagNotFound(_))));
    }
}
