//! What a deploy resolves once per app, before any instance or container starts: the
//! secrets its functions name and the volumes they mount.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::control::Control;
use crate::control::deploy::DeployError;
use crate::proto::manifest::{FunctionSpec, Manifest};

impl Control {
    /// The directory of a volume `function` mounts, made when it may be.
    pub(super) fn volume_dir(
        &self,
        function: &FunctionSpec,
        volume: &crate::proto::manifest::VolumeMount,
    ) -> Result<PathBuf, DeployError> {
        let invalid = |e: anyhow::Error| {
            DeployError::Invalid(vec![format!("function {:?}: {e:#}", function.name)])
        };
        let (dir, _) = self
            .open_volume(&volume.name, volume.create_if_missing)
            .map_err(invalid)?;
        Ok(dir)
    }

    /// This host's copy of volume `name`, made when it may be (`create`, or another host
    /// made it), and brought up to the newest committed version where hosts share volumes.
    pub fn open_volume(
        &self,
        name: &str,
        create: bool,
    ) -> anyhow::Result<(PathBuf, Option<crate::store::volume_sync::Synced>)> {
        let sync = self.functions.volume_sync.as_ref();
        let known = match sync {
            Some(sync) => sync.head(name)?.is_some(),
            None => false,
        };
        let dir = crate::store::volumes::open(
            &self.functions.volumes_dir,
            name,
            create || known,
            self.functions.pools.native.container_root(),
        )?;
        let Some(sync) = sync else {
            return Ok((dir, None));
        };
        if !known {
            sync.create(name)?;
        }
        let synced = sync
            .reload(name, &dir)
            .with_context(|| format!("bringing volume {name:?} up to date on this host"))?;
        Ok((dir, Some(synced)))
    }

    /// The variables of a secret `function` declares; a missing one fails the deploy by name.
    pub(super) fn secret_of(
        &self,
        function: &FunctionSpec,
        secret: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, DeployError> {
        self.functions
            .secrets
            .get(secret)
            .map_err(DeployError::Internal)?
            .ok_or_else(|| {
                DeployError::Invalid(vec![format!(
                    "function {:?}: secret {secret:?} does not exist; create it with \
                     `lode secret create {secret} NAME=VALUE`",
                    function.name
                )])
            })
    }

    /// A digest of the values of every secret the app's functions name (missing ones too),
    /// so a changed secret is a change to deploy.
    pub(super) fn secrets_digest(&self, manifest: &Manifest) -> Result<String, DeployError> {
        let names: std::collections::BTreeSet<&String> =
            manifest.functions.iter().flat_map(|f| &f.secrets).collect();
        let mut hasher = blake3::Hasher::new();
        for name in names {
            let values = self
                .functions
                .secrets
                .get(name)
                .map_err(DeployError::Internal)?;
            let bytes = serde_json::to_vec(&values).map_err(|e| DeployError::Internal(e.into()))?;
            hasher.update(name.as_bytes());
            hasher.update(&[0]);
            hasher.update(&bytes);
            hasher.update(&[0]);
        }
        Ok(hasher.finalize().to_hex().to_string())
    }
}
