//! One session relayed between the host's stdio and a process in the guest, within the
//! session's windows (see [`pen_proto::window`]): output is granted back as it is written
//! to stdout, and stdin is read only as far as the guest's grants allow.

use std::io::{Read, Write};

use anyhow::Context;

use futures::{SinkExt, StreamExt};
use pen_proto::{Credit, ExecRequest, ExitStatus, Frame, Inbound, Message, CLIENT_SESSION};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::terminal::{self, RawMode};
use super::Conn;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `pen shell`: SIGTERM/SIGHUP to pen end the session (an interactive shell ignores
    /// SIGTERM, so forwarding alone would leave pen hanging).
    Shell,
    /// `pen exec`: signals are forwarded and pen waits for the process's exit status.
    Exec,
    /// `pen exec` that must not read its stdin (a terminal nobody asked to forward): the
    /// process gets end of input at once.
    ExecNoInput,
}

/// Runs `request` and relays until the process exits; returns its shell-style status.
pub(super) async fn run(
    mut conn: Conn,
    name: &str,
    request: ExecRequest,
    kind: Kind,
) -> anyhow::Result<i32> {
    let tty = request.tty.is_some();
    // Declared before anything that can fail, so every return restores the terminal.
    let _raw = if tty { RawMode::enter()? } else { None };

    conn.framed
        .send(Frame::new(CLIENT_SESSION, Message::Exec(request)))
        .await?;

    let (mut stdin_rx, _reader) = if kind == Kind::ExecNoInput {
        // Never touch the terminal: a background reader would be stopped by SIGTTIN.
        conn.framed
            .send(Frame::new(CLIENT_SESSION, Message::Stdin(Vec::new())))
            .await?;
        (mpsc::channel(1).1, None)
    } else {
        let (rx, reader) = spawn_stdin_reader();
        (rx, Some(reader))
    };
    let mut stdin_open = kind != Kind::ExecNoInput;
    // Stdin read but not sent yet for want of credit; nothing more is read meanwhile.
    let mut unsent: Vec<u8> = Vec::new();
    let mut input = Credit::new();
    let mut output = Inbound::new();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigquit = signal(SignalKind::quit())?;
    let mut sigwinch = signal(SignalKind::window_change())?;

    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    loop {
        // As much of the unsent stdin as the guest's window takes.
        let n = unsent.len().min(input.available());
        if n > 0 {
            input.spend(n)?;
            let rest = unsent.split_off(n);
            let data = std::mem::replace(&mut unsent, rest);
            conn.framed
                .send(Frame::new(CLIENT_SESSION, Message::Stdin(data)))
                .await?;
        }
        let outgoing = tokio::select! {
            frame = conn.framed.next() => {
                let frame = received(frame, name)?;
                if frame.session != CLIENT_SESSION {
                    // VM-wide notices. A `Log` line (the host disk is full) goes to stderr,
                    // on a line of its own; after `Shutdown` the session's own end follows.
                    if let Message::Log { text } = frame.message {
                        stdout.flush()?;
                        let eol = if tty { "\r\n" } else { "\n" };
                        let _ = write!(stderr, "{eol}{}{eol}", text.replace('\n', eol));
                    }
                    continue;
                }
                match frame.message {
                    Message::Stdout(bytes) => {
                        output.receive(bytes.len())?;
                        stdout.write_all(&bytes)?;
                        stdout.flush()?;
                        output.consumed(bytes.len()).map(Message::Window)
                    }
                    Message::Stderr(bytes) => {
                        output.receive(bytes.len())?;
                        stdout.flush()?;
                        stderr.write_all(&bytes)?;
                        output.consumed(bytes.len()).map(Message::Window)
                    }
                    Message::Window(n) => {
                        input.grant(n)?;
                        None
                    }
                    Message::Exit(status) => {
                        stdout.flush()?;
                        return Ok(status.code());
                    }
                    Message::Error(e) => anyhow::bail!(e),
                    _ => None,
                }
            }
            data = stdin_rx.recv(), if stdin_open && unsent.is_empty() => {
                match data {
                    Some(data) if !data.is_empty() => {
                        unsent = data;
                        None
                    }
                    // End of input: no bytes, so no credit needed.
                    _ => {
                        stdin_open = false;
                        Some(Message::Stdin(Vec::new()))
                    }
                }
            }
            _ = sigwinch.recv(), if tty => Some(Message::Resize(terminal::window_size())),
            _ = sigint.recv() => Some(Message::Signal(libc::SIGINT)),
            _ = sigquit.recv() => Some(Message::Signal(libc::SIGQUIT)),
            _ = sigterm.recv() => {
                if kind == Kind::Shell {
                    hang_up(&mut conn).await;
                    return Ok(128 + libc::SIGTERM);
                }
                Some(Message::Signal(libc::SIGTERM))
            }
            _ = sighup.recv() => {
                if kind == Kind::Shell {
                    hang_up(&mut conn).await;
                    return Ok(128 + libc::SIGHUP);
                }
                Some(Message::Signal(libc::SIGHUP))
            }
        };
        if let Some(message) = outgoing {
            conn.framed
                .send(Frame::new(CLIENT_SESSION, message))
                .await?;
        }
    }
}

/// Writes a session's output to `stdout`/`stderr` as it arrives, until its exit status,
/// granting the window back as it writes: a slow consumer stalls the guest's process.
pub(super) async fn relay_output(
    conn: &mut Conn,
    name: &str,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<ExitStatus> {
    let mut output = Inbound::new();
    loop {
        let frame = received(conn.framed.next().await, name)?;
        if frame.session != CLIENT_SESSION {
            continue;
        }
        let written = match frame.message {
            Message::Stdout(bytes) => {
                output.receive(bytes.len())?;
                stdout
                    .write_all(&bytes)
                    .context("writing the command's output")?;
                stdout.flush().context("writing the command's output")?;
                bytes.len()
            }
            Message::Stderr(bytes) => {
                output.receive(bytes.len())?;
                stderr
                    .write_all(&bytes)
                    .context("writing the command's errors")?;
                stderr.flush().context("writing the command's errors")?;
                bytes.len()
            }
            Message::Exit(status) => return Ok(status),
            Message::Error(e) => anyhow::bail!(e),
            _ => 0,
        };
        if let Some(n) = output.consumed(written) {
            conn.framed
                .send(Frame::new(CLIENT_SESSION, Message::Window(n)))
                .await?;
        }
    }
}

/// A frame read from the supervisor, or the error that ends the session: a malformed
/// frame or a lost connection.
fn received(
    next: Option<std::io::Result<Result<Frame, pen_proto::DecodeError>>>,
    name: &str,
) -> anyhow::Result<Frame> {
    match next {
        Some(Ok(Ok(frame))) => Ok(frame),
        Some(Ok(Err(bad))) => anyhow::bail!("malformed frame from VM {name}'s supervisor: {bad}"),
        Some(Err(e)) => anyhow::bail!("lost the connection to VM {name}: {e}"),
        None => anyhow::bail!("lost the connection to VM {name}"),
    }
}

async fn hang_up(conn: &mut Conn) {
    let _ = conn
        .framed
        .send(Frame::new(CLIENT_SESSION, Message::Signal(libc::SIGHUP)))
        .await;
}

/// Reads stdin on a thread of its own: blocking reads need no O_NONBLOCK on a descriptor
/// the user's shell shares with us. An empty chunk means end of input. The channel holds
/// one chunk: while the session is out of stdin credit, the thread stops reading.
fn spawn_stdin_reader() -> (mpsc::Receiver<Vec<u8>>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(1);
    let handle = std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(Vec::new());
                    return;
                }
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    (rx, handle)
}
