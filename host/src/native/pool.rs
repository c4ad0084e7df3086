//! The native pool: warm function containers per Python function, scaled with demand.
//!
//! Each function gets a [`Pool`]. Inputs queue (boundedly: a full queue is a 429 with
//! `Retry-After`) and go to the first container with a free slot (`concurrency` inputs at a
//! time), so load packs onto the oldest containers and the newest ones go idle first. When
//! the queue outgrows the free slots and `max_containers` allows, containers start (cold
//! starts: the input waits in the queue, never dropped). Idle containers stop after
//! `scaledown_window`, down to `min_containers`, which are started at deploy and kept up.
//! A container that dies fails the inputs it held, or requeues them as `Retries` says.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use lode_native_runner::agent::{self, AgentSpec, ErrorInfo, FromAgent, Outcome, ToAgent};
use lode_native_runner::cgroup::Limits;
use lode_native_runner::sandbox::{Network, Volume};
use tokio::sync::{mpsc, oneshot};

use crate::function::{CallLimits, CallTree, Dispatch, container_call};
use crate::native::Native;
use crate::proto::log::Stream;
use crate::proto::manifest::Retries;
use crate::proto::stats::PoolStats;
use crate::telemetry::logs::LogStore;
use crate::telemetry::metrics::FunctionLabels;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

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
}

/// Why an input was not taken.
#[derive(Debug)]
pub enum Rejected {
    /// The queue is full; try again after this long.
    QueueFull(Duration),
    /// The pool was replaced by a newer deploy or removed.
    Closed,
}

/// Where a web input's response goes: the agent's messages for it, and, once a container
/// takes it, its input id and that container's channel (for the request body and WebSocket
/// messages from the client).
pub struct WebExchange {
    /// The agent's HTTP and WebSocket messages for the input.
    pub events: mpsc::UnboundedSender<FromAgent>,
    /// Told the input's id and the container's channel when a container takes it.
    pub assigned: Option<oneshot::Sender<(String, mpsc::UnboundedSender<ToAgent>)>>,
}

struct Job {
    payload: serde_json::Map<String, serde_json::Value>,
    /// Set for a web input (ASGI, WSGI, a web server): its exchange, never retried.
    web: Option<WebExchange>,
    /// Where the input sits in its call tree; calls its code makes join the tree there.
    tree: CallTree,
    /// Retries used so far.
    attempt: u32,
    reply: oneshot::Sender<Outcome>,
    /// The running input's timeout, stopped when it finishes first.
    timer: Option<tokio::task::AbortHandle>,
}

impl Job {
    fn new(
        payload: serde_json::Map<String, serde_json::Value>,
        tree: CallTree,
        reply: oneshot::Sender<Outcome>,
    ) -> Self {
        Self {
            payload,
            web: None,
            tree,
            attempt: 0,
            reply,
            timer: None,
        }
    }

    /// Takes the job off its container: its timeout no longer applies.
    fn off_container(mut self) -> Self {
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
        self
    }
}

/// Calls one container may have in flight to other functions at once.
const MAX_CALLS_PER_CONTAINER: usize = 64;

struct Worker {
    to_agent: mpsc::UnboundedSender<ToAgent>,
    stop: Arc<AtomicBool>,
    token: String,
    in_flight: Mutex<HashMap<String, Job>>,
    /// Since when it has had nothing to do (`None` while busy).
    idle_since: Mutex<Option<Instant>>,
    /// False once it is stopping or dead: nothing more is sent to it.
    alive: AtomicBool,
    /// Bounds the calls it makes to other functions at once.
    calls: Arc<tokio::sync::Semaphore>,
}

impl Worker {
    fn load(&self) -> usize {
        self.in_flight.lock().unwrap().len()
    }

    fn retire(&self) {
        self.alive.store(false, Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops an idle container gently: its agent runs the exit hooks (`@lode.exit()`) and
    /// exits; after [`EXIT_HOOK_GRACE`] it is killed whatever it is doing.
    fn drain(&self) {
        if !self.alive.swap(false, Ordering::Relaxed) {
            return;
        }
        if self.to_agent.send(ToAgent::Shutdown {}).is_err() {
            self.stop.store(true, Ordering::Relaxed);
            return;
        }
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(EXIT_HOOK_GRACE).await;
            stop.store(true, Ordering::Relaxed);
        });
    }
}

/// A generator call from code in a container: each value goes back as it comes (a
/// `call_result` with `more`); returns how it ended.
async fn stream_generator(
    dispatch: &dyn Dispatch,
    caller_app: &str,
    request: lode_native_runner::agent::CallRequest,
    tree: Option<CallTree>,
    call_id: &str,
    reply: &mpsc::UnboundedSender<ToAgent>,
) -> Outcome {
    let body = crate::function::call_body(&request);
    let app = request.app.as_deref().unwrap_or(caller_app);
    let Some(function) = request.function.as_deref() else {
        return Outcome::failed(ErrorInfo::lode("invalid_request", "no function named"));
    };
    let mut generated = match dispatch.call_gen(app, function, &body, tree, Some(caller_app)) {
        Ok(generated) => generated,
        Err(e) => return Outcome::failed(e.error),
    };
    while let Some(message) = generated.values.recv().await {
        if let FromAgent::Yield {
            result,
            result_pickled,
            ..
        } = message
        {
            // Pickled values only from a function deployed for pickle, as results.
            if result_pickled.is_some() && !generated.pickle {
                continue;
            }
            let value = Outcome {
                result,
                result_pickled,
                error: None,
            };
            let _ = reply.send(ToAgent::CallResult {
                call_id: call_id.to_string(),
                outcome: value,
                more: true,
            });
        }
    }
    match generated.outcome.await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => Outcome::failed(e.error),
        Err(_) => Outcome::failed(ErrorInfo::lode("internal", "the generator task failed")),
    }
}

/// How long a scaled-down container's exit hooks may run before it is killed.
const EXIT_HOOK_GRACE: Duration = Duration::from_secs(10);

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
        self.submit_job(payload, tree, None).await
    }

    /// Runs one web input (the payload holds `http` or `websocket`): the agent's messages
    /// for it go to `web` as they come; the outcome says how it ended.
    pub async fn submit_web(
        self: &Arc<Self>,
        payload: serde_json::Map<String, serde_json::Value>,
        web: WebExchange,
    ) -> Result<Outcome, Rejected> {
        self.submit_job(payload, None, Some(web)).await
    }

    /// Runs one generator input (`"stream": true`) at its place in a call tree: the values
    /// it yields go to `values` as they come.
    pub async fn submit_stream(
        self: &Arc<Self>,
        payload: serde_json::Map<String, serde_json::Value>,
        tree: Option<CallTree>,
        values: WebExchange,
    ) -> Result<Outcome, Rejected> {
        self.submit_job(payload, tree, Some(values)).await
    }

    async fn submit_job(
        self: &Arc<Self>,
        payload: serde_json::Map<String, serde_json::Value>,
        tree: Option<CallTree>,
        web: Option<WebExchange>,
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
                // Its caller went away (a cancelled spawn, a closed connection): drop it.
                if job.reply.is_closed() {
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
        let token = format!("{:032x}", rand::random::<u128>());
        let agent_spec = AgentSpec {
            sandbox,
            sdk_dir: self.ctx.sdk_dir.clone(),
            app_dir: spec.app_dir.clone(),
            module: spec.module.clone(),
            app: spec.app.to_string(),
            concurrency: spec.concurrency,
            token: token.clone(),
            start_timeout: self.ctx.start_timeout,
        };
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
        let container = agent::start(agent_spec, cgroups, output)
            .await
            .map_err(|e| match e {
                agent::StartError::Fatal(error) => error,
                other => ErrorInfo::lode("container_failed", other.to_string()),
            })?;
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
        let worker = Arc::new(Worker {
            to_agent: container.to_agent.clone(),
            stop: container.stopper(),
            token,
            in_flight: Mutex::new(HashMap::new()),
            idle_since: Mutex::new(Some(Instant::now())),
            alive: AtomicBool::new(true),
            calls: Arc::new(tokio::sync::Semaphore::new(MAX_CALLS_PER_CONTAINER)),
        });
        let exit = container.exit_watch();
        Ok((worker, container.from_agent, exit))
    }

    /// Queues `job` again after its `Retries` delay, saying why in the input's log.
    fn retry(self: &Arc<Self>, id: &str, mut job: Job, why: &str) {
        let max_retries = self.spec.retries.map_or(0, |r| r.max_retries);
        job.attempt += 1;
        self.retried.fetch_add(1, Ordering::Relaxed);
        let delay = self
            .spec
            .retries
            .map_or(Duration::ZERO, |r| r.delay(job.attempt));
        self.log(
            Some(id),
            Stream::System,
            format!(
                "retrying input (attempt {} of {}) in {delay:?}: {why}",
                job.attempt + 1,
                max_retries + 1,
            ),
        );
        let pool = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            pool.state.lock().unwrap().queue.push_front(job);
            pool.pump();
        });
    }

    /// An input ended with `outcome`: its caller gets it, and its slot takes the next. An
    /// exception the code raised is retried as `Retries` says, as on Modal; Lode's own
    /// refusals (no such function, a bad body) are not.
    fn finish_input(self: &Arc<Self>, worker: &Arc<Worker>, id: &str, mut outcome: Outcome) {
        let job = worker.in_flight.lock().unwrap().remove(id);
        if let Some(job) = job {
            let job = job.off_container();
            let max_retries = self.spec.retries.map_or(0, |r| r.max_retries);
            // An error of the user's code has its module; the agent's own refusals say "lode".
            if let Some(error) = &outcome.error
                && error.module.as_deref().is_some_and(|m| m != "lode")
                && job.web.is_none()
                && job.attempt < max_retries
            {
                let why = format!(
                    "{}: {}",
                    error.kind,
                    mask(&error.message, &self.spec.secret_values)
                );
                self.retry(id, job, &why);
                self.after_input(worker);
                return;
            }
            self.inputs.fetch_add(1, Ordering::Relaxed);
            if let Some(error) = &mut outcome.error {
                self.failures.fetch_add(1, Ordering::Relaxed);
                // Whatever the code put in its exception, secrets stay masked.
                error.message = mask(&error.message, &self.spec.secret_values);
                error.traceback = error
                    .traceback
                    .as_deref()
                    .map(|t| mask(t, &self.spec.secret_values));
            }
            let _ = job.reply.send(outcome);
        }
        self.after_input(worker);
    }

    /// A slot of `worker` came free: it idles, retires (a closed pool), or takes the next.
    fn after_input(self: &Arc<Self>, worker: &Arc<Worker>) {
        if worker.load() == 0 {
            *worker.idle_since.lock().unwrap() = Some(Instant::now());
            if self.closed.load(Ordering::Relaxed) {
                // Decided under the pool's lock, so the pump cannot hand it an input in
                // between.
                let state = self.state.lock().unwrap();
                if state.queue.is_empty() && worker.load() == 0 {
                    // Gently: its exit hooks run.
                    worker.drain();
                }
            }
        }
        self.pump();
    }

    /// Handles one container's messages until it ends, then deals with what it held.
    async fn serve(
        self: Arc<Self>,
        worker: Arc<Worker>,
        mut from_agent: mpsc::Receiver<FromAgent>,
        exit: ExitWatch,
    ) {
        while let Some(message) = from_agent.recv().await {
            match message {
                FromAgent::Output { id, outcome } => self.finish_input(&worker, &id, outcome),
                message @ (FromAgent::Yield { .. }
                | FromAgent::HttpStart { .. }
                | FromAgent::HttpBody { .. }
                | FromAgent::WsAccept { .. }
                | FromAgent::WsSend { .. }
                | FromAgent::WsClose { .. }) => {
                    let id = message.web_input().unwrap_or_default().to_string();
                    // A whole response in one message ends its input too.
                    let done = matches!(message, FromAgent::HttpStart { done: true, .. });
                    {
                        let in_flight = worker.in_flight.lock().unwrap();
                        if let Some(web) = in_flight.get(&id).and_then(|job| job.web.as_ref()) {
                            let _ = web.events.send(message);
                        }
                    }
                    if done {
                        self.finish_input(&worker, &id, Outcome::value(serde_json::Value::Null));
                    }
                }
                FromAgent::Log { id, stream, data } => {
                    let stream = if stream == "stderr" {
                        Stream::Stderr
                    } else {
                        Stream::Stdout
                    };
                    for line in data.lines().filter(|l| !l.is_empty()) {
                        self.log(id.as_deref(), stream, mask(line, &self.spec.secret_values));
                    }
                }
                FromAgent::Call {
                    call_id,
                    token,
                    request,
                } => {
                    let reply = worker.to_agent.clone();
                    if token != worker.token {
                        let _ = reply.send(ToAgent::CallResult {
                            call_id,
                            outcome: Outcome::failed(ErrorInfo::lode(
                                "unauthorized",
                                "the container token is wrong",
                            )),
                            more: false,
                        });
                        continue;
                    }
                    let Ok(permit) = worker.calls.clone().try_acquire_owned() else {
                        let _ = reply.send(ToAgent::CallResult {
                            call_id,
                            outcome: Outcome::failed(ErrorInfo::lode(
                                "too_many_calls",
                                format!(
                                    "this container has {MAX_CALLS_PER_CONTAINER} calls in \
                                     flight already; wait for some to finish"
                                ),
                            )),
                            more: false,
                        });
                        continue;
                    };
                    let dispatch = self.spec.dispatch.upgrade();
                    let caller_app = self.spec.app.to_string();
                    // A call made while serving an input joins that input's call tree; one
                    // from elsewhere (a thread of the user's own) starts a tree of its own.
                    let tree = request.input.as_ref().and_then(|input| {
                        let in_flight = worker.in_flight.lock().unwrap();
                        in_flight.get(input).map(|job| job.tree.clone())
                    });
                    let fan_out = self.spec.call_limits.fan_out;
                    tokio::spawn(async move {
                        let _permit = permit;
                        let outcome = match dispatch {
                            None => Outcome::failed(ErrorInfo::lode(
                                "unavailable",
                                "the server is shutting down",
                            )),
                            Some(dispatch) if request.op == "call_gen" => {
                                // One more step of the input's tree, bounded as other calls.
                                match tree.map(|t| t.admit(fan_out, false)).transpose() {
                                    Err(error) => Outcome::failed(error),
                                    Ok(tree) => {
                                        stream_generator(
                                            &*dispatch,
                                            &caller_app,
                                            *request,
                                            tree,
                                            &call_id,
                                            &reply,
                                        )
                                        .await
                                    }
                                }
                            }
                            Some(dispatch) => {
                                container_call(
                                    &*dispatch,
                                    &caller_app,
                                    tree.as_ref(),
                                    fan_out,
                                    *request,
                                )
                                .await
                            }
                        };
                        let _ = reply.send(ToAgent::CallResult {
                            call_id,
                            outcome,
                            more: false,
                        });
                    });
                }
                FromAgent::Fatal { .. } | FromAgent::Ready { .. } => {}
            }
        }
        // The agent is gone: the container is (being) killed; its exit names why.
        // A container that is exiting by itself (the agent's connection closes first) gets a
        // moment, so its own exit code is reported rather than our kill.
        let was_retiring = !worker.alive.swap(false, Ordering::Relaxed);
        let grace = agent::EXIT_GRACE + Duration::from_millis(500);
        if tokio::time::timeout(grace, agent::wait_exit(exit.clone()))
            .await
            .is_err()
        {
            worker.stop.store(true, Ordering::Relaxed);
        }
        let ended =
            match tokio::time::timeout(Duration::from_secs(10), agent::wait_exit(exit)).await {
                Ok(exit) => exit.to_string(),
                Err(_) => "the container stopped".to_string(),
            };
        let ended = ErrorInfo::lode("container_exited", ended);
        {
            let mut state = self.state.lock().unwrap();
            state.workers.retain(|w| !Arc::ptr_eq(w, &worker));
        }
        let held: Vec<(String, Job)> = worker.in_flight.lock().unwrap().drain().collect();
        if !held.is_empty() || !was_retiring {
            self.log(
                None,
                Stream::System,
                format!("{}: {}", self.spec.function, ended.message),
            );
        }
        let max_retries = self.spec.retries.map_or(0, |r| r.max_retries);
        for (id, job) in held {
            let job = job.off_container();
            // A web input's request was taken in part already: it is never run twice.
            if job.attempt < max_retries && job.web.is_none() {
                self.retry(&id, job, &ended.message);
            } else {
                self.failures.fetch_add(1, Ordering::Relaxed);
                let _ = job.reply.send(Outcome::failed(ErrorInfo::lode(
                    "container_exited",
                    format!("{} while it ran this input", ended.message),
                )));
            }
        }
        self.pump();
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

    /// Figures for `lode stats`.
    pub fn stats(&self) -> PoolStats {
        let state = self.state.lock().unwrap();
        PoolStats {
            function: self.spec.function.clone(),
            containers: state
                .workers
                .iter()
                .filter(|w| w.alive.load(Ordering::Relaxed))
                .count(),
            starting: state.starting,
            running: state.workers.iter().map(|w| w.load()).sum(),
            queued: state.queue.len(),
            cold_starts: self.cold_starts.load(Ordering::Relaxed),
            inputs: self.inputs.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            retries: self.retried.load(Ordering::Relaxed),
            min_containers: self.spec.min_containers,
            max_containers: self.spec.max_containers,
        }
    }

    fn log(&self, input: Option<&str>, stream: Stream, line: String) {
        self.ctx.logs.push(&self.spec.app, input, stream, line);
    }
}

/// `line` with every secret value replaced by `***`, so a print cannot leak one into logs.
fn mask(line: &str, secrets: &[String]) -> String {
    let mut line = line.to_string();
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        if line.contains(secret.as_str()) {
            line = line.replace(secret.as_str(), "***");
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_masked_in_log_lines() {
        let secrets = vec!["hunter22".to_string(), "ab".to_string()];
        assert_eq!(mask("token=hunter22 ok", &secrets), "token=*** ok");
        // Values too short to be secrets would mask ordinary text; they are left.
        assert_eq!(mask("ab cd", &secrets), "ab cd");
    }
}
