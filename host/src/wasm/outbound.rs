//! Outbound HTTP from Wasm guests: denied unless the app allow-lists the host, and never to
//! Lode's own listeners.
//!
//! The check runs twice: on the URL's host against the allow-list, then on every address the
//! host resolves to. An allow-listed name that resolves to loopback, a private, CGNAT or
//! link-local address (the host's neighbours, cloud metadata) is refused unless that address
//! or its range is in the list too, as an address or a CIDR: the same ranges the native
//! engine's egress filter refuses ([`lode_native_runner::egress::is_blocked`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::uri::Scheme;
use lode_native_runner::egress::is_blocked;

use crate::proto::host_pattern::{HostPattern, canonical};
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

/// The outbound rules for one app, shared by all its requests.
#[derive(Debug, Clone, Default)]
pub struct OutboundPolicy {
    allow: Vec<HostPattern>,
    protected: Arc<Vec<SocketAddr>>,
}

impl OutboundPolicy {
    /// A policy allowing `allow` (already validated), never reaching `protected` listeners.
    pub fn new(allow: &[String], protected: Arc<Vec<SocketAddr>>) -> Self {
        Self {
            allow: allow
                .iter()
                .filter_map(|p| HostPattern::parse(p).ok())
                .collect(),
            protected,
        }
    }

    fn allows_host(&self, host: &str, port: u16) -> bool {
        self.allow.iter().any(|p| p.matches(host, port))
    }

    /// Whether the list names `ip` explicitly (its address, or a CIDR holding it), which a
    /// blocked range needs.
    fn names_address(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.allow
            .iter()
            .filter_map(HostPattern::range)
            .any(|range| range.contains(&ip))
    }

    /// Whether `addr` is one of Lode's own listeners, as reached from this machine.
    fn is_protected(&self, addr: SocketAddr) -> bool {
        let ip = canonical(addr.ip());
        self.protected.iter().any(|listener| {
            let listener_ip = canonical(listener.ip());
            listener.port() == addr.port()
                && (ip == listener_ip
                    || ip.is_loopback()
                    || ip.is_unspecified()
                    || listener_ip.is_unspecified())
        })
    }

    /// Checks the host against the allow-list and every address it resolves to against
    /// Lode's listeners; returns the first vetted address.
    async fn check(&self, host: &str, port: u16) -> Result<SocketAddr, HttpError> {
        if !self.allows_host(host, port) {
            tracing::debug!(
                host,
                port,
                "outbound request denied: host not in allow-list"
            );
            return Err(HttpError::HttpRequestDenied);
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|_| HttpError::DestinationNotFound)?
            .collect();
        for addr in &addrs {
            if self.is_protected(*addr) {
                tracing::warn!(host, %addr, "outbound request denied: target is a Lode listener");
                return Err(HttpError::DestinationIpProhibited);
            }
            if is_blocked(addr.ip()) && !self.names_address(addr.ip()) {
                tracing::warn!(
                    host,
                    %addr,
                    "outbound request denied: a loopback, private or link-local address the \
                     allow-list does not name (add it, or its CIDR, to network.allow)"
                );
                return Err(HttpError::DestinationIpProhibited);
            }
        }
        addrs.first().copied().ok_or(HttpError::DestinationNotFound)
    }
}

type SendResult = wasmtime_wasi_http::Result<(
    http::Response<WasiBody>,
    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
)>;

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        drop(fut);
        let policy = self.clone();
        Box::new(async move {
            let uri = request.uri();
            let host = uri.host().unwrap_or_default().to_ascii_lowercase();
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri
                .port_u16()
                .unwrap_or(if uri.scheme() == Some(&Scheme::HTTPS) {
                    443
                } else {
                    80
                });
            let vetted = policy.check(&host, port).await?;
            // Plain HTTP connects to the address just vetted, so a name cannot resolve to
            // something else (a Lode port, say) between the check and the connect; the Host
            // header already carries the name. HTTPS keeps the name for SNI and certificate
            // checks, and a TLS handshake cannot speak to Lode's plain-HTTP ports.
            let mut request = request;
            if request.uri().scheme() != Some(&Scheme::HTTPS) {
                let mut parts = request.uri().clone().into_parts();
                parts.authority = http::uri::Authority::try_from(vetted.to_string()).ok();
                if let Ok(uri) = http::Uri::from_parts(parts) {
                    *request.uri_mut() = uri;
                }
            }
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            use http_body_util::BodyExt;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lode_listeners_are_protected_whatever_the_loopback_spelling() {
        let api: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let policy = OutboundPolicy::new(&["*.x".into()], Arc::new(vec![api]));
        assert!(policy.is_protected("127.0.0.1:7070".parse().unwrap()));
        assert!(policy.is_protected("127.0.0.2:7070".parse().unwrap()));
        assert!(policy.is_protected("[::1]:7070".parse().unwrap()));
        assert!(policy.is_protected("[::ffff:127.0.0.1]:7070".parse().unwrap()));
        assert!(policy.is_protected("0.0.0.0:7070".parse().unwrap()));
        assert!(!policy.is_protected("127.0.0.1:7071".parse().unwrap()));
    }

    #[tokio::test]
    async fn names_resolving_to_the_host_or_its_neighbours_need_their_address_allowed() {
        // "localhost" resolves to loopback: allowed by name alone, it is still refused.
        let by_name = OutboundPolicy::new(&["localhost:8080".into()], Arc::new(vec![]));
        assert!(matches!(
            by_name.check("localhost", 8080).await,
            Err(HttpError::DestinationIpProhibited)
        ));
        let named = OutboundPolicy::new(
            &["localhost:8080".into(), "127.0.0.0/8".into()],
            Arc::new(vec![]),
        );
        assert!(named.check("localhost", 8080).await.is_ok());
        let metadata = OutboundPolicy::new(&["169.254.169.254".into()], Arc::new(vec![]));
        assert!(metadata.check("169.254.169.254", 80).await.is_ok());
        assert!(matches!(
            metadata.check("169.254.169.254", 8080).await,
            Err(HttpError::HttpRequestDenied)
        ));
    }

    #[tokio::test]
    async fn hosts_outside_the_allow_list_are_denied() {
        let policy = OutboundPolicy::new(&["localhost:9".into()], Arc::new(vec![]));
        assert!(matches!(
            policy.check("example.com", 80).await,
            Err(HttpError::HttpRequestDenied)
        ));
        let protected = OutboundPolicy::new(
            &["localhost:7070".into()],
            Arc::new(vec!["127.0.0.1:7070".parse().unwrap()]),
        );
        assert!(matches!(
            protected.check("localhost", 7070).await,
            Err(HttpError::DestinationIpProhibited)
        ));
    }
}
