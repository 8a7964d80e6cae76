//! pen-net's policy decision, driven through its public API: a configuration (mode,
//! domain patterns, allow-host entries, the host's own addresses) and then a sequence of
//! what a guest makes pen do: ask for names, have names resolved, open flows. Checks
//! that no destination is allowed that the rules refuse.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use pen_net::policy::{forbidden_class, Decision, Policy};
use pen_net::ranges::internal_range;
use pen_net::{validate_domain, Cidr, Mode, NetworkPolicy, GATEWAY};

use crate::input::Input;

pub fn decisions(data: &[u8]) {
    let mut input = Input::new(data);
    let selector = input.u8();
    let mode = match selector % 4 {
        0 => Mode::Open,
        1 => Mode::None,
        2 => Mode::Public,
        _ => Mode::Allow((0..input.u8() % 4).map(|_| input.string()).collect()),
    };
    // Each entry as pen's CLI checks it: normalised, and stable under a second check.
    if let Mode::Allow(patterns) = &mode {
        for p in patterns {
            if let Ok(norm) = validate_domain(p) {
                assert_eq!(validate_domain(&norm).ok().as_deref(), Some(norm.as_str()));
                assert_eq!(norm, norm.to_lowercase());
                assert!(!norm.ends_with('.'));
            }
        }
    }
    let allow_hosts: Vec<SocketAddr> = (0..input.u8() % 3).map(|_| input.socket_addr()).collect();
    // `--allow-net` ranges as the CLI would take them (those that parse; the CLI also
    // refuses ranges outside the internal ones, which the policy must not rely on).
    let allow_nets: Vec<Cidr> = (0..input.u8() % 3)
        .filter_map(|_| {
            let ip = input.ip();
            let prefix = input.u8() % 129;
            Cidr::parse(&format!("{ip}/{prefix}")).ok()
        })
        .collect();
    let own: HashSet<IpAddr> = (0..input.u8() % 3).map(|_| input.ip()).collect();
    let config = NetworkPolicy {
        mode: mode.clone(),
        allow_hosts: allow_hosts.clone(),
        allow_nets: allow_nets.clone(),
        dns_overrides: Default::default(),
    };
    let Ok(mut policy) = Policy::new(config, own.clone()) else {
        return;
    };
    let mut resolved: HashSet<IpAddr> = HashSet::new();
    while !input.is_empty() {
        match input.u8() % 4 {
            0 => {
                let name = input.string();
                let allowed = policy.name_allowed(&name).is_ok();
                if matches!(mode, Mode::None) && name != pen_net::HOST_NAME {
                    assert!(!allowed, "mode none answered {name:?}");
                }
            }
            1 => {
                let name = input.string();
                let addrs: Vec<IpAddr> = (0..input.u8() % 3).map(|_| input.ip()).collect();
                // What pen's DNS gives the guest in mode public: no internal address
                // that the person did not open.
                let (kept, _) = policy.screen_answer(addrs.clone());
                if matches!(mode, Mode::Public) {
                    for ip in &kept {
                        assert!(
                            internal_range(*ip).is_none()
                                || allow_nets.iter().any(|n| n.contains(*ip))
                                || allow_hosts.iter().any(|h| h.ip() == *ip),
                            "mode public answered internal {ip}"
                        );
                    }
                }
                policy.record_resolved(&name, &addrs);
                resolved.extend(addrs);
            }
            2 => {
                let ip = input.ip();
                let _ = policy.resolved_name(ip);
            }
            _ => {
                let dst = input.socket_addr();
                if let Decision::Allow(target) = policy.decide(dst) {
                    check_allowed(
                        &mode,
                        &allow_hosts,
                        &allow_nets,
                        &own,
                        &resolved,
                        dst,
                        target,
                    );
                }
            }
        }
    }
}

/// An allowed flow goes where the guest addressed it (the gateway: the host's loopback,
/// only on a named port), and only past every rule that refuses.
fn check_allowed(
    mode: &Mode,
    allow_hosts: &[SocketAddr],
    allow_nets: &[Cidr],
    own: &HashSet<IpAddr>,
    resolved: &HashSet<IpAddr>,
    dst: SocketAddr,
    target: SocketAddr,
) {
    if dst.ip() == IpAddr::V4(GATEWAY) {
        let loopback = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), dst.port());
        assert_eq!(target, loopback);
        assert!(allow_hosts.contains(&target), "gateway port not named");
        return;
    }
    assert_eq!(target, dst, "allowed somewhere else than addressed");
    if allow_hosts.contains(&dst) {
        return;
    }
    let ip = dst.ip();
    if let IpAddr::V4(v4) = ip {
        assert!(
            v4.octets()[..3] != [10, 0, 2],
            "guest subnet allowed: {dst}"
        );
    }
    assert!(
        forbidden_class(ip).is_none(),
        "forbidden class allowed: {dst}"
    );
    assert!(!own.contains(&ip), "host's own address allowed: {dst}");
    // An --allow-net range holds in every mode, like an allow-host entry.
    if allow_nets.iter().any(|n| n.contains(ip)) {
        return;
    }
    match mode {
        Mode::None => panic!("mode none allowed {dst}"),
        Mode::Public => assert!(
            internal_range(ip).is_none(),
            "mode public allowed internal {dst}"
        ),
        Mode::Allow(_) => assert!(resolved.contains(&ip), "allow mode, unresolved {dst}"),
        _ => {}
    }
}
