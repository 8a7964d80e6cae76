//! One exec session: a process on plain pipes or on a pty, its output streamed to the host
//! within the session's window (see [`crate::credit`]), its exit reported once the output
//! is drained.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pen_proto::{ExecRequest, ExitStatus, Message, SessionId, WindowError, WindowSize};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::credit::{OutputCredit, StdinWindow};
use crate::link::LinkTx;
use crate::reaper::Reaper;

/// Largest output chunk sent in one frame.
pub const CHUNK: usize = 64 * 1024;
/// After the process exited, output still arriving is forwarded until the pipes/pty reach
/// EOF or stay quiet this long (a background job may keep them open forever).
const DRAIN_IDLE: Duration = Duration::from_millis(100);
/// Longest program name quoted in an exec failure message (it travels as session output).
const MAX_QUOTED_PROGRAM: usize = 1024;

/// What every session needs from the VM's configuration.
pub struct Context {
    pub link: LinkTx,
    pub reaper: Arc<Reaper>,
    /// Defaults merged with the VM env from the host (see [`crate::env`]).
    pub env: Vec<(String, String)>,
    pub workspace_mounted: bool,
}

/// The agent's handle on a running session.
pub struct Handle {
    pub pid: i32,
    /// Stdin chunks for the writer task: never more than the stdin window holds, since
    /// [`Handle::stdin`] checks every chunk against it.
    stdin: mpsc::UnboundedSender<Vec<u8>>,
    stdin_window: Arc<StdinWindow>,
    output: Arc<OutputCredit>,
    master: Option<Arc<AsyncFd<OwnedFd>>>,
    /// Set when the session was ended with an error: the task stops sending frames.
    silenced: Arc<AtomicBool>,
}

/// Why a session did not start.
#[derive(Debug, PartialEq, Eq)]
pub enum StartError {
    /// Sent as [`Message::Error`].
    Refused(String),
    /// Shell convention: the message goes to the session's stderr (stdout for a tty), then
    /// `Exit(Exited(code))` (127: not found, 126: not executable).
    ExecFailed { message: String, code: i32 },
}

/// The argv to run: the request's, or the login shell.
pub fn program(argv: &[String]) -> Vec<String> {
    if !argv.is_empty() {
        return argv.to_vec();
    }
    let shell = if Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    vec![shell.to_string(), "-l".to_string()]
}

/// The working directory: the request's, else /workspace when mounted, else /root.
pub fn working_dir(requested: Option<&str>, workspace_mounted: bool) -> String {
    match requested {
        Some(dir) if !dir.is_empty() => dir.to_string(),
        _ if workspace_mounted => crate::boot::system::WORKSPACE.to_string(),
        _ => "/root".to_string(),
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

fn exec_failure(program: &str, err: &io::Error) -> StartError {
    let code = match err.kind() {
        io::ErrorKind::NotFound => 127,
        _ => 126,
    };
    let reason = match err.raw_os_error() {
        Some(errno) => nix::errno::Errno::from_raw(errno).desc().to_string(),
        None => err.to_string(),
    };
    // The message is session output: keep it far below the window whatever the request.
    let program = match program.char_indices().nth(MAX_QUOTED_PROGRAM) {
        Some((cut, _)) => format!("{}...", &program[..cut]),
        None => program.to_string(),
    };
    StartError::ExecFailed {
        message: format!("pen: {program}: {reason}\n"),
        code,
    }
}

/// Spawns the request's process and starts the session's tasks. `done` receives the session
/// id and pid when the session has sent its last frame.
pub fn start(
    id: SessionId,
    req: ExecRequest,
    ctx: &Context,
    done: mpsc::UnboundedSender<(SessionId, i32)>,
) -> Result<Handle, StartError> {
    let argv = program(&req.argv);
    let cwd = working_dir(req.cwd.as_deref(), ctx.workspace_mounted);
    if !Path::new(&cwd).is_dir() {
        return Err(StartError::Refused(format!(
            "working directory {cwd}: No such file or directory"
        )));
    }
    let tty_env;
    let mut layers: Vec<&[(String, String)]> = vec![&ctx.env];
    if let Some(tty) = &req.tty {
        tty_env = [("TERM".to_string(), tty.term.clone())];
        layers.push(&tty_env);
    }
    layers.push(&req.env);
    let env = crate::env::merge(layers);

    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&cwd);
    let refused =
        |what: &str, e: &dyn std::fmt::Display| StartError::Refused(format!("{what}: {e}"));

    let is_tty = req.tty.is_some();
    let (outputs, stdin_fd, master) = if let Some(tty) = &req.tty {
        let (master, slave) = crate::pty::open(tty.size).map_err(|e| refused("openpty", &e))?;
        cmd.stdout(Stdio::from(
            slave.try_clone().map_err(|e| refused("dup", &e))?,
        ));
        cmd.stderr(Stdio::from(
            slave.try_clone().map_err(|e| refused("dup", &e))?,
        ));
        cmd.stdin(Stdio::from(slave));
        // SAFETY: setsid and ioctl are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                // Make the pty (already on fd 0) the controlling terminal.
                if libc::ioctl(0, libc::TIOCSCTTY as _, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let master = Arc::new(crate::fdio::register(master).map_err(|e| refused("pty", &e))?);
        (
            vec![(master.clone(), Stream::Stdout)],
            master.clone(),
            Some(master),
        )
    } else {
        let (in_r, in_w) = pipe().map_err(|e| refused("pipe", &e))?;
        let (out_r, out_w) = pipe().map_err(|e| refused("pipe", &e))?;
        let (err_r, err_w) = pipe().map_err(|e| refused("pipe", &e))?;
        for fd in [&in_w, &out_r, &err_r] {
            crate::fdio::set_nonblocking(fd).map_err(|e| refused("pipe", &e))?;
        }
        cmd.stdin(Stdio::from(in_r))
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(err_w));
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                // Its own session and process group, so Signal reaches the whole job.
                nix::unistd::setsid()?;
                Ok(())
            });
        }
        let wrap = |fd| {
            crate::fdio::register(fd)
                .map(Arc::new)
                .map_err(|e| refused("pipe", &e))
        };
        let out = wrap(out_r)?;
        let err = wrap(err_r)?;
        (
            vec![(out, Stream::Stdout), (err, Stream::Stderr)],
            wrap(in_w)?,
            None,
        )
    };

    let child = cmd.spawn().map_err(|e| exec_failure(&argv[0], &e))?;
    // `cmd` still holds the child's ends of the pipes/pty: drop them now so EOF can happen.
    drop(cmd);
    let pid = child.id() as i32;
    // No await between spawn and watch: the reaper cannot collect the pid in between.
    let exit = ctx.reaper.watch(pid);
    drop(child); // never waited on through std: the reaper owns waitpid

    let silenced = Arc::new(AtomicBool::new(false));
    let output = Arc::new(OutputCredit::default());
    let stdin_window = Arc::new(StdinWindow::default());
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
    let sender = Sender {
        id,
        link: ctx.link.clone(),
        silenced: silenced.clone(),
    };
    tokio::spawn(stdin_loop(
        stdin_fd,
        stdin_rx,
        is_tty,
        stdin_window.clone(),
        sender.clone(),
    ));
    tokio::spawn(output_loop(
        pid,
        sender,
        outputs,
        output.clone(),
        exit,
        done,
    ));
    Ok(Handle {
        pid,
        stdin: stdin_tx,
        stdin_window,
        output,
        master,
        silenced,
    })
}

/// Sends a session's frames unless the session was silenced (ended with an error).
#[derive(Clone)]
struct Sender {
    id: SessionId,
    link: LinkTx,
    silenced: Arc<AtomicBool>,
}

impl Sender {
    async fn send(&self, message: Message) {
        if !self.silenced.load(Ordering::SeqCst) {
            let _ = self.link.send(self.id, message).await;
        }
    }
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

impl Handle {
    /// Queues stdin for the process; never waits. Err: the host sent more than the stdin
    /// window allows (the caller ends the session).
    pub fn stdin(&self, data: Vec<u8>) -> Result<(), WindowError> {
        self.stdin_window.receive(data.len())?;
        // A closed channel means the writer is gone with the session: nowhere to go.
        let _ = self.stdin.send(data);
        Ok(())
    }

    /// The host consumed `n` bytes of output. Err: it granted more than it was sent.
    pub fn grant(&self, n: u32) -> Result<(), WindowError> {
        self.output.grant(n)
    }

    pub fn resize(&self, size: WindowSize) {
        if let Some(master) = &self.master {
            let _ = crate::pty::resize(master.get_ref(), size);
        }
    }

    /// Signals the pty's foreground group, or the session's group.
    pub fn signal(&self, signo: i32) {
        let Ok(sig) = Signal::try_from(signo) else {
            return;
        };
        let group = self
            .master
            .as_ref()
            .and_then(|m| crate::pty::foreground_group(m.get_ref()))
            .unwrap_or(self.pid);
        if kill(Pid::from_raw(-group), sig).is_err() {
            let _ = kill(Pid::from_raw(self.pid), sig);
        }
    }

    /// Ends the session after an error: kills its process group; no further frames are sent.
    pub fn abort(&self) {
        self.silenced.store(true, Ordering::SeqCst);
        self.output.close();
        let _ = kill(Pid::from_raw(-self.pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
    }
}

async fn read_opt(fd: Option<&AsyncFd<OwnedFd>>, buf: &mut [u8]) -> io::Result<usize> {
    match fd {
        Some(fd) => crate::fdio::read_chunk(fd, buf).await,
        None => std::future::pending().await,
    }
}

/// Writes stdin chunks to the process and grants their bytes back to the host once written.
/// A process that stops reading stops the grants, and so the client's reading of its stdin.
async fn stdin_loop(
    fd: Arc<AsyncFd<OwnedFd>>,
    mut chunks: mpsc::UnboundedReceiver<Vec<u8>>,
    is_tty: bool,
    window: Arc<StdinWindow>,
    sender: Sender,
) {
    let mut fd = Some(fd);
    loop {
        let chunk = match chunks.try_recv() {
            Ok(chunk) => chunk,
            Err(mpsc::error::TryRecvError::Empty) => {
                // Running dry: grant what was written so far rather than wait for more.
                if let Some(n) = window.flush() {
                    sender.send(Message::Window(n)).await;
                }
                match chunks.recv().await {
                    Some(chunk) => chunk,
                    None => return,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => return,
        };
        if chunk.is_empty() {
            if !is_tty {
                fd = None; // dropping the write end gives the process EOF
            }
            // A pty has no separate input to close; the line discipline handles ^D.
            continue;
        }
        if let Some(out) = &fd {
            if crate::fdio::write_all(out, &chunk).await.is_err() {
                // EPIPE/EIO: the reader is gone. Further input is dropped (and granted, so
                // the client is not left waiting on a window that never reopens).
                fd = None;
            }
        }
        if let Some(n) = window.consumed(chunk.len()) {
            sender.send(Message::Window(n)).await;
        }
    }
}

/// Streams the process's output within the session's window: with no credit left it reads
/// nothing, so the process blocks on a full pipe (or pty) until the host grants more.
async fn output_loop(
    pid: i32,
    sender: Sender,
    outputs: Vec<(Arc<AsyncFd<OwnedFd>>, Stream)>,
    credit: Arc<OutputCredit>,
    exit: tokio::sync::oneshot::Receiver<ExitStatus>,
    done: mpsc::UnboundedSender<(SessionId, i32)>,
) {
    let id = sender.id;
    let send = |message: Message| sender.send(message);
    send(Message::Started { pid: pid as u32 }).await;

    let mut out = outputs.first().cloned();
    let mut err = outputs.get(1).cloned();
    let mut buf_out = vec![0u8; CHUNK];
    let mut buf_err = vec![0u8; CHUNK];
    let mut exit = std::pin::pin!(exit);
    let mut status: Option<ExitStatus> = None;
    let mut idle_deadline = Instant::now();

    loop {
        if out.is_none() && err.is_none() && status.is_some() {
            break;
        }
        // stdout and stderr share the window; no read at all while it is closed.
        let Some(room) = credit.available() else {
            // Aborted: the session sends nothing more.
            let _ = done.send((id, pid));
            return;
        };
        let room = room.min(CHUNK);
        tokio::select! {
            r = read_opt(out.as_ref().map(|(fd, _)| &**fd), &mut buf_out[..room]), if room > 0 => {
                match r {
                    Ok(n) if n > 0 => {
                        credit.spend(n);
                        let msg = stream_message(out.as_ref().map(|o| o.1), &buf_out[..n]);
                        send(msg).await;
                        idle_deadline = Instant::now() + DRAIN_IDLE;
                    }
                    _ => out = None,
                }
            }
            r = read_opt(err.as_ref().map(|(fd, _)| &**fd), &mut buf_err[..room]), if room > 0 => {
                match r {
                    Ok(n) if n > 0 => {
                        credit.spend(n);
                        let msg = stream_message(err.as_ref().map(|o| o.1), &buf_err[..n]);
                        send(msg).await;
                        idle_deadline = Instant::now() + DRAIN_IDLE;
                    }
                    _ => err = None,
                }
            }
            _ = credit.wait(), if room == 0 => {
                // The drain timer measures the process's silence, not the host's.
                idle_deadline = Instant::now() + DRAIN_IDLE;
            }
            s = &mut exit, if status.is_none() => {
                // The sender only disappears if the reaper task died; report a kill.
                status = Some(s.unwrap_or(ExitStatus::Signaled(libc::SIGKILL)));
                idle_deadline = Instant::now() + DRAIN_IDLE;
            }
            _ = tokio::time::sleep_until(idle_deadline), if status.is_some() && room > 0 => break,
        }
    }
    if let Some(status) = status {
        send(Message::Exit(status)).await;
    }
    let _ = done.send((id, pid));
}

fn stream_message(stream: Option<Stream>, data: &[u8]) -> Message {
    match stream {
        Some(Stream::Stderr) => Message::Stderr(data.to_vec()),
        _ => Message::Stdout(data.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_argv_is_a_login_shell() {
        let argv = program(&[]);
        assert_eq!(argv[1], "-l");
        assert!(argv[0] == "/bin/bash" || argv[0] == "/bin/sh");
        let given = vec!["echo".to_string(), "hi".to_string()];
        assert_eq!(program(&given), given);
    }

    #[test]
    fn working_dir_defaults() {
        assert_eq!(working_dir(Some("/srv"), true), "/srv");
        assert_eq!(working_dir(None, true), "/workspace");
        assert_eq!(working_dir(None, false), "/root");
        assert_eq!(working_dir(Some(""), false), "/root");
    }

    #[test]
    fn exec_failure_follows_shell_convention() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(
            exec_failure("nope", &e),
            StartError::ExecFailed {
                message: "pen: nope: No such file or directory\n".into(),
                code: 127
            }
        );
        let e = io::Error::from_raw_os_error(libc::EACCES);
        assert!(matches!(
            exec_failure("x", &e),
            StartError::ExecFailed { code: 126, .. }
        ));
    }
}
