//! `lode fs mount` and `lode fs umount`: a foreground lazy mount of an image, for debugging
//! and for looking inside an image without exporting it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use lode_fs::{ChunkCache, Index, Mount, MountOptions};
use lode_registry::BlobAccess;

use crate::cli::image::resolve_reference;

/// Settings for `lode fs mount`.
#[derive(Debug, Clone)]
pub struct MountArgs {
    /// Image digest or tag.
    pub reference: String,
    /// Existing empty directory to mount on.
    pub mountpoint: PathBuf,
    /// Cache dir; its `chunks/` holds the chunk cache.
    pub cache_dir: PathBuf,
    /// Chunk cache bound, in bytes.
    pub cache_size: u64,
    /// Mount behaviour.
    pub options: MountOptions,
}

/// Mounts in the foreground until Ctrl-C, SIGTERM or `lode fs umount`. SIGUSR1 saves the
/// access profile without unmounting; unmounting saves it too.
pub async fn mount(registry: Arc<dyn BlobAccess>, args: MountArgs) -> Result<()> {
    // A stale mount left by a killed process is cleared by Mount::new.
    if !lode_fs::is_stale_mount(&args.mountpoint)
        && !std::fs::metadata(&args.mountpoint).is_ok_and(|m| m.is_dir())
    {
        bail!(
            "mount point {} is not a directory; create it first",
            args.mountpoint.display()
        );
    }
    let _lock = crate::util::lock_dir(&args.cache_dir, "cache dir")?;
    let digest = resolve_reference(registry.as_ref(), &args.reference).await?;
    let bytes = registry.get_index(&digest).await?;
    let index = Index::parse(bytes).with_context(|| format!("loading index {digest}"))?;
    let cache = ChunkCache::open(&args.cache_dir.join("chunks"), args.cache_size)?;
    let entries = index.len();
    let mount = Mount::new(index, cache, registry, &args.mountpoint, args.options)
        .with_context(|| format!("mounting {digest} at {}", args.mountpoint.display()))?;
    println!(
        "mounted {digest} at {} ({entries} entries, cache {})",
        args.mountpoint.display(),
        args.cache_dir.join("chunks").display()
    );
    println!(
        "unmount with Ctrl-C or `lode fs umount {}`; `kill -USR1 {}` saves the access profile",
        args.mountpoint.display(),
        std::process::id()
    );
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut save = signal(SignalKind::user_defined1())?;
    let mut poll = tokio::time::interval(Duration::from_millis(200));
    let unmounted_outside = loop {
        tokio::select! {
            _ = term.recv() => break false,
            _ = interrupt.recv() => break false,
            _ = save.recv() => save_profile(&mount).await,
            _ = poll.tick() => if mount.is_finished() { break true },
        }
    };
    save_profile(&mount).await;
    let stats = &mount.cache().stats;
    let fetched = stats
        .fetched_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    if unmounted_outside {
        mount.join()?;
    } else {
        mount.unmount()?;
    }
    println!(
        "unmounted {}; {} fetched from the registry",
        args.mountpoint.display(),
        indicatif::HumanBytes(fetched)
    );
    Ok(())
}

async fn save_profile(mount: &Mount) {
    match mount.save_profile().await {
        Ok(0) => {}
        Ok(files) => println!("saved the access profile ({files} files)"),
        Err(e) => eprintln!("warning: could not save the access profile: {e}"),
    }
}

/// `lode fs umount MOUNTPOINT`: unmounts a live mount, or clears one whose process died.
pub fn umount(mountpoint: &Path) -> Result<()> {
    let stale = lode_fs::is_stale_mount(mountpoint);
    match lode_fs::unmount(mountpoint) {
        Ok(true) if stale => println!("cleared a stale mount at {}", mountpoint.display()),
        Ok(true) => println!("unmounted {}", mountpoint.display()),
        Ok(false) => bail!("nothing is mounted at {}", mountpoint.display()),
        Err(e) => return Err(e).with_context(|| format!("unmounting {}", mountpoint.display())),
    }
    Ok(())
}
