//! PID 1 reaps every process: sessions' children, and orphans re-parented to init.
//!
//! One task waits for SIGCHLD and collects every exit with `waitpid(-1, WNOHANG)`. A status
//! for a watched pid goes to its session; any other is an orphan's and is discarded. This is
//! why nothing here uses `tokio::process` or `Child::wait`: their per-child waits would race
//! with (and lose to) this loop.
//!
//! Spawning and [`Reaper::watch`] must happen with no `.await` in between: on the
//! current-thread runtime the reaper task cannot then run in the gap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use pen_proto::ExitStatus;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

#[derive(Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<ExitStatus>>>,
}

impl Reaper {
    /// Installs the SIGCHLD handler and starts the reaping task.
    pub fn start() -> std::io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper::default());
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                // Reap first: children may have exited before the handler was installed.
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    /// Delivers the exit status of `pid` to the returned receiver.
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pid, tx);
        rx
    }

    /// Collects every exited child without blocking.
    pub fn reap_all(&self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Exited(code)),
                Ok(WaitStatus::Signaled(pid, sig, _core)) => {
                    (pid, ExitStatus::Signaled(sig as i32))
                }
                // Stopped/continued are not reported without WUNTRACED/WCONTINUED.
                Ok(WaitStatus::StillAlive) => return,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                // ECHILD: no children at all.
                Err(_) => return,
            };
            let (pid, status) = status;
            let waiter = self
                .waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&pid.as_raw());
            if let Some(tx) = waiter {
                let _ = tx.send(status);
            }
        }
    }
}
