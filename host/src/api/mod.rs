//! The JSON API (`/v1/...` and `/metrics`), behind the bearer token: apps, deploys and logs
//! (`apps.rs`), calls, secrets and volumes (`functions.rs`), builds and containers
//! (`containers.rs`), sandboxes (`sandboxes.rs`), Dicts and Queues (`objects.rs`); errors and
//! shared shapes in `error.rs`.

pub mod apps;
pub mod containers;
pub mod error;
pub mod functions;
pub mod objects;
pub mod sandboxes;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};

use crate::api::error::ApiError;
use crate::control::Control;
use apps::{deploy, get_app, info, list_apps, logs, metrics, remove_app};

/// The API router; `token` guards every route but `/healthz`.
pub fn router(
    control: Arc<Control>,
    native: Arc<crate::native::Native>,
    sandboxes: Arc<crate::sandboxes::Sandboxes>,
    max_file_bytes: u64,
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
        .merge(objects::router(control.objects.clone()))
        .merge(functions::router(control))
        .merge(containers::router(native))
        .merge(sandboxes::router(sandboxes, max_file_bytes))
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
