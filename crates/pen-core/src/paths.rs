//! Where pen keeps things. `$PEN_HOME` (default `$XDG_CONFIG_HOME/pen`, `~/.config/pen`)
//! holds images, profiles and VMs; sockets live in a short runtime directory because a unix
//! socket path must stay under 108 bytes.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Longest unix socket path we create (sun_path is 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Longest socket file name we put in a runtime directory (`virtiofs.sock`).
const LONGEST_SOCKET_NAME: usize = "virtiofs.sock".len() + 1;

#[derive(Debug, Clone)]
pub struct PenHome {
    root: PathBuf,
}

impl PenHome {
    /// `$PEN_HOME`, else `$XDG_CONFIG_HOME/pen`, else `$HOME/.config/pen`.
    pub fn from_env() -> anyhow::Result<Self> {
        let root = if let Some(home) = std::env::var_os("PEN_HOME").filter(|v| !v.is_empty()) {
            PathBuf::from(home)
        } else if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
            PathBuf::from(xdg).join("pen")
        } else if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            PathBuf::from(home).join(".config/pen")
        } else {
            anyhow::bail!("cannot find a home for pen: set PEN_HOME or HOME");
        };
        Ok(Self::at(root))
    }

    pub fn at(root: impl Into<PathBuf>) -> Self {
        let root: PathBuf = root.into();
        // Absolute, so a supervisor started from another directory agrees on every path.
        let root = std::path::absolute(&root).unwrap_or(root);
        PenHome { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }
    pub fn kernel(&self) -> PathBuf {
        self.images().join("vmlinuz")
    }
    pub fn initrd(&self) -> PathBuf {
        self.images().join("initrd")
    }
    pub fn base_rootfs(&self) -> PathBuf {
        self.images().join("rootfs.sqfs")
    }
    pub fn base_manifest(&self) -> PathBuf {
        self.images().join("base.json")
    }
    pub fn profiles(&self) -> PathBuf {
        self.root.join("profiles")
    }
    pub fn profile_file(&self, name: &str) -> PathBuf {
        self.profiles().join(format!("{name}.toml"))
    }
    pub fn profile_images(&self) -> PathBuf {
        self.images().join("profiles")
    }
    pub fn profile_image_dir(&self, name: &str) -> PathBuf {
        self.profile_images().join(name)
    }
    pub fn sidecars(&self) -> PathBuf {
        self.images().join("sidecars")
    }
    pub fn snapshots(&self) -> PathBuf {
        self.images().join("snapshots")
    }
    pub fn volumes(&self) -> PathBuf {
        self.root.join("volumes")
    }
    pub fn volume_file(&self, name: &str) -> PathBuf {
        self.volumes().join(format!("{name}.sqfs"))
    }
    pub fn vms(&self) -> PathBuf {
        self.root.join("vms")
    }
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.vms().join(name)
    }

    /// Runtime directory for one VM's sockets: `$XDG_RUNTIME_DIR/pen/<home-id>/<name>`, or
    /// `/tmp/pen-<uid>/<home-id>/<name>` when that would make socket paths too long. The
    /// home id keeps two `$PEN_HOME`s (tests run many) from sharing sockets.
    pub fn runtime_dir(&self, name: &str) -> PathBuf {
        self.runtime_levels(name).pop().expect("three levels")
    }

    /// The directories pen creates on the way to [`PenHome::runtime_dir`], outermost first:
    /// `$XDG_RUNTIME_DIR/pen` (or `/tmp/pen-<uid>`), then `<home-id>`, then `<name>`. Each
    /// must be ours and private ([`check_private_dir`]): whoever controls one of them
    /// could answer for pen's supervisor (and receive env values and keystrokes) or make
    /// `pen delete` remove what a symlink in it points to.
    pub fn runtime_levels(&self, name: &str) -> Vec<PathBuf> {
        let home_id = &hex::encode(Sha256::digest(self.root.as_os_str().as_encoded_bytes()))[..12];
        let fits = |dir: &Path| dir.as_os_str().len() + 1 + LONGEST_SOCKET_NAME <= MAX_SOCKET_PATH;
        let levels = |base: PathBuf| {
            let hid = base.join(home_id);
            let dir = hid.join(name);
            vec![base, hid, dir]
        };
        if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
            let found = levels(PathBuf::from(xdg).join("pen"));
            if fits(&found[2]) {
                return found;
            }
        }
        let uid = nix::unistd::geteuid().as_raw();
        levels(PathBuf::from(format!("/tmp/pen-{uid}")))
    }
}

/// What [`check_private_dir`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirState {
    Missing,
    /// A directory of ours, mode 0700, not a symlink.
    Private,
}

/// Checks a directory pen creates for itself (runtime directories): by `lstat`, so a
/// symlink is seen as one; it must be a directory owned by us with no group or other
/// permissions. One of ours that others may only read or enter (made by an older pen under
/// a 022 umask) is tightened to 0700; one others may write, or anyone else's, is refused
/// with a one-line error naming it and what to do.
pub fn check_private_dir(path: &Path) -> anyhow::Result<DirState> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DirState::Missing),
        Err(e) => anyhow::bail!("cannot check {}: {e}", path.display()),
    };
    let me = nix::unistd::geteuid().as_raw();
    let mode = meta.permissions().mode() & 0o7777;
    let problem = if meta.file_type().is_symlink() {
        "a symlink".to_string()
    } else if !meta.is_dir() {
        "not a directory".to_string()
    } else if meta.uid() != me {
        format!("owned by uid {}, not by you (uid {me})", meta.uid())
    } else if mode & 0o022 != 0 {
        format!("writable by others (mode {mode:04o})")
    } else {
        if mode & 0o077 != 0 {
            tighten(path)?;
        }
        return Ok(DirState::Private);
    };
    anyhow::bail!(
        "{} is {problem}; pen keeps its sockets there and will not use it: remove it (as its owner or root) or set XDG_RUNTIME_DIR to a private directory of yours",
        path.display()
    )
}

/// chmod 0700 through a descriptor opened without following symlinks.
fn tighten(path: &Path) -> anyhow::Result<()> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    nix::sys::stat::fchmod(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        Mode::from_bits_truncate(0o700),
    )
    .map_err(|e| anyhow::anyhow!("cannot make {} private: {e}", path.display()))
}

/// Creates `path` (mode 0700) unless it exists, then checks it ([`check_private_dir`]).
pub fn ensure_private_dir(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => anyhow::bail!("cannot create {}: {e}", path.display()),
    }
    check_private_dir(path).map(|_| ())
}

/// Why `dir` must not be shared with a VM, or `None` when it may be. All three paths are
/// canonical. A guest can write everything it is given: the host's root, the user's home
/// (`~/.bashrc`, keys) or anything holding it, and pen's own home (other VMs' `vm.json`,
/// snapshot `state` every later VM of an image loads) or anything holding it, are refused.
pub fn share_refusal(dir: &Path, pen_home: &Path, user_home: Option<&Path>) -> Option<String> {
    if dir == Path::new("/") {
        return Some("is the host's root directory".into());
    }
    if let Some(home) = user_home {
        if dir == home {
            return Some(
                "is your home directory (the VM could edit ~/.bashrc and your keys)".into(),
            );
        }
        if home.starts_with(dir) {
            return Some(format!("contains your home directory {}", home.display()));
        }
    }
    if dir.starts_with(pen_home) {
        return Some(format!(
            "is inside pen's own directory {} (VM configurations, images, snapshots)",
            pen_home.display()
        ));
    }
    if pen_home.starts_with(dir) {
        return Some(format!(
            "contains pen's own directory {} (VM configurations, images, snapshots)",
            pen_home.display()
        ));
    }
    None
}

/// `path` made absolute with symlinks resolved, as far as it exists: the missing tail (a
/// `PEN_HOME` not created yet) is appended as it is.
pub fn canonical_lenient(path: &Path) -> PathBuf {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = path.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(canonical) = existing.canonicalize() {
            return rest.iter().rev().fold(canonical, |p, part| p.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return path,
        }
    }
}

/// The files of one VM.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub runtime: PathBuf,
    /// The directories pen creates down to `runtime` (see [`PenHome::runtime_levels`]).
    runtime_levels: Vec<PathBuf>,
}

impl VmPaths {
    pub fn new(home: &PenHome, name: &str) -> Self {
        let runtime_levels = home.runtime_levels(name);
        VmPaths {
            dir: home.vm_dir(name),
            runtime: runtime_levels[2].clone(),
            runtime_levels,
        }
    }

    /// Creates the runtime directory, each level private (0700) and checked.
    pub fn ensure_runtime(&self) -> anyhow::Result<()> {
        self.runtime_levels
            .iter()
            .try_for_each(|dir| ensure_private_dir(dir))
    }

    /// Checks the runtime directory's levels as far as they exist: `Ok(true)` when all
    /// exist and are private, `Ok(false)` when one is missing (nothing runs), an error when
    /// one is not ours or not private. Call it before connecting to or removing anything
    /// in there.
    pub fn check_runtime(&self) -> anyhow::Result<bool> {
        for dir in &self.runtime_levels {
            if check_private_dir(dir)? == DirState::Missing {
                return Ok(false);
            }
        }
        Ok(true)
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("vm.json")
    }
    pub fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }
    pub fn overlay(&self) -> PathBuf {
        self.dir.join("overlay.img")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn supervisor_log(&self) -> PathBuf {
        self.dir.join("supervisor.log")
    }
    pub fn supervisor_socket(&self) -> PathBuf {
        self.runtime.join("pen.sock")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.runtime.join("agent.sock")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.runtime.join("qmp.sock")
    }
    pub fn virtiofs_socket(&self) -> PathBuf {
        self.runtime.join("virtiofs.sock")
    }
    pub fn migrate_socket(&self) -> PathBuf {
        self.runtime.join("migrate.sock")
    }
    /// The supervisor's network backend listens here; QEMU's `-netdev stream` connects.
    pub fn net_socket(&self) -> PathBuf {
        self.runtime.join("net.sock")
    }
    /// What the supervisor noticed about the running VM ([`crate::notes`]).
    pub fn notes(&self) -> PathBuf {
        self.runtime.join("notes.json")
    }

    /// Removes the VM's runtime sockets (and the directory, when empty): a supervisor's
    /// leftovers, called only by whoever holds the VM's lock. Nothing, unless the runtime
    /// directory is ours and private.
    pub fn remove_sockets(&self) {
        if !matches!(self.check_runtime(), Ok(true)) {
            return;
        }
        for sock in [
            self.supervisor_socket(),
            self.agent_socket(),
            self.qmp_socket(),
            self.virtiofs_socket(),
            // virtiofsd's lock file beside its socket (removed once its holder is gone).
            self.runtime.join("virtiofs.sock.pid"),
            self.migrate_socket(),
            self.net_socket(),
            self.notes(),
        ] {
            let _ = std::fs::remove_file(sock);
        }
        let _ = std::fs::remove_dir(&self.runtime);
    }

    /// [`VmPaths::remove_sockets`], then the home's runtime directory (`<home-id>`) when it
    /// is empty: for a pen home that is going away (a builder VM's private one).
    pub fn remove_runtime(&self) {
        self.remove_sockets();
        if matches!(
            check_private_dir(&self.runtime_levels[1]),
            Ok(DirState::Private)
        ) {
            let _ = std::fs::remove_dir(&self.runtime_levels[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_stay_short_even_with_long_runtime_dirs() {
        let home = PenHome::at("/tmp/some/very/long/pen/home/directory/for/tests");
        let name = "a".repeat(63);
        let vm = VmPaths::new(&home, &name);
        for sock in [
            vm.virtiofs_socket(),
            vm.agent_socket(),
            vm.qmp_socket(),
            vm.supervisor_socket(),
            vm.net_socket(),
        ] {
            assert!(
                sock.as_os_str().len() <= MAX_SOCKET_PATH,
                "{}",
                sock.display()
            );
        }
    }

    #[test]
    fn sharing_refuses_root_home_and_pen_home_in_either_direction() {
        let pen = Path::new("/home/u/.config/pen");
        let home = Some(Path::new("/home/u"));
        for refused in [
            "/",
            "/home",
            "/home/u",
            "/home/u/.config",
            "/home/u/.config/pen",
            "/home/u/.config/pen/vms",
            "/home/u/.config/pen/vms/dev",
        ] {
            assert!(
                share_refusal(Path::new(refused), pen, home).is_some(),
                "{refused} should be refused"
            );
        }
        for allowed in ["/home/u/src/project", "/srv/data", "/home/u/.config/penny"] {
            assert_eq!(
                share_refusal(Path::new(allowed), pen, home),
                None,
                "{allowed}"
            );
        }
        // PEN_HOME elsewhere: its ancestors are refused too.
        let pen = Path::new("/var/lib/pen");
        assert!(share_refusal(Path::new("/var"), pen, home).is_some());
        assert_eq!(share_refusal(Path::new("/var/www"), pen, None), None);
    }

    #[test]
    fn canonical_lenient_keeps_the_missing_tail() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        assert_eq!(
            canonical_lenient(&dir.path().join("a/b")),
            real.join("a").join("b")
        );
        assert_eq!(canonical_lenient(dir.path()), real);
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn private_dir_check() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        assert_eq!(check_private_dir(&dir).unwrap(), DirState::Missing);
        ensure_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(check_private_dir(&dir).unwrap(), DirState::Private);

        // Ours, readable by others (an older pen under umask 022): tightened.
        set_mode(&dir, 0o755);
        assert_eq!(check_private_dir(&dir).unwrap(), DirState::Private);
        assert_eq!(mode(&dir), 0o700);

        // Writable by others: refused, left as it is.
        set_mode(&dir, 0o777);
        let err = check_private_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("writable by others (mode 0777)"), "{err}");
        assert!(err.contains(&dir.display().to_string()), "{err}");
        assert_eq!(mode(&dir), 0o777);
        set_mode(&dir, 0o700);

        // A symlink to a private directory of ours is still a symlink.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = check_private_dir(&link).unwrap_err().to_string();
        assert!(err.contains("is a symlink"), "{err}");
        assert!(ensure_private_dir(&link).is_err());

        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(check_private_dir(&file)
            .unwrap_err()
            .to_string()
            .contains("not a directory"));
    }

    #[test]
    fn private_dir_check_refuses_someone_elses() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("theirs");
        ensure_private_dir(&dir).unwrap();
        let foreign = nix::unistd::Uid::from_raw(65534);
        if let Err(e) = nix::unistd::chown(&dir, Some(foreign), None) {
            eprintln!("skipped: cannot make a directory owned by another uid ({e}; needs root)");
            return;
        }
        let err = check_private_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("owned by uid 65534"), "{err}");
        assert!(ensure_private_dir(&dir).is_err());
    }

    #[test]
    fn runtime_levels_end_in_the_runtime_dir() {
        let home = PenHome::at("/tmp/a");
        let levels = home.runtime_levels("dev");
        assert_eq!(levels.len(), 3);
        assert_eq!(levels[2], home.runtime_dir("dev"));
        assert_eq!(levels[1], levels[2].parent().unwrap());
        assert_eq!(levels[0], levels[1].parent().unwrap());
    }

    #[test]
    fn different_homes_get_different_runtime_dirs() {
        let a = PenHome::at("/tmp/a").runtime_dir("dev");
        let b = PenHome::at("/tmp/b").runtime_dir("dev");
        assert_ne!(a, b);
    }
}
