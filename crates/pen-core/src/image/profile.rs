//! Profile images: a profile's packages and build script baked into a root squashfs (by a
//! builder VM, see `pen-build`).
//!
//! `images/profiles/<name>/`: `rootfs.sqfs`, `image.json` (identity), `build.log`, and
//! `build.hash` (the cache key) written last: a build that fails anywhere leaves the previous
//! image and its `build.hash` untouched.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{BaseImage, FileIdentity};
use crate::paths::PenHome;
use crate::profile::LoadedProfile;

/// `images/profiles/<name>/image.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileImageManifest {
    pub profile: String,
    pub cache_key: String,
    /// The base image's [`super::BaseManifest::root_id`] it was built from.
    #[serde(alias = "base_image_id")]
    pub base_root_id: String,
    pub rootfs: FileIdentity,
    pub packages: Vec<String>,
    pub created_at: u64,
}

/// The cache key of `profile`'s image on `base`: packages, build script, the base image's
/// kernel and root (not its initrd), builder version.
pub fn cache_key(profile: &LoadedProfile, base: &BaseImage) -> String {
    profile.profile.cache_key(&base.manifest.root_id())
}

/// Where a profile's image stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageStatus {
    /// Built from the profile as it is now.
    Built(ProfileImageManifest),
    /// Built, but the profile or the base image changed since (rebuilt on next use).
    Stale(ProfileImageManifest),
    /// Never built, or damaged (rebuilt on next use).
    Missing { damaged: bool },
}

impl ImageStatus {
    pub fn label(&self) -> &'static str {
        match self {
            ImageStatus::Built(_) => "built",
            ImageStatus::Stale(_) => "stale",
            ImageStatus::Missing { damaged: false } => "missing",
            ImageStatus::Missing { damaged: true } => "damaged",
        }
    }
}

pub fn rootfs_path(home: &PenHome, profile: &str) -> PathBuf {
    home.profile_image_dir(profile).join("rootfs.sqfs")
}

/// A squashfs file that is whole: magic `hsqs` and at least `bytes_used` bytes long.
pub fn squashfs_intact(path: &Path) -> bool {
    let mut header = [0u8; 48];
    let Ok(mut file) = File::open(path) else {
        return false;
    };
    if file.read_exact(&mut header).is_err() || &header[..4] != b"hsqs" {
        return false;
    }
    let bytes_used = u64::from_le_bytes(header[40..48].try_into().unwrap());
    file.metadata()
        .is_ok_and(|m| m.len() >= bytes_used && bytes_used > 0)
}

/// The state of `profile`'s image against the current base image.
pub fn status(home: &PenHome, profile: &LoadedProfile, base: &BaseImage) -> ImageStatus {
    let dir = home.profile_image_dir(&profile.name);
    let key = std::fs::read_to_string(dir.join("build.hash")).ok();
    let manifest: Option<ProfileImageManifest> = std::fs::read(dir.join("image.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let rootfs = rootfs_path(home, &profile.name);
    match (key, manifest) {
        (None, None) if !rootfs.exists() => ImageStatus::Missing { damaged: false },
        (Some(key), Some(manifest))
            if key.trim() == manifest.cache_key
                && manifest.rootfs.size
                    == std::fs::metadata(&rootfs).map(|m| m.len()).unwrap_or(0)
                && squashfs_intact(&rootfs) =>
        {
            if manifest.cache_key == cache_key(profile, base) {
                ImageStatus::Built(manifest)
            } else {
                ImageStatus::Stale(manifest)
            }
        }
        _ => ImageStatus::Missing { damaged: true },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squashfs_check_needs_magic_and_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sqfs");
        let mut header = vec![0u8; 4096];
        header[..4].copy_from_slice(b"hsqs");
        header[40..48].copy_from_slice(&4096u64.to_le_bytes());
        std::fs::write(&path, &header).unwrap();
        assert!(squashfs_intact(&path));
        std::fs::write(&path, &header[..2048]).unwrap();
        assert!(!squashfs_intact(&path), "truncated");
        header[0] = b'x';
        std::fs::write(&path, &header).unwrap();
        assert!(!squashfs_intact(&path), "bad magic");
    }
}
