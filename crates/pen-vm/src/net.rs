//! A VM's recorded network settings ([`NetworkSettings`], plain strings in `vm.json`)
//! checked and turned into pen-net's policy. The CLI calls the `parse_*` functions on
//! flags before anything is created; the supervisor calls [`policy`] on what is recorded.
//! Every error is one line naming the value.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use pen_core::vm::{NetworkSettings, NETWORK_ALLOW, NETWORK_NONE, NETWORK_OPEN, NETWORK_PUBLIC};
use pen_net::ranges::{internal_range_holding, INTERNAL_RANGES};
use pen_net::{validate_domain, Cidr, Mode, NetError, NetworkPolicy, Proto, PublishSpec};

/// Test and debug hook: a hosts-file (`ADDR NAME...` lines) whose answers pen's DNS gives
/// before asking the host's resolver, read by the supervisor at start. The VM's mode still
/// applies (in `allow` mode a name must also be allowed). Not for production use: it lets
/// tests control name resolution on hosts without outside DNS.
pub const HOSTS_FILE_ENV: &str = "PEN_NET_HOSTS_FILE";

/// `--network public|open|none|allow=DOMAIN[,DOMAIN...]` as (mode, normalised domains).
pub fn parse_mode(value: &str) -> Result<(String, Vec<String>), String> {
    match value {
        NETWORK_PUBLIC | NETWORK_OPEN | NETWORK_NONE => Ok((value.to_string(), Vec::new())),
        _ => {
            let Some(list) = value.strip_prefix("allow=") else {
                return Err(format!(
                    "invalid --network '{value}': use public, open, none or allow=DOMAIN[,DOMAIN...]"
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

/// One `--allow-net CIDR` value, normalised: a range inside one of the internal ranges
/// that mode `public` closes (`10.200.0.0/24`, `fd00:1::/64`). Public addresses need no
/// opening, and a range reaching beyond the internal ones (`0.0.0.0/0`, `::/0`, `10.0.0.0/7`)
/// would open more than a LAN: refused, like one with host bits set.
pub fn parse_allow_net(value: &str) -> Result<String, String> {
    let bad = |why: String| format!("invalid --allow-net '{value}': {why}");
    let cidr = Cidr::parse(value).map_err(|e| bad(e.to_string()))?;
    if cidr.prefix() == 0 {
        return Err(bad(
            "that is every address; --network open opens the whole LAN".into(),
        ));
    }
    if internal_range_holding(&cidr).is_none() {
        let ranges: Vec<String> = INTERNAL_RANGES.iter().map(|r| r.to_string()).collect();
        return Err(bad(format!(
            "not inside one internal range ({}); public addresses need no --allow-net",
            ranges.join(", ")
        )));
    }
    Ok(cidr.to_string())
}

/// The `--allow-net` values, checked.
pub fn parse_allow_nets<'a>(
    values: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for v in values {
        let n = parse_allow_net(v)?;
        if !out.contains(&n) {
            out.push(n);
        }
    }
    Ok(out)
}

/// A profile's `[network]` as settings, checked and normalised (domains, ranges); errors
/// name the profile file.
pub fn profile_settings(
    profile: &pen_core::profile::Profile,
    file: &Path,
) -> Result<NetworkSettings, String> {
    let at = |e: String| format!("{}: {e}", file.display());
    let mut settings = profile.network_settings().map_err(at)?;
    settings.allow = parse_domains(settings.allow.iter().map(String::as_str))
        .map_err(|e| at(format!("[network] allow: {e}")))?;
    settings.allow_nets = parse_allow_nets(settings.allow_nets.iter().map(String::as_str))
        .map_err(|e| at(format!("[network] allow_net: {e}")))?;
    Ok(settings)
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
        NETWORK_PUBLIC => Mode::Public,
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
    let allow_nets = parse_allow_nets(settings.allow_nets.iter().map(String::as_str))?
        .iter()
        .map(|n| Cidr::parse(n).expect("normalised above"))
        .collect();
    let publishes = PublishSpec::parse_all(&settings.publish).map_err(|e| e.to_string())?;
    Ok((
        NetworkPolicy {
            mode,
            allow_hosts,
            allow_nets,
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
        assert_eq!(parse_mode("public").unwrap(), ("public".into(), vec![]));
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
    fn allow_nets() {
        assert_eq!(parse_allow_net("10.200.0.0/24").unwrap(), "10.200.0.0/24");
        assert_eq!(parse_allow_net("192.168.1.7/32").unwrap(), "192.168.1.7/32");
        assert_eq!(parse_allow_net("fd00:1::/64").unwrap(), "fd00:1::/64");
        assert_eq!(parse_allow_net("100.64.0.0/10").unwrap(), "100.64.0.0/10");
        for (bad, words) in [
            ("0.0.0.0/0", "every address"),
            ("::/0", "every address"),
            ("10.0.0.0/7", "not inside one internal range"),
            ("8.8.8.0/24", "public addresses need no --allow-net"),
            ("127.0.0.0/8", "not inside one internal range"),
            ("169.254.0.0/16", "not inside one internal range"),
            (
                "10.200.0.2/24",
                "host bits are set; the range is 10.200.0.0/24",
            ),
            ("10.200.0.0", "no prefix length"),
            ("10.200.0.0/33", "not a number from 0 to 32"),
            ("lan/24", "'lan' is not an IP address"),
            ("", "no prefix length"),
        ] {
            let e = parse_allow_net(bad).unwrap_err();
            assert!(
                e.starts_with(&format!("invalid --allow-net '{bad}': ")) && e.contains(words),
                "{e}"
            );
            assert!(!e.contains('\n'), "{e}");
        }
        assert_eq!(
            parse_allow_nets(["10.1.0.0/16", "10.1.0.0/16", "fd00::/8"]).unwrap(),
            ["10.1.0.0/16", "fd00::/8"]
        );
    }

    #[test]
    fn recorded_settings_become_a_policy() {
        let s = NetworkSettings {
            mode: "allow".into(),
            allow: vec!["deb.debian.org".into()],
            allow_hosts: vec!["127.0.0.1:9".into()],
            allow_nets: vec!["10.9.0.0/16".into()],
            publish: vec!["8080:80".into(), "0.0.0.0:53:53/udp".into()],
            mode_chosen: true,
        };
        let (p, publishes) = policy(&s).unwrap();
        assert_eq!(p.mode, Mode::Allow(vec!["deb.debian.org".into()]));
        assert_eq!(p.allow_hosts, ["127.0.0.1:9".parse().unwrap()]);
        assert_eq!(p.allow_nets, [Cidr::parse("10.9.0.0/16").unwrap()]);
        assert_eq!(publishes.len(), 2);
        assert_eq!(
            policy(&NetworkSettings::default()).unwrap().0.mode,
            Mode::Public
        );
        let open = NetworkSettings::recorded_before_public();
        assert_eq!(policy(&open).unwrap().0.mode, Mode::Open);
    }

    #[test]
    fn a_profiles_network_is_checked_naming_the_file() {
        let file = Path::new("/h/profiles/p.toml");
        let profile = |text: &str| pen_core::profile::parse(file, text).unwrap();
        let s = profile_settings(
            &profile("[network]\nmode = \"open\"\nallow_net = [\"10.1.0.0/16\"]\n"),
            file,
        )
        .unwrap();
        assert_eq!((s.mode.as_str(), s.allow_nets.len()), ("open", 1));
        let e = profile_settings(&profile("[network]\nallow_net = [\"0.0.0.0/0\"]\n"), file)
            .unwrap_err();
        assert!(
            e.starts_with(
                "/h/profiles/p.toml: [network] allow_net: invalid --allow-net '0.0.0.0/0'"
            ),
            "{e}"
        );
        let e = profile_settings(&profile("[network]\nmode = \"lan\"\n"), file).unwrap_err();
        assert!(e.starts_with("/h/profiles/p.toml: [network] mode"), "{e}");
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
