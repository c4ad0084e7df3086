//! What both engines share: where a call sits in its tree of calls and the bounds on it, the
//! error a call answers with, and [`Dispatch`], the one way an engine reaches another function.
//!
//! The control plane implements [`Dispatch`]; a Wasm guest's imports and a container's calls
//! hold a `Weak<dyn Dispatch>`, so neither engine names the control plane, and a call from
//! either goes through the same router.

pub mod gpus;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use lode_native_runner::agent::{CallRequest, ErrorInfo, Outcome};
use serde_json::{Map, Value};

use crate::proto::calls::CallRecord;

/// The router every call by name goes through, whichever engine makes it.
#[async_trait::async_trait]
pub trait Dispatch: Send + Sync {
    /// Runs `app/function` on `body` and waits for its outcome. `tree` is the call's place
    /// when a function makes it (`None`: a call from outside); `caller` is the app whose code
    /// calls (`None`: the operator, through the API), which is checked against the callee's
    /// `allow_callers`.
    async fn call(
        &self,
        app: &str,
        function: &str,
        body: &Value,
        tree: Option<CallTree>,
        caller: Option<&str>,
    ) -> Result<Outcome, CallError>;

    /// Starts `app/function` on `body` in the background and returns the call's id; what the
    /// call would refuse at once is refused here.
    async fn spawn(
        &self,
        app: &str,
        function: &str,
        body: Value,
        tree: Option<CallTree>,
        caller: Option<&str>,
    ) -> Result<String, CallError>;

    /// A spawned call's record, after waiting up to `wait` for it to finish. Code of `caller`
    /// sees only calls of functions it may call; others read as unknown.
    async fn wait(&self, caller: &str, id: &str, wait: Duration) -> Result<CallRecord, ErrorInfo>;

    /// Calls a generator function: its values stream as it yields them.
    fn call_gen(
        &self,
        app: &str,
        function: &str,
        body: &Value,
        tree: Option<CallTree>,
        caller: Option<&str>,
    ) -> Result<Generated, CallError>;

    /// `commit` or `reload` of volume `name`, from a container that mounts it (read-write,
    /// for a commit): where hosts share volumes, publishes this host's copy's changes or
    /// brings in other hosts' commits; on one host, there is nothing to sync.
    async fn volume(&self, name: &str, action: &str) -> Result<Value, ErrorInfo>;

    /// One operation on a Dict or Queue, from code in a container.
    async fn object(
        &self,
        kind: crate::store::objects::Kind,
        name: &str,
        request: crate::store::objects::Request,
    ) -> Result<Value, ErrorInfo>;
}

/// A generator call under way: the values it yields as they come (as `Yield` messages), and
/// how it ended.
pub struct Generated {
    /// The agent's `Yield` messages.
    pub values: tokio::sync::mpsc::UnboundedReceiver<lode_native_runner::agent::FromAgent>,
    /// The call's outcome once the generator is done (or failed).
    pub outcome: tokio::task::JoinHandle<Result<Outcome, CallError>>,
    /// Whether the function was deployed for pickle (its values may be pickled).
    pub pickle: bool,
}

/// The call body a container's call request carries: arguments, or pickled ones, and a
/// class method with its parameters.
pub fn call_body(call: &CallRequest) -> Value {
    let mut body = Map::new();
    let method = call.method.clone().map(Value::String);
    for (key, value) in [
        ("args", call.args.clone()),
        ("kwargs", call.kwargs.clone()),
        ("method", method),
        ("params", call.params.clone()),
    ] {
        if let Some(value) = value {
            body.insert(key.into(), value);
        }
    }
    if let Some(pickled) = &call.pickled {
        body.insert("pickled".into(), Value::String(pickled.clone()));
    }
    Value::Object(body)
}

/// How deep calls through `invoke` may nest (a call from the API is depth 0), unless the
/// app's `[limits] call_depth` says otherwise.
pub const DEFAULT_CALL_DEPTH: u32 = 16;

/// How many calls one top-level call may make in all, nested ones included, unless the
/// app's `[limits] fan_out` says otherwise.
pub const DEFAULT_FAN_OUT: u32 = 100_000;

/// Where a call sits in the tree of calls that one call from outside led to.
#[derive(Clone)]
pub struct CallTree {
    /// 0 for the call from outside.
    depth: u32,
    /// The tightest `call_depth` of the apps on the way down.
    max_depth: u32,
    /// Calls made in the whole tree so far, and the root app's `fan_out`.
    made: Arc<AtomicU32>,
    max_made: u32,
    /// Made by a Wasm function (in-process), rather than from outside or a container.
    from_wasm: bool,
}

impl CallTree {
    /// 0 for the call from outside, one more for each call on the way down.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Whether a Wasm function made the call, in-process.
    pub fn from_wasm(&self) -> bool {
        self.from_wasm
    }

    /// Where a call to a function of an app with `limits` stands: at the root of a new tree
    /// when it came from outside (`None`), or where its caller put it, with this app's
    /// depth bound folded in.
    pub fn enter(tree: Option<CallTree>, limits: CallLimits) -> Self {
        match tree {
            Some(tree) => Self {
                max_depth: tree.max_depth.min(limits.call_depth),
                ..tree
            },
            None => Self {
                depth: 0,
                max_depth: limits.call_depth,
                made: Arc::default(),
                max_made: limits.fan_out,
                from_wasm: false,
            },
        }
    }

    /// Takes one more call, one level deeper, from a function (a Wasm one: `from_wasm`) whose
    /// app allows `fan_out` calls; returns the callee's place, or the named error when a
    /// bound is hit.
    pub fn admit(&self, fan_out: u32, from_wasm: bool) -> Result<CallTree, ErrorInfo> {
        if self.depth >= self.max_depth {
            return Err(ErrorInfo::lode(
                "call_depth",
                format!(
                    "calls nest more than {} deep (a function calling itself without end? \
                     `[limits] call_depth` sets the bound)",
                    self.max_depth
                ),
            ));
        }
        let max_made = self.max_made.min(fan_out);
        if self.made.fetch_add(1, Ordering::Relaxed) >= max_made {
            return Err(ErrorInfo::lode(
                "fan_out",
                format!(
                    "one call may lead to at most {max_made} calls in all (`[limits] fan_out` \
                     sets the bound)"
                ),
            ));
        }
        Ok(CallTree {
            depth: self.depth + 1,
            from_wasm,
            ..self.clone()
        })
    }
}

/// An app's bounds on the calls its functions make.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    /// How deep calls may nest.
    pub call_depth: u32,
    /// How many calls one call from outside may lead to.
    pub fan_out: u32,
}

impl CallLimits {
    /// The app's `[limits]`, with the defaults where it names none.
    pub fn of(limits: &crate::proto::manifest::AppLimits) -> Self {
        Self {
            call_depth: limits.call_depth.unwrap_or(DEFAULT_CALL_DEPTH),
            fan_out: limits.fan_out.unwrap_or(DEFAULT_FAN_OUT),
        }
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

    /// An error of `kind` answered with `status`.
    pub fn new(status: u16, kind: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            error: ErrorInfo::lode(kind, message),
            retry_after: None,
        }
    }
}

/// Checks a call body: `{"args": [...], "kwargs": {...}}`, or `{"pickled": "..."}` for a
/// function that takes pickle. Returns what the agent gets.
pub fn check_payload(
    body: &Value,
    pickle: bool,
    methods: Option<&[String]>,
) -> Result<Map<String, Value>, String> {
    let Some(object) = body.as_object() else {
        return Err(
            "the call body must be a JSON object: {\"args\": [...], \"kwargs\": {...}}".into(),
        );
    };
    if let Some(unknown) = object.keys().find(|k| {
        !matches!(
            k.as_str(),
            "args" | "kwargs" | "pickled" | "method" | "params" | "options"
        )
    }) {
        return Err(format!(
            "unknown field {unknown:?} in the call body (expected args and kwargs)"
        ));
    }
    let mut payload = Map::new();
    match (methods, object.get("method")) {
        (None, None) => {}
        (None, Some(_)) => {
            return Err("this function is not a class; call it without \"method\"".into());
        }
        (Some(methods), None) => {
            return Err(format!(
                "this function is a class; name one of its methods in \"method\" ({})",
                methods.join(", ")
            ));
        }
        (Some(methods), Some(method)) => {
            let Some(name) = method.as_str().filter(|m| methods.iter().any(|k| k == m)) else {
                return Err(format!(
                    "the class has no method {method} (it has: {})",
                    methods.join(", ")
                ));
            };
            payload.insert("method".into(), Value::String(name.into()));
        }
    }
    if let Some(params) = object.get("params") {
        if methods.is_none() || !params.is_object() {
            return Err("\"params\" is an object of a class's parameter values".into());
        }
        payload.insert("params".into(), params.clone());
    }
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

/// A call from inside a container of `caller_app`: the same dispatch, answered as an
/// outcome. Made while serving an input, it is one more step of that input's call
/// `tree`, bounded like a Wasm function's `invoke` (`fan_out`: the caller app's bound).
pub async fn container_call(
    dispatch: &dyn Dispatch,
    caller_app: &str,
    tree: Option<&CallTree>,
    fan_out: u32,
    call: CallRequest,
) -> Outcome {
    let body = call_body(&call);
    let app = call.app.unwrap_or_else(|| caller_app.to_string());
    match call.op.as_str() {
        "call" | "spawn" => {
            let Some(function) = call.function else {
                return Outcome::failed(ErrorInfo::lode("invalid_request", "no function named"));
            };
            let tree = match tree.map(|tree| tree.admit(fan_out, false)).transpose() {
                Ok(tree) => tree,
                Err(error) => return Outcome::failed(error),
            };
            if call.op == "call" {
                match dispatch
                    .call(&app, &function, &body, tree, Some(caller_app))
                    .await
                {
                    Ok(outcome) => outcome,
                    Err(e) => Outcome::failed(e.error),
                }
            } else {
                match dispatch
                    .spawn(&app, &function, body, tree, Some(caller_app))
                    .await
                {
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
            match dispatch.wait(caller_app, &id, wait).await {
                Ok(record) => Outcome::value(serde_json::to_value(record).unwrap_or_default()),
                Err(error) => Outcome::failed(error),
            }
        }
        "dict" | "queue" => {
            use crate::store::objects::Kind;
            let kind = if call.op == "dict" {
                Kind::Dict
            } else {
                Kind::Queue
            };
            let request = call
                .request
                .ok_or_else(|| "no request".to_string())
                .and_then(|r| serde_json::from_value(r).map_err(|e| e.to_string()));
            match (call.name, request) {
                (Some(name), Ok(request)) => match dispatch.object(kind, &name, request).await {
                    Ok(answer) => Outcome::value(answer),
                    Err(error) => Outcome::failed(error),
                },
                (None, _) => Outcome::failed(ErrorInfo::lode("invalid_request", "no name")),
                (_, Err(e)) => Outcome::failed(ErrorInfo::lode("invalid_request", e)),
            }
        }
        "volume" => {
            let action = call
                .request
                .as_ref()
                .and_then(|r| r.get("action"))
                .and_then(Value::as_str);
            match (call.name, action) {
                (Some(name), Some(action)) => match dispatch.volume(&name, action).await {
                    Ok(answer) => Outcome::value(answer),
                    Err(error) => Outcome::failed(error),
                },
                _ => Outcome::failed(ErrorInfo::lode(
                    "invalid_request",
                    "a volume request names the volume and its action",
                )),
            }
        }
        other => Outcome::failed(ErrorInfo::lode(
            "invalid_request",
            format!("unknown op {other:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_args_and_kwargs_or_pickle_where_allowed() {
        let payload = check_payload(&serde_json::json!({"args": [4]}), false, None).unwrap();
        assert_eq!(
            Value::Object(payload),
            serde_json::json!({"args": [4], "kwargs": {}})
        );
        assert!(check_payload(&serde_json::json!([4]), false, None).is_err());
        assert!(check_payload(&serde_json::json!({"args": 4}), false, None).is_err());
        assert!(
            check_payload(&serde_json::json!({"arsg": []}), false, None)
                .unwrap_err()
                .contains("arsg")
        );
        assert!(check_payload(&serde_json::json!({"pickled": "eA=="}), false, None).is_err());
        assert!(check_payload(&serde_json::json!({"pickled": "eA=="}), true, None).is_ok());
        // A class's call names one of its methods, and may carry its parameters.
        let methods = ["predict".to_string()];
        let payload = check_payload(
            &serde_json::json!({"method": "predict", "params": {"n": 1}, "args": [2]}),
            false,
            Some(&methods),
        )
        .unwrap();
        assert_eq!(payload["method"], "predict");
        assert_eq!(payload["params"], serde_json::json!({"n": 1}));
        assert_eq!(payload["args"], serde_json::json!([2]));
        for (body, methods, error) in [
            (
                serde_json::json!({"args": []}),
                Some(&methods[..]),
                "is a class",
            ),
            (
                serde_json::json!({"method": "fit"}),
                Some(&methods[..]),
                "no method \"fit\"",
            ),
            (
                serde_json::json!({"method": "predict"}),
                None,
                "not a class",
            ),
            (serde_json::json!({"params": {}}), None, "\"params\""),
        ] {
            let got = check_payload(&body, false, methods).unwrap_err();
            assert!(got.contains(error), "{body}: {got}");
        }
    }
}
