//! The host's side of the agent's connections: who may connect, and its first message.

use super::*;

/// Takes the agent's connections on `host.sock`.
pub(super) struct Accept<'a> {
    pub(super) listener: &'a UnixListener,
    pub(super) container_uid: u32,
    pub(super) start_timeout: Duration,
    pub(super) exit: &'a watch::Receiver<Option<Exit>>,
}

impl Accept<'_> {
    /// The next connection from the container's root, its network namespace, and its pid.
    pub(super) async fn next(
        &self,
    ) -> Result<
        (
            tokio::net::UnixStream,
            Option<std::os::fd::OwnedFd>,
            Option<u32>,
        ),
        String,
    > {
        let container_uid = self.container_uid;
        tokio::select! {
            accepted = tokio::time::timeout(self.start_timeout, self.listener.accept()) => match accepted {
                Ok(Ok((stream, _))) => {
                    let peer = stream.peer_cred().ok();
                    if peer.map(|c| c.uid()) != Some(container_uid) {
                        return Err(format!(
                            "a process of uid {:?} connected to the agent socket, not the \
                             container's root ({container_uid}); stopping",
                            peer.map(|c| c.uid())
                        ));
                    }
                    // The agent's network namespace is the container's; opened while the
                    // agent is connected, so its pid is not yet anyone else's.
                    let pid = peer.and_then(|c| c.pid()).and_then(|p| u32::try_from(p).ok());
                    let network = pid.and_then(|pid| own_network(&format!("/proc/{pid}/ns/net")));
                    Ok((stream, network, pid))
                }
                Ok(Err(e)) => Err(format!("accepting the agent's connection: {e}")),
                Err(_) => Err(format!(
                    "the container's agent did not connect within {:?}", self.start_timeout
                )),
            },
            exit = wait_exit(self.exit.clone()) => Err(format!(
                "{exit} before its agent connected (does the image have python3? see `lode logs`)"
            )),
        }
    }

    /// The agent's first message: `Ready` or `SnapshotReady`; a fatal load error, a hang-up
    /// or silence past the start timeout stop the container.
    pub(super) async fn first_message(
        &self,
        reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
        stop: &AtomicBool,
    ) -> Result<FromAgent, StartError> {
        let fail = |message: String| {
            stop.store(true, Ordering::Relaxed);
            StartError::Agent(message)
        };
        let first = tokio::time::timeout(self.start_timeout, read_message(reader))
            .await
            .map_err(|_| {
                fail(format!(
                    "the agent did not load the module within {:?}",
                    self.start_timeout
                ))
            })?;
        match first {
            Ok(Some(FromAgent::Fatal { error })) => {
                stop.store(true, Ordering::Relaxed);
                Err(StartError::Fatal(error))
            }
            Ok(Some(message)) => Ok(message),
            Ok(None) => {
                // The agent hung up before it was ready; the container goes too.
                stop.store(true, Ordering::Relaxed);
                let exit = tokio::time::timeout(self.start_timeout, wait_exit(self.exit.clone()))
                    .await
                    .map_or_else(|_| "the container hung up".to_string(), |e| e.to_string());
                Err(StartError::Agent(format!(
                    "{exit} while loading the module (see `lode logs`)"
                )))
            }
            Err(e) => Err(fail(format!("reading the agent's first message: {e}"))),
        }
    }
}
