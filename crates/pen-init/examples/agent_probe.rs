//! Host-side test client for a pen guest: plays the supervisor's part on the agent socket.
//!
//! ```text
//! cargo run -p pen-init --example agent_probe -- /tmp/penimg/agent.sock [options]
//!   --setup SCRIPT     first-boot setup script to send in the Config
//!   --no-workspace     no virtio-fs workspace in the Config
//!   --tag TAG          virtio-fs tag to send (default "workspace")
//!   --no-tests         skip the built-in checks
//!   --sh CMD           run `sh -c CMD` (repeatable) and print its output and exit status
//!   --no-shutdown      leave the VM running (and the probe exits)
//!   --hello-only       disconnect as soon as the guest awaits its config
//! A probe started against a VM that is already up gets Hello + Ready and skips the Config.
//! ```
//! Prints each check as `ok` / `FAIL`, then sends Shutdown. Exit status 1 if a check failed.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use pen_proto::{
    ExecRequest, ExitStatus, Frame, FrameCodec, GuestConfig, Message, SessionId, TtyRequest,
    WindowSize, CONTROL, PROTOCOL_VERSION,
};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};

type Routes = Arc<Mutex<HashMap<SessionId, mpsc::UnboundedSender<Message>>>>;
type Writer = Arc<tokio::sync::Mutex<FramedWrite<tokio::net::unix::OwnedWriteHalf, FrameCodec>>>;

struct Client {
    writer: Writer,
    routes: Routes,
    next_id: Mutex<SessionId>,
}

/// What one session produced.
#[derive(Debug, Default)]
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<ExitStatus>,
    error: Option<String>,
    started: bool,
}

impl Client {
    async fn send(&self, session: SessionId, message: Message) {
        let mut w = self.writer.lock().await;
        w.send(Frame::new(session, message)).await.expect("send");
    }

    fn open(&self) -> (SessionId, mpsc::UnboundedReceiver<Message>) {
        let mut next = self.next_id.lock().unwrap();
        *next += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        self.routes.lock().unwrap().insert(*next, tx);
        (*next, rx)
    }

    /// Runs a request, feeding `stdin` (then end-of-input unless a tty) and optional extra
    /// actions after Started.
    async fn run(
        &self,
        req: ExecRequest,
        stdin: Option<&[u8]>,
        after_start: Vec<(Duration, Message)>,
        timeout: Duration,
    ) -> Outcome {
        let tty = req.tty.is_some();
        let (id, mut rx) = self.open();
        self.send(id, Message::Exec(req)).await;
        let mut out = Outcome::default();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut actions = after_start.into_iter();
        loop {
            let msg = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(m)) => m,
                _ => break,
            };
            match msg {
                Message::Started { .. } => {
                    out.started = true;
                    if let Some(data) = stdin {
                        self.send(id, Message::Stdin(data.to_vec())).await;
                        if !tty {
                            self.send(id, Message::Stdin(Vec::new())).await;
                        }
                    }
                    for (delay, action) in actions.by_ref() {
                        tokio::time::sleep(delay).await;
                        self.send(id, action).await;
                    }
                }
                Message::Stdout(d) | Message::Stderr(d) if d.is_empty() => {}
                Message::Stdout(d) => {
                    // Consumed at once: hand the window back.
                    self.send(id, Message::Window(d.len() as u32)).await;
                    out.stdout.extend(d);
                }
                Message::Stderr(d) => {
                    self.send(id, Message::Window(d.len() as u32)).await;
                    out.stderr.extend(d);
                }
                Message::Exit(s) => {
                    out.exit = Some(s);
                    break;
                }
                Message::Error(e) => {
                    out.error = Some(e);
                    break;
                }
                other => eprintln!("session {id}: unexpected {other:?}"),
            }
        }
        self.routes.lock().unwrap().remove(&id);
        out
    }
}

fn sh(cmd: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), cmd.into()],
        ..Default::default()
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("/dev/urandom");
    buf
}

struct Checks {
    failed: usize,
}

impl Checks {
    fn check(&mut self, name: &str, ok: bool, detail: &dyn std::fmt::Debug) {
        if ok {
            println!("ok   {name}");
        } else {
            self.failed += 1;
            println!("FAIL {name}: {detail:?}");
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let socket = args.next().expect("usage: agent_probe SOCKET [options]");
    let mut setup = None;
    let mut workspace = true;
    let mut tag = "workspace".to_string();
    let mut tests = true;
    let mut shutdown = true;
    let mut hello_only = false;
    let mut commands = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--setup" => setup = args.next(),
            "--no-workspace" => workspace = false,
            "--tag" => tag = args.next().expect("--tag TAG"),
            "--no-tests" => tests = false,
            "--no-shutdown" => shutdown = false,
            "--hello-only" => hello_only = true,
            "--sh" => commands.push(args.next().expect("--sh CMD")),
            other => panic!("unknown option {other}"),
        }
    }

    let start = Instant::now();
    let stream = loop {
        match UnixStream::connect(&socket).await {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("connect {socket}: {e}"),
        }
    };
    let (r, w) = stream.into_split();
    let mut reader = FramedRead::new(r, FrameCodec::new());
    let client = Client {
        writer: Arc::new(tokio::sync::Mutex::new(FramedWrite::new(
            w,
            FrameCodec::new(),
        ))),
        routes: Arc::default(),
        next_id: Mutex::new(0),
    };
    client
        .send(
            CONTROL,
            Message::Hello {
                version: PROTOCOL_VERSION,
                software: "agent_probe".into(),
            },
        )
        .await;

    // Boot: wait for AwaitingConfig, send Config, wait for Ready.
    let mut sent_config = false;
    loop {
        let frame = match reader.next().await {
            Some(Ok(Ok(f))) => f,
            other => panic!("link: {other:?}"),
        };
        let t = start.elapsed().as_secs_f64();
        match frame.message {
            Message::AwaitingConfig if !sent_config => {
                println!("[{t:6.2}s] awaiting config");
                if hello_only {
                    return;
                }
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
                let config = GuestConfig {
                    hostname: "probe".into(),
                    env: vec![("PEN_TEST".into(), "value with 'quotes'".into())],
                    workspace_tag: workspace.then(|| tag.clone()),
                    clock_secs: now.as_secs() as i64,
                    clock_nanos: now.subsec_nanos(),
                    setup_script: setup.clone(),
                    entropy: random_bytes(32),
                    machine_id: random_bytes(16)
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect(),
                    ..Default::default()
                };
                client.send(CONTROL, Message::Config(config)).await;
                sent_config = true;
            }
            Message::Ready => {
                println!("[{t:6.2}s] ready");
                break;
            }
            Message::Log { text } => println!("[{t:6.2}s] log: {text}"),
            Message::BootFailed { stage, message } => {
                println!("[{t:6.2}s] BOOT FAILED in {stage}: {message}");
                std::process::exit(2);
            }
            other => println!("[{t:6.2}s] {other:?}"),
        }
    }

    // Route everything else by session.
    let routes = client.routes.clone();
    tokio::spawn(async move {
        while let Some(item) = reader.next().await {
            match item {
                Ok(Ok(frame)) => {
                    if frame.session == CONTROL {
                        println!("control: {:?}", frame.message);
                        continue;
                    }
                    if let Some(tx) = routes.lock().unwrap().get(&frame.session) {
                        let _ = tx.send(frame.message);
                    }
                }
                Ok(Err(e)) => println!("malformed frame from guest: {e}"),
                Err(e) => {
                    println!("link error: {e}");
                    break;
                }
            }
        }
    });

    let mut checks = Checks { failed: 0 };
    let t = Duration::from_secs(60);
    if tests {
        let o = client.run(sh("echo hello"), None, vec![], t).await;
        checks.check(
            "echo",
            o.stdout == b"hello\n" && o.exit == Some(ExitStatus::Exited(0)),
            &o,
        );

        let o = client
            .run(sh("echo out; echo err >&2; exit 3"), None, vec![], t)
            .await;
        checks.check(
            "stdout/stderr apart, exit 3",
            o.stdout == b"out\n" && o.stderr == b"err\n" && o.exit == Some(ExitStatus::Exited(3)),
            &o,
        );

        let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
        let o = client.run(sh("cat"), Some(&data), vec![], t).await;
        checks.check(
            "binary stdin round trip (300 kB)",
            o.stdout == data && o.exit == Some(ExitStatus::Exited(0)),
            &(o.stdout.len(), o.exit, o.error),
        );

        let mut req = sh("stty size; echo $TERM");
        req.tty = Some(TtyRequest {
            term: "xterm-256color".into(),
            size: WindowSize {
                rows: 30,
                cols: 100,
            },
        });
        let o = client.run(req, None, vec![], t).await;
        checks.check(
            "pty size and TERM",
            o.stdout == b"30 100\r\nxterm-256color\r\n" && o.exit == Some(ExitStatus::Exited(0)),
            &(String::from_utf8_lossy(&o.stdout), o.exit),
        );

        let mut req =
            sh("trap 'stty size; exit 0' WINCH; echo armed; while :; do sleep 0.05; done");
        req.tty = Some(TtyRequest {
            term: "xterm".into(),
            size: WindowSize { rows: 24, cols: 80 },
        });
        let resize = Message::Resize(WindowSize {
            rows: 40,
            cols: 120,
        });
        let o = client
            .run(req, None, vec![(Duration::from_millis(1500), resize)], t)
            .await;
        checks.check(
            "pty resize -> SIGWINCH",
            String::from_utf8_lossy(&o.stdout).contains("40 120"),
            &(String::from_utf8_lossy(&o.stdout), o.exit),
        );

        let mut req = sh("read line; echo got:$line");
        req.tty = Some(TtyRequest {
            term: "xterm".into(),
            size: WindowSize { rows: 24, cols: 80 },
        });
        let o = client.run(req, Some(b"typed\r"), vec![], t).await;
        checks.check(
            "pty stdin",
            String::from_utf8_lossy(&o.stdout).contains("got:typed"),
            &(String::from_utf8_lossy(&o.stdout), o.exit),
        );

        let mut req = sh("sleep 100");
        req.tty = Some(TtyRequest {
            term: "xterm".into(),
            size: WindowSize { rows: 24, cols: 80 },
        });
        let ctrl_c = Message::Stdin(vec![3]);
        let o = client
            .run(req, None, vec![(Duration::from_millis(500), ctrl_c)], t)
            .await;
        checks.check(
            "pty ^C",
            o.exit == Some(ExitStatus::Signaled(2)),
            &(String::from_utf8_lossy(&o.stdout), o.exit),
        );

        let o = client
            .run(
                sh("sleep 100"),
                None,
                vec![(Duration::from_millis(300), Message::Signal(15))],
                t,
            )
            .await;
        checks.check("Signal(15)", o.exit == Some(ExitStatus::Signaled(15)), &o);

        let o = client
            .run(
                ExecRequest {
                    argv: vec!["no-such-program".into()],
                    ..Default::default()
                },
                None,
                vec![],
                t,
            )
            .await;
        checks.check(
            "exec failure -> 127",
            o.exit == Some(ExitStatus::Exited(127)),
            &o,
        );

        let mut req = sh("pwd");
        req.cwd = Some("/no/such/dir".into());
        let o = client.run(req, None, vec![], t).await;
        checks.check("bad cwd -> Error", o.error.is_some(), &o);

        let mut req = sh("echo \"$PEN_TEST|$REQ|$HOME|$HOSTNAME\"; pwd");
        req.env = vec![("REQ".into(), "r".into())];
        let o = client.run(req, None, vec![], t).await;
        let cwd = if workspace { "/workspace" } else { "/root" };
        let want = format!("value with 'quotes'|r|/root|probe\n{cwd}\n");
        checks.check(
            "env layers and default cwd",
            o.stdout == want.as_bytes(),
            &String::from_utf8_lossy(&o.stdout),
        );

        let o = client
            .run(
                sh("sleep 60 & echo bg"),
                None,
                vec![],
                Duration::from_secs(20),
            )
            .await;
        checks.check(
            "background job does not hold the session",
            o.exit == Some(ExitStatus::Exited(0)) && o.stdout == b"bg\n",
            &o,
        );

        // Several sessions at once.
        let (a, b) = tokio::join!(
            client.run(sh("sleep 1; echo a"), None, vec![], t),
            client.run(sh("echo b"), None, vec![], t)
        );
        checks.check(
            "concurrent sessions",
            a.stdout == b"a\n" && b.stdout == b"b\n",
            &(a, b),
        );

        // A malformed frame ends only its session.
        let (id, mut rx) = client.open();
        client.send(id, Message::Exec(sh("sleep 100"))).await;
        let started = matches!(rx.recv().await, Some(Message::Started { .. }));
        {
            use bytes::{BufMut, BytesMut};
            use tokio::io::AsyncWriteExt;
            let mut raw = BytesMut::new();
            raw.put_u32(6);
            raw.put_u32(id);
            raw.put_slice(&[0xff, 0xff]);
            let mut w = client.writer.lock().await;
            w.get_mut().write_all(&raw).await.unwrap();
        }
        let reply = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        checks.check(
            "malformed frame -> Error on its session",
            started && matches!(reply, Ok(Some(Message::Error(_)))),
            &reply,
        );
        let o = client.run(sh("echo still"), None, vec![], t).await;
        checks.check(
            "agent alive after malformed frame",
            o.stdout == b"still\n",
            &o,
        );
    }

    for cmd in &commands {
        let o = client
            .run(sh(cmd), None, vec![], Duration::from_secs(300))
            .await;
        println!("$ {cmd}");
        print!("{}", String::from_utf8_lossy(&o.stdout));
        if !o.stderr.is_empty() {
            print!("[stderr] {}", String::from_utf8_lossy(&o.stderr));
        }
        println!("[exit {:?} error {:?}]", o.exit, o.error);
    }

    if shutdown {
        // The guest powers off; the socket closes when QEMU exits.
        client
            .send(CONTROL, Message::Shutdown { force: false })
            .await;
        println!("shutdown sent");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    if checks.failed > 0 {
        println!("{} check(s) failed", checks.failed);
        std::process::exit(1);
    }
}
