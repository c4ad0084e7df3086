//! The GPUs this host has, as the NVIDIA driver lists them in `/proc/driver/nvidia/gpus`.
//! Reading the driver's own listing needs no CUDA library, so a host without one simply has
//! none, and a request for a GPU is refused at deploy with the resource named.

use std::path::Path;

/// One GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// Its model, as the driver names it (`NVIDIA H100 80GB HBM3`).
    pub model: String,
    /// Its device minor: its node is `/dev/nvidia<minor>`.
    pub minor: Option<u32>,
    /// Its PCI address as the driver names its directory (`0000:3b:00.0`), which is how
    /// CUDA's own device numbers, ordered differently, are matched to it.
    pub bus_id: String,
}

/// The GPUs of this host.
pub fn inventory() -> Vec<Gpu> {
    inventory_in(Path::new("/proc/driver/nvidia/gpus"))
}

/// The GPUs listed under `dir` (one directory per GPU, holding `information`).
pub fn inventory_in(dir: &Path) -> Vec<Gpu> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut gpus: Vec<Gpu> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let text = std::fs::read_to_string(entry.path().join("information")).ok()?;
            let field = |name: &str| {
                text.lines()
                    .find_map(|line| line.strip_prefix(name))
                    .map(|v| v.trim().to_string())
            };
            let model = field("Model:")?;
            let minor = field("Device Minor:").and_then(|m| m.parse().ok());
            Some(Gpu {
                model,
                minor,
                bus_id: entry.file_name().to_string_lossy().into_owned(),
            })
        })
        .collect();
    gpus.sort_by(|a, b| a.bus_id.cmp(&b.bus_id));
    gpus
}

/// A request split into its model (`any` or a name matched within the driver's, as `H100`)
/// and its count (`H100:2`; 1 without one). An unreadable request is an error naming it.
pub fn parse_request(request: &str) -> Result<(&str, usize), String> {
    let (model, count) = match request.split_once(':') {
        Some((model, count)) => (
            model,
            count
                .parse::<usize>()
                .ok()
                .filter(|c| *c >= 1)
                .ok_or_else(|| format!("gpu {request:?}: the count after ':' must be 1 or more"))?,
        ),
        None => (request, 1),
    };
    if model.is_empty() {
        return Err(format!(
            "gpu {request:?}: name a model (\"H100\") or \"any\""
        ));
    }
    Ok((model, count))
}

/// Whether `gpu` is one that `model` (from [`parse_request`]) asks for.
pub fn matches(gpu: &Gpu, model: &str) -> bool {
    model.eq_ignore_ascii_case("any") || gpu.model.to_lowercase().contains(&model.to_lowercase())
}

/// Whether `gpus` can meet a request: `any`, a model (`H100`, matched within the driver's
/// name), or either with a count (`H100:2`). An unreadable request is an error naming it.
pub fn satisfies(gpus: &[Gpu], request: &str) -> Result<bool, String> {
    let (model, count) = parse_request(request)?;
    Ok(gpus.iter().filter(|gpu| matches(gpu, model)).count() >= count)
}

/// The inventory in words, for errors.
pub fn describe(gpus: &[Gpu]) -> String {
    if gpus.is_empty() {
        return "no GPUs".into();
    }
    let names: Vec<_> = gpus.iter().map(|g| g.model.as_str()).collect();
    format!("{} GPU(s): {}", gpus.len(), names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drivers_listing_is_read_and_requests_are_matched() {
        let dir = tempfile::tempdir().unwrap();
        for (bus, model) in [
            ("0000:01:00.0", "NVIDIA H100 80GB HBM3"),
            ("0000:02:00.0", "NVIDIA A10"),
        ] {
            std::fs::create_dir(dir.path().join(bus)).unwrap();
            std::fs::write(
                dir.path().join(bus).join("information"),
                format!(
                    "Model: \t\t {model}\nIRQ:   42\nDevice Minor: \t {}\n",
                    bus.as_bytes()[6] - b'0'
                ),
            )
            .unwrap();
        }
        let gpus = inventory_in(dir.path());
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].model, "NVIDIA H100 80GB HBM3");
        assert_eq!((gpus[0].minor, gpus[1].minor), (Some(1), Some(2)));
        assert_eq!(gpus[1].bus_id, "0000:02:00.0");
        assert_eq!(satisfies(&gpus, "H100"), Ok(true));
        assert_eq!(satisfies(&gpus, "h100:1"), Ok(true));
        assert_eq!(satisfies(&gpus, "H100:2"), Ok(false));
        assert_eq!(satisfies(&gpus, "any:2"), Ok(true));
        assert_eq!(satisfies(&gpus, "B200"), Ok(false));
        assert!(satisfies(&gpus, "H100:0").is_err());
        assert_eq!(satisfies(&[], "any"), Ok(false));
        assert_eq!(describe(&[]), "no GPUs");
        assert!(inventory_in(&dir.path().join("missing")).is_empty());
    }
}
