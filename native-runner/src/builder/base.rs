//! Bases: Debian made with debootstrap, once per release and shared by every build (locked
//! while one is made, pruned of what images do not need, and marked done), and images pulled
//! from OCI registries.

use super::*;

/// The Debian mirror the host's apt uses, or Debian's own.
pub(super) fn debian_mirror() -> String {
    if let Ok(mirror) = std::env::var("LODE_DEBIAN_MIRROR") {
        return mirror;
    }
    let deb822 =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let from_deb822 = deb822
        .lines()
        .filter_map(|l| l.strip_prefix("URIs:"))
        .flat_map(str::split_whitespace)
        .find(|uri| uri.ends_with("/debian") || uri.ends_with("/debian/"));
    let legacy = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    let from_legacy = legacy
        .lines()
        .filter(|l| l.starts_with("deb "))
        .flat_map(|l| l.split_whitespace().nth(1))
        .find(|uri| uri.ends_with("/debian") || uri.ends_with("/debian/"));
    from_deb822
        .or(from_legacy)
        .unwrap_or("http://deb.debian.org/debian")
        .to_string()
}

/// Takes `<base_dir>/<release>.lock`, waiting for another build (or server) making the same
/// base.
pub(super) fn lock_base(base_dir: &Path, release: &str) -> Result<std::fs::File, BuildError> {
    let fail = |e: std::io::Error| {
        BuildError::Other(format!(
            "locking the {release} base in {}: {e}",
            base_dir.display()
        ))
    };
    // The base holds real setuid-root files (su, mount): out of other users' reach.
    lode_fs::create_private_dir(base_dir).map_err(fail)?;
    let file = std::fs::File::create(base_dir.join(format!("{release}.lock"))).map_err(fail)?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| fail(e.into()))?;
    Ok(file)
}

/// Runs debootstrap into `<base_dir>/<release>`, prunes what images do not need, and marks
/// it done.
pub(super) fn debootstrap(
    base_dir: &Path,
    release: &str,
    events: Events,
) -> Result<(), BuildError> {
    let target = base_dir.join(format!("{release}.partial"));
    // A debootstrap that was killed can leave /proc or /sys mounted inside its target;
    // deleting through those would reach the host's.
    unmount_under(&target);
    let _ = std::fs::remove_dir_all(&target);
    std::fs::create_dir_all(base_dir)
        .map_err(|e| BuildError::Other(format!("creating {}: {e}", base_dir.display())))?;
    let mirror = debian_mirror();
    let argv = [
        "debootstrap".to_string(),
        "--variant=minbase".into(),
        "--include=python3,python3-pip,ca-certificates".into(),
        release.into(),
        target.display().to_string(),
        mirror,
    ];
    events(BuildEvent::Log {
        line: argv.join(" "),
    });
    let mut child = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            BuildError::Other(format!(
                "debian_slim needs debootstrap on the host ({e}): apt-get install debootstrap"
            ))
        })?;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let err_tail = tail.clone();
    let stderr = child.stderr.take();
    let err_thread = std::thread::spawn(move || {
        if let Some(pipe) = stderr {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut tail = err_tail.lock().expect("tail lock");
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
    });
    if let Some(pipe) = child.stdout.take() {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            events(BuildEvent::Log { line });
        }
    }
    let status = child
        .wait()
        .map_err(|e| BuildError::Other(format!("waiting for debootstrap: {e}")))?;
    let _ = err_thread.join();
    if !status.success() {
        let mut output = tail
            .lock()
            .expect("tail lock")
            .iter()
            .cloned()
            .collect::<Vec<_>>();
        if let Ok(log) = std::fs::read_to_string(target.join("debootstrap/debootstrap.log")) {
            output.extend(
                log.lines()
                    .rev()
                    .take(TAIL_LINES)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .map(String::from),
            );
        }
        return Err(BuildError::StepFailed {
            number: 0,
            description: format!("debian_slim ({release})"),
            command: argv.join(" "),
            reason: format!("debootstrap exited with {status}"),
            output: output.join("\n"),
        });
    }
    prune(&target).map_err(|e| BuildError::Other(format!("pruning the base: {e}")))?;
    let rootfs = base_dir.join(release);
    let _ = std::fs::remove_dir_all(&rootfs);
    std::fs::rename(&target, &rootfs)
        .and_then(|()| std::fs::write(base_dir.join(format!("{release}.done")), b""))
        .map_err(|e| BuildError::Other(format!("keeping the base: {e}")))
}

/// Detaches every mount at or below `dir`, deepest first.
pub(super) fn unmount_under(dir: &Path) {
    for mount in lode_fs::mounts_under(dir) {
        let _ = rustix::mount::unmount(&mount.point, rustix::mount::UnmountFlags::DETACH);
    }
}

/// Removes package lists and caches, docs and locales, and the host's resolver and name.
pub(super) fn prune(root: &Path) -> std::io::Result<()> {
    for dir in [
        "var/lib/apt/lists",
        "var/cache/apt",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/locale",
    ] {
        let dir = root.join(dir);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else if entry.file_name() != "lock" {
                std::fs::remove_file(&path)?;
            }
        }
    }
    std::fs::write(root.join("etc/resolv.conf"), b"")?;
    std::fs::write(root.join("etc/hostname"), b"lode\n")?;
    let config = ImageConfig {
        env: vec![
            ("PATH".into(), DEFAULT_PATH.into()),
            ("LANG".into(), "C.UTF-8".into()),
        ],
        ..ImageConfig::default()
    };
    let path = root.join(CONFIG_PATH);
    std::fs::create_dir_all(path.parent().expect("config has a parent"))?;
    std::fs::write(
        path,
        serde_json::to_vec_pretty(&config).expect("config serializes"),
    )
}

/// The secret keys registry credentials are read from, as Modal names them.
pub const REGISTRY_USERNAME: &str = "REGISTRY_USERNAME";
/// See [`REGISTRY_USERNAME`].
pub const REGISTRY_PASSWORD: &str = "REGISTRY_PASSWORD";

impl Builder {
    /// An image from an OCI registry: resolved to its manifest every build (a tag may move),
    /// pulled and flattened only when that manifest was never pulled before.
    pub(super) async fn registry_base(
        &self,
        reference: &str,
        secret: Option<&str>,
        of: usize,
        events: &Events,
    ) -> Result<Digest, BuildError> {
        let options = crate::oci::pull::PullOptions {
            insecure_registries: self.insecure_registries.clone(),
            credentials: match secret {
                Some(name) => Some(self.registry_credentials(name)?),
                None => None,
            },
            credentials_from: secret.map(|s| format!("secret {s:?}")).unwrap_or_default(),
        };
        let failed =
            |e: crate::oci::pull::PullError| BuildError::Spec(format!("from_registry: {e}"));
        let image = crate::oci::pull::resolve(reference, &options)
            .await
            .map_err(failed)?;
        let key =
            blake3::hash(format!("lode from_registry v1 {}", image.digest).as_bytes()).to_hex();
        let tag = format!("build-cache/{key}");
        let cached = self.cached(&tag).await?;
        events(BuildEvent::Step {
            number: 0,
            of,
            description: format!("from_registry {reference} ({})", image.digest),
            cached: cached.is_some(),
        });
        if let Some(digest) = cached {
            return Ok(digest);
        }
        if let Some(disk) = self.limits.disk
            && image.layer_bytes() > disk
        {
            return Err(BuildError::Spec(format!(
                "from_registry {reference}: its layers take {:.1} GB, more than one build step \
                 may write ({:.1} GB, `lode serve --build-disk`)",
                image.layer_bytes() as f64 / 1e9,
                disk as f64 / 1e9
            )));
        }
        events(BuildEvent::Log {
            line: format!(
                "pulling {} layers, {:.1} MB",
                image.layer_count(),
                image.layer_bytes() as f64 / 1e6
            ),
        });
        let scratch = tempfile::tempdir_in(&self.work_dir)
            .map_err(|e| BuildError::Other(format!("scratch space for the pull: {e}")))?;
        let layout = scratch.path().join("layout");
        crate::oci::pull::download(&image, &layout, &options)
            .await
            .map_err(failed)?;
        let rootfs = scratch.path().join("rootfs");
        let unpack_to = rootfs.clone();
        tokio::task::spawn_blocking(move || crate::oci::import(&layout, &unpack_to))
            .await
            .map_err(|e| BuildError::Other(format!("unpacking task failed: {e}")))?
            .map_err(|e| BuildError::Spec(format!("from_registry {reference}: {e}")))?;
        let report =
            lode_fs::ingest(&rootfs, self.registry.clone(), IngestOptions::default()).await?;
        let digest = report
            .digest
            .ok_or_else(|| BuildError::Other("the pulled image stored no index".into()))?;
        self.registry
            .set_tag(&tag, &digest, TagUpdate::Always)
            .await?;
        Ok(digest)
    }

    /// User name and password from the secret `name`.
    fn registry_credentials(&self, name: &str) -> Result<(String, String), BuildError> {
        let values = self
            .secret(
                name,
                &format!("{REGISTRY_USERNAME}=... {REGISTRY_PASSWORD}=..."),
            )
            .map_err(|why| BuildError::Spec(format!("from_registry: {why}")))?;
        let get = |key: &str| {
            values.get(key).cloned().ok_or_else(|| {
                BuildError::Spec(format!(
                    "from_registry: secret {name:?} has no {key}; registry credentials are \
                     read from {REGISTRY_USERNAME} and {REGISTRY_PASSWORD}"
                ))
            })
        };
        Ok((get(REGISTRY_USERNAME)?, get(REGISTRY_PASSWORD)?))
    }

    /// The values of the secret `name`, or why there are none; `create` shows what
    /// `lode secret create NAME ...` should hold.
    pub(super) fn secret(
        &self,
        name: &str,
        create: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, String> {
        let lookup = self
            .secrets
            .as_ref()
            .ok_or_else(|| format!("this builder reads no secrets (secret {name:?})"))?;
        lookup(name)?.ok_or_else(|| {
            format!("secret {name:?} does not exist; create it with `lode secret create {name} {create}`")
        })
    }
}
