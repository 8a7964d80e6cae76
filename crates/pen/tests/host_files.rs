//! What pen leaves on the host and who else can touch it: runtime directories another user
//! prepared are refused (never followed), everything under `PEN_HOME` and the runtime
//! directory is private whatever the umask, and a lock file held by a stranger is an error,
//! not a loop.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

/// `/tmp/pen-<uid>/<home-id>`: the level of pen's fallback runtime directory that belongs
/// to one `PEN_HOME` (the level above is shared by every `PEN_HOME` of this user).
fn fallback_home_level(pen: &Pen) -> PathBuf {
    let id = &hex::encode(Sha256::digest(pen.home.as_os_str().as_encoded_bytes()))[..12];
    PathBuf::from(format!("/tmp/pen-{}", nix::unistd::geteuid())).join(id)
}

/// Removes what the test planted in the shared `/tmp/pen-<uid>`, even when it fails.
struct Planted(PathBuf);

impl Drop for Planted {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.0) {
            Ok(m) if m.is_dir() => {
                let _ = std::fs::remove_dir_all(&self.0);
            }
            Ok(_) => {
                let _ = std::fs::remove_file(&self.0);
            }
            Err(_) => {}
        }
    }
}

/// A vm.json for VM `name`, written by hand: commands that need an existing VM get one
/// without booting anything.
fn fake_vm(pen: &Pen, name: &str) {
    let dir = pen.vm_dir(name);
    std::fs::create_dir_all(&dir).unwrap();
    let json = serde_json::json!({
        "name": name, "dir": pen.ws, "cpus": 1, "memory_mb": 1024,
        "disk_size": 2u64 << 30, "profile": null, "created_at": 1,
    });
    std::fs::write(dir.join("vm.json"), json.to_string()).unwrap();
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn pen_without_xdg(pen: &Pen, args: &[&str]) -> Out {
    let mut cmd = pen.cmd(args);
    cmd.env_remove("XDG_RUNTIME_DIR");
    run_cmd(cmd, None, TIMEOUT)
}

#[test]
fn runtime_dir_owned_by_another_user_is_refused() {
    let pen = Pen::without_vms("rt-foreign");
    let level = fallback_home_level(&pen);
    std::fs::create_dir_all(level.parent().unwrap()).unwrap();
    std::fs::create_dir(&level).unwrap();
    let _planted = Planted(level.clone());
    std::fs::set_permissions(&level, std::fs::Permissions::from_mode(0o777)).unwrap();
    // The attacker: a uid that is not ours.
    let foreign = nix::unistd::Uid::from_raw(65534);
    if let Err(e) = nix::unistd::chown(&level, Some(foreign), None) {
        eprintln!("skipped: cannot make a directory owned by another uid ({e}); run as root");
        return;
    }
    let ws = pen.ws.to_string_lossy().into_owned();
    for args in [
        vec!["exec", "vm", "--dir", &ws, "--", "true"],
        vec!["start", "vm", "--dir", &ws],
        vec!["shell", "vm", "--dir", &ws],
    ] {
        let out = pen_without_xdg(&pen, &args);
        out.fails_with(None, &[&level.to_string_lossy(), "owned by uid 65534", "remove it"]);
    }
    assert!(entries(&level).is_empty(), "pen created files in the attacker's directory");
    assert!(entries(&pen.home.join("vms")).is_empty(), "a VM was created");
    fake_vm(&pen, "vm");
    pen_without_xdg(&pen, &["stop", "vm"]).fails_with(None, &["owned by uid 65534"]);
    pen_without_xdg(&pen, &["delete", "vm", "--force"]).fails_with(None, &["owned by uid 65534"]);
    assert!(pen.vm_dir("vm").join("vm.json").exists());
}

#[test]
fn runtime_dir_symlink_is_refused_and_never_followed() {
    let pen = Pen::without_vms("rt-symlink");
    // The symlink points at a directory shaped like a runtime directory of VM `vm`:
    // `pen delete` would remove `victim/vm` through it.
    let victim = pen.root.join("victim");
    std::fs::create_dir_all(victim.join("vm")).unwrap();
    std::fs::write(victim.join("vm/precious"), b"keep me").unwrap();
    let level = fallback_home_level(&pen);
    std::fs::create_dir_all(level.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&victim, &level).unwrap();
    let _planted = Planted(level.clone());

    fake_vm(&pen, "vm");
    let ws = pen.ws.to_string_lossy().into_owned();
    pen_without_xdg(&pen, &["exec", "vm", "--dir", &ws, "--", "true"])
        .fails_with(None, &[&level.to_string_lossy(), "symlink"]);
    pen_without_xdg(&pen, &["delete", "vm", "--force"]).fails_with(None, &["symlink"]);
    assert_eq!(std::fs::read(victim.join("vm/precious")).unwrap(), b"keep me");
    assert_eq!(entries(&victim.join("vm")).len(), 1, "pen wrote through the symlink");
    assert!(pen.vm_dir("vm").join("vm.json").exists());

    // With XDG_RUNTIME_DIR set, pen's `pen/` directory there gets the same checks.
    let xdg = pen.root.join("xdg");
    std::fs::create_dir_all(&xdg).unwrap();
    std::os::unix::fs::symlink(&victim, xdg.join("pen")).unwrap();
    let mut cmd = pen.cmd(&["exec", "vm", "--dir", &ws, "--", "true"]);
    cmd.env("XDG_RUNTIME_DIR", &xdg);
    run_cmd(cmd, None, TIMEOUT).fails_with(None, &["xdg/pen", "symlink"]);
    assert_eq!(entries(&victim).len(), 1, "pen wrote through the symlink");
}
