//! Per-VM system settings applied from the host's configuration: clock, entropy, hostname,
//! machine-id, the workspace mount.

use std::io::Write;
use std::os::fd::AsRawFd;

use nix::mount::{mount, MsFlags};
use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};

use super::BootError;

pub const WORKSPACE: &str = "/workspace";

pub fn set_clock(secs: i64, nanos: u32) -> Result<(), BootError> {
    if secs <= 0 {
        // The host always sends its wall clock; 0 means "not provided" (e.g. tests).
        return Ok(());
    }
    let ts = TimeSpec::new(secs, i64::from(nanos.min(999_999_999)));
    clock_settime(ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| BootError::new("clock", format!("clock_settime: {e}")))
}

/// `struct rand_pool_info` header of the RNDADDENTROPY ioctl.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
}

/// _IOW('R', 0x03, int[2])
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// _IO('R', 0x07)
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes the host's random bytes into the pool and credits them, so that getrandom() does not
/// block and two VMs restored from one snapshot do not share random state.
pub fn add_entropy(bytes: &[u8]) -> Result<(), BootError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| BootError::new("entropy", format!("open /dev/urandom: {e}")))?;
    // Writing mixes without crediting; the ioctl below also credits.
    f.write_all(bytes)
        .map_err(|e| BootError::new("entropy", format!("write /dev/urandom: {e}")))?;
    let mut buf = Vec::with_capacity(std::mem::size_of::<RandPoolInfo>() + bytes.len() + 4);
    let info = RandPoolInfo {
        entropy_count: (bytes.len() * 8) as libc::c_int,
        buf_size: bytes.len() as libc::c_int,
    };
    buf.extend_from_slice(&info.entropy_count.to_ne_bytes());
    buf.extend_from_slice(&info.buf_size.to_ne_bytes());
    buf.extend_from_slice(bytes);
    buf.resize(buf.len().next_multiple_of(4), 0);
    // SAFETY: `buf` holds a rand_pool_info header followed by buf_size bytes, as the ioctl
    // expects; the kernel only reads it.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, buf.as_ptr()) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(BootError::new("entropy", format!("RNDADDENTROPY: {e}")));
    }
    // Crediting entropy does not reseed an initialised CRNG: without this, a VM restored
    // from a snapshot keeps generating from the snapshot's key until the kernel's periodic
    // reseed (up to a minute later, depending on uptime), so two VMs restored from one
    // snapshot could share random output.
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // ENODATA: the CRNG is not initialised yet; it will be seeded from the pool that
        // now holds our bytes.
        if e.raw_os_error() != Some(libc::ENODATA) {
            return Err(BootError::new("entropy", format!("RNDRESEEDCRNG: {e}")));
        }
    }
    Ok(())
}

/// The `/etc/hosts` content with exactly one `127.0.1.1 <hostname>` line and a localhost line.
pub fn hosts_file(existing: &str, hostname: &str) -> String {
    let mut out = String::new();
    let mut has_localhost = false;
    for line in existing.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("127.0.1.1") => continue,
            Some("127.0.0.1") if line.split_whitespace().any(|f| f == "localhost") => {
                has_localhost = true;
            }
            _ => {}
        }
        out.push_str(line);
        out.push('\n');
    }
    if !has_localhost {
        out.insert_str(0, "127.0.0.1\tlocalhost\n");
    }
    out.push_str(&format!("127.0.1.1\t{hostname}\n"));
    out
}

/// Writes `path` only when its content differs (keeps the overlay free of needless copies).
fn write_if_changed(path: &str, content: &str) -> std::io::Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(content) {
        return Ok(());
    }
    // A symlink (e.g. a resolv.conf managed elsewhere) is replaced by a plain file.
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(path)?;
    }
    std::fs::write(path, content)
}

pub fn set_hostname(name: &str) -> Result<(), BootError> {
    if name.is_empty() {
        return Ok(());
    }
    nix::unistd::sethostname(name)
        .map_err(|e| BootError::new("hostname", format!("sethostname: {e}")))?;
    write_if_changed("/etc/hostname", &format!("{name}\n"))
        .map_err(|e| BootError::new("hostname", format!("/etc/hostname: {e}")))?;
    let existing = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    write_if_changed("/etc/hosts", &hosts_file(&existing, name))
        .map_err(|e| BootError::new("hostname", format!("/etc/hosts: {e}")))
}

pub fn set_machine_id(id: &str) -> Result<(), BootError> {
    if id.is_empty() {
        return Ok(());
    }
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(BootError::new(
            "machine-id",
            "not 32 hexadecimal characters",
        ));
    }
    write_if_changed("/etc/machine-id", &format!("{}\n", id.to_ascii_lowercase()))
        .map_err(|e| BootError::new("machine-id", format!("/etc/machine-id: {e}")))
}

pub fn write_resolv_conf(nameserver: &str) -> Result<(), BootError> {
    write_if_changed("/etc/resolv.conf", &format!("nameserver {nameserver}\n"))
        .map_err(|e| BootError::new("network", format!("/etc/resolv.conf: {e}")))
}

/// Mounts the virtio-fs share `tag` at /workspace. The device may still be probing (or be
/// hot-plugged by the host right before it sent the config, as after a snapshot restore, since
/// vhost-user-fs cannot be migrated): an unknown tag is retried for the device timeout.
pub fn mount_workspace(tag: &str) -> Result<(), BootError> {
    use nix::errno::Errno;
    std::fs::create_dir_all(WORKSPACE)
        .map_err(|e| BootError::new("workspace", format!("mkdir {WORKSPACE}: {e}")))?;
    let attempt = || {
        mount(
            Some(tag),
            WORKSPACE,
            Some("virtiofs"),
            MsFlags::MS_NODEV,
            None::<&str>,
        )
    };
    let mut last = Errno::EINVAL;
    let mounted = super::disks::poll_for(super::disks::DEVICE_TIMEOUT, || match attempt() {
        Ok(()) => Some(Ok(())),
        // EINVAL: no virtio-fs device with this tag (yet).
        Err(e @ (Errno::EINVAL | Errno::ENODEV)) => {
            last = e;
            None
        }
        Err(e) => Some(Err(e)),
    });
    match mounted {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(BootError::new(
            "workspace",
            format!("mount virtiofs {tag:?}: {e}"),
        )),
        None => Err(BootError::new(
            "workspace",
            format!(
                "no virtio-fs device tagged {tag:?} within {}s ({last})",
                super::disks::DEVICE_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// Mounts the squashfs on block device `dev` read-only at `dir`: the root image and the
/// volumes alike.
pub fn mount_squashfs(dev: &std::path::Path, dir: &str) -> nix::Result<()> {
    mount(
        Some(dev),
        dir,
        Some("squashfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None::<&str>,
    )
}

/// Mounts the squashfs volume on block device `dev` read-only at `dir`.
pub fn mount_volume(dev: &std::path::Path, dir: &str) -> Result<(), BootError> {
    mount_squashfs(dev, dir).map_err(|e| {
        BootError::new(
            "volumes",
            format!("mount {} (squashfs) on {dir}: {e}", dev.display()),
        )
    })
}

/// Moves the volume mounted at `staged` to `path`, creating the mount point (on the overlay
/// root). `path` comes from the host, which checked it; an absolute path without `..` is
/// required here too, so a bad one fails the boot with its name.
pub fn move_volume(staged: &str, path: &str) -> Result<(), BootError> {
    if !volume_path_ok(path) {
        return Err(BootError::new(
            "volumes",
            format!("refusing mount point {path:?}: not an absolute path without '..'"),
        ));
    }
    std::fs::create_dir_all(path)
        .map_err(|e| BootError::new("volumes", format!("mkdir {path}: {e}")))?;
    mount(
        Some(staged),
        path,
        None::<&str>,
        MsFlags::MS_MOVE,
        None::<&str>,
    )
    .map_err(|e| BootError::new("volumes", format!("move {staged} to {path}: {e}")))?;
    let _ = std::fs::remove_dir(staged);
    Ok(())
}

fn volume_path_ok(path: &str) -> bool {
    path.starts_with('/') && path != "/" && !path.split('/').any(|c| c == "..")
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn volume_paths_from_the_host_are_checked_again() {
        assert!(volume_path_ok("/opt/models"));
        assert!(!volume_path_ok("opt/models"));
        assert!(!volume_path_ok("/"));
        assert!(!volume_path_ok("/opt/../etc"));
    }

    #[test]
    fn hosts_file_replaces_old_name() {
        let old = "127.0.0.1\tlocalhost\n127.0.1.1\told\n::1 localhost ip6-localhost\n";
        assert_eq!(
            hosts_file(old, "new"),
            "127.0.0.1\tlocalhost\n::1 localhost ip6-localhost\n127.0.1.1\tnew\n"
        );
    }

    #[test]
    fn hosts_file_adds_localhost() {
        assert_eq!(
            hosts_file("", "vm"),
            "127.0.0.1\tlocalhost\n127.0.1.1\tvm\n"
        );
    }
}
