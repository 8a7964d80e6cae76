//! The host processes that face the guest are confined: QEMU runs under its seccomp
//! sandbox (no exec, no privilege changes) on cold boots, snapshot saves and restores, and
//! virtiofsd in namespaces of its own (its root is the shared directory) under seccomp.

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
    // virtiofsd, which serves the guest's file requests, is sandboxed too: its own mount
    // namespace (its root is the shared directory) and a seccomp filter.
    let ws = pen.ws.to_string_lossy().into_owned();
    let vfsd: Vec<u32> = processes()
        .into_iter()
        .filter(|p| {
            p.argv.first().is_some_and(|a| a.ends_with("virtiofsd"))
                && p.argv.iter().any(|a| a.contains(&ws))
        })
        .map(|p| p.pid)
        .collect();
    assert!(!vfsd.is_empty(), "no virtiofsd found for {name}");
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let mut seen = Vec::new();
    for pid in &vfsd {
        let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&argv).contains("\0none\0"),
            "virtiofsd {pid} runs with --sandbox none"
        );
        // The Rust virtiofsd forks: a parent waits outside the sandbox, the process that
        // serves the guest runs in the namespaces under the filter.
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
            continue;
        };
        let mode = seccomp_mode(*pid);
        seen.push(format!(
            "{pid}: own mount namespace {}, seccomp {mode}",
            ns != ours
        ));
        if ns != ours && mode == "2" {
            return assert_workspace_works(pen, name);
        }
    }
    panic!(
        "no virtiofsd of {name} serves from a mount namespace of its own under seccomp: {seen:?}"
    );
}

#[track_caller]
fn assert_workspace_works(pen: &Pen, name: &str) {
    // The VM still works under the filter: the workspace (hot-plugged after the filter is
    // in place) and a process in the guest.
    std::fs::write(pen.ws.join("seen.txt"), "from the host\n").unwrap();
    let out = pen.exec(name, &["cat", "/workspace/seen.txt"]).ok();
    assert_eq!(out.stdout_str(), "from the host\n");
}

#[test]
fn qemu_and_virtiofsd_are_confined_cold_saved_and_restored() {
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
