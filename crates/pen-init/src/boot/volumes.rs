//! The VM's read-only volumes, on a thread of their own so that binding, probing and
//! mounting them overlaps the overlay disk's setup and stage 2 instead of adding to them
//! (under TCG, right after a snapshot restore, each virtio-blk probe translates the probe
//! code again). The thread and the boot meet twice:
//!
//! 1. before the switch of roots, the boot waits until every volume disk has its `/dev`
//!    node: the thread is then done with `/sys` and `/dev`, which the switch moves;
//! 2. after the switch (threads share the root: the thread now sees the merged root), the
//!    thread makes each mount point and mounts the squashfs read-only; the boot waits for
//!    that before `Ready`.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};

use pen_proto::GuestVolume;

use super::{disks, system, BootError};

/// The running volume thread.
pub struct Volumes {
    devices: Receiver<Result<(), BootError>>,
    switched: Sender<()>,
    mounted: Receiver<Result<(), BootError>>,
}

/// Binds the slots of `volumes` (each must be one of the `held` slots) and finds their
/// disks, on a new thread. `None` when the VM mounts no volume.
pub fn start(
    sys_pci: &'static str,
    volumes: &[GuestVolume],
    held: &[bool],
) -> Result<Option<Volumes>, BootError> {
    if volumes.is_empty() {
        return Ok(None);
    }
    for volume in volumes {
        let slot = usize::from(volume.slot);
        if !held.get(slot).copied().unwrap_or(false) {
            return Err(BootError::new(
                "volumes",
                format!("no volume disk in slot {slot} (for {})", volume.path),
            ));
        }
    }
    let volumes = volumes.to_vec();
    let (devices_tx, devices) = channel();
    let (switched, switched_rx) = channel();
    let (mounted_tx, mounted) = channel();
    std::thread::Builder::new()
        .name("volumes".into())
        .spawn(move || {
            let t = std::time::Instant::now();
            let found = find_disks(Path::new(sys_pci), &volumes);
            crate::console::debug(&format!(
                "volume disks bound and found in {} ms",
                t.elapsed().as_millis()
            ));
            let devs = match found {
                Ok(devs) => {
                    let _ = devices_tx.send(Ok(()));
                    devs
                }
                Err(e) => {
                    let _ = devices_tx.send(Err(e));
                    return;
                }
            };
            if switched_rx.recv().is_err() {
                return;
            }
            let result = volumes
                .iter()
                .zip(&devs)
                .try_for_each(|(v, dev)| system::mount_volume(dev, &v.path));
            crate::console::debug(&format!(
                "volumes mounted {} ms after the thread started",
                t.elapsed().as_millis()
            ));
            let _ = mounted_tx.send(result);
        })
        .map_err(|e| BootError::new("volumes", format!("thread: {e}")))?;
    Ok(Some(Volumes {
        devices,
        switched,
        mounted,
    }))
}

/// Binds each volume's slot to its driver, then waits for each disk's `/dev` node.
fn find_disks(sys_pci: &Path, volumes: &[GuestVolume]) -> Result<Vec<PathBuf>, BootError> {
    let t = std::time::Instant::now();
    for volume in volumes {
        disks::release_volume_slot(sys_pci, usize::from(volume.slot))
            .map_err(|e| BootError::new("volumes", e))?;
    }
    crate::console::debug(&format!(
        "{} volume disk(s) bound in {} ms",
        volumes.len(),
        t.elapsed().as_millis()
    ));
    let serials: Vec<String> = volumes
        .iter()
        .map(|v| pen_proto::volume_disk_serial(usize::from(v.slot)))
        .collect();
    disks::wait_for_disks(&serials).map_err(|e| BootError::new("volumes", e))
}

fn gone() -> BootError {
    BootError::new("volumes", "the volume thread ended early")
}

impl Volumes {
    /// Meeting 1: every volume disk is there (before the switch of roots).
    pub fn wait_for_disks(&self) -> Result<(), BootError> {
        self.devices.recv().map_err(|_| gone())?
    }

    /// The switch of roots is done: mount.
    pub fn root_switched(&self) {
        let _ = self.switched.send(());
    }

    /// Meeting 2: every volume is mounted (before `Ready`).
    pub fn wait_for_mounts(self) -> Result<(), BootError> {
        self.mounted.recv().map_err(|_| gone())?
    }
}
