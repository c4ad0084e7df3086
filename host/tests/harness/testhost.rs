//! A host for network tests, made by the test itself: a network namespace joined to this
//! machine by a veth pair, answering HTTP on every address it holds. No traffic leaves the
//! machine: the addresses it takes (a private one, a public-looking documentation one, the
//! cloud metadata one) are routed to it only for as long as it lives.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// One test host. Dropping it removes the namespace, its links and its routes.
pub struct TestHost {
    namespace: String,
    /// The private address inside it (10.213.N.2), on its veth.
    pub private: String,
    /// The veth's range, for `--allow-net`.
    pub private_cidr: String,
    /// A public-looking address inside it (TEST-NET-2, 198.51.100.N): "the internet".
    pub public: String,
    /// This machine's side of the veth: one of the host's own addresses.
    pub host_side: String,
    /// Whether it also answers at 169.254.169.254 (the cloud metadata address).
    pub metadata: bool,
    stop: Arc<AtomicBool>,
    server: Option<std::thread::JoinHandle<()>>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestHost {
    /// Makes the namespace and starts its HTTP server on port 80, answering `test host`.
    /// With `metadata`, 169.254.169.254 is routed to it too (one such host at a time).
    pub fn start(metadata: bool) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = (std::process::id() + NEXT.fetch_add(1, Ordering::Relaxed) * 7919) % 250 + 1;
        let namespace = format!("lode-th-{}-{n}", std::process::id());
        let (outer, inner) = (
            format!("lth{n}a{}", std::process::id() % 1000),
            format!("lth{n}b"),
        );
        let mut host = TestHost {
            namespace: namespace.clone(),
            private: format!("10.213.{n}.2"),
            private_cidr: format!("10.213.{n}.0/30"),
            public: format!("198.51.100.{n}"),
            host_side: format!("10.213.{n}.1"),
            metadata,
            stop: Arc::new(AtomicBool::new(false)),
            server: None,
        };
        ip(&["netns", "add", &namespace]);
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ]);
        ip(&["link", "set", &inner, "netns", &namespace]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", host.host_side),
            "dev",
            &outer,
        ]);
        ip(&["link", "set", &outer, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &namespace, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["link", "set", "lo", "up"]);
        inside(&[
            "addr",
            "add",
            &format!("{}/30", host.private),
            "dev",
            &inner,
        ]);
        inside(&["addr", "add", &format!("{}/32", host.public), "dev", &inner]);
        inside(&["link", "set", &inner, "up"]);
        inside(&["route", "add", "default", "via", &host.host_side]);
        ip(&[
            "route",
            "add",
            &format!("{}/32", host.public),
            "via",
            &host.private,
        ]);
        if metadata {
            inside(&["addr", "add", "169.254.169.254/32", "dev", &inner]);
            ip(&["route", "add", "169.254.169.254/32", "via", &host.private]);
        }
        host.server = Some(host.serve());
        host
    }

    /// A thread in the namespace accepting on port 80; it ends with the namespace.
    fn serve(&self) -> std::thread::JoinHandle<()> {
        let path = format!("/run/netns/{}", self.namespace);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stop = self.stop.clone();
        let server = std::thread::spawn(move || {
            let netns = std::fs::File::open(&path).unwrap();
            // SAFETY: setns(2) on this thread only, with a namespace descriptor we hold.
            let joined = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(joined, 0, "joining {path}");
            let listener = TcpListener::bind("0.0.0.0:80").unwrap();
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                let _ = stream.write_all(
                    b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\ntest host\n",
                );
            }
        });
        ready_rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .unwrap();
        server
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
        if self.metadata {
            let _ = Command::new("ip")
                .args(["route", "del", "169.254.169.254/32"])
                .output();
        }
        let _ = Command::new("ip")
            .args(["route", "del", &format!("{}/32", self.public)])
            .output();
        // The veth pair goes with the namespace.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .output();
    }
}
