//! Function containers: a sandbox whose command is the Python agent (`python3 -m
//! lode._agent`, from the SDK), which loads the user's module once and serves inputs over a
//! Unix socket.
//!
//! The host listens on `host.sock` in a per-container directory, mounted read-only at
//! [`RUN_MOUNT`]; the agent connects to it. The socket is the container's only way out: it
//! carries inputs in, outputs and per-input logs back, and calls the code makes to other
//! functions (each with the container's own token, which can call functions and nothing
//! else). Messages are JSON, one per line; their shapes are [`ToAgent`] and [`FromAgent`].
//!
//! With [`AgentSpec::api_socket`], `api.sock` sits beside it: HTTP for the host's API as the
//! container's code may use it (sandboxes, image builds), which the host serves and holds to
//! what the function was given. Only the container's root can connect to either.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};

use crate::cgroup::Hierarchy;
use crate::sandbox::{Criu, RestoreSpec, SandboxSpec, Volume, spawn};

mod accept;
use accept::Accept;

/// Where the SDK (and the agent in it) appears in a function container.
pub const SDK_MOUNT: &str = "/lode/sdk";
/// Where the user's code appears.
pub const APP_MOUNT: &str = "/lode/app";
/// Where the host's socket appears.
pub const RUN_MOUNT: &str = "/lode/run";
/// The longest message either side may send. A container that sends a longer one is stopped
/// (its inputs fail, or are retried) rather than let it grow the host's memory without bound.
pub const MAX_MESSAGE: usize = 64 << 20;

/// Messages read from one container and not yet handled: with [`MAX_MESSAGE`], what the host
/// holds for one container at most.
pub const MESSAGES_IN_FLIGHT: usize = 8;

/// How long a container whose agent hung up may take to exit by itself before it is killed.
pub const EXIT_GRACE: Duration = Duration::from_secs(2);

/// A remote exception, as the agent reports it and the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// The exception's class name, or an API error kind.
    pub kind: String,
    /// The class's module, so a client can raise the same type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// `str(exception)`, or what went wrong.
    pub message: String,
    /// The formatted remote traceback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
}

impl ErrorInfo {
    /// An error Lode itself raises (not the user's code), named by `kind`.
    pub fn lode(kind: &str, message: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            module: None,
            message: message.into(),
            traceback: None,
        }
    }
}

/// What a call produced: a JSON value, a pickled value (base64), or an error.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// The JSON result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The pickled result, base64, for functions that ask for pickle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_pickled: Option<String>,
    /// The error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

impl Outcome {
    /// A failed outcome.
    pub fn failed(error: ErrorInfo) -> Self {
        Self {
            error: Some(error),
            ..Self::default()
        }
    }

    /// A JSON result. (`null` stays a result: a function that returns None.)
    pub fn value(result: Value) -> Self {
        Self {
            result: Some(result),
            ..Self::default()
        }
    }

    /// Whether it failed.
    pub fn is_error(&self) -> bool {
        self.error.is_some()
    }
}

/// Host to agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToAgent {
    /// Run `function` on the payload (`args`/`kwargs`, or `pickled`).
    Input {
        /// The input's id, echoed in its output and logs.
        id: String,
        /// The function's name in the module's app.
        function: String,
        /// `{"args": [...], "kwargs": {...}}` or `{"pickled": "..."}`.
        #[serde(flatten)]
        payload: serde_json::Map<String, Value>,
    },
    /// Stop: run the exit hooks (`@lode.exit()`) and exit. Sent to an idle container that is
    /// scaled down; it is killed if it has not exited within the grace period.
    Shutdown {},
    /// More of a web request's body (an input whose payload holds `http`), base64.
    HttpBody {
        /// The input.
        id: String,
        /// The bytes, base64.
        body: String,
        /// Whether more follows.
        more_body: bool,
    },
    /// The web client went away.
    HttpDisconnect {
        /// The input.
        id: String,
    },
    /// A WebSocket message from the client.
    WsReceive {
        /// The input.
        id: String,
        /// A text message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        /// A binary message, base64.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes: Option<String>,
    },
    /// The WebSocket client closed or went away.
    WsDisconnect {
        /// The input.
        id: String,
        /// The close code.
        code: u16,
    },
    /// The answer to a [`FromAgent::Call`]; for a `call_gen`, one per value the generator
    /// yields (`more`), then one that ends it.
    CallResult {
        /// The agent's id for the call.
        call_id: String,
        /// What the call produced.
        #[serde(flatten)]
        outcome: Outcome,
        /// A generator's value: more answers follow.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
    },
}

/// Agent to host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromAgent {
    /// The module loaded and the agent is about to hang up and wait to be saved
    /// ([`SnapshotMode::Take`]); it connects again once saved, or once restored.
    SnapshotReady,
    /// The module loaded; these are its functions.
    Ready {
        /// Function names.
        functions: Vec<String>,
    },
    /// The module could not be loaded; the agent exits.
    Fatal {
        /// Why.
        error: ErrorInfo,
    },
    /// An input finished.
    Output {
        /// The input's id.
        id: String,
        /// Its result or error.
        #[serde(flatten)]
        outcome: Outcome,
    },
    /// Output the code printed, tagged with the input it printed during (`None`: outside).
    Log {
        /// The input's id.
        id: Option<String>,
        /// `stdout` or `stderr`.
        stream: String,
        /// The text.
        data: String,
    },
    /// One value a generator input yielded (an input whose payload has `"stream": true`).
    Yield {
        /// The input.
        id: String,
        /// The value, as JSON.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<Value>,
        /// The value pickled, base64, for pickle functions.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result_pickled: Option<String>,
    },
    /// A web input's response begins, with the first part of its body when the app had it
    /// at once; `done` says the body is whole and the input over (no `output` follows).
    HttpStart {
        /// The input.
        id: String,
        /// The HTTP status.
        status: u16,
        /// Header names and values.
        headers: Vec<(String, String)>,
        /// The body's first part (the whole body with `done`), base64.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<String>,
        /// The response is complete (the input ends with the agent's output, once the app
        /// returns).
        #[serde(default)]
        done: bool,
    },
    /// Part of a web input's response body, base64; the last part has `more_body` false.
    HttpBody {
        /// The input.
        id: String,
        /// The bytes, base64.
        body: String,
        /// Whether more follows.
        more_body: bool,
    },
    /// The app accepted a WebSocket.
    WsAccept {
        /// The input.
        id: String,
        /// The subprotocol it chose.
        #[serde(default)]
        subprotocol: Option<String>,
        /// Extra response headers.
        #[serde(default)]
        headers: Vec<(String, String)>,
    },
    /// A WebSocket message for the client.
    WsSend {
        /// The input.
        id: String,
        /// A text message.
        #[serde(default)]
        text: Option<String>,
        /// A binary message, base64.
        #[serde(default)]
        bytes: Option<String>,
    },
    /// The app closed the WebSocket (or refused it, before accepting).
    WsClose {
        /// The input.
        id: String,
        /// The close code.
        #[serde(default = "normal_close")]
        code: u16,
        /// The reason.
        #[serde(default)]
        reason: String,
    },
    /// The code calls a function (`op` `call` or `spawn`) or waits for a spawned call
    /// (`get`).
    Call {
        /// The agent's id for this call.
        call_id: String,
        /// The container's token.
        token: String,
        /// What is asked.
        #[serde(flatten)]
        request: Box<CallRequest>,
    },
}

fn normal_close() -> u16 {
    1000
}

impl FromAgent {
    /// The input a streamed message (a generator's value, HTTP or WebSocket) belongs to.
    pub fn web_input(&self) -> Option<&str> {
        match self {
            FromAgent::Yield { id, .. }
            | FromAgent::HttpStart { id, .. }
            | FromAgent::HttpBody { id, .. }
            | FromAgent::WsAccept { id, .. }
            | FromAgent::WsSend { id, .. }
            | FromAgent::WsClose { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// A call the code in a container makes, through its agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRequest {
    /// `call`, `call_gen` (a generator's values), `spawn`, `get` (a spawned call's
    /// result), `dict` or `queue`.
    pub op: String,
    /// The callee's app; absent means the caller's own.
    #[serde(default)]
    pub app: Option<String>,
    /// The callee.
    #[serde(default)]
    pub function: Option<String>,
    /// The spawned call to wait for (`get`).
    #[serde(default)]
    pub id: Option<String>,
    /// How long `get` may wait, in seconds.
    #[serde(default)]
    pub wait: Option<f64>,
    /// Arguments.
    #[serde(default)]
    pub args: Option<Value>,
    /// Keyword arguments.
    #[serde(default)]
    pub kwargs: Option<Value>,
    /// Pickled arguments instead.
    #[serde(default)]
    pub pickled: Option<String>,
    /// The method, when the callee is a class.
    #[serde(default)]
    pub method: Option<String>,
    /// The class instance's parameter values.
    #[serde(default)]
    pub params: Option<Value>,
    /// The Dict or Queue an `op` of `dict` or `queue` is on.
    #[serde(default)]
    pub name: Option<String>,
    /// The Dict or Queue operation, as the API takes it.
    #[serde(default)]
    pub request: Option<Value>,
    /// The input being served by the code that calls, so the call counts against that
    /// input's call depth and fan-out; absent for calls from threads of the user's own.
    #[serde(default)]
    pub input: Option<String>,
}

/// How to start a function container.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// The sandbox: image, limits, env, the user's volumes. Its `argv` is replaced, and the
    /// SDK, app and socket mounts are added.
    pub sandbox: SandboxSpec,
    /// The host directory holding the `lode` package.
    pub sdk_dir: PathBuf,
    /// The host directory holding the user's module file.
    pub app_dir: PathBuf,
    /// The module to import.
    pub module: String,
    /// The app's name (calls without an app name stay in it).
    pub app: String,
    /// Inputs served at once.
    pub concurrency: u32,
    /// The container's token for calls it makes.
    pub token: String,
    /// How long the container may take to load the module and say it is ready.
    pub start_timeout: Duration,
    /// Also open `api.sock` beside `host.sock`, for the host's API as the container's
    /// code may use it (sandboxes, image builds); [`AgentContainer::api`] hands it over.
    pub api_socket: bool,
    /// Whether it starts from, or leaves, a memory snapshot.
    pub snapshot: SnapshotMode,
}

/// A function container's memory snapshot ([`crate::sandbox::Criu`]).
#[derive(Debug, Clone, Default)]
pub enum SnapshotMode {
    /// Start as usual.
    #[default]
    Off,
    /// Start checkpointable; once the module has loaded, save the container into `images`
    /// (an empty directory), and let it go on serving.
    Take {
        /// CRIU.
        criu: Criu,
        /// Where the images go.
        images: PathBuf,
    },
    /// Start from the images a [`SnapshotMode::Take`] saved, with the same image, SDK, app
    /// and settings.
    Restore {
        /// CRIU.
        criu: Criu,
        /// The images.
        images: PathBuf,
    },
}

/// Where a container sees the SDK, the app and the host's socket. A checkpointable one has
/// a read-only root, so they go under its `/run` tmpfs.
struct Mounts {
    sdk: &'static str,
    app: &'static str,
    run: &'static str,
}

impl Mounts {
    fn new(checkpointable: bool) -> Self {
        if checkpointable {
            Self {
                sdk: "/run/lode/sdk",
                app: "/run/lode/app",
                run: "/run/lode/run",
            }
        } else {
            Self {
                sdk: SDK_MOUNT,
                app: APP_MOUNT,
                run: RUN_MOUNT,
            }
        }
    }
}

/// The file a waiting agent polls for after its snapshot: what this container has that the
/// snapshot's cannot (its token).
const RESUME_FILE: &str = "resume.json";

/// Writes the resume file whole (a temporary, then a rename): the agent reads it once seen.
fn write_resume(run_dir: &Path, token: &str) -> std::io::Result<()> {
    let temp = run_dir.join(".resume.tmp");
    std::fs::write(&temp, serde_json::json!({ "token": token }).to_string())?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&temp, run_dir.join(RESUME_FILE))
}

/// How a function container ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    /// The exit code (128 + signal when killed).
    pub code: i32,
    /// The limit or timeout that killed it, named.
    pub killed_by: Option<String>,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.killed_by {
            Some(reason) => write!(f, "the container was {reason}"),
            None => write!(f, "the container exited with code {}", self.code),
        }
    }
}

/// Why a function container did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The user's module raised while loading.
    #[error("loading the module failed: {}: {}", .0.kind, .0.message)]
    Fatal(ErrorInfo),
    /// The sandbox could not be started.
    #[error("starting the container: {0}")]
    Spawn(std::io::Error),
    /// The agent never connected or said nothing sensible.
    #[error("{0}")]
    Agent(String),
}

/// A running function container with its agent connected.
pub struct AgentContainer {
    /// The module's functions.
    pub functions: Vec<String>,
    /// Messages to the agent.
    pub to_agent: mpsc::UnboundedSender<ToAgent>,
    /// Messages from the agent; closes when the connection does.
    pub from_agent: mpsc::Receiver<FromAgent>,
    /// The listener on `api.sock`, when [`AgentSpec::api_socket`] asked for one.
    pub api: Option<ApiListener>,
    /// The container's network namespace, held open (for tunnels into it).
    pub network: Option<std::os::fd::OwnedFd>,
    /// What became of the snapshot [`SnapshotMode::Take`] asked for.
    pub snapshot: Option<Result<crate::sandbox::DumpReport, String>>,
    stop: Arc<AtomicBool>,
    exit: watch::Receiver<Option<Exit>>,
}

/// The listener on a container's `api.sock`: it accepts only connections from the
/// container's root, as `host.sock` does; others are closed as they come.
pub struct ApiListener {
    listener: UnixListener,
    uid: u32,
}

impl ApiListener {
    /// The next connection from the container's root.
    pub async fn accept(&mut self) -> std::io::Result<tokio::net::UnixStream> {
        loop {
            let (stream, _) = self.listener.accept().await?;
            match stream.peer_cred().map(|c| c.uid()) {
                Ok(uid) if uid == self.uid => return Ok(stream),
                peer => tracing::warn!(
                    "a process of uid {:?} connected to a container's API socket, not the \
                     container's root ({}); closed",
                    peer.ok(),
                    self.uid
                ),
            }
        }
    }

    /// The socket's path on the host.
    pub fn local_addr(&self) -> std::io::Result<tokio::net::unix::SocketAddr> {
        self.listener.local_addr()
    }
}

/// Binds a Unix socket at `path` that only `uid` may connect to: it is owned by `uid`, mode
/// 0600, in a directory others can pass through but not list.
fn bind_private(path: &Path, uid: u32) -> std::io::Result<UnixListener> {
    let listener = UnixListener::bind(path)?;
    std::os::unix::fs::chown(path, Some(uid), Some(uid))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

impl AgentContainer {
    /// Kills the whole container (it is cleaned up in the background).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// A handle that stops the container when set.
    pub fn stopper(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// A receiver for the exit, to wait on elsewhere.
    pub fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.clone()
    }
}

/// Waits for a container's exit, as [`AgentContainer::exit_watch`] reports it.
pub async fn wait_exit(mut exit: watch::Receiver<Option<Exit>>) -> Exit {
    loop {
        if let Some(exit) = exit.borrow_and_update().clone() {
            return exit;
        }
        if exit.changed().await.is_err() {
            return Exit {
                code: -1,
                killed_by: Some("lost".into()),
            };
        }
    }
}

/// Receives lines a container printed outside the agent: `("stdout"|"stderr", line)`.
pub type OutputSink = Arc<dyn Fn(&str, String) + Send + Sync>;

/// Starts a function container and waits for its agent to load the module. Lines the
/// container prints outside the agent's capture (the interpreter's own errors, say) go to
/// `output` as `("stdout"|"stderr", line)`.
pub async fn start(
    spec: AgentSpec,
    cgroups: Arc<dyn Hierarchy>,
    output: OutputSink,
) -> Result<AgentContainer, StartError> {
    let run_dir = spec.sandbox.scratch.with_extension("agent");
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).map_err(StartError::Spawn)?;
    // Only the container's root may connect: the peer's uid is checked again on accept.
    let container_uid = spec
        .sandbox
        .user_namespace
        .as_ref()
        .map_or(0, |ns| ns.ids().host_base);
    let listener = bind_private(&run_dir.join("host.sock"), container_uid)
        .and_then(|listener| {
            std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o711))
                .map(|()| listener)
        })
        .map_err(StartError::Spawn)?;
    let api = if spec.api_socket {
        let listener =
            bind_private(&run_dir.join("api.sock"), container_uid).map_err(StartError::Spawn)?;
        Some(ApiListener {
            listener,
            uid: container_uid,
        })
    } else {
        None
    };

    let mut sandbox = spec.sandbox.clone();
    sandbox.argv = vec!["python3".into(), "-m".into(), "lode._agent".into()];
    sandbox.checkpointable = !matches!(spec.snapshot, SnapshotMode::Off);
    let mounts = Mounts::new(sandbox.checkpointable);
    if sandbox.checkpointable && !sandbox.lower.join("run").is_dir() {
        let _ = std::fs::remove_dir_all(&run_dir);
        return Err(StartError::Agent(
            "a memory snapshot needs /run in the image (the SDK and the socket go under it, \
             since the root is read-only)"
                .into(),
        ));
    }
    if matches!(spec.snapshot, SnapshotMode::Take { .. }) {
        crate::image_spec::set_env(&mut sandbox.env, "LODE_SNAPSHOT", "take");
    }
    let env = [
        ("LODE_SOCKET", format!("{}/host.sock", mounts.run)),
        ("LODE_APP_DIR", mounts.app.into()),
        ("LODE_MODULE", spec.module.clone()),
        ("LODE_APP", spec.app.clone()),
        ("LODE_CONCURRENCY", spec.concurrency.max(1).to_string()),
        ("LODE_CONTAINER_TOKEN", spec.token.clone()),
        ("PYTHONPATH", python_path(&mounts, &sandbox.env)),
        ("PYTHONUNBUFFERED", "1".into()),
        ("PYTHONDONTWRITEBYTECODE", "1".into()),
    ];
    for (name, value) in env {
        crate::image_spec::set_env(&mut sandbox.env, name, &value);
    }
    if spec.api_socket {
        let path = format!("{}/api.sock", mounts.run);
        crate::image_spec::set_env(&mut sandbox.env, "LODE_API_SOCKET", &path);
    }
    for (source, target) in [
        (&spec.sdk_dir, mounts.sdk),
        (&spec.app_dir, mounts.app),
        (&run_dir, mounts.run),
    ] {
        let volume = Volume::open(source, target, true).map_err(|e| {
            let _ = std::fs::remove_dir_all(&run_dir);
            StartError::Spawn(e)
        })?;
        sandbox.volumes.push(volume);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (exit_tx, exit_rx) = watch::channel(None);
    let begun = std::time::Instant::now();
    let spawned = {
        let cgroups = cgroups.clone();
        let sandbox = sandbox.clone();
        let restore = match &spec.snapshot {
            SnapshotMode::Restore { criu, images } => {
                write_resume(&run_dir, &spec.token).map_err(StartError::Spawn)?;
                let user_namespace = sandbox.user_namespace.clone().ok_or_else(|| {
                    StartError::Agent("a memory snapshot needs a user namespace".into())
                })?;
                let externals = [
                    ("sdk", &spec.sdk_dir),
                    ("app", &spec.app_dir),
                    ("run", &run_dir),
                ];
                let restore = RestoreSpec {
                    images: images.clone(),
                    lower: sandbox.lower.clone(),
                    scratch: sandbox.scratch.clone(),
                    user_namespace,
                    externals: externals
                        .into_iter()
                        .map(|(key, path)| (key.to_string(), path.clone()))
                        .collect(),
                    limits: sandbox.limits.clone(),
                    timeout: sandbox.timeout,
                };
                Some((criu.clone(), restore))
            }
            _ => None,
        };
        tokio::task::spawn_blocking(move || {
            let started = match restore {
                Some((criu, restore)) => {
                    criu.restore(&restore, cgroups.as_ref(), Stdio::null(), Stdio::piped())
                }
                None => spawn(&sandbox, cgroups.as_ref(), Stdio::null(), Stdio::piped()),
            };
            started.map(|mut s| {
                let streams = s.take_output();
                (s, streams)
            })
        })
        .await
        .map_err(|e| StartError::Agent(format!("the start task failed: {e}")))?
    };
    let spawn_took = begun.elapsed();
    let (sandbox_handle, (stdout, stderr)) = match spawned {
        Ok(started) => started,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&run_dir);
            return Err(StartError::Spawn(e));
        }
    };
    // What a snapshot saves: the container's own pid 1, never a pid a socket names.
    let init_pid = sandbox_handle.init_pid();
    for (name, pipe) in [
        (
            "stdout",
            stdout.map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ),
        (
            "stderr",
            stderr.map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ),
    ] {
        if let Some(pipe) = pipe {
            let output = output.clone();
            std::thread::spawn(move || {
                crate::sandbox::for_each_line(pipe, |line| {
                    output(name, String::from_utf8_lossy(line).into_owned());
                });
            });
        }
    }
    {
        let stop = stop.clone();
        let run_dir = run_dir.clone();
        std::thread::spawn(move || {
            let exit = match sandbox_handle.finish_unless(&stop) {
                Ok(finished) => Exit {
                    code: finished.code(),
                    killed_by: finished.killed_by(),
                },
                Err(e) => Exit {
                    code: -1,
                    killed_by: Some(format!("lost: {e}")),
                },
            };
            let _ = std::fs::remove_dir_all(&run_dir);
            let _ = exit_tx.send(Some(exit));
        });
    }
    let fail = |message: String| {
        stop.store(true, Ordering::Relaxed);
        StartError::Agent(message)
    };
    let accept = Accept {
        listener: &listener,
        container_uid,
        start_timeout: spec.start_timeout,
        exit: &exit_rx,
    };
    let (stream, network, pid) = accept.next().await.map_err(&fail)?;
    let (read_half, write_half) = stream.into_split();
    let mut reader = BufReader::new(read_half);
    let first = accept.first_message(&mut reader, &stop).await?;
    let (mut reader, mut write_half, functions, snapshot) = match (first, &spec.snapshot) {
        (FromAgent::Ready { functions }, SnapshotMode::Take { .. }) => {
            // An agent without snapshot support (an older SDK): no snapshot, served as is.
            let refused = "the agent does not take snapshots (an older SDK?)".to_string();
            (reader, write_half, functions, Some(Err(refused)))
        }
        (FromAgent::Ready { functions }, _) => (reader, write_half, functions, None),
        (FromAgent::SnapshotReady, SnapshotMode::Take { criu, images }) => {
            // Whatever it logs on the way out, then its hang-up.
            loop {
                match tokio::time::timeout(spec.start_timeout, read_message(&mut reader)).await {
                    Ok(Ok(Some(FromAgent::Log { stream, data, .. }))) => output(&stream, data),
                    Ok(Ok(None)) => break,
                    Ok(Ok(Some(other))) => {
                        return Err(fail(format!(
                            "the agent sent {other:?} before its snapshot"
                        )));
                    }
                    Ok(Err(e)) => return Err(fail(format!("reading the agent: {e}"))),
                    Err(_) => {
                        return Err(fail("the agent did not hang up for its snapshot".into()));
                    }
                }
            }
            drop((reader, write_half));
            let taken = match (pid, init_pid) {
                (Some(peer), Some(pid)) if peer == pid => {
                    let (criu, images) = (criu.clone(), images.clone());
                    let externals = [
                        (mounts.sdk, "sdk"),
                        (mounts.app, "app"),
                        (mounts.run, "run"),
                    ];
                    tokio::task::spawn_blocking(move || {
                        criu.dump(pid, &images, &externals, true)
                            .map_err(|e| e.to_string())
                    })
                    .await
                    .map_err(|e| fail(format!("the snapshot task failed: {e}")))?
                }
                _ => Err(
                    "the agent's connection does not come from the container's pid 1".to_string(),
                ),
            };
            if let Err(why) = &taken {
                tracing::warn!(error = %why, "memory snapshot failed; the container goes on without one");
            }
            write_resume(&run_dir, &spec.token)
                .map_err(|e| fail(format!("writing the container's resume file: {e}")))?;
            let (stream, _, _) = accept.next().await.map_err(&fail)?;
            let (read_half, write_half) = stream.into_split();
            let mut reader = BufReader::new(read_half);
            match accept.first_message(&mut reader, &stop).await? {
                FromAgent::Ready { functions } => (reader, write_half, functions, Some(taken)),
                other => return Err(fail(format!("the agent resumed with {other:?}"))),
            }
        }
        (other, _) => return Err(fail(format!("the agent began with {other:?}"))),
    };
    drop(listener);
    if matches!(spec.snapshot, SnapshotMode::Restore { .. }) {
        tracing::info!(
            restore = ?spawn_took,
            ready = ?begun.elapsed(),
            "function container restored from its memory snapshot"
        );
    }

    let (to_agent, mut outgoing) = mpsc::unbounded_channel::<ToAgent>();
    // Bounded: a container that writes faster than the host handles its messages waits on
    // its socket instead of growing the host's memory.
    let (incoming, from_agent) = mpsc::channel(MESSAGES_IN_FLIGHT);
    let stop_on_close = stop.clone();
    let exit_on_close = exit_rx.clone();
    tokio::spawn(async move {
        let misbehaved = loop {
            match read_message(&mut reader).await {
                Ok(Some(message)) => {
                    if incoming.send(message).await.is_err() {
                        break false;
                    }
                }
                Ok(None) => break false,
                Err(e) => {
                    tracing::warn!("function container sent a bad message ({e}); stopping it");
                    break true;
                }
            }
        };
        // The agent is gone: the container goes with it. One that is exiting by itself gets
        // a moment to, so its own exit code is what gets reported, not our kill.
        if !misbehaved {
            let _ = tokio::time::timeout(EXIT_GRACE, wait_exit(exit_on_close)).await;
        }
        stop_on_close.store(true, Ordering::Relaxed);
    });
    tokio::spawn(async move {
        while let Some(message) = outgoing.recv().await {
            let mut line = match serde_json::to_vec(&message) {
                Ok(line) => line,
                Err(_) => continue,
            };
            line.push(b'\n');
            if write_half.write_all(&line).await.is_err() {
                break;
            }
        }
    });
    Ok(AgentContainer {
        functions,
        to_agent,
        from_agent,
        api,
        network,
        snapshot,
        stop,
        exit: exit_rx,
    })
}

/// The network namespace at `path`, held open; `None` if it is the host's own.
fn own_network(path: &str) -> Option<std::os::fd::OwnedFd> {
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::File::open(path).ok()?;
    let host = std::fs::metadata("/proc/self/ns/net").ok()?;
    let inside = file.metadata().ok()?;
    (inside.ino() != host.ino() || inside.dev() != host.dev()).then(|| file.into())
}

/// Where the agent's Python imports from: the SDK, the app's module, `/root` (where
/// `add_local_python_source` puts modules, as on Modal), then what the image's own
/// `PYTHONPATH` names.
fn python_path(mounts: &Mounts, env: &[(String, String)]) -> String {
    let mut path = format!("{}:{}:/root", mounts.sdk, mounts.app);
    if let Some((_, image)) = env.iter().find(|(name, _)| name == "PYTHONPATH")
        && !image.is_empty()
    {
        path.push(':');
        path.push_str(image);
    }
    path
}

/// One JSON line, at most [`MAX_MESSAGE`] bytes; `None` at the end of the stream.
async fn read_message<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<Option<FromAgent>> {
    let mut line = Vec::new();
    let read = reader
        .take(MAX_MESSAGE as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    if read == 0 {
        return Ok(None);
    }
    if line.len() > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a message over {} MiB", MAX_MESSAGE >> 20),
        ));
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// A directory holding `module.py` with `source`, written once per content (by digest).
pub fn app_dir(
    root: &Path,
    digest_hex: &str,
    module: &str,
    source: &[u8],
) -> std::io::Result<PathBuf> {
    let dir = root.join(digest_hex);
    let file = dir.join(format!("{module}.py"));
    if file.exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir)?;
    let temp = dir.join(format!(".{module}.py.{}", std::process::id()));
    std::fs::write(&temp, source)?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&temp, &file)?;
    Ok(dir)
}

#[cfg(test)]
mod tests;
