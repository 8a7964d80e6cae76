//! What the guest may reach: modes, domain patterns, forbidden address classes, and the
//! per-VM record of which addresses an allowed name resolved to.
//!
//! Every decision for every protocol goes through [`Policy::decide`], so TCP, UDP and
//! published-port replies cannot drift apart.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::ranges::{embedded_ipv4, internal_range, Cidr};
use crate::{NetError, GATEWAY, GUEST_SUBNET_PREFIX};

/// Host name that pen's DNS answers with the gateway address, so a guest can name
/// "the host" (connections to it still need `--allow-host 127.0.0.1:PORT`).
pub const HOST_NAME: &str = "host.pen.internal";

/// How much of the outside world the guest may reach.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Mode {
    /// The internet only, over TCP and UDP: the internal ranges
    /// ([`crate::ranges::INTERNAL_RANGES`]: private, shared, special-purpose, IPv6
    /// unique-local) are refused, and so are DNS answers pointing into them (DNS rebinding).
    /// DNS answered by pen from the host's resolver.
    #[default]
    Public,
    /// Internet and LAN over TCP and UDP; DNS answered by pen from the host's resolver.
    Open,
    /// Nothing leaves the VM (except exact `allow_hosts` entries).
    None,
    /// Only these names resolve, and connections go only to addresses they resolved to
    /// for this VM. A pattern `*.example.org` matches every name strictly below
    /// `example.org` (`a.example.org`, `a.b.example.org`) but not `example.org` itself.
    Allow(Vec<String>),
}

/// The network policy of one VM.
#[derive(Debug, Clone, Default)]
pub struct NetworkPolicy {
    pub mode: Mode,
    /// Exact host addresses and ports the guest may reach whatever the mode, including
    /// otherwise forbidden ones (the host's loopback: `127.0.0.1:8080`, reached from the
    /// guest as `10.0.2.2:8080` or `host.pen.internal:8080`).
    pub allow_hosts: Vec<SocketAddr>,
    /// Internal ranges the guest may reach whatever the mode (`--allow-net 10.20.0.0/16`):
    /// what `public` keeps out, opened range by range. Never loopback, link-local or the
    /// host's own addresses (checked before these).
    pub allow_nets: Vec<Cidr>,
    /// Hosts-file style answers for pen's DNS (lower-case name -> addresses), consulted
    /// before the host's resolver. Tests use it to control resolution; the mode still
    /// applies (in `Allow` mode an overridden name must also be allowed).
    pub dns_overrides: HashMap<String, Vec<IpAddr>>,
}

/// Check one `--allow-domain`-style entry: a DNS name (letters, digits, `-`, `_`; labels
/// of 1-63 characters; at most 253 in all), optionally starting with `*.`. Returns the
/// normalised (lower-case, no trailing dot) form, or an error naming the value.
pub fn validate_domain(input: &str) -> Result<String, NetError> {
    let bad = |why: &str| NetError::InvalidDomain {
        value: input.to_string(),
        reason: why.to_string(),
    };
    let name = input.trim().trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() {
        return Err(bad("empty name"));
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err(bad("an address, not a name (use --allow-host ADDR:PORT)"));
    }
    let rest = name.strip_prefix("*.").unwrap_or(&name);
    if rest.is_empty() {
        return Err(bad("a wildcard needs a domain after '*.'"));
    }
    if rest.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    for label in rest.split('.') {
        if label.is_empty() {
            return Err(bad("empty label"));
        }
        if label.len() > 63 {
            return Err(bad("a label is longer than 63 characters"));
        }
        if label == "*" {
            return Err(bad(
                "'*' is only allowed as the whole first label ('*.example.org')",
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad(
                "only letters, digits, '-' and '_' are allowed in a label",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label starts or ends with '-'"));
        }
    }
    Ok(name)
}

/// Does `name` (normalised) match `pattern` (normalised by [`validate_domain`])?
pub fn domain_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        // Strictly below: "a.example.org" ends with ".example.org"; "example.org" doesn't.
        Some(parent) => name.len() > parent.len() + 1 && name.ends_with(&format!(".{parent}")),
        None => pattern == name,
    }
}

/// Normalise a queried name: lower-case, no trailing dot.
pub(crate) fn normalise_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Transport of a flow, for decisions and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// Why a destination was refused. The `Display` text is stable: pen shows it to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefuseReason {
    /// The gateway (host loopback) port is not named with allow-host.
    HostLoopbackNotAllowed,
    /// Loopback addresses (127.0.0.0/8, ::1).
    Loopback,
    /// Link-local and cloud metadata addresses (169.254.0.0/16, fe80::/10, fd00:ec2::254).
    LinkLocal,
    /// 0.0.0.0, ::, multicast, broadcast.
    NotUnicast,
    /// One of the host's own interface addresses.
    HostOwnAddress,
    /// Another address in the guest's own subnet (nothing lives there but the gateway).
    GuestSubnet,
    /// Mode `public`: an address in one of the internal ranges.
    Internal(Cidr),
    /// Mode `public`: a DNS answer (this address) in one of the internal ranges.
    InternalAnswer(IpAddr, Cidr),
    /// Mode `none`.
    ModeNone,
    /// Mode `allow`: the address was not resolved from an allowed name for this VM.
    NotFromAllowedName,
    /// Mode `allow`: the DNS name is not in the allowed list.
    NameNotAllowed,
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RefuseReason::Internal(range) => {
                return write!(
                    f,
                    "internal address ({range}) in network mode public (--allow-net or --network open opens it)"
                )
            }
            RefuseReason::InternalAnswer(addr, range) => {
                return write!(
                    f,
                    "answer {addr} is an internal address ({range}) in network mode public"
                )
            }
            RefuseReason::HostLoopbackNotAllowed => {
                "host loopback port not allowed (needs --allow-host 127.0.0.1:PORT)"
            }
            RefuseReason::Loopback => "loopback address",
            RefuseReason::LinkLocal => "link-local or metadata address",
            RefuseReason::NotUnicast => "unspecified, broadcast or multicast address",
            RefuseReason::HostOwnAddress => "one of the host's own addresses",
            RefuseReason::GuestSubnet => "no such host on the guest network",
            RefuseReason::ModeNone => "network mode none",
            RefuseReason::NotFromAllowedName => "address not resolved from an allowed domain",
            RefuseReason::NameNotAllowed => "domain not in the allowed list",
        })
    }
}

/// Is `ip` in a class that is never reachable without an exact allow-host entry?
pub fn forbidden_class(ip: IpAddr) -> Option<RefuseReason> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some(RefuseReason::Loopback)
            } else if v4.is_link_local() {
                Some(RefuseReason::LinkLocal)
            } else if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() {
                Some(RefuseReason::NotUnicast)
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_ipv4(v6) {
                return forbidden_class(IpAddr::V4(v4));
            }
            let seg0 = v6.segments()[0];
            if v6.is_loopback() {
                Some(RefuseReason::Loopback)
            } else if (seg0 & 0xffc0) == 0xfe80
                || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
            {
                Some(RefuseReason::LinkLocal)
            } else if v6.is_unspecified() || v6.is_multicast() {
                Some(RefuseReason::NotUnicast)
            } else {
                None
            }
        }
    }
}

/// The host's own interface addresses (getifaddrs), never reachable from the guest.
pub fn host_addresses() -> Result<HashSet<IpAddr>, NetError> {
    let mut out = HashSet::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(|e| NetError::HostAddresses(e.into()))? {
        let Some(addr) = ifa.address else { continue };
        if let Some(sin) = addr.as_sockaddr_in() {
            out.insert(IpAddr::V4(sin.ip()));
        } else if let Some(sin6) = addr.as_sockaddr_in6() {
            out.insert(IpAddr::V6(sin6.ip()));
        }
    }
    Ok(out)
}

/// A policy decision for one guest destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Open a host socket to this address.
    Allow(SocketAddr),
    Refuse(RefuseReason),
}

/// The policy of one VM plus its state: the host's addresses and, per VM, the addresses
/// each name resolved to (what `Allow` mode admits, and what logs name).
#[derive(Debug)]
pub struct Policy {
    policy: NetworkPolicy,
    allowed_domains: Vec<String>,
    own_addrs: HashSet<IpAddr>,
    /// address -> the name it was (last) resolved from for this VM.
    resolved: BTreeMap<IpAddr, String>,
}

impl Policy {
    /// Validate `policy` and snapshot the host's own addresses.
    pub fn new(policy: NetworkPolicy, own_addrs: HashSet<IpAddr>) -> Result<Self, NetError> {
        let allowed_domains = match &policy.mode {
            Mode::Allow(list) => list
                .iter()
                .map(|d| validate_domain(d))
                .collect::<Result<_, _>>()?,
            _ => Vec::new(),
        };
        let mut policy = policy;
        policy.dns_overrides = policy
            .dns_overrides
            .into_iter()
            .map(|(k, v)| (normalise_name(&k), v))
            .collect();
        Ok(Policy {
            policy,
            allowed_domains,
            own_addrs,
            resolved: BTreeMap::new(),
        })
    }

    pub fn mode(&self) -> &Mode {
        &self.policy.mode
    }

    pub fn overrides(&self, name: &str) -> Option<&Vec<IpAddr>> {
        self.policy.dns_overrides.get(name)
    }

    /// The addresses of a DNS answer for `name` the guest may be given: all of them, but in
    /// mode `public` none in an internal range, unless the user opened it (`allow_nets`, an
    /// `allow_hosts` entry for the address). Also returns the first one dropped, with its
    /// range, for the log: a public name that resolves to a LAN address is how DNS
    /// rebinding reaches the LAN.
    pub fn screen_answer(&self, addrs: Vec<IpAddr>) -> (Vec<IpAddr>, Option<RefuseReason>) {
        if self.policy.mode != Mode::Public {
            return (addrs, None);
        }
        let mut dropped = None;
        let kept = addrs
            .into_iter()
            .filter(|&ip| match self.internal_closed(ip) {
                Some(range) => {
                    dropped.get_or_insert(RefuseReason::InternalAnswer(ip, range));
                    false
                }
                None => true,
            })
            .collect();
        (kept, dropped)
    }

    /// The internal range `ip` is in when no `allow_nets` or `allow_hosts` entry opens it.
    fn internal_closed(&self, ip: IpAddr) -> Option<Cidr> {
        let range = internal_range(ip)?;
        let opened =
            self.in_allowed_net(ip) || self.policy.allow_hosts.iter().any(|h| h.ip() == ip);
        (!opened).then_some(range)
    }

    fn in_allowed_net(&self, ip: IpAddr) -> bool {
        self.policy.allow_nets.iter().any(|n| n.contains(ip))
    }

    /// May pen's DNS answer for `name` (normalised)?
    pub fn name_allowed(&self, name: &str) -> Result<(), RefuseReason> {
        if name == HOST_NAME {
            return Ok(());
        }
        match &self.policy.mode {
            Mode::Public | Mode::Open => Ok(()),
            Mode::None => Err(RefuseReason::ModeNone),
            Mode::Allow(_) => {
                if self.allowed_domains.iter().any(|p| domain_matches(p, name)) {
                    Ok(())
                } else {
                    Err(RefuseReason::NameNotAllowed)
                }
            }
        }
    }

    /// Remember that `name` resolved to `addrs` for this VM.
    pub fn record_resolved(&mut self, name: &str, addrs: &[IpAddr]) {
        for a in addrs {
            self.resolved.insert(*a, name.to_string());
        }
    }

    /// The name `ip` was resolved from for this VM, if any.
    pub fn resolved_name(&self, ip: IpAddr) -> Option<&str> {
        if ip == IpAddr::V4(GATEWAY) {
            return Some(HOST_NAME);
        }
        self.resolved.get(&ip).map(String::as_str)
    }

    /// Decide where a guest flow to `dst` (as the guest addressed it) may go.
    pub fn decide(&self, dst: SocketAddr) -> Decision {
        let ip = dst.ip();
        let port = dst.port();
        if ip == IpAddr::V4(GATEWAY) {
            // The gateway stands for the host's loopback, exactly as slirp maps it, but
            // only for ports the user named.
            let target = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
            return if self.policy.allow_hosts.contains(&target) {
                Decision::Allow(target)
            } else {
                Decision::Refuse(RefuseReason::HostLoopbackNotAllowed)
            };
        }
        if let IpAddr::V4(v4) = ip {
            let net = u32::from(v4) >> (32 - GUEST_SUBNET_PREFIX);
            if net == u32::from(GATEWAY) >> (32 - GUEST_SUBNET_PREFIX) {
                return Decision::Refuse(RefuseReason::GuestSubnet);
            }
        }
        // An exact allow-host entry wins over every class and mode: the user named it.
        if self.policy.allow_hosts.contains(&dst) {
            return Decision::Allow(dst);
        }
        if let Some(reason) = forbidden_class(ip) {
            return Decision::Refuse(reason);
        }
        if self.own_addrs.contains(&ip) {
            return Decision::Refuse(RefuseReason::HostOwnAddress);
        }
        // An --allow-net range, like an allow-host entry, holds whatever the mode.
        if self.in_allowed_net(ip) {
            return Decision::Allow(dst);
        }
        match &self.policy.mode {
            Mode::Public => match internal_range(ip) {
                Some(range) => Decision::Refuse(RefuseReason::Internal(range)),
                None => Decision::Allow(dst),
            },
            Mode::Open => Decision::Allow(dst),
            Mode::None => Decision::Refuse(RefuseReason::ModeNone),
            Mode::Allow(_) => {
                if self.resolved.contains_key(&ip) {
                    Decision::Allow(dst)
                } else {
                    Decision::Refuse(RefuseReason::NotFromAllowedName)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn policy(mode: Mode, allow: &[&str], own: &[&str]) -> Policy {
        Policy::new(
            NetworkPolicy {
                mode,
                allow_hosts: allow.iter().map(|s| sa(s)).collect(),
                allow_nets: Vec::new(),
                dns_overrides: HashMap::new(),
            },
            own.iter().map(|s| s.parse().unwrap()).collect(),
        )
        .unwrap()
    }

    #[test]
    fn wildcard_matches_strictly_below() {
        let p = validate_domain("*.Example.org.").unwrap();
        assert_eq!(p, "*.example.org");
        assert!(domain_matches(&p, "a.example.org"));
        assert!(domain_matches(&p, "a.b.example.org"));
        assert!(!domain_matches(&p, "example.org"));
        assert!(!domain_matches(&p, "badexample.org"));
        assert!(!domain_matches(&p, "org"));
        assert!(domain_matches("example.org", "example.org"));
        assert!(!domain_matches("example.org", "a.example.org"));
    }

    #[test]
    fn domain_validation_rejects_malformed() {
        for bad in [
            "",
            "*.",
            "a..b",
            "-a.org",
            "a-.org",
            "a.*.org",
            "**.org",
            "ex ample.org",
            "1.2.3.4",
            "::1",
            "a/b",
        ] {
            let err = validate_domain(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("'{bad}'")), "{err}");
            assert!(!err.contains('\n'));
        }
        assert!(validate_domain(&"a".repeat(64)).is_err());
        assert!(validate_domain(&format!("{}.org", "a.".repeat(130))).is_err());
        assert_eq!(validate_domain("deb.debian.org").unwrap(), "deb.debian.org");
        assert_eq!(validate_domain("localhost").unwrap(), "localhost");
        assert_eq!(validate_domain("_srv.x-y.org").unwrap(), "_srv.x-y.org");
    }

    #[test]
    fn forbidden_classes() {
        for (ip, r) in [
            ("127.0.0.1", RefuseReason::Loopback),
            ("127.3.2.1", RefuseReason::Loopback),
            ("::1", RefuseReason::Loopback),
            ("169.254.169.254", RefuseReason::LinkLocal),
            ("fe80::1", RefuseReason::LinkLocal),
            ("febf::1", RefuseReason::LinkLocal),
            ("fd00:ec2::254", RefuseReason::LinkLocal),
            ("::ffff:169.254.169.254", RefuseReason::LinkLocal),
            ("0.0.0.0", RefuseReason::NotUnicast),
            ("::", RefuseReason::NotUnicast),
            ("255.255.255.255", RefuseReason::NotUnicast),
            ("224.0.0.1", RefuseReason::NotUnicast),
        ] {
            assert_eq!(forbidden_class(ip.parse().unwrap()), Some(r), "{ip}");
        }
        for ok in ["1.1.1.1", "192.168.1.1", "2001:db8::1", "fec0::1"] {
            assert_eq!(forbidden_class(ok.parse().unwrap()), None, "{ok}");
        }
    }

    #[test]
    fn gateway_maps_to_loopback_only_when_allowed() {
        let p = policy(Mode::Open, &["127.0.0.1:8080"], &[]);
        assert_eq!(
            p.decide(sa("10.0.2.2:8080")),
            Decision::Allow(sa("127.0.0.1:8080"))
        );
        assert_eq!(
            p.decide(sa("10.0.2.2:8081")),
            Decision::Refuse(RefuseReason::HostLoopbackNotAllowed)
        );
        assert_eq!(
            p.decide(sa("127.0.0.1:8081")),
            Decision::Refuse(RefuseReason::Loopback)
        );
        // The exact entry also allows the literal address.
        assert_eq!(
            p.decide(sa("127.0.0.1:8080")),
            Decision::Allow(sa("127.0.0.1:8080"))
        );
        assert_eq!(
            p.decide(sa("10.0.2.7:80")),
            Decision::Refuse(RefuseReason::GuestSubnet)
        );
    }

    #[test]
    fn own_addresses_and_metadata_refused_in_open_mode() {
        let p = policy(Mode::Open, &["192.0.2.9:22"], &["192.0.2.9"]);
        assert_eq!(
            p.decide(sa("192.0.2.9:80")),
            Decision::Refuse(RefuseReason::HostOwnAddress)
        );
        assert_eq!(
            p.decide(sa("192.0.2.9:22")),
            Decision::Allow(sa("192.0.2.9:22"))
        );
        assert_eq!(
            p.decide(sa("169.254.169.254:80")),
            Decision::Refuse(RefuseReason::LinkLocal)
        );
        assert_eq!(
            p.decide(sa("1.1.1.1:443")),
            Decision::Allow(sa("1.1.1.1:443"))
        );
        assert_eq!(
            p.decide(sa("1.1.1.1:53")),
            Decision::Allow(sa("1.1.1.1:53"))
        );
    }

    #[test]
    fn mode_none_refuses_everything_but_exact_entries() {
        let p = policy(Mode::None, &["127.0.0.1:9000", "1.2.3.4:5"], &[]);
        assert_eq!(
            p.decide(sa("1.1.1.1:443")),
            Decision::Refuse(RefuseReason::ModeNone)
        );
        assert_eq!(p.decide(sa("1.2.3.4:5")), Decision::Allow(sa("1.2.3.4:5")));
        assert_eq!(
            p.decide(sa("10.0.2.2:9000")),
            Decision::Allow(sa("127.0.0.1:9000"))
        );
        assert_eq!(p.name_allowed("example.org"), Err(RefuseReason::ModeNone));
        assert_eq!(p.name_allowed(HOST_NAME), Ok(()));
    }

    #[test]
    fn allow_mode_admits_only_resolved_addresses() {
        let mut p = policy(
            Mode::Allow(vec!["deb.debian.org".into(), "*.example.org".into()]),
            &[],
            &[],
        );
        assert_eq!(p.name_allowed("deb.debian.org"), Ok(()));
        assert_eq!(p.name_allowed("a.example.org"), Ok(()));
        assert_eq!(
            p.name_allowed("example.org"),
            Err(RefuseReason::NameNotAllowed)
        );
        assert_eq!(
            p.name_allowed("evil.org"),
            Err(RefuseReason::NameNotAllowed)
        );
        assert_eq!(
            p.decide(sa("151.101.2.132:80")),
            Decision::Refuse(RefuseReason::NotFromAllowedName)
        );
        p.record_resolved("deb.debian.org", &["151.101.2.132".parse().unwrap()]);
        assert_eq!(
            p.decide(sa("151.101.2.132:80")),
            Decision::Allow(sa("151.101.2.132:80"))
        );
        assert_eq!(
            p.resolved_name("151.101.2.132".parse().unwrap()),
            Some("deb.debian.org")
        );
        // DNS to another server is refused like any other unresolved address.
        assert_eq!(
            p.decide(sa("8.8.8.8:53")),
            Decision::Refuse(RefuseReason::NotFromAllowedName)
        );
        // A name resolving to a forbidden address stays forbidden.
        p.record_resolved("deb.debian.org", &["169.254.169.254".parse().unwrap()]);
        assert_eq!(
            p.decide(sa("169.254.169.254:80")),
            Decision::Refuse(RefuseReason::LinkLocal)
        );
    }

    #[test]
    fn public_mode_refuses_internal_ranges_but_not_documentation_ones() {
        let p = policy(Mode::Public, &[], &["192.0.2.2"]);
        for (dst, range) in [
            ("10.200.0.2:8080", "10.0.0.0/8"),
            ("172.16.0.1:80", "172.16.0.0/12"),
            ("192.168.1.1:80", "192.168.0.0/16"),
            ("100.64.0.1:80", "100.64.0.0/10"),
            ("198.18.0.1:80", "198.18.0.0/15"),
            ("192.0.0.9:80", "192.0.0.0/24"),
            ("0.1.2.3:80", "0.0.0.0/8"),
            ("240.0.0.1:80", "240.0.0.0/4"),
            ("[fd00::1]:80", "fc00::/7"),
            ("[::ffff:10.0.0.1]:80", "10.0.0.0/8"),
            ("[64:ff9b::c0a8:101]:80", "192.168.0.0/16"),
            ("[64:ff9b:1::1]:80", "64:ff9b:1::/48"),
        ] {
            match p.decide(sa(dst)) {
                Decision::Refuse(RefuseReason::Internal(r)) => {
                    assert_eq!(r.to_string(), range, "{dst}")
                }
                other => panic!("{dst}: {other:?}"),
            }
        }
        for dst in [
            "192.0.2.1:80",
            "198.51.100.7:80",
            "203.0.113.10:443",
            "1.1.1.1:53",
            "[2001:db8::1]:80",
        ] {
            assert_eq!(p.decide(sa(dst)), Decision::Allow(sa(dst)), "{dst}");
        }
        // What every mode refuses stays refused, with its own reason.
        assert_eq!(
            p.decide(sa("192.0.2.2:80")),
            Decision::Refuse(RefuseReason::HostOwnAddress)
        );
        assert_eq!(
            p.decide(sa("169.254.169.254:80")),
            Decision::Refuse(RefuseReason::LinkLocal)
        );
        assert_eq!(
            p.decide(sa("[64:ff9b::7f00:1]:80")),
            Decision::Refuse(RefuseReason::Loopback)
        );
        // Open mode: the LAN is reachable.
        let open = policy(Mode::Open, &[], &[]);
        assert_eq!(
            open.decide(sa("10.200.0.2:8080")),
            Decision::Allow(sa("10.200.0.2:8080"))
        );
        assert_eq!(Mode::default(), Mode::Public);
    }

    #[test]
    fn allow_host_and_allow_net_open_internal_addresses() {
        let mut p = policy(Mode::Public, &["10.200.0.2:8080"], &["10.200.0.1"]);
        assert_eq!(
            p.decide(sa("10.200.0.2:8080")),
            Decision::Allow(sa("10.200.0.2:8080"))
        );
        assert!(matches!(
            p.decide(sa("10.200.0.2:8081")),
            Decision::Refuse(RefuseReason::Internal(_))
        ));
        p.policy.allow_nets = vec![Cidr::parse("10.200.0.0/24").unwrap()];
        assert_eq!(
            p.decide(sa("10.200.0.9:22")),
            Decision::Allow(sa("10.200.0.9:22"))
        );
        assert!(matches!(
            p.decide(sa("10.201.0.9:22")),
            Decision::Refuse(RefuseReason::Internal(_))
        ));
        // A range never opens the host's own addresses or what every mode refuses.
        assert_eq!(
            p.decide(sa("10.200.0.1:22")),
            Decision::Refuse(RefuseReason::HostOwnAddress)
        );
        // It holds in the other modes too, like allow-host.
        p.policy.mode = Mode::None;
        assert_eq!(
            p.decide(sa("10.200.0.9:22")),
            Decision::Allow(sa("10.200.0.9:22"))
        );
        assert_eq!(
            p.decide(sa("1.1.1.1:443")),
            Decision::Refuse(RefuseReason::ModeNone)
        );
    }

    #[test]
    fn public_mode_screens_dns_answers() {
        let ips = |s: &[&str]| {
            s.iter()
                .map(|a| a.parse::<IpAddr>().unwrap())
                .collect::<Vec<_>>()
        };
        let mut p = policy(Mode::Public, &["192.168.1.5:443"], &[]);
        let (kept, dropped) = p.screen_answer(ips(&["203.0.113.4", "10.200.0.2", "172.16.0.1"]));
        assert_eq!(kept, ips(&["203.0.113.4"]));
        let reason = dropped.unwrap();
        assert_eq!(
            reason,
            RefuseReason::InternalAnswer(
                "10.200.0.2".parse().unwrap(),
                Cidr::parse("10.0.0.0/8").unwrap()
            )
        );
        assert_eq!(
            reason.to_string(),
            "answer 10.200.0.2 is an internal address (10.0.0.0/8) in network mode public"
        );
        // An address the user opened stays in the answer.
        let (kept, dropped) = p.screen_answer(ips(&["192.168.1.5"]));
        assert_eq!((kept, dropped), (ips(&["192.168.1.5"]), None));
        p.policy.allow_nets = vec![Cidr::parse("10.200.0.0/24").unwrap()];
        let (kept, dropped) = p.screen_answer(ips(&["10.200.0.2"]));
        assert_eq!((kept, dropped), (ips(&["10.200.0.2"]), None));
        // Other modes give answers as they are: in allow mode the user named the domain.
        for mode in [Mode::Open, Mode::Allow(vec!["lan.example".into()])] {
            let p = policy(mode, &[], &[]);
            let (kept, dropped) = p.screen_answer(ips(&["10.0.0.1"]));
            assert_eq!((kept, dropped), (ips(&["10.0.0.1"]), None));
        }
    }

    #[test]
    fn invalid_allow_list_is_an_error() {
        let err = Policy::new(
            NetworkPolicy {
                mode: Mode::Allow(vec!["ok.org".into(), "bad..org".into()]),
                ..Default::default()
            },
            HashSet::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("bad..org"));
    }

    #[test]
    fn host_addresses_include_loopback() {
        let addrs = host_addresses().unwrap();
        assert!(addrs.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
}
