//! What a function container may ask of the host's API through its `api.sock` (Modal code
//! that makes sandboxes and builds images from inside a function): what its function was
//! given at deploy, and no more.
//!
//! The socket is its own credential: only the container's root can connect to it, and it
//! answers a few routes only (sandboxes, image builds, an app's lookup). A container reaches
//! the sandboxes its app made and no others. What it asks for is held to its function's own
//! grants: the secrets and Lode volumes the function mounts, network only if the function
//! has it (allow-list entries only its own), no host directories, no image tags, and images
//! named by digest. A build asked for by a function without network runs nothing that could
//! reach out (see [`StepNetwork`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use lode_native_runner::agent::ApiListener;
use lode_native_runner::builder::StepNetwork;
use lode_native_runner::image_spec::{Base, Step};

use crate::native::Refused;
use crate::proto::containers::BuildRequest;
use crate::proto::manifest::VolumeMount;
use crate::proto::sandboxes::{SandboxInfo, SandboxRequest};

/// What one deployed function was given, which its containers' requests are held to.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerGrant {
    /// The function's app: the sandboxes it makes are this app's to reach.
    pub app: Arc<str>,
    /// The function, for messages.
    pub function: String,
    /// The secrets it was given, by name.
    pub secrets: BTreeSet<String>,
    /// The Lode volumes it mounts.
    pub volumes: Vec<VolumeMount>,
    /// Its outbound network's allow-list, or `None` when it has no network.
    pub network: Option<Vec<String>>,
}

/// Who makes an API request: the holder of the API token, or a function container.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The token's holder: the operator, the CLI, an SDK client.
    Operator,
    /// A function container, through its `api.sock`.
    Container(Arc<ContainerGrant>),
}

/// Serves the API a function container may use on its `api.sock`, until `stopped` resolves
/// (the container exited). Set by the server, which holds the API's routes.
pub trait ContainerApi: Send + Sync {
    /// Serves `listener` for the container `grant` describes.
    fn serve(
        &self,
        listener: ApiListener,
        grant: Arc<ContainerGrant>,
        stopped: futures::future::BoxFuture<'static, ()>,
    );
}

fn refused(message: String) -> Refused {
    Refused::new(403, "not_allowed_in_container", message)
}

impl Caller {
    /// Whether the caller may reach `sandbox`: the operator reaches every one, a container
    /// those its app made.
    pub fn reaches(&self, sandbox: &SandboxInfo) -> bool {
        match self {
            Caller::Operator => true,
            Caller::Container(grant) => sandbox.created_by_app.as_deref() == Some(&*grant.app),
        }
    }
}

impl ContainerGrant {
    fn denied(&self, what: String) -> Refused {
        refused(format!(
            "function {:?} of app {:?}: {what}",
            self.function, self.app
        ))
    }

    fn check_secrets<'a>(
        &self,
        names: impl IntoIterator<Item = &'a String>,
    ) -> Result<(), Refused> {
        for name in names {
            if !self.secrets.contains(name) {
                return Err(self.denied(format!(
                    "secret {name:?} is not one of the function's own; code in a container may \
                     pass on only the secrets its function was given (add it to the \
                     function's secrets=[...])"
                )));
            }
        }
        Ok(())
    }

    fn check_image(&self, reference: &str) -> Result<(), Refused> {
        if reference.parse::<lode_registry::Digest>().is_err() {
            return Err(self.denied(format!(
                "image {reference:?} is a tag; code in a container names images by digest \
                 (an Image it builds, or Image.from_id(<digest>))"
            )));
        }
        Ok(())
    }

    /// Refuses a sandbox the container may not make: more than its function was given.
    pub fn check_sandbox(&self, request: &SandboxRequest) -> Result<(), Refused> {
        self.check_image(&request.image)?;
        if let Some(volume) = request.volumes.first() {
            return Err(self.denied(format!(
                "host directory {:?} cannot be mounted from inside a container; use a \
                 lode.Volume the function mounts",
                volume.source
            )));
        }
        for mount in &request.named_volumes {
            let own = self.volumes.iter().find(|v| v.name == mount.name);
            match own {
                None => {
                    return Err(self.denied(format!(
                        "volume {:?} is not mounted by the function; code in a container may \
                         pass on only its function's volumes (add it to volumes={{...}})",
                        mount.name
                    )));
                }
                Some(own) if own.read_only && !mount.read_only => {
                    return Err(self.denied(format!(
                        "volume {:?} is read-only in the function, so a sandbox gets it \
                         read-only too",
                        mount.name
                    )));
                }
                Some(_) => {}
            }
        }
        self.check_secrets(&request.secrets)?;
        let outbound = request.network.as_deref() == Some("outbound");
        match &self.network {
            None if outbound || !request.allow_net.is_empty() => Err(self.denied(
                "the function has no network, so the sandboxes it makes have none either \
                 (block_network=True); give the function network=\"outbound\" first"
                    .into(),
            )),
            Some(allowed) => match request.allow_net.iter().find(|a| !allowed.contains(a)) {
                Some(entry) => Err(self.denied(format!(
                    "cidr_allowlist entry {entry:?} is not in the function's own network \
                     allow-list; a sandbox reaches at most what its maker does"
                ))),
                None => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// Refuses a build the container may not ask for, and says whether its steps may reach
    /// the network.
    pub fn check_build(&self, request: &BuildRequest) -> Result<StepNetwork, Refused> {
        if let Some(tag) = &request.tag {
            return Err(self.denied(format!(
                "images cannot be tagged ({tag:?}) from inside a container; tag them with \
                 `lode image build --tag`"
            )));
        }
        let local = "local files cannot be uploaded from inside a container; build the image \
                     with `lode image build` and use Image.from_id(<digest>)";
        match &request.spec.base {
            Base::FromOci { .. } => return Err(self.denied(format!("from_oci: {local}"))),
            Base::Image { reference } => self.check_image(reference)?,
            Base::Registry {
                secret: Some(secret),
                ..
            } => self.check_secrets([secret])?,
            _ => {}
        }
        for step in &request.spec.steps {
            match step {
                Step::AddLocalDir { .. } | Step::AddLocalFile { .. } => {
                    return Err(self.denied(format!("{}: {local}", step.describe())));
                }
                Step::RunFunction { secrets, .. } => self.check_secrets(secrets)?,
                _ => {}
            }
        }
        Ok(if self.network.is_some() {
            StepNetwork::Allowed
        } else {
            StepNetwork::Denied
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(network: Option<Vec<String>>) -> ContainerGrant {
        ContainerGrant {
            app: "pool".into(),
            function: "add".into(),
            secrets: ["db".to_string()].into(),
            volumes: vec![VolumeMount {
                name: "data".into(),
                path: "/data".into(),
                read_only: true,
                create_if_missing: false,
            }],
            network,
        }
    }

    fn sandbox(edit: impl FnOnce(&mut SandboxRequest)) -> SandboxRequest {
        let mut request: SandboxRequest = serde_json::from_value(serde_json::json!({
            "app": "pool-sandboxes",
            "image": lode_registry::Digest::of(b"image").to_string(),
        }))
        .unwrap();
        edit(&mut request);
        request
    }

    #[test]
    fn a_sandbox_gets_no_more_than_its_makers_function() {
        let none = grant(None);
        assert!(none.check_sandbox(&sandbox(|_| {})).is_ok());
        let denied = |g: &ContainerGrant, r: SandboxRequest| g.check_sandbox(&r).unwrap_err();
        assert!(
            denied(&none, sandbox(|r| r.network = Some("outbound".into())))
                .message
                .contains("no network")
        );
        assert!(
            denied(&none, sandbox(|r| r.secrets = vec!["other".into()]))
                .message
                .contains("\"other\"")
        );
        assert!(
            none.check_sandbox(&sandbox(|r| r.secrets = vec!["db".into()]))
                .is_ok()
        );
        assert!(
            denied(&none, sandbox(|r| r.image = "latest-python".into()))
                .message
                .contains("by digest")
        );
        let volume = |read_only| VolumeMount {
            name: "data".into(),
            path: "/mnt".into(),
            read_only,
            create_if_missing: false,
        };
        assert!(
            denied(&none, sandbox(|r| r.named_volumes = vec![volume(false)]))
                .message
                .contains("read-only")
        );
        assert!(
            none.check_sandbox(&sandbox(|r| r.named_volumes = vec![volume(true)]))
                .is_ok()
        );
        let host: crate::proto::containers::VolumeRequest =
            serde_json::from_value(serde_json::json!({"source": "/etc", "target": "/etc2"}))
                .unwrap();
        assert!(
            denied(&none, sandbox(|r| r.volumes = vec![host]))
                .message
                .contains("host directory")
        );
        let open = grant(Some(vec!["10.1.0.0/16".into()]));
        let outbound = |allow: &str| {
            sandbox(|r| {
                r.network = Some("outbound".into());
                r.allow_net = vec![allow.into()];
            })
        };
        assert!(open.check_sandbox(&outbound("10.1.0.0/16")).is_ok());
        assert!(
            denied(&open, outbound("10.2.0.0/16"))
                .message
                .contains("allow-list")
        );
    }

    #[test]
    fn a_build_from_a_container_is_held_to_the_function() {
        let build = |spec: serde_json::Value, tag: Option<&str>| BuildRequest {
            spec: serde_json::from_value(spec).unwrap(),
            tag: tag.map(String::from),
        };
        let slim = serde_json::json!({"base": {"debian_slim": {}}, "steps": [{"pip_install": {"packages": ["six"]}}]});
        assert_eq!(
            grant(None).check_build(&build(slim.clone(), None)).unwrap(),
            StepNetwork::Denied
        );
        assert_eq!(
            grant(Some(vec![]))
                .check_build(&build(slim.clone(), None))
                .unwrap(),
            StepNetwork::Allowed
        );
        let message = |spec, tag| {
            grant(None)
                .check_build(&build(spec, tag))
                .unwrap_err()
                .message
        };
        assert!(message(slim, Some("mine")).contains("tagged"));
        let local = serde_json::json!({"base": {"debian_slim": {}}, "steps": [
            {"add_local_dir": {"local": "/src", "remote": "/app", "digest": "x"}}]});
        assert!(message(local, None).contains("local files"));
        let registry = serde_json::json!({"base": {"registry": {"reference": "python:3.12", "secret": "hub"}}});
        assert!(message(registry, None).contains("\"hub\""));
        let tagged = serde_json::json!({"base": {"image": {"reference": "base-tag"}}});
        assert!(message(tagged, None).contains("by digest"));
    }

    #[test]
    fn a_container_reaches_the_sandboxes_its_app_made() {
        let mut info: SandboxInfo = serde_json::from_value(serde_json::json!({
            "sandbox_id": "sb-1", "app": "x", "image": "i", "image_digest": "d", "tags": {},
            "status": "running", "created_ms": 0, "timeout": 1.0
        }))
        .unwrap();
        let container = Caller::Container(Arc::new(grant(None)));
        assert!(Caller::Operator.reaches(&info));
        assert!(!container.reaches(&info));
        info.created_by_app = Some("other".into());
        assert!(!container.reaches(&info));
        info.created_by_app = Some("pool".into());
        assert!(container.reaches(&info));
    }
}
