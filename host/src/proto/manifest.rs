//! The deployment manifest: one JSON shape for Wasm and Python functions.
//!
//! The CLI uploads blobs first, then sends this manifest in `PUT /v1/apps/{app}`. The schema is
//! documented in `docs/manifest.md`; fields that later engines fill (Python, GPUs, schedules)
//! are accepted and validated now so that manifests written today keep working.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
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
    /// Values the app's Wasm functions read with `config.get`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub config: std::collections::BTreeMap<String, String>,
    /// Limits on the app's Wasm calls beyond each function's memory and timeout.
    #[serde(default, skip_serializing_if = "AppLimits::is_default")]
    pub limits: AppLimits,
    /// Other apps whose code (containers, Wasm guests) may call this app's functions; none
    /// by default. Pickle functions take calls from their own app only, whatever this says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_callers: Vec<String>,
    /// Set on `lode run`'s ephemeral app: the app it is a run of. Its code calls other apps
    /// as that app would (the app's own functions included), since it is that app's code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_of: Option<String>,
    /// The app's functions.
    pub functions: Vec<FunctionSpec>,
}

/// The smallest and largest Wasm stack an app may ask for, in KiB.
pub const WASM_STACK_KIB: RangeInclusive<u32> = 64..=16 << 10;

/// The deepest call nesting an app may allow.
pub const MAX_CALL_DEPTH_LIMIT: u32 = 64;

/// The most calls an app may let one outside call lead to.
pub const MAX_FAN_OUT_LIMIT: u32 = 1_000_000;

/// Requests one kept instance may serve (`instance_reuse`).
pub const INSTANCE_REUSE: RangeInclusive<u32> = 1..=1_000_000;

/// Fuel one call may be given. The low end only refuses budgets too small to be meant (a Rust
/// guest's start-up alone takes more); the high end is hours of work.
pub const FUEL_LIMIT: RangeInclusive<u64> = 1_000..=1_000_000_000_000_000;

/// Limits for untrusted Wasm that hold per app (`[limits]` in lode.toml). Absent fields take
/// the server's defaults.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AppLimits {
    /// Wasm stack per call, in KiB; deeper recursion traps as `stack_overflow`. At most the
    /// server's `--max-wasm-stack`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm_stack_kib: Option<u32>,
    /// How deep calls through `invoke` and `spawn` may nest below the call that came from
    /// outside (which is depth 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_depth: Option<u32>,
    /// How many calls, nested ones included, one call from outside may lead to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fan_out: Option<u32>,
    /// Fuel per call (about one unit per Wasm instruction), for a CPU bound that is the same
    /// on every machine and run; a call that uses it up fails as `fuel_exhausted`. Unset: no
    /// metering, only the wall-clock timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
}

impl AppLimits {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    fn validate(&self, problems: &mut Vec<String>) {
        let mut check = |field: &str, value: Option<u64>, range: RangeInclusive<u64>, unit| {
            if let Some(value) = value
                && !range.contains(&value)
            {
                problems.push(format!(
                    "limits: {field} {value} must be {} to {}{unit}",
                    range.start(),
                    range.end()
                ));
            }
        };
        let widen =
            |range: &RangeInclusive<u32>| u64::from(*range.start())..=u64::from(*range.end());
        check(
            "wasm_stack_kib",
            self.wasm_stack_kib.map(u64::from),
            widen(&WASM_STACK_KIB),
            " (KiB)",
        );
        check(
            "call_depth",
            self.call_depth.map(u64::from),
            widen(&(1..=MAX_CALL_DEPTH_LIMIT)),
            "",
        );
        check(
            "fan_out",
            self.fan_out.map(u64::from),
            widen(&(1..=MAX_FAN_OUT_LIMIT)),
            "",
        );
        check("fuel", self.fuel, FUEL_LIMIT, " (units per call)");
    }
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
    /// Python: how often an input is retried after its container died under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Wasm: run the function's init once at deploy and snapshot it (Wizer), so calls start
    /// with its start-up work done.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pre_init: bool,
    /// Wasm with `gpu`: the guest may load and launch its own PTX kernels, raw device code
    /// that Lode cannot check, so an app must ask.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gpu_kernels: bool,
    /// Wasm with `gpu`: MiB an instance may hold in `lode:gpu` buffers (the device's memory
    /// without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory: Option<u64>,
    /// Wasm with `web`: serve up to this many requests with one instance before a fresh one,
    /// for components whose authors declared them safe to reuse (state left in memory by one
    /// request is seen by the next). Absent: a fresh instance per request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_reuse: Option<u32>,
    /// Python: save the first container once its module has loaded (CRIU), and start later
    /// containers from that instead of importing again (`enable_memory_snapshot`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory_snapshot: bool,
}

/// A class handle's own options (`Cls.with_options`, `with_concurrency`), sent with each call
/// made through it: those calls run in a pool of their own, started like the class's with
/// these changes and kept while the deployed version lives.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CallOptions {
    /// Resources over the class's; absent fields keep its own.
    #[serde(default)]
    pub resources: Resources,
    /// Retries of failed inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Secrets added to the class's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Volumes added to the class's (one at the same path replaces it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
}

impl CallOptions {
    /// `function` with these options over its own, checked as a deploy checks it.
    pub fn apply(&self, function: &FunctionSpec) -> Result<FunctionSpec, Vec<String>> {
        let mut changed = function.clone();
        changed.resources = function.resources.overlaid(&self.resources);
        changed.retries = self.retries.or(changed.retries);
        for secret in &self.secrets {
            if !changed.secrets.contains(secret) {
                changed.secrets.push(secret.clone());
            }
        }
        for volume in &self.volumes {
            changed.volumes.retain(|v| v.path != volume.path);
            changed.volumes.push(volume.clone());
        }
        let mut problems = Vec::new();
        changed.validate(&mut problems);
        if problems.is_empty() {
            Ok(changed)
        } else {
            Err(problems)
        }
    }
}

impl Resources {
    /// These resources with every field `over` sets taken from it.
    pub fn overlaid(&self, over: &Resources) -> Resources {
        Resources {
            cpu: over.cpu.or(self.cpu),
            memory: over.memory.or(self.memory),
            gpu: over.gpu.clone().or(self.gpu.clone()),
            timeout: over.timeout.or(self.timeout),
            concurrency: over.concurrency.or(self.concurrency),
            min_containers: over.min_containers.or(self.min_containers),
            max_containers: over.max_containers.or(self.max_containers),
            scaledown_window: over.scaledown_window.or(self.scaledown_window),
        }
    }
}

/// Retries of inputs whose container died, with exponential back-off.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Retries after the first attempt (0-10).
    pub max_retries: u32,
    /// Seconds before the first retry.
    #[serde(default = "default_initial_delay")]
    pub initial_delay: f64,
    /// Each further delay is the last one times this.
    #[serde(default = "default_backoff")]
    pub backoff_coefficient: f64,
}

fn default_initial_delay() -> f64 {
    1.0
}

fn default_backoff() -> f64 {
    2.0
}

impl Retries {
    /// The delay before retry number `attempt` (1 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = self
            .backoff_coefficient
            .powi(attempt.saturating_sub(1) as i32);
        Duration::from_secs_f64((self.initial_delay * factor).clamp(0.0, 600.0))
    }
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
    /// `json` (the default) or `pickle`, for functions that take and return Python objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serialization: Option<String>,
    /// Set when the function is a class (`@app.cls`): one pool whose calls name a method.
    #[serde(default, rename = "cls", skip_serializing_if = "Option::is_none")]
    pub class: Option<ClassSpec>,
}

/// A class deployed as one function.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClassSpec {
    /// The methods callers may run (`@lode.method()`).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Methods served on the web (`@lode.fastapi_endpoint()`, `@lode.asgi_app()`, ... on a
    /// method): each a route of its own, served by the class's pool on an instance made
    /// with the class's default parameters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub web: Vec<ClassWebMethod>,
}

/// A class's method served on the web.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClassWebMethod {
    /// The method.
    pub method: String,
    /// Where and how it is served.
    pub route: WebRoute,
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
    /// What answers a Python function's requests: itself, called with the JSON body (the
    /// default), or the ASGI or WSGI app it returns, or the web server it starts.
    #[serde(default, skip_serializing_if = "WebServe::is_call")]
    pub serve: WebServe,
    /// The port a `server` function's web server listens on, inside its container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// How a Python web function answers.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WebServe {
    /// A call with the JSON body as its argument and query parameters as keywords; its
    /// result is the JSON answer (`@web_endpoint`, `@fastapi_endpoint`).
    #[default]
    Call,
    /// The ASGI app the function returns, HTTP and WebSockets (`@asgi_app`).
    Asgi,
    /// The WSGI app the function returns (`@wsgi_app`).
    Wsgi,
    /// The HTTP server the function starts on `port` (`@web_server`).
    Server,
}

impl WebServe {
    fn is_call(&self) -> bool {
        *self == WebServe::Call
    }
}

fn default_web_path() -> String {
    "/".into()
}

impl Default for WebRoute {
    fn default() -> Self {
        Self {
            path: default_web_path(),
            method: None,
            serve: WebServe::Call,
            port: None,
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
    /// Mounted read-only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// Created at deploy when missing (otherwise a missing volume fails the deploy).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub create_if_missing: bool,
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

/// A Python function's name as a host label (`<app>--<label>.lode.localhost`): lowercase,
/// `_` as `-`.
pub fn host_label(function: &str) -> String {
    function.replace('_', "-").to_ascii_lowercase()
}

/// The host label of a web route: its function's, or for a class's web method
/// `<class>-<method>`, as Modal names a method's URL.
pub fn route_label(function: &str, method: Option<&str>) -> String {
    match method {
        Some(method) => host_label(&format!("{function}-{method}")),
        None => host_label(function),
    }
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

/// Whether `name` suits a secret: `[A-Za-z0-9_-]{1,63}`.
pub fn is_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A Python identifier (ASCII): a method's name.
pub fn is_python_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 128
}

/// Whether `name` suits a Python function: `[A-Za-z_][A-Za-z0-9_-]{0,62}`.
pub fn is_python_function_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_alphabetic() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
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
        self.limits.validate(&mut problems);
        if let Some(of) = self.run_of.as_deref() {
            // Only `lode run`'s and `lode dev`'s own names may act as the app they run (the
            // app's name, cut to fit a DNS label when it is long, and a suffix).
            let base = self.app.strip_suffix("-dev").or_else(|| {
                let (base, hex) = self.app.rsplit_once("-run-")?;
                (hex.len() == 6 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(base)
            });
            let ephemeral =
                base.is_some_and(|base| base == of || (base.len() >= 50 && of.starts_with(base)));
            if !is_dns_label(of) || !ephemeral {
                problems.push(format!(
                    "run_of: {of:?} may be set only on {of}-dev or {of}-run-<6 hex digits>, the \
                     apps `lode dev` and `lode run` make"
                ));
            }
        }
        for caller in &self.allow_callers {
            if !is_dns_label(caller) {
                problems.push(format!(
                    "allow_callers: {}",
                    dns_label_rule("caller app", caller)
                ));
            }
        }
        let mut names = BTreeSet::new();
        let mut web_paths = BTreeSet::new();
        for function in &self.functions {
            let name = &function.name;
            match function.runtime {
                Runtime::Wasm if !is_dns_label(name) => {
                    problems.push(dns_label_rule("function", name));
                }
                Runtime::Python if !is_python_function_name(name) => problems.push(format!(
                    "invalid function name {name:?}: a Python function's name is 1-63 letters, \
                     digits, '_' and '-', starting with a letter or '_'"
                )),
                _ => {}
            }
            if !names.insert(name.as_str()) {
                problems.push(format!("function {name:?} is listed twice"));
            }
            function.validate(&mut problems);
            for (_, web) in function.web_routes() {
                if !web_paths.insert(web.path.as_str()) {
                    problems.push(format!(
                        "web path {:?} is claimed by more than one function",
                        web.path
                    ));
                }
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
    /// The function's web routes: its own, and its class's web methods (with the method).
    pub fn web_routes(&self) -> Vec<(Option<&str>, &WebRoute)> {
        let class = self.python.as_ref().and_then(|p| p.class.as_ref());
        let methods = class.into_iter().flat_map(|c| &c.web);
        self.web
            .iter()
            .map(|web| (None, web))
            .chain(methods.map(|m| (Some(m.method.as_str()), &m.route)))
            .collect()
    }

    /// Every problem of this function alone, worded with its name.
    pub(crate) fn validate(&self, problems: &mut Vec<String>) {
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
            Runtime::Python => match &self.python {
                None => problems.push(format!(
                    "function {name:?}: a python function needs \"python\" \
                     (source, module, qualname)"
                )),
                Some(python) => {
                    if python.source.parse::<lode_registry::Digest>().is_err() {
                        problems.push(format!(
                            "function {name:?}: source {:?} is not a digest",
                            python.source
                        ));
                    }
                    if !python
                        .module
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_')
                        || python.module.is_empty()
                    {
                        problems.push(format!(
                            "function {name:?}: module {:?} is not a Python module name",
                            python.module
                        ));
                    }
                    if let Some(class) = &python.class {
                        if class.methods.is_empty() && class.web.is_empty() {
                            problems.push(format!(
                                "function {name:?}: a class needs at least one method or web \
                                 method"
                            ));
                        }
                        if let Some(call) =
                            class.web.iter().find(|w| w.route.serve == WebServe::Call)
                        {
                            problems.push(format!(
                                "function {name:?}: web method {:?} must be served as asgi, wsgi \
                                 or server",
                                call.method
                            ));
                        }
                        let web_methods = class.web.iter().map(|w| &w.method);
                        for method in class.methods.iter().chain(web_methods) {
                            if !is_python_identifier(method) {
                                problems.push(format!(
                                    "function {name:?}: method {method:?} is not a Python name"
                                ));
                            }
                        }
                    }
                    if let Some(other) = python
                        .serialization
                        .as_deref()
                        .filter(|s| !matches!(*s, "json" | "pickle"))
                    {
                        problems.push(format!(
                            "function {name:?}: serialization {other:?} is not json or pickle"
                        ));
                    }
                }
            },
        }
        let has_gpu = self.resources.gpu.is_some();
        if (self.gpu_kernels || self.gpu_memory.is_some())
            && (self.runtime != Runtime::Wasm || !has_gpu)
        {
            problems.push(format!(
                "function {name:?}: gpu_kernels and gpu_memory are for Wasm functions that \
                 declare `gpu` (a Python function's container gets its whole devices)"
            ));
        }
        if self.gpu_memory == Some(0) {
            problems.push(format!(
                "function {name:?}: gpu_memory must be at least 1 MiB"
            ));
        }
        if let Some(reuse) = self.instance_reuse {
            if self.runtime != Runtime::Wasm || self.web.is_none() {
                problems.push(format!(
                    "function {name:?}: instance_reuse is for Wasm functions that serve HTTP \
                     (a `web` route)"
                ));
            } else if has_gpu {
                problems.push(format!(
                    "function {name:?}: instance_reuse cannot be used with `gpu`: a kept \
                     instance would hold its device while idle"
                ));
            }
            if !INSTANCE_REUSE.contains(&reuse) {
                problems.push(format!(
                    "function {name:?}: instance_reuse {reuse} must be from {} to {} requests \
                     per instance",
                    INSTANCE_REUSE.start(),
                    INSTANCE_REUSE.end()
                ));
            }
        }
        if self.memory_snapshot {
            // What CRIU cannot save or restore in a Lode container yet, by name.
            let refused = if self.runtime != Runtime::Python {
                Some("is for Python functions (a Wasm instance starts in microseconds anyway)")
            } else if has_gpu {
                Some("cannot be used with `gpu`: CRIU cannot save a GPU's state")
            } else if !self.volumes.is_empty() {
                Some("cannot be used with volumes yet")
            } else if self.network.mode != NetworkMode::None {
                Some(
                    "cannot be used with outbound network yet: the user-mode stack's link is not restored",
                )
            } else {
                None
            };
            if let Some(why) = refused {
                problems.push(format!("function {name:?}: enable_memory_snapshot {why}"));
            }
        }
        if self.pre_init && self.runtime != Runtime::Wasm {
            problems.push(format!(
                "function {name:?}: pre_init is for Wasm functions (lode:function components)"
            ));
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
        for (_, web) in self.web_routes() {
            if !web.path.starts_with('/') {
                problems.push(format!(
                    "function {name:?}: web path {:?} must start with '/'",
                    web.path
                ));
            }
            if web.serve != WebServe::Call && self.runtime != Runtime::Python {
                problems.push(format!(
                    "function {name:?}: serve {:?} is for Python functions",
                    web.serve
                ));
            }
            match (web.serve, web.port) {
                (WebServe::Server, None | Some(0)) => problems.push(format!(
                    "function {name:?}: a web server needs the port it listens on"
                )),
                (WebServe::Server, Some(_)) | (_, None) => {}
                (_, Some(_)) => problems.push(format!(
                    "function {name:?}: a port is for web servers (serve = \"server\")"
                )),
            }
        }
        if let Some(retries) = &self.retries
            && (retries.max_retries > 10
                || !(0.0..=60.0).contains(&retries.initial_delay)
                || !(1.0..=10.0).contains(&retries.backoff_coefficient))
        {
            problems.push(format!(
                "function {name:?}: retries need max_retries 0-10, initial_delay 0-60 s and \
                 backoff_coefficient 1-10"
            ));
        }
        if r.max_containers == Some(0) {
            problems.push(format!(
                "function {name:?}: max_containers must be at least 1"
            ));
        }
        if let (Some(min), Some(max)) = (r.min_containers, r.max_containers)
            && min > max
        {
            problems.push(format!(
                "function {name:?}: min_containers {min} is above max_containers {max}"
            ));
        }
        if r.concurrency == Some(0) || r.concurrency.is_some_and(|c| c > 1000) {
            problems.push(format!("function {name:?}: concurrency must be 1-1000"));
        }
        if let Some(window) = r.scaledown_window
            && !(0.0..=86_400.0).contains(&window)
        {
            problems.push(format!(
                "function {name:?}: scaledown_window must be 0 to 86400 seconds"
            ));
        }
        for volume in &self.volumes {
            if !is_dns_label(&volume.name) {
                problems.push(format!(
                    "function {name:?}: {}",
                    dns_label_rule("volume", &volume.name)
                ));
            }
            if !volume.path.starts_with('/') || volume.path.split('/').any(|p| p == "..") {
                problems.push(format!(
                    "function {name:?}: volume path {:?} must be absolute, without `..`",
                    volume.path
                ));
            }
        }
        for secret in &self.secrets {
            if !is_secret_name(secret) {
                problems.push(format!(
                    "function {name:?}: secret name {secret:?} must be 1-63 letters, digits, \
                     '-' and '_'"
                ));
            }
        }
        if let Err(why) = self.parsed_schedule() {
            problems.push(why);
        }
        for pattern in &self.network.allow {
            if let Err(why) = crate::proto::host_pattern::HostPattern::parse(pattern) {
                problems.push(format!(
                    "function {name:?}: network.allow {pattern:?}: {why}"
                ));
            }
        }
    }

    /// A Wasm function that serves HTTP at the app's root from `component`, with every
    /// other field at its default: what a bare `.wasm` or a crate deploys as.
    pub fn wasm_http(name: impl Into<String>, component: &lode_registry::Digest) -> Self {
        Self {
            name: name.into(),
            runtime: Runtime::Wasm,
            component: Some(component.to_string()),
            python: None,
            resources: Resources::default(),
            web: Some(WebRoute::default()),
            schedule: None,
            secrets: vec![],
            volumes: vec![],
            network: Network::default(),
            retries: None,
            pre_init: false,
            gpu_kernels: false,
            gpu_memory: None,
            instance_reuse: None,
            memory_snapshot: false,
        }
    }

    /// The function's schedule, parsed: checked at deploy and read by the scheduler through
    /// this one place. The error names the function and the text.
    pub fn parsed_schedule(&self) -> Result<Option<crate::proto::schedule::Schedule>, String> {
        let Some(text) = &self.schedule else {
            return Ok(None);
        };
        crate::proto::schedule::Schedule::parse(text)
            .map(Some)
            .map_err(|why| format!("function {:?}: schedule {text:?}: {why}", self.name))
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
mod tests;
