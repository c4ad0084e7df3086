//! Named volumes: persistent directories under `<data-dir>/volumes/`, mounted into function
//! containers read-write or read-only. They live beside the state, so they survive container
//! and host restarts; `Volume.commit()` in the SDK fsyncs what a function wrote.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::proto::manifest::{dns_label_rule, is_dns_label};

/// The directory of volume `name`, made when missing and `create` is set. A new volume is
/// owned by `owner` (the containers' root, when they run in a user namespace), so functions
/// can write it.
pub fn open(root: &Path, name: &str, create: bool, owner: Option<u32>) -> Result<PathBuf> {
    if !is_dns_label(name) {
        bail!("{}", dns_label_rule("volume", name));
    }
    let dir = root.join(name);
    if dir.is_dir() {
        return Ok(dir);
    }
    if !create {
        bail!(
            "volume {name:?} does not exist: create it with `lode volume create {name}`, or \
             declare it with create_if_missing=True"
        );
    }
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let temp = root.join(format!(".{name}.{:x}", rand::random::<u64>()));
    std::fs::create_dir(&temp).with_context(|| format!("creating {}", temp.display()))?;
    if let Some(uid) = owner {
        std::os::unix::fs::chown(&temp, Some(uid), Some(uid))
            .with_context(|| format!("giving {} to uid {uid}", temp.display()))?;
    }
    match std::fs::rename(&temp, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if dir.is_dir() => {
            let _ = std::fs::remove_dir(&temp);
            Ok(dir)
        }
        Err(e) => Err(e).with_context(|| format!("creating volume {}", dir.display())),
    }
}

/// Every volume's name.
pub fn list(root: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
        Err(e) => return Err(e).with_context(|| format!("reading {}", root.display())),
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if is_dns_label(&name) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_are_made_only_when_asked_and_named_safely() {
        let dir = tempfile::tempdir().unwrap();
        let err = open(dir.path(), "data", false, None).unwrap_err();
        assert!(err.to_string().contains("lode volume create data"), "{err}");
        let made = open(dir.path(), "data", true, None).unwrap();
        std::fs::write(made.join("kept"), b"1").unwrap();
        assert_eq!(open(dir.path(), "data", false, None).unwrap(), made);
        assert!(made.join("kept").exists());
        assert!(open(dir.path(), "../escape", true, None).is_err());
        assert_eq!(list(dir.path()).unwrap(), vec!["data".to_string()]);
    }
}
