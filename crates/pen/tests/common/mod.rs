//! Harness for pen's integration tests. They boot real VMs (TCG where KVM is unusable)
//! through the `pen` binary, exactly as a user would: no mocks.
//!
//! * One base image for the whole run, in `<CARGO_TARGET_TMPDIR>/pen-it/images`, built on
//!   first use and reused by later runs (pen itself rebuilds what is stale, under its build
//!   lock, so concurrent first use is safe).
//! * Each test gets a root directory of its own holding `home/` (its `PEN_HOME`, whose
//!   `images` is a symlink to the shared images) and `ws/` (the shared directory). A
//!   `PEN_HOME` per test keeps VM names, locks and runtime sockets apart (pen derives the
//!   runtime directory from a hash of `PEN_HOME`).
//! * At most [`max_vms`] tests holding VMs run at once, across all test binaries, enforced
//!   by flock slots: cargo's test threads default to the host's CPU count, which is not a
//!   bound we want on VM count.
//! * [`Pen`]'s `Drop` stops and deletes every VM of the test, even when it failed, checks
//!   that no QEMU, virtiofsd or supervisor of the test is left, and on failure prints the
//!   console and supervisor logs.

// Each test binary uses a different subset of the harness.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

pub const PEN: &str = env!("CARGO_BIN_EXE_pen");

/// Generous: a cold boot under TCG on a loaded 2-core machine takes seconds, an
/// `apt-get install` a minute or more. A hang still ends the test instead of the run.
pub const TIMEOUT: Duration = Duration::from_secs(300);

/// Creation flags every test VM gets unless the test says otherwise: small, so two VMs
/// fit a 2-core CI machine side by side. A 2G overlay formats faster than the 10G default.
pub const VM_FLAGS: &[&str] = &["--cpus", "1", "--memory", "1024", "--disk-size", "2G"];

/// Root of everything the integration tests keep: shared images, slots, per-test dirs.
pub fn it_root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pen-it")
}

/// How many tests may hold VMs at once (`PEN_IT_VMS`, default 2).
pub fn max_vms() -> usize {
    std::env::var("PEN_IT_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(2)
}

/// Builds the shared base image once per test binary when it is missing. When it exists but
/// is stale (a changed pen-init), the first `pen` command that needs it refreshes it under
/// pen's build lock, which is cheap; `pen image build --base` would rebuild everything.
pub fn ensure_image() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let root = it_root();
        if root.join("images/base.json").exists() {
            return;
        }
        std::fs::create_dir_all(&root).unwrap();
        eprintln!(
            "pen-it: building the shared base image in {}",
            root.display()
        );
        let mut cmd = Command::new(PEN);
        cmd.args(["image", "build", "--base"])
            .env("PEN_HOME", &root);
        let out = run_cmd(cmd, None, Duration::from_secs(1800));
        assert_eq!(out.code, Some(0), "building the base image failed:\n{out}");
    });
}

/// A VM slot: held for as long as a test may have VMs running.
pub struct Slot {
    _lock: Flock<File>,
}

pub fn acquire_slot() -> Slot {
    let dir = it_root().join("slots");
    std::fs::create_dir_all(&dir).unwrap();
    loop {
        for i in 0..max_vms() {
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("{i}.lock")))
                .unwrap();
            if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                return Slot { _lock: lock };
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a finished command did.
pub struct Out {
    pub what: String,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    /// Lossy text of `stderr_bytes`, for messages.
    pub stderr: String,
    pub stderr_bytes: Vec<u8>,
}

impl Out {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Asserts exit status 0; returns self for chaining.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "expected success:\n{self}");
        self
    }

    #[track_caller]
    pub fn code_is(self, code: i32) -> Self {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit status {code}:\n{self}"
        );
        self
    }

    /// Asserts a failure reported the way pen reports errors: exit status `code` (any
    /// non-zero one for `None`), and a last stderr line that starts with `pen: ` and contains
    /// each of `words` (case-insensitive). Notices may come before it (the TCG notice, boot
    /// progress).
    #[track_caller]
    pub fn fails_with(self, code: Option<i32>, words: &[&str]) -> Self {
        match code {
            Some(c) => assert_eq!(self.code, Some(c), "expected exit status {c}:\n{self}"),
            None => assert!(
                matches!(self.code, Some(c) if c != 0),
                "expected failure:\n{self}"
            ),
        }
        let last = self
            .stderr
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or_default();
        assert!(
            last.starts_with("pen: "),
            "expected a `pen: ` error line:\n{self}"
        );
        let lower = last.to_lowercase();
        for word in words {
            assert!(
                lower.contains(&word.to_lowercase()),
                "the error should mention {word:?}:\n{self}"
            );
        }
        self
    }

    /// A usage error: exit status 2 and exactly one line on stderr, as [`Out::fails_with`].
    #[track_caller]
    pub fn usage_error(self, words: &[&str]) -> Self {
        let lines = self.stderr.lines().filter(|l| !l.trim().is_empty()).count();
        assert_eq!(lines, 1, "expected a one-line error:\n{self}");
        self.fails_with(Some(2), words)
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "$ {}", self.what)?;
        writeln!(f, "exit: {:?} signal: {:?}", self.code, self.signal)?;
        writeln!(f, "--- stdout\n{}", clip(&self.stdout))?;
        writeln!(f, "--- stderr\n{}---", clip(&self.stderr_bytes))
    }
}

/// Output for a message: the first 4000 bytes, as text.
fn clip(bytes: &[u8]) -> String {
    if bytes.len() > 4000 {
        format!(
            "{}... ({} bytes)",
            String::from_utf8_lossy(&bytes[..4000]),
            bytes.len()
        )
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// Reads a pipe to its end on a thread; what it read so far stays available, so a command
/// that times out can still be reported.
struct Collector {
    buf: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

impl Collector {
    fn new(mut pipe: impl Read + Send + 'static) -> Collector {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (tx, done) = mpsc::channel();
        let b = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 65536];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                b.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
            let _ = tx.send(());
        });
        Collector { buf, done }
    }

    /// The output, after waiting up to `grace` for the end of the pipe: a process pen
    /// spawned (the supervisor, before it redirects its stdio) may hold it a little longer.
    fn finish(self, grace: Duration) -> Vec<u8> {
        let _ = self.done.recv_timeout(grace);
        let buf = self.buf.lock().unwrap();
        buf.clone()
    }
}

/// A command running in the background.
pub struct Running {
    pub what: String,
    child: Child,
    stdout: Option<Collector>,
    stderr: Option<Collector>,
    stdin_writer: Option<JoinHandle<()>>,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// What the command wrote to stderr so far (lossy).
    pub fn stderr_so_far(&self) -> String {
        let collector = self.stderr.as_ref().unwrap();
        String::from_utf8_lossy(&collector.buf.lock().unwrap()).into_owned()
    }

    /// Waits for the command to end; kills it and panics with its output after `timeout`.
    #[track_caller]
    pub fn wait(mut self, timeout: Duration) -> Out {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break Some(status);
            }
            if start.elapsed() > timeout {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let timed_out = status.is_none();
        let status = status.unwrap_or_else(|| {
            let _ = self.child.kill();
            self.child.wait().unwrap()
        });
        if let Some(w) = self.stdin_writer.take() {
            let _ = w.join();
        }
        use std::os::unix::process::ExitStatusExt;
        let stderr_bytes = self.stderr.take().unwrap().finish(Duration::from_secs(10));
        let out = Out {
            what: self.what.clone(),
            code: status.code(),
            signal: status.signal(),
            stdout: self.stdout.take().unwrap().finish(Duration::from_secs(10)),
            stderr: String::from_utf8_lossy(&stderr_bytes).into_owned(),
            stderr_bytes,
        };
        assert!(!timed_out, "timed out after {timeout:?}:\n{out}");
        out
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub fn spawn_cmd(mut cmd: Command, stdin: Option<Vec<u8>>) -> Running {
    let what = describe(&cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
    let stdin_writer = stdin.map(|data| {
        let mut pipe = child.stdin.take().unwrap();
        // On a thread: a large input would otherwise deadlock against unread output.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    Running {
        what,
        stdout: Some(Collector::new(child.stdout.take().unwrap())),
        stderr: Some(Collector::new(child.stderr.take().unwrap())),
        child,
        stdin_writer,
    }
}

#[track_caller]
pub fn run_cmd(cmd: Command, stdin: Option<Vec<u8>>, timeout: Duration) -> Out {
    spawn_cmd(cmd, stdin).wait(timeout)
}

/// Polls `cond` every 100 ms until it holds or `timeout` passes. True when it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A process on this host, as /proc shows it.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    pub argv: Vec<String>,
    environ: Vec<u8>,
}

pub fn processes() -> Vec<Proc> {
    let mut procs = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return procs;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.is_empty() {
            continue; // a kernel thread or a zombie
        }
        let argv = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        procs.push(Proc { pid, argv, environ });
    }
    procs
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

pub fn kill9(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Every file under `dir` (not following symlinks) holding `needle`: reads only the data
/// regions of sparse files (an overlay disk is gigabytes, mostly holes).
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if meta.is_file() && sparse_file_contains(&path, needle) {
            found.push(path);
        }
    }
    found
}

fn sparse_file_contains(path: &Path, needle: &[u8]) -> bool {
    use nix::unistd::{lseek, Whence};
    use std::io::{Seek, SeekFrom};
    use std::os::fd::AsRawFd;
    let Ok(mut file) = File::open(path) else {
        return false;
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0) as i64;
    let mut pos = 0i64;
    let mut buf = vec![0u8; 1 << 20];
    while pos < len {
        // SEEK_DATA fails with ENXIO past the last data region.
        let Ok(data) = lseek(file.as_raw_fd(), pos, Whence::SeekData) else {
            break;
        };
        let hole = lseek(file.as_raw_fd(), data, Whence::SeekHole).unwrap_or(len);
        file.seek(SeekFrom::Start(data as u64)).unwrap();
        // Overlap chunks by the needle's length so a match across a boundary is found.
        let mut at = data;
        let mut carry: Vec<u8> = Vec::new();
        while at < hole {
            let want = ((hole - at) as usize).min(buf.len());
            let n = match file.read(&mut buf[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            carry.extend_from_slice(&buf[..n]);
            if contains(&carry, needle) {
                return true;
            }
            let keep = needle.len().saturating_sub(1).min(carry.len());
            carry.drain(..carry.len() - keep);
            at += n as i64;
        }
        pos = hole;
    }
    false
}

/// A value no file or process could hold by accident.
pub fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 12];
    File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    bytes
}

/// One test's world: its `PEN_HOME`, its shared directory, and the VMs to clean up.
pub struct Pen {
    pub root: PathBuf,
    pub home: PathBuf,
    pub ws: PathBuf,
    vms: Mutex<Vec<String>>,
    _slot: Option<Slot>,
}

impl Pen {
    /// For a test that boots VMs: the shared image, a VM slot, and a fresh `PEN_HOME`.
    pub fn new(test: &str) -> Pen {
        ensure_image();
        let slot = acquire_slot();
        let pen = Pen::bare(test, Some(slot));
        std::os::unix::fs::symlink(it_root().join("images"), pen.home.join("images")).unwrap();
        pen
    }

    /// For a test that boots nothing: a fresh, empty `PEN_HOME` and no VM slot.
    pub fn without_vms(test: &str) -> Pen {
        Pen::bare(test, None)
    }

    fn bare(test: &str, slot: Option<Slot>) -> Pen {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let root = it_root().join("t").join(format!(
            "{test}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        let home = root.join("home");
        let ws = root.join("ws");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&ws).unwrap();
        Pen {
            root,
            home,
            ws,
            vms: Mutex::new(Vec::new()),
            _slot: slot,
        }
    }

    /// `pen ARGS` with this test's `PEN_HOME`, run in the shared directory.
    pub fn cmd<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(PEN);
        cmd.args(args)
            .env("PEN_HOME", &self.home)
            .current_dir(&self.ws)
            // Leave the accelerator to pen's own detection, as a user would.
            .env_remove("PEN_ACCEL")
            .env_remove("PEN_QEMU")
            .env_remove("PEN_VIRTIOFSD");
        cmd
    }

    #[track_caller]
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Out {
        run_cmd(self.cmd(args), None, TIMEOUT)
    }

    #[track_caller]
    pub fn run_stdin<S: AsRef<OsStr>>(&self, args: &[S], stdin: &[u8]) -> Out {
        run_cmd(self.cmd(args), Some(stdin.to_vec()), TIMEOUT)
    }

    /// Registers `name` for cleanup and returns it.
    pub fn vm(&self, name: &str) -> String {
        let mut vms = self.vms.lock().unwrap();
        if !vms.iter().any(|v| v == name) {
            vms.push(name.to_string());
        }
        name.to_string()
    }

    /// `pen <verb> NAME --dir WS --cpus 1 --memory MB --disk-size 2G [extra...]`: VM_FLAGS
    /// but for the memory size, which is part of a snapshot's key (a test that needs
    /// snapshots of its own gives its VMs a size no other test uses).
    pub fn shaped_args(&self, verb: &str, name: &str, memory: u32, extra: &[&str]) -> Vec<String> {
        self.vm(name);
        let mut args: Vec<String> = vec![verb.into(), name.into(), "--dir".into()];
        args.push(self.ws.to_string_lossy().into_owned());
        for a in [
            "--cpus",
            "1",
            "--memory",
            &memory.to_string(),
            "--disk-size",
            "2G",
        ] {
            args.push(a.to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// The saved snapshots (of the shared image directory) whose manifest satisfies `mine`.
    pub fn snapshots_where(&self, mine: impl Fn(&serde_json::Value) -> bool) -> Vec<PathBuf> {
        std::fs::read_dir(self.home.join("images/snapshots"))
            .map(|r| {
                r.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        std::fs::read(p.join("snapshot.json"))
                            .ok()
                            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                            .is_some_and(|m| mine(&m))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The saved snapshots of VMs with `memory` MB (a size one test uses for itself).
    pub fn own_snapshots(&self, memory: u32) -> Vec<PathBuf> {
        self.snapshots_where(|m| m["identity"]["memory_mb"] == memory)
    }

    /// `pen <verb> NAME --dir WS <VM_FLAGS> [extra...]`, the arguments of a command that
    /// may create or start the VM.
    pub fn create_args(&self, verb: &str, name: &str, extra: &[&str]) -> Vec<String> {
        self.vm(name);
        let mut args = vec![verb.to_string(), name.to_string(), "--dir".into()];
        args.push(self.ws.to_string_lossy().into_owned());
        args.extend(VM_FLAGS.iter().map(|s| s.to_string()));
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// `pen exec NAME <creation flags> -- CMD...`
    pub fn exec_args(&self, name: &str, command: &[&str]) -> Vec<String> {
        let mut args = self.create_args("exec", name, &[]);
        args.push("--".into());
        args.extend(command.iter().map(|s| s.to_string()));
        args
    }

    #[track_caller]
    pub fn exec(&self, name: &str, command: &[&str]) -> Out {
        self.run(&self.exec_args(name, command))
    }

    #[track_caller]
    pub fn exec_stdin(&self, name: &str, command: &[&str], stdin: &[u8]) -> Out {
        self.run_stdin(&self.exec_args(name, command), stdin)
    }

    pub fn spawn<S: AsRef<OsStr>>(&self, args: &[S], stdin: Option<&[u8]>) -> Running {
        spawn_cmd(self.cmd(args), stdin.map(|s| s.to_vec()))
    }

    /// `pen start NAME` with the test's creation flags; asserts success.
    #[track_caller]
    pub fn start(&self, name: &str) -> Out {
        self.run(&self.create_args("start", name, &[])).ok()
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.home.join("vms").join(name)
    }

    /// `pen list --json`, parsed.
    #[track_caller]
    pub fn list(&self) -> Vec<serde_json::Value> {
        let out = self.run(&["list", "--json"]).ok();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("pen list --json is not a JSON array ({e}):\n{out}"))
    }

    /// The VM's row in `pen list --json`.
    #[track_caller]
    pub fn row(&self, name: &str) -> Option<serde_json::Value> {
        self.list().into_iter().find(|v| v["name"] == name)
    }

    #[track_caller]
    pub fn status(&self, name: &str) -> String {
        self.row(name)
            .unwrap_or_else(|| panic!("VM {name} is not in `pen list`"))["status"]
            .as_str()
            .unwrap_or("?")
            .to_string()
    }

    /// Waits until `pen list` shows `status` for the VM; panics after `timeout`.
    #[track_caller]
    pub fn wait_status(&self, name: &str, status: &str, timeout: Duration) {
        let ok = wait_until(timeout, || self.status(name) == status);
        assert!(
            ok,
            "VM {name} did not become {status} within {timeout:?} (it is {})",
            self.status(name)
        );
    }

    /// QEMU processes of this VM, by their command line: `-name NAME`, and a kernel under
    /// this test's `PEN_HOME` (its files other than the images go to QEMU as descriptors).
    pub fn qemu_pids(&self, name: &str) -> Vec<u32> {
        let root = self.root.to_string_lossy();
        processes()
            .into_iter()
            .filter(|p| {
                p.argv.first().is_some_and(|a| a.contains("qemu-system"))
                    && p.argv.windows(2).any(|w| w[0] == "-name" && w[1] == name)
                    && p.argv.iter().any(|a| a.contains(root.as_ref()))
            })
            .map(|p| p.pid)
            .collect()
    }

    /// Processes belonging to this test's VMs: QEMU (its argv names the overlay disk),
    /// virtiofsd (its argv names the shared directory) and supervisors (their environment
    /// holds this `PEN_HOME`). Both paths lie under `root`.
    pub fn leftover_processes(&self) -> Vec<Proc> {
        let root = self.root.as_os_str().as_bytes();
        let me = std::process::id();
        processes()
            .into_iter()
            .filter(|p| p.pid != me)
            .filter(|p| {
                p.argv.iter().any(|a| contains(a.as_bytes(), root)) || contains(&p.environ, root)
            })
            .collect()
    }

    /// Last lines of the console and supervisor logs of every VM of this test.
    pub fn dump_logs(&self) {
        let Ok(entries) = std::fs::read_dir(self.home.join("vms")) else {
            return;
        };
        for entry in entries.flatten() {
            for (log, lines) in [("console.log", 40), ("supervisor.log", 80)] {
                let path = entry.path().join(log);
                let text = std::fs::read(&path)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_else(|e| format!("({e})"));
                let all: Vec<&str> = text.lines().collect();
                let tail = all[all.len().saturating_sub(lines)..].join("\n");
                eprintln!(
                    "===== {} (last {lines} lines)\n{tail}\n=====",
                    path.display()
                );
            }
        }
    }
}

impl Drop for Pen {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if failed {
            self.dump_logs();
        }
        // Every VM of the test, registered or not (a test may fail before registering).
        let mut names = self.vms.lock().unwrap().clone();
        if let Ok(entries) = std::fs::read_dir(self.home.join("vms")) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        for name in &names {
            // Both may fail harmlessly (already stopped, never created): not checked.
            let _ = spawn_cmd(self.cmd(&["stop", "--force", name]), None).wait_quiet(TIMEOUT);
            let _ = spawn_cmd(self.cmd(&["delete", "--force", name]), None).wait_quiet(TIMEOUT);
        }
        let clean = wait_until(Duration::from_secs(15), || {
            self.leftover_processes().is_empty()
        });
        let left = self.leftover_processes();
        for p in &left {
            kill9(p.pid);
        }
        if failed {
            eprintln!("pen-it: test files kept in {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
            assert!(
                clean,
                "processes left behind after stop --force and delete --force: {left:#?}"
            );
        }
    }
}

impl Running {
    /// Like [`Running::wait`], but never panics: for cleanup, which runs while unwinding.
    pub fn wait_quiet(mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// The host's locally added CA certificates, when it has any.
pub fn host_extra_cas() -> Option<PathBuf> {
    let dir = PathBuf::from("/usr/local/share/ca-certificates");
    let has_certs = std::fs::read_dir(&dir)
        .map(|r| {
            r.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".crt"))
        })
        .unwrap_or(false);
    has_certs.then_some(dir)
}
