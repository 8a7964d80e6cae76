//! QEMU `-netdev stream` framing and the smoltcp device over it.
//!
//! QEMU's stream netdev (net/stream.c, QEMU 7.2) sends each Ethernet frame prefixed by
//! its length as a 4-byte big-endian integer (`uint32_t len = htonl(size)`), with no
//! other header (no vnet header: the guest computes full checksums).

use std::collections::VecDeque;

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::MTU;

/// Largest frame accepted from the peer: QEMU never sends more than 64 KiB; anything
/// larger is a broken or hostile stream.
pub const MAX_FRAME: usize = 65536;

/// Read frames from `r` into `tx` until EOF or error. Blocks (back-pressure) when the
/// consumer is behind, so QEMU's socket fills and QEMU stops reading the guest.
pub async fn read_frames<R: AsyncRead + Unpin>(
    r: R,
    tx: mpsc::Sender<Vec<u8>>,
) -> std::io::Result<()> {
    let mut r = tokio::io::BufReader::with_capacity(256 * 1024, r);
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("frame of {len} bytes from the VM (at most {MAX_FRAME})"),
            ));
        }
        let mut frame = vec![0u8; len];
        r.read_exact(&mut frame).await?;
        if tx.send(frame).await.is_err() {
            return Ok(());
        }
    }
}

/// Write frames from `rx` to `w`, batching what is queued into one write.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Vec<u8>>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(256 * 1024);
    while let Some(frame) = rx.recv().await {
        buf.clear();
        push_frame(&mut buf, &frame);
        while buf.len() < 192 * 1024 {
            match rx.try_recv() {
                Ok(f) => push_frame(&mut buf, &f),
                Err(_) => break,
            }
        }
        w.write_all(&buf).await?;
    }
    Ok(())
}

fn push_frame(buf: &mut Vec<u8>, frame: &[u8]) {
    buf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    buf.extend_from_slice(frame);
}

/// A smoltcp device over in-memory queues: the serve loop fills `rx` from the stream
/// (after its own filtering) and drains `tx` into it.
#[derive(Default)]
pub struct QueueDevice {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: Vec<Vec<u8>>,
}

pub struct RxToken(Vec<u8>);
pub struct TxToken<'a>(&'a mut Vec<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push(buf);
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((RxToken(frame), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU + 14;
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn framing_round_trip_and_limit() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel(8);
        let (out_tx, mut out_rx) = mpsc::channel(8);
        let w = tokio::spawn(write_frames(a, rx));
        let r = tokio::spawn(read_frames(b, out_tx));
        tx.send(vec![1, 2, 3]).await.unwrap();
        tx.send(vec![]).await.unwrap();
        tx.send(vec![7; 1514]).await.unwrap();
        drop(tx);
        assert_eq!(out_rx.recv().await.unwrap(), vec![1, 2, 3]);
        assert_eq!(out_rx.recv().await.unwrap(), Vec::<u8>::new());
        assert_eq!(out_rx.recv().await.unwrap(), vec![7; 1514]);
        w.await.unwrap().unwrap();
        assert!(out_rx.recv().await.is_none());
        r.await.unwrap().unwrap();

        // The exact bytes on the wire: big-endian length, then the frame.
        let (mut a, b) = tokio::net::UnixStream::pair().unwrap();
        let (out_tx, mut out_rx) = mpsc::channel(8);
        let r = tokio::spawn(read_frames(b, out_tx));
        a.write_all(&[0, 0, 0, 2, 0xaa, 0xbb]).await.unwrap();
        assert_eq!(out_rx.recv().await.unwrap(), vec![0xaa, 0xbb]);
        a.write_all(&[0, 1, 0, 1]).await.unwrap(); // 65537: too big
        assert!(r.await.unwrap().is_err());
    }
}
