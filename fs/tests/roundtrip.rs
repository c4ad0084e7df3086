//! Ingest and export through a real gRPC registry on loopback, compared against real trees.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use lode_fs::{Body, Chunking, FileContent, IngestOptions, Meta, Node, encode, export, ingest};
use lode_registry::{
    BlobAccess, ClientOptions, RegistryClient, RegistryService, RegistryStore, ServiceOptions,
};
use tokio::net::TcpListener;

struct Registry {
    client: Arc<RegistryClient>,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn registry() -> Registry {
    let dir = tempfile::tempdir().unwrap();
    let store = RegistryStore::open_dir(
        dir.path(),
        Some(Arc::new(|bytes: &[u8]| lode_fs::validate_index(bytes))),
    )
    .unwrap();
    let service = RegistryService::new(
        store,
        ServiceOptions {
            token: Some("t0ken".into()),
            ..Default::default()
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(service.serve(listener, async {
        let _ = stopped.await;
    }));
    let client = RegistryClient::new(&url, Some("t0ken"), ClientOptions::default()).unwrap();
    Registry {
        client: Arc::new(client),
        _dir: dir,
        _stop: stop,
    }
}

fn run(command: &str, args: &[&str]) {
    let status = std::process::Command::new(command)
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "{command} {args:?}");
}

/// A tree with every kind of entry and metadata the index records.
fn special_tree(root: &Path) {
    let write = |rel: &str, bytes: &[u8]| std::fs::write(root.join(rel), bytes).unwrap();
    std::fs::create_dir_all(root.join("dir/nested/deeper")).unwrap();
    std::fs::create_dir(root.join("empty")).unwrap();
    write("empty-file", b"");
    write("small.txt", b"inline me");
    write("dir/medium.bin", &vec![7u8; 5000]);
    let big: Vec<u8> = (0..3_500_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    write("dir/nested/big.bin", &big);
    write("dir/nested/big-copy.bin", &big);
    write("setuid", b"#!/bin/sh\n");
    std::fs::set_permissions(root.join("setuid"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::set_permissions(
        root.join("dir/nested/deeper"),
        std::fs::Permissions::from_mode(0o1777),
    )
    .unwrap();
    std::os::unix::fs::chown(root.join("small.txt"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(root.join("dir"), Some(42), Some(43)).unwrap();
    symlink("nested/big.bin", root.join("dir/relative-link")).unwrap();
    symlink("/etc/passwd", root.join("absolute-link")).unwrap();
    symlink("does/not/exist", root.join("dangling-link")).unwrap();
    std::os::unix::fs::lchown(root.join("dangling-link"), Some(7), Some(8)).unwrap();
    std::fs::hard_link(root.join("dir/medium.bin"), root.join("hardlink-to-medium")).unwrap();
    std::fs::hard_link(
        root.join("dir/nested/big.bin"),
        root.join("empty-file-sibling"),
    )
    .unwrap();
    std::fs::write(
        root.join(OsStr::from_bytes(b"latin1-\xe9")),
        b"bytes in a name",
    )
    .unwrap();
    run("mkfifo", &[root.join("pipe").to_str().unwrap()]);
    run(
        "mknod",
        &[root.join("null-device").to_str().unwrap(), "c", "1", "3"],
    );
    xattr::set(root.join("small.txt"), "user.origin", b"lode test").unwrap();
    xattr::set(root.join("dir"), "user.dir-note", b"").unwrap();
    xattr::set(root.join("dir/medium.bin"), "trusted.lode", &[0, 1, 2, 255]).unwrap();
    // Times with nanoseconds, on files, symlinks and directories (set last).
    run(
        "touch",
        &[
            "-h",
            "-d",
            "2001-02-03 04:05:06.123456789",
            root.join("dangling-link").to_str().unwrap(),
        ],
    );
    run(
        "touch",
        &[
            "-d",
            "1999-12-31 23:59:59.5",
            root.join("small.txt").to_str().unwrap(),
        ],
    );
    run(
        "touch",
        &[
            "-d",
            "2010-01-01 00:00:00.000000001",
            root.join("empty").to_str().unwrap(),
        ],
    );
    run(
        "touch",
        &["-d", "2012-06-01 12:00:00", root.to_str().unwrap()],
    );
}

async fn round_trip(
    source: &Path,
    registry: &Registry,
    chunking: Chunking,
) -> lode_fs::IngestReport {
    let access: Arc<dyn BlobAccess> = registry.client.clone();
    let options = IngestOptions {
        chunking,
        ..Default::default()
    };
    let report = ingest(source, access.clone(), options).await.unwrap();
    let digest = report.digest.clone().unwrap();
    let bytes = access.get_index(&digest).await.unwrap();
    let index = lode_fs::Index::parse(bytes).unwrap();
    assert_eq!(index.digest(), &digest);
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("export");
    export(&index, access, &target).await.unwrap();
    let differences = lode_fs::tree_differences(source, &target).unwrap();
    assert!(
        differences.is_empty(),
        "export differs from {}:\n{}",
        source.display(),
        differences.join("\n")
    );
    report
}

#[tokio::test]
async fn every_kind_of_entry_round_trips() {
    let registry = registry().await;
    let source = tempfile::tempdir().unwrap();
    special_tree(source.path());
    for chunking in [Chunking::default(), Chunking::Fixed(1 << 20)] {
        let report = round_trip(source.path(), &registry, chunking).await;
        assert_eq!(report.hardlinks, 2, "{report:?}");
        assert_eq!(report.special, 2, "{report:?}");
        assert_eq!(report.symlinks, 3, "{report:?}");
        // The two copies of big.bin are stored once.
        assert!(report.deduped_bytes >= 3_500_000, "{report:?}");
    }
}

#[tokio::test]
async fn a_real_python_tree_round_trips() {
    let python = ["/usr/lib/python3.11", "/usr/lib/python3"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .expect("this machine has a Debian Python tree");
    let registry = registry().await;
    let report = round_trip(python, &registry, Chunking::default()).await;
    assert!(report.files > 500, "{report:?}");
    // Ingesting the same tree again uploads nothing.
    let again = ingest(python, registry.client.clone(), IngestOptions::default())
        .await
        .unwrap();
    assert_eq!(again.digest, report.digest, "the index is canonical");
    assert_eq!((again.new_chunks, again.new_bytes), (0, 0), "{again:?}");
}

#[tokio::test]
async fn a_second_ingest_uploads_only_new_chunks() {
    let registry = registry().await;
    let first = tempfile::tempdir().unwrap();
    let shared: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
        .collect();
    std::fs::write(first.path().join("shared.bin"), &shared).unwrap();
    let one = ingest(
        first.path(),
        registry.client.clone(),
        IngestOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(one.new_bytes, shared.len() as u64);

    let second = tempfile::tempdir().unwrap();
    std::fs::write(second.path().join("renamed.bin"), &shared).unwrap();
    let fresh = vec![9u8; 300_000];
    std::fs::write(second.path().join("fresh.bin"), &fresh).unwrap();
    let two = ingest(
        second.path(),
        registry.client.clone(),
        IngestOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(two.new_bytes, fresh.len() as u64, "{two:?}");
    assert_eq!(two.deduped_bytes, shared.len() as u64, "{two:?}");
    assert_ne!(two.digest, one.digest);
}

fn leaf(name: &[u8]) -> Node {
    Node {
        name: name.to_vec(),
        meta: Meta::default(),
        xattrs: Vec::new(),
        body: Body::File {
            content: FileContent::Inline(b"x".to_vec()),
            link_group: None,
        },
    }
}

fn dir(name: &[u8], children: Vec<Node>) -> Node {
    Node {
        name: name.to_vec(),
        meta: Meta {
            mode: 0o755,
            ..Meta::default()
        },
        xattrs: Vec::new(),
        body: Body::Dir(children),
    }
}

#[tokio::test]
async fn traversal_and_duplicates_are_refused_at_ingest_load_and_upload() {
    for bad in [&b".."[..], b".", b"a/b", b""] {
        let err = encode(&dir(b"", vec![leaf(bad)])).unwrap_err();
        assert!(err.to_string().contains("name"), "{err}");
    }
    let err = encode(&dir(b"", vec![leaf(b"twice"), leaf(b"twice")])).unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");

    // Patch a valid index so a name reads "..": the loader refuses it.
    let good = encode(&dir(b"", vec![dir(b"sub", vec![leaf(b"zz")])]))
        .unwrap()
        .bytes()
        .to_vec();
    let at = good.windows(2).rposition(|w| w == b"zz").unwrap();
    let mut evil = good.clone();
    evil[at..at + 2].copy_from_slice(b"..");
    let err = lode_fs::Index::parse(Bytes::from(evil.clone())).unwrap_err();
    assert!(err.to_string().contains("leave its directory"), "{err}");
    // Two children with one name: rename "zz" under a parent with a sibling "zy".
    let good2 = encode(&dir(b"", vec![leaf(b"zy"), leaf(b"zz")]))
        .unwrap()
        .bytes()
        .to_vec();
    let at = good2.windows(2).rposition(|w| w == b"zz").unwrap();
    let mut dup = good2.clone();
    dup[at..at + 2].copy_from_slice(b"zy");
    let err = lode_fs::Index::parse(Bytes::from(dup)).unwrap_err();
    assert!(err.to_string().contains("repeat"), "{err}");

    // The registry refuses to store it, whatever digest the client claims.
    let registry = registry().await;
    let digest = lode_registry::Digest::of(&evil);
    let err = registry
        .client
        .put_index(&digest, Bytes::from(evil))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a valid Lode index"), "{err}");
}

#[test]
fn lookups_find_paths_without_decoding_the_tree() {
    let index = encode(&dir(
        b"",
        vec![
            dir(
                b"lib",
                vec![
                    leaf(b"a.py"),
                    leaf(b"b.py"),
                    dir(b"pkg", vec![leaf(b"__init__.py")]),
                ],
            ),
            leaf(b"README"),
        ],
    ))
    .unwrap();
    assert_eq!(index.len(), 7);
    let init = index.resolve("lib/pkg/__init__.py").unwrap();
    assert_eq!(init.name(), b"__init__.py");
    assert_eq!(index.entry(init.parent()).name(), b"pkg");
    assert!(index.resolve("lib/c.py").is_none());
    assert!(index.resolve("README/x").is_none());
    let lib = index.resolve("lib").unwrap();
    let names: Vec<&[u8]> = lib
        .children()
        .unwrap()
        .map(|id| index.entry(id).name())
        .collect();
    assert_eq!(names, [&b"a.py"[..], b"b.py", b"pkg"]);
}

#[test]
fn the_comparison_notices_each_kind_of_difference() {
    let a = tempfile::tempdir().unwrap();
    special_tree(a.path());
    let b = tempfile::tempdir().unwrap();
    let copy = b.path().join("copy");
    run(
        "cp",
        &["-a", a.path().to_str().unwrap(), copy.to_str().unwrap()],
    );
    assert_eq!(
        lode_fs::tree_differences(a.path(), &copy).unwrap(),
        Vec::<String>::new()
    );
    type Change = Box<dyn Fn(&Path)>;
    let changes: [(&str, Change); 4] = [
        (
            "small.txt",
            Box::new(|p| xattr::set(p.join("small.txt"), "user.origin", b"other").unwrap()),
        ),
        (
            "setuid",
            Box::new(|p| {
                std::fs::set_permissions(p.join("setuid"), std::fs::Permissions::from_mode(0o755))
                    .unwrap()
            }),
        ),
        (
            "empty",
            Box::new(|p| run("touch", &[p.join("empty").to_str().unwrap()])),
        ),
        (
            "hardlink-to-medium",
            Box::new(|p| {
                std::fs::remove_file(p.join("hardlink-to-medium")).unwrap();
                std::fs::copy(p.join("dir/medium.bin"), p.join("hardlink-to-medium")).unwrap();
            }),
        ),
    ];
    for (name, change) in changes {
        let scratch = b.path().join(name);
        run(
            "cp",
            &["-a", a.path().to_str().unwrap(), scratch.to_str().unwrap()],
        );
        change(&scratch);
        let differences = lode_fs::tree_differences(a.path(), &scratch).unwrap();
        assert!(
            differences.iter().any(|d| d.contains(name)),
            "{name}: {differences:?}"
        );
    }
}

fn patch_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

fn patch_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

const HEADER: usize = 40;
const ENTRY: usize = 64;

#[tokio::test]
async fn an_index_that_misstates_a_chunk_length_is_caught_at_export() {
    let registry = registry().await;
    let data = vec![3u8; 5000];
    let digest = lode_registry::Digest::of(&data);
    registry
        .client
        .put_blob(&digest, Bytes::from(data))
        .await
        .unwrap();
    let file = Node {
        body: Body::File {
            content: FileContent::Chunks(vec![(digest, 5000)]),
            link_group: None,
        },
        ..leaf(b"data.bin")
    };
    let mut bytes = encode(&dir(b"", vec![file])).unwrap().bytes().to_vec();
    // Entry 1 is the file; the chunk table follows the two entries.
    patch_u64(&mut bytes, HEADER + ENTRY + 40, 5001);
    patch_u32(&mut bytes, HEADER + 2 * ENTRY + 40, 5001);
    let index = lode_fs::Index::parse(Bytes::from(bytes)).unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = export(&index, registry.client.clone(), &out.path().join("x"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("the index says 5001"), "{err}");
}

#[test]
fn values_the_format_leaves_unused_or_bounded_are_refused() {
    let good = encode(&dir(b"", vec![leaf(b"a")]))
        .unwrap()
        .bytes()
        .to_vec();
    let cases: [(&str, usize, &[u8]); 5] = [
        (
            "mtime nanoseconds of a second or more",
            HEADER + 32,
            &0x3fff_ffffu32.to_le_bytes(),
        ),
        ("header flags", 12, &[1]),
        ("entry flags", HEADER + ENTRY + 7, &[2]),
        ("a root that names a parent", HEADER + 20, &[5]),
        ("a file's unused field", HEADER + ENTRY + 52, &[1]),
    ];
    for (what, at, value) in cases {
        let mut bad = good.clone();
        bad[at..at + value.len()].copy_from_slice(value);
        assert!(
            lode_fs::Index::parse(Bytes::from(bad)).is_err(),
            "{what}: accepted"
        );
    }
}
