//! Reading an OCI layout, a directory or a tar of one read in place: blobs fetched by digest
//! and checked against their descriptors' size and sha256, and the one manifest for this
//! machine's platform chosen from the index.

use super::*;

/// Where the layout's files are: a directory, or members of a tar read in place.
pub(super) enum Layout {
    Dir(PathBuf),
    Tar {
        file: File,
        /// Member name (relative to the layout) → (offset of its data, length).
        members: HashMap<String, (u64, u64)>,
    },
}

/// A byte range of a file, read with `pread`.
pub(super) struct Slice<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for Slice<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end - self.pos;
        if left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let got = self.file.read_at(&mut buf[..n], self.pos)?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.pos += got as u64;
        Ok(got)
    }
}

/// A member name with `.` and empty components dropped; `None` if it has `..`.
pub(super) fn member_name(raw: &[u8]) -> Option<String> {
    let mut parts = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return None,
            c => parts.push(std::str::from_utf8(c).ok()?),
        }
    }
    Some(parts.join("/"))
}

impl Layout {
    pub(super) fn open(source: &Path, scratch: &Path) -> Result<Layout, OciError> {
        let not_layout = |problem: String| OciError::NotLayout {
            path: source.to_owned(),
            problem,
        };
        let meta = match std::fs::metadata(source) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(not_layout("does not exist".into()));
            }
            Err(e) => return Err(io_err(format!("inspecting {}", source.display()))(e)),
            Ok(m) => m,
        };
        if meta.is_dir() {
            if !source.join("index.json").is_file() {
                return Err(not_layout("has no index.json".into()));
            }
            return Ok(Layout::Dir(source.to_owned()));
        }

        let reading = || io_err(format!("reading {}", source.display()));
        let mut file = File::open(source).map_err(reading())?;
        let mut magic = [0u8; 4];
        let n = file.read_at(&mut magic, 0).map_err(reading())?;
        if magic[..n].starts_with(&[0x1f, 0x8b]) {
            // Gzip can't be read in place: decompress to an unnamed temporary file.
            let mut tmp = tempfile::tempfile_in(scratch).map_err(io_err(format!(
                "creating a temporary file in {}",
                scratch.display()
            )))?;
            let mut gz = flate2::bufread::MultiGzDecoder::new(BufReader::with_capacity(BUF, file));
            io::copy(&mut gz, &mut tmp).map_err(|e| {
                not_layout(format!("is a gzip file that does not decompress ({e})"))
            })?;
            file = tmp;
        } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
            return Err(not_layout(
                "is zstd-compressed: decompress it first (`zstd -d`)".into(),
            ));
        }
        file.seek(SeekFrom::Start(0)).map_err(reading())?;

        let not_tar = |e: io::Error| {
            // The tar error may quote the file's bytes: keep it short and on one line.
            let e: String = e.to_string().chars().take(80).collect();
            not_layout(format!(
                "is neither a directory nor a tar ({})",
                e.escape_debug()
            ))
        };
        let mut members = HashMap::new();
        {
            let mut archive = tar::Archive::new(&file);
            for entry in archive.entries_with_seek().map_err(not_tar)? {
                let entry = entry.map_err(not_tar)?;
                let Some(name) = member_name(&entry.path_bytes()) else {
                    continue;
                };
                let kind = entry.header().entry_type();
                if kind.is_file() || kind.is_contiguous() {
                    members.insert(name, (entry.raw_file_position(), entry.size()));
                } else if kind.is_hard_link() {
                    let target = entry.link_name_bytes().and_then(|t| member_name(&t));
                    if let Some(&at) = target.and_then(|t| members.get(&t)) {
                        members.insert(name, at);
                    }
                }
            }
        }
        // A tar of the layout's directory itself (`tar cf x.tar layout/`) is fine too.
        if !members.contains_key("index.json") {
            let tops: Vec<String> = members
                .keys()
                .filter_map(|k| k.strip_suffix("/index.json"))
                .filter(|dir| !dir.contains('/'))
                .map(|dir| format!("{dir}/"))
                .collect();
            let [prefix] = &tops[..] else {
                return Err(not_layout("has no index.json".into()));
            };
            members = members
                .into_iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(prefix.as_str())?.to_owned(), v)))
                .collect();
        }
        Ok(Layout::Tar { file, members })
    }

    /// A reader of the blob with this digest, and its length.
    pub(super) fn blob(&self, digest: &str) -> Result<(Box<dyn Read + '_>, u64), OciError> {
        let hex = digest_hex(digest)?;
        let missing = |path: String| OciError::MissingBlob {
            digest: digest.to_owned(),
            path,
        };
        match self {
            Layout::Dir(dir) => {
                let path = dir.join("blobs/sha256").join(hex);
                let file = match File::open(&path) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(missing(path.display().to_string()));
                    }
                    other => other.map_err(io_err(format!("opening {}", path.display())))?,
                };
                let len = file
                    .metadata()
                    .map_err(io_err(format!("inspecting {}", path.display())))?
                    .len();
                Ok((Box::new(file), len))
            }
            Layout::Tar { file, members } => {
                let name = format!("blobs/sha256/{hex}");
                let &(pos, len) = members.get(&name).ok_or_else(|| missing(name))?;
                let slice = Slice {
                    file,
                    pos,
                    end: pos + len,
                };
                Ok((Box::new(slice), len))
            }
        }
    }

    pub(super) fn index_json(&self, source: &Path) -> Result<Vec<u8>, OciError> {
        let what = || format!("reading {}/index.json", source.display());
        let mut out = Vec::new();
        match self {
            Layout::Dir(dir) => File::open(dir.join("index.json"))
                .and_then(|f| f.take(MAX_JSON).read_to_end(&mut out))
                .map_err(io_err(what()))?,
            Layout::Tar { file, members } => {
                let &(pos, len) = members.get("index.json").expect("checked in open");
                let slice = Slice {
                    file,
                    pos,
                    end: pos + len.min(MAX_JSON),
                };
                slice
                    .take(MAX_JSON)
                    .read_to_end(&mut out)
                    .map_err(io_err(what()))?
            }
        };
        Ok(out)
    }

    pub(super) fn check_size(desc: &Descriptor, len: u64) -> Result<(), OciError> {
        if len == desc.size {
            Ok(())
        } else {
            Err(OciError::SizeMismatch {
                digest: desc.digest.clone(),
                expected: desc.size,
                actual: len,
            })
        }
    }

    pub(super) fn check_hash(desc: &Descriptor, hasher: Sha256) -> Result<(), OciError> {
        let actual = hex::encode(hasher.finalize());
        if desc.digest.strip_prefix("sha256:") == Some(actual.as_str()) {
            Ok(())
        } else {
            Err(OciError::DigestMismatch {
                digest: desc.digest.clone(),
                actual,
            })
        }
    }

    /// A small verified blob (index, manifest, config), read whole.
    pub(super) fn json_blob(&self, desc: &Descriptor) -> Result<Vec<u8>, OciError> {
        let (blob, len) = self.blob(&desc.digest)?;
        Self::check_size(desc, len)?;
        if len > MAX_JSON {
            return Err(OciError::Malformed {
                what: format!("blob {}", desc.digest),
                problem: format!("{len} bytes is too large for a manifest or config"),
            });
        }
        let mut out = Vec::with_capacity(len as usize);
        blob.take(len)
            .read_to_end(&mut out)
            .map_err(io_err(format!("reading blob {}", desc.digest)))?;
        Self::check_size(desc, out.len() as u64)?;
        Self::check_hash(desc, Sha256::new_with_prefix(&out))?;
        Ok(out)
    }

    /// Check a (large) blob's size and digest, streaming.
    pub(super) fn verify(&self, desc: &Descriptor) -> Result<(), OciError> {
        let (mut blob, len) = self.blob(&desc.digest)?;
        Self::check_size(desc, len)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; BUF];
        let mut total = 0u64;
        loop {
            let n = match blob.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(format!("reading blob {}", desc.digest))(e)),
            };
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        Self::check_size(desc, total)?;
        Self::check_hash(desc, hasher)
    }
}

/// What a descriptor points at.
pub(super) enum Kind {
    Manifest,
    Index,
    Other,
}

pub(super) fn kind_of(layout: &Layout, desc: &Descriptor) -> Result<Kind, OciError> {
    Ok(match desc.media_type.as_deref() {
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => Kind::Manifest,
        Some(OCI_INDEX | DOCKER_LIST) => Kind::Index,
        Some(_) => Kind::Other,
        None => {
            // Media types are optional in old layouts: look at the document itself.
            let doc: serde_json::Value = parse_json(
                &layout.json_blob(desc)?,
                format!("document {}", desc.digest),
            )?;
            if doc.get("manifests").is_some() {
                Kind::Index
            } else if doc.get("layers").is_some() {
                Kind::Manifest
            } else {
                Kind::Other
            }
        }
    })
}

pub(super) fn collect_manifests(
    layout: &Layout,
    descs: Vec<Descriptor>,
    depth: usize,
    out: &mut Vec<Descriptor>,
) -> Result<(), OciError> {
    for desc in descs {
        match kind_of(layout, &desc)? {
            Kind::Manifest => out.push(desc),
            Kind::Index if depth >= MAX_INDEX_DEPTH => {
                return Err(OciError::Malformed {
                    what: format!("image index {}", desc.digest),
                    problem: format!("image indexes nest deeper than {MAX_INDEX_DEPTH}"),
                });
            }
            Kind::Index => {
                let index: Index = parse_json(
                    &layout.json_blob(&desc)?,
                    format!("image index {}", desc.digest),
                )?;
                collect_manifests(layout, index.manifests, depth + 1, out)?;
            }
            Kind::Other => {}
        }
    }
    Ok(())
}

pub(super) fn choose_manifest(layout: &Layout, source: &Path) -> Result<Descriptor, OciError> {
    let index: Index = parse_json(
        &layout.index_json(source)?,
        format!("{}/index.json", source.display()),
    )?;
    let mut all = Vec::new();
    collect_manifests(layout, index.manifests, 0, &mut all)?;
    // Build attestations (buildx) are manifests for platform unknown/unknown.
    let images: Vec<Descriptor> = all
        .iter()
        .filter(|d| d.platform.as_ref().is_none_or(|p| p.os != "unknown"))
        .cloned()
        .collect();
    let candidates = if images.is_empty() { all } else { images };
    match &candidates[..] {
        [] => Err(OciError::NotLayout {
            path: source.to_owned(),
            problem: "lists no image manifest in index.json".into(),
        }),
        [one] => Ok(one.clone()),
        several => {
            let ours = several.iter().find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == PLATFORM_ARCH)
            });
            if let Some(ours) = ours {
                return Ok(ours.clone());
            }
            if several.iter().all(|d| d.platform.is_none()) {
                let names: Vec<&str> = several
                    .iter()
                    .map(|d| {
                        d.annotations
                            .get("org.opencontainers.image.ref.name")
                            .unwrap_or(&d.digest)
                            .as_str()
                    })
                    .collect();
                return Err(OciError::Ambiguous {
                    path: source.to_owned(),
                    count: several.len(),
                    names: names.join(", "),
                });
            }
            let available: Vec<String> = several
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| match &p.variant {
                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                    None => format!("{}/{}", p.os, p.architecture),
                })
                .collect();
            Err(OciError::NoPlatform {
                path: source.to_owned(),
                arch: PLATFORM_ARCH,
                available: available.join(", "),
            })
        }
    }
}
