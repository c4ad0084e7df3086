//! Value parsers for flags: sizes, `NAME=VALUE` and `HOSTDIR:/path[:ro]`. Each error names
//! the text and the form it should have.

/// Parses sizes such as `512M`, `20G` or `1048576` (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((at, 'K' | 'k')) => (&text[..at], 10),
        Some((at, 'M' | 'm')) => (&text[..at], 20),
        Some((at, 'G' | 'g')) => (&text[..at], 30),
        Some((at, 'T' | 't')) => (&text[..at], 40),
        _ => (text, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?} is not a size such as 512M, 20G or 1048576"))
}

/// Parses `HOST:/path[:ro]`.
pub fn parse_volume(text: &str) -> Result<crate::proto::containers::VolumeRequest, String> {
    let (rest, read_only) = match text.strip_suffix(":ro") {
        Some(rest) => (rest, true),
        None => (text.strip_suffix(":rw").unwrap_or(text), false),
    };
    let Some((source, target)) = rest.split_once(':') else {
        return Err(format!("{text:?} is not HOSTDIR:/path[:ro]"));
    };
    let source =
        std::fs::canonicalize(source).map_err(|e| format!("volume source {source:?}: {e}"))?;
    if !target.starts_with('/') {
        return Err(format!("volume target {target:?} must be an absolute path"));
    }
    Ok(crate::proto::containers::VolumeRequest {
        source: source.display().to_string(),
        target: target.to_string(),
        read_only,
    })
}

/// Parses `NAME:/path[:ro]`, a Lode volume and where it is mounted.
pub fn parse_named_volume(text: &str) -> Result<crate::proto::manifest::VolumeMount, String> {
    let (rest, read_only) = match text.strip_suffix(":ro") {
        Some(rest) => (rest, true),
        None => (text.strip_suffix(":rw").unwrap_or(text), false),
    };
    match rest.split_once(':') {
        Some((name, path)) if !name.is_empty() && path.starts_with('/') => {
            Ok(crate::proto::manifest::VolumeMount {
                name: name.to_string(),
                path: path.to_string(),
                read_only,
                create_if_missing: false,
            })
        }
        _ => Err(format!(
            "{text:?} is not NAME:/path[:ro] (a volume from `lode volume ls`, an absolute path)"
        )),
    }
}

/// Parses `NAME=VALUE`.
pub fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("{text:?} is not NAME=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "G", "-1G", "0", "1.5G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
