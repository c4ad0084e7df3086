//! The API for functions by name (call, spawn, poll), their pools' figures, secrets and
//! volumes. One payload shape for both engines: `{"args": [...], "kwargs": {...}}` in,
//! `{"result": ...}` or `{"error": {"kind", "message", ...}}` out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::StreamExt;
use lode_native_runner::agent::Outcome;
use serde::Deserialize;
use serde_json::Value;

use crate::api::error::{ApiError, ApiQuery, not_deployed, sorted_json};
use crate::control::Control;
use crate::control::forward::{Delivery, Forward};
use crate::function::{CallError, Dispatch};
use crate::proto::apps::{SecretList, VolumeList};
use crate::proto::calls::{CallAnswer, HistoryPage};
use crate::proto::manifest::is_secret_name;
use crate::proto::stats::AppStats;

/// The routes, for the token-guarded part of the API.
pub fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/v1/apps/{app}/functions/{function}/call", post(call))
        .route("/v1/apps/{app}/functions/{function}/spawn", post(spawn))
        .route(
            "/v1/apps/{app}/functions/{function}/call_gen",
            post(call_gen),
        )
        .route("/v1/calls/{id}", get(poll))
        .route("/v1/calls/{id}/cancel", post(cancel))
        .route("/v1/apps/{app}/stats", get(stats))
        .route("/v1/apps/{app}/calls", get(history))
        .route("/v1/secrets", get(list_secrets))
        .route("/v1/secrets/{name}", put(put_secret).delete(delete_secret))
        .route("/v1/volumes", get(list_volumes))
        .route("/v1/volumes/{name}", put(create_volume))
        .with_state(control)
}

/// The HTTP answer for a finished call: 200 with the result, or the error with a status
/// that says whose fault it was.
pub fn outcome_response(outcome: Outcome) -> Response {
    match outcome.error {
        Some(error) => {
            let status = match error.kind.as_str() {
                "TimeoutError" => StatusCode::GATEWAY_TIMEOUT,
                "container_exited" | "container_failed" => StatusCode::BAD_GATEWAY,
                "not_found" => StatusCode::NOT_FOUND,
                "no_containers" | "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
                "too_many_calls" => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (status, sorted_json(&CallAnswer::Failed { error })).into_response()
        }
        None => sorted_json(&match outcome.result_pickled {
            Some(result_pickled) => CallAnswer::Pickled { result_pickled },
            None => CallAnswer::Value {
                result: outcome.result.unwrap_or(Value::Null),
            },
        })
        .into_response(),
    }
}

/// The HTTP answer for a call that could not be made (unknown function, full queue...).
pub fn call_error_response(e: CallError) -> Response {
    let retry_after = e.retry_after_header();
    let mut response = (
        e.status_code(),
        Json(serde_json::json!({ "error": e.error })),
    )
        .into_response();
    if let Some(value) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

fn body_json(body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Ok(serde_json::json!({}));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad(format!(
            "the call body is not JSON ({e}); send {{\"args\": [...], \"kwargs\": {{...}}}}"
        ))
    })
}

async fn call(
    State(control): State<Arc<Control>>,
    Path((app, function)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = body_json(&body)?;
    Ok(
        match control.call(&app, &function, &body, None, None).await {
            Ok(outcome) => outcome_response(outcome),
            Err(e) => call_error_response(e),
        },
    )
}

/// The route another host sharing the state forwards a call to (`POST
/// /v1/peer/apps/{app}/functions/{function}/call`): it runs here, never forwarded again.
pub fn peer_router(control: Arc<Control>) -> Router {
    Router::new()
        .route(
            &crate::control::forward::peer_path("{app}", "{function}"),
            post(peer_call),
        )
        .with_state(control)
}

async fn peer_call(
    State(control): State<Arc<Control>>,
    Path((app, function)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = body_json(&body)?;
    let called = control
        .call_at(
            &app,
            &function,
            &body,
            None,
            None,
            Delivery {
                attempts: 0,
                forward: Forward::Never,
            },
        )
        .await;
    Ok(match called {
        Ok(outcome) => outcome_response(outcome),
        Err(e) => call_error_response(e),
    })
}

/// A generator's values as they come, one NDJSON line each (`{"result": ...}` or
/// `{"result_pickled": ...}`), then `{"done": true}` or `{"error": {...}}`.
async fn call_gen(
    State(control): State<Arc<Control>>,
    Path((app, function)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = body_json(&body)?;
    let generated = match control.call_gen(&app, &function, &body, None, None) {
        Ok(generated) => generated,
        Err(e) => return Ok(call_error_response(e)),
    };
    let crate::function::Generated {
        values,
        outcome,
        pickle,
    } = generated;
    let values = tokio_stream::wrappers::UnboundedReceiverStream::new(values).filter_map(
        move |message| async move {
            let lode_native_runner::agent::FromAgent::Yield {
                result,
                result_pickled,
                ..
            } = message
            else {
                return None;
            };
            let line = match result_pickled {
                Some(data) if pickle => serde_json::json!({ "result_pickled": data }),
                Some(_) => serde_json::json!({"error": {
                    "kind": "invalid_result",
                    "message": "the generator sent a pickled value, but the function is deployed for JSON",
                }}),
                None => serde_json::json!({ "result": result.unwrap_or(Value::Null) }),
            };
            Some(line.to_string())
        },
    );
    let end = futures::stream::once(async move {
        let line = match outcome.await {
            Ok(Ok(Outcome { error: None, .. })) => serde_json::json!({"done": true}),
            Ok(Ok(Outcome {
                error: Some(error), ..
            })) => serde_json::json!({ "error": error }),
            Ok(Err(e)) => serde_json::json!({ "error": e.error }),
            Err(_) => {
                serde_json::json!({"error": {"kind": "internal", "message": "the call task failed"}})
            }
        };
        line.to_string()
    });
    Ok(crate::api::error::ndjson(values.chain(end)))
}

async fn spawn(
    State(control): State<Arc<Control>>,
    Path((app, function)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = body_json(&body)?;
    Ok(
        match control.spawn(&app, &function, body, None, None).await {
            Ok(id) => Json(serde_json::json!({ "call_id": id })).into_response(),
            Err(e) => call_error_response(e),
        },
    )
}

#[derive(Deserialize)]
struct PollQuery {
    /// Seconds to wait for the call to finish (at most 60).
    #[serde(default)]
    wait: f64,
}

async fn cancel(
    State(control): State<Arc<Control>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let cancelled = control.calls.cancel(&id).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("cancelling call {id} failed: {e:#}; retry"),
        )
    })?;
    match cancelled {
        Some(record) => Ok(Json(record).into_response()),
        None => Err(ApiError::not_found(format!(
            "no call {id:?}: spawned calls are kept while the server runs"
        ))),
    }
}

async fn poll(
    State(control): State<Arc<Control>>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<PollQuery>,
) -> Result<Response, ApiError> {
    let wait = Duration::from_secs_f64(if query.wait.is_finite() {
        query.wait.clamp(0.0, 60.0)
    } else {
        0.0
    });
    match control.calls.wait(&id, wait).await {
        Some(record) => Ok(Json(record).into_response()),
        None => Err(ApiError::not_found(format!(
            "no call {id:?}: spawned calls are kept while the server runs"
        ))),
    }
}

async fn stats(
    State(control): State<Arc<Control>>,
    Path(app): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let live = control.app(&app).ok_or_else(|| not_deployed(&app))?;
    let mut pools: Vec<_> = live.pools.values().map(|pool| pool.stats()).collect();
    pools.sort_by(|a, b| a.function.cmp(&b.function));
    Ok(sorted_json(&AppStats {
        app,
        version: live.record.version,
        functions: pools,
    }))
}

/// The most records one `GET /v1/apps/{app}/calls` returns.
const MAX_HISTORY_PAGE: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    #[serde(default)]
    limit: Option<usize>,
}

/// The app's recent calls, newest first (kept after the app is removed, until they expire).
async fn history(
    State(control): State<Arc<Control>>,
    Path(app): Path<String>,
    ApiQuery(query): ApiQuery<HistoryQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query.limit.unwrap_or(50).clamp(1, MAX_HISTORY_PAGE);
    let records = tokio::task::spawn_blocking(move || control.history.recent(&app, limit))
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!("history task failed: {e}")))?
        .map_err(ApiError::internal)?;
    Ok(sorted_json(&HistoryPage { calls: records }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretBody {
    values: BTreeMap<String, String>,
}

async fn put_secret(
    State(control): State<Arc<Control>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    if !is_secret_name(&name) {
        return Err(ApiError::bad(format!(
            "secret name {name:?} must be 1-63 letters, digits, '-' and '_'"
        )));
    }
    let body: SecretBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad(format!(
            "the secret is not valid ({e}); send {{\"values\": {{\"NAME\": \"value\"}}}}"
        ))
    })?;
    if body.values.is_empty() {
        return Err(ApiError::bad("a secret needs at least one NAME=VALUE"));
    }
    if let Some(bad) = body
        .values
        .keys()
        .find(|k| !crate::store::secrets::is_env_name(k))
    {
        return Err(ApiError::bad(format!(
            "{bad:?} is not an environment variable name (letters, digits and '_', not \
             starting with a digit)"
        )));
    }
    control
        .functions
        .secrets
        .put(&name, &body.values)
        .map_err(ApiError::internal)?;
    // The name only: values never reach a log.
    tracing::info!(secret = %name, keys = body.values.len(), "secret stored");
    Ok(StatusCode::NO_CONTENT)
}

async fn list_secrets(State(control): State<Arc<Control>>) -> Result<Json<Value>, ApiError> {
    let secrets = control
        .functions
        .secrets
        .list()
        .map_err(ApiError::internal)?;
    Ok(sorted_json(&SecretList { secrets }))
}

async fn delete_secret(
    State(control): State<Arc<Control>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    match control.functions.secrets.delete(&name) {
        Ok(true) => Ok(StatusCode::NO_CONTENT),
        Ok(false) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no secret {name:?} (`lode secret ls` lists them)"),
        )),
        Err(e) => Err(ApiError::internal(e)),
    }
}

async fn list_volumes(State(control): State<Arc<Control>>) -> Result<Json<Value>, ApiError> {
    let mut names =
        crate::store::volumes::list(&control.functions.volumes_dir).map_err(ApiError::internal)?;
    // Where hosts share volumes, those other hosts made too.
    if let Some(sync) = &control.functions.volume_sync {
        names.extend(sync.names().map_err(ApiError::internal)?);
        names.sort();
        names.dedup();
    }
    Ok(sorted_json(&VolumeList { volumes: names }))
}

async fn create_volume(
    State(control): State<Arc<Control>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    tokio::task::spawn_blocking(move || control.open_volume(&name, true))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::bad(format!("{e:#}")))?;
    Ok(StatusCode::NO_CONTENT)
}
