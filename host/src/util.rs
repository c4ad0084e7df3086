//! Small helpers every layer uses: the wall clock in milliseconds, directory locks, crash-safe
//! file writes (temporary file, fsync, rename, fsync of the directory), copying a tree, and
//! marking cache files as used.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use fs2::FileExt;

/// Milliseconds since the Unix epoch (0 for a clock set before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{:016x}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Copies `from` (a file, a symlink as itself, or a directory and all it holds) to `to`.
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let kind = std::fs::symlink_metadata(from)?.file_type();
    if kind.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)
    } else if kind.is_dir() {
        std::fs::create_dir(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else if kind.is_file() {
        std::fs::copy(from, to).map(drop)
    } else {
        Ok(())
    }
}

/// Sets `path`'s modification time to now, so cache pruning sees it was just used. Best
/// effort: a file that cannot be touched is at worst pruned and rebuilt.
pub fn mark_used(path: &Path) {
    let _ =
        std::fs::File::open(path).and_then(|file| file.set_modified(std::time::SystemTime::now()));
}

/// Holds an exclusive lock on a directory for the life of the process.
pub struct DirLock {
    _file: std::fs::File,
}

/// Locks `dir` so that two processes never share it.
pub fn lock_dir(dir: &Path, what: &str) -> anyhow::Result<DirLock> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {what} {}", dir.display()))?;
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    if file.try_lock_exclusive().is_err() {
        bail!(
            "{what} {} is in use by another lode process; stop it or pass a different directory",
            dir.display()
        );
    }
    Ok(DirLock { _file: file })
}

/// Streams what `pipe` yields as lines of `tx`, each chunk base64-encoded into the line that
/// `line` makes, until the pipe ends. A receiver that went away sets `gone` (its caller then
/// stops the process); the pipe is still drained, so the process never blocks on it.
pub fn pump_base64<T: Send + 'static>(
    pipe: Option<impl std::io::Read + Send + 'static>,
    tx: tokio::sync::mpsc::Sender<T>,
    gone: std::sync::Arc<std::sync::atomic::AtomicBool>,
    line: fn(String) -> T,
) -> std::thread::JoinHandle<()> {
    use base64::Engine as _;
    std::thread::spawn(move || {
        let Some(mut pipe) = pipe else { return };
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            let n = match pipe.read(&mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let data = base64::engine::general_purpose::STANDARD.encode(&buffer[..n]);
            if tx.blocking_send(line(data)).is_err() {
                gone.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    })
}

/// A time in milliseconds since the epoch, as the CLI prints it (UTC).
pub fn format_time_ms(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
        .unwrap_or_default()
}
