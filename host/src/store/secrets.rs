//! Secrets: named sets of environment variables, encrypted at rest.
//!
//! Values are sealed with XChaCha20-Poly1305 under a key in `<data-dir>/secret.key` (mode
//! 0600, made on first use), so the state store and its backups hold no plaintext. The
//! secret's name is the associated data: a sealed value copied under another name (by anyone
//! who can write the store) does not open. Secrets sealed before that (format 1) are sealed
//! again when the store opens. The variable names stay readable for `lode secret ls`; values
//! only ever leave this module as a function container's environment.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::proto::apps::SecretInfo;
use crate::store::state::{StateStore, Table};

/// A secret as stored: its variable names in the clear, the values sealed.
#[derive(Serialize, Deserialize)]
struct Sealed {
    /// 2: sealed with the secret's name as associated data; absent (1): without.
    #[serde(default = "format_1")]
    format: u32,
    names: Vec<String>,
    nonce: String,
    ciphertext: String,
    updated_ms: u64,
}

/// The format this module seals with.
const FORMAT: u32 = 2;

fn format_1() -> u32 {
    1
}

/// The encrypted secret store.
pub struct Secrets {
    cipher: XChaCha20Poly1305,
    state: Arc<dyn StateStore>,
    /// Derived from the key, so hosts that share it share this too.
    peer_token: String,
    /// Derived from the key: seal and encrypt memory snapshots stored in the registry.
    snapshot_keys: SnapshotKeys,
}

/// The keys of memory snapshots in the registry, derived one way from the secrets key: hosts
/// that share the key restore each other's snapshots, and nobody else reads or forges them.
#[derive(Clone)]
pub struct SnapshotKeys {
    /// Seals a snapshot's index (CRIU restores whatever state a snapshot names, credentials
    /// included, so only one sealed by a host holding the key is ever restored) and names
    /// its tags (a snapshot's key hashes secret values, so it is not shown as it is).
    pub seal: [u8; 32],
    /// Encrypts its chunks: a snapshot holds a process's memory, secret values included.
    pub cipher: [u8; 32],
}

impl SnapshotKeys {
    /// The keys derived from the secrets key `key`.
    pub fn derive(key: &[u8; 32]) -> Self {
        Self {
            seal: blake3::derive_key("lode 2026-12 memory snapshot seal", key),
            cipher: blake3::derive_key("lode 2026-12 memory snapshot encryption", key),
        }
    }
}

impl Secrets {
    /// Opens the store, creating the key in `data_dir` if there is none.
    pub fn open(data_dir: &Path, state: Arc<dyn StateStore>) -> Result<Self> {
        let path = data_dir.join("secret.key");
        let key = match std::fs::read(&path) {
            Ok(key) => key,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; 32] = rand::random();
                let temp = data_dir.join(format!(".secret.key.{}", std::process::id()));
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&temp)
                    .with_context(|| format!("creating {}", temp.display()))?;
                file.write_all(&key)?;
                file.sync_all()?;
                std::fs::rename(&temp, &path)?;
                key.to_vec()
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Self::with_key(&path, key, state)
    }

    /// Opens the store with the key in `path`, which must exist: hosts that share a state
    /// store must seal with one key, so none of them makes its own.
    pub fn open_key_file(path: &Path, state: Arc<dyn StateStore>) -> Result<Self> {
        let key = std::fs::read(path).with_context(|| {
            format!(
                "reading the secrets key {} (make one with `head -c 32 /dev/urandom > {}` and \
                 give every host the same file)",
                path.display(),
                path.display()
            )
        })?;
        Self::with_key(path, key, state)
    }

    fn with_key(path: &Path, key: Vec<u8>, state: Arc<dyn StateStore>) -> Result<Self> {
        if key.len() != 32 {
            bail!(
                "{} is not a 32-byte key; restore it from a backup (secrets sealed with the old \
                 key cannot be read without it)",
                path.display()
            );
        }
        let key: [u8; 32] = key.try_into().expect("checked above");
        let secrets = Self {
            cipher: XChaCha20Poly1305::new_from_slice(&key).expect("32 bytes"),
            state,
            peer_token: hex::encode(blake3::derive_key(
                "lode 2026-12 hosts' peer API token",
                &key,
            )),
            snapshot_keys: SnapshotKeys::derive(&key),
        };
        secrets.migrate()?;
        Ok(secrets)
    }

    /// Seals format-1 secrets again with their names as associated data.
    fn migrate(&self) -> Result<()> {
        for (name, bytes) in self.state.list_entries(Table::Secrets)? {
            let Ok(sealed) = serde_json::from_slice::<Sealed>(&bytes) else {
                continue;
            };
            if sealed.format >= FORMAT {
                continue;
            }
            match self.open_sealed(&name, &sealed) {
                Ok(values) => {
                    self.put(&name, &values)?;
                    tracing::info!(secret = %name, "secret sealed again with its name bound in");
                }
                Err(e) => tracing::warn!(secret = %name, "secret left as it was: {e:#}"),
            }
        }
        Ok(())
    }

    /// The keys of memory snapshots in the registry.
    pub fn snapshot_keys(&self) -> SnapshotKeys {
        self.snapshot_keys.clone()
    }

    /// The token hosts that share this key present to each other's peer routes: derived
    /// one way from the key, so it reveals nothing of it.
    pub fn peer_token(&self) -> &str {
        &self.peer_token
    }

    /// Stores (or replaces) a secret.
    pub fn put(&self, name: &str, values: &BTreeMap<String, String>) -> Result<()> {
        let nonce_bytes: [u8; 24] = rand::random();
        let plaintext = serde_json::to_vec(values)?;
        let ciphertext = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce_bytes),
                Payload {
                    msg: &plaintext,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| anyhow::anyhow!("sealing secret {name:?} failed"))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let sealed = Sealed {
            format: FORMAT,
            names: values.keys().cloned().collect(),
            nonce: b64.encode(nonce_bytes),
            ciphertext: b64.encode(ciphertext),
            updated_ms: crate::util::now_ms(),
        };
        self.state
            .put_entry(Table::Secrets, name, &serde_json::to_vec(&sealed)?)
    }

    /// A secret's variables, or `None` if there is no such secret.
    pub fn get(&self, name: &str) -> Result<Option<BTreeMap<String, String>>> {
        let Some(bytes) = self.state.get_entry(Table::Secrets, name)? else {
            return Ok(None);
        };
        let sealed: Sealed = serde_json::from_slice(&bytes)
            .with_context(|| format!("secret {name:?} is corrupt in the state store"))?;
        // Every format-1 secret was resealed at open: one found now was put there since (a
        // copy under another name opens in format 1, which binds no name).
        if sealed.format < FORMAT {
            bail!(
                "secret {name:?} is in the old format, which this server resealed at start: \
                 it was written since, outside Lode; create it again with `lode secret create`"
            );
        }
        self.open_sealed(name, &sealed).map(Some)
    }

    fn open_sealed(&self, name: &str, sealed: &Sealed) -> Result<BTreeMap<String, String>> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let nonce = b64.decode(&sealed.nonce)?;
        let ciphertext = b64.decode(&sealed.ciphertext)?;
        if nonce.len() != 24 {
            bail!("secret {name:?} is corrupt in the state store");
        }
        let aad: &[u8] = if sealed.format >= FORMAT {
            name.as_bytes()
        } else {
            b""
        };
        let plaintext = self
            .cipher
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &ciphertext,
                    aad,
                },
            )
            .map_err(|_| {
                anyhow::anyhow!(
                    "secret {name:?} cannot be opened with this server's secret.key under this \
                     name (was the key replaced, or the sealed value copied from another \
                     secret?); create it again with `lode secret create`"
                )
            })?;
        Ok(serde_json::from_slice(&plaintext)?)
    }

    /// Every secret's name and variable names.
    pub fn list(&self) -> Result<Vec<SecretInfo>> {
        self.state
            .list_entries(Table::Secrets)?
            .into_iter()
            .map(|(name, bytes)| {
                let sealed: Sealed = serde_json::from_slice(&bytes)
                    .with_context(|| format!("secret {name:?} is corrupt in the state store"))?;
                Ok(SecretInfo {
                    name,
                    keys: sealed.names,
                    updated_ms: sealed.updated_ms,
                })
            })
            .collect()
    }

    /// Removes a secret; returns whether it existed.
    pub fn delete(&self, name: &str) -> Result<bool> {
        self.state.delete_entry(Table::Secrets, name)
    }
}

/// Whether `name` can be an environment variable.
pub fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::state::RedbStore;

    #[test]
    fn values_are_sealed_at_rest_and_open_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let values = BTreeMap::from([("TOKEN".to_string(), "abc-very-secret".to_string())]);
        {
            let state: Arc<dyn StateStore> =
                Arc::new(RedbStore::open(&dir.path().join("state")).unwrap());
            let secrets = Secrets::open(dir.path(), state).unwrap();
            secrets.put("api", &values).unwrap();
        }
        let key = dir.path().join("secret.key");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let raw = std::fs::read(dir.path().join("state/lode.redb")).unwrap();
        assert!(!raw.windows(15).any(|w| w == b"abc-very-secret"));

        let state: Arc<dyn StateStore> =
            Arc::new(RedbStore::open(&dir.path().join("state")).unwrap());
        let secrets = Secrets::open(dir.path(), state.clone()).unwrap();
        assert_eq!(secrets.get("api").unwrap(), Some(values));
        assert_eq!(secrets.get("nope").unwrap(), None);
        let listed = secrets.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].keys, vec!["TOKEN".to_string()]);

        // Another key cannot open them, and says so.
        std::fs::remove_file(&key).unwrap();
        let other = Secrets::open(dir.path(), state).unwrap();
        assert!(
            other
                .get("api")
                .unwrap_err()
                .to_string()
                .contains("secret.key")
        );
    }

    #[test]
    fn a_sealed_value_opens_under_its_own_name_only_and_old_ones_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let state: Arc<dyn StateStore> =
            Arc::new(RedbStore::open(&dir.path().join("state")).unwrap());
        let secrets = Secrets::open(dir.path(), state.clone()).unwrap();
        let db = BTreeMap::from([("DB_PASSWORD".to_string(), "hunter2".to_string())]);
        let public = BTreeMap::from([("GREETING".to_string(), "hi".to_string())]);
        secrets.put("db", &db).unwrap();
        secrets.put("public", &public).unwrap();
        // Someone with write access to the store copies db's sealed value over public's.
        let copied = state.get_entry(Table::Secrets, "db").unwrap().unwrap();
        state.put_entry(Table::Secrets, "public", &copied).unwrap();
        let err = secrets.get("public").unwrap_err().to_string();
        assert!(err.contains("under this name"), "{err}");

        // A format-1 secret (no associated data) still opens, and is sealed again at open.
        let b64 = base64::engine::general_purpose::STANDARD;
        let nonce: [u8; 24] = rand::random();
        let old = secrets
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                serde_json::to_vec(&db).unwrap().as_slice(),
            )
            .unwrap();
        let legacy = serde_json::json!({"names": ["DB_PASSWORD"], "nonce": b64.encode(nonce),
            "ciphertext": b64.encode(old), "updated_ms": 1});
        state
            .put_entry(Table::Secrets, "legacy", legacy.to_string().as_bytes())
            .unwrap();
        // While the server runs, a format-1 value written into the store does not open.
        let err = secrets.get("legacy").unwrap_err().to_string();
        assert!(err.contains("old format"), "{err}");
        let reopened = Secrets::open(dir.path(), state.clone()).unwrap();
        assert_eq!(reopened.get("legacy").unwrap(), Some(db));
        let stored: Sealed =
            serde_json::from_slice(&state.get_entry(Table::Secrets, "legacy").unwrap().unwrap())
                .unwrap();
        assert_eq!(stored.format, FORMAT);
    }

    #[test]
    fn env_names() {
        assert!(is_env_name("TOKEN_1"));
        assert!(is_env_name("_x"));
        assert!(!is_env_name("1X"));
        assert!(!is_env_name("A-B"));
        assert!(!is_env_name(""));
    }
}
