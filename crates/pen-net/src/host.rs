//! The host side of the guest's flows: what pen-net opens on the host once the policy
//! allows a guest's TCP connection, UDP flow or DNS name. [`SystemHost`] is the real one
//! (tokio sockets, the host resolver); [`crate::Backend::with_host`] swaps in another, so
//! fuzz targets and tests drive the whole guest-facing path without a network.
//!
//! Published ports (listeners the host side opens on its own) are not behind this trait:
//! the guest cannot make pen open one.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UdpSocket};

/// A host operation in flight. `'static`: the backend runs it in a task of its own.
pub type HostFuture<T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send>>;

/// Opens host sockets and resolves names for the guest's flows.
pub trait HostNet: Send + Sync {
    /// A TCP connection to `target` (the policy's [`Decision::Allow`](crate::policy::Decision)).
    fn connect_tcp(&self, target: SocketAddr) -> HostFuture<HostStream>;
    /// A UDP socket connected to `target`.
    fn open_udp(&self, target: SocketAddr) -> HostFuture<Box<dyn HostDatagram>>;
    /// The addresses `name` (normalised, allowed by the policy) resolves to.
    fn resolve(&self, name: &str) -> HostFuture<Vec<IpAddr>>;
}

/// The two halves of a host byte stream, each owned by one relay task.
pub struct HostStream {
    pub read: Box<dyn AsyncRead + Send + Unpin>,
    pub write: Box<dyn AsyncWrite + Send + Unpin>,
}

impl From<TcpStream> for HostStream {
    fn from(stream: TcpStream) -> Self {
        // Relayed segments are already as large as the guest made them: never delay them.
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        HostStream {
            read: Box::new(read),
            write: Box::new(write),
        }
    }
}

/// A connected datagram socket (what a guest UDP flow is relayed through).
pub trait HostDatagram: Send + Sync {
    fn poll_send(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>>;
    fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>>;
}

impl HostDatagram for UdpSocket {
    fn poll_send(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        UdpSocket::poll_send(self, cx, data)
    }

    fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        UdpSocket::poll_recv(self, cx, buf)
    }
}

/// Sends one datagram.
pub async fn send_datagram(sock: &dyn HostDatagram, data: &[u8]) -> io::Result<usize> {
    std::future::poll_fn(|cx| sock.poll_send(cx, data)).await
}

/// Receives one datagram into `buf`; returns its length.
pub async fn recv_datagram(sock: &dyn HostDatagram, buf: &mut [u8]) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut filled = ReadBuf::new(buf);
        match sock.poll_recv(cx, &mut filled) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(filled.filled().len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// The real host: tokio sockets and the host's resolver (getaddrinfo).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemHost;

impl HostNet for SystemHost {
    fn connect_tcp(&self, target: SocketAddr) -> HostFuture<HostStream> {
        Box::pin(async move { Ok(TcpStream::connect(target).await?.into()) })
    }

    fn open_udp(&self, target: SocketAddr) -> HostFuture<Box<dyn HostDatagram>> {
        Box::pin(async move {
            let bind: SocketAddr = if target.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let sock = UdpSocket::bind(bind).await?;
            sock.connect(target).await?;
            Ok(Box::new(sock) as Box<dyn HostDatagram>)
        })
    }

    fn resolve(&self, name: &str) -> HostFuture<Vec<IpAddr>> {
        let name = name.to_string();
        Box::pin(async move {
            Ok(tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .map(|sa| sa.ip())
                .collect())
        })
    }
}
