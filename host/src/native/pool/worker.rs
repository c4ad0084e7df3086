//! What a pool holds per container and per input: the [`Worker`] (its channel, its inputs in
//! flight, whether it is stopping) and the [`Job`] (an input with its reply, its place in a
//! call tree and, for a web input, its [`WebExchange`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lode_native_runner::agent::{FromAgent, Outcome, ToAgent};
use tokio::sync::{mpsc, oneshot};

use crate::function::CallTree;

/// Where a streamed input's messages go (a web input's response, a generator's values),
/// and, once a container takes it, its input id and that container's channel (for the
/// request body and WebSocket messages from the client).
pub struct WebExchange {
    /// The agent's HTTP and WebSocket messages for the input.
    pub events: mpsc::UnboundedSender<FromAgent>,
    /// Told the input's id and the container's channel when a container takes it.
    pub assigned: Option<oneshot::Sender<(String, mpsc::UnboundedSender<ToAgent>)>>,
}

pub(super) struct Job {
    pub(super) payload: serde_json::Map<String, serde_json::Value>,
    /// Set for a web input (ASGI, WSGI, a web server): its exchange, never retried.
    pub(super) web: Option<WebExchange>,
    /// Where the input sits in its call tree; calls its code makes join the tree there.
    pub(super) tree: CallTree,
    /// Retries used so far.
    pub(super) attempt: u32,
    pub(super) reply: oneshot::Sender<Outcome>,
    /// The running input's timeout, stopped when it finishes first.
    pub(super) timer: Option<tokio::task::AbortHandle>,
}

impl Job {
    pub(super) fn new(
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
    pub(super) fn off_container(mut self) -> Self {
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
        self
    }
}

/// Calls one container may have in flight to other functions at once.
pub(super) const MAX_CALLS_PER_CONTAINER: usize = 64;

pub(super) struct Worker {
    pub(super) to_agent: mpsc::UnboundedSender<ToAgent>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) token: String,
    pub(super) in_flight: Mutex<HashMap<String, Job>>,
    /// Since when it has had nothing to do (`None` while busy).
    pub(super) idle_since: Mutex<Option<Instant>>,
    /// False once it is stopping or dead: nothing more is sent to it.
    pub(super) alive: AtomicBool,
    /// Bounds the calls it makes to other functions at once.
    pub(super) calls: Arc<tokio::sync::Semaphore>,
}

impl Worker {
    /// A container whose agent answers on `to_agent`, stopped through `stop`, whose calls
    /// carry `token`.
    pub(super) fn new(
        to_agent: mpsc::UnboundedSender<ToAgent>,
        stop: Arc<AtomicBool>,
        token: String,
    ) -> Self {
        Self {
            to_agent,
            stop,
            token,
            in_flight: Mutex::new(HashMap::new()),
            idle_since: Mutex::new(Some(Instant::now())),
            alive: AtomicBool::new(true),
            calls: Arc::new(tokio::sync::Semaphore::new(MAX_CALLS_PER_CONTAINER)),
        }
    }

    pub(super) fn load(&self) -> usize {
        self.in_flight.lock().unwrap().len()
    }

    pub(super) fn retire(&self) {
        self.alive.store(false, Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops an idle container gently: its agent runs the exit hooks (`@lode.exit()`) and
    /// exits; after [`EXIT_HOOK_GRACE`] it is killed whatever it is doing.
    pub(super) fn drain(&self) {
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

/// How long a scaled-down container's exit hooks may run before it is killed.
pub(super) const EXIT_HOOK_GRACE: Duration = Duration::from_secs(10);
