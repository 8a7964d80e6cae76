//! `--publish [HOST_ADDR:]HOST_PORT:GUEST_PORT[/tcp|/udp]` specs.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::policy::Proto;
use crate::NetError;

/// One published port: host listener `host` relays to the guest's `guest_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishSpec {
    pub host: SocketAddr,
    pub guest_port: u16,
    pub proto: Proto,
}

impl fmt::Display for PublishSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.host, self.guest_port, self.proto)
    }
}

impl PublishSpec {
    /// Parse `[HOST_ADDR:]HOST_PORT:GUEST_PORT[/tcp|/udp]`. The host address defaults to
    /// 127.0.0.1 (publishing on every interface must be asked for), the protocol to tcp.
    /// An IPv6 host address is written in brackets: `[::1]:8080:80`.
    pub fn parse(value: &str) -> Result<PublishSpec, NetError> {
        let bad = |why: &str| NetError::InvalidPublish {
            value: value.to_string(),
            reason: why.to_string(),
        };
        let (body, proto) = match value.rsplit_once('/') {
            Some((b, "tcp")) => (b, Proto::Tcp),
            Some((b, "udp")) => (b, Proto::Udp),
            Some(_) => return Err(bad("protocol must be tcp or udp")),
            None => (value, Proto::Tcp),
        };
        let (rest, guest) = body
            .rsplit_once(':')
            .ok_or_else(|| bad("expected [HOST_ADDR:]HOST_PORT:GUEST_PORT"))?;
        let (addr, host_port) = match rest.rsplit_once(':') {
            Some((a, p)) => {
                let a = a
                    .strip_prefix('[')
                    .and_then(|a| a.strip_suffix(']'))
                    .unwrap_or(a);
                let ip: IpAddr = a
                    .parse()
                    .map_err(|_| bad(&format!("'{a}' is not an IP address")))?;
                (ip, p)
            }
            None => (IpAddr::V4(Ipv4Addr::LOCALHOST), rest),
        };
        let port = |p: &str, which: &str| -> Result<u16, NetError> {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(bad(&format!("{which} port '{p}' is not in 1-65535"))),
            }
        };
        Ok(PublishSpec {
            host: SocketAddr::new(addr, port(host_port, "host")?),
            guest_port: port(guest, "guest")?,
            proto,
        })
    }

    /// Parse a list, rejecting a host port published twice for the same protocol.
    pub fn parse_all<S: AsRef<str>>(values: &[S]) -> Result<Vec<PublishSpec>, NetError> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for v in values {
            let spec = PublishSpec::parse(v.as_ref())?;
            if !seen.insert((spec.host.port(), spec.proto)) {
                return Err(NetError::InvalidPublish {
                    value: v.as_ref().to_string(),
                    reason: format!("host port {} is published twice", spec.host.port()),
                });
            }
            out.push(spec);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        let s = PublishSpec::parse("8080:80").unwrap();
        assert_eq!(s.host, "127.0.0.1:8080".parse().unwrap());
        assert_eq!((s.guest_port, s.proto), (80, Proto::Tcp));
        let s = PublishSpec::parse("0.0.0.0:53:5353/udp").unwrap();
        assert_eq!(s.host, "0.0.0.0:53".parse().unwrap());
        assert_eq!((s.guest_port, s.proto), (5353, Proto::Udp));
        let s = PublishSpec::parse("[::1]:9000:9000/tcp").unwrap();
        assert_eq!(s.host, "[::1]:9000".parse().unwrap());
        assert_eq!(s.to_string(), "[::1]:9000:9000/tcp");
    }

    #[test]
    fn rejects_bad_values_with_one_line_naming_them() {
        for bad in [
            "80",
            "0:80",
            "80:0",
            "65536:80",
            "x:80",
            "80:80/sctp",
            "1.2.3:80:80",
            "localhost:80:80",
            "",
        ] {
            let e = PublishSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn rejects_duplicate_host_ports() {
        let e = PublishSpec::parse_all(&["8080:80", "127.0.0.1:8080:81"]).unwrap_err();
        assert!(e.to_string().contains("published twice"), "{e}");
        // Same port, different protocol: two different listeners.
        assert_eq!(
            PublishSpec::parse_all(&["53:53/udp", "53:53"])
                .unwrap()
                .len(),
            2
        );
    }
}
