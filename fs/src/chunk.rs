//! Splitting files into chunks, each stored as one blob.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

/// How files are cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunking {
    /// Fixed-size pieces (Nydus uses 1 MiB).
    Fixed(u32),
    /// Content-defined boundaries with FastCDC (puzzlefs uses 16/64/256 KiB), so an insert
    /// early in a file moves only nearby boundaries.
    Cdc {
        /// Smallest chunk.
        min: u32,
        /// Target average.
        avg: u32,
        /// Largest chunk.
        max: u32,
    },
}

impl Default for Chunking {
    /// FastCDC around 256 KiB (64 KiB to 1 MiB); `fs/FORMAT.md` gives the measurements
    /// behind the choice.
    fn default() -> Self {
        Self::Cdc {
            min: 64 << 10,
            avg: 256 << 10,
            max: 1 << 20,
        }
    }
}

impl Chunking {
    /// Largest chunk this scheme produces.
    pub fn max_chunk(&self) -> u32 {
        match *self {
            Self::Fixed(size) => size,
            Self::Cdc { max, .. } => max,
        }
    }

    /// Calls `each` with every chunk of `reader`, in order.
    pub fn split(
        &self,
        mut reader: impl Read,
        mut each: impl FnMut(Vec<u8>) -> io::Result<()>,
    ) -> io::Result<()> {
        match *self {
            Self::Fixed(size) => loop {
                let mut chunk = Vec::with_capacity(size as usize);
                (&mut reader).take(size.into()).read_to_end(&mut chunk)?;
                if chunk.is_empty() {
                    return Ok(());
                }
                let last = chunk.len() < size as usize;
                each(chunk)?;
                if last {
                    return Ok(());
                }
            },
            Self::Cdc { min, avg, max } => {
                let chunker = fastcdc::v2020::StreamCDC::new(
                    reader,
                    min as usize,
                    avg as usize,
                    max as usize,
                );
                for chunk in chunker {
                    let chunk = chunk.map_err(|e| match e {
                        fastcdc::v2020::Error::IoError(e) => e,
                        other => io::Error::other(other.to_string()),
                    })?;
                    each(chunk.data)?;
                }
                Ok(())
            }
        }
    }
}

fn size_text(bytes: u32) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{}M", bytes >> 20)
    } else if bytes.is_multiple_of(1 << 10) {
        format!("{}K", bytes >> 10)
    } else {
        bytes.to_string()
    }
}

impl fmt::Display for Chunking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Fixed(size) => write!(f, "fixed:{}", size_text(size)),
            Self::Cdc { min, avg, max } => write!(
                f,
                "cdc:{}/{}/{}",
                size_text(min),
                size_text(avg),
                size_text(max)
            ),
        }
    }
}

fn parse_size(text: &str) -> Option<u32> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'K' | b'k' => (&text[..text.len() - 1], 10),
        b'M' | b'm' => (&text[..text.len() - 1], 20),
        _ => (text, 0),
    };
    digits.parse::<u32>().ok()?.checked_shl(shift)
}

impl FromStr for Chunking {
    type Err = String;

    /// `fixed:1M`, or `cdc:MIN/AVG/MAX` such as `cdc:16K/64K/256K`.
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "chunking {text:?} is not fixed:SIZE or cdc:MIN/AVG/MAX (e.g. fixed:1M, cdc:64K/256K/1M)"
            )
        };
        let (scheme, sizes) = text.split_once(':').ok_or_else(bad)?;
        let sizes: Vec<u32> = sizes
            .split('/')
            .map(parse_size)
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        let chunking = match (scheme, sizes.as_slice()) {
            ("fixed", &[size]) if size >= 4096 => Self::Fixed(size),
            // FastCDC's own bounds.
            ("cdc", &[min, avg, max])
                if (64..=1 << 20).contains(&min)
                    && (256..=4 << 20).contains(&avg)
                    && (1024..=16 << 20).contains(&max)
                    && min <= avg
                    && avg <= max =>
            {
                Self::Cdc { min, avg, max }
            }
            _ => return Err(bad()),
        };
        if chunking.max_chunk() > 16 << 20 {
            return Err(format!("{text}: chunks over 16 MiB are not allowed"));
        }
        Ok(chunking)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(chunking: Chunking, data: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        chunking
            .split(data, |c| {
                out.push(c);
                Ok(())
            })
            .unwrap();
        out
    }

    #[test]
    fn chunks_reassemble_the_input() {
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        for chunking in [Chunking::Fixed(1 << 20), Chunking::default()] {
            let chunks = pieces(chunking, &data);
            assert!(chunks.len() > 1, "{chunking}");
            assert!(
                chunks
                    .iter()
                    .all(|c| c.len() <= chunking.max_chunk() as usize)
            );
            assert_eq!(chunks.concat(), data, "{chunking}");
        }
        assert!(pieces(Chunking::default(), b"").is_empty());
        assert_eq!(pieces(Chunking::Fixed(4096), &[1; 4096]).len(), 1);
    }

    #[test]
    fn parses_what_it_prints() {
        for text in ["fixed:1M", "cdc:64K/256K/1M", "cdc:16K/64K/256K"] {
            let chunking: Chunking = text.parse().unwrap();
            assert_eq!(chunking.to_string(), text);
        }
        for bad in [
            "",
            "fixed",
            "fixed:0",
            "cdc:1M/64K/256K",
            "zstd:1M",
            "fixed:64M",
        ] {
            assert!(bad.parse::<Chunking>().is_err(), "{bad}");
        }
    }
}
