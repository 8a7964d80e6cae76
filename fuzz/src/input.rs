//! Reading structure out of the fuzzer's bytes: every read succeeds (zeros past the end),
//! so any input is a valid one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// Up to `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) << 8 | u16::from(self.u8())
    }

    /// A string of up to 255 bytes (lossy UTF-8).
    pub fn string(&mut self) -> String {
        let n = self.u8() as usize;
        String::from_utf8_lossy(self.bytes(n)).into_owned()
    }

    /// An address, biased toward the classes the policy tells apart.
    pub fn ip(&mut self) -> IpAddr {
        let pick = self.u8();
        let b = self.bytes(4);
        let mut q = [0u8; 4];
        q[..b.len()].copy_from_slice(b);
        let v4 = match pick % 8 {
            0 => Ipv4Addr::new(10, 0, 2, q[3]),
            1 => Ipv4Addr::new(127, 0, 0, 1),
            2 => Ipv4Addr::new(169, 254, 169, 254),
            3 => Ipv4Addr::new(198, 51, 100, q[3]),
            4 => return IpAddr::V6(Ipv6Addr::from(u128::from(u32::from_be_bytes(q)))),
            _ => Ipv4Addr::from(q),
        };
        IpAddr::V4(v4)
    }

    pub fn socket_addr(&mut self) -> SocketAddr {
        let ip = self.ip();
        let port = match self.u8() % 4 {
            0 => 53,
            1 => 8080,
            _ => self.u16(),
        };
        SocketAddr::new(ip, port)
    }
}
