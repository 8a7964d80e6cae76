//! The serve loop: one task owns the smoltcp interface; host sockets live in small relay
//! tasks that talk to it over bounded channels.
//!
//! Guest TCP: every SYN is inspected before smoltcp sees it. A refused destination is
//! handed to smoltcp with no socket listening, so smoltcp answers RST. An allowed one is
//! held while the host connection is attempted; on success a socket listening on exactly
//! that destination is created and the SYN replayed into it (the guest sees a normal
//! handshake), on failure the SYN is replayed with no listener (RST: "connection
//! refused", as the guest would see from the real host).
//!
//! UDP never enters smoltcp: datagrams are parsed and built here (stateless, simpler than
//! smoltcp's UDP sockets for flows to arbitrary addresses).
//!
//! Flow control: each direction of each TCP connection holds at most the smoltcp socket
//! buffer plus `CHANNEL_CHUNKS` chunks of `CHUNK` bytes. When the host is slow, the
//! channel to its writer fills, pen stops reading the smoltcp socket and its receive
//! window closes; when the guest is slow, the send buffer fills and pen stops reading the
//! host socket.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::tcp;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpCidr, IpListenEndpoint, IpProtocol, Ipv4Packet, Ipv4Repr, TcpPacket, UdpPacket,
    UdpRepr,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket, UnixStream};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::dns;
use crate::frames::{self, QueueDevice};
use crate::host::{self, HostNet, HostStream, SystemHost};
use crate::policy::{host_addresses, Decision, NetworkPolicy, Policy, Proto, RefuseReason};
use crate::publish::PublishSpec;
use crate::{NetError, DNS_ADDR, GATEWAY, GATEWAY_MAC, GUEST_ADDR, MTU};

/// smoltcp buffer per direction per TCP connection. Over 64 KiB so the window scales,
/// which matters for bulk transfers.
const TCP_BUF: usize = 256 * 1024;
/// Relay chunk size and how many chunks each direction's channel holds.
const CHUNK: usize = 16 * 1024;
const CHANNEL_CHUNKS: usize = 4;
/// Caps against a hostile guest: worst case about MAX_TCP * 2 * (TCP_BUF + 64 KiB).
const MAX_TCP: usize = 256;
const MAX_UDP_FLOWS: usize = 256;
const MAX_DNS_INFLIGHT: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const UDP_IDLE: Duration = Duration::from_secs(120);
/// Ports pen uses on the gateway side for connections and datagrams it starts.
const LOCAL_PORTS: std::ops::Range<u16> = 40000..60000;

/// Something the backend reports. Refusals are reported once per destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetEvent {
    /// A guest TCP connection or UDP flow refused by the policy.
    Refused {
        proto: Proto,
        /// The destination as the guest addressed it.
        dst: SocketAddr,
        /// The name pen's DNS resolved `dst` from for this VM, if any.
        name: Option<String>,
        reason: RefuseReason,
    },
    /// A DNS name pen refused to resolve.
    NameRefused { name: String, reason: RefuseReason },
}

impl std::fmt::Display for NetEvent {
    /// Stable one-line form, e.g. `refused tcp 169.254.169.254:80: link-local or metadata
    /// address` or `refused tcp 1.2.3.4:443 (example.org): ...`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetEvent::Refused {
                proto,
                dst,
                name,
                reason,
            } => {
                write!(f, "refused {proto} {dst}")?;
                if let Some(n) = name {
                    write!(f, " ({n})")?;
                }
                write!(f, ": {reason}")
            }
            NetEvent::NameRefused { name, reason } => {
                write!(f, "refused dns {name}: {reason}")
            }
        }
    }
}

/// A VM's network backend: policy state and published-port listeners, which outlive any
/// one QEMU process.
pub struct Backend {
    policy: Arc<Mutex<Policy>>,
    tcp_listeners: Vec<(PublishSpec, Arc<TcpListener>)>,
    udp_listeners: Vec<(PublishSpec, Arc<UdpSocket>)>,
    log: Arc<Mutex<EventLog>>,
    /// What allowed guest flows and names reach: the real host unless swapped.
    host: Arc<dyn HostNet>,
}

#[derive(Default)]
struct EventLog {
    seen: HashSet<String>,
    events: Vec<NetEvent>,
}

impl EventLog {
    /// Record `ev` unless an event for the same destination was recorded already.
    fn add(&mut self, ev: &NetEvent) -> bool {
        let key = match ev {
            NetEvent::Refused { proto, dst, .. } => format!("{proto} {dst}"),
            NetEvent::NameRefused { name, .. } => format!("dns {name}"),
        };
        if !self.seen.insert(key) {
            return false;
        }
        self.events.push(ev.clone());
        true
    }
}

impl Backend {
    /// Validate the policy, read the host's addresses and bind every published port.
    /// Fails, naming the port, if a listener cannot be bound. A `PublishSpec` built by
    /// hand with host port 0 binds an ephemeral port (see [`Backend::published`]).
    pub async fn bind(
        policy: NetworkPolicy,
        publishes: &[PublishSpec],
    ) -> Result<Backend, NetError> {
        Self::bind_with_host_addrs(policy, publishes, host_addresses()?).await
    }

    /// [`Backend::bind`] with the set of "host's own addresses" given instead of read from
    /// the host. For tests: it lets a listener on a host address stand for "the internet".
    #[doc(hidden)]
    pub async fn bind_with_host_addrs(
        policy: NetworkPolicy,
        publishes: &[PublishSpec],
        own_addrs: HashSet<IpAddr>,
    ) -> Result<Backend, NetError> {
        let policy = Policy::new(policy, own_addrs)?;
        let mut tcp_listeners = Vec::new();
        let mut udp_listeners = Vec::new();
        for spec in publishes {
            let err = |source| NetError::Bind {
                spec: *spec,
                addr: spec.host,
                source,
            };
            match spec.proto {
                Proto::Tcp => {
                    let l = TcpListener::bind(spec.host).await.map_err(err)?;
                    tcp_listeners.push((*spec, Arc::new(l)));
                }
                Proto::Udp => {
                    let s = UdpSocket::bind(spec.host).await.map_err(err)?;
                    udp_listeners.push((*spec, Arc::new(s)));
                }
            }
        }
        Ok(Backend {
            policy: Arc::new(Mutex::new(policy)),
            tcp_listeners,
            udp_listeners,
            log: Arc::default(),
            host: Arc::new(SystemHost),
        })
    }

    /// Serve the guest's allowed flows and names through `host` instead of the real
    /// host's sockets and resolver (fuzz targets and tests: no network needed). The
    /// policy still decides first; published ports stay real listeners.
    pub fn with_host(mut self, host: Arc<dyn HostNet>) -> Self {
        self.host = host;
        self
    }

    /// Published ports with the host address each is actually bound to.
    pub fn published(&self) -> Vec<(PublishSpec, SocketAddr)> {
        let tcp = self
            .tcp_listeners
            .iter()
            .filter_map(|(s, l)| Some((*s, l.local_addr().ok()?)));
        let udp = self
            .udp_listeners
            .iter()
            .filter_map(|(s, l)| Some((*s, l.local_addr().ok()?)));
        tcp.chain(udp).collect()
    }

    /// Every refusal so far (once per destination), oldest first.
    pub fn events(&self) -> Vec<NetEvent> {
        self.log.lock().unwrap().events.clone()
    }

    /// Serve one QEMU's stream connection until it closes (Ok) or fails. Call again with
    /// the next QEMU's connection (snapshot restore, restart): the stack starts empty,
    /// while the policy state (names resolved for this VM, refusals logged) carries over.
    /// Each new refusal is passed to `events` and emitted as a `tracing` warning with
    /// target `pen_net::refused`. Published-port connections accepted while no QEMU is
    /// served wait in the listen backlog. One `serve` at a time per backend.
    pub async fn serve<F>(&self, frames: UnixStream, events: F) -> Result<(), NetError>
    where
        F: FnMut(NetEvent) + Send,
    {
        let (rd, wr) = frames.into_split();
        let (in_tx, in_rx) = mpsc::channel(256);
        let (out_tx, out_rx) = mpsc::channel(256);
        #[cfg(feature = "capture")]
        let (in_tx, out_tx) = match crate::capture::Capture::start() {
            Some(c) => (
                c.tap(crate::capture::FROM_GUEST, in_tx),
                c.tap(crate::capture::TO_GUEST, out_tx),
            ),
            None => (in_tx, out_tx),
        };
        let reader = tokio::spawn(frames::read_frames(rd, in_tx));
        let writer = tokio::spawn(frames::write_frames(wr, out_rx));
        let (ctl_tx, ctl_rx) = mpsc::channel(1024);
        let mut tasks = TaskGuard(vec![reader, writer]);
        for (spec, l) in &self.tcp_listeners {
            let (l, ctl, guest_port) = (l.clone(), ctl_tx.clone(), spec.guest_port);
            tasks.0.push(tokio::spawn(async move {
                loop {
                    if let Ok((stream, _)) = l.accept().await {
                        let stream = stream.into();
                        if ctl.send(Ctl::Inbound { stream, guest_port }).await.is_err() {
                            break Ok(());
                        }
                    }
                }
            }));
        }
        for (idx, (_, s)) in self.udp_listeners.iter().enumerate() {
            let (s, ctl) = (s.clone(), ctl_tx.clone());
            tasks.0.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while !ctl.is_closed() {
                    if let Ok((n, peer)) = s.recv_from(&mut buf).await {
                        let data = Bytes::copy_from_slice(&buf[..n]);
                        let _ = ctl.try_send(Ctl::UdpInbound { idx, peer, data });
                    }
                }
                Ok(())
            }));
        }
        let mut stack = Stack::new(self, ctl_tx, events, out_tx);
        let res = stack.run(in_rx, ctl_rx).await;
        drop(stack);
        // The reader ends on EOF or error; its result says which. (If the loop ended on a
        // write error instead, the reader may still be waiting: stop it.)
        let reader = tasks.0.remove(0);
        if !reader.is_finished() {
            reader.abort();
        }
        let read_res = reader.await.unwrap_or(Ok(()));
        res.and(read_res.map_err(NetError::Stream))
    }
}

/// Aborts the tasks of one `serve` when it returns.
struct TaskGuard(Vec<JoinHandle<std::io::Result<()>>>);
impl Drop for TaskGuard {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Messages from relay tasks to the serve loop.
enum Ctl {
    Connected {
        key: FlowKey,
        syn: Vec<u8>,
        result: std::io::Result<HostStream>,
    },
    Inbound {
        stream: HostStream,
        guest_port: u16,
    },
    /// A datagram for the guest, from `from` (as the guest addresses it) to `guest_port`.
    UdpToGuest {
        from: SocketAddrV4,
        guest_port: u16,
        data: Bytes,
    },
    UdpInbound {
        idx: usize,
        peer: SocketAddr,
        data: Bytes,
    },
    Dns {
        from: SocketAddrV4,
        guest_port: u16,
        reply: Option<Vec<u8>>,
        refusal: Option<dns::NameRefusal>,
    },
}

/// A guest-initiated flow: (guest address, destination as addressed).
type FlowKey = (SocketAddrV4, SocketAddrV4);

enum HostMsg {
    Data(Bytes),
    Reset,
}

struct Conn {
    key: Option<FlowKey>,
    to_host: Option<mpsc::Sender<Bytes>>,
    from_host: mpsc::Receiver<HostMsg>,
    pending: Option<Bytes>,
    host_eof: bool,
    fin_sent: bool,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    reset: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
        // On a clean close the writer finishes flushing what the guest sent, then shuts
        // the host socket down; on a reset it stops now.
        if self.reset {
            self.writer.abort();
        }
    }
}

struct UdpFlow {
    tx: mpsc::Sender<Bytes>,
}

struct Stack<'b, F> {
    backend: &'b Backend,
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    conns: HashMap<SocketHandle, Conn>,
    flows: HashSet<FlowKey>,
    pending: HashSet<FlowKey>,
    udp: HashMap<FlowKey, UdpFlow>,
    /// Published UDP: (listener, host peer) <-> gateway port the guest sees it from.
    udp_peers: HashMap<(usize, SocketAddr), u16>,
    udp_ports: HashMap<u16, (usize, SocketAddr)>,
    guest_mac: Option<EthernetAddress>,
    next_port: u16,
    ctl_tx: mpsc::Sender<Ctl>,
    out_tx: mpsc::Sender<Vec<u8>>,
    notify: Arc<Notify>,
    dns_slots: Arc<Semaphore>,
    events: F,
    start: std::time::Instant,
    /// Set when smoltcp panicked: the serve loop ends with an error.
    failed: Option<String>,
}

impl<'b, F: FnMut(NetEvent) + Send> Stack<'b, F> {
    fn new(
        backend: &'b Backend,
        ctl_tx: mpsc::Sender<Ctl>,
        events: F,
        out_tx: mpsc::Sender<Vec<u8>>,
    ) -> Self {
        let mut device = QueueDevice::default();
        let start = std::time::Instant::now();
        let mut cfg = Config::new(EthernetAddress(GATEWAY_MAC).into());
        cfg.random_seed = random_seed();
        let mut iface = Interface::new(cfg, &mut device, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(GATEWAY.into(), crate::GUEST_SUBNET_PREFIX));
            let _ = a.push(IpCidr::new(DNS_ADDR.into(), crate::GUEST_SUBNET_PREFIX));
        });
        // any_ip + a default route through our own address: smoltcp accepts packets for
        // every destination, so one interface can terminate connections to the world.
        iface.routes_mut().add_default_ipv4_route(GATEWAY).unwrap();
        iface.set_any_ip(true);
        Stack {
            backend,
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            conns: HashMap::new(),
            flows: HashSet::new(),
            pending: HashSet::new(),
            udp: HashMap::new(),
            udp_peers: HashMap::new(),
            udp_ports: HashMap::new(),
            guest_mac: None,
            next_port: LOCAL_PORTS.start,
            ctl_tx,
            out_tx,
            notify: Arc::new(Notify::new()),
            dns_slots: Arc::new(Semaphore::new(MAX_DNS_INFLIGHT)),
            events,
            start,
            failed: None,
        }
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    async fn run(
        &mut self,
        mut in_rx: mpsc::Receiver<Vec<u8>>,
        mut ctl_rx: mpsc::Receiver<Ctl>,
    ) -> Result<(), NetError> {
        let mut delay = Duration::from_millis(100);
        loop {
            let notify = self.notify.clone();
            tokio::select! {
                f = in_rx.recv() => match f {
                    Some(f) => self.on_frame(f),
                    None => return Ok(()),
                },
                Some(c) = ctl_rx.recv() => self.on_ctl(c),
                _ = notify.notified() => {}
                _ = tokio::time::sleep(delay) => {}
            }
            for _ in 0..256 {
                match in_rx.try_recv() {
                    Ok(f) => self.on_frame(f),
                    Err(_) => break,
                }
            }
            for _ in 0..256 {
                match ctl_rx.try_recv() {
                    Ok(c) => self.on_ctl(c),
                    Err(_) => break,
                }
            }
            self.poll();
            if self.failed.is_none() {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.pump()));
                if let Err(e) = r {
                    self.fail(e);
                }
            }
            self.poll();
            if let Some(msg) = self.failed.take() {
                return Err(NetError::Stack(msg));
            }
            for f in self.device.tx.drain(..) {
                if self.out_tx.send(f).await.is_err() {
                    return Ok(());
                }
            }
            let now = self.now();
            delay = self
                .iface
                .poll_delay(now, &self.sockets)
                .map(|d| Duration::from_micros(d.total_micros()))
                .unwrap_or(Duration::from_secs(1));
        }
    }

    /// Run smoltcp; a panic inside it (smoltcp 0.12 has known reachable ones, e.g.
    /// smoltcp-rs/smoltcp#1048 in `last_scaled_window`) must not take down the process
    /// that hosts pen's supervisor: it ends this `serve` with [`NetError::Stack`].
    fn poll(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.poll_inner()));
        if let Err(e) = r {
            self.fail(e);
        }
    }

    fn fail(&mut self, e: Box<dyn std::any::Any + Send>) {
        let msg = e
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| e.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        tracing::error!("pen-net: TCP/IP stack failed: {msg}");
        self.failed = Some(msg);
    }

    fn poll_inner(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        // smoltcp emits at most one segment per socket per egress pass: keep going while
        // it has more, so a whole window goes out in one batch (one write to QEMU) instead
        // of a segment or two per trip through the serve loop.
        for _ in 0..256 {
            let before = self.device.tx.len();
            self.iface
                .poll_egress(now, &mut self.device, &mut self.sockets);
            if self.device.tx.len() == before {
                break;
            }
        }
    }

    fn refuse(&mut self, ev: NetEvent) {
        if self.backend.log.lock().unwrap().add(&ev) {
            // Stable structured form: target `pen_net::refused`, fields proto, addr, port,
            // name ("" when unknown), reason, and the one-line text as the message.
            match &ev {
                NetEvent::Refused {
                    proto,
                    dst,
                    name,
                    reason,
                } => tracing::warn!(
                    target: "pen_net::refused",
                    proto = %proto,
                    addr = %dst.ip(),
                    port = dst.port(),
                    name = name.as_deref().unwrap_or(""),
                    reason = %reason,
                    "{ev}"
                ),
                NetEvent::NameRefused { name, reason } => tracing::warn!(
                    target: "pen_net::refused",
                    proto = "dns",
                    name = name.as_str(),
                    reason = %reason,
                    "{ev}"
                ),
            }
            (self.events)(ev);
        }
    }

    fn refuse_flow(&mut self, proto: Proto, dst: SocketAddrV4, reason: RefuseReason) {
        let name = self
            .backend
            .policy
            .lock()
            .unwrap()
            .resolved_name(IpAddr::V4(*dst.ip()))
            .map(str::to_string);
        self.refuse(NetEvent::Refused {
            proto,
            dst: SocketAddr::V4(dst),
            name,
            reason,
        });
    }

    fn alloc_port(&mut self) -> u16 {
        let p = self.next_port;
        self.next_port = if p + 1 >= LOCAL_PORTS.end {
            LOCAL_PORTS.start
        } else {
            p + 1
        };
        p
    }

    /// Classify one frame from the guest: ARP and TCP go to smoltcp (after the SYN check),
    /// UDP is handled here, the rest is dropped.
    fn on_frame(&mut self, frame: Vec<u8>) {
        let Ok(eth) = EthernetFrame::new_checked(&frame[..]) else {
            return;
        };
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                let Ok(arp) = ArpPacket::new_checked(eth.payload()) else {
                    return;
                };
                let Ok(ArpRepr::EthernetIpv4 {
                    operation,
                    source_hardware_addr,
                    source_protocol_addr,
                    target_protocol_addr,
                    ..
                }) = ArpRepr::parse(&arp)
                else {
                    return;
                };
                if source_protocol_addr == GUEST_ADDR {
                    self.guest_mac = Some(source_hardware_addr);
                }
                // any_ip would make smoltcp answer ARP for every address, the guest's own
                // included: only the gateway and DNS addresses exist on this link.
                let for_us = target_protocol_addr == GATEWAY || target_protocol_addr == DNS_ADDR;
                if for_us || operation == ArpOperation::Reply {
                    self.device.rx.push_back(frame);
                }
            }
            EthernetProtocol::Ipv4 => {
                let src_mac = eth.src_addr();
                let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                    return;
                };
                let Ok(ip_repr) = Ipv4Repr::parse(&ip, &ChecksumCapabilities::default()) else {
                    return;
                };
                // Only the guest's own address; no fragments (the guest's PMTU is ours).
                if ip_repr.src_addr != GUEST_ADDR || ip.more_frags() || ip.frag_offset() != 0 {
                    return;
                }
                self.guest_mac = Some(src_mac);
                match ip_repr.next_header {
                    IpProtocol::Tcp => {
                        let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
                            return;
                        };
                        if tcp.syn() && !tcp.ack() {
                            let key = (
                                SocketAddrV4::new(ip_repr.src_addr, tcp.src_port()),
                                SocketAddrV4::new(ip_repr.dst_addr, tcp.dst_port()),
                            );
                            self.on_syn(key, frame);
                        } else {
                            self.device.rx.push_back(frame);
                        }
                    }
                    IpProtocol::Udp => {
                        let Ok(udp) = UdpPacket::new_checked(ip.payload()) else {
                            return;
                        };
                        let caps = ChecksumCapabilities::default();
                        let (s, d) = (ip_repr.src_addr.into(), ip_repr.dst_addr.into());
                        if UdpRepr::parse(&udp, &s, &d, &caps).is_err() {
                            return;
                        }
                        let src = SocketAddrV4::new(ip_repr.src_addr, udp.src_port());
                        let dst = SocketAddrV4::new(ip_repr.dst_addr, udp.dst_port());
                        let data = Bytes::copy_from_slice(udp.payload());
                        self.on_udp(src, dst, data);
                    }
                    // smoltcp answers echo requests to its own addresses; other ICMP is dropped.
                    IpProtocol::Icmp
                        if ip_repr.dst_addr == GATEWAY || ip_repr.dst_addr == DNS_ADDR =>
                    {
                        self.device.rx.push_back(frame);
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn on_syn(&mut self, key: FlowKey, frame: Vec<u8>) {
        if self.flows.contains(&key) {
            self.device.rx.push_back(frame); // retransmission, smoltcp's socket has it
            return;
        }
        if self.pending.contains(&key) {
            return; // host connect in progress; the held SYN is replayed then
        }
        let dst = key.1;
        let decision = self
            .backend
            .policy
            .lock()
            .unwrap()
            .decide(SocketAddr::V4(dst));
        match decision {
            Decision::Refuse(reason) => {
                self.refuse_flow(Proto::Tcp, dst, reason);
                self.device.rx.push_back(frame); // no listener: smoltcp answers RST
            }
            Decision::Allow(_) if self.conns.len() + self.pending.len() >= MAX_TCP => {
                tracing::debug!("pen-net: too many TCP connections, refusing {dst}");
                self.device.rx.push_back(frame);
            }
            Decision::Allow(target) => {
                self.pending.insert(key);
                let ctl = self.ctl_tx.clone();
                let connect = self.backend.host.connect_tcp(target);
                tokio::spawn(async move {
                    let result = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                        Ok(r) => r,
                        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
                    };
                    let _ = ctl
                        .send(Ctl::Connected {
                            key,
                            syn: frame,
                            result,
                        })
                        .await;
                });
            }
        }
    }

    fn on_ctl(&mut self, c: Ctl) {
        match c {
            Ctl::Connected { key, syn, result } => {
                self.pending.remove(&key);
                match result {
                    Ok(stream) => {
                        // Drain what is queued first, so the new listener sees only its SYN.
                        self.poll();
                        let mut sock = new_tcp_socket();
                        let ep = IpListenEndpoint {
                            addr: Some((*key.1.ip()).into()),
                            port: key.1.port(),
                        };
                        if sock.listen(ep).is_err() {
                            return;
                        }
                        let handle = self.sockets.add(sock);
                        self.flows.insert(key);
                        self.add_conn(handle, Some(key), stream);
                        self.device.rx.push_back(syn);
                        self.poll();
                    }
                    Err(e) => {
                        tracing::debug!("pen-net: connect to {} failed: {e}", key.1);
                        self.device.rx.push_back(syn); // RST
                    }
                }
            }
            Ctl::Inbound { stream, guest_port } => {
                if self.conns.len() >= MAX_TCP {
                    return;
                }
                let mut sock = new_tcp_socket();
                let local = self.alloc_port();
                let cx = self.iface.context();
                if sock
                    .connect(cx, (GUEST_ADDR, guest_port), (GATEWAY, local))
                    .is_err()
                {
                    return;
                }
                let handle = self.sockets.add(sock);
                self.add_conn(handle, None, stream);
            }
            Ctl::UdpToGuest {
                from,
                guest_port,
                data,
            } => self.udp_to_guest(from, guest_port, &data),
            Ctl::Dns {
                from,
                guest_port,
                reply,
                refusal,
            } => {
                if let Some(r) = refusal {
                    self.refuse(NetEvent::NameRefused {
                        name: r.name,
                        reason: r.reason,
                    });
                }
                if let Some(reply) = reply {
                    self.udp_to_guest(from, guest_port, &reply);
                }
            }
            Ctl::UdpInbound { idx, peer, data } => {
                let port = match self.udp_peers.get(&(idx, peer)) {
                    Some(p) => *p,
                    None => {
                        if self.udp_peers.len() >= 1024 {
                            self.udp_peers.clear();
                            self.udp_ports.clear();
                        }
                        let p = self.alloc_port();
                        self.udp_peers.insert((idx, peer), p);
                        self.udp_ports.insert(p, (idx, peer));
                        p
                    }
                };
                let guest_port = self.backend.udp_listeners[idx].0.guest_port;
                self.udp_to_guest(SocketAddrV4::new(GATEWAY, port), guest_port, &data);
            }
        }
    }

    fn add_conn(&mut self, handle: SocketHandle, key: Option<FlowKey>, stream: HostStream) {
        let HostStream {
            read: mut rd,
            write: mut wr,
        } = stream;
        let (to_host, mut to_host_rx) = mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
        let (from_host_tx, from_host) = mpsc::channel::<HostMsg>(CHANNEL_CHUNKS);
        let n1 = self.notify.clone();
        let reader = tokio::spawn(async move {
            loop {
                let mut buf = BytesMut::with_capacity(CHUNK);
                match rd.read_buf(&mut buf).await {
                    Ok(0) => break,
                    Ok(_) => {
                        if from_host_tx
                            .send(HostMsg::Data(buf.freeze()))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Err(_) => {
                        let _ = from_host_tx.send(HostMsg::Reset).await;
                        break;
                    }
                }
                n1.notify_one();
            }
            drop(from_host_tx);
            n1.notify_one();
        });
        let n2 = self.notify.clone();
        let writer = tokio::spawn(async move {
            while let Some(b) = to_host_rx.recv().await {
                if wr.write_all(&b).await.is_err() {
                    drop(to_host_rx); // the serve loop sees the channel closed: RST
                    n2.notify_one();
                    return;
                }
                n2.notify_one();
            }
            let _ = wr.shutdown().await;
        });
        self.conns.insert(
            handle,
            Conn {
                key,
                to_host: Some(to_host),
                from_host,
                pending: None,
                host_eof: false,
                fin_sent: false,
                reader,
                writer,
                reset: false,
            },
        );
    }

    /// Move data between smoltcp sockets and relay channels, as far as both have room.
    fn pump(&mut self) {
        let mut dead = Vec::new();
        for (handle, conn) in self.conns.iter_mut() {
            let sock = self.sockets.get_mut::<tcp::Socket>(*handle);
            // Host -> guest.
            loop {
                if conn.pending.is_none() && !conn.host_eof {
                    match conn.from_host.try_recv() {
                        Ok(HostMsg::Data(b)) => conn.pending = Some(b),
                        Ok(HostMsg::Reset) => {
                            sock.abort();
                            conn.reset = true;
                            break;
                        }
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            conn.host_eof = true;
                            break;
                        }
                    }
                }
                let Some(b) = conn.pending.as_mut() else {
                    break;
                };
                if !sock.can_send() {
                    break;
                }
                let n = sock.send_slice(b).unwrap_or(0);
                b.advance(n);
                if b.is_empty() {
                    conn.pending = None;
                } else {
                    break;
                }
            }
            if conn.host_eof
                && conn.pending.is_none()
                && !conn.fin_sent
                && matches!(
                    sock.state(),
                    tcp::State::Established | tcp::State::CloseWait
                )
            {
                sock.close();
                conn.fin_sent = true;
            }
            // Guest -> host.
            if let Some(tx) = &conn.to_host {
                while sock.can_recv() {
                    match tx.try_reserve() {
                        Ok(permit) => {
                            if let Ok(data) = sock.recv(|buf| {
                                let n = buf.len().min(CHUNK);
                                (n, Bytes::copy_from_slice(&buf[..n]))
                            }) {
                                permit.send(data);
                            }
                        }
                        Err(mpsc::error::TrySendError::Full(_)) => break,
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            sock.abort();
                            conn.reset = true;
                            break;
                        }
                    }
                }
                let guest_done = matches!(
                    sock.state(),
                    tcp::State::CloseWait
                        | tcp::State::LastAck
                        | tcp::State::Closing
                        | tcp::State::TimeWait
                        | tcp::State::Closed
                );
                if guest_done && !sock.can_recv() {
                    conn.to_host = None; // the writer flushes, then shuts down (FIN)
                }
            }
            if matches!(sock.state(), tcp::State::Closed | tcp::State::TimeWait) {
                if sock.state() == tcp::State::Closed && !conn.fin_sent && conn.to_host.is_some() {
                    conn.reset = true; // closed without an orderly close: guest RST
                }
                dead.push(*handle);
            }
        }
        for h in dead {
            if let Some(c) = self.conns.remove(&h) {
                if let Some(k) = c.key {
                    self.flows.remove(&k);
                }
            }
            self.sockets.remove(h);
        }
    }

    fn on_udp(&mut self, src: SocketAddrV4, dst: SocketAddrV4, data: Bytes) {
        let guest_port = src.port();
        if dst.port() == 53 && (*dst.ip() == DNS_ADDR || *dst.ip() == GATEWAY) {
            let Ok(slot) = self.dns_slots.clone().try_acquire_owned() else {
                return; // too many queries in flight: drop, the guest retries
            };
            let (policy, ctl) = (self.backend.policy.clone(), self.ctl_tx.clone());
            let host = self.backend.host.clone();
            tokio::spawn(async move {
                let (reply, refusal) = dns::answer_via(&policy, host.as_ref(), &data).await;
                let _ = ctl
                    .send(Ctl::Dns {
                        from: dst,
                        guest_port,
                        reply,
                        refusal,
                    })
                    .await;
                drop(slot);
            });
            return;
        }
        if *dst.ip() == GATEWAY {
            if let Some((idx, peer)) = self.udp_ports.get(&dst.port()) {
                // A reply to a published UDP port's host peer.
                let _ = self.backend.udp_listeners[*idx].1.try_send_to(&data, *peer);
                return;
            }
        }
        let key = (src, dst);
        if let Some(flow) = self.udp.get(&key) {
            if !flow.tx.is_closed() {
                let _ = flow.tx.try_send(data);
                return;
            }
            self.udp.remove(&key);
        }
        let decision = self
            .backend
            .policy
            .lock()
            .unwrap()
            .decide(SocketAddr::V4(dst));
        let target = match decision {
            Decision::Refuse(reason) => {
                self.refuse_flow(Proto::Udp, dst, reason);
                return;
            }
            Decision::Allow(t) => t,
        };
        self.udp.retain(|_, f| !f.tx.is_closed());
        if self.udp.len() >= MAX_UDP_FLOWS {
            return;
        }
        let (tx, mut rx) = mpsc::channel::<Bytes>(16);
        let _ = tx.try_send(data);
        let ctl = self.ctl_tx.clone();
        let notify = self.notify.clone();
        let open = self.backend.host.open_udp(target);
        tokio::spawn(async move {
            let Ok(sock) = open.await else {
                return;
            };
            let mut buf = vec![0u8; 65536];
            loop {
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(d) => { let _ = host::send_datagram(sock.as_ref(), &d).await; }
                        None => return,
                    },
                    r = host::recv_datagram(sock.as_ref(), &mut buf) => {
                        if let Ok(n) = r {
                            let data = Bytes::copy_from_slice(&buf[..n]);
                            let _ = ctl.try_send(Ctl::UdpToGuest { from: dst, guest_port, data });
                            notify.notify_one();
                        }
                    }
                    _ = tokio::time::sleep(UDP_IDLE) => return,
                }
            }
        });
        self.udp.insert(key, UdpFlow { tx });
    }

    /// Build and queue one UDP datagram to the guest (dropped if it would need IP
    /// fragmentation, or before the guest's MAC is known).
    fn udp_to_guest(&mut self, from: SocketAddrV4, guest_port: u16, payload: &[u8]) {
        let Some(guest_mac) = self.guest_mac else {
            return;
        };
        if payload.len() > MTU - 28 {
            tracing::debug!(
                "pen-net: dropping {}-byte UDP datagram from {from}",
                payload.len()
            );
            return;
        }
        let caps = ChecksumCapabilities::default();
        let udp_repr = UdpRepr {
            src_port: from.port(),
            dst_port: guest_port,
        };
        let ip_repr = Ipv4Repr {
            src_addr: *from.ip(),
            dst_addr: GUEST_ADDR,
            next_header: IpProtocol::Udp,
            payload_len: udp_repr.header_len() + payload.len(),
            hop_limit: 64,
        };
        let eth_repr = EthernetRepr {
            src_addr: EthernetAddress(GATEWAY_MAC),
            dst_addr: guest_mac,
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut buf = vec![0u8; eth_repr.buffer_len() + ip_repr.buffer_len() + ip_repr.payload_len];
        let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
        eth_repr.emit(&mut eth);
        let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
        ip_repr.emit(&mut ip, &caps);
        let mut udp = UdpPacket::new_unchecked(ip.payload_mut());
        udp_repr.emit(
            &mut udp,
            &(*from.ip()).into(),
            &GUEST_ADDR.into(),
            payload.len(),
            |b| b.copy_from_slice(payload),
            &caps,
        );
        self.device.tx.push(buf);
    }
}

fn new_tcp_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; TCP_BUF]),
        tcp::SocketBuffer::new(vec![0u8; TCP_BUF]),
    );
    s.set_nagle_enabled(false);
    s.set_congestion_control(tcp::CongestionControl::Cubic);
    // A guest that vanishes mid-connection must not pin the socket forever.
    s.set_timeout(Some(smoltcp::time::Duration::from_secs(300)));
    s.set_keep_alive(Some(smoltcp::time::Duration::from_secs(60)));
    s
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok()
    {
        u64::from_ne_bytes(b)
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    }
}
