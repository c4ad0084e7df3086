//! The public HTTP listener: route a request to an app's `wasi:http` component and run it in
//! a fresh instance.
//!
//! Apps are addressed by path (`/<app>/...`, prefix stripped and passed in
//! `x-forwarded-prefix`) or by host (`<app>.lode.localhost`). Every request gets its own store
//! and instance; nothing is reused across requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use wasmtime::Trap;
use wasmtime_wasi_http::Error as HttpError;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use crate::control::{HttpFunction, Server};
use crate::telemetry::logs::Stream;
use crate::telemetry::metrics::{ErrorLabels, StatusLabels};
use crate::wasm::engine::GuestState;

/// Body of every public response.
pub type ResponseBody = UnsyncBoxBody<Bytes, HttpError>;

/// Suffix that addresses an app by host name.
pub const HOST_SUFFIX: &str = ".lode.localhost";

/// Header carrying the request id on every response.
pub const REQUEST_ID_HEADER: &str = "x-lode-request-id";

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    /// App name.
    pub app: String,
    /// Path (with query) the component sees.
    pub path_and_query: String,
    /// The stripped prefix, when addressed by path.
    pub prefix: Option<String>,
}

/// Picks the app from the `Host` header or the first path segment.
pub fn target(host: Option<&str>, uri: &Uri) -> Option<Target> {
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    if let Some(host) = host {
        let name = host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        });
        let name = name.to_ascii_lowercase();
        if let Some(app) = name.strip_suffix(HOST_SUFFIX)
            && !app.is_empty()
            && !app.contains('.')
        {
            return Some(Target {
                app: app.to_string(),
                path_and_query: format!("{}{query}", uri.path()),
                prefix: None,
            });
        }
    }
    let path = uri.path().strip_prefix('/')?;
    let (app, rest) = match path.split_once('/') {
        Some((app, rest)) => (app, format!("/{rest}")),
        None => (path, "/".to_string()),
    };
    if app.is_empty() {
        return None;
    }
    Some(Target {
        app: app.to_string(),
        path_and_query: format!("{rest}{query}"),
        prefix: Some(format!("/{app}")),
    })
}

fn request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn full(body: impl Into<Bytes>) -> ResponseBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A JSON error body: `{"error":{"kind","message","request_id"}}`.
fn error_response(
    status: StatusCode,
    kind: &str,
    message: &str,
    id: &str,
) -> Response<ResponseBody> {
    let body = serde_json::json!({
        "error": {"kind": kind, "message": message, "request_id": id}
    });
    let mut response = Response::new(full(format!("{body}\n")));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// How a guest's run ended.
enum Outcome {
    Finished,
    Trapped(String),
    TimedOut,
    /// It used up its `[limits] fuel`.
    FuelExhausted,
    /// Every pool slot is busy (`lode serve --instances`).
    Overloaded,
}

/// Serves one public request.
pub async fn handle(server: Arc<Server>, req: Request<Incoming>) -> Response<ResponseBody> {
    let started = Instant::now();
    let id = request_id();
    let mut response = route_and_run(&server, req, &id, started).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

async fn route_and_run(
    server: &Arc<Server>,
    req: Request<Incoming>,
    id: &str,
    started: Instant,
) -> Response<ResponseBody> {
    let host = req.headers().get(HOST).and_then(|h| h.to_str().ok());
    let Some(target) = target(host, req.uri()) else {
        return error_response(
            StatusCode::NOT_FOUND,
            "no_app",
            "address an app as http://HOST/<app>/... or http://<app>.lode.localhost/; \
             `lode ls` lists the deployed apps",
            id,
        );
    };
    let Some(app) = server.app(&target.app) else {
        let message = format!(
            "no app named {:?} is deployed here; `lode ls` lists the deployed apps and \
             `lode deploy PATH --name {}` deploys one",
            target.app, target.app
        );
        return error_response(StatusCode::NOT_FOUND, "no_app", &message, id);
    };
    let path = target.path_and_query.split('?').next().unwrap_or("/");
    // The longest path prefix wins, whichever engine serves it.
    let prefix_len = |p: &str| p.trim_end_matches('/').len();
    if let Some(route) = app.python_route(path).cloned()
        && app
            .route(path)
            .is_none_or(|wasm| prefix_len(&route.path) > prefix_len(&wasm.path))
    {
        drop(app);
        return python_endpoint(server, &target.app, route, req, id).await;
    }
    let Some(function) = app.route(path).cloned() else {
        let message = format!(
            "app {:?} has no web route for {path:?}; its routes are: {}",
            target.app,
            app.routes
                .iter()
                .map(|f| f.path.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return error_response(StatusCode::NOT_FOUND, "no_route", &message, id);
    };
    let prefix = target.prefix.clone();
    let path_and_query = target.path_and_query.clone();
    drop(app);
    let response = run(server, function.clone(), req, path_and_query, prefix, id).await;
    let series = &function.series;
    series.latency.observe(started.elapsed().as_secs_f64());
    match response.status().as_u16() {
        200 => series.ok.inc(),
        status => server
            .metrics
            .requests
            .get_or_create(&StatusLabels {
                app: function.app.to_string(),
                status,
            })
            .inc(),
    };
    response
}

/// A Python web endpoint: the JSON body (or the text, or nothing) is the function's one
/// argument, query parameters are its keyword arguments, and its result is the JSON answer.
async fn python_endpoint(
    server: &Arc<Server>,
    app: &str,
    route: crate::control::PythonRoute,
    req: Request<Incoming>,
    id: &str,
) -> Response<ResponseBody> {
    if let Some(method) = &route.method
        && !req.method().as_str().eq_ignore_ascii_case(method)
    {
        let mut response = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("{} takes {method} requests", route.path),
            id,
        );
        if let Ok(allow) = HeaderValue::from_str(&method.to_uppercase()) {
            response.headers_mut().insert(http::header::ALLOW, allow);
        }
        return response;
    }
    let max_body = server.limits.max_body;
    let kwargs: serde_json::Map<String, serde_json::Value> = req
        .uri()
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), serde_json::Value::String(v.into_owned())))
                .collect()
        })
        .unwrap_or_default();
    let body = match Limited::new(req.into_body(), max_body as usize)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return too_large(server, app, max_body, id);
        }
        Err(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "reading the body failed",
                id,
            );
        }
    };
    let args = if body.is_empty() {
        vec![]
    } else {
        vec![serde_json::from_slice(&body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&body).into_owned())
        })]
    };
    let call = serde_json::json!({"args": args, "kwargs": kwargs});
    match server.call(app, &route.function, &call).await {
        Ok(outcome) => match outcome.error {
            None => {
                let value = outcome.result.unwrap_or(serde_json::Value::Null);
                json_response(StatusCode::OK, &value)
            }
            Some(error) => {
                let status = if error.kind == "TimeoutError" {
                    StatusCode::GATEWAY_TIMEOUT
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                };
                // The public gets the kind and the request id; the message and traceback
                // (which may hold anything the code had) go to the app's logs.
                server.logs.push(
                    app,
                    Some(id),
                    Stream::System,
                    format!(
                        "{} failed: {}: {}\n{}",
                        route.function,
                        error.kind,
                        error.message,
                        error.traceback.as_deref().unwrap_or_default()
                    ),
                );
                let message = format!(
                    "the function failed with {}; `lode logs {app}` has request {id}",
                    error.kind
                );
                error_response(status, &error.kind, &message, id)
            }
        },
        Err(e) => {
            let retry_after = e.retry_after_header();
            let mut response = json_response(
                e.status_code(),
                &serde_json::json!({"error": e.error, "request_id": id}),
            );
            if let Some(value) = retry_after {
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, value);
            }
            response
        }
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ResponseBody> {
    let mut response = Response::new(full(serde_json::to_vec(body).expect("JSON serializes")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn count_error(server: &Server, app: &str, kind: &'static str) {
    server
        .metrics
        .errors
        .get_or_create(&ErrorLabels {
            app: app.to_string(),
            kind,
        })
        .inc();
}

async fn run(
    server: &Arc<Server>,
    function: Arc<HttpFunction>,
    req: Request<Incoming>,
    path_and_query: String,
    prefix: Option<String>,
    id: &str,
) -> Response<ResponseBody> {
    let app = function.app.clone();
    let max_body = server.limits.max_body;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_body) {
        return too_large(server, &app, max_body, id);
    }

    let (mut parts, body) = req.into_parts();
    parts.uri = match Uri::builder()
        .path_and_query(path_and_query.as_str())
        .build()
    {
        Ok(uri) => uri,
        Err(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_path",
                "the path is not valid",
                id,
            );
        }
    };
    // Only Lode sets this header; a client's own copy would mislead the component.
    parts.headers.remove("x-forwarded-prefix");
    if !parts.headers.contains_key(HOST) {
        // HTTP/1.0 clients may omit Host; wasi:http needs an authority.
        parts
            .headers
            .insert(HOST, HeaderValue::from_static("localhost"));
    }
    if let Some(prefix) = &prefix
        && let Ok(value) = HeaderValue::from_str(prefix)
    {
        parts.headers.insert("x-forwarded-prefix", value);
    }
    let over_limit = Arc::new(AtomicBool::new(false));
    let flag = over_limit.clone();
    let body = Limited::new(body, max_body as usize).map_err(move |e| {
        if e.is::<http_body_util::LengthLimitError>() {
            flag.store(true, Ordering::Relaxed);
            HttpError::HttpRequestBodySize(Some(max_body))
        } else {
            HttpError::ConnectionTerminated
        }
    });
    let req = Request::from_parts(parts, body);

    let deadline = Instant::now() + function.timeout;
    let request_id: Arc<str> = Arc::from(id);
    let wasi = server
        .logs
        .guest_wasi(app.clone(), request_id.clone())
        .build();
    let instantiate_started = Instant::now();
    let mut store = function.engine.new_store(
        GuestState::new(wasi, function.memory, function.outbound.clone()),
        deadline,
        function.fuel,
    );
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let prepared = (|| -> wasmtime::Result<_> {
        let incoming = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, req)?;
        let outparam = store.data_mut().http().new_response_outparam(sender)?;
        Ok((incoming, outparam))
    })();
    let (incoming, outparam) = match prepared {
        Ok(pair) => pair,
        Err(e) => {
            return error_response(StatusCode::BAD_REQUEST, "bad_request", &format!("{e}"), id);
        }
    };

    let task_server = server.clone();
    let task_function = function.clone();
    let task_id = request_id.clone();
    let task_over_limit = over_limit.clone();
    let task = tokio::spawn(async move {
        let run = async {
            let proxy = task_function.pre.instantiate_async(&mut store).await?;
            task_function
                .series
                .instantiate
                .observe(instantiate_started.elapsed().as_secs_f64());
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, incoming, outparam)
                .await
        };
        let outcome = match tokio::time::timeout_at(deadline.into(), run).await {
            Ok(Ok(())) => Outcome::Finished,
            Ok(Err(e)) if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) => Outcome::TimedOut,
            Ok(Err(e)) if e.downcast_ref::<Trap>() == Some(&Trap::OutOfFuel) => {
                Outcome::FuelExhausted
            }
            Ok(Err(e)) if e.is::<wasmtime::PoolConcurrencyLimitError>() => Outcome::Overloaded,
            Ok(Err(e)) => Outcome::Trapped(format!("{:#}", anyhow::Error::from(e))),
            Err(_) => Outcome::TimedOut,
        };
        if task_over_limit.load(Ordering::Relaxed) {
            // The client gets a 413; whatever the guest did after its body read failed (often
            // a trap writing to a response nobody reads) is a consequence, not a fault.
            task_server.logs.push(
                &task_function.app,
                Some(&task_id),
                Stream::System,
                format!("request body passed the limit of {max_body} bytes; answered 413"),
            );
        } else {
            report(&task_server, &task_function, &task_id, &outcome);
        }
        outcome
    });

    match receiver.await {
        Ok(Ok(response)) => {
            let response = coalesce(response).await;
            if over_limit.load(Ordering::Relaxed) {
                return too_large(server, &app, max_body, id);
            }
            response
        }
        Ok(Err(_)) if over_limit.load(Ordering::Relaxed) => too_large(server, &app, max_body, id),
        Ok(Err(code)) => {
            count_error(server, &app, "guest_error");
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "guest_error",
                &format!("the component answered with an error: {code:?}"),
                id,
            )
        }
        Err(_) => {
            let outcome = task
                .await
                .unwrap_or_else(|e| Outcome::Trapped(format!("task failed: {e}")));
            if over_limit.load(Ordering::Relaxed) {
                return too_large(server, &app, max_body, id);
            }
            match outcome {
                Outcome::TimedOut => error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    &format!(
                        "the component did not finish within its {:.3} s timeout",
                        function.timeout.as_secs_f64()
                    ),
                    id,
                ),
                Outcome::FuelExhausted => error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "fuel_exhausted",
                    &format!(
                        "the component used up its fuel of {} units (`[limits] fuel` sets it)",
                        function.fuel.unwrap_or_default()
                    ),
                    id,
                ),
                Outcome::Trapped(_) => error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "trap",
                    "the component trapped; `lode logs` shows the trap and its backtrace under \
                     this request id",
                    id,
                ),
                Outcome::Overloaded => {
                    let mut response = error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overloaded",
                        "every instance slot is busy; retry shortly (lode serve --instances \
                         sets how many requests run at once)",
                        id,
                    );
                    response
                        .headers_mut()
                        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                    response
                }
                Outcome::Finished => {
                    count_error(server, &app, "no_response");
                    error_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "no_response",
                        "the component returned without setting a response",
                        id,
                    )
                }
            }
        }
    }
}

/// How long to wait for the first body bytes before sending headers on their own.
const COALESCE_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

/// Sends headers together with the body bytes the guest has already written, so a short
/// response leaves in one write (with a `Content-Length` when the body is complete). A body
/// that is still being written streams on as before.
async fn coalesce(response: Response<ResponseBody>) -> Response<ResponseBody> {
    use std::task::Poll;
    let (parts, mut body) = response.into_parts();
    let first = match tokio::time::timeout(COALESCE_WAIT, body.frame()).await {
        Err(_) => return Response::from_parts(parts, body),
        Ok(first) => first,
    };
    let mut prefix = Vec::new();
    let mut next = first;
    let complete = loop {
        match next {
            None => break true,
            Some(frame) => {
                let is_data = matches!(&frame, Ok(f) if f.is_data());
                prefix.push(frame);
                if !is_data {
                    break false;
                }
            }
        }
        // Take what is ready now; stop at the first frame that is not.
        match std::future::poll_fn(|cx| {
            match http_body::Body::poll_frame(std::pin::Pin::new(&mut body), cx) {
                Poll::Pending => Poll::Ready(None),
                Poll::Ready(frame) => Poll::Ready(Some(frame)),
            }
        })
        .await
        {
            Some(frame) => next = frame,
            None => break false,
        }
    };
    if complete {
        let mut bytes = bytes::BytesMut::new();
        for frame in prefix {
            if let Ok(Some(data)) = frame.map(|f| f.into_data().ok()) {
                bytes.extend_from_slice(&data);
            }
        }
        // A full body has an exact size, from which hyper writes Content-Length (and
        // knows to leave it off where HEAD, 204 or 304 forbid it).
        return Response::from_parts(parts, full(bytes.freeze()));
    }
    let rest = http_body_util::BodyStream::new(body);
    let stream = futures::stream::iter(prefix).chain(rest);
    Response::from_parts(
        parts,
        http_body_util::StreamBody::new(stream).boxed_unsync(),
    )
}

fn too_large(server: &Server, app: &str, max_body: u64, id: &str) -> Response<ResponseBody> {
    count_error(server, app, "body_too_large");
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        &format!("request body is larger than this server's limit of {max_body} bytes"),
        id,
    )
}

/// Logs traps and timeouts where users look: the app's log and the server log.
fn report(server: &Server, function: &HttpFunction, id: &str, outcome: &Outcome) {
    match outcome {
        Outcome::Finished => {}
        Outcome::Overloaded => {
            count_error(server, &function.app, "overloaded");
            tracing::warn!(app = %function.app, request_id = id, "instance pool exhausted");
        }
        Outcome::TimedOut => {
            let line = format!(
                "request timed out after {:.3} s (function {})",
                function.timeout.as_secs_f64(),
                function.name
            );
            report_limit(server, function, id, "timeout", line);
        }
        Outcome::FuelExhausted => {
            let line = format!(
                "request used up its fuel of {} units (function {})",
                function.fuel.unwrap_or_default(),
                function.name
            );
            report_limit(server, function, id, "fuel_exhausted", line);
        }
        Outcome::Trapped(trap) => {
            count_error(server, &function.app, "trap");
            tracing::warn!(app = %function.app, request_id = id, function = function.name, "guest trapped: {trap}");
            for line in format!("trap in function {}: {trap}", function.name).lines() {
                server
                    .logs
                    .push(&function.app, Some(id), Stream::System, line.to_string());
            }
        }
    }
}

/// A request stopped by one of its limits: counted under `kind`, and `line` in both logs.
fn report_limit(
    server: &Server,
    function: &HttpFunction,
    id: &str,
    kind: &'static str,
    line: String,
) {
    count_error(server, &function.app, kind);
    tracing::warn!(app = %function.app, request_id = id, "{line}");
    server
        .logs
        .push(&function.app, Some(id), Stream::System, line);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(host: Option<&str>, uri: &str) -> Option<(String, String, Option<String>)> {
        let uri: Uri = uri.parse().unwrap();
        target(host, &uri).map(|t| (t.app, t.path_and_query, t.prefix))
    }

    #[test]
    fn routes_by_path_prefix() {
        assert_eq!(
            t(Some("127.0.0.1:8080"), "/hello/a/b?x=1"),
            Some(("hello".into(), "/a/b?x=1".into(), Some("/hello".into())))
        );
        assert_eq!(
            t(None, "/hello"),
            Some(("hello".into(), "/".into(), Some("/hello".into())))
        );
        assert_eq!(t(None, "/"), None);
    }

    #[test]
    fn routes_by_host() {
        assert_eq!(
            t(Some("hello.lode.localhost:8080"), "/x?y"),
            Some(("hello".into(), "/x?y".into(), None))
        );
        assert_eq!(
            t(Some("Hello.LODE.localhost"), "/"),
            Some(("hello".into(), "/".into(), None))
        );
        // Nested names are not apps; fall back to the path.
        assert_eq!(
            t(Some("a.b.lode.localhost"), "/c/"),
            Some(("c".into(), "/".into(), Some("/c".into())))
        );
    }
}
