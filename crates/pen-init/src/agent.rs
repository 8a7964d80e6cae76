//! The boot sequence driven by the host link, then the session server.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use pen_proto::{
    BootMode, DecodeError, ExecRequest, ExitStatus, Frame, GuestConfig, Message, SessionId,
    CONTROL, OVERLAY_DISK_SERIAL, PROTOCOL_VERSION, ROOT_DISK_SERIAL,
};
use tokio::sync::mpsc;

use crate::boot::{self, BootError};
use crate::link::{Incoming, LinkTx};
use crate::reaper::Reaper;
use crate::session::{self, StartError};
use crate::{console, env, net, power, trust};

/// How long a BootFailed message may take to reach the host before powering off anyway.
const FAILURE_FLUSH: Duration = Duration::from_secs(2);

fn software() -> String {
    format!("pen-init {}", env!("CARGO_PKG_VERSION"))
}

/// Reports a boot failure on the console and (when open) the link, then powers off.
async fn fail(link: Option<&LinkTx>, e: BootError) -> ! {
    console::print(&format!("pen-init: {}: {}", e.stage, e.message));
    if let Some(link) = link {
        let _ = link
            .send(
                CONTROL,
                Message::BootFailed {
                    stage: e.stage.to_string(),
                    message: e.message,
                },
            )
            .await;
        link.flush(FAILURE_FLUSH).await;
    }
    power::power_off();
}

/// PID 1's whole life: stage 1, the snapshot point, stage 2, then serving sessions.
pub async fn run(started: Instant) {
    if let Err(e) = boot::mounts::mount_api_filesystems() {
        fail(None, e).await;
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    console::set_debug(cmdline.split_whitespace().any(|a| a == "pen.debug"));
    let step =
        |what: &str| console::debug(&format!("{what} (+{} ms)", started.elapsed().as_millis()));

    let overlay_held = match boot::disks::hold_overlay_disk(Path::new(SYS_PCI)) {
        Ok(held) => held,
        Err(e) => fail(None, BootError::new("overlay", e)).await,
    };
    match boot::modules::load_modules(Path::new(boot::modules::MODULE_DIR)) {
        Ok(n) => step(&format!("{n} modules loaded")),
        Err(e) => fail(None, e).await,
    }
    let port = match boot::disks::wait_for_port(pen_proto::AGENT_PORT_NAME) {
        Ok(p) => p,
        Err(e) => fail(None, BootError::new("port", e)).await,
    };
    let (link, mut incoming) = match crate::link::open(&port) {
        Ok(l) => l,
        Err(e) => {
            fail(
                None,
                BootError::new("port", format!("open {}: {e}", port.display())),
            )
            .await
        }
    };
    let root = boot::disks::wait_for_disk(ROOT_DISK_SERIAL, &HashSet::new())
        .map_err(|e| BootError::new("root", e))
        .and_then(|dev| boot::overlay::mount_root_image(&dev).map(|()| dev));
    let root = match root {
        Ok(dev) => dev,
        Err(e) => fail(Some(&link), e).await,
    };
    let volume_disks = match boot::disks::volume_disks(Path::new(SYS_PCI)) {
        Ok(disks) => disks,
        Err(e) => fail(Some(&link), BootError::new("volumes", e)).await,
    };
    // Disks whose role is known: the overlay disk's lookup by serial skips them, since
    // reading a serial is a request to the device, slow right after a restore.
    let known_disks: HashSet<String> = std::iter::once(&root)
        .chain(volume_disks.iter().flatten())
        .filter_map(|dev| dev.file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    let warmed = boot::prefetch::warm(Path::new(boot::SYSROOT));
    step(&format!(
        "root image mounted, {} KB prefetched; awaiting config",
        warmed / 1024
    ));

    // ---- snapshot point: nothing belonging to one VM has been touched yet ----
    let config = await_config(&link, &mut incoming).await;
    step("config received");
    // The boot steps below block the thread: let the writer send what is queued first.
    tokio::task::yield_now().await;

    let disks = Disks {
        overlay_held,
        volumes: volume_disks,
        known: known_disks,
    };
    let vm = match configure(&config, &disks, &step) {
        Ok(vm) => vm,
        Err(e) => fail(Some(&link), e).await,
    };
    let reaper = match Reaper::start() {
        Ok(r) => r,
        Err(e) => {
            fail(
                Some(&link),
                BootError::new("agent", format!("SIGCHLD handler: {e}")),
            )
            .await
        }
    };
    let ctx = session::Context {
        link: link.clone(),
        reaper,
        env: vm.env,
        workspace_mounted: vm.workspace_mounted,
    };

    let mut backlog = VecDeque::new();
    if let Some(script) = config
        .setup_script
        .as_deref()
        .filter(|s| !s.trim().is_empty())
    {
        if !Path::new(SETUP_MARKER).exists() {
            step("running setup");
            let setup = run_setup(script, &ctx);
            if watch_link_during(
                setup,
                &link,
                &mut incoming,
                &mut backlog,
                vm.overlay.as_ref(),
            )
            .await
            .is_none()
            {
                // The link reader is gone: nothing can ever reach us again.
                power::shutdown(vm.overlay.as_ref()).await;
            }
        }
    }
    let _ = link.send(CONTROL, Message::Ready).await;
    step("ready");

    let mut server = Server {
        ctx,
        sessions: HashMap::new(),
        overlay: vm.overlay,
    };
    server.serve(backlog, incoming).await;
}

/// Waits at the snapshot point for the host's configuration. No timeout: the VM may sit here
/// (as a snapshot) indefinitely.
async fn await_config(link: &LinkTx, incoming: &mut mpsc::Receiver<Incoming>) -> GuestConfig {
    let greet = || async {
        let _ = link
            .send(
                CONTROL,
                Message::Hello {
                    version: PROTOCOL_VERSION,
                    software: software(),
                },
            )
            .await;
        let _ = link.send(CONTROL, Message::AwaitingConfig).await;
    };
    greet().await;
    loop {
        let Some(item) = incoming.recv().await else {
            fail(
                Some(link),
                BootError::new("config", "host link reader stopped"),
            )
            .await;
        };
        match item {
            Incoming::Frame(Frame { session, message }) if session == CONTROL => match message {
                // After a snapshot restore the host says Hello first; anything we wrote
                // before it connected may be lost, so say it all again.
                Message::Hello { version, .. } if version == PROTOCOL_VERSION => greet().await,
                Message::Hello { version, .. } => {
                    let _ = link.send(CONTROL, version_mismatch(version)).await;
                }
                Message::Config(config) => return config,
                Message::Shutdown { .. } => power::power_off(),
                _ => {}
            },
            Incoming::Frame(Frame {
                session,
                message: Message::Exec(_),
            }) => {
                let _ = link
                    .send(
                        session,
                        Message::Error("the VM has not finished booting".into()),
                    )
                    .await;
            }
            Incoming::Frame(_) => {}
            other => report_bad_input(link, other, |_| {}).await,
        }
    }
}

fn version_mismatch(host: u32) -> Message {
    Message::Error(format!(
        "protocol version mismatch: guest speaks {PROTOCOL_VERSION}, host {host}"
    ))
}

/// Answers a malformed frame or a desynchronised stream with an Error; `on_session` is told
/// which exec session it named, to end it.
async fn report_bad_input(link: &LinkTx, item: Incoming, on_session: impl FnOnce(SessionId)) {
    match item {
        Incoming::Malformed(DecodeError::Malformed { session, reason }) => {
            if session != CONTROL {
                on_session(session);
            }
            let _ = link
                .send(
                    session,
                    Message::Error(format!("malformed frame: {reason}")),
                )
                .await;
        }
        Incoming::Malformed(e) => {
            let _ = link.send(CONTROL, Message::Error(e.to_string())).await;
        }
        Incoming::Desync(e) => {
            let _ = link
                .send(
                    CONTROL,
                    Message::Error(format!("framing error, input dropped: {e}")),
                )
                .await;
        }
        Incoming::Frame(_) => {}
    }
}

/// What stage 1 (after the snapshot point) and stage 2 leave behind.
struct Vm {
    env: Vec<(String, String)>,
    workspace_mounted: bool,
    overlay: Option<OwnedFd>,
}

/// What stage 1 found of the disks before the snapshot point.
struct Disks {
    /// The overlay disk's PCI function is held without a driver until `Config`.
    overlay_held: bool,
    /// Each volume slot's disk (`/dev/vdX`), probed already; `None`: no device there.
    volumes: Vec<Option<PathBuf>>,
    /// The names (`vda`, ...) of the disks above and of the root disk.
    known: HashSet<String>,
}

/// Steps 4-8 of the boot: everything that belongs to this one VM.
fn configure(config: &GuestConfig, disks: &Disks, step: &dyn Fn(&str)) -> Result<Vm, BootError> {
    boot::system::set_clock(config.clock_secs, config.clock_nanos)?;
    boot::system::add_entropy(&config.entropy)?;

    // Work that needs nothing from the overlay disk runs on a thread while this one waits
    // for the overlay disk's probe (under TCG the second vCPU would otherwise idle): the network
    // interfaces, then a warm-up run of a program through a throwaway overlayfs of the root
    // image (see `prefetch::warm_exec`). The NIC is looked up here, before the switch of roots moves
    // /sys. The warm-up is not waited for: it cannot hold up the boot, and if it is still
    // running once sessions start, the reaper discards its exit.
    let ifname = net::find_ethernet(Path::new("/sys/class/net"));
    let net_ifname = ifname.clone();
    let (net_tx, network) = std::sync::mpsc::channel();
    // Taken now, before this thread can switch roots: the warm-up works in the initramfs.
    let initramfs = boot::prefetch::InitramfsRoot::open();
    // The warm-up waits for the volumes to be mounted (the volume thread drops `warm_go`
    // then; without volumes it is dropped at once): with 2 vCPUs, three busy threads would
    // slow down this one, which the boot waits for.
    let (warm_go, warm_wait) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("net".into())
        .spawn(move || {
            let _ = net_tx.send(net::bring_up(net_ifname.as_deref()));
            let _ = warm_wait.recv();
            if let Ok(initramfs) = initramfs {
                boot::prefetch::warm_exec(&initramfs, boot::SYSROOT);
            }
        })
        .map_err(|e| BootError::new("network", format!("thread: {e}")))?;
    // The VM's volumes, mounted on their own thread (see `boot::volumes`).
    let volumes = boot::volumes::start(&config.volumes, &disks.volumes, warm_go)?;

    // 4. overlay disk
    if disks.overlay_held {
        boot::disks::release_overlay_disk(Path::new(SYS_PCI))
            .map_err(|e| BootError::new("overlay", e))?;
        step("overlay disk bound");
    }
    let dev = boot::disks::wait_for_disk(OVERLAY_DISK_SERIAL, &disks.known)
        .map_err(|e| BootError::new("overlay", e))?;
    step("overlay disk found");
    let (overlay, formatted) = boot::overlay::prepare_overlay_disk(&dev)?;
    if formatted {
        console::debug("formatted the overlay disk");
    }
    step("overlay disk mounted");
    // 5. merged root
    boot::overlay::mount_merged_root()?;
    if let Some(volumes) = &volumes {
        volumes.wait_for_staged()?;
        step("volumes staged");
    }
    boot::mounts::switch_root(boot::NEWROOT)?;
    if let Some(volumes) = &volumes {
        volumes.root_switched();
    }
    step("merged root");

    // 6.-8. stage 2, inside the merged root
    boot::system::set_hostname(&config.hostname)?;
    boot::system::set_machine_id(&config.machine_id)?;
    network
        .recv()
        .map_err(|_| BootError::new("network", "the network thread panicked"))??;
    net::write_resolv_conf(ifname.as_deref())?;
    step("network");
    let workspace_mounted = match (&config.workspace_tag, config.mode) {
        (Some(tag), _) => {
            boot::system::mount_workspace(tag)?;
            step("workspace mounted");
            true
        }
        (None, BootMode::Shell | BootMode::Build) => false,
    };
    if let Some(volumes) = volumes {
        volumes.wait_for_mounts()?;
        step("volumes mounted");
    }
    let hostname = if config.hostname.is_empty() {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        config.hostname.clone()
    };
    // Before any session: the first command already trusts the host's extra CAs.
    let trust_env = trust::apply(Path::new("/"), &config.ca_certs)
        .map_err(|e| BootError::new("ca-certs", format!("the CA store: {e}")))?;
    if !config.ca_certs.is_empty() {
        step("ca certificates");
    }
    // The VM's own env (--env) may override the tool variables trust sets.
    let base = env::base(&hostname, "/root");
    let vm_env = env::merge([&base[..], &trust_env[..], &config.env[..]]);
    env::write_env_file(&env::merge([&trust_env[..], &config.env[..]]))
        .map_err(|e| BootError::new("env", format!("/run/pen/env: {e}")))?;
    Ok(Vm {
        env: vm_env,
        workspace_mounted,
        overlay: Some(overlay),
    })
}

/// Where stage 1 finds PCI devices and drivers (the overlay disk is held and released here).
const SYS_PCI: &str = "/sys/bus/pci";

/// Marker of a finished first-boot setup; on the overlay, so it survives reboots.
const SETUP_MARKER: &str = "/var/lib/pen/setup-done";

/// Step 9: runs the setup script once with `bash -e`, streaming its output as Log lines.
async fn run_setup(script: &str, ctx: &session::Context) {
    let log = |text: String| async {
        let _ = ctx.link.send(CONTROL, Message::Log { text }).await;
    };
    let status = match setup_process(script, ctx).await {
        Ok(status) => status,
        Err(e) => {
            log(format!("pen: setup failed: cannot run bash: {e}")).await;
            return;
        }
    };
    if status == ExitStatus::Exited(0) {
        let marked = std::fs::create_dir_all("/var/lib/pen")
            .and_then(|()| std::fs::write(SETUP_MARKER, b""));
        if let Err(e) = marked {
            log(format!(
                "pen: setup succeeded but {SETUP_MARKER} could not be written: {e}"
            ))
            .await;
        }
    } else {
        let what = match status {
            ExitStatus::Exited(c) => format!("exit status {c}"),
            ExitStatus::Signaled(s) => format!("signal {s}"),
        };
        log(format!(
            "pen: setup failed with {what}; continuing without it"
        ))
        .await;
    }
}

/// Spawns `bash -e -c script` with stdout and stderr on one pipe (keeps their order) and sends
/// each output line as a Log frame.
async fn setup_process(script: &str, ctx: &session::Context) -> std::io::Result<ExitStatus> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let cwd = session::working_dir(None, ctx.workspace_mounted);
    let mut cmd = Command::new("/bin/bash");
    cmd.args(["-e", "-c", script])
        .env_clear()
        .envs(ctx.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write.try_clone()?))
        .stderr(Stdio::from(write));
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    crate::fdio::set_nonblocking(&read)?;
    let child = cmd.spawn()?;
    drop(cmd);
    let exit = ctx.reaper.watch(child.id() as i32);
    drop(child);

    let reader = crate::fdio::register(read)?;
    let mut lines = LineSplitter::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut exit = std::pin::pin!(exit);
    let mut status = None;
    loop {
        tokio::select! {
            r = crate::fdio::read_chunk(&reader, &mut buf) => match r {
                Ok(n) if n > 0 => {
                    for text in lines.push(&buf[..n]) {
                        let _ = ctx.link.send(CONTROL, Message::Log { text }).await;
                    }
                }
                _ => break,
            },
            s = &mut exit, if status.is_none() => {
                status = Some(s.unwrap_or(ExitStatus::Signaled(libc::SIGKILL)));
            }
            // A background job may hold the pipe open: stop shortly after bash exited.
            _ = tokio::time::sleep(Duration::from_millis(100)), if status.is_some() => break,
        }
    }
    if let Some(text) = lines.finish() {
        let _ = ctx.link.send(CONTROL, Message::Log { text }).await;
    }
    Ok(match status {
        Some(s) => s,
        None => exit.await.unwrap_or(ExitStatus::Signaled(libc::SIGKILL)),
    })
}

/// Splits a byte stream into text lines (lossy UTF-8); very long lines are cut at 4 KiB.
#[derive(Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    const MAX_LINE: usize = 4096;

    pub fn push(&mut self, data: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            let cut = match self.pending.iter().position(|&b| b == b'\n') {
                Some(i) if i <= Self::MAX_LINE => (i, 1),
                _ if self.pending.len() > Self::MAX_LINE => (Self::MAX_LINE, 0),
                _ => break,
            };
            let rest = self.pending.split_off(cut.0 + cut.1);
            let mut line = std::mem::replace(&mut self.pending, rest);
            line.truncate(cut.0);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            out.push(String::from_utf8_lossy(&line).into_owned());
        }
        out
    }

    pub fn finish(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            None
        } else {
            let line = std::mem::take(&mut self.pending);
            Some(String::from_utf8_lossy(&line).into_owned())
        }
    }
}

/// Runs `work` while answering the link: a Shutdown is honoured at once, a Hello is answered,
/// everything else waits in `backlog` for the session server. None if the link died.
async fn watch_link_during<F: std::future::Future>(
    work: F,
    link: &LinkTx,
    incoming: &mut mpsc::Receiver<Incoming>,
    backlog: &mut VecDeque<Incoming>,
    overlay: Option<&OwnedFd>,
) -> Option<F::Output> {
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return Some(out),
            item = incoming.recv() => match item {
                None => return None,
                Some(Incoming::Frame(Frame { session: CONTROL, message: Message::Shutdown { .. } })) => {
                    power::shutdown(overlay).await;
                }
                Some(Incoming::Frame(Frame { session: CONTROL, message: Message::Hello { version, .. } })) => {
                    let reply = if version == PROTOCOL_VERSION {
                        Message::Hello { version: PROTOCOL_VERSION, software: software() }
                    } else {
                        version_mismatch(version)
                    };
                    let _ = link.send(CONTROL, reply).await;
                }
                Some(other) => backlog.push_back(other),
            },
        }
    }
}

struct Server {
    ctx: session::Context,
    sessions: HashMap<SessionId, session::Handle>,
    overlay: Option<OwnedFd>,
}

impl Server {
    async fn serve(&mut self, backlog: VecDeque<Incoming>, mut incoming: mpsc::Receiver<Incoming>) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(SessionId, i32)>();
        for item in backlog {
            self.handle(item, &done_tx).await;
        }
        loop {
            tokio::select! {
                // Finished sessions first, so a host reusing an id right after Exit works.
                biased;
                Some((id, pid)) = done_rx.recv() => {
                    if self.sessions.get(&id).is_some_and(|h| h.pid == pid) {
                        self.sessions.remove(&id);
                    }
                }
                item = incoming.recv() => match item {
                    Some(item) => self.handle(item, &done_tx).await,
                    // The reader never stops on its own; if it did, nothing could reach us.
                    None => power::shutdown(self.overlay.as_ref()).await,
                },
            }
        }
    }

    async fn handle(&mut self, item: Incoming, done: &mpsc::UnboundedSender<(SessionId, i32)>) {
        let link = self.ctx.link.clone();
        let Incoming::Frame(Frame {
            session: id,
            message,
        }) = item
        else {
            let sessions = &mut self.sessions;
            report_bad_input(&link, item, |id| {
                if let Some(h) = sessions.remove(&id) {
                    h.abort();
                }
            })
            .await;
            return;
        };
        if id == CONTROL {
            match message {
                Message::Hello { version, .. } if version == PROTOCOL_VERSION => {
                    // A reconnecting host learns that the VM is already up.
                    let hello = Message::Hello {
                        version: PROTOCOL_VERSION,
                        software: software(),
                    };
                    let _ = link.send(CONTROL, hello).await;
                    let _ = link.send(CONTROL, Message::Ready).await;
                }
                Message::Hello { version, .. } => {
                    let _ = link.send(CONTROL, version_mismatch(version)).await;
                }
                Message::Shutdown { .. } => power::shutdown(self.overlay.as_ref()).await,
                Message::HostSpace { free } => {
                    if let Some(overlay) = &self.overlay {
                        if let Err(e) = crate::space::apply(overlay, free) {
                            eprintln!("pen-init: keeping within the host's free space: {e}");
                        }
                    }
                }
                Message::Config(_) => {
                    let _ = link
                        .send(
                            CONTROL,
                            Message::Error("the VM is already configured".into()),
                        )
                        .await;
                }
                _ => {}
            }
            return;
        }
        match message {
            Message::Exec(req) => self.exec(id, req, done).await,
            // Neither waits: one session's stalled process never holds up the link.
            Message::Stdin(data) => {
                let broken = match self.sessions.get(&id) {
                    Some(handle) => handle.stdin(data).err(),
                    None => return,
                };
                if let Some(e) = broken {
                    self.end_session(id, format!("stdin overran the session's window: {e}"))
                        .await;
                }
            }
            Message::Window(n) => {
                let broken = match self.sessions.get(&id) {
                    Some(handle) => handle.grant(n).err(),
                    None => return,
                };
                if let Some(e) = broken {
                    self.end_session(id, format!("bad output window grant: {e}"))
                        .await;
                }
            }
            Message::Resize(size) => {
                if let Some(h) = self.sessions.get(&id) {
                    h.resize(size);
                }
            }
            Message::Signal(n) => {
                if let Some(h) = self.sessions.get(&id) {
                    h.signal(n);
                }
            }
            _ => {}
        }
    }

    /// Ends a session the host broke the rules of: its processes are killed, and the host
    /// gets an Error as the session's last frame.
    async fn end_session(&mut self, id: SessionId, why: String) {
        if let Some(h) = self.sessions.remove(&id) {
            h.abort();
        }
        let _ = self.ctx.link.send(id, Message::Error(why)).await;
    }

    async fn exec(
        &mut self,
        id: SessionId,
        req: ExecRequest,
        done: &mpsc::UnboundedSender<(SessionId, i32)>,
    ) {
        let link = &self.ctx.link;
        if self.sessions.contains_key(&id) {
            let msg = format!("session {id} is already running");
            let _ = link.send(id, Message::Error(msg)).await;
            return;
        }
        let tty = req.tty.is_some();
        match session::start(id, req, &self.ctx, done.clone()) {
            Ok(handle) => {
                self.sessions.insert(id, handle);
            }
            Err(StartError::Refused(msg)) => {
                let _ = link.send(id, Message::Error(msg)).await;
            }
            Err(StartError::ExecFailed { message, code }) => {
                let bytes = message.into_bytes();
                let out = if tty {
                    // A terminal shows stdout only; keep the usual CRLF of a tty.
                    Message::Stdout(
                        bytes
                            .iter()
                            .flat_map(|&b| {
                                if b == b'\n' {
                                    vec![b'\r', b'\n']
                                } else {
                                    vec![b]
                                }
                            })
                            .collect(),
                    )
                } else {
                    Message::Stderr(bytes)
                };
                let _ = link.send(id, out).await;
                let _ = link.send(id, Message::Exit(ExitStatus::Exited(code))).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"one\ntw"), vec!["one"]);
        assert_eq!(s.push(b"o\r\nthree"), vec!["two"]);
        assert_eq!(s.finish().as_deref(), Some("three"));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn cuts_very_long_lines() {
        let mut s = LineSplitter::default();
        let long = vec![b'x'; LineSplitter::MAX_LINE + 10];
        let lines = s.push(&long);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), LineSplitter::MAX_LINE);
        assert_eq!(s.finish().map(|l| l.len()), Some(10));
    }
}
