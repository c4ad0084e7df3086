//! Python web apps behind the public listener: the ASGI or WSGI app a function returns, or
//! the web server it starts, in the function's containers.
//!
//! Lode parses HTTP here (hyper) and hands each request to a container as a web input: its
//! scope (method, path, headers, as ASGI names them) in the input, its body in base64 parts
//! after it, the response back as a start and body parts, streamed both ways. A WebSocket
//! to an ASGI app is upgraded here and its messages relayed the same way. The app sees
//! itself served at its URL's root: by host (`<app>--<function>.lode.localhost`) the whole
//! path is its own; by path, the function's prefix is its `root_path` (WSGI's
//! `SCRIPT_NAME`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures::{SinkExt, Stream, StreamExt};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use lode_native_runner::agent::{FromAgent, Outcome, ToAgent};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::{
    CloseFrame, Role, WebSocketConfig, frame::coding::CloseCode,
};
use tokio_tungstenite::tungstenite::{Message, handshake::derive_accept_key};
use wasmtime_wasi_http::Error as HttpError;

use crate::control::{Control, PythonRoute};
use crate::native::pool::WebExchange;
use crate::proto::log::Stream as LogStream;
use crate::proto::manifest::WebServe;
use crate::wasm::http::{ResponseBody, error_response};

/// The largest part of a request body sent to a container in one message.
const BODY_PART: usize = 64 << 10;

/// The largest WebSocket message taken from a client: in base64 it stays well under what
/// one message to an agent may carry.
const MAX_WS_MESSAGE: usize = 16 << 20;

/// Headers that belong to one connection, never passed through.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "proxy-authenticate",
];

/// Serves one request for a Python web app. `root_path` is where the app is mounted (empty
/// when addressed by host), `path_and_query` the rest of the target.
pub async fn serve(
    control: &Arc<Control>,
    app: &str,
    route: &PythonRoute,
    mut req: Request<Incoming>,
    root_path: String,
    path_and_query: &str,
    id: &str,
) -> Response<ResponseBody> {
    let pool = control
        .app(app)
        .and_then(|live| live.pools.get(&route.function).cloned());
    let Some(pool) = pool else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &format!(
                "{app}/{} has no container pool; redeploy the app",
                route.function
            ),
            id,
        );
    };
    let websocket = is_websocket(&req);
    if websocket && route.serve != WebServe::Asgi {
        return error_response(
            StatusCode::NOT_IMPLEMENTED,
            "websocket_unsupported",
            "WebSockets reach ASGI apps (@asgi_app) only",
            id,
        );
    }
    let max_body = control.wasm_bounds.max_body;
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body) {
        return crate::wasm::http::too_large(&control.metrics, app, max_body, id);
    }
    let scope = scope(&req, root_path, path_and_query, websocket);
    let (events, mut events_rx) = mpsc::unbounded_channel();
    let (assigned, assigned_rx) = oneshot::channel();
    let exchange = WebExchange {
        events,
        assigned: Some(assigned),
    };
    let kind = if websocket { "websocket" } else { "http" };
    let mut payload = serde_json::Map::new();
    payload.insert(kind.into(), scope);
    if let Some(method) = &route.class_method {
        payload.insert("method".into(), Value::String(method.clone()));
    }
    // A request without a body (most GETs) says so in the input: no body message follows.
    let bodiless = !websocket && http_body::Body::is_end_stream(req.body());
    if bodiless {
        payload.insert("body_done".into(), Value::Bool(true));
    }
    let (outcome_tx, mut outcome_rx) = oneshot::channel();
    {
        let pool = pool.clone();
        tokio::spawn(async move {
            let outcome = pool.submit_web(payload, exchange).await;
            let _ = outcome_tx.send(outcome);
        });
    }
    if websocket {
        let upgrade = hyper::upgrade::on(&mut req);
        return websocket_start(
            control,
            app,
            &route.function,
            &req,
            upgrade,
            assigned_rx,
            events_rx,
            outcome_rx,
            id,
        )
        .await;
    }
    // The request body goes to the container once one takes the input.
    let (mut channel_tx, channel_rx) = oneshot::channel();
    if bodiless {
        tokio::spawn(async move {
            if let Some(assigned) = assignment(assigned_rx, &mut channel_tx).await {
                let _ = channel_tx.send(assigned);
            }
        });
    } else {
        tokio::spawn(send_body(
            req.into_body(),
            assigned_rx,
            channel_tx,
            max_body,
        ));
    }
    // Events first: a quick app's start is queued before its outcome is.
    let first = tokio::select! {
        biased;
        event = events_rx.recv() => event,
        outcome = &mut outcome_rx => {
            return failed(control, app, &route.function, outcome.ok(), id);
        }
    };
    match first {
        Some(FromAgent::HttpStart {
            status,
            headers,
            body,
            done,
            ..
        }) => {
            let first = body
                .map(|b| Bytes::from(B64.decode(b).unwrap_or_default()))
                .filter(|b| !b.is_empty());
            let mut response = if done {
                Response::new(crate::wasm::http::full(first.unwrap_or_default()))
            } else {
                let body = WebBody {
                    first,
                    events: events_rx,
                    finished: false,
                    disconnect: channel_rx,
                };
                Response::new(StreamBody::new(body).boxed_unsync())
            };
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            for (name, value) in headers {
                if HOP_BY_HOP.contains(&name.to_ascii_lowercase().as_str()) {
                    continue;
                }
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&value),
                ) {
                    response.headers_mut().append(name, value);
                }
            }
            response
        }
        _ => failed(control, app, &route.function, outcome_rx.await.ok(), id),
    }
}

fn is_websocket(req: &Request<Incoming>) -> bool {
    let has = |name: http::header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(http::header::CONNECTION, "upgrade") && has(http::header::UPGRADE, "websocket")
}

/// The request as an ASGI scope (the agent turns it into a WSGI environ where it must).
fn scope(
    req: &Request<Incoming>,
    root_path: String,
    path_and_query: &str,
    websocket: bool,
) -> Value {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let headers: Vec<Value> = req
        .headers()
        .iter()
        .filter(|(name, _)| websocket || !HOP_BY_HOP.contains(&name.as_str()))
        .map(|(name, value)| json!([name.as_str(), String::from_utf8_lossy(value.as_bytes())]))
        .collect();
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let (server_name, server_port) = match host.rsplit_once(':') {
        Some((name, port)) if port.parse::<u16>().is_ok() => (name, port.parse().unwrap_or(80)),
        _ => (host, 80u16),
    };
    let path = percent_decode(path);
    let mut scope = json!({
        "type": if websocket { "websocket" } else { "http" },
        "http_version": "1.1",
        "scheme": if websocket { "ws" } else { "http" },
        "path": path,
        "raw_path": path_and_query.split('?').next().unwrap_or("/"),
        "query_string": query,
        "root_path": root_path,
        "headers": headers,
        "server": [server_name, server_port],
    });
    if !websocket {
        scope["method"] = Value::String(req.method().as_str().to_string());
    } else {
        let protocols: Vec<String> = req
            .headers()
            .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
            .filter(|p| !p.is_empty())
            .collect();
        scope["subprotocols"] = json!(protocols);
    }
    scope
}

fn percent_decode(path: &str) -> String {
    percent_encoding::percent_decode_str(path)
        .decode_utf8_lossy()
        .into_owned()
}

/// Streams the request body to the container that took the input, in parts; a body over
/// `max_body` is cut off with a disconnect. Hands the container's channel on for the
/// response to say when the client went away.
/// The container's end of an input, once one takes it; `None` if the client went away first
/// (its handler dropped `channel`'s receiver), which lets go of `assigned` so the pool drops
/// the input unrun.
async fn assignment(
    assigned: oneshot::Receiver<(String, mpsc::UnboundedSender<ToAgent>)>,
    channel: &mut oneshot::Sender<(String, mpsc::UnboundedSender<ToAgent>)>,
) -> Option<(String, mpsc::UnboundedSender<ToAgent>)> {
    tokio::select! {
        assigned = assigned => assigned.ok(),
        () = channel.closed() => None,
    }
}

async fn send_body(
    mut body: Incoming,
    assigned: oneshot::Receiver<(String, mpsc::UnboundedSender<ToAgent>)>,
    mut channel: oneshot::Sender<(String, mpsc::UnboundedSender<ToAgent>)>,
    max_body: u64,
) {
    let Some((id, to_agent)) = assignment(assigned, &mut channel).await else {
        return;
    };
    let _ = channel.send((id.clone(), to_agent.clone()));
    let mut sent = 0u64;
    let part = |bytes: &[u8], more_body: bool| ToAgent::HttpBody {
        id: id.clone(),
        body: B64.encode(bytes),
        more_body,
    };
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            let _ = to_agent.send(ToAgent::HttpDisconnect { id: id.clone() });
            return;
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        sent += data.len() as u64;
        if sent > max_body {
            let _ = to_agent.send(ToAgent::HttpDisconnect { id: id.clone() });
            return;
        }
        for chunk in data.chunks(BODY_PART) {
            if to_agent.send(part(chunk, true)).is_err() {
                return;
            }
        }
    }
    let _ = to_agent.send(part(&[], false));
}

/// A response body fed by the agent's body parts. Dropped before its last part (the client
/// went away), it tells the app so.
struct WebBody {
    /// A part that came with the response's start.
    first: Option<Bytes>,
    events: mpsc::UnboundedReceiver<FromAgent>,
    finished: bool,
    disconnect: oneshot::Receiver<(String, mpsc::UnboundedSender<ToAgent>)>,
}

impl Stream for WebBody {
    type Item = Result<Frame<Bytes>, HttpError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if self.finished {
            return Poll::Ready(None);
        }
        loop {
            return match self.events.poll_recv(cx) {
                Poll::Ready(Some(FromAgent::HttpBody {
                    body, more_body, ..
                })) => {
                    if !more_body {
                        self.finished = true;
                    }
                    let bytes = B64.decode(body).unwrap_or_default();
                    if bytes.is_empty() {
                        if self.finished {
                            return Poll::Ready(None);
                        }
                        continue;
                    }
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(bytes)))))
                }
                Poll::Ready(Some(_)) => continue,
                // The container ended (or failed the input) before the last part.
                Poll::Ready(None) => {
                    self.finished = true;
                    Poll::Ready(Some(Err(HttpError::ConnectionTerminated)))
                }
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

impl Drop for WebBody {
    fn drop(&mut self) {
        if !self.finished
            && let Ok((id, to_agent)) = self.disconnect.try_recv()
        {
            let _ = to_agent.send(ToAgent::HttpDisconnect { id });
        }
    }
}

/// The answer when the app failed or ended without a response: the kind and request id
/// for the client, the message and traceback in the app's logs.
fn failed(
    control: &Arc<Control>,
    app: &str,
    function: &str,
    outcome: Option<Result<Outcome, crate::native::pool::Rejected>>,
    id: &str,
) -> Response<ResponseBody> {
    let (status, kind, detail) = match outcome {
        Some(Ok(outcome)) => match outcome.error {
            Some(error) => {
                let status = match error.kind.as_str() {
                    "TimeoutError" => StatusCode::GATEWAY_TIMEOUT,
                    "container_exited" | "container_failed" => StatusCode::BAD_GATEWAY,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                let detail = format!(
                    "{}: {}\n{}",
                    error.kind,
                    error.message,
                    error.traceback.as_deref().unwrap_or_default()
                );
                (status, error.kind, detail)
            }
            None => (
                StatusCode::BAD_GATEWAY,
                "no_response".to_string(),
                "the app finished without sending a response".to_string(),
            ),
        },
        Some(Err(crate::native::pool::Rejected::QueueFull(_))) => {
            return error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                "the app's queue is full; retry shortly",
                id,
            );
        }
        Some(Err(crate::native::pool::Rejected::Closed)) | None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable".to_string(),
            "the app was replaced or removed while the request waited".to_string(),
        ),
    };
    control.logs.push(
        app,
        Some(id),
        LogStream::System,
        format!("{function} failed a web request: {detail}"),
    );
    let message = format!("the app failed with {kind}; `lode logs {app}` has request {id}");
    error_response(status, &kind, &message, id)
}

/// A WebSocket to an ASGI app: the app accepts (101, then messages both ways until either
/// side closes) or refuses (403).
#[allow(clippy::too_many_arguments)]
async fn websocket_start(
    control: &Arc<Control>,
    app: &str,
    function: &str,
    req: &Request<Incoming>,
    upgrade: hyper::upgrade::OnUpgrade,
    assigned: oneshot::Receiver<(String, mpsc::UnboundedSender<ToAgent>)>,
    mut events: mpsc::UnboundedReceiver<FromAgent>,
    mut outcome: oneshot::Receiver<Result<Outcome, crate::native::pool::Rejected>>,
    id: &str,
) -> Response<ResponseBody> {
    let Some(key) = req.headers().get(http::header::SEC_WEBSOCKET_KEY) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_websocket",
            "a WebSocket handshake needs Sec-WebSocket-Key",
            id,
        );
    };
    let accept_key = derive_accept_key(key.as_bytes());
    let Ok((input, to_agent)) = assigned.await else {
        return failed(control, app, function, outcome.await.ok(), id);
    };
    let first = tokio::select! {
        biased;
        event = events.recv() => event,
        ended = &mut outcome => return failed(control, app, function, ended.ok(), id),
    };
    let (subprotocol, headers) = match first {
        Some(FromAgent::WsAccept {
            subprotocol,
            headers,
            ..
        }) => (subprotocol, headers),
        Some(FromAgent::WsClose { .. }) => {
            return error_response(
                StatusCode::FORBIDDEN,
                "websocket_refused",
                "the app closed the WebSocket before accepting it",
                id,
            );
        }
        _ => return failed(control, app, function, outcome.await.ok(), id),
    };
    tokio::spawn(relay(upgrade, input, to_agent, events));
    let mut response = Response::new(crate::wasm::http::full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("Upgrade"),
    );
    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(value) = HeaderValue::from_str(&accept_key) {
        h.insert(http::header::SEC_WEBSOCKET_ACCEPT, value);
    }
    if let Some(value) = subprotocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        h.insert(http::header::SEC_WEBSOCKET_PROTOCOL, value);
    }
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            h.append(name, value);
        }
    }
    response
}

/// Relays WebSocket messages between the client and the app until either closes.
async fn relay(
    upgrade: hyper::upgrade::OnUpgrade,
    input: String,
    to_agent: mpsc::UnboundedSender<ToAgent>,
    mut events: mpsc::UnboundedReceiver<FromAgent>,
) {
    let disconnect = |code: u16| ToAgent::WsDisconnect {
        id: input.clone(),
        code,
    };
    let Ok(upgraded) = upgrade.await else {
        let _ = to_agent.send(disconnect(1006));
        return;
    };
    // A message well under what one agent message may carry, once in base64.
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_WS_MESSAGE))
        .max_frame_size(Some(MAX_WS_MESSAGE));
    let socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Server,
        Some(config),
    )
    .await;
    let (mut sink, mut stream) = socket.split();
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    let _ = to_agent.send(ToAgent::WsReceive {
                        id: input.clone(),
                        text: Some(text.to_string()),
                        bytes: None,
                    });
                }
                Some(Ok(Message::Binary(data))) => {
                    let _ = to_agent.send(ToAgent::WsReceive {
                        id: input.clone(),
                        text: None,
                        bytes: Some(B64.encode(&data)),
                    });
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    let _ = to_agent.send(disconnect(code));
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    let _ = to_agent.send(disconnect(1006));
                    return;
                }
            },
            event = events.recv() => match event {
                Some(FromAgent::WsSend { text, bytes, .. }) => {
                    let message = match (text, bytes) {
                        (Some(text), _) => Message::text(text),
                        (None, Some(bytes)) => Message::binary(B64.decode(bytes).unwrap_or_default()),
                        (None, None) => continue,
                    };
                    if sink.send(message).await.is_err() {
                        let _ = to_agent.send(disconnect(1006));
                        return;
                    }
                }
                Some(FromAgent::WsClose { code, reason, .. }) => {
                    let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    // An app still waiting to receive learns the socket is gone.
                    let _ = to_agent.send(disconnect(code));
                    return;
                }
                Some(_) => {}
                // The app's input ended (or its container did).
                None => {
                    let frame = CloseFrame { code: CloseCode::Error, reason: "the app ended".into() };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    return;
                }
            },
        }
    }
}
