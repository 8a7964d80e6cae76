//! The overlay disk: created (sparse) for a new VM, checked for every later start.
//!
//! "New" versus "has had a disk" is told by a marker file written right after the disk was
//! created: a VM whose marker exists but whose disk is missing or shorter than recorded
//! has lost data, and booting it would silently give the user a blank VM. A 0-byte disk
//! without the marker is a crash between creating the file and sizing it: it never held
//! data, so it is sized like a new one.

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::Context;

use pen_core::fsutil::{sync_dir, write_atomic};
use pen_core::paths::VmPaths;

/// Marks that this VM's overlay disk has been created; see the module doc.
pub fn overlay_marker(paths: &VmPaths) -> PathBuf {
    paths.dir.join("overlay.created")
}

fn damaged(paths: &VmPaths, name: &str, what: String) -> anyhow::Error {
    anyhow::anyhow!(
        "overlay disk {} is {what}; the VM's data is gone or damaged: restore the file or `pen delete {name}`",
        paths.overlay().display()
    )
}

/// Fails when the VM had an overlay disk that is now missing or truncated. Changes
/// nothing: for checks before starting (the supervisor checks again under the lock).
pub fn check_overlay(paths: &VmPaths, name: &str, disk_size: u64) -> anyhow::Result<()> {
    match std::fs::metadata(paths.overlay()) {
        Ok(meta) if never_sized(paths, meta.len()) => Ok(()),
        Ok(meta) if meta.len() < disk_size => Err(damaged(
            paths,
            name,
            format!("truncated ({} bytes, expected {disk_size})", meta.len()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && overlay_marker(paths).exists() => {
            Err(damaged(paths, name, "missing".to_string()))
        }
        _ => Ok(()),
    }
}

/// An empty disk and no marker: created, then a crash before `set_len`. Never held data.
fn never_sized(paths: &VmPaths, len: u64) -> bool {
    len == 0 && !overlay_marker(paths).exists()
}

/// Creates the overlay of a new VM, or checks the existing one. `name` is for messages.
pub fn prepare_overlay(paths: &VmPaths, name: &str, disk_size: u64) -> anyhow::Result<()> {
    check_overlay(paths, name, disk_size)?;
    let disk = paths.overlay();
    let marker = overlay_marker(paths);
    match std::fs::metadata(&disk) {
        Ok(meta) if never_sized(paths, meta.len()) => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&disk)
                .with_context(|| format!("opening {}", disk.display()))?;
            size_new_disk(paths, &file, disk_size)
        }
        Ok(_) => {
            if !marker.exists() {
                // A crash between creating the disk and the marker: the disk is whole.
                write_atomic(&marker, b"")?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&disk)
                .with_context(|| format!("creating {}", disk.display()))?;
            size_new_disk(paths, &file, disk_size)
        }
        Err(e) => Err(e).with_context(|| format!("checking {}", disk.display())),
    }
}

/// Sizes a new (empty) disk, makes that durable, then writes the marker.
fn size_new_disk(paths: &VmPaths, file: &std::fs::File, disk_size: u64) -> anyhow::Result<()> {
    let disk = paths.overlay();
    pen_core::testpoint::pause("overlay created");
    // Sparse: the guest formats it on first boot; only what it writes takes space.
    file.set_len(disk_size)
        .and_then(|_| file.sync_all())
        .with_context(|| format!("sizing {}", disk.display()))?;
    sync_dir(&paths.dir);
    write_atomic(&overlay_marker(paths), b"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use pen_core::paths::PenHome;

    fn paths() -> (tempfile::TempDir, VmPaths) {
        let dir = tempfile::tempdir().unwrap();
        let home = PenHome::at(dir.path());
        let paths = VmPaths::new(&home, "dev");
        std::fs::create_dir_all(&paths.dir).unwrap();
        (dir, paths)
    }

    #[test]
    fn new_vm_gets_a_sparse_disk_and_later_starts_accept_it() {
        let (_d, p) = paths();
        check_overlay(&p, "dev", 1 << 30).unwrap();
        prepare_overlay(&p, "dev", 1 << 30).unwrap();
        assert_eq!(std::fs::metadata(p.overlay()).unwrap().len(), 1 << 30);
        assert!(pen_core::fsutil::disk_usage(&p.overlay()) < 1 << 20);
        assert!(overlay_marker(&p).exists());
        prepare_overlay(&p, "dev", 1 << 30).unwrap();
    }

    #[test]
    fn deleted_disk_is_refused() {
        let (_d, p) = paths();
        prepare_overlay(&p, "dev", 1 << 20).unwrap();
        std::fs::remove_file(p.overlay()).unwrap();
        let err = check_overlay(&p, "dev", 1 << 20).unwrap_err().to_string();
        assert!(err.contains("is missing"), "{err}");
        let err = prepare_overlay(&p, "dev", 1 << 20).unwrap_err().to_string();
        assert!(err.contains("is missing"), "{err}");
        assert!(err.contains("pen delete dev"), "{err}");
        assert!(!p.overlay().exists());
    }

    #[test]
    fn truncated_disk_is_refused() {
        let (_d, p) = paths();
        prepare_overlay(&p, "dev", 1 << 20).unwrap();
        std::fs::File::options()
            .write(true)
            .open(p.overlay())
            .unwrap()
            .set_len(4096)
            .unwrap();
        let err = prepare_overlay(&p, "dev", 1 << 20).unwrap_err().to_string();
        assert!(
            err.contains("truncated (4096 bytes, expected 1048576)"),
            "{err}"
        );
    }

    #[test]
    fn empty_disk_left_by_a_crash_before_sizing_is_a_new_disk() {
        let (_d, p) = paths();
        std::fs::File::create(p.overlay()).unwrap();
        check_overlay(&p, "dev", 1 << 20).unwrap();
        prepare_overlay(&p, "dev", 1 << 20).unwrap();
        assert_eq!(std::fs::metadata(p.overlay()).unwrap().len(), 1 << 20);
        assert!(overlay_marker(&p).exists());
        // Once the marker exists, an empty disk is data lost, as before.
        std::fs::File::create(p.overlay()).unwrap();
        let err = check_overlay(&p, "dev", 1 << 20).unwrap_err().to_string();
        assert!(err.contains("truncated (0 bytes"), "{err}");
    }

    #[test]
    fn disk_without_marker_is_adopted() {
        let (_d, p) = paths();
        std::fs::File::create(p.overlay())
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        prepare_overlay(&p, "dev", 1 << 20).unwrap();
        assert!(overlay_marker(&p).exists());
    }
}
