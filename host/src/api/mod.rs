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

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Router};

use crate::api::error::ApiError;
use crate::control::Control;
use crate::native::grant::{Caller, ContainerApi, ContainerGrant};
use apps::{deploy, get_app, info, list_apps, list_hosts, logs, metrics, remove_app};

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
        .route("/v1/hosts", get(list_hosts))
        .route(
            "/v1/apps/{app}",
            put(deploy).get(get_app).delete(remove_app),
        )
        .route("/v1/apps/{app}/logs", get(logs))
        .route("/metrics", get(metrics))
        .with_state(control.clone())
        .merge(objects::router(control.objects.clone()))
        .merge(functions::router(control.clone()))
        .merge(containers::router(native))
        .merge(sandboxes::router(sandboxes, max_file_bytes))
        .layer(Extension(Caller::Operator))
        .layer(middleware::from_fn_with_state(token, require_token));
    let mut api = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(guarded);
    // Hosts sharing a state run each other's calls, presenting the token they all derive.
    if let Some(peer_token) = control.host.peer_token.clone() {
        api = api.merge(functions::peer_router(control.clone()).layer(
            middleware::from_fn_with_state(Arc::from(peer_token), require_token),
        ));
    }
    api
}

/// The API a function container gets on its `api.sock`: sandboxes (those its app made),
/// image builds and an app's summary, each held to what its function was given (see
/// `native/grant.rs`). The socket is the credential, so no token is asked for.
pub struct ContainerRoutes {
    /// Apps, for the lookup.
    pub control: Arc<Control>,
    /// Builds.
    pub native: Arc<crate::native::Native>,
    /// Sandboxes.
    pub sandboxes: Arc<crate::sandboxes::Sandboxes>,
    /// The largest file a sandbox file call carries.
    pub max_file_bytes: u64,
}

impl ContainerRoutes {
    fn router(&self, grant: Arc<ContainerGrant>) -> Router {
        Router::new()
            .route("/v1/apps/{app}", get(apps::app_summary_only))
            .with_state(self.control.clone())
            .merge(
                Router::new()
                    .route("/v1/images/build", axum::routing::post(containers::build))
                    .with_state(self.native.clone()),
            )
            .merge(sandboxes::router(
                self.sandboxes.clone(),
                self.max_file_bytes,
            ))
            .layer(Extension(Caller::Container(grant)))
    }
}

impl ContainerApi for ContainerRoutes {
    fn serve(
        &self,
        listener: lode_native_runner::agent::ApiListener,
        grant: Arc<ContainerGrant>,
        stopped: futures::future::BoxFuture<'static, ()>,
    ) {
        let router = self.router(grant);
        tokio::spawn(async move {
            let _ = axum::serve(ContainerListener(listener), router)
                .with_graceful_shutdown(stopped)
                .await;
        });
    }
}

/// A container's `api.sock` as axum serves it.
struct ContainerListener(lode_native_runner::agent::ApiListener);

impl axum::serve::Listener for ContainerListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok(stream) => match stream.peer_addr() {
                    Ok(addr) => return (stream, addr),
                    Err(e) => tracing::debug!("a container's API connection: {e}"),
                },
                Err(e) => {
                    tracing::warn!("accepting on a container's API socket: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
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
