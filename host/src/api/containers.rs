//! Image builds and one-shot containers over the API: `POST /v1/images/build` and
//! `POST /v1/containers`, each streamed back as NDJSON.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Router};
use futures::StreamExt;
use lode_native_runner::builder::{BuildEvent, StepNetwork};
use lode_native_runner::sandbox::spawn;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::error::{ApiError, ndjson};
use crate::native::Native;
use crate::native::containers::PreparedContainer;
use crate::native::grant::Caller;
use crate::proto::containers::{
    BuildEnd, BuildLine, BuildRequest, ContainerLine, ContainerRequest,
};

/// The routes, for the token-guarded part of the API.
pub fn router(native: Arc<Native>) -> Router {
    Router::new()
        .route("/v1/images/build", post(build))
        .route("/v1/containers", post(run_container))
        .with_state(native)
}

fn json_body<T: for<'de> Deserialize<'de>>(body: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("the {what} is not valid: {e}")))
}

/// `POST /v1/images/build`; from a function container, held to what its function was given.
pub(crate) async fn build(
    State(native): State<Arc<Native>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: BuildRequest = json_body(&body, "build request")?;
    request.spec.validate().map_err(ApiError::bad)?;
    let network = match &caller {
        Caller::Operator => StepNetwork::Allowed,
        Caller::Container(grant) => grant.check_build(&request)?,
    };
    if let Some(tag) = &request.tag {
        lode_registry::validate_tag_name(tag).map_err(|e| ApiError::bad(e.to_string()))?;
    }
    native.cgroups()?;
    let (tx, rx) = mpsc::channel::<BuildLine>(1024);
    tokio::spawn(async move {
        let events_tx = tx.clone();
        let events: lode_native_runner::builder::Events = Arc::new(move |event: BuildEvent| {
            crate::native::send_build_line(&events_tx, BuildLine::Event(event));
        });
        let line = match native
            .build_and_tag(&request.spec, request.tag.as_deref(), events, network)
            .await
        {
            Ok(end) => end,
            Err(refused) => BuildEnd::Error {
                message: refused.message,
            },
        };
        let _ = tx.send(BuildLine::End(line)).await;
    });
    Ok(ndjson(ReceiverStream::new(rx).map(|line| {
        serde_json::to_string(&line).expect("serializes")
    })))
}

/// Sets the flag when the response stream is dropped: the client went away.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

async fn run_container(
    State(native): State<Arc<Native>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: ContainerRequest = json_body(&body, "container request")?;
    let PreparedContainer {
        id,
        image: digest,
        spec,
        cgroups,
        mount,
        ..
    } = native.prepare_container(&request).await?;
    let started = Instant::now();
    let spawned = tokio::task::spawn_blocking(move || {
        spawn(
            &spec,
            cgroups.as_ref(),
            std::process::Stdio::piped(),
            std::process::Stdio::piped(),
        )
    })
    .await
    .map_err(ApiError::internal)?;
    let mut sandbox = spawned.map_err(|e| {
        let status = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidInput => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(
            status,
            "container_failed",
            format!("the container did not start: {e}"),
        )
    })?;
    tracing::info!(%id, image = %digest, "container started");
    let (tx, rx) = mpsc::channel::<ContainerLine>(64);
    let stop = Arc::new(AtomicBool::new(false));
    let _ = tx
        .send(ContainerLine::Started {
            id: id.clone(),
            image: digest.to_string(),
        })
        .await;
    let (stdout, stderr) = sandbox.take_output();
    let out = crate::util::pump_base64(stdout, tx.clone(), stop.clone(), |data| {
        ContainerLine::Stdout { data }
    });
    let err = crate::util::pump_base64(stderr, tx.clone(), stop.clone(), |data| {
        ContainerLine::Stderr { data }
    });
    let waiter_stop = stop.clone();
    std::thread::spawn(move || {
        let finished = sandbox.finish_unless(&waiter_stop);
        let _ = (out.join(), err.join());
        let line = match finished {
            Ok(finished) => ContainerLine::Exit {
                code: finished.code(),
                killed_by: finished.killed_by(),
                duration_ms: started.elapsed().as_millis() as u64,
            },
            Err(e) => ContainerLine::Error {
                message: format!("waiting for the container: {e}"),
            },
        };
        tracing::info!(%id, ?line, "container ended");
        let _ = tx.blocking_send(line);
        // The image stays mounted for the next container; the table owns it.
        drop(mount);
    });
    let guard = StopOnDrop(stop);
    Ok(ndjson(ReceiverStream::new(rx).map(move |line| {
        let _ = &guard;
        serde_json::to_string(&line).expect("serializes")
    })))
}
