//! Starting QEMU and virtiofsd as children that die with the supervisor, with their stderr
//! copied to the supervisor log and its last lines kept for error messages.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const TAIL_LINES: usize = 20;

/// The last lines a child wrote to stderr.
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn push(&self, line: String) {
        let mut lines = self.0.lock().unwrap();
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    pub fn text(&self) -> String {
        let lines = self.0.lock().unwrap();
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

pub struct Spawned {
    pub child: Child,
    pub stderr: Tail,
}

/// Spawns `program args` so that it is SIGKILLed when the supervisor dies. Must run on the
/// main thread (see the module doc of `supervisor`). The descriptors in `inherit` (opened
/// close-on-exec, as all of ours are) stay open in the child under the same numbers.
///
/// `pid_namespace` (root only) is for a program that changes its uid, which clears the
/// parent-death signal: the child then stays outside as the handle the supervisor waits on
/// and kills, forks the init of a new PID namespace that dies with it, and that init forks
/// the program. Whatever kills the handle (the supervisor's death included) kills the
/// namespace's init, and the kernel kills everything in the namespace with it. The handle
/// exits with the program's status (128 + N for signal N).
pub fn spawn(
    label: &'static str,
    program: &Path,
    args: &[OsString],
    inherit: &[RawFd],
    pid_namespace: bool,
) -> anyhow::Result<Spawned> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let parent = std::process::id();
    let inherit = inherit.to_vec();
    // SAFETY: only async-signal-safe calls (prctl, fcntl, getppid, unshare, fork, waitpid,
    // close_range, _exit) between fork and exec; `inherit` was allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // The supervisor may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            if pid_namespace {
                if libc::unshare(libc::CLONE_NEWPID) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let init = libc::fork();
                if init < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if init > 0 {
                    // The handle: holds nothing (spawn() waits for its descriptors to close).
                    close_from(3);
                    libc::_exit(wait_for(init));
                }
                // PID 1 of the namespace: dies with the handle, and the namespace with it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    libc::_exit(1);
                }
                let program = libc::fork();
                if program < 0 {
                    libc::_exit(1);
                }
                if program > 0 {
                    close_from(3);
                    libc::_exit(wait_for(program));
                }
                // The program itself: on to exec.
            }
            Ok(())
        });
    }
    eprintln!(
        "supervisor: starting {label}: {} {}",
        program.display(),
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} ({label})", program.display()))?;
    let tail = Tail::default();
    if let Some(stderr) = child.stderr.take() {
        let tail = tail.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("{label}: {line}");
                tail.push(line);
            }
        });
    }
    Ok(Spawned {
        child,
        stderr: tail,
    })
}

/// Closes every descriptor from `first` on (async-signal-safe).
fn close_from(first: u32) {
    // SAFETY: a plain syscall; on kernels without close_range the descriptors stay open,
    // which costs only spawn() returning when the child exits instead of at once.
    unsafe {
        libc::syscall(libc::SYS_close_range, first, u32::MAX, 0);
    }
}

/// Reaps children until `pid` exits (a PID namespace's init must reap whatever the
/// namespace leaves it); its exit code, or 128 + the signal that killed it.
/// Async-signal-safe.
fn wait_for(pid: libc::pid_t) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only `status`.
        let reaped = unsafe { libc::waitpid(-1, &mut status, 0) };
        if reaped == pid {
            return if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
        }
        if reaped < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 1;
        }
    }
}

/// Waits for `path` to appear (a socket a child creates), failing early if the child exits.
pub async fn wait_for_path(
    path: &Path,
    child: &mut Spawned,
    label: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if path.exists() {
            return Ok(());
        }
        if let Some(status) = child.child.try_wait()? {
            // Let the stderr pump catch up so the message has the child's last words.
            tokio::time::sleep(Duration::from_millis(50)).await;
            anyhow::bail!("{label} exited ({status}): {}", child.stderr.text());
        }
        if start.elapsed() > timeout {
            anyhow::bail!(
                "{label} did not create {} within {}s: {}",
                path.display(),
                timeout.as_secs(),
                child.stderr.text()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// SIGTERM, then SIGKILL after `grace`; reaps the child.
pub async fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}
