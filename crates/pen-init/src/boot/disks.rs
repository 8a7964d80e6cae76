//! Finding devices by role: block devices by their virtio serial or PCI function, the agent
//! port by name.
//! Devices appear asynchronously after their driver module loads, so lookups poll.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long to wait for a device to show up after its driver loaded.
pub const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(2);

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim_end_matches(['\n', '\0', ' ']).to_string())
}

/// The name (`vda`, ...) of the block device under `sys_block` (normally `/sys/block`) whose
/// `serial` file equals `serial`, skipping the devices in `others` and adding to it those
/// found to have another serial. Polling with one such set reads each device's serial
/// once: reading a virtio disk's `serial` is a request to the device, and the root disk
/// would otherwise be asked at every poll while the boot waits for the overlay disk.
pub fn find_block_by_serial(
    sys_block: &Path,
    serial: &str,
    others: &mut HashSet<String>,
) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(sys_block)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !others.contains(name))
        .collect();
    names.sort();
    names.into_iter().find(|name| {
        match read_trimmed(&sys_block.join(name).join("serial")) {
            Some(s) if s == serial => true,
            // Not readable (yet): ask again next time.
            None => false,
            Some(_) => {
                others.insert(name.clone());
                false
            }
        }
    })
}

/// The device name (`vport1p1`, ...) of the virtio-serial port under `sys_ports` (normally
/// `/sys/class/virtio-ports`) whose `name` equals `port_name`.
pub fn find_port_by_name(sys_ports: &Path, port_name: &str) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(sys_ports)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .into_iter()
        .find(|name| read_trimmed(&sys_ports.join(name).join("name")).as_deref() == Some(port_name))
}

/// Polls `probe` until it yields a value or `timeout` passes.
pub fn poll_for<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Waits for the block device with `serial` and its `/dev` node; returns the node's path.
/// Devices named in `known` (found already, by other means) are not asked for their serial.
///
/// The node must also open: a disk probed after boot (the overlay disk, or a hot-plugged
/// one) shows up in sysfs and `/dev` a moment before the kernel finishes registering it,
/// and opening it in that window fails with ENXIO.
pub fn wait_for_disk(serial: &str, known: &HashSet<String>) -> Result<PathBuf, String> {
    let mut others = known.clone();
    poll_for(DEVICE_TIMEOUT, || {
        let name = find_block_by_serial(Path::new("/sys/block"), serial, &mut others)?;
        let dev = PathBuf::from("/dev").join(name);
        std::fs::File::open(&dev).ok().map(|_| dev)
    })
    .ok_or_else(|| {
        format!(
            "no disk with serial {serial:?} appeared within {}s",
            DEVICE_TIMEOUT.as_secs()
        )
    })
}

/// The block device (`vdb`, ...) of the virtio disk at PCI function `address` under
/// `sys_pci` (normally `/sys/bus/pci`): `devices/ADDRESS/virtioN/block/NAME`. Read from
/// sysfs alone: unlike reading a disk's `serial`, this sends the device no request.
pub fn block_at_pci(sys_pci: &Path, address: &str) -> Option<String> {
    std::fs::read_dir(sys_pci.join("devices").join(address))
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("virtio"))
        .find_map(|e| {
            std::fs::read_dir(e.path().join("block"))
                .ok()?
                .flatten()
                .next()
        })
        .map(|b| b.file_name().to_string_lossy().into_owned())
}

/// Before the snapshot point, once `virtio_blk` is loaded: the `/dev` node of each volume
/// slot's disk ([`pen_proto::volume_pci_address`]), `None` where the host put no device.
/// The disks are probed now, against the host's placeholders, so that a restored guest
/// only has to mount them (see `boot::volumes`).
pub fn volume_disks(sys_pci: &Path) -> Result<Vec<Option<PathBuf>>, String> {
    (0..pen_proto::VOLUME_SLOTS)
        .map(|slot| {
            let address = pen_proto::volume_pci_address(slot);
            if !sys_pci.join("devices").join(&address).exists() {
                return Ok(None);
            }
            poll_for(DEVICE_TIMEOUT, || {
                let dev = PathBuf::from("/dev").join(block_at_pci(sys_pci, &address)?);
                dev.exists().then_some(dev)
            })
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "volume slot {slot} ({address}) has no disk after {}s",
                    DEVICE_TIMEOUT.as_secs()
                )
            })
        })
        .collect()
}

/// The driver the overlay disk's PCI function is held for until the configuration arrives.
const VIRTIO_PCI_DRIVER: &str = "virtio-pci";
/// A `driver_override` no driver matches.
const NO_DRIVER: &str = "pen-none";

/// Before `virtio_pci` loads: keeps the overlay disk's PCI function (at
/// [`pen_proto::overlay_disk_pci_address`]) without a driver, so that stage 1 never probes
/// it and the snapshot point holds nothing of this VM's disk. Returns whether the disk is
/// held (false: the host put no device there, as in the benchmark's floor, and the disk
/// binds as it appears).
pub fn hold_overlay_disk(sys_pci: &Path) -> Result<bool, String> {
    hold_pci_function(
        sys_pci,
        &pen_proto::overlay_disk_pci_address(),
        "the overlay disk",
    )
}

/// Sets `driver_override` of the PCI function at `address` to a name no driver has.
fn hold_pci_function(sys_pci: &Path, address: &str, what: &str) -> Result<bool, String> {
    let dev = sys_pci.join("devices").join(address);
    if !dev.exists() {
        return Ok(false);
    }
    if dev.join("driver").exists() {
        return Err(format!(
            "{what} ({}) has a driver before stage 1 loaded one (virtio_pci built into the kernel?)",
            dev.display()
        ));
    }
    std::fs::write(dev.join("driver_override"), NO_DRIVER)
        .map_err(|e| format!("holding {what}: {}: {e}", dev.display()))?;
    Ok(true)
}

/// After the configuration arrived: binds the held overlay disk to `virtio-pci`, which
/// probes it (virtio-blk then reads this VM's disk).
pub fn release_overlay_disk(sys_pci: &Path) -> Result<(), String> {
    release_pci_function(
        sys_pci,
        &pen_proto::overlay_disk_pci_address(),
        "the overlay disk",
    )
}

fn release_pci_function(sys_pci: &Path, address: &str, what: &str) -> Result<(), String> {
    let dev = sys_pci.join("devices").join(address);
    std::fs::write(dev.join("driver_override"), VIRTIO_PCI_DRIVER)
        .and_then(|()| {
            std::fs::write(
                sys_pci.join("drivers").join(VIRTIO_PCI_DRIVER).join("bind"),
                address,
            )
        })
        .map_err(|e| format!("binding {what} ({address}) to {VIRTIO_PCI_DRIVER}: {e}"))
}

/// Waits for the virtio-serial port named `port_name` and its `/dev` node.
pub fn wait_for_port(port_name: &str) -> Result<PathBuf, String> {
    poll_for(DEVICE_TIMEOUT, || {
        let name = find_port_by_name(Path::new("/sys/class/virtio-ports"), port_name)?;
        let dev = PathBuf::from("/dev").join(name);
        dev.exists().then_some(dev)
    })
    .ok_or_else(|| {
        format!(
            "no virtio-serial port {port_name:?} appeared within {}s",
            DEVICE_TIMEOUT.as_secs()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pen-init-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn finds_disk_by_serial() {
        let dir = tempdir("serial");
        for (name, serial) in [
            ("vda", "pen-root\n"),
            ("vdb", "pen-overlay\n"),
            ("loop0", ""),
        ] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            if !serial.is_empty() {
                std::fs::write(dir.join(name).join("serial"), serial).unwrap();
            }
        }
        assert_eq!(
            find_block_by_serial(&dir, "pen-overlay", &mut HashSet::new()).as_deref(),
            Some("vdb")
        );
        assert_eq!(
            find_block_by_serial(&dir, "pen-root", &mut HashSet::new()).as_deref(),
            Some("vda")
        );
        assert_eq!(find_block_by_serial(&dir, "pen", &mut HashSet::new()), None);
        let mut others = HashSet::new();
        assert_eq!(
            find_block_by_serial(&dir, "pen-overlay", &mut others).as_deref(),
            Some("vdb")
        );
        // vda has another serial; loop0 none (not remembered: it may not be readable yet).
        assert_eq!(others, HashSet::from(["vda".to_string()]));
        std::fs::write(dir.join("vda").join("serial"), "pen-overlay\n").unwrap();
        assert_eq!(
            find_block_by_serial(&dir, "pen-overlay", &mut others).as_deref(),
            Some("vdb")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finds_port_by_name() {
        let dir = tempdir("ports");
        for (name, port) in [("vport0p0", ""), ("vport1p1", "org.pen.agent\n")] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("name"), port).unwrap();
        }
        assert_eq!(
            find_port_by_name(&dir, "org.pen.agent").as_deref(),
            Some("vport1p1")
        );
        assert_eq!(
            find_port_by_name(&dir.join("missing"), "org.pen.agent"),
            None
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_overlay_disk_is_held_then_bound_to_virtio_pci() {
        let sys = tempdir("pci");
        // No device in the slot: nothing to hold.
        assert_eq!(hold_overlay_disk(&sys), Ok(false));
        let dev = sys
            .join("devices")
            .join(pen_proto::overlay_disk_pci_address());
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::create_dir_all(sys.join("drivers/virtio-pci")).unwrap();
        assert_eq!(hold_overlay_disk(&sys), Ok(true));
        assert_eq!(
            std::fs::read_to_string(dev.join("driver_override")).unwrap(),
            "pen-none"
        );
        release_overlay_disk(&sys).unwrap();
        assert_eq!(
            std::fs::read_to_string(dev.join("driver_override")).unwrap(),
            "virtio-pci"
        );
        assert_eq!(
            std::fs::read_to_string(sys.join("drivers/virtio-pci/bind")).unwrap(),
            "0000:00:10.0"
        );
        // Already bound before stage 1 could hold it: refused, the snapshot would keep it.
        std::fs::create_dir_all(dev.join("driver")).unwrap();
        assert!(hold_overlay_disk(&sys)
            .unwrap_err()
            .contains("virtio_pci built into"));
        std::fs::remove_dir_all(&sys).unwrap();
    }

    #[test]
    fn finds_a_disk_by_its_pci_function() {
        let sys = tempdir("blockpci");
        let addr = pen_proto::volume_pci_address(2);
        let dev = sys.join("devices").join(&addr);
        std::fs::create_dir_all(dev.join("virtio7/block/vdd")).unwrap();
        std::fs::create_dir_all(dev.join("msi_irqs")).unwrap();
        assert_eq!(block_at_pci(&sys, &addr).as_deref(), Some("vdd"));
        // A function with no disk yet (or none at all).
        std::fs::create_dir_all(sys.join("devices/0000:00:12.0/virtio3")).unwrap();
        assert_eq!(block_at_pci(&sys, "0000:00:12.0"), None);
        assert_eq!(block_at_pci(&sys, "0000:00:1f.0"), None);
        // No device in any slot: nothing to wait for.
        assert_eq!(volume_disks(&tempdir("blockpci-empty")), Ok(vec![None; 8]));
        std::fs::remove_dir_all(&sys).unwrap();
    }

    #[test]
    fn poll_gives_up() {
        let start = Instant::now();
        assert_eq!(poll_for::<()>(Duration::from_millis(50), || None), None);
        assert!(start.elapsed() >= Duration::from_millis(50));
        let mut n = 0;
        assert_eq!(
            poll_for(Duration::from_secs(1), || {
                n += 1;
                (n == 3).then_some(n)
            }),
            Some(3)
        );
    }
}
