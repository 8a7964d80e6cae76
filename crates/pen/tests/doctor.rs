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

#[test]
fn doctor_checks_user_namespaces_by_using_one() {
    let pen = Pen::without_vms("doctor-userns");
    let out = pen.run(&["doctor"]);
    let text = out.stdout_str();
    let line = text
        .lines()
        .find(|l| l.contains("user namespaces"))
        .unwrap_or_else(|| panic!("no user namespaces line:\n{out}"));
    assert!(line.starts_with("ok"), "{line}");
    assert!(line.contains("mounted"), "{line}");
}

/// A host where user namespaces are disabled, simulated: pen runs in a user namespace
/// whose own limit on nested ones is 0 (`user.max_user_namespaces` is per namespace).
#[test]
fn doctor_on_a_host_without_user_namespaces_names_the_setting_and_the_fix() {
    let pen = Pen::without_vms("doctor-no-userns");
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "--", "sh", "-c"])
        .arg("echo 0 > /proc/sys/user/max_user_namespaces && exec \"$0\" doctor")
        .arg(PEN)
        .env("PEN_HOME", &pen.home)
        .current_dir(&pen.ws);
    let out = run_cmd(cmd, None, TIMEOUT);
    let text = out.stdout_str();
    let line = text
        .lines()
        .find(|l| l.contains("user namespaces"))
        .unwrap_or_else(|| panic!("no user namespaces line:\n{out}"));
    assert!(line.starts_with("MISSING"), "{line}");
    assert!(
        line.contains("user.max_user_namespaces = 0")
            && line.contains("sudo sysctl -w user.max_user_namespaces="),
        "{line}"
    );
    assert_eq!(out.code, Some(1), "{out}");
}
