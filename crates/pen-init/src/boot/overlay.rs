//! The root image (squashfs, read-only) and the per-VM overlay disk (ext4) combined with
//! overlayfs into the new root.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::fcntl::OFlag;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;

use super::{mounts, BootError, NEWROOT, OVERLAY_MNT, SYSROOT};

/// Byte offset of `s_magic` in an ext2/3/4 superblock (superblock at 1024 + field at 56).
const EXT4_MAGIC_OFFSET: usize = 1080;
const EXT4_MAGIC: u16 = 0xEF53;

/// True when `head` (the first bytes of a device) holds an ext2/3/4 superblock magic.
pub fn has_ext4_magic(head: &[u8]) -> bool {
    head.get(EXT4_MAGIC_OFFSET..EXT4_MAGIC_OFFSET + 2)
        .is_some_and(|b| u16::from_le_bytes([b[0], b[1]]) == EXT4_MAGIC)
}

/// Byte offset of `s_state` in an ext2/3/4 superblock (superblock at 1024 + field at 58).
const EXT4_STATE_OFFSET: usize = 1082;
/// `s_state` bit: the kernel found errors (an aborted journal after the host disk filled up).
const EXT4_ERROR_FS: u16 = 0x0002;

/// True when `head` (the first bytes of an ext4 device) says the file system has errors.
pub fn has_ext4_errors(head: &[u8]) -> bool {
    head.get(EXT4_STATE_OFFSET..EXT4_STATE_OFFSET + 2)
        .is_some_and(|b| u16::from_le_bytes([b[0], b[1]]) & EXT4_ERROR_FS != 0)
}

/// The overlay disk's first 2 KiB: enough for the superblock's magic and state.
fn device_head(dev: &Path) -> Result<Vec<u8>, BootError> {
    let mut head = vec![0u8; 2048];
    let mut f = std::fs::File::open(dev)
        .map_err(|e| BootError::new("overlay", format!("open {}: {e}", dev.display())))?;
    f.read_exact(&mut head)
        .map_err(|e| BootError::new("overlay", format!("read {}: {e}", dev.display())))?;
    Ok(head)
}

/// Stage 1: mounts the root image read-only at [`SYSROOT`].
pub fn mount_root_image(dev: &Path) -> Result<(), BootError> {
    std::fs::create_dir_all(SYSROOT).map_err(|e| BootError::new("root", e.to_string()))?;
    super::system::mount_squashfs(dev, SYSROOT)
        .map_err(|e| BootError::new("root", format!("mount {} (squashfs): {e}", dev.display())))
}

/// Formats `dev` with the root image's own mkfs.ext4 (the initramfs has no tools).
fn make_ext4(dev: &Path) -> Result<(), BootError> {
    let out = run_root_tool(
        Command::new("/sbin/mkfs.ext4")
            .args(["-F", "-q", "-L", "pen-overlay", "-E"])
            .arg("lazy_itable_init=1,lazy_journal_init=1")
            .arg(dev),
        "mkfs.ext4",
    )?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(BootError::new(
            "overlay",
            format!(
                "mkfs.ext4 {} failed ({}): {}",
                dev.display(),
                out.status,
                stderr.trim()
            ),
        ));
    }
    Ok(())
}

/// Repairs `dev` with the root image's `e2fsck -p` (what it can fix without asking). The
/// kernel marks the file system with errors when its journal aborts, which is what a host
/// disk that filled up leads to: the guest's writes failed, and what the journal had not
/// committed is lost. Exit codes 0-2 mean clean or fixed; 4 and up, left with errors.
fn check_ext4(dev: &Path) -> Result<(), BootError> {
    let out = run_root_tool(Command::new("/sbin/e2fsck").arg("-p").arg(dev), "e2fsck")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0..=2) => {
            eprintln!(
                "pen-init: the overlay disk had errors; e2fsck -p fixed them: {}",
                stdout.trim()
            );
            Ok(())
        }
        _ => Err(BootError::new(
            "overlay",
            format!(
                "the VM's disk has errors that e2fsck -p cannot fix ({}): {} {}; its files can be copied out of the disk image on the host, or the VM deleted and created again",
                out.status,
                stdout.trim(),
                stderr.trim()
            ),
        )),
    }
}

/// Runs a tool of the root image, chrooted into it with /dev, /proc and /sys mounted.
fn run_root_tool(command: &mut Command, name: &str) -> Result<std::process::Output, BootError> {
    let tool_mounts = mounts::mount_tool_env(SYSROOT)?;
    let result = command
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .current_dir("/")
        .pipe_output()
        .chroot_to(SYSROOT)
        .output();
    mounts::unmount_all(&tool_mounts);
    result.map_err(|e| BootError::new("overlay", format!("run {name}: {e}")))
}

trait CommandSetup {
    fn pipe_output(&mut self) -> &mut Self;
    fn chroot_to(&mut self, root: &'static str) -> &mut Self;
}

impl CommandSetup for Command {
    fn pipe_output(&mut self) -> &mut Self {
        self.stdout(Stdio::piped()).stderr(Stdio::piped())
    }

    fn chroot_to(&mut self, root: &'static str) -> &mut Self {
        // SAFETY: chroot and chdir are async-signal-safe; nothing is allocated in the child.
        unsafe {
            self.pre_exec(move || {
                nix::unistd::chroot(root)?;
                nix::unistd::chdir("/")?;
                Ok(())
            })
        }
    }
}

/// Stage 1, step 4: overlay disk → ext4 (formatted on first boot) mounted at [`OVERLAY_MNT`]
/// with `upper/` and `work/`. Returns an `O_PATH` handle on the mount, used at shutdown to
/// remount it read-only once it is no longer reachable by path.
pub fn prepare_overlay_disk(dev: &Path) -> Result<(OwnedFd, bool), BootError> {
    let head = device_head(dev)?;
    let formatted = if has_ext4_magic(&head) {
        if has_ext4_errors(&head) {
            check_ext4(dev)?;
        }
        false
    } else {
        make_ext4(dev)?;
        true
    };
    std::fs::create_dir_all(OVERLAY_MNT).map_err(|e| BootError::new("overlay", e.to_string()))?;
    // Journal replay after an unclean stop happens inside this mount.
    mount(
        Some(dev),
        OVERLAY_MNT,
        Some("ext4"),
        MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .map_err(|e| BootError::new("overlay", format!("mount {} (ext4): {e}", dev.display())))?;
    for dir in ["upper", "work"] {
        let p = format!("{OVERLAY_MNT}/{dir}");
        std::fs::create_dir_all(&p)
            .map_err(|e| BootError::new("overlay", format!("mkdir {p}: {e}")))?;
    }
    let handle = nix::fcntl::open(
        OVERLAY_MNT,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| BootError::new("overlay", format!("open {OVERLAY_MNT}: {e}")))?;
    // SAFETY: `open` just returned this fd and nothing else owns it.
    let handle = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(handle) };
    Ok((handle, formatted))
}

/// Stage 1, step 5 (first half): overlayfs of the root image and the overlay disk at
/// [`NEWROOT`].
pub fn mount_merged_root() -> Result<(), BootError> {
    std::fs::create_dir_all(NEWROOT).map_err(|e| BootError::new("root", e.to_string()))?;
    let opts =
        format!("lowerdir={SYSROOT},upperdir={OVERLAY_MNT}/upper,workdir={OVERLAY_MNT}/work");
    mount(
        Some("overlay"),
        NEWROOT,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| BootError::new("root", format!("mount overlayfs: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_ext4_magic() {
        let mut head = vec![0u8; 2048];
        assert!(!has_ext4_magic(&head));
        head[1080] = 0x53;
        head[1081] = 0xEF;
        assert!(has_ext4_magic(&head));
        // Byte order matters: the superblock is little endian.
        head[1080] = 0xEF;
        head[1081] = 0x53;
        assert!(!has_ext4_magic(&head));
    }

    #[test]
    fn detects_the_error_state() {
        let mut head = vec![0u8; 2048];
        assert!(!has_ext4_errors(&head));
        head[1082] = 0x01; // EXT2_VALID_FS: clean
        assert!(!has_ext4_errors(&head));
        head[1082] = 0x03; // valid, with errors
        assert!(has_ext4_errors(&head));
        assert!(!has_ext4_errors(&head[..1083]));
    }

    #[test]
    fn short_buffer_is_not_ext4() {
        assert!(!has_ext4_magic(&[0u8; 1081]));
        assert!(!has_ext4_magic(&[]));
    }
}
