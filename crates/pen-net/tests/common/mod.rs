//! A test "guest": a second smoltcp stack (10.0.2.15/24, gateway 10.0.2.2, QEMU's default
//! MAC) speaking Ethernet frames over a unix socket with QEMU's stream framing, so the
//! backend is exercised by a real TCP/IP stack exactly as a VM would.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pen_net::frames::{self, QueueDevice};
use simple_dns::rdata::RData;
use simple_dns::{Name, Packet, PacketFlag, Question, CLASS, QCLASS, QTYPE, RCODE, TYPE};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{EthernetAddress, IpCidr, IpEndpoint};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

pub const TIMEOUT: Duration = Duration::from_secs(10);
// 64 KiB: no window scaling on the guest side, which keeps the test guest clear of smoltcp
// 0.12's `last_scaled_window` panic (smoltcp-rs/smoltcp#1048) seen with scaled windows.
const GUEST_BUF: usize = 64 * 1024;

pub struct Inner {
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    start: std::time::Instant,
    next_port: u16,
}

impl Inner {
    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }
    pub fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }
}

pub struct Guest {
    inner: Arc<Mutex<Inner>>,
    kick: Arc<Notify>,
    changed: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Guest {
    pub fn start(stream: UnixStream) -> Guest {
        let mut device = QueueDevice::default();
        let mut cfg = Config::new(EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]).into());
        cfg.random_seed = 42;
        let mut iface = Interface::new(cfg, &mut device, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(Ipv4Addr::new(10, 0, 2, 15).into(), 24))
                .unwrap();
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Addr::new(10, 0, 2, 2))
            .unwrap();
        let inner = Arc::new(Mutex::new(Inner {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            start: std::time::Instant::now(),
            next_port: 50000,
        }));
        let (rd, wr) = stream.into_split();
        let (in_tx, mut in_rx) = mpsc::channel(256);
        let (out_tx, out_rx) = mpsc::channel(256);
        let kick = Arc::new(Notify::new());
        let changed = Arc::new(Notify::new());
        let t1 = tokio::spawn(async move {
            let _ = frames::read_frames(rd, in_tx).await;
        });
        let t2 = tokio::spawn(async move {
            let _ = frames::write_frames(wr, out_rx).await;
        });
        let (i, k, c) = (inner.clone(), kick.clone(), changed.clone());
        let t3 = tokio::spawn(async move {
            let mut delay = Duration::from_millis(10);
            loop {
                tokio::select! {
                    f = in_rx.recv() => match f {
                        Some(f) => i.lock().unwrap().device.rx.push_back(f),
                        None => return,
                    },
                    _ = k.notified() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
                let out: Vec<Vec<u8>> = {
                    let mut g = i.lock().unwrap();
                    while let Ok(f) = in_rx.try_recv() {
                        g.device.rx.push_back(f);
                    }
                    let now = g.now();
                    let Inner {
                        iface,
                        device,
                        sockets,
                        ..
                    } = &mut *g;
                    iface.poll(now, device, sockets);
                    delay = iface
                        .poll_delay(now, sockets)
                        .map(|d| Duration::from_micros(d.total_micros()))
                        .unwrap_or(Duration::from_millis(50))
                        .min(Duration::from_millis(50));
                    device.tx.drain(..).collect()
                };
                for f in out {
                    if out_tx.send(f).await.is_err() {
                        return;
                    }
                }
                c.notify_waiters();
            }
        });
        Guest {
            inner,
            kick,
            changed,
            tasks: vec![t1, t2, t3],
        }
    }

    /// Run `f` on the stack until it returns Some, polling after every change.
    pub async fn wait<T>(&self, mut f: impl FnMut(&mut Inner) -> Option<T>) -> Option<T> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let n = self.changed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if let Some(t) = f(&mut self.inner.lock().unwrap()) {
                self.kick.notify_one();
                return Some(t);
            }
            self.kick.notify_one();
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::select! {
                _ = n => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    fn new_tcp() -> tcp::Socket<'static> {
        tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; GUEST_BUF]),
            tcp::SocketBuffer::new(vec![0; GUEST_BUF]),
        )
    }

    /// Connect; Err("refused") on RST, Err("timeout") if nothing happens.
    pub async fn connect(&self, dst: SocketAddrV4) -> Result<SocketHandle, String> {
        let h = {
            let mut g = self.inner.lock().unwrap();
            let port = g.next_port;
            g.next_port += 1;
            let mut s = Self::new_tcp();
            let Inner { iface, .. } = &mut *g;
            s.connect(iface.context(), IpEndpoint::from(dst), port)
                .unwrap();
            g.sockets.add(s)
        };
        let r = self
            .wait(|g| match g.tcp(h).state() {
                tcp::State::Established => Some(Ok(h)),
                tcp::State::Closed => Some(Err("refused".to_string())),
                _ => None,
            })
            .await;
        r.unwrap_or_else(|| Err("timeout".to_string()))
    }

    pub async fn listen(&self, port: u16) -> SocketHandle {
        let mut g = self.inner.lock().unwrap();
        let mut s = Self::new_tcp();
        s.listen(port).unwrap();
        g.sockets.add(s)
    }

    pub async fn wait_established(&self, h: SocketHandle) -> bool {
        self.wait(|g| (g.tcp(h).state() == tcp::State::Established).then_some(()))
            .await
            .is_some()
    }

    /// Send as much of `data` as fits now; returns how much.
    pub fn try_send(&self, h: SocketHandle, data: &[u8]) -> usize {
        let n = self
            .inner
            .lock()
            .unwrap()
            .tcp(h)
            .send_slice(data)
            .unwrap_or(0);
        self.kick.notify_one();
        n
    }

    pub async fn send_all(&self, h: SocketHandle, mut data: &[u8]) {
        while !data.is_empty() {
            let n = self
                .wait(|g| {
                    let s = g.tcp(h);
                    if s.can_send() {
                        Some(s.send_slice(data).unwrap_or(0))
                    } else if !s.may_send() {
                        panic!("socket closed while sending ({})", s.state())
                    } else {
                        None
                    }
                })
                .await
                .expect("send stalled");
            data = &data[n..];
        }
    }

    /// Receive what is available; None at end of stream.
    pub async fn recv(&self, h: SocketHandle) -> Option<Vec<u8>> {
        self.wait(|g| {
            let s = g.tcp(h);
            if s.can_recv() {
                Some(Some(s.recv(|b| (b.len(), b.to_vec())).unwrap_or_default()))
            } else if !s.may_recv() {
                Some(None)
            } else {
                None
            }
        })
        .await
        .expect("recv timed out")
    }

    /// Receive and count bytes until end of stream; returns (count, first bytes).
    pub async fn recv_count(&self, h: SocketHandle, keep: usize) -> (usize, Vec<u8>) {
        let mut n = 0;
        let mut kept = Vec::new();
        while let Some(b) = self.recv(h).await {
            if kept.len() < keep {
                kept.extend_from_slice(&b[..b.len().min(keep - kept.len())]);
            }
            n += b.len();
        }
        (n, kept)
    }

    pub fn close(&self, h: SocketHandle) {
        self.inner.lock().unwrap().tcp(h).close();
        self.kick.notify_one();
    }

    pub fn state(&self, h: SocketHandle) -> tcp::State {
        self.inner.lock().unwrap().tcp(h).state()
    }

    pub fn udp_bind(&self, port: u16) -> SocketHandle {
        let mut s = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 16], vec![0; 65536]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 16], vec![0; 65536]),
        );
        s.bind(port).unwrap();
        self.inner.lock().unwrap().sockets.add(s)
    }

    pub fn udp_send(&self, h: SocketHandle, dst: SocketAddrV4, data: &[u8]) {
        let mut g = self.inner.lock().unwrap();
        g.sockets
            .get_mut::<udp::Socket>(h)
            .send_slice(data, IpEndpoint::from(dst))
            .unwrap();
        self.kick.notify_one();
    }

    /// Wait up to `t` for one datagram: (payload, sender).
    pub async fn udp_recv(&self, h: SocketHandle, t: Duration) -> Option<(Vec<u8>, SocketAddr)> {
        tokio::time::timeout(
            t,
            self.wait(|g| {
                let s = g.sockets.get_mut::<udp::Socket>(h);
                s.recv().ok().map(|(d, meta)| {
                    let ep = meta.endpoint;
                    (d.to_vec(), SocketAddr::new(ep.addr.into(), ep.port))
                })
            }),
        )
        .await
        .ok()
        .flatten()
    }

    /// Ask `server` for A records of `name`: (rcode, addresses), None if no answer.
    pub async fn resolve(
        &self,
        server: SocketAddrV4,
        name: &str,
    ) -> Option<(RCODE, Vec<Ipv4Addr>)> {
        let h = {
            let mut g = self.inner.lock().unwrap();
            let p = g.next_port;
            g.next_port += 1;
            drop(g);
            self.udp_bind(p)
        };
        let mut q = Packet::new_query(0x4242);
        q.set_flags(PacketFlag::RECURSION_DESIRED);
        q.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        self.udp_send(h, server, &q.build_bytes_vec().unwrap());
        let (reply, from) = self.udp_recv(h, Duration::from_secs(3)).await?;
        assert_eq!(from, SocketAddr::V4(server), "reply from the server asked");
        let p = Packet::parse(&reply).unwrap();
        assert_eq!(p.id(), 0x4242);
        let addrs = p
            .answers
            .iter()
            .filter_map(|rr| match &rr.rdata {
                RData::A(a) => Some(Ipv4Addr::from(a.address)),
                _ => None,
            })
            .collect();
        Some((p.rcode(), addrs))
    }
}
