//! Snapshots (SPEC "Snapshots"): guest state saved at the stage-1 point, so that one
//! snapshot starts every VM of the same image and machine shape without a kernel boot.
//!
//! `images/snapshots/<key>/` holds `snapshot.json` (the [`Manifest`]), `state` (QEMU's
//! device state: a migration stream of everything but guest RAM) and `ram` (the guest RAM's
//! non-zero pages, see [`ram`]). The key is the sha256 of the [`Identity`]: everything a
//! restore depends on. A directory whose manifest does not match, or whose files are
//! damaged, is never restored from: the VM boots cold and saves a fresh one in its place.
//!
//! Guest RAM is not in the migration stream (`x-ignore-shared`): pen owns the memfd that
//! backs it, copies its pages out when saving and into a fresh memfd when restoring. See
//! docs/design.md "Snapshots" for why this and not QEMU's own RAM transfer or a
//! copy-on-write mapping of the file.

pub mod ram;
mod store;

use std::path::Path;

use pen_core::paths::PenHome;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use ram::RamCheck;
pub use store::{
    find, list_in, prune_in, Committed, Lookup, Pending, Pruned, Snapshot, SnapshotDir, SnapshotRow,
};

/// Version of the directory layout and manifest. A change makes older snapshots stale.
pub const FORMAT: u32 = 1;

/// A file identified by what changes when it is replaced: path, size, modification time.
/// Used for the QEMU binary: cheaper than running `qemu --version` on every start, and it
/// changes with any reinstall, not only a new version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinaryIdentity {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
}

impl BinaryIdentity {
    pub fn of(path: &Path) -> std::io::Result<BinaryIdentity> {
        use std::os::unix::fs::MetadataExt;
        let canonical = std::fs::canonicalize(path)?;
        let meta = std::fs::metadata(&canonical)?;
        Ok(BinaryIdentity {
            path: canonical.to_string_lossy().into_owned(),
            size: meta.len(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        })
    }
}

/// Everything a restore depends on; its hash is the snapshot's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Identity of kernel + initrd + root image, from the caller (the base image's
    /// `image_id`, or a profile image's).
    pub image_id: String,
    pub qemu: BinaryIdentity,
    /// `tcg` or `kvm`.
    pub accel: String,
    /// QEMU `-cpu` model; for KVM (`host`) with a digest of the host CPU.
    pub cpu_model: String,
    pub machine: String,
    pub cpus: u32,
    pub memory_mb: u32,
    /// [`crate::qemu::DEVICE_LAYOUT_VERSION`]: devices present at the snapshot point.
    pub layout_version: u32,
    pub kernel_cmdline: String,
    pub pen_version: String,
}

impl Identity {
    /// sha256 (hex) of the identity's canonical JSON (fields in declaration order).
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("identities serialize");
        hex::encode(Sha256::digest(json))
    }

    /// Why a snapshot made for `self` cannot serve `now`, naming the first difference.
    pub fn mismatch(&self, now: &Identity) -> Option<String> {
        let short = |s: &str| s.chars().take(12).collect::<String>();
        let differs = |what: &str, then: String, now: String| {
            Some(format!("{what} differs (snapshot: {then}, now: {now})"))
        };
        if self.image_id != now.image_id {
            return differs("image", short(&self.image_id), short(&now.image_id));
        }
        if self.qemu != now.qemu {
            return Some(format!("QEMU changed ({})", now.qemu.path));
        }
        if self.pen_version != now.pen_version {
            return differs(
                "pen version",
                self.pen_version.clone(),
                now.pen_version.clone(),
            );
        }
        if self.accel != now.accel {
            return differs("accelerator", self.accel.clone(), now.accel.clone());
        }
        if self.cpu_model != now.cpu_model {
            return differs("CPU model", self.cpu_model.clone(), now.cpu_model.clone());
        }
        if self.machine != now.machine {
            return differs("machine type", self.machine.clone(), now.machine.clone());
        }
        if self.cpus != now.cpus {
            return differs("cpus", self.cpus.to_string(), now.cpus.to_string());
        }
        if self.memory_mb != now.memory_mb {
            return differs(
                "memory",
                format!("{} MB", self.memory_mb),
                format!("{} MB", now.memory_mb),
            );
        }
        if self.layout_version != now.layout_version {
            return differs(
                "device layout",
                self.layout_version.to_string(),
                now.layout_version.to_string(),
            );
        }
        if self.kernel_cmdline != now.kernel_cmdline {
            return Some("kernel command line differs".into());
        }
        None
    }
}

/// The files a snapshot's guest booted from. Not part of the key (the image id stands for
/// them) but checked on every restore, so that a root image rebuilt under the same id (its
/// squashfs metadata is cached in guest RAM) can never meet a stale snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFiles {
    pub kernel: BinaryIdentity,
    pub initrd: BinaryIdentity,
    pub rootfs: BinaryIdentity,
}

impl BootFiles {
    pub fn of(kernel: &Path, initrd: &Path, rootfs: &Path) -> std::io::Result<BootFiles> {
        Ok(BootFiles {
            kernel: BinaryIdentity::of(kernel)?,
            initrd: BinaryIdentity::of(initrd)?,
            rootfs: BinaryIdentity::of(rootfs)?,
        })
    }

    fn mismatch(&self, now: &BootFiles) -> Option<String> {
        for (what, then, now) in [
            ("kernel", &self.kernel, &now.kernel),
            ("initrd", &self.initrd, &now.initrd),
            ("root image", &self.rootfs, &now.rootfs),
        ] {
            if then != now {
                return Some(format!("the {what} file changed ({})", now.path));
            }
        }
        None
    }
}

/// `snapshot.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub key: String,
    pub identity: Identity,
    pub boot_files: BootFiles,
    /// QEMU's own version string (`query-version`), for people reading the file.
    pub qemu_version: String,
    /// Seconds since the epoch.
    pub created_at: u64,
    pub state: StateCheck,
    pub ram: RamCheck,
}

/// What the manifest records about the device state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCheck {
    pub size: u64,
    pub sha256: String,
}

impl StateCheck {
    pub fn of(bytes: &[u8]) -> StateCheck {
        StateCheck {
            size: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(bytes)),
        }
    }
}

impl Manifest {
    /// Why this manifest, found under `key`, cannot serve a VM of identity `now` booting
    /// from `files`.
    pub fn mismatch(&self, key: &str, now: &Identity, files: &BootFiles) -> Option<String> {
        if self.format != FORMAT {
            return Some(format!(
                "it has format {}, this pen writes {FORMAT}",
                self.format
            ));
        }
        if let Some(reason) = self.identity.mismatch(now) {
            return Some(reason);
        }
        if self.key != key || self.identity.key() != key {
            return Some("its manifest does not belong to its key".into());
        }
        self.boot_files.mismatch(files)
    }

    /// Parses `snapshot.json`; the error is a reason for a notice.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("snapshot.json is unreadable ({e})"))
    }
}

/// The image id (snapshot identity) of a profile image: the base image's kernel and
/// initrd with the profile's root image. A root image rebuilt in place keeps this id; the
/// snapshot's check of its boot files catches that.
pub fn profile_image_id(base_image_id: &str, rootfs: &Path) -> String {
    hex::encode(Sha256::digest(
        format!("{base_image_id}\n{}", rootfs.display()).as_bytes(),
    ))
}

/// The images that exist now, as (image id, name): the base and every built profile image.
pub fn current_images(home: &PenHome) -> Vec<(String, String)> {
    let Some(base) = pen_core::image::BaseImage::load(home) else {
        return Vec::new();
    };
    let mut images = vec![(base.manifest.image_id.clone(), "base".to_string())];
    if let Ok(entries) = std::fs::read_dir(home.profile_images()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let rootfs = pen_core::image::profile::rootfs_path(home, &name);
            if rootfs.is_file() {
                images.push((profile_image_id(&base.manifest.image_id, &rootfs), name));
            }
        }
    }
    images
}

/// One line of `pen image list` for a snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotSummary {
    pub key: String,
    pub size: u64,
    pub created_at: Option<u64>,
    /// e.g. "base, 2 cpus, 2048 MB, tcg".
    pub describe: String,
    /// Why `pen image prune` would remove it; `None`: current.
    pub stale: Option<String>,
}

/// Every snapshot of `home`, oldest first, with its size and whether it is stale.
pub fn list(home: &PenHome) -> Vec<SnapshotSummary> {
    let images = current_images(home);
    let ids: Vec<String> = images.iter().map(|(id, _)| id.clone()).collect();
    let qemu = current_qemu();
    list_in(&home.snapshots())
        .into_iter()
        .map(|row| {
            let (describe, stale) = match &row.manifest {
                None => ("-".to_string(), Some("unreadable manifest".to_string())),
                Some(m) => {
                    let i = &m.identity;
                    let image = images
                        .iter()
                        .find(|(id, _)| *id == i.image_id)
                        .map(|(_, name)| name.clone())
                        .unwrap_or_else(|| format!("image {}", short_key(&i.image_id)));
                    let cpus = if i.cpus == 1 { "cpu" } else { "cpus" };
                    (
                        format!(
                            "{image}, {} {cpus}, {} MB, {}",
                            i.cpus, i.memory_mb, i.accel
                        ),
                        store::stale_reason(m, &ids, qemu.as_ref()),
                    )
                }
            };
            SnapshotSummary {
                created_at: row.manifest.as_ref().map(|m| m.created_at),
                key: row.key,
                size: row.size,
                describe,
                stale,
            }
        })
        .collect()
}

/// Removes `home`'s stale snapshots (`pen image prune`): unreadable ones, those of another
/// format, pen version or QEMU binary, and those of images that no longer exist.
pub fn prune(home: &PenHome) -> Vec<Pruned> {
    let ids: Vec<String> = current_images(home).into_iter().map(|(id, _)| id).collect();
    prune_in(&home.snapshots(), &ids, current_qemu().as_ref())
}

fn current_qemu() -> Option<BinaryIdentity> {
    crate::qemu::binary()
        .ok()
        .and_then(|q| BinaryIdentity::of(&q).ok())
}

/// Short form of a key for messages.
pub fn short_key(key: &str) -> &str {
    &key[..key.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn identity() -> Identity {
        Identity {
            image_id: "51d98c4b93cea8dbeffb078580d596a7e77085fd6892ec65de1d008d336c18d0".into(),
            qemu: BinaryIdentity {
                path: "/usr/bin/qemu-system-x86_64".into(),
                size: 20_000_000,
                mtime_ns: 1_700_000_000_000_000_000,
            },
            accel: "tcg".into(),
            cpu_model: "max".into(),
            machine: "q35".into(),
            cpus: 1,
            memory_mb: 1024,
            layout_version: 1,
            kernel_cmdline: "console=ttyS0".into(),
            pen_version: "0.1.0".into(),
        }
    }

    pub(crate) fn files() -> BootFiles {
        let file = |name: &str| BinaryIdentity {
            path: format!("/h/images/{name}"),
            size: 1,
            mtime_ns: 2,
        };
        BootFiles {
            kernel: file("vmlinuz"),
            initrd: file("initrd"),
            rootfs: file("rootfs.sqfs"),
        }
    }

    pub(crate) fn manifest(identity: &Identity) -> Manifest {
        Manifest {
            format: FORMAT,
            key: identity.key(),
            identity: identity.clone(),
            boot_files: files(),
            qemu_version: "7.2.22".into(),
            created_at: 1,
            state: StateCheck::of(b"state"),
            ram: RamCheck {
                file_size: 40,
                data_pages: 0,
                xxh3: "0".into(),
            },
        }
    }

    #[test]
    fn key_is_stable_and_covers_every_field() {
        let base = identity();
        assert_eq!(base.key(), identity().key());
        assert_eq!(base.key().len(), 64);
        type Change = Box<dyn Fn(&mut Identity)>;
        let variants: Vec<Change> = vec![
            Box::new(|i| i.image_id.push('0')),
            Box::new(|i| i.qemu.mtime_ns += 1),
            Box::new(|i| i.qemu.size += 1),
            Box::new(|i| i.accel = "kvm".into()),
            Box::new(|i| i.cpu_model = "host".into()),
            Box::new(|i| i.machine = "pc".into()),
            Box::new(|i| i.cpus = 2),
            Box::new(|i| i.memory_mb = 2048),
            Box::new(|i| i.layout_version = 2),
            Box::new(|i| i.kernel_cmdline.push_str(" quiet")),
            Box::new(|i| i.pen_version = "0.2.0".into()),
        ];
        for change in variants {
            let mut other = identity();
            change(&mut other);
            assert_ne!(other.key(), base.key(), "{other:?}");
            assert!(base.mismatch(&other).is_some(), "{other:?}");
        }
        assert_eq!(base.mismatch(&identity()), None);
    }

    #[test]
    fn mismatch_reasons_name_the_difference() {
        let then = identity();
        let mut now = identity();
        now.memory_mb = 2048;
        assert_eq!(
            then.mismatch(&now).unwrap(),
            "memory differs (snapshot: 1024 MB, now: 2048 MB)"
        );
        let mut now = identity();
        now.pen_version = "0.2.0".into();
        assert_eq!(
            then.mismatch(&now).unwrap(),
            "pen version differs (snapshot: 0.1.0, now: 0.2.0)"
        );
        let mut now = identity();
        now.image_id = "ffffffffffffffffffff".into();
        assert_eq!(
            then.mismatch(&now).unwrap(),
            "image differs (snapshot: 51d98c4b93ce, now: ffffffffffff)"
        );
    }

    #[test]
    fn manifest_validation() {
        let id = identity();
        let m = manifest(&id);
        assert_eq!(m.mismatch(&id.key(), &id, &files()), None);

        // Filed under another key (a renamed directory).
        let reason = m.mismatch(&"0".repeat(64), &id, &files()).unwrap();
        assert!(reason.contains("does not belong"), "{reason}");

        // Edited identity: the difference is named.
        let mut edited = m.clone();
        edited.identity.qemu.size += 1;
        let reason = edited.mismatch(&id.key(), &id, &files()).unwrap();
        assert!(reason.starts_with("QEMU changed"), "{reason}");

        // Edited key field.
        let mut edited = m.clone();
        edited.key = "1".repeat(64);
        let reason = edited.mismatch(&id.key(), &id, &files()).unwrap();
        assert!(reason.contains("does not belong"), "{reason}");

        let mut old = m.clone();
        old.format = 0;
        assert!(old
            .mismatch(&id.key(), &id, &files())
            .unwrap()
            .contains("format 0"));

        // A rebuilt root image under the same image id.
        let mut rebuilt = files();
        rebuilt.rootfs.mtime_ns += 1;
        assert_eq!(
            m.mismatch(&id.key(), &id, &rebuilt).unwrap(),
            "the root image file changed (/h/images/rootfs.sqfs)"
        );

        let json = serde_json::to_vec(&m).unwrap();
        assert_eq!(Manifest::parse(&json).unwrap(), m);
        let err = Manifest::parse(&json[..json.len() / 2]).unwrap_err();
        assert!(err.starts_with("snapshot.json is unreadable"), "{err}");
    }
}
