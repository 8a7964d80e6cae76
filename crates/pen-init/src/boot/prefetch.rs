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

/// Runs `/usr/bin/true` from the root image at `root` (chrooted there) once and waits for it.
/// After a restore QEMU's TCG translation cache is empty: this translates the kernel's
/// fork/exec/exit paths, the loader and libc start-up while the boot waits for its
/// overlay disk, instead of in the first session. Reads nothing but the root image;
/// failures are ignored (it is only a warm-up).
pub fn warm_exec(root: &'static str) {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("/usr/bin/true");
    cmd.env_clear()
        .stdin(std::process::Stdio::inherit())
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit());
    // SAFETY: chroot and chdir are async-signal-safe; nothing is allocated in the child.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::chroot(root)?;
            nix::unistd::chdir("/")?;
            Ok(())
        });
    }
    let _ = cmd.status();
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
