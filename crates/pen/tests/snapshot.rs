//! Snapshots (SPEC "Snapshots"): VMs restored from one snapshot are separate machines
//! (randomness, machine-id, hostname, clock, env, overlay data, workspace), damaged or
//! mismatched snapshots fall back to a cold boot and are replaced, `--no-snapshot` boots
//! cold, concurrent saves leave one snapshot, `pen image list|prune` see them.
//!
//! Snapshots live in the shared image directory, so tests of the default machine shape
//! share one (as every VM of an image does). Tests that damage a snapshot use a machine
//! shape (memory size) of their own, so that no other test meets the damage.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

/// `pen exec` of `command` in VM `name` of the given memory size.
#[track_caller]
fn exec_shaped(pen: &Pen, name: &str, memory: u32, command: &[&str]) -> Out {
    let mut args = pen.shaped_args("exec", name, memory, &[]);
    args.push("--".into());
    args.extend(command.iter().map(|s| s.to_string()));
    pen.run(&args)
}

/// How the VM's last start went, from its supervisor log.
#[derive(Debug, PartialEq, Eq)]
enum Boot {
    Restored,
    Cold,
}

#[track_caller]
fn last_boot(pen: &Pen, name: &str) -> Boot {
    let log = std::fs::read_to_string(pen.vm_dir(name).join("supervisor.log")).unwrap();
    if log.contains("supervisor: restored snapshot") {
        Boot::Restored
    } else if log.contains("supervisor: cold boot") || log.contains("booting cold") {
        Boot::Cold
    } else {
        panic!("supervisor log says neither restored nor cold:\n{log}");
    }
}

/// Waits until an exec-started VM has stopped (and with it, its supervisor has finished
/// writing a snapshot it took).
#[track_caller]
fn wait_stopped(pen: &Pen, name: &str) {
    pen.wait_status(name, "stopped", Duration::from_secs(60));
}

fn snapshots_dir() -> PathBuf {
    it_root().join("images/snapshots")
}

fn base_image_id() -> String {
    let base: serde_json::Value =
        serde_json::from_slice(&std::fs::read(it_root().join("images/base.json")).unwrap())
            .unwrap();
    base["image_id"].as_str().unwrap().to_string()
}

/// Snapshot directories of the current base image for 1 CPU and `memory` MB.
fn snapshots_for(memory: u32) -> Vec<PathBuf> {
    let image = base_image_id();
    let Ok(entries) = std::fs::read_dir(snapshots_dir()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .filter(|p| {
            manifest(p).is_some_and(|m| {
                m["identity"]["memory_mb"] == memory
                    && m["identity"]["cpus"] == 1
                    && m["identity"]["image_id"] == image.as_str()
            })
        })
        .collect()
}

fn manifest(dir: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(dir.join("snapshot.json")).ok()?).ok()
}

/// The one snapshot for `memory`, after making sure it exists: a VM of that shape has run
/// (cold, saving it, or restored from it) and stopped.
#[track_caller]
fn ensure_snapshot(pen: &Pen, name: &str, memory: u32) -> PathBuf {
    exec_shaped(pen, name, memory, &["true"]).ok();
    wait_stopped(pen, name);
    let found = snapshots_for(memory);
    assert_eq!(
        found.len(),
        1,
        "expected one snapshot for {memory} MB after a run: {found:?}"
    );
    found.into_iter().next().unwrap()
}

fn now_secs_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The notice a start prints when it cannot use a snapshot.
fn fallback_notice(out: &Out) -> Option<String> {
    out.stderr
        .lines()
        .find(|l| l.starts_with("pen: snapshot ") && l.contains("booting cold"))
        .map(str::to_string)
}

#[test]
fn restored_vms_have_their_own_randomness_identity_and_clock() {
    let pen = Pen::new("snap-identity");
    let snap = ensure_snapshot(&pen, "first", 1024);
    // Let the snapshot age: its guest clock stands where it was saved.
    let created = manifest(&snap).unwrap()["created_at"].as_f64().unwrap();
    let age = now_secs_f64() - created;
    if age < 5.0 {
        std::thread::sleep(Duration::from_secs_f64(5.0 - age));
    }

    let script = "cat /proc/sys/kernel/random/uuid /proc/sys/kernel/random/uuid \
                  /proc/sys/kernel/random/uuid; cat /etc/machine-id; hostname; date +%s.%N";
    let mut uuids = Vec::new();
    let mut ids = Vec::new();
    for name in ["alpha", "beta"] {
        pen.run(&pen.shaped_args("start", name, 1024, &[])).ok();
        assert_eq!(last_boot(&pen, name), Boot::Restored, "VM {name}");
        let before = now_secs_f64();
        let out = pen.exec(name, &["sh", "-c", script]).ok();
        let after = now_secs_f64();
        let lines: Vec<String> = out.stdout_str().lines().map(str::to_string).collect();
        assert_eq!(lines.len(), 6, "{out}");
        uuids.extend(lines[..3].iter().cloned());
        ids.push(lines[3].clone());
        assert_eq!(lines[4], name, "hostname of {name}");
        let guest: f64 = lines[5].parse().unwrap();
        assert!(
            guest > before - 2.0 && guest < after + 2.0,
            "guest clock {guest} is off: host {before}..{after}"
        );
    }
    let distinct: BTreeSet<&String> = uuids.iter().collect();
    assert_eq!(distinct.len(), 6, "random uuids repeat: {uuids:?}");
    assert_ne!(ids[0], ids[1], "machine-ids are equal");
    assert_eq!(ids[0].len(), 32, "{ids:?}");
}

#[test]
fn env_is_this_starts_only_and_never_in_a_snapshot() {
    let pen = Pen::new("snap-env");
    let first = random_token("first");
    let second = random_token("second");
    let mut args = pen.shaped_args("exec", "envy", 1024, &["--env", &format!("TOKEN={first}")]);
    args.extend(["--".into(), "true".into()]);
    pen.run(&args).ok();
    wait_stopped(&pen, "envy");

    let mut args = pen.shaped_args("exec", "envy", 1024, &["--env", &format!("OTHER={second}")]);
    args.extend([
        "--".into(),
        "sh".into(),
        "-c".into(),
        "echo \"[$TOKEN][$OTHER]\"; cat /run/pen/env".into(),
    ]);
    let out = pen.run(&args).ok();
    assert_eq!(last_boot(&pen, "envy"), Boot::Restored);
    let text = out.stdout_str();
    assert!(text.starts_with(&format!("[][{second}]\n")), "{out}");
    assert!(
        !text.contains(&first),
        "env of an earlier start leaked:\n{out}"
    );
    wait_stopped(&pen, "envy");

    for token in [&first, &second] {
        let found = files_containing(&snapshots_dir(), token.as_bytes());
        assert!(found.is_empty(), "env value in snapshot files: {found:?}");
    }
}

#[test]
fn each_vm_keeps_its_own_overlay_across_restores() {
    let pen = Pen::new("snap-overlay");
    ensure_snapshot(&pen, "one", 1024);
    for name in ["one", "two"] {
        exec_shaped(
            &pen,
            name,
            1024,
            &["sh", "-c", &format!("echo {name} > /root/who && sync")],
        )
        .ok();
        assert_eq!(last_boot(&pen, name), Boot::Restored, "VM {name}");
        wait_stopped(&pen, name);
    }
    for name in ["one", "two"] {
        let out = exec_shaped(&pen, name, 1024, &["cat", "/root/who"]).ok();
        assert_eq!(last_boot(&pen, name), Boot::Restored, "VM {name}");
        assert_eq!(out.stdout_str(), format!("{name}\n"), "{out}");
        wait_stopped(&pen, name);
    }
}

#[test]
fn workspace_works_after_restore() {
    let pen = Pen::new("snap-ws");
    ensure_snapshot(&pen, "ws", 1024);
    std::fs::write(pen.ws.join("from-host.txt"), "host says hi\n").unwrap();
    let out = exec_shaped(
        &pen,
        "ws",
        1024,
        &[
            "sh",
            "-c",
            "cat /workspace/from-host.txt && echo guest says hi > /workspace/from-guest.txt",
        ],
    )
    .ok();
    assert_eq!(last_boot(&pen, "ws"), Boot::Restored);
    assert_eq!(out.stdout_str(), "host says hi\n", "{out}");
    assert_eq!(
        std::fs::read_to_string(pen.ws.join("from-guest.txt")).unwrap(),
        "guest says hi\n"
    );
}

/// Damages the snapshot of a shape of its own, then checks the next start boots cold with
/// a one-line notice naming `reason_word`, saves a fresh snapshot, and the start after
/// that restores from it.
fn falls_back_and_replaces(test: &str, memory: u32, damage: impl Fn(&Path), reason_word: &str) {
    let pen = Pen::new(test);
    let snap = ensure_snapshot(&pen, "vm", memory);
    let before = manifest(&snap).unwrap();
    damage(&snap);

    let out = exec_shaped(&pen, "vm", memory, &["echo", "still works"]).ok();
    assert_eq!(out.stdout_str(), "still works\n", "{out}");
    let notice = fallback_notice(&out).unwrap_or_else(|| panic!("no notice:\n{out}"));
    assert!(
        notice.to_lowercase().contains(reason_word),
        "the notice should say {reason_word:?}: {notice}"
    );
    assert_eq!(last_boot(&pen, "vm"), Boot::Cold);
    wait_stopped(&pen, "vm");

    let now = snapshots_for(memory);
    assert_eq!(now.len(), 1, "{now:?}");
    let after = manifest(&now[0]).unwrap();
    assert_ne!(after["ram"], before["ram"].clone(), "not replaced?");
    let out = exec_shaped(&pen, "vm", memory, &["echo", "restored"]).ok();
    assert_eq!(out.stdout_str(), "restored\n", "{out}");
    assert_eq!(fallback_notice(&out), None, "{out}");
    assert_eq!(last_boot(&pen, "vm"), Boot::Restored);
}

#[test]
fn corrupted_snapshot_boots_cold_and_is_replaced() {
    falls_back_and_replaces(
        "snap-corrupt",
        1040,
        |dir| {
            use std::os::unix::fs::FileExt;
            let ram = std::fs::File::options()
                .write(true)
                .open(dir.join("ram"))
                .unwrap();
            let len = ram.metadata().unwrap().len();
            ram.write_all_at(&random_bytes(4096), len / 2).unwrap();
        },
        "checksum",
    );
}

#[test]
fn truncated_snapshot_boots_cold_and_is_replaced() {
    falls_back_and_replaces(
        "snap-truncated",
        1048,
        |dir| {
            let ram = std::fs::File::options()
                .write(true)
                .open(dir.join("ram"))
                .unwrap();
            let len = ram.metadata().unwrap().len();
            ram.set_len(len / 3).unwrap();
        },
        "ram image",
    );
}

#[test]
fn mismatched_snapshot_boots_cold_and_is_replaced() {
    falls_back_and_replaces(
        "snap-mismatch",
        1056,
        |dir| {
            let path = dir.join("snapshot.json");
            let mut m = manifest(dir).unwrap();
            m["identity"]["pen_version"] = "0.0.0-elsewhere".into();
            std::fs::write(path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        },
        "pen version differs",
    );
}

#[test]
fn no_snapshot_boots_cold() {
    let pen = Pen::new("snap-off");
    ensure_snapshot(&pen, "cold", 1024);
    let mut args = pen.shaped_args("exec", "cold", 1024, &["--no-snapshot"]);
    args.extend(["--".into(), "echo".into(), "cold".into()]);
    let out = pen.run(&args).ok();
    assert_eq!(out.stdout_str(), "cold\n", "{out}");
    let log = std::fs::read_to_string(pen.vm_dir("cold").join("supervisor.log")).unwrap();
    assert!(log.contains("cold boot (--no-snapshot)"), "{log}");
    assert!(
        !log.contains("snapshot taken"),
        "--no-snapshot saved one:\n{log}"
    );
}

#[test]
fn concurrent_first_boots_leave_one_snapshot() {
    let pen = Pen::new("snap-race");
    let memory = 1064;
    // A previous run may have left this shape's snapshot: start from none.
    for dir in snapshots_for(memory) {
        std::fs::remove_dir_all(dir).unwrap();
    }
    let runs: Vec<Running> = ["racer1", "racer2"]
        .iter()
        .map(|name| {
            let mut args = pen.shaped_args("exec", name, memory, &[]);
            args.extend(["--".into(), "true".into()]);
            pen.spawn(&args, None)
        })
        .collect();
    for run in runs {
        run.wait(TIMEOUT).ok();
    }
    for name in ["racer1", "racer2"] {
        wait_stopped(&pen, name);
    }
    let found = snapshots_for(memory);
    assert_eq!(found.len(), 1, "{found:?}");
    let leftovers: Vec<String> = std::fs::read_dir(snapshots_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-") || n.starts_with(".trash-"))
        .collect();
    // Other tests may be saving right now; ours must not be among the leftovers.
    let ours = found[0].file_name().unwrap().to_string_lossy()[..12].to_string();
    assert!(
        leftovers.iter().all(|n| !n.contains(&ours)),
        "temporary directories left: {leftovers:?}"
    );
    let out = exec_shaped(&pen, "racer1", memory, &["true"]).ok();
    assert_eq!(fallback_notice(&out), None, "{out}");
    assert_eq!(last_boot(&pen, "racer1"), Boot::Restored);
}

#[test]
fn image_list_shows_snapshots_and_prune_removes_stale_ones() {
    let pen = Pen::new("snap-list");
    let snap = ensure_snapshot(&pen, "lister", 1024);
    // A stale snapshot: for an image that does not exist.
    let stale_key = format!("{}{}", "ab".repeat(20), random_token(""));
    let stale = snapshots_dir().join(&stale_key);
    std::fs::create_dir_all(&stale).unwrap();
    let mut m = manifest(&snap).unwrap();
    m["identity"]["image_id"] = "0123456789ab".repeat(5).into();
    m["key"] = stale_key.clone().into();
    std::fs::write(stale.join("snapshot.json"), serde_json::to_vec(&m).unwrap()).unwrap();

    let out = pen.run(&["image", "list"]).ok();
    let text = out.stdout_str();
    let ours = &snap.file_name().unwrap().to_string_lossy()[..11];
    let row = text
        .lines()
        .find(|l| l.contains(ours))
        .unwrap_or_else(|| panic!("snapshot {ours} not listed:\n{out}"));
    assert!(row.contains("1024 MB") && row.contains("ready"), "{row}");
    assert!(row.contains('M'), "no size: {row}");
    let stale_row = text.lines().find(|l| l.contains(&stale_key[..11])).unwrap();
    assert!(stale_row.contains("stale"), "{stale_row}");

    let out = pen.run(&["image", "prune"]).ok();
    assert!(out.stdout_str().contains(&stale_key[..12]), "{out}");
    assert!(!stale.exists());
    assert!(snap.exists(), "prune removed a current snapshot");
}

/// Two pens that find the base image's initrd stale at once (the first starts after an
/// upgrade of pen) write the new one once: the second waits for the first's refresh under
/// the build lock and then uses it. Writing it again would give the file a new mtime,
/// which the snapshot the first VM saves pins: every later start would throw that
/// snapshot away and boot cold.
#[test]
fn two_pens_refreshing_a_stale_initrd_at_once_write_it_once() {
    use std::os::unix::fs::MetadataExt;
    let pen = Pen::new("refresh-race");
    // An image directory of its own: the shared one must not go stale under other tests.
    let images = pen.home.join("images");
    std::fs::remove_file(&images).unwrap();
    std::fs::create_dir_all(images.join("modules")).unwrap();
    let shared = it_root().join("images");
    for file in ["vmlinuz", "rootfs.sqfs"] {
        std::fs::hard_link(shared.join(file), images.join(file)).unwrap();
    }
    std::fs::copy(shared.join("initrd"), images.join("initrd")).unwrap();
    for entry in std::fs::read_dir(shared.join("modules")).unwrap().flatten() {
        std::fs::copy(entry.path(), images.join("modules").join(entry.file_name())).unwrap();
    }
    // A manifest naming a pen-init no pen carries: stale for this one.
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shared.join("base.json")).unwrap()).unwrap();
    manifest["pen_init_sha256"] = "0".repeat(64).into();
    std::fs::write(
        images.join("base.json"),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();

    let args = |name: &str| {
        let mut args = pen.create_args("exec", name, &[]);
        args.extend(["--".to_string(), "true".to_string()]);
        args
    };
    // The first stops itself with its new initrd in place, the build lock held.
    let mut cmd = pen.cmd(&args("first"));
    cmd.env("PEN_TEST_PAUSE", "write base.json");
    let first = spawn_cmd(cmd, None);
    assert!(
        wait_until(TIMEOUT, || first
            .stderr_so_far()
            .contains("test pause at write base.json")),
        "the first pen never reached its refresh:\n{}",
        first.stderr_so_far()
    );
    let written = std::fs::metadata(images.join("initrd")).unwrap();
    let second = pen.spawn(&args("second"), None);
    assert!(
        wait_until(TIMEOUT, || second
            .stderr_so_far()
            .contains("another pen is building the image")),
        "the second pen should wait for the first's refresh:\n{}",
        second.stderr_so_far()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.pid() as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();
    first.wait(TIMEOUT).ok();
    second.wait(TIMEOUT).ok();
    let now = std::fs::metadata(images.join("initrd")).unwrap();
    assert_eq!(
        (now.ino(), now.mtime(), now.mtime_nsec()),
        (written.ino(), written.mtime(), written.mtime_nsec()),
        "the second pen wrote the initrd again"
    );
}
