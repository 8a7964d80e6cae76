//! A guest's frames through pen-net's `Backend::serve`, the entry point the supervisor
//! calls, over a real socket pair (QEMU's stream framing) and an in-memory host
//! ([`MemHost`]) in place of the host's sockets and resolver: no network is touched.
//!
//! Input (`net_guest_frames`): one policy byte (see [`policy_from`]), then records
//! `[kind u8][len u16 BE][bytes]`. Even kinds are guest frames, sent in order; odd kinds
//! are frames the backend sent in the capture the input came from, read only to learn the
//! sequence number the captured backend chose for each TCP connection. The guest's
//! acknowledgement numbers are rebased from that to the live backend's choice, so replayed
//! captures (and what the fuzzer derives from them) get past the handshake. IPv4, TCP and
//! UDP checksums are recomputed unless the kind has bit 1 set.
//!
//! Time is tokio's paused clock: timers fire as soon as nothing else can run, so a run
//! takes no wall-clock waits.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pen_net::host::{HostDatagram, HostFuture, HostNet, HostStream};
use pen_net::{Backend, Mode, NetError, NetworkPolicy, DNS_ADDR, GUEST_ADDR};
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Packet,
    Ipv4Repr, TcpPacket, UdpPacket, UdpRepr,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;

use crate::input::Input;

/// Frames per input, at most (a run stays short).
const MAX_FRAMES: usize = 64;
/// The guest's MAC (QEMU's default).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// An address of "the host" for the policy's own-address rule.
const HOST_OWN: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// The VM's policy from one byte: mode (open, none, public, allow `*.allowed.test` and
/// `allowed.test`), an allow-host entry for the host's port 8080, DNS overrides.
pub fn policy_from(b: u8) -> NetworkPolicy {
    let mode = match b % 4 {
        0 => Mode::Open,
        1 => Mode::None,
        2 => Mode::Public,
        _ => Mode::Allow(vec!["*.allowed.test".into(), "allowed.test".into()]),
    };
    let mut policy = NetworkPolicy {
        mode,
        ..Default::default()
    };
    if b & 0x04 != 0 {
        policy
            .allow_hosts
            .push(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 8080));
    }
    if b & 0x08 != 0 {
        policy.dns_overrides.insert(
            "over.allowed.test".into(),
            vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7))],
        );
    }
    policy
}

/// One TCP connection's sequence-number spaces: (captured backend ISN, live backend ISN).
type Flow = (SocketAddrV4, SocketAddrV4);

#[derive(Default)]
struct Isns {
    captured: HashMap<Flow, u32>,
    live: HashMap<Flow, u32>,
}

/// The TCP flow (guest end, far end) and the SYN-ACK's sequence number of a backend frame.
fn syn_ack_of(frame: &[u8]) -> Option<(Flow, u32)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    if !(tcp.syn() && tcp.ack()) {
        return None;
    }
    let guest = SocketAddrV4::new(ip.dst_addr(), tcp.dst_port());
    let far = SocketAddrV4::new(ip.src_addr(), tcp.src_port());
    Some(((guest, far), tcp.seq_number().0 as u32))
}

/// Rebases a guest TCP segment's acknowledgement and recomputes the checksums.
fn prepare_guest_frame(frame: &mut [u8], isns: &Isns, fix_checksums: bool) {
    let Ok(mut eth) = EthernetFrame::new_checked(&mut *frame) else {
        return;
    };
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return;
    }
    let Ok(mut ip) = Ipv4Packet::new_checked(eth.payload_mut()) else {
        return;
    };
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    match ip.next_header() {
        IpProtocol::Tcp => {
            if let Ok(mut tcp) = TcpPacket::new_checked(ip.payload_mut()) {
                let flow = (
                    SocketAddrV4::new(src, tcp.src_port()),
                    SocketAddrV4::new(dst, tcp.dst_port()),
                );
                if tcp.ack() {
                    if let Some(live) = isns.live.get(&flow) {
                        let captured = isns.captured.get(&flow).copied().unwrap_or(0);
                        let ack = (tcp.ack_number().0 as u32)
                            .wrapping_sub(captured)
                            .wrapping_add(*live);
                        tcp.set_ack_number(smoltcp::wire::TcpSeqNumber(ack as i32));
                    }
                }
                if fix_checksums {
                    tcp.fill_checksum(&src.into(), &dst.into());
                }
            }
        }
        IpProtocol::Udp if fix_checksums => {
            if let Ok(mut udp) = UdpPacket::new_checked(ip.payload_mut()) {
                udp.fill_checksum(&src.into(), &dst.into());
            }
        }
        _ => {}
    }
    if fix_checksums {
        ip.fill_checksum();
    }
}

/// Drives one backend with `frames` (each with its `fix_checksums` flag); returns every
/// frame the backend sent. `captured` are the capture's backend frames (see module doc).
pub fn drive(
    policy: NetworkPolicy,
    frames: Vec<(Vec<u8>, bool)>,
    captured: &[Vec<u8>],
) -> Vec<Vec<u8>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("tokio runtime");
    let mut isns = Isns::default();
    for f in captured {
        if let Some((flow, seq)) = syn_ack_of(f) {
            isns.captured.insert(flow, seq);
        }
    }
    rt.block_on(async move {
        let own: HashSet<IpAddr> = [IpAddr::V4(HOST_OWN)].into();
        let backend = Backend::bind_with_host_addrs(policy, &[], own)
            .await
            .expect("a policy without publishes binds")
            .with_host(Arc::new(MemHost));
        let (qemu, ours) = UnixStream::pair().expect("socketpair");
        let (mut from_backend, mut to_backend) = qemu.into_split();
        let replies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let reader = {
            let replies = replies.clone();
            tokio::spawn(async move {
                loop {
                    let mut len = [0u8; 4];
                    if from_backend.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
                    if from_backend.read_exact(&mut f).await.is_err() {
                        return;
                    }
                    replies.lock().unwrap().push(f);
                }
            })
        };
        let guest = async {
            let mut seen = 0;
            for (mut frame, fix) in frames {
                {
                    let replies = replies.lock().unwrap();
                    for r in &replies[seen..] {
                        if let Some((flow, seq)) = syn_ack_of(r) {
                            isns.live.insert(flow, seq);
                        }
                    }
                    seen = replies.len();
                }
                prepare_guest_frame(&mut frame, &isns, fix);
                let mut wire = (frame.len() as u32).to_be_bytes().to_vec();
                wire.extend_from_slice(&frame);
                if to_backend.write_all(&wire).await.is_err() {
                    break;
                }
                settle().await;
            }
            settle().await;
            drop(to_backend); // EOF: serve returns
        };
        let (served, ()) = tokio::join!(backend.serve(ours, |_event| {}), guest);
        match served {
            // A contained smoltcp panic ends serve this way; the run goes on.
            Ok(()) | Err(NetError::Stack(_)) => {}
            Err(e) => panic!("serve failed on a well-framed stream: {e}"),
        }
        let _ = reader.await;
        Arc::try_unwrap(replies)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_default()
    })
}

/// Lets the backend, its tasks and the in-memory host run until all of them wait.
async fn settle() {
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The `net_guest_frames` target.
pub fn guest_frames(data: &[u8]) {
    guest_frames_replies(data);
}

/// [`guest_frames`], returning what the backend sent the guest.
pub fn guest_frames_replies(data: &[u8]) -> Vec<Vec<u8>> {
    let mut input = Input::new(data);
    let policy = policy_from(input.u8());
    let mut frames = Vec::new();
    let mut captured = Vec::new();
    while !input.is_empty() && frames.len() < MAX_FRAMES {
        let kind = input.u8();
        let len = input.u16() as usize;
        let bytes = input.bytes(len).to_vec();
        if kind & 1 == 1 {
            captured.push(bytes);
        } else {
            frames.push((bytes, kind & 2 == 0));
        }
    }
    drive(policy, frames, &captured)
}

/// An Ethernet/IPv4/UDP frame from the guest to `dst` carrying `payload`, checksummed.
pub fn guest_udp(src_port: u16, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let udp = UdpRepr {
        src_port,
        dst_port: dst.port(),
    };
    let ip = Ipv4Repr {
        src_addr: GUEST_ADDR,
        dst_addr: *dst.ip(),
        next_header: IpProtocol::Udp,
        payload_len: udp.header_len() + payload.len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress(pen_net::GATEWAY_MAC),
        ethertype: EthernetProtocol::Ipv4,
    };
    let caps = smoltcp::phy::ChecksumCapabilities::default();
    let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + ip.payload_len];
    let mut e = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut e);
    let mut i = Ipv4Packet::new_unchecked(e.payload_mut());
    ip.emit(&mut i, &caps);
    let mut u = UdpPacket::new_unchecked(i.payload_mut());
    udp.emit(
        &mut u,
        &GUEST_ADDR.into(),
        &(*dst.ip()).into(),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    buf
}

/// The `net_dns_query` target: one policy byte, then the query. Every answer pen sends
/// must be a DNS response to that query (same id).
pub fn dns_query(data: &[u8]) {
    dns_answers(data);
}

/// [`dns_query`], returning the answers (DNS payloads) the guest got.
pub fn dns_answers(data: &[u8]) -> Vec<Vec<u8>> {
    let mut input = Input::new(data);
    let policy = policy_from(input.u8());
    let query = input.rest();
    if query.len() > 1400 {
        return Vec::new();
    }
    let frame = guest_udp(40000, SocketAddrV4::new(DNS_ADDR, 53), query);
    let replies = drive(policy, vec![(frame, false)], &[]);
    let answers: Vec<Vec<u8>> = replies.iter().filter_map(|r| udp_payload(r)).collect();
    for payload in &answers {
        let answer = simple_dns::Packet::parse(payload).expect("pen's DNS answer parses");
        assert!(
            query.len() >= 12,
            "an answer to a packet shorter than a DNS header"
        );
        let id = u16::from_be_bytes([query[0], query[1]]);
        assert_eq!(answer.id(), id, "answer to another query");
        assert!(answer.has_flags(simple_dns::PacketFlag::RESPONSE));
    }
    answers
}

fn udp_payload(frame: &[u8]) -> Option<Vec<u8>> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Udp {
        return None;
    }
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    Some(udp.payload().to_vec())
}

/// The host side in memory. TCP: even ports accept and echo, odd ports refuse. UDP:
/// every datagram is echoed. Names: `nx*` resolve to nothing, `meta*` to the metadata
/// address, `v6*` to an IPv6 address, the rest to an address in 198.51.100.0/24.
pub struct MemHost;

impl HostNet for MemHost {
    fn connect_tcp(&self, target: SocketAddr) -> HostFuture<HostStream> {
        Box::pin(async move {
            if target.port() % 2 == 1 {
                return Err(io::ErrorKind::ConnectionRefused.into());
            }
            let (near, far) = tokio::io::duplex(16 * 1024);
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(far);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
            let (read, write) = tokio::io::split(near);
            Ok(HostStream {
                read: Box::new(read),
                write: Box::new(write),
            })
        })
    }

    fn open_udp(&self, _target: SocketAddr) -> HostFuture<Box<dyn HostDatagram>> {
        Box::pin(async { Ok(Box::new(EchoDatagram::default()) as Box<dyn HostDatagram>) })
    }

    fn resolve(&self, name: &str) -> HostFuture<Vec<IpAddr>> {
        let addrs = if name.starts_with("nx") {
            vec![]
        } else if name.starts_with("meta") {
            vec![IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254))]
        } else if name.starts_with("v6") {
            vec!["2001:db8::1".parse().unwrap()]
        } else {
            let h = name
                .bytes()
                .fold(0u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
            vec![IpAddr::V4(Ipv4Addr::new(198, 51, 100, h))]
        };
        Box::pin(async move { Ok(addrs) })
    }
}

#[derive(Default)]
struct EchoDatagram {
    queue: Mutex<(VecDeque<Vec<u8>>, Option<Waker>)>,
}

impl HostDatagram for EchoDatagram {
    fn poll_send(&self, _cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut q = self.queue.lock().unwrap();
        if q.0.len() < 16 {
            q.0.push_back(data.to_vec());
        }
        if let Some(w) = q.1.take() {
            w.wake();
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut q = self.queue.lock().unwrap();
        match q.0.pop_front() {
            Some(d) => {
                let n = d.len().min(buf.remaining());
                buf.put_slice(&d[..n]);
                Poll::Ready(Ok(()))
            }
            None => {
                q.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
