//! Sandbox tunnels seen from inside function containers. A tunnel listens on the address of
//! Lode's public HTTP listener, which a container cannot reach (its loopback is its own, and
//! the egress filter refuses the host). So each tunnel on a loopback (or unspecified)
//! address is mirrored into every function container: a listener on the same address and
//! port in the container's own network namespace, relayed to the tunnel on the host. A
//! tunnel's URL then works the same from a client and from a function (Modal code that
//! health-checks the sandbox it made), and the container reaches the tunnels and nothing else
//! of the host's.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, Weak};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Connections relayed at once through one mirror; more wait for one to close.
const MAX_CONNECTIONS: usize = 64;

/// The tunnels and the containers they are mirrored into.
#[derive(Default)]
pub struct TunnelMirror {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next: u64,
    tunnels: HashMap<u64, SocketAddr>,
    containers: HashMap<u64, Arc<OwnedFd>>,
    /// The relay of each (container, tunnel) pair.
    relays: HashMap<(u64, u64), tokio::task::AbortHandle>,
}

/// A tunnel or a container in the mirror; dropped, it leaves it (its relays close).
pub struct Mirrored {
    mirror: Weak<TunnelMirror>,
    id: u64,
}

impl Drop for Mirrored {
    fn drop(&mut self) {
        let Some(mirror) = self.mirror.upgrade() else {
            return;
        };
        let mut state = mirror.state.lock().unwrap();
        state.tunnels.remove(&self.id);
        state.containers.remove(&self.id);
        state.relays.retain(|(container, tunnel), relay| {
            let gone = *container == self.id || *tunnel == self.id;
            if gone {
                relay.abort();
            }
            !gone
        });
    }
}

impl TunnelMirror {
    /// Mirrors the tunnel listening at `address` into every container, now and later.
    pub fn add_tunnel(self: &Arc<Self>, address: SocketAddr) -> Mirrored {
        let mut state = self.state.lock().unwrap();
        let id = state.take_id();
        state.tunnels.insert(id, address);
        let containers: Vec<_> = state
            .containers
            .iter()
            .map(|(c, n)| (*c, n.clone()))
            .collect();
        for (container, network) in containers {
            if let Some(relay) = relay(&network, address) {
                state.relays.insert((container, id), relay);
            }
        }
        self.handle(id)
    }

    /// Mirrors every tunnel, now and later, into the container whose network namespace is
    /// `network`.
    pub fn add_container(self: &Arc<Self>, network: OwnedFd) -> Mirrored {
        let network = Arc::new(network);
        let mut state = self.state.lock().unwrap();
        let id = state.take_id();
        state.containers.insert(id, network.clone());
        let tunnels: Vec<_> = state.tunnels.iter().map(|(t, a)| (*t, *a)).collect();
        for (tunnel, address) in tunnels {
            if let Some(relay) = relay(&network, address) {
                state.relays.insert((id, tunnel), relay);
            }
        }
        self.handle(id)
    }

    fn handle(self: &Arc<Self>, id: u64) -> Mirrored {
        Mirrored {
            mirror: Arc::downgrade(self),
            id,
        }
    }
}

impl State {
    fn take_id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
}

/// A listener on `address` inside `network`, relaying to the same address on the host; `None`
/// where the address is not one a container can share (a routable one) or the port is taken
/// there.
fn relay(network: &OwnedFd, address: SocketAddr) -> Option<tokio::task::AbortHandle> {
    let target = match address.ip() {
        ip if ip.is_loopback() => address,
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), address.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), address.port())
        }
        _ => return None,
    };
    let listener = lode_native_runner::sandbox::listen_inside(network, address)
        .and_then(|listener| {
            listener.set_nonblocking(true)?;
            TcpListener::from_std(listener)
        })
        .map_err(|e| tracing::debug!(%address, "mirroring a tunnel into a container: {e}"))
        .ok()?;
    let task = tokio::spawn(relay_each(listener, MAX_CONNECTIONS, move || {
        TcpStream::connect(target)
    }));
    Some(task.abort_handle())
}

/// Accepts connections on `listener` and joins each to a stream `connect` opens, at most
/// `max` at once (more wait for one to close). A connect that fails drops its connection.
pub async fn relay_each<F, Fut>(listener: TcpListener, max: usize, connect: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<TcpStream>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((mut client, _)) = listener.accept().await else {
            continue;
        };
        let connecting = connect();
        tokio::spawn(async move {
            let _slot = slot;
            match connecting.await {
                Ok(mut other) => {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut other).await;
                }
                Err(e) => tracing::debug!("a relayed connection was refused: {e}"),
            }
        });
    }
}
