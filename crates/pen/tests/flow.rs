//! Flow control: a session's data is bounded by its window end to end. A stalled reader
//! stalls the writer in the guest, not the supervisor's memory, and not the VM's other
//! sessions.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

/// The supervisor's resident memory may not pass this while a session is stalled. It idles
/// at under 15 MiB; a session's window is a few MiB.
const RSS_LIMIT_KIB: u64 = 64 * 1024;
/// Nor grow by more than this over its idle size: one window (4 MiB) and buffers. Unlike
/// the absolute limit, this catches an unbounded relay even when a loaded host makes the
/// guest write slowly (without flow control it grows by all the guest writes meanwhile).
const RSS_GROWTH_LIMIT_KIB: u64 = 16 * 1024;

/// How long the reader (or the guest process) stays stalled while the other end pushes.
const STALL: Duration = Duration::from_secs(15);

/// The supervisor's pid, from the VM's lock file.
fn supervisor_pid(pen: &Pen, vm: &str) -> u32 {
    let text = std::fs::read_to_string(pen.vm_dir(vm).join("lock")).unwrap();
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("no pid in the lock file: {text:?}"))
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).unwrap();
}

/// Samples `pid`'s RSS every 250 ms for `how_long`, running `during` once halfway;
/// returns the largest sample (KiB) and `during`'s result.
fn max_rss_over<T>(pid: u32, how_long: Duration, during: impl FnOnce() -> T) -> (u64, T) {
    let start = Instant::now();
    let mut max = rss_kib(pid);
    let mut during = Some(during);
    let mut result = None;
    while start.elapsed() < how_long {
        std::thread::sleep(Duration::from_millis(250));
        max = max.max(rss_kib(pid));
        if start.elapsed() >= how_long / 2 {
            if let Some(f) = during.take() {
                result = Some(f());
                max = max.max(rss_kib(pid));
            }
        }
    }
    (max, result.expect("ran halfway"))
}

/// A guest command writes far more than any window to a `pen exec` that is stopped
/// (SIGSTOP, as Ctrl-Z does): the supervisor's memory stays bounded, another session of
/// the VM answers at once, and after SIGCONT every byte arrives intact.
///
/// The stream is 192 copies of a random 1 MiB + 4093 bytes pattern file (~193 MiB): 2 GB
/// through the relay would take minutes under TCG (5-15 MB/s on a loaded 2-core host),
/// and 193 MiB is still 3x the RSS limit and ~50 windows; without flow control the 15 s
/// stall alone piles up 75-200 MiB in the supervisor. The guest hashes the pattern
/// (hashing all 257 MiB under TCG would take longer than streaming it), the host checks it
/// received that very pattern and computes the stream's digest from it.
#[test]
fn a_stopped_client_stalls_its_guest_writer_not_the_supervisor() {
    const COPIES: usize = 192;
    let pen = Pen::new("flow-flood");
    pen.start("flood");
    pen.exec(
        "flood",
        &["sh", "-c", "head -c 1052669 /dev/urandom > /tmp/pattern"],
    )
    .ok();
    let pattern = pen.exec("flood", &["cat", "/tmp/pattern"]).ok().stdout;
    assert_eq!(pattern.len(), 1052669);
    let guest_sum = pen.exec("flood", &["sha256sum", "/tmp/pattern"]).ok();
    assert_eq!(
        guest_sum.stdout_str().split_whitespace().next(),
        Some(hex::encode(Sha256::digest(&pattern)).as_str()),
        "the pattern as the guest hashes it"
    );
    let mut expected = Sha256::new();
    for _ in 0..COPIES {
        expected.update(&pattern);
    }
    let expected = hex::encode(expected.finalize());
    let total = (pattern.len() * COPIES) as u64;

    let sup = supervisor_pid(&pen, "flood");
    let idle_rss = rss_kib(sup);
    let script = format!("for i in $(seq {COPIES}); do cat /tmp/pattern; done");
    let mut client = pen
        .cmd(&pen.exec_args("flood", &["sh", "-c", &script]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = client.stdout.take().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let reader = std::thread::spawn({
        let received = received.clone();
        move || {
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        hash.update(&buf[..n]);
                        received.fetch_add(n as u64, Ordering::SeqCst);
                    }
                }
            }
            hex::encode(hash.finalize())
        }
    });
    let flowing = wait_until(Duration::from_secs(60), || {
        received.load(Ordering::SeqCst) >= 8 << 20
    });
    assert!(flowing, "the stream did not start");

    signal(client.id(), Signal::SIGSTOP);
    let stopped_at = received.load(Ordering::SeqCst);
    let (max_rss, latency) = max_rss_over(sup, STALL, || {
        let start = Instant::now();
        let out = pen.exec("flood", &["true"]);
        (start.elapsed(), out)
    });
    let (latency, out) = latency;
    out.ok();
    let during_stall = received.load(Ordering::SeqCst) - stopped_at;
    signal(client.id(), Signal::SIGCONT);
    eprintln!(
        "flow-flood: supervisor RSS idle {idle_rss} KiB, max while stopped {max_rss} KiB; \
         `pen exec true` meanwhile took {latency:?}; {during_stall} bytes arrived while stopped"
    );
    assert!(
        max_rss < RSS_LIMIT_KIB && max_rss < idle_rss + RSS_GROWTH_LIMIT_KIB,
        "the supervisor grew from {idle_rss} to {max_rss} KiB while its client was stopped"
    );
    assert!(
        latency < Duration::from_secs(1),
        "a second session took {latency:?} while the first was stalled"
    );

    let started = Instant::now();
    let digest = reader.join().unwrap();
    let status = client.wait().unwrap();
    let mut stderr = String::new();
    client
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    eprintln!(
        "flow-flood: the rest arrived in {:?} after SIGCONT",
        started.elapsed()
    );
    assert!(status.success(), "pen exec failed ({status}):\n{stderr}");
    assert_eq!(received.load(Ordering::SeqCst), total, "bytes received");
    assert_eq!(digest, expected, "sha256 of the received stream");
}

/// A guest process that never reads its stdin while the client has 1 GiB to give: the
/// client stops reading its stdin once the window is full, and the supervisor's memory
/// stays bounded.
#[test]
fn a_process_that_ignores_stdin_stalls_the_client_not_the_supervisor() {
    const INPUT: u64 = 1 << 30;
    let pen = Pen::new("flow-stdin");
    pen.start("sink");
    let sup = supervisor_pid(&pen, "sink");
    let idle_rss = rss_kib(sup);

    let mut client: std::process::Child = {
        let mut cmd: Command = pen.cmd(&pen.exec_args("sink", &["sleep", "20"]));
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut stdin = client.stdin.take().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let writer = std::thread::spawn({
        let written = written.clone();
        move || {
            let chunk = vec![b'x'; 1 << 20];
            while written.load(Ordering::SeqCst) < INPUT {
                if stdin.write_all(&chunk).is_err() {
                    return; // pen exited: the pipe is closed
                }
                written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        }
    });
    let (max_rss, latency) = max_rss_over(sup, STALL, || {
        let start = Instant::now();
        pen.exec("sink", &["true"]).ok();
        start.elapsed()
    });
    let taken = written.load(Ordering::SeqCst);
    eprintln!(
        "flow-stdin: supervisor RSS idle {idle_rss} KiB, max {max_rss} KiB; pen took \
         {taken} bytes of stdin; `pen exec true` meanwhile took {latency:?}"
    );
    assert!(
        max_rss < RSS_LIMIT_KIB && max_rss < idle_rss + RSS_GROWTH_LIMIT_KIB,
        "the supervisor grew from {idle_rss} to {max_rss} KiB while its guest process ignored stdin"
    );
    assert!(
        taken < 64 << 20,
        "pen read {taken} bytes of stdin that the guest never consumed"
    );
    assert!(
        latency < Duration::from_secs(1),
        "a second session took {latency:?}"
    );

    let out = wait_child(client, Duration::from_secs(60));
    assert_eq!(out.0, Some(0), "sleep ends normally:\n{}", out.1);
    writer.join().unwrap();
}

/// Exit code and stderr of a child, killed after `timeout`.
fn wait_child(mut child: std::process::Child, timeout: Duration) -> (Option<i32>, String) {
    let ok = wait_until(timeout, || child.try_wait().unwrap().is_some());
    if !ok {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(ok, "timed out after {timeout:?}:\n{stderr}");
    (status.code(), stderr)
}

/// A hostile client floods its session with `Resize` and `Signal` frames, which carry no data
/// and so no window, while the guest reads nothing (its QEMU is stopped): the supervisor's
/// memory stays bounded (each coalesces while queued for the guest, and the supervisor stops
/// reading a client faster than it handles its frames), and the VM serves on afterwards.
#[test]
fn a_client_flooding_resizes_and_signals_stays_bounded() {
    use pen_proto::{
        encode_frame, ExecRequest, Frame, Message, WindowSize, CLIENT_SESSION, PROTOCOL_VERSION,
    };
    use std::os::unix::net::UnixStream;
    let pen = Pen::new("flow-signals");
    pen.start("sig");
    let sup = supervisor_pid(&pen, "sig");
    let home = pen_core::paths::PenHome::at(&pen.home);
    let socket = pen_core::paths::VmPaths::new(&home, "sig").supervisor_socket();
    let mut client = UnixStream::connect(&socket).unwrap();
    let frame = |session, message| encode_frame(Frame::new(session, message)).unwrap();
    client
        .write_all(&frame(
            pen_proto::CONTROL,
            Message::Hello {
                version: PROTOCOL_VERSION,
                software: "hostile test client".into(),
            },
        ))
        .unwrap();
    client
        .write_all(&frame(
            CLIENT_SESSION,
            Message::Exec(ExecRequest {
                argv: vec!["sleep".into(), "600".into()],
                env: vec![],
                cwd: None,
                tty: None,
            }),
        ))
        .unwrap();
    // The supervisor's answers are not read: its per-client queue is bounded on its own.
    std::thread::sleep(Duration::from_secs(2));
    let idle_rss = rss_kib(sup);
    let qemu = pen.qemu_pids("sig");
    assert!(!qemu.is_empty(), "no QEMU found");
    for &pid in &qemu {
        signal(pid, Signal::SIGSTOP);
    }
    // Many frames per write: a resize and two signals (SIGWINCH, SIGCONT: harmless to sleep).
    let mut burst = Vec::new();
    for i in 0..4096u16 {
        let size = WindowSize {
            rows: 24,
            cols: 80 + i % 100,
        };
        burst.extend(frame(CLIENT_SESSION, Message::Resize(size)));
        burst.extend(frame(CLIENT_SESSION, Message::Signal(libc::SIGWINCH)));
        burst.extend(frame(CLIENT_SESSION, Message::Signal(libc::SIGCONT)));
    }
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = std::thread::spawn({
        let (sent, stop) = (sent.clone(), stop.clone());
        let mut client = client.try_clone().unwrap();
        move || {
            while !stop.load(Ordering::SeqCst) {
                if client.write_all(&burst).is_err() {
                    return;
                }
                sent.fetch_add(burst.len() as u64, Ordering::SeqCst);
            }
        }
    });
    let (max_rss, ()) = max_rss_over(sup, STALL, || ());
    stop.store(true, Ordering::SeqCst);
    for &pid in &qemu {
        signal(pid, Signal::SIGCONT);
    }
    // A flooder blocked in a write (the supervisor stopped reading it) ends with an error.
    let _ = client.shutdown(std::net::Shutdown::Write);
    flooder.join().unwrap();
    let sent = sent.load(Ordering::SeqCst);
    eprintln!(
        "flow-signals: the client sent {} MiB of resizes and signals; supervisor RSS idle \
         {idle_rss} KiB, max {max_rss} KiB",
        sent >> 20
    );
    // Unbounded, the supervisor read 421 MiB of these in 15 s and grew to 8 GiB; bounded, it
    // reads what it handles and the client's writes block. At least a few million frames:
    assert!(
        sent > 8 << 20,
        "the flood was too small to tell ({sent} bytes)"
    );
    assert!(
        max_rss < idle_rss + RSS_GROWTH_LIMIT_KIB,
        "the supervisor grew from {idle_rss} to {max_rss} KiB under a flood of resizes and signals"
    );
    drop(client);
    // The VM serves the next session as before.
    pen.exec("sig", &["true"]).ok();
}
