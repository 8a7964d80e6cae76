//! Finding virtiofsd and building its command line.
//!
//! Two programs answer to that name: the C one shipped with QEMU up to 7.2 (Debian 12:
//! `/usr/lib/qemu/virtiofsd`), with FUSE-style `-o key=value` options, and the Rust one
//! (`virtiofsd` package, `/usr/libexec/virtiofsd`) with long options. Their `--help` tells
//! them apart.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use pen_core::fsutil::find_in_path;

/// Where distributions put virtiofsd, most specific first (after `PEN_VIRTIOFSD`).
const KNOWN_PATHS: &[&str] = &["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// QEMU's C virtiofsd (QEMU ≤ 7.2).
    C,
    /// The Rust virtiofsd (gitlab.com/virtio-fs/virtiofsd).
    Rust,
}

#[derive(Debug, Clone)]
pub struct Virtiofsd {
    pub path: PathBuf,
    pub flavour: Flavour,
}

pub const INSTALL_HINT: &str = "install it with `sudo apt-get install virtiofsd` (Debian 13, Ubuntu 24.04 and newer) or `sudo apt-get install qemu-system-common` (Debian 12), or set PEN_VIRTIOFSD";

/// `PEN_VIRTIOFSD`, the distribution paths, then `PATH`; runs `--help` to learn the flavour.
pub fn find() -> anyhow::Result<Virtiofsd> {
    let path = check()?;
    let flavour = probe(&path)?;
    Ok(Virtiofsd { path, flavour })
}

/// [`find`], remembering the flavour in `cache` (a file) for as long as the program's path,
/// size and modification time stay the same: `--help` costs ~10 ms, on every VM start.
pub fn find_cached(cache: &Path) -> anyhow::Result<Virtiofsd> {
    let path = check()?;
    let key = cache_key(&path);
    let cached = std::fs::read_to_string(cache).ok().and_then(|text| {
        let (flavour, cached_key) = text.split_once('\n')?;
        let flavour = match flavour {
            "rust" => Flavour::Rust,
            _ => Flavour::C,
        };
        (Some(cached_key) == key.as_deref()).then_some(flavour)
    });
    if let Some(flavour) = cached {
        return Ok(Virtiofsd { path, flavour });
    }
    let flavour = probe(&path)?;
    if let Some(key) = key {
        let name = match flavour {
            Flavour::C => "c",
            Flavour::Rust => "rust",
        };
        // Best effort: without the cache the next start probes again.
        let _ = pen_core::fsutil::write_atomic(cache, format!("{name}\n{key}").as_bytes());
    }
    Ok(Virtiofsd { path, flavour })
}

/// What identifies one build of the program at `path`.
fn cache_key(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(format!(
        "{}\n{}\n{}.{}",
        path.display(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    ))
}

/// Where [`find`] would find virtiofsd, without running it: for a client's early check
/// (the supervisor runs `find`; one `--help` per start, not two).
pub fn check() -> anyhow::Result<PathBuf> {
    let path = locate().ok_or_else(|| anyhow::anyhow!("virtiofsd not found; {INSTALL_HINT}"))?;
    if !path.is_file() {
        anyhow::bail!(
            "virtiofsd {} does not exist; {INSTALL_HINT}",
            path.display()
        );
    }
    Ok(path)
}

pub fn locate() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PEN_VIRTIOFSD").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    KNOWN_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| find_in_path("virtiofsd"))
}

fn probe(path: &Path) -> anyhow::Result<Flavour> {
    let out = Command::new(path)
        .arg("--help")
        .output()
        .with_context(|| format!("running {} --help", path.display()))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(flavour_from_help(&text))
}

/// The Rust virtiofsd documents `--shared-dir`; the C one only knows `-o source=`.
pub fn flavour_from_help(help: &str) -> Flavour {
    if help.contains("--shared-dir") {
        Flavour::Rust
    } else {
        Flavour::C
    }
}

/// Escapes a value for a FUSE `-o` option list, where `,` separates options and `\` escapes.
fn fuse_opt_value(value: &str) -> String {
    value.replace('\\', "\\\\").replace(',', "\\,")
}

impl Virtiofsd {
    /// Arguments serving `shared_dir` on `socket`. `unprivileged` asks for no sandbox, the
    /// only mode the Rust virtiofsd can use without root (the C one needs root regardless).
    pub fn args(&self, socket: &Path, shared_dir: &Path, unprivileged: bool) -> Vec<OsString> {
        match self.flavour {
            Flavour::C => {
                let mut sock = OsString::from("--socket-path=");
                sock.push(socket);
                vec![
                    sock,
                    "-o".into(),
                    // Lossy only for non-UTF-8 directory names, which `pen` refuses earlier.
                    format!("source={}", fuse_opt_value(&shared_dir.to_string_lossy())).into(),
                    "-o".into(),
                    "cache=auto".into(),
                    // Its default (info) logs every queue event into the supervisor log.
                    "-o".into(),
                    "log_level=warn".into(),
                ]
            }
            Flavour::Rust => {
                let mut a: Vec<OsString> = vec![
                    "--socket-path".into(),
                    socket.into(),
                    "--shared-dir".into(),
                    shared_dir.into(),
                    "--cache".into(),
                    "auto".into(),
                ];
                if unprivileged {
                    a.extend(["--sandbox".into(), "none".into()]);
                }
                a
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C_HELP: &str = "usage: /usr/lib/qemu/virtiofsd [options]\n    -o cache=<mode>  cache mode\n    -o source=PATH  shared directory tree\n    --socket-path=PATH  path for the vhost-user socket\n";
    const RUST_HELP: &str = "Usage: virtiofsd [OPTIONS]\n      --shared-dir <shared_dir>\n      --socket-path <socket_path>\n      --cache <cache>\n";

    #[test]
    fn the_flavour_cache_is_used_while_the_program_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("flavour");
        let key = cache_key(&check().unwrap_or_else(|_| PathBuf::from("/bin/sh")));
        // Without a virtiofsd on this machine there is nothing to find; the key logic
        // alone is checked.
        let Ok(found) = find_cached(&cache) else {
            assert!(key.is_some());
            return;
        };
        let text = std::fs::read_to_string(&cache).unwrap();
        assert!(text.ends_with(&key.unwrap()), "{text}");
        // A cached answer wins while the key matches...
        let other = if found.flavour == Flavour::C {
            "rust"
        } else {
            "c"
        };
        let (_, rest) = text.split_once('\n').unwrap();
        std::fs::write(&cache, format!("{other}\n{rest}")).unwrap();
        assert_ne!(find_cached(&cache).unwrap().flavour, found.flavour);
        // ...and is probed again when it does not.
        std::fs::write(&cache, format!("{other}\n/elsewhere\n1\n2.3")).unwrap();
        assert_eq!(find_cached(&cache).unwrap().flavour, found.flavour);
    }

    #[test]
    fn flavours() {
        assert_eq!(flavour_from_help(C_HELP), Flavour::C);
        assert_eq!(flavour_from_help(RUST_HELP), Flavour::Rust);
    }

    fn strs(a: Vec<OsString>) -> Vec<String> {
        a.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn c_args() {
        let v = Virtiofsd {
            path: "/usr/lib/qemu/virtiofsd".into(),
            flavour: Flavour::C,
        };
        assert_eq!(
            strs(v.args(Path::new("/run/v.sock"), Path::new("/src/a,b"), false)),
            [
                "--socket-path=/run/v.sock",
                "-o",
                "source=/src/a\\,b",
                "-o",
                "cache=auto",
                "-o",
                "log_level=warn"
            ]
        );
    }

    #[test]
    fn rust_args() {
        let v = Virtiofsd {
            path: "/usr/libexec/virtiofsd".into(),
            flavour: Flavour::Rust,
        };
        assert_eq!(
            strs(v.args(Path::new("/run/v.sock"), Path::new("/src/x"), true)),
            [
                "--socket-path",
                "/run/v.sock",
                "--shared-dir",
                "/src/x",
                "--cache",
                "auto",
                "--sandbox",
                "none"
            ]
        );
    }
}
