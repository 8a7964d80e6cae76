//! Extra CA certificates the person tells pen to trust, for networks whose HTTPS goes through
//! a TLS-intercepting proxy (corporate networks, sandboxes, some CI). Read from the host at
//! each use, never copied into `PEN_HOME`: VMs get them over the control channel at each
//! start (`--ca-certs`, `PEN_CA_CERTS`, a profile's `ca_certs`), builds as an argv element
//! of a build step (`PEN_BUILD_CA_CERTS`, see pen-build's `build_ca`). Here: reading and
//! checking the PEM, shared by both.

use std::path::{Path, PathBuf};

use crate::error::UsageError;

/// The person's CA certificates for VMs (and for builds when `PEN_BUILD_CA_CERTS` is unset).
pub const ENV: &str = "PEN_CA_CERTS";

/// Debian's CA bundle in the guest: OpenSSL's default `CAfile`, GnuTLS's (apt), and the file
/// the tool variables point at.
pub const GUEST_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const END: &str = "-----END CERTIFICATE-----";

/// Certificates to trust, each one PEM block, and where they were read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCerts {
    pub source: PathBuf,
    pub certs: Vec<String>,
}

impl CaCerts {
    /// Reads the certificates named by environment variable `var`; `None` when it is unset
    /// or empty.
    pub fn from_env(var: &str) -> Result<Option<CaCerts>, UsageError> {
        match std::env::var_os(var) {
            Some(value) if !value.is_empty() => {
                let path = Path::new(&value);
                Self::load(path, &format!("{var}={}", path.display())).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Reads a PEM file, or every `*.crt` and `*.pem` file of a directory (sorted by name).
    /// `label` names the setting in errors (`--ca-certs /x`, `PEN_CA_CERTS=/x`). Refused: a
    /// source that cannot be read, holds no certificate, or holds a private key (a key has
    /// no business in a trust store, and a mistyped path should not ship one anywhere).
    pub fn load(source: &Path, label: &str) -> Result<CaCerts, UsageError> {
        let unreadable = |e: std::io::Error| {
            UsageError(format!(
                "{label}: cannot read it ({e}); point it at a PEM file or a directory of *.crt files"
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
            let bytes = std::fs::read(file).map_err(unreadable)?;
            let text = String::from_utf8_lossy(&bytes);
            if text.contains("PRIVATE KEY-----") {
                return Err(UsageError(format!(
                    "{label}: {} holds a private key; give only the CA's certificate (never its key)",
                    file.display()
                )));
            }
            certs.extend(split_pem(&text));
        }
        if certs.is_empty() {
            return Err(UsageError(format!(
                "{label}: no PEM certificate in it (expected {BEGIN} blocks); point it at the proxy's CA certificate"
            )));
        }
        Ok(CaCerts {
            source: source.to_path_buf(),
            certs,
        })
    }

    /// All certificates as one PEM text.
    pub fn concat(&self) -> String {
        self.certs.concat()
    }
}

/// The certificate blocks of a PEM text, each from its BEGIN to its END line, trimmed; other
/// blocks (parameters) and text between blocks are dropped, and so is a block whose body is
/// not base64 (not a certificate, and it must not smuggle text into a trust store).
pub fn split_pem(text: &str) -> Vec<String> {
    let mut certs = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in text.lines().map(str::trim) {
        if line == BEGIN {
            current = Some(vec![line]);
        } else if let Some(lines) = current.as_mut() {
            lines.push(line);
            if line == END {
                let body = &lines[1..lines.len() - 1];
                let base64 = !body.is_empty()
                    && body.iter().all(|l| {
                        l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
                    });
                if base64 {
                    certs.push(lines.join("\n") + "\n");
                }
                current = None;
            }
        }
    }
    certs
}

/// A certificate's identity for comparing stores: its base64 body without line breaks.
pub fn fingerprint(pem: &str) -> String {
    pem.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT_A: &str = "-----BEGIN CERTIFICATE-----\nAAAA\nBBBB\n-----END CERTIFICATE-----\n";
    const CERT_B: &str = "-----BEGIN CERTIFICATE-----\nCCCC\n-----END CERTIFICATE-----\n";

    #[test]
    fn split_pem_keeps_certificates_and_drops_the_rest() {
        let text = format!(
            "subject=CN=a\n{CERT_A}-----BEGIN DH PARAMETERS-----\nKKKK\n-----END DH PARAMETERS-----\n  {}",
            CERT_B.replace('\n', "\r\n")
        );
        assert_eq!(
            split_pem(&text),
            vec![CERT_A.to_string(), CERT_B.to_string()]
        );
        assert!(split_pem("no certificates").is_empty());
        // A block that never ends is not a certificate.
        assert!(split_pem("-----BEGIN CERTIFICATE-----\nAAAA\n").is_empty());
        // Nor one whose body is not base64.
        assert!(
            split_pem("-----BEGIN CERTIFICATE-----\nrm -rf /\n-----END CERTIFICATE-----\n")
                .is_empty()
        );
        assert_eq!(fingerprint(CERT_A), "AAAABBBB");
    }

    #[test]
    fn load_reads_a_file_or_the_cert_files_of_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.crt"), CERT_B).unwrap();
        std::fs::write(dir.path().join("a.pem"), CERT_A).unwrap();
        std::fs::write(dir.path().join("notes.txt"), CERT_A).unwrap();
        let all = CaCerts::load(dir.path(), "X").unwrap();
        assert_eq!(all.certs, vec![CERT_A.to_string(), CERT_B.to_string()]);
        assert_eq!(all.concat(), format!("{CERT_A}{CERT_B}"));
        let one = CaCerts::load(&dir.path().join("b.crt"), "X").unwrap();
        assert_eq!(one.certs.len(), 1);
    }

    #[test]
    fn load_refuses_missing_certificate_free_and_key_holding_sources() {
        let dir = tempfile::tempdir().unwrap();
        let missing = CaCerts::load(&dir.path().join("nope.pem"), "--ca-certs nope").unwrap_err();
        assert!(
            missing.0.starts_with("--ca-certs nope: cannot read"),
            "{missing}"
        );
        std::fs::write(dir.path().join("empty.crt"), "hello").unwrap();
        let empty = CaCerts::load(&dir.path().join("empty.crt"), "X").unwrap_err();
        assert!(empty.0.contains("no PEM certificate"), "{empty}");
        let empty_dir = tempfile::tempdir().unwrap();
        assert!(CaCerts::load(empty_dir.path(), "X").is_err());
        let key = dir.path().join("key.pem");
        std::fs::write(
            &key,
            format!("{CERT_A}-----BEGIN PRIVATE KEY-----\nKKKK\n-----END PRIVATE KEY-----\n"),
        )
        .unwrap();
        let refused = CaCerts::load(&key, "X").unwrap_err();
        assert!(refused.0.contains("private key"), "{refused}");
    }
}
