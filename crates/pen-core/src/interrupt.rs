//! What an interrupted `pen` must undo. SIGINT, SIGTERM or SIGHUP in the middle of an image
//! build would otherwise end `pen` on the spot and leave its builder VM (a detached
//! supervisor with QEMU), its packer and its scratch directories behind for good.
//!
//! Code that creates such things registers an undo action ([`on_interrupt`]) for as long as
//! they exist; the returned [`Registration`] withdraws it when dropped. While at least one
//! action is registered, and only once the binary has opted in ([`enable`]), the three
//! signals are caught: a dedicated thread runs every action, newest first (a packer is killed
//! before the VM feeding it, the VM before its directory is removed), then ends the process
//! with 128 + the signal's number. With nothing registered the signals keep their previous
//! disposition, so `pen shell` and `pen exec` (which forward them to the guest) are untouched;
//! a signal ignored when `pen` started (`nohup`) stays ignored.
//!
//! The main thread keeps running meanwhile and fails as the things it waits on vanish;
//! `pen` calls [`park_if_interrupted`] before reporting an error, so it neither prints that
//! error nor exits before the actions are done.
//!
//! Why not `signal-hook` for the handler and its self-pipe: its registry (which tokio uses
//! too) installs a handler for good; withdrawing the last action leaves the signal ignored
//! instead of giving it back to its previous disposition (its documented limit). One `pen
//! shell --profile` builds an image, then boots the VM, where Ctrl-C must still end pen at
//! its default, then forwards signals to the guest through tokio: a signal that is caught
//! only during the build, and then is as before, needs `sigaction` and its old value. The
//! hand-made part is small: a handler that writes one byte, and the thread reading it.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

type Action = Box<dyn FnOnce() + Send>;

/// The signals that end `pen` with an orderly teardown.
const SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

struct Registry {
    actions: Vec<(u64, Action)>,
    /// The dispositions in place before ours, while ours are installed.
    previous: Option<Vec<(Signal, SigAction)>>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    actions: Vec::new(),
    previous: None,
});
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static ENABLED: AtomicBool = AtomicBool::new(false);
/// The signal being handled, 0 when none arrived.
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);
/// Write end of the pipe from the signal handler to the teardown thread.
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);
static THREAD: OnceLock<()> = OnceLock::new();

/// Lets registrations catch the signals. Called once by the `pen` binary; libraries and
/// tests that never call it only record actions.
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

/// An action registered with [`on_interrupt`]; dropping it withdraws the action.
#[must_use = "the action is withdrawn when this is dropped"]
pub struct Registration(u64);

impl Drop for Registration {
    fn drop(&mut self) {
        let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        reg.actions.retain(|(id, _)| *id != self.0);
        if reg.actions.is_empty() && INTERRUPTED.load(Ordering::SeqCst) == 0 {
            if let Some(previous) = reg.previous.take() {
                for (sig, old) in previous {
                    // SAFETY: restores a disposition sigaction returned for this signal.
                    let _ = unsafe { sigaction(sig, &old) };
                }
            }
        }
    }
}

/// Registers `action` to run if `pen` is interrupted before the registration is dropped.
/// Actions must be quick (seconds at most) and must not panic.
pub fn on_interrupt(action: impl FnOnce() + Send + 'static) -> Registration {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    reg.actions.push((id, Box::new(action)));
    if reg.previous.is_none() && ENABLED.load(Ordering::SeqCst) && start_thread() {
        let ours = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut previous = Vec::new();
        for sig in SIGNALS {
            // SAFETY: `on_signal` only calls async-signal-safe functions.
            match unsafe { sigaction(sig, &ours) } {
                // Ignored when pen started (`nohup`, a background job of a script): it
                // stays ignored, as with any Unix tool.
                Ok(old) if old.handler() == SigHandler::SigIgn => {
                    // SAFETY: restores the disposition sigaction just returned.
                    let _ = unsafe { sigaction(sig, &old) };
                }
                Ok(old) => previous.push((sig, old)),
                Err(_) => {}
            }
        }
        reg.previous = Some(previous);
    }
    Registration(id)
}

/// The signal that interrupted `pen`, if one did.
pub fn interrupted() -> Option<i32> {
    match INTERRUPTED.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// When a signal is being handled, waits for the teardown, which ends the process: the
/// caller's error is a consequence of the teardown, not news.
pub fn park_if_interrupted() {
    if interrupted().is_some() {
        loop {
            std::thread::park();
        }
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = PIPE_WRITE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = sig as u8;
        // SAFETY: write(2) on a pipe is async-signal-safe; errno is preserved for the
        // interrupted code.
        unsafe {
            let errno = *libc::__errno_location();
            libc::write(fd, (&byte as *const u8).cast(), 1);
            *libc::__errno_location() = errno;
        }
    }
}

/// Starts the teardown thread and its pipe once. False when that failed (the signals then
/// keep their default: the process ends as before).
fn start_thread() -> bool {
    THREAD.get_or_init(|| {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills `fds` on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return;
        }
        let read = fds[0];
        let spawned = std::thread::Builder::new()
            .name("pen-interrupt".into())
            .spawn(move || {
                let mut byte = 0u8;
                loop {
                    // SAFETY: reads one byte into `byte` from the pipe we own.
                    let n = unsafe { libc::read(read, (&mut byte as *mut u8).cast(), 1) };
                    if n == 1 {
                        teardown(i32::from(byte));
                    }
                }
            });
        if spawned.is_ok() {
            PIPE_WRITE.store(fds[1], Ordering::SeqCst);
        }
    });
    PIPE_WRITE.load(Ordering::SeqCst) >= 0
}

fn teardown(sig: i32) -> ! {
    INTERRUPTED.store(sig, Ordering::SeqCst);
    let name = Signal::try_from(sig)
        .map(|s| s.as_str())
        .unwrap_or("signal");
    eprintln!("\npen: interrupted ({name}); cleaning up");
    let actions = {
        let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut reg.actions)
    };
    for (_, action) in actions.into_iter().rev() {
        action();
    }
    std::process::exit(128 + sig);
}

/// `pid` and all its descendants, from /proc (parents before children).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = stat_field(child, 1).and_then(|f| f.parse::<u32>().ok()) {
                parent_of.push((child, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parent_of
                .iter()
                .filter(|(c, p)| *p == parent && !tree.contains(c))
                .map(|(c, _)| *c)
                .collect::<Vec<_>>(),
        );
        i += 1;
    }
    tree
}

/// Field `n` of /proc/PID/stat counted from the one after the command name (0 = state,
/// 1 = ppid, 2 = process group, 19 = start time).
fn stat_field(pid: u32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n).map(str::to_string)
}

/// When process `pid` started (clock ticks after boot): what tells it apart from a later
/// process that reuses the pid. `None` when no process has that pid.
pub fn start_time(pid: u32) -> Option<String> {
    stat_field(pid, 19)
}

/// Whether process `pid`, which started at `start` ([`start_time`]), has finished exiting:
/// every thread of it is gone or a zombie (whoever reaps it is not us). The main thread
/// alone is no measure: the threads of a killed process end in any order, and when the
/// main one ends first /proc shows the process as a zombie with an empty command line while
/// its other threads are still on their way out, holding its descriptors and with them its
/// flocks (a VM supervisor's lock: `pen list` would still say running).
pub fn has_exited(pid: u32, start: &Option<String>) -> bool {
    if start_time(pid) != *start {
        return true;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    !tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| {
                let state = stat[stat.rfind(')')? + 1..].split_whitespace().next()?;
                Some(state != "Z" && state != "X")
            })
            .unwrap_or(false)
    })
}

/// Sends `signal` to `pid` and every descendant, then waits up to `limit` until each of
/// them has exited ([`has_exited`]). Processes are told apart by their start time, so a
/// reused pid is not waited for.
pub fn kill_tree(pid: u32, signal: Signal, limit: std::time::Duration) {
    let tree: Vec<(u32, Option<String>)> = process_tree(pid)
        .into_iter()
        .map(|p| (p, start_time(p)))
        .collect();
    for (p, _) in &tree {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p as i32), signal);
    }
    let deadline = std::time::Instant::now() + limit;
    while tree.iter().any(|(p, start)| !has_exited(*p, start))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// SIGTERM to the process group that `pid` leads (started with a group of its own), as a
/// terminal's Ctrl-C reaches every process of a foreground job: a program that cleans up on
/// a signal, such as mmdebstrap, waits for its helpers to end, and they end on the same
/// signal. `pid` then has up to `grace` to clean up after itself and exit; what is left of
/// the group and of `pid`'s tree after that is killed. When `pid` leads no group, it alone
/// gets the SIGTERM.
pub fn terminate_group(pid: u32, grace: std::time::Duration) {
    let start = start_time(pid);
    let leader = nix::unistd::Pid::from_raw(pid as i32);
    let leads = nix::unistd::getpgid(Some(leader)) == Ok(leader);
    let target = if leads {
        nix::unistd::Pid::from_raw(-(pid as i32))
    } else {
        leader
    };
    let _ = nix::sys::signal::kill(target, Signal::SIGTERM);
    let deadline = std::time::Instant::now() + grace;
    while !has_exited(pid, &start) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    kill_tree(pid, Signal::SIGKILL, std::time::Duration::from_secs(5));
    if leads {
        let members: Vec<(u32, Option<String>)> = group_members(pid)
            .into_iter()
            .map(|p| (p, start_time(p)))
            .collect();
        for (p, _) in &members {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p as i32), Signal::SIGKILL);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while members.iter().any(|(p, start)| !has_exited(*p, start))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// The processes of process group `pgid`, from /proc.
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| stat_field(*p, 2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_is_killed_with_its_grandchildren() {
        // sh -> sleep (grandchild of this test): both must be gone after kill_tree.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 600 & wait"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut tree = Vec::new();
        for _ in 0..100 {
            tree = process_tree(pid);
            if tree.len() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(tree.len(), 2, "sh and its sleep: {tree:?}");
        kill_tree(pid, Signal::SIGKILL, std::time::Duration::from_secs(5));
        assert!(child.wait().is_ok());
        let sleep = tree[1];
        let gone = (0..250).any(|_| {
            let state = stat_field(sleep, 0);
            if state.is_none() || state.as_deref() == Some("Z") {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            false
        });
        assert!(gone, "the grandchild {sleep} outlived kill_tree");
    }

    #[test]
    fn terminating_a_group_reaches_the_helpers_its_leader_waits_for() {
        use std::os::unix::process::CommandExt;
        // A leader that, like mmdebstrap, ignores SIGTERM itself and waits for its helper,
        // which ends on it: SIGTERM to the leader alone would leave both running.
        let dir = tempfile::tempdir().unwrap();
        let done = dir.path().join("done");
        let script = format!(
            "trap : TERM; sleep 600 & helper=$!; wait $helper; wait $helper; touch {}",
            done.display()
        );
        let mut child = std::process::Command::new("sh")
            .args(["-c", &script])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        let ready = (0..250).any(|_| {
            if process_tree(pid).len() >= 2 {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            false
        });
        assert!(ready, "the helpers did not start");
        let started = std::time::Instant::now();
        terminate_group(pid, std::time::Duration::from_secs(10));
        assert!(child.wait().is_ok());
        assert!(
            done.exists(),
            "the leader did not get to clean up after its helper ended"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the helper did not end on the signal: the leader was killed after the grace"
        );
        assert!(group_members(pid).is_empty());
    }

    /// The disposition of `sig` now (the handler's address, or SIG_DFL/SIG_IGN).
    fn disposition(sig: Signal) -> libc::sighandler_t {
        // SAFETY: a null new action only reads the current one into `old`.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            assert_eq!(libc::sigaction(sig as i32, std::ptr::null(), &mut old), 0);
            old.sa_sigaction
        }
    }

    #[test]
    fn the_signals_are_caught_only_while_an_action_is_registered() {
        enable();
        let before: Vec<_> = SIGNALS.iter().map(|s| disposition(*s)).collect();
        let registration = on_interrupt(|| {});
        for (sig, was) in SIGNALS.iter().zip(&before) {
            // One ignored when the test started stays ignored.
            let want = if *was == libc::SIG_IGN {
                libc::SIG_IGN
            } else {
                on_signal as *const () as libc::sighandler_t
            };
            assert_eq!(disposition(*sig), want, "{sig} while registered");
        }
        drop(registration);
        // Given back as it was: SIGINT at its default ends a pen that goes on to boot a VM.
        for (sig, was) in SIGNALS.iter().zip(&before) {
            assert_eq!(disposition(*sig), *was, "{sig} after the registration went");
        }
    }

    /// A process whose main thread ends while another thread lingers, holding a flock on
    /// `lock` (what a SIGKILLed supervisor can look like for a moment): python, whose
    /// `ctypes` can end one thread alone (SYS_exit).
    const LINGER: &str = r#"
import ctypes, fcntl, platform, sys, threading, time
f = open(sys.argv[1], "w")
fcntl.flock(f, fcntl.LOCK_EX)
threading.Thread(target=time.sleep, args=(float(sys.argv[2]),)).start()
ctypes.CDLL(None).syscall({"x86_64": 60, "aarch64": 93}[platform.machine()], 0)
"#;

    #[test]
    fn a_process_whose_main_thread_ended_first_has_not_exited() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("lock");
        let mut child = std::process::Command::new("python3")
            .args(["-c", LINGER])
            .arg(&lock)
            .arg("3")
            .spawn()
            .expect("python3 runs");
        let pid = child.id();
        let start = start_time(pid);
        let main_ended = (0..250).any(|_| {
            if stat_field(pid, 0).as_deref() == Some("Z") {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            false
        });
        assert!(main_ended, "the helper's main thread did not end");
        // What the main thread shows (a zombie without a command line) is not the process:
        // its other thread still holds the lock.
        assert_eq!(std::fs::read(format!("/proc/{pid}/cmdline")).unwrap(), b"");
        let file = std::fs::File::open(&lock).unwrap();
        let probe = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock);
        assert!(
            probe.is_err(),
            "the lock was already free: the test proves nothing"
        );
        assert!(!has_exited(pid, &start));
        assert!(child.wait().is_ok());
        assert!(has_exited(pid, &start));
    }
}
