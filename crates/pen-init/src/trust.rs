//! The extra CA certificates the host sends in `Config` (`--ca-certs`, for networks whose
//! HTTPS goes through a TLS-intercepting proxy), applied at every boot and restore, inside
//! the VM's root:
//!
//! - the system store: one file per certificate in `/usr/local/share/ca-certificates/pen/`
//!   (so a later `update-ca-certificates`, e.g. when apt upgrades `ca-certificates`, keeps
//!   them) and appended to Debian's bundle, which OpenSSL, GnuTLS (apt, git), curl and Go
//!   read. Appended rather than `update-ca-certificates`, which rehashes every certificate
//!   (over a minute under TCG);
//! - the variables of tools that keep their own list (Node, pip, requests) or are often
//!   built without the system's default path (`SSL_CERT_FILE`: rustls, Python's ssl in
//!   some builds), pointing at the bundle, in every session's environment.
//!
//! A boot without them takes back what an earlier boot added: the files go, and their
//! blocks leave the bundle (unless another file of the local store holds the same
//! certificate). Nothing else of the certificates touches the VM's disk.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

const BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
const LOCAL_STORE: &str = "/usr/local/share/ca-certificates";
const PEN_DIR: &str = "/usr/local/share/ca-certificates/pen";

/// Variables pointed at the bundle when the VM has extra certificates.
const TOOL_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "PIP_CERT",
    "REQUESTS_CA_BUNDLE",
];

const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const END: &str = "-----END CERTIFICATE-----";

/// Applies `certs` (PEM blocks from the host) under `root` (`/` in the VM; a directory in
/// tests) and returns the variables for every session's environment.
pub fn apply(root: &Path, certs: &[String]) -> std::io::Result<Vec<(String, String)>> {
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    let pen_dir = at(PEN_DIR);
    let previous = read_certs_in(&pen_dir);
    if certs.is_empty() && previous.is_empty() {
        return Ok(Vec::new());
    }
    let wanted: Vec<&str> = certs
        .iter()
        .flat_map(|c| blocks(c))
        .map(|(_, b)| b)
        .collect();
    let wanted_keys: HashSet<String> = wanted.iter().map(|b| key(b)).collect();
    // Blocks an earlier boot added that this one does not want, unless the person's own
    // files in the local store hold them too.
    let mut others = HashSet::new();
    if let Ok(entries) = std::fs::read_dir(at(LOCAL_STORE)) {
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|e| e == "crt") {
                if let Ok(text) = std::fs::read_to_string(entry.path()) {
                    others.extend(blocks(&text).map(|(_, b)| key(b)));
                }
            }
        }
    }
    let stale: HashSet<String> = previous
        .iter()
        .map(|b| key(b))
        .filter(|k| !wanted_keys.contains(k) && !others.contains(k))
        .collect();

    let bundle_path = at(BUNDLE);
    let bundle = std::fs::read_to_string(&bundle_path).unwrap_or_default();
    let mut kept = String::with_capacity(bundle.len());
    let mut present = HashSet::new();
    let mut last = 0;
    for (start, block) in blocks(&bundle) {
        let k = key(block);
        let end = start + block.len();
        if stale.contains(&k) {
            kept.push_str(&bundle[last..start]);
            // The line break after the block goes with it.
            last = end + usize::from(bundle[end..].starts_with('\n'));
        } else {
            present.insert(k);
        }
    }
    kept.push_str(&bundle[last..]);
    for block in &wanted {
        if present.insert(key(block)) {
            if !kept.is_empty() && !kept.ends_with('\n') {
                kept.push('\n');
            }
            kept.push_str(block);
            kept.push('\n');
        }
    }
    if kept != bundle {
        write_replacing(&bundle_path, kept.as_bytes())?;
    }

    // The store's own files: exactly this boot's certificates.
    let _ = std::fs::remove_dir_all(&pen_dir);
    if !wanted.is_empty() {
        std::fs::create_dir_all(&pen_dir)?;
        for (i, block) in wanted.iter().enumerate() {
            write_replacing(
                &pen_dir.join(format!("pen-{i}.crt")),
                format!("{block}\n").as_bytes(),
            )?;
        }
        return Ok(TOOL_VARS
            .iter()
            .map(|k| (k.to_string(), BUNDLE.to_string()))
            .collect());
    }
    Ok(Vec::new())
}

/// The certificate blocks of the `*.crt` files in `dir`.
fn read_certs_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        if let Ok(text) = std::fs::read_to_string(entry.path()) {
            out.extend(blocks(&text).map(|(_, b)| b.to_string()));
        }
    }
    out
}

/// Each certificate block of `text` with its byte offset, from its BEGIN line to the end of
/// its END line (without the line break).
fn blocks(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut rest = 0;
    std::iter::from_fn(move || {
        let start = rest + text[rest..].find(BEGIN)?;
        let end = start + text[start..].find(END)? + END.len();
        rest = end;
        Some((start, &text[start..end]))
    })
}

/// A certificate's identity: its base64 without line breaks or spaces.
fn key(block: &str) -> String {
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----"))
        .collect()
}

/// Writes `path` through a temporary file and a rename (mode 0644: a trust store is public),
/// so a crash leaves the old file or the new one, never half of it.
fn write_replacing(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("pen-tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str = "-----BEGIN CERTIFICATE-----\nDDDD\n-----END CERTIFICATE-----\n";
    const PROXY: &str = "-----BEGIN CERTIFICATE-----\nPPPP\nQQQQ\n-----END CERTIFICATE-----\n";
    const OTHER: &str = "-----BEGIN CERTIFICATE-----\nOOOO\n-----END CERTIFICATE-----\n";

    fn root_with_bundle() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc/ssl/certs")).unwrap();
        std::fs::write(
            root.path().join("etc/ssl/certs/ca-certificates.crt"),
            DEBIAN,
        )
        .unwrap();
        root
    }

    fn bundle(root: &Path) -> String {
        std::fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt")).unwrap()
    }

    #[test]
    fn a_boot_with_certificates_adds_them_once_and_sets_the_tool_variables() {
        let root = root_with_bundle();
        let vars = apply(root.path(), &[PROXY.to_string()]).unwrap();
        assert!(vars.contains(&("NODE_EXTRA_CA_CERTS".into(), BUNDLE.into())));
        assert_eq!(bundle(root.path()), format!("{DEBIAN}{PROXY}"));
        let file = root
            .path()
            .join("usr/local/share/ca-certificates/pen/pen-0.crt");
        assert_eq!(std::fs::read_to_string(file).unwrap(), PROXY);
        // The next boot with the same certificate changes nothing.
        apply(root.path(), &[PROXY.to_string()]).unwrap();
        assert_eq!(bundle(root.path()), format!("{DEBIAN}{PROXY}"));
    }

    #[test]
    fn a_boot_without_them_takes_back_what_an_earlier_boot_added() {
        let root = root_with_bundle();
        apply(root.path(), &[format!("{PROXY}{OTHER}")]).unwrap();
        assert_eq!(bundle(root.path()), format!("{DEBIAN}{PROXY}{OTHER}"));
        // Another set: the one no longer given leaves.
        apply(root.path(), &[OTHER.to_string()]).unwrap();
        assert_eq!(bundle(root.path()), format!("{DEBIAN}{OTHER}"));
        // None: back to the image's bundle, no pen directory, no variables.
        assert!(apply(root.path(), &[]).unwrap().is_empty());
        assert_eq!(bundle(root.path()), DEBIAN);
        assert!(!root
            .path()
            .join("usr/local/share/ca-certificates/pen")
            .exists());
    }

    #[test]
    fn a_certificate_the_person_added_to_the_store_themselves_stays() {
        let root = root_with_bundle();
        apply(root.path(), &[PROXY.to_string()]).unwrap();
        std::fs::write(
            root.path().join("usr/local/share/ca-certificates/mine.crt"),
            PROXY,
        )
        .unwrap();
        apply(root.path(), &[]).unwrap();
        assert_eq!(bundle(root.path()), format!("{DEBIAN}{PROXY}"));
    }

    #[test]
    fn without_a_bundle_one_is_made_and_without_certificates_nothing_is_touched() {
        let root = tempfile::tempdir().unwrap();
        assert!(apply(root.path(), &[]).unwrap().is_empty());
        assert!(!root.path().join("etc").exists());
        apply(root.path(), &[PROXY.to_string()]).unwrap();
        assert_eq!(bundle(root.path()), PROXY);
    }
}
