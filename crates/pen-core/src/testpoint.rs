//! A test hook for crash tests: with `PEN_TEST_PAUSE=<point>` in its environment, a pen
//! process (or a supervisor, which inherits it) that reaches `<point>` says so on stderr
//! and stops itself (SIGSTOP), so a test can SIGKILL it, or another process, exactly there,
//! or let it go on with SIGCONT. Without the variable, [`pause`] does nothing.
//!
//! Points: `write <file name>` ([`crate::fsutil::write_atomic`], between the synced temporary
//! and the rename), `overlay created` (a new overlay disk exists, not yet sized), `snapshot
//! migrate` (the guest is stopped for a snapshot, QEMU not yet asked for its state) and
//! `snapshot commit` (a snapshot's files are synced, not yet renamed into place).

/// The variable naming the point to stop at.
pub const ENV: &str = "PEN_TEST_PAUSE";

/// Stops this process when [`ENV`] names `point`; see the module doc.
pub fn pause(point: &str) {
    if std::env::var_os(ENV).is_some_and(|v| v == point) {
        eprintln!("pen: test pause at {point} (pid {})", std::process::id());
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
}
