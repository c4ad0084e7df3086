//! OCI image import: layouts built here with `tar`, `flate2` and `sha2`, unpacked for real (as
//! root, so owners are kept).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use lode_native_runner::oci::{OciError, PLATFORM_ARCH, unpack};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_GZIP_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const TAR_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const MTIME: u64 = 1_600_000_000;

/// One layer's tar stream.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Layer(tar::Builder::new(Vec::new()))
    }

    fn header(kind: EntryType, mode: u32, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    }

    /// An entry whose name and link name are written byte for byte (`tar` refuses `..`).
    fn raw(mut self, mut h: Header, name: &[u8], link: &[u8], data: &[u8]) -> Self {
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    fn dir(self, path: &str, mode: u32) -> Self {
        let h = Self::header(EntryType::Directory, mode, 0);
        self.raw(h, path.as_bytes(), b"", b"")
    }

    fn file(self, path: &str, data: &str, mode: u32) -> Self {
        self.owned_file(path, data, mode, 0, 0)
    }

    fn owned_file(self, path: &str, data: &str, mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = Self::header(EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.raw(h, path.as_bytes(), b"", data.as_bytes())
    }

    fn symlink(self, path: &str, target: &str) -> Self {
        let h = Self::header(EntryType::Symlink, 0o777, 0);
        self.raw(h, path.as_bytes(), target.as_bytes(), b"")
    }

    fn hardlink(self, path: &str, target: &str) -> Self {
        let h = Self::header(EntryType::Link, 0o644, 0);
        self.raw(h, path.as_bytes(), target.as_bytes(), b"")
    }

    fn tar(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }

    fn gz(self) -> Vec<u8> {
        gzip(&self.tar())
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An OCI image layout directory being written.
struct Image {
    dir: PathBuf,
}

impl Image {
    fn new(dir: &Path) -> Self {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Image {
            dir: dir.to_owned(),
        }
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap())
    }

    /// Store a blob and return its descriptor.
    fn blob(&self, media_type: &str, bytes: &[u8]) -> Value {
        let d = digest(bytes);
        fs::write(self.blob_path(&d), bytes).unwrap();
        json!({"mediaType": media_type, "digest": d, "size": bytes.len()})
    }

    /// Store config and layers, and return the manifest's descriptor.
    fn manifest(&self, config: Value, layers: Vec<(&str, Vec<u8>)>) -> Value {
        let config = self.blob(
            "application/vnd.oci.image.config.v1+json",
            &serde_json::to_vec(&config).unwrap(),
        );
        let layers: Vec<Value> = layers
            .into_iter()
            .map(|(media_type, bytes)| self.blob(media_type, &bytes))
            .collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": layers,
        });
        self.blob(
            "application/vnd.oci.image.manifest.v1+json",
            &serde_json::to_vec(&manifest).unwrap(),
        )
    }

    fn index(&self, manifests: Vec<Value>) {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }

    /// A single-manifest image of these layers.
    fn single(dir: &Path, layers: Vec<(&str, Vec<u8>)>) -> Self {
        let image = Image::new(dir);
        let manifest = image.manifest(config(), layers);
        image.index(vec![manifest]);
        image
    }

    /// The digest of the `n`th layer of the single manifest.
    fn layer_digest(&self, n: usize) -> String {
        let index: Value =
            serde_json::from_slice(&fs::read(self.dir.join("index.json")).unwrap()).unwrap();
        let manifest = index["manifests"][0]["digest"].as_str().unwrap();
        let manifest: Value =
            serde_json::from_slice(&fs::read(self.blob_path(manifest)).unwrap()).unwrap();
        manifest["layers"][n]["digest"].as_str().unwrap().to_owned()
    }
}

fn config() -> Value {
    json!({
        "architecture": PLATFORM_ARCH,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/bin:/bin", "EQ=a=b"],
            "WorkingDir": "/app",
            "Entrypoint": ["/bin/tool"],
            "Cmd": ["--help"],
            "User": "1000:1000",
        },
        "rootfs": {"type": "layers", "diff_ids": []},
    })
}

/// The image of test 1: two gzip layers with an overwrite, whiteouts and an opaque dir.
fn standard_image(dir: &Path) -> Image {
    let one = Layer::new()
        .dir("./", 0o755)
        .dir("etc/", 0o755)
        .file("etc/keep", "keep", 0o644)
        .file("etc/old", "old", 0o644)
        .file("etc/gone", "gone", 0o644)
        .dir("etc/sub/", 0o755)
        .file("etc/sub/deep", "deep", 0o644)
        .dir("opq/", 0o750)
        .file("opq/a", "a", 0o644)
        .dir("opq/d/", 0o755)
        .file("opq/d/b", "b", 0o644)
        .dir("bin/", 0o755)
        .file("bin/tool", "#!tool", 0o4755)
        .symlink("bin/sh", "tool")
        .hardlink("bin/tool2", "bin/tool")
        .owned_file("home/owned", "mine", 0o640, 1234, 5678)
        .gz();
    let two = Layer::new()
        .dir("etc/", 0o755)
        .file("etc/old", "new", 0o600)
        .raw(
            Layer::header(EntryType::Regular, 0o644, 0),
            b"etc/.wh.gone",
            b"",
            b"",
        )
        .raw(
            Layer::header(EntryType::Regular, 0o644, 0),
            b"etc/.wh.sub",
            b"",
            b"",
        )
        // A whiteout hides earlier layers only, not its own.
        .file("etc/fresh", "fresh", 0o644)
        .raw(
            Layer::header(EntryType::Regular, 0o644, 0),
            b"etc/.wh.fresh",
            b"",
            b"",
        )
        .dir("opq/", 0o755)
        .file("opq/c", "c", 0o644)
        .raw(
            Layer::header(EntryType::Regular, 0o644, 0),
            b"opq/.wh..wh..opq",
            b"",
            b"",
        )
        .gz();
    Image::single(dir, vec![(GZIP_LAYER, one), (DOCKER_GZIP_LAYER, two)])
}

/// Everything in a tree, for comparing two imports.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let m = fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let what = if m.is_dir() {
                stack.push(path.clone());
                "dir".to_owned()
            } else if m.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&path).unwrap().display())
            } else {
                format!("{:?} mtime {}", fs::read(&path).unwrap(), m.mtime())
            };
            let line = format!("{what} mode {:o} {}:{}", m.mode(), m.uid(), m.gid());
            out.insert(rel, line);
        }
    }
    out
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

#[test]
fn two_gzip_layers_flatten_with_whiteouts_modes_links_and_config() {
    let tmp = tempfile::tempdir().unwrap();
    standard_image(&tmp.path().join("image"));
    let root = tmp.path().join("root");
    let config = unpack(&tmp.path().join("image"), &root).unwrap();

    assert_eq!(fs::read_to_string(root.join("etc/keep")).unwrap(), "keep");
    assert_eq!(fs::read_to_string(root.join("etc/old")).unwrap(), "new");
    assert_eq!(mode(&root.join("etc/old")), 0o600);
    assert!(!root.join("etc/gone").exists(), "whited out");
    assert!(
        !root.join("etc/sub").exists(),
        "whited out with its contents"
    );
    assert_eq!(fs::read_to_string(root.join("etc/fresh")).unwrap(), "fresh");
    assert!(
        !root.join("etc/.wh.gone").exists(),
        "whiteouts are not written"
    );

    // Opaque: the earlier contents are gone, this layer's stay, the dir takes the new mode.
    let mut opq: Vec<_> = fs::read_dir(root.join("opq"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    opq.sort();
    assert_eq!(opq, ["c"]);
    assert_eq!(mode(&root.join("opq")), 0o755);

    assert_eq!(mode(&root.join("bin/tool")), 0o4755, "setuid kept");
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("tool")
    );
    let tool = fs::metadata(root.join("bin/tool")).unwrap();
    let tool2 = fs::metadata(root.join("bin/tool2")).unwrap();
    assert_eq!(tool.ino(), tool2.ino(), "hard link shares the inode");
    assert_eq!(tool.nlink(), 2);
    assert_eq!(tool.mtime(), MTIME as i64);

    let owned = fs::metadata(root.join("home/owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1234, 5678));
    assert_eq!(owned.permissions().mode() & 0o7777, 0o640);
    assert_eq!(mode(&root.join("home")), 0o755, "implicit parents are 0755");

    // Nothing named like a whiteout anywhere.
    for path in snapshot(&root).keys() {
        assert!(!path.contains(".wh."), "{path} was written");
    }

    assert_eq!(
        config.env,
        [
            ("PATH".to_owned(), "/usr/bin:/bin".to_owned()),
            ("EQ".to_owned(), "a=b".to_owned())
        ]
    );
    assert_eq!(config.workdir.as_deref(), Some("/app"));
    assert_eq!(config.cmd, ["/bin/tool", "--help"]);
    assert_eq!(config.user.as_deref(), Some("1000:1000"));
    assert!(config.skipped.is_empty());
}

#[test]
fn a_tar_of_the_layout_gives_the_same_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("image");
    standard_image(&layout);
    let from_dir = tmp.path().join("from-dir");
    let want_config = unpack(&layout, &from_dir).unwrap();
    let want = snapshot(&from_dir);

    // `./index.json`, `./blobs/...`: the way `tar -C image -cf image.tar .` writes it.
    let mut plain = tar::Builder::new(Vec::new());
    plain.append_dir_all(".", &layout).unwrap();
    let plain = plain.into_inner().unwrap();
    fs::write(tmp.path().join("image.tar"), &plain).unwrap();
    // A top directory (`tar -cf image.tar image/`), gzipped.
    let mut nested = tar::Builder::new(Vec::new());
    nested.append_dir_all("image", &layout).unwrap();
    fs::write(
        tmp.path().join("image.tar.gz"),
        gzip(&nested.into_inner().unwrap()),
    )
    .unwrap();

    for name in ["image.tar", "image.tar.gz"] {
        let root = tmp.path().join(format!("from-{name}"));
        let config = unpack(&tmp.path().join(name), &root).unwrap();
        assert_eq!(snapshot(&root), want, "{name}");
        assert_eq!(config, want_config, "{name}");
    }
}

#[test]
fn dotdot_and_absolute_entries_are_refused_and_nothing_escapes() {
    let tmp = tempfile::tempdir().unwrap();
    let h = || Layer::header(EntryType::Regular, 0o644, 5);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            Layer::new()
                .file("ok", "fine", 0o644)
                .raw(h(), b"../escape", b"", b"owned")
                .gz(),
            "../escape",
        ),
        (
            "nested",
            Layer::new().raw(h(), b"a/../../escape", b"", b"owned").gz(),
            "a/../../escape",
        ),
        (
            "absolute",
            Layer::new()
                .raw(
                    h(),
                    tmp.path().join("escape").to_str().unwrap().as_bytes(),
                    b"",
                    b"owned",
                )
                .tar(),
            "/escape",
        ),
        (
            "hardlink",
            Layer::new().hardlink("hl", "../escape").gz(),
            "../escape",
        ),
    ];
    for (name, layer, shown) in cases {
        let media = if name == "absolute" {
            TAR_LAYER
        } else {
            GZIP_LAYER
        };
        let image = Image::single(&tmp.path().join(name), vec![(media, layer)]);
        let root = tmp.path().join(format!("{name}-root"));
        let err = unpack(&image.dir, &root).unwrap_err();
        assert!(matches!(err, OciError::PathEscape { .. }), "{name}: {err}");
        let msg = err.to_string();
        assert!(msg.contains(shown), "{name}: {msg}");
        assert!(msg.contains(&image.layer_digest(0)), "{name}: {msg}");
        assert!(!tmp.path().join("escape").exists(), "{name} escaped");
        assert!(!root.join("../escape").exists(), "{name} escaped");
    }
}

#[test]
fn entries_through_a_symlink_are_refused_and_stay_contained() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), "secret").unwrap();
    let outside_s = outside.to_str().unwrap();

    // A later layer writes through a symlink an earlier one made.
    let image = Image::single(
        &tmp.path().join("later"),
        vec![
            (GZIP_LAYER, Layer::new().symlink("link", outside_s).gz()),
            (GZIP_LAYER, Layer::new().file("link/pwned", "x", 0o644).gz()),
        ],
    );
    let err = unpack(&image.dir, &tmp.path().join("root1")).unwrap_err();
    assert!(matches!(err, OciError::SymlinkInPath { .. }), "{err}");
    assert!(err.to_string().contains("link/pwned"), "{err}");
    assert!(!outside.join("pwned").exists());

    // The same layer, through `/`, a few levels down.
    let canary = format!("lode-oci-canary-{}", std::process::id());
    let image = Image::single(
        &tmp.path().join("same"),
        vec![(
            GZIP_LAYER,
            Layer::new()
                .symlink("host", "/")
                .file(&format!("host/tmp/{canary}"), "x", 0o644)
                .gz(),
        )],
    );
    let err = unpack(&image.dir, &tmp.path().join("root2")).unwrap_err();
    assert!(matches!(err, OciError::SymlinkInPath { .. }), "{err}");
    assert!(!Path::new("/tmp").join(&canary).exists());

    // A hard link to a file reached through the symlink.
    let image = Image::single(
        &tmp.path().join("hardlink"),
        vec![(
            GZIP_LAYER,
            Layer::new()
                .symlink("link", outside_s)
                .hardlink("hl", "link/secret")
                .gz(),
        )],
    );
    let root = tmp.path().join("root3");
    let err = unpack(&image.dir, &root).unwrap_err();
    assert!(matches!(err, OciError::SymlinkInPath { .. }), "{err}");
    assert!(!root.join("hl").exists());
    assert_eq!(fs::metadata(outside.join("secret")).unwrap().nlink(), 1);

    // An explicit directory entry replaces the symlink, as Docker does: then it is inside.
    let image = Image::single(
        &tmp.path().join("replaced"),
        vec![
            (GZIP_LAYER, Layer::new().symlink("link", outside_s).gz()),
            (
                GZIP_LAYER,
                Layer::new()
                    .dir("link/", 0o755)
                    .file("link/inside", "x", 0o644)
                    .gz(),
            ),
        ],
    );
    let root = tmp.path().join("root4");
    unpack(&image.dir, &root).unwrap();
    assert!(fs::symlink_metadata(root.join("link")).unwrap().is_dir());
    assert_eq!(fs::read_to_string(root.join("link/inside")).unwrap(), "x");
    let mut left: Vec<_> = fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(left, ["secret"]);
}

#[test]
fn absolute_symlinks_are_stored_as_is_and_never_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("file"), "original").unwrap();
    let target = outside.join("file");
    let target = target.to_str().unwrap();

    let image = Image::single(
        &tmp.path().join("image"),
        vec![
            (
                GZIP_LAYER,
                Layer::new()
                    .symlink("etc/passwd-link", "/etc/passwd")
                    .symlink("up", "../../../../..")
                    .symlink("over", target)
                    .gz(),
            ),
            // Replaces the symlink `over` with a file: must not write through it.
            (
                GZIP_LAYER,
                Layer::new().file("over", "replaced", 0o644).gz(),
            ),
        ],
    );
    let root = tmp.path().join("root");
    unpack(&image.dir, &root).unwrap();

    assert_eq!(
        fs::read_link(root.join("etc/passwd-link")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(
        fs::read_link(root.join("up")).unwrap(),
        Path::new("../../../../..")
    );
    assert!(
        fs::symlink_metadata(root.join("over"))
            .unwrap()
            .file_type()
            .is_file()
    );
    assert_eq!(fs::read_to_string(root.join("over")).unwrap(), "replaced");
    assert_eq!(
        fs::read_to_string(outside.join("file")).unwrap(),
        "original"
    );
}

#[test]
fn a_corrupt_blob_is_refused_naming_its_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let image = standard_image(&tmp.path().join("image"));
    let layer = image.layer_digest(1);
    let path = image.blob_path(&layer);
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&path, &bytes).unwrap();

    let root = tmp.path().join("root");
    let err = unpack(&image.dir, &root).unwrap_err();
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&layer), "{err}");
    // Verified before anything is written.
    assert_eq!(fs::read_dir(&root).unwrap().count(), 0);

    // A truncated blob too.
    fs::write(&path, &bytes[..10]).unwrap();
    let err = unpack(&image.dir, &tmp.path().join("root2")).unwrap_err();
    assert!(matches!(err, OciError::SizeMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&layer), "{err}");
}

#[test]
fn a_source_that_is_not_a_layout_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let text = tmp.path().join("notes.txt");
    fs::write(&text, "just some text, not a tar\n".repeat(100)).unwrap();
    for source in [empty, text, tmp.path().join("missing")] {
        let err = unpack(&source, &tmp.path().join("root")).unwrap_err();
        assert!(matches!(err, OciError::NotLayout { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("not an OCI image layout"), "{msg}");
        assert!(msg.contains(source.to_str().unwrap()), "{msg}");
    }
}

#[test]
fn the_host_platform_is_picked_from_an_image_index() {
    let tmp = tempfile::tempdir().unwrap();
    let image = Image::new(&tmp.path().join("image"));
    let ours = image.manifest(
        config(),
        vec![(TAR_LAYER, Layer::new().file("which", "ours", 0o644).tar())],
    );
    let theirs = image.manifest(
        config(),
        vec![(TAR_LAYER, Layer::new().file("which", "theirs", 0o644).tar())],
    );
    let with_platform = |mut d: Value, arch: &str| {
        d["platform"] = json!({"os": "linux", "architecture": arch});
        d
    };
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [with_platform(theirs, "s390x"), with_platform(ours, PLATFORM_ARCH)],
    });
    let index = image.blob(
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&index).unwrap(),
    );
    image.index(vec![index]);

    let root = tmp.path().join("root");
    unpack(&image.dir, &root).unwrap();
    assert_eq!(fs::read_to_string(root.join("which")).unwrap(), "ours");
}

#[test]
fn zstd_layers_are_refused_naming_the_media_type() {
    let tmp = tempfile::tempdir().unwrap();
    let zstd = "application/vnd.oci.image.layer.v1.tar+zstd";
    let image = Image::single(
        &tmp.path().join("image"),
        vec![(zstd, b"not really zstd".to_vec())],
    );
    let err = unpack(&image.dir, &tmp.path().join("root")).unwrap_err();
    assert!(matches!(err, OciError::ZstdLayer { .. }), "{err}");
    assert!(err.to_string().contains(zstd), "{err}");
}

#[test]
fn devices_are_skipped_and_fifos_made() {
    let tmp = tempfile::tempdir().unwrap();
    let mut null = Layer::header(EntryType::Char, 0o666, 0);
    null.set_device_major(1).unwrap();
    null.set_device_minor(3).unwrap();
    let image = Image::single(
        &tmp.path().join("image"),
        vec![(
            GZIP_LAYER,
            Layer::new()
                .raw(null, b"dev/null", b"", b"")
                .raw(
                    Layer::header(EntryType::Fifo, 0o620, 0),
                    b"run/pipe",
                    b"",
                    b"",
                )
                .gz(),
        )],
    );
    let root = tmp.path().join("root");
    let config = unpack(&image.dir, &root).unwrap();
    assert_eq!(config.skipped, ["dev/null (device node)"]);
    assert!(!root.join("dev/null").exists());
    use std::os::unix::fs::FileTypeExt;
    let pipe = fs::symlink_metadata(root.join("run/pipe")).unwrap();
    assert!(pipe.file_type().is_fifo());
    assert_eq!(pipe.mode() & 0o7777, 0o620);
}

#[test]
fn dest_must_be_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let image = standard_image(&tmp.path().join("image"));
    let root = tmp.path().join("root");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("already"), "x").unwrap();
    let err = unpack(&image.dir, &root).unwrap_err();
    assert!(matches!(err, OciError::BadDest { .. }), "{err}");
    assert!(err.to_string().contains("not empty"), "{err}");
}
