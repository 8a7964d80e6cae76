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

/// Needs root to make a directory another uid owns; `.ci/run` runs it as root after the
/// suite has run as an ordinary user (`cargo test --test host_files -- --ignored`).
#[test]
#[ignore = "needs root (plants a directory another uid owns); .ci/run runs it as root"]
fn runtime_dir_owned_by_another_user_is_refused() {
    let pen = Pen::without_vms("rt-foreign");
    let level = fallback_home_level(&pen);
    std::fs::create_dir_all(level.parent().unwrap()).unwrap();
    std::fs::create_dir(&level).unwrap();
    let _planted = Planted(level.clone());
    std::fs::set_permissions(&level, std::fs::Permissions::from_mode(0o777)).unwrap();
    // The attacker: a uid that is not ours.
    let foreign = nix::unistd::Uid::from_raw(65534);
    nix::unistd::chown(&level, Some(foreign), None)
        .expect("making a directory owned by another uid needs root");
    let ws = pen.ws.to_string_lossy().into_owned();
    for args in [
        vec!["exec", "vm", "--dir", &ws, "--", "true"],
        vec!["start", "vm", "--dir", &ws],
        vec!["shell", "vm", "--dir", &ws],
    ] {
        let out = pen_without_xdg(&pen, &args);
        out.fails_with(
            None,
            &[&level.to_string_lossy(), "owned by uid 65534", "remove it"],
        );
    }
    assert!(
        entries(&level).is_empty(),
        "pen created files in the attacker's directory"
    );
    assert!(
        entries(&pen.home.join("vms")).is_empty(),
        "a VM was created"
    );
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
    assert_eq!(
        std::fs::read(victim.join("vm/precious")).unwrap(),
        b"keep me"
    );
    assert_eq!(
        entries(&victim.join("vm")).len(),
        1,
        "pen wrote through the symlink"
    );
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

/// `pen ARGS` under `umask 000`, without XDG_RUNTIME_DIR (so the runtime directory is the
/// fallback [`fallback_home_level`] finds).
fn pen_umask0(pen: &Pen, args: &[String]) -> Out {
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("umask 000; exec \"$0\" \"$@\"")
        .arg(PEN)
        .args(args)
        .env("PEN_HOME", &pen.home)
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("PEN_ACCEL")
        .current_dir(&pen.ws);
    run_cmd(cmd, None, TIMEOUT)
}

/// Every file and directory under `root` (not `root` itself, not following symlinks) that
/// has group or other permission bits, with its mode.
fn not_private(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = entries(root);
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            continue; // the harness's shared `images` link
        }
        if meta.mode() & 0o077 != 0 {
            found.push(format!("{} {:o}", path.display(), meta.mode() & 0o7777));
        }
        if meta.is_dir() {
            stack.extend(entries(&path));
        }
    }
    found
}

#[test]
fn everything_pen_makes_is_private_whatever_the_umask() {
    let pen = Pen::new("modes");
    let runtime = fallback_home_level(&pen);
    let args = |a: Vec<String>| a;
    pen_umask0(&pen, &args(pen.create_args("start", "m", &[]))).ok();
    pen_umask0(&pen, &args(pen.exec_args("m", &["true"]))).ok();
    let vm = pen.vm_dir("m");
    for file in [
        "vm.json",
        "lock",
        "overlay.img",
        "console.log",
        "supervisor.log",
    ] {
        assert!(vm.join(file).exists(), "no {file}");
    }
    assert!(
        runtime.join("m/pen.sock").exists(),
        "the runtime dir is not where expected"
    );
    let mut open = not_private(&pen.home);
    open.extend(not_private(&runtime));
    assert!(
        open.is_empty(),
        "readable by others while running: {open:#?}"
    );

    pen_umask0(&pen, &["stop".into(), "m".into()]).ok();
    let mut open = not_private(&pen.home);
    open.extend(not_private(&runtime));
    assert!(open.is_empty(), "readable by others after stop: {open:#?}");
}

/// A process that holds the VM's lock without being its supervisor (another program, or
/// another user's process back when the file was world-readable): pen says so instead of
/// starting supervisors that lose the lock race forever, and `stop --force` kills nothing.
#[test]
fn a_lock_held_by_a_stranger_is_an_error_not_a_loop() {
    use nix::fcntl::{Flock, FlockArg};
    let pen = Pen::new("stranger");
    let name = pen.vm("held");
    let dir = pen.vm_dir(&name);
    std::fs::create_dir_all(&dir).unwrap();
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(dir.join("lock"))
        .unwrap();
    let shared = Flock::lock(file, FlockArg::LockSharedNonblock).unwrap();
    let started = Instant::now();
    pen.exec(&name, &["true"])
        .fails_with(None, &["lock", "not its pen supervisor", "fuser"]);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?} to give up",
        started.elapsed()
    );
    assert!(pen.qemu_pids(&name).is_empty());
    drop(shared);

    // An exclusive lock naming a pid that is not a supervisor (a reused pid): not killed.
    let mut bystander = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    std::fs::write(dir.join("lock"), format!("{}\n", bystander.id())).unwrap();
    let file = std::fs::File::open(dir.join("lock")).unwrap();
    let exclusive = Flock::lock(file, FlockArg::LockExclusiveNonblock).unwrap();
    pen.run(&["stop", "--force", &name])
        .fails_with(None, &["not its pen supervisor", "not killing"]);
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "stop --force killed a bystander"
    );
    drop(exclusive);
    let _ = bystander.kill();
    let _ = bystander.wait();
}
