//! The host processes that face the guest are confined: QEMU runs under its seccomp
//! sandbox (no exec, no privilege changes) on cold boots, snapshot saves and restores.

mod common;

use std::time::Duration;

use common::*;

/// `Seccomp:` of a process: 0 none, 1 strict, 2 filter.
fn seccomp_mode(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

#[track_caller]
fn assert_qemu_confined(pen: &Pen, name: &str) {
    let qemu = pen.qemu_pids(name);
    assert_eq!(qemu.len(), 1, "expected one QEMU for {name}: {qemu:?}");
    assert_eq!(
        seccomp_mode(qemu[0]),
        "2",
        "QEMU of {name} runs without its seccomp filter"
    );
    // The VM still works under the filter: the workspace (hot-plugged after the filter is
    // in place) and a process in the guest.
    std::fs::write(pen.ws.join("seen.txt"), "from the host\n").unwrap();
    let out = pen.exec(name, &["cat", "/workspace/seen.txt"]).ok();
    assert_eq!(out.stdout_str(), "from the host\n");
}

#[test]
fn qemu_runs_under_seccomp_cold_saved_and_restored() {
    let pen = Pen::new("seccomp");
    // Cold boot without snapshots.
    let mut args = pen.create_args("start", "cold", &[]);
    args.push("--no-snapshot".into());
    pen.run(&args).ok();
    assert_qemu_confined(&pen, "cold");
    pen.run(&["stop", "cold"]).ok();

    // Two starts of another VM of the same shape: the first restores or saves the image's
    // snapshot, the second restores it.
    for round in 0..2 {
        pen.start("snap");
        assert_qemu_confined(&pen, "snap");
        pen.run(&["stop", "snap"]).ok();
        pen.wait_status("snap", "stopped", Duration::from_secs(60));
        if round == 1 {
            let log = std::fs::read_to_string(pen.vm_dir("snap").join("supervisor.log")).unwrap();
            assert!(
                log.contains("supervisor: restored snapshot"),
                "the second start did not restore:\n{log}"
            );
        }
    }
}
