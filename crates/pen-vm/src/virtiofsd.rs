//! Finding virtiofsd and building its command line.
//!
//! Two programs answer to that name: the C one shipped with QEMU up to 7.2 (Debian 12:
//! `/usr/lib/qemu/virtiofsd`), with FUSE-style `-o key=value` options, and the Rust one
//! (`virtiofsd` package, `/usr/libexec/virtiofsd`; on Debian 12 built by
//! `scripts/install-host-deps.sh` into `~/.local/bin`) with long options. Their `--help`
//! tells them apart.
//!
//! pen prefers the Rust one, as root too: it runs without root, keeps its sandbox (a mount
//! namespace with the shared directory as its root, so no symlink or `..` leads out of it),
//! and maps every guest uid and gid onto the user running pen (see [`Virtiofsd::args`]).
//! The C one needs root and keeps guest ids as they are; it is the last resort.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use pen_core::fsutil::find_in_path;

/// The Rust virtiofsd's package path (Debian 13, Ubuntu 24.04).
const PACKAGED_RUST: &str = "/usr/libexec/virtiofsd";
/// QEMU's C virtiofsd (Debian 12's `qemu-system-common`): needs root.
const QEMU_C: &str = "/usr/lib/qemu/virtiofsd";

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

pub const INSTALL_HINT: &str = "install the Rust virtiofsd: `sudo apt-get install virtiofsd` where packaged (Debian 13, Ubuntu 24.04), else `cargo install --locked --root ~/.local virtiofsd` (needs libseccomp-dev and libcap-ng-dev); pen's scripts/install-host-deps.sh does either; or set PEN_VIRTIOFSD";

/// Why a user who is not root cannot use QEMU's C virtiofsd, and the fix.
pub fn c_needs_root(path: &Path) -> String {
    format!(
        "{} (QEMU's C virtiofsd) needs root; {INSTALL_HINT}",
        path.display()
    )
}

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
    // Known without running it: QEMU's C one at its Debian path cannot start without root.
    if path == Path::new(QEMU_C) && !Runner::current().is_root() {
        anyhow::bail!("{}", c_needs_root(&path));
    }
    Ok(path)
}

/// `PEN_VIRTIOFSD`, else the first Rust virtiofsd of [`rust_candidates`], else QEMU's C one.
pub fn locate() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PEN_VIRTIOFSD").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    rust_candidates()
        .into_iter()
        .find(|p| p.is_file())
        .or_else(|| Some(PathBuf::from(QEMU_C)).filter(|p| p.is_file()))
}

/// Why [`locate`] picked `path`, for `pen doctor`.
pub fn origin(path: &Path) -> &'static str {
    if std::env::var_os("PEN_VIRTIOFSD").is_some_and(|v| Path::new(&v) == path) {
        "PEN_VIRTIOFSD"
    } else if path == Path::new(PACKAGED_RUST) {
        "the distribution's virtiofsd package"
    } else if path == Path::new(QEMU_C) {
        "QEMU's own (no Rust virtiofsd found)"
    } else if path.ends_with(".local/bin/virtiofsd") {
        "built by scripts/install-host-deps.sh"
    } else {
        "found beside pen or in PATH"
    }
}

/// Where a Rust virtiofsd may be, in order: the package's path, where the installer builds
/// it (`~/.local/bin`), beside the running `pen` (`cargo install` puts both in one bin
/// directory), then `PATH`. The C one is never in `PATH` (Debian keeps it in
/// `/usr/lib/qemu`), so a `virtiofsd` found there is taken as it is; its `--help` decides.
fn rust_candidates() -> Vec<PathBuf> {
    let mut found = vec![PathBuf::from(PACKAGED_RUST)];
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        found.push(PathBuf::from(home).join(".local/bin/virtiofsd"));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        found.push(dir.join("virtiofsd"));
    }
    found.extend(find_in_path("virtiofsd"));
    found
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

/// The file virtiofsd keeps locked beside its socket while it serves (`<socket>.pid`).
pub fn pid_file(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".pid");
    PathBuf::from(name)
}

/// Whether a virtiofsd still holds `socket`'s pid file. The Rust virtiofsd serves from a
/// child in namespaces of its own, which outlives the parent pen reaps by some milliseconds
/// (it dies of its parent's death signal): a new virtiofsd started on the same socket in
/// that window fails with "Error creating pid file ... Resource temporarily unavailable".
pub fn pid_file_held(socket: &Path) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    let Ok(file) = std::fs::File::open(pid_file(socket)) else {
        return false;
    };
    // Taken and released at once: only asks whether anyone else holds it.
    Flock::lock(file, FlockArg::LockExclusiveNonblock).is_err()
}

/// Who runs virtiofsd, for its id mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runner {
    pub uid: u32,
    pub gid: u32,
}

impl Runner {
    /// The current process's effective ids.
    pub fn current() -> Runner {
        Runner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }
    fn is_root(self) -> bool {
        self.uid == 0
    }
}

/// Every guest id (0 to 2^32 - 2) squashed onto namespace id 0, which is the user running
/// pen: whatever the guest creates or `chown`s is that user's on the host.
const SQUASH_ALL_GUEST_IDS: &str = "squash-guest:0:0:4294967295";

impl Virtiofsd {
    /// Arguments serving `shared_dir` on `socket`, run by `runner`.
    ///
    /// The Rust virtiofsd keeps its default sandbox (`namespace`: its own mount namespace
    /// whose root is `shared_dir`, so neither a symlink nor `..` from the guest reaches
    /// beyond it). Not root, it also gets a user namespace of its own in which the runner
    /// is root (`--uid-map`/`--gid-map` with one id: no `newuidmap` or `/etc/subuid`
    /// needed). Guest ids are squashed onto that root, so a file root or any other guest
    /// user creates appears on the host owned by the runner with its mode kept, the
    /// runner's files appear as root's in the guest, and a `chown` in the guest never
    /// produces a host file owned by someone else (it succeeds and changes nothing).
    /// Unprivileged it cannot open file handles (`CAP_DAC_READ_SEARCH`); saying so up
    /// front spares the log a warning per start.
    ///
    /// The C one (root only) gets its classic options; guest ids pass through unchanged.
    pub fn args(&self, socket: &Path, shared_dir: &Path, runner: Runner) -> Vec<OsString> {
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
                    "--sandbox".into(),
                    "namespace".into(),
                    // Its default (0) serves every request on one thread: deleting a tree
                    // of 10 000 files took 3-4x as long as with QEMU's C one (a pool of
                    // 64); with a pool the two are level (bench/README.md, workspace I/O).
                    "--thread-pool-size=16".into(),
                ];
                if !runner.is_root() {
                    a.extend([
                        format!("--uid-map=:0:{}:1:", runner.uid).into(),
                        format!("--gid-map=:0:{}:1:", runner.gid).into(),
                        "--inode-file-handles=never".into(),
                    ]);
                }
                a.extend([
                    format!("--translate-uid={SQUASH_ALL_GUEST_IDS}").into(),
                    format!("--translate-gid={SQUASH_ALL_GUEST_IDS}").into(),
                    "--log-level".into(),
                    "warn".into(),
                ]);
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
    fn a_held_pid_file_is_seen_and_a_released_one_is_not() {
        use nix::fcntl::{Flock, FlockArg};
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("virtiofs.sock");
        assert_eq!(pid_file(&socket), dir.path().join("virtiofs.sock.pid"));
        assert!(!pid_file_held(&socket), "no file: not held");
        std::fs::write(pid_file(&socket), "123\n").unwrap();
        assert!(!pid_file_held(&socket), "a stale file nobody locks");
        let holder = Flock::lock(
            std::fs::File::open(pid_file(&socket)).unwrap(),
            FlockArg::LockExclusive,
        )
        .unwrap();
        assert!(pid_file_held(&socket));
        drop(holder);
        assert!(!pid_file_held(&socket));
    }

    #[test]
    fn c_args() {
        let v = Virtiofsd {
            path: "/usr/lib/qemu/virtiofsd".into(),
            flavour: Flavour::C,
        };
        let root = Runner { uid: 0, gid: 0 };
        assert_eq!(
            strs(v.args(Path::new("/run/v.sock"), Path::new("/src/a,b"), root)),
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
    fn rust_args_keep_the_sandbox_and_squash_guest_ids() {
        let v = Virtiofsd {
            path: "/usr/libexec/virtiofsd".into(),
            flavour: Flavour::Rust,
        };
        let user = Runner {
            uid: 1001,
            gid: 100,
        };
        assert_eq!(
            strs(v.args(Path::new("/run/v.sock"), Path::new("/src/x"), user)),
            [
                "--socket-path",
                "/run/v.sock",
                "--shared-dir",
                "/src/x",
                "--cache",
                "auto",
                "--sandbox",
                "namespace",
                "--thread-pool-size=16",
                "--uid-map=:0:1001:1:",
                "--gid-map=:0:100:1:",
                "--inode-file-handles=never",
                "--translate-uid=squash-guest:0:0:4294967295",
                "--translate-gid=squash-guest:0:0:4294967295",
                "--log-level",
                "warn"
            ]
        );
        let root = strs(v.args(
            Path::new("/run/v.sock"),
            Path::new("/src/x"),
            Runner { uid: 0, gid: 0 },
        ));
        assert!(!root.iter().any(|a| a.contains("-map=")), "{root:?}");
        assert!(root.contains(&"namespace".to_string()));
        assert!(root.contains(&"--translate-uid=squash-guest:0:0:4294967295".to_string()));
        assert!(!root.iter().any(|a| a == "none"), "never --sandbox none");
    }
}
