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

pub struct Registry {
    pub client: Arc<RegistryClient>,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Registry {
    /// Kills the server: the listener and every open connection go at once.
    pub fn kill(&self) {
        self.task.abort();
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
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(service.serve(listener, async {
        let _ = stopped.await;
    }));
    let client = RegistryClient::new(&url, Some("t0ken"), ClientOptions::default()).unwrap();
    Registry {
        client: Arc::new(client),
        _dir: dir,
        _stop: stop,
        task,
    }
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
