//! Address ranges: the [`Cidr`] type (`--allow-net`) and the table of internal ranges that
//! network mode `public` keeps out ([`INTERNAL_RANGES`], [`internal_range`]).
//!
//! The table is a list, on purpose, not an "is it global" test (`is_global()` and the like):
//! those also exclude the documentation ranges 192.0.2.0/24, 198.51.100.0/24 and
//! 203.0.113.0/24, which real networks do use (on some build machines the package
//! registries resolve into 203.0.113.0/24 and the default route is in 192.0.2.0/24), and
//! refusing them would break every build there. What `public` keeps out is what a person's
//! LAN, VPN, container bridge or carrier hands out, plus the "this network" and reserved
//! blocks. Loopback, link-local/metadata, multicast and the host's own addresses are refused
//! in every mode elsewhere (`policy::forbidden_class`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address range: a network address and a prefix length, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a range was not accepted. The `Display` text is one line, for a user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error(
        "no prefix length; give a range such as 10.200.0.0/24 (or 10.200.0.7/32 for one address)"
    )]
    NoPrefix,
    #[error("'{0}' is not an IP address")]
    BadAddress(String),
    #[error("prefix length '{0}' is not a number from 0 to {1}")]
    BadPrefix(String, u8),
    #[error("host bits are set; the range is {0}")]
    HostBits(Cidr),
}

impl Cidr {
    const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            prefix,
        }
    }

    const fn v6(segments: [u16; 8], prefix: u8) -> Cidr {
        let [a, b, c, d, e, f, g, h] = segments;
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)),
            prefix,
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Parses `ADDR/PREFIX` strictly: a range whose host bits are set (`10.0.0.1/8`) is an
    /// error naming the range meant, so a typo never opens more or less than was written.
    pub fn parse(text: &str) -> Result<Cidr, CidrError> {
        let (addr, prefix) = text.split_once('/').ok_or(CidrError::NoPrefix)?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| CidrError::BadAddress(addr.to_string()))?;
        let max = bits(addr);
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max && !prefix.starts_with('+'))
            .ok_or_else(|| CidrError::BadPrefix(prefix.to_string(), max))?;
        let cidr = Cidr { addr, prefix };
        let network = Cidr {
            addr: masked(addr, prefix),
            prefix,
        };
        if network != cidr {
            return Err(CidrError::HostBits(network));
        }
        Ok(cidr)
    }

    /// Is `ip` in this range? Addresses of the other family never are.
    pub fn contains(&self, ip: IpAddr) -> bool {
        bits(ip) == bits(self.addr) && masked(ip, self.prefix) == self.addr
    }

    /// Is all of this range inside `outer`?
    pub fn is_within(&self, outer: &Cidr) -> bool {
        self.prefix >= outer.prefix && outer.contains(self.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn bits(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn masked(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// What network mode `public` refuses (unless opened with `--allow-net` or an exact
/// `--allow-host`), besides what every mode refuses.
pub const INTERNAL_RANGES: &[Cidr] = &[
    // Private networks (RFC 1918): home and office LANs, VPNs, container bridges, VPCs.
    Cidr::v4(10, 0, 0, 0, 8),
    Cidr::v4(172, 16, 0, 0, 12),
    Cidr::v4(192, 168, 0, 0, 16),
    // Shared address space (RFC 6598): carrier-grade NAT, Tailscale and other overlays.
    Cidr::v4(100, 64, 0, 0, 10),
    // Benchmarking (RFC 2544), used as internal space by some products.
    Cidr::v4(198, 18, 0, 0, 15),
    // IETF protocol assignments (RFC 6890): DS-Lite, NAT64 discovery and the like.
    Cidr::v4(192, 0, 0, 0, 24),
    // "This network" (RFC 1122): 0.x.y.z reaches local hosts on some stacks.
    Cidr::v4(0, 0, 0, 0, 8),
    // Reserved (RFC 1112), never routed on the internet.
    Cidr::v4(240, 0, 0, 0, 4),
    // IPv6 unique local addresses (RFC 4193): the IPv6 private networks.
    Cidr::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
    // Local-use NAT64 (RFC 8215): the translator is on the local network, and where an IPv4
    // address sits in it depends on the prefix length its operator chose, so all of it.
    Cidr::v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
];

/// The well-known NAT64 prefix (RFC 6052), `64:ff9b::/96`: the last 32 bits are an IPv4
/// address that the translator connects to.
const NAT64_WELL_KNOWN: Cidr = Cidr::v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96);

/// The IPv4 address an IPv6 address stands for: IPv4-mapped (`::ffff:10.0.0.1`) or
/// well-known NAT64 (`64:ff9b::10.0.0.1`).
pub fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    if NAT64_WELL_KNOWN.contains(IpAddr::V6(v6)) {
        return Some(Ipv4Addr::from(u128::from(v6) as u32));
    }
    None
}

/// The internal range `ip` is in, if any, looking through IPv4-mapped and NAT64 forms
/// (`::ffff:10.0.0.1` and `64:ff9b::10.0.0.1` are in 10.0.0.0/8).
pub fn internal_range(ip: IpAddr) -> Option<Cidr> {
    let ip = match ip {
        IpAddr::V6(v6) => embedded_ipv4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    INTERNAL_RANGES.iter().copied().find(|r| r.contains(ip))
}

/// The internal range that holds all of `cidr`, if one does (what `--allow-net` may open).
pub fn internal_range_holding(cidr: &Cidr) -> Option<Cidr> {
    INTERNAL_RANGES.iter().copied().find(|r| cidr.is_within(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Each range: its first and last address are in it, the addresses just outside are not.
    #[test]
    fn every_range_its_edges_and_its_mapped_and_nat64_forms() {
        let cases = [
            (
                "10.0.0.0/8",
                "10.0.0.0",
                "10.255.255.255",
                "9.255.255.255",
                "11.0.0.0",
            ),
            (
                "172.16.0.0/12",
                "172.16.0.0",
                "172.31.255.255",
                "172.15.255.255",
                "172.32.0.0",
            ),
            (
                "192.168.0.0/16",
                "192.168.0.0",
                "192.168.255.255",
                "192.167.255.255",
                "192.169.0.0",
            ),
            (
                "100.64.0.0/10",
                "100.64.0.0",
                "100.127.255.255",
                "100.63.255.255",
                "100.128.0.0",
            ),
            (
                "198.18.0.0/15",
                "198.18.0.0",
                "198.19.255.255",
                "198.17.255.255",
                "198.20.0.0",
            ),
            (
                "192.0.0.0/24",
                "192.0.0.0",
                "192.0.0.255",
                "191.255.255.255",
                "192.0.1.0",
            ),
            (
                "0.0.0.0/8",
                "0.0.0.0",
                "0.255.255.255",
                "1.0.0.0",
                "1.0.0.0",
            ),
            (
                "240.0.0.0/4",
                "240.0.0.0",
                "255.255.255.255",
                "239.255.255.255",
                "239.255.255.255",
            ),
        ];
        for (range, first, last, below, above) in cases {
            for inside in [first, last] {
                let name = internal_range(ip(inside)).map(|r| r.to_string());
                assert_eq!(name.as_deref(), Some(range), "{inside}");
                let mapped = ip(&format!("::ffff:{inside}"));
                assert_eq!(
                    internal_range(mapped).unwrap().to_string(),
                    range,
                    "{mapped}"
                );
                let nat64 = ip(&format!("64:ff9b::{inside}"));
                assert_eq!(internal_range(nat64).unwrap().to_string(), range, "{nat64}");
            }
            for outside in [below, above] {
                let found = internal_range(ip(outside)).map(|r| r.to_string());
                assert_ne!(found.as_deref(), Some(range), "{outside}");
            }
        }
        for (inside, range) in [
            ("fc00::", "fc00::/7"),
            ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "fc00::/7"),
            ("fd12:3456::1", "fc00::/7"),
            ("64:ff9b:1::", "64:ff9b:1::/48"),
            ("64:ff9b:1:ffff:ffff:ffff:ffff:ffff", "64:ff9b:1::/48"),
            ("64:ff9b:1:a00::1", "64:ff9b:1::/48"),
        ] {
            assert_eq!(
                internal_range(ip(inside)).unwrap().to_string(),
                range,
                "{inside}"
            );
        }
        for outside in [
            "fbff:ffff::1",
            "fe00::1",
            "64:ff9b:2::1",
            "64:ff9b:0:1::a00:1",
        ] {
            assert_eq!(internal_range(ip(outside)), None, "{outside}");
        }
    }

    #[test]
    fn documentation_and_public_addresses_are_not_internal() {
        for public in [
            "192.0.2.1",
            "192.0.2.255",
            "198.51.100.7",
            "203.0.113.10",
            "1.1.1.1",
            "8.8.8.8",
            "151.101.2.132",
            "172.15.0.1",
            "100.128.0.1",
            "2001:db8::1",
            "2a00:1450::1",
            "::ffff:203.0.113.10",
            "::ffff:1.1.1.1",
            "64:ff9b::192.0.2.1",
            "64:ff9b::8.8.8.8",
        ] {
            assert_eq!(internal_range(ip(public)), None, "{public}");
        }
    }

    #[test]
    fn embedded_ipv4_reads_mapped_and_well_known_nat64_only() {
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        assert_eq!(
            embedded_ipv4(v6("::ffff:10.1.2.3")),
            Some(Ipv4Addr::new(10, 1, 2, 3))
        );
        assert_eq!(
            embedded_ipv4(v6("64:ff9b::a01:203")),
            Some(Ipv4Addr::new(10, 1, 2, 3))
        );
        assert_eq!(embedded_ipv4(v6("2001:db8::a01:203")), None);
        assert_eq!(embedded_ipv4(v6("64:ff9b:0:0:1::a01:203")), None);
    }

    #[test]
    fn parse_is_strict() {
        let c = Cidr::parse("10.200.0.0/24").unwrap();
        assert_eq!(c.to_string(), "10.200.0.0/24");
        assert!(c.contains(ip("10.200.0.2")));
        assert!(!c.contains(ip("10.200.1.2")));
        assert!(!c.contains(ip("::ffff:10.200.0.2")));
        assert_eq!(Cidr::parse("fd00::/8").unwrap().to_string(), "fd00::/8");
        assert_eq!(Cidr::parse("10.0.0.7/32").unwrap().prefix(), 32);
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().prefix(), 0);
        assert_eq!(Cidr::parse("10.0.0.1"), Err(CidrError::NoPrefix));
        assert_eq!(
            Cidr::parse("10.200.0.2/24"),
            Err(CidrError::HostBits(Cidr::parse("10.200.0.0/24").unwrap()))
        );
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/x",
            "::/129",
        ] {
            assert!(
                matches!(Cidr::parse(bad), Err(CidrError::BadPrefix(..))),
                "{bad}"
            );
        }
        for bad in ["10.0.0/8", "example.org/8", "/8"] {
            assert!(
                matches!(Cidr::parse(bad), Err(CidrError::BadAddress(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn what_an_internal_range_holds() {
        let held =
            |s: &str| internal_range_holding(&Cidr::parse(s).unwrap()).map(|r| r.to_string());
        assert_eq!(held("10.200.0.0/24").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(held("10.0.0.0/8").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(held("192.168.1.7/32").as_deref(), Some("192.168.0.0/16"));
        assert_eq!(held("fd00::/8").as_deref(), Some("fc00::/7"));
        for not in [
            "0.0.0.0/0",
            "::/0",
            "10.0.0.0/7",
            "8.8.8.0/24",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "192.0.2.0/24",
        ] {
            assert_eq!(held(not), None, "{not}");
        }
    }
}
