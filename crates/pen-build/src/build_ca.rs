//! Extra CA certificates trusted by builder VMs, for networks whose HTTPS goes through a
//! TLS-intercepting proxy (corporate networks, sandboxes). The base image trusts Debian's CA
//! bundle only, so `npm install` or `pip install` in a profile's `build` fails there with
//! `SELF_SIGNED_CERT_IN_CHAIN` or `certificate verify failed`.
//!
//! Trust is widened only when the user says so: `PEN_BUILD_CA_CERTS` names a PEM file or a
//! directory of `*.crt`/`*.pem` files. The certificates are appended to the builder's CA
//! bundle before `apt-get update`, and the bundle is put back as it was before the root is
//! packed, so the image is the same as one built without them and the cache key does not
//! depend on them. VMs booted from the image do not trust them. (Appending, not
//! `update-ca-certificates`: that rehashes every certificate, over a minute under TCG.)

use std::path::{Path, PathBuf};

use pen_core::error::UsageError;

/// The environment variable naming the extra CA certificates.
pub const ENV: &str = "PEN_BUILD_CA_CERTS";

/// Debian's CA bundle: OpenSSL's default `CAfile`, GnuTLS's (apt) and the one the build
/// environment points Node and pip at.
const GUEST_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where the builder keeps the bundle as it was (a tmpfs: never part of the image).
const GUEST_BUNDLE_SAVED: &str = "/run/pen-ca-bundle.orig";

const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const END: &str = "-----END CERTIFICATE-----";

/// Certificates to trust during one build, each one PEM block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraCaCerts {
    pub source: PathBuf,
    pub certs: Vec<String>,
}

impl ExtraCaCerts {
    /// Reads `PEN_BUILD_CA_CERTS`; `None` when it is unset or empty.
    pub fn from_env() -> Result<Option<ExtraCaCerts>, UsageError> {
        match std::env::var_os(ENV) {
            Some(value) if !value.is_empty() => Self::load(Path::new(&value)).map(Some),
            _ => Ok(None),
        }
    }

    /// Reads a PEM file, or every `*.crt` and `*.pem` file of a directory (sorted by name).
    pub fn load(source: &Path) -> Result<ExtraCaCerts, UsageError> {
        let unreadable = |e: std::io::Error| {
            UsageError(format!(
                "{ENV}={}: cannot read it ({e}); point it at a PEM file or a directory of *.crt files, or unset it",
                source.display()
            ))
        };
        let mut files = Vec::new();
        if source.is_dir() {
            for entry in std::fs::read_dir(source).map_err(unreadable)? {
                let path = entry.map_err(unreadable)?.path();
                let is_cert = matches!(
                    path.extension().and_then(|e| e.to_str()),
                    Some("crt" | "pem")
                );
                if is_cert && path.is_file() {
                    files.push(path);
                }
            }
            files.sort();
        } else {
            files.push(source.to_path_buf());
        }
        let mut certs = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).map_err(unreadable)?;
            certs.extend(split_pem(&text));
        }
        if certs.is_empty() {
            return Err(UsageError(format!(
                "{ENV}={}: no PEM certificate in it (expected {BEGIN} blocks); point it at the proxy's CA certificate, or unset it",
                source.display()
            )));
        }
        Ok(ExtraCaCerts {
            source: source.to_path_buf(),
            certs,
        })
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

/// The certificate blocks of a PEM text, each from its BEGIN to its END line; other blocks
/// (keys, parameters) and text between blocks are dropped.
pub fn split_pem(text: &str) -> Vec<String> {
    let mut certs = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in text.lines().map(str::trim) {
        if line == BEGIN {
            current = Some(vec![line]);
        } else if let Some(lines) = current.as_mut() {
            lines.push(line);
            if line == END {
                certs.push(lines.join("\n") + "\n");
                current = None;
            }
        }
    }
    certs
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
    Some(if std::env::var_os(ENV).is_some_and(|v| !v.is_empty()) {
        format!("a TLS certificate was not trusted even with {ENV}; check that it holds the CA your network's proxy presents")
    } else {
        format!("a TLS certificate was not trusted: behind a TLS-intercepting proxy, set {ENV} to its CA certificate (a PEM file or a directory such as /usr/local/share/ca-certificates) to trust it during builds")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT_A: &str = "-----BEGIN CERTIFICATE-----\nAAAA\nBBBB\n-----END CERTIFICATE-----\n";
    const CERT_B: &str = "-----BEGIN CERTIFICATE-----\nCCCC\n-----END CERTIFICATE-----\n";

    #[test]
    fn split_pem_keeps_certificates_and_drops_the_rest() {
        let text = format!(
            "subject=CN=a\n{CERT_A}-----BEGIN PRIVATE KEY-----\nKKKK\n-----END PRIVATE KEY-----\n  {}",
            CERT_B.replace('\n', "\r\n")
        );
        assert_eq!(
            split_pem(&text),
            vec![CERT_A.to_string(), CERT_B.to_string()]
        );
        assert!(split_pem("no certificates").is_empty());
        // A block that never ends is not a certificate.
        assert!(split_pem("-----BEGIN CERTIFICATE-----\nAAAA\n").is_empty());
    }

    #[test]
    fn load_reads_a_file_or_the_cert_files_of_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.crt"), CERT_B).unwrap();
        std::fs::write(dir.path().join("a.pem"), CERT_A).unwrap();
        std::fs::write(dir.path().join("notes.txt"), CERT_A).unwrap();
        let all = ExtraCaCerts::load(dir.path()).unwrap();
        assert_eq!(all.certs, vec![CERT_A.to_string(), CERT_B.to_string()]);
        let install = all.install_command();
        assert_eq!(install[4], format!("{CERT_A}{CERT_B}"));
        assert!(!install[2].contains("BEGIN"), "{install:?}");
        assert_eq!(ExtraCaCerts::remove_command()[2], GUEST_BUNDLE_SAVED);

        let one = ExtraCaCerts::load(&dir.path().join("b.crt")).unwrap();
        assert_eq!(one.certs.len(), 1);
    }

    #[test]
    fn load_refuses_missing_and_certificate_free_sources_naming_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let missing = ExtraCaCerts::load(&dir.path().join("nope.pem")).unwrap_err();
        assert!(
            missing.0.contains(ENV) && missing.0.contains("cannot read"),
            "{missing}"
        );
        std::fs::write(dir.path().join("empty.crt"), "hello").unwrap();
        let empty = ExtraCaCerts::load(&dir.path().join("empty.crt")).unwrap_err();
        assert!(empty.0.contains("no PEM certificate"), "{empty}");
        let empty_dir = tempfile::tempdir().unwrap();
        assert!(ExtraCaCerts::load(empty_dir.path()).is_err());
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
