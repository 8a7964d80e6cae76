//! Warms the page cache with the root image's files that the first session of any VM reads:
//! the dynamic loader, libc, the shells and their startup files. Done before the snapshot
//! point, so that a snapshot carries these pages: after a restore, the first command does not
//! wait for squashfs reads and decompression (measured ~120 ms of a 150 ms first `true`
//! under TCG). A few MB of guest RAM; a file that is missing is skipped.

use std::io::Read;
use std::path::Path;

/// Paths inside the root image. No component may be an absolute symlink: it would resolve
/// against the initramfs, not the root image (relative ones are fine).
const FILES: &[&str] = &[
    "etc/ld.so.cache",
    "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "usr/lib/x86_64-linux-gnu/libtinfo.so.6",
    "usr/bin/true",
    "usr/bin/dash",
    "usr/bin/bash",
    "etc/passwd",
    "etc/group",
    "etc/nsswitch.conf",
    "etc/profile",
    "etc/bash.bashrc",
    "etc/profile.d/bash_completion.sh",
    "usr/share/bash-completion/bash_completion",
    "root/.profile",
    "root/.bashrc",
];

/// Reads every file of [`FILES`] under `root` once; returns the bytes read.
pub fn warm(root: &Path) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    for name in FILES {
        let Ok(mut file) = std::fs::File::open(root.join(name)) else {
            continue;
        };
        while let Ok(n) = file.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    total
}

/// A handle on the initramfs's root directory, taken before the boot switches roots.
pub struct InitramfsRoot(std::os::fd::OwnedFd);

impl InitramfsRoot {
    pub fn open() -> std::io::Result<InitramfsRoot> {
        std::fs::File::open("/").map(|f| InitramfsRoot(f.into()))
    }
}

/// Runs `/usr/bin/true` once, from an overlayfs of the root image at `root` (a path in the
/// initramfs) over a scratch tmpfs, in a child with a mount namespace of its own, and waits
/// for it. After a restore QEMU's TCG translation cache is empty: this translates the
/// kernel's fork/exec/exit paths, the loader and libc start-up, and overlayfs's mount and
/// read paths on the idle second vCPU, while the boot waits for its overlay disk, instead of
/// on the boot's own path (its overlayfs mount) and in the first session.
///
/// Nothing of it is seen outside the child: it works from the initramfs's root (`initramfs`)
/// whatever root the boot has switched to meanwhile, and its mounts live in its namespace and
/// go with it. Failures are ignored: it is only a warm-up.
pub fn warm_exec(initramfs: &InitramfsRoot, root: &'static str) {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("/usr/bin/true");
    cmd.env_clear()
        .stdin(std::process::Stdio::inherit())
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit());
    let initramfs_fd = std::os::fd::AsRawFd::as_raw_fd(&initramfs.0);
    // The same options as the boot's own overlayfs, with `root` as the lower layer; built
    // here, so that nothing is allocated in the child.
    let opts = format!("lowerdir={root},upperdir={SCRATCH}/upper,workdir={SCRATCH}/work");
    // SAFETY: the closure only makes system calls (its paths are short enough for nix's
    // stack buffers): nothing is allocated in the child.
    unsafe {
        cmd.pre_exec(move || rehearse_overlay(initramfs_fd, &opts));
    }
    let _ = cmd.status();
}

/// Where the warm-up child mounts its scratch tmpfs, in its own mount namespace.
const SCRATCH: &str = "/pen-warm";

/// In the warm-up child: back to the initramfs's root, private mounts, a tmpfs with upper and work directories, the
/// overlayfs, and a chroot into it.
fn rehearse_overlay(initramfs: std::os::fd::RawFd, opts: &str) -> std::io::Result<()> {
    use nix::mount::{mount, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    use nix::sys::stat::Mode;
    nix::unistd::fchdir(initramfs)?;
    nix::unistd::chroot(".")?;
    unshare(CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    let mkdir = |path: &str| match nix::unistd::mkdir(path, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(e),
    };
    mkdir(SCRATCH)?;
    mount(
        Some("tmpfs"),
        SCRATCH,
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )?;
    for dir in ["/pen-warm/upper", "/pen-warm/work", "/pen-warm/merged"] {
        mkdir(dir)?;
    }
    mount(
        Some("overlay"),
        "/pen-warm/merged",
        Some("overlay"),
        MsFlags::empty(),
        Some(opts),
    )?;
    nix::unistd::chroot("/pen-warm/merged")?;
    nix::unistd::chdir("/")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_exists_and_skips_the_rest() {
        let dir = std::env::temp_dir().join(format!("pen-init-prefetch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("usr/bin")).unwrap();
        std::fs::write(dir.join("usr/bin/true"), vec![1u8; 100_000]).unwrap();
        std::fs::write(dir.join("usr/bin/dash"), b"x").unwrap();
        assert_eq!(warm(&dir), 100_001);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn paths_are_relative() {
        assert!(FILES.iter().all(|f| !f.starts_with('/')));
    }
}
