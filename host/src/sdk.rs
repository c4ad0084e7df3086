//! The Python SDK, embedded in the binary: the server mounts it read-only into every function
//! container (so it is never baked into images or step hashes), and the CLI runs `collect`
//! and local entrypoints with it.

use std::path::{Path, PathBuf};

include!(concat!(env!("OUT_DIR"), "/sdk_files.rs"));

/// A short hash of the SDK's files: extracted copies are named by it, so two versions of
/// `lode` never share one.
pub fn fingerprint() -> String {
    let mut hasher = blake3::Hasher::new();
    for (name, text) in FILES {
        hasher.update(name.as_bytes());
        hasher.update(&[0]);
        hasher.update(text.as_bytes());
        hasher.update(&[0]);
    }
    hasher.finalize().to_hex()[..16].to_string()
}

/// Writes the SDK under `root` once per version and returns the directory to put on
/// `PYTHONPATH` (it holds the `lode` package).
pub fn extract(root: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join(format!("sdk-{}", fingerprint()));
    if dir.join("lode/__init__.py").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(root)?;
    let temp = root.join(format!(
        ".sdk-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let package = temp.join("lode");
    std::fs::create_dir_all(&package)?;
    for (name, text) in FILES {
        std::fs::write(package.join(name), text)?;
        std::fs::set_permissions(package.join(name), std::fs::Permissions::from_mode(0o644))?;
    }
    precompile(&package);
    for d in [&temp, &package] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    match std::fs::rename(&temp, &dir) {
        Ok(()) => Ok(dir),
        // Another process extracted the same version first.
        Err(_) if dir.join("lode/__init__.py").exists() => {
            let _ = std::fs::remove_dir_all(&temp);
            Ok(dir)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&temp);
            Err(e)
        }
    }
}

/// Compiles the package's bytecode with the host's `python3`, where there is one. Containers
/// mount the SDK read-only and write no bytecode, so without this every cold start compiles
/// the SDK again (about 35 ms of a cold call); a container whose Python is the host's version
/// (the default image's, on a Debian host) reads these instead. The bytecode is checked by
/// hash, not by the sources' times, and the directory never changes once named by its
/// fingerprint. Without a `python3`, or if it fails, nothing is written and nothing changes.
fn precompile(package: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let compiled = std::process::Command::new("python3")
        .args([
            "-m",
            "compileall",
            "-q",
            "--invalidation-mode",
            "unchecked-hash",
        ])
        .arg(package)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    let cache = package.join("__pycache__");
    if !compiled {
        let _ = std::fs::remove_dir_all(&cache);
        return;
    }
    let _ = std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755));
    for entry in std::fs::read_dir(&cache).into_iter().flatten().flatten() {
        let _ = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o644));
    }
}

/// Where the CLI keeps its copy: `$XDG_CACHE_HOME/lode`, `~/.cache/lode`, or the temp dir.
pub fn client_root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("lode")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_is_embedded_and_extracts_once() {
        assert!(FILES.iter().any(|(name, _)| *name == "_agent.py"));
        let dir = tempfile::tempdir().unwrap();
        let first = extract(dir.path()).unwrap();
        let again = extract(dir.path()).unwrap();
        assert_eq!(first, again);
        assert!(first.join("lode/_agent.py").exists());
        // With a python3 here, the bytecode is there too, for containers of its version.
        let python = std::process::Command::new("python3")
            .arg("--version")
            .output();
        if python.is_ok_and(|out| out.status.success()) {
            let cached = std::fs::read_dir(first.join("lode/__pycache__"))
                .unwrap()
                .count();
            assert_eq!(
                cached,
                FILES.iter().filter(|(n, _)| n.ends_with(".py")).count()
            );
        }
    }
}
