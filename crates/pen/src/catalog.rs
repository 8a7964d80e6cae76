//! What `pen image list` shows: the base image, snapshots and profile images side by side.
//! It reads all three layers (image data, the runtime's snapshots, the builder's pen-init),
//! which is why it lives in the binary and not in any one of them.

use pen_core::image::profile::{self as profile_image, ImageStatus};
use pen_core::image::BaseImage;
use pen_core::paths::PenHome;
use pen_core::profile;
use serde::Serialize;

/// One row of `pen image list`.
#[derive(Debug, Clone, Serialize)]
pub struct ImageRow {
    pub name: String,
    pub kind: String,
    pub size: u64,
    pub created_at: Option<u64>,
    pub status: String,
}

/// Every row: base image, snapshots, then profile images.
pub fn list(home: &PenHome) -> Vec<ImageRow> {
    let mut rows = Vec::new();
    match BaseImage::load(home) {
        Some(base) => {
            let size = [&base.kernel, &base.initrd, &base.rootfs]
                .iter()
                .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
                .sum();
            let status = if pen_build::initrd_current(&base) {
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
    for snap in pen_vm::snapshot::list(home) {
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
    rows.extend(profile_image_rows(home));
    rows
}

/// `pen image list` rows for profile images (built, stale or damaged ones; not missing).
fn profile_image_rows(home: &PenHome) -> Vec<ImageRow> {
    let base = BaseImage::load(home);
    let mut rows = Vec::new();
    for name in profile::list_names(home) {
        let Ok(loaded) = profile::load(home, &name) else {
            continue;
        };
        let rootfs = profile_image::rootfs_path(home, &name);
        let status = match &base {
            Some(base) => profile_image::status(home, &loaded, base),
            None => ImageStatus::Missing { damaged: false },
        };
        let (created_at, label) = match &status {
            ImageStatus::Missing { damaged: false } if !rootfs.exists() => continue,
            ImageStatus::Built(m) => (Some(m.created_at), "built".to_string()),
            ImageStatus::Stale(m) => (
                Some(m.created_at),
                "stale (rebuilt on next use)".to_string(),
            ),
            ImageStatus::Missing { .. } => (None, "damaged (rebuilt on next use)".to_string()),
        };
        rows.push(ImageRow {
            name: format!("profile/{name}"),
            kind: format!("{} packages", loaded.profile.packages.len()),
            size: std::fs::metadata(&rootfs).map(|m| m.len()).unwrap_or(0),
            created_at,
            status: label,
        });
    }
    rows
}
