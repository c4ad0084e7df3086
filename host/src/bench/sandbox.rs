//! `lode bench sandbox`: the container tier's create and first exec, an exec's round trip in
//! a live sandbox, and how many idle sandboxes one machine holds (with the host memory each
//! takes), against a one-shot `lode container run` of the same image and a bare `true`; then
//! the Wasm tier's (`sandbox_wasm.rs`); all in one run through the API of a real
//! `lode serve`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use crate::bench::sandbox_api::Api;
use crate::bench::support::{LodeServer, row, start_server_with};

/// Settings for `lode bench sandbox`.
#[derive(Debug, Args)]
pub struct SandboxBench {
    /// Creates (each with its first exec) and one-shot containers to time.
    #[arg(long, default_value_t = 30)]
    creates: usize,
    /// Exec round trips to time in one live sandbox.
    #[arg(long, default_value_t = 300)]
    execs: usize,
    /// Idle container sandboxes to hold at once.
    #[arg(long, default_value_t = 200)]
    alive: usize,
    /// Idle Wasm sandboxes to hold at once.
    #[arg(long, default_value_t = 5000)]
    alive_wasm: usize,
    /// Only the Wasm tier.
    #[arg(long)]
    wasm_only: bool,
    /// Where debootstrap bases are kept (unused here; the image is a busybox tree).
    #[arg(long, default_value = "/var/cache/lode/images/base")]
    image_base_dir: PathBuf,
}

/// A busybox root (the static busybox and its applet links) ingested as `bench/bb`.
fn ingest_busybox(server: &LodeServer, dir: &Path) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("lode bench sandbox needs a static busybox: apt-get install busybox-static");
    }
    let root = dir.join("bb");
    for sub in ["bin", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    std::fs::copy(busybox, root.join("bin/busybox"))?;
    let list = std::process::Command::new(busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
    }
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(["image", "ingest"])
        .arg(&root)
        .args(["--tag", "bench/bb"])
        .env("LODE_CONFIG", &server.client_file)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running lode image ingest")?;
    if !status.success() {
        bail!("lode image ingest failed");
    }
    Ok(())
}

impl SandboxBench {
    /// What the Wasm tier's rows need.
    fn wasm(&self) -> crate::bench::sandbox_wasm::WasmCounts {
        crate::bench::sandbox_wasm::WasmCounts {
            creates: self.creates,
            execs: self.execs,
            alive: self.alive_wasm,
        }
    }
}

/// Runs `lode bench sandbox`.
pub async fn sandbox(args: SandboxBench) -> Result<()> {
    let limit = (args.alive.max(args.alive_wasm) + 8).to_string();
    let server = start_server_with(
        &args.image_base_dir,
        &[
            "--max-sandboxes",
            &limit,
            "--max-sandboxes-per-app",
            &limit,
            "--container-memory",
            "64",
            // The Wasm Python interpreter compiles once per machine, not once per run.
            "--command-cache",
            "/var/cache/lode/compiled-commands",
        ],
    )?;
    let work = tempfile::tempdir()?;
    ingest_busybox(&server, work.path())?;
    let api = Api {
        client: reqwest::Client::new(),
        server,
    };
    if args.wasm_only {
        let wasm = crate::bench::sandbox_wasm::wasm_tier(&api, &args.wasm(), work.path()).await?;
        println!("  targets: {}", wasm.targets());
        return Ok(());
    }
    println!(
        "lode bench sandbox: {} creates, {} execs, {} idle sandboxes (busybox image)",
        args.creates, args.execs, args.alive
    );

    let mut bare = Vec::new();
    for _ in 0..args.creates.max(10) {
        let started = Instant::now();
        std::process::Command::new("true").status()?;
        bare.push(started.elapsed());
    }
    let bare = row("bare `true` on the host (baseline)", bare, None);

    // Warm the image mount and the helper, as a cached image would be.
    let warm = api.create("bench").await?;
    api.exec_true(&warm).await?;
    let mut one_shot = Vec::new();
    for _ in 0..args.creates {
        let started = Instant::now();
        api.run(
            "/v1/containers",
            &json!({"image": "bench/bb", "argv": ["true"]}),
        )
        .await?;
        one_shot.push(started.elapsed());
    }
    let one_shot = row(
        "`lode container run bench/bb -- true` through the API",
        one_shot,
        Some(bare),
    );
    let mut creates = Vec::new();
    for _ in 0..args.creates {
        let started = Instant::now();
        let id = api.create("bench").await?;
        api.exec_true(&id).await?;
        creates.push(started.elapsed());
        api.terminate(&id).await;
    }
    let create = row(
        "sandbox create + first exec of `true`",
        creates,
        Some(one_shot),
    );
    let mut execs = Vec::new();
    for _ in 0..args.execs {
        let started = Instant::now();
        api.exec_true(&warm).await?;
        execs.push(started.elapsed());
    }
    let exec = row(
        "exec round trip (`true`) in a live sandbox",
        execs,
        Some(bare),
    );
    api.terminate(&warm).await;

    // Idle sandboxes at once, and the host memory each takes.
    let (alive, took, used) = api.hold_idle("bench/bb", args.alive).await?;
    let per = used / alive.len().max(1) as u64;
    println!(
        "  idle sandboxes alive at once                              {} (made in {:.1?}), \
         {:.1} MiB of host memory each",
        alive.len(),
        took,
        per as f64 / (1 << 20) as f64
    );
    if let Some(id) = alive.first() {
        api.exec_true(id).await?;
    }
    for id in &alive {
        api.terminate(id).await;
    }
    let wasm = crate::bench::sandbox_wasm::wasm_tier(&api, &args.wasm(), work.path()).await?;
    println!(
        "  targets: container tier: create + first exec p50 <= 50 ms: {} ({create:.2?}); exec \
         round trip p50 <= 5 ms: {} ({exec:.2?}); >= 200 idle sandboxes: {} ({})",
        if create <= Duration::from_millis(50) {
            "met"
        } else {
            "missed"
        },
        if exec <= Duration::from_millis(5) {
            "met"
        } else {
            "missed"
        },
        if alive.len() >= 200 { "met" } else { "missed" },
        alive.len()
    );
    println!("  targets: {}", wasm.targets());
    Ok(())
}
