//! What a deploy resolves once per app, before any instance or container starts: the
//! secrets its functions name and the volumes they mount.

use std::path::PathBuf;

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
        crate::store::volumes::open(
            &self.functions.volumes_dir,
            &volume.name,
            volume.create_if_missing,
            self.functions.pools.native.container_root(),
        )
        .map_err(|e| DeployError::Invalid(vec![format!("function {:?}: {e}", function.name)]))
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
