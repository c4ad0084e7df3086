//! `wasi:http` requests: run one in a fresh instance of the app's component and answer with
//! what it wrote, or with a named error when it trapped, timed out or passed a limit.
//! Every request gets its own store and instance, unless its function opted in to reusing
//! them (`instance_reuse`, see [`crate::wasm::reuse`]). Which
//! function a request reaches is the public listener's business (`serve::public`).

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
use wasmtime_wasi_http::Error as HttpError;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use crate::proto::log::Stream;
use crate::telemetry::logs::LogStore;
use crate::telemetry::metrics::{ErrorLabels, Metrics};
use crate::wasm::guest::GuestState;
use crate::wasm::reuse::{GuestInstance, InstancePool};
use crate::wasm::store::{StoreError, WasmGuest};
use crate::wasm::trap::{Stop, classify, describe};

/// Body of every public response.
pub type ResponseBody = UnsyncBoxBody<Bytes, HttpError>;

/// A Wasm function that serves public HTTP.
pub struct HttpFunction {
    /// What every run of it needs: app, name, engine, timeout, fuel, memory, outbound.
    pub guest: WasmGuest,
    /// Path prefix within the app.
    pub path: String,
    /// Pre-linked component.
    pub pre: ProxyPre<GuestState>,
    /// Metric series this function's requests update.
    pub series: crate::telemetry::metrics::AppSeries,
    /// Idle instances kept for the next requests, when the function opted in
    /// (`instance_reuse`); `None`: a fresh instance per request.
    pub reuse: Option<InstancePool>,
}

pub(crate) fn full(body: impl Into<Bytes>) -> ResponseBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A JSON error body: `{"error":{"kind","message","request_id"}}`.
pub fn error_response(
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

/// Counts an error of `kind` for `app` in `/metrics`.
pub fn count_error(metrics: &Metrics, app: &str, kind: &'static str) {
    metrics
        .errors
        .get_or_create(&ErrorLabels {
            app: app.to_string(),
            kind,
        })
        .inc();
}

/// Runs `req` on `function` as `path_and_query` (the app's prefix, if addressed by path,
/// stripped and passed in `x-forwarded-prefix`), with request id `id` and bodies up to
/// `max_body` bytes. Its output and any trap go to `logs`; errors are counted in `metrics`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    function: Arc<HttpFunction>,
    req: Request<Incoming>,
    path_and_query: String,
    prefix: Option<String>,
    id: &str,
    max_body: u64,
    logs: &Arc<LogStore>,
    metrics: &Arc<Metrics>,
) -> Response<ResponseBody> {
    let guest = &function.guest;
    let app = guest.app.clone();
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_body) {
        return too_large(metrics, &app, max_body, id);
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

    let deadline = Instant::now() + guest.timeout;
    let request_id: Arc<str> = Arc::from(id);
    let instantiate_started = Instant::now();
    let kept =
        (function.reuse.as_ref()).and_then(|pool| pool.take(guest, request_id.clone(), deadline));
    let mut instance = match kept {
        Some(kept) => kept,
        None => match (guest.store_with_output(logs, request_id.clone(), &[], deadline)).await {
            Ok((store, output)) => GuestInstance::fresh(store, output),
            Err(why @ StoreError::Gpu(_)) => {
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    why.kind(),
                    &why.to_string(),
                    id,
                );
            }
            Err(why) => {
                return error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    &why.to_string(),
                    id,
                );
            }
        },
    };
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let prepared = (|| -> wasmtime::Result<_> {
        let store = &mut instance.store;
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

    let (task_logs, task_metrics) = (logs.clone(), metrics.clone());
    let task_function = function.clone();
    let task_id = request_id.clone();
    let task_over_limit = over_limit.clone();
    let task = tokio::spawn(async move {
        let run = async {
            let proxy = match instance.proxy.take() {
                Some(proxy) => proxy,
                None => {
                    let proxy = task_function
                        .pre
                        .instantiate_async(&mut instance.store)
                        .await?;
                    task_function
                        .series
                        .instantiate
                        .observe(instantiate_started.elapsed().as_secs_f64());
                    proxy
                }
            };
            let handled = proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut instance.store, incoming, outparam)
                .await;
            instance.proxy = Some(proxy);
            handled
        };
        let outcome = match tokio::time::timeout_at(deadline.into(), run).await {
            Ok(Ok(())) => Outcome::Finished,
            Ok(Err(e)) => match classify(&e) {
                Stop::Timeout => Outcome::TimedOut,
                Stop::OutOfFuel => Outcome::FuelExhausted,
                Stop::Overloaded => Outcome::Overloaded,
                Stop::StackOverflow | Stop::OutOfMemory | Stop::Trap => {
                    Outcome::Trapped(describe(e))
                }
            },
            Err(_) => Outcome::TimedOut,
        };
        let over_limit = task_over_limit.load(Ordering::Relaxed);
        // Only a clean finish leaves an instance fit for another request; a trap, a timeout
        // (mid-run) or a body cut off at the limit drops it with its store.
        let kept = (task_function.reuse.as_ref())
            .filter(|_| matches!(outcome, Outcome::Finished) && !over_limit);
        if let Some(pool) = kept
            && let Err(why) = pool.give_back(instance)
        {
            tracing::debug!(app = %task_function.guest.app, reason = ?why, "instance not kept");
        }
        if over_limit {
            // The client gets a 413; whatever the guest did after its body read failed (often
            // a trap writing to a response nobody reads) is a consequence, not a fault.
            task_logs.push(
                &task_function.guest.app,
                Some(&task_id),
                Stream::System,
                format!("request body passed the limit of {max_body} bytes; answered 413"),
            );
        } else {
            report(
                &task_logs,
                &task_metrics,
                &task_function,
                &task_id,
                &outcome,
            );
        }
        outcome
    });

    match receiver.await {
        Ok(Ok(response)) => {
            let response = coalesce(response).await;
            if over_limit.load(Ordering::Relaxed) {
                return too_large(metrics, &app, max_body, id);
            }
            response
        }
        Ok(Err(_)) if over_limit.load(Ordering::Relaxed) => too_large(metrics, &app, max_body, id),
        Ok(Err(code)) => {
            count_error(metrics, &app, "guest_error");
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
                return too_large(metrics, &app, max_body, id);
            }
            match outcome {
                Outcome::TimedOut => error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    &format!(
                        "the component did not finish within its {:.3} s timeout",
                        guest.timeout.as_secs_f64()
                    ),
                    id,
                ),
                Outcome::FuelExhausted => error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "fuel_exhausted",
                    &format!(
                        "the component used up its fuel of {} units (`[limits] fuel` sets it)",
                        guest.fuel.unwrap_or_default()
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
                    count_error(metrics, &app, "no_response");
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

/// The 413 for a body past `max_body`, counted for `app`.
pub fn too_large(metrics: &Metrics, app: &str, max_body: u64, id: &str) -> Response<ResponseBody> {
    count_error(metrics, app, "body_too_large");
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        &format!("request body is larger than this server's limit of {max_body} bytes"),
        id,
    )
}

/// Logs traps and timeouts where users look: the app's log and the server log.
fn report(
    logs: &LogStore,
    metrics: &Metrics,
    function: &HttpFunction,
    id: &str,
    outcome: &Outcome,
) {
    let guest = &function.guest;
    match outcome {
        Outcome::Finished => {}
        Outcome::Overloaded => {
            count_error(metrics, &guest.app, "overloaded");
            tracing::warn!(app = %guest.app, request_id = id, "instance pool exhausted");
        }
        Outcome::TimedOut => {
            let line = format!(
                "request timed out after {:.3} s (function {})",
                guest.timeout.as_secs_f64(),
                guest.name
            );
            report_limit(logs, metrics, guest, id, "timeout", line);
        }
        Outcome::FuelExhausted => {
            let line = format!(
                "request used up its fuel of {} units (function {})",
                guest.fuel.unwrap_or_default(),
                guest.name
            );
            report_limit(logs, metrics, guest, id, "fuel_exhausted", line);
        }
        Outcome::Trapped(trap) => {
            count_error(metrics, &guest.app, "trap");
            tracing::warn!(app = %guest.app, request_id = id, function = guest.name, "guest trapped: {trap}");
            for line in format!("trap in function {}: {trap}", guest.name).lines() {
                logs.push(&guest.app, Some(id), Stream::System, line.to_string());
            }
        }
    }
}

/// A request stopped by one of its limits: counted under `kind`, and `line` in both logs.
fn report_limit(
    logs: &LogStore,
    metrics: &Metrics,
    guest: &WasmGuest,
    id: &str,
    kind: &'static str,
    line: String,
) {
    count_error(metrics, &guest.app, kind);
    tracing::warn!(app = %guest.app, request_id = id, "{line}");
    logs.push(&guest.app, Some(id), Stream::System, line);
}
