//! Powering the VM off. QEMU runs with `-no-reboot`, so any reboot(2) ends the VM; power-off
//! is used because it says what we mean.

use std::time::Duration;

use nix::sys::reboot::{reboot, RebootMode};

/// Syncs and powers off. Never returns: PID 1 exiting would panic the kernel.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = reboot(RebootMode::RB_POWER_OFF);
    // Only reachable without CAP_SYS_BOOT (e.g. when run outside a VM by mistake).
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// True for a process the shutdown must wait for: not init, not a kernel thread (kthreadd is
/// pid 2 and the parent of every other kernel thread). `stat` is `/proc/<pid>/stat`.
pub fn is_user_process(pid: i32, stat: &str) -> bool {
    if pid <= 2 {
        return false;
    }
    // The command name may contain spaces and parentheses: fields resume after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return false;
    };
    let mut fields = rest.split_whitespace();
    let _state = fields.next();
    let ppid: i32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    ppid != 2
}

fn user_processes_left() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            return false;
        };
        std::fs::read_to_string(e.path().join("stat")).is_ok_and(|s| is_user_process(pid, &s))
    })
}

async fn wait_for_no_processes(limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if !user_processes_left() {
            return true;
        }
        // The reaper task collects the zombies meanwhile.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    !user_processes_left()
}

/// The orderly stop requested by the host: SIGTERM everything, SIGKILL what is left after 2 s,
/// sync, unmount the workspace, make the overlay read-only (clean ext4), power off.
/// `overlay` is the O_PATH handle on the overlay disk's mount (unreachable by path).
pub async fn shutdown(overlay: Option<&std::os::fd::OwnedFd>) -> ! {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use std::os::fd::AsRawFd;

    let all = Pid::from_raw(-1);
    let _ = kill(all, Signal::SIGTERM);
    if !wait_for_no_processes(Duration::from_secs(2)).await {
        let _ = kill(all, Signal::SIGKILL);
        wait_for_no_processes(Duration::from_secs(1)).await;
    }
    nix::unistd::sync();
    if crate::boot::mounts::is_mountpoint(crate::boot::system::WORKSPACE)
        && umount2(crate::boot::system::WORKSPACE, MntFlags::empty()).is_err()
    {
        let _ = umount2(crate::boot::system::WORKSPACE, MntFlags::MNT_DETACH);
    }
    let ro = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    // overlayfs syncs its upper layer on a read-only remount ...
    if let Err(e) = mount(None::<&str>, "/", None::<&str>, ro, None::<&str>) {
        crate::console::debug(&format!("remount / read-only: {e}"));
    }
    // ... and the ext4 below gets a clean, read-only state (journal flushed).
    if let Some(fd) = overlay {
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        if let Err(e) = mount(None::<&str>, path.as_str(), None::<&str>, ro, None::<&str>) {
            crate::console::print(&format!(
                "pen-init: shutdown: remount overlay disk read-only: {e}"
            ));
        }
    }
    power_off();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_user_processes_from_kernel_threads() {
        assert!(is_user_process(
            345,
            "345 (bash) S 1 345 345 34816 345 4194560 0 0 0 0"
        ));
        assert!(!is_user_process(17, "17 (kworker/0:1-events) I 2 0 0 0 -1"));
        assert!(!is_user_process(2, "2 (kthreadd) S 0 0 0 0 -1"));
        assert!(!is_user_process(1, "1 (init) S 0 1 1 0 -1"));
        assert!(is_user_process(99, "99 (we) ird)) R 57 99 99 0 -1"));
    }
}
