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
    /// The supervisor's network backend listens here; QEMU's `-netdev stream` connects.
    pub fn net_socket(&self) -> PathBuf {
        self.runtime.join("net.sock")
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
            self.net_socket(),
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
    fn different_homes_get_different_runtime_dirs() {
        let a = PenHome::at("/tmp/a").runtime_dir("dev");
        let b = PenHome::at("/tmp/b").runtime_dir("dev");
        assert_ne!(a, b);
    }
}
