//! For `pen doctor`: CA certificates the host trusts that VMs would not. Behind a
//! TLS-intercepting proxy the host trusts the proxy's CA through a certificate added
//! locally (`/usr/local/share/ca-certificates` on Debian and Ubuntu, the `anchors`
//! directories on Fedora and Arch); the base image's store is Debian's bundle, made in a
//! fresh root, so such a certificate is missing there unless it is also a public root.
//!
//! Local, with no network assumption: a probe of a registry would need one reachable and
//! would say nothing on a machine that is offline now. What it cannot know is whether HTTPS
//! goes through that CA today; the line says "if", and names the setting.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use pen_core::ca_certs::{self, fingerprint, split_pem, CaCerts, GUEST_BUNDLE};
use pen_core::image::BaseImage;

/// Where distributions keep the CA certificates an administrator added.
const LOCAL_ANCHORS: &[&str] = &[
    "/usr/local/share/ca-certificates",
    "/etc/pki/ca-trust/source/anchors",
    "/etc/ca-certificates/trust-source/anchors",
];

/// The doctor's line about extra CAs, as (ok, text); `None` when the host added none.
pub fn check(base: Option<&BaseImage>) -> Option<(bool, String)> {
    let (dir, extras) = LOCAL_ANCHORS
        .iter()
        .map(|d| (Path::new(*d), certs_in(Path::new(d))))
        .find(|(_, certs)| !certs.is_empty())?;
    // Certificates the base image already trusts need nothing.
    let image_store = base.and_then(image_store);
    let missing: Vec<&(PathBuf, String)> = extras
        .iter()
        .filter(|(_, pem)| {
            image_store
                .as_ref()
                .is_none_or(|s| !s.contains(&fingerprint(pem)))
        })
        .collect();
    if missing.is_empty() {
        return None;
    }
    let names: Vec<String> = missing
        .iter()
        .map(|(file, _)| file.display().to_string())
        .collect();
    let lacks = if image_store.is_some() {
        "the base image's store lacks"
    } else {
        "VMs and builds do not trust"
    };
    match CaCerts::from_env(ca_certs::ENV) {
        Err(e) => Some((false, e.to_string())),
        Ok(Some(given)) => {
            let given: HashSet<String> = given.certs.iter().map(|c| fingerprint(c)).collect();
            let uncovered: Vec<&String> = missing
                .iter()
                .zip(&names)
                .filter(|((_, pem), _)| !given.contains(&fingerprint(pem)))
                .map(|(_, name)| name)
                .collect();
            Some(if uncovered.is_empty() {
                (
                    true,
                    format!(
                        "{}={}: VMs and builds trust the host's extra CAs",
                        ca_certs::ENV,
                        std::env::var(ca_certs::ENV).unwrap_or_default()
                    ),
                )
            } else {
                (
                    false,
                    format!(
                        "{} leaves out {} that the host trusts; point it at {}",
                        ca_certs::ENV,
                        list(&uncovered),
                        dir.display()
                    ),
                )
            })
        }
        Ok(None) => Some((
            false,
            format!(
                "the host trusts {} CA certificate(s) it added ({}) that {lacks}: if HTTPS here goes through a TLS-intercepting proxy, VMs cannot reach registries; set {}={} (VMs and builds) or give VMs --ca-certs {}",
                missing.len(),
                list(&names.iter().collect::<Vec<_>>()),
                ca_certs::ENV,
                dir.display(),
                dir.display()
            ),
        )),
    }
}

/// `a, b` or `a, b and 3 more`.
fn list(names: &[&String]) -> String {
    let shown: Vec<&str> = names.iter().take(3).map(|s| s.as_str()).collect();
    match names.len() {
        n if n > 3 => format!("{} and {} more", shown.join(", "), n - 3),
        _ => shown.join(", "),
    }
}

/// Each certificate of the `*.crt`/`*.pem` files under `dir` (one level of
/// subdirectories too, as `update-ca-certificates` reads them), with its file.
fn certs_in(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    let mut dirs = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for path in entries.flatten().map(|e| e.path()) {
            if path.is_dir() && depth == 0 {
                dirs.push((path, 1));
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("crt" | "pem")
            ) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
        .into_iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            split_pem(&text).into_iter().map(move |c| (f.clone(), c))
        })
        .collect()
}

/// The fingerprints of the base image's CA bundle, read out of its squashfs with
/// `rdsquashfs` (squashfs-tools-ng, which pen needs anyway); `None` when it cannot be read.
fn image_store(base: &BaseImage) -> Option<HashSet<String>> {
    let out = Command::new("rdsquashfs")
        .arg("-c")
        .arg(GUEST_BUNDLE)
        .arg(&base.rootfs)
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(split_pem(&text).iter().map(|c| fingerprint(c)).collect())
}
