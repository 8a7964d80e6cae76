//! What an image *is*: the base image (kernel, boot initrd, root squashfs) every VM boots
//! from, and profile images ([`profile`]). Data, identities and checks only: nothing here
//! starts a process. How images are made lives in `pen-build`, above the runtime.
//!
//! `images/base.json` is the base image's identity and is written last by the builder: a
//! build that dies half way leaves either the previous complete image or none, never a mix.

pub mod profile;

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fsutil::sha256_hex;
use crate::paths::PenHome;

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
    pub fn matches(&self, path: &Path) -> bool {
        std::fs::metadata(path).is_ok_and(|m| m.len() == self.size)
    }
}

pub fn image_id(kernel: &FileIdentity, initrd: &FileIdentity, rootfs: &FileIdentity) -> String {
    sha256_hex(format!("{}\n{}\n{}\n", kernel.sha256, initrd.sha256, rootfs.sha256).as_bytes())
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
}
