//! `lode deploy PATH`: turn a `.wasm` component, a Cargo crate or a `lode.toml` project into
//! blobs plus a deployment manifest, upload, and follow the server's progress.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use lode_registry::{BlobAccess, Digest, RegistryClient};
use reqwest::Method;
use serde::Deserialize;
use std::sync::Arc;

use crate::cli::client::{ApiClient, api_error, ndjson_lines};
use crate::proto::deploy::DeployEvent;
use crate::proto::manifest::{
    AppLimits, FunctionSpec, Manifest, Network, NetworkMode, WebRoute, dns_label_rule, is_dns_label,
};

/// A function in `lode.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectFunction {
    name: String,
    /// A `.wasm` component or a Cargo crate directory, relative to `lode.toml`.
    path: PathBuf,
    #[serde(default)]
    web: Option<WebRoute>,
    #[serde(default)]
    memory: Option<u64>,
    #[serde(default)]
    timeout: Option<TimeoutValue>,
    #[serde(default)]
    cpu: Option<f64>,
    #[serde(default)]
    network: Option<Network>,
    #[serde(default)]
    secrets: Vec<String>,
    /// Named volumes preopened for the component (`{ name, path, read_only?,
    /// create_if_missing? }`); it sees no other files.
    #[serde(default)]
    volumes: Vec<crate::proto::manifest::VolumeMount>,
    /// Run the function's init at deploy and snapshot it (Wizer).
    #[serde(default)]
    pre_init: bool,
    /// A GPU for lode:gpu (`"any"` or a model such as `"H100"`); without it lode:gpu
    /// computes on the CPU backend.
    #[serde(default)]
    gpu: Option<String>,
    /// Let the guest load and launch its own PTX kernels (needs `gpu`).
    #[serde(default)]
    gpu_kernels: bool,
    /// MiB an instance may hold in lode:gpu buffers on its device.
    #[serde(default)]
    gpu_memory: Option<u64>,
    /// With hosts sharing a state: how often a spawned call whose host died is run again
    /// on another (`{ max_retries = N }`).
    #[serde(default)]
    retries: Option<crate::proto::manifest::Retries>,
    /// Serve up to this many requests with one instance (the author declares the component
    /// safe to reuse); without it every request gets a fresh instance.
    #[serde(default)]
    instance_reuse: Option<u32>,
}

/// `timeout = 10` (seconds) or `timeout = "1m30s"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TimeoutValue {
    Seconds(f64),
    Text(String),
}

impl TimeoutValue {
    fn seconds(&self) -> Result<f64> {
        match self {
            Self::Seconds(s) => Ok(*s),
            Self::Text(text) => humantime::parse_duration(text)
                .map(|d| d.as_secs_f64())
                .with_context(|| {
                    format!("timeout {text:?} is not a duration like \"30s\" or \"2m\"")
                }),
        }
    }
}

/// `lode.toml`: several functions or components with their limits.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Project {
    #[serde(default)]
    app: Option<String>,
    /// Values functions read with `config.get` (lode:function).
    #[serde(default)]
    config: BTreeMap<String, String>,
    /// `[limits]`: wasm_stack_kib, call_depth, fan_out, fuel for the app's Wasm calls.
    #[serde(default)]
    limits: AppLimits,
    /// Other apps that may call this app's functions from their own code.
    #[serde(default)]
    allow_callers: Vec<String>,
    #[serde(rename = "function")]
    functions: Vec<ProjectFunction>,
}

/// What a deploy sends: the app's name, its components, config and limits.
struct Plan {
    app: String,
    functions: Vec<Planned>,
    config: Config,
    limits: AppLimits,
    allow_callers: Vec<String>,
}

/// A component to upload and the function that runs it.
struct Planned {
    spec: FunctionSpec,
    bytes: Vec<u8>,
}

/// Lowercases and replaces what a DNS label cannot hold, so `hello_http` deploys as `hello-http`.
fn default_name(raw: &str) -> String {
    raw.to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .trim_matches('-')
        .to_string()
}

fn wasm_function(name: String, bytes: Vec<u8>) -> Planned {
    let spec = FunctionSpec::wasm_http(name, &Digest::of(&bytes));
    Planned { spec, bytes }
}

fn read_component(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    crate::wasm::engine::check_component_header(&bytes)
        .with_context(|| format!("{}", path.display()))?;
    Ok(bytes)
}

/// Builds a crate for wasm32-wasip2 and returns the component it produced.
pub fn build_crate(dir: &Path) -> Result<PathBuf> {
    eprintln!("building {} for wasm32-wasip2", dir.display());
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo (is Rust installed?)")?;
    if !output.status.success() {
        bail!(
            "cargo build failed in {}; if the target is missing, run `rustup target add wasm32-wasip2`",
            dir.display()
        );
    }
    let mut produced = Vec::new();
    for line in output.stdout.split(|b| *b == b'\n') {
        let Ok(message) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let manifest_dir = message["manifest_path"]
            .as_str()
            .and_then(|p| Path::new(p).parent().map(Path::to_path_buf));
        let is_this_crate = manifest_dir
            .and_then(|d| d.canonicalize().ok())
            .zip(dir.canonicalize().ok())
            .is_some_and(|(a, b)| a == b);
        if !is_this_crate {
            continue;
        }
        for file in message["filenames"].as_array().into_iter().flatten() {
            if let Some(file) = file.as_str().filter(|f| f.ends_with(".wasm")) {
                produced.push(PathBuf::from(file));
            }
        }
    }
    match produced.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "building {} produced no .wasm; a component crate needs `crate-type = [\"cdylib\"]`",
            dir.display()
        ),
        many => bail!(
            "building {} produced several .wasm files: {many:?}",
            dir.display()
        ),
    }
}

fn component_at(path: &Path) -> Result<Vec<u8>> {
    if path.is_dir() {
        if !path.join("Cargo.toml").exists() {
            bail!("{} is a directory without Cargo.toml", path.display());
        }
        read_component(&build_crate(path)?)
    } else {
        read_component(path)
    }
}

/// Whether a component serves HTTP (exports `wasi:http/incoming-handler`): the export's name
/// is in the binary as written, which is enough to pick a default route.
fn serves_http(bytes: &[u8]) -> bool {
    let name = b"wasi:http/incoming-handler";
    bytes.windows(name.len()).any(|w| w == name)
}

fn plan_project(dir: &Path, name: Option<&str>) -> Result<Plan> {
    let toml_path = dir.join("lode.toml");
    let text = std::fs::read_to_string(&toml_path)
        .with_context(|| format!("reading {}", toml_path.display()))?;
    let project: Project =
        toml::from_str(&text).with_context(|| format!("{} is not valid", toml_path.display()))?;
    if project.functions.is_empty() {
        bail!("{} lists no [[function]]", toml_path.display());
    }
    let app = name
        .map(str::to_string)
        .or(project.app)
        .unwrap_or_else(|| default_name(&dir_name(dir)));
    let single = project.functions.len() == 1;
    let mut planned = Vec::new();
    for f in project.functions {
        let path = dir.join(&f.path);
        let bytes = component_at(&path).with_context(|| format!("function {:?}", f.name))?;
        let serves = serves_http(&bytes);
        let mut p = wasm_function(f.name, bytes);
        // Without `web`, a lone HTTP component answers at `/`; otherwise a function takes
        // calls by name only (lode:function).
        p.spec.web = match f.web {
            Some(web) => Some(web),
            None if single && serves => Some(WebRoute::default()),
            None if serves && !single => bail!(
                "function {:?} in {} serves HTTP: give it `web = {{ path = \"/...\" }}` when \
                 an app has several functions",
                p.spec.name,
                toml_path.display()
            ),
            None => None,
        };
        p.spec.resources.memory = f.memory;
        p.spec.resources.cpu = f.cpu;
        p.spec.resources.timeout = f.timeout.map(|t| t.seconds()).transpose()?;
        p.spec.secrets = f.secrets;
        p.spec.volumes = f.volumes;
        p.spec.pre_init = f.pre_init;
        p.spec.resources.gpu = f.gpu;
        p.spec.gpu_kernels = f.gpu_kernels;
        p.spec.gpu_memory = f.gpu_memory;
        p.spec.retries = f.retries;
        p.spec.instance_reuse = f.instance_reuse;
        if let Some(mut network) = f.network {
            if !network.allow.is_empty() {
                network.mode = NetworkMode::Outbound;
            }
            p.spec.network = network;
        }
        planned.push(p);
    }
    Ok(Plan {
        app,
        functions: planned,
        config: project.config,
        limits: project.limits,
        allow_callers: project.allow_callers,
    })
}

/// An app's config (`[config]` in lode.toml).
type Config = BTreeMap<String, String>;

fn dir_name(path: &Path) -> String {
    path.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "app".into())
}

/// Works out the app name and components for `path`.
fn plan(path: &Path, name: Option<&str>) -> Result<Plan> {
    if !path.exists() {
        bail!("{} does not exist", path.display());
    }
    if path.is_dir() && path.join("lode.toml").exists() {
        return plan_project(path, name);
    }
    let stem = if path.is_dir() {
        dir_name(path)
    } else {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let app = name
        .map(str::to_string)
        .unwrap_or_else(|| default_name(&stem));
    let bytes = component_at(path)?;
    Ok(Plan {
        app: app.clone(),
        functions: vec![wasm_function(app, bytes)],
        config: Config::new(),
        limits: AppLimits::default(),
        allow_callers: Vec::new(),
    })
}

/// `lode deploy PATH [--name APP]`.
pub async fn deploy(
    client: &ApiClient,
    registry: Arc<RegistryClient>,
    path: &Path,
    name: Option<&str>,
) -> Result<()> {
    let Plan {
        app,
        functions: planned,
        config,
        limits,
        allow_callers,
    } = plan(path, name)?;
    if !is_dns_label(&app) {
        bail!("{}; pass --name", dns_label_rule("app", &app));
    }
    let mut manifest = Manifest {
        version: crate::proto::manifest::MANIFEST_VERSION,
        app: app.clone(),
        config,
        limits,
        allow_callers,
        run_of: None,
        functions: Vec::new(),
    };
    let mut uploads = BTreeMap::new();
    for p in planned {
        uploads.insert(p.spec.component.clone().unwrap_or_default(), p.bytes);
        manifest.functions.push(p.spec);
    }
    if let Err(problems) = manifest.validate() {
        bail!("invalid app:\n  {}", problems.join("\n  "));
    }
    upload_blobs(registry.as_ref(), uploads).await?;
    follow_deploy(client, &manifest, false).await
}

/// Blobs go to the registry before the manifest that names them; only missing ones are sent.
async fn upload_blobs(registry: &RegistryClient, blobs: BTreeMap<String, Vec<u8>>) -> Result<()> {
    let blobs: Vec<(Digest, Vec<u8>)> = blobs
        .into_iter()
        .map(|(digest, bytes)| Ok((digest.parse::<Digest>()?, bytes)))
        .collect::<Result<_>>()?;
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| d.clone()).collect();
    let missing = registry.missing(&digests).await?;
    for (digest, bytes) in blobs {
        if missing.contains(&digest) {
            let size = bytes.len();
            registry
                .put_blob(&digest, bytes.into())
                .await
                .with_context(|| format!("uploading {digest}"))?;
            eprintln!("uploaded {digest} ({size} bytes)");
        }
    }
    Ok(())
}

/// Prints a line of a deploy's outcome: to stdout, or to stderr when `quiet`.
pub fn say(quiet: bool, line: &str) {
    if quiet {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

/// Sends the manifest and prints the server's progress until the deploy ends; the outcome
/// goes to stdout, or to stderr with `quiet` (`lode run`, whose stdout is the program's).
pub async fn follow_deploy(client: &ApiClient, manifest: &Manifest, quiet: bool) -> Result<()> {
    let response = client
        .send(
            client
                .request(Method::PUT, &format!("/v1/apps/{}", manifest.app))
                .json(manifest),
        )
        .await?;
    if !response.status().is_success() {
        return Err(api_error(response).await);
    }
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("valid template"),
    );
    spinner.enable_steady_tick(Duration::from_millis(100));
    // Off a terminal the spinner draws nothing, its println included; build output and
    // compile lines still belong in the log that captures stderr.
    let note = |line: String| {
        if spinner.is_hidden() {
            eprintln!("{line}");
        } else {
            spinner.println(line);
        }
    };
    let mut events = ndjson_lines::<DeployEvent>(response);
    let mut outcome = None;
    let mut reported_quarter = 0;
    while let Some(event) = events.next().await {
        match event? {
            DeployEvent::Compiling { function, bytes } => {
                spinner.set_message(format!("compiling {function} ({} KiB)", bytes / 1024))
            }
            DeployEvent::PreInitializing { function } => {
                spinner.set_message(format!("pre-initializing {function} (running its init)"))
            }
            DeployEvent::Progress {
                function,
                compiled: Some(done),
                functions: Some(total),
                ..
            } => {
                let percent = done * 100 / total.max(1);
                let line =
                    format!("compiling {function}: {done} of {total} functions ({percent}%)");
                // Off a terminal, a line at each quarter shows it moving.
                if spinner.is_hidden() {
                    if percent / 25 > reported_quarter {
                        reported_quarter = percent / 25;
                        eprintln!("{line}");
                    }
                } else {
                    spinner.set_message(line);
                }
            }
            DeployEvent::Progress { .. } => {}
            DeployEvent::Image { function, line } => note(format!("{function}: {line}")),
            DeployEvent::PreInitialized {
                function,
                bytes,
                ms,
            } => note(format!(
                "pre-initialized {function} ({} KiB snapshot) in {ms} ms",
                bytes / 1024
            )),
            DeployEvent::Compiled {
                function,
                cached,
                ms,
            } => note(format!(
                "{} {function} in {ms} ms",
                if cached { "loaded" } else { "compiled" }
            )),
            last => outcome = Some(last),
        }
    }
    spinner.finish_and_clear();
    let Some(outcome) = outcome else {
        bail!("the server ended the deploy without a result; check `lode logs` and the server log");
    };
    let say = |line: String| say(quiet, &line);
    let urls = match outcome {
        DeployEvent::Deployed { version, urls, .. } => {
            say(format!("deployed {} version {version}", manifest.app));
            urls
        }
        DeployEvent::Unchanged { version, urls, .. } => {
            say(format!(
                "{} is unchanged (version {version} is already live)",
                manifest.app
            ));
            urls
        }
        DeployEvent::Error { message } => bail!("deploy failed: {message}"),
        other => bail!("the server ended the deploy with {other:?}; check the server log"),
    };
    for url in urls {
        say(url);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_dns_labels() {
        assert_eq!(default_name("hello_http"), "hello-http");
        assert_eq!(default_name("My.App"), "my-app");
    }

    #[test]
    fn lode_toml_needs_web_paths_for_several_http_functions() {
        let dir = tempfile::tempdir().unwrap();
        // The export's name is all the CLI looks for.
        let mut component = wat::parse_str("(component)").unwrap();
        std::fs::write(dir.path().join("called.wasm"), &component).unwrap();
        component.extend_from_slice(b"wasi:http/incoming-handler@0.2.0");
        std::fs::write(dir.path().join("a.wasm"), &component).unwrap();
        let two = |path: &str| {
            format!(
                "app = \"shop\"\n[config]\ngreeting = \"hi\"\n\
                 [limits]\ncall_depth = 3\nwasm_stack_kib = 128\n\
                 [[function]]\nname = \"a\"\npath = \"{path}\"\n\
                 [[function]]\nname = \"b\"\npath = \"{path}\"\n"
            )
        };
        std::fs::write(dir.path().join("lode.toml"), two("a.wasm")).unwrap();
        let err = plan(dir.path(), None).err().unwrap().to_string();
        assert!(err.contains("serves HTTP: give it `web"), "{err}");
        // Components that only take calls need no route.
        std::fs::write(dir.path().join("lode.toml"), two("called.wasm")).unwrap();
        let Plan {
            functions: planned,
            config,
            limits,
            ..
        } = plan(dir.path(), None).unwrap();
        assert!(planned.iter().all(|p| p.spec.web.is_none()));
        assert_eq!(config.get("greeting").map(String::as_str), Some("hi"));
        assert_eq!(
            (limits.call_depth, limits.wasm_stack_kib, limits.fan_out),
            (Some(3), Some(128), None)
        );

        std::fs::write(
            dir.path().join("lode.toml"),
            "[[function]]\nname = \"a\"\npath = \"a.wasm\"\nmemory = 64\ntimeout = \"2s\"\n\
             network = { allow = [\"api.example.com\"] }\n",
        )
        .unwrap();
        let planned = plan(dir.path(), Some("shop")).unwrap().functions;
        let spec = &planned[0].spec;
        assert_eq!(spec.resources.memory, Some(64));
        assert_eq!(spec.resources.timeout, Some(2.0));
        assert_eq!(spec.network.mode, NetworkMode::Outbound);
        assert_eq!(spec.web.as_ref().unwrap().path, "/");
    }

    #[test]
    fn core_modules_are_refused_before_upload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.wasm");
        std::fs::write(&path, wat::parse_str("(module)").unwrap()).unwrap();
        let err = format!("{:#}", plan(&path, None).err().unwrap());
        assert!(err.contains("core Wasm module"), "{err}");
    }
}
