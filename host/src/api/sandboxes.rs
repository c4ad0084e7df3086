//! Sandboxes over the API: `/v1/sandboxes` (create, list by app and tag, get, terminate),
//! `/v1/sandboxes/{id}/tags` (replace its labels), `/v1/sandboxes/{id}/exec` (a process
//! streamed back as NDJSON, its stdin written through
//! `/v1/sandboxes/{id}/processes/{process}/stdin`) and `/v1/sandboxes/{id}/files` (read,
//! write, list, stat, mkdir, remove) and `/v1/sandboxes/{id}/snapshot` (its files as a new
//! image). `docs/sandboxes.md` has the whole of it.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::StreamExt;
use serde::Deserialize;

use crate::api::error::{ApiError, ApiQuery, ndjson, sorted_json};
use crate::native::grant::Caller;
use crate::proto::sandboxes::{
    ExecRequest, FileList, SandboxList, SandboxRequest, SnapshotAnswer, SnapshotRequest,
    TerminalSize,
};
use crate::sandboxes::Sandboxes;

/// The routes, for the token-guarded part of the API and a function container's
/// `api.sock`; file writes may carry up to `max_file_bytes`. Each request must carry its
/// [`Caller`] as an extension: a container reaches the sandboxes its app made, no others.
pub fn router(sandboxes: Arc<Sandboxes>, max_file_bytes: u64) -> Router {
    let one = Router::new()
        .route("/v1/sandboxes/{id}", get(get_one).delete(terminate))
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route("/v1/sandboxes/{id}/tags", axum::routing::put(set_tags))
        .route(
            "/v1/sandboxes/{id}/processes/{process}/stdin",
            post(write_stdin),
        )
        .route(
            "/v1/sandboxes/{id}/files",
            get(read_files).put(write_file).delete(remove_file),
        )
        .route("/v1/sandboxes/{id}/files/mkdir", post(make_dir))
        .route("/v1/sandboxes/{id}/snapshot", post(snapshot))
        .route(
            "/v1/sandboxes/{id}/processes/{process}/resize",
            post(resize),
        )
        .route_layer(middleware::from_fn_with_state(sandboxes.clone(), reach));
    Router::new()
        .route("/v1/sandboxes", post(create).get(list))
        .merge(one)
        .layer(DefaultBodyLimit::max(
            usize::try_from(max_file_bytes).unwrap_or(usize::MAX),
        ))
        .with_state(sandboxes)
}

/// Answers a sandbox the caller may not reach as one that does not exist.
async fn reach(
    State(sandboxes): State<Arc<Sandboxes>>,
    Extension(caller): Extension<Caller>,
    Path(params): Path<std::collections::HashMap<String, String>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(id) = params.get("id")
        && let Err(refused) = sandboxes.check_reach(&caller, id)
    {
        return ApiError::from(refused).into_response();
    }
    next.run(request).await
}

fn json_body<T: for<'de> Deserialize<'de>>(body: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("the {what} is not valid: {e}")))
}

async fn create(
    State(sandboxes): State<Arc<Sandboxes>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: SandboxRequest = json_body(&body, "sandbox request")?;
    let started = std::time::Instant::now();
    let info = sandboxes.create(request, &caller).await?;
    let mut response = sorted_json(&info).into_response();
    // What the create took in the server, for clients that time the API around it.
    let timing = format!("create;dur={:.3}", started.elapsed().as_secs_f64() * 1000.0);
    if let Ok(value) = HeaderValue::from_str(&timing) {
        response.headers_mut().insert("server-timing", value);
    }
    Ok(response)
}

/// `?app=NAME&tag=K=V&tag=...`: repeated tags all have to match.
async fn list(
    State(sandboxes): State<Arc<Sandboxes>>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mut app = None;
    let mut tags = BTreeMap::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "app" => app = Some(value.into_owned()),
            "tag" => {
                let Some((k, v)) = value.split_once('=') else {
                    return Err(ApiError::bad(format!("tag {value:?} is not KEY=VALUE")));
                };
                tags.insert(k.to_string(), v.to_string());
            }
            other => {
                return Err(ApiError::bad(format!(
                    "unknown query parameter {other:?} (app, tag)"
                )));
            }
        }
    }
    let sandboxes = sandboxes.list(app.as_deref(), &tags, &caller)?;
    Ok(sorted_json(&SandboxList { sandboxes }).into_response())
}

async fn get_one(
    State(sandboxes): State<Arc<Sandboxes>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(sorted_json(&sandboxes.get(&id)?).into_response())
}

async fn terminate(
    State(sandboxes): State<Arc<Sandboxes>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(sorted_json(&sandboxes.terminate(&id).await?).into_response())
}

async fn set_tags(
    State(sandboxes): State<Arc<Sandboxes>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let tags: BTreeMap<String, String> = json_body(&body, "tags (a JSON object of strings)")?;
    Ok(sorted_json(&sandboxes.set_tags(&id, tags)?).into_response())
}

async fn exec(
    State(sandboxes): State<Arc<Sandboxes>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: ExecRequest = json_body(&body, "exec request")?;
    let stream = sandboxes.exec(&id, request).await?;
    let lines = futures::stream::unfold(stream, |mut stream| async move {
        let line = stream.next().await?;
        Some((
            serde_json::to_string(&line).expect("exec lines serialize"),
            stream,
        ))
    });
    Ok(ndjson(lines.boxed()))
}

#[derive(Deserialize)]
struct StdinQuery {
    #[serde(default)]
    eof: bool,
}

async fn write_stdin(
    State(sandboxes): State<Arc<Sandboxes>>,
    Path((id, process)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<StdinQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    sandboxes
        .write_stdin(&id, &process, body.to_vec(), query.eof)
        .await?;
    Ok(Json(serde_json::json!({})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileQuery {
    path: String,
    /// `read` (the default), `ls` or `stat`.
    #[serde(default)]
    op: Option<String>,
    /// For a write: add to the end rather than replace.
    #[serde(default)]
    append: bool,
}

async fn read_files(
    State(sandboxes): State<Arc<Sandboxes>>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<FileQuery>,
) -> Result<Response, ApiError> {
    match query.op.as_deref().unwrap_or("read") {
        "read" => {
            let bytes = sandboxes.read_file(&id, &query.path).await?;
            let mut response = bytes.into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            Ok(response)
        }
        "ls" => {
            let entries = sandboxes.list_files(&id, &query.path).await?;
            Ok(sorted_json(&FileList { entries }).into_response())
        }
        "stat" => Ok(sorted_json(&sandboxes.stat_file(&id, &query.path).await?).into_response()),
        other => Err(ApiError::bad(format!(
            "op {other:?} is not one of: read, ls, stat"
        ))),
    }
}

async fn write_file(
    State(sandboxes): State<Arc<Sandboxes>>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<FileQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    sandboxes
        .write_file(&id, &query.path, body.to_vec(), query.append)
        .await?;
    Ok(Json(serde_json::json!({})).into_response())
}

async fn make_dir(
    State(sandboxes): State<Arc<Sandboxes>>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<FileQuery>,
) -> Result<Response, ApiError> {
    sandboxes.make_dir(&id, &query.path).await?;
    Ok(Json(serde_json::json!({})).into_response())
}

async fn remove_file(
    State(sandboxes): State<Arc<Sandboxes>>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<FileQuery>,
) -> Result<Response, ApiError> {
    sandboxes.remove_file(&id, &query.path).await?;
    Ok(Json(serde_json::json!({})).into_response())
}

async fn snapshot(
    State(sandboxes): State<Arc<Sandboxes>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: SnapshotRequest = if body.is_empty() {
        SnapshotRequest::default()
    } else {
        json_body(&body, "snapshot request")?
    };
    if let (Caller::Container(_), Some(tag)) = (&caller, &request.tag) {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "not_allowed_in_container",
            format!(
                "images cannot be tagged ({tag:?}) from inside a container; snapshot without a \
                 tag and use the digest"
            ),
        ));
    }
    let image = sandboxes.snapshot(&id, request.tag.as_deref()).await?;
    Ok(sorted_json(&SnapshotAnswer {
        image,
        tag: request.tag,
    })
    .into_response())
}

async fn resize(
    State(sandboxes): State<Arc<Sandboxes>>,
    Path((id, process)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let size: TerminalSize = json_body(&body, "terminal size")?;
    sandboxes.resize(&id, &process, size.rows, size.cols)?;
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}
