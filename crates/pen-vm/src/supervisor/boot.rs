//! Getting a VM's guest to the stage-1 point: restored from its image's snapshot when a
//! good one exists, else booted cold (and then saving a snapshot, see
//! `Sup::finish_stage1`). A restore that fails in any way ends in a one-line notice and a
//! cold boot, never in a failed start; when the failure proves the snapshot bad (damaged
//! files, QEMU refusing the state, a guest that fails or speaks another protocol) it is
//! removed and the cold boot saves a fresh one. A guest that is merely slow to answer (a
//! busy host) proves nothing: the snapshot is kept.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use pen_proto::{Frame, FrameCodec, GuestConfig, Message, CONTROL, PROTOCOL_VERSION};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::bytes::BytesMut;
use tokio_util::codec::{Encoder, FramedRead};

use super::children::{self, Spawned};
use super::machine::{self, Machine, RestoreError};
use super::{Params, Report, Reporter};
use crate::accel::Accel;
use crate::qemu::{self, QemuSpec};
use crate::snapshot::{self, BinaryIdentity, BootFiles, Identity, Lookup, Snapshot};

/// What the host-side boot leaves for the supervisor's event loop.
pub(super) struct Booted {
    pub machine: Machine,
    pub agent_read: FramedRead<OwnedReadHalf, FrameCodec>,
    pub agent_write: OwnedWriteHalf,
    /// The guest is restored, configured and has answered: stage 1 is done.
    pub restored: bool,
    /// Save a snapshot for this identity at the stage-1 point.
    pub save: Option<(Identity, BootFiles)>,
}

/// Which way to boot, decided before QEMU starts.
pub(super) struct Plan {
    restore: Option<Box<Snapshot>>,
    /// What a fresh snapshot is for (after a cold boot); `None`: snapshots are off.
    save: Option<(Identity, BootFiles)>,
}

/// Decides between restore and cold boot. Notices (a snapshot that cannot be used) go to
/// `reporter`; an unusable snapshot is removed, so the cold boot can save a fresh one.
pub(super) fn plan(
    snapshots: &Path,
    params: &Params,
    spec: &QemuSpec,
    reporter: &mut Reporter,
) -> Plan {
    let off = Plan {
        restore: None,
        save: None,
    };
    if params.no_snapshot {
        eprintln!("supervisor: cold boot (--no-snapshot)");
        return off;
    }
    if params.image_id.is_empty() {
        eprintln!("supervisor: cold boot (no image id: snapshots off)");
        return off;
    }
    let (identity, files) = match identity(params, spec) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("supervisor: cold boot (snapshots off: {e:#})");
            return off;
        }
    };
    let key = identity.key();
    match snapshot::find(snapshots, &identity, &files) {
        Lookup::Found(snapshot) => Plan {
            restore: Some(snapshot),
            save: Some((identity, files)),
        },
        Lookup::Missing => {
            eprintln!(
                "supervisor: cold boot (no snapshot {})",
                snapshot::short_key(&key)
            );
            Plan {
                restore: None,
                save: Some((identity, files)),
            }
        }
        Lookup::Invalid { reason, dir } => {
            notice(reporter, &key, &reason);
            dir.discard();
            Plan {
                restore: None,
                save: Some((identity, files)),
            }
        }
    }
}

fn notice(reporter: &mut Reporter, key: &str, reason: &str) {
    let text = format!(
        "pen: snapshot {} cannot be used ({reason}); booting cold and saving a fresh one",
        snapshot::short_key(key)
    );
    eprintln!("supervisor: {text}");
    reporter.send(&Report::Log(text));
}

/// The snapshot identity of this VM (what its QEMU command line and guest state depend
/// on) and the files it boots from.
fn identity(params: &Params, spec: &QemuSpec) -> anyhow::Result<(Identity, BootFiles)> {
    let binary = qemu::binary()?;
    let files = BootFiles::of(&spec.kernel, &spec.initrd, &spec.rootfs)
        .context("reading the boot files")?;
    let identity = Identity {
        image_id: params.image_id.clone(),
        qemu: BinaryIdentity::of(&binary)
            .with_context(|| format!("reading {}", binary.display()))?,
        accel: params.accel.to_string(),
        cpu_model: qemu::cpu_model(params.accel),
        machine: qemu::MACHINE.to_string(),
        cpus: spec.cpus,
        memory_mb: spec.memory_mb,
        layout_version: qemu::DEVICE_LAYOUT_VERSION,
        kernel_cmdline: qemu::kernel_cmdline(spec.guest_debug),
        pen_version: pen_core::VERSION.to_string(),
    };
    Ok((identity, files))
}

/// How long a restored guest may take to answer `Hello` before we give up on the snapshot.
fn greeting_timeout(accel: Accel) -> Duration {
    match accel {
        Accel::Kvm => Duration::from_secs(10),
        Accel::Tcg => Duration::from_secs(20),
    }
}

/// Starts QEMU per `plan` and connects the agent link. A restored guest is also given its
/// devices and `config()`. Errors are cold-boot failures.
pub(super) async fn boot(
    plan: Plan,
    spec: QemuSpec,
    virtiofsd: Option<&mut Spawned>,
    config: &dyn Fn() -> GuestConfig,
    reporter: &mut Reporter,
) -> anyhow::Result<Booted> {
    if let Some(snapshot) = plan.restore {
        let started = Instant::now();
        let key = snapshot.key().to_string();
        let dir = snapshot.dir.clone_handle();
        let mut save = plan.save;
        match restore(snapshot, spec.clone(), virtiofsd, config).await {
            Ok((machine, (agent_read, agent_write))) => {
                eprintln!(
                    "supervisor: restored snapshot {} in {} ms",
                    snapshot::short_key(&key),
                    started.elapsed().as_millis()
                );
                return Ok(Booted {
                    machine,
                    agent_read,
                    agent_write,
                    restored: true,
                    save: None,
                });
            }
            Err(e) => match failed_restore(e) {
                AfterRestore::Discard(reason) => {
                    notice(reporter, &key, &reason);
                    if let Some(dir) = dir {
                        dir.discard();
                    }
                }
                AfterRestore::Keep(reason) => {
                    // Not proven to be the snapshot's fault: keep it, and save no other.
                    let text = format!("pen: could not restore the VM ({reason}); booting cold");
                    eprintln!("supervisor: {text}");
                    reporter.send(&Report::Log(text));
                    save = None;
                }
            },
        }
        // QEMU is gone; its sockets go too, the cold boot's QEMU makes new ones.
        for sock in [&spec.qmp_socket, &spec.agent_socket] {
            let _ = std::fs::remove_file(sock);
        }
        return boot_cold(spec, save).await;
    }
    boot_cold(spec, plan.save).await
}

/// What to do with a snapshot whose restore failed.
#[derive(Debug, PartialEq, Eq)]
enum AfterRestore {
    /// The failure proves it bad: remove it (the cold boot saves a fresh one).
    Discard(String),
    /// It may well be good: keep it.
    Keep(String),
}

fn failed_restore(e: RestoreError) -> AfterRestore {
    match e {
        RestoreError::Snapshot(reason) => AfterRestore::Discard(reason),
        RestoreError::Slow(reason) => AfterRestore::Keep(reason),
        RestoreError::Host(e) => AfterRestore::Keep(format!("{e:#}")),
    }
}

async fn boot_cold(spec: QemuSpec, save: Option<(Identity, BootFiles)>) -> anyhow::Result<Booted> {
    let mut machine = machine::start_cold(spec).await?;
    let agent =
        machine::connect_socket(&machine.stage1.spec.agent_socket, &mut machine.qemu).await?;
    let (r, w) = agent.into_split();
    Ok(Booted {
        machine,
        agent_read: FramedRead::new(r, FrameCodec::new()),
        agent_write: w,
        restored: false,
        save,
    })
}

type Link = (FramedRead<OwnedReadHalf, FrameCodec>, OwnedWriteHalf);

/// Waits for virtiofsd's socket: the workspace device connects to it when plugged in.
pub(super) async fn wait_for_virtiofsd(spec: &QemuSpec, vfsd: &mut Spawned) -> anyhow::Result<()> {
    let Some(sock) = &spec.virtiofs_socket else {
        return Ok(());
    };
    children::wait_for_path(sock, vfsd, "virtiofsd", Duration::from_secs(10)).await
}

/// Restores, then runs the guest with its devices and configuration, and waits for its
/// answer: a snapshot is only good once the guest in it answers.
///
/// Everything the guest needs is in place before it runs, so that nothing waits for a
/// round trip: the devices are plugged in (the guest handles the hotplug while it reads
/// its configuration) and `Hello` + `Config` wait in the agent socket. The guest greets
/// back (`Hello` + `AwaitingConfig`) and then reads the `Config` already there.
async fn restore(
    snapshot: Box<Snapshot>,
    spec: QemuSpec,
    virtiofsd: Option<&mut Spawned>,
    config: &dyn Fn() -> GuestConfig,
) -> Result<(Machine, Link), RestoreError> {
    let accel = spec.accel;
    let mut machine = machine::start_restored(spec, snapshot).await?;
    let greeted = async {
        if let Some(vfsd) = virtiofsd {
            wait_for_virtiofsd(&machine.stage1.spec, vfsd).await?;
        }
        machine.stage1.attach().await?;
        let agent =
            machine::connect_socket(&machine.stage1.spec.agent_socket, &mut machine.qemu).await?;
        let (r, mut w) = agent.into_split();
        let mut buf = BytesMut::new();
        let mut codec = FrameCodec::new();
        codec.encode(
            Frame::control(Message::Hello {
                version: PROTOCOL_VERSION,
                software: format!("pen {}", pen_core::VERSION),
            }),
            &mut buf,
        )?;
        codec.encode(Frame::control(Message::Config(config())), &mut buf)?;
        w.write_all(&buf).await?;
        eprintln!(
            "supervisor: sending configuration (+{} ms)",
            super::since_start()
        );
        machine.stage1.resume().await?;
        let link = (FramedRead::new(r, FrameCodec::new()), w);
        match tokio::time::timeout(greeting_timeout(accel), await_greeting(link)).await {
            Ok(Ok(link)) => Ok(link),
            Ok(Err(e)) => Err(RestoreError::Snapshot(format!("{e:#}"))),
            Err(_) => Err(RestoreError::Slow(format!(
                "the restored guest did not answer within {}s",
                greeting_timeout(accel).as_secs()
            ))),
        }
    }
    .await;
    match greeted {
        Ok(link) => Ok((machine, link)),
        Err(e) => {
            machine::kill(&mut machine.qemu).await;
            Err(machine::with_last_words(e, &machine.qemu))
        }
    }
}

/// Waits for a restored guest's answer to our `Hello`: its own `Hello` and
/// `AwaitingConfig` (what it said before the snapshot was taken, said again for us).
async fn await_greeting(link: Link) -> anyhow::Result<Link> {
    let (mut read, write) = link;
    loop {
        let frame = match read.next().await {
            Some(Ok(Ok(frame))) => frame,
            Some(Ok(Err(bad))) => anyhow::bail!("malformed frame from the restored guest: {bad}"),
            Some(Err(e)) => anyhow::bail!("agent link: {e}"),
            None => anyhow::bail!("the restored guest closed the agent link"),
        };
        match (frame.session, frame.message) {
            (CONTROL, Message::Hello { version, software }) if version != PROTOCOL_VERSION => {
                anyhow::bail!("the restored guest agent ({software}) speaks protocol {version}")
            }
            (CONTROL, Message::AwaitingConfig) => return Ok((read, write)),
            (CONTROL, Message::BootFailed { stage, message }) => {
                anyhow::bail!("the restored guest failed: {stage}: {message}")
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_that_prove_damage_discard_the_snapshot() {
        let damaged = RestoreError::Snapshot("state checksum mismatch".into());
        assert_eq!(
            failed_restore(damaged),
            AfterRestore::Discard("state checksum mismatch".into())
        );
        let slow = RestoreError::Slow("the restored guest did not answer within 20s".into());
        assert!(matches!(failed_restore(slow), AfterRestore::Keep(_)));
        let host = RestoreError::Host(anyhow::anyhow!("cannot allocate memory"));
        assert!(matches!(failed_restore(host), AfterRestore::Keep(_)));
    }
}
