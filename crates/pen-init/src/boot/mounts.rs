//! API filesystems and the switch into the merged root.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::{BootError, StageExt};

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), BootError> {
    std::fs::create_dir_all(target).stage("mounts")?;
    mount(Some(source), target, Some(fstype), flags, data)
        .map_err(|e| BootError::new("mounts", format!("mount {fstype} on {target}: {e}")))
}

/// True when `path` is the root of a mount (its device differs from its parent's).
pub fn is_mountpoint(path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(me) = std::fs::metadata(path) else {
        return false;
    };
    let parent = Path::new(path).parent().unwrap_or(Path::new("/"));
    match std::fs::metadata(parent) {
        Ok(p) => p.dev() != me.dev() || p.ino() == me.ino(),
        Err(_) => false,
    }
}

/// Stage 1, step 1: the API filesystems every later step (and every session) relies on.
pub fn mount_api_filesystems() -> Result<(), BootError> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nosuid_nodev_noexec, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, None)?;
    // console::setup normally mounted devtmpfs already.
    if !is_mountpoint("/dev") {
        mount_fs(
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        )?;
    }
    // A private devpts instance; /dev/ptmx (devtmpfs) resolves to the "pts" next to it.
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    mount_fs(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_fs(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    Ok(())
}

/// The API mounts moved into the new root, in order. Sub-mounts (/dev/pts, /dev/shm) move
/// along with their parent.
pub const MOVED_MOUNTS: [&str; 5] = ["/proc", "/sys", "/dev", "/run", "/tmp"];

/// Stage 1, step 5 (second half): moves the API mounts into `newroot`, then makes `newroot`
/// the root with `mount --move . /` + `chroot .` (pivot_root is refused from an initramfs).
pub fn switch_root(newroot: &str) -> Result<(), BootError> {
    for m in MOVED_MOUNTS {
        let target = format!("{newroot}{m}");
        std::fs::create_dir_all(&target)
            .map_err(|e| BootError::new("root", format!("mkdir {target}: {e}")))?;
        mount(
            Some(m),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|e| BootError::new("root", format!("move {m} to {target}: {e}")))?;
    }
    nix::unistd::chdir(newroot).stage("root")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| BootError::new("root", format!("move {newroot} to /: {e}")))?;
    nix::unistd::chroot(".").stage("root")?;
    nix::unistd::chdir("/").stage("root")?;
    Ok(())
}

/// Mounts devtmpfs and proc inside `root` so that tools run chrooted there (mkfs.ext4) find
/// device nodes and /proc/mounts. Returns the mounts to undo with [`unmount_all`].
pub fn mount_tool_env(root: &str) -> Result<Vec<String>, BootError> {
    let mut done = Vec::new();
    for (src, dir, fstype) in [("devtmpfs", "/dev", "devtmpfs"), ("proc", "/proc", "proc")] {
        let target = format!("{root}{dir}");
        mount(
            Some(src),
            target.as_str(),
            Some(fstype),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| BootError::new("overlay", format!("mount {fstype} on {target}: {e}")))?;
        done.push(target);
    }
    Ok(done)
}

pub fn unmount_all(targets: &[String]) {
    for t in targets.iter().rev() {
        let _ = umount2(t.as_str(), MntFlags::MNT_DETACH);
    }
}
