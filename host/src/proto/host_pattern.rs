//! Outbound allow-list entries (`network.allow` in the manifest): `host`, `host:port`,
//! `*.domain` or a CIDR. The manifest checks them, and the Wasm engine's outbound policy
//! matches requests against them.

use std::net::IpAddr;

use ipnet::IpNet;
use lode_native_runner::egress::parse_cidr;

/// The ports an allow-list entry without one opens: HTTP and HTTPS, not every port.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];

/// One allow-list entry: `host`, `host:port`, `*.domain` or `*.domain:port`; without a port
/// it means 80 and 443.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

impl HostPattern {
    /// Parses an allow-list entry; the error says what is wrong with it. A CIDR
    /// (`10.0.0.0/8`) is a host pattern too: it matches literal addresses in its range.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim().to_ascii_lowercase();
        if text.contains("://") {
            return Err("give a host, host:port or CIDR, not a URL".into());
        }
        if text.contains('/') {
            return match parse_cidr(&text) {
                Some(_) => Ok(Self {
                    host: text,
                    wildcard: false,
                    port: None,
                }),
                None => Err("give a host, host:port or CIDR (10.0.0.0/8), not a path".into()),
            };
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

    /// Whether a request to `host:port` fits this entry.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let port_ok = match self.port {
            Some(p) => p == port,
            None => DEFAULT_PORTS.contains(&port),
        };
        if !port_ok {
            return false;
        }
        if let Some(range) = self.range() {
            return host
                .parse::<IpAddr>()
                .is_ok_and(|ip| range.contains(&canonical(ip)));
        }
        if self.wildcard {
            host.strip_suffix(&self.host)
                .is_some_and(|prefix| prefix.ends_with('.'))
        } else {
            host == self.host
        }
    }
}

impl HostPattern {
    /// The addresses the entry names explicitly: a CIDR's range, or a literal address.
    pub fn range(&self) -> Option<IpNet> {
        if self.wildcard {
            return None;
        }
        parse_cidr(&self.host)
    }
}

/// An address as the rules compare it: an IPv4-mapped IPv6 address as its IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
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
        // Without a port: HTTP and HTTPS only.
        assert!(exact.matches("api.example.com", 80));
        assert!(!exact.matches("api.example.com", 22));
        let range = HostPattern::parse("10.0.0.0/8").unwrap();
        assert!(range.matches("10.1.2.3", 443));
        assert!(!range.matches("11.1.2.3", 443));
        assert!(!range.matches("10.1.2.3", 5432));
        assert!(HostPattern::parse("10.0.0.0/99").is_err());
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
}
