//! The model-load row of `lode bench gpu`: a safetensors file read through a lazy mount whose
//! chunks are all in the chunk cache (page cache dropped), tensor by tensor, into `lode:gpu`
//! buffers, reading the next piece while the last one uploads; against the disk limit (the
//! same file read natively from the same disk, page cache dropped) and, on a GPU, the PCIe
//! limit (a pinned copy's rate).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lode_wasi_gpu::Gpu;
use serde_json::{Map, Value, json};

use crate::bench::fs::{drop_caches, fresh_dir, ingest, mount, read_file, write_pseudo_random};
use crate::bench::support::start_registry;

/// One tensor: 16384 x 4096 f32, 256 MiB.
const TENSOR_SHAPE: [u64; 2] = [16384, 4096];
const TENSOR_BYTES: u64 = TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 4;
/// What one read hands to one upload.
const PIECE: usize = 64 << 20;

/// What the load measured.
pub struct LoadTimes {
    /// The model's bytes (header and tensors).
    pub bytes: u64,
    /// Through the lazy mount into buffers.
    pub into_buffers: Duration,
    /// The same file read natively, into memory only.
    pub disk: Duration,
}

/// Writes a safetensors file of whole 256 MiB f32 tensors, at least `size` bytes of them,
/// unless it is there. The values are a blake3 stream: nothing compresses or dedups.
fn ensure_model(path: &Path, size: u64) -> Result<u64> {
    let count = size.div_ceil(TENSOR_BYTES).max(1);
    let mut header = Map::new();
    for i in 0..count {
        header.insert(
            format!("layers.{i}.weight"),
            json!({"dtype": "F32", "shape": TENSOR_SHAPE,
                   "data_offsets": [i * TENSOR_BYTES, (i + 1) * TENSOR_BYTES]}),
        );
    }
    let mut header = serde_json::to_vec(&Value::Object(header))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    let total = 8 + header.len() as u64 + count * TENSOR_BYTES;
    if std::fs::metadata(path).is_ok_and(|m| m.len() == total) {
        return Ok(total);
    }
    std::fs::create_dir_all(path.parent().context("a file in a directory")?)?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    std::io::Write::write_all(&mut out, &(header.len() as u64).to_le_bytes())?;
    std::io::Write::write_all(&mut out, &header)?;
    write_pseudo_random(
        &mut out,
        b"lode bench gpu safetensors",
        count * TENSOR_BYTES,
    )?;
    std::io::Write::flush(&mut out)?;
    Ok(total)
}

/// The tensors' byte ranges in the file, in file order.
fn tensor_ranges(file: &mut std::fs::File) -> Result<Vec<(u64, u64)>> {
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        bail!("a safetensors header of {len} bytes is not believable");
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)?;
    let header: Map<String, Value> = serde_json::from_slice(&header)?;
    let data = 8 + len;
    let mut ranges: Vec<(u64, u64)> = header
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, tensor)| {
            let offsets = tensor["data_offsets"]
                .as_array()
                .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)))
                .with_context(|| format!("{name} has no data_offsets"))?;
            Ok((data + offsets.0, data + offsets.1))
        })
        .collect::<Result<_>>()?;
    ranges.sort();
    Ok(ranges)
}

/// Reads the model at `path` into one buffer per tensor on `gpu`: a reader thread reads
/// pieces while this one uploads the last. The buffers are kept until the end, as a loaded
/// model's are.
fn load(path: &Path, gpu: &Gpu) -> Result<()> {
    let mut file = std::fs::File::open(path)?;
    let ranges = tensor_ranges(&mut file)?;
    let buffers = ranges
        .iter()
        .map(|(start, end)| gpu.create(end - start))
        .collect::<Result<Vec<_>, _>>()?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, u64, Vec<u8>)>(2);
    let reader_ranges = ranges.clone();
    let reader = std::thread::spawn(move || -> Result<()> {
        for (i, (start, end)) in reader_ranges.into_iter().enumerate() {
            file.seek(SeekFrom::Start(start))?;
            let mut at = start;
            while at < end {
                let mut piece = vec![0u8; PIECE.min((end - at) as usize)];
                file.read_exact(&mut piece)?;
                let len = piece.len() as u64;
                if tx.send((i, at - start, piece)).is_err() {
                    return Ok(());
                }
                at += len;
            }
        }
        Ok(())
    });
    for (i, offset, piece) in rx {
        gpu.write(&buffers[i], offset, &piece)?;
    }
    reader.join().expect("the reader does not panic")?;
    gpu.synchronize()?;
    Ok(())
}

/// Makes the model (at least `size` bytes) under `work`, puts it behind a lazy mount with a
/// warm chunk cache, and times its load into `gpu` against reading it natively.
pub async fn load_through_mount(gpu: Gpu, work: &Path, size: u64) -> Result<LoadTimes> {
    let tree = work.join("safetensors");
    let file = tree.join("model.safetensors");
    std::fs::create_dir_all(work)?;
    // The file, its blobs in the registry and its chunks in the cache: three copies.
    let stat = rustix::fs::statvfs(work).with_context(|| format!("statfs {}", work.display()))?;
    let free = stat.f_bavail * stat.f_frsize;
    let have = std::fs::metadata(&file).map_or(0, |m| m.len());
    if free + have < 3 * size + (1 << 30) {
        bail!(
            "the model load needs about {} free on {} (the model, its blobs and its cached \
             chunks), and {} is; pass a smaller --model-size or another --work",
            indicatif::HumanBytes(3 * size + (1 << 30)),
            work.display(),
            indicatif::HumanBytes(free)
        );
    }
    let bytes = ensure_model(&file, size)?;
    let registry = start_registry()?;
    let (index, _) = ingest(&registry, &tree).await?;
    let run = work.join("run");
    fresh_dir(&run)?;
    let point = run.join("mnt");
    std::fs::create_dir_all(&point)?;
    let mount = mount(&registry, &index, &run.join("cache"), &point, false, true)?;
    let through_mount: PathBuf = point.join("model.safetensors");
    let timed = tokio::task::spawn_blocking(move || -> Result<(Duration, Duration)> {
        // Every chunk into the chunk cache, then nothing in the page cache.
        read_file(&through_mount)?;
        drop_caches()?;
        let started = Instant::now();
        load(&through_mount, &gpu)?;
        let into_buffers = started.elapsed();
        drop_caches()?;
        let (_, disk) = read_file(&file)?;
        Ok((into_buffers, disk))
    })
    .await
    .expect("the load does not panic");
    tokio::task::spawn_blocking(move || mount.unmount())
        .await
        .expect("unmounting does not panic")?;
    let _ = std::fs::remove_dir_all(&run);
    let (into_buffers, disk) = timed?;
    Ok(LoadTimes {
        bytes,
        into_buffers,
        disk,
    })
}
