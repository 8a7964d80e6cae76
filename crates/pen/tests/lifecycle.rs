//! VM lifecycle and state: the overlay disk persists (across clean and unclean stops), the
//! workspace is shared both ways, env stays off every disk, list/stop/delete, who keeps a VM
//! running, races to start one VM, and no orphans when the supervisor dies.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// apt over the guest's user-mode NAT, under TCG: give it time.
const APT_TIMEOUT: Duration = Duration::from_secs(1200);

#[test]
fn overlay_persists_across_stop_and_start() {
    let pen = Pen::new("persist");
    pen.start("keep");
    let install = pen.exec_args(
        "keep",
        &["sh", "-c", "apt-get update && apt-get install -y jq"],
    );
    run_cmd(pen.cmd(&install), None, APT_TIMEOUT).ok();
    pen.exec("keep", &["sh", "-c", "echo kept > /root/kept.txt"])
        .ok();
    pen.run(&["stop", "keep"]).ok();
    assert_eq!(pen.status("keep"), "stopped");
    assert!(
        pen.qemu_pids("keep").is_empty(),
        "QEMU still runs after stop"
    );

    // A cold boot (exec-started) sees both.
    let out = pen
        .exec_stdin(
            "keep",
            &["sh", "-c", "cat /root/kept.txt && jq -c .a"],
            br#"{"a":[1,2]}"#,
        )
        .ok();
    assert_eq!(out.stdout_str(), "kept\n[1,2]\n", "{out}");
}

#[test]
fn unclean_stop_then_the_next_boot_mounts_cleanly_with_the_data() {
    let pen = Pen::new("unclean");
    pen.start("crash");
    pen.exec(
        "crash",
        &["sh", "-c", "echo survived > /root/crash.txt && sync"],
    )
    .ok();
    let qemu = pen.qemu_pids("crash");
    assert_eq!(qemu.len(), 1, "expected one QEMU for the VM: {qemu:?}");
    kill9(qemu[0]);
    pen.wait_status("crash", "stopped", Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(10), || pen
            .leftover_processes()
            .is_empty()),
        "processes left after QEMU died: {:#?}",
        pen.leftover_processes()
    );

    // The journal is replayed; the root is the writable overlay again, with the data.
    let out = pen
        .exec(
            "crash",
            &[
                "sh",
                "-c",
                "cat /root/crash.txt && touch /root/after && echo writable && \
                 awk '$2 == \"/\" { print $1, substr($4, 1, 2) }' /proc/mounts",
            ],
        )
        .ok();
    assert_eq!(
        out.stdout_str(),
        "survived\nwritable\noverlay rw\n",
        "{out}"
    );
}

#[test]
fn workspace_is_shared_both_ways() {
    let pen = Pen::new("workspace");
    pen.start("ws");
    let token = random_token("from-host-");
    std::fs::create_dir_all(pen.ws.join("sub")).unwrap();
    std::fs::write(pen.ws.join("sub/host.txt"), &token).unwrap();

    let out = pen
        .exec("ws", &["sh", "-c", "cat /workspace/sub/host.txt"])
        .ok();
    assert_eq!(out.stdout_str(), token, "{out}");

    pen.exec(
        "ws",
        &[
            "sh",
            "-c",
            "mkdir -p /workspace/made/in && echo guest-wrote > /workspace/made/in/guest.txt",
        ],
    )
    .ok();
    assert_eq!(
        std::fs::read_to_string(pen.ws.join("made/in/guest.txt")).unwrap(),
        "guest-wrote\n"
    );

    // A change on the host after the guest has looked is seen too.
    std::fs::write(pen.ws.join("sub/host.txt"), "changed").unwrap();
    let out = pen.exec("ws", &["cat", "/workspace/sub/host.txt"]).ok();
    assert_eq!(out.stdout_str(), "changed", "{out}");

    // Sessions start in /workspace.
    let out = pen.exec("ws", &["pwd"]).ok();
    assert_eq!(out.stdout_str(), "/workspace\n", "{out}");
}

#[test]
fn env_reaches_the_guest_and_never_touches_a_disk_or_an_argv() {
    let pen = Pen::new("env");
    let a = random_token("pen-env-a-");
    let b = random_token("pen-env-b-");
    let c = random_token("pen-env-c-");
    let start = pen.create_args(
        "start",
        "env",
        &["--env", &format!("PEN_A={a}"), "--env-from-host", "PEN_B"],
    );
    let mut cmd = pen.cmd(&start);
    cmd.env("PEN_B", &b);
    run_cmd(cmd, None, TIMEOUT).ok();

    // Env given at start reaches every session; env given to one exec reaches that one.
    let out = pen
        .exec("env", &["sh", "-c", "printf '%s|%s' \"$PEN_A\" \"$PEN_B\""])
        .ok();
    assert_eq!(out.stdout_str(), format!("{a}|{b}"), "{out}");
    let mut exec = pen.create_args("exec", "env", &["--env", &format!("PEN_C={c}")]);
    exec.extend(["--", "sh", "-c", "printf '%s' \"$PEN_C\""].map(String::from));
    let out = pen.run(&exec).ok();
    assert_eq!(out.stdout_str(), c, "{out}");

    let search = |when: &str| {
        for value in [&a, &b, &c] {
            // $PEN_HOME holds console.log, vm.json, the overlay disk and the logs. Its
            // `images` is a symlink to the shared images, which no VM writes: not followed.
            for dir in [&pen.home, &pen.ws] {
                let found = files_containing(dir, value.as_bytes());
                assert!(found.is_empty(), "{when}: env value found in {found:?}");
            }
            let in_argv: Vec<_> = processes()
                .into_iter()
                .filter(|p| p.argv.iter().any(|arg| arg.contains(value.as_str())))
                .collect();
            assert!(
                in_argv.is_empty(),
                "{when}: env value in an argv: {in_argv:#?}"
            );
        }
    };
    search("while running");

    // A long-lived client (`pen shell`, a long `pen exec`) given `--env K=V`: the value
    // reaches the guest but not the client's /proc/PID/cmdline, which every user can read.
    let d = random_token("pen-env-d-");
    let mut exec = pen.create_args("exec", "env", &["--env", &format!("PEN_D={d}")]);
    exec.extend(
        [
            "--",
            "sh",
            "-c",
            "printf '%s' \"$PEN_D\" > /workspace/d; sleep 60",
        ]
        .map(String::from),
    );
    let client = pen.spawn(&exec, None);
    // The file exists before printf has written to it: wait for its content.
    let up = wait_until(TIMEOUT, || {
        std::fs::read_to_string(pen.ws.join("d")).is_ok_and(|text| !text.is_empty())
    });
    assert!(up, "the long exec did not start");
    assert_eq!(std::fs::read_to_string(pen.ws.join("d")).unwrap(), d);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", client.pid())).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains("PEN_D") || cmdline.contains("exec"),
        "{cmdline}"
    );
    assert!(
        !cmdline.contains(&d),
        "the env value is in pen's argv: {cmdline}"
    );
    kill9(client.pid());
    drop(client);
    std::fs::remove_file(pen.ws.join("d")).unwrap();

    pen.run(&["stop", "env"]).ok();
    search("after stop");
}

/// `pen stop` right after a large write that nobody synced: the guest's power-off syncs it
/// within the grace (and the supervisor waits longer while the guest is still writing), so
/// the next boot finds the whole file.
#[test]
fn stop_right_after_a_large_unsynced_write_keeps_it_whole() {
    let pen = Pen::new("bigwrite");
    pen.start("big");
    pen.exec("big", &["sh", "-c", "head -c 500M /dev/zero > /root/big"])
        .ok();
    let started = std::time::Instant::now();
    pen.run(&["stop", "big"]).ok();
    eprintln!(
        "pen stop after 500 MB unsynced took {:?}",
        started.elapsed()
    );
    let log = std::fs::read_to_string(pen.vm_dir("big").join("supervisor.log")).unwrap();
    assert!(
        !log.contains("did not power off"),
        "the guest was cut off while syncing:\n{log}"
    );
    let out = pen
        .exec(
            "big",
            &["sh", "-c", "stat -c %s /root/big; sha256sum < /root/big"],
        )
        .ok();
    // sha256 of 500 MiB of zero bytes.
    assert_eq!(
        out.stdout_str(),
        "524288000\na08a92258f621b55d08ad1e84c90c2ea6286fc6b6c9a4dfa7156afb16c190170  -\n",
        "{out}"
    );
}

#[test]
fn list_stop_delete() {
    let pen = Pen::new("list");
    assert!(pen.list().is_empty());
    pen.start("lst");

    let row = pen.row("lst").expect("listed");
    assert_eq!(row["status"], "running", "{row}");
    let lock = std::fs::read_to_string(pen.vm_dir("lst").join("lock")).unwrap();
    assert_eq!(
        row["pid"].as_u64(),
        lock.trim().parse::<u64>().ok(),
        "{row}"
    );
    assert_eq!(row["cpus"], 1, "{row}");
    assert_eq!(row["memory_mb"], 1024, "{row}");
    assert_eq!(row["disk_size"], 2u64 << 30, "{row}");
    assert_eq!(row["profile"], serde_json::Value::Null, "{row}");
    assert_eq!(
        row["dir"].as_str(),
        Some(pen.ws.canonicalize().unwrap().to_str().unwrap()),
        "{row}"
    );
    assert!(row["created_at"].as_u64().is_some_and(|t| t > 0), "{row}");
    let out = pen.run(&["ls"]).ok();
    let text = out.stdout_str();
    assert!(text.starts_with("NAME"), "{out}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("lst ") && l.contains("running")),
        "{out}"
    );

    // A running VM is not deleted without --force.
    pen.run(&["delete", "lst"])
        .usage_error(&["running", "--force"]);
    assert!(pen.vm_dir("lst").join("vm.json").exists());
    assert_eq!(pen.status("lst"), "running");

    pen.run(&["stop", "lst"]).ok();
    let row = pen.row("lst").expect("still listed");
    assert_eq!(row["status"], "stopped", "{row}");
    assert_eq!(row["pid"], serde_json::Value::Null, "{row}");
    assert!(pen.qemu_pids("lst").is_empty());
    pen.run(&["stop", "lst"]).fails_with(None, &["not running"]);

    pen.run(&["logs", "lst"]).ok();

    pen.run(&["rm", "lst"]).ok();
    assert!(!pen.vm_dir("lst").exists(), "vms/lst is still there");
    assert!(pen.list().is_empty());
    pen.run(&["delete", "lst"]).usage_error(&["no VM named"]);

    // --force deletes a running VM, stopping it first.
    pen.start("lst2");
    pen.run(&["delete", "--force", "lst2"]).ok();
    assert!(!pen.vm_dir("lst2").exists());
    assert!(pen.qemu_pids("lst2").is_empty());
}

#[test]
fn started_vm_stays_up_exec_started_vm_stops() {
    let pen = Pen::new("keepalive");
    // Booted by exec: it powers off when the exec ends.
    pen.exec("auto", &["true"]).ok();
    pen.wait_status("auto", "stopped", Duration::from_secs(60));
    assert!(wait_until(Duration::from_secs(10), || pen
        .qemu_pids("auto")
        .is_empty()));

    // Booted by `pen start`: sessions come and go, it stays.
    pen.start("auto");
    pen.exec("auto", &["true"]).ok();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(pen.status("auto"), "running");
    assert_eq!(pen.qemu_pids("auto").len(), 1);
    pen.run(&["stop", "auto"]).ok();
    assert_eq!(pen.status("auto"), "stopped");
}

#[test]
fn a_second_session_attaches_to_the_running_vm() {
    let pen = Pen::new("attach");
    pen.start("att");
    let qemu = pen.qemu_pids("att");
    assert_eq!(qemu.len(), 1);

    // `pen shell` without a terminal: a plain shell reading commands from stdin.
    let shell = pen.create_args("shell", "att", &[]);
    let out = pen
        .run_stdin(&shell, b"echo attached-$((6 * 7))\nhostname\nexit 5\n")
        .code_is(5);
    assert_eq!(out.stdout_str(), "attached-42\natt\n", "{out}");
    assert_eq!(pen.qemu_pids("att"), qemu, "a second QEMU was started");
    assert_eq!(pen.status("att"), "running");
}

/// Samples the QEMU processes of VM `name` until told to stop; returns every pid seen.
fn watch_qemus(pen: &Pen, name: &str, done: &AtomicBool) -> BTreeSet<u32> {
    let mut seen = BTreeSet::new();
    while !done.load(Ordering::Relaxed) {
        seen.extend(pen.qemu_pids(name));
        std::thread::sleep(Duration::from_millis(10));
    }
    seen
}

/// Two `pen exec` start the VM at the same moment: both succeed, one QEMU ever runs.
fn race(pen: &Pen, name: &str) {
    let done = Arc::new(AtomicBool::new(false));
    let seen = std::thread::scope(|s| {
        let watcher = s.spawn(|| watch_qemus(pen, name, &done));
        let runs: Vec<_> = ["a", "b"]
            .iter()
            .map(|tag| {
                pen.spawn(
                    &pen.exec_args(name, &["sh", "-c", &format!("sleep 3; echo {tag}")]),
                    None,
                )
            })
            .collect();
        for (run, tag) in runs.into_iter().zip(["a", "b"]) {
            let out = run.wait(TIMEOUT).ok();
            assert_eq!(out.stdout_str(), format!("{tag}\n"), "{out}");
        }
        done.store(true, Ordering::Relaxed);
        watcher.join().unwrap()
    });
    assert_eq!(seen.len(), 1, "QEMU processes seen for one VM: {seen:?}");
    let log = std::fs::read_to_string(pen.vm_dir(name).join("supervisor.log")).unwrap_or_default();
    assert!(
        log.matches("starting qemu").count() <= 1,
        "the supervisor log shows more than one QEMU start:\n{log}"
    );
}

#[test]
fn racing_execs_start_one_vm() {
    let pen = Pen::new("race");
    // A VM that does not exist yet (both create it), then one that exists but is stopped.
    race(&pen, "rc");
    pen.wait_status("rc", "stopped", Duration::from_secs(60));
    race(&pen, "rc");
}

#[test]
fn killing_the_supervisor_leaves_no_qemu_or_virtiofsd() {
    let pen = Pen::new("orphans");
    pen.start("orph");
    let pid: u32 = std::fs::read_to_string(pen.vm_dir("orph").join("lock"))
        .unwrap()
        .trim()
        .parse()
        .expect("the lock holds the supervisor's pid");
    let before = pen.leftover_processes();
    assert!(
        before.iter().any(|p| p.argv[0].contains("qemu-system")),
        "no QEMU found for the VM: {before:#?}"
    );
    assert!(
        before.iter().any(|p| p.argv[0].contains("virtiofsd")),
        "no virtiofsd found for the VM: {before:#?}"
    );
    // Each process as it is now, told apart from a later one with its pid by its start.
    let seen: Vec<(u32, Option<String>)> = before
        .iter()
        .map(|p| (p.pid, pen_core::interrupt::start_time(p.pid)))
        .collect();
    kill9(pid);
    // Exited means every thread of a process has: the supervisor's main thread may end
    // before its others, which hold its lock until they are out too (and /proc shows such a
    // process without a command line, as `leftover_processes` cannot see).
    assert!(
        wait_until(Duration::from_secs(5), || seen
            .iter()
            .all(|(p, start)| pen_core::interrupt::has_exited(*p, start))),
        "left behind 5 s after the supervisor was killed: {:#?}",
        pen.leftover_processes()
    );
    assert!(pen.leftover_processes().is_empty());
    // Nothing holds the lock any more.
    assert_eq!(pen.status("orph"), "stopped");
    // Stale sockets do not stand in the way of the next start.
    let out = pen.exec("orph", &["echo", "back"]).ok();
    assert_eq!(out.stdout_str(), "back\n");
}
