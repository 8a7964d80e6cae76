//! A VM's recorded network settings ([`NetworkSettings`], plain strings in `vm.json`)
//! checked and turned into pen-net's policy. The CLI calls the `parse_*` functions on
//! flags before anything is created; the supervisor calls [`policy`] on what is recorded.
//! Every error is one line naming the value.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use pen_core::vm::{NetworkSettings, NETWORK_ALLOW, NETWORK_NONE, NETWORK_OPEN};
use pen_net::{validate_domain, Mode, NetError, NetworkPolicy, Proto, PublishSpec};

/// Test and debug hook: a hosts-file (`ADDR NAME...` lines) whose answers pen's DNS gives
/// before asking the host's resolver, read by the supervisor at start. The VM's mode still
/// applies (in `allow` mode a name must also be allowed). Not for production use: it lets
/// tests control name resolution on hosts without outside DNS.
pub const HOSTS_FILE_ENV: &str = "PEN_NET_HOSTS_FILE";

/// `--network open|none|allow=DOMAIN[,DOMAIN...]` as (mode, normalised domains).
pub fn parse_mode(value: &str) -> Result<(String, Vec<String>), String> {
    match value {
        NETWORK_OPEN | NETWORK_NONE => Ok((value.to_string(), Vec::new())),
        _ => {
            let Some(list) = value.strip_prefix("allow=") else {
                return Err(format!(
                    "invalid --network '{value}': use open, none or allow=DOMAIN[,DOMAIN...]"
                ));
            };
            let domains = parse_domains(list.split(','))
                .map_err(|e| format!("invalid --network '{value}': {e}"))?;
            if domains.is_empty() {
                return Err(format!(
                    "invalid --network '{value}': allow= needs at least one domain"
                ));
            }
            Ok((NETWORK_ALLOW.to_string(), domains))
        }
    }
}

/// Checks and normalises domain patterns (`api.example.com`, `*.example.org`).
pub fn parse_domains<'a>(
    domains: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for d in domains {
        let d = validate_domain(d).map_err(|e| e.to_string())?;
        if !out.contains(&d) {
            out.push(d);
        }
    }
    Ok(out)
}

/// One `--allow-host ADDR:PORT` value, normalised (`[::1]:80` for IPv6).
pub fn parse_allow_host(value: &str) -> Result<String, String> {
    let bad = |why: &str| format!("invalid --allow-host '{value}': {why}");
    if let Ok(addr) = value.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(bad(
                "port 0 is not a port; give ADDR:PORT with a port in 1-65535",
            ));
        }
        return Ok(addr.to_string());
    }
    let bare = value.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        return Err(bad(
            "no port; give the exact ADDR:PORT (e.g. 127.0.0.1:8080)",
        ));
    }
    if let Some((addr, port)) = value.rsplit_once(':') {
        let addr = addr.trim_start_matches('[').trim_end_matches(']');
        if addr.parse::<IpAddr>().is_ok() {
            return Err(bad(&format!("port '{port}' is not in 1-65535")));
        }
    }
    Err(bad(
        "not an IP address and port; give ADDR:PORT (e.g. 127.0.0.1:8080)",
    ))
}

/// The `--allow-host` values, checked.
pub fn parse_allow_hosts(values: &[String]) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for v in values {
        let a = parse_allow_host(v)?;
        if !out.contains(&a) {
            out.push(a);
        }
    }
    Ok(out)
}

/// The `--publish` values, checked (syntax, ranges, a host port given twice).
pub fn parse_publishes(values: &[String]) -> Result<Vec<String>, String> {
    PublishSpec::parse_all(values).map_err(|e| e.to_string())?;
    Ok(values.to_vec())
}

/// Tries each published host port now and lets it go, so that a port in use is an error
/// before a VM is created or its supervisor spawned. The supervisor binds them for real and
/// reports a port taken in between the same way.
pub fn check_publish_ports(publish: &[String]) -> Result<(), String> {
    for spec in PublishSpec::parse_all(publish).map_err(|e| e.to_string())? {
        let bound = match spec.proto {
            Proto::Tcp => std::net::TcpListener::bind(spec.host).map(drop),
            Proto::Udp => std::net::UdpSocket::bind(spec.host).map(drop),
        };
        if let Err(source) = bound {
            return Err(NetError::Bind {
                spec,
                addr: spec.host,
                source,
            }
            .to_string());
        }
    }
    Ok(())
}

/// The recorded settings as pen-net's policy and published ports.
pub fn policy(settings: &NetworkSettings) -> Result<(NetworkPolicy, Vec<PublishSpec>), String> {
    let mode = match settings.mode.as_str() {
        NETWORK_OPEN => Mode::Open,
        NETWORK_NONE => Mode::None,
        NETWORK_ALLOW => Mode::Allow(parse_domains(settings.allow.iter().map(String::as_str))?),
        other => return Err(format!("unknown network mode '{other}' in vm.json")),
    };
    let allow_hosts = settings
        .allow_hosts
        .iter()
        .map(|h| parse_allow_host(h).map(|h| h.parse().expect("normalised above")))
        .collect::<Result<_, _>>()?;
    let publishes = PublishSpec::parse_all(&settings.publish).map_err(|e| e.to_string())?;
    Ok((
        NetworkPolicy {
            mode,
            allow_hosts,
            dns_overrides: HashMap::new(),
        },
        publishes,
    ))
}

/// Reads a hosts file ([`HOSTS_FILE_ENV`]): `ADDR NAME [NAME...]` per line, `#` comments.
pub fn read_hosts_file(path: &Path) -> anyhow::Result<HashMap<String, Vec<IpAddr>>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let mut out: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        let Some(addr) = words.next() else { continue };
        let addr: IpAddr = addr.parse().map_err(|_| {
            anyhow::anyhow!(
                "{}:{}: '{addr}' is not an IP address",
                path.display(),
                n + 1
            )
        })?;
        for name in words {
            out.entry(name.to_ascii_lowercase()).or_default().push(addr);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(parse_mode("open").unwrap(), ("open".into(), vec![]));
        assert_eq!(parse_mode("none").unwrap(), ("none".into(), vec![]));
        assert_eq!(
            parse_mode("allow=Deb.Debian.org,*.example.org,deb.debian.org").unwrap(),
            (
                "allow".into(),
                vec!["deb.debian.org".to_string(), "*.example.org".to_string()]
            )
        );
        for bad in [
            "closed",
            "allow=",
            "allow=a..b",
            "allow=1.2.3.4",
            "Open",
            "",
        ] {
            let e = parse_mode(bad).unwrap_err();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn allow_hosts() {
        assert_eq!(
            parse_allow_host("127.0.0.1:8080").unwrap(),
            "127.0.0.1:8080"
        );
        assert_eq!(parse_allow_host("[::1]:80").unwrap(), "[::1]:80");
        for (bad, words) in [
            ("127.0.0.1", "no port"),
            ("[::1]", "no port"),
            ("127.0.0.1:0", "port 0"),
            ("127.0.0.1:70000", "'70000' is not in 1-65535"),
            ("localhost:80", "not an IP address"),
        ] {
            let e = parse_allow_host(bad).unwrap_err();
            assert!(e.contains(&format!("'{bad}'")) && e.contains(words), "{e}");
        }
    }

    #[test]
    fn recorded_settings_become_a_policy() {
        let s = NetworkSettings {
            mode: "allow".into(),
            allow: vec!["deb.debian.org".into()],
            allow_hosts: vec!["127.0.0.1:9".into()],
            publish: vec!["8080:80".into(), "0.0.0.0:53:53/udp".into()],
        };
        let (p, publishes) = policy(&s).unwrap();
        assert_eq!(p.mode, Mode::Allow(vec!["deb.debian.org".into()]));
        assert_eq!(p.allow_hosts, ["127.0.0.1:9".parse().unwrap()]);
        assert_eq!(publishes.len(), 2);
        assert_eq!(
            policy(&NetworkSettings::default()).unwrap().0.mode,
            Mode::Open
        );
    }

    #[test]
    fn hosts_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("hosts");
        std::fs::write(&f, "# test\n192.0.2.1 Allowed.pen.test other.pen.test\n\n").unwrap();
        let m = read_hosts_file(&f).unwrap();
        assert_eq!(
            m["allowed.pen.test"],
            ["192.0.2.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(m.len(), 2);
    }
}
