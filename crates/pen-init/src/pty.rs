//! Pseudo-terminals for tty sessions.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::pty::{openpty, Winsize};
use pen_proto::WindowSize;

pub fn winsize(size: WindowSize) -> Winsize {
    Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// A new pty pair of `size`: (master, non-blocking and close-on-exec; slave).
pub fn open(size: WindowSize) -> nix::Result<(OwnedFd, OwnedFd)> {
    let pair = openpty(Some(&winsize(size)), None)?;
    let flags = OFlag::from_bits_truncate(fcntl(pair.master.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(
        pair.master.as_raw_fd(),
        FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK),
    )?;
    fcntl(
        pair.master.as_raw_fd(),
        FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC),
    )?;
    fcntl(
        pair.slave.as_raw_fd(),
        FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC),
    )?;
    Ok((pair.master, pair.slave))
}

/// TIOCSWINSZ on the master; the kernel then sends SIGWINCH to the foreground group.
pub fn resize(master: &OwnedFd, size: WindowSize) -> nix::Result<()> {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads a valid winsize struct.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    nix::errno::Errno::result(rc).map(drop)
}

/// The foreground process group of the terminal, if any.
pub fn foreground_group(master: &OwnedFd) -> Option<i32> {
    // SAFETY: tcgetpgrp on a valid fd.
    let pgrp = unsafe { libc::tcgetpgrp(master.as_raw_fd()) };
    (pgrp > 0).then_some(pgrp)
}
