//! Applying one layer tar onto a tree: the part of an import that reads an untrusted stream.
//! Every file is made relative to a directory descriptor opened `O_NOFOLLOW`, one component at
//! a time, so nothing a layer plants can redirect a write outside the tree.

use super::*;

/// Open a directory below `parent` without following a symlink at `name`.
pub(super) fn open_dir<P: rustix::path::Arg>(parent: impl AsFd, name: P) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

pub(super) fn lstat_type(parent: impl AsFd, name: &OsStr) -> Result<Option<FileType>, Errno> {
    match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The names in a directory, without `.` and `..`.
pub(super) fn list(dir: impl AsFd) -> Result<Vec<OsString>, Errno> {
    let mut names = Vec::new();
    for entry in Dir::read_from(dir)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name));
        }
    }
    Ok(names)
}

/// Remove `name` below `parent`, recursively, never following a symlink.
pub(super) fn remove_all(parent: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
    match lstat_type(parent, name)? {
        None => Ok(()),
        Some(FileType::Directory) => {
            let dir = open_dir(parent, name)?;
            for child in list(&dir)? {
                remove_all(dir.as_fd(), &child)?;
            }
            rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)
        }
        Some(_) => rustix::fs::unlinkat(parent, name, AtFlags::empty()),
    }
}

pub(super) fn join(path: &[u8], name: &[u8]) -> Vec<u8> {
    if path.is_empty() {
        name.to_vec()
    } else {
        [path, b"/", name].concat()
    }
}

/// Remove what earlier layers left at `parent/name` (whose tree path is `path`), keeping what
/// the current layer wrote (`touched`: its entries and their parents).
pub(super) fn prune(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    path: &[u8],
    touched: &HashSet<Vec<u8>>,
) -> Result<(), Errno> {
    if !touched.contains(path) {
        return remove_all(parent, name);
    }
    if lstat_type(parent, name)? == Some(FileType::Directory) {
        let dir = open_dir(parent, name)?;
        prune_children(dir.as_fd(), path, touched)?;
    }
    Ok(())
}

pub(super) fn prune_children(
    dir: BorrowedFd<'_>,
    path: &[u8],
    touched: &HashSet<Vec<u8>>,
) -> Result<(), Errno> {
    for child in list(dir)? {
        prune(dir, &child, &join(path, child.as_bytes()), touched)?;
    }
    Ok(())
}

/// Why walking down to a directory stopped (at how many components in).
pub(super) enum WalkErr {
    Missing,
    Symlink(usize),
    NotDir(usize),
    Io(io::Error),
}

/// An entry's path, split into components, with `.` and empty components dropped.
/// `None` if it is absolute or has `..`.
pub(super) fn components(raw: &[u8]) -> Option<Vec<&[u8]>> {
    if raw.first() == Some(&b'/') {
        return None;
    }
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// Owner, mode and time of an entry.
pub(super) struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timespec,
}

impl Meta {
    fn of<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Meta> {
        let h = entry.header();
        let mode = h.mode()? & 0o7777;
        let (mut uid, mut gid) = (h.uid()?, h.gid()?);
        let mut mtime = Timespec {
            tv_sec: i64::try_from(h.mtime()?).unwrap_or(0),
            tv_nsec: 0,
        };
        if let Some(exts) = entry.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                let (Ok(key), Ok(value)) = (ext.key(), ext.value()) else {
                    continue;
                };
                match key {
                    "uid" => uid = value.parse().unwrap_or(uid),
                    "gid" => gid = value.parse().unwrap_or(gid),
                    "mtime" => mtime = pax_time(value).unwrap_or(mtime),
                    _ => {}
                }
            }
        }
        let id = |v: u64| {
            u32::try_from(v)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "uid or gid out of range"))
        };
        Ok(Meta {
            mode,
            uid: id(uid)?,
            gid: id(gid)?,
            mtime,
        })
    }

    fn times(&self) -> Timestamps {
        Timestamps {
            last_access: self.mtime,
            last_modification: self.mtime,
        }
    }

    fn owner(&self) -> (Option<Uid>, Option<Gid>) {
        (Some(Uid::from_raw(self.uid)), Some(Gid::from_raw(self.gid)))
    }
}

/// A PAX time, `SECONDS[.FRACTION]`.
pub(super) fn pax_time(value: &str) -> Option<Timespec> {
    let (secs, frac) = value.split_once('.').unwrap_or((value, ""));
    let tv_sec: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let mut tv_nsec: i64 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    for _ in digits.len()..9 {
        tv_nsec *= 10;
    }
    if tv_sec < 0 && tv_nsec != 0 {
        return Some(Timespec {
            tv_sec: tv_sec - 1,
            tv_nsec: 1_000_000_000 - tv_nsec,
        });
    }
    Some(Timespec { tv_sec, tv_nsec })
}

/// Applies one uncompressed layer tar onto `dest` (an existing directory), with every rule of
/// [`unpack`] but the digest checks; returns what it skipped. The part of an import that
/// reads an untrusted stream: what the fuzz target drives.
pub fn unpack_layer(layer: impl Read, dest: &Path) -> Result<Vec<String>, OciError> {
    let root = open_dir(rustix::fs::CWD, dest)
        .map_err(|e| io_err(format!("opening {}", dest.display()))(e.into()))?;
    let mut unpacker = Unpacker {
        root,
        skipped: Vec::new(),
    };
    unpacker.apply(layer, "1")?;
    Ok(unpacker.skipped)
}

/// Applies layers onto the tree below `root`.
pub(super) struct Unpacker {
    pub(super) root: OwnedFd,
    pub(super) skipped: Vec<String>,
}

impl Unpacker {
    /// Walk down `comps` from the root, one `O_NOFOLLOW` open at a time; with `create`, make
    /// missing directories (0755, owned by us).
    fn walk(&self, comps: &[&[u8]], create: bool) -> Result<OwnedFd, WalkErr> {
        let mut cur = self.root.try_clone().map_err(WalkErr::Io)?;
        for (i, c) in comps.iter().enumerate() {
            let name = OsStr::from_bytes(c);
            cur = match open_dir(&cur, name) {
                Ok(fd) => fd,
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(&cur, name, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(WalkErr::Io(e.into())),
                    }
                    let fd = open_dir(&cur, name).map_err(|e| WalkErr::Io(e.into()))?;
                    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))
                        .map_err(|e| WalkErr::Io(e.into()))?;
                    fd
                }
                Err(Errno::NOENT) => return Err(WalkErr::Missing),
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    return Err(match lstat_type(&cur, name) {
                        Ok(Some(FileType::Symlink)) => WalkErr::Symlink(i + 1),
                        _ => WalkErr::NotDir(i + 1),
                    });
                }
                Err(e) => return Err(WalkErr::Io(e.into())),
            };
        }
        Ok(cur)
    }

    /// Apply one layer (an uncompressed tar stream).
    pub(super) fn apply(&mut self, layer: impl Read, label: &str) -> Result<(), OciError> {
        let mut archive = tar::Archive::new(layer);
        let read_err = |e: io::Error| OciError::Io {
            what: format!("reading layer {label}"),
            source: e,
        };
        // Paths this layer wrote, and their parents: whiteouts only hide earlier layers.
        let mut touched: HashSet<Vec<u8>> = HashSet::new();
        // Directory times are set once the layer is done, as adding entries changes them.
        let mut dir_times: Vec<(Vec<u8>, Timestamps)> = Vec::new();

        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            let kind = entry.header().entry_type();
            if kind.is_pax_global_extensions()
                || kind.is_pax_local_extensions()
                || kind.is_gnu_longname()
                || kind.is_gnu_longlink()
            {
                continue;
            }
            let raw = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw).into_owned();
            let bad = |problem: String| OciError::BadEntry {
                layer: label.to_owned(),
                entry: shown.clone(),
                problem,
            };
            let Some(comps) = components(&raw) else {
                return Err(OciError::PathEscape {
                    layer: label.to_owned(),
                    entry: shown.clone(),
                });
            };
            if raw.len() > MAX_PATH {
                return Err(bad(format!("is longer than {MAX_PATH} bytes")));
            }
            let entry_err = |e: io::Error| OciError::Entry {
                layer: label.to_owned(),
                entry: shown.clone(),
                source: e,
            };
            let walk_err = |e: WalkErr, comps: &[&[u8]], entry: &str, what: &str| match e {
                WalkErr::Symlink(n) => OciError::SymlinkInPath {
                    layer: label.to_owned(),
                    entry: entry.to_owned(),
                    symlink: String::from_utf8_lossy(&comps[..n].join(&b'/')).into_owned(),
                },
                WalkErr::NotDir(n) => bad(format!(
                    "needs {} to be a directory, but an earlier entry made it something else",
                    String::from_utf8_lossy(&comps[..n].join(&b'/'))
                )),
                WalkErr::Missing => bad(format!("{what} does not exist")),
                WalkErr::Io(e) => entry_err(e),
            };
            let meta = Meta::of(&mut entry).map_err(entry_err)?;

            let Some((&last, parents)) = comps.split_last() else {
                // The root itself (`./`).
                if kind.is_dir() {
                    self.set_owner_mode(self.root.as_fd(), &meta)
                        .map_err(|e| entry_err(e.into()))?;
                    dir_times.push((Vec::new(), meta.times()));
                }
                continue;
            };
            let parent_path = parents.join(&b'/');

            if let Some(hidden) = last.strip_prefix(b".wh.") {
                let parent = match self.walk(parents, false) {
                    Ok(fd) => fd,
                    // Nothing of earlier layers can be there.
                    Err(WalkErr::Missing | WalkErr::Symlink(_) | WalkErr::NotDir(_)) => continue,
                    Err(WalkErr::Io(e)) => return Err(entry_err(e)),
                };
                if hidden == b".wh..opq" {
                    prune_children(parent.as_fd(), &parent_path, &touched)
                        .map_err(|e| entry_err(e.into()))?;
                } else if hidden.starts_with(b".wh.") || hidden.is_empty() || hidden == b"." {
                    // Other AUFS metadata (`.wh..wh.plnk`, ...): not part of the image.
                } else if hidden == b".." {
                    return Err(OciError::PathEscape {
                        layer: label.to_owned(),
                        entry: shown.clone(),
                    });
                } else {
                    let path = join(&parent_path, hidden);
                    prune(parent.as_fd(), OsStr::from_bytes(hidden), &path, &touched)
                        .map_err(|e| entry_err(e.into()))?;
                }
                continue;
            }

            let parent = self
                .walk(parents, true)
                .map_err(|e| walk_err(e, &comps, &shown, "its parent"))?;
            for n in 1..=comps.len() {
                touched.insert(comps[..n].join(&b'/'));
            }
            let name = OsStr::from_bytes(last);
            let parent = parent.as_fd();

            if kind.is_dir() {
                match lstat_type(parent, name).map_err(|e| entry_err(e.into()))? {
                    Some(FileType::Directory) => {}
                    existing => {
                        if existing.is_some() {
                            remove_all(parent, name).map_err(|e| entry_err(e.into()))?;
                        }
                        rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700))
                            .map_err(|e| entry_err(e.into()))?;
                    }
                }
                let dir = open_dir(parent, name).map_err(|e| entry_err(e.into()))?;
                self.set_owner_mode(dir.as_fd(), &meta)
                    .map_err(|e| entry_err(e.into()))?;
                dir_times.push((comps.join(&b'/'), meta.times()));
            } else if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
                remove_all(parent, name).map_err(|e| entry_err(e.into()))?;
                let fd = rustix::fs::openat(
                    parent,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| entry_err(e.into()))?;
                let mut file = File::from(fd);
                io::copy(&mut entry, &mut file).map_err(entry_err)?;
                self.set_owner_mode(file.as_fd(), &meta)
                    .and_then(|()| rustix::fs::futimens(&file, &meta.times()))
                    .map_err(|e| entry_err(e.into()))?;
            } else if kind.is_symlink() {
                let Some(target) = entry.link_name_bytes() else {
                    return Err(bad("is a symlink without a target".into()));
                };
                remove_all(parent, name).map_err(|e| entry_err(e.into()))?;
                // Stored as written: it resolves inside the container, never here.
                rustix::fs::symlinkat(OsStr::from_bytes(&target), parent, name)
                    .map_err(|e| entry_err(e.into()))?;
                let (uid, gid) = meta.owner();
                rustix::fs::chownat(parent, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
                    .and_then(|()| {
                        rustix::fs::utimensat(
                            parent,
                            name,
                            &meta.times(),
                            AtFlags::SYMLINK_NOFOLLOW,
                        )
                    })
                    .map_err(|e| entry_err(e.into()))?;
            } else if kind.is_hard_link() {
                let Some(target_raw) = entry.link_name_bytes() else {
                    return Err(bad("is a hard link without a target".into()));
                };
                let target_shown = String::from_utf8_lossy(&target_raw).into_owned();
                let Some(target) = components(&target_raw).filter(|t| !t.is_empty()) else {
                    return Err(OciError::PathEscape {
                        layer: label.to_owned(),
                        entry: format!("{shown} (hard link to {target_shown})"),
                    });
                };
                if target == comps {
                    continue;
                }
                let (&tname, tparents) = target.split_last().expect("not empty");
                let what = format!("its hard link target {target_shown:?}");
                let tdir = self.walk(tparents, false).map_err(|e| {
                    let entry = format!("{shown} (hard link to {target_shown})");
                    walk_err(e, &target, &entry, &what)
                })?;
                let tname = OsStr::from_bytes(tname);
                match lstat_type(&tdir, tname).map_err(|e| entry_err(e.into()))? {
                    None => return Err(bad(format!("{what} does not exist"))),
                    Some(FileType::Directory) => {
                        return Err(bad(format!("{what} is a directory")));
                    }
                    Some(_) => {}
                }
                remove_all(parent, name).map_err(|e| entry_err(e.into()))?;
                // No AT_SYMLINK_FOLLOW: a symlink target is linked itself, not followed.
                rustix::fs::linkat(&tdir, tname, parent, name, AtFlags::empty())
                    .map_err(|e| entry_err(e.into()))?;
            } else if kind.is_fifo() {
                remove_all(parent, name).map_err(|e| entry_err(e.into()))?;
                rustix::fs::mknodat(parent, name, FileType::Fifo, Mode::empty(), 0)
                    .map_err(|e| entry_err(e.into()))?;
                let (uid, gid) = meta.owner();
                rustix::fs::chownat(parent, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
                    .and_then(|()| {
                        rustix::fs::chmodat(
                            parent,
                            name,
                            Mode::from_raw_mode(meta.mode),
                            AtFlags::empty(),
                        )
                    })
                    .and_then(|()| {
                        rustix::fs::utimensat(
                            parent,
                            name,
                            &meta.times(),
                            AtFlags::SYMLINK_NOFOLLOW,
                        )
                    })
                    .map_err(|e| entry_err(e.into()))?;
            } else if kind.is_character_special() || kind.is_block_special() {
                // Not created: the container gets its own /dev, and device nodes in an
                // unpacked tree would be reachable from the host.
                self.skipped.push(format!("{shown} (device node)"));
            } else {
                self.skipped
                    .push(format!("{shown} (unsupported tar entry type {kind:?})"));
            }
        }

        for (path, times) in dir_times {
            let comps: Vec<&[u8]> = components(&path).unwrap_or_default();
            // Best effort: a later entry of the layer may have replaced the directory.
            match comps.split_last() {
                None => {
                    let _ = rustix::fs::futimens(&self.root, &times);
                }
                Some((last, parents)) => {
                    if let Ok(parent) = self.walk(parents, false) {
                        let _ = rustix::fs::utimensat(
                            &parent,
                            OsStr::from_bytes(last),
                            &times,
                            AtFlags::SYMLINK_NOFOLLOW,
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Owner then mode (chown clears setuid bits, so it comes first).
    fn set_owner_mode(&self, fd: BorrowedFd<'_>, meta: &Meta) -> Result<(), Errno> {
        let (uid, gid) = meta.owner();
        rustix::fs::fchown(fd, uid, gid)?;
        rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode))
    }
}
