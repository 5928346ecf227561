//! Which network addresses the server may connect to on an admin's behalf
//! (webhooks). Anything that is not a public unicast address — loopback,
//! private, link-local, unique-local, CGNAT, multicast, unspecified,
//! reserved, documentation — is internal, also when an IPv6 address embeds
//! an IPv4 one (v4-mapped, v4-compatible, NAT64, 6to4). Without this, a site
//! admin could make the server probe its own network (SSRF).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The flag that lifts the rule, named in every refusal.
pub const ALLOW_FLAG: &str = "--webhook-allow-private-networks";

/// Why `ip` is not a public unicast address, or None when it is one.
pub fn internal_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    }
}

fn in_v4(ip: Ipv4Addr, network: [u8; 4], prefix: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(network)) & mask
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_unspecified() || in_v4(ip, [0, 0, 0, 0], 8) {
        Some("unspecified (\"this network\")")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if in_v4(ip, [100, 64, 0, 0], 10) {
        Some("shared address space (CGNAT)")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() || in_v4(ip, [240, 0, 0, 0], 4) {
        Some("reserved")
    } else if in_v4(ip, [192, 0, 0, 0], 24) || in_v4(ip, [198, 18, 0, 0], 15) {
        Some("special-purpose")
    } else if ip.is_documentation() {
        Some("documentation")
    } else {
        None
    }
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    let segments = ip.segments();
    let embedded_v4 =
        |high: u16, low: u16| Ipv4Addr::from((u32::from(high) << 16) | u32::from(low));
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_reason(v4).map(|_| "an IPv4-mapped internal address");
    }
    // ::a.b.c.d (deprecated v4-compatible), 64:ff9b::a.b.c.d (NAT64).
    if segments[..6] == [0; 6] || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let v4 = embedded_v4(segments[6], segments[7]);
        return v4_reason(v4).map(|_| "an IPv6 address embedding an internal IPv4 address");
    }
    // 2002:aabb:ccdd::/48 is 6to4 for aa.bb.cc.dd.
    if segments[0] == 0x2002 {
        let v4 = embedded_v4(segments[1], segments[2]);
        return v4_reason(v4).map(|_| "a 6to4 address embedding an internal IPv4 address");
    }
    if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_unique_local() {
        Some("unique-local")
    } else if ip.is_unicast_link_local() {
        Some("link-local")
    } else if segments[0] & 0xffc0 == 0xfec0 {
        Some("site-local")
    } else if segments[..2] == [0x64, 0xff9b] && segments[2] == 1 {
        Some("local-use NAT64")
    } else if segments[..2] == [0x2001, 0] {
        // Teredo tunnels to an address we cannot see.
        Some("Teredo")
    } else if segments[..2] == [0x2001, 0xdb8] {
        Some("documentation")
    } else if segments[..4] == [0x100, 0, 0, 0] {
        Some("discard-only")
    } else {
        None
    }
}

/// Host names that always mean this machine (RFC 6761), before any DNS.
pub fn is_local_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost")
}

/// A host whose last label is numeric but that is not a dotted IPv4
/// address: `2130706433`, `127.1`, `0x7f.1`. The C resolver reads those as
/// IPv4 addresses; no DNS name has a numeric top-level label.
pub fn is_numeric_host(host: &str) -> bool {
    let last = host.trim_end_matches('.').rsplit('.').next().unwrap_or("");
    let last = last.to_ascii_lowercase();
    let hex = last
        .strip_prefix("0x")
        .is_some_and(|h| h.chars().all(|c| c.is_ascii_hexdigit()));
    !last.is_empty() && (last.chars().all(|c| c.is_ascii_digit()) || hex)
}

/// How webhook hosts are resolved and which answers may be used.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Lifts the rule (labs and tests with receivers on loopback).
    pub allow_private: bool,
    /// Fixed answers for host names, used instead of DNS and checked like DNS
    /// answers (lower-case names).
    pub hosts: HashMap<String, Vec<IpAddr>>,
}

/// Why resolving a webhook host gave nothing to connect to. The reason is
/// for the server log; admins get [`Unreachable::GENERIC`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

impl Unreachable {
    /// What an admin sees of any failure to reach a receiver: it says nothing
    /// about which addresses exist or which ports are open.
    pub const GENERIC: &'static str =
        "the webhook receiver could not be reached (the server log has the details)";
}

impl Policy {
    /// Resolves `host` once and checks every answer: the caller connects to
    /// exactly these addresses, so DNS cannot change between check and
    /// connect. Any internal answer refuses the whole host.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Unreachable> {
        let addresses: Vec<SocketAddr> = if let Ok(ip) = host.parse::<IpAddr>() {
            vec![SocketAddr::new(ip, port)]
        } else if let Some(fixed) = self.hosts.get(&host.to_ascii_lowercase()) {
            fixed.iter().map(|ip| SocketAddr::new(*ip, port)).collect()
        } else {
            tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| Unreachable(format!("cannot resolve {host:?}: {e}")))?
                .collect()
        };
        self.check(host, addresses)
    }

    /// The answers for `host` if they may be used.
    pub fn check(
        &self,
        host: &str,
        addresses: Vec<SocketAddr>,
    ) -> Result<Vec<SocketAddr>, Unreachable> {
        if addresses.is_empty() {
            return Err(Unreachable(format!("{host:?} has no address")));
        }
        if !self.allow_private {
            for address in &addresses {
                if let Some(reason) = internal_reason(address.ip()) {
                    return Err(Unreachable(format!(
                        "{host:?} resolves to {}, a {reason} address; refused without {ALLOW_FLAG}",
                        address.ip()
                    )));
                }
            }
        }
        Ok(addresses)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn internal_addresses_are_recognised_in_every_form() {
        let internal = [
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::10.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b:1::1",
            "2002:0a00:0001::1",
            "2002:7f00:0001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "fec0::1",
            "2001:db8::1",
            "100::1",
            "100.64.0.1",
            "100.127.255.254",
            "169.254.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "::",
            "224.0.0.1",
            "239.255.255.250",
            "ff02::1",
            "ff0e::1",
            "192.168.1.1",
            "172.16.0.1",
            "172.31.255.255",
            "10.1.2.3",
            "127.0.0.1",
            "127.0.0.2",
            "::1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "198.51.100.7",
            "203.0.113.9",
        ];
        for text in internal {
            let ip: IpAddr = text.parse().unwrap();
            assert!(internal_reason(ip).is_some(), "{text} passed as public");
        }
        let public = [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "192.167.1.1",
            "169.253.1.1",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:0808:0808::1",
        ];
        for text in public {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(internal_reason(ip), None, "{text} refused");
        }
    }

    #[test]
    fn every_v4_internal_address_is_internal_when_mapped_into_v6() {
        // A sweep over every /8 and a few addresses in each: the v6 forms
        // that embed a v4 address agree with the v4 verdict.
        for a in 0..=255u8 {
            for rest in [[0, 0, 1], [64, 0, 1], [168, 1, 1], [255, 255, 254]] {
                let v4 = Ipv4Addr::new(a, rest[0], rest[1], rest[2]);
                let expected = internal_reason(IpAddr::V4(v4)).is_some();
                let [h, l] = [
                    (u32::from(v4) >> 16) as u16,
                    (u32::from(v4) & 0xffff) as u16,
                ];
                for v6 in [
                    v4.to_ipv6_mapped(),
                    Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, h, l),
                    Ipv6Addr::new(0x2002, h, l, 0, 0, 0, 0, 1),
                ] {
                    assert_eq!(
                        internal_reason(IpAddr::V6(v6)).is_some(),
                        expected,
                        "{v4} as {v6}"
                    );
                }
            }
        }
    }

    #[test]
    fn local_and_numeric_names_are_recognised() {
        for name in ["localhost", "LOCALHOST.", "api.localhost", "x.localhost."] {
            assert!(is_local_name(name), "{name}");
        }
        for name in ["localhost.example.com", "mylocalhost", "example.com"] {
            assert!(!is_local_name(name), "{name}");
        }
        for name in ["2130706433", "127.1", "0x7f.1", "0x7f000001", "10.0.1."] {
            assert!(is_numeric_host(name), "{name}");
        }
        for name in ["hooks.example.com", "1password.com", "x.0xdead.io", "a.b1"] {
            assert!(!is_numeric_host(name), "{name}");
        }
    }

    #[tokio::test]
    async fn answers_are_checked_unless_private_networks_are_allowed() {
        let mut policy = Policy::default();
        policy.hosts.insert(
            "rebind.example.com".into(),
            vec!["10.0.0.7".parse().unwrap()],
        );
        policy.hosts.insert(
            "mixed.example.com".into(),
            vec!["8.8.8.8".parse().unwrap(), "::1".parse().unwrap()],
        );
        policy.hosts.insert(
            "public.example.com".into(),
            vec!["8.8.8.8".parse().unwrap()],
        );
        let error = policy.resolve("rebind.example.com", 443).await.unwrap_err();
        assert!(
            error.0.contains("private") && error.0.contains(ALLOW_FLAG),
            "{error}"
        );
        assert!(policy.resolve("mixed.example.com", 443).await.is_err());
        assert!(policy.resolve("127.0.0.1", 443).await.is_err());
        assert_eq!(
            policy.resolve("Public.Example.com", 443).await.unwrap(),
            vec!["8.8.8.8:443".parse().unwrap()]
        );
        policy.allow_private = true;
        assert_eq!(
            policy.resolve("rebind.example.com", 8443).await.unwrap(),
            vec!["10.0.0.7:8443".parse().unwrap()]
        );
        assert!(policy.resolve("127.0.0.1", 443).await.is_ok());
    }
}
