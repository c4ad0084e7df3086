//! The control plane: apps and their live versions, deploys, restore, the call router
//! ([`Dispatch`]), spawned calls and their history, and schedules. `impl Control` lives in
//! this folder only: deploys in `deploy.rs`, what a deploy resolves once per app in
//! `resolve.rs`, Python pools in `python.rs`, the router in `router.rs`.
//!
//! The engines reach it only through [`Dispatch`]: each run and each pool is handed a
//! `Weak<dyn Dispatch>` from [`Control::dispatch`].

pub mod calls;
pub mod deploy;
pub mod forward;
pub mod history;
pub mod hosts;
pub mod python;
pub mod resolve;
pub mod router;
pub mod schedule;
pub mod spawned;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use lode_registry::BlobStore;

use crate::control::calls::Calls;
use crate::control::history::CallHistory;
use crate::function::Dispatch;
use crate::native::pool::{Pool, PoolContext};
use crate::proto::apps::Urls;
use crate::proto::manifest::Manifest;
use crate::proto::schedule::Schedule;
use crate::store::secrets::Secrets;
use crate::store::state::{AppRecord, StateStore};
use crate::telemetry::logs::LogStore;
use crate::telemetry::metrics::Metrics;
use crate::wasm::WasmBounds;
use crate::wasm::engine::WasmEngine;
use crate::wasm::function::WasmFunction;
use crate::wasm::http::HttpFunction;

/// One deployed version of an app, ready to serve.
pub struct LiveApp {
    /// What was recorded.
    pub record: AppRecord,
    /// HTTP functions, longest path first.
    pub routes: Vec<Arc<HttpFunction>>,
    /// Python functions' container pools, by function name.
    pub pools: HashMap<String, Arc<Pool>>,
    /// Wasm functions that take calls by name (`lode:function`), by function name.
    pub wasm_functions: HashMap<String, Arc<WasmFunction>>,
    /// Python web endpoints, longest path first.
    pub python_routes: Vec<PythonRoute>,
    /// Scheduled Python functions, parsed once at deploy.
    pub schedules: Vec<(String, Schedule)>,
    /// A digest of the secret values its functions were given: a redeploy after a secret
    /// changed restarts the pools even when the manifest is the same.
    pub secrets_digest: String,
    /// The images its Python functions were built into, by image spec, so a pool started
    /// later (a class with other options) builds nothing.
    pub images: HashMap<String, lode_registry::Digest>,
    /// Pools of classes called with options of their own (`Cls.with_options`), by function
    /// and options; they live and go with this version.
    pub variants: tokio::sync::Mutex<HashMap<(String, String), Arc<Pool>>>,
}

/// Option sets one deployed version may start pools for; past it, calls are refused.
pub const MAX_VARIANTS: usize = 16;

/// A Python function that answers public HTTP: the JSON body is its one argument.
#[derive(Debug, Clone)]
pub struct PythonRoute {
    /// Path within the app.
    pub path: String,
    /// Allowed method; `None` allows any.
    pub method: Option<String>,
    /// The function.
    pub function: String,
    /// The method, when the function is a class and the route one of its web methods.
    pub class_method: Option<String>,
    /// What answers: a call, or the function's ASGI or WSGI app or web server.
    pub serve: crate::proto::manifest::WebServe,
    /// A web server's port.
    pub port: Option<u16>,
}

impl Drop for LiveApp {
    /// A version that is replaced or removed takes no more inputs; its containers stop
    /// once they finish what they hold.
    fn drop(&mut self) {
        for pool in self.pools.values().chain(self.variants.get_mut().values()) {
            pool.close();
        }
    }
}

/// What Python functions need beside the Wasm engine.
pub struct Functions {
    /// Shared by every pool.
    pub pools: Arc<PoolContext>,
    /// The host's GPUs as Wasm functions that declare `gpu` get them.
    pub wasm_gpus: Arc<crate::wasm::gpu::WasmGpus>,
    /// Secrets, for their environments.
    pub secrets: Arc<Secrets>,
    /// Named volumes, one directory each.
    pub volumes_dir: PathBuf,
    /// Where hosts share a state: volumes' committed versions, synced through it.
    pub volume_sync: Option<Arc<crate::store::volume_sync::VolumeSync>>,
    /// Users' module files, by source digest.
    pub apps_dir: PathBuf,
}

impl PythonRoute {
    /// Its label in `<app>--<label>.lode.localhost`.
    pub fn label(&self) -> String {
        crate::proto::manifest::route_label(&self.function, self.class_method.as_deref())
    }
}

impl LiveApp {
    /// The Python web endpoint for `path`: the longest path prefix at a segment boundary.
    pub fn python_route(&self, path: &str) -> Option<&PythonRoute> {
        self.python_routes
            .iter()
            .find(|r| prefix_matches(&r.path, path))
    }

    /// The function whose web path is the longest prefix of `path` at a segment boundary.
    pub fn route(&self, path: &str) -> Option<&Arc<HttpFunction>> {
        self.routes.iter().find(|f| prefix_matches(&f.path, path))
    }
}

fn prefix_matches(route: &str, path: &str) -> bool {
    let prefix = route.trim_end_matches('/');
    prefix.is_empty()
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The control plane: what the API, the public listener and the scheduler share.
pub struct Control {
    /// Wasm engine.
    pub engine: WasmEngine,
    /// Blob store.
    pub blobs: Arc<dyn BlobStore>,
    /// Durable state.
    pub state: Arc<dyn StateStore>,
    /// Logs.
    pub logs: Arc<LogStore>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Bounds and defaults for Wasm functions and public requests.
    pub wasm_bounds: WasmBounds,
    /// Lode's own listeners, unreachable from guests.
    pub protected: Arc<Vec<SocketAddr>>,
    /// Where clients reach this server's listeners.
    pub urls: Urls,
    /// Python functions' side.
    pub functions: Functions,
    /// Spawned calls.
    pub calls: Calls,
    /// Every call's summary.
    pub history: CallHistory,
    /// Dicts and Queues.
    pub objects: Arc<crate::store::objects::Objects>,
    /// This host, as the others sharing its state see it.
    pub host: Arc<hosts::ThisHost>,
    apps: ArcSwap<HashMap<String, Arc<LiveApp>>>,
    /// Serializes the record-and-swap step of deploys and removals (not compilation).
    commit_lock: tokio::sync::Mutex<()>,
    /// The client calls forwarded to other hosts go through.
    peer_http: std::sync::OnceLock<reqwest::Client>,
    /// Itself, for the `Weak<dyn Dispatch>` that runs and pools call back through, and for
    /// tasks that outlive a request.
    this: Weak<Control>,
}

impl Control {
    /// Assembles the control plane; call [`Control::restore`] before serving.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: WasmEngine,
        blobs: Arc<dyn BlobStore>,
        state: Arc<dyn StateStore>,
        logs: Arc<LogStore>,
        wasm_bounds: WasmBounds,
        protected: Vec<SocketAddr>,
        urls: Urls,
        functions: Functions,
        host: Arc<hosts::ThisHost>,
        queue: Option<calls::SharedQueue>,
    ) -> Arc<Self> {
        let calls = Calls::persistent(state.clone(), host.shared.then(|| host.id.clone()), queue);
        let mut metrics = Metrics::default();
        let snapshots = &functions.pools.snapshots.stats;
        metrics.register_snapshots(&snapshots.taken, &snapshots.restored, &snapshots.failed);
        let metrics = Arc::new(metrics);
        let history = CallHistory::start(state.clone(), metrics.call_records_dropped.clone());
        let objects = Arc::new(crate::store::objects::Objects::new(state.clone()));
        Arc::new_cyclic(|this| Self {
            engine,
            blobs,
            objects,
            state,
            logs,
            metrics,
            history,
            wasm_bounds,
            protected: Arc::new(protected),
            urls,
            functions,
            calls,
            host,
            apps: ArcSwap::from_pointee(HashMap::new()),
            commit_lock: tokio::sync::Mutex::new(()),
            peer_http: std::sync::OnceLock::new(),
            this: this.clone(),
        })
    }

    /// The router as the engines hold it: calls from a run or a pool come back through it,
    /// and stop (as "shutting down") once the control plane is gone.
    pub fn dispatch(&self) -> Weak<dyn Dispatch> {
        self.this.clone()
    }

    /// The live version of `app`.
    pub fn app(&self, app: &str) -> Option<Arc<LiveApp>> {
        self.apps.load().get(app).cloned()
    }

    /// Every live app, sorted by name.
    pub fn apps(&self) -> Vec<Arc<LiveApp>> {
        let mut apps: Vec<_> = self.apps.load().values().cloned().collect();
        apps.sort_by(|a, b| a.record.manifest.app.cmp(&b.record.manifest.app));
        apps
    }

    /// Public URLs of an app's web functions.
    /// ASGI and WSGI apps and web servers are also listed by host name
    /// (`<app>--<function>.lode.localhost`), where they are served at the root.
    pub fn urls(&self, manifest: &Manifest) -> Vec<String> {
        let mut urls = Vec::new();
        for function in &manifest.functions {
            for (class_method, web) in function.web_routes() {
                urls.push(format!("{}/{}{}", self.urls.http, manifest.app, web.path));
                if web.serve != crate::proto::manifest::WebServe::Call {
                    let port = self.urls.http.rsplit_once(':').map_or("80", |(_, p)| p);
                    let label = crate::proto::manifest::route_label(&function.name, class_method);
                    urls.push(format!(
                        "http://{}--{label}.lode.localhost:{port}/",
                        manifest.app
                    ));
                }
            }
        }
        urls
    }

    /// Makes `live` the version new requests see; requests in flight keep theirs.
    pub(crate) fn publish(&self, app: &str, live: Arc<LiveApp>) {
        self.apps.rcu(|apps| {
            let mut apps = HashMap::clone(apps);
            apps.insert(app.to_string(), live.clone());
            apps
        });
    }

    /// Stops every function container and waits (boundedly) until they are cleaned up, so a
    /// stopped server leaves no cgroups or processes and its image mounts can go.
    pub async fn shut_down(&self) {
        // Live versions' pools and those still draining after a redeploy.
        let pools = self.functions.pools.pools();
        let limit = Duration::from_secs(10);
        futures::future::join_all(pools.iter().map(|pool| pool.shut_down(limit))).await;
    }

    /// Removes an app; in-flight requests finish. Returns whether it existed.
    pub async fn remove(&self, app: &str) -> anyhow::Result<bool> {
        let _guard = self.commit_lock.lock().await;
        let existed = self.state.delete_app(app)?;
        let mut was_live = false;
        self.apps.rcu(|apps| {
            let mut apps = HashMap::clone(apps);
            was_live = apps.remove(app).is_some();
            apps
        });
        if existed || was_live {
            self.logs.remove(app);
            tracing::info!(app, "removed");
        }
        Ok(existed || was_live)
    }
}
