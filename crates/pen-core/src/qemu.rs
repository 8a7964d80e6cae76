//! The QEMU command line of a pen VM, built from a [`QemuSpec`] by a pure function.
//!
//! Paths go into QEMU option strings (`key=value,key=value`), where a comma would split the
//! value: every path is escaped with [`opt_value`] (QEMU's own rule: `,` becomes `,,`).
//! Sockets and the console use explicit `-chardev` objects so that escaping applies to them
//! too (the legacy `-serial file:` and `-qmp unix:` forms have their own parsers).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use pen_proto::{AGENT_PORT_NAME, OVERLAY_DISK_SERIAL, ROOT_DISK_SERIAL, WORKSPACE_TAG};

use crate::accel::Accel;

/// Kernel command line. `panic=-1` with `-no-reboot` makes a guest panic end QEMU instead
/// of hanging; pen-init talks to the host over the agent port, so the console stays quiet.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init";

#[derive(Debug, Clone)]
pub struct QemuSpec {
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mb: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Read-only root image (squashfs).
    pub rootfs: PathBuf,
    /// The VM's read/write overlay disk (raw).
    pub overlay: PathBuf,
    /// Serial console output; truncated at each boot.
    pub console_log: PathBuf,
    pub qmp_socket: PathBuf,
    pub agent_socket: PathBuf,
    /// virtiofsd's vhost-user socket; `None` boots without a workspace (builder VMs).
    pub virtiofs_socket: Option<PathBuf>,
}

/// `PEN_QEMU`, else `qemu-system-x86_64` from `PATH`.
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("PEN_QEMU").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    find_in_path("qemu-system-x86_64").ok_or_else(|| {
        anyhow::anyhow!(
            "qemu-system-x86_64 not found in PATH; install it with `sudo apt-get install qemu-system-x86` (or set PEN_QEMU)"
        )
    })
}

/// First executable file called `name` in `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
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
    ]);
    // vhost-user-fs needs guest RAM that virtiofsd can map: a shared memfd backend.
    push(&["-machine", "q35,memory-backend=mem"]);
    match spec.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        // One host thread per vCPU; QEMU's default for TCG is a single thread for all.
        Accel::Tcg => push(&["-accel", "tcg,thread=multi", "-cpu", "max"]),
    }
    let cpus = spec.cpus.max(1).to_string();
    let mem = format!("{}M", spec.memory_mb);
    push(&["-smp", &cpus, "-m", &mem]);
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
    ]);
    a.push("-kernel".into());
    a.push(spec.kernel.clone().into());
    a.push("-initrd".into());
    a.push(spec.initrd.clone().into());
    a.push("-append".into());
    a.push(KERNEL_CMDLINE.into());

    a.push("-chardev".into());
    a.push(opt_path("file,id=console,path=", &spec.console_log));
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
    a.push(opt_path_suffix(
        "file=",
        &spec.overlay,
        ",if=none,id=overlay,format=raw,cache=writeback,discard=unmap",
    ));
    a.push("-device".into());
    a.push(format!("virtio-blk-pci,drive=overlay,serial={OVERLAY_DISK_SERIAL}").into());

    let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
    push(&[
        "-netdev",
        "user,id=net0",
        "-device",
        "virtio-net-pci,netdev=net0",
        "-device",
        "virtio-rng-pci",
    ]);

    if let Some(sock) = &spec.virtiofs_socket {
        a.push("-chardev".into());
        a.push(opt_path("socket,id=vfs,path=", sock));
        a.push("-device".into());
        a.push(format!("vhost-user-fs-pci,chardev=vfs,tag={WORKSPACE_TAG}").into());
    }

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
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(accel: Accel) -> QemuSpec {
        QemuSpec {
            accel,
            cpus: 2,
            memory_mb: 2048,
            kernel: "/h/images/vmlinuz".into(),
            initrd: "/h/images/initrd".into(),
            rootfs: "/h/images/rootfs.sqfs".into(),
            overlay: "/h/vms/dev/overlay.img".into(),
            console_log: "/h/vms/dev/console.log".into(),
            qmp_socket: "/run/pen/dev/qmp.sock".into(),
            agent_socket: "/run/pen/dev/agent.sock".into(),
            virtiofs_socket: Some("/run/pen/dev/virtiofs.sock".into()),
        }
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
            "-nodefaults -no-user-config -display none -no-reboot \
             -machine q35,memory-backend=mem -accel tcg,thread=multi -cpu max -smp 2 -m 2048M \
             -object memory-backend-memfd,id=mem,size=2048M,share=on \
             -kernel /h/images/vmlinuz -initrd /h/images/initrd \
             -append console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init \
             -chardev file,id=console,path=/h/vms/dev/console.log -serial chardev:console \
             -chardev socket,id=qmp,path=/run/pen/dev/qmp.sock,server=on,wait=off -mon chardev=qmp,mode=control \
             -drive file=/h/images/rootfs.sqfs,if=none,id=root,format=raw,readonly=on \
             -device virtio-blk-pci,drive=root,serial=pen-root \
             -drive file=/h/vms/dev/overlay.img,if=none,id=overlay,format=raw,cache=writeback,discard=unmap \
             -device virtio-blk-pci,drive=overlay,serial=pen-overlay \
             -netdev user,id=net0 -device virtio-net-pci,netdev=net0 -device virtio-rng-pci \
             -chardev socket,id=vfs,path=/run/pen/dev/virtiofs.sock -device vhost-user-fs-pci,chardev=vfs,tag=workspace \
             -device virtio-serial-pci,id=vser0 \
             -chardev socket,id=agent,path=/run/pen/dev/agent.sock,server=on,wait=off \
             -device virtserialport,bus=vser0.0,chardev=agent,name=org.pen.agent"
        );
    }

    #[test]
    fn kvm_uses_host_cpu() {
        let line = joined(&spec(Accel::Kvm));
        assert!(line.contains("-accel kvm -cpu host"), "{line}");
        assert!(!line.contains("tcg"), "{line}");
    }

    #[test]
    fn no_workspace_device_without_socket() {
        let mut s = spec(Accel::Tcg);
        s.virtiofs_socket = None;
        let line = joined(&s);
        assert!(!line.contains("vhost-user-fs"), "{line}");
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let mut s = spec(Accel::Tcg);
        s.overlay = "/home/a,b/overlay.img".into();
        s.kernel = "/k,1".into();
        let a = args(&s);
        assert!(a.iter().any(|x| x
            .to_str()
            .unwrap()
            .starts_with("file=/home/a,,b/overlay.img,if=none")));
        // -kernel takes a plain path, not an option string.
        assert!(a.iter().any(|x| x == "/k,1"));
    }
}
