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
    }
}
