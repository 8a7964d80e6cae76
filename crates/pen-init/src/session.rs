//! One exec session: a process on plain pipes or on a pty, its output streamed to the host,
//! its exit reported once the output is drained.

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
use pen_proto::{ExecRequest, ExitStatus, Message, SessionId, WindowSize};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::link::LinkTx;
use crate::reaper::Reaper;

/// Largest output chunk sent in one frame.
pub const CHUNK: usize = 64 * 1024;
/// After the process exited, output still arriving is forwarded until the pipes/pty reach
/// EOF or stay quiet this long (a background job may keep them open forever).
const DRAIN_IDLE: Duration = Duration::from_millis(100);
/// Stdin bytes buffered per session before the link reader waits for the process.
pub const STDIN_BUDGET: usize = 8 * 1024 * 1024;

/// What every session needs from the VM's configuration.
pub struct Context {
    pub link: LinkTx,
    pub reaper: Arc<Reaper>,
    /// Defaults merged with the VM env from the host (see [`crate::env`]).
    pub env: Vec<(String, String)>,
    pub workspace_mounted: bool,
}

/// A chunk of stdin with the budget it holds until written.
pub struct StdinChunk {
    data: Vec<u8>,
    _permit: Option<OwnedSemaphorePermit>,
}

/// The agent's handle on a running session.
pub struct Handle {
    pub pid: i32,
    stdin: mpsc::UnboundedSender<StdinChunk>,
    stdin_budget: Arc<Semaphore>,
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
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
    tokio::spawn(stdin_loop(stdin_fd, stdin_rx, is_tty));
    tokio::spawn(output_loop(
        id,
        pid,
        ctx.link.clone(),
        outputs,
        exit,
        silenced.clone(),
        done,
    ));
    Ok(Handle {
        pid,
        stdin: stdin_tx,
        stdin_budget: Arc::new(Semaphore::new(STDIN_BUDGET)),
        master,
        silenced,
    })
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

impl Handle {
    /// Queues stdin; waits (at most `max_wait`) while the session's stdin budget is used up.
    /// Err: the process did not read its input in time.
    pub async fn stdin(&self, data: Vec<u8>, max_wait: Duration) -> Result<(), ()> {
        let n = data.len().min(STDIN_BUDGET) as u32;
        let permit =
            tokio::time::timeout(max_wait, self.stdin_budget.clone().acquire_many_owned(n))
                .await
                .map_err(|_| ())?
                .ok();
        // A closed channel means the process is gone: the bytes have nowhere to go.
        let _ = self.stdin.send(StdinChunk {
            data,
            _permit: permit,
        });
        Ok(())
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

async fn stdin_loop(
    fd: Arc<AsyncFd<OwnedFd>>,
    mut chunks: mpsc::UnboundedReceiver<StdinChunk>,
    is_tty: bool,
) {
    while let Some(chunk) = chunks.recv().await {
        if chunk.data.is_empty() {
            if is_tty {
                // A pty has no separate input to close; the line discipline handles ^D.
                continue;
            }
            break; // dropping the write end gives the process EOF
        }
        if crate::fdio::write_all(&fd, &chunk.data).await.is_err() {
            // EPIPE/EIO: the reader is gone. Drain and drop further input.
            break;
        }
    }
}

async fn output_loop(
    id: SessionId,
    pid: i32,
    link: LinkTx,
    outputs: Vec<(Arc<AsyncFd<OwnedFd>>, Stream)>,
    exit: tokio::sync::oneshot::Receiver<ExitStatus>,
    silenced: Arc<AtomicBool>,
    done: mpsc::UnboundedSender<(SessionId, i32)>,
) {
    let send = |message: Message| {
        let link = link.clone();
        let silenced = silenced.clone();
        async move {
            if !silenced.load(Ordering::SeqCst) {
                let _ = link.send(id, message).await;
            }
        }
    };
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
        tokio::select! {
            r = read_opt(out.as_ref().map(|(fd, _)| &**fd), &mut buf_out) => {
                match r {
                    Ok(n) if n > 0 => {
                        let msg = stream_message(out.as_ref().map(|o| o.1), &buf_out[..n]);
                        send(msg).await;
                        idle_deadline = Instant::now() + DRAIN_IDLE;
                    }
                    _ => out = None,
                }
            }
            r = read_opt(err.as_ref().map(|(fd, _)| &**fd), &mut buf_err) => {
                match r {
                    Ok(n) if n > 0 => {
                        let msg = stream_message(err.as_ref().map(|o| o.1), &buf_err[..n]);
                        send(msg).await;
                        idle_deadline = Instant::now() + DRAIN_IDLE;
                    }
                    _ => err = None,
                }
            }
            s = &mut exit, if status.is_none() => {
                // The sender only disappears if the reaper task died; report a kill.
                status = Some(s.unwrap_or(ExitStatus::Signaled(libc::SIGKILL)));
                idle_deadline = Instant::now() + DRAIN_IDLE;
            }
            _ = tokio::time::sleep_until(idle_deadline), if status.is_some() => break,
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
