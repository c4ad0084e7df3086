//! The native pool: warm function containers per Python function, scaled with demand.
//!
//! Each function gets a [`Pool`]. Inputs queue (boundedly: a full queue is a 429 with
//! `Retry-After`) and go to the first container with a free slot (`concurrency` inputs at a
//! time), so load packs onto the oldest containers and the newest ones go idle first. When
//! the queue outgrows the free slots and `max_containers` allows, containers start (cold
//! starts: the input waits in the queue, never dropped). Idle containers stop after
//! `scaledown_window`, down to `min_containers`, which are started at deploy and kept up.
//! A container that dies fails the inputs it held, or requeues them as `Retries` says.
//!
//! Here: the queue, scaling and container starts. `worker.rs`: a container's and an input's
//! state. `serve.rs`: a running container's messages, and how its inputs end.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use lode_native_runner::agent::{
    self, AgentSpec, ErrorInfo, FromAgent, Outcome, SnapshotMode, ToAgent,
};
use lode_native_runner::cgroup::Limits;
use lode_native_runner::redact::mask;
use lode_native_runner::sandbox::{Network, Volume};
use tokio::sync::{mpsc, oneshot};

use crate::function::{CallLimits, CallTree, Dispatch};
use crate::native::Native;
use crate::native::gpus::ContainerGpus;
use crate::native::grant::{ContainerApi, ContainerGrant};
use crate::proto::log::Stream;
use crate::proto::manifest::Retries;
use crate::proto::stats::PoolStats;
use crate::telemetry::logs::LogStore;
use crate::telemetry::metrics::FunctionLabels;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

mod serve;
mod worker;

pub use worker::WebExchange;
use worker::{Job, Worker};

type ExitWatch = tokio::sync::watch::Receiver<Option<agent::Exit>>;

/// What every pool of a server shares.
pub struct PoolContext {
    /// Images, mounts, sandboxes.
    pub native: Arc<Native>,
    /// The SDK directory mounted into every function container.
    pub sdk_dir: PathBuf,
    /// Where function output goes.
    pub logs: Arc<LogStore>,
    /// Inputs a pool holds waiting before it answers 429.
    pub max_queue: usize,
    /// How long a container may take to load its module.
    pub start_timeout: Duration,
    /// Every pool started, live or draining, so a stopping server can stop them all.
    pub started: Mutex<Vec<Weak<Pool>>>,
    /// The API each container gets on its `api.sock`, once the server has set it.
    pub container_api: std::sync::OnceLock<Arc<dyn ContainerApi>>,
    /// The host's GPUs, handed to containers of functions that ask for them.
    pub gpus: Arc<crate::function::gpus::GpuAllocator>,
    /// Memory snapshots of functions that enable them.
    pub snapshots: Arc<crate::native::snapshots::Snapshots>,
}

impl PoolContext {
    /// The pools that still exist.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        let mut started = self.started.lock().unwrap();
        started.retain(|pool| pool.strong_count() > 0);
        started.iter().filter_map(Weak::upgrade).collect()
    }
}

/// One function's settings, fixed for the deployed version.
#[derive(Clone)]
pub struct PoolSpec {
    /// The app.
    pub app: Arc<str>,
    /// The function.
    pub function: String,
    /// The image's lazy mount (kept mounted while the pool lives).
    pub mount: Arc<lode_fs::Mount>,
    /// The user's module and where its file is.
    pub module: String,
    /// Host directory holding the module file.
    pub app_dir: PathBuf,
    /// Inputs one container serves at once.
    pub concurrency: u32,
    /// Containers kept up.
    pub min_containers: u32,
    /// Most containers.
    pub max_containers: u32,
    /// Idle time before a container stops.
    pub scaledown_window: Duration,
    /// Wall-clock limit per input.
    pub timeout: Duration,
    /// cgroup limits per container.
    pub limits: Limits,
    /// Retries after a container died under an input.
    pub retries: Option<Retries>,
    /// The container's environment: the image's, then secrets.
    pub env: Vec<(String, String)>,
    /// Secret values, masked in the function's logs.
    pub secret_values: Vec<String>,
    /// Volumes.
    pub volumes: Vec<Volume>,
    /// Network.
    pub network: Network,
    /// Working directory.
    pub workdir: String,
    /// The app's bounds on the calls its code makes.
    pub call_limits: CallLimits,
    /// The function's call series in `/metrics`.
    pub series: crate::telemetry::metrics::FunctionSeries,
    /// Cold starts in `/metrics`, by function; this pool's series is made at its first.
    pub cold_starts: Family<FunctionLabels, Counter>,
    /// The router, for calls made from inside its containers.
    pub dispatch: Weak<dyn Dispatch>,
    /// What its containers may ask of the API (sandboxes, builds).
    pub grant: Arc<ContainerGrant>,
    /// The GPUs each container gets (`any`, `H100`, `H100:2`), if any.
    pub gpu: Option<String>,
    /// GPUs its containers hold now, in `/metrics` and `lode stats` (shared by the
    /// function's versions while an older one drains).
    pub gpus_held: prometheus_client::metrics::gauge::Gauge,
    /// Start containers from a memory snapshot, taking one at the first start.
    pub memory_snapshot: bool,
}

/// Why an input was not taken.
#[derive(Debug)]
pub enum Rejected {
    /// The queue is full; try again after this long.
    QueueFull(Duration),
    /// The pool was replaced by a newer deploy or removed.
    Closed,
}

#[derive(Default)]
struct PoolState {
    workers: Vec<Arc<Worker>>,
    starting: u32,
    queue: VecDeque<Job>,
    /// Starts that failed in a row, and when the last one did: further starts back off.
    failed_starts: u32,
    last_failure: Option<Instant>,
    /// Why the last start failed, for inputs that arrive while starts back off.
    last_error: Option<ErrorInfo>,
}

impl PoolState {
    fn live_containers(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| w.alive.load(Ordering::Relaxed))
            .count()
    }
}

impl PoolState {
    /// Whether a start may be tried now: after failures, wait 0.5 s doubling up to 30 s.
    fn may_start(&self) -> bool {
        match self.last_failure {
            Some(at) if self.failed_starts > 0 => {
                let backoff = Duration::from_millis(500)
                    .saturating_mul(1 << self.failed_starts.min(6))
                    .min(Duration::from_secs(30));
                at.elapsed() >= backoff
            }
            _ => true,
        }
    }
}

/// The containers of one deployed function.
pub struct Pool {
    spec: PoolSpec,
    ctx: Arc<PoolContext>,
    state: Mutex<PoolState>,
    closed: AtomicBool,
    next_input: AtomicU64,
    cold_starts: AtomicU64,
    inputs: AtomicU64,
    failures: AtomicU64,
    retried: AtomicU64,
}

impl Pool {
    /// A pool for `spec`; `min_containers` start now, and a task scales it down.
    pub fn start(spec: PoolSpec, ctx: Arc<PoolContext>) -> Arc<Self> {
        let pool = Arc::new(Self {
            spec,
            ctx,
            state: Mutex::new(PoolState::default()),
            closed: AtomicBool::new(false),
            next_input: AtomicU64::new(1),
            cold_starts: AtomicU64::new(0),
            inputs: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            retried: AtomicU64::new(0),
        });
        pool.ctx.started.lock().unwrap().push(Arc::downgrade(&pool));
        let tick = (pool.spec.scaledown_window / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            loop {
                let Some(pool) = weak.upgrade() else { break };
                if pool.closed.load(Ordering::Relaxed)
                    && pool.state.lock().unwrap().workers.is_empty()
                {
                    break;
                }
                pool.scale();
                // Inputs queued while starts backed off get a start once they may.
                if !pool.state.lock().unwrap().queue.is_empty() {
                    pool.pump();
                }
                drop(pool);
                tokio::time::sleep(tick).await;
            }
        });
        pool
    }

    /// Runs one input; waits in the queue for a container when all are busy.
    pub async fn submit(
        self: &Arc<Self>,
        payload: serde_json::Map<String, serde_json::Value>,
        tree: Option<CallTree>,
    ) -> Result<Outcome, Rejected> {
        self.submit_job(payload, tree, None, 0).await
    }

    /// [`Pool::submit`] for an input `attempts` runs of which were spent elsewhere: they
    /// count against the function's `Retries`.
    pub async fn submit_retry(
        self: &Arc<Self>,
        payload: serde_json::Map<String, serde_json::Value>,
        tree: Option<CallTree>,
        attempts: u32,
    ) -> Result<Outcome, Rejected> {
        self.submit_job(payload, tree, None, attempts).await
    }

    /// The wall-clock limit of one input.
    pub fn timeout(&self) -> Duration {
        self.spec.timeout
    }

    /// How the function's inputs are retried.
    pub fn retries(&self) -> Option<Retries> {
        self.spec.retries
    }

    /// Runs one web input (the payload holds `http` or `websocket`): the agent's messages
    /// for it go to `web` as they come; the outcome says how it ended.
    pub async fn submit_web(
        self: &Arc<Self>,
        payload: serde_json::Map<String, serde_json::Value>,
        web: WebExchange,
    ) -> Result<Outcome, Rejected> {
        self.submit_job(payload, None, Some(web), 0).await
    }

    /// Runs one generator input (`"stream": true`) at its place in a call tree: the values
    /// it yields go to `values` as they come.
    pub async fn submit_stream(
        self: &Arc<Self>,
        payload: serde_json::Map<String, serde_json::Value>,
        tree: Option<CallTree>,
        values: WebExchange,
    ) -> Result<Outcome, Rejected> {
        self.submit_job(payload, tree, Some(values), 0).await
    }

    async fn submit_job(
        self: &Arc<Self>,
        payload: serde_json::Map<String, serde_json::Value>,
        tree: Option<CallTree>,
        web: Option<WebExchange>,
        attempts: u32,
    ) -> Result<Outcome, Rejected> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(Rejected::Closed);
        }
        let (reply, answer) = oneshot::channel();
        {
            let mut state = self.state.lock().unwrap();
            if state.queue.len() >= self.ctx.max_queue {
                // Roughly when a slot frees up: a second, or the window a cold start takes.
                return Err(Rejected::QueueFull(Duration::from_secs(1)));
            }
            let tree = CallTree::enter(tree, self.spec.call_limits);
            let mut job = Job::new(payload, tree, reply);
            job.web = web;
            job.attempt = attempts;
            state.queue.push_back(job);
        }
        self.pump();
        Ok(answer.await.unwrap_or_else(|_| {
            Outcome::failed(ErrorInfo::lode(
                "internal",
                "the input was lost by the pool",
            ))
        }))
    }

    /// Hands queued inputs to containers with free slots, and starts containers for the rest.
    fn pump(self: &Arc<Self>) {
        let concurrency = self.spec.concurrency.max(1) as usize;
        let mut to_start = 0;
        {
            let mut state = self.state.lock().unwrap();
            while !state.queue.is_empty() {
                let Some(worker) = state
                    .workers
                    .iter()
                    .find(|w| w.alive.load(Ordering::Relaxed) && w.load() < concurrency)
                    .cloned()
                else {
                    break;
                };
                let job = state.queue.pop_front().expect("not empty");
                // Its caller went away (a cancelled spawn, a closed connection, a web client
                // that hung up while its request waited): drop it unrun.
                let client_gone = job
                    .web
                    .as_ref()
                    .and_then(|web| web.assigned.as_ref())
                    .is_some_and(|assigned| assigned.is_closed());
                if job.reply.is_closed() || client_gone {
                    let _ = job.reply.send(Outcome::failed(ErrorInfo::lode(
                        "client_gone",
                        "the client went away before a container took the request",
                    )));
                    continue;
                }
                self.dispatch(&worker, job);
            }
            // While starts back off and nothing runs or starts, queued inputs fail at once
            // with the reason, rather than wait for a start that is likely to fail again.
            if !state.queue.is_empty()
                && !state.may_start()
                && state.starting == 0
                && !state
                    .workers
                    .iter()
                    .any(|w| w.alive.load(Ordering::Relaxed))
                && let Some(error) = state.last_error.clone()
            {
                for job in state.queue.drain(..) {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    let _ = job.reply.send(Outcome::failed(error.clone()));
                }
            }
            // A closed pool takes no new inputs but still serves what it queued.
            if state.may_start() {
                let needed = state.queue.len().div_ceil(concurrency) as u32;
                let room = self
                    .spec
                    .max_containers
                    .saturating_sub(state.workers.len() as u32 + state.starting);
                to_start = needed.saturating_sub(state.starting).min(room);
                state.starting += to_start;
            }
        }
        for _ in 0..to_start {
            tokio::spawn(self.clone().start_worker());
        }
    }

    fn dispatch(self: &Arc<Self>, worker: &Arc<Worker>, mut job: Job) {
        let id = format!(
            "{}-{}",
            self.spec.function,
            self.next_input.fetch_add(1, Ordering::Relaxed)
        );
        let message = ToAgent::Input {
            id: id.clone(),
            function: self.spec.function.clone(),
            payload: job.payload.clone(),
        };
        let assigned = job.web.as_mut().and_then(|web| web.assigned.take());
        *worker.idle_since.lock().unwrap() = None;
        worker.in_flight.lock().unwrap().insert(id.clone(), job);
        if worker.to_agent.send(message).is_err() {
            // The connection is gone; the worker's task requeues or fails what it held.
            worker.retire();
            return;
        }
        // After the input itself, so the agent has it before any of its request body.
        if let Some(assigned) = assigned {
            let _ = assigned.send((id.clone(), worker.to_agent.clone()));
        }
        let timeout = self.spec.timeout;
        let weak_worker = Arc::downgrade(worker);
        let pool = Arc::downgrade(self);
        let timer_id = id.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let (Some(worker), Some(pool)) = (weak_worker.upgrade(), pool.upgrade()) else {
                return;
            };
            let job = worker.in_flight.lock().unwrap().remove(&id);
            if let Some(mut job) = job {
                job.timer = None;
                // A thread cannot be stopped inside Python: the container goes, and its
                // other inputs are retried or failed as `Retries` says.
                worker.retire();
                pool.failures.fetch_add(1, Ordering::Relaxed);
                pool.log(
                    Some(&id),
                    Stream::System,
                    format!("input timed out after {timeout:?}; stopping its container"),
                );
                let _ = job.reply.send(Outcome::failed(ErrorInfo {
                    kind: "TimeoutError".into(),
                    module: Some("builtins".into()),
                    message: format!(
                        "{}/{} timed out after {timeout:?}",
                        pool.spec.app, pool.spec.function
                    ),
                    traceback: None,
                }));
            }
        });
        if let Some(job) = worker.in_flight.lock().unwrap().get_mut(&timer_id) {
            job.timer = Some(timer.abort_handle());
        } else {
            timer.abort();
        }
    }

    async fn start_worker(self: Arc<Self>) {
        self.cold_starts.fetch_add(1, Ordering::Relaxed);
        let labels = FunctionLabels {
            app: self.spec.app.to_string(),
            function: self.spec.function.clone(),
            engine: "python",
        };
        self.spec.cold_starts.get_or_create(&labels).inc();
        let started = Instant::now();
        match self.start_container().await {
            Ok((worker, from_agent, exit)) => {
                self.log(
                    None,
                    Stream::System,
                    format!(
                        "{}: container started in {} ms",
                        self.spec.function,
                        started.elapsed().as_millis()
                    ),
                );
                {
                    let mut state = self.state.lock().unwrap();
                    state.starting -= 1;
                    state.failed_starts = 0;
                    state.last_error = None;
                    if self.closed.load(Ordering::Relaxed) && state.queue.is_empty() {
                        worker.retire();
                    } else {
                        state.workers.push(worker.clone());
                    }
                }
                tokio::spawn(self.clone().serve(worker, from_agent, exit));
                self.pump();
            }
            Err(error) => {
                self.log(
                    None,
                    Stream::System,
                    format!(
                        "{}: container failed to start: {}",
                        self.spec.function,
                        mask(&error.message, &self.spec.secret_values)
                    ),
                );
                let failed: Vec<Job> = {
                    let mut state = self.state.lock().unwrap();
                    state.starting -= 1;
                    state.failed_starts += 1;
                    state.last_failure = Some(Instant::now());
                    state.last_error = Some(error.clone());
                    // Nothing else will serve the queue: it fails with the reason, rather
                    // than wait for a start that keeps failing.
                    if state.workers.is_empty() && state.starting == 0 {
                        state.queue.drain(..).collect()
                    } else {
                        Vec::new()
                    }
                };
                for job in failed {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    let _ = job.reply.send(Outcome::failed(error.clone()));
                }
            }
        }
    }

    async fn start_container(
        &self,
    ) -> Result<(Arc<Worker>, mpsc::Receiver<FromAgent>, ExitWatch), ErrorInfo> {
        let spec = &self.spec;
        let cgroups = self
            .ctx
            .native
            .hierarchy()
            .map_err(|e| ErrorInfo::lode("no_containers", e))?;
        let mut sandbox = self
            .ctx
            .native
            .function_sandbox(&spec.mount)
            .map_err(|why| ErrorInfo::lode("no_user_namespace", why))?;
        sandbox.env = spec.env.clone();
        sandbox.cwd = spec.workdir.clone();
        sandbox.limits = spec.limits.clone();
        sandbox.volumes = spec.volumes.clone();
        sandbox.network = spec.network.clone();
        sandbox.hostname = spec.function.replace('_', "-").to_lowercase();
        sandbox.max_open_files = 65536;
        // A GPU function's container waits here, its input still queued, until its devices
        // are free; it keeps them until it stops.
        let lease = match &spec.gpu {
            Some(request) => {
                let lease = self
                    .ctx
                    .gpus
                    .acquire(request)
                    .await
                    .map_err(|why| ErrorInfo::lode("no_gpu", why))?;
                sandbox.limits.devices = lease
                    .devices()
                    .map_err(|why| ErrorInfo::lode("no_gpu", why))?;
                for (name, value) in lease.env() {
                    lode_native_runner::image_spec::set_env(&mut sandbox.env, &name, &value);
                }
                sandbox.volumes.extend(lease.volumes());
                Some(lease)
            }
            None => None,
        };
        let token = format!("{:032x}", rand::random::<u128>());
        let logs = self.ctx.logs.clone();
        let app = spec.app.clone();
        let secrets = spec.secret_values.clone();
        let output: agent::OutputSink = Arc::new(move |stream: &str, line: String| {
            let stream = if stream == "stdout" {
                Stream::Stdout
            } else {
                Stream::Stderr
            };
            logs.push(&app, None, stream, mask(&line, &secrets));
        });
        let snapshots = &self.ctx.snapshots;
        let snapshot_key = spec.memory_snapshot.then(|| {
            snapshots.key(&crate::native::snapshots::KeyParts {
                app: &spec.app,
                function: &spec.function,
                module: &spec.module,
                image: spec.mount.index_digest(),
                app_dir: &spec.app_dir,
                sdk_dir: &self.ctx.sdk_dir,
                env: &spec.env,
                concurrency: spec.concurrency,
            })
        });
        let mut snapshot = match &snapshot_key {
            Some(key) => snapshots.mode(key).await.unwrap_or_else(|why| {
                tracing::warn!(function = %spec.function, %why, "starting without a memory snapshot");
                SnapshotMode::Off
            }),
            None => SnapshotMode::Off,
        };
        let mut attempt = 0;
        let mut container = loop {
            let mut sandbox = sandbox.clone();
            if attempt > 0 {
                // A failed attempt is torn down in the background: nothing of the next one
                // (scratch, run dir, cgroups) may share its names.
                let name = sandbox
                    .scratch
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy();
                let fresh = format!("{name}-{attempt}");
                sandbox.scratch.set_file_name(fresh);
            }
            attempt += 1;
            let agent_spec = AgentSpec {
                sandbox,
                sdk_dir: self.ctx.sdk_dir.clone(),
                app_dir: spec.app_dir.clone(),
                module: spec.module.clone(),
                app: spec.app.to_string(),
                concurrency: spec.concurrency,
                token: token.clone(),
                start_timeout: self.ctx.start_timeout,
                api_socket: self.ctx.container_api.get().is_some(),
                snapshot: snapshot.clone(),
            };
            match agent::start(agent_spec, cgroups.clone(), output.clone()).await {
                Ok(mut container) => {
                    if let Some(key) = &snapshot_key {
                        let owner = format!("{}/{}", spec.app, spec.function);
                        snapshots.started(key, &owner, &snapshot, container.snapshot.take());
                    }
                    break container;
                }
                Err(agent::StartError::Fatal(error)) => return Err(error),
                // A snapshot CRIU cannot restore is dropped, and this start takes one.
                Err(agent::StartError::Spawn(e))
                    if matches!(snapshot, SnapshotMode::Restore { .. }) =>
                {
                    let key = snapshot_key.as_deref().unwrap_or_default();
                    snapshots.failed_restore(key, &e.to_string());
                    snapshot = snapshots.mode(key).await.unwrap_or(SnapshotMode::Off);
                }
                // A restored container that failed later (its agent, say): the snapshot
                // stays, and this start goes without it.
                Err(e) if matches!(snapshot, SnapshotMode::Restore { .. }) => {
                    tracing::warn!(function = %spec.function, error = %e, "a restored container did not start; starting without its snapshot");
                    snapshot = SnapshotMode::Off;
                }
                // A container that cannot be made checkpointable starts as usual.
                Err(e) if matches!(snapshot, SnapshotMode::Take { .. }) => {
                    snapshots.failed_take(&spec.function, &snapshot, &e.to_string());
                    snapshot = SnapshotMode::Off;
                }
                Err(other) => {
                    return Err(ErrorInfo::lode("container_failed", other.to_string()));
                }
            }
        };
        let exit_watch = container.exit_watch();
        let exited = || {
            let exit = exit_watch.clone();
            async move {
                agent::wait_exit(exit).await;
            }
        };
        if let Some(lease) = lease {
            // Counted once the container runs (a start that failed gave its lease back).
            let exited = exited();
            let held = self.spec.gpus_held.clone();
            held.inc_by(lease.count() as i64);
            tokio::spawn(async move {
                exited.await;
                held.dec_by(lease.count() as i64);
                drop(lease);
            });
        }
        if let Some(network) = container.network.take() {
            let mirrored = self.ctx.native.tunnel_mirror().add_container(network);
            let exited = exited();
            tokio::spawn(async move {
                exited.await;
                drop(mirrored);
            });
        }
        if let (Some(listener), Some(api)) = (container.api.take(), self.ctx.container_api.get()) {
            api.serve(listener, spec.grant.clone(), Box::pin(exited()));
        }
        if !container.functions.iter().any(|f| f == &spec.function) {
            container.stop();
            return Err(ErrorInfo::lode(
                "not_found",
                format!(
                    "module {} has no function {:?} (it has: {}); redeploy the app",
                    spec.module,
                    spec.function,
                    container.functions.join(", ")
                ),
            ));
        }
        let worker = Arc::new(Worker::new(
            container.to_agent.clone(),
            container.stopper(),
            token,
        ));
        let exit = container.exit_watch();
        Ok((worker, container.from_agent, exit))
    }

    /// Stops containers idle past the window (down to the minimum) and starts the minimum.
    fn scale(self: &Arc<Self>) {
        let closed = self.closed.load(Ordering::Relaxed);
        let (min, window) = if closed {
            (0, Duration::ZERO)
        } else {
            (self.spec.min_containers, self.spec.scaledown_window)
        };
        let mut to_start = 0;
        {
            let mut state = self.state.lock().unwrap();
            // Containers stopping already do not count.
            let alive = |w: &&Arc<Worker>| w.alive.load(Ordering::Relaxed);
            let mut live = state.workers.iter().filter(alive).count();
            // Newest first: the pump packs load onto the oldest.
            for worker in state.workers.iter().rev() {
                if live <= min as usize || !state.queue.is_empty() {
                    break;
                }
                let idle = worker
                    .idle_since
                    .lock()
                    .unwrap()
                    .is_some_and(|since| since.elapsed() >= window);
                if idle && worker.load() == 0 && worker.alive.load(Ordering::Relaxed) {
                    worker.drain();
                    live -= 1;
                }
            }
            if !closed && state.may_start() {
                let have = state.workers.iter().filter(alive).count() as u32 + state.starting;
                to_start = self.spec.min_containers.saturating_sub(have);
                state.starting += to_start;
            }
        }
        for _ in 0..to_start {
            tokio::spawn(self.clone().start_worker());
        }
    }

    /// Takes no more inputs; containers stop once they have finished what they hold.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    /// For a server that is stopping: closes the pool, stops every container now (inputs in
    /// flight fail), and waits up to `limit` for them to be cleaned up (cgroups, scratch).
    pub async fn shut_down(&self, limit: Duration) {
        self.close();
        let deadline = Instant::now() + limit;
        loop {
            let drained = {
                let state = self.state.lock().unwrap();
                for worker in &state.workers {
                    worker.retire();
                }
                state.workers.is_empty() && state.starting == 0
            };
            if drained || Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The function's call series in `/metrics`.
    pub fn series(&self) -> &crate::telemetry::metrics::FunctionSeries {
        &self.spec.series
    }

    /// `app/function`, as the hosts' records name a warm function.
    pub fn target(&self) -> String {
        format!("{}/{}", self.spec.app, self.spec.function)
    }

    /// Whether the pool was closed (a newer version replaced it, or the app went).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Containers serving now: a cheap [`Pool::stats`]`.containers`, for routing.
    pub fn containers(&self) -> usize {
        self.state.lock().unwrap().live_containers()
    }

    /// Figures for `lode stats`.
    pub fn stats(&self) -> PoolStats {
        let state = self.state.lock().unwrap();
        PoolStats {
            function: self.spec.function.clone(),
            containers: state.live_containers(),
            starting: state.starting,
            running: state.workers.iter().map(|w| w.load()).sum(),
            queued: state.queue.len(),
            cold_starts: self.cold_starts.load(Ordering::Relaxed),
            inputs: self.inputs.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            retries: self.retried.load(Ordering::Relaxed),
            min_containers: self.spec.min_containers,
            max_containers: self.spec.max_containers,
            gpus: usize::try_from(self.spec.gpus_held.get()).unwrap_or(0),
        }
    }

    fn log(&self, input: Option<&str>, stream: Stream, line: String) {
        self.ctx.logs.push(&self.spec.app, input, stream, line);
    }
}
