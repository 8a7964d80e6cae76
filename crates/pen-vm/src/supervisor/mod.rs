//! The supervisor: one process per running VM that owns QEMU, virtiofsd, the VM lock and
//! the agent link, and serves `pen shell` / `pen exec` / `pen stop` on a unix socket.
//!
//! It is started by [`crate::client::ensure_running`] as `pen __supervise NAME`. Start
//! parameters ([`Params`], which hold env values) arrive as one JSON document on its stdin
//! pipe, never in argv or a file; boot progress goes back as JSON lines ([`Report`]) on its
//! stdout pipe until the VM is ready or has failed. After that its stdio is
//! `vms/<name>/supervisor.log`.
//!
//! Children get `PR_SET_PDEATHSIG=SIGKILL`, so killing the supervisor, even with SIGKILL,
//! takes QEMU and virtiofsd with it. The death signal fires when the *thread* that forked
//! the child exits, which is why everything runs on a current-thread runtime on the main
//! thread.

mod boot;
mod children;
mod config;
mod console;
mod event;
mod guest_queue;
mod host_space;
mod machine;
mod network;
mod outbox;
mod overlay;
mod router;
mod serve;
mod sessions;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::{Deserialize, Serialize};

use crate::accel::Accel;
use pen_core::paths::{PenHome, VmPaths};
use pen_core::vm::{VmConfig, VmLock};
use pen_proto::BootMode;

pub use config::fresh_guest_config;
pub use network::REFUSAL_PREFIX;
pub use overlay::{check_overlay, overlay_marker, prepare_overlay};

/// What the spawner tells a new supervisor. Travels only over the stdin pipe: `env` holds
/// values the user wants kept off every disk and out of every argv.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    pub accel: Accel,
    pub env: Vec<(String, String)>,
    /// Keep the VM running when no session is left (`pen start`).
    pub keep_running: bool,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    pub setup_script: Option<String>,
    /// `Build`: an image builder VM: no workspace (no virtiofsd, no vhost-user-fs device,
    /// the VM's `dir` need not exist), the overlay disk is its scratch disk.
    #[serde(default)]
    pub mode: BootMode,
    /// Identity of kernel + initrd + root image (see [`crate::client::StartOptions`]);
    /// empty: no snapshots.
    #[serde(default)]
    pub image_id: String,
    /// Boot cold: neither restore nor save a snapshot (`--no-snapshot`).
    #[serde(default)]
    pub no_snapshot: bool,
    /// Extra CA certificates (PEM blocks) for the guest's [`pen_proto::GuestConfig`].
    #[serde(default)]
    pub ca_certs: Vec<String>,
}

/// One line of boot progress from the supervisor to its spawner (stdout pipe).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Report {
    /// This supervisor holds the VM's lock and is booting it.
    Started,
    /// A line for the user (first-boot setup output, notices).
    Log(String),
    /// The VM is ready; its socket serves sessions.
    Ready,
    /// Another supervisor holds the VM's lock: attach to that one.
    Busy,
    /// The VM could not be started. The message is complete and user-facing.
    Error(String),
}

impl Report {
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("reports serialize");
        s.push('\n');
        s
    }
}

/// Our end of the progress pipe to the spawner. Writes are best effort: a spawner that
/// went away must not make the supervisor fail. That it went away before the VM was ready
/// is news of its own ([`Reporter::gone`]): the `pen` that started the VM was interrupted
/// (or killed) while waiting for it.
struct Reporter {
    pipe: Option<File>,
    /// Set by the watching thread when the spawner's end of the pipe closes.
    left: Arc<AtomicBool>,
    /// Fires when `left` is set, to wake the event loop.
    wake: Option<tokio::sync::oneshot::Receiver<()>>,
    /// `left` as it was at [`Reporter::close`], which ends the watch.
    gone_at_close: Option<bool>,
}

impl Reporter {
    /// Reports into `pipe`, and watches it from a thread of its own for the spawner's end
    /// to close (the writer of a pipe sees POLLERR then, with nothing to read or write).
    fn new(pipe: File) -> Reporter {
        let left = Arc::new(AtomicBool::new(false));
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A duplicate of our end (close-on-exec, like the original), so that the number
        // the thread polls stays this pipe. It lives as long as this process; only this
        // process writes the pipe, so no spawner waits for it to close.
        let flag = left.clone();
        let watched = pipe.try_clone().ok().and_then(|copy| {
            std::thread::Builder::new()
                .name("spawner-watch".into())
                .spawn(move || loop {
                    let mut fds = [PollFd::new(copy.as_fd(), PollFlags::empty())];
                    match poll(&mut fds, PollTimeout::NONE) {
                        Ok(_) => {
                            let closed = PollFlags::POLLERR | PollFlags::POLLHUP;
                            if fds[0].revents().is_some_and(|r| r.intersects(closed)) {
                                flag.store(true, Ordering::SeqCst);
                                let _ = tx.send(());
                                return;
                            }
                        }
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(_) => return,
                    }
                })
                .ok()
        });
        Reporter {
            pipe: Some(pipe),
            left,
            wake: watched.map(|_| rx),
            gone_at_close: None,
        }
    }

    fn send(&mut self, report: &Report) {
        let answer = matches!(report, Report::Ready | Report::Error(_));
        if answer {
            // Before the spawner can have read it: once it has, its leaving is no news.
            self.freeze();
        }
        if let Some(pipe) = &mut self.pipe {
            if let Err(e) = pipe.write_all(report.to_line().as_bytes()) {
                if e.raw_os_error() == Some(libc::EPIPE) {
                    self.left.store(true, Ordering::SeqCst);
                    if answer {
                        self.gone_at_close = Some(true);
                    }
                }
                self.pipe = None;
            }
        }
    }

    /// No more reports: the VM is ready or has failed.
    fn close(&mut self) {
        self.pipe = None;
        self.wake = None;
        self.freeze();
    }

    /// Keeps whether the spawner is gone now as the answer of [`Reporter::gone`] for good.
    fn freeze(&mut self) {
        if self.gone_at_close.is_none() {
            self.gone_at_close = Some(self.left.load(Ordering::SeqCst));
        }
    }

    /// Whether the spawner went away before the VM was ready (or failed).
    fn gone(&self) -> bool {
        self.gone_at_close
            .unwrap_or_else(|| self.left.load(Ordering::SeqCst))
    }

    /// Resolves once the spawner's end of the pipe has closed, or never while it is open or
    /// once [`Reporter::close`] ended the watch. Cancel-safe.
    async fn spawner_left(&mut self) {
        match &mut self.wake {
            Some(wake) => {
                let _ = wake.await;
                self.wake = None;
            }
            None => std::future::pending().await,
        }
    }
}

/// When this supervisor started, for the timings in its log.
static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Milliseconds since this supervisor started.
fn since_start() -> u128 {
    STARTED
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis()
}

/// Entry point of `pen __supervise NAME`. Returns when the VM has stopped.
pub fn main(home: &PenHome, name: &str) -> anyhow::Result<()> {
    since_start();
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .context("reading start parameters")?;
    let params: Params =
        serde_json::from_slice(&input).context("start parameters on stdin are not valid")?;
    drop(input);

    // Our own copy of the pipe to the spawner, close-on-exec so QEMU and virtiofsd never
    // hold it open (the spawner would otherwise wait for an EOF that never comes).
    let report_fd = nix::fcntl::fcntl(
        std::io::stdout().as_raw_fd(),
        nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3),
    )
    .context("duplicating stdout")?;
    // SAFETY: fcntl just returned this descriptor and nothing else owns it.
    let mut reporter = Reporter::new(File::from(unsafe { OwnedFd::from_raw_fd(report_fd) }));

    // Out of the terminal's session: Ctrl-C in the user's shell must not reach the VM.
    let _ = nix::unistd::setsid();

    let paths = VmPaths::new(home, name);
    let vm = match VmConfig::load(&paths)? {
        Some(vm) => vm,
        None => {
            let msg = format!("VM {name} does not exist (no {})", paths.config().display());
            reporter.send(&Report::Error(msg.clone()));
            anyhow::bail!(msg);
        }
    };

    let Some(lock) = VmLock::try_acquire(&paths)? else {
        reporter.send(&Report::Busy);
        return Ok(());
    };

    reporter.send(&Report::Started);
    // Dropped before the lock: the log is complete when the next supervisor starts.
    let _log = redirect_stdio(&paths.supervisor_log())?;
    eprintln!(
        "pen supervisor {} for VM {name}: pid {}, accel {}",
        pen_core::VERSION,
        std::process::id(),
        params.accel
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the supervisor runtime")?;
    // Opened by QEMU at its start: a volume re-created later is a new file (renamed over
    // this name), and this VM keeps reading the one it opened until it stops.
    let volume_files = vm
        .volumes
        .iter()
        .map(|v| home.volume_file(&v.name))
        .collect();
    let result = rt.block_on(serve::run(
        paths.clone(),
        home.snapshots(),
        vm,
        volume_files,
        params,
        &mut reporter,
    ));
    if let Err(e) = &result {
        reporter.send(&Report::Error(format!("{e:#}")));
        eprintln!("supervisor: {e:#}");
    }
    // Background tasks (client writers, stderr pumps) may still hold sockets; dropping the
    // runtime cancels them before the lock goes, so a new supervisor finds a clean slate.
    drop(rt);
    paths.remove_sockets();
    drop(lock);
    eprintln!("supervisor: exit");
    result
}

/// stdin from /dev/null; stdout and stderr into a pipe that a thread copies to the
/// supervisor log, capped and rotated ([`pen_core::logfile`]): QEMU's, virtiofsd's and the
/// guest's complaints land there, and the guest chooses how many. The previous start's log
/// is kept as `supervisor.log.1`. Dropping the returned guard flushes the log.
fn redirect_stdio(log: &std::path::Path) -> anyhow::Result<LogPump> {
    use pen_core::logfile::{CappedLog, SUPERVISOR_LOG_MAX};
    let out = CappedLog::start(log, SUPERVISOR_LOG_MAX)
        .with_context(|| format!("creating {}", log.display()))?;
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating the log pipe")?;
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("log".into())
        .spawn(move || {
            out.drain_from(File::from(read));
            let _ = done_tx.send(());
        })
        .context("starting the log thread")?;
    let null = File::open("/dev/null").context("opening /dev/null")?;
    nix::unistd::dup2(null.as_raw_fd(), 0).context("redirecting stdin")?;
    nix::unistd::dup2(write.as_raw_fd(), 1).context("redirecting stdout")?;
    nix::unistd::dup2(write.as_raw_fd(), 2).context("redirecting stderr")?;
    Ok(LogPump { done })
}

/// Flushes the supervisor log on drop (also while unwinding from a panic): stdout and
/// stderr are closed, and the copying thread gets a moment to write what is left.
struct LogPump {
    done: std::sync::mpsc::Receiver<()>,
}

impl Drop for LogPump {
    fn drop(&mut self) {
        if let Ok(null) = File::open("/dev/null") {
            let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
            let _ = nix::unistd::dup2(null.as_raw_fd(), 2);
        }
        let _ = self.done.recv_timeout(std::time::Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_roundtrip_as_json() {
        let p = Params {
            accel: Accel::Tcg,
            env: vec![("TOKEN".into(), "s3cret value, with \"quotes\"".into())],
            keep_running: true,
            kernel: "/h/images/vmlinuz".into(),
            initrd: "/h/images/initrd".into(),
            rootfs: "/h/images/rootfs.sqfs".into(),
            setup_script: Some("echo hi\n".into()),
            mode: BootMode::Build,
            image_id: "51d98c4b".into(),
            no_snapshot: true,
            ca_certs: vec!["-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into()],
        };
        let json = serde_json::to_vec(&p).unwrap();
        assert!(String::from_utf8_lossy(&json).contains("\"accel\":\"tcg\""));
        assert_eq!(serde_json::from_slice::<Params>(&json).unwrap(), p);
    }

    #[test]
    fn params_without_mode_mean_shell() {
        let json = r#"{"accel":"tcg","env":[],"keep_running":false,"kernel":"/k","initrd":"/i","rootfs":"/r","setup_script":null}"#;
        let p: Params = serde_json::from_str(json).unwrap();
        assert_eq!(p.mode, BootMode::Shell);
    }

    #[test]
    fn reports_are_single_json_lines() {
        for r in [
            Report::Started,
            Report::Log("setup: line\nwith newline".into()),
            Report::Ready,
            Report::Busy,
            Report::Error("boom".into()),
        ] {
            let line = r.to_line();
            assert_eq!(line.matches('\n').count(), 1, "{line}");
            assert_eq!(serde_json::from_str::<Report>(line.trim()).unwrap(), r);
        }
        assert_eq!(Report::Ready.to_line(), "\"ready\"\n");
    }
}
