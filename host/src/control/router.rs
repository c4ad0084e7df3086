//! The call router: every call by name (the API, web endpoints, schedules, Wasm guests'
//! imports, calls from containers) goes through [`Dispatch`] on [`Control`], which finds what
//! serves it in the live version, checks the caller and the body, runs it on its engine,
//! counts it and records it in the history.

use std::sync::Arc;
use std::time::Duration;

use lode_native_runner::agent::{ErrorInfo, Outcome};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::control::Control;
use crate::control::forward::{Delivery, Forward};
use crate::function::{CallError, CallTree, Dispatch, Generated, check_payload};
use crate::native::pool::Rejected;
use crate::proto::calls::{CallRecord, CallStatus, HistoryRecord};
use crate::proto::manifest::Runtime;
use crate::telemetry::metrics::FunctionSeries;

/// Why code of `caller` may not call `app/function` (deployed as `manifest`, if at all), or
/// `None` when it may: its own app's functions, yes; another app's only when that app's
/// `allow_callers` names the caller, and never one deployed for pickle, whose arguments and
/// results would run code on the other side. "No such app" and "not allowed" read the same,
/// so a tenant cannot list others.
fn caller_refused(
    manifest: Option<&crate::proto::manifest::Manifest>,
    caller: &str,
    app: &str,
    function: &str,
) -> Option<CallError> {
    if caller == app {
        return None;
    }
    let refused = |why: String| {
        CallError::new(
            403,
            "forbidden",
            format!("app {caller:?} may not call {app}/{function}: {why}"),
        )
    };
    let named = manifest.is_some_and(|m| m.allow_callers.iter().any(|a| a == caller));
    if !named {
        return Some(refused(format!(
            "calls between apps need the callee's allow_callers to name {caller:?}"
        )));
    }
    let pickle = manifest.is_some_and(|m| {
        m.functions.iter().any(|f| {
            f.name == function
                && f.python.as_ref().and_then(|p| p.serialization.as_deref()) == Some("pickle")
        })
    });
    pickle.then(|| refused("it takes pickle, which is never accepted across apps".into()))
}

/// A pickled result from a function deployed for JSON is dropped: only a function declared
/// with `serialization="pickle"` may hand a caller something to unpickle, whatever its
/// container sends.
fn only_declared_pickle(outcome: Outcome, pickle: bool) -> Outcome {
    if pickle || outcome.result_pickled.is_none() {
        return outcome;
    }
    Outcome::failed(ErrorInfo::lode(
        "invalid_result",
        "the function's container sent a pickled result, but the function is deployed for \
         JSON; declare it with serialization=\"pickle\" to return Python objects",
    ))
}

/// What serves a call.
enum Target {
    /// A Python function's pool, and whether the function was deployed for pickle.
    Python(Arc<crate::native::pool::Pool>, Map<String, Value>, bool),
    /// A Python class called with options of its own: its pool for them, started on first
    /// use ([`Control::variant_pool`]).
    Variant(Box<Variant>, Map<String, Value>, bool),
    /// A Wasm function.
    Wasm(Arc<crate::wasm::function::WasmFunction>, Map<String, Value>),
}

#[async_trait::async_trait]
impl Dispatch for Control {
    /// Runs the call on its engine, at its place in a call tree (`None`: the call from
    /// outside), which bounds how deep and how wide calls may go, made by code of `caller`
    /// (`None`: the operator, through the API, a schedule or a web route), which reaches only
    /// what [`Control::check_caller`] lets it. Counts it, and records it in the history.
    async fn call(
        &self,
        app: &str,
        function: &str,
        body: &Value,
        tree: Option<CallTree>,
        caller: Option<&str>,
    ) -> Result<Outcome, CallError> {
        self.call_at(app, function, body, tree, caller, Delivery::FROM_OUTSIDE)
            .await
    }

    /// Starts the call in the background; returns its id. What a call would refuse at once
    /// (unknown function, a bad body, a caller not let in) is refused here too, rather than
    /// recorded as a failed call. From inside a call tree, the spawned call counts against
    /// the same depth and fan-out, so a function that spawns itself is stopped like one that
    /// invokes itself.
    async fn spawn(
        &self,
        app: &str,
        function: &str,
        body: Value,
        tree: Option<CallTree>,
        caller: Option<&str>,
    ) -> Result<String, CallError> {
        let target = self.target(app, function, &body, caller)?;
        let engine = match &target {
            Target::Python(..) | Target::Variant(..) => "python",
            Target::Wasm(..) => "wasm",
        };
        // From outside, into the queue hosts share: any host may run it, and another runs
        // it again if this one dies (as its Retries allow). A call spawned inside a call tree
        // stays on this host, where the tree's fan-out is counted.
        if tree.is_none() && self.calls.shared.is_some() {
            let input = crate::store::postgres::queue::SpawnedInput {
                app: app.to_string(),
                function: function.to_string(),
                engine: engine.to_string(),
                max_retries: target.max_retries(),
                body,
                caller: caller.map(str::to_string),
                created_ms: crate::util::now_ms(),
            };
            return self.calls.enqueue(input).await.map_err(|e| {
                CallError::new(
                    503,
                    "unavailable",
                    format!(
                        "{app}/{function} could not be queued: {e:#}; retry once the state is back"
                    ),
                )
            });
        }
        let Some(control) = self.this.upgrade() else {
            return Err(CallError::new(
                503,
                "unavailable",
                "the server is shutting down",
            ));
        };
        let id = self.calls.create(app, function, engine);
        let (app, function, call_id) = (app.to_string(), function.to_string(), id.clone());
        let caller = caller.map(str::to_string);
        let calls = control.clone();
        let task = tokio::spawn(async move {
            let called = control
                .call(&app, &function, &body, tree, caller.as_deref())
                .await;
            let outcome = match called {
                Ok(outcome) => outcome,
                Err(e) => Outcome::failed(e.error),
            };
            control.calls.finish(&call_id, outcome);
        });
        calls.calls.set_task(&id, task.abort_handle());
        Ok(id)
    }

    /// A spawned call's record for code of `caller` (a container or a Wasm guest), after
    /// waiting up to `wait`: only calls of functions the caller may call are visible, and
    /// others read as unknown.
    async fn wait(&self, caller: &str, id: &str, wait: Duration) -> Result<CallRecord, ErrorInfo> {
        let unknown = || {
            ErrorInfo::lode(
                "not_found",
                format!("no call {id:?} (records are kept while the server runs)"),
            )
        };
        let record = self
            .calls
            .wait(id, Duration::ZERO)
            .await
            .ok_or_else(unknown)?;
        if self
            .check_caller(caller, &record.app, &record.function)
            .is_err()
        {
            return Err(unknown());
        }
        if record.status != CallStatus::Running {
            return Ok(record);
        }
        self.calls.wait(id, wait).await.ok_or_else(unknown)
    }

    async fn volume(&self, name: &str, action: &str) -> Result<Value, ErrorInfo> {
        if !crate::proto::manifest::is_dns_label(name) {
            return Err(ErrorInfo::lode(
                "invalid_request",
                crate::proto::manifest::dns_label_rule("volume", name),
            ));
        }
        let Some(sync) = self.functions.volume_sync.clone() else {
            // One host: every container mounts the one copy, so there is nothing to sync.
            return Ok(serde_json::json!({"shared": false}));
        };
        let commit = match action {
            "commit" => true,
            "reload" => false,
            other => {
                return Err(ErrorInfo::lode(
                    "invalid_request",
                    format!("volume {name:?}: unknown action {other:?} (commit or reload)"),
                ));
            }
        };
        let dir = self.functions.volumes_dir.join(name);
        let name = name.to_string();
        let synced = tokio::task::spawn_blocking(move || {
            if commit {
                sync.commit(&name, &dir)
            } else {
                sync.reload(&name, &dir)
            }
            .map_err(|e| {
                ErrorInfo::lode(
                    "volume_sync_failed",
                    format!(
                        "volume {name:?}: {} failed: {e:#}; nothing was half-written, retry",
                        if commit { "commit" } else { "reload" }
                    ),
                )
            })
        })
        .await
        .map_err(|e| ErrorInfo::lode("internal", e.to_string()))??;
        Ok(serde_json::to_value(synced).unwrap_or_default())
    }

    async fn object(
        &self,
        kind: crate::store::objects::Kind,
        name: &str,
        request: crate::store::objects::Request,
    ) -> Result<Value, ErrorInfo> {
        self.objects
            .request(kind, name, request)
            .await
            .map_err(|e| ErrorInfo::lode(e.kind, e.message))
    }

    /// Calls a Python generator function (`remote_gen`): its values stream as it yields
    /// them. `tree` is the call's place when a function makes it; `caller` is the app whose
    /// code calls (`None`: the operator).
    fn call_gen(
        &self,
        app: &str,
        function: &str,
        body: &Value,
        tree: Option<CallTree>,
        caller: Option<&str>,
    ) -> Result<Generated, CallError> {
        let target = self.target(app, function, body, caller)?;
        if let Target::Wasm(..) = target {
            return Err(CallError::new(
                422,
                "unsupported",
                format!("{app}/{function} is a Wasm function; generators are Python's"),
            ));
        }
        let pickle = match &target {
            Target::Python(_, _, pickle) | Target::Variant(_, _, pickle) => *pickle,
            Target::Wasm(..) => false,
        };
        let (events, values) = mpsc::unbounded_channel();
        let exchange = crate::native::pool::WebExchange {
            events,
            assigned: None,
        };
        let (app, function) = (app.to_string(), function.to_string());
        let control = self.this.upgrade();
        let outcome = tokio::spawn(async move {
            let Some(control) = control else {
                return Err(CallError::new(
                    503,
                    "unavailable",
                    "the server is shutting down",
                ));
            };
            let Some((pool, mut payload, _)) = control.python_target(target).await? else {
                unreachable!("Wasm targets are refused above");
            };
            payload.insert("stream".into(), Value::Bool(true));
            match pool.submit_stream(payload, tree, exchange).await {
                Ok(outcome) => Ok(only_declared_pickle(outcome, pickle)),
                Err(Rejected::QueueFull(after)) => Err(CallError {
                    retry_after: Some(after),
                    ..CallError::new(
                        429,
                        "queue_full",
                        format!(
                            "{app}/{function} has a full queue; retry after {}s",
                            after.as_secs().max(1)
                        ),
                    )
                }),
                Err(Rejected::Closed) => Err(CallError::new(
                    503,
                    "unavailable",
                    format!("{app}/{function} is being redeployed; retry"),
                )),
            }
        });
        Ok(Generated {
            values,
            outcome,
            pickle,
        })
    }
}

impl Target {
    /// Runs of an input allowed after its first: the function's `Retries`, or those of the
    /// options the call asks for.
    fn max_retries(&self) -> u32 {
        let retries = match self {
            Target::Python(pool, ..) => pool.retries(),
            Target::Variant(variant, ..) => variant.options.retries.or(variant.function.retries),
            Target::Wasm(wasm, _) => wasm.retries,
        };
        retries.map_or(0, |r| r.max_retries)
    }
}

/// A deployed function and the options a call asks it to run with.
struct Variant {
    live: Arc<crate::control::LiveApp>,
    function: crate::proto::manifest::FunctionSpec,
    options: crate::proto::manifest::CallOptions,
}

impl Control {
    /// [`Dispatch::call`], delivered as `delivery` says: with runs of the input already spent
    /// elsewhere, and whether it may go to another host.
    pub(crate) async fn call_at(
        &self,
        app: &str,
        function: &str,
        body: &Value,
        tree: Option<CallTree>,
        caller: Option<&str>,
        delivery: Delivery,
    ) -> Result<Outcome, CallError> {
        let started = std::time::Instant::now();
        let depth = tree.as_ref().map_or(0, CallTree::depth);
        let from_wasm = tree.as_ref().is_some_and(CallTree::from_wasm);
        let (engine, result) = self
            .run_on_engine(app, function, body, tree, caller, delivery)
            .await;
        if let Some((engine, series)) = engine {
            let failed = !matches!(&result, Ok(outcome) if !outcome.is_error());
            let elapsed = started.elapsed();
            series.observe(elapsed, failed);
            // In-process Wasm-to-Wasm calls are counted, not recorded one by one.
            if !(from_wasm && engine == "wasm") {
                let error = match &result {
                    Ok(outcome) => outcome.error.as_ref(),
                    Err(e) => Some(&e.error),
                };
                self.history.record(HistoryRecord {
                    created_ms: crate::util::now_ms().saturating_sub(elapsed.as_millis() as u64),
                    app: app.to_string(),
                    function: function.to_string(),
                    engine: engine.to_string(),
                    status: if failed {
                        CallStatus::Failed
                    } else {
                        CallStatus::Succeeded
                    },
                    duration_ms: elapsed.as_secs_f64() * 1000.0,
                    depth,
                    error: error.map(HistoryRecord::summarize),
                });
            }
        }
        result
    }

    /// The pool that serves `target`'s calls: a Python function's own, or the one its
    /// options ask for, started now if this version has none yet. `None` for Wasm.
    async fn python_target(
        &self,
        target: Target,
    ) -> Result<Option<(Arc<crate::native::pool::Pool>, Map<String, Value>, bool)>, CallError> {
        Ok(match target {
            Target::Python(pool, payload, pickle) => Some((pool, payload, pickle)),
            Target::Variant(variant, payload, pickle) => {
                Some((self.variant_pool(&variant).await?, payload, pickle))
            }
            Target::Wasm(..) => None,
        })
    }

    /// The pool of `variant`'s function with its options, started (image and all, from
    /// what the deploy built) the first time this version sees them.
    async fn variant_pool(
        &self,
        variant: &Variant,
    ) -> Result<Arc<crate::native::pool::Pool>, CallError> {
        let name = &variant.function.name;
        let key = (
            name.clone(),
            serde_json::to_string(&variant.options).expect("options serialize"),
        );
        let mut variants = variant.live.variants.lock().await;
        if let Some(pool) = variants.get(&key) {
            return Ok(pool.clone());
        }
        if variants.len() >= crate::control::MAX_VARIANTS {
            return Err(CallError::new(
                429,
                "too_many_variants",
                format!(
                    "{}/{name}: this version already runs {} option sets (with_options); reuse one, or redeploy with the options in @app.cls(...)",
                    variant.live.record.manifest.app,
                    crate::control::MAX_VARIANTS
                ),
            ));
        }
        let refused = |e: crate::control::deploy::DeployError| {
            let status = match e {
                crate::control::deploy::DeployError::Internal(_) => 500,
                crate::control::deploy::DeployError::Unsupported(_) => 422,
                _ => 400,
            };
            CallError::new(status, "invalid_options", format!("with_options: {e}"))
        };
        let changed = variant
            .options
            .apply(&variant.function)
            .map_err(|problems| {
                CallError::new(
                    400,
                    "invalid_options",
                    format!("with_options: {}", problems.join("; ")),
                )
            })?;
        self.check_engine_fits(&changed).map_err(refused)?;
        let manifest = &variant.live.record.manifest;
        let app: Arc<str> = Arc::from(manifest.app.as_str());
        let mut images = variant.live.images.clone();
        let pool = self
            .build_python(
                &app,
                crate::function::CallLimits::of(&manifest.limits),
                &changed,
                None,
                &mut images,
            )
            .await
            .map_err(refused)?;
        tracing::info!(app = %manifest.app, function = %name, options = %key.1, "started a pool for a class's options");
        variants.insert(key, pool.clone());
        Ok(pool)
    }

    /// Runs the call on its engine; says which engine it was and the function's call series,
    /// once the function is known.
    async fn run_on_engine(
        &self,
        app: &str,
        function: &str,
        body: &Value,
        tree: Option<CallTree>,
        caller: Option<&str>,
        delivery: Delivery,
    ) -> (
        Option<(&'static str, FunctionSeries)>,
        Result<Outcome, CallError>,
    ) {
        // A deploy may replace the pool between lookup and submit; the new one takes it.
        for _ in 0..3 {
            let target = match self.target(app, function, body, caller) {
                Err(e) => return (None, Err(e)),
                Ok(target) => target,
            };
            let (pool, payload, pickle) = match target {
                Target::Wasm(wasm, payload) => {
                    let series = wasm.series.clone();
                    let dispatch = self.dispatch();
                    let body = Value::Object(payload);
                    let outcome =
                        crate::wasm::function::run(wasm, &body, tree, dispatch, &self.logs).await;
                    return (Some(("wasm", series)), Ok(outcome));
                }
                python => match self.python_target(python).await {
                    Ok(Some(found)) => found,
                    Ok(None) => unreachable!("Wasm targets are served above"),
                    Err(e) => return (None, Err(e)),
                },
            };
            let served = Some(("python", pool.series().clone()));
            // A call from outside that would wait here for a cold start goes to a host with
            // a warm container for it, where there is one.
            let may_forward =
                delivery.forward == Forward::Allowed && tree.is_none() && self.host.shared;
            if may_forward
                && pool.containers() == 0
                && let Some(result) = self
                    .forward_to_peer(&pool, app, function, body, false)
                    .await
            {
                return (served, result.map(|o| only_declared_pickle(o, pickle)));
            }
            match pool
                .submit_retry(payload, tree.clone(), delivery.attempts)
                .await
            {
                Ok(outcome) => return (served, Ok(only_declared_pickle(outcome, pickle))),
                // Full here: another host takes it, a warm one first.
                Err(Rejected::QueueFull(_))
                    if may_forward
                        && let Some(result) =
                            self.forward_to_peer(&pool, app, function, body, true).await =>
                {
                    return (served, result.map(|o| only_declared_pickle(o, pickle)));
                }
                Err(Rejected::QueueFull(after)) => {
                    return (
                        served,
                        Err(CallError {
                            retry_after: Some(after),
                            ..CallError::new(
                                429,
                                "queue_full",
                                format!(
                                    "{app}/{function} has a full queue; retry after {}s",
                                    after.as_secs().max(1)
                                ),
                            )
                        }),
                    );
                }
                Err(Rejected::Closed) => continue,
            }
        }
        let busy = CallError::new(
            503,
            "unavailable",
            format!("{app}/{function} is being redeployed; retry"),
        );
        let series = self.metrics.function_series(app, function, "python");
        (Some(("python", series)), Err(busy))
    }

    /// What serves `app/function` (a Python pool or a Wasm component), and the body checked
    /// for it, once `caller` is known to be let in: checked against the same deployed version
    /// that serves the call.
    fn target(
        &self,
        app: &str,
        function: &str,
        body: &Value,
        caller: Option<&str>,
    ) -> Result<Target, CallError> {
        let live = self.app(app);
        let acting = caller.filter(|c| *c != app).map(|c| self.acting_as(c));
        if let Some(caller) = acting.as_deref()
            && let Some(refused) = caller_refused(
                live.as_deref().map(|l| &l.record.manifest),
                caller,
                app,
                function,
            )
        {
            return Err(refused);
        }
        let Some(live) = live else {
            return Err(CallError::new(
                404,
                "not_found",
                format!("no app {app:?} is deployed (`lode ls` lists them)"),
            ));
        };
        let Some(spec) = live
            .record
            .manifest
            .functions
            .iter()
            .find(|f| f.name == function)
        else {
            let names: Vec<_> = live
                .record
                .manifest
                .functions
                .iter()
                .map(|f| f.name.as_str())
                .collect();
            return Err(CallError::new(
                404,
                "not_found",
                format!(
                    "app {app:?} has no function {function:?} (it has: {})",
                    names.join(", ")
                ),
            ));
        };
        let pickle = spec
            .python
            .as_ref()
            .and_then(|p| p.serialization.as_deref())
            == Some("pickle");
        let methods = spec
            .python
            .as_ref()
            .and_then(|p| p.class.as_ref())
            .map(|c| c.methods.as_slice());
        let payload = check_payload(body, pickle, methods).map_err(|m| {
            let kind = if m.starts_with("the class has no method") {
                "not_found"
            } else {
                "invalid_request"
            };
            CallError::new(
                if kind == "not_found" { 404 } else { 400 },
                kind,
                format!("{app}/{function}: {m}"),
            )
        })?;
        if spec.runtime == Runtime::Wasm {
            return match live.wasm_functions.get(function) {
                Some(wasm) => Ok(Target::Wasm(wasm.clone(), payload)),
                None => Err(CallError::new(
                    422,
                    "unsupported",
                    format!(
                        "{app}/{function} serves HTTP only: its component does not export \
                         lode:function/handler, so it takes requests at its web route"
                    ),
                )),
            };
        }
        if let Some(options) = body.get("options") {
            let options: crate::proto::manifest::CallOptions =
                serde_json::from_value(options.clone()).map_err(|e| {
                    CallError::new(
                        400,
                        "invalid_request",
                        format!("{app}/{function}: \"options\" is not valid: {e}"),
                    )
                })?;
            if options != crate::proto::manifest::CallOptions::default() {
                let variant = Variant {
                    function: spec.clone(),
                    live: live.clone(),
                    options,
                };
                return Ok(Target::Variant(Box::new(variant), payload, pickle));
            }
        }
        let pool = live.pools.get(function).cloned().ok_or_else(|| {
            CallError::new(
                503,
                "unavailable",
                format!("{app}/{function} has no container pool; redeploy the app"),
            )
        })?;
        Ok(Target::Python(pool, payload, pickle))
    }

    /// The app whose rights `caller`'s code has: the app a `lode run` is a run of, else
    /// itself.
    fn acting_as(&self, caller: &str) -> String {
        self.app(caller)
            .and_then(|live| live.record.manifest.run_of.clone())
            .unwrap_or_else(|| caller.to_string())
    }

    /// Whether code of `caller` (an app's container or Wasm guest) may call
    /// `app/function`. An app's own functions, yes; another app's only when its
    /// `allow_callers` names the caller, and never one deployed for pickle, whose
    /// arguments and results would run code on the other side. The API token (the
    /// operator) is not a caller and reaches every function.
    pub fn check_caller(&self, caller: &str, app: &str, function: &str) -> Result<(), CallError> {
        if caller == app {
            return Ok(());
        }
        let live = self.app(app);
        caller_refused(
            live.as_deref().map(|l| &l.record.manifest),
            &self.acting_as(caller),
            app,
            function,
        )
        .map_or(Ok(()), Err)
    }
}
