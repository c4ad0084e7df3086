//! Encodes a tree into index bytes. The encoding is canonical: the same tree always gives
//! the same bytes, so the same digest.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use lode_registry::Digest;
use zerocopy::IntoBytes;

use crate::index::{
    FLAG_INLINE, Index, IndexError, Kind, MAGIC, RawChunk, RawEntry, RawHeader, RawXattr, VERSION,
    check_name,
};

/// Ownership, permissions and time of one entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    /// `mode & 0o7777`.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
}

/// A file's bytes as the index holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileContent {
    /// Small files, stored in the index.
    Inline(Vec<u8>),
    /// The file's chunks in order, as (digest, length).
    Chunks(Vec<(Digest, u32)>),
}

/// What a node is, with what that kind needs.
#[derive(Debug, Clone)]
pub enum Body {
    /// A directory and its children, in any order.
    Dir(Vec<Node>),
    /// A regular file; files that share `link_group` are hard links to one inode.
    File {
        /// Its bytes.
        content: FileContent,
        /// Hard-link group, when the file has more than one name in the tree.
        link_group: Option<u64>,
    },
    /// A symlink and its target.
    Symlink(Vec<u8>),
    /// A character device.
    CharDevice(u64),
    /// A block device.
    BlockDevice(u64),
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
}

/// One entry of a tree being encoded.
#[derive(Debug, Clone)]
pub struct Node {
    /// Name in its parent (empty for the root).
    pub name: Vec<u8>,
    /// Ownership, permissions and time.
    pub meta: Meta,
    /// Extended attributes.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Kind and content.
    pub body: Body,
}

#[derive(Default)]
struct Encoder {
    entries: Vec<RawEntry>,
    chunks: Vec<RawChunk>,
    xattrs: Vec<RawXattr>,
    heap: Vec<u8>,
    interned: HashMap<Vec<u8>, u32>,
    /// Hard-link group → (first entry id, chunk or heap offset, chunk count).
    groups: HashMap<u64, (u32, u32, u32)>,
}

fn too_big(what: &str) -> IndexError {
    IndexError(format!("{what} does not fit the index's 32-bit offsets"))
}

impl Encoder {
    fn heap_push(&mut self, bytes: &[u8]) -> Result<u32, IndexError> {
        let offset = u32::try_from(self.heap.len()).map_err(|_| too_big("the heap"))?;
        self.heap.extend_from_slice(bytes);
        Ok(offset)
    }

    /// Names repeat a lot (`__init__.py`), so each distinct name is stored once.
    fn intern(&mut self, name: &[u8]) -> Result<u32, IndexError> {
        if let Some(&offset) = self.interned.get(name) {
            return Ok(offset);
        }
        let offset = self.heap_push(name)?;
        self.interned.insert(name.to_vec(), offset);
        Ok(offset)
    }

    fn entry(&mut self, node: &Node, id: u32, parent: u32) -> Result<RawEntry, IndexError> {
        let name_off = self.intern(&node.name)?;
        let xattr_first = self.xattrs.len() as u32;
        let mut xattrs: Vec<_> = node.xattrs.iter().collect();
        xattrs.sort();
        for (name, value) in xattrs {
            let raw = RawXattr {
                name_off: self.intern(name)?.into(),
                name_len: (name.len() as u32).into(),
                value_off: self.heap_push(value)?.into(),
                value_len: u32::try_from(value.len())
                    .map_err(|_| too_big("an xattr value"))?
                    .into(),
            };
            self.xattrs.push(raw);
        }
        let (mut flags, mut size, mut a, mut b, mut link) = (0u8, 0u64, 0u32, 0u32, 0u32);
        let kind = match &node.body {
            Body::Dir(_) => Kind::Dir,
            Body::File {
                content,
                link_group,
            } => {
                size = match content {
                    FileContent::Inline(data) => data.len() as u64,
                    FileContent::Chunks(list) => list.iter().map(|(_, len)| u64::from(*len)).sum(),
                };
                if matches!(content, FileContent::Inline(_)) {
                    flags |= FLAG_INLINE;
                }
                let shared = link_group.and_then(|g| self.groups.get(&g).copied());
                if let Some((first, start, count)) = shared {
                    (a, b, link) = (start, count, first + 1);
                } else {
                    (a, b) = match content {
                        FileContent::Inline(data) => (self.heap_push(data)?, 0),
                        FileContent::Chunks(list) => {
                            let start = self.chunks.len() as u32;
                            let mut offset = 0u64;
                            for (digest, len) in list {
                                self.chunks.push(RawChunk::new(digest, offset, *len));
                                offset += u64::from(*len);
                            }
                            (start, list.len() as u32)
                        }
                    };
                    if let Some(group) = link_group {
                        self.groups.insert(*group, (id, a, b));
                        link = id + 1;
                    }
                }
                Kind::File
            }
            Body::Symlink(target) => {
                size = target.len() as u64;
                a = self.heap_push(target)?;
                Kind::Symlink
            }
            Body::CharDevice(rdev) => {
                size = *rdev;
                Kind::CharDevice
            }
            Body::BlockDevice(rdev) => {
                size = *rdev;
                Kind::BlockDevice
            }
            Body::Fifo => Kind::Fifo,
            Body::Socket => Kind::Socket,
        };
        Ok(RawEntry {
            name_off: name_off.into(),
            name_len: (node.name.len() as u16).into(),
            kind: kind as u8,
            flags,
            mode: (node.meta.mode & 0o7777).into(),
            uid: node.meta.uid.into(),
            gid: node.meta.gid.into(),
            parent: parent.into(),
            mtime_sec: node.meta.mtime_sec.into(),
            mtime_nsec: node.meta.mtime_nsec.into(),
            link: link.into(),
            size: size.into(),
            a: a.into(),
            b: b.into(),
            xattr_first: xattr_first.into(),
            xattr_count: (self.xattrs.len() as u32 - xattr_first).into(),
        })
    }
}

/// Encodes the tree under `root` (a directory) and loads the result, so ingest refuses
/// exactly what a reader would: names that are empty, `.`, `..`, or hold `/` or NUL, two
/// children with one name, bad symlink targets or xattr names, and so on.
pub fn encode(root: &Node) -> Result<Index, IndexError> {
    encode_flagged(root, 0)
}

/// [`encode`], with header flags (`HEADER_ENCRYPTED` for a tree of sealed chunks).
pub(crate) fn encode_flagged(root: &Node, flags: u32) -> Result<Index, IndexError> {
    if !matches!(root.body, Body::Dir(_)) {
        return Err(IndexError(
            "the root of an index must be a directory".into(),
        ));
    }
    let mut encoder = Encoder::default();
    let mut root_entry = encoder.entry(root, 0, 0)?;
    root_entry.name_len = 0.into();
    encoder.entries.push(root_entry);
    // Breadth first: each directory's children get the next run of ids.
    let mut queue: VecDeque<(&Node, u32)> = VecDeque::from([(root, 0)]);
    while let Some((node, id)) = queue.pop_front() {
        let Body::Dir(children) = &node.body else {
            continue;
        };
        let mut sorted: Vec<&Node> = children.iter().collect();
        sorted.sort_by(|x, y| x.name.cmp(&y.name));
        for pair in sorted.windows(2) {
            if pair[0].name == pair[1].name {
                return Err(IndexError(format!(
                    "two entries named {:?} in one directory",
                    String::from_utf8_lossy(&pair[0].name)
                )));
            }
        }
        let first = u32::try_from(encoder.entries.len()).map_err(|_| too_big("the tree"))?;
        encoder.entries[id as usize].a = first.into();
        encoder.entries[id as usize].b = (sorted.len() as u32).into();
        for child in sorted {
            check_name(&child.name).map_err(|why| {
                IndexError(format!(
                    "entry name {:?} {why}",
                    String::from_utf8_lossy(&child.name)
                ))
            })?;
            let child_id = encoder.entries.len() as u32;
            let entry = encoder.entry(child, child_id, id)?;
            encoder.entries.push(entry);
            queue.push_back((child, child_id));
        }
    }
    let header = RawHeader {
        magic: MAGIC,
        version: VERSION.into(),
        flags: flags.into(),
        entry_count: (encoder.entries.len() as u32).into(),
        chunk_count: u32::try_from(encoder.chunks.len())
            .map_err(|_| too_big("the chunk table"))?
            .into(),
        xattr_count: (encoder.xattrs.len() as u32).into(),
        reserved: 0.into(),
        heap_len: (encoder.heap.len() as u64).into(),
    };
    let mut out = Vec::with_capacity(
        size_of::<RawHeader>()
            + encoder.entries.as_bytes().len()
            + encoder.chunks.as_bytes().len()
            + encoder.xattrs.as_bytes().len()
            + encoder.heap.len(),
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(encoder.entries.as_bytes());
    out.extend_from_slice(encoder.chunks.as_bytes());
    out.extend_from_slice(encoder.xattrs.as_bytes());
    out.extend_from_slice(&encoder.heap);
    Index::parse(Bytes::from(out))
}
