//! `pen doctor`: each host dependency and the accelerator, with the command that fixes what
//! is missing.

use std::path::PathBuf;
use std::process::Command;

use pen_core::paths::PenHome;

struct Check {
    name: &'static str,
    found: Result<String, String>,
}

fn tool(name: &'static str, path: Option<PathBuf>, fix: &str) -> Check {
    Check {
        name,
        found: path
            .map(|p| p.display().to_string())
            .ok_or_else(|| fix.to_string()),
    }
}

/// `QEMU emulator version 7.2.19 (Debian ...)` → (7, 2).
pub fn parse_qemu_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn qemu_check() -> Check {
    const FIX: &str = "sudo apt-get install qemu-system-x86";
    let found = match pen_vm::qemu::binary() {
        Err(_) => Err(FIX.to_string()),
        Ok(path) => {
            let out = Command::new(&path).arg("--version").output();
            let text = out
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            match parse_qemu_version(&text) {
                Some(v) if v >= (7, 2) => Ok(format!("{} ({}.{})", path.display(), v.0, v.1)),
                Some(v) => Err(format!(
                    "QEMU {}.{} is too old (7.2 or newer needed): {FIX}",
                    v.0, v.1
                )),
                None => Err(format!(
                    "{} does not report a version: {FIX}",
                    path.display()
                )),
            }
        }
    };
    Check {
        name: "qemu-system-x86_64",
        found,
    }
}

/// Which virtiofsd pen uses, why, and how it will run.
fn virtiofsd_check() -> Check {
    use pen_vm::virtiofsd::{self, Flavour};
    let found = match virtiofsd::find() {
        Err(e) => Err(format!("{e:#}")),
        Ok(v) => {
            let origin = virtiofsd::origin(&v.path);
            let root = nix::unistd::geteuid().is_root();
            match (v.flavour, root) {
                (Flavour::Rust, _) => Ok(format!(
                    "{} (Rust, {origin}; sandboxed in its own namespaces, guest files owned by you)",
                    v.path.display()
                )),
                (Flavour::C, true) => Ok(format!(
                    "{} ({origin}; as root, guest ids kept as they are: {})",
                    v.path.display(),
                    virtiofsd::INSTALL_HINT
                )),
                (Flavour::C, false) => Err(virtiofsd::c_needs_root(&v.path)),
            }
        }
    };
    Check {
        name: "virtiofsd",
        found,
    }
}

/// Whether user namespaces work here: created, mounted in, and tar2sqfs's jail run.
/// virtiofsd's sandbox and the packer's confinement both need them; Ubuntu's AppArmor
/// restriction lets creating one succeed and fails only the mount, so the check mounts.
fn userns_check() -> Check {
    use pen_build::confine;
    Check {
        name: "user namespaces",
        found: match confine::check_user_namespaces() {
            Ok(()) => Ok(
                "created one and mounted in it (virtiofsd and tar2sqfs run confined in them)"
                    .into(),
            ),
            Err(failure) => Err(confine::userns_fix(
                &failure,
                &confine::UsernsSysctls::read(),
            )),
        },
    }
}

/// What decides whether pen can offer a cgroup limit for a VM's processes.
struct CgroupHost {
    /// cgroup v2 mounted at /sys/fs/cgroup (the unified hierarchy systemd delegates).
    unified: bool,
    /// A systemd user manager to ask for a scope (its private socket exists).
    user_manager: bool,
}

impl CgroupHost {
    fn read() -> CgroupHost {
        let runtime = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
        CgroupHost {
            unified: std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists(),
            user_manager: runtime.is_some_and(|r| r.join("systemd/private").exists()),
        }
    }
}

/// How to bound a VM's CPU and memory on this host, or why pen cannot offer it. Without a
/// limit a VM takes up to `--cpus` host cores and `--memory` plus QEMU's own (ARCHITECTURE.md,
/// threat model, "Host resources").
fn cgroup_offer(host: &CgroupHost) -> String {
    match (host.unified, host.user_manager) {
        (true, true) => "start a VM in a systemd scope to cap it: `systemd-run --user --scope \
             -p MemoryMax=4G -p CPUQuota=200% pen start NAME` (its supervisor, QEMU and \
             virtiofsd stay in that scope)"
            .into(),
        (false, _) => "none offered: no cgroup v2 hierarchy at /sys/fs/cgroup to delegate; a VM \
             is bounded by --cpus and --memory only"
            .into(),
        (true, false) => "none offered: no systemd user manager (no `systemctl --user`) to \
             delegate a cgroup; a VM is bounded by --cpus and --memory only"
            .into(),
    }
}

/// Prints the report; true when everything required is present.
pub fn run(home: &PenHome) -> bool {
    let checks = vec![
        qemu_check(),
        virtiofsd_check(),
        userns_check(),
        tool(
            "mmdebstrap",
            pen_core::fsutil::find_in_path("mmdebstrap"),
            "sudo apt-get install mmdebstrap",
        ),
        tool(
            "tar2sqfs",
            pen_core::fsutil::find_in_path("tar2sqfs"),
            "sudo apt-get install squashfs-tools-ng",
        ),
    ];
    let mut ok = true;
    for check in &checks {
        match &check.found {
            Ok(detail) => println!("ok       {:<20} {detail}", check.name),
            Err(fix) => {
                ok = false;
                println!("MISSING  {:<20} fix: {fix}", check.name);
            }
        }
    }
    let accel = pen_vm::accel::detect();
    match &accel.notice {
        None => println!("ok       {:<20} kvm", "accelerator"),
        Some(notice) => println!("ok       {:<20} tcg: {notice}", "accelerator"),
    }
    // Said on its own line even when the CPU rules KVM out: the same user on a KVM host
    // needs exactly this fix.
    if let Some(Err(e)) = pen_vm::accel::kvm_device_access() {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            println!(
                "-        {:<20} you may not open it; for KVM: {}",
                "/dev/kvm",
                pen_vm::accel::KVM_GROUP_FIX
            );
        }
    }
    println!(
        "-        {:<20} {}",
        "resource limits",
        cgroup_offer(&CgroupHost::read())
    );
    let base = pen_core::image::BaseImage::load(home);
    // Not a requirement: a warning for hosts behind a TLS-intercepting proxy.
    match crate::host_cas::check(base.as_ref()) {
        Some((true, text)) => println!("ok       {:<20} {text}", "extra CAs"),
        Some((false, text)) => println!("WARN     {:<20} {text}", "extra CAs"),
        None => {}
    }
    match base {
        Some(base) => println!(
            "ok       {:<20} {} (kernel {}, built {} ago)",
            "base image",
            &base.manifest.image_id[..12],
            base.manifest.kernel_version,
            pen_core::vm::age(base.manifest.created_at)
        ),
        None => println!(
            "-        {:<20} not built yet: built on first use, or `pen image build --base`",
            "base image"
        ),
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_limit_is_offered_only_with_cgroup_v2_and_a_user_manager() {
        let offer = |unified, user_manager| {
            cgroup_offer(&CgroupHost {
                unified,
                user_manager,
            })
        };
        assert!(offer(true, true).contains("systemd-run --user --scope"));
        assert!(offer(false, true).contains("no cgroup v2"));
        assert!(offer(true, false).contains("no systemd user manager"));
    }

    #[test]
    fn reads_qemu_versions() {
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)\n"),
            Some((7, 2))
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 10.0.2\n"),
            Some((10, 0))
        );
        assert_eq!(parse_qemu_version("nonsense"), None);
    }
}
