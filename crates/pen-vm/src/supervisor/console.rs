//! The guest's serial console. QEMU writes it into a pipe (its `-chardev file` opens
//! `/proc/self/fd/N`); a thread copies it into `console.log`, capped and rotated
//! ([`pen_core::logfile`]): what the guest prints cannot fill the host's disk.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;

use anyhow::Context;
use pen_core::logfile::{CappedLog, CONSOLE_LOG_MAX};

/// Starts this run's console log: the previous run's becomes `console.log.1`.
pub(super) fn start_log(log: &Path) -> anyhow::Result<()> {
    CappedLog::start(log, CONSOLE_LOG_MAX)
        .map(drop)
        .with_context(|| format!("creating {}", log.display()))
}

/// A pipe whose read end a thread copies into `log` (appending) until every write end is
/// closed. Returns the write end (close-on-exec) for QEMU; the caller's copy must be
/// dropped once QEMU has it, so that QEMU's exit ends the thread.
pub(super) fn pipe(log: &Path) -> anyhow::Result<OwnedFd> {
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating the console pipe")?;
    // Room for bursts while the thread is not scheduled; the default is 64 KiB.
    let _ = nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&write),
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20),
    );
    let out = CappedLog::append(log, CONSOLE_LOG_MAX)
        .with_context(|| format!("opening {}", log.display()))?;
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || out.drain_from(File::from(read)))
        .context("starting the console thread")?;
    Ok(write)
}
