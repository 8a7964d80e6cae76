//! The free-space floor and warning: pen refuses to create or start a VM, build an image or
//! create a volume on a nearly full file system, and warns at a start when the VM disks there
//! could outgrow the space left.

mod common;

use common::*;

/// Runs `script` (sh, `$0` = pen) with `PEN_HOME` on a 64 MiB tmpfs: in a user and mount
/// namespace of its own, so that an ordinary user can mount it (pen runs as root in there,
/// which changes nothing before a VM boots).
fn on_a_small_disk(pen: &Pen, script: &str) -> Out {
    let runtime = pen.root.join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "--mount", "--", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=64m tmpfs \"$PEN_HOME\" || exit 99\n{script}"
        ))
        .arg(PEN)
        .env("PEN_HOME", &pen.home)
        .env("XDG_RUNTIME_DIR", &runtime)
        .env("WS", &pen.ws)
        .env_remove("PEN_MIN_FREE")
        .current_dir(&pen.ws);
    run_cmd(cmd, None, TIMEOUT)
}

#[test]
fn below_the_floor_no_vm_image_or_volume_is_made_and_nothing_is_written() {
    let pen = Pen::without_vms("space-floor");
    std::fs::write(pen.ws.join("file"), "data").unwrap();
    let out = on_a_small_disk(
        &pen,
        r#"
        "$0" start tight --dir "$WS" 2>&1; echo "rc=$?"
        test -e "$PEN_HOME/vms/tight/vm.json" && echo WROTE-VM
        "$0" volume create tools --from "$WS" 2>&1; echo "rc=$?"
        ls -A "$PEN_HOME/volumes" 2>/dev/null | grep . && echo WROTE-VOLUME
        "$0" image build --base 2>&1; echo "rc=$?"
        ls -A "$PEN_HOME/images" 2>/dev/null | grep -v '^\.build\.lock$' | grep . && echo WROTE-IMAGE
        PEN_MIN_FREE=32M "$0" volume create tools --from "$WS" 2>&1; echo "rc=$?"
        "#,
    );
    let text = out.stdout_str();
    assert_eq!(out.code, Some(0), "{out}");
    let refusals: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("pen: cannot "))
        .collect();
    assert_eq!(refusals.len(), 3, "{text}");
    for (line, what) in refusals.iter().zip([
        "create VM tight",
        "create volume tools",
        "build the base image",
    ]) {
        assert!(line.starts_with(&format!("pen: cannot {what}: ")), "{line}");
        assert!(line.contains("free on the file system holding"), "{line}");
        assert!(line.contains("below pen's floor of 256M"), "{line}");
        assert!(line.contains("PEN_MIN_FREE"), "{line}");
    }
    assert_eq!(text.matches("rc=1").count(), 3, "{text}");
    assert!(!text.contains("WROTE-"), "something was written:\n{text}");
    // A lower floor lets the small disk serve.
    assert!(text.trim_end().ends_with("rc=0"), "{text}");
}

/// Other VMs' disks, sparse, that could still grow past the free space: starting a VM says
/// so, with the figures, and goes ahead.
#[test]
fn a_start_warns_when_the_vm_disks_could_outgrow_the_free_space() {
    let pen = Pen::new("space-warn");
    let st = nix::sys::statvfs::statvfs(&pen.home).unwrap();
    let free = st.blocks_available() * st.fragment_size();
    let size = free + (1 << 30);
    if size > 8 << 40 {
        eprintln!("pen-it: SKIPPED: {free} bytes free is more than a sparse file here can claim");
        return;
    }
    let other = pen.home.join("vms/idle-other");
    std::fs::create_dir_all(&other).unwrap();
    let disk = std::fs::File::create(other.join("overlay.img")).unwrap();
    disk.set_len(size).unwrap();
    let name = pen.vm("warn");
    let out = pen.exec(&name, &["true"]).ok();
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("pen: warning: "))
        .unwrap_or_else(|| panic!("no warning:\n{out}"));
    assert!(line.contains("free on the file system holding"), "{line}");
    assert!(
        line.contains("this VM's disk can still grow by") && line.contains("and 1 other VM's by"),
        "{line}"
    );
    assert!(line.contains("pen delete"), "{line}");
    // Once this VM's own disk is smaller than the space left and the other one is gone,
    // no warning.
    std::fs::remove_dir_all(&other).unwrap();
    let out = pen.exec(&name, &["true"]).ok();
    if free > 11 << 30 {
        assert!(!out.stderr.contains("warning:"), "{out}");
    }
}
