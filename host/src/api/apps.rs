//! Apps over the API: list, read, deploy (streamed), remove, their logs, and `/metrics`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};

use crate::api::error::{ApiError, ApiQuery, ApiResult, ndjson, not_deployed, sorted_json};
use crate::control::Control;
use crate::proto::apps::{AppList, AppSummary, FunctionSummary};
use crate::proto::manifest::{Manifest, dns_label_rule, is_dns_label};

/// Where this server's other listeners are, so a client that knows only the API (flags or
/// environment, no client file) finds the registry to upload to.
pub(crate) async fn info(State(control): State<Arc<Control>>) -> Json<crate::proto::apps::Urls> {
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

pub(crate) async fn list_apps(State(control): State<Arc<Control>>) -> Json<serde_json::Value> {
    let apps = control
        .apps()
        .iter()
        .map(|a| app_summary(&control, a))
        .collect();
    sorted_json(&AppList { apps })
}

/// `GET /v1/hosts`: the hosts sharing this state, this one first.
pub(crate) async fn list_hosts(
    State(control): State<Arc<Control>>,
) -> ApiResult<Json<serde_json::Value>> {
    let listing = control.clone();
    // What routing sees: `lode hosts` shows where calls would go now.
    let hosts = tokio::task::spawn_blocking(move || listing.host.routed(&listing))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "state_unavailable",
                format!("reading the hosts' records: {e:#}"),
            )
        })?;
    Ok(sorted_json(&hosts))
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

pub(crate) async fn get_app(
    State(control): State<Arc<Control>>,
    Path(app): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    check_app_name(&app)?;
    let live = control.app(&app).ok_or_else(|| not_deployed(&app))?;
    let mut summary = app_summary(&control, &live);
    summary.manifest = Some(live.record.manifest.clone());
    Ok(sorted_json(&summary))
}

/// A deployed app's summary (functions, web paths, URLs), without its manifest: what a
/// function container's `App.lookup` and `Function.get_web_url` ask.
pub(crate) async fn app_summary_only(
    State(control): State<Arc<Control>>,
    Path(app): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    check_app_name(&app)?;
    let live = control.app(&app).ok_or_else(|| not_deployed(&app))?;
    Ok(sorted_json(&app_summary(&control, &live)))
}

pub(crate) async fn remove_app(
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

pub(crate) async fn deploy(
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
pub(crate) struct LogQuery {
    #[serde(default)]
    follow: bool,
    #[serde(default = "default_tail")]
    tail: usize,
}

fn default_tail() -> usize {
    200
}

pub(crate) async fn logs(
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

pub(crate) async fn metrics(State(control): State<Arc<Control>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        control.metrics.encode(),
    )
        .into_response()
}
