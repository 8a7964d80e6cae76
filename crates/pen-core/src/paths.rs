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
        let home_id = &hex::encode(Sha256::digest(self.root.as_os_str().as_encoded_bytes()))[..12];
        let fits = |dir: &Path| dir.as_os_str().len() + 1 + LONGEST_SOCKET_NAME <= MAX_SOCKET_PATH;
        if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
            let dir = PathBuf::from(xdg).join("pen").join(home_id).join(name);
            if fits(&dir) {
                return dir;
            }
        }
        let uid = nix::unistd::getuid().as_raw();
        PathBuf::from(format!("/tmp/pen-{uid}"))
            .join(home_id)
            .join(name)
    }
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
            return Some("is your home directory (the VM could edit ~/.bashrc and your keys)".into());
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
}

impl VmPaths {
    pub fn new(home: &PenHome, name: &str) -> Self {
        VmPaths {
            dir: home.vm_dir(name),
            runtime: home.runtime_dir(name),
        }
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

    /// Removes the VM's runtime sockets (and the directory, when empty): a supervisor's
    /// leftovers, called only by whoever holds the VM's lock.
    pub fn remove_sockets(&self) {
        for sock in [
            self.supervisor_socket(),
            self.agent_socket(),
            self.qmp_socket(),
            self.virtiofs_socket(),
            self.migrate_socket(),
        ] {
            let _ = std::fs::remove_file(sock);
        }
        let _ = std::fs::remove_dir(&self.runtime);
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
            assert_eq!(share_refusal(Path::new(allowed), pen, home), None, "{allowed}");
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

    #[test]
    fn different_homes_get_different_runtime_dirs() {
        let a = PenHome::at("/tmp/a").runtime_dir("dev");
        let b = PenHome::at("/tmp/b").runtime_dir("dev");
        assert_ne!(a, b);
    }
}
