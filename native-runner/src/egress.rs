//! What outbound traffic from containers may reach: the internet, not the host or its
//! neighbours.
//!
//! A container with outbound network talks through `slirp4netns`, which re-originates each
//! connection from the host. So the guard sits on the host, on the helper's sockets: each
//! container's `slirp4netns` runs with a group id of its own (it stays uid 0, which joining
//! the container's network namespace needs), and an nftables table of this server's refuses
//! those groups' connections to:
//! - the host's own addresses (`fib daddr type local`, whatever they are now),
//! - loopback, RFC 1918, 100.64.0.0/10 (CGNAT), 169.254.0.0/16 (link-local, where cloud
//!   metadata answers), and the other special-purpose IPv4 ranges of [`BLOCKED_V4`],
//! - ::1, fc00::/7, fe80::/10, the prefixes that carry IPv4 and the rest of [`BLOCKED_V6`],
//!
//! except DNS (port 53) to the host's resolvers (read at start), which slirp's forwarder needs,
//! and ranges a container is granted explicitly ([`Egress::grant`]); what may be granted in a
//! refused range is the operator's choice, not the tenant's ([`check_grant`]). Cloud
//! metadata hop limits do not help here, since slirp re-originates; this does.
//!
//! Why nftables matched on the socket's group: it holds for every socket the helper opens,
//! TCP and UDP, and needs no change to slirp. The table's base chain jumps to its rules only
//! for packets whose socket belongs to a group in its `active` set; everything else, packets
//! the kernel sends without a socket included, passes untouched, and servers side by side
//! never filter each other's containers. If the table is deleted under a running server (`nft
//! flush ruleset`), its containers' helpers go unfiltered until the server restarts.

use std::collections::HashSet;
use std::io::{self, Write};
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use ipnet::IpNet;

/// IPv4 ranges a container never reaches unless granted: this network, private, CGNAT,
/// loopback, link-local, IETF protocol assignments, benchmarking, multicast and reserved.
pub const BLOCKED_V4: [&str; 10] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/3",
];

/// IPv6 ranges a container never reaches unless granted: unspecified and loopback, the
/// prefixes that carry IPv4 (mapped, NAT64, 6to4: the v4 rules would be bypassed), unique
/// local, site-local, link-local, multicast.
pub const BLOCKED_V6: [&str; 9] = [
    "::/127",
    "::ffff:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "2002::/16",
    "fc00::/7",
    "fec0::/10",
    "fe80::/10",
    "ff00::/8",
];

/// [`BLOCKED_V4`] and [`BLOCKED_V6`], parsed once.
static BLOCKED: LazyLock<Vec<IpNet>> = LazyLock::new(|| {
    BLOCKED_V4
        .iter()
        .chain(&BLOCKED_V6)
        .map(|range| range.parse().expect("the blocked ranges parse"))
        .collect()
});

/// Whether `ip` lies in a range containers (and Wasm guests) may not reach unless allowed
/// explicitly: loopback, private, link-local and the rest of [`BLOCKED_V4`] and
/// [`BLOCKED_V6`].
pub fn is_blocked(ip: IpAddr) -> bool {
    BLOCKED.iter().any(|net| net.contains(&ip))
}

/// Whether `net` holds any address [`is_blocked`] refuses.
fn overlaps_blocked(net: &IpNet) -> bool {
    BLOCKED
        .iter()
        .any(|blocked| blocked.contains(net) || net.contains(blocked))
}

/// Parses an allow entry that names addresses: a CIDR (`10.1.0.0/16`) or one address
/// (`10.1.2.3`, `fd00::1`). `None` when it is something else (a host name).
pub fn parse_cidr(text: &str) -> Option<IpNet> {
    let text = text.trim().trim_start_matches('[').trim_end_matches(']');
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// The first group id handed to a helper; the range is far above any account's.
const FIRST_GID: u32 = 0x8000_0000;
/// How many group ids helpers draw from.
const GID_RANGE: u32 = 0x4000_0000;

/// This server's nftables table and the groups it hands out.
#[derive(Debug)]
pub struct Egress {
    table: String,
    in_use: Mutex<HashSet<u32>>,
    /// The next group to try. Each server starts at its own place in the range, so two
    /// servers seldom share one; if they do, both tables filter it, which only refuses more.
    next: AtomicU32,
}

/// One container's place in the filter: its helper's group and what it may reach besides
/// the internet. Dropping it takes both out of the table.
#[derive(Debug)]
pub struct Grant {
    egress: Arc<Egress>,
    gid: u32,
    allowed: Vec<IpNet>,
}

impl Grant {
    /// The group id the container's network helper must run with.
    pub fn gid(&self) -> u32 {
        self.gid
    }
}

impl Drop for Grant {
    /// Takes the group's allowances out, then the group itself. A group that could not be
    /// taken out of `active` stays reserved, so no later container inherits what is left.
    fn drop(&mut self) {
        let table = &self.egress.table;
        for (set, elements) in self.egress.allow_elements(self.gid, &self.allowed) {
            let script = format!("delete element inet {table} {set} {{ {elements} }}\n");
            if let Err(e) = nft(&script) {
                tracing::warn!(gid = self.gid, "taking a container's allowances out: {e}");
            }
        }
        match nft(&format!(
            "delete element inet {table} active {{ {} }}\n",
            self.gid
        )) {
            Ok(()) => {
                self.egress.in_use.lock().unwrap().remove(&self.gid);
            }
            Err(e) => tracing::warn!(gid = self.gid, "taking a container out of the filter: {e}"),
        }
    }
}

impl Egress {
    /// Installs this server's table, `lode_<scope>` (replacing one a killed predecessor
    /// left). Fails, naming what to install, where `nft` is missing or the kernel has no
    /// nftables.
    pub fn install(scope: &str) -> io::Result<Arc<Self>> {
        if !scope.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("egress table scope {scope:?} must be letters and digits"),
            ));
        }
        let egress = Arc::new(Self::new(scope));
        let _ = nft(&format!("delete table inet {}\n", egress.table));
        nft(&egress.ruleset(&resolvers()))?;
        Ok(egress)
    }

    fn new(scope: &str) -> Self {
        // Where this server's group ids start: spread by its scope (FNV-1a).
        let hash = scope.bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        Self {
            table: format!("lode_{scope}"),
            in_use: Mutex::new(HashSet::new()),
            next: AtomicU32::new((hash % (GID_RANGE >> 16)) << 16),
        }
    }

    /// The table: the sets, a base chain that sends only the helpers' packets on, and the
    /// chain the module's header describes.
    fn ruleset(&self, resolvers: &[IpAddr]) -> String {
        let list = |items: Vec<String>| items.join(", ");
        let (dns4, dns6): (Vec<_>, Vec<_>) = resolvers.iter().partition(|ip| ip.is_ipv4());
        let elements = |name: &str, kind: &str, items: Vec<String>, interval: bool| {
            let flags = if interval { " flags interval;" } else { "" };
            let elements = if items.is_empty() {
                String::new()
            } else {
                format!(" elements = {{ {} }};", list(items))
            };
            format!("  set {name} {{ type {kind};{flags}{elements} }}\n")
        };
        let strings = |ips: Vec<&IpAddr>| ips.iter().map(|ip| ip.to_string()).collect();
        let blocked = |ranges: &[&str]| ranges.iter().map(|r| r.to_string()).collect();
        format!(
            "table inet {table} {{\n\
             {active}{dns4}{dns6}{allow4}{allow6}{blocked4}{blocked6}\
             \x20 chain out {{\n\
             \x20   type filter hook output priority 0; policy accept;\n\
             \x20   meta skgid @active jump helpers\n\
             \x20 }}\n\
             \x20 chain helpers {{\n\
             \x20   meta skgid . ip daddr @allow4 accept\n\
             \x20   meta skgid . ip6 daddr @allow6 accept\n\
             \x20   ip daddr @dns4 meta l4proto {{ tcp, udp }} th dport 53 accept\n\
             \x20   ip6 daddr @dns6 meta l4proto {{ tcp, udp }} th dport 53 accept\n\
             \x20   fib daddr type local reject\n\
             \x20   ip daddr @blocked4 reject\n\
             \x20   ip6 daddr @blocked6 reject\n\
             \x20 }}\n\
             }}\n",
            table = self.table,
            active = elements("active", "gid", Vec::new(), false),
            dns4 = elements("dns4", "ipv4_addr", strings(dns4), false),
            dns6 = elements("dns6", "ipv6_addr", strings(dns6), false),
            allow4 = elements("allow4", "gid . ipv4_addr", Vec::new(), true),
            allow6 = elements("allow6", "gid . ipv6_addr", Vec::new(), true),
            blocked4 = elements("blocked4", "ipv4_addr", blocked(&BLOCKED_V4), true),
            blocked6 = elements("blocked6", "ipv6_addr", blocked(&BLOCKED_V6), true),
        )
    }

    /// `(set, "gid . cidr, ...")` for each address family `allowed` has.
    fn allow_elements(&self, gid: u32, allowed: &[IpNet]) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (set, v4) in [("allow4", true), ("allow6", false)] {
            let items: Vec<String> = allowed
                .iter()
                .filter(|net| matches!(net, IpNet::V4(_)) == v4)
                .map(|net| format!("{gid} . {}", net.trunc()))
                .collect();
            if !items.is_empty() {
                out.push((set, items.join(", ")));
            }
        }
        out
    }

    /// A group for one container's helper, filtered from now until the grant drops, with
    /// `allowed` (checked with [`check_grant`]) reachable besides the internet.
    pub fn grant(self: &Arc<Self>, allowed: &[IpNet]) -> io::Result<Grant> {
        let gid = {
            let mut in_use = self.in_use.lock().unwrap();
            loop {
                let gid = FIRST_GID + self.next.fetch_add(1, Ordering::Relaxed) % GID_RANGE;
                if in_use.insert(gid) {
                    break gid;
                }
            }
        };
        // The grant exists before the table knows it: dropping it on failure undoes both.
        // Overlapping ranges would be refused by nft's interval sets: they are merged first.
        let grant = Grant {
            egress: self.clone(),
            gid,
            allowed: IpNet::aggregate(&allowed.to_vec()),
        };
        let mut script = format!("add element inet {} active {{ {gid} }}\n", self.table);
        for (set, elements) in self.allow_elements(gid, &grant.allowed) {
            script.push_str(&format!(
                "add element inet {} {set} {{ {elements} }}\n",
                self.table
            ));
        }
        nft(&script)?;
        Ok(grant)
    }

    /// Removes the table at shutdown, unless a container still holds a grant: its helper
    /// would then be unfiltered. (The next server on the same cache dir replaces it.)
    pub fn remove_if_unused(&self) {
        if self.in_use.lock().unwrap().is_empty() {
            let _ = nft(&format!("delete table inet {}\n", self.table));
        }
    }
}

/// Refuses `net` as something a tenant may allow (a container's `--allow-net`, a function's
/// `network.allow`) unless the operator opened it: one that holds a refused address (loopback,
/// private, link-local, metadata) or one of `host` (the host's own addresses,
/// [`host_addresses`]) must lie inside one of `open` (`lode serve --allow-net`). A wholly
/// public range passes: it is reachable anyway.
pub fn check_grant(net: &IpNet, host: &[IpAddr], open: &[IpNet]) -> Result<(), String> {
    let reaches_host = host.iter().any(|ip| net.contains(ip));
    if !overlaps_blocked(net) && !reaches_host {
        return Ok(());
    }
    if open.iter().any(|range| range.contains(net)) {
        return Ok(());
    }
    let what = if reaches_host {
        "one of this host's own addresses"
    } else {
        "loopback, private or link-local addresses"
    };
    Err(format!(
        "{net} holds {what}, which functions and containers reach only inside a range the \
         operator opens: start lode serve with --allow-net CIDR covering it"
    ))
}

/// This host's own addresses, which no container reaches unless the operator opens them.
pub fn host_addresses() -> Vec<IpAddr> {
    let mut addresses = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs(3) fills a list that is freed below; each entry's address pointer is
    // null or points at a sockaddr of the family it names.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return addresses;
        }
        let mut entry = list;
        while !entry.is_null() {
            let addr = (*entry).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*(addr as *const libc::sockaddr_in);
                        addresses.push(IpAddr::from(v4.sin_addr.s_addr.to_ne_bytes()));
                    }
                    libc::AF_INET6 => {
                        let v6 = &*(addr as *const libc::sockaddr_in6);
                        addresses.push(IpAddr::from(v6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            entry = (*entry).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    addresses
}

/// The host's DNS resolvers, from `/etc/resolv.conf`: what slirp's forwarder sends to.
fn resolvers() -> Vec<IpAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse().ok())
        .collect()
}

/// Runs an `nft` script.
fn nft(script: &str) -> io::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "outbound network is filtered with nftables, and `nft` could not run \
                     ({e}): apt-get install nftables"
                ),
            )
        })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "nft refused the egress filter: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranges_cover_what_the_host_and_its_neighbours_use() {
        for blocked in [
            "127.0.0.1",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "::1",
            "fd00::2",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:5",
            "2002:a00:5::1",
        ] {
            assert!(is_blocked(blocked.parse().unwrap()), "{blocked}");
        }
        for open in ["1.1.1.1", "203.0.113.80", "198.51.100.7", "2001:db8::1"] {
            assert!(!is_blocked(open.parse().unwrap()), "{open}");
        }
        assert_eq!(
            parse_cidr("10.1.0.0/16"),
            Some("10.1.0.0/16".parse().unwrap())
        );
        assert_eq!(parse_cidr("10.1.2.3"), Some("10.1.2.3/32".parse().unwrap()));
        assert_eq!(
            parse_cidr("[fd00::1]"),
            Some("fd00::1/128".parse().unwrap())
        );
        assert_eq!(parse_cidr("db.internal"), None);
        assert!(host_addresses().contains(&"127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn the_table_filters_only_its_own_groups_and_lets_dns_through() {
        let egress = Egress::new("test");
        let rules = egress.ruleset(&["10.255.255.53".parse().unwrap()]);
        assert!(rules.contains("set dns4 { type ipv4_addr; elements = { 10.255.255.53 }; }"));
        // Only the helpers' sockets reach the rules; packets the kernel sends without a
        // socket never match a group, so they pass.
        assert!(rules.contains("meta skgid @active jump helpers"));
        let helpers = rules.find("chain helpers").unwrap();
        // Granted ranges come before every refusal; the host's own addresses are refused.
        let accept = rules.find("@allow4 accept").unwrap();
        let local = rules.find("fib daddr type local reject").unwrap();
        assert!(helpers < accept && accept < local);
        assert!(local < rules.find("@blocked4 reject").unwrap());
        let allowed = [
            "10.9.0.0/16".parse().unwrap(),
            "10.9.8.7/32".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ];
        assert_eq!(
            egress.allow_elements(7, &allowed),
            [
                ("allow4", "7 . 10.9.0.0/16, 7 . 10.9.8.7/32".to_string()),
                ("allow6", "7 . fd00::/8".to_string())
            ]
        );
    }

    #[test]
    fn granting_a_refused_range_is_the_operators_to_open() {
        let open = ["10.9.0.0/16".parse().unwrap()];
        let host = ["192.0.2.2".parse().unwrap()];
        let check = |text: &str| check_grant(&text.parse::<IpNet>().unwrap(), &host, &open);
        assert!(check("10.9.8.0/24").is_ok());
        let err = check("169.254.169.254/32").unwrap_err();
        assert!(err.contains("--allow-net"), "{err}");
        assert!(check("192.0.2.2/32").unwrap_err().contains("host's own"));
        assert!(check("0.0.0.0/0").is_err());
        assert!(check("10.0.0.0/8").is_err());
        // A public range is reachable anyway.
        assert!(check("198.51.100.0/24").is_ok());
    }
}
