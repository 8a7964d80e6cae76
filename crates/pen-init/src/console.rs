//! The kernel console (ttyS0): where the host's `console.log` comes from. Only boot progress
//! and failures are printed here, never env values or the configuration.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

/// Mounts devtmpfs (idempotent) and points fds 0, 1 and 2 at `/dev/console` where closed.
pub fn setup() -> std::io::Result<()> {
    let _ = std::fs::create_dir_all("/dev");
    // EBUSY when already mounted (e.g. kernel automount); harmless.
    let _ = nix::mount::mount(
        Some("devtmpfs"),
        "/dev",
        Some("devtmpfs"),
        nix::mount::MsFlags::MS_NOSUID,
        Some("mode=0755"),
    );
    let console = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_noctty()
        .open("/dev/console")?;
    for fd in 0..=2 {
        // SAFETY: F_GETFD on a small integer only queries the fd table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // SAFETY: dup2 onto a closed descriptor number; `console` stays owned by us.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
    Ok(())
}

trait NoCtty {
    fn custom_flags_noctty(&mut self) -> &mut Self;
}

impl NoCtty for std::fs::OpenOptions {
    fn custom_flags_noctty(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        // PID 1 must not acquire the console as its controlling terminal: a ^C typed on the
        // serial line would then signal init.
        self.custom_flags(libc::O_NOCTTY)
    }
}

/// Turns on progress output (`pen.debug` on the kernel command line).
pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Prints one line to the console. Errors are ignored: there is nowhere else to report them.
pub fn print(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// Prints a progress line only in debug mode.
pub fn debug(line: &str) {
    if debug_enabled() {
        print(&format!("pen-init: {line}"));
    }
}
