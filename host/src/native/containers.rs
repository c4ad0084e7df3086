//! One-shot containers (`lode container run`) and image builds for the API: the request
//! checked against the server's bounds, its image resolved and mounted, and the sandbox
//! spec made. Streaming the output is the API's part.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lode_native_runner::builder::{DEFAULT_PATH, Events, StepNetwork, read_config};
use lode_native_runner::cgroup::{Hierarchy, Limits};
use lode_native_runner::image_spec::{ImageConfig, ImageSpec};
use lode_native_runner::sandbox::{Network, SandboxSpec, Volume};
use lode_registry::TagUpdate;

use crate::native::{Native, Refused};
use crate::proto::containers::{BuildEnd, ContainerRequest, VolumeRequest};

/// A container ready to spawn: its spec, the cgroups to put it in, and the image it runs,
/// kept mounted while the container lives.
pub struct PreparedContainer {
    /// Its id, under this server's scope.
    pub id: String,
    /// The image digest.
    pub image: String,
    /// What to spawn.
    pub spec: SandboxSpec,
    /// Where its cgroups go.
    pub cgroups: Arc<dyn Hierarchy>,
    /// The image's lazy mount.
    pub mount: Arc<lode_fs::Mount>,
    /// A sandbox's writable layer, on the host so it can be snapshotted.
    pub layer: Option<SandboxLayer>,
}

/// A container sandbox's writable layer: a tmpfs on the host holding the overlay's `upper/`,
/// so a snapshot can read it, and the ids its files are owned by there.
pub struct SandboxLayer {
    /// The tmpfs.
    pub dir: std::path::PathBuf,
    /// Where the sandbox's uid 0 is on the host, if it runs in a user namespace.
    pub host_ids: Option<lode_fs::HostIds>,
}

impl SandboxLayer {
    /// The overlay's upper directory: what the sandbox changed.
    pub fn upper(&self) -> std::path::PathBuf {
        self.dir.join("upper")
    }

    /// Unmounts the tmpfs and removes its directory.
    pub fn remove(&self) {
        let _ = lode_fs::unmount(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for SandboxLayer {
    /// However a layer goes (a create that failed or was given up on included), its tmpfs
    /// goes with it.
    fn drop(&mut self) {
        self.remove();
    }
}

impl Native {
    /// Checks `request` against the server's bounds, resolves and mounts its image, and
    /// makes the sandbox spec; nothing runs yet.
    pub async fn prepare_container(
        &self,
        request: &ContainerRequest,
    ) -> Result<PreparedContainer, Refused> {
        self.prepare(request, true).await
    }

    /// [`Native::prepare_container`] for a live sandbox (`LiveSandbox::start`): its pid 1 is
    /// Lode's, so the request needs no command, and its lifetime is the caller's to end.
    pub async fn prepare_sandbox(
        &self,
        request: &ContainerRequest,
    ) -> Result<PreparedContainer, Refused> {
        self.prepare(request, false).await
    }

    async fn prepare(
        &self,
        request: &ContainerRequest,
        needs_command: bool,
    ) -> Result<PreparedContainer, Refused> {
        let (limits, timeout, volumes) = self.check(request)?;
        let network = match request.network.as_deref() {
            None | Some("none") if request.allow_net.is_empty() => Network::None,
            None | Some("none") => {
                return Err(Refused::bad(
                    "--allow-net needs --net outbound: a container without network reaches nothing",
                ));
            }
            Some("outbound") => self
                .outbound(&request.allow_net)
                .await
                .map_err(|e| Refused::new(403, "network_not_allowed", e))?,
            Some(other) => {
                return Err(Refused::bad(format!(
                    "network {other:?} is not one of: none, outbound"
                )));
            }
        };
        let cgroups = self.cgroups()?.clone();
        let (digest, index) = self.resolve(&request.image).await?;
        let config = read_config(&index, self.registry.as_ref())
            .await
            .map_err(Refused::internal)?;
        let argv = if request.argv.is_empty() {
            config.cmd.clone()
        } else {
            request.argv.clone()
        };
        if argv.is_empty() && needs_command {
            return Err(Refused::bad(
                "no command given and the image names none: lode container run IMAGE -- CMD...",
            ));
        }
        let mount = self
            .mounts
            .mount(&digest)
            .await
            .map_err(Refused::internal)?;
        let mut env = vec![("PATH".to_string(), DEFAULT_PATH.to_string())];
        for (name, value) in config.env.iter().chain(&request.env) {
            lode_native_runner::image_spec::set_env(&mut env, name, value);
        }
        let kind = if needs_command { "c" } else { "s" };
        let id = format!("{}-{kind}-{:016x}", self.scope, rand::random::<u64>());
        let user_namespace = self
            .user_namespace_for(&mount)
            .map_err(|why| Refused::new(503, "no_user_namespace", why))?;
        // A sandbox's layer lives on the host, where a snapshot reads it; a one-shot
        // container's stays inside its own mount namespace.
        let layer = if needs_command {
            None
        } else {
            let dir = self.run_dir.join(format!("{id}-layer"));
            std::fs::create_dir_all(&dir).map_err(Refused::internal)?;
            mount_tmpfs(&dir, self.bounds.writable_bytes).map_err(Refused::internal)?;
            Some(SandboxLayer {
                dir,
                host_ids: user_namespace.as_ref().map(|userns| lode_fs::HostIds {
                    base: userns.ids().host_base,
                    count: userns.ids().count,
                }),
            })
        };
        let spec = SandboxSpec {
            lower: mount.mountpoint().to_path_buf(),
            scratch: self.run_dir.join(&id),
            argv,
            env,
            cwd: request
                .workdir
                .clone()
                .or(config.workdir.clone())
                .unwrap_or_else(|| "/".into()),
            limits,
            timeout,
            volumes,
            network,
            writable_bytes: self.bounds.writable_bytes,
            shm_bytes: self.bounds.shm_bytes,
            user_namespace,
            keep_upper: layer.as_ref().map(|layer| layer.dir.clone()),
            ..SandboxSpec::default()
        };
        Ok(PreparedContainer {
            image: digest.to_string(),
            id,
            spec,
            cgroups,
            mount,
            layer,
        })
    }

    /// The digest and settings of image `reference` (a tag or a digest), without mounting
    /// it: a sandbox's tier follows from them.
    pub async fn image_config(
        &self,
        reference: &str,
    ) -> Result<(lode_registry::Digest, ImageConfig), Refused> {
        let (digest, index) = self.resolve(reference).await?;
        let config = read_config(&index, self.registry.as_ref())
            .await
            .map_err(Refused::internal)?;
        Ok((digest, config))
    }

    /// A new image: `base` with the changes in `upper` (an overlay upper directory, its
    /// files owned by `host_ids` where given) on top; `tag` is pointed at it too.
    pub async fn snapshot(
        &self,
        base: &str,
        upper: &Path,
        host_ids: Option<lode_fs::HostIds>,
        kept: &[String],
        tag: Option<&str>,
    ) -> Result<lode_registry::Digest, Refused> {
        let (_, index) = self.resolve(base).await?;
        // Mount points, and what the caller keeps as the image has it, are not the layer's.
        let mut ignored: Vec<&str> = lode_native_runner::builder::MOUNT_POINTS.to_vec();
        ignored.extend(kept.iter().map(String::as_str));
        let report = lode_fs::ingest_layer(
            &index,
            upper,
            &ignored,
            host_ids,
            self.registry.clone(),
            lode_fs::IngestOptions::default(),
        )
        .await
        .map_err(|e| match &e {
            // The sandbox's processes moved files while the snapshot read them.
            lode_fs::Error::Changed(_) => changed(e),
            lode_fs::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                changed(e)
            }
            _ => Refused::internal(format!("storing the snapshot: {e}")),
        })?;
        let digest = report
            .digest
            .ok_or_else(|| Refused::internal("the snapshot stored no index"))?;
        if let Some(tag) = tag {
            self.registry
                .set_tag(tag, &digest, TagUpdate::Always)
                .await
                .map_err(|e| {
                    Refused::bad(format!("snapshot {digest} stored, but tag {tag:?}: {e}"))
                })?;
        }
        Ok(digest)
    }

    /// The lazy mount of image `digest`, shared with everything else that runs it.
    pub async fn mount_image(
        &self,
        digest: &lode_registry::Digest,
    ) -> Result<Arc<lode_fs::Mount>, Refused> {
        self.mounts.mount(digest).await.map_err(Refused::internal)
    }

    /// Where scratch space of containers and sandboxes goes; the server's start clears it,
    /// mounts included.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Builds `spec` (each line of progress to `events`) and points `tag` at it; says how it
    /// ended, as the API streams it last. `network` says whether its steps may reach out.
    pub async fn build_and_tag(
        &self,
        spec: &ImageSpec,
        tag: Option<&str>,
        events: Events,
        network: StepNetwork,
    ) -> Result<BuildEnd, Refused> {
        let started = std::time::Instant::now();
        let builder = self.builder.as_ref().ok_or_else(|| self.no_containers())?;
        Ok(match builder.build_with(spec, events, network).await {
            Ok(digest) => match tag {
                Some(tag) => match self.registry.set_tag(tag, &digest, TagUpdate::Always).await {
                    Ok(_) => BuildEnd::Done {
                        digest: digest.to_string(),
                        seconds: started.elapsed().as_secs_f64(),
                    },
                    Err(e) => BuildEnd::Error {
                        message: format!("built {digest} but could not tag it {tag}: {e}"),
                    },
                },
                None => BuildEnd::Done {
                    digest: digest.to_string(),
                    seconds: started.elapsed().as_secs_f64(),
                },
            },
            Err(e) => BuildEnd::Error {
                message: e.to_string(),
            },
        })
    }
}

/// A snapshot whose files changed under it, which a retry may not meet.
fn changed(e: lode_fs::Error) -> Refused {
    Refused::new(
        409,
        "snapshot_changed",
        format!(
            "the sandbox changed its files while the snapshot read them ({e}); try again, or \
             snapshot when its processes are quiet"
        ),
    )
}

/// Mounts a tmpfs of `bytes` (at least 1 MiB) at `at`: a sandbox's writable layer, charged
/// to whoever writes it and gone with its unmount.
pub(crate) fn mount_tmpfs(at: &Path, bytes: u64) -> std::io::Result<()> {
    use rustix::mount::MountFlags;
    // Inodes cost kernel memory that `size` does not count: one per 8 KiB of it.
    let bytes = bytes.max(1 << 20);
    let options = std::ffi::CString::new(format!(
        "size={bytes},nr_inodes={},mode=0755",
        (bytes / 8192).max(4096)
    ))?;
    rustix::mount::mount(
        "tmpfs",
        at,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        options.as_c_str(),
    )
    .map_err(|e| {
        std::io::Error::new(
            std::io::Error::from(e).kind(),
            format!(
                "mounting a sandbox's writable tmpfs at {}: {e}",
                at.display()
            ),
        )
    })
}

impl Native {
    /// Checks a request's limits, env and volumes; returns the limits, the timeout and the
    /// volumes with their host paths resolved.
    fn check(
        &self,
        request: &ContainerRequest,
    ) -> Result<(Limits, Option<Duration>, Vec<Volume>), Refused> {
        let b = &self.bounds;
        let range = |what: &str, flag: &str, low: String, high: String| {
            Refused::bad(format!(
                "{what} must be between {low} and {high} (--{flag})"
            ))
        };
        if let Some(m) = request.memory
            && !(4..=b.max_memory_mib).contains(&m)
        {
            return Err(range(
                "memory",
                "memory",
                "4 MiB".into(),
                format!("{} MiB", b.max_memory_mib),
            ));
        }
        if let Some(c) = request.cpu
            && !(c >= 0.01 && c <= b.max_cpu)
        {
            return Err(range(
                "cpu",
                "cpu",
                "0.01".into(),
                format!("{} cores", b.max_cpu),
            ));
        }
        if let Some(p) = request.pids
            && !(1..=b.max_pids).contains(&p)
        {
            return Err(range("pids", "pids", "1".into(), b.max_pids.to_string()));
        }
        let timeout = match request.timeout {
            Some(t) if !(t > 0.0 && t <= b.max_timeout.as_secs_f64()) => {
                return Err(range(
                    "timeout",
                    "timeout",
                    "0".into(),
                    format!("{} s", b.max_timeout.as_secs()),
                ));
            }
            Some(t) => Some(Duration::from_secs_f64(t)),
            None => None,
        };
        for (name, _) in &request.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(Refused::bad(format!(
                    "{name:?} is not a variable name (--env NAME=VALUE)"
                )));
            }
        }
        let volumes = request
            .volumes
            .iter()
            .map(|v| {
                let volume = self.allowed_volume(v)?;
                if !v.read_only {
                    self.check_writable(&volume)?;
                }
                Ok(volume)
            })
            .collect::<Result<_, Refused>>()?;
        Ok((
            Limits {
                memory: Some(request.memory.unwrap_or(b.default_memory_mib) << 20),
                cpu: request.cpu,
                pids: Some(request.pids.unwrap_or(b.default_pids)),
                devices: Vec::new(),
            },
            timeout,
            volumes,
        ))
    }
}

impl Native {
    /// A read-write volume the container's root could not write would fail deep inside the
    /// command with a bare EACCES; this says why before anything starts.
    fn check_writable(&self, volume: &Volume) -> Result<(), Refused> {
        use std::os::unix::fs::MetadataExt;
        let Some(userns) = &self.user_namespace else {
            return Ok(());
        };
        let root = userns.ids().host_base;
        let source = &volume.source;
        let meta = volume
            .metadata()
            .map_err(|e| Refused::bad(format!("volume source {}: {e}", source.display())))?;
        let mode = meta.mode();
        let writable = (meta.uid() == root && mode & 0o200 != 0)
            || (meta.gid() == root && mode & 0o020 != 0)
            || mode & 0o002 != 0;
        if writable {
            return Ok(());
        }
        Err(Refused::bad(format!(
            "volume {} is not writable by the container's root, which is host uid {root}: \
             run `chown {root}:{root} {}` on the host, or mount it read-only with :ro",
            source.display(),
            source.display()
        )))
    }

    /// Opens a volume's host side below the `--allow-volume` root that holds it. The kernel
    /// resolves it beneath that root without following a symlink, and the container's mount
    /// is cloned from the descriptor this returns, so nothing swapped in later can redirect
    /// it.
    fn allowed_volume(&self, request: &VolumeRequest) -> Result<Volume, Refused> {
        let source = Path::new(&request.source);
        if !source.is_absolute() {
            return Err(Refused::bad(format!(
                "volume source {:?} must be an absolute host path",
                request.source
            )));
        }
        let not_allowed = |why: String| Refused::new(403, "volume_not_allowed", why);
        for root in &self.bounds.volume_roots {
            let Ok(real_root) = std::fs::canonicalize(root) else {
                continue;
            };
            let relative = source
                .strip_prefix(root)
                .or_else(|_| source.strip_prefix(&real_root));
            let Ok(relative) = relative else { continue };
            return Volume::beneath(&real_root, relative, &request.target, request.read_only)
                .map_err(|e| match e.kind() {
                    // A symlink on the way, or a path that leaves the root.
                    std::io::ErrorKind::PermissionDenied => not_allowed(e.to_string()),
                    _ => Refused::bad(e.to_string()),
                });
        }
        Err(not_allowed(format!(
            "host path {} may not be mounted into containers: start `lode serve` with \
             --allow-volume DIR for a directory that holds it",
            source.display()
        )))
    }
}
