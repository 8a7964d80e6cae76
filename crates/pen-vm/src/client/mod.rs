//! `pen shell`, `pen exec`, `pen start` and `pen stop` as clients of a VM's supervisor.
//!
//! The supervisor's socket speaks the pen protocol. On connecting, the client sends
//! `Hello`; the supervisor answers `Hello`, then `Ready` once the VM is up (boot `Log`
//! lines before it while booting), `Shutdown` when the VM is stopping, or `Error` when the
//! boot failed. A connection then carries one session (`Exec` on [`CLIENT_SESSION`]), or a
//! VM-wide request (`Shutdown`, `KeepRunning`). Every open connection keeps a VM started
//! by `shell`/`exec` alive; it stops when the last one closes.

mod session;
pub mod terminal;

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use pen_proto::{
    BootMode, ExecRequest, ExitStatus, Frame, FrameCodec, Message, TtyRequest, CLIENT_SESSION,
    CONTROL, PROTOCOL_VERSION,
};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

use crate::accel::{self, Accel};
use crate::supervisor::{Params, Report};
use pen_core::paths::{PenHome, VmPaths};
use pen_core::progress::Progress;
use pen_core::vm::{self, Status, VmConfig};

/// How to start a VM that is not running.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// `--accel`; `None` consults `PEN_ACCEL`, then detects.
    pub accel: Option<Accel>,
    /// Resolved `--env`/`--env-from-host` values: sent to the guest over the control
    /// channel, never written anywhere.
    pub env: Vec<(String, String)>,
    /// `pen start`: keep running without sessions until `pen stop`.
    pub keep_running: bool,
    pub rootfs: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub setup_script: Option<String>,
    /// No boot progress display (setup output and the TCG notice are still shown).
    pub quiet: bool,
    /// `Build` boots an image builder VM: no workspace, and the VM's `dir` need not exist.
    pub mode: BootMode,
    /// Identity of `kernel` + `initrd` + `rootfs`, the key of their snapshots: it must
    /// change whenever any of the three does (the base image's `image_id`; for a profile
    /// image, one covering its root image too). Empty: no snapshots.
    pub image_id: String,
    /// `--no-snapshot`: boot cold, neither restoring nor saving a snapshot.
    pub no_snapshot: bool,
    /// Extra CA certificates (PEM blocks) the VM trusts at this start, read from the host
    /// by the caller: like env values, they travel only to the guest, never to a file.
    pub ca_certs: Vec<String>,
}

/// How long a VM may sit locked but not answering (a supervisor starting up or shutting
/// down) before we give up waiting for it.
const UNRESPONSIVE_LIMIT: Duration = Duration::from_secs(60);
/// How long the lock may be held with no supervisor of ours behind it (a supervisor takes
/// the lock a moment before writing its pid) before we say someone else holds it.
const STRANGER_LIMIT: Duration = Duration::from_secs(3);

/// The error for a lock held by something that is not the VM's supervisor (another
/// program, or another user's process that could open the file): respawning supervisors
/// would only lose the lock race again and again.
fn held_by_stranger(paths: &VmPaths, name: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "VM {name}'s lock {} is held by a process that is not its pen supervisor; find it with `fuser -v {}`, end it and try again",
        paths.lock().display(),
        paths.lock().display()
    )
}

/// Whether the pid in the VM's lock is its live supervisor (see [`vm::is_supervisor`]).
fn supervisor_alive(home: &PenHome, paths: &VmPaths, name: &str) -> bool {
    vm::lock_pid(paths).is_some_and(|pid| vm::is_supervisor(paths, pid, home.root(), name))
}

/// Makes sure VM `vm.name` runs, starting its supervisor if needed, and returns once it is
/// ready for sessions. Two callers racing end with one VM, both attached. When the VM is
/// already running and `keep_running` is set, it is switched to run until `pen stop`.
///
/// The connection used to check readiness stays open until this process's next
/// [`shell`]/[`exec`] has connected, so the VM cannot stop in between.
pub fn ensure_running(home: &PenHome, vm: &VmConfig, opts: StartOptions) -> anyhow::Result<()> {
    let choice = accel::choose(opts.accel)?;
    let paths = VmPaths::new(home, &vm.name);
    let rt = runtime()?;
    let mut unresponsive_since: Option<Instant> = None;
    // Since when the lock has been held with no supervisor of ours behind it.
    let mut stranger_since: Option<Instant> = None;
    let mut stranger = |paths: &VmPaths| -> anyhow::Result<()> {
        if supervisor_alive(home, paths, &vm.name) {
            stranger_since = None;
        } else if stranger_since.get_or_insert_with(Instant::now).elapsed() > STRANGER_LIMIT {
            return Err(held_by_stranger(paths, &vm.name));
        }
        Ok(())
    };
    loop {
        match rt.block_on(attach(&paths, &vm.name, opts.keep_running, opts.quiet))? {
            Attach::Ready => return Ok(()),
            Attach::Failed(msg) => anyhow::bail!(msg),
            Attach::Stopping => {
                wait_stopped(&paths, UNRESPONSIVE_LIMIT);
                continue;
            }
            Attach::NotRunning => {}
        }
        if let (Status::Running, pid) = vm::status(&paths) {
            // Locked without an answering socket: a supervisor between taking the lock and
            // binding its socket, or one shutting down. Either resolves in moments.
            stranger(&paths)?;
            let since = *unresponsive_since.get_or_insert_with(Instant::now);
            if since.elapsed() > UNRESPONSIVE_LIMIT {
                anyhow::bail!(
                    "VM {} is locked by a supervisor (pid {}) that does not answer; `pen stop --force {}` ends it",
                    vm.name,
                    pid.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into()),
                    vm.name
                );
            }
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        unresponsive_since = None;
        crate::supervisor::check_overlay(&paths, &vm.name, vm.disk_size)?;
        let params = Params {
            accel: choice.accel,
            env: opts.env.clone(),
            keep_running: opts.keep_running,
            kernel: opts.kernel.clone(),
            initrd: opts.initrd.clone(),
            rootfs: opts.rootfs.clone(),
            setup_script: opts.setup_script.clone(),
            mode: opts.mode,
            image_id: opts.image_id.clone(),
            no_snapshot: opts.no_snapshot,
            ca_certs: opts.ca_certs.clone(),
        };
        match spawn_supervisor(home, &paths, &vm.name, &params, &choice, opts.quiet)? {
            // Hold the VM for our session; if it is gone already, the loop starts it again.
            Report::Ready => continue,
            // Someone else's supervisor won the lock: attach to it. Unless no supervisor
            // holds it: a shared lock on the file (the status probe takes one) beats every
            // supervisor we start, so say so instead of starting them forever.
            Report::Busy => {
                stranger(&paths)?;
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Report::Error(msg) => anyhow::bail!(msg),
            Report::Log(_) | Report::Started => {
                unreachable!("spawn_supervisor returns terminal reports only")
            }
        }
    }
}

/// An interactive shell in `/workspace` on a PTY (a plain session when stdin is not a
/// terminal). Returns the shell's exit status.
pub fn shell(home: &PenHome, name: &str, env: Vec<(String, String)>) -> anyhow::Result<i32> {
    let tty = std::io::stdin().is_terminal().then(host_tty);
    let request = ExecRequest {
        argv: Vec::new(),
        env,
        cwd: None,
        tty,
    };
    run_session(home, name, request, session::Kind::Shell)
}

/// A PTY shaped like this process's terminal, with its TERM.
fn host_tty() -> TtyRequest {
    TtyRequest {
        term: terminal::term(),
        size: terminal::window_size(),
    }
}

/// Whether `pen exec` forwards its stdin: always when it is not a terminal; from a
/// terminal only when asked (`-i`, or `-t`). Reading a terminal we were not asked to read
/// stops a background `pen` (SIGTTIN) for good, though the command may read nothing.
pub fn forward_stdin(stdin_is_terminal: bool, interactive: bool, tty: bool) -> bool {
    !stdin_is_terminal || interactive || tty
}

/// Runs `argv` in the VM: stdout/stderr apart (`tty`: on a PTY instead); stdin forwarded
/// when `stdin` is set, else end of input right away (see [`forward_stdin`]).
/// Returns the remote status: its exit code, or 128+N when killed by signal N.
pub fn exec(
    home: &PenHome,
    name: &str,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    tty: bool,
    stdin: bool,
) -> anyhow::Result<i32> {
    let tty = tty.then(host_tty);
    let request = ExecRequest {
        argv,
        env,
        cwd: None,
        tty,
    };
    let kind = if stdin {
        session::Kind::Exec
    } else {
        session::Kind::ExecNoInput
    };
    run_session(home, name, request, kind)
}

/// Runs `argv` in VM `name` for a program rather than a user (the image builder): no TTY,
/// empty stdin, no signal handling; this process's own stdin is never read. Output is
/// written to `stdout`/`stderr` frame by frame as it arrives (a `tar` of the guest's root
/// streams through here), so a slow writer slows the guest down rather than filling memory.
///
/// Like [`exec`], it releases the hold [`ensure_running`] took: a VM started without
/// `keep_running` stops when this session ends. Start builder VMs with `keep_running` to
/// run several commands, then [`stop`] them.
pub fn run_captured(
    home: &PenHome,
    name: &str,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<ExitStatus> {
    let paths = VmPaths::new(home, name);
    let rt = runtime()?;
    rt.block_on(async {
        let mut conn = session_connection(&paths, name).await?;
        let request = ExecRequest {
            argv,
            env,
            cwd: None,
            tty: None,
        };
        conn.framed
            .send(Frame::new(CLIENT_SESSION, Message::Exec(request)))
            .await?;
        // End of input right away: the process must never wait for stdin.
        conn.framed
            .send(Frame::new(CLIENT_SESSION, Message::Stdin(Vec::new())))
            .await?;
        session::relay_output(&mut conn, name, stdout, stderr).await
    })
}

/// Stops VM `name`: the guest syncs and powers off; `force` kills QEMU when it does not
/// within a few seconds, and kills a supervisor that no longer answers.
pub fn stop(home: &PenHome, name: &str, force: bool) -> anyhow::Result<()> {
    let paths = VmPaths::new(home, name);
    paths.check_runtime()?;
    let (status, pid) = vm::status(&paths);
    if status == Status::Stopped {
        anyhow::bail!("VM {name} is not running");
    }
    let rt = runtime()?;
    let asked = rt.block_on(async {
        let limit = Duration::from_secs(if force { 3 } else { 10 });
        let Ok(Some(mut conn)) = connect_within(&paths, limit).await else {
            return false;
        };
        if conn
            .framed
            .send(Frame::control(Message::Shutdown { force }))
            .await
            .is_err()
        {
            return false;
        }
        // The supervisor closes every connection when the VM is down.
        let limit = Duration::from_secs(if force { 20 } else { 60 });
        let _ = tokio::time::timeout(limit, async {
            while let Some(Ok(_)) = conn.framed.next().await {}
        })
        .await;
        true
    });
    if wait_stopped(&paths, Duration::from_secs(if asked { 10 } else { 3 })) {
        return Ok(());
    }
    match (force, pid) {
        (true, Some(pid)) if !vm::is_supervisor(&paths, pid, home.root(), name) => anyhow::bail!(
            "VM {name}'s lock names pid {pid}, which is not its pen supervisor (the pid was reused, or another program holds the lock); not killing it: find the holder with `fuser -v {}`",
            paths.lock().display()
        ),
        (true, Some(pid)) => {
            // Its QEMU and virtiofsd die with it (PR_SET_PDEATHSIG).
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            if wait_stopped(&paths, Duration::from_secs(10)) {
                paths.remove_sockets();
                Ok(())
            } else {
                anyhow::bail!("VM {name} is still locked after killing its supervisor (pid {pid})")
            }
        }
        _ => anyhow::bail!(
            "VM {name} did not stop (supervisor pid {}); `pen stop --force {name}` kills it",
            pid.map(|p| p.to_string())
                .unwrap_or_else(|| "unknown".into())
        ),
    }
}

/// Ends VM `name` at once without asking its guest: SIGKILL to its supervisor and everything
/// under it (QEMU, virtiofsd), waited for, then its runtime directory removed. Only for VMs
/// whose disk is scratch (builder VMs), on an interrupt or for a dead build's leftovers.
pub fn kill_now(home: &PenHome, name: &str) {
    let paths = VmPaths::new(home, name);
    if let (Status::Running, Some(pid)) = vm::status(&paths) {
        if vm::is_supervisor(&paths, pid, home.root(), name) {
            pen_core::interrupt::kill_tree(
                pid,
                nix::sys::signal::Signal::SIGKILL,
                Duration::from_secs(10),
            );
        }
    }
    wait_stopped(&paths, Duration::from_secs(2));
    paths.remove_runtime();
}

/// Whether VM `name`'s supervisor answers on its socket.
pub fn is_answering(home: &PenHome, name: &str) -> bool {
    let paths = VmPaths::new(home, name);
    runtime()
        .map(|rt| rt.block_on(async { matches!(connect(&paths).await, Ok(Some(_))) }))
        .unwrap_or(false)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the client runtime")
}

fn run_session(
    home: &PenHome,
    name: &str,
    request: ExecRequest,
    kind: session::Kind,
) -> anyhow::Result<i32> {
    let paths = VmPaths::new(home, name);
    let rt = runtime()?;
    let code = rt.block_on(async {
        let conn = session_connection(&paths, name).await?;
        session::run(conn, name, request, kind).await
    });
    // The stdin reader thread may sit in a blocking read; do not wait for it.
    rt.shutdown_background();
    code
}

/// A connection for one session on the ready VM `name`. Once it is open it keeps the VM up,
/// so the hold taken by [`ensure_running`] is released.
async fn session_connection(paths: &VmPaths, name: &str) -> anyhow::Result<Conn> {
    let mut conn = connect(paths)
        .await?
        .ok_or_else(|| anyhow::anyhow!("VM {name} is not running"))?;
    match wait_ready(&mut conn, |_| {}).await? {
        Readiness::Ready => {}
        Readiness::Stopping => anyhow::bail!("VM {name} is stopping"),
        Readiness::Failed(msg) => anyhow::bail!(msg),
        Readiness::Gone => anyhow::bail!("VM {name} stopped"),
    }
    release_hold();
    Ok(conn)
}

/// A handshaken connection to a supervisor.
pub(crate) struct Conn {
    framed: Framed<UnixStream, FrameCodec>,
}

/// Connects and exchanges `Hello`. `None` when no supervisor listens.
async fn connect(paths: &VmPaths) -> anyhow::Result<Option<Conn>> {
    connect_within(paths, Duration::from_secs(10)).await
}

async fn connect_within(paths: &VmPaths, limit: Duration) -> anyhow::Result<Option<Conn>> {
    // Whoever controls the runtime directory could answer in our supervisor's place.
    if !paths.check_runtime()? {
        return Ok(None);
    }
    let stream = match UnixStream::connect(paths.supervisor_socket()).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("connecting to {}", paths.supervisor_socket().display()))
        }
    };
    let mut framed = Framed::new(stream, FrameCodec::new());
    if framed
        .send(Frame::control(Message::Hello {
            version: PROTOCOL_VERSION,
            software: format!("pen {}", pen_core::VERSION),
        }))
        .await
        .is_err()
    {
        return Ok(None);
    }
    let Ok(reply) = tokio::time::timeout(limit, framed.next()).await else {
        let name = paths.dir.file_name().unwrap_or_default().to_string_lossy();
        anyhow::bail!(
            "VM {name}'s supervisor did not answer within {}s; `pen stop --force {name}` ends it",
            limit.as_secs()
        );
    };
    match reply {
        Some(Ok(Ok(Frame {
            message: Message::Hello { .. },
            ..
        }))) => Ok(Some(Conn { framed })),
        Some(Ok(Ok(Frame {
            message: Message::Error(e),
            ..
        }))) => anyhow::bail!(e),
        // Closed right away: a supervisor on its way out.
        None | Some(Err(_)) => Ok(None),
        Some(other) => anyhow::bail!("unexpected answer from the VM's supervisor: {other:?}"),
    }
}

enum Readiness {
    Ready,
    Stopping,
    Failed(String),
    Gone,
}

/// Reads until the VM is ready (or will not be), passing boot `Log` lines to `on_log`.
async fn wait_ready(conn: &mut Conn, mut on_log: impl FnMut(&str)) -> anyhow::Result<Readiness> {
    while let Some(item) = conn.framed.next().await {
        let Ok(Ok(frame)) = item else {
            return Ok(Readiness::Gone);
        };
        match (frame.session, frame.message) {
            (CONTROL, Message::Ready) => return Ok(Readiness::Ready),
            (CONTROL, Message::Shutdown { .. }) => return Ok(Readiness::Stopping),
            (CONTROL, Message::Log { text }) => on_log(&text),
            (_, Message::Error(e)) => return Ok(Readiness::Failed(e)),
            _ => {}
        }
    }
    Ok(Readiness::Gone)
}

enum Attach {
    Ready,
    Stopping,
    Failed(String),
    NotRunning,
}

/// Attaches to a running (or booting) VM and keeps the connection as the hold.
async fn attach(
    paths: &VmPaths,
    name: &str,
    keep_running: bool,
    quiet: bool,
) -> anyhow::Result<Attach> {
    let Some(mut conn) = connect(paths).await? else {
        return Ok(Attach::NotRunning);
    };
    if keep_running {
        conn.framed
            .send(Frame::control(Message::KeepRunning))
            .await?;
    }
    // Booting (another `pen` started it): show its progress while we wait.
    let mut progress: Option<Progress> = None;
    let first = tokio::time::timeout(
        Duration::from_millis(300),
        wait_ready(&mut conn, |line| eprintln!("{line}")),
    )
    .await;
    let readiness = match first {
        Ok(r) => r?,
        Err(_) => {
            if !quiet {
                progress = Some(Progress::start(&format!("waiting for VM {name} to boot")));
            }
            let p = &progress;
            wait_ready(&mut conn, |line| match p {
                Some(p) => p.println(line),
                None => eprintln!("{line}"),
            })
            .await?
        }
    };
    if let Some(p) = progress {
        match readiness {
            Readiness::Ready => p.finish("done"),
            _ => p.abandon(),
        }
    }
    Ok(match readiness {
        Readiness::Ready => {
            hold(conn);
            Attach::Ready
        }
        Readiness::Stopping => Attach::Stopping,
        Readiness::Failed(msg) => Attach::Failed(msg),
        Readiness::Gone => Attach::NotRunning,
    })
}

/// The connection that keeps a VM up between [`ensure_running`] and the session.
static HOLD: Mutex<Option<std::os::unix::net::UnixStream>> = Mutex::new(None);

fn hold(conn: Conn) {
    if let Ok(stream) = conn.framed.into_inner().into_std() {
        *HOLD.lock().unwrap() = Some(stream);
    }
}

fn release_hold() {
    HOLD.lock().unwrap().take();
}

/// Starts `pen __supervise NAME`, hands it the parameters and follows its boot. Returns
/// the terminal report: Ready, Busy or Error.
fn spawn_supervisor(
    home: &PenHome,
    paths: &VmPaths,
    name: &str,
    params: &Params,
    choice: &accel::Choice,
    quiet: bool,
) -> anyhow::Result<Report> {
    let exe = std::env::current_exe().context("finding the pen executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("__supervise")
        .arg(name)
        .env("PEN_HOME", home.root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // A builder VM serves this process only: it dies with it, even when this process is
    // SIGKILLed (its QEMU and virtiofsd die with the supervisor). The death signal fires
    // when the spawning *thread* ends; builds run on pen's main thread.
    let builder = params.mode == BootMode::Build;
    let parent = std::process::id();
    // SAFETY: setsid, prctl, getppid and _exit are async-signal-safe. A session of its own
    // from the first instant: Ctrl-C at the terminal must not reach the VM.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if builder {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // We may have died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the VM supervisor")?;
    // Interrupted while it boots (before its pid is in the lock, where the builder's own
    // registration finds it): it and its children go first.
    let child_pid = child.id();
    let _undo = builder.then(|| {
        pen_core::interrupt::on_interrupt(move || {
            pen_core::interrupt::kill_tree(
                child_pid,
                nix::sys::signal::Signal::SIGKILL,
                Duration::from_secs(10),
            )
        })
    });
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        let json = serde_json::to_vec(params)?;
        stdin
            .write_all(&json)
            .context("sending start parameters to the supervisor")?;
    }
    let stdout = child.stdout.take().expect("piped stdout");
    // Shown once the supervisor holds the lock: a `pen` that lost a race to start the VM
    // says nothing here and attaches to the winner instead.
    let mut progress: Option<Progress> = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let report = match serde_json::from_str::<Report>(&line) {
            Ok(r) => r,
            Err(_) => continue,
        };
        match report {
            Report::Started => {
                if let Some(notice) = &choice.notice {
                    eprintln!("pen: {notice}");
                }
                if !quiet {
                    progress = Some(Progress::start(&format!("booting VM {name}")));
                }
            }
            Report::Log(text) => match &progress {
                Some(p) => p.println(&text),
                None => eprintln!("{text}"),
            },
            Report::Ready => {
                if let Some(p) = progress {
                    p.finish("done");
                }
                return Ok(Report::Ready);
            }
            other => {
                if let Some(p) = progress {
                    p.abandon();
                }
                if other == Report::Busy {
                    let _ = child.wait();
                }
                return Ok(other);
            }
        }
    }
    if let Some(p) = progress {
        p.abandon();
    }
    let status = child.wait()?;
    let log = paths.supervisor_log();
    let tail = pen_core::fsutil::tail_lines(&log, 10);
    Ok(Report::Error(format!(
        "the supervisor of VM {name} exited during boot ({status}); {}:\n{tail}",
        log.display()
    )))
}

/// Waits up to `limit` for the VM's lock to be free. True when it is.
fn wait_stopped(paths: &VmPaths, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        if vm::status(paths).0 == Status::Stopped {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::forward_stdin;

    #[test]
    fn stdin_is_forwarded_unless_it_is_a_terminal_nobody_asked_for() {
        // (terminal, -i, -t) -> forwarded
        assert!(forward_stdin(false, false, false));
        assert!(!forward_stdin(true, false, false));
        assert!(forward_stdin(true, true, false));
        assert!(forward_stdin(true, false, true));
    }
}
