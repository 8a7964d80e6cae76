//! The supervisor's life: start virtiofsd and QEMU, do the guest handshake, serve clients,
//! shut down. One event loop owns all state; the tasks around it only move frames.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use pen_core::paths::VmPaths;
use pen_core::vm::VmConfig;
use pen_proto::{BootMode, Frame, GuestConfig, GuestVolume, Message, CONTROL, PROTOCOL_VERSION};
use tokio::net::UnixListener;
use tokio::process::Child;
use tokio::sync::mpsc::{channel, Receiver};
use tokio::task::JoinHandle;
use tokio::time::sleep_until;

use super::boot;
use super::children::{self, Spawned};
use super::config::guest_config;
use super::event::{Event, Phase};
use super::guest_queue::GuestQueue;
use super::host_space;
use super::machine::{Handles, Stage1};
use super::overlay::prepare_overlay;
use super::sessions::{accept_loop, read_guest, write_frames, Request, Sessions};
use super::{Params, Report, Reporter};
use crate::accel::Accel;
use crate::qemu::{self, QemuSpec};
use crate::qmp::QmpEvent;
use crate::snapshot::{self, BootFiles, Committed, Identity, Pending};
use crate::virtiofsd;
use pen_core::notes::{DiskFull, Notes, NotesFile};

/// A VM started by `pen shell`/`pen exec` whose client never shows up (killed between
/// hearing that the VM is ready and connecting; one killed earlier stops it at once, see
/// `idle_deadline`) stops after this long.
const FIRST_CLIENT_GRACE: Duration = Duration::from_secs(15);
/// How long the guest may take to power off after `Shutdown`. Measured under TCG: 500 MB
/// written without `sync` just before `pen stop` powers off in 1–2 s (the guest's dirty
/// page cache stays around 64–150 MB; writeback keeps up).
const POWEROFF_GRACE: Duration = Duration::from_secs(10);
/// A guest still writing its disk when the grace is over (a sync on a busy host) gets more
/// time, as long as writes go on, up to this much in all.
const POWEROFF_SYNC_LIMIT: Duration = Duration::from_secs(120);
/// How long without a write to the overlay disk means the guest is no longer syncing.
const SYNC_QUIET: Duration = Duration::from_secs(2);
const FORCED_POWEROFF_GRACE: Duration = Duration::from_secs(3);
const CONSOLE_TAIL_LINES: usize = 20;
/// How often the host's free space under the overlay disk is looked at ([`host_space`]).
const HOST_SPACE_EVERY: Duration = Duration::from_secs(1);
/// Events waiting for the loop, from all readers together.
const EVENT_QUEUE: usize = 256;

/// Why the event loop ended.
pub(super) enum End {
    Shutdown { force: bool },
    QemuExited(std::process::ExitStatus),
    BootFailed(String),
}

pub(super) struct Sup<'r> {
    pub(super) name: String,
    pub(super) paths: VmPaths,
    pub(super) params: Params,
    pub(super) reporter: &'r mut Reporter,
    /// Clients, their sessions and the guest link they share.
    pub(super) sessions: Sessions,
    pub(super) phase: Phase,
    pub(super) config_sent: bool,
    pub(super) keep_running: bool,
    pub(super) accept_task: Option<JoinHandle<()>>,
    pub(super) boot_timeout: Duration,
    /// QEMU's monitor and guest RAM, for the VM's whole life.
    pub(super) handles: Handles,
    /// What stage 1 still has to do (devices, resume), until the stage-1 point is passed.
    pub(super) stage1: Option<Stage1>,
    /// The guest waits for its configuration: save (maybe), attach devices, configure.
    pub(super) stage1_due: bool,
    /// Save a snapshot with this identity at the stage-1 point (cold boots only).
    pub(super) save: Option<(Identity, BootFiles)>,
    pub(super) snapshots: PathBuf,
    pub(super) saver: Option<Saver>,
    pub(super) virtiofsd: Option<Spawned>,
    /// The VM's volumes, slot by slot, for its configuration.
    pub(super) volumes: Vec<GuestVolume>,
    /// What `pen list` shows about this VM; `None` when the file could not be made.
    pub(super) notes_file: Option<NotesFile>,
    pub(super) notes: Notes,
    /// The overlay disk's size, and the host's free space last told the guest.
    pub(super) disk_size: u64,
    pub(super) host_space_sent: Option<u64>,
}

pub(super) async fn run(
    paths: VmPaths,
    snapshots: PathBuf,
    vm: VmConfig,
    volume_files: Vec<PathBuf>,
    params: Params,
    reporter: &mut Reporter,
) -> anyhow::Result<()> {
    let name = vm.name.clone();
    // We hold the VM's lock: a `write_atomic` temporary here whose pen is gone is litter.
    pen_core::fsutil::sweep_temporaries(&paths.dir);
    if volume_files.len() > pen_proto::VOLUME_SLOTS {
        anyhow::bail!(
            "VM {name} names {} volumes; a VM can mount at most {}",
            volume_files.len(),
            pen_proto::VOLUME_SLOTS
        );
    }
    for (mount, file) in vm.volumes.iter().zip(&volume_files) {
        if !file.is_file() {
            anyhow::bail!(
                "VM {name} mounts volume {} at {}, which does not exist (no {}); create it with `pen volume create {}` or start with --volume none",
                mount.name,
                mount.path,
                file.display(),
                mount.name
            );
        }
    }
    let guest_volumes: Vec<GuestVolume> = vm
        .volumes
        .iter()
        .enumerate()
        .map(|(slot, v)| GuestVolume {
            slot: slot as u8,
            path: v.path.clone(),
        })
        .collect();
    prepare_overlay(&paths, &name, vm.disk_size)?;
    let build = params.mode == BootMode::Build;
    if !build && !vm.dir.is_dir() {
        anyhow::bail!(
            "the VM's shared directory {} does not exist or is not a directory",
            vm.dir.display()
        );
    }
    for (what, path) in [
        ("kernel", &params.kernel),
        ("initrd", &params.initrd),
        ("root image", &params.rootfs),
    ] {
        if !path.is_file() {
            anyhow::bail!("the {what} {} is missing", path.display());
        }
    }

    // Each level ours and private (0700), or no start: see `PenHome::runtime_levels`.
    paths.ensure_runtime()?;
    // We hold the lock, so any socket here belongs to a supervisor that died.
    // We hold the VM's lock: a virtiofsd still holding this VM's socket is the previous
    // run's, finishing its exit (see `wait_virtiofsd_gone`).
    if !wait_virtiofsd_gone(&paths, Duration::from_secs(5)).await {
        anyhow::bail!(
            "an earlier virtiofsd of VM {name} still holds {}; stop it and retry",
            virtiofsd::pid_file(&paths.virtiofs_socket()).display()
        );
    }
    paths.remove_sockets();
    paths.ensure_runtime()?;
    let notes_file = NotesFile::create(&paths.notes())
        .map_err(|e| eprintln!("supervisor: no notes file for `pen list`: {e}"))
        .ok();

    // Before QEMU, which connects to it at startup; a published port in use ends here.
    let _network = super::network::start(&paths, &vm.network).await?;

    // Bounded: the tasks that read clients and the guest wait here rather than read on, so a
    // peer sending tiny frames faster than this loop handles them fills its own socket, not
    // the supervisor's memory (on one thread, a reader decodes a whole buffer of frames for
    // each event the loop takes).
    let (events_tx, mut events) = channel(EVENT_QUEUE);
    // Bound before boot so that a second `pen` racing to start this VM can attach and wait
    // for Ready here instead of polling.
    let listener = UnixListener::bind(paths.supervisor_socket())
        .with_context(|| format!("binding {}", paths.supervisor_socket().display()))?;
    let accept_task = tokio::spawn(accept_loop(listener, events_tx.clone()));

    // A builder VM has no workspace: no virtiofsd, no vhost-user-fs device. Its socket is
    // awaited only when the device is attached, so virtiofsd starts alongside QEMU.
    let mut virtiofsd = if build {
        None
    } else {
        Some(spawn_virtiofsd(&paths, &vm)?)
    };

    let spec = QemuSpec {
        name: name.clone(),
        accel: params.accel,
        cpus: vm.cpus,
        memory_mb: vm.memory_mb,
        kernel: params.kernel.clone(),
        initrd: params.initrd.clone(),
        rootfs: params.rootfs.clone(),
        // Set when QEMU is started (machine.rs).
        ram_fd: -1,
        incoming: false,
        guest_debug: std::env::var_os(qemu::GUEST_DEBUG_ENV)
            .is_some_and(|v| !v.is_empty() && v != "0"),
        overlay: paths.overlay(),
        overlay_fd: -1,
        volumes: volume_files,
        console_log: paths.console_log(),
        console_fd: -1,
        qmp_socket: paths.qmp_socket(),
        agent_socket: paths.agent_socket(),
        virtiofs_socket: virtiofsd.as_ref().map(|_| paths.virtiofs_socket()),
        net_socket: paths.net_socket(),
        runas: qemu::unprivileged_user(),
    };
    super::console::start_log(&spec.console_log)?;
    let boot_started = Instant::now();
    let plan = boot::plan(&snapshots, &params, &spec, reporter);
    let config = || guest_config(&name, &params, &guest_volumes);
    let booted = match boot::boot(plan, spec, virtiofsd.as_mut(), &config, reporter).await {
        Ok(booted) => booted,
        Err(e) => {
            let msg = boot_failure(&name, &paths, &format!("{e:#}"), None);
            return Err(anyhow::anyhow!(msg));
        }
    };
    eprintln!("supervisor: agent link up (+{} ms)", super::since_start());
    let mut qemu = booted.machine.qemu;

    let agent_tx = GuestQueue::new();
    tokio::spawn(write_frames(booted.agent_write, agent_tx.clone()));
    tokio::spawn(read_guest(booted.agent_read, events_tx.clone()));
    let handles = booted.machine.stage1.handles.clone();
    if let Some(mut qmp_events) = handles.qmp.take_events() {
        let events_tx = events_tx.clone();
        tokio::spawn(async move {
            while let Some(event) = qmp_events.recv().await {
                if events_tx.send(Event::Qmp(event)).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(events_tx);

    let mut sup = Sup {
        name: name.clone(),
        paths: paths.clone(),
        params,
        reporter,
        sessions: Sessions::new(&name, agent_tx),
        phase: Phase::Booting,
        config_sent: booted.restored,
        keep_running: false,
        accept_task: Some(accept_task),
        boot_timeout: Duration::ZERO,
        handles,
        // A restored guest is past stage 1 already.
        stage1: (!booted.restored).then_some(booted.machine.stage1),
        stage1_due: false,
        save: booted.save,
        snapshots,
        saver: None,
        virtiofsd: virtiofsd.take(),
        volumes: guest_volumes,
        notes_file,
        notes: Notes::default(),
        disk_size: vm.disk_size,
        host_space_sent: None,
    };
    sup.keep_running = sup.params.keep_running;
    if !booted.restored {
        // A restored guest has been greeted and configured already (boot.rs).
        sup.send_guest(Frame::control(Message::Hello {
            version: PROTOCOL_VERSION,
            software: format!("pen {}", pen_core::VERSION),
        }));
    }

    let boot_timeout = match sup.params.accel {
        Accel::Kvm => Duration::from_secs(60),
        Accel::Tcg => Duration::from_secs(180),
    };
    sup.boot_timeout = boot_timeout;
    let end = sup
        .event_loop(&mut qemu.child, &mut events, boot_started + boot_timeout)
        .await;

    let result = match end {
        End::Shutdown { force } => {
            eprintln!("supervisor: stopping (force: {force})");
            sup.stop(&mut qemu, &mut events, force).await;
            if sup.phase == Phase::Booting {
                // `pen stop` during boot, or SIGTERM: not a failure of the VM itself.
                sup.fail_waiters(&format!("VM {name} was stopped while booting"));
            }
            Ok(())
        }
        End::QemuExited(status) => {
            eprintln!("supervisor: QEMU exited ({status})");
            if sup.phase == Phase::Booting {
                let msg = boot_failure(
                    &name,
                    &paths,
                    &format!("QEMU exited ({status})"),
                    Some(&qemu.stderr.text()),
                );
                sup.fail_waiters(&msg);
                Err(anyhow::anyhow!(msg))
            } else {
                let msg = format!("VM {name} stopped unexpectedly (QEMU exited: {status})");
                sup.sessions.sessions_lost(&msg);
                Ok(())
            }
        }
        End::BootFailed(reason) => {
            let msg = boot_failure(&name, &paths, &reason, None);
            sup.fail_waiters(&msg);
            // The guest powers itself off after BootFailed; give it a moment, then force.
            sup.stop(&mut qemu, &mut events, true).await;
            Err(anyhow::anyhow!(msg))
        }
    };

    sup.sessions.disconnect_all().await;
    sup.sessions.close_guest();
    if let Some(virtiofsd) = &mut sup.virtiofsd {
        children::terminate(&mut virtiofsd.child, Duration::from_secs(1)).await;
        // Its serving process may outlive it briefly; the next start of this VM must not
        // find the socket's pid file still held (`virtiofsd::pid_file_held`).
        wait_virtiofsd_gone(&paths, Duration::from_secs(3)).await;
    }
    if let Some(saver) = sup.saver.take() {
        finish_save(saver);
    }
    result
}

/// Waits up to `limit` until no virtiofsd holds the VM's socket pid file; true when none does.
async fn wait_virtiofsd_gone(paths: &VmPaths, limit: Duration) -> bool {
    let socket = paths.virtiofs_socket();
    let deadline = Instant::now() + limit;
    while virtiofsd::pid_file_held(&socket) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// Starts virtiofsd sharing the VM's directory.
fn spawn_virtiofsd(paths: &VmPaths, vm: &VmConfig) -> anyhow::Result<Spawned> {
    // Cached beside the VMs' runtime directories: the flavour probe costs ~10 ms a start.
    let cache = paths.runtime.with_file_name("virtiofsd-flavour");
    let vfsd = virtiofsd::find_cached(&cache)?;
    let runner = virtiofsd::Runner::current();
    if vfsd.flavour == virtiofsd::Flavour::C && runner.uid != 0 {
        anyhow::bail!("{}", virtiofsd::c_needs_root(&vfsd.path));
    }
    children::spawn(
        "virtiofsd",
        &vfsd.path,
        &vfsd.args(&paths.virtiofs_socket(), &vm.dir, runner),
        &[],
        false,
    )
}

/// A snapshot being written out (fsync, rename) on a thread of its own, so that the VM's
/// first session does not wait for the disk.
type Saver = std::thread::JoinHandle<anyhow::Result<(String, Committed)>>;

/// Waits for the snapshot writer; the lock is still held, so a VM started right after this
/// one finds the snapshot complete or absent, never half-written.
fn finish_save(saver: Saver) {
    match saver.join() {
        Ok(Ok((key, Committed::Installed))) => {
            eprintln!("supervisor: snapshot {} saved", snapshot::short_key(&key))
        }
        Ok(Ok((key, Committed::AlreadyThere))) => eprintln!(
            "supervisor: snapshot {} was saved by another VM first; ours is discarded",
            snapshot::short_key(&key)
        ),
        Ok(Err(e)) => eprintln!("supervisor: snapshot not saved: {e:#}"),
        Err(_) => eprintln!("supervisor: snapshot writer panicked"),
    }
}

impl Sup<'_> {
    async fn event_loop(
        &mut self,
        qemu: &mut Child,
        events: &mut Receiver<Event>,
        boot_deadline: Instant,
    ) -> End {
        let mut sigterm = signal(tokio::signal::unix::SignalKind::terminate());
        let mut sigint = signal(tokio::signal::unix::SignalKind::interrupt());
        // A supervisor has no terminal; a stray SIGHUP must not kill the VM.
        let _sighup = signal(tokio::signal::unix::SignalKind::hangup());
        let mut host_space = tokio::time::interval(HOST_SPACE_EVERY);
        host_space.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            if self.stage1_due {
                self.stage1_due = false;
                if let Err(e) = self.finish_stage1().await {
                    return End::BootFailed(format!("{e:#}"));
                }
            }
            let idle = self.idle_deadline();
            let booting = self.phase == Phase::Booting && !self.config_sent;
            tokio::select! {
                status = qemu.wait() => {
                    return match status {
                        Ok(status) => End::QemuExited(status),
                        Err(e) => End::BootFailed(format!("waiting for QEMU: {e}")),
                    };
                }
                event = events.recv() => {
                    let Some(event) = event else {
                        return End::BootFailed("internal error: event channel closed".into());
                    };
                    if let Some(end) = self.handle(event) {
                        return end;
                    }
                }
                // Only wakes the loop: `abandoned` tells what it means.
                _ = self.reporter.spawner_left() => {}
                _ = host_space.tick(), if self.phase == Phase::Ready => self.tell_host_space(),
                _ = sigterm.recv() => return End::Shutdown { force: false },
                _ = sigint.recv() => return End::Shutdown { force: false },
                _ = sleep_until(idle.unwrap_or(boot_deadline).into()), if idle.is_some() => {
                    // What is queued already (a client's Hello) may change the verdict.
                    while let Ok(event) = events.try_recv() {
                        if let Some(end) = self.handle(event) {
                            return end;
                        }
                    }
                    if self.abandoned() {
                        eprintln!("supervisor: the pen that started the VM went away before it was ready, and no other client waits; stopping");
                        return End::Shutdown { force: false };
                    }
                    if self.idle_deadline().is_some_and(|at| at <= Instant::now()) {
                        eprintln!("supervisor: no sessions left; stopping");
                        return End::Shutdown { force: false };
                    }
                }
                _ = sleep_until(boot_deadline.into()), if booting => {
                    return End::BootFailed(format!(
                        "the guest agent did not come up within {}s",
                        self.boot_timeout.as_secs()
                    ));
                }
            }
        }
    }

    fn idle_deadline(&self) -> Option<Instant> {
        if self.abandoned() {
            return Some(Instant::now());
        }
        if self.phase != Phase::Ready || self.keep_running {
            return None;
        }
        self.sessions.idle_deadline(FIRST_CLIENT_GRACE)
    }

    /// Moves the VM to `next` if [`Phase::can_become`] allows it; false when it does not
    /// (a guest that says `Ready` twice, or while the VM stops).
    fn become_(&mut self, next: Phase) -> bool {
        if !self.phase.can_become(next) {
            return false;
        }
        self.phase = next;
        true
    }

    /// The `pen` that started the VM went away (interrupted) before the VM was ready, and
    /// no other client waits for it or has used it: booting on, or keeping it for a first
    /// client, would be for nobody.
    fn abandoned(&self) -> bool {
        self.reporter.gone() && self.sessions.unattended(self.phase)
    }

    fn handle(&mut self, event: Event) -> Option<End> {
        match event {
            Event::Guest(frame) => return self.on_guest(frame),
            Event::GuestBad(reason) => {
                eprintln!("supervisor: malformed frame from guest: {reason}")
            }
            Event::GuestClosed => eprintln!("supervisor: agent link closed"),
            Event::ClientConnected(id, outbox, writer) => {
                self.sessions.connected(id, outbox, writer, self.phase)
            }
            Event::ClientFrame(id, frame) => {
                let notes = self.notes.lines(&self.name);
                match self.sessions.on_client(id, frame, self.phase, &notes)? {
                    Request::Shutdown { force } => return Some(End::Shutdown { force }),
                    Request::KeepRunning => {
                        eprintln!("supervisor: keeping the VM running");
                        self.keep_running = true;
                    }
                }
            }
            Event::ClientBad(id, reason) => self.sessions.malformed(id, &reason),
            Event::ClientGone(id) => self.sessions.drop_client(id),
            Event::Qmp(event) => self.on_qmp(event),
        }
        None
    }

    /// Tells the guest the host's free space when it could fill before the guest's disk
    /// does ([`host_space`]).
    fn tell_host_space(&mut self) {
        let look = match host_space::look(&self.paths.overlay(), self.disk_size) {
            Ok(look) => look,
            Err(e) => {
                eprintln!("supervisor: looking at the host's free space: {e}");
                return;
            }
        };
        if look.full() {
            self.on_host_disk_full(false);
        } else if look.host_free > 2 * host_space::FULL_BELOW
            && self
                .notes
                .host_disk_full
                .as_ref()
                .is_some_and(|f| !f.io_errors)
        {
            // Space was freed; the guest, which only saw ENOSPC, simply writes again.
            eprintln!("supervisor: the host disk has room again");
            self.notes.host_disk_full = None;
            self.write_notes();
        }
        if let Some(free) = host_space::decide(look, self.host_space_sent) {
            if free == u64::MAX {
                eprintln!("supervisor: the host has room for the VM's disk again");
                self.host_space_sent = None;
            } else {
                if self.host_space_sent.is_none() {
                    eprintln!(
                        "supervisor: the host has {} MiB free, less than the VM's disk could still take ({} MiB): the guest keeps within it",
                        free >> 20,
                        look.headroom >> 20
                    );
                }
                self.host_space_sent = Some(free);
            }
            self.send_guest(Frame::control(Message::HostSpace { free }));
        }
    }

    fn write_notes(&self) {
        if let Some(file) = &self.notes_file {
            if let Err(e) = file.write(&self.notes) {
                eprintln!("supervisor: writing the notes for `pen list`: {e}");
            }
        }
    }

    fn on_qmp(&mut self, event: QmpEvent) {
        match event {
            QmpEvent::BlockIoError(e) if e.host_disk_full() => {
                eprintln!(
                    "supervisor: the host disk is full: QEMU's {} on {} failed: {}",
                    e.operation, e.device, e.reason
                );
                self.on_host_disk_full(true);
            }
            QmpEvent::BlockIoError(e) => eprintln!(
                "supervisor: host I/O error: QEMU's {} on {} failed ({}): {}",
                e.operation, e.device, e.action, e.reason
            ),
            QmpEvent::Shutdown { guest, reason } => {
                eprintln!("supervisor: QEMU shutting down (guest: {guest}, {reason})")
            }
            QmpEvent::Stop | QmpEvent::Resume | QmpEvent::Other(_) => {}
        }
    }

    /// The host file system holding the overlay disk is full: the guest's writes fail, with
    /// ENOSPC while pen-init keeps within the host's space, with I/O errors when the host
    /// filled up faster (`werror=report`). Said once per run, in `pen list` and to every
    /// client; a client that connects later hears it when it says Hello.
    fn on_host_disk_full(&mut self, io_errors: bool) {
        if let Some(full) = &mut self.notes.host_disk_full {
            if io_errors && !full.io_errors {
                full.io_errors = true;
                self.write_notes();
            }
            return;
        }
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.notes.host_disk_full = Some(DiskFull {
            since,
            disk: self.paths.overlay().display().to_string(),
            io_errors,
        });
        self.write_notes();
        // Every client prints it on stderr; one that greets later hears it then.
        for text in self.notes.lines(&self.name) {
            self.sessions.log(&text, false);
        }
    }

    fn on_guest(&mut self, frame: Frame) -> Option<End> {
        if frame.session != CONTROL {
            self.sessions.on_guest(frame);
            return None;
        }
        match frame.message {
            Message::Hello { version, software } => {
                eprintln!("supervisor: guest agent {software}, protocol {version}");
                if version != PROTOCOL_VERSION {
                    return Some(End::BootFailed(format!(
                        "the guest agent ({software}) speaks protocol {version}, this pen speaks {PROTOCOL_VERSION}; rebuild the image with `pen image build --base`"
                    )));
                }
            }
            Message::AwaitingConfig => {
                // The agent repeats its greeting until configured; configure it once.
                if !self.config_sent && self.stage1.is_some() {
                    self.stage1_due = true;
                }
            }
            Message::Log { text } => {
                // Not written to the supervisor log: setup output may echo env values.
                self.reporter.send(&Report::Log(text.clone()));
                self.sessions.log(&text, true);
            }
            Message::Ready => {
                if !self.become_(Phase::Ready) {
                    eprintln!("supervisor: the guest said Ready while {:?}", self.phase);
                    return None;
                }
                eprintln!("supervisor: VM ready (+{} ms)", super::since_start());
                self.reporter.send(&Report::Ready);
                self.reporter.close();
                self.sessions.ready();
            }
            Message::BootFailed { stage, message } => {
                return Some(End::BootFailed(format!("{stage}: {message}")));
            }
            Message::Error(e) => eprintln!("supervisor: guest error: {e}"),
            other => eprintln!(
                "supervisor: unexpected control message from guest: {}",
                other.kind()
            ),
        }
        None
    }

    /// The stage-1 point on the host side: the guest waits for its configuration, nothing
    /// of this VM is in it yet. Saves a snapshot if one is due (a failed save is logged,
    /// not fatal), attaches the VM's own devices, resumes the guest and configures it.
    async fn finish_stage1(&mut self) -> anyhow::Result<()> {
        let Some(mut stage1) = self.stage1.take() else {
            return Ok(());
        };
        if let Some((identity, files)) = self.save.take() {
            let started = Instant::now();
            let key = identity.key();
            let saved = async {
                let pending = Pending::create(&self.snapshots, identity, files)?;
                stage1.save(pending).await
            }
            .await;
            match saved {
                Ok((pending, version)) => {
                    eprintln!(
                        "supervisor: snapshot {} taken in {} ms; writing it out",
                        snapshot::short_key(&key),
                        started.elapsed().as_millis()
                    );
                    self.saver = Some(std::thread::spawn(move || {
                        pending.commit(version).map(|c| (key, c))
                    }));
                }
                Err(e) => eprintln!("supervisor: snapshot not saved: {e:#}"),
            }
        }
        if let Some(vfsd) = &mut self.virtiofsd {
            boot::wait_for_virtiofsd(&stage1.spec, vfsd).await?;
        }
        stage1.attach().await?;
        stage1.resume().await?;
        // The monitor and guest RAM stay in `self.handles`.
        drop(stage1);
        eprintln!(
            "supervisor: sending configuration (+{} ms)",
            super::since_start()
        );
        let config = self.guest_config();
        self.send_guest(Frame::control(Message::Config(config)));
        self.config_sent = true;
        Ok(())
    }

    fn guest_config(&self) -> GuestConfig {
        guest_config(&self.name, &self.params, &self.volumes)
    }

    pub(super) fn send_guest(&self, frame: Frame) {
        self.sessions.send_guest(frame);
    }

    /// Tells the spawner and every waiting client that the boot failed.
    fn fail_waiters(&mut self, msg: &str) {
        self.reporter.send(&Report::Error(msg.to_string()));
        self.reporter.close();
        self.sessions.fail_all(msg);
    }

    /// Powers the VM off: guest `Shutdown`, then QMP `quit`, then SIGKILL.
    async fn stop(&mut self, qemu: &mut Spawned, events: &mut Receiver<Event>, force: bool) {
        let was = self.phase;
        self.become_(Phase::Stopping);
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
        let _ = std::fs::remove_file(self.paths.supervisor_socket());
        self.sessions.stopping(force);
        let grace = if was == Phase::Booting && !self.config_sent {
            // No agent to ask yet; nothing of the VM's has been written.
            Duration::ZERO
        } else {
            self.send_guest(Frame::control(Message::Shutdown { force }));
            if force {
                FORCED_POWEROFF_GRACE
            } else {
                POWEROFF_GRACE
            }
        };
        if self.wait_qemu(qemu, events, grace).await {
            return;
        }
        if !force && grace > Duration::ZERO && self.wait_while_syncing(qemu, events).await {
            return;
        }
        eprintln!("supervisor: guest did not power off in {grace:?}; QMP quit");
        match tokio::time::timeout(Duration::from_secs(3), self.handles.qmp.quit()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("supervisor: QMP quit: {e}"),
            Err(_) => eprintln!("supervisor: QMP quit timed out"),
        }
        if self.wait_qemu(qemu, events, Duration::from_secs(3)).await {
            return;
        }
        eprintln!("supervisor: killing QEMU");
        let _ = qemu.child.start_kill();
        let _ = qemu.child.wait().await;
    }

    /// After the grace: waits on while the guest keeps writing its overlay disk (QEMU's
    /// writes move the file's mtime), up to [`POWEROFF_SYNC_LIMIT`]. True when QEMU exited.
    async fn wait_while_syncing(
        &mut self,
        qemu: &mut Spawned,
        events: &mut Receiver<Event>,
    ) -> bool {
        let overlay = self.paths.overlay();
        let mtime = || std::fs::metadata(&overlay).and_then(|m| m.modified()).ok();
        let deadline = Instant::now() + POWEROFF_SYNC_LIMIT;
        let mut last = mtime();
        while Instant::now() < deadline {
            if self.wait_qemu(qemu, events, SYNC_QUIET).await {
                return true;
            }
            let now = mtime();
            if !still_writing(last, now) {
                return false;
            }
            eprintln!("supervisor: the guest is still writing its disk; waiting");
            last = now;
        }
        false
    }

    /// Waits up to `limit` for QEMU to exit while still relaying frames (sessions get
    /// their last output and Exit while the guest shuts down). True when it exited.
    async fn wait_qemu(
        &mut self,
        qemu: &mut Spawned,
        events: &mut Receiver<Event>,
        limit: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            tokio::select! {
                status = qemu.child.wait() => {
                    eprintln!("supervisor: QEMU exited ({})", status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()));
                    return true;
                }
                Some(event) = events.recv() => {
                    // Requests are refused while stopping; a second Shutdown changes nothing.
                    let _ = self.handle(event);
                }
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }
}

/// Whether the overlay disk was written between two looks at its mtime.
fn still_writing(
    before: Option<std::time::SystemTime>,
    now: Option<std::time::SystemTime>,
) -> bool {
    matches!((before, now), (Some(b), Some(n)) if n != b)
}

fn signal(kind: tokio::signal::unix::SignalKind) -> tokio::signal::unix::Signal {
    tokio::signal::unix::signal(kind).expect("installing a signal handler")
}

/// A complete boot failure message: the reason, QEMU's last words, the console's tail.
fn boot_failure(name: &str, paths: &VmPaths, reason: &str, qemu_stderr: Option<&str>) -> String {
    let mut msg = format!("VM {name} failed to boot: {reason}");
    if let Some(stderr) = qemu_stderr.filter(|s| !s.trim().is_empty()) {
        msg.push_str("\nQEMU said:\n");
        msg.push_str(stderr.trim_end());
    }
    let console = paths.console_log();
    let tail = pen_core::fsutil::tail_lines(&console, CONSOLE_TAIL_LINES);
    if !tail.trim().is_empty() {
        msg.push_str(&format!("\nlast lines of {}:\n", console.display()));
        msg.push_str(tail.trim_end());
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    #[test]
    fn a_guest_is_syncing_while_its_disk_changes() {
        let t = |s| Some(UNIX_EPOCH + Duration::from_secs(s));
        assert!(still_writing(t(1), t(2)));
        assert!(!still_writing(t(2), t(2)));
        assert!(!still_writing(None, Some(SystemTime::now())));
        assert!(!still_writing(t(1), None));
    }
}
