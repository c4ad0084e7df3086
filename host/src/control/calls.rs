//! Function calls by name: the one dispatch path for the API, web endpoints, schedules and
//! calls made from inside containers, plus the records of spawned calls.
//!
//! Spawned calls are kept in memory, the newest [`MAX_RECORDS`], and in the state store for
//! [`RETENTION`] (status, engine, duration, result or error), so `call.get()` works across a
//! restart. A call that was running when the server stopped reads as failed, by name. Calls'
//! summaries also go to the call history ([`crate::control::history`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lode_native_runner::agent::{CallRequest, ErrorInfo, Outcome};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::control::Server;
use crate::control::history::HistoryRecord;
use crate::native::pool::Rejected;
use crate::proto::manifest::Runtime;
use crate::store::state::{StateStore, Table};
use crate::telemetry::metrics::FunctionSeries;
use crate::wasm::function::CallTree;

/// Spawned calls remembered at once; the oldest finished ones go first.
pub const MAX_RECORDS: usize = 10_000;

/// Bytes of results and errors the records may hold; past it the oldest finished go.
pub const MAX_RECORD_BYTES: usize = 256 << 20;

/// How long a spawned call's record is kept in the state store.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The longest `GET /v1/calls/{id}?wait=` may hold a request.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// Where a spawned call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallStatus {
    /// Queued or running.
    Running,
    /// Returned a value.
    Succeeded,
    /// Raised, or could not run.
    Failed,
}

/// A spawned call as `GET /v1/calls/{id}` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CallRecord {
    /// The call's id.
    pub call_id: String,
    /// The app.
    pub app: String,
    /// The function.
    pub function: String,
    /// `wasm` or `python`.
    #[serde(default)]
    pub engine: String,
    /// Where it is.
    pub status: CallStatus,
    /// The result, once it succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The pickled result, for pickle functions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_pickled: Option<String>,
    /// The error, once it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// Milliseconds since the epoch.
    pub created_ms: u64,
    /// How long it ran, once finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

struct Entry {
    record: CallRecord,
    done: watch::Sender<bool>,
    /// What its result or error weighs, once finished.
    bytes: usize,
}

#[derive(Default)]
struct Records {
    map: HashMap<String, Entry>,
    /// Oldest first.
    order: VecDeque<String>,
    bytes: usize,
    /// Calls recorded since start, to sweep the store now and then.
    created: u64,
}

impl Records {
    /// Drops records, the oldest finished first, until both bounds hold. Running calls go
    /// only when every record is running and the count is over.
    fn evict(&mut self) {
        while self.map.len() > MAX_RECORDS || self.bytes > MAX_RECORD_BYTES {
            let finished = self.order.iter().position(|id| {
                self.map
                    .get(id)
                    .is_some_and(|e| e.record.status != CallStatus::Running)
            });
            let at = match finished {
                Some(at) => at,
                None if self.map.len() > MAX_RECORDS => 0,
                None => break,
            };
            let Some(id) = self.order.remove(at) else {
                break;
            };
            if let Some(entry) = self.map.remove(&id) {
                self.bytes -= entry.bytes;
            }
        }
    }
}

/// Records of spawned calls.
#[derive(Default)]
pub struct Calls {
    inner: Mutex<Records>,
    /// Where records outlive the process; `None` keeps them in memory only.
    store: Option<Arc<dyn StateStore>>,
}

impl Calls {
    /// Records kept in `store` too. Records older than [`RETENTION`] go now, and calls that
    /// were running when the last server stopped are marked failed.
    pub fn persistent(store: Arc<dyn StateStore>) -> Self {
        let calls = Self {
            inner: Mutex::default(),
            store: Some(store),
        };
        calls.sweep(true);
        calls
    }

    /// Drops expired records from the store; with `after_restart`, fails the ones left
    /// running.
    fn sweep(&self, after_restart: bool) {
        let Some(store) = &self.store else { return };
        let entries = match store.list_entries(Table::Calls) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(error = %e, "reading call records failed");
                return;
            }
        };
        let oldest = crate::util::now_ms().saturating_sub(RETENTION.as_millis() as u64);
        for (id, bytes) in entries {
            match serde_json::from_slice::<CallRecord>(&bytes) {
                Ok(record) if record.created_ms >= oldest => {
                    if after_restart && record.status == CallStatus::Running {
                        let mut lost = record;
                        lost.status = CallStatus::Failed;
                        lost.error = Some(ErrorInfo::lode(
                            "lost",
                            "the server stopped while this call ran; call it again",
                        ));
                        self.persist(&lost);
                    }
                }
                _ => {
                    let _ = store.delete_entry(Table::Calls, &id);
                }
            }
        }
    }

    fn persist(&self, record: &CallRecord) {
        if let Some(store) = &self.store {
            let bytes = serde_json::to_vec(record).expect("records encode");
            if let Err(e) = store.put_entry(Table::Calls, &record.call_id, &bytes) {
                tracing::warn!(call = %record.call_id, error = %e, "recording the call failed");
            }
        }
    }

    /// Records a new running call on `engine` and returns its id.
    pub fn create(&self, app: &str, function: &str, engine: &str) -> String {
        let id = format!("ca-{:024x}", rand::random::<u128>() >> 32);
        let record = CallRecord {
            call_id: id.clone(),
            app: app.into(),
            function: function.into(),
            engine: engine.into(),
            status: CallStatus::Running,
            result: None,
            result_pickled: None,
            error: None,
            created_ms: crate::util::now_ms(),
            duration_ms: None,
        };
        self.persist(&record);
        let created = {
            let mut records = self.inner.lock().unwrap();
            records.map.insert(
                id.clone(),
                Entry {
                    record,
                    done: watch::channel(false).0,
                    bytes: 0,
                },
            );
            records.order.push_back(id.clone());
            records.evict();
            records.created += 1;
            records.created
        };
        if created % 1000 == 0 {
            self.sweep(false);
        }
        id
    }

    /// Stores how the call ended and wakes its waiters.
    pub fn finish(&self, id: &str, outcome: Outcome) {
        let mut records = self.inner.lock().unwrap();
        let weight = outcome.result.as_ref().map_or(0, |v| v.to_string().len())
            + outcome.result_pickled.as_ref().map_or(0, String::len)
            + outcome.error.as_ref().map_or(0, |e| {
                e.message.len() + e.traceback.as_ref().map_or(0, String::len)
            });
        let mut added = 0;
        let mut finished = None;
        if let Some(entry) = records.map.get_mut(id) {
            entry.bytes = weight;
            added = weight;
            let record = &mut entry.record;
            record.duration_ms = Some(crate::util::now_ms().saturating_sub(record.created_ms));
            if let Some(error) = outcome.error {
                record.status = CallStatus::Failed;
                record.error = Some(error);
            } else {
                record.status = CallStatus::Succeeded;
                record.result_pickled = outcome.result_pickled;
                if record.result_pickled.is_none() {
                    record.result = Some(outcome.result.unwrap_or(Value::Null));
                }
            }
            finished = Some(record.clone());
            // send_replace: the value must change even when no one is waiting yet.
            entry.done.send_replace(true);
        }
        records.bytes += added;
        records.evict();
        drop(records);
        if let Some(record) = finished {
            self.persist(&record);
        }
    }

    /// The call's record, after waiting up to `wait` for it to finish; `None` if unknown.
    pub async fn wait(&self, id: &str, wait: Duration) -> Option<CallRecord> {
        let subscribed = {
            let records = self.inner.lock().unwrap();
            records.map.get(id).map(|e| e.done.subscribe())
        };
        let Some(mut done) = subscribed else {
            // Not in memory: a record from before a restart, or evicted.
            let bytes = self.store.as_ref()?.get_entry(Table::Calls, id).ok()??;
            return serde_json::from_slice(&bytes).ok();
        };
        let _ = tokio::time::timeout(wait.min(MAX_WAIT), done.wait_for(|d| *d)).await;
        let records = self.inner.lock().unwrap();
        records.map.get(id).map(|e| e.record.clone())
    }
}

/// A call the API could not make, with the status it answers.
#[derive(Debug)]
pub struct CallError {
    /// HTTP status.
    pub status: u16,
    /// What went wrong.
    pub error: ErrorInfo,
    /// For 429: when to try again.
    pub retry_after: Option<Duration>,
}

impl CallError {
    /// The HTTP status it answers.
    pub fn status_code(&self) -> axum::http::StatusCode {
        axum::http::StatusCode::from_u16(self.status)
            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The `Retry-After` header a 429 carries, in whole seconds.
    pub fn retry_after_header(&self) -> Option<axum::http::HeaderValue> {
        let after = self.retry_after?;
        axum::http::HeaderValue::from_str(&after.as_secs().max(1).to_string()).ok()
    }

    fn new(status: u16, kind: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            error: ErrorInfo::lode(kind, message),
            retry_after: None,
        }
    }
}

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

/// Checks a call body: `{"args": [...], "kwargs": {...}}`, or `{"pickled": "..."}` for a
/// function that takes pickle. Returns what the agent gets.
pub fn check_payload(body: &Value, pickle: bool) -> Result<Map<String, Value>, String> {
    let Some(object) = body.as_object() else {
        return Err(
            "the call body must be a JSON object: {\"args\": [...], \"kwargs\": {...}}".into(),
        );
    };
    if let Some(unknown) = object
        .keys()
        .find(|k| !matches!(k.as_str(), "args" | "kwargs" | "pickled"))
    {
        return Err(format!(
            "unknown field {unknown:?} in the call body (expected args and kwargs)"
        ));
    }
    let mut payload = Map::new();
    if let Some(pickled) = object.get("pickled") {
        if !pickle {
            return Err(
                "this function takes JSON arguments; pickle is only for functions deployed \
                 with serialization=\"pickle\""
                    .into(),
            );
        }
        let Some(text) = pickled.as_str() else {
            return Err("\"pickled\" must be a base64 string".into());
        };
        payload.insert("pickled".into(), Value::String(text.into()));
        return Ok(payload);
    }
    let args = object.get("args").cloned().unwrap_or(Value::Array(vec![]));
    let kwargs = object
        .get("kwargs")
        .cloned()
        .unwrap_or(Value::Object(Map::new()));
    if !args.is_array() {
        return Err("\"args\" must be a JSON array".into());
    }
    if !kwargs.is_object() {
        return Err("\"kwargs\" must be a JSON object".into());
    }
    payload.insert("args".into(), args);
    payload.insert("kwargs".into(), kwargs);
    Ok(payload)
}

/// What serves a call.
enum Target {
    /// A Python function's pool, and whether the function was deployed for pickle.
    Python(Arc<crate::native::pool::Pool>, Map<String, Value>, bool),
    /// A Wasm function.
    Wasm(Arc<crate::wasm::function::WasmFunction>, Map<String, Value>),
}

impl Server {
    /// Runs `app/function` on `body` and waits for the outcome.
    pub async fn call(
        self: &Arc<Self>,
        app: &str,
        function: &str,
        body: &Value,
    ) -> Result<Outcome, CallError> {
        self.call_within(app, function, body, None, None).await
    }

    /// [`Server::call`] as one step of a call tree (`None`: the call from outside), which
    /// bounds how deep and how wide a Wasm function's `invoke` may go, made by code of
    /// `caller` (`None`: the operator, through the API, a schedule or a web route), which
    /// reaches only what [`Server::check_caller`] lets it.
    pub async fn call_within(
        self: &Arc<Self>,
        app: &str,
        function: &str,
        body: &Value,
        tree: Option<CallTree>,
        caller: Option<&str>,
    ) -> Result<Outcome, CallError> {
        let started = std::time::Instant::now();
        let depth = tree.as_ref().map_or(0, CallTree::depth);
        let from_wasm = tree.as_ref().is_some_and(CallTree::from_wasm);
        let (engine, result) = self.dispatch(app, function, body, tree, caller).await;
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

    /// Runs the call on its engine; says which engine it was and the function's call series,
    /// once the function is known.
    async fn dispatch(
        self: &Arc<Self>,
        app: &str,
        function: &str,
        body: &Value,
        tree: Option<CallTree>,
        caller: Option<&str>,
    ) -> (
        Option<(&'static str, FunctionSeries)>,
        Result<Outcome, CallError>,
    ) {
        // A deploy may replace the pool between lookup and submit; the new one takes it.
        for _ in 0..3 {
            let (pool, payload, pickle) = match self.target(app, function, body, caller) {
                Err(e) => return (None, Err(e)),
                Ok(Target::Python(pool, payload, pickle)) => (pool, payload, pickle),
                Ok(Target::Wasm(wasm, payload)) => {
                    let series = wasm.series.clone();
                    let outcome = self.run_wasm(wasm, &Value::Object(payload), tree).await;
                    return (Some(("wasm", series)), Ok(outcome));
                }
            };
            let served = Some(("python", pool.series().clone()));
            match pool.submit(payload, tree.clone()).await {
                Ok(outcome) => return (served, Ok(only_declared_pickle(outcome, pickle))),
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
        if let Some(caller) = caller
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
        let payload =
            check_payload(body, pickle).map_err(|m| CallError::new(400, "invalid_request", m))?;
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
        let pool = live.pools.get(function).cloned().ok_or_else(|| {
            CallError::new(
                503,
                "unavailable",
                format!("{app}/{function} has no container pool; redeploy the app"),
            )
        })?;
        Ok(Target::Python(pool, payload, pickle))
    }

    /// Whether code of `caller` (an app's container or Wasm guest) may call
    /// `app/function`. An app's own functions, yes; another app's only when its
    /// `allow_callers` names the caller, and never one deployed for pickle, whose
    /// arguments and results would run code on the other side. The API token (the
    /// operator) is not a caller and reaches every function.
    pub fn check_caller(&self, caller: &str, app: &str, function: &str) -> Result<(), CallError> {
        let live = self.app(app);
        caller_refused(
            live.as_deref().map(|l| &l.record.manifest),
            caller,
            app,
            function,
        )
        .map_or(Ok(()), Err)
    }

    /// Starts `app/function` on `body` in the background; returns the call's id. What a
    /// call would refuse at once (unknown function, a Wasm function, a bad body) is refused
    /// here too, rather than recorded as a failed call.
    pub fn spawn_call(
        self: &Arc<Self>,
        app: &str,
        function: &str,
        body: Value,
    ) -> Result<String, CallError> {
        self.spawn_call_within(app, function, body, None, None)
    }

    /// [`Server::spawn_call`] from inside a call tree: the spawned call counts against the
    /// same depth and fan-out, so a function that spawns itself is stopped like one that
    /// invokes itself.
    pub fn spawn_call_within(
        self: &Arc<Self>,
        app: &str,
        function: &str,
        body: Value,
        tree: Option<CallTree>,
        caller: Option<&str>,
    ) -> Result<String, CallError> {
        let engine = match self.target(app, function, &body, caller)? {
            Target::Python(..) => "python",
            Target::Wasm(..) => "wasm",
        };
        let id = self.calls.create(app, function, engine);
        let server = self.clone();
        let (app, function, call_id) = (app.to_string(), function.to_string(), id.clone());
        let caller = caller.map(str::to_string);
        tokio::spawn(async move {
            let called = server
                .call_within(&app, &function, &body, tree, caller.as_deref())
                .await;
            let outcome = match called {
                Ok(outcome) => outcome,
                Err(e) => Outcome::failed(e.error),
            };
            server.calls.finish(&call_id, outcome);
        });
        Ok(id)
    }

    /// A spawned call's record for code of `caller` (a container or a Wasm guest), after
    /// waiting up to `wait`: only calls of functions the caller may call are visible, and
    /// others read as unknown.
    pub async fn wait_as(
        &self,
        caller: &str,
        id: &str,
        wait: Duration,
    ) -> Result<CallRecord, ErrorInfo> {
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

    /// A call from inside a container of `caller_app`: the same dispatch, answered as an
    /// outcome. Made while serving an input, it is one more step of that input's call
    /// `tree`, bounded like a Wasm function's `invoke` (`fan_out`: the caller app's bound).
    pub async fn inner_call(
        self: &Arc<Self>,
        caller_app: &str,
        tree: Option<&CallTree>,
        fan_out: u32,
        call: CallRequest,
    ) -> Outcome {
        let app = call.app.unwrap_or_else(|| caller_app.to_string());
        let mut body = Map::new();
        for (key, value) in [("args", call.args), ("kwargs", call.kwargs)] {
            if let Some(value) = value {
                body.insert(key.into(), value);
            }
        }
        if let Some(pickled) = call.pickled {
            body.insert("pickled".into(), Value::String(pickled));
        }
        let body = Value::Object(body);
        match call.op.as_str() {
            "call" | "spawn" => {
                let Some(function) = call.function else {
                    return Outcome::failed(ErrorInfo::lode(
                        "invalid_request",
                        "no function named",
                    ));
                };
                let tree = match tree.map(|tree| tree.admit(fan_out, false)).transpose() {
                    Ok(tree) => tree,
                    Err(error) => return Outcome::failed(error),
                };
                if call.op == "call" {
                    match self
                        .call_within(&app, &function, &body, tree, Some(caller_app))
                        .await
                    {
                        Ok(outcome) => outcome,
                        Err(e) => Outcome::failed(e.error),
                    }
                } else {
                    match self.spawn_call_within(&app, &function, body, tree, Some(caller_app)) {
                        Ok(id) => Outcome::value(serde_json::json!({"call_id": id})),
                        Err(e) => Outcome::failed(e.error),
                    }
                }
            }
            "get" => {
                let Some(id) = call.id else {
                    return Outcome::failed(ErrorInfo::lode("invalid_request", "no call id"));
                };
                let wait = Duration::from_secs_f64(call.wait.unwrap_or(0.0).clamp(0.0, 60.0));
                match self.wait_as(caller_app, &id, wait).await {
                    Ok(record) => Outcome::value(serde_json::to_value(record).unwrap_or_default()),
                    Err(error) => Outcome::failed(error),
                }
            }
            other => Outcome::failed(ErrorInfo::lode(
                "invalid_request",
                format!("unknown op {other:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_args_and_kwargs_or_pickle_where_allowed() {
        let payload = check_payload(&serde_json::json!({"args": [4]}), false).unwrap();
        assert_eq!(
            Value::Object(payload),
            serde_json::json!({"args": [4], "kwargs": {}})
        );
        assert!(check_payload(&serde_json::json!([4]), false).is_err());
        assert!(check_payload(&serde_json::json!({"args": 4}), false).is_err());
        assert!(
            check_payload(&serde_json::json!({"arsg": []}), false)
                .unwrap_err()
                .contains("arsg")
        );
        assert!(check_payload(&serde_json::json!({"pickled": "eA=="}), false).is_err());
        assert!(check_payload(&serde_json::json!({"pickled": "eA=="}), true).is_ok());
    }

    #[tokio::test]
    async fn records_outlive_a_restart_and_running_ones_read_as_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (done, running) = {
            let store: Arc<dyn StateStore> =
                Arc::new(crate::store::state::RedbStore::open(dir.path()).unwrap());
            let calls = Calls::persistent(store);
            let done = calls.create("demo", "square", "wasm");
            calls.finish(&done, Outcome::value(serde_json::json!(9)));
            (done, calls.create("demo", "square", "python"))
        };
        let store: Arc<dyn StateStore> =
            Arc::new(crate::store::state::RedbStore::open(dir.path()).unwrap());
        let calls = Calls::persistent(store);
        let record = calls.wait(&done, Duration::ZERO).await.unwrap();
        assert_eq!(
            (record.status, record.result, record.engine.as_str()),
            (CallStatus::Succeeded, Some(serde_json::json!(9)), "wasm")
        );
        let lost = calls.wait(&running, Duration::ZERO).await.unwrap();
        assert_eq!(lost.status, CallStatus::Failed);
        assert_eq!(lost.error.unwrap().kind, "lost");
    }

    #[tokio::test]
    async fn spawned_calls_are_waited_for_and_finish_once() {
        let calls = Calls::default();
        let id = calls.create("demo", "square", "python");
        let pending = calls.wait(&id, Duration::from_millis(10)).await.unwrap();
        assert_eq!(pending.status, CallStatus::Running);
        calls.finish(&id, Outcome::value(serde_json::json!(49)));
        // Finished before anyone waited: the wait still sees it at once (a generous bound
        // well under MAX_WAIT tells "at once" from "at the timeout").
        let done = tokio::time::timeout(Duration::from_secs(20), calls.wait(&id, MAX_WAIT))
            .await
            .expect("a finished call is seen without waiting for the timeout")
            .unwrap();
        assert_eq!(done.status, CallStatus::Succeeded);
        assert_eq!(done.result, Some(serde_json::json!(49)));
        assert!(calls.wait("ca-unknown", Duration::ZERO).await.is_none());
    }
}
