//! Encrypted chunks, for trees whose bytes must stay private wherever chunks are kept: the
//! registry (shared by hosts, maybe public-read) and the chunk cache a lazy mount fills. A
//! memory snapshot is one: it holds a process's memory, secret values included.
//!
//! Each chunk is sealed on its own with XChaCha20-Poly1305, so a mount still fetches and opens
//! only the chunks a reader touches. The nonce is a keyed hash of the chunk's bytes: the same
//! bytes under the same key make the same chunk (so chunks dedupe as before), and nothing of
//! them shows but that equality. The index names the sealed chunks (their digests, so the
//! registry and the cache verify them as any other) and the plain lengths; it holds no file
//! bytes in the clear (see `fs/FORMAT.md`). Names, sizes and modes are not hidden.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// Bytes a sealed chunk has beyond its plain bytes: the nonce and the tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + 16;
const NONCE_LEN: usize = 24;

/// Seals and opens chunks under one key.
#[derive(Clone)]
pub struct ChunkCipher {
    aead: XChaCha20Poly1305,
    nonce_key: [u8; 32],
    id: [u8; 32],
}

impl std::fmt::Debug for ChunkCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key: only the name derived from it.
        f.debug_struct("ChunkCipher")
            .field(
                "id",
                &blake3::Hash::from(self.id).to_hex()[..16].to_string(),
            )
            .finish_non_exhaustive()
    }
}

/// Why a sealed chunk did not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Too short to hold a nonce and a tag.
    #[error("a sealed chunk of {0} bytes is shorter than its nonce and tag")]
    Short(usize),
    /// Sealed under another key, or changed.
    #[error("the chunk does not open with this key (sealed with another key, or altered)")]
    Refused,
}

impl ChunkCipher {
    /// The cipher of `key` (32 secret bytes). Its sub-keys are derived from it, each for one
    /// purpose.
    pub fn new(key: &[u8; 32]) -> Self {
        let cipher_key = blake3::derive_key("lode 2026-12 chunk cipher: encryption", key);
        Self {
            aead: XChaCha20Poly1305::new_from_slice(&cipher_key).expect("32 bytes"),
            nonce_key: blake3::derive_key("lode 2026-12 chunk cipher: nonce", key),
            id: blake3::derive_key("lode 2026-12 chunk cipher: id", key),
        }
    }

    /// Names the key without revealing it: two ciphers with one id open each other's chunks.
    pub fn id(&self) -> [u8; 32] {
        self.id
    }

    /// `plain` sealed: nonce, then ciphertext and tag.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let hash = blake3::keyed_hash(&self.nonce_key, plain);
        let nonce = XNonce::from_slice(&hash.as_bytes()[..NONCE_LEN]);
        let sealed = self
            .aead
            .encrypt(nonce, plain)
            .expect("a chunk is far below the cipher's length limit");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// The plain bytes of a chunk [`seal`](Self::seal) made with this key.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(OpenError::Short(sealed.len()));
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        self.aead
            .decrypt(XNonce::from_slice(nonce), body)
            .map_err(|_| OpenError::Refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bytes_open_with_the_key_and_only_with_it() {
        let cipher = ChunkCipher::new(&[1; 32]);
        let plain = b"the secret value is hunter2".repeat(100);
        let sealed = cipher.seal(&plain);
        assert_eq!(sealed.len(), plain.len() + SEAL_OVERHEAD);
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(cipher.open(&sealed).unwrap(), plain);
        // The same bytes seal the same way (chunks dedupe); others differently.
        assert_eq!(cipher.seal(&plain), sealed);
        assert_ne!(cipher.seal(b"other"), cipher.seal(b"other!"));
        let other = ChunkCipher::new(&[2; 32]);
        assert_ne!(other.id(), cipher.id());
        assert!(matches!(other.open(&sealed), Err(OpenError::Refused)));
        let mut altered = sealed.clone();
        altered[30] ^= 1;
        assert!(matches!(cipher.open(&altered), Err(OpenError::Refused)));
        assert!(matches!(
            cipher.open(&sealed[..10]),
            Err(OpenError::Short(10))
        ));
        assert!(!format!("{cipher:?}").contains("aead"));
    }
}
