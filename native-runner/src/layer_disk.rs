//! A size-capped disk for a build step's writable layer.
//!
//! A build step's layer outlives it (the builder diffs it into the image), so it cannot be a
//! tmpfs charged to the step's memory: a `pip install` of a few GiB would be killed as out of
//! memory. It is a sparse file formatted ext4 and loop-mounted (`nosuid,nodev`) instead: it
//! costs only what is written, and a step that writes past the cap gets ENOSPC rather than
//! filling the host's disk.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A mounted layer disk; dropping it unmounts it and deletes its file.
#[derive(Debug)]
pub struct LayerDisk {
    image: PathBuf,
    mountpoint: PathBuf,
    mounted: bool,
}

impl LayerDisk {
    /// Makes a `bytes`-sized ext4 in the sparse file `image` and mounts it at `mountpoint`
    /// (which must exist). Needs `mkfs.ext4` and loop devices.
    pub fn mount(image: &Path, mountpoint: &Path, bytes: u64) -> io::Result<Self> {
        let mut disk = Self {
            image: image.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            mounted: false,
        };
        let file = std::fs::File::create(image)?;
        file.set_len(bytes)?;
        drop(file);
        // No journal and no reserved blocks: the disk lives as long as one step.
        run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E"])
                .arg("lazy_itable_init=1,lazy_journal_init=1,nodiscard")
                .arg(image),
            "mkfs.ext4",
        )?;
        run(
            Command::new("mount")
                .args(["-t", "ext4", "-o", "loop,nosuid,nodev,noatime"])
                .arg(image)
                .arg(mountpoint),
            "mount -o loop",
        )?;
        disk.mounted = true;
        Ok(disk)
    }
}

fn run(command: &mut Command, what: &str) -> io::Result<()> {
    let out = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{what} (for the build step's disk, from e2fsprogs and mount): {e}"),
            )
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{what} failed for the build step's disk: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

impl Drop for LayerDisk {
    fn drop(&mut self) {
        if self.mounted {
            // The loop device was set up with autoclear: it goes with the last unmount.
            let _ = lode_fs::unmount(&self.mountpoint);
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

/// A build step's layer directory, on its capped disk where there is one (`None`: on the
/// host's disk); dropping it unmounts the disk and removes the directory.
pub struct LayerDir {
    path: PathBuf,
    disk: Option<LayerDisk>,
}

impl LayerDir {
    /// Makes `path`, on a `disk_bytes` disk when given.
    pub fn make(path: &Path, disk_bytes: Option<u64>) -> std::io::Result<Self> {
        std::fs::create_dir_all(path)?;
        let mut dir = Self {
            path: path.to_path_buf(),
            disk: None,
        };
        if let Some(bytes) = disk_bytes {
            dir.disk = Some(LayerDisk::mount(&path.with_extension("img"), path, bytes)?);
        }
        Ok(dir)
    }
}

impl Drop for LayerDir {
    fn drop(&mut self) {
        drop(self.disk.take());
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_past_the_cap_fails_with_enospc_and_the_disk_goes_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let mountpoint = dir.path().join("layer");
        std::fs::create_dir(&mountpoint).unwrap();
        let image = dir.path().join("layer.img");
        let disk = LayerDisk::mount(&image, &mountpoint, 16 << 20).unwrap();
        std::fs::write(mountpoint.join("small"), vec![1u8; 1 << 20]).unwrap();
        let err = std::fs::write(mountpoint.join("big"), vec![1u8; 32 << 20]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        // Sparse: the file holds about what was written, not the cap.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&image).unwrap().blocks() * 512 < 24 << 20);
        drop(disk);
        assert!(!image.exists());
        assert!(!mountpoint.join("small").exists());
    }
}
