//! Watches the host file system under the VM's sparse overlay disk and tells the guest how
//! much it can still store there ([`pen_proto::Message::HostSpace`]; the guest side is
//! pen-init's `space`), so that a host disk that fills up shows in the guest as a full disk
//! (ENOSPC at `write`) instead of I/O errors that abort its ext4 journal and leave writers
//! hanging on pages that can never be written back.
//!
//! Nothing is sent while the host has room for everything the guest's disk could still
//! grow by; the guest is told once the host's free space comes within [`SLACK`] of that,
//! again whenever the figure moves by [`STEP`], and once more (`u64::MAX`) when the host
//! has room again.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Start telling the guest while the host's free space is less than this above what the
/// guest's disk could still grow by: room for the guest's dirty pages and pen-init's margin.
pub const SLACK: u64 = 1 << 30;
/// Below this much free space on the host, with the guest's disk able to grow further, the
/// guest's writes fail with ENOSPC (pen-init keeps a margin of 128 MiB plus its dirty pages):
/// the host disk is full as far as the VM is concerned, and the user is told.
pub const FULL_BELOW: u64 = 256 << 20;
/// A figure that moved less than this since the last one sent is not sent again.
pub const STEP: u64 = 16 << 20;

/// The host's side at one look: free bytes of the file system holding the overlay disk,
/// and how many more bytes the guest could make the (sparse) disk take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Look {
    pub host_free: u64,
    pub headroom: u64,
}

/// Looks at the overlay disk `overlay` of `disk_size` bytes.
pub fn look(overlay: &Path, disk_size: u64) -> std::io::Result<Look> {
    let dir = overlay.parent().unwrap_or(Path::new("."));
    let fs = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let host_free = (fs.blocks_available() as u64).saturating_mul(fs.fragment_size() as u64);
    let allocated = std::fs::metadata(overlay)?.blocks().saturating_mul(512);
    Ok(Look {
        host_free,
        headroom: disk_size.saturating_sub(allocated),
    })
}

impl Look {
    /// The guest can no longer write what its disk would still take.
    pub fn full(&self) -> bool {
        self.host_free < FULL_BELOW && self.headroom > self.host_free
    }
}

/// What to send the guest after `look`, given the figure sent last (`None`: nothing sent,
/// or the all-clear). Returns the figure to send, if any.
pub fn decide(look: Look, last: Option<u64>) -> Option<u64> {
    let tight = look.host_free < look.headroom.saturating_add(SLACK);
    match (tight, last) {
        (false, None) => None,
        (false, Some(_)) => Some(u64::MAX),
        (true, Some(sent)) if sent.abs_diff(look.host_free) < STEP => None,
        (true, _) => Some(look.host_free),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;
    const M: u64 = 1 << 20;

    #[test]
    fn the_guest_hears_only_when_the_host_could_fill_first() {
        let look = |host_free, headroom| Look {
            host_free,
            headroom,
        };
        // (host free, headroom, last sent) -> sent now
        let table = [
            // Plenty of room: nothing, ever.
            (50 * G, 10 * G, None, None),
            // The host could fill before the guest's disk does: tell it.
            (5 * G, 10 * G, None, Some(5 * G)),
            // Within the slack counts as tight too.
            (10 * G + SLACK / 2, 10 * G, None, Some(10 * G + SLACK / 2)),
            // A small move is not worth a frame; a step is.
            (5 * G - 8 * M, 10 * G, Some(5 * G), None),
            (5 * G - STEP, 10 * G, Some(5 * G), Some(5 * G - STEP)),
            // Room again (space freed, or the disk cannot grow that far any more): all clear.
            (50 * G, 10 * G, Some(5 * G), Some(u64::MAX)),
            (5 * G, G, Some(5 * G), Some(u64::MAX)),
        ];
        for (host_free, headroom, last, want) in table {
            assert_eq!(
                decide(look(host_free, headroom), last),
                want,
                "host free {host_free}, headroom {headroom}, last {last:?}"
            );
        }
    }

    #[test]
    fn a_look_at_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("overlay.img");
        let f = std::fs::File::create(&disk).unwrap();
        f.set_len(4 * G).unwrap();
        let l = look(&disk, 4 * G).unwrap();
        assert!(
            l.headroom > 4 * G - M,
            "a sparse file takes nothing yet: {l:?}"
        );
        assert!(l.host_free > 0);
    }
}
