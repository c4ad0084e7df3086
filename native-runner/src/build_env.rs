//! What build steps borrow from the host, and only build steps: its CA bundle and pip
//! configuration (copied into a directory mounted read-only in the step), its proxy and
//! `PIP_*` variables, and the proxy's addresses for the egress filter. None of it lands in an
//! image: the mount point is under `/dev`, which a step's layer never holds.

use std::path::Path;

use crate::builder::{BUILD_ENV_MOUNT, random_hex};

/// What the host lends build containers, copied into `dir` (mounted read-only at
/// [`BUILD_ENV_MOUNT`]): its CA bundle and pip configuration.
#[derive(Debug, Default)]
pub(crate) struct Inherited {
    pub(crate) ca_bundle: bool,
    pub(crate) pip_conf: bool,
}

pub(crate) const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
pub(crate) const HOST_PIP_CONF: &str = "/etc/pip.conf";

pub(crate) fn prepare_build_env(dir: &Path) -> std::io::Result<Inherited> {
    std::fs::create_dir_all(dir)?;
    let copy = |from: &str, name: &str| -> std::io::Result<bool> {
        match std::fs::read(from) {
            Ok(bytes) => {
                // Builds run at once: each writes its own temporary file, and the rename swaps
                // the new copy in atomically.
                let tmp = dir.join(format!(".{name}.{}.tmp", random_hex()));
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, dir.join(name))?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let _ = std::fs::remove_file(dir.join(name));
                Ok(false)
            }
            Err(e) => Err(e),
        }
    };
    Ok(Inherited {
        ca_bundle: copy(HOST_CA_BUNDLE, "ca-certificates.crt")?,
        pip_conf: copy(HOST_PIP_CONF, "pip.conf")?,
    })
}

/// Proxy variables, passed to build steps as the host has them.
pub(crate) const PROXY_VARS: [&str; 8] = [
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
];

/// The addresses of the proxies the host's proxy variables name, for the egress filter to let
/// build steps reach (a proxy usually sits on a private address).
pub(crate) fn proxy_addresses() -> Vec<ipnet::IpNet> {
    use std::net::ToSocketAddrs;
    let mut addresses = Vec::new();
    for name in PROXY_VARS
        .iter()
        .filter(|n| !n.contains("no_") && !n.contains("NO_"))
    {
        let Ok(value) = std::env::var(name) else {
            continue;
        };
        let Ok(url) = url_host_port(&value) else {
            continue;
        };
        for addr in url.to_socket_addrs().into_iter().flatten() {
            let net = ipnet::IpNet::from(addr.ip());
            if !addresses.contains(&net) {
                addresses.push(net);
            }
        }
    }
    addresses
}

/// `host:port` of a proxy URL such as `http://user:pw@proxy.corp:3128/`.
pub(crate) fn url_host_port(url: &str) -> Result<String, ()> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    if host_port.is_empty() {
        return Err(());
    }
    let has_port = host_port
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.ends_with(':') && port.parse::<u16>().is_ok());
    Ok(if has_port {
        host_port.to_string()
    } else {
        format!("{host_port}:80")
    })
}

/// The environment a build step inherits from the host: its proxy variables and `PIP_*`
/// settings, with the CA bundle and pip configuration pointed at their copies inside the
/// container. Function containers never get these.
pub(crate) fn build_env(inherited: &Inherited) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(name, _)| PROXY_VARS.contains(&name.as_str()) || name.starts_with("PIP_"))
        .collect();
    env.push(("DEBIAN_FRONTEND".into(), "noninteractive".into()));
    env.push(("HOME".into(), "/root".into()));
    env.push(("PIP_ROOT_USER_ACTION".into(), "ignore".into()));
    // Images are Lode's to manage, as a container image's are: pip may install system-wide.
    env.push(("PIP_BREAK_SYSTEM_PACKAGES".into(), "1".into()));
    if inherited.ca_bundle {
        let bundle = format!("{BUILD_ENV_MOUNT}/ca-certificates.crt");
        for name in [
            "PIP_CERT",
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
        ] {
            env.retain(|(n, _)| n != name);
            env.push((name.into(), bundle.clone()));
        }
    }
    if inherited.pip_conf {
        env.retain(|(n, _)| n != "PIP_CONFIG_FILE");
        env.push((
            "PIP_CONFIG_FILE".into(),
            format!("{BUILD_ENV_MOUNT}/pip.conf"),
        ));
    }
    env
}
