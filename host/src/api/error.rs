//! How the API answers when something is wrong: [`ApiError`] (a status, a short kind and a
//! message), and the shapes every handler shares (query strings, NDJSON streams).

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::Query;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use crate::control::deploy::DeployError;

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
        // A 500's message is already the id of what the server log holds.
        let status =
            StatusCode::from_u16(refused.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
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

pub(crate) type ApiResult<T> = Result<T, ApiError>;

pub(crate) fn not_deployed(app: &str) -> ApiError {
    ApiError::not_found(format!(
        "no app named {app:?} is deployed; `lode ls` lists the deployed apps"
    ))
}

pub(crate) fn ndjson(lines: impl futures::Stream<Item = String> + Send + 'static) -> Response {
    let body = Body::from_stream(lines.map(|mut line| {
        line.push('\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    }));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

/// A typed answer as the API has always sent it: through `serde_json::Value`, whose object
/// keys come out sorted, so clients see the same bytes whichever struct wrote them.
pub(crate) fn sorted_json<T: serde::Serialize>(answer: &T) -> Json<serde_json::Value> {
    Json(serde_json::to_value(answer).expect("API answers serialize"))
}
