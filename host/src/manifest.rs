//! The deployment manifest: one JSON shape for Wasm and Python functions.
//!
//! The CLI uploads blobs first, then sends this manifest in `PUT /v1/apps/{app}`. The schema is
//! documented in `docs/manifest.md`; fields that later engines fill (Python, GPUs, schedules)
//! are accepted and validated now so that manifests written today keep working.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Version of the manifest schema this server reads.
pub const MANIFEST_VERSION: u32 = 1;

/// An app: a named set of functions deployed together and switched atomically.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Schema version; absent means 1.
    #[serde(default = "default_version")]
    pub version: u32,
    /// App name, a DNS label.
    pub app: String,
    /// The app's functions.
    pub functions: Vec<FunctionSpec>,
}

fn default_version() -> u32 {
    MANIFEST_VERSION
}

/// Which engine runs a function.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// A WebAssembly component on the Wasm engine.
    Wasm,
    /// A Python function in a native container.
    Python,
}

/// One function of an app.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    /// Function name, a DNS label, unique within the app.
    pub name: String,
    /// Engine.
    pub runtime: Runtime,
    /// For Wasm: the component's digest, `blake3:<hex>`, uploaded before the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    /// For Python: where the code is and what image it runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<PythonSource>,
    /// Resources and limits.
    #[serde(default)]
    pub resources: Resources,
    /// Public HTTP route; a Wasm `wasi:http` component needs one to receive requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web: Option<WebRoute>,
    /// Cron expression (`"0 * * * *"`) or period (`"every 5m"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Names of secrets exposed to the function.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Volumes mounted into the function.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// Outbound network policy.
    #[serde(default)]
    pub network: Network,
}

/// Python code and image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PythonSource {
    /// Digest of the uploaded source blob.
    pub source: String,
    /// Module to import.
    pub module: String,
    /// Qualified name of the function within the module.
    pub qualname: String,
    /// Image spec as the SDK builds it (base plus steps); opaque to the Wasm engine.
    #[serde(default)]
    pub image: serde_json::Value,
}

/// Resources and limits. Absent fields take the server's defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores, fractional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Memory per instance in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// `"any"`, `"H100"`, `"H100:2"`; absent means no GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    /// Wall-clock limit per request or call, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
    /// Inputs served at once by one instance (native engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Containers kept warm (native engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_containers: Option<u32>,
    /// Upper bound on containers (native engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_containers: Option<u32>,
    /// Seconds an idle container stays up (native engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaledown_window: Option<f64>,
}

/// A public HTTP route.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebRoute {
    /// Path prefix inside the app, starting with `/`.
    #[serde(default = "default_web_path")]
    pub path: String,
    /// Allowed method; absent means any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

fn default_web_path() -> String {
    "/".into()
}

impl Default for WebRoute {
    fn default() -> Self {
        Self {
            path: default_web_path(),
            method: None,
        }
    }
}

/// A named volume and where it appears.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    /// Volume name.
    pub name: String,
    /// Absolute mount path inside the function.
    pub path: String,
}

/// Outbound network policy.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// `none` (the default) or `outbound`.
    #[serde(default)]
    pub mode: NetworkMode,
    /// Wasm only: hosts a guest may send HTTP requests to, as `host`, `host:port` or
    /// `*.domain`. A non-empty list implies `outbound`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
}

/// Whether a function may open outbound connections.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// No outbound network.
    #[default]
    None,
    /// Outbound allowed (Wasm: to the allow-listed hosts only).
    Outbound,
}

/// Whether `name` is a DNS label: `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    let ok_inner = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    let ok_edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(ok_inner)
        && ok_edge(&bytes[0])
        && ok_edge(&bytes[bytes.len() - 1])
}

/// Explains the app-name rule, for error messages.
pub fn dns_label_rule(kind: &str, name: &str) -> String {
    format!(
        "invalid {kind} name {name:?}: use 1-63 lowercase letters, digits and '-', \
         starting and ending with a letter or digit (it becomes a DNS label)"
    )
}

impl Manifest {
    /// Checks everything that does not need the blob store; returns every problem found.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.version != MANIFEST_VERSION {
            problems.push(format!(
                "manifest version {} is not supported; this server reads version {MANIFEST_VERSION}",
                self.version
            ));
        }
        if !is_dns_label(&self.app) {
            problems.push(dns_label_rule("app", &self.app));
        }
        if self.functions.is_empty() {
            problems.push("the manifest lists no functions".into());
        }
        let mut names = BTreeSet::new();
        let mut web_paths = BTreeSet::new();
        for function in &self.functions {
            let name = &function.name;
            if !is_dns_label(name) {
                problems.push(dns_label_rule("function", name));
            }
            if !names.insert(name.as_str()) {
                problems.push(format!("function {name:?} is listed twice"));
            }
            function.validate(&mut problems);
            if let Some(web) = &function.web
                && !web_paths.insert(web.path.as_str())
            {
                problems.push(format!(
                    "web path {:?} is claimed by more than one function",
                    web.path
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

impl FunctionSpec {
    fn validate(&self, problems: &mut Vec<String>) {
        let name = &self.name;
        match self.runtime {
            Runtime::Wasm => match &self.component {
                None => problems.push(format!(
                    "function {name:?}: a wasm function needs \"component\" (a blob digest)"
                )),
                Some(digest) => {
                    if digest.parse::<lode_registry::Digest>().is_err() {
                        problems.push(format!(
                            "function {name:?}: component {digest:?} is not a digest \
                             (expected blake3:<64 hex>)"
                        ));
                    }
                }
            },
            Runtime::Python => {
                if self.python.is_none() {
                    problems.push(format!(
                        "function {name:?}: a python function needs \"python\" \
                         (source, module, qualname)"
                    ));
                }
            }
        }
        let r = &self.resources;
        if r.memory == Some(0) {
            problems.push(format!("function {name:?}: memory must be at least 1 MiB"));
        }
        if let Some(t) = r.timeout
            && (t.is_nan() || t <= 0.0 || t > 86_400.0)
        {
            problems.push(format!(
                "function {name:?}: timeout {t} s must be above 0 and at most 86400"
            ));
        }
        if let Some(cpu) = r.cpu
            && (cpu.is_nan() || cpu <= 0.0)
        {
            problems.push(format!("function {name:?}: cpu must be above 0"));
        }
        if let Some(web) = &self.web
            && !web.path.starts_with('/')
        {
            problems.push(format!(
                "function {name:?}: web path {:?} must start with '/'",
                web.path
            ));
        }
        for pattern in &self.network.allow {
            if let Err(why) = crate::outbound::HostPattern::parse(pattern) {
                problems.push(format!(
                    "function {name:?}: network.allow {pattern:?}: {why}"
                ));
            }
        }
    }

    /// The request timeout, or `default` when the manifest names none.
    pub fn timeout_or(&self, default: Duration) -> Duration {
        self.resources
            .timeout
            .map(Duration::from_secs_f64)
            .unwrap_or(default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wasm_fn(name: &str) -> FunctionSpec {
        FunctionSpec {
            name: name.into(),
            runtime: Runtime::Wasm,
            component: Some(lode_registry::Digest::of(b"x").to_string()),
            python: None,
            resources: Resources::default(),
            web: Some(WebRoute::default()),
            schedule: None,
            secrets: vec![],
            volumes: vec![],
            network: Network::default(),
        }
    }

    #[test]
    fn dns_labels() {
        for good in ["a", "hello", "a-b", "x1", &"a".repeat(63)] {
            assert!(is_dns_label(good), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64), "héllo"] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn reports_every_problem() {
        let mut second = wasm_fn("Bad_Name");
        second.component = Some("sha256:abc".into());
        second.resources.timeout = Some(-1.0);
        let manifest = Manifest {
            version: 1,
            app: "My App".into(),
            functions: vec![wasm_fn("web"), second],
        };
        let problems = manifest.validate().unwrap_err();
        let all = problems.join("\n");
        assert!(all.contains("invalid app name \"My App\""), "{all}");
        assert!(all.contains("invalid function name \"Bad_Name\""), "{all}");
        assert!(all.contains("is not a digest"), "{all}");
        assert!(all.contains("timeout -1"), "{all}");
        assert!(all.contains("claimed by more than one"), "{all}");
    }

    #[test]
    fn json_round_trip_and_unknown_fields() {
        let manifest = Manifest {
            version: 1,
            app: "hello".into(),
            functions: vec![wasm_fn("web")],
        };
        let json = serde_json::to_string(&manifest).unwrap();
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), manifest);
        assert!(manifest.validate().is_ok());
        let typo = json.replace("\"functions\"", "\"functoins\"");
        let err = serde_json::from_str::<Manifest>(&typo)
            .unwrap_err()
            .to_string();
        assert!(err.contains("functoins"), "{err}");
    }
}
