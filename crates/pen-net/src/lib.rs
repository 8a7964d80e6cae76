//! pen-net: the host side of a pen VM's network.
//!
//! QEMU runs the guest NIC with `-netdev stream,id=net0,server=off,addr.type=unix,addr.path=PATH`
//! (Ethernet frames over a unix socket, see [`frames`]); this crate serves that socket with
//! a userspace TCP/IP stack ([smoltcp]) that terminates every guest TCP connection and UDP
//! flow itself, applies the VM's [`NetworkPolicy`], and opens the real host sockets. Unlike
//! QEMU's `-netdev user` nothing reaches the host's loopback, link-local/metadata or own
//! addresses unless named exactly with an allow-host entry.
//!
//! Guest view (what pen-init configures): guest 10.0.2.15/24, gateway 10.0.2.2 (stands for
//! the host's 127.0.0.1, port by allowed port), DNS 10.0.2.3 (also answered at 10.0.2.2),
//! MTU [`pen_proto::LINK_MTU`] (64 KiB frames: the link is a unix socket). IPv4 only.
//!
//! Use: [`Backend::bind`] before starting QEMU (policy checks and published-port listeners:
//! a port in use is reported before the VM starts), then [`Backend::serve`] for each QEMU
//! process's stream connection (again after a snapshot restore or a QEMU restart: nothing
//! assumes the stack saw the guest boot).
//!
//! Why smoltcp: a complete TCP (window scaling, retransmission, keep-alive) whose `any_ip`
//! mode lets one interface terminate connections to every destination, poll-driven with
//! no threads or I/O of its own (it lives inside one tokio task, back-pressure is its socket
//! buffers), and whose `wire` module parses and builds the frames pen-net screens itself.
//! libslirp and passt would need their policy patched in C or kept outside them; thinner
//! smoltcp wrappers (netstack-smoltcp, ipstack) add little pen needs. DNS: see the `dns`
//! module doc (answers A from the host resolver rather than forwarding raw queries).
//!
//! Limits: IPv4 only (AAAA answers are empty); DNS over UDP only, A records only; UDP
//! datagrams needing IP fragmentation are dropped; at most 256 TCP connections and 256
//! UDP flows per VM.

mod backend;
#[cfg(feature = "capture")]
mod capture;
mod dns;
pub mod frames;
pub mod host;
pub mod policy;
pub mod publish;
pub mod ranges;

use std::net::Ipv4Addr;

pub use backend::{Backend, NetEvent};
pub use host::{HostDatagram, HostNet, HostStream, SystemHost};
pub use policy::{validate_domain, Mode, NetworkPolicy, Proto, RefuseReason, HOST_NAME};
pub use publish::PublishSpec;
pub use ranges::{Cidr, CidrError};

/// The gateway: pen's side of the link; stands for the host's loopback.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// pen's DNS server address.
pub const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The guest's address (static, set by pen-init).
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Prefix length of the guest subnet 10.0.2.0/24.
pub const GUEST_SUBNET_PREFIX: u8 = 24;
/// IP MTU of the link (see [`pen_proto::LINK_MTU`]).
pub const MTU: usize = pen_proto::LINK_MTU;
/// The gateway's MAC, fixed (slirp's) so a guest restored from a snapshot, whose ARP cache
/// still holds it, keeps working with a new backend.
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];

/// Errors of this crate. Every message is one line naming the offending value.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid domain '{value}': {reason}")]
    InvalidDomain { value: String, reason: String },
    #[error("invalid --publish '{value}': {reason}")]
    InvalidPublish { value: String, reason: String },
    #[error("cannot publish {spec}: binding {addr} failed: {source}")]
    Bind {
        spec: PublishSpec,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the host's interface addresses: {0}")]
    HostAddresses(std::io::Error),
    #[error("network stream from QEMU failed: {0}")]
    Stream(std::io::Error),
    #[error("the VM's TCP/IP stack failed ({0}); its network is down until the VM restarts")]
    Stack(String),
}
