//! The index: a compact, versioned binary description of a tree (see `fs/FORMAT.md`).
//!
//! Entries are fixed-size little-endian records read in place with `zerocopy`, so loading
//! checks the bytes once and allocates nothing per file. Directories own contiguous,
//! name-sorted runs of child entries, so a path is found by one binary search per component.

use std::ops::Range;
use std::path::PathBuf;

use bytes::Bytes;
use lode_registry::Digest;
use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First eight bytes of every index.
pub const MAGIC: [u8; 8] = *b"LODEIDX\0";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Entry id of the root directory.
pub const ROOT: u32 = 0;

/// Why index bytes were refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid index: {0}")]
pub struct IndexError(pub String);

fn invalid<T>(message: impl Into<String>) -> Result<T, IndexError> {
    Err(IndexError(message.into()))
}

/// The fixed header at offset 0.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawHeader {
    pub magic: [u8; 8],
    pub version: U32,
    pub flags: U32,
    pub entry_count: U32,
    pub chunk_count: U32,
    pub xattr_count: U32,
    pub reserved: U32,
    pub heap_len: U64,
}

/// One file, directory, symlink or special file. 64 bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawEntry {
    pub name_off: U32,
    pub name_len: U16,
    pub kind: u8,
    pub flags: u8,
    pub mode: U32,
    pub uid: U32,
    pub gid: U32,
    pub parent: U32,
    pub mtime_sec: I64,
    pub mtime_nsec: U32,
    /// Hard-link group: 0 for none, else 1 + the id of the group's first entry.
    pub link: U32,
    /// File size; symlink target length; device number for block and char devices.
    pub size: U64,
    /// Directory: first child. File: first chunk, or heap offset when inline. Symlink:
    /// heap offset of the target.
    pub a: U32,
    /// Directory: child count. File: chunk count (0 when inline).
    pub b: U32,
    pub xattr_first: U32,
    pub xattr_count: U32,
}

/// A piece of a file, stored as one blob. 48 bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawChunk {
    digest: [u8; 32],
    offset: U64,
    length: U32,
    reserved: U32,
}

impl RawChunk {
    pub(crate) fn new(digest: &Digest, offset: u64, length: u32) -> Self {
        Self {
            digest: *digest.as_bytes(),
            offset: offset.into(),
            length: length.into(),
            reserved: 0.into(),
        }
    }

    /// The blob holding this piece.
    pub fn digest(&self) -> Digest {
        Digest::from_hash(self.digest)
    }

    /// Where the piece starts in the file.
    pub fn offset(&self) -> u64 {
        self.offset.get()
    }

    /// The piece's length.
    pub fn length(&self) -> u32 {
        self.length.get()
    }
}

/// An extended attribute: name and value live in the heap. 16 bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawXattr {
    pub name_off: U32,
    pub name_len: U32,
    pub value_off: U32,
    pub value_len: U32,
}

/// Entry flag: the file's bytes are in the heap, not in chunks.
pub(crate) const FLAG_INLINE: u8 = 1;
/// Header flag: every chunk is sealed ([`crate::ChunkCipher`]), and no file bytes are inline.
pub(crate) const HEADER_ENCRYPTED: u32 = 1;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A directory.
    Dir = 1,
    /// A regular file.
    File = 2,
    /// A symbolic link.
    Symlink = 3,
    /// A character device.
    CharDevice = 4,
    /// A block device.
    BlockDevice = 5,
    /// A named pipe.
    Fifo = 6,
    /// A Unix socket.
    Socket = 7,
}

impl Kind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Dir,
            2 => Self::File,
            3 => Self::Symlink,
            4 => Self::CharDevice,
            5 => Self::BlockDevice,
            6 => Self::Fifo,
            7 => Self::Socket,
            _ => return None,
        })
    }
}

/// Where a file's bytes are.
#[derive(Debug, Clone, Copy)]
pub enum Content<'a> {
    /// Small files: the bytes themselves.
    Inline(&'a [u8]),
    /// Larger files: blobs in order.
    Chunks(&'a [RawChunk]),
}

/// A loaded, validated index.
#[derive(Clone)]
pub struct Index {
    bytes: Bytes,
    digest: Digest,
    entries: Range<usize>,
    chunks: Range<usize>,
    xattrs: Range<usize>,
    heap: Range<usize>,
    encrypted: bool,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("digest", &self.digest)
            .field("entries", &self.len())
            .finish_non_exhaustive()
    }
}

const HEADER_LEN: usize = size_of::<RawHeader>();

fn section(
    start: usize,
    count: u64,
    size: usize,
    total: usize,
    what: &str,
) -> Result<Range<usize>, IndexError> {
    let len = count
        .checked_mul(size as u64)
        .and_then(|l| usize::try_from(l).ok())
        .filter(|l| start.checked_add(*l).is_some_and(|end| end <= total));
    match len {
        Some(len) => Ok(start..start + len),
        None => invalid(format!("the {what} section runs past the end of the index")),
    }
}

impl Index {
    /// Checks `bytes` completely and returns the index. Refuses anything that is not a
    /// well-formed tree: bad ranges, names with `/`, `.` or `..`, duplicate or unsorted
    /// names, orphan entries, and chunk lists that do not add up to the file size.
    pub fn parse(bytes: Bytes) -> Result<Self, IndexError> {
        let header = RawHeader::ref_from_prefix(&bytes)
            .map(|(h, _)| *h)
            .or_else(|_| invalid("shorter than its header"))?;
        if header.magic != MAGIC {
            return invalid("not a Lode index (bad magic bytes)");
        }
        if header.version.get() != VERSION {
            return invalid(format!(
                "format version {} is not supported (this lode reads version {VERSION})",
                header.version.get()
            ));
        }
        if header.flags.get() & !HEADER_ENCRYPTED != 0 || header.reserved.get() != 0 {
            return invalid(
                "header flags are set that this lode does not know; it needs a newer lode",
            );
        }
        let total = bytes.len();
        let entries = section(
            HEADER_LEN,
            header.entry_count.get().into(),
            size_of::<RawEntry>(),
            total,
            "entry",
        )?;
        let chunks = section(
            entries.end,
            header.chunk_count.get().into(),
            size_of::<RawChunk>(),
            total,
            "chunk",
        )?;
        let xattrs = section(
            chunks.end,
            header.xattr_count.get().into(),
            size_of::<RawXattr>(),
            total,
            "xattr",
        )?;
        let heap = section(xattrs.end, header.heap_len.get(), 1, total, "heap")?;
        if heap.end != total {
            return invalid("trailing bytes after the heap");
        }
        let index = Self {
            digest: Digest::of(&bytes),
            bytes,
            entries,
            chunks,
            xattrs,
            heap,
            encrypted: header.flags.get() & HEADER_ENCRYPTED != 0,
        };
        index.validate()?;
        Ok(index)
    }

    fn raw_entries(&self) -> &[RawEntry] {
        <[RawEntry]>::ref_from_bytes(&self.bytes[self.entries.clone()])
            .expect("entry section length checked at parse")
    }

    fn raw_chunks(&self) -> &[RawChunk] {
        <[RawChunk]>::ref_from_bytes(&self.bytes[self.chunks.clone()])
            .expect("chunk section length checked at parse")
    }

    fn raw_xattrs(&self) -> &[RawXattr] {
        <[RawXattr]>::ref_from_bytes(&self.bytes[self.xattrs.clone()])
            .expect("xattr section length checked at parse")
    }

    fn heap_slice(&self, offset: u32, len: u64) -> Option<&[u8]> {
        let heap = &self.bytes[self.heap.clone()];
        let start = offset as usize;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        heap.get(start..end)
    }

    fn validate(&self) -> Result<(), IndexError> {
        let entries = self.raw_entries();
        let chunks = self.raw_chunks();
        let xattrs = self.raw_xattrs();
        let Some(root) = entries.first() else {
            return invalid("it has no root directory");
        };
        if Kind::from_u8(root.kind) != Some(Kind::Dir)
            || root.name_len.get() != 0
            || root.parent.get() != 0
        {
            return invalid("entry 0 must be the root directory, with an empty name");
        }
        for (i, xattr) in xattrs.iter().enumerate() {
            let name = self.heap_slice(xattr.name_off.get(), xattr.name_len.get().into());
            let value = self.heap_slice(xattr.value_off.get(), xattr.value_len.get().into());
            if name.is_none_or(|n| n.is_empty() || n.contains(&0)) || value.is_none() {
                return invalid(format!("xattr {i} has a bad name or value range"));
            }
        }
        // Each directory claims the next run of entries as its children, in entry order, so
        // every entry but the root has exactly one parent, which comes before it. Chunk and
        // xattr records are owned the same way, in entry order, so none is shared by accident
        // or left over.
        let mut next_unclaimed: u64 = 1;
        let mut next_chunk: u64 = 0;
        let mut next_xattr: u64 = 0;
        for (id, entry) in entries.iter().enumerate() {
            let at = |what: &str| IndexError(format!("entry {id}: {what}"));
            if id > 0 && id as u64 >= next_unclaimed {
                return Err(at("it is in no directory"));
            }
            let kind = Kind::from_u8(entry.kind).ok_or_else(|| at("unknown entry kind"))?;
            let name = self
                .heap_slice(entry.name_off.get(), entry.name_len.get().into())
                .ok_or_else(|| at("name runs past the heap"))?;
            if id > 0 {
                check_name(name).map_err(|why| at(&format!("name {:?} {why}", lossy(name))))?;
            }
            if entry.mode.get() & !0o7777 != 0 {
                return Err(at("mode has bits beyond 0o7777"));
            }
            if entry.mtime_nsec.get() >= 1_000_000_000 {
                return Err(at("mtime nanoseconds are not below one second"));
            }
            let inline = entry.flags & FLAG_INLINE != 0;
            if entry.flags & !FLAG_INLINE != 0 || (inline && kind != Kind::File) {
                return Err(at("unknown flags are set"));
            }
            if inline && self.encrypted && entry.size.get() > 0 {
                return Err(at("file bytes are inline in an encrypted index"));
            }
            let (a, b, size) = (
                u64::from(entry.a.get()),
                u64::from(entry.b.get()),
                entry.size.get(),
            );
            let link = entry.link.get();
            // A hard link other than its group's first shares the first one's content.
            let shares_content = link != 0 && link as usize - 1 != id;
            let unused_zero = match kind {
                Kind::Dir => size == 0,
                Kind::File | Kind::Symlink => b == 0 || (kind == Kind::File && !inline),
                Kind::CharDevice | Kind::BlockDevice => a == 0 && b == 0,
                Kind::Fifo | Kind::Socket => a == 0 && b == 0 && size == 0,
            };
            if !unused_zero {
                return Err(at("a field this kind of entry does not use is set"));
            }
            match kind {
                Kind::Dir => {
                    if a != next_unclaimed {
                        return Err(at("children are not the next run of entries"));
                    }
                    next_unclaimed += b;
                    if next_unclaimed > entries.len() as u64 {
                        return Err(at("children run past the last entry"));
                    }
                    let mut previous: Option<&[u8]> = None;
                    for child in &entries[a as usize..(a + b) as usize] {
                        if child.parent.get() as usize != id {
                            return Err(at("a child names another parent"));
                        }
                        let child_name = self
                            .heap_slice(child.name_off.get(), child.name_len.get().into())
                            .ok_or_else(|| at("a child's name runs past the heap"))?;
                        if previous.is_some_and(|p| p >= child_name) {
                            return Err(at(&format!(
                                "children are not sorted or repeat a name ({:?})",
                                lossy(child_name)
                            )));
                        }
                        previous = Some(child_name);
                    }
                }
                Kind::File if inline && self.heap_slice(entry.a.get(), size).is_none() => {
                    return Err(at("inline data runs past the heap"));
                }
                Kind::File if inline => {}
                Kind::File if shares_content => {}
                Kind::File => {
                    if a != next_chunk || a + b > chunks.len() as u64 {
                        return Err(at("chunk list is not the next run of the chunk table"));
                    }
                    next_chunk += b;
                    let mut offset = 0u64;
                    for chunk in &chunks[a as usize..(a + b) as usize] {
                        if chunk.offset() != offset
                            || chunk.length() == 0
                            || chunk.reserved.get() != 0
                        {
                            return Err(at("chunks do not tile the file"));
                        }
                        offset += u64::from(chunk.length());
                    }
                    if offset != size {
                        return Err(at("chunks do not add up to the file size"));
                    }
                }
                Kind::Symlink => {
                    let target = self
                        .heap_slice(entry.a.get(), size)
                        .ok_or_else(|| at("symlink target runs past the heap"))?;
                    if target.is_empty() || target.contains(&0) {
                        return Err(at("symlink target is empty or holds a NUL byte"));
                    }
                }
                _ => {}
            }
            if link != 0 {
                // The group's first file has the lowest id and names itself.
                let first = link as usize - 1;
                let matches = first <= id
                    && kind == Kind::File
                    && entries[first].link.get() == link
                    && (entries[first].a, entries[first].b, entries[first].size)
                        == (entry.a, entry.b, entry.size)
                    && entries[first].flags == entry.flags;
                if !matches {
                    return Err(at("hard link does not match its group's first file"));
                }
            }
            let (first_xattr, count) = (
                u64::from(entry.xattr_first.get()),
                u64::from(entry.xattr_count.get()),
            );
            if first_xattr != next_xattr || first_xattr + count > xattrs.len() as u64 {
                return Err(at("xattr list is not the next run of the xattr table"));
            }
            next_xattr += count;
            let own = &xattrs[first_xattr as usize..(first_xattr + count) as usize];
            let names = own.iter().map(|x| {
                self.heap_slice(x.name_off.get(), x.name_len.get().into())
                    .unwrap_or_default()
            });
            if names.clone().zip(names.skip(1)).any(|(x, y)| x >= y) {
                return Err(at("xattrs are not sorted or repeat a name"));
            }
        }
        if next_unclaimed != entries.len() as u64 {
            return invalid("some entries are in no directory");
        }
        if next_chunk != chunks.len() as u64 || next_xattr != xattrs.len() as u64 {
            return invalid("the chunk or xattr table has records no entry owns");
        }
        Ok(())
    }

    /// The digest of the index bytes: the image's identity.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Whether its chunks are sealed: its files read only with the key
    /// ([`crate::ChunkCipher`]).
    pub fn encrypted(&self) -> bool {
        self.encrypted
    }

    /// The encoded index.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// How many entries, the root included.
    pub fn len(&self) -> usize {
        self.raw_entries().len()
    }

    /// Never true for a parsed index: the root always exists.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The entry with this id. Panics if the id is out of range.
    pub fn entry(&self, id: u32) -> Entry<'_> {
        Entry {
            index: self,
            id,
            raw: &self.raw_entries()[id as usize],
        }
    }

    /// Every entry, in id order.
    pub fn entries(&self) -> impl Iterator<Item = Entry<'_>> {
        (0..self.len() as u32).map(|id| self.entry(id))
    }

    /// The child of directory `dir` called `name`.
    pub fn lookup(&self, dir: u32, name: &[u8]) -> Option<Entry<'_>> {
        let children = self.entry(dir).children()?;
        let entries = &self.raw_entries()[children.start as usize..children.end as usize];
        let found = entries
            .binary_search_by(|child| {
                self.heap_slice(child.name_off.get(), child.name_len.get().into())
                    .unwrap_or_default()
                    .cmp(name)
            })
            .ok()?;
        Some(self.entry(children.start + found as u32))
    }

    /// The entry at a `/`-separated path relative to the root (`""` is the root).
    pub fn resolve(&self, path: &str) -> Option<Entry<'_>> {
        let mut at = self.entry(ROOT);
        for component in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            at = self.lookup(at.id(), component.as_bytes())?;
        }
        Some(at)
    }

    /// Every entry with its path relative to the root, parents before children.
    pub fn walk(&self) -> Vec<(PathBuf, Entry<'_>)> {
        use std::os::unix::ffi::OsStrExt;
        let mut out = Vec::with_capacity(self.len());
        let mut paths: Vec<PathBuf> = Vec::with_capacity(self.len());
        for entry in self.entries() {
            let path = if entry.id() == ROOT {
                PathBuf::new()
            } else {
                paths[entry.parent() as usize].join(std::ffi::OsStr::from_bytes(entry.name()))
            };
            paths.push(path.clone());
            out.push((path, entry));
        }
        out
    }

    /// Sum of regular file sizes, counting each hard-link group once.
    pub fn file_bytes(&self) -> u64 {
        self.entries()
            .filter(|e| e.kind() == Kind::File && e.link_primary().is_none_or(|p| p == e.id()))
            .map(|e| e.size())
            .sum()
    }

    /// Every distinct chunk digest the tree needs.
    pub fn chunk_digests(&self) -> Vec<Digest> {
        let mut digests: Vec<Digest> = self.raw_chunks().iter().map(RawChunk::digest).collect();
        digests.sort();
        digests.dedup();
        digests
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Checks one path component.
pub(crate) fn check_name(name: &[u8]) -> Result<(), &'static str> {
    match name {
        [] => Err("is empty"),
        b"." | b".." => Err("would leave its directory"),
        _ if name.contains(&b'/') => Err("holds '/'"),
        _ if name.contains(&0) => Err("holds a NUL byte"),
        _ if name.len() > 255 => Err("is longer than 255 bytes"),
        _ => Ok(()),
    }
}

/// A view of one entry.
#[derive(Clone, Copy)]
pub struct Entry<'a> {
    index: &'a Index,
    id: u32,
    raw: &'a RawEntry,
}

impl<'a> Entry<'a> {
    /// Its id: the root is 0; ids are stable for one index and serve as inode numbers.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// What it is.
    pub fn kind(&self) -> Kind {
        Kind::from_u8(self.raw.kind).expect("validated at parse")
    }

    /// Its name in its directory (empty for the root).
    pub fn name(&self) -> &'a [u8] {
        self.index
            .heap_slice(self.raw.name_off.get(), self.raw.name_len.get().into())
            .expect("validated at parse")
    }

    /// Its parent directory (the root is its own parent).
    pub fn parent(&self) -> u32 {
        self.raw.parent.get()
    }

    /// Permission bits, with setuid, setgid and sticky (`mode & 0o7777`).
    pub fn mode(&self) -> u32 {
        self.raw.mode.get()
    }

    /// Owner.
    pub fn uid(&self) -> u32 {
        self.raw.uid.get()
    }

    /// Group.
    pub fn gid(&self) -> u32 {
        self.raw.gid.get()
    }

    /// Modification time: seconds and nanoseconds since the epoch.
    pub fn mtime(&self) -> (i64, u32) {
        (self.raw.mtime_sec.get(), self.raw.mtime_nsec.get())
    }

    /// File size or symlink target length; 0 for the rest.
    pub fn size(&self) -> u64 {
        match self.kind() {
            Kind::File | Kind::Symlink => self.raw.size.get(),
            _ => 0,
        }
    }

    /// Device number of a block or character device.
    pub fn rdev(&self) -> u64 {
        match self.kind() {
            Kind::CharDevice | Kind::BlockDevice => self.raw.size.get(),
            _ => 0,
        }
    }

    /// A directory's children, as an id range; `None` for anything else.
    pub fn children(&self) -> Option<Range<u32>> {
        (self.kind() == Kind::Dir).then(|| self.raw.a.get()..self.raw.a.get() + self.raw.b.get())
    }

    /// A file's bytes; `None` for anything else.
    pub fn content(&self) -> Option<Content<'a>> {
        if self.kind() != Kind::File {
            return None;
        }
        Some(if self.raw.flags & FLAG_INLINE != 0 {
            Content::Inline(
                self.index
                    .heap_slice(self.raw.a.get(), self.raw.size.get())
                    .expect("validated at parse"),
            )
        } else {
            let start = self.raw.a.get() as usize;
            Content::Chunks(&self.index.raw_chunks()[start..start + self.raw.b.get() as usize])
        })
    }

    /// A symlink's target; `None` for anything else.
    pub fn symlink_target(&self) -> Option<&'a [u8]> {
        (self.kind() == Kind::Symlink).then(|| {
            self.index
                .heap_slice(self.raw.a.get(), self.raw.size.get())
                .expect("validated at parse")
        })
    }

    /// The id of the first entry of this file's hard-link group, if it has one.
    pub fn link_primary(&self) -> Option<u32> {
        match self.raw.link.get() {
            0 => None,
            link => Some(link - 1),
        }
    }

    /// Extended attributes, as (name, value) pairs.
    pub fn xattrs(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let index = self.index;
        let start = self.raw.xattr_first.get() as usize;
        let end = start + self.raw.xattr_count.get() as usize;
        index.raw_xattrs()[start..end].iter().map(move |x| {
            let name = index.heap_slice(x.name_off.get(), x.name_len.get().into());
            let value = index.heap_slice(x.value_off.get(), x.value_len.get().into());
            (
                name.expect("validated at parse"),
                value.expect("validated at parse"),
            )
        })
    }
}
