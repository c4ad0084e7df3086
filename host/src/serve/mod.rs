//! `lode serve`: lock the data and cache dirs, restore deployments, open the API and public
//! listeners, and write the client file.

pub mod public;
pub mod python_web;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::control::Control;
use crate::proto::apps::Urls;
use crate::proto::client_file::{ClientFile, user_client_file};
use crate::store::state::RedbStore;
use crate::telemetry::logs::LogStore;
use crate::wasm::WasmBounds;
use crate::wasm::engine::{EngineSettings, WasmEngine};
use lode_registry::{RegistryService, RegistryStore, ServiceOptions};

/// How long a client may take to send request headers (slow clients hold a task each).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings for `lode serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// State, blobs and the client file.
    pub data_dir: PathBuf,
    /// Compiled components (deletable).
    pub cache_dir: PathBuf,
    /// API listen address.
    pub api: SocketAddr,
    /// Public HTTP listen address.
    pub http: SocketAddr,
    /// Registry (gRPC) listen address.
    pub registry: SocketAddr,
    /// Registry limits and read access.
    pub registry_options: RegistryOptions,
    /// Chunk cache bound, in bytes.
    pub cache_size: u64,
    /// Where debootstrap bases are kept between builds (default `<cache-dir>/images/base`).
    pub image_base_dir: Option<PathBuf>,
    /// Where the NVIDIA driver's files are read from (`/` but in tests).
    pub gpu_root: PathBuf,
    /// A PostgreSQL URL to keep the state in, shared with other hosts (`None`: redb under the
    /// data dir).
    pub state_url: Option<String>,
    /// How often a host with shared state looks for apps other hosts deployed, besides the
    /// database's notifications.
    pub state_poll: Duration,
    /// This host's id among those sharing the state (`None`: the machine's name).
    pub host_id: Option<String>,
    /// The API URL other hosts reach this one at (`None`: the API listener's).
    pub advertise: Option<String>,
    /// How often this host writes its heartbeat into a shared state.
    pub heartbeat: Duration,
    /// How long a spawned call taken from the shared queue stays this host's unrenewed.
    pub spawn_lease: Duration,
    /// Spawned calls taken from the shared queue and run at once.
    pub spawn_slots: usize,
    /// An S3 bucket to keep blobs in, shared with other hosts (`None`: the data dir).
    pub blobs_url: Option<String>,
    /// Store memory snapshots in the registry too (encrypted), for hosts sharing it.
    pub share_memory_snapshots: bool,
    /// The key secrets are sealed with, when not `<data-dir>/secret.key`.
    pub secrets_key_file: Option<PathBuf>,
    /// What computes a Wasm function's leased GPU (CUDA but in tests).
    pub wasm_gpu_compute: crate::wasm::gpu::GpuCompute,
    /// Bounds on what one container may ask for.
    pub container_bounds: crate::native::ContainerBounds,
    /// Limits.
    pub limits: WasmBounds,
    /// Bounds on sandboxes.
    pub sandbox_bounds: crate::sandboxes::SandboxBounds,
    /// Where Wasm sandboxes' compiled commands are cached (`None`: under the cache dir).
    pub command_cache: Option<PathBuf>,
    /// Pool size.
    pub max_instances: u32,
    /// Wasm stack per call, in bytes; apps may ask for less.
    pub wasm_stack: usize,
    /// How long compiled components no app uses stay cached.
    pub compiled_cache_ttl: Duration,
    /// Lines kept per app.
    pub log_lines: usize,
    /// Skip writing `~/.config/lode/client.json`.
    pub no_client_config: bool,
    /// Inputs one Python function may hold queued before calls get 429.
    pub max_queue: usize,
    /// How long a function container may take to load its module.
    pub container_start_timeout: Duration,
}

/// Settings the embedded and the standalone registry share.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Let anyone read blobs, indexes and tags.
    pub public_read: bool,
    /// Largest blob accepted, in bytes.
    pub max_blob: u64,
}

impl RegistryOptions {
    fn service(&self, token: &str) -> ServiceOptions {
        ServiceOptions {
            token: Some(Arc::from(token)),
            public_read: self.public_read,
            max_blob: self.max_blob,
            ..ServiceOptions::default()
        }
    }
}

/// The registry's stores under `data_dir`, with the index format check wired in.
fn open_registry(data_dir: &Path) -> Result<RegistryStore> {
    let validator: lode_registry::IndexValidator = Arc::new(lode_fs::validate_index);
    RegistryStore::open_dir(data_dir, Some(validator))
        .with_context(|| format!("opening the registry in {}", data_dir.display()))
}

/// The registry's blobs and indexes in the S3 bucket at `url`, with this host's read-through
/// copies under `data_dir`; its tags in PostgreSQL where the state is (else in `data_dir`).
fn open_shared_registry(
    url: &str,
    data_dir: &Path,
    postgres: Option<Arc<crate::store::postgres::PgStore>>,
) -> Result<RegistryStore> {
    let bucket = lode_registry::S3Bucket::open(url)?;
    bucket
        .ensure_bucket()
        .context("the blob store must be reachable when lode serve starts")?;
    let tags: Arc<dyn lode_registry::TagStore> = match postgres {
        Some(postgres) => Arc::new(crate::store::postgres::PgTagStore::new(postgres)),
        None => Arc::new(lode_registry::LocalTagStore::open(data_dir.join("tags"))?),
    };
    let validator: lode_registry::IndexValidator = Arc::new(lode_fs::validate_index);
    Ok(RegistryStore::from_parts(
        Arc::new(bucket.blobs("blobs", data_dir.join("blobs"))?),
        Arc::new(bucket.blobs("indexes", data_dir.join("indexes"))?),
        tags,
        Some(validator),
        format!("{bucket:?}"),
    ))
}

/// Settings for `lode registry serve`.
#[derive(Debug, Clone)]
pub struct RegistryServeOptions {
    /// Blobs, indexes, tags and the token.
    pub data_dir: PathBuf,
    /// Listen address.
    pub listen: SocketAddr,
    /// Limits and read access.
    pub registry: RegistryOptions,
}

/// Runs a standalone registry until SIGINT or SIGTERM.
pub async fn serve_registry(options: RegistryServeOptions) -> Result<()> {
    let _lock = crate::util::lock_dir(&options.data_dir, "registry data dir")?;
    let token = load_or_create_token(&options.data_dir)?;
    let store = open_registry(&options.data_dir)?;
    let listener = bind(options.listen, "listen").await?;
    let url = format!("http://{}", listener.local_addr()?);
    println!("lode registry serve");
    println!("  registry  {url}");
    println!(
        "  token     {} (reads {})",
        options.data_dir.join("token").display(),
        if options.registry.public_read {
            "are public"
        } else {
            "need it too"
        }
    );
    tracing::info!(%url, "registry serving");
    RegistryService::new(store, options.registry.service(&token))
        .serve(listener, shutdown_signal())
        .await
        .context("serving the registry")
}

fn load_or_create_token(data_dir: &Path) -> Result<String> {
    let path = data_dir.join("token");
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => Ok(token.trim().to_string()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e)
            .with_context(|| format!("reading token file {} (fix or remove it)", path.display())),
        _ => {
            let token = format!("lode_{}", hex::encode(rand::random::<[u8; 24]>()));
            crate::util::write_atomic(&path, token.as_bytes(), 0o600)
                .with_context(|| format!("writing token file {}", path.display()))?;
            Ok(token)
        }
    }
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "binding the {what} listener on {addr} (is the port in use? pass another with --{what})"
        )
    })
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn serve(options: ServeOptions) -> Result<()> {
    let _data_lock = crate::util::lock_dir(&options.data_dir, "data dir")?;
    let _cache_lock = crate::util::lock_dir(&options.cache_dir, "cache dir")?;
    let token = load_or_create_token(&options.data_dir)?;

    let api_listener = bind(options.api, "api").await?;
    let http_listener = bind(options.http, "http").await?;
    let registry_listener = bind(options.registry, "registry-listen").await?;
    let api_addr = api_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let registry_addr = registry_listener.local_addr()?;
    let api_url = format!("http://{api_addr}");
    let http_url = format!("http://{http_addr}");
    let registry_url = format!("http://{registry_addr}");

    let engine = WasmEngine::new(&EngineSettings {
        compiled_dir: options.cache_dir.join("compiled"),
        max_instances: options.max_instances,
        max_memory: options.limits.max_memory,
        wasm_stack: options.wasm_stack,
        compiled_ttl: options.compiled_cache_ttl,
    })?;
    // With PostgreSQL, the registry's tags live there too.
    let postgres = match &options.state_url {
        Some(url) => Some(Arc::new(crate::store::postgres::PgStore::open(url)?)),
        None => None,
    };
    let registry = match &options.blobs_url {
        Some(url) => open_shared_registry(url, &options.data_dir, postgres.clone())?,
        None => open_registry(&options.data_dir)?,
    };
    // The chunk cache and the image mounts belong to this process (the native runner mounts
    // images through this table); mounts a killed predecessor left behind are cleared.
    let chunks = lode_fs::ChunkCache::open(&options.cache_dir.join("chunks"), options.cache_size)?;
    let image_mounts = Arc::new(
        lode_fs::MountTable::new(
            &options.cache_dir.join("mounts"),
            chunks,
            Arc::new(registry.clone()),
            lode_fs::MountOptions {
                // Each chunk not yet here is a round trip to S3.
                prefetch_parallelism: if options.blobs_url.is_some() { 32 } else { 4 },
                ..lode_fs::MountOptions::default()
            },
        )
        .context("preparing the image mounts")?,
    );
    let state: Arc<dyn crate::store::state::StateStore> = match postgres {
        Some(postgres) => postgres,
        None => Arc::new(RedbStore::open(&options.data_dir.join("state"))?),
    };
    let secrets = Arc::new(match &options.secrets_key_file {
        Some(path) => crate::store::secrets::Secrets::open_key_file(path, state.clone())?,
        None => crate::store::secrets::Secrets::open(&options.data_dir, state.clone())?,
    });
    let build_secrets = secrets.clone();
    let sdk_dir = crate::sdk::extract(&options.cache_dir.join("sdk"))
        .context("writing the Python SDK into the cache dir")?;

    let native = crate::native::Native::new(
        Arc::new(registry.clone()),
        image_mounts.clone(),
        &options.cache_dir,
        options
            .image_base_dir
            .clone()
            .unwrap_or_else(|| options.cache_dir.join("images/base")),
        options.container_bounds.clone(),
        crate::native::BuildInputs {
            secrets: Arc::new(move |name: &str| {
                build_secrets.get(name).map_err(|e| format!("{e:#}"))
            }),
            sdk_dir: sdk_dir.clone(),
        },
    );
    let host_id = options.host_id.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .unwrap_or_else(|_| "lode".into())
    });
    let volume_sync = options.state_url.is_some().then(|| {
        Arc::new(crate::store::volume_sync::VolumeSync::new(
            state.clone(),
            registry.blobs.clone(),
            &options.data_dir.join("volumes"),
            host_id.clone(),
            native.container_root(),
        ))
    });
    let logs = LogStore::new(options.log_lines);
    let gpus = crate::function::gpus::GpuAllocator::open(&options.gpu_root);
    let functions = crate::control::Functions {
        pools: Arc::new(crate::native::pool::PoolContext {
            native: native.clone(),
            sdk_dir,
            logs: logs.clone(),
            max_queue: options.max_queue,
            start_timeout: options.container_start_timeout,
            started: std::sync::Mutex::new(Vec::new()),
            container_api: std::sync::OnceLock::new(),
            gpus: gpus.clone(),
            snapshots: Arc::new(crate::native::snapshots::Snapshots::new(
                options.cache_dir.join("snapshots"),
                Arc::new(registry.clone()),
                secrets.snapshot_keys(),
                image_mounts.clone(),
                options.share_memory_snapshots,
            )),
        }),
        wasm_gpus: crate::wasm::gpu::WasmGpus::new(gpus, options.wasm_gpu_compute),
        secrets,
        volumes_dir: options.data_dir.join("volumes"),
        volume_sync,
        apps_dir: {
            // App sources are the tenants' code: theirs and Lode's alone.
            let apps = options.cache_dir.join("apps");
            lode_fs::create_private_dir(&apps)
                .with_context(|| format!("creating {}", apps.display()))?;
            apps
        },
    };
    let this_host = crate::control::hosts::ThisHost::new(
        host_id,
        options.advertise.clone().unwrap_or_else(|| api_url.clone()),
        options.heartbeat,
        options
            .state_url
            .is_some()
            .then(|| functions.secrets.peer_token().to_string()),
    );
    if this_host.shared {
        this_host.check_id(state.as_ref())?;
    }
    let sandboxes = crate::sandboxes::Sandboxes::new(
        native.clone(),
        state.clone(),
        options.sandbox_bounds.clone(),
        options
            .command_cache
            .clone()
            .unwrap_or_else(|| options.cache_dir.join("compiled-commands")),
        functions.volumes_dir.clone(),
        functions.secrets.clone(),
        (http_addr.ip(), http_addr.ip().to_string()),
        this_host.shared.then(|| this_host.id.clone()),
    )
    .context("reading the sandboxes' records")?;
    // Spawned calls go through a queue every host shares, where the state is shared.
    let queue = match &options.state_url {
        Some(url) => Some(crate::control::calls::SharedQueue {
            queue: Arc::new(crate::store::postgres::queue::PgQueue::open(url)?),
            lease: options.spawn_lease,
            slots: options.spawn_slots,
            ready: Arc::new(tokio::sync::Notify::new()),
        }),
        None => None,
    };
    let control = Control::new(
        engine,
        registry.blobs.clone(),
        state,
        logs,
        options.limits.clone(),
        vec![api_addr, http_addr, registry_addr],
        Urls {
            http: http_url.clone(),
            registry: registry_url.clone(),
        },
        functions,
        this_host,
        queue,
    );
    // Before the restore, so every container started gets its API socket.
    let _ = control
        .functions
        .pools
        .container_api
        .set(Arc::new(crate::api::ContainerRoutes {
            control: control.clone(),
            native: native.clone(),
            sandboxes: sandboxes.clone(),
            max_file_bytes: options.sandbox_bounds.max_file_bytes,
        }));
    let restored = control.restore().await?;
    if options.state_url.is_some() {
        tokio::spawn(control.clone().follow(options.state_poll));
        tokio::spawn(crate::control::hosts::run(Arc::downgrade(&control)));
        if let Some(shared) = &control.calls.shared {
            let ready = shared.ready.clone();
            shared.queue.watch(Arc::new(move || ready.notify_one()));
            tokio::spawn(crate::control::spawned::run(Arc::downgrade(&control)));
        }
    }
    tokio::spawn(control.clone().prune_compiled());
    tokio::spawn(crate::control::schedule::run(Arc::downgrade(&control)));

    let client = ClientFile {
        api_url: api_url.clone(),
        http_url: http_url.clone(),
        registry_url: registry_url.clone(),
        token: token.clone(),
    };
    let client_path = options.data_dir.join("client.json");
    client.write(&client_path)?;
    if !options.no_client_config
        && let Some(user_path) = user_client_file()
    {
        client.write(&user_path)?;
    }

    println!("lode serve: {restored} app(s) restored");
    println!("  API       {api_url}");
    println!("  HTTP      {http_url}");
    println!("  registry  {registry_url}");
    println!("  client    {}", client_path.display());
    tracing::info!(%api_addr, %http_addr, restored, "serving");

    let shutdown_native = native.clone();
    let api_router = crate::api::router(
        control.clone(),
        native,
        sandboxes.clone(),
        options.sandbox_bounds.max_file_bytes,
        Arc::from(token.as_str()),
    );
    // Streamed answers (deploy progress, an exec's output, a container's) go out in small
    // writes; without TCP_NODELAY each one after the first waits on the client's delayed ACK.
    let api_listener = axum::serve::ListenerExt::tap_io(api_listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let api_task = tokio::spawn(async move {
        axum::serve(api_listener, api_router)
            .with_graceful_shutdown(shutdown_signal())
            .await
    });
    let http_task = tokio::spawn(serve_public(http_listener, control.clone()));
    let registry_service = RegistryService::new(registry, options.registry_options.service(&token));
    let registry_task = tokio::spawn(registry_service.serve(registry_listener, shutdown_signal()));
    shutdown_signal().await;
    tracing::info!("shutting down");
    http_task.abort();
    let _ = tokio::time::timeout(Duration::from_secs(5), api_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), registry_task).await;
    // Containers run on the image mounts: they go first.
    if options.state_url.is_some() {
        let leaving = control.clone();
        let _ = tokio::task::spawn_blocking(move || leaving.host.leave(&leaving)).await;
    }
    control.shut_down().await;
    sandboxes.shut_down().await;
    image_mounts.close().await;
    shutdown_native.shut_down();
    Ok(())
}

async fn serve_public(listener: TcpListener, control: Arc<Control>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let control = control.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let control = control.clone();
                async move { Ok::<_, std::convert::Infallible>(public::handle(control, req).await) }
            });
            if let Err(e) = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                // WebSockets to ASGI apps take the connection over.
                .with_upgrades()
                .await
            {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
