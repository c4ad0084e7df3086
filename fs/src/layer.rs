//! Image layers: an index turned back into a tree, and an overlayfs upper directory (what a
//! build step changed, deletions included) merged onto it into a new flattened index.
//!
//! The upper directory follows overlayfs's conventions: a character device 0/0 is a
//! whiteout (the name was deleted), and a directory with `trusted.overlay.opaque=y` replaces
//! the lower directory's contents instead of merging with them. Overlay's own `trusted.overlay.*`
//! attributes never reach the new index.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use lode_registry::BlobAccess;

use crate::build::{Body, FileContent, Meta, Node};
use crate::index::{Content, Entry, Index, Kind};
use crate::ingest::{IngestOptions, IngestReport, store_index, upload_tree};
use crate::{Error, Result};

const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

/// Upper-tree hard-link groups are numbered past every base group, so the two never meet.
const UPPER_LINK_GROUPS: u64 = 1 << 32;

impl Index {
    /// The whole tree as [`Node`]s, chunk lists included, ready to change and encode again.
    /// Hard links keep their groups (numbered by the group's first entry).
    pub fn to_tree(&self) -> Node {
        node_of(self, self.entry(0))
    }
}

fn node_of(index: &Index, entry: Entry<'_>) -> Node {
    let (mtime_sec, mtime_nsec) = entry.mtime();
    let body = match entry.kind() {
        Kind::Dir => Body::Dir(
            entry
                .children()
                .into_iter()
                .flatten()
                .map(|id| node_of(index, index.entry(id)))
                .collect(),
        ),
        Kind::File => Body::File {
            content: match entry.content() {
                Some(Content::Inline(bytes)) => FileContent::Inline(bytes.to_vec()),
                Some(Content::Chunks(chunks)) => {
                    FileContent::Chunks(chunks.iter().map(|c| (c.digest(), c.length())).collect())
                }
                None => FileContent::Inline(Vec::new()),
            },
            link_group: entry.link_primary().map(u64::from),
        },
        Kind::Symlink => Body::Symlink(entry.symlink_target().unwrap_or_default().to_vec()),
        Kind::CharDevice => Body::CharDevice(entry.rdev()),
        Kind::BlockDevice => Body::BlockDevice(entry.rdev()),
        Kind::Fifo => Body::Fifo,
        Kind::Socket => Body::Socket,
    };
    Node {
        name: entry.name().to_vec(),
        meta: Meta {
            mode: entry.mode() & 0o7777,
            uid: entry.uid(),
            gid: entry.gid(),
            mtime_sec,
            mtime_nsec,
        },
        xattrs: entry
            .xattrs()
            .map(|(name, value)| (name.to_vec(), value.to_vec()))
            .collect(),
        body,
    }
}

/// Where a user namespace put its ids on the host: an upper directory written from inside
/// it holds host ids `base..base + count`, and the index stores the namespace's own
/// `0..count`, so the image reads the same in any namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostIds {
    /// The host id of the namespace's 0.
    pub base: u32,
    /// How many ids it maps.
    pub count: u32,
}

impl HostIds {
    fn shift(self, id: u32) -> u32 {
        id.checked_sub(self.base)
            .filter(|&inner| inner < self.count)
            .unwrap_or(id)
    }

    /// Rewrites the owners of `node` and everything under it. Ids outside the range (the
    /// whiteouts overlay makes as the host's root) stay as they are.
    fn unshift(self, node: &mut Node) {
        node.meta.uid = self.shift(node.meta.uid);
        node.meta.gid = self.shift(node.meta.gid);
        if let Body::Dir(children) = &mut node.body {
            children.iter_mut().for_each(|child| self.unshift(child));
        }
    }
}

/// Merges the overlayfs upper directory `upper` onto `base`, uploads the chunks of what
/// changed, and stores the flattened result as a new index (its digest is in the report).
/// Paths in `ignore` (relative, like `etc/resolv.conf`) are left as the base has them: they
/// are the mount points a build container was given, not what the step made. With
/// `host_ids`, the upper's owners are mapped back to the namespace's.
pub async fn ingest_layer(
    base: &Index,
    upper: &Path,
    ignore: &[&str],
    host_ids: Option<HostIds>,
    registry: Arc<dyn BlobAccess>,
    options: IngestOptions,
) -> Result<IngestReport> {
    // Sealed and plain chunks would meet in one tree.
    if base.encrypted() {
        return Err(Error::Encrypted(base.digest().clone()));
    }
    if options.cipher.is_some() {
        return Err(Error::Index(crate::IndexError(
            "a layer is never encrypted: ingest the whole tree with the cipher instead".into(),
        )));
    }
    let (mut layer, report) = upload_tree(upper, registry.clone(), options).await?;
    if let Some(ids) = host_ids {
        ids.unshift(&mut layer);
    }
    let mut tree = base.to_tree();
    let ignore: Vec<Vec<&[u8]>> = ignore
        .iter()
        .map(|path| {
            path.split('/')
                .filter(|part| !part.is_empty())
                .map(str::as_bytes)
                .collect()
        })
        .collect();
    let mut path = Vec::new();
    merge_dir(&mut tree, layer, &mut path, &ignore);
    drop_lonely_link_groups(&mut tree);
    store_index(&tree, report, registry.as_ref(), false).await
}

fn is_whiteout(node: &Node) -> bool {
    matches!(node.body, Body::CharDevice(0))
}

fn is_opaque(node: &Node) -> bool {
    node.xattrs
        .iter()
        .any(|(name, value)| name == OPAQUE_XATTR && value == b"y")
}

fn strip_overlay_xattrs(xattrs: &mut Vec<(Vec<u8>, Vec<u8>)>) {
    xattrs.retain(|(name, _)| !name.starts_with(OVERLAY_XATTR_PREFIX));
}

/// Removes overlay's bookkeeping from a node that is new in the upper layer, and renumbers
/// its hard-link groups.
fn from_upper(mut node: Node) -> Node {
    strip_overlay_xattrs(&mut node.xattrs);
    match &mut node.body {
        Body::Dir(children) => {
            let kept = std::mem::take(children)
                .into_iter()
                .filter(|child| !is_whiteout(child))
                .map(from_upper)
                .collect();
            *children = kept;
        }
        Body::File { link_group, .. } => {
            *link_group = link_group.map(|g| g + UPPER_LINK_GROUPS);
        }
        _ => {}
    }
    node
}

/// Applies the upper directory `layer` to the base directory `base`, in place.
fn merge_dir(base: &mut Node, layer: Node, path: &mut Vec<Vec<u8>>, ignore: &[Vec<&[u8]>]) {
    let opaque = is_opaque(&layer);
    // The root's own metadata is the upper directory's, which overlay never copies up.
    if !path.is_empty() {
        base.meta = layer.meta;
        base.xattrs = layer.xattrs;
        strip_overlay_xattrs(&mut base.xattrs);
    }
    let (Body::Dir(children), Body::Dir(changes)) = (&mut base.body, layer.body) else {
        return;
    };
    if opaque {
        children.clear();
    }
    let mut position: HashMap<Vec<u8>, usize> = children
        .iter()
        .enumerate()
        .map(|(i, child)| (child.name.clone(), i))
        .collect();
    let mut removed = Vec::new();
    for change in changes {
        path.push(change.name.clone());
        let ignored = ignore.iter().any(|skip| {
            skip.len() == path.len() && skip.iter().zip(path.iter()).all(|(a, b)| *a == b)
        });
        if !ignored {
            match position.get(&change.name).copied() {
                Some(at) if is_whiteout(&change) => removed.push(at),
                Some(at)
                    if matches!(children[at].body, Body::Dir(_))
                        && matches!(change.body, Body::Dir(_)) =>
                {
                    merge_dir(&mut children[at], change, path, ignore);
                }
                Some(at) => children[at] = from_upper(change),
                None if is_whiteout(&change) => {}
                None => {
                    position.insert(change.name.clone(), children.len());
                    children.push(from_upper(change));
                }
            }
        }
        path.pop();
    }
    removed.sort_unstable();
    for at in removed.into_iter().rev() {
        children.remove(at);
    }
}

/// A hard-link group left with one name after a merge is a plain file.
fn drop_lonely_link_groups(tree: &mut Node) {
    fn count(node: &Node, counts: &mut HashMap<u64, usize>) {
        match &node.body {
            Body::Dir(children) => children.iter().for_each(|c| count(c, counts)),
            Body::File {
                link_group: Some(g),
                ..
            } => *counts.entry(*g).or_default() += 1,
            _ => {}
        }
    }
    fn clear(node: &mut Node, counts: &HashMap<u64, usize>) {
        match &mut node.body {
            Body::Dir(children) => children.iter_mut().for_each(|c| clear(c, counts)),
            Body::File { link_group, .. }
                if link_group.is_some_and(|g| counts.get(&g) == Some(&1)) =>
            {
                *link_group = None;
            }
            _ => {}
        }
    }
    let mut counts = HashMap::new();
    count(tree, &mut counts);
    clear(tree, &counts);
}
