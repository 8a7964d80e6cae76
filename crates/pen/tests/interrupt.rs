//! Interrupting pen (issue 10, "Orphans on interrupt"): SIGINT, SIGTERM or SIGHUP at any
//! point of `pen image build` or of a first `pen shell --profile` must leave no process, no
//! mount and no temporary directory behind, and a `pen` killed with SIGKILL leaves nothing
//! running and only leftovers the next run sweeps.
//!
//! Builds are expensive under TCG, so one test walks through the points in order on one
//! profile of its own: every interrupted build boots a builder VM, and only the last build
//! runs to the end.

mod common;

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};

/// A whole build under TCG on a loaded 2-core machine: minutes.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// How long an interrupted `pen` may take to tear its build down and exit.
const TEARDOWN_LIMIT: Duration = Duration::from_secs(60);

/// What the build script prints (computed in the guest, so the logged command line does
/// not hold it), then a pause to interrupt it in.
const MARKER: &str = "pen-it-build-script-42";
fn profile_text() -> String {
    "build = \"echo pen-it-build-script-$((40+2)); sleep 8\"\n".to_string()
}

/// Where an interrupted build is when the signal comes.
#[derive(Debug, Clone, Copy)]
enum Point {
    /// The builder's supervisor has started QEMU, which boots.
    Booting,
    /// The builder is ready and `apt-get update` runs.
    AptUpdate,
    /// The profile's build script runs.
    Script,
    /// tar2sqfs has written part of the image.
    Packing,
}

impl Point {
    fn reached(self, scratch: &Path) -> bool {
        let log = std::fs::read_to_string(scratch.join("build.log")).unwrap_or_default();
        match self {
            Point::Booting => {
                let sup = std::fs::read_to_string(scratch.join("vms/builder/supervisor.log"))
                    .unwrap_or_default();
                sup.contains("supervisor: starting qemu") && !log.contains("pen: step")
            }
            Point::AptUpdate => log.contains("pen: step apt-get update"),
            Point::Script => log.contains(MARKER),
            Point::Packing => {
                std::fs::metadata(scratch.join("rootfs.sqfs")).is_ok_and(|m| m.len() > (1 << 20))
            }
        }
    }
}

fn image_dir(pen: &Pen, profile: &str) -> PathBuf {
    pen.home.join("images/profiles").join(profile)
}

/// Scratch directories of builds in the profile's image directory.
fn scratch_dirs(pen: &Pen, profile: &str) -> Vec<PathBuf> {
    std::fs::read_dir(image_dir(pen, profile))
        .map(|r| {
            r.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(".build-"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// The runtime directory (`<base>/<home-id>`) pen gives the pen home `home`, wherever it
/// would be: its sockets live there.
fn runtime_home_dirs(home: &Path) -> Vec<PathBuf> {
    let id = &hex::encode(Sha256::digest(home.as_os_str().as_bytes()))[..12];
    let mut dirs = vec![PathBuf::from(format!("/tmp/pen-{}", nix::unistd::geteuid())).join(id)];
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        dirs.push(PathBuf::from(xdg).join("pen").join(id));
    }
    dirs
}

/// Mounts whose mount point or source mentions `root`.
fn mounts_under(root: &Path) -> Vec<String> {
    let root = root.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(root.as_ref()))
        .map(str::to_string)
        .collect()
}

/// `pen ARGS` in the background with SIGINT at its default: a test run from a script's
/// background job inherits it ignored, and pen leaves an ignored SIGINT ignored.
fn spawn(pen: &Pen, args: &[String]) -> Running {
    use std::os::unix::process::CommandExt;
    let mut cmd = pen.cmd(args);
    // SAFETY: signal(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    spawn_cmd(cmd, Some(b"echo shell-ran\n".to_vec()))
}

/// Starts `args` and waits for its build to reach `point`; returns the command and the
/// build's scratch directory.
fn run_to(pen: &Pen, profile: &str, args: &[String], point: Point) -> (Running, PathBuf) {
    let mut run = spawn(pen, args);
    let start = Instant::now();
    loop {
        if let Some(scratch) = scratch_dirs(pen, profile)
            .into_iter()
            .find(|s| point.reached(s))
        {
            return (run, scratch);
        }
        if let Some(status) = run.try_wait() {
            let out = run.wait(TIMEOUT);
            panic!("{args:?} ended ({status}) before reaching {point:?}:\n{out}");
        }
        assert!(
            start.elapsed() < BUILD_TIMEOUT,
            "{args:?} did not reach {point:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Everything an interrupted or killed build could have left, as a list of findings.
fn leftovers(pen: &Pen, profile: &str, scratch: &Path) -> Vec<String> {
    let mut found: Vec<String> = pen
        .leftover_processes()
        .iter()
        .map(|p| format!("process {} {:?}", p.pid, p.argv))
        .collect();
    found.extend(
        mounts_under(&pen.root)
            .into_iter()
            .map(|m| format!("mount {m}")),
    );
    found.extend(
        scratch_dirs(pen, profile)
            .iter()
            .map(|d| format!("scratch directory {}", d.display())),
    );
    found.extend(
        runtime_home_dirs(scratch)
            .into_iter()
            .filter(|d| d.exists())
            .map(|d| format!("runtime directory {}", d.display())),
    );
    found
}

/// Interrupts `args` with `signal` at `point`; asserts it ends with 128+signal, promptly,
/// leaving nothing behind.
fn interrupt_at(pen: &Pen, profile: &str, args: &[String], point: Point, signal: Signal) {
    let (run, scratch) = run_to(pen, profile, args, point);
    eprintln!("pen-it: {signal} at {point:?} of {args:?}");
    let sent = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.pid() as i32), signal).unwrap();
    let out = run.wait(TEARDOWN_LIMIT);
    eprintln!("pen-it: exited after {:.1}s", sent.elapsed().as_secs_f64());
    let left = leftovers(pen, profile, &scratch);
    assert!(
        left.is_empty(),
        "{signal} at {point:?} of {args:?} left: {left:#?}\n{out}"
    );
    assert_eq!(
        out.code,
        Some(128 + signal as i32),
        "{signal} at {point:?}: not an orderly exit:\n{out}"
    );
}

#[test]
fn interrupted_builds_leave_nothing_behind() {
    let pen = Pen::new("interrupt");
    let profile = random_token("it-intr-")[..16].to_string();
    let dir = pen.home.join("profiles");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{profile}.toml")), profile_text()).unwrap();
    let own_image = image_dir(&pen, &profile);
    let build: Vec<String> = ["image", "build", &profile].map(String::from).to_vec();

    // `pen image build`, at each point, with each signal.
    interrupt_at(&pen, &profile, &build, Point::Booting, Signal::SIGINT);
    interrupt_at(&pen, &profile, &build, Point::AptUpdate, Signal::SIGTERM);
    interrupt_at(&pen, &profile, &build, Point::Script, Signal::SIGHUP);
    interrupt_at(&pen, &profile, &build, Point::Packing, Signal::SIGINT);

    // A first `pen shell --profile`, whose start builds the image.
    let shell = pen.create_args("shell", "cold", &["--profile", &profile]);
    interrupt_at(&pen, &profile, &shell, Point::Script, Signal::SIGINT);

    // Nothing of an image: the packer wrote into the scratch, which went with it.
    for file in ["rootfs.sqfs", "image.json", "build.hash"] {
        assert!(
            !own_image.join(file).exists(),
            "an interrupted build left {file}"
        );
    }

    // SIGKILL: no teardown runs, but the builder VM dies with pen; its scratch directory
    // stays for the next build to sweep.
    let (run, scratch) = run_to(&pen, &profile, &build, Point::Script);
    kill9(run.pid());
    let out = run.wait(TIMEOUT);
    assert_eq!(out.signal, Some(9), "{out}");
    let gone = wait_until(Duration::from_secs(10), || {
        pen.leftover_processes().is_empty()
    });
    assert!(
        gone,
        "the builder VM outlived a pen killed with SIGKILL: {:#?}",
        pen.leftover_processes()
    );
    assert!(
        scratch.exists(),
        "nothing to sweep: the test proves nothing"
    );

    // The next build sweeps it and builds.
    run_cmd(pen.cmd(&build), None, BUILD_TIMEOUT).ok();
    let left = leftovers(&pen, &profile, &scratch);
    assert!(left.is_empty(), "a finished build left: {left:#?}");
    assert!(own_image.join("build.hash").exists());

    // Interrupted while its VM boots (the image is built now): pen ends at once and the
    // VM, whose only client went away, stops by itself.
    let mut run = spawn(&pen, &shell);
    let log = pen.vm_dir("cold").join("supervisor.log");
    let booting = wait_until(TIMEOUT, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("supervisor: starting qemu"))
            || run.try_wait().is_some()
    });
    assert!(booting && run.try_wait().is_none(), "the VM did not boot");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.pid() as i32), Signal::SIGINT).unwrap();
    let out = run.wait(TEARDOWN_LIMIT);
    assert!(out.code != Some(0), "{out}");
    let stopped = wait_until(Duration::from_secs(180), || {
        pen.leftover_processes().is_empty()
    });
    assert!(
        stopped,
        "the VM of an interrupted start kept running: {:#?}",
        pen.leftover_processes()
    );
    // And the next start works.
    let out = run_cmd(pen.cmd(&shell), Some(b"echo shell-ran\n".to_vec()), TIMEOUT).ok();
    assert!(out.stdout_str().contains("shell-ran"), "{out}");

    // The image and its snapshot live in the images every test shares.
    let in_profile_dir = format!("/images/profiles/{profile}/");
    for snap in pen.snapshots_where(|m| {
        m["boot_files"]["rootfs"]["path"]
            .as_str()
            .is_some_and(|p| p.contains(&in_profile_dir))
    }) {
        let _ = std::fs::remove_dir_all(snap);
    }
    let _ = std::fs::remove_dir_all(&own_image);
}

/// The state letter of /proc/PID/stat (`T`: stopped), if the process exists.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// The supervisor of the test's VM `name`, if one runs.
fn supervisor_pid(pen: &Pen, name: &str) -> Option<u32> {
    pen.leftover_processes()
        .into_iter()
        .find(|p| {
            p.argv.get(1).is_some_and(|a| a == "__supervise")
                && p.argv.get(2).is_some_and(|a| a == name)
        })
        .map(|p| p.pid)
}

/// `pen ARGS` with `PEN_TEST_PAUSE=point` (see `pen_core::testpoint`): pen, or the VM's
/// supervisor, stops itself there.
fn spawn_paused(pen: &Pen, args: &[String], point: &str) -> Running {
    let mut cmd = pen.cmd(args);
    cmd.env("PEN_TEST_PAUSE", point);
    spawn_cmd(cmd, None)
}

/// Waits until VM `name`'s supervisor has stopped itself at the test pause (its own log
/// cannot say so: a stopped supervisor copies nothing into it); returns its pid.
fn supervisor_paused(pen: &Pen, name: &str, run: &mut Running) -> u32 {
    let mut found = None;
    let ok = wait_until(TIMEOUT, || {
        found = supervisor_pid(pen, name).filter(|pid| proc_state(*pid) == Some('T'));
        found.is_some() || run.try_wait().is_some()
    });
    assert!(
        ok && found.is_some(),
        "the supervisor of {name} never paused"
    );
    found.unwrap()
}

fn cont(pid: u32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGCONT).unwrap();
}

/// Snapshot temporaries (`.tmp-*`) in the shared snapshot store.
fn snapshot_tmps(pen: &Pen) -> Vec<PathBuf> {
    std::fs::read_dir(pen.home.join("images/snapshots"))
        .map(|r| {
            r.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sigkill_of_pen_supervisor_or_qemu_loses_no_synced_data() {
    let pen = Pen::new("kill9");
    // A memory size no other test uses (snapshot.rs takes 1024-1064) gives the VM snapshots
    // of its own: its first start with snapshots saves one. A failed run may have left one.
    let memory = 1096;
    for snap in pen.own_snapshots(memory) {
        std::fs::remove_dir_all(snap).unwrap();
    }
    let mem = memory.to_string();
    let vm = "k";
    // The test's own flags (VM_FLAGS but for the memory); step 2 changes `--cpus`.
    pen.vm(vm);
    let ws = pen.ws.to_string_lossy().into_owned();
    let flags = |verb: &str, cpus: &str| -> Vec<String> {
        [
            verb,
            vm,
            "--dir",
            &ws,
            "--memory",
            &mem,
            "--disk-size",
            "2G",
            "--cpus",
            cpus,
        ]
        .map(String::from)
        .to_vec()
    };
    let exec_on = |cpus: &str, extra: &[&str], command: &str| -> Vec<String> {
        let mut args = flags("exec", cpus);
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["--", "sh", "-c", command].map(String::from));
        args
    };
    let exec = |extra: &[&str], command: &str| exec_on("1", extra, command);
    let read_back = |what: &str, want: &str| {
        pen.wait_status(vm, "stopped", TIMEOUT);
        let out = pen.run(&exec(&[], "cat /root/synced")).ok();
        assert_eq!(out.stdout_str().trim(), want, "after {what}:\n{out}");
        // The VM of an exec stops by itself (its snapshot save, on a thread, done first).
        pen.wait_status(vm, "stopped", TIMEOUT);
    };

    // 1. The supervisor killed while it creates the overlay disk (created, not yet sized).
    let mut run = spawn_paused(&pen, &exec(&["--no-snapshot"], "true"), "overlay created");
    let sup = supervisor_paused(&pen, vm, &mut run);
    kill9(sup);
    let out = run.wait(TIMEOUT);
    assert_ne!(out.code, Some(0), "{out}");
    let write = "echo one > /root/synced; sync";
    pen.wait_status(vm, "stopped", TIMEOUT);
    pen.run(&exec(&["--no-snapshot"], write)).ok();

    // 2. pen killed while it rewrites vm.json (a changed flag): the old one stays whole, and
    // the next start sweeps the temporary.
    // Stopped: a running VM's vm.json is not rewritten.
    pen.wait_status(vm, "stopped", TIMEOUT);
    let config = std::fs::read(pen.vm_dir(vm).join("vm.json")).unwrap();
    let run = spawn_paused(
        &pen,
        &exec_on("2", &["--no-snapshot"], "true"),
        "write vm.json",
    );
    let pid = run.pid();
    assert!(
        wait_until(TIMEOUT, || proc_state(pid) == Some('T')),
        "pen never paused"
    );
    kill9(pid);
    run.wait(TIMEOUT);
    assert_eq!(
        std::fs::read(pen.vm_dir(vm).join("vm.json")).unwrap(),
        config
    );
    let temporary = pen
        .vm_dir(vm)
        .join(".pen-tmp-")
        .to_string_lossy()
        .into_owned();
    let temporaries = || -> Vec<PathBuf> {
        std::fs::read_dir(pen.vm_dir(vm))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().starts_with(&temporary))
            .collect()
    };
    assert_eq!(
        temporaries().len(),
        1,
        "no temporary: the test proves nothing"
    );

    // 3. The supervisor killed at a snapshot save, its files written, not yet in place
    // (this is the first start of the VM's size with snapshots).
    let mut run = spawn_paused(&pen, &exec(&[], "cat /root/synced"), "snapshot commit");
    let sup = supervisor_paused(&pen, vm, &mut run);
    assert!(
        temporaries().is_empty(),
        "the start did not sweep vm.json's temporary"
    );
    let tmps: Vec<PathBuf> = snapshot_tmps(&pen)
        .into_iter()
        .filter(|t| t.to_string_lossy().contains(&format!("-{sup}-")))
        .collect();
    kill9(sup);
    run.wait(TIMEOUT);
    assert!(
        !tmps.is_empty(),
        "no snapshot being written: the test proves nothing"
    );
    read_back("a supervisor killed at a snapshot save", "one");
    // The save ends on a thread; the supervisor waits for it before it exits.
    pen.wait_status(vm, "stopped", TIMEOUT);
    for tmp in &tmps {
        assert!(!tmp.exists(), "{} was not swept", tmp.display());
    }
    assert_eq!(
        pen.own_snapshots(memory).len(),
        1,
        "the next start saved no snapshot"
    );

    // 4. QEMU killed at a snapshot save (the guest stopped, its state not yet sent).
    for snap in pen.own_snapshots(memory) {
        std::fs::remove_dir_all(snap).unwrap();
    }
    let mut run = spawn_paused(&pen, &exec(&[], "cat /root/synced"), "snapshot migrate");
    let sup = supervisor_paused(&pen, vm, &mut run);
    for qemu in pen.qemu_pids(vm) {
        kill9(qemu);
    }
    cont(sup);
    run.wait(TIMEOUT);
    read_back("QEMU killed at a snapshot save", "one");

    // 5. pen killed while its VM's supervisor saves a snapshot: the save completes and the
    // VM, left without clients, stops by itself; the next start restores it.
    for snap in pen.own_snapshots(memory) {
        std::fs::remove_dir_all(snap).unwrap();
    }
    let mut run = spawn_paused(&pen, &exec(&[], "cat /root/synced"), "snapshot commit");
    let sup = supervisor_paused(&pen, vm, &mut run);
    kill9(run.pid());
    run.wait(TIMEOUT);
    cont(sup);
    read_back("pen killed during a snapshot save", "one");
    pen.wait_status(vm, "stopped", TIMEOUT);
    assert_eq!(
        pen.own_snapshots(memory).len(),
        1,
        "the save did not complete"
    );

    // 6. The supervisor, then QEMU, killed while the VM runs, after a write and a sync.
    for (victim, data) in [("supervisor", "two"), ("qemu", "three")] {
        pen.run(&flags("start", "1")).ok();
        pen.run(&exec(&[], &format!("echo {data} > /root/synced; sync")))
            .ok();
        match victim {
            "supervisor" => kill9(supervisor_pid(&pen, vm).expect("a supervisor")),
            _ => pen.qemu_pids(vm).into_iter().for_each(kill9),
        }
        read_back(&format!("{victim} killed while running"), data);
    }
    assert!(
        wait_until(Duration::from_secs(60), || pen.status(vm) == "stopped"),
        "VM {vm} did not stop"
    );
    for snap in pen.own_snapshots(memory) {
        let _ = std::fs::remove_dir_all(snap);
    }
}

/// `pen ARGS` with `PEN_TEST_PAUSE=point` and SIGINT at its default (see [`spawn`]).
fn spawn_paused_interruptible(pen: &Pen, args: &[String], point: &str) -> Running {
    use std::os::unix::process::CommandExt;
    let mut cmd = pen.cmd(args);
    cmd.env("PEN_TEST_PAUSE", point);
    // SAFETY: signal(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    spawn_cmd(cmd, None)
}

#[test]
fn a_client_interrupted_while_its_vm_boots_takes_the_vm_down() {
    let pen = Pen::new("intr-boot");
    for (vm, verb, signal) in [
        ("ib-int", "shell", Signal::SIGINT),
        ("ib-term", "exec", Signal::SIGTERM),
        ("ib-hup", "shell", Signal::SIGHUP),
    ] {
        let mut args = pen.create_args(verb, vm, &[]);
        if verb == "exec" {
            args.extend(["--", "true"].map(String::from));
        }
        // The supervisor stops itself once the new VM's overlay disk exists, before QEMU
        // starts: the client is interrupted while it waits for the boot, which then goes on.
        let mut run = spawn_paused_interruptible(&pen, &args, "overlay created");
        let sup = supervisor_paused(&pen, vm, &mut run);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.pid() as i32), signal).unwrap();
        let out = run.wait(TEARDOWN_LIMIT);
        assert_ne!(out.code, Some(0), "{out}");
        let sent = Instant::now();
        cont(sup);
        // The supervisor finds its spawner gone and stops the VM instead of booting it for
        // nobody (it used to boot it, then wait 15 s for a client that never came).
        let gone = wait_until(Duration::from_secs(90), || {
            pen.leftover_processes().is_empty()
        });
        assert!(
            gone,
            "{signal} to `pen {verb}` left its VM running: {:#?}",
            pen.leftover_processes()
        );
        eprintln!(
            "pen-it: {vm} down {:.1}s after the supervisor went on",
            sent.elapsed().as_secs_f64()
        );
        let log = std::fs::read_to_string(pen.vm_dir(vm).join("supervisor.log")).unwrap();
        assert!(
            log.contains("the pen that started the VM went away before it was ready"),
            "{signal} to `pen {verb}`: the VM was not stopped for it:\n{log}"
        );
        assert_eq!(pen.status(vm), "stopped");
    }
    // Nothing of it stands in the way of the next start.
    let out = pen.exec("ib-int", &["echo", "back"]).ok();
    assert_eq!(out.stdout_str(), "back\n");
}

/// `pid` and its descendants now, each with its start time (see `pen_core::interrupt`).
fn process_tree(pid: u32) -> Vec<(u32, Option<String>)> {
    pen_core::interrupt::process_tree(pid)
        .into_iter()
        .map(|p| (p, pen_core::interrupt::start_time(p)))
        .collect()
}

#[test]
fn an_interrupted_base_build_leaves_nothing_and_keeps_the_previous_image() {
    use std::os::unix::fs::MetadataExt;
    ensure_image();
    let pen = Pen::without_vms("intr-base");
    let images = pen.home.join("images");
    // The previous image: the shared one's files (hard links: a build renames over them,
    // never writes them), under a base.json that says they hold another pen-init, so the
    // build runs in full.
    let shared = it_root().join("images");
    std::fs::create_dir_all(images.join("modules")).unwrap();
    for file in ["vmlinuz", "initrd", "rootfs.sqfs"] {
        std::fs::hard_link(shared.join(file), images.join(file)).unwrap();
    }
    for entry in std::fs::read_dir(shared.join("modules")).unwrap().flatten() {
        std::fs::hard_link(entry.path(), images.join("modules").join(entry.file_name())).unwrap();
    }
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shared.join("base.json")).unwrap()).unwrap();
    manifest["pen_init_sha256"] = "0".repeat(64).into();
    std::fs::write(images.join("base.json"), manifest.to_string()).unwrap();
    let previous: Vec<(&str, u64)> = ["vmlinuz", "initrd", "rootfs.sqfs"]
        .into_iter()
        .map(|f| (f, std::fs::metadata(images.join(f)).unwrap().ino()))
        .collect();
    let previous_manifest = std::fs::read(images.join("base.json")).unwrap();

    // mmdebstrap's keyring directories (/tmp/mmdebstrap.gpghome.*) there before.
    let gpghomes = || -> Vec<PathBuf> {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("mmdebstrap."))
            .map(|e| e.path())
            .collect()
    };
    let before = gpghomes();

    // Interrupted while mmdebstrap installs packages in its chroot (its mounts are up).
    let build: Vec<String> = ["image", "build", "--base"].map(String::from).to_vec();
    let mut run = spawn(&pen, &build);
    let log = images.join("base-build.log");
    let reached = wait_until(BUILD_TIMEOUT, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("I: installing remaining packages"))
            || run.try_wait().is_some()
    });
    assert!(
        reached && run.try_wait().is_none(),
        "the build never got to mmdebstrap's chroot"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let tempdir = text
        .lines()
        .find_map(|l| l.strip_prefix("I: using ")?.strip_suffix(" as tempdir"))
        .map(PathBuf::from)
        .expect("mmdebstrap names its tempdir");
    let tree = process_tree(run.pid());
    assert!(
        tree.len() > 2,
        "mmdebstrap runs nothing: the test proves nothing ({tree:?})"
    );
    let sent = Instant::now();
    interrupt(&run, Signal::SIGINT);
    let out = run.wait(Duration::from_secs(120));
    eprintln!("pen-it: exited after {:.1}s", sent.elapsed().as_secs_f64());
    assert_eq!(
        out.code,
        Some(128 + libc::SIGINT),
        "not an orderly exit:\n{out}"
    );

    let mut left: Vec<String> = tree
        .iter()
        .filter(|(p, start)| !pen_core::interrupt::has_exited(*p, start))
        .map(|(p, _)| format!("process {p}"))
        .collect();
    // Started after the list was taken (apt runs dpkg after dpkg): whatever has its root or
    // working directory in the chroot, or this test's PEN_HOME in its environment.
    left.extend(
        pen.leftover_processes()
            .iter()
            .map(|p| format!("process {} {:?}", p.pid, p.argv)),
    );
    left.extend(processes().iter().filter_map(|p| {
        ["root", "cwd"].iter().find_map(|link| {
            let target = std::fs::read_link(format!("/proc/{}/{link}", p.pid)).ok()?;
            target.starts_with(&tempdir).then(|| {
                format!(
                    "process {} {:?} ({link} {})",
                    p.pid,
                    p.argv,
                    target.display()
                )
            })
        })
    }));
    let temp = tempdir.to_string_lossy();
    left.extend(
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(temp.as_ref()))
            .map(|m| format!("mount {m}")),
    );
    left.extend(
        gpghomes()
            .into_iter()
            .filter(|d| !before.contains(d))
            .map(|d| format!("mmdebstrap's directory {}", d.display())),
    );
    left.extend(
        std::fs::read_dir(&images)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-base-"))
            .map(|e| format!("scratch directory {}", e.path().display())),
    );
    assert!(
        left.is_empty(),
        "an interrupted base build left: {left:#?}\n{out}"
    );
    // The previous image as it was: same files, same manifest.
    for (file, ino) in &previous {
        assert_eq!(
            std::fs::metadata(images.join(file)).unwrap().ino(),
            *ino,
            "{file} was replaced"
        );
    }
    assert_eq!(
        std::fs::read(images.join("base.json")).unwrap(),
        previous_manifest
    );
    assert!(images.join("modules/load.list").exists());

    // And the next build runs to the end.
    run_cmd(pen.cmd(&build), None, BUILD_TIMEOUT).ok();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(images.join("base.json")).unwrap()).unwrap();
    assert_ne!(manifest["pen_init_sha256"], "0".repeat(64).as_str());
    assert!(pen.leftover_processes().is_empty());
}

fn interrupt(run: &Running, signal: Signal) {
    eprintln!("pen-it: {signal} to pen {}", run.pid());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.pid() as i32), signal).unwrap();
}
