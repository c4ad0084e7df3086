//! Outbound network: a namespace made on a host thread and served by `slirp4netns`, whose
//! group id puts it behind the egress filter ([`crate::egress`]).

use super::*;

/// The DNS forwarder `slirp4netns` answers on inside the container.
pub(super) const SLIRP_DNS: &str = "10.0.2.3";

/// A fresh network namespace, made on a short-lived thread so this process keeps its own.
pub(super) fn new_net_namespace() -> io::Result<OwnedFd> {
    std::thread::spawn(|| {
        // SAFETY: unshare(2) with a flag; it changes only this thread's namespace.
        check(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
        Ok(OwnedFd::from(std::fs::File::open(
            "/proc/thread-self/ns/net",
        )?))
    })
    .join()
    .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

/// A `slirp4netns` process serving one container's network namespace. It exits when the
/// write end of its exit pipe closes, so it never outlives this process. It runs with its
/// grant's group, which the egress filter knows it by.
#[derive(Debug)]
pub(super) struct Slirp {
    process: Child,
    exit: Option<io::PipeWriter>,
    /// Dropped only after the process is gone, so it is never unfiltered.
    grant: Option<crate::egress::Grant>,
}

/// How long `slirp4netns` may take to configure the namespace.
pub(super) const SLIRP_READY: Duration = Duration::from_secs(5);

impl Slirp {
    pub(super) fn start(netns: &OwnedFd, grant: crate::egress::Grant) -> io::Result<Self> {
        let (mut ready_read, ready_write) = io::pipe()?;
        let (exit_read, exit_write) = io::pipe()?;
        let netns_path = format!("/proc/{}/fd/{}", std::process::id(), netns.as_raw_fd());
        let (ready_fd, exit_fd) = (ready_write.as_raw_fd(), exit_read.as_raw_fd());
        let gid = grant.gid();
        let mut command = Command::new("slirp4netns");
        command
            .args([
                "--configure",
                "--mtu=65520",
                "--disable-host-loopback",
                "--enable-sandbox",
                "--enable-seccomp",
                "--netns-type=path",
                "--ready-fd=3",
                "--exit-fd=4",
                &netns_path,
                "tap0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: setgroups/setresgid with plain integers, then fcntl(2) and dup2(2) only, on
        // descriptors this process holds, between fork and exec. Both are first copied above
        // 10, so neither can be overwritten by the other on its way to 3 or 4, and dup2 then
        // always clears close-on-exec.
        unsafe {
            command.pre_exec(move || {
                // Its group marks every socket it opens for the egress filter; it stays uid 0
                // (with its capabilities) to join the container's namespace.
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setresgid(gid, gid, gid))?;
                let ready = libc::fcntl(ready_fd, libc::F_DUPFD_CLOEXEC, 10);
                let exit = libc::fcntl(exit_fd, libc::F_DUPFD_CLOEXEC, 10);
                check(ready)?;
                check(exit)?;
                check(libc::dup2(ready, 3))?;
                check(libc::dup2(exit, 4))
            });
        }
        let mut process = command.spawn().map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                io::Error::new(
                    e.kind(),
                    "--net outbound needs slirp4netns on the host: apt-get install slirp4netns",
                )
            } else {
                e
            }
        })?;
        drop((ready_write, exit_read));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            let _ = tx.send(ready_read.read(&mut byte).map(|n| n == 1));
        });
        let ready = rx.recv_timeout(SLIRP_READY);
        if !matches!(ready, Ok(Ok(true))) {
            let _ = process.kill();
            let _ = process.wait();
            let mut stderr = String::new();
            if let Some(mut pipe) = process.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            return Err(io::Error::other(format!(
                "slirp4netns did not set up the container's network within {SLIRP_READY:?}: {}",
                stderr.trim()
            )));
        }
        // It logs little after start-up, but a full pipe would stall it.
        if let Some(mut pipe) = process.stderr.take() {
            std::thread::spawn(move || io::copy(&mut pipe, &mut io::sink()));
        }
        Ok(Self {
            process,
            exit: Some(exit_write),
            grant: Some(grant),
        })
    }
}

impl Drop for Slirp {
    /// Stops the process, then takes its group out of the filter.
    fn drop(&mut self) {
        drop(self.exit.take());
        if !matches!(self.process.try_wait(), Ok(Some(_))) {
            let _ = self.process.kill();
        }
        let _ = self.process.wait();
        drop(self.grant.take());
    }
}
