//! Images: the base image (kernel, boot initrd, root squashfs) every VM boots from.
//!
//! `images/base.json` is the base image's identity and is written last: a build that dies
//! half way leaves either the previous complete image or none, never a mix. A change of the
//! embedded `pen-init` only regenerates the initrd (from the modules kept in
//! `images/modules/`), not the whole root.

mod base;
pub mod build_ca;
pub mod initrd;
pub mod profile_image;
pub mod sources;
mod squashfs;

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fsutil::write_atomic;
use crate::paths::PenHome;

pub use base::build_base;

/// The guest agent binary, built static by `build.rs`.
pub static PEN_INIT: &[u8] = include_bytes!(env!("PEN_INIT_PATH"));

/// sha256 of [`PEN_INIT`], computed by `build.rs`.
pub fn pen_init_sha256() -> String {
    env!("PEN_INIT_SHA256").to_string()
}

/// Packages installed into the base image on top of Debian's minbase variant.
pub const BASE_PACKAGES: &[&str] = &[
    "linux-image-cloud-amd64",
    "e2fsprogs",
    "iproute2",
    "ca-certificates",
    "netbase",
    "procps",
    "less",
    "bash-completion",
];

/// `images/base.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseManifest {
    /// sha256 over the three files' hashes: what snapshots and profile images key on.
    pub image_id: String,
    pub suite: String,
    pub kernel_version: String,
    pub kernel: FileIdentity,
    pub initrd: FileIdentity,
    pub rootfs: FileIdentity,
    pub pen_init_sha256: String,
    pub packages: Vec<String>,
    pub pen_version: String,
    pub created_at: u64,
}

impl BaseManifest {
    /// Identity of the kernel and the root image, without the initrd: what profile images
    /// are built from. The initrd holds pen-init, which changes with every pen release and
    /// never reaches a profile image's root; keying on it would rebuild every profile image
    /// at each upgrade. (The kernel's modules live in the root image; the two are built
    /// together.)
    pub fn root_id(&self) -> String {
        sha256_hex(format!("{}\n{}\n", self.kernel.sha256, self.rootfs.sha256).as_bytes())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub sha256: String,
    pub size: u64,
}

impl FileIdentity {
    pub fn of(path: &Path) -> anyhow::Result<FileIdentity> {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut hasher = Sha256::new();
        let size = std::io::copy(&mut file, &mut hasher)?;
        Ok(FileIdentity {
            sha256: hex::encode(hasher.finalize()),
            size,
        })
    }

    /// Cheap check that the file on disk is still the one recorded (same size).
    fn matches(&self, path: &Path) -> bool {
        std::fs::metadata(path).is_ok_and(|m| m.len() == self.size)
    }
}

pub fn image_id(kernel: &FileIdentity, initrd: &FileIdentity, rootfs: &FileIdentity) -> String {
    sha256_hex(format!("{}\n{}\n{}\n", kernel.sha256, initrd.sha256, rootfs.sha256).as_bytes())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The files a VM boots from.
#[derive(Debug, Clone)]
pub struct BaseImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    pub manifest: BaseManifest,
}

impl BaseImage {
    /// The base image if it is complete and intact (sizes match `base.json`).
    pub fn load(home: &PenHome) -> Option<BaseImage> {
        let manifest: BaseManifest =
            serde_json::from_slice(&std::fs::read(home.base_manifest()).ok()?).ok()?;
        let image = BaseImage {
            kernel: home.kernel(),
            initrd: home.initrd(),
            rootfs: home.base_rootfs(),
            manifest,
        };
        let m = &image.manifest;
        (m.kernel.matches(&image.kernel)
            && m.initrd.matches(&image.initrd)
            && m.rootfs.matches(&image.rootfs))
        .then_some(image)
    }
}

/// The base image, built first if missing or damaged, its initrd refreshed if this pen
/// carries a different pen-init.
pub fn ensure_base(home: &PenHome) -> anyhow::Result<BaseImage> {
    match BaseImage::load(home) {
        Some(image) if image.manifest.pen_init_sha256 == pen_init_sha256() => Ok(image),
        Some(image) => base::refresh_initrd(home, image),
        None => build_base(home),
    }
}

/// Writes `base.json` for the files now in place.
fn write_manifest(home: &PenHome, manifest: &BaseManifest) -> anyhow::Result<()> {
    let mut json = serde_json::to_vec_pretty(manifest)?;
    json.push(b'\n');
    write_atomic(&home.base_manifest(), &json)
}

/// One row of `pen image list`.
#[derive(Debug, Clone, Serialize)]
pub struct ImageRow {
    pub name: String,
    pub kind: String,
    pub size: u64,
    pub created_at: Option<u64>,
    pub status: String,
}

pub fn list(home: &PenHome) -> Vec<ImageRow> {
    let mut rows = Vec::new();
    match BaseImage::load(home) {
        Some(base) => {
            let size = [&base.kernel, &base.initrd, &base.rootfs]
                .iter()
                .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
                .sum();
            let status = if base.manifest.pen_init_sha256 == pen_init_sha256() {
                "ready".to_string()
            } else {
                "initrd outdated (refreshed on next start)".to_string()
            };
            rows.push(ImageRow {
                name: "base".into(),
                kind: format!(
                    "debian {} / kernel {}",
                    base.manifest.suite, base.manifest.kernel_version
                ),
                size,
                created_at: Some(base.manifest.created_at),
                status,
            });
        }
        None => rows.push(ImageRow {
            name: "base".into(),
            kind: "-".into(),
            size: 0,
            created_at: None,
            status: "missing (built on first use, or `pen image build --base`)".into(),
        }),
    }
    for snap in crate::snapshot::list(home) {
        rows.push(ImageRow {
            name: format!("snap-{}", &snap.key[..snap.key.len().min(11)]),
            kind: format!("snapshot: {}", snap.describe),
            size: snap.size,
            created_at: snap.created_at,
            status: match snap.stale {
                None => "ready".into(),
                Some(why) => format!("stale: {why} (`pen image prune` removes it)"),
            },
        });
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_id_ignores_the_initrd() {
        let id = |sha: &str| FileIdentity {
            sha256: sha.into(),
            size: 1,
        };
        let mut m = BaseManifest {
            image_id: String::new(),
            suite: "bookworm".into(),
            kernel_version: "6.1".into(),
            kernel: id("k"),
            initrd: id("i1"),
            rootfs: id("r"),
            pen_init_sha256: String::new(),
            packages: Vec::new(),
            pen_version: String::new(),
            created_at: 0,
        };
        let root = m.root_id();
        m.initrd = id("i2");
        assert_eq!(
            m.root_id(),
            root,
            "a new pen-init must not rebuild profile images"
        );
        m.rootfs = id("r2");
        assert_ne!(m.root_id(), root);
        m.rootfs = id("r");
        m.kernel = id("k2");
        assert_ne!(m.root_id(), root);
    }

    #[test]
    fn build_time_hash_is_the_embedded_binarys() {
        assert_eq!(pen_init_sha256(), sha256_hex(PEN_INIT));
    }
}
