//! Bad input: a clear one-line `pen:` error, exit 2 for usage, and nothing created or lost.
//! Most of these boot nothing; the overlay and missing-tool cases boot real VMs.

mod common;

use std::time::Duration;

use common::*;

/// Nothing at all under `$PEN_HOME/vms`.
#[track_caller]
fn assert_no_vms(pen: &Pen) {
    let entries: Vec<_> = std::fs::read_dir(pen.home.join("vms"))
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        entries.is_empty(),
        "bad input created files under vms/: {entries:?}"
    );
}

#[test]
fn invalid_names_are_refused_before_anything_is_made() {
    let pen = Pen::without_vms("bad-names");
    let ws = pen.ws.to_string_lossy().into_owned();
    let long = "a".repeat(64);
    for name in ["../x", "A B", "", long.as_str()] {
        for verb in ["shell", "exec", "start"] {
            let mut args = vec![verb, name, "--dir", &ws];
            if verb == "exec" {
                args.extend(["--", "true"]);
            }
            let out = pen.run(&args).usage_error(&["invalid VM name"]);
            assert!(
                out.stderr.contains(name),
                "the error should quote the name:\n{out}"
            );
        }
        for verb in ["stop", "delete", "logs"] {
            pen.run(&[verb, name]).usage_error(&["invalid VM name"]);
        }
    }
    assert_no_vms(&pen);
}

#[test]
fn bad_flags_are_refused_before_anything_is_made() {
    let pen = Pen::without_vms("bad-flags");
    let ws = pen.ws.to_string_lossy().into_owned();
    let file = pen.ws.join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let file = file.to_string_lossy().into_owned();
    let missing = pen.ws.join("no-such-dir").to_string_lossy().into_owned();

    let cases: &[(&[&str], &[&str])] = &[
        (&["--dir", &missing], &["--dir", "no-such-dir"]),
        (&["--dir", &file], &["--dir", "not a directory"]),
        (
            &["--dir", &ws, "--disk-size", "10Q"],
            &["--disk-size", "10Q"],
        ),
        (&["--dir", &ws, "--disk-size", "0"], &["--disk-size"]),
        (&["--dir", &ws, "--memory", "64"], &["--memory", "64"]),
        (&["--dir", &ws, "--memory", "lots"], &["--memory"]),
        (&["--dir", &ws, "--cpus", "0"], &["--cpus"]),
        (&["--dir", &ws, "--env", "NOEQUALS"], &["--env", "NOEQUALS"]),
        (
            &["--dir", &ws, "--env-from-host", "UNSET_VAR_XYZ"],
            &["UNSET_VAR_XYZ", "not set"],
        ),
        (&["--dir", &ws, "--accel", "warp"], &["--accel"]),
        (
            &["--dir", &ws, "--network", "closed"],
            &["--network", "'closed'"],
        ),
        (
            &["--dir", &ws, "--network", "allow=a..example"],
            &["--network", "'a..example'", "empty label"],
        ),
        (
            &["--dir", &ws, "--network", "allow="],
            &["--network", "allow="],
        ),
        (
            &["--dir", &ws, "--allow-host", "127.0.0.1"],
            &["--allow-host", "'127.0.0.1'", "no port"],
        ),
        (
            &["--dir", &ws, "--allow-host", "127.0.0.1:70000"],
            &["--allow-host", "'70000'"],
        ),
        (
            &["--dir", &ws, "--publish", "70000:80"],
            &["--publish", "'70000:80'", "1-65535"],
        ),
        (
            &["--dir", &ws, "--publish", "8080:80/sctp"],
            &["--publish", "'8080:80/sctp'"],
        ),
        (
            &["--dir", &ws, "--publish", "8080:80", "--publish", "8080:81"],
            &["--publish", "8080", "published twice"],
        ),
    ];
    for (flags, words) in cases {
        for verb in ["shell", "exec", "start"] {
            let mut args = vec![verb, "vm"];
            args.extend_from_slice(flags);
            if verb == "exec" {
                args.extend(["--", "true"]);
            }
            let mut cmd = pen.cmd(&args);
            cmd.env_remove("UNSET_VAR_XYZ");
            run_cmd(cmd, None, TIMEOUT).usage_error(words);
        }
    }
    assert_no_vms(&pen);
}

#[test]
fn a_bad_pen_accel_is_refused_before_anything_is_made() {
    let pen = Pen::without_vms("bad-pen-accel");
    let ws = pen.ws.to_string_lossy().into_owned();
    for verb in ["shell", "exec", "start"] {
        let mut args = vec![verb, "vm", "--dir", &ws];
        if verb == "exec" {
            args.extend(["--", "true"]);
        }
        let mut cmd = pen.cmd(&args);
        cmd.env("PEN_ACCEL", "warp");
        run_cmd(cmd, None, TIMEOUT).usage_error(&["PEN_ACCEL", "warp"]);
    }
    assert_no_vms(&pen);
}

/// Directories the guest must not be able to write: the host's root, the user's home and
/// anything holding it, pen's own home and anything inside or holding it.
#[test]
fn sharing_home_root_or_pens_own_files_is_refused() {
    let pen = Pen::without_vms("bad-share");
    let home = pen.root.join("userhome");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(pen.home.join("vms")).unwrap();
    let pen_home_parent = pen.home.join("..");
    let cases: &[(&std::path::Path, &str)] = &[
        (&home, "your home directory"),
        (std::path::Path::new("/"), "root directory"),
        (&pen_home_parent, "contains"),
        (&pen.home.join("vms"), "inside pen's own directory"),
    ];
    for (dir, why) in cases {
        let dir = dir.to_string_lossy().into_owned();
        for verb in ["shell", "exec", "start"] {
            let mut args = vec![verb, "vm", "--dir", &dir];
            if verb == "exec" {
                args.extend(["--", "true"]);
            }
            let mut cmd = pen.cmd(&args);
            cmd.env("HOME", &home);
            run_cmd(cmd, None, TIMEOUT).usage_error(&["--dir", why, "--dir PROJECT"]);
        }
    }
    // `cd ~ && pen shell`: the default directory is refused the same way.
    let mut cmd = pen.cmd::<&str>(&["shell"]);
    cmd.env("HOME", &home).current_dir(&home);
    run_cmd(cmd, None, TIMEOUT).usage_error(&["current directory", "your home directory"]);
    assert_no_vms(&pen);
}

#[test]
fn commands_on_a_missing_vm_say_so() {
    let pen = Pen::without_vms("missing-vm");
    for verb in ["stop", "delete", "logs"] {
        pen.run(&[verb, "ghost"])
            .usage_error(&["no VM named \"ghost\""]);
    }
    assert_no_vms(&pen);
}

#[test]
fn cli_basics() {
    let pen = Pen::without_vms("cli-basics");
    let out = pen.run(&["version"]).ok();
    assert!(out.stdout_str().starts_with("pen "), "{out}");
    let out = pen.run(&["completions", "bash"]).ok();
    assert!(out.stdout_str().contains("_pen"), "{out}");
    let out = pen.run(&["list", "--json"]).ok();
    assert_eq!(out.stdout_str().trim(), "[]", "{out}");
    let out = pen.run(&["ls"]).ok();
    assert!(out.stdout_str().starts_with("NAME"), "{out}");
    let out = pen.run(&["image", "list"]).ok();
    assert!(out.stdout_str().contains("base"), "{out}");
    // doctor's exit status depends on the host; what it checks does not.
    let out = pen.run(&["doctor"]);
    let text = format!("{}{}", out.stdout_str(), out.stderr).to_lowercase();
    for tool in ["qemu", "virtiofsd", "mmdebstrap"] {
        assert!(text.contains(tool), "doctor should check {tool}:\n{out}");
    }
    pen.run::<&str>(&[]).code_is(2);
    assert_no_vms(&pen);
}

/// The base build fails fast, with the install hint, when mmdebstrap is not in PATH.
#[test]
fn missing_mmdebstrap_fails_the_base_build_with_an_install_hint() {
    let pen = Pen::without_vms("no-mmdebstrap");
    // A PATH with the squashfs writer but without mmdebstrap, so mmdebstrap is what is
    // missing (pen checks both before building anything).
    let bin = pen.root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["tar2sqfs", "mksquashfs"] {
        for dir in ["/usr/bin", "/usr/sbin", "/bin", "/usr/local/bin"] {
            let path = std::path::Path::new(dir).join(tool);
            if path.exists() {
                let _ = std::os::unix::fs::symlink(&path, bin.join(tool));
                break;
            }
        }
    }
    let mut cmd = pen.cmd(&["image", "build", "--base"]);
    cmd.env("PATH", &bin);
    let out = run_cmd(cmd, None, Duration::from_secs(60));
    out.fails_with(None, &["mmdebstrap", "apt-get install"]);
    assert!(
        !pen.home.join("images/base.json").exists(),
        "no image may be recorded"
    );
    assert_no_vms(&pen);
}

/// Runs `pen exec` with `var` pointing at a program that does not exist.
fn exec_without(pen: &Pen, var: &str) -> Out {
    let mut cmd = pen.cmd(&pen.exec_args("tools", &["true"]));
    cmd.env(var, "/nonexistent");
    run_cmd(cmd, None, TIMEOUT)
}

/// A missing QEMU is named, with how to install it, and leaves nothing.
#[test]
fn missing_qemu_is_named_with_an_install_hint() {
    let pen = Pen::new("no-qemu");
    exec_without(&pen, "PEN_QEMU").fails_with(None, &["qemu", "apt-get install"]);
    assert!(pen.qemu_pids("tools").is_empty());
    assert_no_vms(&pen);
}

/// A missing virtiofsd is named, with how to install it, and leaves nothing.
#[test]
fn missing_virtiofsd_is_named_with_an_install_hint() {
    let pen = Pen::new("no-virtiofsd");
    exec_without(&pen, "PEN_VIRTIOFSD").fails_with(None, &["virtiofsd", "apt-get install"]);
    assert!(pen.qemu_pids("tools").is_empty());
    assert_no_vms(&pen);
}

/// The VM `name` booted once (exec-started, so it stops by itself) and is stopped now.
fn booted_once(pen: &Pen, name: &str) {
    pen.exec(name, &["true"]).ok();
    pen.wait_status(name, "stopped", Duration::from_secs(60));
}

#[test]
fn overlay_disk_deleted_by_hand_is_an_error_not_a_blank_vm() {
    let pen = Pen::new("overlay-gone");
    booted_once(&pen, "gone");
    let dir = pen.vm_dir("gone");
    std::fs::remove_file(dir.join("overlay.img")).unwrap();
    let config = std::fs::read(dir.join("vm.json")).unwrap();

    pen.exec("gone", &["true"])
        .fails_with(None, &["overlay", "missing"]);
    assert!(
        !dir.join("overlay.img").exists(),
        "no blank disk may be made"
    );
    assert_eq!(std::fs::read(dir.join("vm.json")).unwrap(), config);
    assert!(pen.qemu_pids("gone").is_empty());
    assert_eq!(pen.status("gone"), "stopped");
}

#[test]
fn overlay_disk_truncated_by_hand_is_an_error_and_is_left_alone() {
    let pen = Pen::new("overlay-short");
    booted_once(&pen, "short");
    let dir = pen.vm_dir("short");
    let disk = dir.join("overlay.img");
    let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    file.set_len(1 << 20).unwrap();
    drop(file);
    let config = std::fs::read(dir.join("vm.json")).unwrap();

    pen.exec("short", &["true"])
        .fails_with(None, &["overlay", "truncated"]);
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 1 << 20);
    assert_eq!(std::fs::read(dir.join("vm.json")).unwrap(), config);
    assert!(pen.qemu_pids("short").is_empty());
}
