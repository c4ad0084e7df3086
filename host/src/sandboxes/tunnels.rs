//! Tunnels: a sandbox's TCP ports reached from outside it (Modal's `encrypted_ports` and
//! `unencrypted_ports`, read back with `sb.tunnels()`). Each port gets a listener of its own
//! on the address of Lode's public HTTP listener, so whoever can reach that address can
//! reach the port, as with Modal's public tunnels; every connection is relayed to the port
//! on the sandbox's own loopback, through a socket made inside its network namespace.
//! Plain TCP: HTTP, WebSockets or anything else pass through unchanged, without TLS.

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::native::tunnel_mirror::{Mirrored, TunnelMirror, relay_each};
use crate::proto::sandboxes::Tunnel;

/// Ports one sandbox may open.
pub const MAX_PORTS: usize = 8;

/// Connections relayed at once through one tunnel; more wait for one to close.
const MAX_CONNECTIONS: usize = 256;

/// How long a connection into the sandbox may take to be accepted there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A sandbox's open tunnels; dropped, their listeners close (and their mirrors in function
/// containers).
#[derive(Default)]
pub struct Tunnels {
    tasks: Vec<tokio::task::AbortHandle>,
    _mirrored: Vec<Mirrored>,
}

impl Drop for Tunnels {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Checks the ports a sandbox asks to open.
pub fn check_ports(ports: &[u16]) -> Result<(), String> {
    if ports.len() > MAX_PORTS {
        return Err(format!("a sandbox opens at most {MAX_PORTS} ports"));
    }
    if ports.contains(&0) {
        return Err("port 0 is not a port to open; give the port the server listens on".into());
    }
    let mut seen = ports.to_vec();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != ports.len() {
        return Err("a port is listed twice".into());
    }
    Ok(())
}

/// Opens a tunnel for each of `ports` into the sandbox whose network namespace is
/// `network`, listening on `bind` and named by `host` in the answer, and mirrors each into
/// function containers through `mirror`.
pub async fn open(
    bind: IpAddr,
    host: &str,
    ports: &[u16],
    network: OwnedFd,
    mirror: &Arc<TunnelMirror>,
) -> std::io::Result<(Vec<Tunnel>, Tunnels)> {
    let network = Arc::new(network);
    let mut opened = Tunnels::default();
    let mut tunnels = Vec::new();
    for &port in ports {
        let listener = TcpListener::bind((bind, 0)).await?;
        let host_port = listener.local_addr()?.port();
        tunnels.push(Tunnel {
            port,
            host: host.to_string(),
            host_port,
        });
        let task = tokio::spawn(relay(listener, port, network.clone()));
        opened.tasks.push(task.abort_handle());
        opened
            ._mirrored
            .push(mirror.add_tunnel(std::net::SocketAddr::new(bind, host_port)));
    }
    Ok((tunnels, opened))
}

/// Accepts connections on `listener` and relays each to `port` inside the sandbox.
async fn relay(listener: TcpListener, port: u16, network: Arc<OwnedFd>) {
    relay_each(listener, MAX_CONNECTIONS, move || {
        let network = network.clone();
        async move { connect(&network, port).await }
    })
    .await;
}

async fn connect(network: &OwnedFd, port: u16) -> std::io::Result<TcpStream> {
    let network = network.try_clone()?;
    let stream = tokio::task::spawn_blocking(move || {
        lode_native_runner::sandbox::connect_inside(network, port, CONNECT_TIMEOUT)
    })
    .await
    .map_err(std::io::Error::other)??;
    stream.set_nonblocking(true)?;
    TcpStream::from_std(stream)
}
