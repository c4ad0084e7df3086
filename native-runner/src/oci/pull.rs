//! Pull an image from an OCI registry (Docker Hub, GHCR, a `docker-registry` of one's own)
//! into an OCI image layout, which [`super::unpack`] then verifies and flattens like any other.
//!
//! The distribution protocol, its token auth (a `401` with a `Bearer` challenge, a token from
//! the realm for the repository's scope, Basic credentials sent to the realm) and the choice
//! of this machine's platform from a multi-platform index are `oci-client`'s. What Lode adds:
//! plain HTTP only to registries the operator named, every blob streamed to disk rather than
//! held in memory, and errors that say what to do.

use std::path::Path;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciImageManifest;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};

/// Where a pull comes from and as whom.
#[derive(Clone, Default)]
pub struct PullOptions {
    /// Registries (`host:port` as written in references) reached over plain HTTP; every other
    /// registry is reached over HTTPS, verified against the system's roots.
    pub insecure_registries: Vec<String>,
    /// User name and password (or token) for the registry; anonymous when `None`.
    pub credentials: Option<(String, String)>,
    /// Where the credentials came from, for errors (`secret "regcred"`).
    pub credentials_from: String,
}

impl std::fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password never reaches a log line.
        f.debug_struct("PullOptions")
            .field("insecure_registries", &self.insecure_registries)
            .field("credentials_from", &self.credentials_from)
            .finish_non_exhaustive()
    }
}

/// An image resolved in its registry: its manifest for this platform, and that manifest's
/// digest, which names the image's content whatever tag led to it.
pub struct Resolved {
    reference: Reference,
    client: Client,
    manifest: OciImageManifest,
    /// `sha256:...` of the platform manifest.
    pub digest: String,
}

impl Resolved {
    /// Bytes the layers take, compressed, as the registry sends them.
    pub fn layer_bytes(&self) -> u64 {
        self.manifest
            .layers
            .iter()
            .map(|layer| layer.size.max(0) as u64)
            .sum()
    }

    /// How many layers the image has.
    pub fn layer_count(&self) -> usize {
        self.manifest.layers.len()
    }
}

/// Why a pull failed, worded for the user who named the image.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PullError(String);

/// Looks `reference` up (`python:3.12-slim`, `ghcr.io/org/app@sha256:...`) and picks the
/// manifest for this machine's platform.
pub async fn resolve(reference: &str, options: &PullOptions) -> Result<Resolved, PullError> {
    let parsed: Reference = reference.parse().map_err(|e| {
        PullError(format!(
            "{reference:?} is not an image reference ({e}); write it as Docker does, e.g. \
             python:3.12-slim or registry.example.com:5000/team/app:1"
        ))
    })?;
    install_tls_provider();
    let config = ClientConfig {
        protocol: ClientProtocol::HttpsExcept(options.insecure_registries.clone()),
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        read_timeout: Some(std::time::Duration::from_secs(60)),
        ..ClientConfig::default()
    };
    let client = Client::try_from(config)
        .map_err(|e| PullError(format!("starting the registry client: {e}")))?;
    let auth = match &options.credentials {
        Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
        None => RegistryAuth::Anonymous,
    };
    let (manifest, digest, _) = client
        .pull_image_manifest_and_list_digest(&parsed, &auth)
        .await
        .map_err(|e| explain(e, &parsed, reference, options))?;
    Ok(Resolved {
        reference: parsed,
        client,
        manifest,
        digest,
    })
}

/// Writes the resolved image into an OCI layout at `layout` (created): config and layers
/// streamed to files, each checked against its digest as it arrives.
pub async fn download(
    image: &Resolved,
    layout: &Path,
    options: &PullOptions,
) -> Result<(), PullError> {
    let blobs = layout.join("blobs/sha256");
    tokio::fs::create_dir_all(&blobs)
        .await
        .map_err(|e| PullError(format!("creating {}: {e}", blobs.display())))?;
    let name = image.reference.whole();
    let descriptors = std::iter::once(&image.manifest.config).chain(&image.manifest.layers);
    for descriptor in descriptors {
        let hex = descriptor
            .digest
            .strip_prefix("sha256:")
            .filter(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| {
                PullError(format!(
                    "{name}: blob {} is not a sha256 digest, which Lode needs to verify it",
                    descriptor.digest
                ))
            })?;
        let path = blobs.join(hex);
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| PullError(format!("creating {}: {e}", path.display())))?;
        image
            .client
            .pull_blob(&image.reference, descriptor, file)
            .await
            .map_err(|e| explain(e, &image.reference, &name, options))?;
    }
    let put = |bytes: &[u8]| -> Result<String, PullError> {
        let hex = hex::encode(Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes)
            .map_err(|e| PullError(format!("writing the layout: {e}")))?;
        Ok(format!("sha256:{hex}"))
    };
    let manifest = serde_json::to_vec(&image.manifest).expect("a manifest serializes");
    let manifest_digest = put(&manifest)?;
    let media_type = image
        .manifest
        .media_type
        .clone()
        .unwrap_or_else(|| oci_client::manifest::OCI_IMAGE_MEDIA_TYPE.to_string());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": media_type, "digest": manifest_digest, "size": manifest.len()}],
    });
    std::fs::write(layout.join("index.json"), index.to_string())
        .and_then(|()| {
            std::fs::write(
                layout.join("oci-layout"),
                br#"{"imageLayoutVersion": "1.0.0"}"#,
            )
        })
        .map_err(|e| PullError(format!("writing the layout: {e}")))
}

/// Gives the process's TLS (rustls, under every reqwest client of the build) its crypto
/// provider, ring, which the rest of the tree links already. Call before building a client;
/// calling again is harmless.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Turns the client's error into what happened and what to do.
fn explain(
    error: OciDistributionError,
    reference: &Reference,
    named: &str,
    options: &PullOptions,
) -> PullError {
    let registry = reference.registry();
    let who = if options.credentials.is_some() {
        format!("the credentials from {}", options.credentials_from)
    } else {
        "an anonymous pull".to_string()
    };
    use oci_client::errors::OciErrorCode::*;
    let codes: Vec<&oci_client::errors::OciErrorCode> = match &error {
        OciDistributionError::RegistryError { envelope, .. } => {
            envelope.errors.iter().map(|e| &e.code).collect()
        }
        _ => Vec::new(),
    };
    let missing = matches!(error, OciDistributionError::ImageManifestNotFoundError(_))
        || codes
            .iter()
            .any(|c| matches!(c, ManifestUnknown | NameUnknown | NotFound | BlobUnknown));
    let refused = matches!(
        error,
        OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_)
    ) || codes.iter().any(|c| matches!(c, Unauthorized | Denied));
    if missing {
        return PullError(format!(
            "image {named} does not exist in registry {registry} (check the name and tag; a \
             private image also reads as missing without credentials)"
        ));
    }
    if refused {
        return PullError(format!(
            "registry {registry} refused {who} for {named}: give Image.from_registry a secret \
             holding REGISTRY_USERNAME and REGISTRY_PASSWORD that may pull it"
        ));
    }
    match error {
        OciDistributionError::RequestError(e) => {
            let plain = if options.insecure_registries.iter().any(|r| r == registry) {
                ""
            } else {
                "; a registry that speaks plain HTTP must be named to `lode serve \
                 --insecure-registry HOST:PORT`"
            };
            PullError(format!(
                "cannot reach registry {registry} for {named}: {}{plain}",
                error_chain(&e)
            ))
        }
        other => PullError(format!("pulling {named} from {registry}: {other}")),
    }
}

/// An error with its causes, which is where reqwest says what actually failed.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
