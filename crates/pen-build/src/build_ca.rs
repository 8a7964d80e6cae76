//! Extra CA certificates trusted by builder VMs, for networks whose HTTPS goes through a
//! TLS-intercepting proxy (corporate networks, sandboxes). The base image trusts Debian's CA
//! bundle only, so `npm install` or `pip install` in a profile's `build` fails there with
//! `SELF_SIGNED_CERT_IN_CHAIN` or `certificate verify failed`.
//!
//! Trust is widened only when the user says so: `PEN_BUILD_CA_CERTS`, else `PEN_CA_CERTS`
//! (the setting VMs use: one variable serves both), else the profile's `ca_certs`, names a
//! PEM file or a directory of `*.crt`/`*.pem` files (read and checked by
//! [`pen_core::ca_certs`]). The certificates are appended to the builder's CA bundle before
//! `apt-get update`, and the bundle is put back as it was before the root is packed, so the
//! image is the same as one built without them and the cache key does not depend on them.
//! VMs booted from the image trust them only when they are given them at start. (Appending,
//! not `update-ca-certificates`: that rehashes every certificate, over a minute under TCG.)

use std::path::Path;

use pen_core::ca_certs::{self, CaCerts, GUEST_BUNDLE};
use pen_core::error::UsageError;

/// The environment variable naming the extra CA certificates for builds only.
pub const ENV: &str = "PEN_BUILD_CA_CERTS";

/// Where the builder keeps the bundle as it was (a tmpfs: never part of the image).
const GUEST_BUNDLE_SAVED: &str = "/run/pen-ca-bundle.orig";

/// Certificates to trust during one build, and the setting they came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraCaCerts {
    pub certs: CaCerts,
    /// `PEN_BUILD_CA_CERTS`, `PEN_CA_CERTS` or `profile NAME's ca_certs`, for the build log.
    pub setting: String,
}

impl ExtraCaCerts {
    /// The certificates for a build: `PEN_BUILD_CA_CERTS`, else `PEN_CA_CERTS`, else the
    /// profile's `ca_certs` (`profile_setting` = (its label, its path)); `None` when none is set.
    pub fn for_build(
        profile_setting: Option<(&str, &Path)>,
    ) -> Result<Option<ExtraCaCerts>, UsageError> {
        for var in [ENV, ca_certs::ENV] {
            if let Some(certs) = CaCerts::from_env(var)? {
                return Ok(Some(ExtraCaCerts {
                    certs,
                    setting: var.to_string(),
                }));
            }
        }
        match profile_setting {
            Some((label, path)) => Ok(Some(ExtraCaCerts {
                certs: CaCerts::load(path, &format!("{label} {}", path.display()))?,
                setting: label.to_string(),
            })),
            None => Ok(None),
        }
    }

    /// The build step that appends the certificates to the bundle, keeping the original.
    /// The certificates travel as one argv element: never pasted into a shell string.
    pub fn install_command(&self) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            format!(
                r#"set -e; cp -p {GUEST_BUNDLE} {GUEST_BUNDLE_SAVED}; printf '%s' "$1" >> {GUEST_BUNDLE}"#
            ),
            "sh".into(),
            self.certs.concat(),
        ]
    }

    /// The build step that puts the original bundle back.
    pub fn remove_command() -> Vec<String> {
        vec![
            "mv".into(),
            "-f".into(),
            GUEST_BUNDLE_SAVED.into(),
            GUEST_BUNDLE.into(),
        ]
    }

    /// Environment for build steps, for tools that keep their own CA list instead of the
    /// system's: Node (npm), pip and Python's requests.
    pub fn build_env() -> Vec<(String, String)> {
        ["NODE_EXTRA_CA_CERTS", "PIP_CERT", "REQUESTS_CA_BUNDLE"]
            .iter()
            .map(|k| (k.to_string(), GUEST_BUNDLE.to_string()))
            .collect()
    }
}

/// A hint for a failed build whose log shows a TLS verification failure, or `None`.
pub fn hint_for_log(log_tail: &str) -> Option<String> {
    const SIGNS: &[&str] = &[
        "SELF_SIGNED_CERT_IN_CHAIN",
        "UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
        "unable to get local issuer certificate",
        "certificate verify failed",
        "self-signed certificate in certificate chain",
        "self signed certificate in certificate chain",
    ];
    if !SIGNS.iter().any(|s| log_tail.contains(s)) {
        return None;
    }
    let set = |v: &str| std::env::var_os(v).is_some_and(|v| !v.is_empty());
    Some(if set(ENV) || set(ca_certs::ENV) {
        format!("a TLS certificate was not trusted even with {ENV}/{}; check that it holds the CA your network's proxy presents", ca_certs::ENV)
    } else {
        format!("a TLS certificate was not trusted: behind a TLS-intercepting proxy, set {} (VMs and builds) or {ENV} (builds only) to its CA certificate (a PEM file or a directory such as /usr/local/share/ca-certificates)", ca_certs::ENV)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT_A: &str = "-----BEGIN CERTIFICATE-----\nAAAA\nBBBB\n-----END CERTIFICATE-----\n";
    const CERT_B: &str = "-----BEGIN CERTIFICATE-----\nCCCC\n-----END CERTIFICATE-----\n";

    #[test]
    fn install_passes_the_certificates_as_one_argument_and_remove_restores() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.crt"), CERT_B).unwrap();
        std::fs::write(dir.path().join("a.pem"), CERT_A).unwrap();
        let all = ExtraCaCerts {
            certs: CaCerts::load(dir.path(), "X").unwrap(),
            setting: ENV.into(),
        };
        let install = all.install_command();
        assert_eq!(install[4], format!("{CERT_A}{CERT_B}"));
        assert!(!install[2].contains("BEGIN"), "{install:?}");
        assert_eq!(ExtraCaCerts::remove_command()[2], GUEST_BUNDLE_SAVED);
    }

    #[test]
    fn hint_only_for_tls_verification_failures() {
        assert!(hint_for_log("npm ERR! code SELF_SIGNED_CERT_IN_CHAIN").is_some());
        assert!(
            hint_for_log("SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed").is_some()
        );
        assert!(hint_for_log("E: Unable to locate package nope").is_none());
    }
}
