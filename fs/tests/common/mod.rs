//! Helpers shared by the fs integration tests: a registry on loopback and sample trees.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::sync::Arc;

use lode_fs::{Body, FileContent, Meta, Node};
use lode_registry::{
    ClientOptions, RegistryClient, RegistryService, RegistryStore, ServiceOptions,
};
use tokio::net::TcpListener;

/// A registry serving on its own runtime and thread, so killing it drops the listener and
/// every open connection at once (aborting only the accept loop would leave connections up).
pub struct Registry {
    pub client: Arc<RegistryClient>,
    _dir: tempfile::TempDir,
    stop: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Registry {
    /// Where the server keeps its blobs, indexes and tags.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Kills the server: its runtime goes, with the listener and every connection, before
    /// this returns.
    pub fn kill(&self) {
        if let Some(stop) = self.stop.lock().unwrap().take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.lock().unwrap().take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn registry() -> Registry {
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
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (bound, address) = tokio::sync::oneshot::channel();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            bound.send(listener.local_addr().unwrap()).unwrap();
            tokio::spawn(service.serve(listener, std::future::pending()));
            let _ = stopped.await;
        });
        runtime.shutdown_background();
    });
    let url = format!("http://{}", address.await.unwrap());
    let client = RegistryClient::new(&url, Some("t0ken"), ClientOptions::default()).unwrap();
    Registry {
        client: Arc::new(client),
        _dir: dir,
        stop: std::sync::Mutex::new(Some(stop)),
        thread: std::sync::Mutex::new(Some(thread)),
    }
}

/// Files under `root` whose bytes hold `needle`.
pub fn files_containing(root: &Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut queue = vec![root.to_path_buf()];
    while let Some(dir) = queue.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                queue.push(path);
            } else if kind.is_file()
                && let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(path);
            }
        }
    }
    found
}

pub fn run(command: &str, args: &[&str]) {
    let status = std::process::Command::new(command)
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "{command} {args:?}");
}

/// A tree with every kind of entry and metadata the index records.
pub fn special_tree(root: &Path) {
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

pub fn leaf(name: &[u8]) -> Node {
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

pub fn dir(name: &[u8], children: Vec<Node>) -> Node {
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
