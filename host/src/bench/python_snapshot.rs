//! `lode bench python`'s memory-snapshot rows: cold calls of an app that imports numpy,
//! pandas and scikit-learn, started fresh against started from its snapshot, in one run; then
//! the same on "another host" (an empty cache dir), where the snapshot is the registry's
//! encrypted copy, restored through a lazy mount.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::bench::support::{LodeServer, call_square, live_containers, row};

const APP: &str = r#"
import lode

image = lode.Image.debian_slim().pip_install("numpy", "pandas", "scikit-learn")
app = lode.App("snapbench", image=image)

with image.imports():
    import numpy
    import pandas
    import sklearn.linear_model


@app.function(scaledown_window=0)
def fresh(x):
    return x * x


@app.function(scaledown_window=0, enable_memory_snapshot=True)
def restored(x):
    return x * x
"#;

/// Deploys the app and times `runs` cold calls of each function (one before, not timed,
/// builds the image and takes the snapshot).
pub async fn snapshot_rows(server: &mut LodeServer, work: &Path, runs: usize) -> Result<()> {
    if let Err(e) = lode_native_runner::sandbox::Criu::locate() {
        println!("\n  memory snapshots: SKIPPED ({e})");
        return Ok(());
    }
    let file = work.join("snapbench.py");
    std::fs::write(&file, APP)?;
    println!(
        "\nmemory snapshots: an app importing numpy, pandas and scikit-learn; cold calls, each \
         after the last container stopped"
    );
    let deploy = Command::new(std::env::current_exe()?)
        .args(["--api-url", &server.api, "--token", &server.token, "deploy"])
        .arg(&file)
        .output()?;
    if !deploy.status.success() {
        bail!(
            "deploying the snapshot bench app failed: {}",
            String::from_utf8_lossy(&deploy.stderr)
        );
    }
    let http = reqwest::Client::new();
    let call =
        |function: &'static str, x: i64| call_square(&http, server, "snapbench", function, x);
    let up = |function: &'static str| live_containers(&http, server, "snapbench", function);
    let cold = |function: &'static str| {
        let (call, up) = (&call, &up);
        async move {
            let mut times = Vec::new();
            for i in 0..=runs {
                let deadline = Instant::now() + Duration::from_secs(60);
                while up(function).await? > 0 {
                    if Instant::now() > deadline {
                        bail!("the {function} function's container did not stop");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let started = Instant::now();
                call(function, i as i64).await?;
                // The first mounts the image (and for `restored` takes the snapshot).
                if i > 0 {
                    times.push(started.elapsed());
                }
            }
            anyhow::Ok(times)
        }
    };
    // Alternating would leave one function's pages warm for the other; each runs whole.
    let fresh = cold("fresh").await?;
    let restored = cold("restored").await?;
    let fresh_p50 = row("cold call, imports at start (baseline)", fresh, None);
    let restored_p50 = row(
        "cold call, restored from its memory snapshot",
        restored,
        Some(fresh_p50),
    );
    let speedup = fresh_p50.as_secs_f64() / restored_p50.as_secs_f64();
    println!(
        "  speedup {speedup:.1}x (target >= 3x: {})",
        if speedup >= 3.0 { "met" } else { "missed" }
    );
    another_host(server, &http, runs).await
}

/// Cold calls on a server restarted with an empty cache dir (the same registry and state),
/// as on another host: no snapshot of its own and no chunk cached, so a fresh start reads the
/// image's files lazily, and a restore reads the registry's encrypted snapshot lazily too.
/// Then one more cold call there, once the host has copied that snapshot to its own disk.
async fn another_host(server: &mut LodeServer, http: &reqwest::Client, runs: usize) -> Result<()> {
    println!(
        "\n  on another host (a restart with an empty cache dir before each first call; the \
         snapshot is the registry's, encrypted)"
    );
    let (mut fresh, mut restored, mut again) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        for (function, times) in [("fresh", &mut fresh), ("restored", &mut restored)] {
            server.restart_with_empty_cache()?;
            let started = Instant::now();
            call_square(http, server, "snapbench", function, i as i64).await?;
            times.push(started.elapsed());
        }
        if restores(http, server).await? != 1.0 {
            bail!("the call did not restore the registry's snapshot; see the server's log");
        }
        let snapshots = server.cache_dir().join("snapshots");
        let deadline = Instant::now() + Duration::from_secs(60);
        while live_containers(http, server, "snapbench", "restored").await? > 0
            || !kept_snapshot(&snapshots)
        {
            if Instant::now() > deadline {
                bail!("the restored container did not stop, or the snapshot was not copied");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = Instant::now();
        call_square(http, server, "snapbench", "restored", i as i64).await?;
        again.push(started.elapsed());
    }
    let fresh_p50 = row(
        "cold call, imports at start, empty cache (baseline)",
        fresh,
        None,
    );
    let restored_p50 = row(
        "cold call, restored from the registry's encrypted snapshot",
        restored,
        Some(fresh_p50),
    );
    row(
        "next cold call there, from the copy the host kept",
        again,
        Some(fresh_p50),
    );
    println!(
        "  speedup of the first restore {:.1}x",
        fresh_p50.as_secs_f64() / restored_p50.as_secs_f64()
    );
    Ok(())
}

/// Whether `snapshots` holds a finished snapshot (not one being taken or copied).
fn kept_snapshot(snapshots: &Path) -> bool {
    std::fs::read_dir(snapshots).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| !e.file_name().to_string_lossy().contains('.'))
    })
}

/// The server's `lode_memory_snapshots_restored_total`.
async fn restores(http: &reqwest::Client, server: &LodeServer) -> Result<f64> {
    let metrics = server
        .get(http, "/metrics")
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(metrics
        .lines()
        .find_map(|l| l.strip_prefix("lode_memory_snapshots_restored_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}
