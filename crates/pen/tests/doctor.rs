//! `pen doctor` as the user runs it: what pen uses and, for what is missing, the fix.

mod common;

use common::*;

#[test]
fn doctor_names_the_virtiofsd_in_use_and_never_asks_for_root() {
    let pen = Pen::without_vms("doctor");
    let out = pen.run(&["doctor"]);
    let text = out.stdout_str();
    let line = text
        .lines()
        .find(|l| l.contains("virtiofsd"))
        .unwrap_or_else(|| panic!("no virtiofsd line:\n{out}"));
    assert!(line.starts_with("ok"), "virtiofsd not usable here: {line}");
    assert!(
        !text.contains("as root") || nix::unistd::geteuid().is_root(),
        "doctor suggests root to an ordinary user:\n{text}"
    );
    assert!(!text.contains("run pen as root"), "{text}");
}

#[test]
fn doctor_without_kvm_access_reports_tcg_and_how_to_get_kvm() {
    let denied = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied);
    if !denied {
        eprintln!("skipped: this user may open /dev/kvm, or there is none");
        return;
    }
    let pen = Pen::without_vms("doctor-kvm");
    let out = pen.run(&["doctor"]);
    let text = out.stdout_str();
    assert!(text.contains("tcg"), "{text}");
    assert!(
        text.contains("sudo usermod -aG kvm $USER"),
        "no fix for /dev/kvm access:\n{text}"
    );
}
