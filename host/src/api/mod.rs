//! The JSON API (`/v1/...` and `/metrics`), behind the bearer token.

pub mod containers;
pub mod functions;

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};

use crate::control::Control;
use crate::control::deploy::DeployError;
use crate::proto::apps::{AppList, AppSummary, FunctionSummary};
use crate::proto::manifest::{Manifest, dns_label_rule, is_dns_label};

/// An API error: a status, a short kind and a message that says what to do.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }

    /// A 404 for something that does not exist; the message says where to look.
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// A 400 for a request that is not valid.
    pub(crate) fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub(crate) fn internal(error: impl std::fmt::Display) -> Self {
        let id = format!("{:016x}", rand::random::<u64>());
        tracing::error!(error_id = id, "internal error: {error}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("internal error {id}; the server log has the details"),
        )
    }
}

/// A query string parsed into `T`; one that does not parse is refused in the API's JSON error
/// shape, naming the parameter, rather than as axum's plain text.
pub(crate) struct ApiQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(query)| Self(query))
            .map_err(|rejection| ApiError::bad(rejection.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"kind": self.kind, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

impl From<crate::native::Refused> for ApiError {
    fn from(refused: crate::native::Refused) -> Self {
        if refused.status == 500 {
            return Self::internal(refused.message);
        }
        let status = StatusCode::from_u16(refused.status).unwrap_or(StatusCode::BAD_REQUEST);
        Self::new(status, refused.kind, refused.message)
    }
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        let (status, kind) = match &e {
            DeployError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_manifest"),
            DeployError::MissingBlobs(_) => (StatusCode::BAD_REQUEST, "missing_blobs"),
            DeployError::Unsupported(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unsupported"),
            DeployError::Component { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "bad_component"),
            DeployError::Internal(_) => return Self::internal(e),
        };
        Self::new(status, kind, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The API router; `token` guards every route but `/healthz`.
pub fn router(
    control: Arc<Control>,
    native: Arc<crate::native::Native>,
    token: Arc<str>,
) -> Router {
    let guarded = Router::new()
        .route("/v1/info", get(info))
        .route("/v1/apps", get(list_apps))
        .route(
            "/v1/apps/{app}",
            put(deploy).get(get_app).delete(remove_app),
        )
        .route("/v1/apps/{app}/logs", get(logs))
        .route("/metrics", get(metrics))
        .with_state(control.clone())
        .merge(crate::api::functions::router(control))
        .merge(crate::api::containers::router(native))
        .layer(middleware::from_fn_with_state(token, require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(guarded)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(token): State<Arc<str>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(given) if constant_time_eq(given.trim().as_bytes(), token.as_bytes()) => {
            next.run(req).await
        }
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the API token is wrong; use the token from the client.json that `lode serve` wrote",
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing API token: send `Authorization: Bearer <token>` (the CLI reads it from \
             client.json, LODE_TOKEN or --token)",
        )
        .into_response(),
    }
}

/// Where this server's other listeners are, so a client that knows only the API (flags or
/// environment, no client file) finds the registry to upload to.
async fn info(State(control): State<Arc<Control>>) -> Json<crate::proto::apps::Urls> {
    Json(control.urls.clone())
}

fn app_summary(control: &Control, app: &crate::control::LiveApp) -> AppSummary {
    let manifest = &app.record.manifest;
    AppSummary {
        app: manifest.app.clone(),
        version: app.record.version,
        deployed_at_ms: app.record.deployed_at_ms,
        functions: manifest
            .functions
            .iter()
            .map(|f| FunctionSummary {
                name: f.name.clone(),
                runtime: f.runtime,
                component: f.component.clone(),
                web: f.web.as_ref().map(|w| w.path.clone()),
            })
            .collect(),
        urls: control.urls(manifest),
        manifest: None,
    }
}

async fn list_apps(State(control): State<Arc<Control>>) -> Json<AppList> {
    let apps = control
        .apps()
        .iter()
        .map(|a| app_summary(&control, a))
        .collect();
    Json(AppList { apps })
}

fn check_app_name(app: &str) -> ApiResult<()> {
    if is_dns_label(app) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_name",
            dns_label_rule("app", app),
        ))
    }
}

pub(crate) fn not_deployed(app: &str) -> ApiError {
    ApiError::not_found(format!(
        "no app named {app:?} is deployed; `lode ls` lists the deployed apps"
    ))
}

async fn get_app(
    State(control): State<Arc<Control>>,
    Path(app): Path<String>,
) -> ApiResult<Json<AppSummary>> {
    check_app_name(&app)?;
    let live = control.app(&app).ok_or_else(|| not_deployed(&app))?;
    let mut summary = app_summary(&control, &live);
    summary.manifest = Some(live.record.manifest.clone());
    Ok(Json(summary))
}

async fn remove_app(
    State(control): State<Arc<Control>>,
    Path(app): Path<String>,
) -> ApiResult<StatusCode> {
    check_app_name(&app)?;
    match control.remove(&app).await {
        Ok(true) => Ok(StatusCode::NO_CONTENT),
        Ok(false) => Err(not_deployed(&app)),
        Err(e) => Err(ApiError::internal(e)),
    }
}

pub(crate) fn ndjson(lines: impl futures::Stream<Item = String> + Send + 'static) -> Response {
    let body = Body::from_stream(lines.map(|mut line| {
        line.push('\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    }));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

async fn deploy(
    State(control): State<Arc<Control>>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    check_app_name(&app)?;
    if headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| !ct.starts_with("application/json"))
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad_content_type",
            "send the deployment manifest as application/json",
        ));
    }
    let manifest: Manifest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_manifest",
            format!("the manifest is not valid: {e} (docs/manifest.md has the schema)"),
        )
    })?;
    if manifest.app != app {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_manifest",
            format!(
                "the manifest names app {:?} but was sent to /v1/apps/{app}",
                manifest.app
            ),
        ));
    }
    control.precheck(&manifest)?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(control.clone().deploy(manifest, tx));
    let lines = ReceiverStream::new(rx)
        .map(|event| serde_json::to_string(&event).expect("deploy events serialize"));
    Ok(ndjson(lines))
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    #[serde(default)]
    follow: bool,
    #[serde(default = "default_tail")]
    tail: usize,
}

fn default_tail() -> usize {
    200
}

async fn logs(
    State(control): State<Arc<Control>>,
    Path(app): Path<String>,
    ApiQuery(query): ApiQuery<LogQuery>,
) -> ApiResult<Response> {
    check_app_name(&app)?;
    if control.app(&app).is_none() {
        return Err(not_deployed(&app));
    }
    let (recent, rx) = control.logs.snapshot(&app, query.tail);
    let recent = futures::stream::iter(recent);
    let to_line = |line: crate::proto::log::LogLine| {
        serde_json::to_string(&line).expect("log lines serialize")
    };
    if !query.follow {
        return Ok(ndjson(recent.map(to_line)));
    }
    let live = BroadcastStream::new(rx).filter_map(|item| async move {
        match item {
            Ok(line) => Some(line),
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                Some(crate::proto::log::LogLine {
                    time_ms: 0,
                    app: String::new(),
                    request_id: None,
                    stream: crate::proto::log::Stream::System,
                    line: format!("[lode: {n} lines were dropped because the reader fell behind]"),
                })
            }
        }
    });
    Ok(ndjson(recent.chain(live).map(to_line)))
}

async fn metrics(State(control): State<Arc<Control>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        control.metrics.encode(),
    )
        .into_response()
}
