//! QEMU for one VM: started cold or restored from a snapshot, and, at the stage-1 point,
//! saved as a snapshot and given its own devices (see [`crate::qemu`] for the layout).
//!
//! Guest RAM is a memfd created here and handed to QEMU, so that a snapshot's RAM can be
//! copied out of it (save) and into a fresh one (restore) without QEMU reading or writing
//! every page; QEMU migrates only device state (`x-ignore-shared`).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::children::{self, Spawned};
use crate::qemu::{self, QemuSpec};
use crate::qmp::{Migration, Qmp};
use crate::snapshot::{Pending, Snapshot};

/// How long QEMU may take to load a snapshot's device state (normally milliseconds).
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the outgoing migration of a save may take (device state only: milliseconds).
const SAVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound on a device state stream; guest RAM is not in it.
const MAX_STATE: usize = 256 << 20;
/// How long QEMU may take to create its sockets.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// A started QEMU, up to the end of stage 1.
pub(super) struct Machine {
    pub qemu: Spawned,
    pub stage1: Stage1,
}

/// What the supervisor keeps of a QEMU for the VM's whole life: its monitor (the one
/// connection QEMU serves; clones share it) and guest RAM, the memfd QEMU maps. Saving the
/// guest, reading balloon statistics, pausing it and hearing of its disk errors need them.
#[derive(Clone)]
pub(super) struct Handles {
    pub qmp: Qmp,
    pub ram: Arc<File>,
}

/// What stage 1 needs: the VM's [`Handles`] and how far its devices got.
pub(super) struct Stage1 {
    pub handles: Handles,
    pub spec: QemuSpec,
    /// Not running (restored, or stopped for a save): needs `cont`.
    paused: bool,
    /// The VM's own devices are plugged in.
    attached: bool,
    /// A cold boot's volume files (slot by slot), opened before QEMU starts and handed to
    /// it by [`Stage1::attach`]; empty after a restore, whose command line names them.
    volumes: Vec<File>,
}

fn ram_size(spec: &QemuSpec) -> u64 {
    u64::from(spec.memory_mb) << 20
}

/// A memfd the size of guest RAM. Sparse: pages exist once written.
fn create_ram(spec: &QemuSpec) -> anyhow::Result<File> {
    let fd = nix::sys::memfd::memfd_create(
        c"pen-guest-ram",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .context("creating guest RAM (memfd_create)")?;
    let ram = File::from(fd);
    ram.set_len(ram_size(spec)).context("sizing guest RAM")?;
    Ok(ram)
}

fn spawn_qemu(spec: &mut QemuSpec, ram: &File, incoming: bool) -> anyhow::Result<Spawned> {
    // Our copy of the console pipe's write end is dropped on return: QEMU's exit then
    // ends the console thread.
    let console = super::console::pipe(&spec.console_log)?;
    let overlay = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&spec.overlay)
        .with_context(|| format!("opening {}", spec.overlay.display()))?;
    if let Some(user) = &spec.runas {
        qemu::give_overlay_to(&overlay, user)
            .with_context(|| format!("handing {} to user {user}", spec.overlay.display()))?;
    }
    spec.ram_fd = ram.as_raw_fd();
    spec.console_fd = console.as_raw_fd();
    spec.overlay_fd = overlay.as_raw_fd();
    spec.incoming = incoming;
    // A QEMU that drops root loses its parent-death signal with it (the kernel clears it on
    // a uid change): it runs in a PID namespace whose init does die with the supervisor.
    children::spawn(
        "qemu",
        &qemu::binary()?,
        &qemu::args(spec),
        &[ram.as_raw_fd(), console.as_raw_fd(), overlay.as_raw_fd()],
        spec.runas.is_some(),
    )
}

/// Starts QEMU for a cold boot.
pub(super) async fn start_cold(mut spec: QemuSpec) -> anyhow::Result<Machine> {
    let ram = create_ram(&spec)?;
    // Opened now, so that the VM mounts the versions that were there when it started.
    let volumes = spec
        .volumes
        .iter()
        .map(|path| File::open(path).with_context(|| format!("opening {}", path.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut qemu = spawn_qemu(&mut spec, &ram, false)?;
    let qmp = Qmp::handshake(connect_socket(&spec.qmp_socket, &mut qemu).await?).await?;
    Ok(Machine {
        qemu,
        stage1: Stage1 {
            handles: Handles {
                qmp,
                ram: Arc::new(ram),
            },
            spec,
            paused: false,
            attached: false,
            volumes,
        },
    })
}

/// Why a restore failed.
pub(super) enum RestoreError {
    /// The snapshot cannot be used (damaged, refused by QEMU, its guest does not answer):
    /// boot cold and replace it. The reason is for a notice.
    Snapshot(String),
    /// The restored guest did not answer in time. On a busy host that proves nothing about
    /// the snapshot: boot cold, keep it (and save no other).
    Slow(String),
    /// Something that is not the snapshot's fault (no memory, QEMU or virtiofsd not
    /// starting, a device that cannot be attached): boot cold, keep the snapshot.
    Host(anyhow::Error),
}

/// Starts QEMU from `snapshot`: RAM copied in (checked) while QEMU starts, device state
/// streamed in (checked). The guest is paused where the snapshot left it, waiting for its
/// configuration. On error QEMU is gone.
pub(super) async fn start_restored(
    mut spec: QemuSpec,
    snapshot: Box<Snapshot>,
) -> Result<Machine, RestoreError> {
    let started = Instant::now();
    let state = snapshot.read_state().map_err(RestoreError::Snapshot)?;
    let ram = create_ram(&spec).map_err(RestoreError::Host)?;
    let size = ram_size(&spec);
    let target = ram.try_clone().map_err(|e| RestoreError::Host(e.into()))?;
    // A blocking thread, not a child: only the main thread may fork (PR_SET_PDEATHSIG).
    let copy = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        snapshot.load_ram(&target, size).map(|()| t.elapsed())
    });
    let mut qemu = spawn_qemu(&mut spec, &ram, true).map_err(RestoreError::Host)?;
    let result = async {
        let qmp = Qmp::handshake(connect_socket(&spec.qmp_socket, &mut qemu).await?)
            .await
            .map_err(|e| RestoreError::Host(e.into()))?;
        let qemu_time = started.elapsed();
        let copy_time = copy
            .await
            .map_err(|e| RestoreError::Host(anyhow::anyhow!("RAM copy thread: {e}")))?
            .map_err(RestoreError::Snapshot)?;
        load_state(&qmp, &state)
            .await
            .map_err(|e| RestoreError::Snapshot(format!("QEMU did not load it: {e:#}")))?;
        eprintln!(
            "supervisor: snapshot loaded in {} ms (RAM copy {} ms, {} MB; QEMU up in {} ms) (+{} ms)",
            started.elapsed().as_millis(),
            copy_time.as_millis(),
            size >> 20,
            qemu_time.as_millis(),
            super::since_start()
        );
        Ok(qmp)
    }
    .await;
    match result {
        // Paused: the snapshot was taken of a stopped guest.
        Ok(qmp) => Ok(Machine {
            qemu,
            stage1: Stage1 {
                handles: Handles {
                    qmp,
                    ram: Arc::new(ram),
                },
                spec,
                paused: true,
                attached: false,
                volumes: Vec::new(),
            },
        }),
        Err(e) => {
            kill(&mut qemu).await;
            Err(with_last_words(e, &qemu))
        }
    }
}

/// Adds QEMU's last stderr line to a snapshot failure (it usually says what it refused).
pub(super) fn with_last_words(e: RestoreError, qemu: &Spawned) -> RestoreError {
    let stderr = qemu.stderr.text();
    match (e, stderr.lines().last()) {
        (RestoreError::Snapshot(reason), Some(last)) if !last.trim().is_empty() => {
            RestoreError::Snapshot(format!("{reason}; QEMU said: {}", last.trim()))
        }
        (e, _) => e,
    }
}

/// Kills QEMU and waits for it to exit.
pub(super) async fn kill(qemu: &mut Spawned) {
    let _ = qemu.child.start_kill();
    let _ = qemu.child.wait().await;
    // Let the stderr pump take QEMU's last words.
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// Feeds the device state to a QEMU started with `-incoming defer` and waits for it to be
/// loaded. RAM is already in place: `x-ignore-shared` tells QEMU not to expect it. The
/// stream is one end of a socket pair handed to QEMU, never a path it opens.
async fn load_state(qmp: &Qmp, state: &[u8]) -> anyhow::Result<()> {
    qmp.set_migration_capability("x-ignore-shared", true)
        .await?;
    let (mut ours, theirs) = migration_pair()?;
    qmp.pass_fd(MIGRATION_FD, theirs.as_fd()).await?;
    drop(theirs);
    qmp.migrate_incoming_fd(MIGRATION_FD).await?;
    ours.write_all(state)
        .await
        .context("sending the device state")?;
    ours.shutdown().await?;
    wait_migration(qmp, LOAD_TIMEOUT).await
}

/// The name a migration stream's descriptor has in QEMU while it is being handed over.
const MIGRATION_FD: &str = "pen-migration";

/// A connected socket pair: pen's end (async) and the end for QEMU.
fn migration_pair() -> anyhow::Result<(UnixStream, std::os::unix::net::UnixStream)> {
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().context("creating the migration socket pair")?;
    ours.set_nonblocking(true)?;
    Ok((UnixStream::from_std(ours)?, theirs))
}

/// Polls `query-migrate` until the migration completed; fails when it failed, QEMU went
/// away or `limit` passed.
async fn wait_migration(qmp: &Qmp, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        match qmp.query_migrate().await? {
            Migration::Completed => return Ok(()),
            Migration::Failed(why) => anyhow::bail!("migration {why}"),
            Migration::Running(_) => {}
        }
        if Instant::now() > deadline {
            anyhow::bail!("migration did not complete within {}s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

impl Stage1 {
    /// Saves the stopped guest into `pending`: device state over a unix socket, then the RAM
    /// pages out of the memfd. The guest stays stopped until [`Stage1::resume`].
    /// Returns the pending snapshot, complete but for its manifest, and QEMU's version for
    /// the manifest; on error the pending snapshot is gone (and its files with it).
    pub async fn save(&mut self, mut pending: Pending) -> anyhow::Result<(Pending, String)> {
        let qmp = &self.handles.qmp;
        qmp.stop().await?;
        self.paused = true;
        qmp.set_migration_capability("x-ignore-shared", true)
            .await?;
        // Device state is a few hundred KB; the default 32 MiB/s cap would still cost time.
        qmp.set_migration_max_bandwidth(1 << 40).await?;
        pen_core::testpoint::pause("snapshot migrate");
        let (mut stream, theirs) = migration_pair()?;
        qmp.pass_fd(MIGRATION_FD, theirs.as_fd()).await?;
        drop(theirs);
        qmp.migrate_to_fd(MIGRATION_FD).await?;
        let receive = async {
            let mut bytes = Vec::new();
            (&mut stream)
                .take(MAX_STATE as u64 + 1)
                .read_to_end(&mut bytes)
                .await?;
            anyhow::Ok(bytes)
        };
        let state = tokio::time::timeout(SAVE_TIMEOUT, receive)
            .await
            .context("QEMU did not send its state")??;
        if state.len() > MAX_STATE {
            anyhow::bail!("the device state is larger than {} MB", MAX_STATE >> 20);
        }
        wait_migration(qmp, SAVE_TIMEOUT).await?;
        pending.write_state(&state)?;
        // Copying ~100 MB of pages blocks: on a blocking thread, the runtime keeps serving.
        let ram = self.handles.ram.clone();
        let size = ram_size(&self.spec);
        let pending =
            tokio::task::spawn_blocking(move || pending.write_ram(&ram, size).map(|()| pending))
                .await
                .context("RAM copy thread")??;
        let version = qmp.query_version().await?;
        Ok((pending, version))
    }

    /// Plugs in the VM's workspace device and, on a cold boot, puts its volume files behind
    /// their disks (once). After a restore this happens before the guest runs, so that the
    /// guest's hotplug handling overlaps with our greeting round trip; on a cold boot, after
    /// the snapshot was saved and before the guest gets its configuration.
    pub async fn attach(&mut self) -> anyhow::Result<()> {
        if self.attached {
            return Ok(());
        }
        let qmp = &self.handles.qmp;
        for (slot, file) in std::mem::take(&mut self.volumes).iter().enumerate() {
            qmp.add_fd(qemu::volume_fdset(slot), file.as_fd())
                .await
                .context("attaching the VM's volumes")?;
            for (command, arguments) in qemu::volume_attach_commands(slot) {
                qmp.execute(command, arguments)
                    .await
                    .context("attaching the VM's volumes")?;
            }
        }
        if let Some(sock) = &self.spec.virtiofs_socket {
            // Connected here and handed over: QEMU may not be able to open our sockets.
            let stream = std::os::unix::net::UnixStream::connect(sock)
                .with_context(|| format!("connecting to virtiofsd at {}", sock.display()))?;
            qmp.pass_fd(qemu::VIRTIOFS_FD, stream.as_fd())
                .await
                .context("attaching the VM's devices")?;
        }
        for (command, arguments) in qemu::hotplug_commands(&self.spec) {
            qmp.execute(command, arguments)
                .await
                .context("attaching the VM's devices")?;
        }
        self.attached = true;
        Ok(())
    }

    /// Lets the guest run (again) if it is paused.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        if self.paused {
            self.handles.qmp.cont().await?;
            self.paused = false;
        }
        Ok(())
    }
}

impl From<anyhow::Error> for RestoreError {
    fn from(e: anyhow::Error) -> Self {
        RestoreError::Host(e)
    }
}

impl From<std::io::Error> for RestoreError {
    fn from(e: std::io::Error) -> Self {
        RestoreError::Host(e.into())
    }
}

/// Connects to a unix socket QEMU creates at startup, failing early if QEMU exits.
pub(super) async fn connect_socket(path: &Path, qemu: &mut Spawned) -> anyhow::Result<UnixStream> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(e) => {
                if let Some(status) = qemu.child.try_wait()? {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    anyhow::bail!("QEMU exited ({status}):\n{}", qemu.stderr.text());
                }
                if start.elapsed() > SOCKET_TIMEOUT {
                    anyhow::bail!("QEMU did not open {}: {e}", path.display());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}
