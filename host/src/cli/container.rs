//! `lode image build` and `lode container run`: clients of `lode serve`, which builds and
//! runs. The client's part is what only it can see: local files and OCI layouts, which it
//! ingests into the registry before sending the spec.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use lode_fs::IngestOptions;
use lode_native_runner::image_spec::{Base, ImageSpec, Step};
use lode_registry::BlobAccess;
use reqwest::Method;

use crate::cli::client::{ApiClient, ndjson_lines, write_output};
use crate::proto::containers::{
    BuildEnd, BuildLine, BuildRequest, ContainerLine, ContainerRequest,
};
use lode_native_runner::builder::BuildEvent;

/// Ingests a directory, returning its digest.
async fn ingest_dir(registry: &Arc<dyn BlobAccess>, dir: &Path) -> Result<String> {
    let report = lode_fs::ingest(dir, registry.clone(), IngestOptions::default())
        .await
        .with_context(|| format!("uploading {}", dir.display()))?;
    Ok(report.digest.context("ingest stored no index")?.to_string())
}

/// Uploads what the spec names on this machine and fills in the digests. Relative local
/// paths are taken from `base_dir` (the spec file's directory).
pub async fn resolve_local(
    spec: &mut ImageSpec,
    base_dir: &Path,
    registry: &Arc<dyn BlobAccess>,
) -> Result<()> {
    let local_path = |path: &Path| -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            base_dir.join(path)
        }
    };
    if let Base::FromOci { path, digest } = &mut spec.base {
        let source = local_path(path);
        let scratch = tempfile::tempdir().context("a temporary directory for the OCI import")?;
        let rootfs = scratch.path().join("rootfs");
        eprintln!("importing OCI image {}", source.display());
        lode_native_runner::oci::import(&source, &rootfs)
            .map_err(|e| anyhow::anyhow!("from_oci {}: {e}", source.display()))?;
        *digest = Some(ingest_dir(registry, &rootfs).await?);
    }
    for step in &mut spec.steps {
        match step {
            Step::AddLocalDir { local, digest, .. } => {
                let dir = local_path(local);
                if !dir.is_dir() {
                    bail!("add_local_dir: {} is not a directory", dir.display());
                }
                *digest = Some(ingest_dir(registry, &dir).await?);
            }
            Step::AddLocalFile { local, digest, .. } => {
                let file = local_path(local);
                if !file.is_file() {
                    bail!("add_local_file: {} is not a file", file.display());
                }
                // A tree holding the file alone, so it travels like a directory would. The
                // copy keeps the file's mode and mtime, and the holder is pinned to the
                // epoch, so the same file always uploads as the same digest (the cache key).
                let holder = tempfile::tempdir()?;
                let name = file.file_name().context("the file has no name")?;
                let copy = holder.path().join(name);
                std::fs::copy(&file, &copy)
                    .with_context(|| format!("reading {}", file.display()))?;
                let meta = std::fs::metadata(&file)?;
                std::fs::set_permissions(&copy, meta.permissions())?;
                std::fs::File::options()
                    .write(true)
                    .open(&copy)?
                    .set_modified(meta.modified()?)?;
                std::fs::set_permissions(
                    holder.path(),
                    std::os::unix::fs::PermissionsExt::from_mode(0o755),
                )?;
                std::fs::File::open(holder.path())?.set_modified(std::time::UNIX_EPOCH)?;
                *digest = Some(ingest_dir(registry, holder.path()).await?);
            }
            _ => {}
        }
    }
    Ok(())
}

/// `lode image build FILE [--tag NAME]`: progress on stderr, the digest on stdout.
pub async fn build(
    api: &ApiClient,
    registry: Arc<dyn BlobAccess>,
    file: &Path,
    tag: Option<String>,
    quiet: bool,
) -> Result<()> {
    let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let mut spec =
        ImageSpec::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let base_dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    resolve_local(&mut spec, base_dir, &registry).await?;
    let digest = build_spec(api, spec, tag, quiet).await?;
    println!("{digest}");
    Ok(())
}

/// Sends a resolved spec to the server and follows the build; returns the digest.
pub async fn build_spec(
    api: &ApiClient,
    spec: ImageSpec,
    tag: Option<String>,
    quiet: bool,
) -> Result<String> {
    let request = api
        .request(Method::POST, "/v1/images/build")
        .json(&BuildRequest { spec, tag });
    let response = api.send_found(request).await?;
    let mut lines = ndjson_lines::<BuildLine>(response);
    let mut stderr = std::io::stderr();
    while let Some(line) = lines.next().await {
        match line? {
            BuildLine::Event(BuildEvent::Log { .. }) if quiet => {}
            BuildLine::Event(event) => {
                if let Some(line) = event.line() {
                    let _ = writeln!(stderr, "{line}");
                }
            }
            BuildLine::End(BuildEnd::Done { digest, seconds }) => {
                let _ = writeln!(stderr, "built {digest} in {seconds:.1} s");
                return Ok(digest);
            }
            BuildLine::End(BuildEnd::Error { message }) => bail!("{message}"),
        }
    }
    bail!("the server ended the build without a result (did `lode serve` stop?)")
}

/// Exit code for a container that could not run (Docker uses the same).
pub const COULD_NOT_RUN: u8 = 125;

/// `lode container run`: streams the command's output and returns its exit code.
pub async fn run(api: &ApiClient, request: ContainerRequest) -> Result<i32> {
    let response = api
        .send_found(api.request(Method::POST, "/v1/containers").json(&request))
        .await?;
    let mut lines = ndjson_lines::<ContainerLine>(response);
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    while let Some(line) = lines.next().await {
        match line? {
            ContainerLine::Started { .. } => {}
            ContainerLine::Stdout { data } => write_output(&mut stdout, &data)?,
            ContainerLine::Stderr { data } => write_output(&mut stderr, &data)?,
            ContainerLine::Exit {
                code, killed_by, ..
            } => {
                if let Some(why) = killed_by {
                    eprintln!("lode: container {why}");
                }
                return Ok(code);
            }
            ContainerLine::Error { message } => bail!("{message}"),
        }
    }
    bail!("the server ended the container's stream without an exit status (did `lode serve` stop?)")
}
