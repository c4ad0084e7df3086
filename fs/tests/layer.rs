//! A build step's overlay upper directory merged onto its base index, checked against what
//! the kernel's own overlay mount showed.

use std::path::Path;
use std::sync::Arc;

use lode_fs::{HostIds, IngestOptions, export, ingest, ingest_layer, tree_differences};
use lode_registry::BlobAccess;

mod common;
use common::{registry, run};

/// Where a user namespace's ids start on the host, as Lode maps them.
const HOST_BASE: u32 = 524_288;

fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn an_upper_dir_with_changes_and_deletions_merges_into_a_new_index() {
    let registry = registry().await;
    let access: Arc<dyn BlobAccess> = registry.client.clone();
    let work = tempfile::tempdir().unwrap();
    let base = work.path().join("base");
    write(&base, "keep.txt", b"unchanged");
    write(&base, "edit.txt", b"before");
    write(&base, "gone.txt", b"deleted by the step");
    write(&base, "tree/a", &vec![7u8; 300_000]);
    write(&base, "tree/b", b"b");
    write(&base, "replaced/old1", b"old");
    write(&base, "replaced/sub/old2", b"old");
    write(&base, "etc/resolv.conf", b"nameserver base\n");
    std::fs::hard_link(base.join("keep.txt"), base.join("keep-link.txt")).unwrap();
    std::fs::hard_link(base.join("edit.txt"), base.join("edit-link.txt")).unwrap();
    std::os::unix::fs::symlink("keep.txt", base.join("link")).unwrap();
    let base_report = ingest(&base, access.clone(), IngestOptions::default())
        .await
        .unwrap();
    let base_index = lode_fs::Index::parse(
        access
            .get_index(base_report.digest.as_ref().unwrap())
            .await
            .unwrap(),
    )
    .unwrap();

    // The step runs on a real overlay, as in a build container.
    let (upper, overlay_work, merged) = (
        work.path().join("upper"),
        work.path().join("work"),
        work.path().join("merged"),
    );
    for dir in [&upper, &overlay_work, &merged] {
        std::fs::create_dir(dir).unwrap();
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        base.display(),
        upper.display(),
        overlay_work.display()
    );
    run(
        "mount",
        &[
            "-t",
            "overlay",
            "overlay",
            "-o",
            &options,
            merged.to_str().unwrap(),
        ],
    );
    // Unmounted even if an assertion below fails.
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0)
                .status();
        }
    }
    let mounted = Unmount(&merged);
    write(&merged, "edit.txt", b"after the step");
    std::fs::remove_file(merged.join("gone.txt")).unwrap();
    std::fs::remove_file(merged.join("tree/b")).unwrap();
    write(&merged, "tree/c", &vec![9u8; 500_000]);
    std::fs::remove_dir_all(merged.join("replaced")).unwrap();
    write(&merged, "replaced/new", b"new");
    write(&merged, "added/deep/file", b"added");
    std::os::unix::fs::symlink("/abs/target", merged.join("added/abs")).unwrap();
    // Written by a user namespace's uid 5 and gid 6: host ids past the namespace's base.
    write(&merged, "added/by-container", b"mapped");
    let chown = |path: &Path, uid: u32, gid: u32| {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    };
    chown(
        &merged.join("added/by-container"),
        HOST_BASE + 5,
        HOST_BASE + 6,
    );
    // The mount point a build container gets for DNS: not part of the step's result.
    write(&merged, "etc/resolv.conf", b"nameserver 10.0.2.3\n");
    let expected = work.path().join("expected");
    run(
        "cp",
        &["-a", merged.to_str().unwrap(), expected.to_str().unwrap()],
    );
    drop(mounted);
    chown(&expected.join("added/by-container"), 5, 6);
    write(&expected, "etc/resolv.conf", b"nameserver base\n");
    let resolv = std::fs::symlink_metadata(base.join("etc/resolv.conf")).unwrap();
    std::fs::File::options()
        .write(true)
        .open(expected.join("etc/resolv.conf"))
        .unwrap()
        .set_modified(resolv.modified().unwrap())
        .unwrap();
    // Writing resolv.conf back touched its parent; the step did not. The root keeps the
    // base's metadata (overlay shows the upper dir's, which Lode made, not the step).
    for dir in ["etc", ""] {
        let meta = std::fs::symlink_metadata(base.join(dir)).unwrap();
        std::fs::File::open(expected.join(dir))
            .unwrap()
            .set_modified(meta.modified().unwrap())
            .unwrap();
    }

    let report = ingest_layer(
        &base_index,
        &upper,
        &["etc/resolv.conf"],
        Some(HostIds {
            base: HOST_BASE,
            count: 65536,
        }),
        access.clone(),
        IngestOptions::default(),
    )
    .await
    .unwrap();
    // Only what the step wrote was read and uploaded.
    assert!(report.file_bytes < 600_000, "{report:?}");
    let index = lode_fs::Index::parse(
        access
            .get_index(report.digest.as_ref().unwrap())
            .await
            .unwrap(),
    )
    .unwrap();
    let out = work.path().join("export");
    export(&index, access, &out).await.unwrap();
    let differences = tree_differences(&expected, &out).unwrap();
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    assert!(!out.join("gone.txt").exists());
    assert!(!out.join("replaced/old1").exists());
    // The edited file was copied up, so its old hard link keeps the old bytes.
    assert_eq!(std::fs::read(out.join("edit-link.txt")).unwrap(), b"before");
    assert!(index.entries().all(|e| {
        e.xattrs()
            .all(|(name, _)| !name.starts_with(b"trusted.overlay."))
    }));
}
