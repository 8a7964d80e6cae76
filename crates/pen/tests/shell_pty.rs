//! `pen shell` driven through a real pseudo-terminal, as a user's terminal would: prompt in
//! /workspace, TERM, window size and live resize (SIGWINCH), Ctrl-C to the guest's
//! foreground process, another session while the shell is open, and the exit status.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::pty::{openpty, Winsize};

/// The host side of a pseudo-terminal with `pen shell` on its other side.
struct Terminal {
    master: File,
    /// Everything the terminal received, and how far [`Terminal::expect`] has consumed it.
    screen: Arc<Mutex<Vec<u8>>>,
    seen: usize,
    child: Child,
}

fn winsize(rows: u16, cols: u16) -> Winsize {
    Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

impl Terminal {
    fn spawn(pen: &Pen, args: &[String]) -> Terminal {
        let pty = openpty(Some(&winsize(24, 80)), None).expect("openpty");
        let slave: OwnedFd = pty.slave;
        let mut cmd = pen.cmd(args);
        cmd.env("TERM", "xterm-256color")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and ioctl are async-signal-safe. A session of its own with the pty
        // as controlling terminal, so that resizing it sends pen SIGWINCH, as in a real
        // terminal.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawning pen shell");
        // Our copies of the slave go with `cmd`: pen's exit then ends the reader with EIO.
        drop(cmd);
        let master = File::from(pty.master);
        let screen = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().unwrap();
        let sink = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Terminal {
            master,
            screen,
            seen: 0,
            child,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
    }

    fn send(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).unwrap();
    }

    /// Waits for `what` after what was consumed so far; returns the text up to its end.
    #[track_caller]
    fn expect(&mut self, what: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            {
                let screen = self.screen.lock().unwrap();
                let rest = String::from_utf8_lossy(&screen[self.seen..]).into_owned();
                if let Some(i) = rest.find(what) {
                    self.seen += rest[..i + what.len()].len();
                    return rest[..i + what.len()].to_string();
                }
            }
            assert!(
                start.elapsed() < timeout,
                "no {what:?} on the terminal within {timeout:?}; it shows:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `command` in the shell and returns what it printed between two markers. The
    /// markers are computed by the shell, so the terminal's echo of the typed line never
    /// matches them.
    #[track_caller]
    fn run(&mut self, command: &str) -> String {
        self.send(&format!("echo \"<$((100+1))>$({command})<$((100+2))>\"\r"));
        self.expect("<101>", TIMEOUT);
        let text = self.expect("<102>", TIMEOUT);
        text.trim_end_matches("<102>").to_string()
    }

    fn resize(&self, rows: u16, cols: u16) {
        let ws = winsize(rows, cols);
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }

    /// Waits for pen to exit; its exit code.
    #[track_caller]
    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                start.elapsed() < timeout,
                "pen shell did not exit within {timeout:?}; the terminal shows:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("===== terminal\n{}\n=====", self.text());
        }
    }
}

#[test]
fn interactive_shell_on_a_real_terminal() {
    let pen = Pen::new("pty");
    let mut term = Terminal::spawn(&pen, &pen.create_args("shell", "tty", &[]));

    // A prompt, in /workspace, with the terminal's TERM and size.
    term.expect("# ", TIMEOUT);
    assert_eq!(term.run("pwd"), "/workspace");
    assert_eq!(term.run("echo $TERM"), "xterm-256color");
    assert_eq!(term.run("tty | cut -c1-9"), "/dev/pts/");
    assert_eq!(term.run("stty size"), "24 80");

    // Live resize: pen gets SIGWINCH and passes the new size on.
    term.resize(30, 100);
    let ok = wait_until(Duration::from_secs(15), || {
        term.run("stty size") == "30 100"
    });
    assert!(ok, "the guest did not see the new window size");

    // Ctrl-C reaches the guest's foreground process, not pen.
    term.send("sleep 60\r");
    std::thread::sleep(Duration::from_secs(2));
    term.send("\x03");
    assert_eq!(term.run("echo status=$?"), "status=130");
    assert!(term.child.try_wait().unwrap().is_none(), "Ctrl-C ended pen");

    // Another session while the shell is open.
    let out = pen.exec("tty", &["echo", "side-by-side"]).ok();
    assert_eq!(out.stdout_str(), "side-by-side\n");

    // The shell's exit status is pen's; the VM, started by this shell, powers off.
    term.send("exit 7\r");
    assert_eq!(term.wait(TIMEOUT), Some(7));
    pen.wait_status("tty", "stopped", Duration::from_secs(60));
}

/// A tmux server of our own running an interactive bash: a real terminal with job control,
/// where a background job reading the terminal is stopped by SIGTTIN.
struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    fn start(pen: &Pen) -> Tmux {
        let socket = pen.root.join("tmux.sock");
        let status = std::process::Command::new("tmux")
            .arg("-S")
            .arg(&socket)
            .args(["new-session", "-d", "-x", "200", "-y", "50"])
            .args(["bash", "--norc", "--noprofile", "-i"])
            .env("PEN_HOME", &pen.home)
            .env_remove("PEN_ACCEL")
            .current_dir(&pen.ws)
            .status()
            .expect("running tmux (install it: bash scripts/install-host-deps.sh)");
        assert!(status.success(), "tmux new-session failed");
        Tmux { socket }
    }

    fn tmux(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    fn type_line(&self, line: &str) {
        assert!(self.tmux(&["send-keys", "-l", line]).status.success());
        assert!(self.tmux(&["send-keys", "Enter"]).status.success());
    }

    fn screen(&self) -> String {
        let out = self.tmux(&["capture-pane", "-p", "-S", "-200"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits for `what` on the screen; panics with the screen after `timeout`.
    #[track_caller]
    fn expect(&self, what: &str, timeout: Duration) {
        let ok = wait_until(timeout, || self.screen().contains(what));
        assert!(
            ok,
            "no {what:?} on the terminal within {timeout:?}; it shows:\n{}",
            self.screen()
        );
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("===== tmux terminal\n{}\n=====", self.screen());
        }
        let _ = self.tmux(&["kill-server"]);
    }
}

#[test]
fn exec_from_a_terminal_in_the_background_or_under_timeout_finishes() {
    let pen = Pen::new("bgexec");
    pen.start("bg");
    let term = Tmux::start(&pen);
    // Each command reads no input; stdin is the terminal. Today's rule: pen does not read
    // it (the command gets end of input), so a background pen is never stopped by SIGTTIN.
    term.type_line(&format!("timeout 60 {PEN} exec bg -- true; echo done1-$?"));
    term.expect("done1-0", Duration::from_secs(60));
    term.type_line(&format!("{PEN} exec bg -- true & wait; echo done2-$?"));
    term.expect("done2-0", Duration::from_secs(60));
    // In the foreground too, a terminal is not forwarded without -i: `cat` ends at once.
    term.type_line(&format!("{PEN} exec bg -- cat; echo done3-$?"));
    term.expect("done3-0", Duration::from_secs(60));
    // With -i the terminal is forwarded: cat echoes a line, then ends at Ctrl-D.
    term.type_line(&format!("{PEN} exec -i bg -- cat; echo done4-$?"));
    std::thread::sleep(Duration::from_secs(2));
    term.type_line("typed-line");
    assert!(term.tmux(&["send-keys", "C-d"]).status.success());
    term.expect("done4-0", Duration::from_secs(60));
    let screen = term.screen();
    assert_eq!(
        screen.matches("typed-line").count(),
        2,
        "cat -i should echo the typed line once:\n{screen}"
    );
}
