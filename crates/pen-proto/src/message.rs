use serde::{Deserialize, Serialize};

/// Everything that travels in a [`crate::Frame`]. Directions are noted per variant:
/// H→G host (supervisor) to guest agent, G→H guest to host, C→S client to supervisor,
/// S→C supervisor to client. Session-scoped messages travel on every link.
///
/// # A session, with its windows
///
/// Each direction of a session has a window of [`WINDOW`](crate::WINDOW) bytes (see
/// [`crate::window`]): a sender starts with that much credit, data bytes (`Stdin`,
/// `Stdout` + `Stderr` together) spend it, and the receiver's [`Message::Window`] grants
/// give back what it has consumed. The supervisor forwards grants as it forwards data.
///
/// ```text
/// client            supervisor                 agent
///   Exec ─────────────▶ Exec (guest id) ─────────▶ spawn
///   ◀──────────────── Started ◀────────────────── Started
///   ◀──────────────── Stdout ◀─────────────────── Stdout   (agent credit -= n)
///   write to stdout
///   Window(n) ────────▶ Window(n) ───────────────▶ (agent credit += n)
///   Stdin ────────────▶ Stdin ───────────────────▶ write to the process's stdin
///   ◀──────────────── Window(n) ◀──────────────── Window(n)  (client credit += n)
///   ◀──────────────── Exit ◀───────────────────── Exit
/// ```
///
/// A sender out of credit stops reading its source (the process's pipes or PTY in the
/// guest, stdin in the client), so a stalled reader stalls the writer and nothing else.
/// Overrunning a window, or granting more than was received, ends that session with
/// [`Message::Error`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message each side sends on a link (G→H, H→G, C→S, S→C). A peer with a different
    /// `version` is refused with [`Message::Error`].
    Hello { version: u32, software: String },

    // ---- VM-wide, session CONTROL ----
    /// G→H: stage 1 finished up to the snapshot point; the agent waits for [`GuestConfig`].
    AwaitingConfig,
    /// H→G: the per-VM configuration. Env values travel only here, never on disk.
    Config(GuestConfig),
    /// G→H: boot finished; sessions may start.
    Ready,
    /// G→H: boot failed in `stage`; the guest powers off right after sending this.
    BootFailed { stage: String, message: String },
    /// G→H and S→C: a line of progress for the user (setup hook output, boot notices).
    Log { text: String },
    /// H→G: stop all sessions, sync, unmount, power off. C→S: stop the VM (`force` kills
    /// QEMU when the guest does not power off within the grace period).
    Shutdown { force: bool },
    /// C→S: keep the VM running after its last session ends (`pen start` on a running VM).
    KeepRunning,

    // ---- one session ----
    /// Start a process (H→G, C→S).
    Exec(ExecRequest),
    /// The process started (G→H, S→C).
    Started { pid: u32 },
    /// Bytes for the process's stdin (or its PTY). Empty = end of input.
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Bytes the process wrote to stdout (or its PTY).
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Bytes the process wrote to stderr (never used with a PTY).
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// New terminal size for a PTY session.
    Resize(WindowSize),
    /// Deliver a signal (number) to the session's process group.
    Signal(i32),
    /// The process ended. Last message of a session.
    Exit(ExitStatus),
    /// The session (or, on CONTROL, the request) failed; ends the session.
    Error(String),
    /// A credit grant: the receiver of this session's data has consumed this many more
    /// bytes, which the sender may now send. Travels opposite to the data it is for: toward
    /// the guest for output (C→S, H→G), toward the client for stdin (G→H, S→C).
    Window(u32),

    // ---- VM-wide, session CONTROL (added in protocol 4) ----
    /// H→G: the host file system holding the overlay disk has `free` bytes left, fewer than
    /// the guest's file system could still write there (its disk is a sparse file). The
    /// guest keeps what it lets its processes allocate below that, so that a full host disk
    /// shows in the guest as a full disk (ENOSPC at `write`), not as I/O errors. Sent when
    /// the figure matters and when it stops mattering (`u64::MAX`).
    HostSpace { free: u64 },
}

impl Message {
    /// The variant's name, for logs and errors: never its payload (stdin bytes, env values).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::AwaitingConfig => "AwaitingConfig",
            Message::Config(_) => "Config",
            Message::Ready => "Ready",
            Message::BootFailed { .. } => "BootFailed",
            Message::Log { .. } => "Log",
            Message::Shutdown { .. } => "Shutdown",
            Message::KeepRunning => "KeepRunning",
            Message::Exec(_) => "Exec",
            Message::Started { .. } => "Started",
            Message::Stdin(_) => "Stdin",
            Message::Stdout(_) => "Stdout",
            Message::Stderr(_) => "Stderr",
            Message::Resize(_) => "Resize",
            Message::Signal(_) => "Signal",
            Message::Exit(_) => "Exit",
            Message::Error(_) => "Error",
            Message::Window(_) => "Window",
            Message::HostSpace { .. } => "HostSpace",
        }
    }

    /// Bytes of session data the message carries: what windows count. `None` for messages
    /// that carry none.
    pub fn data_len(&self) -> Option<usize> {
        match self {
            Message::Stdin(d) | Message::Stdout(d) | Message::Stderr(d) => Some(d.len()),
            _ => None,
        }
    }
}

/// Per-VM configuration sent after the snapshot point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GuestConfig {
    pub hostname: String,
    /// Exported to every session. Kept in guest memory only.
    pub env: Vec<(String, String)>,
    /// Virtio-fs tag to mount at `/workspace`; `None` in build mode.
    pub workspace_tag: Option<String>,
    /// Host wall clock at the moment of sending: seconds and nanoseconds since the epoch.
    pub clock_secs: i64,
    pub clock_nanos: u32,
    pub mode: BootMode,
    /// First-boot setup script (profile `setup`), run once per VM with `bash -e`.
    pub setup_script: Option<String>,
    /// 32 random bytes from the host mixed into the guest's entropy pool.
    pub entropy: Vec<u8>,
    /// A fresh machine-id (32 lowercase hex characters) written to `/etc/machine-id`.
    pub machine_id: String,
    /// Read-only volumes to mount before `Ready`, each on its own disk slot.
    pub volumes: Vec<GuestVolume>,
    /// Extra CA certificates (PEM blocks) the VM trusts at this boot, in its system store
    /// and through the variables common tools read; none: the VM trusts only its own store.
    pub ca_certs: Vec<String>,
}

/// A read-only volume (squashfs) on disk slot `slot` (see [`crate::VOLUME_SLOTS`]), to be
/// mounted at `path` (absolute, checked by the host; the guest creates the mount point).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestVolume {
    pub slot: u8,
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum BootMode {
    /// A user VM: overlay disk, workspace, sessions.
    #[default]
    Shell,
    /// An image builder VM: scratch overlay, no workspace.
    Build,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecRequest {
    /// Program and arguments. Empty means the guest user's login shell.
    pub argv: Vec<String>,
    /// Added to (and overriding) the VM's env for this process only.
    pub env: Vec<(String, String)>,
    /// Working directory; `None` means `/workspace` when mounted, else `/root`.
    pub cwd: Option<String>,
    /// Run on a pseudo-terminal of this shape; `None` means plain pipes.
    pub tty: Option<TtyRequest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtyRequest {
    /// Value of `TERM` inside the guest.
    pub term: String,
    pub size: WindowSize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExitStatus {
    /// The status a shell would report: the exit code, or 128 + the signal number. The
    /// number comes from the guest, so it is clamped: 128 + N lands in 129..=255 for any N
    /// (a bogus signal cannot overflow or pose as a plain exit code).
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled(signal) => 128i32.saturating_add(signal).clamp(129, 255),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_follows_shell_convention() {
        assert_eq!(ExitStatus::Exited(3).code(), 3);
        assert_eq!(ExitStatus::Signaled(9).code(), 137);
    }

    #[test]
    fn hostile_signal_numbers_neither_overflow_nor_leave_the_signal_range() {
        assert_eq!(ExitStatus::Signaled(i32::MAX).code(), 255);
        assert_eq!(ExitStatus::Signaled(i32::MIN).code(), 129);
        assert_eq!(ExitStatus::Signaled(0).code(), 129);
        assert_eq!(ExitStatus::Signaled(127).code(), 255);
    }
}
