//! End-to-end tests: a smoltcp "guest" (tests/common) on one end of a socketpair, the
//! backend on the other, real host sockets behind it. Nothing here leaves the machine:
//! every host listener is on loopback or on one of this host's own addresses.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Guest;
use pen_net::{Backend, Mode, NetEvent, NetworkPolicy, Proto, PublishSpec, RefuseReason};
use simple_dns::RCODE;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket, UnixStream};
use tokio::task::JoinHandle;

const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

struct Vm {
    backend: Arc<Backend>,
    guest: Guest,
    seen: Arc<Mutex<Vec<NetEvent>>>,
    #[allow(dead_code)]
    serve: JoinHandle<Result<(), pen_net::NetError>>,
}

/// Start a backend (with the host's real own-address set unless `own` is given) and
/// serve a fresh guest with it.
async fn vm(policy: NetworkPolicy, publishes: &[PublishSpec], own: Option<HashSet<IpAddr>>) -> Vm {
    let backend = match own {
        Some(own) => Backend::bind_with_host_addrs(policy, publishes, own).await,
        None => Backend::bind(policy, publishes).await,
    }
    .unwrap();
    let backend = Arc::new(backend);
    let (guest, seen, serve) = attach(&backend);
    Vm {
        backend,
        guest,
        seen,
        serve,
    }
}

/// A new "QEMU" (guest stack with empty state) served by an existing backend.
type Attached = (
    Guest,
    Arc<Mutex<Vec<NetEvent>>>,
    JoinHandle<Result<(), pen_net::NetError>>,
);

fn attach(backend: &Arc<Backend>) -> Attached {
    let (a, b) = UnixStream::pair().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (bk, s) = (backend.clone(), seen.clone());
    let serve = tokio::spawn(async move { bk.serve(a, move |e| s.lock().unwrap().push(e)).await });
    (Guest::start(b), seen, serve)
}

/// A non-loopback IPv4 address of this host, if it has one.
fn host_ipv4() -> Option<Ipv4Addr> {
    pen_net::policy::host_addresses()
        .unwrap()
        .into_iter()
        .filter_map(|a| match a {
            IpAddr::V4(v) if !v.is_loopback() && !v.is_link_local() => Some(v),
            _ => None,
        })
        .min()
}

/// An echo server; counts accepted connections.
async fn echo_server(addr: SocketAddr) -> (SocketAddr, Arc<Mutex<usize>>) {
    let l = TcpListener::bind(addr).await.unwrap();
    let at = l.local_addr().unwrap();
    let accepted = Arc::new(Mutex::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            *a.lock().unwrap() += 1;
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (at, accepted)
}

async fn echo_roundtrip(guest: &Guest, dst: SocketAddrV4) {
    let h = guest.connect(dst).await.expect("connect");
    guest.send_all(h, b"ping through pen").await;
    let mut got = Vec::new();
    while got.len() < 16 {
        got.extend(guest.recv(h).await.expect("eof before echo"));
    }
    assert_eq!(&got, b"ping through pen");
    guest.close(h);
}

fn v4(a: SocketAddr) -> SocketAddrV4 {
    match a {
        SocketAddr::V4(v) => v,
        _ => panic!("v4 only"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_reaches_host_loopback_only_with_allow_host() {
    let (at, accepted) = echo_server("127.0.0.1:0".parse().unwrap()).await;
    let via_gw = SocketAddrV4::new(GW, at.port());

    let vm1 = vm(NetworkPolicy::default(), &[], None).await;
    assert_eq!(vm1.guest.connect(via_gw).await, Err("refused".into()));
    // Also refused: the literal loopback address.
    assert_eq!(vm1.guest.connect(v4(at)).await, Err("refused".into()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(*accepted.lock().unwrap(), 0, "no host socket may be opened");
    let ev = vm1.backend.events();
    assert_eq!(
        ev[0],
        NetEvent::Refused {
            proto: Proto::Tcp,
            dst: SocketAddr::V4(via_gw),
            name: Some("host.pen.internal".into()),
            reason: RefuseReason::HostLoopbackNotAllowed
        }
    );
    assert_eq!(
        ev[1].to_string(),
        format!("refused tcp {at}: loopback address")
    );

    let vm2 = vm(
        NetworkPolicy {
            allow_hosts: vec![at],
            ..Default::default()
        },
        &[],
        None,
    )
    .await;
    // host.pen.internal names the gateway.
    let (rcode, addrs) = vm2
        .guest
        .resolve(SocketAddrV4::new(DNS, 53), "host.pen.internal")
        .await
        .unwrap();
    assert_eq!((rcode, addrs), (RCODE::NoError, vec![GW]));
    echo_roundtrip(&vm2.guest, via_gw).await;
    assert_eq!(*accepted.lock().unwrap(), 1);
    // Another port on the host's loopback is still refused.
    assert_eq!(
        vm2.guest.connect(SocketAddrV4::new(GW, 1)).await,
        Err("refused".into())
    );
    assert!(vm2.backend.events().len() == 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_but_closed_host_port_is_refused_without_a_policy_event() {
    // Find a free port, then leave it closed.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let vm = vm(
        NetworkPolicy {
            allow_hosts: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))],
            ..Default::default()
        },
        &[],
        None,
    )
    .await;
    // The SYN is held while pen connects; the host refuses, the guest gets RST.
    assert_eq!(
        vm.guest.connect(SocketAddrV4::new(GW, port)).await,
        Err("refused".into())
    );
    assert!(vm.backend.events().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_refused_and_logged_once() {
    let vm = vm(NetworkPolicy::default(), &[], None).await;
    let md = SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80);
    assert_eq!(vm.guest.connect(md).await, Err("refused".into()));
    assert_eq!(vm.guest.connect(md).await, Err("refused".into()));
    // UDP too: nothing comes back, and it is logged as udp.
    let u = vm.guest.udp_bind(4000);
    vm.guest.udp_send(u, md, b"x");
    assert!(vm
        .guest
        .udp_recv(u, Duration::from_millis(300))
        .await
        .is_none());
    let expect = vec![
        NetEvent::Refused {
            proto: Proto::Tcp,
            dst: SocketAddr::V4(md),
            name: None,
            reason: RefuseReason::LinkLocal,
        },
        NetEvent::Refused {
            proto: Proto::Udp,
            dst: SocketAddr::V4(md),
            name: None,
            reason: RefuseReason::LinkLocal,
        },
    ];
    assert_eq!(vm.backend.events(), expect);
    assert_eq!(*vm.seen.lock().unwrap(), expect, "callback saw each once");
    assert_eq!(
        expect[0].to_string(),
        "refused tcp 169.254.169.254:80: link-local or metadata address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_own_address_refused_unless_allowed_and_open_mode_reaches_it_otherwise() {
    let Some(ip) = host_ipv4() else {
        eprintln!("SKIP: this host has no non-loopback IPv4 address");
        return;
    };
    let (at, accepted) = echo_server(SocketAddr::new(IpAddr::V4(ip), 0)).await;

    // Real own-address set: refused, no host connection.
    let vm1 = vm(NetworkPolicy::default(), &[], None).await;
    assert_eq!(vm1.guest.connect(v4(at)).await, Err("refused".into()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(*accepted.lock().unwrap(), 0);
    assert!(matches!(
        vm1.backend.events()[..],
        [NetEvent::Refused {
            reason: RefuseReason::HostOwnAddress,
            ..
        }]
    ));

    // Named exactly with allow-host: allowed.
    let vm2 = vm(
        NetworkPolicy {
            allow_hosts: vec![at],
            ..Default::default()
        },
        &[],
        None,
    )
    .await;
    echo_roundtrip(&vm2.guest, v4(at)).await;

    // Open mode to a non-own, non-loopback address: this host's address stands in for
    // "the internet" by leaving it out of the own-address set (tests reach nothing else).
    // Open, not the default public: the host's address may be a private one.
    let vm3 = vm(
        NetworkPolicy {
            mode: Mode::Open,
            ..Default::default()
        },
        &[],
        Some(HashSet::new()),
    )
    .await;
    echo_roundtrip(&vm3.guest, v4(at)).await;
    assert_eq!(*accepted.lock().unwrap(), 2);
    // ...and UDP.
    let us = UdpSocket::bind(SocketAddr::new(IpAddr::V4(ip), 0))
        .await
        .unwrap();
    let uat = us.local_addr().unwrap();
    tokio::spawn(async move {
        let mut b = [0u8; 2048];
        while let Ok((n, p)) = us.recv_from(&mut b).await {
            let _ = us.send_to(&b[..n], p).await;
        }
    });
    let u = vm3.guest.udp_bind(4001);
    vm3.guest.udp_send(u, v4(uat), b"udp echo");
    let (d, from) = vm3.guest.udp_recv(u, Duration::from_secs(3)).await.unwrap();
    assert_eq!((d.as_slice(), from), (&b"udp echo"[..], uat));
    assert!(vm3.backend.events().is_empty());
}

fn overrides(pairs: &[(&str, IpAddr)]) -> HashMap<String, Vec<IpAddr>> {
    pairs
        .iter()
        .map(|(n, a)| (n.to_string(), vec![*a]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_with_overrides_at_both_addresses() {
    let vm = vm(
        NetworkPolicy {
            dns_overrides: overrides(&[("svc.test", "192.0.2.77".parse().unwrap())]),
            ..Default::default()
        },
        &[],
        None,
    )
    .await;
    for server in [DNS, GW] {
        let (rcode, addrs) = vm
            .guest
            .resolve(SocketAddrV4::new(server, 53), "svc.test")
            .await
            .unwrap();
        assert_eq!(
            (rcode, addrs),
            (RCODE::NoError, vec![Ipv4Addr::new(192, 0, 2, 77)])
        );
    }
    // Host resolver path (no outside DNS needed): localhost from the host's /etc/hosts.
    let (rcode, addrs) = vm
        .guest
        .resolve(SocketAddrV4::new(DNS, 53), "localhost")
        .await
        .unwrap();
    assert_eq!(rcode, RCODE::NoError);
    assert!(addrs.contains(&Ipv4Addr::LOCALHOST));
    // ...which the guest still cannot connect to.
    assert_eq!(
        vm.guest
            .connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9))
            .await,
        Err("refused".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_mode_only_allowed_names_and_their_addresses() {
    let Some(ip) = host_ipv4() else {
        eprintln!("SKIP: this host has no non-loopback IPv4 address");
        return;
    };
    let (at, accepted) = echo_server(SocketAddr::new(IpAddr::V4(ip), 0)).await;
    let vm = vm(
        NetworkPolicy {
            mode: Mode::Allow(vec!["allowed.test".into(), "*.wild.test".into()]),
            dns_overrides: overrides(&[
                ("allowed.test", IpAddr::V4(ip)),
                ("other.test", IpAddr::V4(ip)),
                ("wild.test", IpAddr::V4(ip)),
                ("a.wild.test", "192.0.2.99".parse().unwrap()),
            ]),
            ..Default::default()
        },
        &[],
        Some(HashSet::new()),
    )
    .await;
    let g = &vm.guest;
    let dns = SocketAddrV4::new(DNS, 53);
    // Before any lookup, the literal address is refused.
    assert_eq!(g.connect(v4(at)).await, Err("refused".into()));
    // Names outside the list do not resolve.
    assert_eq!(
        g.resolve(dns, "other.test").await.unwrap().0,
        RCODE::NameError
    );
    assert_eq!(
        g.resolve(dns, "wild.test").await.unwrap().0,
        RCODE::NameError
    );
    assert_eq!(g.connect(v4(at)).await, Err("refused".into()));
    // Wildcard matches strictly below.
    let (rc, a) = g.resolve(dns, "a.wild.test").await.unwrap();
    assert_eq!(
        (rc, a),
        (RCODE::NoError, vec![Ipv4Addr::new(192, 0, 2, 99)])
    );
    // The allowed name resolves, and then its address is reachable.
    let (rc, a) = g.resolve(dns, "allowed.test").await.unwrap();
    assert_eq!((rc, a), (RCODE::NoError, vec![ip]));
    echo_roundtrip(g, v4(at)).await;
    assert_eq!(*accepted.lock().unwrap(), 1);
    // A literal IP nobody resolved, and DNS to another server: refused.
    assert_eq!(
        g.connect(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 200), 80))
            .await,
        Err("refused".into())
    );
    let u = g.udp_bind(4002);
    g.udp_send(u, SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 53), 53), b"q");
    assert!(g.udp_recv(u, Duration::from_millis(300)).await.is_none());
    let ev = vm.backend.events();
    let shown: Vec<String> = ev.iter().map(|e| e.to_string()).collect();
    assert!(
        shown.contains(&format!(
            "refused tcp {at}: address not resolved from an allowed domain"
        )),
        "{shown:?}"
    );
    assert!(shown.contains(&"refused dns other.test: domain not in the allowed list".to_string()));
    assert!(shown.contains(
        &"refused tcp 192.0.2.200:80: address not resolved from an allowed domain".to_string()
    ));
    assert!(shown.contains(
        &"refused udp 192.0.2.53:53: address not resolved from an allowed domain".to_string()
    ));
    // Logged once per destination although refused twice.
    assert_eq!(
        shown.iter().filter(|s| s.contains(&at.to_string())).count(),
        1
    );
}

/// The default mode, public: a LAN address is refused (no host socket is tried: the
/// refusal is the policy's, logged with the range), and so is a name whose answer points
/// into the LAN, while a name with a public answer resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_mode_refuses_lan_addresses_and_lan_answers() {
    let vm = vm(
        NetworkPolicy {
            dns_overrides: overrides(&[
                ("rebind.test", "192.168.77.1".parse().unwrap()),
                ("public.test", "203.0.113.7".parse().unwrap()),
            ]),
            ..Default::default()
        },
        &[],
        None,
    )
    .await;
    let lan = SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 2), 8080);
    assert_eq!(vm.guest.connect(lan).await, Err("refused".into()));
    let dns = SocketAddrV4::new(DNS, 53);
    let (rc, addrs) = vm.guest.resolve(dns, "rebind.test").await.unwrap();
    assert_eq!((rc, addrs), (RCODE::NameError, vec![]));
    let (rc, addrs) = vm.guest.resolve(dns, "public.test").await.unwrap();
    assert_eq!(
        (rc, addrs),
        (RCODE::NoError, vec![Ipv4Addr::new(203, 0, 113, 7)])
    );
    let shown: Vec<String> = vm
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(
        shown,
        [
            "refused tcp 10.200.0.2:8080: internal address (10.0.0.0/8) in network mode public (--allow-net or --network open opens it)",
            "refused dns rebind.test: answer 192.168.77.1 is an internal address (192.168.0.0/16) in network mode public",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_none_refuses_everything() {
    let Some(ip) = host_ipv4() else { return };
    let (at, accepted) = echo_server(SocketAddr::new(IpAddr::V4(ip), 0)).await;
    let vm = vm(
        NetworkPolicy {
            mode: Mode::None,
            dns_overrides: overrides(&[("x.test", IpAddr::V4(ip))]),
            ..Default::default()
        },
        &[],
        Some(HashSet::new()),
    )
    .await;
    let (rc, _) = vm
        .guest
        .resolve(SocketAddrV4::new(DNS, 53), "x.test")
        .await
        .unwrap();
    assert_eq!(rc, RCODE::Refused);
    assert_eq!(vm.guest.connect(v4(at)).await, Err("refused".into()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(*accepted.lock().unwrap(), 0);
    assert!(vm.backend.events().iter().any(|e| matches!(
        e,
        NetEvent::Refused {
            reason: RefuseReason::ModeNone,
            ..
        }
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_tcp_port_reaches_guest_and_survives_a_new_qemu() {
    let spec = PublishSpec {
        host: "127.0.0.1:0".parse().unwrap(),
        guest_port: 8000,
        proto: Proto::Tcp,
    };
    let backend = Arc::new(
        Backend::bind(NetworkPolicy::default(), &[spec])
            .await
            .unwrap(),
    );
    let host_addr = backend.published()[0].1;
    assert_eq!(host_addr.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    // Round 1 is a new stack served by the same backend, as after a snapshot restore
    // (guest TCP state empty) or with a new QEMU process.
    for _round in 0..2 {
        let (g, _seen, serve) = attach(&backend);
        let l = g.listen(8000).await;
        let mut c = tokio::net::TcpStream::connect(host_addr).await.unwrap();
        assert!(g.wait_established(l).await);
        c.write_all(b"hello guest").await.unwrap();
        let mut got = Vec::new();
        while got.len() < 11 {
            got.extend(g.recv(l).await.unwrap());
        }
        assert_eq!(&got, b"hello guest");
        g.send_all(l, b"hello host").await;
        g.close(l);
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        assert_eq!(&back, b"hello host");
        // This "QEMU" goes away: serve returns Ok.
        drop(g);
        let r = tokio::time::timeout(Duration::from_secs(5), serve)
            .await
            .unwrap()
            .unwrap();
        assert!(r.is_ok(), "{r:?}");
    }
    let (_guest, _seen, _serve) = attach(&backend);
    // A guest with nothing listening: the host connection is reset/closed, not hung.
    let mut c = tokio::net::TcpStream::connect(host_addr).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_returns_when_qemu_disconnects() {
    let b = Arc::new(Backend::bind(NetworkPolicy::default(), &[]).await.unwrap());
    let (a, other) = UnixStream::pair().unwrap();
    let bk = b.clone();
    let j = tokio::spawn(async move { bk.serve(a, |_| {}).await });
    drop(other);
    let r = tokio::time::timeout(Duration::from_secs(5), j)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_failure_names_the_port() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = taken.local_addr().unwrap().port();
    let spec = PublishSpec::parse(&format!("{port}:80")).unwrap();
    let err = Backend::bind(NetworkPolicy::default(), &[spec])
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(!err.contains('\n'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_udp_port_relays_both_ways() {
    let spec = PublishSpec {
        host: "127.0.0.1:0".parse().unwrap(),
        guest_port: 5353,
        proto: Proto::Udp,
    };
    let vm = vm(NetworkPolicy::default(), &[spec], None).await;
    let host_addr = vm.backend.published()[0].1;
    let gu = vm.guest.udp_bind(5353);
    // The backend learns the guest's MAC from its frames (as with a real VM, whose
    // first packets are ARP); send one so UDP to the guest can be addressed.
    vm.guest.udp_send(gu, SocketAddrV4::new(DNS, 53), b"\0");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.send_to(b"to guest", host_addr).await.unwrap();
    let (d, from) = vm.guest.udp_recv(gu, Duration::from_secs(3)).await.unwrap();
    assert_eq!(&d, b"to guest");
    assert_eq!(from.ip(), IpAddr::V4(GW));
    vm.guest.udp_send(gu, v4(from), b"to host");
    let mut b = [0u8; 64];
    let (n, src) = tokio::time::timeout(Duration::from_secs(3), c.recv_from(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((&b[..n], src), (&b"to host"[..], host_addr));
}

const BIG: usize = 50 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_50mb_each_way() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        // First connection: count what the guest uploads. Second: send BIG bytes.
        let (mut s, _) = l.accept().await.unwrap();
        let mut n = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let k = s.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            n += k;
        }
        s.write_all(&n.to_be_bytes()).await.unwrap();
        drop(s);
        let (mut s, _) = l.accept().await.unwrap();
        let chunk = vec![0xabu8; 256 * 1024];
        let mut left = BIG;
        while left > 0 {
            let k = left.min(chunk.len());
            s.write_all(&chunk[..k]).await.unwrap();
            left -= k;
        }
        n
    });
    let vm = vm(
        NetworkPolicy {
            allow_hosts: vec![at],
            ..Default::default()
        },
        &[],
        None,
    )
    .await;
    let dst = SocketAddrV4::new(GW, at.port());

    let h = vm.guest.connect(dst).await.unwrap();
    let data = vec![0x5au8; 1024 * 1024];
    let t = Instant::now();
    for _ in 0..50 {
        vm.guest.send_all(h, &data).await;
    }
    vm.guest.close(h);
    let (n, first) = vm.guest.recv_count(h, 8).await;
    let up = t.elapsed();
    assert_eq!(n, 8);
    assert_eq!(usize::from_be_bytes(first.try_into().unwrap()), BIG);

    let h = vm.guest.connect(dst).await.unwrap();
    let t = Instant::now();
    let (n, first) = vm.guest.recv_count(h, 4).await;
    let down = t.elapsed();
    assert_eq!(n, BIG);
    assert_eq!(first, vec![0xab; 4]);
    assert_eq!(server.await.unwrap(), BIG);
    let mbs = |d: Duration| BIG as f64 / 1e6 / d.as_secs_f64();
    println!(
        "throughput: guest->host {:.1} MB/s ({up:?}), host->guest {:.1} MB/s ({down:?})",
        mbs(up),
        mbs(down)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_host_reader_stalls_the_guest_with_bounded_buffering() {
    // A host receiver with a small receive buffer that does not read for a while.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(64 * 1024).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let at = sock.local_addr().unwrap();
    let l = sock.listen(4).unwrap();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        go_rx.await.unwrap();
        let mut n = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let k = s.read(&mut buf).await.unwrap();
            if k == 0 {
                return n;
            }
            n += k;
        }
    });
    let vm = vm(
        NetworkPolicy {
            allow_hosts: vec![at],
            ..Default::default()
        },
        &[],
        None,
    )
    .await;
    let h = vm
        .guest
        .connect(SocketAddrV4::new(GW, at.port()))
        .await
        .unwrap();
    let chunk = vec![1u8; 64 * 1024];
    async fn pump(
        g: &Guest,
        h: smoltcp::iface::SocketHandle,
        chunk: &[u8],
        for_: Duration,
    ) -> usize {
        let deadline = Instant::now() + for_;
        let mut sent = 0;
        while Instant::now() < deadline {
            let k = g.try_send(h, chunk);
            sent += k;
            if k == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        sent
    }
    // Push until a half-second window makes no progress (the stall), at most 10 s.
    let mut total_sent = 0;
    let mut stalled = false;
    for _ in 0..20 {
        let k = pump(&vm.guest, h, &chunk, Duration::from_millis(500)).await;
        total_sent += k;
        if k == 0 {
            stalled = true;
            break;
        }
    }
    println!("slow reader: the guest got {total_sent} bytes out before stalling");
    // In flight at the stall: guest buffer (256 KiB) + pen (128 KiB socket + 64 KiB
    // channels) + the host kernel's socket buffers (send side autotuned to a few MB).
    // Without flow control the guest would push ~20 MB/s indefinitely.
    assert!(stalled, "no stall after {total_sent} bytes");
    assert!(
        total_sent < 16 * 1024 * 1024,
        "unbounded buffering: {total_sent}"
    );
    let at_2 = total_sent;
    // Then the reader catches up and everything arrives.
    go_tx.send(()).unwrap();
    let mut total = at_2;
    for _ in 0..64 {
        vm.guest.send_all(h, &chunk).await;
        total += chunk.len();
    }
    vm.guest.close(h);
    assert_eq!(server.await.unwrap(), total);
}

/// The host side swapped (`Backend::with_host`): names resolve and connections open
/// through it, and nothing reaches the real network (198.51.100.0/24 is a documentation
/// range, `svc.invalid` no real resolver answers).
struct EchoHost;

impl pen_net::HostNet for EchoHost {
    fn connect_tcp(&self, target: SocketAddr) -> pen_net::host::HostFuture<pen_net::HostStream> {
        Box::pin(async move {
            if target != "198.51.100.9:80".parse().unwrap() {
                return Err(std::io::ErrorKind::ConnectionRefused.into());
            }
            let (near, far) = tokio::io::duplex(4096);
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(far);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
            let (read, write) = tokio::io::split(near);
            Ok(pen_net::HostStream {
                read: Box::new(read),
                write: Box::new(write),
            })
        })
    }

    fn open_udp(
        &self,
        _target: SocketAddr,
    ) -> pen_net::host::HostFuture<Box<dyn pen_net::HostDatagram>> {
        Box::pin(async { Err(std::io::ErrorKind::Unsupported.into()) })
    }

    fn resolve(&self, name: &str) -> pen_net::host::HostFuture<Vec<IpAddr>> {
        let found = name == "svc.invalid";
        Box::pin(async move {
            Ok(if found {
                vec![IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9))]
            } else {
                vec![]
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_host_side_serves_names_and_connections_without_the_network() {
    let backend = Backend::bind_with_host_addrs(NetworkPolicy::default(), &[], HashSet::new())
        .await
        .unwrap()
        .with_host(Arc::new(EchoHost));
    let (guest, _seen, _serve) = attach(&Arc::new(backend));
    let (rcode, addrs) = guest
        .resolve(SocketAddrV4::new(DNS, 53), "svc.invalid")
        .await
        .unwrap();
    assert_eq!(
        (rcode, addrs),
        (RCODE::NoError, vec![Ipv4Addr::new(198, 51, 100, 9)])
    );
    echo_roundtrip(
        &guest,
        SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 9), 80),
    )
    .await;
    assert_eq!(
        guest
            .connect(SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 9), 81))
            .await,
        Err("refused".into())
    );
}
