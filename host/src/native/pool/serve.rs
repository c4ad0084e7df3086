//! A container's side of a pool, once it runs: the messages its agent sends (outputs, logs,
//! streamed values and web responses, calls to other functions), how an input ends or is
//! retried, and what happens to the inputs it held when it dies.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lode_native_runner::agent::{self, ErrorInfo, FromAgent, Outcome, ToAgent};
use tokio::sync::mpsc;

use super::worker::{Job, MAX_CALLS_PER_CONTAINER, Worker};
use super::{ExitWatch, Pool};
use crate::function::{CallTree, Dispatch, container_call};
use crate::proto::log::Stream;
use lode_native_runner::redact::mask;

impl Pool {
    /// Why this pool's containers may not `commit`/`reload` the volume `request` names, if
    /// they may not: it is not mounted here, or mounted read-only for a commit.
    fn volume_refused(
        &self,
        request: &lode_native_runner::agent::CallRequest,
    ) -> Option<ErrorInfo> {
        let name = request.name.as_deref().unwrap_or("");
        let commit = request
            .request
            .as_ref()
            .and_then(|r| r.get("action"))
            .and_then(serde_json::Value::as_str)
            == Some("commit");
        let mount = self
            .spec
            .volumes
            .iter()
            .find(|v| v.source.file_name().is_some_and(|n| n == name));
        match mount {
            None => Some(ErrorInfo::lode(
                "forbidden",
                format!("volume {name:?} is not mounted in this function's containers"),
            )),
            Some(mount) if commit && mount.read_only => Some(ErrorInfo::lode(
                "forbidden",
                format!("volume {name:?} is mounted read-only here; there is nothing to commit"),
            )),
            Some(_) => None,
        }
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
    pub(super) async fn serve(
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
                    // A whole response goes to the client at once; the input itself ends
                    // with the agent's output, once the app returns (background tasks
                    // after a response still count against the container).
                    let in_flight = worker.in_flight.lock().unwrap();
                    if let Some(web) = in_flight.get(&id).and_then(|job| job.web.as_ref()) {
                        let _ = web.events.send(message);
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
                    // A volume is synced only by a container that mounts it, and committed
                    // only by one that may write it.
                    let volume_refused = (request.op == "volume")
                        .then(|| self.volume_refused(&request))
                        .flatten();
                    tokio::spawn(async move {
                        let _permit = permit;
                        let outcome = match dispatch {
                            None => Outcome::failed(ErrorInfo::lode(
                                "unavailable",
                                "the server is shutting down",
                            )),
                            Some(_) if volume_refused.is_some() => {
                                Outcome::failed(volume_refused.expect("checked"))
                            }
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
                FromAgent::Fatal { .. } | FromAgent::Ready { .. } | FromAgent::SnapshotReady => {}
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
