//! Dicts and Queues by name: `/v1/dicts` and `/v1/queues` list them; `PUT` makes one,
//! `DELETE` removes it with what it holds, and `POST` runs one operation
//! (`{"op": "put", "key": ..., "value_json": "..."}`), as the SDK's `lode.Dict` and
//! `lode.Queue` do.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::api::error::{ApiError, ApiResult};
use crate::store::objects::{Kind, ObjectError, Objects, Request};

/// The routes, for the token-guarded part of the API.
pub fn router(objects: Arc<Objects>) -> Router {
    Router::new()
        .route("/v1/dicts", get(|s| list(s, Kind::Dict)))
        .route("/v1/queues", get(|s| list(s, Kind::Queue)))
        .route(
            "/v1/dicts/{name}",
            axum::routing::put(|s, p| create(s, p, Kind::Dict))
                .delete(|s, p| delete(s, p, Kind::Dict))
                .post(|s, p, b| request(s, p, b, Kind::Dict)),
        )
        .route(
            "/v1/queues/{name}",
            axum::routing::put(|s, p| create(s, p, Kind::Queue))
                .delete(|s, p| delete(s, p, Kind::Queue))
                .post(|s, p, b| request(s, p, b, Kind::Queue)),
        )
        .with_state(objects)
}

impl From<ObjectError> for ApiError {
    fn from(e: ObjectError) -> Self {
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError::new(status, e.kind, e.message)
    }
}

async fn list(State(objects): State<Arc<Objects>>, kind: Kind) -> ApiResult<Response> {
    let listed = objects.list(kind)?;
    Ok(Json(serde_json::json!({ "objects": listed })).into_response())
}

async fn create(
    State(objects): State<Arc<Objects>>,
    Path(name): Path<String>,
    kind: Kind,
) -> ApiResult<Response> {
    let made = objects.create(kind, &name)?;
    let status = if made {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(serde_json::json!({ "created": made }))).into_response())
}

async fn delete(
    State(objects): State<Arc<Objects>>,
    Path(name): Path<String>,
    kind: Kind,
) -> ApiResult<StatusCode> {
    if objects.delete(kind, &name)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {} named {name:?}", kind.title()),
        ))
    }
}

async fn request(
    State(objects): State<Arc<Objects>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
    kind: Kind,
) -> ApiResult<Response> {
    let request: Request = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("the body is not a {} request: {e}", kind.title()),
        )
    })?;
    let answer = objects.request(kind, &name, request).await?;
    Ok(Json(answer).into_response())
}
