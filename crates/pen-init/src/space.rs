//! Keeps what the guest may allocate on its overlay disk within what the host can still
//! store ([`pen_proto::Message::HostSpace`]).
//!
//! The overlay disk is a sparse file on the host. When the host's file system fills up
//! first, QEMU fails the guest's writes with I/O errors (`werror=report`): ext4 aborts its
//! journal, and delayed-allocation pages can then never be written back, so a writer that
//! is throttled on them (`balance_dirty_pages`) waits forever; neither a remount nor
//! `EXT4_IOC_SHUTDOWN` releases them (seen on the Debian 6.1 guest kernel). So the guest is
//! told the host's free space and raises ext4's `reserved_clusters` until the space its
//! processes may still take, plus its dirty pages and a margin, fits in it: a full host disk
//! then looks like a full disk in the guest (ENOSPC at `write`, as root too), and nothing
//! the guest already wrote is lost. When the host has room again the reservation returns to
//! ext4's own.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::OnceLock;

/// Room left on the host beyond what the guest may allocate: ext4's metadata and journal
/// blocks landing in holes of the sparse file, writes of other VMs between two updates.
const MARGIN: u64 = 128 << 20;

/// ext4's own reservation, read once before pen changes it.
static OWN_RESERVATION: OnceLock<u64> = OnceLock::new();

/// What to reserve so that the guest may allocate at most `allowed` blocks.
///
/// `free`: free blocks as ext4's statfs counts them (delayed allocations taken off);
/// `own`: ext4's own reservation; `total`: blocks of the file system.
pub fn reservation(free: u64, own: u64, allowed: u64, total: u64) -> u64 {
    free.saturating_sub(allowed)
        .max(own)
        .min(total.saturating_sub(1))
}

/// Blocks the guest may still allocate when the host has `host_free` bytes, with `dirty`
/// bytes not yet written back (they will take host space, and are already taken off ext4's
/// free count).
pub fn allowed_blocks(host_free: u64, dirty: u64, block: u64) -> u64 {
    host_free.saturating_sub(MARGIN).saturating_sub(dirty) / block.max(1)
}

/// Applies a `HostSpace` figure to the overlay file system mounted at `mount`.
pub fn apply(mount: &OwnedFd, host_free: u64) -> Result<(), String> {
    let fs = nix::sys::statfs::fstatfs(mount.as_fd()).map_err(|e| format!("statfs: {e}"))?;
    let block = fs.block_size() as u64;
    let file = sysfs_dir(mount)?.join("reserved_clusters");
    let read = || -> Result<u64, String> {
        std::fs::read_to_string(&file)
            .map_err(|e| format!("read {}: {e}", file.display()))?
            .trim()
            .parse()
            .map_err(|e| format!("{}: {e}", file.display()))
    };
    let own = match OWN_RESERVATION.get() {
        Some(&own) => own,
        None => *OWN_RESERVATION.get_or_init(|| read().unwrap_or(0)),
    };
    let allowed = if host_free == u64::MAX {
        u64::MAX
    } else {
        allowed_blocks(host_free, dirty_bytes(), block)
    };
    let value = reservation(fs.blocks_free(), own, allowed, fs.blocks());
    if read().ok() != Some(value) {
        std::fs::write(&file, value.to_string())
            .map_err(|e| format!("write {} to {}: {e}", value, file.display()))?;
    }
    Ok(())
}

/// `/sys/fs/ext4/<device>` of the file system mounted at `mount`.
fn sysfs_dir(mount: &OwnedFd) -> Result<PathBuf, String> {
    let st = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(mount))
        .map_err(|e| format!("stat: {e}"))?;
    let (major, minor) = (libc::major(st.st_dev), libc::minor(st.st_dev));
    let dev = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}"))
        .map_err(|e| format!("device {major}:{minor}: {e}"))?;
    let name = dev
        .file_name()
        .ok_or_else(|| format!("device {major}:{minor} has no name"))?;
    Ok(PathBuf::from("/sys/fs/ext4").join(name))
}

/// Dirty and writeback page cache, in bytes (`/proc/meminfo`).
fn dirty_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .filter(|l| l.starts_with("Dirty:") || l.starts_with("Writeback:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reservation_leaves_the_guest_what_the_host_can_store() {
        // 1000 free blocks, ext4 reserves 50 of its own, the host can take 300 more.
        assert_eq!(reservation(1000, 50, 300, 5000), 700);
        // The host has more room than the guest's disk: ext4's own reservation.
        assert_eq!(reservation(1000, 50, 10_000, 5000), 50);
        assert_eq!(reservation(1000, 50, u64::MAX, 5000), 50);
        // Nothing left on the host: every free block reserved, never the whole disk.
        assert_eq!(reservation(1000, 50, 0, 5000), 1000);
        assert_eq!(reservation(6000, 50, 0, 5000), 4999);
    }

    #[test]
    fn the_host_figure_pays_for_dirty_pages_and_the_margin_first() {
        let block = 4096;
        assert_eq!(allowed_blocks(MARGIN + 4096 * 10, 0, block), 10);
        assert_eq!(allowed_blocks(MARGIN + 4096 * 10, 4096 * 4, block), 6);
        assert_eq!(allowed_blocks(MARGIN / 2, 0, block), 0);
        assert_eq!(allowed_blocks(0, 1 << 30, block), 0);
    }
}
