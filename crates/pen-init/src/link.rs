//! The host link: the `org.pen.agent` virtio-serial port, carrying [`pen_proto::Frame`]s.
//!
//! One reader task decodes frames and hands them to the agent; one writer task owns all
//! writes, fed by a bounded channel that every session shares (each session's own bound is
//! its window, see [`crate::credit`]). The port is non-blocking; readiness comes from short-lived [`AsyncFd`]
//! registrations (see [`wait_ready`]).
//!
//! When the host side is not connected (before the supervisor attaches, or while a snapshot
//! is restored) reads return 0 and writes would block. Neither is fatal: the reader polls
//! again every 50 ms and the writer waits, so sessions keep running until the host is back.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use pen_proto::{DecodeError, Frame, FrameCodec, Message, SessionId};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::fdio::{raw_read, raw_write};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{Decoder, Encoder};

/// Retry interval while the host side of the port is disconnected.
const RECONNECT_POLL: Duration = Duration::from_millis(50);
/// Frames queued for the writer; every sender waits when it is full.
const OUTGOING_QUEUE: usize = 256;

/// What the reader hands the agent.
#[derive(Debug)]
pub enum Incoming {
    Frame(Frame),
    /// A whole frame that could not be decoded; the stream is still in sync.
    Malformed(DecodeError),
    /// The byte stream could not be framed (impossible length); buffered bytes were dropped.
    Desync(String),
}

// Nearly every item is a frame (`Flush` is rare): boxing frames to shrink the enum would
// cost an allocation per frame to save bytes only on flushes.
#[allow(clippy::large_enum_variant)]
enum Outgoing {
    Frame(Frame),
    Flush(oneshot::Sender<()>),
}

/// Cloneable sending half of the link.
#[derive(Clone)]
pub struct LinkTx {
    tx: mpsc::Sender<Outgoing>,
}

impl LinkTx {
    /// Queues a frame; waits while the writer is backed up. Errors only when the writer task
    /// is gone (never, in practice), so callers may ignore the result.
    pub async fn send(&self, session: SessionId, message: Message) -> Result<(), ()> {
        self.tx
            .send(Outgoing::Frame(Frame::new(session, message)))
            .await
            .map_err(|_| ())
    }

    /// Waits until everything queued before this call was written, or `timeout` passed.
    pub async fn flush(&self, timeout: Duration) {
        let (done, wait) = oneshot::channel();
        let _ = tokio::time::timeout(timeout, async {
            if self.tx.send(Outgoing::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        })
        .await;
    }
}

/// Opens the port and starts the reader and writer tasks.
pub fn open(path: &Path) -> io::Result<(LinkTx, mpsc::Receiver<Incoming>)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)?;
    let fd = Arc::new(OwnedFd::from(file));
    let (out_tx, out_rx) = mpsc::channel(OUTGOING_QUEUE);
    let (in_tx, in_rx) = mpsc::channel(64);
    tokio::spawn(read_loop(fd.clone(), in_tx));
    tokio::spawn(write_loop(fd, out_rx));
    Ok((LinkTx { tx: out_tx }, in_rx))
}

/// True while the host side of the port is not connected (the driver reports POLLHUP).
fn host_hung_up(fd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd without blocking.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & libc::POLLHUP != 0
}

/// Waits (at most 1 s) until the port is ready for `interest`.
///
/// Each wait registers a fresh duplicate of the fd: tokio keeps a "closed" readiness once it
/// has seen POLLHUP, which the port reports whenever the host is away, and a long-lived
/// registration would then report ready forever after a reconnect. The duplicate also lets the
/// reader and the writer wait at the same time.
async fn wait_ready(fd: &OwnedFd, interest: Interest) {
    let Ok(dup) = fd.try_clone() else {
        tokio::time::sleep(RECONNECT_POLL).await;
        return;
    };
    // SAFETY: the duplicate is owned by the AsyncFd and closed (after deregistering) on drop.
    let Ok(afd) = (unsafe { AsyncFd::register_with_interest(dup, interest) }) else {
        tokio::time::sleep(RECONNECT_POLL).await;
        return;
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), afd.ready(interest)).await;
}

async fn read_loop(fd: Arc<OwnedFd>, to_agent: mpsc::Sender<Incoming>) {
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match raw_read(&fd, &mut chunk) {
            Ok(0) => {
                // Host disconnected. A partial frame from the old connection would corrupt
                // the next one's stream, so drop it.
                if !buf.is_empty() {
                    buf.clear();
                    codec = FrameCodec::new();
                }
                tokio::time::sleep(RECONNECT_POLL).await;
                continue;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_ready(&fd, Interest::READABLE).await;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                tokio::time::sleep(RECONNECT_POLL).await;
                continue;
            }
        }
        loop {
            let item = match codec.decode(&mut buf) {
                Ok(Some(Ok(frame))) => Incoming::Frame(frame),
                Ok(Some(Err(e))) => Incoming::Malformed(e),
                Ok(None) => break,
                Err(e) => {
                    buf.clear();
                    codec = FrameCodec::new();
                    Incoming::Desync(e.to_string())
                }
            };
            if to_agent.send(item).await.is_err() {
                return;
            }
        }
    }
}

async fn write_loop(fd: Arc<OwnedFd>, mut from_all: mpsc::Receiver<Outgoing>) {
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    while let Some(first) = from_all.recv().await {
        let mut flushes = Vec::new();
        let mut next = Some(first);
        // Batch whatever is already queued into one write.
        while let Some(item) = next.take() {
            match item {
                Outgoing::Frame(frame) => {
                    if let Err(e) = codec.encode(frame, &mut buf) {
                        crate::console::debug(&format!("link: cannot encode a frame: {e}"));
                    }
                }
                Outgoing::Flush(done) => flushes.push(done),
            }
            if buf.len() < 256 * 1024 {
                next = from_all.try_recv().ok();
            }
        }
        while !buf.is_empty() {
            match raw_write(&fd, &buf) {
                Ok(n) => buf.advance(n),
                // Host away: the driver refuses writes until it reconnects.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && host_hung_up(&fd) => {
                    tokio::time::sleep(RECONNECT_POLL).await
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_ready(&fd, Interest::WRITABLE).await
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => tokio::time::sleep(RECONNECT_POLL).await,
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}
