//! The CLI for Python apps: `lode deploy app.py` and `lode run app.py`.
//!
//! Deploy imports the file with the embedded SDK in collect mode (`python3 -m lode collect`:
//! no entrypoint runs, `image.imports()` blocks are skipped), uploads the source as a blob,
//! creates inline secrets, resolves local image files, and sends the manifest.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use lode_native_runner::image_spec::ImageSpec;
use lode_registry::{BlobAccess, Digest, RegistryClient};
use reqwest::Method;
use serde::Deserialize;
use serde_json::Value;

use crate::cli::client::ApiClient;
use crate::proto::manifest::{
    FunctionSpec, MANIFEST_VERSION, Manifest, dns_label_rule, is_dns_label,
};

/// What `python3 -m lode collect` prints.
#[derive(Debug, Deserialize)]
struct Collected {
    app: String,
    module: String,
    #[serde(default)]
    inline_secrets: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    allow_callers: Vec<String>,
    functions: Vec<Value>,
    /// The files the app is made of (its module, local modules it imports, local image
    /// files), for `lode dev` to watch.
    #[serde(default)]
    sources: Vec<std::path::PathBuf>,
}

/// A Python app as deployed.
pub struct Deployed {
    /// The name it was deployed under.
    pub app: String,
    /// The files it is made of.
    pub sources: Vec<std::path::PathBuf>,
}

/// The Python interpreter the CLI runs the SDK with.
fn python() -> String {
    std::env::var("LODE_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// `PYTHONPATH` with the embedded SDK first.
fn python_path() -> Result<String> {
    let sdk = crate::sdk::extract(&crate::sdk::client_root()).context("writing the Python SDK")?;
    Ok(match std::env::var("PYTHONPATH") {
        Ok(existing) if !existing.is_empty() => format!("{}:{existing}", sdk.display()),
        _ => sdk.display().to_string(),
    })
}

fn collect(file: &Path) -> Result<Collected> {
    let output = std::process::Command::new(python())
        .args(["-m", "lode", "collect"])
        .arg(file)
        .env("PYTHONPATH", python_path()?)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {} (is Python 3.10+ installed?)", python()))?;
    if !output.status.success() {
        bail!(
            "reading the app from {} failed (see the lines above)",
            file.display()
        );
    }
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "the SDK printed something unexpected for {}: {}",
            file.display(),
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// The name a Python app is deployed under.
pub enum AppName<'a> {
    /// The `lode.App` name in the file.
    FromFile,
    /// `--name`.
    Given(&'a str),
    /// The file's name with a random suffix: `lode run`'s app, which never replaces the
    /// deployed one.
    Ephemeral,
    /// The file's name with `-dev`: `lode dev`'s app, at the same URLs every session.
    Dev,
}

impl AppName<'_> {
    fn pick(&self, in_file: &str) -> String {
        match self {
            AppName::FromFile => in_file.to_string(),
            AppName::Given(name) => name.to_string(),
            AppName::Ephemeral => {
                let suffix = format!("-run-{:06x}", rand::random::<u32>() & 0xff_ffff);
                let keep = 63 - suffix.len();
                let base = in_file[..in_file.len().min(keep)].trim_end_matches('-');
                format!("{base}{suffix}")
            }
            AppName::Dev => {
                let base = in_file[..in_file.len().min(59)].trim_end_matches('-');
                format!("{base}-dev")
            }
        }
    }
}

/// `lode deploy app.py [--name APP]`; returns the app's name.
pub async fn deploy(
    client: &ApiClient,
    registry: Arc<RegistryClient>,
    file: &Path,
    name: AppName<'_>,
) -> Result<Deployed> {
    let file = std::fs::canonicalize(file).with_context(|| format!("{}", file.display()))?;
    let collected = collect(&file)?;
    let sources = collected.sources.clone();
    let app = name.pick(&collected.app);
    if !is_dns_label(&app) {
        bail!("{}; pass --name", dns_label_rule("app", &app));
    }
    let source = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let source_digest = Digest::of(&source);
    let base_dir = file.parent().unwrap_or(Path::new("/")).to_path_buf();
    let blobs: Arc<dyn BlobAccess> = registry.clone();
    let mut functions = Vec::new();
    for mut function in collected.functions {
        function["python"]["source"] = Value::String(source_digest.to_string());
        function["python"]["module"] = Value::String(collected.module.clone());
        if let Some(image) = function["python"].get("image").cloned()
            && !image.is_null()
        {
            let mut spec: ImageSpec = serde_json::from_value(image)
                .context("the SDK produced an image spec this lode cannot read")?;
            crate::cli::container::resolve_local(&mut spec, &base_dir, &blobs).await?;
            function["python"]["image"] = serde_json::to_value(&spec)?;
        }
        let spec: FunctionSpec = serde_json::from_value(function.clone()).with_context(|| {
            format!("the SDK produced a function this lode cannot read: {function}")
        })?;
        functions.push(spec);
    }
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        app: app.clone(),
        config: Default::default(),
        limits: Default::default(),
        allow_callers: collected.allow_callers.clone(),
        run_of: matches!(name, AppName::Ephemeral | AppName::Dev).then(|| collected.app.clone()),
        functions,
    };
    if let Err(problems) = manifest.validate() {
        bail!("invalid app:\n  {}", problems.join("\n  "));
    }
    for (secret, values) in &collected.inline_secrets {
        crate::cli::secrets::put(client, secret, values).await?;
    }
    if registry
        .missing(std::slice::from_ref(&source_digest))
        .await?
        .contains(&source_digest)
    {
        registry
            .put_blob(&source_digest, source.into())
            .await
            .with_context(|| format!("uploading {}", file.display()))?;
    }
    let quiet = matches!(name, AppName::Ephemeral);
    crate::cli::deploy::follow_deploy(client, &manifest, quiet).await?;
    for function in manifest.functions.iter().filter(|f| f.web.is_none()) {
        let class = function.python.as_ref().and_then(|p| p.class.as_ref());
        let target = match class {
            // A class with web methods only is reached at its URLs, listed above.
            Some(class) if class.methods.is_empty() => continue,
            Some(class) => format!("{}.{}", function.name, class.methods[0]),
            None => function.name.clone(),
        };
        let line = format!("  {} -> lode call {app}/{target}", function.name);
        crate::cli::deploy::say(quiet, &line);
    }
    Ok(Deployed { app, sources })
}

/// `lode run app.py[::NAME] [ARGS...]`, as `modal run`: deploys the file as an ephemeral app
/// (a deployed app of the same name is left alone), runs its local entrypoint here (or calls
/// NAME) while the app's logs stream into this terminal, then removes the app, Ctrl-C
/// included. Returns the exit code.
pub async fn run(
    client: &ApiClient,
    registry: Arc<RegistryClient>,
    target: &str,
    entrypoint: Option<&str>,
    args: &[String],
) -> Result<i32> {
    let (file, pick) = match target.split_once("::") {
        Some((file, name)) if !name.is_empty() => (Path::new(file), Some(name)),
        Some(_) => bail!("{target}: name what to run after ::, e.g. app.py::main"),
        None => (Path::new(target), None),
    };
    if pick.is_some() && entrypoint.is_some() {
        bail!("give either {target} or --entrypoint, not both");
    }
    let app = deploy(client, registry, file, AppName::Ephemeral)
        .await?
        .app;
    let outcome = run_entrypoint(client, &app, target, entrypoint.or(pick), args).await;
    remove_app(client, &app).await;
    outcome
}

/// Removes an app this command deployed for itself, saying so if it cannot.
pub async fn remove_app(client: &ApiClient, app: &str) {
    let removed = client
        .send(client.request(Method::DELETE, &format!("/v1/apps/{app}")))
        .await;
    if let Err(e) = removed {
        eprintln!("lode: removing the app {app} failed: {e:#}; remove it with `lode rm {app}`");
    }
}

/// Streams the app's logs into this terminal (stderr), prefixed with its name, until the
/// task is aborted.
pub async fn follow_logs(client: &ApiClient, app: &str) -> Result<tokio::task::JoinHandle<()>> {
    let path = format!("/v1/apps/{app}/logs?follow=true&tail=0");
    let response = client.send(client.request(Method::GET, &path)).await?;
    let app = app.to_string();
    Ok(tokio::spawn(async move {
        use futures::StreamExt;
        let mut lines = crate::cli::client::ndjson_lines::<crate::proto::log::LogLine>(response);
        while let Some(Ok(line)) = lines.next().await {
            let stream = match line.stream {
                crate::proto::log::Stream::Stdout => "",
                crate::proto::log::Stream::Stderr => "err ",
                crate::proto::log::Stream::System => "lode ",
            };
            eprintln!("[{app}] {stream}{}", line.line);
        }
    }))
}

async fn run_entrypoint(
    client: &ApiClient,
    app: &str,
    target: &str,
    pick: Option<&str>,
    args: &[String],
) -> Result<i32> {
    let follower = follow_logs(client, app).await?;
    let file = target.split_once("::").map_or(target, |(file, _)| file);
    let mut command = tokio::process::Command::new(python());
    command
        .args(["-m", "lode", "run"])
        .arg(match pick {
            Some(name) => format!("{file}::{name}"),
            None => file.to_string(),
        })
        .env("PYTHONPATH", python_path()?)
        .env("LODE_API", client.base_url())
        // Calls from the entrypoint go to the ephemeral app.
        .env("LODE_APP", app);
    if let Some(token) = client.token() {
        command.env("LODE_TOKEN", token);
    }
    if !args.is_empty() {
        command.arg("--").args(args);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("running {}", python()))?;
    // Ctrl-C reaches the entrypoint too (one process group); wait for it to end, so the
    // app is removed after it.
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.with_context(|| format!("waiting for {}", python()))?,
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    // The last lines of output may still be on their way.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    follower.abort();
    Ok(status.code().unwrap_or_else(|| {
        128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
    }))
}

/// Whether `path` is a Python app (`lode deploy` then takes the Python path).
pub fn is_python_app(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "py") && path.is_file()
}
