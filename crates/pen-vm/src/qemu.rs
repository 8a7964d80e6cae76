//! The QEMU command line of a pen VM, built from a [`QemuSpec`] by a pure function.
//!
//! Paths go into QEMU option strings (`key=value,key=value`), where a comma would split the
//! value: every path is escaped with [`opt_value`] (QEMU's own rule: `,` becomes `,,`).
//! Sockets and the console use explicit `-chardev` objects so that escaping applies to them
//! too (the legacy `-serial file:` and `-qmp unix:` forms have their own parsers).
//!
//! Device layout (version [`DEVICE_LAYOUT_VERSION`]): the command line is the same for every
//! VM of an image apart from paths, so that a snapshot taken at the stage-1 point serves them
//! all: root disk, overlay disk, network, RNG, the agent port, and an empty PCIe root port.
//! The overlay disk sits at a fixed PCI slot ([`pen_proto::OVERLAY_DISK_PCI_SLOT`]) where
//! pen-init keeps it without a driver until the VM's configuration arrives, so the snapshot
//! holds no VM's disk size or blocks; each VM's QEMU opens its own overlay file. The
//! workspace device is hot-plugged into the root port over QMP ([`hotplug_commands`]) after
//! the snapshot point, on cold boots and restores alike: QEMU 7.2 cannot migrate
//! vhost-user-fs at all.
//!
//! Volumes: [`pen_proto::VOLUME_SLOTS`] read-only virtio disks at fixed slots from
//! [`pen_proto::VOLUME_PCI_SLOT_BASE`], on every VM's command line whatever it mounts, and
//! probed by the guest before the snapshot point against placeholders
//! ([`VOLUME_PLACEHOLDER_SIZE`]), so a restored guest only mounts. A slot the VM uses gets
//! the volume's file behind it: on a restore's command line, on a cold boot over QMP after
//! the snapshot point ([`volume_attach_commands`]).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use pen_proto::{
    AGENT_PORT_NAME, OVERLAY_DISK_PCI_SLOT, OVERLAY_DISK_SERIAL, ROOT_DISK_SERIAL, WORKSPACE_TAG,
};
use serde_json::{json, Value};

use crate::accel::Accel;

/// Kernel command line. `panic=-1` with `-no-reboot` makes a guest panic end QEMU instead
/// of hanging; pen-init talks to the host over the agent port, so the console stays quiet.
///
/// `init_on_alloc=0` turns off the Debian kernel's default zeroing of every kernel heap
/// and page allocation. Under TCG zeroing is slow (`rep stosb` is emulated), and a restored
/// guest allocates a lot at once: mounting a squashfs with 1 MiB blocks allocates ~5 MiB
/// of caches, measured 26–32 ms per mount with zeroing against 4–8 ms without. It is a
/// hardening of the guest kernel against its own bugs (kernel memory leaking into the
/// guest's processes); pen treats everything in the guest as hostile already, and memory
/// given to guest processes is still zeroed. See ARCHITECTURE.md's threat model.
pub const KERNEL_CMDLINE: &str =
    "console=ttyS0 panic=-1 quiet loglevel=3 init_on_alloc=0 rdinit=/init";

/// The kernel command line of a VM: [`KERNEL_CMDLINE`], plus `pen.debug` when
/// `guest_debug` is set (pen-init then logs its boot steps with timings to the console).
pub fn kernel_cmdline(guest_debug: bool) -> String {
    if guest_debug {
        format!("{KERNEL_CMDLINE} pen.debug")
    } else {
        KERNEL_CMDLINE.to_string()
    }
}

/// The environment variable that turns on [`kernel_cmdline`]'s `pen.debug`.
pub const GUEST_DEBUG_ENV: &str = "PEN_GUEST_DEBUG";

/// QEMU machine type.
pub const MACHINE: &str = "q35";

/// Bumped whenever the devices on the command line (what a snapshot contains) change.
/// 3: the NIC's backend is pen's own network (`-netdev stream` into pen-net) instead of
/// QEMU's user network. The virtio-net device is unchanged and a backend is not migrated,
/// but a guest saved with slirp behind its NIC was saved with whatever link state that
/// backend gave it; taking each snapshot once more is cheaper than relying on it.
/// 4: [`pen_proto::VOLUME_SLOTS`] read-only volume disks.
/// 5: the volume disks are probed before the snapshot point, against placeholders.
/// 6: the NIC has an MTU of [`pen_proto::LINK_MTU`] and no link status (`status=off`).
pub const DEVICE_LAYOUT_VERSION: u32 = 6;

/// The PCIe root port the workspace device is hot-plugged into.
const WORKSPACE_PORT: &str = "pen-rp-workspace";

#[derive(Debug, Clone)]
pub struct QemuSpec {
    /// The VM's name, given to QEMU (`-name`) so that its process says which VM it runs:
    /// its command line names no file of the VM (they are passed as descriptors).
    pub name: String,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mb: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Read-only root image (squashfs).
    pub rootfs: PathBuf,
    /// Descriptor number, in QEMU's process, of the memfd holding guest RAM (pen creates
    /// it, so that it can copy RAM in and out for snapshots).
    pub ram_fd: i32,
    /// Start paused, waiting for `migrate-incoming` (a snapshot restore).
    pub incoming: bool,
    /// Boot with `pen.debug` (see [`kernel_cmdline`]).
    pub guest_debug: bool,
    /// The VM's read/write overlay disk (raw). The supervisor opens it and QEMU gets the
    /// descriptor ([`QemuSpec::overlay_fd`]).
    pub overlay: PathBuf,
    /// Descriptor number, in QEMU's process, of the overlay disk (opened by the supervisor).
    /// QEMU opens the disk as `/proc/self/fd/N`, never by its path: it reopens the disk
    /// when a restored guest resumes, and a QEMU that gave up root could not traverse pen's
    /// directories. (An `-add-fd` fd set would dup one open file description for every
    /// open, which breaks QEMU's image locking on that reopen.) Set when QEMU is started.
    pub overlay_fd: i32,
    /// The VM's volume files (squashfs), slot by slot; at most
    /// [`pen_proto::VOLUME_SLOTS`], the remaining slots get a placeholder.
    pub volumes: Vec<PathBuf>,
    /// Where the supervisor writes the serial console (`console.log`).
    pub console_log: PathBuf,
    /// Descriptor number, in QEMU's process, of the pipe QEMU writes the serial console
    /// into (the supervisor copies it to `console_log`, capped). Set when QEMU is started.
    pub console_fd: i32,
    pub qmp_socket: PathBuf,
    pub agent_socket: PathBuf,
    /// virtiofsd's vhost-user socket; `None` runs without a workspace (builder VMs).
    /// Hot-plugged.
    pub virtiofs_socket: Option<PathBuf>,
    /// The supervisor's network backend (pen-net), listening before QEMU starts: QEMU
    /// connects to it as a client at startup and carries the NIC's Ethernet frames over it.
    pub net_socket: PathBuf,
    /// The user QEMU becomes once it has opened its files (`-runas`); set when pen runs as
    /// root (see [`unprivileged_user`]).
    pub runas: Option<String>,
}

/// The `-cpu` model for `accel`, as a snapshot identity names it: TCG's `max` is fixed by
/// the QEMU binary; KVM's `host` is whatever this CPU is, so a digest of its model and
/// flags is added.
pub fn cpu_model(accel: Accel) -> String {
    match accel {
        Accel::Tcg => "max".into(),
        Accel::Kvm => {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let first: String = cpuinfo
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .filter(|l| {
                    [
                        "vendor_id",
                        "cpu family",
                        "model",
                        "model name",
                        "stepping",
                        "flags",
                    ]
                    .iter()
                    .any(|k| l.split(':').next().map(str::trim) == Some(k))
                })
                .collect::<Vec<_>>()
                .join("\n");
            let digest = pen_core::fsutil::sha256_hex(first.as_bytes());
            format!("host:{}", &digest[..16])
        }
    }
}

/// `PEN_QEMU`, else `qemu-system-x86_64` from `PATH`.
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("PEN_QEMU").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            anyhow::bail!(
                "PEN_QEMU={} does not exist; point it at qemu-system-x86_64, or unset it and install QEMU with `sudo apt-get install qemu-system-x86`",
                path.display()
            );
        }
        return Ok(path);
    }
    pen_core::fsutil::find_in_path("qemu-system-x86_64").ok_or_else(|| {
        anyhow::anyhow!(
            "qemu-system-x86_64 not found in PATH; install it with `sudo apt-get install qemu-system-x86` (or set PEN_QEMU)"
        )
    })
}

/// The TCG translation buffer, in MiB (`-accel tcg,tb-size=N`). QEMU's default is 1 GiB,
/// anonymous memory a VM fills over time on top of its `--memory`; this size costs no
/// measurable speed on boots and a code-heavy workload (bench/README.md, "TCG translation
/// buffer"). Not part of a snapshot's identity: translated code is never migrated.
pub const TCG_TB_SIZE_MIB: u32 = 256;

/// QEMU's `-sandbox` argument: seccomp on, every optional deny category set.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// `-sandbox` for a QEMU that drops root with `-runas`: QEMU 7.2 installs its filter before
/// it changes uid, so with `elevateprivileges=deny` the change kills it (SIGSYS, measured).
/// Allowing set*id costs nothing after the drop: an unprivileged process cannot get root
/// back with them.
pub const SANDBOX_RUNAS: &str =
    "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny";

/// Who QEMU runs as when pen runs as root: `nobody`, when the host has that user. `None`
/// when pen is not root (QEMU is then the user already) or there is no such user.
pub fn unprivileged_user() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// Lets `user` (a [`QemuSpec::runas`]) reopen the VM's overlay disk through QEMU's own
/// descriptor (`/proc/self/fd/N` checks the file's owner and mode): the file becomes that
/// user's. pen's directories (0700, root's) still keep every other process of that user
/// away from it.
pub fn give_overlay_to(overlay: &std::fs::File, user: &str) -> anyhow::Result<()> {
    let user =
        nix::unistd::User::from_name(user)?.ok_or_else(|| anyhow::anyhow!("no user {user}"))?;
    nix::unistd::fchown(
        std::os::fd::AsRawFd::as_raw_fd(overlay),
        Some(user.uid),
        Some(user.gid),
    )?;
    Ok(())
}

/// Escapes a value for a QEMU `key=value,...` option string.
pub fn opt_value(value: &OsStr) -> OsString {
    let bytes = value.as_encoded_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    for &b in bytes {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    // SAFETY: only ASCII commas were inserted, next to existing ASCII commas.
    unsafe { OsString::from_encoded_bytes_unchecked(out) }
}

/// `prefix` followed by the escaped path.
fn opt_path(prefix: &str, path: &Path) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(opt_value(path.as_os_str()));
    s
}

fn opt_path_suffix(prefix: &str, path: &Path, suffix: &str) -> OsString {
    let mut s = opt_path(prefix, path);
    s.push(suffix);
    s
}

pub fn args(spec: &QemuSpec) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-name",
        &spec.name,
    ]);
    // QEMU's seccomp filter, from before it parses guest-controlled state: no obsolete
    // syscalls, no setuid/setgid/capability changes, no fork/exec, no scheduler or resource
    // changes. A guest that takes over a device emulator still cannot start a program or
    // regain privileges. (Verified under TCG, with snapshot save, restore and hot-plug.)
    // As root, QEMU also gives up root once its files are open (`-runas`).
    match &spec.runas {
        None => push(&["-sandbox", SANDBOX]),
        Some(user) => push(&["-sandbox", SANDBOX_RUNAS, "-runas", user]),
    }
    push(&["-machine", &format!("{MACHINE},memory-backend=mem")]);
    match spec.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        // One host thread per vCPU; QEMU's default for TCG is a single thread for all. A
        // translation buffer of TCG_TB_SIZE_MIB instead of QEMU's 1 GiB, which a long-running
        // VM fills, on top of its --memory.
        Accel::Tcg => push(&[
            "-accel",
            &format!("tcg,thread=multi,tb-size={TCG_TB_SIZE_MIB}"),
            "-cpu",
            "max",
        ]),
    }
    let cpus = spec.cpus.max(1).to_string();
    let mem = format!("{}M", spec.memory_mb);
    push(&["-smp", &cpus, "-m", &mem]);
    // Guest RAM is pen's memfd, mapped shared: virtiofsd maps it too, and `x-ignore-shared`
    // keeps it out of snapshot migration streams (pen copies it itself).
    push(&[
        "-object",
        &format!(
            "memory-backend-file,id=mem,size={mem},mem-path=/proc/self/fd/{},share=on",
            spec.ram_fd
        ),
    ]);
    a.push("-kernel".into());
    a.push(spec.kernel.clone().into());
    a.push("-initrd".into());
    a.push(spec.initrd.clone().into());
    a.push("-append".into());
    a.push(kernel_cmdline(spec.guest_debug).into());

    a.push("-chardev".into());
    a.push(format!("file,id=console,path=/proc/self/fd/{}", spec.console_fd).into());
    a.push("-serial".into());
    a.push("chardev:console".into());

    a.push("-chardev".into());
    a.push(opt_path_suffix(
        "socket,id=qmp,path=",
        &spec.qmp_socket,
        ",server=on,wait=off",
    ));
    a.push("-mon".into());
    a.push("chardev=qmp,mode=control".into());

    // Image locking (QEMU's default, file.locking=on) stays on: a second QEMU on the same
    // overlay fails instead of corrupting it.
    a.push("-drive".into());
    a.push(opt_path_suffix(
        "file=",
        &spec.rootfs,
        ",if=none,id=root,format=raw,readonly=on",
    ));
    a.push("-device".into());
    a.push(format!("virtio-blk-pci,drive=root,serial={ROOT_DISK_SERIAL}").into());

    a.push("-drive".into());
    a.push(
        format!(
            "file=/proc/self/fd/{},if=none,id=pen-overlay,format=raw,discard=unmap",
            spec.overlay_fd
        )
        .into(),
    );
    a.push("-device".into());
    // QEMU's default error policy pauses the whole VM when the host disk fills up, and pen
    // would wait on it forever; the guest gets an I/O error instead.
    a.push(
        format!(
            "virtio-blk-pci,drive=pen-overlay,id=pen-overlay-dev,serial={OVERLAY_DISK_SERIAL},\
             werror=report,rerror=report,addr={OVERLAY_DISK_PCI_SLOT:#04x}"
        )
        .into(),
    );

    // Volume slots: the same devices for every VM, so one snapshot serves all; only the
    // backing differs. Each slot's device sits on a `raw` node named after the slot. Its
    // child is a placeholder (`null-co` of VOLUME_PLACEHOLDER_SIZE, no file) on a cold boot
    // and in unused slots; a restore puts the VM's volume file there at once, a cold boot
    // after the snapshot point ([`volume_attach_commands`]). The guest probes every slot
    // against the placeholders before the snapshot point, so every guest knows its volume
    // disks by the placeholder's size, whatever file is behind them later. One queue each:
    // volumes are read by few processes at once. Read-only on both sides (QEMU opens the
    // file read-only, with a shared lock, and tells the guest the disk is read-only).
    for slot in 0..pen_proto::VOLUME_SLOTS {
        let node = volume_node(slot);
        match spec.volumes.get(slot).filter(|_| spec.incoming) {
            Some(file) => {
                a.push("-blockdev".into());
                a.push(opt_path(
                    &format!(
                        "driver=raw,node-name={node},read-only=on,file.driver=file,file.filename="
                    ),
                    file,
                ));
            }
            None => {
                a.push("-blockdev".into());
                a.push(format!(
                    "driver=null-co,node-name={node}-null,size={VOLUME_PLACEHOLDER_SIZE},read-zeroes=on,read-only=on"
                ).into());
                a.push("-blockdev".into());
                a.push(format!("driver=raw,node-name={node},file={node}-null,read-only=on").into());
            }
        }
        a.push("-device".into());
        a.push(
            format!(
                "virtio-blk-pci,drive={node},id={node}-dev,serial={},num-queues=1,addr={:#04x}",
                pen_proto::volume_disk_serial(slot),
                usize::from(pen_proto::VOLUME_PCI_SLOT_BASE) + slot
            )
            .into(),
        );
    }

    // The NIC's frames go to pen's network backend, which applies the VM's policy; QEMU's
    // user network (slirp) would map the gateway onto the host's loopback.
    a.push("-netdev".into());
    a.push(opt_path(
        "stream,id=net0,server=off,addr.type=unix,addr.path=",
        &spec.net_socket,
    ));
    // No option ROM: the kernel is loaded directly, nothing boots from the network. The
    // link's MTU (`host_mtu`, see pen_proto::LINK_MTU) is the device's: the guest driver
    // takes it when it probes the NIC, before the snapshot point. No link status
    // (`status=off`): the link never goes down, and with it the driver turns the carrier
    // on once, at probe, before the interface is registered. With the status feature it
    // turns it off and then on, and the kernel delays the second change by up to a second
    // (linkwatch): a guest saved within that second was restored with the NIC up but not
    // running (`state DOWN`, no IFF_RUNNING) for its first second.
    let nic = format!(
        "virtio-net-pci,netdev=net0,romfile=,status=off,host_mtu={}",
        pen_proto::LINK_MTU
    );
    let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
    push(&["-device", &nic, "-device", "virtio-rng-pci"]);

    a.push("-device".into());
    a.push("virtio-serial-pci,id=vser0".into());
    a.push("-chardev".into());
    a.push(opt_path_suffix(
        "socket,id=agent,path=",
        &spec.agent_socket,
        ",server=on,wait=off",
    ));
    a.push("-device".into());
    a.push(format!("virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}").into());

    // Empty, for the hot-plugged workspace device. Builder VMs get it too, so that one
    // snapshot serves either.
    a.push("-device".into());
    a.push(format!("pcie-root-port,id={WORKSPACE_PORT},chassis=1,slot=1").into());
    if spec.incoming {
        a.push("-incoming".into());
        a.push("defer".into());
    }
    a
}

/// The name under which the supervisor hands QEMU its connection to virtiofsd (QMP `getfd`)
/// before [`hotplug_commands`].
pub const VIRTIOFS_FD: &str = "pen-vfs";

/// QMP commands that attach the VM's workspace device (virtio-fs), when it has one. The
/// chardev takes the virtiofsd connection passed as [`VIRTIOFS_FD`]: QEMU never opens a
/// path in pen's runtime directory after it started.
pub fn hotplug_commands(spec: &QemuSpec) -> Vec<(&'static str, Value)> {
    let mut cmds = Vec::new();
    if spec.virtiofs_socket.is_some() {
        cmds.push((
            "chardev-add",
            json!({
                "id": "pen-vfs",
                "backend": {"type": "socket", "data": {
                    "addr": {"type": "fd", "data": {"str": VIRTIOFS_FD}},
                    "server": false,
                }},
            }),
        ));
        cmds.push((
            "device_add",
            json!({
                "driver": "vhost-user-fs-pci",
                "id": "pen-vfs-dev",
                "bus": WORKSPACE_PORT,
                "chardev": "pen-vfs",
                "tag": WORKSPACE_TAG,
            }),
        ));
    }
    cmds
}

/// The size every guest knows each volume disk by: the placeholder's, probed before the
/// snapshot point (a guest keeps the size it probed). Larger than any volume, so the whole
/// of whichever file is put behind the disk later is readable; reads past that file's end
/// fail in QEMU. 1 PiB.
pub const VOLUME_PLACEHOLDER_SIZE: u64 = 1 << 50;

/// The `raw` block node of volume slot `slot`, which its device reads.
fn volume_node(slot: usize) -> String {
    format!("pen-vol{slot}")
}

/// The QMP fd set that carries volume slot `slot`'s file on a cold boot.
pub fn volume_fdset(slot: usize) -> u32 {
    // Slots are few (pen_proto::VOLUME_SLOTS).
    slot as u32
}

/// QMP commands that put volume slot `slot`'s file, already in fd set [`volume_fdset`]
/// (`add-fd`), behind its device in place of the placeholder: a cold boot does this after
/// the snapshot point, before the guest reads its configuration (a restore has the file on
/// its command line). `blockdev-reopen` swaps the `raw` node's child while the device
/// stays; the guest, which probed the placeholder, drops what it cached of it
/// (`BLKFLSBUF`) before mounting.
pub fn volume_attach_commands(slot: usize) -> Vec<(&'static str, Value)> {
    let node = volume_node(slot);
    vec![
        (
            "blockdev-add",
            json!({
                "driver": "file",
                "node-name": format!("{node}-file"),
                "filename": format!("/dev/fdset/{}", volume_fdset(slot)),
                "read-only": true,
            }),
        ),
        (
            "blockdev-reopen",
            json!({"options": [{
                "driver": "raw",
                "node-name": node,
                "file": format!("{node}-file"),
                "read-only": true,
            }]}),
        ),
        ("blockdev-del", json!({"node-name": format!("{node}-null")})),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(accel: Accel) -> QemuSpec {
        QemuSpec {
            name: "dev".into(),
            accel,
            cpus: 2,
            memory_mb: 2048,
            kernel: "/h/images/vmlinuz".into(),
            initrd: "/h/images/initrd".into(),
            rootfs: "/h/images/rootfs.sqfs".into(),
            ram_fd: 7,
            incoming: false,
            guest_debug: false,
            overlay: "/h/vms/dev/overlay.img".into(),
            overlay_fd: 5,
            volumes: Vec::new(),
            console_log: "/h/vms/dev/console.log".into(),
            console_fd: 4,
            qmp_socket: "/run/pen/dev/qmp.sock".into(),
            agent_socket: "/run/pen/dev/agent.sock".into(),
            virtiofs_socket: Some("/run/pen/dev/virtiofs.sock".into()),
            net_socket: "/run/pen/dev/net.sock".into(),
            runas: None,
        }
    }

    #[test]
    fn as_root_qemu_drops_to_the_given_user_under_a_sandbox_that_lets_it() {
        let mut s = spec(Accel::Tcg);
        s.runas = Some("nobody".into());
        let line = joined(&s);
        assert!(
            line.contains(
                " -sandbox on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny -runas nobody "
            ),
            "{line}"
        );
        assert!(!joined(&spec(Accel::Tcg)).contains("-runas"));
    }

    fn joined(spec: &QemuSpec) -> String {
        args(spec)
            .iter()
            .map(|a| a.to_str().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn tcg_command_line() {
        let line = joined(&spec(Accel::Tcg));
        assert_eq!(
            line,
            "-nodefaults -no-user-config -display none -no-reboot -name dev \
             -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
             -machine q35,memory-backend=mem -accel tcg,thread=multi,tb-size=256 -cpu max -smp 2 -m 2048M \
             -object memory-backend-file,id=mem,size=2048M,mem-path=/proc/self/fd/7,share=on \
             -kernel /h/images/vmlinuz -initrd /h/images/initrd \
             -append console=ttyS0 panic=-1 quiet loglevel=3 init_on_alloc=0 rdinit=/init \
             -chardev file,id=console,path=/proc/self/fd/4 -serial chardev:console \
             -chardev socket,id=qmp,path=/run/pen/dev/qmp.sock,server=on,wait=off -mon chardev=qmp,mode=control \
             -drive file=/h/images/rootfs.sqfs,if=none,id=root,format=raw,readonly=on \
             -device virtio-blk-pci,drive=root,serial=pen-root \
             -drive file=/proc/self/fd/5,if=none,id=pen-overlay,format=raw,discard=unmap \
             -device virtio-blk-pci,drive=pen-overlay,id=pen-overlay-dev,serial=pen-overlay,werror=report,rerror=report,addr=0x10 \
             -blockdev driver=null-co,node-name=pen-vol0-null,size=1125899906842624,read-zeroes=on,read-only=on \
             -blockdev driver=raw,node-name=pen-vol0,file=pen-vol0-null,read-only=on \
             -device virtio-blk-pci,drive=pen-vol0,id=pen-vol0-dev,serial=pen-vol0,num-queues=1,addr=0x11 \
             -blockdev driver=null-co,node-name=pen-vol1-null,size=1125899906842624,read-zeroes=on,read-only=on \
             -blockdev driver=raw,node-name=pen-vol1,file=pen-vol1-null,read-only=on \
             -device virtio-blk-pci,drive=pen-vol1,id=pen-vol1-dev,serial=pen-vol1,num-queues=1,addr=0x12 \
             -blockdev driver=null-co,node-name=pen-vol2-null,size=1125899906842624,read-zeroes=on,read-only=on \
             -blockdev driver=raw,node-name=pen-vol2,file=pen-vol2-null,read-only=on \
             -device virtio-blk-pci,drive=pen-vol2,id=pen-vol2-dev,serial=pen-vol2,num-queues=1,addr=0x13 \
             -blockdev driver=null-co,node-name=pen-vol3-null,size=1125899906842624,read-zeroes=on,read-only=on \
             -blockdev driver=raw,node-name=pen-vol3,file=pen-vol3-null,read-only=on \
             -device virtio-blk-pci,drive=pen-vol3,id=pen-vol3-dev,serial=pen-vol3,num-queues=1,addr=0x14 \
             -blockdev driver=null-co,node-name=pen-vol4-null,size=1125899906842624,read-zeroes=on,read-only=on \
             -blockdev driver=raw,node-name=pen-vol4,file=pen-vol4-null,read-only=on \
             -device virtio-blk-pci,drive=pen-vol4,id=pen-vol4-dev,serial=pen-vol4,num-queues=1,addr=0x15 \
             -blockdev driver=null-co,node-name=pen-vol5-null,size=1125899906842624,read-zeroes=on,read-only=on \
             -blockdev driver=raw,node-name=pen-vol5,file=pen-vol5-null,read-only=on \
             -device virtio-blk-pci,drive=pen-vol5,id=pen-vol5-dev,serial=pen-vol5,num-queues=1,addr=0x16 \
             -blockdev driver=null-co,node-name=pen-vol6-null,size=1125899906842624,read-zeroes=on,read-only=on \
             -blockdev driver=raw,node-name=pen-vol6,file=pen-vol6-null,read-only=on \
             -device virtio-blk-pci,drive=pen-vol6,id=pen-vol6-dev,serial=pen-vol6,num-queues=1,addr=0x17 \
             -blockdev driver=null-co,node-name=pen-vol7-null,size=1125899906842624,read-zeroes=on,read-only=on \
             -blockdev driver=raw,node-name=pen-vol7,file=pen-vol7-null,read-only=on \
             -device virtio-blk-pci,drive=pen-vol7,id=pen-vol7-dev,serial=pen-vol7,num-queues=1,addr=0x18 \
             -netdev stream,id=net0,server=off,addr.type=unix,addr.path=/run/pen/dev/net.sock \
             -device virtio-net-pci,netdev=net0,romfile=,status=off,host_mtu=65520 -device virtio-rng-pci \
             -device virtio-serial-pci,id=vser0 \
             -chardev socket,id=agent,path=/run/pen/dev/agent.sock,server=on,wait=off \
             -device virtserialport,bus=vser0.0,chardev=agent,name=org.pen.agent \
             -device pcie-root-port,id=pen-rp-workspace,chassis=1,slot=1"
        );
    }

    #[test]
    fn a_restore_opens_its_volumes_and_a_cold_boot_attaches_them_later() {
        let mut s = spec(Accel::Tcg);
        s.volumes = vec![
            "/h/volumes/models.sqfs".into(),
            "/h/volumes/a,b.sqfs".into(),
        ];
        // Cold: every slot has the placeholder, the files come over QMP.
        let cold = joined(&s);
        assert!(!cold.contains("/h/volumes"), "{cold}");
        assert_eq!(cold.matches("driver=null-co,").count(), 8, "{cold}");
        s.incoming = true;
        let line = joined(&s);
        assert!(
            line.contains(
                "-blockdev driver=raw,node-name=pen-vol0,read-only=on,file.driver=file,file.filename=/h/volumes/models.sqfs \
             -device virtio-blk-pci,drive=pen-vol0,id=pen-vol0-dev,serial=pen-vol0,num-queues=1,addr=0x11"
            ),
            "{line}"
        );
        assert!(
            line.contains("file.filename=/h/volumes/a,,b.sqfs "),
            "{line}"
        );
        assert!(
            line.contains("driver=null-co,node-name=pen-vol2-null,"),
            "{line}"
        );
        assert_eq!(line.matches("virtio-blk-pci,drive=pen-vol").count(), 8);
        // Same devices, whatever backs them: what a snapshot holds does not change.
        let devices = |line: &str| -> Vec<String> {
            line.split(" -device ")
                .skip(1)
                .map(|d| d.split(' ').next().unwrap().to_string())
                .collect()
        };
        assert_eq!(devices(&line), devices(&cold));
        assert_eq!(devices(&line), devices(&joined(&spec(Accel::Tcg))));
    }

    #[test]
    fn a_cold_boot_swaps_the_placeholder_for_the_file_in_its_fd_set() {
        let cmds = volume_attach_commands(3);
        let names: Vec<&str> = cmds.iter().map(|(c, _)| *c).collect();
        assert_eq!(names, ["blockdev-add", "blockdev-reopen", "blockdev-del"]);
        assert_eq!(
            cmds[0].1["filename"],
            format!("/dev/fdset/{}", volume_fdset(3))
        );
        assert_eq!(cmds[0].1["read-only"], true);
        let reopened = &cmds[1].1["options"][0];
        assert_eq!(reopened["node-name"], "pen-vol3");
        assert_eq!(reopened["file"], cmds[0].1["node-name"]);
        assert_eq!(reopened["read-only"], true);
        assert_eq!(cmds[2].1["node-name"], "pen-vol3-null");
    }

    #[test]
    fn restores_wait_for_incoming_state() {
        let mut s = spec(Accel::Tcg);
        s.incoming = true;
        assert!(joined(&s).ends_with(" -incoming defer"));
    }

    #[test]
    fn the_workspace_device_is_hotplugged_not_on_the_command_line() {
        let s = spec(Accel::Tcg);
        let line = joined(&s);
        assert!(!line.contains("vhost-user-fs"), "{line}");
        assert!(!line.contains("virtiofs.sock"), "{line}");
        let cmds = hotplug_commands(&s);
        let names: Vec<&str> = cmds.iter().map(|(c, _)| *c).collect();
        assert_eq!(names, ["chardev-add", "device_add"]);
        // The connection is handed over, never a path QEMU would open.
        assert_eq!(cmds[0].1["backend"]["data"]["addr"]["type"], "fd");
        assert_eq!(
            cmds[0].1["backend"]["data"]["addr"]["data"]["str"],
            VIRTIOFS_FD
        );
        assert_eq!(cmds[1].1["bus"], WORKSPACE_PORT);
        assert_eq!(cmds[1].1["tag"], "workspace");
    }

    #[test]
    fn the_overlay_disk_sits_at_the_slot_pen_init_holds() {
        let line = joined(&spec(Accel::Tcg));
        assert!(
            line.contains("serial=pen-overlay,") && line.contains(",addr=0x10"),
            "{line}"
        );
        assert_eq!(pen_proto::overlay_disk_pci_address(), "0000:00:10.0");
    }

    #[test]
    fn builder_vms_hotplug_nothing() {
        let mut s = spec(Accel::Tcg);
        s.virtiofs_socket = None;
        assert!(hotplug_commands(&s).is_empty());
        // The port is there regardless: one snapshot serves both modes.
        assert!(joined(&s).contains("pen-rp-workspace"));
    }

    #[test]
    fn cpu_models() {
        assert_eq!(cpu_model(Accel::Tcg), "max");
        assert!(cpu_model(Accel::Kvm).starts_with("host:"));
    }

    #[test]
    fn kvm_uses_host_cpu() {
        let line = joined(&spec(Accel::Kvm));
        assert!(line.contains("-accel kvm -cpu host"), "{line}");
        assert!(!line.contains("tcg"), "{line}");
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let mut s = spec(Accel::Tcg);
        s.rootfs = "/home/a,b/rootfs.sqfs".into();
        s.kernel = "/k,1".into();
        let a = args(&s);
        assert!(a.iter().any(|x| x
            .to_str()
            .unwrap()
            .starts_with("file=/home/a,,b/rootfs.sqfs,if=none")));
        // -kernel takes a plain path, not an option string.
        assert!(a.iter().any(|x| x == "/k,1"));
    }
}
