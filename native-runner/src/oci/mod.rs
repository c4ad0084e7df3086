//! Import an OCI image (a layout directory, or a tar of one) into a plain directory tree.
//!
//! Lode's image builder can start from an image exported by `skopeo copy ... oci:DIR` or
//! `docker save` instead of debootstrap. The layers are untrusted tar streams, so this module
//! flattens them itself rather than trusting a tar library's `unpack`:
//!
//! - every blob is checked against its descriptor's sha256 digest and size before it is used
//!   (all layers are verified before anything is written);
//! - entries that are absolute or have a `..` component are refused, naming entry and layer;
//! - files are created relative to directory descriptors opened with `O_NOFOLLOW`, one path
//!   component at a time, so a symlink planted by a layer (`a -> /etc`) is never followed on the
//!   host: an entry that would be written through one (`a/x`) is refused. Symlinks themselves are
//!   stored as-is, whatever they point at: they resolve inside the container later;
//! - hard links must name an existing non-directory inside the tree, reached without symlinks;
//! - whiteouts (`.wh.NAME`, `.wh..wh..opq`) remove what earlier layers put there, as the OCI
//!   image spec says, and are never written themselves.
//!
//! Modes (setuid bits included), owners and modification times are kept; xattrs are not. FIFOs
//! are created; character and block devices are not (the container gets its own minimal `/dev`)
//! and are listed in [`OciConfig::skipped`]. Ownership needs root (or `CAP_CHOWN`).

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Dir, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid};
use rustix::io::Errno;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

mod layer;
mod layout;
pub mod pull;

pub use layer::unpack_layer;
use layer::*;
use layout::*;

/// The OCI architecture name of this machine: the platform picked from a multi-platform image.
#[cfg(target_arch = "x86_64")]
pub const PLATFORM_ARCH: &str = "amd64";
/// The OCI architecture name of this machine: the platform picked from a multi-platform image.
#[cfg(target_arch = "aarch64")]
pub const PLATFORM_ARCH: &str = "arm64";
/// The OCI architecture name of this machine: the platform picked from a multi-platform image.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub const PLATFORM_ARCH: &str = std::env::consts::ARCH;

/// What the image's config says, for the container's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OciConfig {
    /// `Env`, each split at its first `=` (an entry without one gets an empty value).
    pub env: Vec<(String, String)>,
    /// `WorkingDir`, if set and not empty.
    pub workdir: Option<String>,
    /// `Entrypoint` followed by `Cmd`.
    pub cmd: Vec<String>,
    /// `User` (`name`, `uid` or `uid:gid`), if set and not empty.
    pub user: Option<String>,
    /// Entries that were not created, as `path (why)`: device nodes and unknown tar entry types.
    pub skipped: Vec<String>,
}

/// Unpacks the image at `source` into `dest` ([`unpack`]) and writes the settings Lode keeps
/// for its containers where images hold them ([`crate::image_spec::CONFIG_PATH`]): a tree
/// ready to ingest as an image. The user is not among the settings: containers run as the
/// image's root, held by a user namespace.
pub fn import(source: &Path, dest: &Path) -> Result<(), String> {
    let oci = unpack(source, dest).map_err(|e| e.to_string())?;
    // The image may hold /etc as a symlink; the config is written only into a real dir.
    if std::fs::symlink_metadata(dest.join("etc")).is_ok_and(|m| !m.is_dir()) {
        return Err("/etc in the image is not a directory".into());
    }
    let config = crate::image_spec::ImageConfig {
        env: oci.env,
        workdir: oci.workdir,
        cmd: oci.cmd,
        runtime: None,
    };
    let path = dest.join(crate::image_spec::CONFIG_PATH);
    let parent = path.parent().expect("the config path has a parent");
    std::fs::create_dir_all(parent)
        .and_then(|()| {
            std::fs::write(
                &path,
                serde_json::to_vec_pretty(&config).expect("config serializes"),
            )
        })
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Why an image could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The source is neither a layout directory nor a tar of one.
    #[error(
        "not an OCI image layout: {path} {problem} (expected a directory or tar made by \
         `skopeo copy ... oci:DIR` or `docker save`)"
    )]
    NotLayout {
        /// The source given.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The destination exists and is not an empty directory.
    #[error("cannot unpack into {path}: {problem}; give an empty or missing directory")]
    BadDest {
        /// The destination given.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Reading the source or writing the destination failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A JSON document (index, manifest, config) does not parse.
    #[error("{what} is not valid: {source}")]
    Json {
        /// Which document.
        what: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The layout or its documents are inconsistent.
    #[error("{what}: {problem}")]
    Malformed {
        /// Which document.
        what: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A descriptor names a blob the layout does not have.
    #[error("blob {digest} is missing from the layout ({path}): export the image again")]
    MissingBlob {
        /// The digest named.
        digest: String,
        /// Where it was looked for.
        path: String,
    },
    /// A blob's content does not hash to its digest.
    #[error(
        "blob {digest} is corrupt: its content hashes to sha256:{actual}; refusing the image \
         (export it again)"
    )]
    DigestMismatch {
        /// The digest its descriptor names.
        digest: String,
        /// The hex sha256 of what is there.
        actual: String,
    },
    /// A blob's length differs from its descriptor's size.
    #[error(
        "blob {digest} has {actual} bytes but its descriptor says {expected}; refusing the image \
         (export it again)"
    )]
    SizeMismatch {
        /// The digest its descriptor names.
        digest: String,
        /// The descriptor's size.
        expected: u64,
        /// The blob's length.
        actual: u64,
    },
    /// A digest that is not `sha256:` and 64 lowercase hex digits.
    #[error("unsupported digest {digest:?}: Lode reads only sha256:<64 lowercase hex digits>")]
    BadDigest {
        /// The digest as written.
        digest: String,
    },
    /// A manifest, config or layer of a kind Lode does not import.
    #[error(
        "unsupported {what} media type {media_type} (blob {digest}); Lode imports OCI or Docker \
         v2 images with tar or tar+gzip layers"
    )]
    UnsupportedMediaType {
        /// `manifest`, `config` or `layer`.
        what: &'static str,
        /// The media type.
        media_type: String,
        /// The blob it describes.
        digest: String,
    },
    /// A zstd-compressed layer.
    #[error(
        "layer {digest} is zstd-compressed ({media_type}); Lode imports only tar and tar+gzip \
         layers: export the image with gzip layers (e.g. `skopeo copy --dest-compress-format \
         gzip ...`)"
    )]
    ZstdLayer {
        /// The layer's media type.
        media_type: String,
        /// The layer's digest.
        digest: String,
    },
    /// A multi-platform image without this machine's platform.
    #[error(
        "{path} has no linux/{arch} image (it has: {available}); export the linux/{arch} one \
         (e.g. `skopeo copy --override-arch {arch} ...`)"
    )]
    NoPlatform {
        /// The source.
        path: PathBuf,
        /// The architecture wanted ([`PLATFORM_ARCH`]).
        arch: &'static str,
        /// The platforms it has.
        available: String,
    },
    /// A layout holding several images without platforms to tell them apart.
    #[error("{path} holds {count} images ({names}); export just the one to import")]
    Ambiguous {
        /// The source.
        path: PathBuf,
        /// How many manifests.
        count: usize,
        /// Their `org.opencontainers.image.ref.name` annotations or digests.
        names: String,
    },
    /// A layer entry that is absolute or has a `..` component.
    #[error(
        "layer {layer}: entry {entry:?} is absolute or has a `..` component, so it would land \
         outside the image root; refusing the image"
    )]
    PathEscape {
        /// Which layer (position and digest).
        layer: String,
        /// The entry's path (and link target, for hard links).
        entry: String,
    },
    /// A layer entry that would be written (or hard-linked) through a symlink.
    #[error(
        "layer {layer}: entry {entry:?} goes through {symlink:?}, which an earlier entry made a \
         symlink; Lode never follows symlinks while unpacking, so it refuses the image"
    )]
    SymlinkInPath {
        /// Which layer (position and digest).
        layer: String,
        /// The entry's path.
        entry: String,
        /// The symlink in its way.
        symlink: String,
    },
    /// A layer entry that cannot be applied for another reason.
    #[error("layer {layer}: entry {entry:?} {problem}; refusing the image")]
    BadEntry {
        /// Which layer (position and digest).
        layer: String,
        /// The entry's path.
        entry: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Writing a layer entry failed.
    #[error("layer {layer}: writing entry {entry:?}: {source}")]
    Entry {
        /// Which layer (position and digest).
        layer: String,
        /// The entry's path.
        entry: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Unpack the OCI image at `source` (a layout directory, or a tar or gzip-compressed tar of one)
/// into `dest` (an empty or missing directory), and return its config.
///
/// Every blob is verified before anything is written. On an error after that, `dest` may hold a
/// partial tree: remove it.
pub fn unpack(source: &Path, dest: &Path) -> Result<OciConfig, OciError> {
    check_dest(dest)?;
    std::fs::create_dir_all(dest).map_err(io_err(format!("creating {}", dest.display())))?;
    let scratch = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let layout = Layout::open(source, scratch)?;

    let manifest_desc = choose_manifest(&layout, source)?;
    let manifest: Manifest = parse_json(
        &layout.json_blob(&manifest_desc)?,
        format!("manifest {}", manifest_desc.digest),
    )?;
    let config_type = manifest.config.media_type.as_deref().unwrap_or(OCI_CONFIG);
    if config_type != OCI_CONFIG && config_type != DOCKER_CONFIG {
        return Err(OciError::UnsupportedMediaType {
            what: "config",
            media_type: config_type.to_owned(),
            digest: manifest.config.digest.clone(),
        });
    }
    let image: ImageConfig = parse_json(
        &layout.json_blob(&manifest.config)?,
        format!("config {}", manifest.config.digest),
    )?;

    let mut layers = Vec::with_capacity(manifest.layers.len());
    for layer in &manifest.layers {
        layers.push((layer, compression(layer)?));
    }
    for (layer, _) in &layers {
        layout.verify(layer)?;
    }

    let root = open_dir(rustix::fs::CWD, dest)
        .map_err(|e| io_err(format!("opening {}", dest.display()))(e.into()))?;
    let mut unpacker = Unpacker {
        root,
        skipped: Vec::new(),
    };
    for (i, (layer, gzip)) in layers.iter().enumerate() {
        let label = format!("{} ({})", i + 1, layer.digest);
        let (blob, _) = layout.blob(&layer.digest)?;
        let blob = BufReader::with_capacity(BUF, blob);
        if *gzip {
            unpacker.apply(flate2::bufread::MultiGzDecoder::new(blob), &label)?;
        } else {
            unpacker.apply(blob, &label)?;
        }
    }

    let c = image.config.unwrap_or_default();
    let env = c
        .env
        .unwrap_or_default()
        .into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (kv, String::new()),
        })
        .collect();
    let mut cmd = c.entrypoint.unwrap_or_default();
    cmd.extend(c.cmd.unwrap_or_default());
    Ok(OciConfig {
        env,
        workdir: c.working_dir.filter(|w| !w.is_empty()),
        cmd,
        user: c.user.filter(|u| !u.is_empty()),
        skipped: unpacker.skipped,
    })
}

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// JSON documents (index, manifests, config) larger than this are refused.
const MAX_JSON: u64 = 64 << 20;
/// Nested image indexes deeper than this are refused.
const MAX_INDEX_DEPTH: usize = 4;
/// Entry paths longer than this (Linux's `PATH_MAX`) are refused.
const MAX_PATH: usize = 4096;
/// Read buffer for blobs.
const BUF: usize = 256 << 10;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: Option<String>,
    digest: String,
    size: u64,
    platform: Option<Platform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
    variant: Option<String>,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ImageConfig {
    config: Option<ContainerConfig>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    user: Option<String>,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> OciError {
    let what = what.into();
    move |source| OciError::Io { what, source }
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: String) -> Result<T, OciError> {
    serde_json::from_slice(bytes).map_err(|source| OciError::Json { what, source })
}

/// `dest` must be missing or an empty directory (not a symlink to one).
fn check_dest(dest: &Path) -> Result<(), OciError> {
    let bad = |problem: &str| OciError::BadDest {
        path: dest.to_owned(),
        problem: problem.to_owned(),
    };
    match std::fs::symlink_metadata(dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("inspecting {}", dest.display()))(e)),
        Ok(m) if m.file_type().is_symlink() => Err(bad("it is a symlink")),
        Ok(m) if !m.is_dir() => Err(bad("it is not a directory")),
        Ok(_) => {
            let mut entries =
                std::fs::read_dir(dest).map_err(io_err(format!("listing {}", dest.display())))?;
            match entries.next() {
                None => Ok(()),
                Some(_) => Err(bad("it is not empty")),
            }
        }
    }
}

/// The hex of a `sha256:` digest, which also names its file under `blobs/sha256/`.
fn digest_hex(digest: &str) -> Result<&str, OciError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or_else(|| OciError::BadDigest {
            digest: digest.to_owned(),
        })
}

/// Whether a layer is gzip-compressed (else plain tar), from its media type.
fn compression(layer: &Descriptor) -> Result<bool, OciError> {
    let mt = layer.media_type.as_deref().unwrap_or("");
    let known = mt.starts_with("application/vnd.oci.image.layer.")
        || mt.starts_with("application/vnd.docker.image.rootfs.");
    if known && (mt.ends_with("+zstd") || mt.ends_with(".tar.zstd")) {
        return Err(OciError::ZstdLayer {
            media_type: mt.to_owned(),
            digest: layer.digest.clone(),
        });
    }
    if known && (mt.ends_with("+gzip") || mt.ends_with(".tar.gzip")) {
        Ok(true)
    } else if known && mt.ends_with(".tar") {
        Ok(false)
    } else {
        Err(OciError::UnsupportedMediaType {
            what: "layer",
            media_type: mt.to_owned(),
            digest: layer.digest.clone(),
        })
    }
}
