//! Sandboxes: long-lived containers that run untrusted code on demand, one process after
//! another, with files that persist between them (the container tier; `LiveSandbox` in the
//! native runner does the isolation).
//!
//! Each sandbox belongs to an app and has a lifetime: its `timeout` ends it whatever it does,
//! its `idle_timeout` ends it after that long with no process running and no call made, and
//! `terminate` ends it at once. Every end is recorded with its reason in the state store, so
//! a sandbox that was running when the server stopped is listed as ended by the restart;
//! the server's start clears what it left on the host (its cgroups and scratch directory).

mod files;
mod output;
mod process;
mod tunnels;
mod wasm;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use lode_native_runner::image_spec::ImageConfig;
use lode_native_runner::sandbox::LiveSandbox;

use crate::native::containers::SandboxLayer;
use crate::native::grant::Caller;
use crate::native::{Native, Refused};
use crate::proto::containers::ContainerRequest;
use crate::proto::manifest::{dns_label_rule, is_dns_label};
use crate::proto::sandboxes::{
    DEFAULT_TIMEOUT_SECS, SandboxInfo, SandboxRequest, SandboxStatus, Tier,
};
use crate::store::state::{StateStore, Table};
use crate::wasm::command::{CommandEngine, MAX_COMMAND_MEMORY};

pub use process::ProcessStream;

/// How often a sandbox's lifetime is checked.
const TICK: Duration = Duration::from_millis(100);

/// How long an ended sandbox's record is kept.
const RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Server-wide bounds on sandboxes, from `lode serve` flags.
#[derive(Debug, Clone)]
pub struct SandboxBounds {
    /// The longest `timeout` a sandbox may ask for.
    pub max_timeout: Duration,
    /// Sandboxes running at once on this server.
    pub max_running: usize,
    /// Sandboxes running at once per app.
    pub max_per_app: usize,
    /// The largest file a file call reads or writes, in bytes.
    pub max_file_bytes: u64,
    /// Output one process may send (stdout and stderr together); the rest is dropped and
    /// counted in its exit line.
    pub max_output_bytes: u64,
}

impl Default for SandboxBounds {
    fn default() -> Self {
        Self {
            max_timeout: Duration::from_secs(24 * 3600),
            max_running: 64,
            max_per_app: 16,
            max_file_bytes: 64 << 20,
            max_output_bytes: 64 << 20,
        }
    }
}

/// Memory a Wasm-tier command gets when the sandbox names none, in MiB.
const DEFAULT_WASM_MEMORY_MIB: u64 = 1024;

/// What runs a sandbox's processes.
enum Live {
    /// A container, its pid 1 Lode's, and its writable layer on the host.
    Container {
        sandbox: Box<LiveSandbox>,
        layer: SandboxLayer,
    },
    /// WASI commands over the image and the sandbox's own directories.
    Wasm(Arc<wasm::WasmRoom>),
}

impl Live {
    /// Why it stopped by itself, if it did.
    fn stopped(&mut self) -> Option<String> {
        match self {
            Live::Container { sandbox, .. } => {
                if sandbox.is_running() {
                    return None;
                }
                Some(match sandbox.limit_hit() {
                    Some(limit) => limit.to_string(),
                    None => "its pid 1 ended".into(),
                })
            }
            Live::Wasm(_) => None,
        }
    }

    fn terminate(self) {
        match self {
            Live::Container { sandbox, layer } => {
                sandbox.terminate();
                layer.remove();
            }
            Live::Wasm(room) => room.terminate(),
        }
    }
}

/// One sandbox the server holds.
struct Entry {
    info: Mutex<SandboxInfo>,
    /// `None` once it ended.
    live: Mutex<Option<Live>>,
    /// The image stays mounted while the sandbox lives.
    _mount: Arc<lode_fs::Mount>,
    /// Every process starts with this environment and working directory.
    env: Vec<(String, String)>,
    cwd: String,
    /// Memory per Wasm command, in bytes.
    memory: u64,
    /// When its timeout ends it.
    ends_at: Instant,
    /// The last exec or file call, for the idle timeout.
    touched: Mutex<Instant>,
    /// Processes running now, by id; those with stdin open hold its writer.
    processes: Mutex<HashMap<String, process::Handle>>,
    /// Its open ports; taken (closed) when it ends.
    tunnels: Mutex<Option<tunnels::Tunnels>>,
}

impl Entry {
    fn touch(&self) {
        *self.touched.lock().unwrap() = Instant::now();
    }

    /// Its Wasm room, if it is a running Wasm-tier sandbox.
    fn wasm_room(&self) -> Option<Arc<wasm::WasmRoom>> {
        match self.live.lock().unwrap().as_ref() {
            Some(Live::Wasm(room)) => Some(room.clone()),
            _ => None,
        }
    }
}

/// A sandbox call refused, with the status the API answers.
pub type SandboxError = Refused;

/// Every sandbox of this server.
pub struct Sandboxes {
    native: Arc<Native>,
    state: Arc<dyn StateStore>,
    bounds: SandboxBounds,
    /// Running sandboxes.
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    /// Creates in progress, by app and maker: they count against the bounds until they
    /// finish.
    starting: Mutex<Vec<Owners>>,
    /// Where compiled WASI commands are cached.
    commands_dir: PathBuf,
    /// The engine of the Wasm tier, made with its first sandbox.
    commands: OnceLock<Result<Arc<CommandEngine>, String>>,
    /// Commands found in images: the path and content digest, by image digest and lookup.
    command_digests: Mutex<HashMap<(String, String), (String, blake3::Hash)>>,
    /// The top level of each Wasm image sandboxes started from, by digest.
    image_roots: Mutex<HashMap<String, Arc<wasm::ImageRoot>>>,
    /// Output of every process sent and not yet taken by its caller, in bytes.
    queued: Arc<std::sync::atomic::AtomicU64>,
    /// Where Lode volumes live, which sandboxes mount by name.
    volumes_dir: PathBuf,
    /// This host's id, stamped on its sandboxes, where hosts share the state.
    host: Option<String>,
    /// Secrets, whose variables sandboxes may ask for by name.
    secrets: Arc<crate::store::secrets::Secrets>,
    /// Where tunnels listen (the public HTTP listener's address), and the host their
    /// answers name.
    tunnel_address: (std::net::IpAddr, String),
}

/// A sandbox just started, before it is recorded.
struct Started {
    live: Live,
    tier: Tier,
    image_digest: String,
    mount: Arc<lode_fs::Mount>,
    env: Vec<(String, String)>,
    cwd: String,
    memory: u64,
}

/// The app a sandbox belongs to, and the app whose container made it (if one did).
#[derive(Debug, Clone, PartialEq)]
struct Owners {
    app: String,
    maker: Option<String>,
}

impl Owners {
    fn of(info: &SandboxInfo) -> Self {
        Self {
            app: info.app.clone(),
            maker: info.created_by_app.clone(),
        }
    }
}

/// A create's place in the count; dropped when the create ends, however it ends.
struct Reservation<'a> {
    sandboxes: &'a Sandboxes,
    owners: Owners,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut starting = self.sandboxes.starting.lock().unwrap();
        if let Some(at) = starting.iter().position(|o| *o == self.owners) {
            starting.swap_remove(at);
        }
    }
}

impl Sandboxes {
    /// The sandboxes of a server that just started: records of ones that were running here
    /// are marked ended by the restart, and records older than a day go. `host` is this
    /// host's id where several share the state: the sandboxes other hosts run are theirs.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        native: Arc<Native>,
        state: Arc<dyn StateStore>,
        bounds: SandboxBounds,
        commands_dir: PathBuf,
        volumes_dir: PathBuf,
        secrets: Arc<crate::store::secrets::Secrets>,
        tunnel_address: (std::net::IpAddr, String),
        host: Option<String>,
    ) -> anyhow::Result<Arc<Self>> {
        let oldest = crate::util::now_ms().saturating_sub(RETENTION.as_millis() as u64);
        for (id, bytes) in state.list_entries(Table::Sandboxes)? {
            match serde_json::from_slice::<SandboxInfo>(&bytes) {
                Ok(mut info) if info.ended_ms.unwrap_or(info.created_ms) >= oldest => {
                    let ours = info.host.is_none() || info.host == host;
                    if ours && info.status == SandboxStatus::Running {
                        info.status = SandboxStatus::Ended;
                        info.ended_by = Some("restart".into());
                        info.ended_ms = Some(crate::util::now_ms());
                        state.put_entry(Table::Sandboxes, &id, &serde_json::to_vec(&info)?)?;
                    }
                }
                _ => {
                    state.delete_entry(Table::Sandboxes, &id)?;
                }
            }
        }
        Ok(Arc::new(Self {
            native,
            state,
            bounds,
            entries: Mutex::new(HashMap::new()),
            starting: Mutex::new(Vec::new()),
            commands_dir,
            commands: OnceLock::new(),
            command_digests: Mutex::new(HashMap::new()),
            image_roots: Mutex::new(HashMap::new()),
            queued: Arc::default(),
            volumes_dir,
            host,
            secrets,
            tunnel_address,
        }))
    }

    /// The Wasm tier's engine, made on first use.
    fn command_engine(&self) -> Result<Arc<CommandEngine>, Refused> {
        self.commands
            .get_or_init(|| {
                CommandEngine::new(self.commands_dir.clone())
                    .map(Arc::new)
                    .map_err(|e| format!("{e:#}"))
            })
            .clone()
            .map_err(|e| {
                Refused::new(
                    503,
                    "no_wasm_tier",
                    format!("the Wasm tier is unavailable: {e}"),
                )
            })
    }

    fn record(&self, info: &SandboxInfo) {
        let bytes = serde_json::to_vec(info).expect("sandbox records encode");
        if let Err(e) = self
            .state
            .put_entry(Table::Sandboxes, &info.sandbox_id, &bytes)
        {
            tracing::warn!(sandbox = %info.sandbox_id, error = %e, "recording the sandbox failed");
        }
    }

    /// Starts a sandbox for `caller` and returns it, running. A function container gets
    /// no more than its function was given, and its app alone reaches the sandbox after.
    pub async fn create(
        self: &Arc<Self>,
        mut request: SandboxRequest,
        caller: &Caller,
    ) -> Result<SandboxInfo, Refused> {
        if !is_dns_label(&request.app) {
            return Err(Refused::bad(dns_label_rule("app", &request.app)));
        }
        let maker = match caller {
            Caller::Operator => None,
            Caller::Container(grant) => {
                grant.check_sandbox(&request)?;
                Some(grant.app.to_string())
            }
        };
        let timeout = request.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS);
        let max = self.bounds.max_timeout.as_secs_f64();
        if !(timeout > 0.0 && timeout <= max) {
            return Err(Refused::bad(format!(
                "timeout must be between 0 and {max} s (lode serve --max-sandbox-timeout)"
            )));
        }
        if let Some(idle) = request.idle_timeout
            && !(idle > 0.0 && idle <= timeout)
        {
            return Err(Refused::bad(
                "idle_timeout must be above 0 and at most the timeout",
            ));
        }
        check_tags(&request.tags)?;
        tunnels::check_ports(&request.ports).map_err(Refused::bad)?;
        for name in &request.secrets {
            let values = self
                .secrets
                .get(name)
                .map_err(Refused::internal)?
                .ok_or_else(|| {
                    Refused::bad(format!(
                        "secret {name:?} does not exist; create it with `lode secret create {name} \
                     KEY=VALUE`"
                    ))
                })?;
            for (key, value) in values {
                lode_native_runner::image_spec::set_env(&mut request.env, &key, &value);
            }
        }
        let _reservation = self.reserve(Owners {
            app: request.app.clone(),
            maker: maker.clone(),
        })?;
        let (digest, config) = self.native.image_config(&request.image).await?;
        let id = format!("sb-{:024x}", rand::random::<u128>() >> 32);
        let started = if config.is_wasm() {
            self.start_wasm(&id, &request, digest, &config).await?
        } else {
            self.start_container(&request).await?
        };
        let (tunnels, opened) = match &started.live {
            Live::Container { sandbox, .. } if !request.ports.is_empty() => {
                let (bind, host) = &self.tunnel_address;
                let network = sandbox.network().map_err(Refused::internal)?;
                let mirror = self.native.tunnel_mirror();
                let (tunnels, opened) = tunnels::open(*bind, host, &request.ports, network, mirror)
                    .await
                    .map_err(|e| Refused::internal(format!("opening the sandbox's ports: {e}")))?;
                (tunnels, Some(opened))
            }
            _ => (Vec::new(), None),
        };
        let info = SandboxInfo {
            sandbox_id: id.clone(),
            app: request.app.clone(),
            image: request.image.clone(),
            image_digest: started.image_digest,
            tier: started.tier,
            tags: request.tags.clone(),
            status: SandboxStatus::Running,
            ended_by: None,
            created_ms: crate::util::now_ms(),
            ended_ms: None,
            timeout,
            idle_timeout: request.idle_timeout,
            tunnels,
            created_by_app: maker,
            host: self.host.clone(),
        };
        self.record(&info);
        let entry = Arc::new(Entry {
            info: Mutex::new(info.clone()),
            live: Mutex::new(Some(started.live)),
            _mount: started.mount,
            env: started.env,
            cwd: started.cwd,
            memory: started.memory,
            ends_at: Instant::now() + Duration::from_secs_f64(timeout),
            touched: Mutex::new(Instant::now()),
            processes: Mutex::new(HashMap::new()),
            tunnels: Mutex::new(opened),
        });
        self.entries
            .lock()
            .unwrap()
            .insert(id.clone(), entry.clone());
        tracing::info!(sandbox = %id, app = %info.app, image = %info.image_digest, tier = ?info.tier, "sandbox started");
        tokio::spawn(self.clone().supervise(entry));
        Ok(info)
    }

    /// A container-tier sandbox of `request`, running.
    async fn start_container(&self, request: &SandboxRequest) -> Result<Started, Refused> {
        let mut prepared = self
            .native
            .prepare_sandbox(&ContainerRequest {
                image: request.image.clone(),
                env: request.env.clone(),
                memory: request.memory,
                cpu: request.cpu,
                pids: request.pids,
                network: request.network.clone(),
                allow_net: request.allow_net.clone(),
                volumes: request.volumes.clone(),
                workdir: request.workdir.clone(),
                ..ContainerRequest::default()
            })
            .await?;
        // Root in a sandbox may change owners and switch users (`su`, `chown`, a per-user
        // directory), as in Docker: build steps' set, which holds only over uids its user
        // namespace maps. Without one, root would be the host's, and keeps nothing.
        if prepared.spec.user_namespace.is_some() {
            prepared.spec.capabilities = lode_native_runner::sandbox::BUILD_CAPABILITIES;
        }
        for volume in &request.named_volumes {
            let dir = crate::store::volumes::open(
                &self.volumes_dir,
                &volume.name,
                volume.create_if_missing,
                self.native.container_root(),
            )
            .map_err(|e| Refused::bad(format!("{e:#}")))?;
            let opened =
                lode_native_runner::sandbox::Volume::open(dir, &volume.path, volume.read_only)
                    .map_err(|e| {
                        Refused::bad(format!("volume {:?} at {}: {e}", volume.name, volume.path))
                    })?;
            prepared.spec.volumes.push(opened);
        }
        let layer = prepared
            .layer
            .ok_or_else(|| Refused::internal("a sandbox was prepared without its layer"))?;
        let spec = prepared.spec.clone();
        let cgroups = prepared.cgroups.clone();
        let started =
            tokio::task::spawn_blocking(move || LiveSandbox::start(&spec, cgroups.as_ref()))
                .await
                .map_err(Refused::internal)?;
        let live = match started {
            Ok(live) => live,
            Err(e) => {
                layer.remove();
                return Err(Refused::new(
                    500,
                    "sandbox_failed",
                    format!("the sandbox did not start: {e}"),
                ));
            }
        };
        Ok(Started {
            live: Live::Container {
                sandbox: Box::new(live),
                layer,
            },
            tier: Tier::Container,
            image_digest: prepared.image,
            mount: prepared.mount,
            env: prepared.spec.env,
            cwd: prepared.spec.cwd,
            memory: 0,
        })
    }

    /// A Wasm-tier sandbox of `request` (its image a Wasm runtime image), ready for commands.
    /// What only a container can honour is refused by name.
    async fn start_wasm(
        &self,
        id: &str,
        request: &SandboxRequest,
        digest: lode_registry::Digest,
        config: &ImageConfig,
    ) -> Result<Started, Refused> {
        let container_only = [
            ("cpu", request.cpu.is_some()),
            ("pids", request.pids.is_some()),
            (
                "volumes",
                !request.volumes.is_empty() || !request.named_volumes.is_empty(),
            ),
            ("ports (tunnels)", !request.ports.is_empty()),
            (
                "network",
                request.network.as_deref().is_some_and(|n| n != "none"),
            ),
            ("allow_net (cidr_allowlist)", !request.allow_net.is_empty()),
        ];
        if let Some((name, _)) = container_only.iter().find(|(_, asked)| *asked) {
            return Err(Refused::bad(format!(
                "{name} is not available in the Wasm tier (image {} is a Wasm runtime image: \
                 its commands get no sockets, threads or host directories); use a Linux image \
                 for it",
                request.image
            )));
        }
        let max_mib = (MAX_COMMAND_MEMORY >> 20).min(self.native.bounds().max_memory_mib);
        let memory_mib = request
            .memory
            .unwrap_or(DEFAULT_WASM_MEMORY_MIB.min(max_mib));
        if !(1..=max_mib).contains(&memory_mib) {
            return Err(Refused::bad(format!(
                "memory must be between 1 and {max_mib} MiB for a Wasm sandbox"
            )));
        }
        self.command_engine()?;
        let mount = self.native.mount_image(&digest).await?;
        let layer = self.native.run_dir().join(id);
        let bytes = self.native.bounds().writable_bytes;
        let (image, hex) = (mount.clone(), digest.to_string());
        let known = self.image_roots.lock().unwrap().get(&hex).cloned();
        let room = tokio::task::spawn_blocking(move || {
            let root = match known {
                Some(root) => root,
                None => Arc::new(wasm::ImageRoot::read(&image)?),
            };
            wasm::WasmRoom::make(image, hex, root, layer, bytes)
        })
        .await
        .map_err(Refused::internal)?
        .map_err(|e| Refused::internal(format!("the sandbox did not start: {e}")))?;
        self.image_roots
            .lock()
            .unwrap()
            .insert(room.digest.clone(), room.root.clone());
        let mut env = config.env.clone();
        for (name, value) in &request.env {
            lode_native_runner::image_spec::set_env(&mut env, name, value);
        }
        Ok(Started {
            live: Live::Wasm(Arc::new(room)),
            tier: Tier::Wasm,
            image_digest: digest.to_string(),
            mount,
            env,
            cwd: request
                .workdir
                .clone()
                .or(config.workdir.clone())
                .unwrap_or_else(|| "/work".into()),
            memory: memory_mib << 20,
        })
    }

    /// Takes a place for a new sandbox of `owners`, refused past the server's or the app's
    /// count; running sandboxes and creates in progress both count. The sandboxes a
    /// container's app made count against that app too, whatever app they belong to.
    fn reserve(&self, owners: Owners) -> Result<Reservation<'_>, Refused> {
        let entries = self.entries.lock().unwrap();
        let mut starting = self.starting.lock().unwrap();
        let running = entries.len() + starting.len();
        if running >= self.bounds.max_running {
            return Err(Refused::new(
                429,
                "too_many_sandboxes",
                format!(
                    "this server runs {running} sandboxes already (lode serve --max-sandboxes); \
                     terminate one first"
                ),
            ));
        }
        let running: Vec<Owners> = entries
            .values()
            .map(|e| Owners::of(&e.info.lock().unwrap()))
            .chain(starting.iter().cloned())
            .collect();
        let of_app = running.iter().filter(|o| o.app == owners.app).count();
        let made = owners.maker.as_ref().map_or(0, |maker| {
            running
                .iter()
                .filter(|o| o.maker.as_ref() == Some(maker))
                .count()
        });
        for (count, app, what) in [
            (of_app, &owners.app, "runs"),
            (made, owners.maker.as_ref().unwrap_or(&owners.app), "made"),
        ] {
            if count >= self.bounds.max_per_app {
                return Err(Refused::new(
                    429,
                    "too_many_sandboxes",
                    format!(
                        "app {app:?} {what} {count} sandboxes already (lode serve \
                         --max-sandboxes-per-app); terminate one first"
                    ),
                ));
            }
        }
        starting.push(owners.clone());
        Ok(Reservation {
            sandboxes: self,
            owners,
        })
    }

    /// Ends `entry` when its timeout or idle timeout passes or its pid 1 ends.
    async fn supervise(self: Arc<Self>, entry: Arc<Entry>) {
        let started = Instant::now();
        let (timeout, idle) = {
            let info = entry.info.lock().unwrap();
            (
                Duration::from_secs_f64(info.timeout),
                info.idle_timeout.map(Duration::from_secs_f64),
            )
        };
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            let reason = {
                // A process starting holds the sandbox for a moment: look again next tick
                // rather than hold an async thread.
                let Ok(mut live) = entry.live.try_lock() else {
                    continue;
                };
                let Some(sandbox) = live.as_mut() else { return };
                if started.elapsed() >= timeout {
                    Some(format!("timeout ({}s)", timeout.as_secs_f64()))
                } else if let Some(idle) = idle
                    && entry.processes.lock().unwrap().is_empty()
                    && entry.touched.lock().unwrap().elapsed() >= idle
                {
                    Some(format!("idle_timeout ({}s)", idle.as_secs_f64()))
                } else {
                    sandbox.stopped()
                }
            };
            if let Some(reason) = reason {
                self.end(&entry, reason).await;
                return;
            }
        }
    }

    /// Ends a sandbox: kills everything in it, removes what it had on the host, and records
    /// why. Ending an ended one does nothing.
    async fn end(&self, entry: &Arc<Entry>, reason: String) {
        // The lock may be held by a process starting: wait for it off the async threads.
        let taking = entry.clone();
        let why = reason.clone();
        let taken = tokio::task::spawn_blocking(move || {
            let live = taking.live.lock().unwrap().take()?;
            // Recorded before the kill, so a process stopped by it names the reason.
            taking.info.lock().unwrap().ended_by = Some(why);
            taking.processes.lock().unwrap().clear();
            taking.tunnels.lock().unwrap().take();
            live.terminate();
            Some(())
        })
        .await;
        if !matches!(taken, Ok(Some(()))) {
            return;
        }
        let info = {
            let mut info = entry.info.lock().unwrap();
            info.status = SandboxStatus::Ended;
            info.ended_by = Some(reason.clone());
            info.ended_ms = Some(crate::util::now_ms());
            info.tunnels.clear();
            info.clone()
        };
        tracing::info!(sandbox = %info.sandbox_id, reason, "sandbox ended");
        self.record(&info);
        // Its record answers from here on; calls still holding the entry see it ended.
        self.entries.lock().unwrap().remove(&info.sandbox_id);
    }

    fn entry(&self, id: &str) -> Result<Arc<Entry>, Refused> {
        if let Some(entry) = self.entries.lock().unwrap().get(id) {
            return Ok(entry.clone());
        }
        match self.ended_record(id) {
            Some(info) => Err(ended(&info)),
            None => Err(unknown(id)),
        }
    }

    fn ended_record(&self, id: &str) -> Option<SandboxInfo> {
        let bytes = self.state.get_entry(Table::Sandboxes, id).ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// A running sandbox's entry, touched (a call is activity); an ended one is refused.
    fn running(&self, id: &str) -> Result<Arc<Entry>, Refused> {
        let entry = self.entry(id)?;
        let info = entry.info.lock().unwrap().clone();
        if info.status != SandboxStatus::Running {
            return Err(ended(&info));
        }
        entry.touch();
        Ok(entry)
    }

    /// Refuses `caller` a sandbox it may not reach, as if there were no such sandbox.
    pub fn check_reach(&self, caller: &Caller, id: &str) -> Result<(), Refused> {
        match caller {
            Caller::Operator => Ok(()),
            Caller::Container(_) if caller.reaches(&self.get(id)?) => Ok(()),
            Caller::Container(_) => Err(unknown(id)),
        }
    }

    /// A sandbox, running or ended.
    pub fn get(&self, id: &str) -> Result<SandboxInfo, Refused> {
        if let Some(entry) = self.entries.lock().unwrap().get(id) {
            return Ok(entry.info.lock().unwrap().clone());
        }
        self.ended_record(id).ok_or_else(|| unknown(id))
    }

    /// Sandboxes of `app` (every app when `None`) carrying every tag in `tags` that `caller`
    /// reaches, newest first.
    pub fn list(
        &self,
        app: Option<&str>,
        tags: &BTreeMap<String, String>,
        caller: &Caller,
    ) -> Result<Vec<SandboxInfo>, Refused> {
        let mut found: Vec<SandboxInfo> = self
            .state
            .list_entries(Table::Sandboxes)
            .map_err(Refused::internal)?
            .into_iter()
            .filter_map(|(id, bytes)| match self.entries.lock().unwrap().get(&id) {
                Some(entry) => Some(entry.info.lock().unwrap().clone()),
                None => serde_json::from_slice(&bytes).ok(),
            })
            .filter(|info: &SandboxInfo| app.is_none_or(|app| info.app == app))
            .filter(|info| tags.iter().all(|(k, v)| info.tags.get(k) == Some(v)))
            .filter(|info| caller.reaches(info))
            .collect();
        found.sort_by_key(|info| std::cmp::Reverse(info.created_ms));
        Ok(found)
    }

    /// Replaces a running sandbox's labels.
    pub fn set_tags(
        &self,
        id: &str,
        tags: BTreeMap<String, String>,
    ) -> Result<SandboxInfo, Refused> {
        check_tags(&tags)?;
        let entry = self.running(id)?;
        let info = {
            let mut info = entry.info.lock().unwrap();
            info.tags = tags;
            info.clone()
        };
        self.record(&info);
        Ok(info)
    }

    /// A new image of a running sandbox's files: its image with what it changed on top,
    /// `tag` pointed at it too. Processes keep running; a file written meanwhile may or may
    /// not be in it.
    pub async fn snapshot(&self, id: &str, tag: Option<&str>) -> Result<String, Refused> {
        let entry = self.running(id)?;
        let (upper, host_ids, kept) = match entry.live.lock().unwrap().as_ref() {
            Some(Live::Container { layer, .. }) => (layer.upper(), layer.host_ids, Vec::new()),
            // The image's own directories are mount points in a Wasm sandbox's root.
            Some(Live::Wasm(room)) => {
                (room.upper().to_path_buf(), None, room.image_dirs().to_vec())
            }
            None => return Err(ended(&entry.info.lock().unwrap())),
        };
        let base = entry.info.lock().unwrap().image_digest.clone();
        let digest = self
            .native
            .snapshot(&base, &upper, host_ids, &kept, tag)
            .await?;
        tracing::info!(sandbox = %id, image = %digest, "sandbox snapshotted");
        Ok(digest.to_string())
    }

    /// Ends a sandbox now, recorded as `terminated`; returns how it stands.
    pub async fn terminate(&self, id: &str) -> Result<SandboxInfo, Refused> {
        let entry = match self.entry(id) {
            Ok(entry) => entry,
            // Already ended in an earlier run: nothing to do.
            Err(_) => return self.get(id),
        };
        self.end(&entry, "terminated".into()).await;
        let info = entry.info.lock().unwrap().clone();
        Ok(info)
    }

    /// Ends every sandbox, for a server that stops; each is recorded as ended by it.
    pub async fn shut_down(&self) {
        let entries: Vec<_> = self.entries.lock().unwrap().values().cloned().collect();
        for entry in entries {
            self.end(&entry, "server stopped".into()).await;
        }
    }
}

/// The most tags one sandbox carries.
const MAX_TAGS: usize = 64;

fn check_tags(tags: &BTreeMap<String, String>) -> Result<(), Refused> {
    if tags.len() > MAX_TAGS {
        return Err(Refused::bad(format!(
            "{} tags is over the limit of {MAX_TAGS} per sandbox",
            tags.len()
        )));
    }
    for (key, value) in tags {
        if key.is_empty() || key.len() > 63 || value.len() > 255 {
            return Err(Refused::bad(format!(
                "tag {key:?}: names are 1-63 bytes, values at most 255"
            )));
        }
    }
    Ok(())
}

fn unknown(id: &str) -> Refused {
    Refused::new(
        404,
        "not_found",
        format!("no sandbox {id:?}; `lode sandbox ls` lists them"),
    )
}

fn ended(info: &SandboxInfo) -> Refused {
    Refused::new(
        409,
        "sandbox_ended",
        format!(
            "sandbox {} has ended ({}); create a new one",
            info.sandbox_id,
            info.ended_by.as_deref().unwrap_or("ended")
        ),
    )
}
