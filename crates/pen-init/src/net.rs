//! Network for QEMU user-mode networking: the addresses slirp hands out are fixed, so they
//! are configured statically (no DHCP client needed, nothing to wait for).

use std::path::Path;
use std::process::{Command, Stdio};

use crate::boot::BootError;

pub const GUEST_ADDR: &str = "10.0.2.15/24";
pub const GATEWAY: &str = "10.0.2.2";
pub const NAMESERVER: &str = "10.0.2.3";

/// The first Ethernet interface (ARPHRD_ETHER = 1) under `sys_net`, by name order.
pub fn find_ethernet(sys_net: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(sys_net)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.into_iter().find(|n| {
        std::fs::read_to_string(sys_net.join(n).join("type")).is_ok_and(|t| t.trim() == "1")
    })
}

fn ip_binary() -> Result<&'static str, BootError> {
    ["/usr/sbin/ip", "/usr/bin/ip", "/sbin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| BootError::new("network", "ip (iproute2) not found in the root image"))
}

fn ip(bin: &str, args: &[&str]) -> Result<(), BootError> {
    // Blocking is fine here: boot runs alone, before the reaper takes over waitpid.
    let out = Command::new(bin)
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .map_err(|e| BootError::new("network", format!("run ip: {e}")))?;
    if !out.status.success() {
        return Err(BootError::new(
            "network",
            format!(
                "ip {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// Loopback up; the NIC (if any) gets 10.0.2.15/24 and a default route via 10.0.2.2.
/// Returns the interface configured.
pub fn configure() -> Result<Option<String>, BootError> {
    let bin = ip_binary()?;
    ip(bin, &["link", "set", "lo", "up"])?;
    let Some(ifname) = find_ethernet(Path::new("/sys/class/net")) else {
        return Ok(None);
    };
    ip(bin, &["addr", "add", GUEST_ADDR, "dev", &ifname])?;
    ip(bin, &["link", "set", &ifname, "up"])?;
    ip(
        bin,
        &["route", "add", "default", "via", GATEWAY, "dev", &ifname],
    )?;
    crate::boot::system::write_resolv_conf(NAMESERVER)?;
    Ok(Some(ifname))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_first_ethernet() {
        let dir = std::env::temp_dir().join(format!("pen-init-test-net-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (name, ty) in [("lo", "772"), ("sit0", "776"), ("eth1", "1"), ("eth0", "1")] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("type"), format!("{ty}\n")).unwrap();
        }
        assert_eq!(find_ethernet(&dir).as_deref(), Some("eth0"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
