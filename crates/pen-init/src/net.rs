//! Network for QEMU user-mode networking: the addresses slirp hands out are fixed, so they
//! are configured statically (no DHCP client needed, nothing to wait for).

use std::path::Path;

use crate::boot::BootError;

pub const GUEST_ADDR: [u8; 4] = [10, 0, 2, 15];
pub const NETMASK: [u8; 4] = [255, 255, 255, 0];
pub const GATEWAY: [u8; 4] = [10, 0, 2, 2];
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

/// A socket for interface and routing ioctls, closed on drop.
struct Ctl(std::os::fd::OwnedFd);

impl Ctl {
    fn open() -> Result<Ctl, BootError> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the descriptor is owned by the returned value.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(net_error("socket", std::io::Error::last_os_error()));
        }
        Ok(Ctl(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    fn ioctl<T>(&self, request: libc::c_ulong, arg: &mut T, what: &str) -> Result<(), BootError> {
        use std::os::fd::AsRawFd;
        // SAFETY: `arg` is the structure `request` expects (ifreq or rtentry), alive and
        // exclusively borrowed for the call.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), request, arg as *mut T) };
        if rc != 0 {
            return Err(net_error(what, std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn set_up(&self, ifname: &str) -> Result<(), BootError> {
        let mut req = ifreq(ifname)?;
        self.ioctl(
            libc::SIOCGIFFLAGS,
            &mut req,
            &format!("get flags of {ifname}"),
        )?;
        // SAFETY: SIOCGIFFLAGS filled in the flags member.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        self.ioctl(libc::SIOCSIFFLAGS, &mut req, &format!("set {ifname} up"))
    }

    fn set_ipv4(&self, ifname: &str, addr: [u8; 4], netmask: [u8; 4]) -> Result<(), BootError> {
        let mut req = ifreq(ifname)?;
        req.ifr_ifru.ifru_addr = sockaddr_in(addr);
        self.ioctl(
            libc::SIOCSIFADDR,
            &mut req,
            &format!("set the address of {ifname}"),
        )?;
        req.ifr_ifru.ifru_netmask = sockaddr_in(netmask);
        self.ioctl(
            libc::SIOCSIFNETMASK,
            &mut req,
            &format!("set the netmask of {ifname}"),
        )
    }

    fn add_default_route(&self, ifname: &str, gateway: [u8; 4]) -> Result<(), BootError> {
        let dev = std::ffi::CString::new(ifname).map_err(|e| net_error("route", e))?;
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_in([0; 4]),
            rt_gateway: sockaddr_in(gateway),
            rt_genmask: sockaddr_in([0; 4]),
            rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: dev.as_ptr() as *mut libc::c_char,
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        self.ioctl(libc::SIOCADDRT, &mut rt, "add the default route")
    }
}

/// The kernel's `struct rtentry` (linux/route.h), which the libc crate lacks for glibc.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn net_error(what: &str, e: impl std::fmt::Display) -> BootError {
    BootError::new("network", format!("{what}: {e}"))
}

fn ifreq(ifname: &str) -> Result<libc::ifreq, BootError> {
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(net_error("interface", format!("name too long: {ifname}")));
    }
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(addr: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how the kernel takes it.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Loopback up; the NIC `ifname` (if any) gets 10.0.2.15/24 and a default route via
/// 10.0.2.2. Touches no path (sockets and ioctls only), so it can run on a thread of its own
/// while the boot switches roots: find the NIC first with [`find_ethernet`], and write
/// `/etc/resolv.conf` with [`write_resolv_conf`] once the merged root is `/`.
///
/// Done with ioctls rather than by running `ip`: four processes from the root image cost
/// ~300 ms under TCG, the largest part of the time from a snapshot restore to a prompt.
pub fn bring_up(ifname: Option<&str>) -> Result<(), BootError> {
    let ctl = Ctl::open()?;
    ctl.set_up("lo")?;
    let Some(ifname) = ifname else {
        return Ok(());
    };
    ctl.set_ipv4(ifname, GUEST_ADDR, NETMASK)?;
    ctl.set_up(ifname)?;
    ctl.add_default_route(ifname, GATEWAY)
}

/// Points `/etc/resolv.conf` at slirp's DNS when the VM has a NIC.
pub fn write_resolv_conf(ifname: Option<&str>) -> Result<(), BootError> {
    match ifname {
        Some(_) => crate::boot::system::write_resolv_conf(NAMESERVER),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtentry_matches_the_kernel_layout() {
        // x86_64: 8 + 3 * 16 + 2 + 2 + 4 (pad) + 8 + 8 + 2 + 6 (pad) + 8 + 8 + 8 + 2 + 6.
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_flags), 56);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_dev), 88);
    }

    #[test]
    fn addresses_are_in_network_order() {
        let sa = sockaddr_in([10, 0, 2, 15]);
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        // sa_data: port (2 bytes), then the address bytes as written.
        assert_eq!(
            &sa.sa_data[2..6],
            &[10, 0, 2, 15].map(|b: u8| b as libc::c_char)
        );
    }

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
