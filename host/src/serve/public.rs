//! The public HTTP listener's routing: which app and function a request is for, and whether
//! a Wasm component (run by `wasm::http`) or a Python web endpoint (a call by name) answers.
//!
//! Apps are addressed by path (`/<app>/...`, prefix stripped and passed in
//! `x-forwarded-prefix`) or by host (`<app>.lode.localhost`).

use std::sync::Arc;
use std::time::Instant;

use http::header::HOST;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::control::{Control, PythonRoute};
use crate::function::Dispatch;
use crate::proto::log::Stream;
use crate::proto::manifest::WebServe;
use crate::telemetry::metrics::StatusLabels;
use crate::wasm::http::{self as wasm_http, ResponseBody, error_response, full, too_large};

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
    /// The function, when the host names one (`<app>--<function>.lode.localhost`): its
    /// ASGI or WSGI app or web server gets the whole path.
    pub function: Option<String>,
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
        if let Some(label) = name.strip_suffix(HOST_SUFFIX)
            && !label.is_empty()
            && !label.contains('.')
        {
            let (app, function) = match label.split_once("--") {
                Some((app, function)) if !app.is_empty() && !function.is_empty() => {
                    (app, Some(function.to_string()))
                }
                _ => (label, None),
            };
            return Some(Target {
                app: app.to_string(),
                path_and_query: format!("{}{query}", uri.path()),
                prefix: None,
                function,
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
        function: None,
    })
}

fn request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Serves one public request.
pub async fn handle(control: Arc<Control>, req: Request<Incoming>) -> Response<ResponseBody> {
    let started = Instant::now();
    let id = request_id();
    let mut response = route_and_run(&control, req, &id, started).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

async fn route_and_run(
    control: &Arc<Control>,
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
    // An app whose own name holds "--" keeps its host name.
    let whole = target
        .function
        .as_ref()
        .map(|f| format!("{}--{f}", target.app))
        .filter(|name| control.app(name).is_some());
    let target = match whole {
        Some(app) => Target {
            app,
            function: None,
            ..target
        },
        None => target,
    };
    let Some(app) = control.app(&target.app) else {
        let message = format!(
            "no app named {:?} is deployed here; `lode ls` lists the deployed apps and \
             `lode deploy PATH --name {}` deploys one",
            target.app, target.app
        );
        return error_response(StatusCode::NOT_FOUND, "no_app", &message, id);
    };
    if let Some(label) = &target.function {
        let Some(route) = app
            .python_routes
            .iter()
            .find(|r| r.serve != WebServe::Call && r.label() == *label)
            .cloned()
        else {
            let message = format!(
                "app {:?} has no web app or web server named {label:?} (addressed as \
                 <app>--<function>.lode.localhost)",
                target.app
            );
            return error_response(StatusCode::NOT_FOUND, "no_route", &message, id);
        };
        drop(app);
        return crate::serve::python_web::serve(
            control,
            &target.app,
            &route,
            req,
            String::new(),
            &target.path_and_query,
            id,
        )
        .await;
    }
    let path = target.path_and_query.split('?').next().unwrap_or("/");
    // The longest path prefix wins, whichever engine serves it.
    let prefix_len = |p: &str| p.trim_end_matches('/').len();
    if let Some(route) = app.python_route(path).cloned()
        && app
            .route(path)
            .is_none_or(|wasm| prefix_len(&route.path) > prefix_len(&wasm.path))
    {
        drop(app);
        if route.serve == WebServe::Call {
            return python_endpoint(control, &target.app, route, req, id).await;
        }
        // The app gets the path below its route; the prefix is its root path.
        let mount = route.path.trim_end_matches('/');
        let rest = &target.path_and_query[mount.len().min(target.path_and_query.len())..];
        let rest = if rest.is_empty() || rest.starts_with('?') {
            format!("/{rest}")
        } else {
            rest.to_string()
        };
        let root_path = format!("{}{mount}", target.prefix.as_deref().unwrap_or_default());
        return crate::serve::python_web::serve(
            control,
            &target.app,
            &route,
            req,
            root_path,
            &rest,
            id,
        )
        .await;
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
    let response = wasm_http::run(
        function.clone(),
        req,
        path_and_query,
        prefix,
        id,
        control.wasm_bounds.max_body,
        &control.logs,
        &control.metrics,
    )
    .await;
    let series = &function.series;
    series.latency.observe(started.elapsed().as_secs_f64());
    match response.status().as_u16() {
        200 => series.ok.inc(),
        status => control
            .metrics
            .requests
            .get_or_create(&StatusLabels {
                app: function.guest.app.to_string(),
                status,
            })
            .inc(),
    };
    response
}

/// A Python web endpoint: the JSON body (or the text, or nothing) is the function's one
/// argument, query parameters are its keyword arguments, and its result is the JSON answer.
async fn python_endpoint(
    control: &Arc<Control>,
    app: &str,
    route: PythonRoute,
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
    let max_body = control.wasm_bounds.max_body;
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
            return too_large(&control.metrics, app, max_body, id);
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
    match control.call(app, &route.function, &call, None, None).await {
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
                control.logs.push(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn t(host: Option<&str>, uri: &str) -> Option<(String, String, Option<String>)> {
        let uri: Uri = uri.parse().unwrap();
        target(host, &uri).map(|t| (t.app, t.path_and_query, t.prefix))
    }

    #[test]
    fn a_host_names_a_function_after_two_dashes() {
        let uri: Uri = "/docs?x=1".parse().unwrap();
        let target = target(Some("shop--web-app.lode.localhost:8080"), &uri).unwrap();
        assert_eq!(target.app, "shop");
        assert_eq!(target.function.as_deref(), Some("web-app"));
        assert_eq!(target.path_and_query, "/docs?x=1");
        use crate::proto::manifest::route_label;
        assert_eq!(route_label("Web_App", None), "web-app");
        assert_eq!(route_label("Site", Some("get_page")), "site-get-page");
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
