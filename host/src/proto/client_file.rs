//! Where the CLI finds the server: flags, then environment, then the client file.
//!
//! `lode serve` writes `client.json` into its data dir and, unless told not to, to
//! `~/.config/lode/client.json`, so a user who started a server can run `lode deploy` next
//! without setting anything.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// What a client needs to reach a running `lode serve`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientFile {
    /// Base URL of the JSON API, e.g. `http://127.0.0.1:7070`.
    pub api_url: String,
    /// Base URL of the public HTTP listener, e.g. `http://127.0.0.1:8080`.
    pub http_url: String,
    /// URL of the gRPC blob registry, e.g. `http://127.0.0.1:7071`.
    pub registry_url: String,
    /// The API token.
    pub token: String,
}

impl ClientFile {
    /// Writes the file atomically with mode 0600, since it holds the token.
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)?;
        crate::util::write_atomic(path, &json, 0o600)
            .with_context(|| format!("writing client file {}", path.display()))
    }

    fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading client file {}", path.display()))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("client file {} is not valid JSON", path.display()))
    }
}

/// The per-user client file, `~/.config/lode/client.json`.
pub fn user_client_file() -> Option<PathBuf> {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(config.join("lode").join("client.json"))
}

/// Settings given on the command line (flags already merged with their environment
/// variables by clap).
#[derive(Debug, Default, Clone)]
pub struct ClientOverrides {
    /// `--api-url` / `LODE_API`.
    pub api_url: Option<String>,
    /// `--token` / `LODE_TOKEN`.
    pub token: Option<String>,
    /// `--config` / `LODE_CONFIG`: an explicit client file.
    pub config: Option<PathBuf>,
    /// `--registry` / `LODE_REGISTRY`.
    pub registry: Option<String>,
}

/// The registry a command will use.
#[derive(Debug, Clone)]
pub struct RegistryTarget {
    /// Its gRPC URL.
    pub url: String,
    /// Token, if one was found.
    pub token: Option<String>,
}

/// The API endpoint and token a command will use.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Base URL of the API.
    pub api_url: String,
    /// Token, if one was found.
    pub token: Option<String>,
    /// Public HTTP base URL, when the client file names it.
    pub http_url: Option<String>,
}

fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

impl ClientOverrides {
    fn file(&self) -> Result<Option<ClientFile>> {
        let file_path = self.config.clone().or_else(user_client_file);
        Ok(match &file_path {
            Some(path) if path.exists() => Some(ClientFile::read(path)?),
            Some(path) if self.config.is_some() => {
                bail!("client file {} does not exist", path.display())
            }
            _ => None,
        })
    }

    /// The URL from a flag or environment variable (`chosen`), else from the client file, and
    /// the token to send it: `--token`, or the file's token only when the URL is the file's.
    fn endpoint(
        &self,
        chosen: &Option<String>,
        file: &Option<ClientFile>,
        in_file: fn(&ClientFile) -> &str,
        none_configured: &str,
    ) -> Result<(String, Option<String>)> {
        let url = match (chosen, file) {
            (Some(url), _) => url.clone(),
            (None, Some(file)) => in_file(file).to_string(),
            (None, None) => bail!("{none_configured}"),
        };
        let token = self.token.clone().or_else(|| {
            file.as_ref()
                .filter(|f| same_url(in_file(f), &url))
                .map(|f| f.token.clone())
        });
        Ok((url.trim_end_matches('/').to_string(), token))
    }

    /// Resolves the registry: `--registry`, then `LODE_REGISTRY`, then the client file.
    pub fn resolve_registry(&self) -> Result<RegistryTarget> {
        let (url, token) = self.endpoint(
            &self.registry,
            &self.file()?,
            |f| &f.registry_url,
            "no registry configured: start one with `lode serve` (it embeds one) or `lode \
             registry serve`, or pass --registry URL (or set LODE_REGISTRY)",
        )?;
        Ok(RegistryTarget { url, token })
    }

    /// Resolves flags, then environment, then `LODE_CONFIG` or the user client file.
    pub fn resolve(&self) -> Result<Resolved> {
        let file = self.file()?;
        let (api_url, token) = self.endpoint(
            &self.api_url,
            &file,
            |f| &f.api_url,
            "no Lode server configured: start one with `lode serve`, or pass --api-url \
             (or set LODE_API) and --token (or LODE_TOKEN)",
        )?;
        Ok(Resolved {
            api_url,
            token,
            http_url: file.map(|f| f.http_url),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(api: &str) -> ClientFile {
        ClientFile {
            api_url: api.into(),
            http_url: "http://127.0.0.1:8080".into(),
            registry_url: "http://127.0.0.1:7071".into(),
            token: "file-token".into(),
        }
    }

    #[test]
    fn flags_win_over_the_client_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.json");
        sample("http://127.0.0.1:7070").write(&path).unwrap();
        let overrides = ClientOverrides {
            api_url: Some("http://10.0.0.1:1/".into()),
            config: Some(path.clone()),
            ..Default::default()
        };
        let resolved = overrides.resolve().unwrap();
        assert_eq!(resolved.api_url, "http://10.0.0.1:1");
        assert_eq!(
            resolved.token, None,
            "the file's token must not go to another server"
        );

        let from_file = ClientOverrides {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(from_file.api_url, "http://127.0.0.1:7070");
        assert_eq!(from_file.http_url.as_deref(), Some("http://127.0.0.1:8080"));
    }

    #[test]
    fn the_registry_comes_from_flags_or_the_file_and_gets_the_token_only_if_it_matches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.json");
        sample("http://127.0.0.1:7070").write(&path).unwrap();
        let from_file = ClientOverrides {
            config: Some(path.clone()),
            ..Default::default()
        }
        .resolve_registry()
        .unwrap();
        assert_eq!(from_file.url, "http://127.0.0.1:7071");
        assert_eq!(from_file.token.as_deref(), Some("file-token"));
        let elsewhere = ClientOverrides {
            config: Some(path),
            registry: Some("http://registry.example:7071".into()),
            ..Default::default()
        }
        .resolve_registry()
        .unwrap();
        assert_eq!(elsewhere.token, None);
        let none = ClientOverrides {
            config: Some(dir.path().join("absent.json")),
            ..Default::default()
        };
        assert!(none.resolve_registry().is_err());
    }

    #[test]
    fn client_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("client.json");
        sample("http://x").write(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_named_missing_config_is_an_error() {
        let overrides = ClientOverrides {
            config: Some("/nonexistent/lode/client.json".into()),
            ..Default::default()
        };
        let err = overrides.resolve().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/lode/client.json"), "{err}");
    }
}
