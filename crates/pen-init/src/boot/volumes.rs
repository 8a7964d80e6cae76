//! The VM's read-only volumes. Their disks were probed before the snapshot point, against
//! the host's placeholders ([`super::disks::volume_disks`]); by the time the guest reads
//! its configuration the host has put the volume files behind them. What is left is
//! mounting, on a thread of its own so that it overlaps the overlay disk's setup instead
//! of adding to it (under TCG a restored guest runs every code path for the first time).
//! The thread and the boot meet twice:
//!
//! 1. before the switch of roots, the boot waits until every volume is mounted at a staging
//!    directory under `/run` (which the switch moves into the merged root, mounts and all);
//! 2. after the switch (threads share the root: the thread now sees the merged root), the
//!    thread makes each mount point and moves the staged mount there; the boot waits for
//!    that before `Ready`.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};

use pen_proto::GuestVolume;

use super::{system, BootError};

/// Where each slot's volume is mounted until the switch of roots (`/run` moves along).
const STAGING: &str = "/run/pen/volumes";

/// `BLKFLSBUF`: drop a block device's cached blocks.
const BLKFLSBUF: libc::c_ulong = 0x1261;

/// The running volume thread.
pub struct Volumes {
    staged: Receiver<Result<(), BootError>>,
    switched: Sender<()>,
    mounted: Receiver<Result<(), BootError>>,
}

/// Mounts `volumes` (each slot must have a disk in `disks`, from
/// [`super::disks::volume_disks`]) on a new thread, which drops `on_staged` once they are
/// mounted at their staging directories (its receiver then wakes up). `None` when the VM
/// mounts no volume (`on_staged` is dropped at once).
pub fn start(
    volumes: &[GuestVolume],
    disks: &[Option<PathBuf>],
    on_staged: Sender<()>,
) -> Result<Option<Volumes>, BootError> {
    if volumes.is_empty() {
        return Ok(None);
    }
    let devs = volumes
        .iter()
        .map(|volume| {
            let slot = usize::from(volume.slot);
            disks.get(slot).cloned().flatten().ok_or_else(|| {
                BootError::new(
                    "volumes",
                    format!("no volume disk in slot {slot} (for {})", volume.path),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let volumes = volumes.to_vec();
    let (staged_tx, staged) = channel();
    let (switched, switched_rx) = channel();
    let (mounted_tx, mounted) = channel();
    std::thread::Builder::new()
        .name("volumes".into())
        .spawn(move || {
            let t = std::time::Instant::now();
            let result = volumes
                .iter()
                .zip(&devs)
                .try_for_each(|(v, dev)| stage(dev, &staging_dir(v)));
            crate::console::debug(&format!(
                "{} volume(s) mounted at their staging directories in {} ms",
                volumes.len(),
                t.elapsed().as_millis()
            ));
            drop(on_staged);
            let failed = result.is_err();
            let _ = staged_tx.send(result);
            if failed || switched_rx.recv().is_err() {
                return;
            }
            let result = volumes
                .iter()
                .try_for_each(|v| system::move_volume(&staging_dir(v), &v.path));
            let _ = mounted_tx.send(result);
        })
        .map_err(|e| BootError::new("volumes", format!("thread: {e}")))?;
    Ok(Some(Volumes {
        staged,
        switched,
        mounted,
    }))
}

fn staging_dir(volume: &GuestVolume) -> String {
    format!("{STAGING}/{}", volume.slot)
}

/// Drops what the guest cached of the disk while the placeholder was behind it (the
/// kernel's partition scan before the snapshot point read its first blocks), then mounts
/// the squashfs at `dir`.
fn stage(dev: &Path, dir: &str) -> Result<(), BootError> {
    let disk = std::fs::File::open(dev)
        .map_err(|e| BootError::new("volumes", format!("open {}: {e}", dev.display())))?;
    // SAFETY: BLKFLSBUF takes no argument; `disk` is an open block device.
    if unsafe { libc::ioctl(disk.as_raw_fd(), BLKFLSBUF) } != 0 {
        return Err(BootError::new(
            "volumes",
            format!(
                "flushing {}'s cache: {}",
                dev.display(),
                std::io::Error::last_os_error()
            ),
        ));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| BootError::new("volumes", format!("mkdir {dir}: {e}")))?;
    system::mount_volume(dev, dir)
}

fn gone() -> BootError {
    BootError::new("volumes", "the volume thread ended early")
}

impl Volumes {
    /// Meeting 1: every volume is mounted at its staging directory (before the switch of
    /// roots, which moves `/run`).
    pub fn wait_for_staged(&self) -> Result<(), BootError> {
        self.staged.recv().map_err(|_| gone())?
    }

    /// The switch of roots is done: move the mounts to their paths.
    pub fn root_switched(&self) {
        let _ = self.switched.send(());
    }

    /// Meeting 2: every volume is at its path (before `Ready`).
    pub fn wait_for_mounts(self) -> Result<(), BootError> {
        self.mounted.recv().map_err(|_| gone())?
    }
}
