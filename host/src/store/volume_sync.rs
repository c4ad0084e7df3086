//! Named volumes across hosts that share a state, on Modal's model: each host keeps a copy of
//! a volume (the directory its containers mount), a function's writes reach other hosts when
//! it calls `commit()`, and reach a container when it calls `reload()` (or when its host
//! first mounts the volume).
//!
//! A committed version is a manifest (every path's kind, mode, and for a file the digest of
//! its bytes) stored in the blob store with the bytes, so every host reads it; the state
//! holds each volume's newest version. Each host remembers, beside its copy, the version it
//! last synced and what every path looked like then (size, mtime), so it can tell which
//! paths its own containers changed since.
//!
//! **Conflict rule: last commit wins, per path.** A commit publishes the paths this copy
//! changed since it last synced (written, added, removed) over the newest version, and keeps
//! every other path as the newest version has it, so two hosts that commit different files
//! both keep theirs; where both changed one file, the later commit's bytes win. A commit or
//! a reload then brings in what other hosts committed, for every path this copy did not
//! change; a path it changed and has not committed is left as it is (its next commit
//! publishes it).
//!
//! Every file operation goes through a capability handle on the volume's directory, so a
//! symlink a container made cannot lead a sync outside it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;

use cap_std::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cap_std::fs::{Dir, MetadataExt as _};
use lode_registry::{BlobStore, Digest};
use serde::{Deserialize, Serialize};

use crate::store::state::{StateStore, Table};

/// What one path of a volume is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Node {
    /// A directory.
    Dir {
        /// Its permission bits.
        mode: u32,
    },
    /// A regular file.
    File {
        /// Its permission bits.
        mode: u32,
        /// Its bytes' digest in the blob store.
        digest: String,
    },
    /// A symbolic link.
    Link {
        /// Where it points.
        target: String,
    },
}

/// A volume's newest committed version, as the state keeps it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Head {
    /// 0 for a volume nothing was committed to yet.
    pub version: u64,
    /// The manifest's digest (`None` at version 0).
    pub manifest: Option<String>,
    /// When and where it was committed.
    pub committed_ms: u64,
    /// The host that committed it.
    pub host: Option<String>,
}

/// What this host's copy was at its last sync.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Base {
    version: u64,
    /// Each path as the version had it, and its size and mtime here right after.
    paths: BTreeMap<String, (Node, Stamp)>,
}

/// A path's size and modification time, to tell a changed file without reading it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
}

/// A path as the copy has it now.
#[derive(Debug, Clone)]
struct Found {
    kind: FoundKind,
    mode: u32,
    stamp: Stamp,
}

#[derive(Debug, Clone, PartialEq)]
enum FoundKind {
    Dir,
    File,
    Link(String),
}

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Synced {
    /// The version the copy is at now.
    pub version: u64,
    /// Paths this copy published (a commit).
    pub published: usize,
    /// Paths brought in from other hosts' commits.
    pub fetched: usize,
    /// Paths changed here and not committed, left as they are (a reload).
    pub kept: usize,
}

/// Volumes shared through a state and a blob store.
pub struct VolumeSync {
    state: Arc<dyn StateStore>,
    blobs: Arc<dyn BlobStore>,
    /// Where each volume's copy is (`<root>/<name>`), with its base beside it.
    root: std::path::PathBuf,
    host: String,
    /// Owner of what a sync creates (the containers' root user).
    owner: Option<u32>,
    /// One sync of a volume at a time on this host.
    locks: std::sync::Mutex<BTreeMap<String, Arc<std::sync::Mutex<()>>>>,
}

impl VolumeSync {
    /// Syncs the volumes under `root` through `state` and `blobs`, as host `host`; what it
    /// creates belongs to `owner`.
    pub fn new(
        state: Arc<dyn StateStore>,
        blobs: Arc<dyn BlobStore>,
        root: &Path,
        host: String,
        owner: Option<u32>,
    ) -> Self {
        Self {
            state,
            blobs,
            root: root.to_path_buf(),
            host,
            owner,
            locks: Default::default(),
        }
    }

    /// The volume's newest version; `None` if no host created it.
    pub fn head(&self, name: &str) -> Result<Option<Head>> {
        match self.state.get_entry(Table::Volumes, name)? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("the state's record of volume {name:?} is corrupt")
            })?)),
            None => Ok(None),
        }
    }

    /// Records volume `name` (at version 0) unless a host did already.
    pub fn create(&self, name: &str) -> Result<()> {
        self.state.update_table(Table::Volumes, &mut |edit| {
            if edit.get(name)?.is_none() {
                edit.put(name, &serde_json::to_vec(&Head::default())?)?;
            }
            Ok(())
        })
    }

    /// Every volume any host created.
    pub fn names(&self) -> Result<Vec<String>> {
        Ok(self
            .state
            .list_entries(Table::Volumes)?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    fn lock(&self, name: &str) -> Arc<std::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    fn base_path(&self, name: &str) -> std::path::PathBuf {
        self.root.join(format!(".{name}.synced.json"))
    }

    fn read_base(&self, name: &str) -> Result<Base> {
        match std::fs::read(self.base_path(name)) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is corrupt; remove it to take volume {name:?} as this host has it",
                    self.base_path(name).display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Base::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.base_path(name).display())),
        }
    }

    fn manifest(&self, head: &Head) -> Result<BTreeMap<String, Node>> {
        let Some(digest) = &head.manifest else {
            return Ok(BTreeMap::new());
        };
        let bytes = self.blobs.get(&digest.parse()?)?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Brings the newest version into this host's copy of `name` (at `dir`), keeping the
    /// paths changed here and not committed.
    pub fn reload(&self, name: &str, dir: &Path) -> Result<Synced> {
        self.with_copy(name, dir, |volume, base, changed| {
            let head = self.head(name)?.unwrap_or_default();
            self.bring_in(name, volume, base, &head, &changed)
        })
    }

    /// Runs `work` on this host's copy of `name` (at `dir`), with no other sync of it under
    /// way here: the copy, its base, and the paths changed since.
    fn with_copy(
        &self,
        name: &str,
        dir: &Path,
        work: impl FnOnce(&Dir, Base, BTreeMap<String, Option<Found>>) -> Result<Synced>,
    ) -> Result<Synced> {
        let lock = self.lock(name);
        let _held = lock.lock().unwrap();
        let volume = open_dir(dir)?;
        let base = self.read_base(name)?;
        let changed = changed_paths(&volume, &base)?;
        work(&volume, base, changed)
    }

    /// Publishes what this host's copy of `name` (at `dir`) changed since it last synced as
    /// the volume's next version, then brings in what other hosts committed.
    pub fn commit(&self, name: &str, dir: &Path) -> Result<Synced> {
        self.with_copy(name, dir, |volume, base, changed| {
            self.publish(name, volume, base, &changed)
        })
    }

    /// [`VolumeSync::commit`] on a copy held by [`VolumeSync::with_copy`].
    fn publish(
        &self,
        name: &str,
        volume: &Dir,
        base: Base,
        changed: &BTreeMap<String, Option<Found>>,
    ) -> Result<Synced> {
        // The bytes first, outside the state's lock: blobs are content-addressed, so bytes
        // stored by a commit that then fails are harmless.
        let mut published = BTreeMap::new();
        for (path, found) in changed {
            let node = match found {
                None => None,
                Some(found) => Some(match &found.kind {
                    FoundKind::Dir => Node::Dir { mode: found.mode },
                    FoundKind::Link(target) => Node::Link {
                        target: target.clone(),
                    },
                    FoundKind::File => {
                        let bytes = volume
                            .read(path)
                            .with_context(|| format!("reading {path} of volume {name:?}"))?;
                        Node::File {
                            mode: found.mode,
                            digest: self.blobs.put(&bytes)?.to_string(),
                        }
                    }
                }),
            };
            published.insert(path.clone(), node);
        }
        let mut head = Head::default();
        self.state.update_table(Table::Volumes, &mut |edit| {
            let newest: Head = match edit.get(name)? {
                Some(bytes) => serde_json::from_slice(&bytes)?,
                None => bail!("volume {name:?} is not in the shared state; create it first"),
            };
            let mut manifest = self.manifest(&newest)?;
            for (path, node) in &published {
                match node {
                    Some(node) => manifest.insert(path.clone(), node.clone()),
                    None => manifest.remove(path),
                };
            }
            // A path removed here takes what was under it along.
            let removed: Vec<&String> = published
                .iter()
                .filter(|(_, node)| node.is_none())
                .map(|(path, _)| path)
                .collect();
            manifest.retain(|path, _| {
                !removed
                    .iter()
                    .any(|gone| path.starts_with(&format!("{gone}/")))
            });
            head = Head {
                version: newest.version + 1,
                manifest: Some(self.blobs.put(&serde_json::to_vec(&manifest)?)?.to_string()),
                committed_ms: crate::util::now_ms(),
                host: Some(self.host.clone()),
            };
            edit.put(name, &serde_json::to_vec(&head)?)
        })?;
        let published = published.len();
        // What this copy published is in the new version as it has it: nothing to keep.
        let mut synced = self.bring_in(name, volume, base, &head, &BTreeMap::new())?;
        synced.published = published;
        Ok(synced)
    }

    /// Makes `volume` the version `head`, except for the `changed` paths, and records it as
    /// the copy's base.
    fn bring_in(
        &self,
        name: &str,
        volume: &Dir,
        base: Base,
        head: &Head,
        changed: &BTreeMap<String, Option<Found>>,
    ) -> Result<Synced> {
        let manifest = self.manifest(head)?;
        let mut synced = Synced {
            version: head.version,
            kept: changed.len(),
            ..Synced::default()
        };
        // Removed elsewhere: deepest first, so a directory is empty when it goes.
        for (path, (node, _)) in base.paths.iter().rev() {
            if manifest.contains_key(path) || changed.contains_key(path) {
                continue;
            }
            let removed = match node {
                Node::Dir { .. } => volume.remove_dir_all(path),
                _ => volume.remove_file(path),
            };
            match removed {
                Ok(()) => synced.fetched += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {path} of {name:?}")),
            }
        }
        let mut paths = BTreeMap::new();
        for (path, node) in &manifest {
            check_path(path)?;
            if changed.contains_key(path) {
                if let Some((old, stamp)) = base.paths.get(path) {
                    // Still changed here: its base stays as it was, so it still shows.
                    paths.insert(path.clone(), (old.clone(), *stamp));
                }
                continue;
            }
            let unchanged = base.paths.get(path).is_some_and(|(old, _)| old == node);
            if !unchanged && !self.matches(volume, path, node)? {
                self.write(volume, path, node)
                    .with_context(|| format!("bringing {path} of volume {name:?} in"))?;
                synced.fetched += 1;
            }
            let stamp = stamp_of(volume, path)?;
            paths.insert(path.clone(), (node.clone(), stamp));
        }
        let base = Base {
            version: head.version,
            paths,
        };
        crate::util::write_atomic(&self.base_path(name), &serde_json::to_vec(&base)?, 0o600)?;
        Ok(synced)
    }

    /// Whether `path` in the copy already is `node` (a commit's own paths are).
    fn matches(&self, volume: &Dir, path: &str, node: &Node) -> Result<bool> {
        let Ok(meta) = volume.symlink_metadata(path) else {
            return Ok(false);
        };
        Ok(match node {
            Node::Dir { .. } => meta.is_dir(),
            Node::Link { target } => {
                meta.is_symlink()
                    && volume.read_link(path).ok().as_deref() == Some(Path::new(target))
            }
            Node::File { digest, .. } => {
                meta.is_file()
                    && volume
                        .read(path)
                        .is_ok_and(|bytes| Digest::of(&bytes).to_string() == *digest)
            }
        })
    }

    fn write(&self, volume: &Dir, path: &str, node: &Node) -> Result<()> {
        if let Some(parent) = Path::new(path).parent()
            && !parent.as_os_str().is_empty()
        {
            volume.create_dir_all(parent)?;
        }
        match node {
            Node::Dir { mode } => {
                if !volume.symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
                    let _ = volume.remove_file(path);
                    volume.create_dir(path)?;
                }
                // Read-only, not O_PATH: its mode and owner are set through it.
                let dir = volume.open(path)?.into_std();
                dir.set_permissions(std::fs::Permissions::from_mode(*mode & 0o7777))?;
                if let Some(uid) = self.owner {
                    std::os::unix::fs::fchown(&dir, Some(uid), Some(uid))?;
                }
            }
            Node::Link { target } => {
                let _ = volume.remove_file(path);
                volume.symlink(target, path)?;
            }
            Node::File { mode, digest } => {
                let bytes = self.blobs.get(&digest.parse()?)?;
                let temp = format!("{path}.lode-sync-{:x}", rand::random::<u64>());
                let mut file = volume.create(&temp)?.into_std();
                file.write_all(&bytes)?;
                file.set_permissions(std::fs::Permissions::from_mode(*mode & 0o7777))?;
                if let Some(uid) = self.owner {
                    std::os::unix::fs::fchown(&file, Some(uid), Some(uid))?;
                }
                file.sync_all()?;
                if volume.symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
                    volume.remove_dir_all(path)?;
                }
                volume.rename(&temp, volume, path)?;
            }
        }
        Ok(())
    }
}

/// A relative path of plain names, as a manifest must hold.
fn check_path(path: &str) -> Result<()> {
    let plain = !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain {
        bail!("a volume manifest names {path:?}, which is not a plain relative path");
    }
    Ok(())
}

fn open_dir(dir: &Path) -> Result<Dir> {
    Dir::open_ambient_dir(dir, cap_std::ambient_authority())
        .with_context(|| format!("opening volume directory {}", dir.display()))
}

fn stamp_of(volume: &Dir, path: &str) -> Result<Stamp> {
    let meta = volume.symlink_metadata(path)?;
    Ok(Stamp {
        size: if meta.is_dir() { 0 } else { meta.len() },
        mtime_ns: if meta.is_dir() {
            0
        } else {
            meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128
        },
    })
}

/// Every path of the copy now.
fn scan(volume: &Dir) -> Result<BTreeMap<String, Found>> {
    let mut found = BTreeMap::new();
    let mut pending = vec![String::new()];
    while let Some(at) = pending.pop() {
        let entries = if at.is_empty() {
            volume.entries()?
        } else {
            volume.read_dir(&at)?
        };
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            // A sync's own temporary files.
            if name.contains(".lode-sync-") {
                continue;
            }
            let path = if at.is_empty() {
                name
            } else {
                format!("{at}/{name}")
            };
            let meta = volume.symlink_metadata(&path)?;
            let kind = if meta.is_dir() {
                pending.push(path.clone());
                FoundKind::Dir
            } else if meta.is_symlink() {
                let target = volume.read_link(&path)?;
                FoundKind::Link(target.to_string_lossy().into_owned())
            } else if meta.is_file() {
                FoundKind::File
            } else {
                // Sockets, FIFOs and devices are not volume data.
                continue;
            };
            found.insert(
                path.clone(),
                Found {
                    kind,
                    mode: meta.permissions().mode() & 0o7777,
                    stamp: stamp_of(volume, &path)?,
                },
            );
        }
    }
    Ok(found)
}

/// The paths the copy changed since `base`: each as it is now, `None` where it is gone.
fn changed_paths(volume: &Dir, base: &Base) -> Result<BTreeMap<String, Option<Found>>> {
    let now = scan(volume)?;
    let mut changed = BTreeMap::new();
    let names: BTreeSet<&String> = now.keys().chain(base.paths.keys()).collect();
    for path in names {
        match (now.get(path), base.paths.get(path)) {
            (Some(found), Some((node, stamp))) => {
                let same = match (&found.kind, node) {
                    (FoundKind::Dir, Node::Dir { .. }) => true,
                    (FoundKind::Link(now), Node::Link { target }) => now == target,
                    (FoundKind::File, Node::File { mode, .. }) => {
                        found.stamp == *stamp && found.mode == *mode
                    }
                    _ => false,
                };
                if !same {
                    changed.insert(path.clone(), Some(found.clone()));
                }
            }
            (Some(found), None) => {
                changed.insert(path.clone(), Some(found.clone()));
            }
            (None, Some(_)) => {
                changed.insert(path.clone(), None);
            }
            (None, None) => {}
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two hosts' copies of one volume through one state and one blob store: different files
    /// both survive, the later commit of one file wins, a removal reaches the other copy, and
    /// a reload keeps what a copy changed and did not commit.
    #[test]
    fn two_copies_merge_per_path_and_the_last_commit_wins() {
        let dir = tempfile::tempdir().unwrap();
        let state: Arc<dyn StateStore> =
            Arc::new(crate::store::state::RedbStore::open(&dir.path().join("state")).unwrap());
        let blobs: Arc<dyn BlobStore> =
            Arc::new(lode_registry::LocalDirStore::open(dir.path().join("blobs")).unwrap());
        let host = |id: &str| {
            let root = dir.path().join(id);
            std::fs::create_dir_all(root.join("v")).unwrap();
            (
                VolumeSync::new(state.clone(), blobs.clone(), &root, id.into(), None),
                root.join("v"),
            )
        };
        let ((a, a_dir), (b, b_dir)) = (host("a"), host("b"));
        a.create("v").unwrap();
        b.create("v").unwrap();

        std::fs::create_dir_all(a_dir.join("runs")).unwrap();
        std::fs::write(a_dir.join("runs/a.txt"), "from a").unwrap();
        std::fs::write(a_dir.join("shared.txt"), "a's").unwrap();
        std::fs::write(b_dir.join("b.txt"), "from b").unwrap();
        assert_eq!(a.commit("v", &a_dir).unwrap().version, 1);
        // Before b reloads, it sees nothing of a's.
        assert!(!b_dir.join("shared.txt").exists());
        let synced = b.commit("v", &b_dir).unwrap();
        assert_eq!((synced.version, synced.published), (2, 1));
        assert_eq!(
            std::fs::read_to_string(b_dir.join("runs/a.txt")).unwrap(),
            "from a"
        );

        // Both change one file: the later commit wins.
        std::fs::write(a_dir.join("shared.txt"), "a's second").unwrap();
        std::fs::write(b_dir.join("shared.txt"), "b's").unwrap();
        a.commit("v", &a_dir).unwrap();
        b.commit("v", &b_dir).unwrap();
        a.reload("v", &a_dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(a_dir.join("shared.txt")).unwrap(),
            "b's"
        );
        assert_eq!(
            std::fs::read_to_string(a_dir.join("b.txt")).unwrap(),
            "from b"
        );

        // A removal travels; a change not committed stays through a reload.
        std::fs::remove_dir_all(b_dir.join("runs")).unwrap();
        b.commit("v", &b_dir).unwrap();
        std::fs::write(a_dir.join("b.txt"), "a's draft").unwrap();
        let synced = a.reload("v", &a_dir).unwrap();
        assert_eq!(synced.kept, 1, "{synced:?}");
        assert!(!a_dir.join("runs").exists());
        assert_eq!(
            std::fs::read_to_string(a_dir.join("b.txt")).unwrap(),
            "a's draft"
        );
        // ... and its commit publishes it.
        a.commit("v", &a_dir).unwrap();
        b.reload("v", &b_dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(b_dir.join("b.txt")).unwrap(),
            "a's draft"
        );
    }

    #[test]
    fn manifests_name_only_plain_relative_paths() {
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./a"] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_path("a/b.txt").is_ok());
    }
}
