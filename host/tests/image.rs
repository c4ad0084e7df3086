//! `lode image ...` and `lode registry serve` as a user runs them.

mod harness;

use std::path::Path;

use harness::{Lode, StandaloneRegistry};
use serde_json::Value;

fn source_tree(root: &Path) {
    std::fs::create_dir_all(root.join("lib/python/site")).unwrap();
    std::fs::create_dir(root.join("empty")).unwrap();
    let library: Vec<u8> = (0..1_500_000u32)
        .map(|i| (i.wrapping_mul(2246822519) >> 17) as u8)
        .collect();
    std::fs::write(root.join("lib/libbig.so"), &library).unwrap();
    std::fs::write(root.join("lib/python/site/__init__.py"), b"").unwrap();
    std::fs::write(
        root.join("lib/python/site/module.py"),
        b"def f():\n    return 42\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("libbig.so", root.join("lib/libbig.so.1")).unwrap();
    std::fs::hard_link(root.join("lib/libbig.so"), root.join("lib/libbig-hard.so")).unwrap();
    xattr::set(root.join("lib/libbig.so"), "user.note", b"kept").unwrap();
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn assert_same_tree(a: &Path, b: &Path) {
    let differences = lode_fs::tree_differences(a, b).unwrap();
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

#[test]
fn images_round_trip_and_move_between_registries() {
    let lode = Lode::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("rootfs");
    source_tree(&source);

    let first = json(&lode.cli_ok(&[
        "image",
        "ingest",
        source.to_str().unwrap(),
        "--tag",
        "base",
        "--json",
    ]));
    let digest = first["digest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("blake3:"));
    assert_eq!(first["new_bytes"], 1_500_000, "{first}");
    assert!(
        lode.cli_ok(&["image", "ls"])
            .contains(&format!("base  {digest}"))
    );

    let out = work.path().join("out");
    lode.cli_ok(&["image", "export", "base", out.to_str().unwrap()]);
    assert_same_tree(&source, &out);

    // A related tree: only the new file's bytes travel.
    std::fs::write(source.join("lib/python/site/extra.py"), vec![b'#'; 20_000]).unwrap();
    let second = json(&lode.cli_ok(&["image", "ingest", source.to_str().unwrap(), "--json"]));
    assert_eq!(second["new_bytes"], 20_000, "{second}");
    assert_eq!(second["deduped_bytes"], 1_500_000, "{second}");
    let human = lode.cli(&["image", "ingest", source.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&human.stderr);
    assert!(
        stderr.contains("deduped") && stderr.contains("0 new"),
        "{stderr}"
    );

    // Push to a standalone registry, restart it, and export from there.
    let other = StandaloneRegistry::start(&work.path().join("registry2"));
    let remote = ["--registry", &other.url, "--remote-token", &other.token];
    lode.cli_ok(&[&["image", "push", "base"][..], &remote].concat());
    let data = other.data.clone();
    other.stop();
    let other = StandaloneRegistry::start(&data);
    let there = ["--registry", &other.url, "--token", &other.token];
    assert!(
        lode.cli_ok(&[&["image", "ls"][..], &there].concat())
            .contains(&digest)
    );
    let out2 = work.path().join("out2");
    lode.cli_ok(
        &[
            &["image", "export", "base", out2.to_str().unwrap()][..],
            &there,
        ]
        .concat(),
    );
    assert_same_tree(&out, &out2);

    // Pull an image that only the other registry has.
    let elsewhere = work.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("only-there"), b"pulled").unwrap();
    let ingest_there = lode.cli_ok(
        &[
            &[
                "image",
                "ingest",
                elsewhere.to_str().unwrap(),
                "--tag",
                "team/tool:v1",
            ][..],
            &there,
        ]
        .concat(),
    );
    let remote = ["--registry", &other.url, "--remote-token", &other.token];
    let pulled = lode.cli_ok(&[&["image", "pull", "team/tool:v1"][..], &remote].concat());
    assert_eq!(pulled.trim(), ingest_there.trim());
    assert!(
        lode.cli_ok(&["image", "ls", "team/"])
            .contains(ingest_there.trim())
    );

    // Writes need the token.
    let err = lode.cli_err(&[
        "image",
        "ingest",
        elsewhere.to_str().unwrap(),
        "--registry",
        &other.url,
    ]);
    assert!(err.contains("token"), "{err}");

    // Compare-and-swap on tags.
    let err = lode.cli_err(&["image", "tag", &digest, "base", "--expect", "none"]);
    assert!(err.contains("was not updated"), "{err}");
    lode.cli_ok(&[
        "image",
        "tag",
        ingest_there.trim(),
        "base",
        "--expect",
        &digest,
    ]);
    assert!(
        lode.cli_ok(&["image", "ls", "base"])
            .contains(ingest_there.trim())
    );
}

#[test]
fn bad_input_gets_clear_errors() {
    let lode = Lode::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let unknown = format!("blake3:{}", "ab".repeat(32));

    let err = lode.cli_err(&[
        "image",
        "export",
        &unknown,
        work.path().join("x").to_str().unwrap(),
    ]);
    assert!(err.contains(&unknown) && err.contains("not found"), "{err}");
    let err = lode.cli_err(&[
        "image",
        "export",
        "no-such-tag",
        work.path().join("x").to_str().unwrap(),
    ]);
    assert!(err.contains("no-such-tag"), "{err}");
    let err = lode.cli_err(&["image", "ingest", "/definitely/not/here"]);
    assert!(err.contains("/definitely/not/here"), "{err}");
    let file = work.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = lode.cli_err(&["image", "ingest", file.to_str().unwrap()]);
    assert!(err.contains("not a directory"), "{err}");

    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("a"), b"a").unwrap();
    let digest = lode.cli_ok(&["image", "ingest", tree.to_str().unwrap()]);
    let err = lode.cli_err(&["image", "export", digest.trim(), tree.to_str().unwrap()]);
    assert!(err.contains("is not empty"), "{err}");
    let err = lode.cli_err(&["image", "tag", digest.trim(), "../escape"]);
    assert!(err.contains("invalid tag name"), "{err}");
    let err = lode.cli_err(&["image", "tag", &unknown, "fine"]);
    assert!(err.contains(&unknown), "{err}");
    let err = lode.cli_err(&[
        "image",
        "ingest",
        tree.to_str().unwrap(),
        "--chunking",
        "fixed:0",
    ]);
    assert!(err.contains("fixed:SIZE"), "{err}");

    let err = lode.cli_err(&["image", "ls", "--registry", "http://127.0.0.1:9"]);
    assert!(
        err.contains("http://127.0.0.1:9") && err.contains("is the registry running"),
        "{err}"
    );
}

#[test]
fn deploy_finds_the_registry_through_the_api_alone() {
    let lode = Lode::start(&[]);
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(harness::LODE)
        .args([
            "deploy",
            harness::sample("hello_http").to_str().unwrap(),
            "--name",
            "hello",
        ])
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("LODE_CONFIG")
        .env_remove("LODE_REGISTRY")
        .env("LODE_API", &lode.api)
        .env("LODE_TOKEN", &lode.token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("/hello/"));
}
