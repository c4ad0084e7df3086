//! `lode dev app.py`, Modal's `modal serve`: deploys the app as `<app>-dev`, watches its file,
//! the local modules it imports and the local files its images copy in, and redeploys on
//! every save. Web functions stay at their URLs; function logs stream into this terminal; a
//! save that does not load (a syntax error, say) is shown and the last good version keeps
//! serving; Ctrl-C removes the app. Unchanged images come from the build cache, so a
//! code-only change costs a collect, an upload and new containers.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lode_registry::RegistryClient;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::cli::client::ApiClient;
use crate::cli::python::{AppName, deploy, follow_logs, remove_app};

/// How long after a change more changes are awaited, so one save (which editors often make
/// of several writes and a rename) is one redeploy.
pub const SETTLE: Duration = Duration::from_millis(50);

/// Runs the loop until Ctrl-C; returns the exit code.
pub async fn dev(client: &ApiClient, registry: Arc<RegistryClient>, file: &Path) -> Result<i32> {
    let file = std::fs::canonicalize(file).with_context(|| format!("{}", file.display()))?;
    let first = deploy(client, registry.clone(), &file, AppName::Dev).await?;
    let app = first.app;
    let follower = follow_logs(client, &app).await?;
    let (changed, mut changes) = mpsc::unbounded_channel::<Vec<PathBuf>>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && !matches!(event.kind, notify::EventKind::Access(_))
        {
            let _ = changed.send(event.paths);
        }
    })
    .context("starting the file watcher")?;
    let mut sources = Sources::default();
    sources.watch(&mut watcher, &first.sources)?;
    eprintln!(
        "lode dev: watching {} file(s) of {app}; save to redeploy, Ctrl-C to stop and remove it",
        sources.files.len()
    );
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            paths = changes.recv() => {
                let Some(paths) = paths else { break };
                if !paths.iter().any(|p| sources.covers(p)) {
                    continue;
                }
                tokio::time::sleep(SETTLE).await;
                while changes.try_recv().is_ok() {}
                let started = Instant::now();
                eprintln!("lode dev: change seen; redeploying {app}");
                match deploy(client, registry.clone(), &file, AppName::Dev).await {
                    Ok(deployed) => {
                        eprintln!(
                            "lode dev: {app} redeployed in {} ms",
                            started.elapsed().as_millis()
                        );
                        sources.watch(&mut watcher, &deployed.sources)?;
                    }
                    Err(e) => eprintln!(
                        "lode dev: {e:#}\nlode dev: the last good version keeps serving; save again to retry"
                    ),
                }
            }
        }
    }
    follower.abort();
    remove_app(client, &app).await;
    eprintln!("lode dev: stopped; {app} removed");
    Ok(0)
}

/// What is watched: the files, and the directories holding them (editors save by writing a
/// new file and renaming it over the old one, which a watch on the file itself misses).
#[derive(Default)]
struct Sources {
    files: BTreeSet<PathBuf>,
    dirs: BTreeSet<PathBuf>,
    trees: BTreeSet<PathBuf>,
}

impl Sources {
    fn watch(&mut self, watcher: &mut impl Watcher, paths: &[PathBuf]) -> Result<()> {
        for path in paths {
            if path.is_dir() {
                if self.trees.insert(path.clone()) {
                    watcher
                        .watch(path, RecursiveMode::Recursive)
                        .with_context(|| format!("watching {}", path.display()))?;
                }
                continue;
            }
            self.files.insert(path.clone());
            if let Some(dir) = path.parent()
                && self.dirs.insert(dir.to_path_buf())
            {
                watcher
                    .watch(dir, RecursiveMode::NonRecursive)
                    .with_context(|| format!("watching {}", dir.display()))?;
            }
        }
        Ok(())
    }

    fn covers(&self, path: &Path) -> bool {
        self.files.contains(path) || self.trees.iter().any(|tree| path.starts_with(tree))
    }
}
