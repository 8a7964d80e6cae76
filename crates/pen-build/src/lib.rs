//! How images are made: the base image (mmdebstrap → kernel, boot initrd, squashfs root) on
//! the host, and profile images in builder VMs. This crate sits above the runtime
//! (`pen-vm`), because a profile build boots a VM; what an image *is* (manifests, ids,
//! status) lives below, in [`pen_core::image`].
//!
//! * [`ensure_base`] / [`base`]: the base image, built on first use; a change of the embedded
//!   `pen-init` only regenerates the initrd (from the modules kept in `images/modules/`).
//! * [`sources`]: the host's apt sources, which the base build uses (pen names no mirror).
//! * [`initrd`]: the newc initrd (pen-init + boot modules in dependency order).
//! * [`squashfs`]: the `tar2sqfs` packer shared by base and profile images and volumes, run
//!   in a [`confine`]ment of its own (it parses what a builder VM streams).
//! * [`volume`]: read-only volumes packed from a host directory or a tar stream.
//! * [`profile`]: profile images, built in a builder VM; [`build_ca`]: extra CAs for builds
//!   behind TLS-intercepting proxies.

pub mod base;
pub mod build_ca;
pub mod confine;
pub mod initrd;
pub mod profile;
pub mod sources;
mod squashfs;
pub mod volume;

use pen_core::fsutil::write_atomic;
use pen_core::image::{BaseImage, BaseManifest};
use pen_core::paths::PenHome;

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

/// The base image, built first if missing or damaged, its initrd refreshed if this pen
/// carries a different pen-init.
pub fn ensure_base(home: &PenHome) -> anyhow::Result<BaseImage> {
    base::sweep_if_idle(&home.images());
    match BaseImage::load(home) {
        Some(image) if image.manifest.pen_init_sha256 == pen_init_sha256() => Ok(image),
        Some(image) => base::refresh_initrd(home, image),
        None => build_base(home),
    }
}

/// Whether the base image's initrd carries this pen's pen-init (else it is refreshed on
/// the next start).
pub fn initrd_current(base: &BaseImage) -> bool {
    base.manifest.pen_init_sha256 == pen_init_sha256()
}

/// Writes `base.json` for the files now in place.
fn write_manifest(home: &PenHome, manifest: &BaseManifest) -> anyhow::Result<()> {
    let mut json = serde_json::to_vec_pretty(manifest)?;
    json.push(b'\n');
    write_atomic(&home.base_manifest(), &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_time_hash_is_the_embedded_binarys() {
        assert_eq!(pen_init_sha256(), pen_core::fsutil::sha256_hex(PEN_INIT));
    }
}
