//! pen's DNS server, answered at 10.0.2.3:53 and 10.0.2.2:53 (UDP).
//!
//! Design: pen answers A queries itself from the host's resolver (getaddrinfo through
//! `tokio::net::lookup_host`) instead of forwarding raw packets to the nameservers in
//! /etc/resolv.conf. Reasons: the host resolver is whatever the host uses (systemd-resolved
//! on 127.0.0.53, /etc/hosts, NSS), so it works wherever the host's own programs work,
//! and the guest never talks to that resolver; pen sees every answer as addresses it can
//! record for `allow` mode without parsing forwarded responses; and names outside the
//! policy never leave the host. The cost: only A (and empty AAAA) answers, fixed TTL, no
//! MX/TXT/SRV (answered as "no data"). AAAA is always empty because the guest network is
//! IPv4 only: an IPv6 answer would only make the guest try a route it lacks.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use simple_dns::rdata::{RData, A};
use simple_dns::{Packet, PacketFlag, ResourceRecord, CLASS, QTYPE, RCODE, TYPE};

use crate::host::HostNet;
use crate::policy::{normalise_name, Policy, RefuseReason, HOST_NAME};
use crate::GATEWAY;

/// TTL of pen's answers: short, so a guest re-asks (and pen re-records) often.
const TTL: u32 = 60;
/// Give up on the host resolver after this long and answer SERVFAIL.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A name refused by the policy, for the caller's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NameRefusal {
    pub name: String,
    pub reason: RefuseReason,
}

/// Answer one query packet, resolving through `host`. Returns the reply (None if the
/// packet is not a parseable query: nothing to answer) and the refusal to log, if any.
pub(crate) async fn answer_via(
    policy: &Arc<Mutex<Policy>>,
    host: &dyn HostNet,
    query: &[u8],
) -> (Option<Vec<u8>>, Option<NameRefusal>) {
    let Ok(packet) = Packet::parse(query) else {
        return (None, None);
    };
    if packet.has_flags(PacketFlag::RESPONSE) {
        return (None, None);
    }
    if packet.questions.len() != 1 {
        return (reply(&packet, RCODE::FormatError, &[]), None);
    }
    let q = &packet.questions[0];
    let name = normalise_name(&q.qname.to_string());
    let qtype = q.qtype;

    if name == HOST_NAME {
        let addrs: &[Ipv4Addr] = if qtype == QTYPE::TYPE(TYPE::A) {
            &[GATEWAY]
        } else {
            &[]
        };
        return (reply(&packet, RCODE::NoError, addrs), None);
    }

    let overridden = {
        let p = policy.lock().unwrap();
        match p.name_allowed(&name) {
            Ok(()) => p.overrides(&name).cloned(),
            Err(reason) => {
                let rcode = if reason == RefuseReason::ModeNone {
                    RCODE::Refused
                } else {
                    RCODE::NameError
                };
                return (
                    reply(&packet, rcode, &[]),
                    Some(NameRefusal { name, reason }),
                );
            }
        }
    };

    if qtype != QTYPE::TYPE(TYPE::A) {
        // IPv4-only guest network: AAAA and the rest get "no data" (see module doc).
        return (reply(&packet, RCODE::NoError, &[]), None);
    }

    let addrs: Vec<IpAddr> = match overridden {
        Some(a) => a,
        None => match tokio::time::timeout(RESOLVE_TIMEOUT, host.resolve(&name)).await {
            Ok(Ok(addrs)) => addrs,
            Ok(Err(_)) => Vec::new(),
            Err(_) => return (reply(&packet, RCODE::ServerFailure, &[]), None),
        },
    };
    // Mode public: no answer into the LAN (DNS rebinding), whichever resolver gave it.
    let (addrs, screened) = policy.lock().unwrap().screen_answer(addrs);
    let refusal = screened.map(|reason| NameRefusal {
        name: name.clone(),
        reason,
    });
    let v4: Vec<Ipv4Addr> = dedup(addrs.iter().filter_map(|a| match a {
        IpAddr::V4(v) => Some(*v),
        IpAddr::V6(v) => v.to_ipv4_mapped(),
    }));
    if v4.is_empty() {
        return (reply(&packet, RCODE::NameError, &[]), refusal);
    }
    // Stay under the 512-byte UDP limit (no TCP fallback here): 16 answers is ~300 bytes.
    let mut v4 = v4;
    v4.truncate(16);
    let recorded: Vec<IpAddr> = v4.iter().map(|a| IpAddr::V4(*a)).collect();
    policy.lock().unwrap().record_resolved(&name, &recorded);
    (reply(&packet, RCODE::NoError, &v4), refusal)
}

/// [`answer_via`] the host's own resolver.
#[cfg(test)]
async fn answer(
    policy: &Arc<Mutex<Policy>>,
    query: &[u8],
) -> (Option<Vec<u8>>, Option<NameRefusal>) {
    answer_via(policy, &crate::host::SystemHost, query).await
}

fn dedup(it: impl Iterator<Item = Ipv4Addr>) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = Vec::new();
    for a in it {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// Build a reply to `query` with `rcode` and A records for `addrs`.
fn reply(query: &Packet<'_>, rcode: RCODE, addrs: &[Ipv4Addr]) -> Option<Vec<u8>> {
    let mut r = Packet::new_reply(query.id());
    if query.has_flags(PacketFlag::RECURSION_DESIRED) {
        r.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    r.set_flags(PacketFlag::RECURSION_AVAILABLE);
    *r.rcode_mut() = rcode;
    r.questions = query.questions.clone();
    if let Some(q) = query.questions.first() {
        for a in addrs {
            r.answers.push(ResourceRecord::new(
                q.qname.clone(),
                CLASS::IN,
                TTL,
                RData::A(A::from(*a)),
            ));
        }
    }
    r.build_bytes_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Mode, NetworkPolicy};
    use simple_dns::{Name, Question, QCLASS};
    use std::collections::{HashMap, HashSet};

    fn query(name: &str, t: TYPE) -> Vec<u8> {
        let mut p = Packet::new_query(0x1234);
        p.set_flags(PacketFlag::RECURSION_DESIRED);
        p.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(t),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        p.build_bytes_vec().unwrap()
    }

    fn policy(mode: Mode) -> Arc<Mutex<Policy>> {
        let mut o = HashMap::new();
        o.insert(
            "Allowed.Test".to_string(),
            vec![
                "192.0.2.10".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
            ],
        );
        o.insert(
            "other.test".to_string(),
            vec!["192.0.2.11".parse().unwrap()],
        );
        o.insert("empty.test".to_string(), vec![]);
        o.insert(
            "rebind.test".to_string(),
            vec!["10.200.0.2".parse().unwrap()],
        );
        o.insert(
            "mixed.test".to_string(),
            vec![
                "::ffff:192.168.0.1".parse().unwrap(),
                "203.0.113.9".parse().unwrap(),
            ],
        );
        Arc::new(Mutex::new(
            Policy::new(
                NetworkPolicy {
                    mode,
                    allow_hosts: vec![],
                    allow_nets: vec![],
                    dns_overrides: o,
                },
                HashSet::new(),
            )
            .unwrap(),
        ))
    }

    fn parse(r: &[u8]) -> (RCODE, Vec<Ipv4Addr>, u16) {
        let p = Packet::parse(r).unwrap();
        assert!(p.has_flags(PacketFlag::RESPONSE));
        let addrs = p
            .answers
            .iter()
            .map(|rr| match &rr.rdata {
                RData::A(a) => Ipv4Addr::from(a.address),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        (p.rcode(), addrs, p.id())
    }

    #[tokio::test]
    async fn override_answers_a_and_records_it() {
        let p = policy(Mode::Allow(vec!["allowed.test".into()]));
        let (r, refused) = answer(&p, &query("allowed.test.", TYPE::A)).await;
        assert_eq!(refused, None);
        let (rcode, addrs, id) = parse(&r.unwrap());
        assert_eq!((rcode, id), (RCODE::NoError, 0x1234));
        assert_eq!(addrs, vec!["192.0.2.10".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(
            p.lock()
                .unwrap()
                .resolved_name("192.0.2.10".parse().unwrap()),
            Some("allowed.test")
        );
        // AAAA: no data on an IPv4-only network.
        let (r, _) = answer(&p, &query("allowed.test", TYPE::AAAA)).await;
        assert_eq!(parse(&r.unwrap()).0, RCODE::NoError);
    }

    #[tokio::test]
    async fn allow_mode_nxdomain_for_other_names() {
        let p = policy(Mode::Allow(vec!["allowed.test".into()]));
        let (r, refused) = answer(&p, &query("other.test", TYPE::A)).await;
        assert_eq!(parse(&r.unwrap()).0, RCODE::NameError);
        assert_eq!(refused.unwrap().reason, RefuseReason::NameNotAllowed);
        assert_eq!(
            p.lock()
                .unwrap()
                .resolved_name("192.0.2.11".parse().unwrap()),
            None
        );
    }

    #[tokio::test]
    async fn mode_none_refuses_but_host_name_answers() {
        let p = policy(Mode::None);
        let (r, refused) = answer(&p, &query("allowed.test", TYPE::A)).await;
        assert_eq!(parse(&r.unwrap()).0, RCODE::Refused);
        assert!(refused.is_some());
        let (r, _) = answer(&p, &query("HOST.pen.internal", TYPE::A)).await;
        let (rcode, addrs, _) = parse(&r.unwrap());
        assert_eq!((rcode, addrs), (RCODE::NoError, vec![GATEWAY]));
    }

    #[tokio::test]
    async fn public_mode_refuses_answers_into_internal_ranges() {
        let p = policy(Mode::Public);
        let (r, refused) = answer(&p, &query("rebind.test", TYPE::A)).await;
        assert_eq!(parse(&r.unwrap()).0, RCODE::NameError);
        let refused = refused.unwrap();
        assert_eq!(refused.name, "rebind.test");
        assert!(
            matches!(refused.reason, RefuseReason::InternalAnswer(ip, _) if ip.to_string() == "10.200.0.2"),
            "{refused:?}"
        );
        assert_eq!(
            p.lock()
                .unwrap()
                .resolved_name("10.200.0.2".parse().unwrap()),
            None
        );
        // The public part of an answer is given; the mapped LAN address is not.
        let (r, refused) = answer(&p, &query("mixed.test", TYPE::A)).await;
        let (rcode, addrs, _) = parse(&r.unwrap());
        assert_eq!(
            (rcode, addrs),
            (
                RCODE::NoError,
                vec!["203.0.113.9".parse::<Ipv4Addr>().unwrap()]
            )
        );
        assert!(refused.is_some());
        // Documentation ranges are public here (build machines use them).
        let (r, refused) = answer(&p, &query("allowed.test", TYPE::A)).await;
        assert_eq!(
            parse(&r.unwrap()).1,
            vec!["192.0.2.10".parse::<Ipv4Addr>().unwrap()]
        );
        assert_eq!(refused, None);
        // Open mode answers the LAN address.
        let open = policy(Mode::Open);
        let (r, refused) = answer(&open, &query("rebind.test", TYPE::A)).await;
        assert_eq!(parse(&r.unwrap()).1, vec![Ipv4Addr::new(10, 200, 0, 2)]);
        assert_eq!(refused, None);
    }

    #[tokio::test]
    async fn open_mode_uses_host_resolver_and_nxdomain_on_empty() {
        let p = policy(Mode::Open);
        // "localhost" comes from the host's resolver (/etc/hosts), no outside DNS needed.
        let (r, _) = answer(&p, &query("localhost", TYPE::A)).await;
        let (rcode, addrs, _) = parse(&r.unwrap());
        assert_eq!(rcode, RCODE::NoError);
        assert!(addrs.contains(&Ipv4Addr::LOCALHOST), "{addrs:?}");
        let (r, _) = answer(&p, &query("empty.test", TYPE::A)).await;
        assert_eq!(parse(&r.unwrap()).0, RCODE::NameError);
        // Garbage: no reply at all.
        assert_eq!(answer(&p, b"\x01\x02").await.0, None);
    }
}
