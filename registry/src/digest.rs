//! The blake3 content digest that names every blob.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// A blake3 digest, written `blake3:<64 hex>` wherever it leaves the process.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    const PREFIX: &'static str = "blake3:";

    /// Hashes `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// The 64-character lowercase hex form, without the `blake3:` prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Checks that `bytes` hash to this digest.
    pub fn verify(&self, bytes: &[u8]) -> Result<(), Error> {
        let actual = Self::of(bytes);
        if &actual == self {
            Ok(())
        } else {
            Err(Error::DigestMismatch {
                expected: self.clone(),
                actual,
            })
        }
    }

    /// Wraps 32 raw bytes, as digests travel in the registry's protocol.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        <[u8; 32]>::try_from(bytes)
            .map(Self)
            .map_err(|_| Error::InvalidDigest(format!("{} raw bytes", bytes.len())))
    }

    /// Wraps a digest computed elsewhere (a streaming hasher, an index entry).
    pub fn from_hash(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = Error;

    /// Accepts `blake3:<hex>` or bare hex; only lowercase hex, so one digest has one spelling.
    fn from_str(text: &str) -> Result<Self, Error> {
        let hex_part = text.strip_prefix(Self::PREFIX).unwrap_or(text);
        let invalid = || Error::InvalidDigest(text.to_string());
        if hex_part.len() != 64 || hex_part.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| invalid())?;
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let digest = Digest::of(b"lode");
        let text = digest.to_string();
        assert!(text.starts_with("blake3:"));
        assert_eq!(text.parse::<Digest>().unwrap(), digest);
        assert_eq!(digest.hex().parse::<Digest>().unwrap(), digest);
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in [
            "",
            "blake3:",
            "blake3:zz",
            "sha256:00",
            &"A".repeat(64),
            &"0".repeat(63),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} parsed");
        }
    }
}
