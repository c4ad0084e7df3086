//! `lode image ...`: ingest a tree into the registry, export it again, tag, list, and copy
//! images between registries. The work happens in `lode-fs`; this is the command surface.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{HumanBytes, ProgressBar};
use lode_fs::{Chunking, IngestOptions};
use lode_registry::{BlobAccess, Digest, RegistryClient, TagUpdate};

use crate::cli::args::{ClientArgs, ImageCommand};

/// A digest (`blake3:<hex>` or bare hex) stands for itself; anything else is a tag.
pub async fn resolve_reference(registry: &dyn BlobAccess, reference: &str) -> Result<Digest> {
    if let Ok(digest) = reference.parse::<Digest>() {
        return Ok(digest);
    }
    registry.get_tag(reference).await.with_context(|| {
        format!(
            "{reference:?} is neither a digest (blake3:<64 hex>) nor a tag in {}",
            registry.location()
        )
    })
}

fn spinner(message: String) -> ProgressBar {
    let spinner = ProgressBar::new_spinner().with_message(message);
    spinner.enable_steady_tick(Duration::from_millis(120));
    spinner
}

/// `lode image ingest PATH [--tag NAME]`: prints stats on stderr and the digest on stdout.
pub async fn ingest(
    registry: Arc<dyn BlobAccess>,
    path: &Path,
    tag: Option<&str>,
    options: IngestOptions,
    json: bool,
) -> Result<()> {
    if let Some(tag) = tag {
        lode_registry::validate_tag_name(tag)?;
    }
    let started = Instant::now();
    let progress = spinner(format!("ingesting {}", path.display()));
    let chunking = options.chunking;
    let result = lode_fs::ingest(path, registry.clone(), options).await;
    progress.finish_and_clear();
    let report = result
        .with_context(|| format!("ingesting {} into {}", path.display(), registry.location()))?;
    let digest = report
        .digest
        .clone()
        .expect("a finished ingest names its index");
    if let Some(tag) = tag {
        registry
            .set_tag(tag, &digest, TagUpdate::Always)
            .await
            .with_context(|| format!("tagging {digest} as {tag:?}"))?;
    }
    let elapsed = started.elapsed();
    let rate = report.file_bytes as f64 / elapsed.as_secs_f64() / 1e6;
    if json {
        let value = serde_json::json!({
            "digest": digest.to_string(), "tag": tag, "chunking": chunking.to_string(),
            "files": report.files, "dirs": report.dirs, "symlinks": report.symlinks,
            "special": report.special, "hardlinks": report.hardlinks,
            "file_bytes": report.file_bytes, "inline_bytes": report.inline_bytes,
            "chunks": report.chunks, "new_chunks": report.new_chunks,
            "new_bytes": report.new_bytes, "deduped_bytes": report.deduped_bytes,
            "index_bytes": report.index_bytes, "seconds": elapsed.as_secs_f64(),
        });
        println!("{value}");
        return Ok(());
    }
    eprintln!("ingested {} into {}", path.display(), registry.location());
    eprintln!("  index    {digest} ({})", HumanBytes(report.index_bytes));
    eprintln!(
        "  entries  {} files (+{} hard links), {} dirs, {} symlinks, {} special",
        report.files, report.hardlinks, report.dirs, report.symlinks, report.special
    );
    eprintln!(
        "  bytes    {} in files, {} inline in the index",
        HumanBytes(report.file_bytes),
        HumanBytes(report.inline_bytes)
    );
    eprintln!(
        "  chunks   {} ({}), {} new: {} uploaded",
        report.chunks,
        chunking,
        report.new_chunks,
        HumanBytes(report.new_bytes)
    );
    eprintln!("  deduped  {}", HumanBytes(report.deduped_bytes));
    eprintln!("  took     {elapsed:.2?} ({rate:.1} MB/s)");
    if let Some(tag) = tag {
        eprintln!("  tagged   {tag}");
    }
    println!("{digest}");
    Ok(())
}

/// `lode image export REF OUT`.
pub async fn export(registry: Arc<dyn BlobAccess>, reference: &str, out: &Path) -> Result<()> {
    let digest = resolve_reference(registry.as_ref(), reference).await?;
    let started = Instant::now();
    let bytes = registry.get_index(&digest).await?;
    let index = lode_fs::Index::parse(bytes).with_context(|| format!("loading index {digest}"))?;
    let progress = spinner(format!("exporting {digest} to {}", out.display()));
    let result = lode_fs::export(&index, registry.clone(), out).await;
    progress.finish_and_clear();
    let report = result.with_context(|| format!("exporting {digest} to {}", out.display()))?;
    eprintln!(
        "exported {digest} to {}: {} entries, {} in files, {} chunks fetched, {:.2?}",
        out.display(),
        report.entries,
        HumanBytes(report.file_bytes),
        report.chunks_fetched,
        started.elapsed()
    );
    if report.ownership_skipped > 0 || report.xattrs_skipped > 0 {
        eprintln!(
            "warning: owners of {} entries and {} xattrs were not restored (run as root to \
             restore them)",
            report.ownership_skipped, report.xattrs_skipped
        );
    }
    Ok(())
}

/// `lode image tag REF NAME [--expect OLD]`.
pub async fn tag(
    registry: &dyn BlobAccess,
    reference: &str,
    name: &str,
    expect: Option<&str>,
) -> Result<()> {
    let digest = resolve_reference(registry, reference).await?;
    // Only existing images can be tagged, so a tag never dangles.
    registry
        .get_index(&digest)
        .await
        .with_context(|| format!("cannot tag {digest}"))?;
    let condition = match expect {
        None => TagUpdate::Always,
        Some("none") => TagUpdate::IfAbsent,
        Some(old) => TagUpdate::IfEquals(old.parse()?),
    };
    let previous = registry.set_tag(name, &digest, condition).await?;
    match previous {
        Some(old) if old != digest => println!("{name}: {old} -> {digest}"),
        Some(_) => println!("{name}: {digest} (unchanged)"),
        None => println!("{name}: {digest}"),
    }
    Ok(())
}

/// `lode image untag NAME`.
pub async fn untag(registry: &RegistryClient, name: &str) -> Result<()> {
    registry.delete_tag(name, TagUpdate::Always).await?;
    println!("removed tag {name}");
    Ok(())
}

/// `lode image ls [PREFIX]`.
pub async fn list(registry: &dyn BlobAccess, prefix: &str) -> Result<()> {
    let tags = registry.list_tags(prefix).await?;
    if tags.is_empty() {
        eprintln!(
            "no tags{} in {}; `lode image ingest DIR --tag NAME` adds one",
            if prefix.is_empty() {
                String::new()
            } else {
                format!(" starting with {prefix:?}")
            },
            registry.location()
        );
        return Ok(());
    }
    let width = tags.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    for (name, digest) in tags {
        println!("{name:width$}  {digest}");
    }
    Ok(())
}

/// `lode image push/pull`: copies an image (and its tag, when named by one).
pub async fn copy(source: &dyn BlobAccess, dest: &dyn BlobAccess, reference: &str) -> Result<()> {
    let digest = resolve_reference(source, reference).await?;
    let started = Instant::now();
    let progress = spinner(format!(
        "copying {digest} from {} to {}",
        source.location(),
        dest.location()
    ));
    let result = lode_fs::copy_image(source, dest, &digest).await;
    progress.finish_and_clear();
    let report = result.with_context(|| {
        format!(
            "copying {digest} from {} to {}",
            source.location(),
            dest.location()
        )
    })?;
    if reference.parse::<Digest>().is_err() {
        dest.set_tag(reference, &digest, TagUpdate::Always).await?;
    }
    eprintln!(
        "copied {digest} to {}: {} of {} chunks sent ({}), {:.2?}",
        dest.location(),
        report.copied_chunks,
        report.chunks,
        HumanBytes(report.copied_bytes),
        started.elapsed()
    );
    println!("{digest}");
    Ok(())
}

/// Parses `--chunking`.
pub fn parse_chunking(text: &str) -> Result<Chunking> {
    match text.parse() {
        Ok(chunking) => Ok(chunking),
        Err(message) => bail!("{message}"),
    }
}

/// Runs one `lode image` command.
pub async fn run(client: &ClientArgs, command: ImageCommand) -> Result<()> {
    match command {
        ImageCommand::Build {
            file,
            tag,
            quiet,
            registry: flag,
        } => {
            let api = crate::cli::client::client(client)?;
            let registry: Arc<dyn lode_registry::BlobAccess> = match &flag.registry {
                Some(_) => crate::cli::client::registry(client, &flag.registry)?,
                None => Arc::new(crate::cli::client::connect(&api.registry().await?)?),
            };
            crate::cli::container::build(&api, registry, &file, tag, quiet).await
        }
        ImageCommand::Ingest {
            path,
            tag,
            chunking,
            inline_max,
            json,
            registry: flag,
        } => {
            let options = lode_fs::IngestOptions {
                chunking,
                inline_max,
                cipher: None,
            };
            let target = crate::cli::client::registry(client, &flag.registry)?;
            ingest(target, &path, tag.as_deref(), options, json).await
        }
        ImageCommand::Export {
            reference,
            out,
            registry: flag,
        } => {
            export(
                crate::cli::client::registry(client, &flag.registry)?,
                &reference,
                &out,
            )
            .await
        }
        ImageCommand::Tag {
            reference,
            name,
            expect,
            registry: flag,
        } => {
            let target = crate::cli::client::registry(client, &flag.registry)?;
            tag(target.as_ref(), &reference, &name, expect.as_deref()).await
        }
        ImageCommand::Untag {
            name,
            registry: flag,
        } => {
            untag(
                &*crate::cli::client::registry(client, &flag.registry)?,
                &name,
            )
            .await
        }
        ImageCommand::Ls {
            prefix,
            registry: flag,
        } => {
            list(
                crate::cli::client::registry(client, &flag.registry)?.as_ref(),
                &prefix,
            )
            .await
        }
        ImageCommand::Push(args) => {
            let (local, other) = crate::cli::client::registry_pair(client, &args)?;
            copy(&local, &other, &args.reference).await
        }
        ImageCommand::Pull(args) => {
            let (local, other) = crate::cli::client::registry_pair(client, &args)?;
            copy(&other, &local, &args.reference).await
        }
    }
}
