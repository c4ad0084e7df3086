//! Ingest and export through a real gRPC registry on loopback, compared against real trees.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use lode_fs::{Body, Chunking, FileContent, IngestOptions, Node, encode, export, ingest};
use lode_registry::BlobAccess;

mod common;
use common::{Registry, dir, leaf, registry, run, special_tree};

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
fn an_encrypted_index_with_file_bytes_in_the_clear_is_refused() {
    let bytes = encode(&dir(b"", vec![leaf(b"secret")]))
        .unwrap()
        .bytes()
        .to_vec();
    // Header flag bit 0 (at offset 12): the index claims its file bytes are all sealed.
    let mut flagged = bytes.clone();
    flagged[12] = 1;
    let err = lode_fs::Index::parse(Bytes::from(flagged)).unwrap_err();
    assert!(
        err.to_string().contains("inline in an encrypted index"),
        "{err}"
    );
    let mut unknown = bytes;
    unknown[12] = 2;
    let err = lode_fs::Index::parse(Bytes::from(unknown)).unwrap_err();
    assert!(err.to_string().contains("needs a newer lode"), "{err}");
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
