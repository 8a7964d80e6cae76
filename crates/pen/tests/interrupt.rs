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
    /// The builder's supervisor is up and QEMU boots (its console log has begun).
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
            Point::Booting => std::fs::metadata(scratch.join("vms/builder/console.log"))
                .is_ok_and(|m| m.len() > 0),
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

/// Starts `args` and waits for its build to reach `point`; returns the command and the
/// build's scratch directory.
fn run_to(pen: &Pen, profile: &str, args: &[String], point: Point) -> (Running, PathBuf) {
    let mut run = pen.spawn(args, Some(b"echo shell-ran\n"));
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
    let mut run = pen.spawn(&shell, Some(b"echo shell-ran\n"));
    let console = pen.vm_dir("cold").join("console.log");
    let booting = wait_until(TIMEOUT, || {
        std::fs::metadata(&console).is_ok_and(|m| m.len() > 0) || run.try_wait().is_some()
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

    drop(pen);
    let _ = std::fs::remove_dir_all(own_image);
}
