//! pen run as root: QEMU still faces the guest without root. It gives up root for `nobody`
//! once its files are open (`-runas`, under its seccomp sandbox), gets the sockets it needs
//! later as descriptors, and runs in a PID namespace whose init dies with the supervisor, so
//! killing the supervisor still takes QEMU with it (a uid change clears QEMU's own
//! parent-death signal). Run by `.ci/run` as root; ignored otherwise.

mod common;

use std::time::Duration;

use common::*;

/// `Uid:` (real, effective, saved, filesystem), `Seccomp:` and `NSpid:` of a process.
fn status_of(pid: u32) -> (Vec<u32>, String, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let uids = field("Uid:")
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let nspids = field("NSpid:").split_whitespace().count();
    (uids, field("Seccomp:"), nspids)
}

#[track_caller]
fn assert_qemu_unprivileged(pen: &Pen, name: &str, when: &str) {
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("this host has a user nobody")
        .uid
        .as_raw();
    let pids = pen.qemu_pids(name);
    assert_eq!(pids.len(), 1, "{when}: one QEMU for {name}: {pids:?}");
    let (uids, seccomp, nspids) = status_of(pids[0]);
    assert_eq!(uids, vec![nobody; 4], "{when}: QEMU runs as nobody");
    assert_eq!(seccomp, "2", "{when}: QEMU is under its seccomp filter");
    assert_eq!(nspids, 2, "{when}: QEMU runs in a PID namespace of its own");
}

#[test]
#[ignore = "needs root: run by .ci/run as root"]
fn as_root_qemu_gives_up_root_and_still_dies_with_its_supervisor() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "run this test as root (cargo test -- --ignored, as root)"
    );
    let pen = Pen::new("as-root");
    let vm = "r";

    // Cold boot or restore (whichever the shared images give), then the other one.
    pen.start(vm);
    assert_qemu_unprivileged(&pen, vm, "first start");
    pen.exec(
        vm,
        &[
            "sh",
            "-c",
            "echo kept > /root/kept && echo shared > /workspace/w && sync",
        ],
    )
    .ok();
    assert_eq!(
        std::fs::read_to_string(pen.ws.join("w")).unwrap(),
        "shared\n"
    );
    pen.run(&["stop", vm]).ok();
    pen.start(vm);
    assert_qemu_unprivileged(&pen, vm, "second start");
    let out = pen.exec(vm, &["cat", "/root/kept"]).ok();
    assert_eq!(out.stdout_str(), "kept\n");

    // Killing the supervisor outright takes QEMU (outside the supervisor's reach once it
    // changed uid) with it, through the PID namespace.
    let lock = std::fs::read_to_string(pen.vm_dir(vm).join("lock")).unwrap();
    kill9(lock.trim().parse().unwrap());
    assert!(
        wait_until(Duration::from_secs(10), || pen.qemu_pids(vm).is_empty()),
        "QEMU outlived its supervisor"
    );
    pen.wait_status(vm, "stopped", Duration::from_secs(10));

    // And the VM starts again with its data.
    let out = pen.exec(vm, &["cat", "/root/kept"]).ok();
    assert_eq!(out.stdout_str(), "kept\n");
}
