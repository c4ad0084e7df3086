//! Outbound HTTP from Wasm guests: denied unless the app allow-lists the host, and never to
//! Lode's own listeners.
//!
//! The check runs twice: on the URL's host against the allow-list, then on every address the
//! host resolves to, so an allow-listed name that points at loopback cannot reach the API.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::uri::Scheme;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

/// One allow-list entry: `host`, `host:port`, `*.domain` or `*.domain:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

impl HostPattern {
    /// Parses an allow-list entry; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim().to_ascii_lowercase();
        if text.contains("://") || text.contains('/') {
            return Err("give a host or host:port, not a URL".into());
        }
        let (host, port) = match text.rsplit_once(':') {
            // A bare IPv6 address has colons but no port.
            Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
                let port = port
                    .parse::<u16>()
                    .map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
                (host.to_string(), Some(port))
            }
            _ => (text.clone(), None),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(rest) => (rest.to_string(), true),
            None => (host, false),
        };
        if host.is_empty() || host.contains('*') {
            return Err("the host is empty or has a '*' other than a leading '*.'".into());
        }
        Ok(Self {
            host,
            wildcard,
            port,
        })
    }

    fn matches(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        if self.wildcard {
            host.strip_suffix(&self.host)
                .is_some_and(|prefix| prefix.ends_with('.'))
        } else {
            host == self.host
        }
    }
}

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
        }
        addrs.first().copied().ok_or(HttpError::DestinationNotFound)
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
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
    fn patterns() {
        let exact = HostPattern::parse("API.example.com").unwrap();
        assert!(exact.matches("api.example.com", 443));
        assert!(!exact.matches("x.api.example.com", 443));
        let wild = HostPattern::parse("*.example.com:8443").unwrap();
        assert!(wild.matches("a.example.com", 8443));
        assert!(!wild.matches("example.com", 8443));
        assert!(!wild.matches("badexample.com", 8443));
        assert!(!wild.matches("a.example.com", 443));
        let v6 = HostPattern::parse("[::1]:80").unwrap();
        assert!(v6.matches("::1", 80));
        assert!(HostPattern::parse("http://x").is_err());
        assert!(HostPattern::parse("a.*.com").is_err());
        assert!(HostPattern::parse("x:99999").is_err());
    }

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
