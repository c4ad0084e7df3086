//! Builds `lode-sandbox-helper` (helper/main.rs), the static program a sandbox runs as its
//! init and for file calls; the runner embeds it (`include_bytes!`).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "helper/main.rs";
    println!("cargo::rerun-if-changed={source}");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = std::env::var("TARGET").expect("cargo sets TARGET");
    let status = Command::new(rustc)
        .args(["--edition", "2024", "--crate-name", "lode_sandbox_helper"])
        .args(["--target", &target])
        .args([
            "-C",
            "opt-level=s",
            "-C",
            "panic=abort",
            "-C",
            "strip=symbols",
        ])
        .args(["-C", "target-feature=+crt-static"])
        .arg("-o")
        .arg(out.join("lode-sandbox-helper"))
        .arg(source)
        .status()
        .expect("running rustc for the sandbox helper");
    assert!(status.success(), "building the sandbox helper failed");
}
