//! Where the platform may connect on a partner's behalf. Rest-hook endpoints are the partners'
//! own servers on the public internet; an address that is not public (loopback, private,
//! link-local, unique-local, multicast, unspecified, reserved) would let a partner reach the
//! platform's own network through the notifier. Such addresses are refused when a subscription
//! is created and again at every connection, against the addresses actually connected to, so
//! that a name which later resolves elsewhere (DNS rebinding) gains nothing.
//!
//! `SUBSCRIPTION_ALLOWED_NETWORKS` lists networks to allow anyway, for local tests and demos.
//! The notifier's HTTP client resolves names through [`EgressPolicy::resolve`], so it connects
//! only to addresses checked here.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Which addresses the platform connects to for partners.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    allowed: Vec<IpNet>,
}

/// Why an endpoint was refused. The text is the partner's to read: it says that the address is
/// not allowed, never what answers there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the endpoint's host does not resolve")]
    Unresolvable,
    #[error("the endpoint resolves to an address that is not public (loopback, private, link-local or reserved); only public addresses are allowed")]
    NotPublic,
    #[error("the endpoint has no host")]
    NoHost,
}

impl EgressPolicy {
    /// A policy allowing, beyond public addresses, the networks in CIDR notation
    /// (`127.0.0.0/8`, `::1/128`) or single addresses.
    pub fn new(allowed_networks: &[String]) -> Result<Self, String> {
        let allowed = allowed_networks
            .iter()
            .map(|n| n.trim())
            .filter(|n| !n.is_empty())
            .map(|n| n.parse::<IpNet>().or_else(|_| n.parse::<IpAddr>().map(IpNet::from)).map_err(|_| format!("not a network: {n}")))
            .collect::<Result<_, _>>()?;
        Ok(EgressPolicy { allowed })
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.allowed.iter().any(|n| n.contains(&ip))
    }

    /// The permitted addresses of `host` (a name or an IP literal); refused when there are none.
    pub async fn resolve(&self, host: &url::Host<&str>, port: u16) -> Result<Vec<SocketAddr>, Refusal> {
        let addrs: Vec<SocketAddr> = match host {
            url::Host::Ipv4(ip) => vec![SocketAddr::new(IpAddr::V4(*ip), port)],
            url::Host::Ipv6(ip) => vec![SocketAddr::new(IpAddr::V6(*ip), port)],
            url::Host::Domain(name) => tokio::net::lookup_host((*name, port)).await.map_err(|_| Refusal::Unresolvable)?.collect(),
        };
        if addrs.is_empty() {
            return Err(Refusal::Unresolvable);
        }
        let permitted: Vec<SocketAddr> = addrs.into_iter().filter(|a| self.permits(a.ip())).collect();
        if permitted.is_empty() { Err(Refusal::NotPublic) } else { Ok(permitted) }
    }

    /// Checks every address `url`'s host resolves to now (a name with one non-public address
    /// among public ones is refused: which one a connection uses is not ours to choose).
    pub async fn check(&self, url: &url::Url) -> Result<(), Refusal> {
        let host = url.host().ok_or(Refusal::NoHost)?;
        let port = url.port_or_known_default().unwrap_or(443);
        let all: Vec<SocketAddr> = match host {
            url::Host::Domain(name) => tokio::net::lookup_host((name, port)).await.map_err(|_| Refusal::Unresolvable)?.collect(),
            url::Host::Ipv4(ip) => vec![SocketAddr::new(IpAddr::V4(ip), port)],
            url::Host::Ipv6(ip) => vec![SocketAddr::new(IpAddr::V6(ip), port)],
        };
        if all.is_empty() {
            return Err(Refusal::Unresolvable);
        }
        if all.iter().all(|a| self.permits(a.ip())) { Ok(()) } else { Err(Refusal::NotPublic) }
    }
}

/// Whether `ip` is a public unicast address: not loopback, private, link-local, shared (CGN),
/// unique-local, multicast, broadcast, unspecified, documentation, benchmarking or reserved;
/// IPv6 forms that embed an IPv4 address (mapped, compatible, NAT64, 6to4) are judged by it.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => is_public_v4(a),
        IpAddr::V6(a) => is_public_v6(a),
    }
}

fn is_public_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    !(o[0] == 0                                        // "this network", 0.0.0.0/8
        || a.is_loopback()                             // 127/8
        || a.is_private()                              // 10/8, 172.16/12, 192.168/16
        || a.is_link_local()                           // 169.254/16
        || (o[0] == 100 && (o[1] & 0xc0) == 64)        // shared address space, 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)     // IETF protocol assignments, 192.0.0/24
        || a.is_documentation()                        // 192.0.2/24, 198.51.100/24, 203.0.113/24
        || (o[0] == 198 && (o[1] & 0xfe) == 18)        // benchmarking, 198.18/15
        || o[0] >= 224) // multicast 224/4, reserved 240/4, broadcast
}

fn is_public_v6(a: Ipv6Addr) -> bool {
    let s = a.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if let Some(v4) = a.to_ipv4_mapped() {
        return is_public_v4(v4); // ::ffff:a.b.c.d
    }
    if s[..6] == [0; 6] {
        return !a.is_unspecified() && !a.is_loopback() && is_public_v4(embedded(s[6], s[7])); // ::a.b.c.d (deprecated)
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4] {
        return is_public_v4(embedded(s[6], s[7])); // NAT64, 64:ff9b::/96
    }
    if s[0] == 0x2002 {
        return is_public_v4(embedded(s[1], s[2])); // 6to4, 2002::/16
    }
    !(a.is_multicast()                                 // ff00::/8
        || (s[0] & 0xfe00) == 0xfc00                   // unique local, fc00::/7
        || (s[0] & 0xffc0) == 0xfe80                   // link-local, fe80::/10
        || (s[0] & 0xffc0) == 0xfec0                   // site-local (deprecated), fec0::/10
        || (s[0] == 0x2001 && s[1] == 0x0db8)          // documentation, 2001:db8::/32
        || (s[0] == 0x2001 && s[1] == 0)               // Teredo, 2001::/32
        || (s[0] == 0x0100 && s[1..4] == [0; 3])       // discard, 100::/64
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1)) // local-use NAT64, 64:ff9b:1::/48
}

#[cfg(test)]
mod tests {
    use super::*;

    fn public(s: &str) -> bool {
        is_public(s.parse().unwrap())
    }

    #[test]
    fn only_public_unicast_addresses_are_public() {
        for inside in [
            "127.0.0.1",
            "127.255.255.254",
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "198.19.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "2002:7f00:1::",
            "2002:c0a8:101::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "2001::1",
            "100::1",
        ] {
            assert!(!public(inside), "{inside} is not public");
        }
        for outside in [
            "8.8.8.8",
            "1.1.1.1",
            "100.128.0.1",
            "172.32.0.1",
            "198.20.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "2002:808:808::1",
            "64:ff9b::808:808",
        ] {
            assert!(public(outside), "{outside} is public");
        }
    }

    #[tokio::test]
    async fn loopback_in_any_spelling_is_refused_unless_allowed() {
        let policy = EgressPolicy::default();
        for url in [
            "https://127.0.0.1:5432/",
            "https://[::1]:9092/",
            "https://localhost:8080/hook",
            "https://127.1/",
            "https://2130706433/",
            "https://0x7f.0.0.1/",
            "https://0177.0.0.1/",
            "https://[::ffff:127.0.0.1]/",
            "https://[0:0:0:0:0:ffff:7f00:1]/",
            "https://0.0.0.0/",
            "https://[::]/",
            "https://LOCALHOST/",
        ] {
            let parsed = url::Url::parse(url).unwrap();
            assert_eq!(policy.check(&parsed).await, Err(Refusal::NotPublic), "{url}");
        }
        // A name that does not resolve is refused as well.
        assert_eq!(policy.check(&url::Url::parse("https://no-such-host.invalid/").unwrap()).await, Err(Refusal::Unresolvable));
        let allowed = EgressPolicy::new(&["127.0.0.0/8".into(), "::1".into()]).unwrap();
        assert_eq!(allowed.check(&url::Url::parse("http://127.0.0.1:9/").unwrap()).await, Ok(()));
        assert_eq!(allowed.check(&url::Url::parse("http://[::1]:9/").unwrap()).await, Ok(()));
        assert_eq!(allowed.check(&url::Url::parse("http://10.0.0.1:9/").unwrap()).await, Err(Refusal::NotPublic));
        assert!(EgressPolicy::new(&["not-a-network".into()]).is_err());
    }
}
