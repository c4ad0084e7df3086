//! Python functions at deploy: build (or find) the image, write the module, give it its
//! secrets, volumes and network, and start its container pool.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lode_native_runner::builder::BuildEvent;
use lode_native_runner::image_spec::ImageSpec;
use lode_registry::Digest;
use tokio::sync::mpsc;

use crate::control::Control;
use crate::control::deploy::DeployError;
use crate::function::CallLimits;
use crate::native::grant::ContainerGrant;
use crate::native::pool::{Pool, PoolSpec};
use crate::proto::deploy::DeployEvent;
use crate::proto::manifest::FunctionSpec;

/// A Python function's timeout when it names none.
pub const PYTHON_DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// A Python function's `max_containers` when it names none.
pub const PYTHON_DEFAULT_MAX_CONTAINERS: u32 = 10;
/// A Python function's `scaledown_window` when it names none.
pub const PYTHON_DEFAULT_SCALEDOWN: Duration = Duration::from_secs(60);

impl Control {
    /// Builds (or finds in the step cache) a Python function's image, writes its module,
    /// gathers its secrets and volumes, and starts its pool.
    pub(super) async fn build_python(
        &self,
        app: &Arc<str>,
        call_limits: CallLimits,
        function: &FunctionSpec,
        progress: Option<&mpsc::Sender<DeployEvent>>,
        images: &mut HashMap<String, Digest>,
    ) -> Result<Arc<Pool>, DeployError> {
        let name = &function.name;
        let python = function
            .python
            .as_ref()
            .ok_or_else(|| DeployError::Invalid(vec![format!("function {name:?}: no python")]))?;
        let invalid = |why: String| DeployError::Invalid(vec![format!("function {name:?}: {why}")]);
        let spec: ImageSpec = if python.image.is_null() {
            ImageSpec {
                base: lode_native_runner::image_spec::Base::DebianSlim {
                    python_version: None,
                },
                steps: Vec::new(),
            }
        } else {
            serde_json::from_value(python.image.clone())
                .map_err(|e| invalid(format!("image spec: {e}")))?
        };
        spec.validate()
            .map_err(|e| invalid(format!("image: {e}")))?;
        let key = serde_json::to_string(&spec).expect("serializes");
        let image = match images.get(&key) {
            Some(digest) => digest.clone(),
            None => {
                let events: lode_native_runner::builder::Events = match progress {
                    Some(tx) => {
                        let tx = tx.clone();
                        let function = name.clone();
                        Arc::new(move |event: BuildEvent| {
                            if let Some(line) = event.line() {
                                let event = DeployEvent::Image {
                                    function: function.clone(),
                                    line,
                                };
                                crate::native::send_build_line(&tx, event);
                            }
                        })
                    }
                    None => Arc::new(|_| {}),
                };
                let digest = self
                    .functions
                    .pools
                    .native
                    .build_image(&spec, events)
                    .await
                    .map_err(|e| invalid(format!("building its image: {e}")))?;
                images.insert(key, digest.clone());
                digest
            }
        };
        let (mount, config) = self
            .functions
            .pools
            .native
            .open_image(&image)
            .await
            .map_err(|e| DeployError::Internal(anyhow::anyhow!("opening image {image}: {e}")))?;
        let source: Digest = python
            .source
            .parse()
            .map_err(|e: lode_registry::Error| invalid(e.to_string()))?;
        let bytes = self
            .blobs
            .get(&source)
            .map_err(|e| DeployError::Internal(e.into()))?;
        let app_dir = lode_native_runner::agent::app_dir(
            &self.functions.apps_dir,
            &source.hex(),
            &python.module,
            &bytes,
        )
        .map_err(|e| DeployError::Internal(anyhow::anyhow!("writing the module: {e}")))?;

        let mut env = vec![(
            "PATH".to_string(),
            lode_native_runner::builder::DEFAULT_PATH.to_string(),
        )];
        for (key, value) in &config.env {
            lode_native_runner::image_spec::set_env(&mut env, key, value);
        }
        let mut secret_values = Vec::new();
        for secret in &function.secrets {
            for (key, value) in self.secret_of(function, secret)? {
                secret_values.push(value.clone());
                lode_native_runner::image_spec::set_env(&mut env, &key, &value);
            }
        }
        let mut volumes = Vec::new();
        for volume in &function.volumes {
            let dir = self.volume_dir(function, volume)?;
            let opened =
                lode_native_runner::sandbox::Volume::open(dir, &volume.path, volume.read_only)
                    .map_err(|e| {
                        DeployError::Invalid(vec![format!("function {:?}: {e}", function.name)])
                    })?;
            volumes.push(opened);
        }
        let r = &function.resources;
        let spec = PoolSpec {
            app: app.clone(),
            function: name.clone(),
            mount,
            module: python.module.clone(),
            app_dir,
            concurrency: r.concurrency.unwrap_or(1),
            min_containers: r.min_containers.unwrap_or(0),
            max_containers: r
                .max_containers
                .unwrap_or(PYTHON_DEFAULT_MAX_CONTAINERS)
                .max(1),
            scaledown_window: r
                .scaledown_window
                .map(Duration::from_secs_f64)
                .unwrap_or(PYTHON_DEFAULT_SCALEDOWN),
            timeout: function.timeout_or(PYTHON_DEFAULT_TIMEOUT),
            limits: self.functions.pools.native.bounds().function_limits(r),
            retries: function.retries,
            env,
            secret_values,
            volumes,
            network: match function.network.mode {
                crate::proto::manifest::NetworkMode::None => {
                    lode_native_runner::sandbox::Network::None
                }
                crate::proto::manifest::NetworkMode::Outbound => self
                    .functions
                    .pools
                    .native
                    .outbound(&function.network.allow)
                    .await
                    .map_err(|e| DeployError::Invalid(vec![format!("function {name:?}: {e}")]))?,
            },
            workdir: config.workdir.clone().unwrap_or_else(|| "/".into()),
            call_limits,
            series: self.metrics.function_series(app, name, "python"),
            cold_starts: self.metrics.cold_starts.clone(),
            dispatch: self.dispatch(),
            grant: Arc::new(ContainerGrant {
                app: app.clone(),
                function: name.clone(),
                secrets: function.secrets.iter().cloned().collect(),
                volumes: function.volumes.clone(),
                network: match function.network.mode {
                    crate::proto::manifest::NetworkMode::None => None,
                    crate::proto::manifest::NetworkMode::Outbound => {
                        Some(function.network.allow.clone())
                    }
                },
            }),
            gpu: r.gpu.clone(),
            gpus_held: self
                .metrics
                .gpus
                .get_or_create(&crate::telemetry::metrics::FunctionLabels {
                    app: app.to_string(),
                    function: name.clone(),
                    engine: "python",
                })
                .clone(),
            memory_snapshot: function.memory_snapshot,
        };
        Ok(Pool::start(spec, self.functions.pools.clone()))
    }
}
