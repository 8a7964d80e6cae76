//! `pen-bench net`: the guest network and the snapshot start of this pen against another
//! (an older) pen binary, in one run, the two alternating repetition by repetition so that a
//! change in the host's load hits both alike. Each binary gets its own private `PEN_HOME`
//! (and its own images: their formats may differ). Per repetition and binary:
//!
//! * (s) snapshot `pen exec bench -- true` on the stopped VM (as in the main benchmark);
//! * `pen start` (allowing the host server's ports with `--allow-host` where the pen has the
//!   flag), a warm-up, then against a server on the host's 127.0.0.1, reached by the guest at
//!   10.0.2.2 (`bash`'s `/dev/tcp`: the base image has neither curl, nc nor python):
//!   * guest→host: the guest sends `--mib` MiB (`head -c … /dev/zero`), the host times from
//!     accepting the connection to its EOF;
//!   * host→guest: the host sends `--mib` MiB and closes its side, the guest counts them
//!     (`wc -c`), the host times from accepting to the guest's EOF;
//!   * connection setup: `--connects` sequential connections from the guest, each timed in
//!     the guest (bash's `$EPOCHREALTIME`) from before `connect` until the first byte the
//!     server sends on accepting has been read, then closed: connect + one byte back;
//! * `pen stop`.
//!
//! Usage: `pen-bench net --old PATH [--pen PATH] [--images DIR] [--old-images DIR]
//! [--reps N] [--mib N] [--connects N] [--memory MB] [--cpus N]`.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{median, ms, Env, Opts, VM};

struct NetOpts {
    new: Opts,
    old: Opts,
    mib: u64,
    connects: usize,
    cpus: Option<String>,
}

const USAGE: &str = "usage: pen-bench net --old PATH [--pen PATH] [--images DIR] \
    [--old-images DIR] [--reps N] [--mib N] [--connects N] [--memory MB] [--cpus N]";

fn parse_args(defaults: Opts, args: impl Iterator<Item = String>) -> anyhow::Result<NetOpts> {
    let mut new = defaults;
    let mut old_pen = None;
    let mut old_images = None;
    let (mut mib, mut connects, mut cpus) = (200, 200, None);
    let mut args = args;
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("missing value");
        match arg.as_str() {
            "--pen" => new.pen = value()?.into(),
            "--old" => old_pen = Some(PathBuf::from(value()?)),
            "--images" => new.images = Some(value()?.into()),
            "--old-images" => old_images = Some(PathBuf::from(value()?)),
            "--reps" => new.reps = value()?.parse()?,
            "--mib" => mib = value()?.parse()?,
            "--connects" => connects = value()?.parse()?,
            "--memory" => new.memory = value()?.parse()?,
            "--cpus" => cpus = Some(value()?),
            "-h" | "--help" => {
                println!("{USAGE}\nMethod and results: bench/README.md");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    let Some(old_pen) = old_pen else {
        bail!("--old is required; {USAGE}");
    };
    let old = Opts {
        pen: old_pen,
        reps: new.reps,
        // Without --old-images, the old pen builds its own base image (not measured).
        images: old_images,
        memory: new.memory,
        volumes_only: false,
    };
    Ok(NetOpts {
        new,
        old,
        mib,
        connects: connects.max(1),
        cpus,
    })
}

/// The host side: three listeners on 127.0.0.1, each serving every connection on a thread.
struct Server {
    sink: u16,
    source: u16,
    ping: u16,
    /// (bytes, accept to EOF) of each finished sink or source connection.
    sink_done: mpsc::Receiver<anyhow::Result<(u64, Duration)>>,
    source_done: mpsc::Receiver<anyhow::Result<(u64, Duration)>>,
}

impl Server {
    fn start(bytes: u64) -> anyhow::Result<Server> {
        let sink = TcpListener::bind("127.0.0.1:0")?;
        let source = TcpListener::bind("127.0.0.1:0")?;
        let ping = TcpListener::bind("127.0.0.1:0")?;
        let ports = (
            sink.local_addr()?.port(),
            source.local_addr()?.port(),
            ping.local_addr()?.port(),
        );
        let (sink_tx, sink_done) = mpsc::channel();
        let (source_tx, source_done) = mpsc::channel();
        serve(sink, sink_tx, |mut s| {
            let start = Instant::now();
            let n = std::io::copy(&mut s, &mut std::io::sink())?;
            Ok((n, start.elapsed()))
        });
        serve(source, source_tx, move |mut s| {
            let start = Instant::now();
            let buf = vec![0u8; 64 * 1024];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                s.write_all(&buf[..n])?;
                left -= n as u64;
            }
            s.shutdown(Shutdown::Write)?;
            // The guest closes once it has read everything.
            std::io::copy(&mut s, &mut std::io::sink())?;
            Ok((bytes, start.elapsed()))
        });
        let (ping_tx, _) = mpsc::channel();
        serve(ping, ping_tx, |mut s| {
            s.write_all(b"x")?;
            Ok((1, Duration::ZERO))
        });
        Ok(Server {
            sink: ports.0,
            source: ports.1,
            ping: ports.2,
            sink_done,
            source_done,
        })
    }
}

fn serve<F>(listener: TcpListener, done: mpsc::Sender<anyhow::Result<(u64, Duration)>>, handle: F)
where
    F: Fn(TcpStream) -> std::io::Result<(u64, Duration)> + Send + Sync + Copy + 'static,
{
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let _ = stream.set_nodelay(true);
            let done = done.clone();
            std::thread::spawn(move || {
                let _ = done.send(handle(stream).map_err(anyhow::Error::from));
            });
        }
    });
}

/// One binary's results, a value per repetition (connects: every connection).
#[derive(Default)]
struct Figures {
    snap: Vec<Duration>,
    /// The supervisor's start to the guest's Ready, in the (s) runs (its log).
    snap_ready: Vec<Duration>,
    g2h: Vec<f64>,
    h2g: Vec<f64>,
    connect: Vec<Duration>,
}

pub fn main(defaults: Opts, args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let opts = parse_args(defaults, args)?;
    for pen in [&opts.new.pen, &opts.old.pen] {
        if !pen.exists() {
            bail!("{} not found", pen.display());
        }
    }
    let root = std::env::temp_dir().join(format!("pen-bench-net-{}", std::process::id()));
    let new = crate::make_env(opts.new.clone(), &root.join("new"))?;
    let old = crate::make_env(opts.old.clone(), &root.join("old"))?;
    let result = run(&opts, &new, &old);
    for env in [&new, &old] {
        let _ = env.pen(&["stop", "--force", VM]).status();
    }
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn run(opts: &NetOpts, new: &Env, old: &Env) -> anyhow::Result<()> {
    let reps = opts.new.reps.max(1);
    let bytes = opts.mib * 1024 * 1024;
    let server = Server::start(bytes)?;
    eprintln!(
        "pen-bench net: new {} / old {}; {reps} reps, {} MiB, {} connects; server ports {} {} {}",
        new.opts.pen.display(),
        old.opts.pen.display(),
        opts.mib,
        opts.connects,
        server.sink,
        server.source,
        server.ping
    );
    let memory = opts.new.memory.to_string();
    let mut loads = vec![loadavg()];

    // First use: builds or refreshes the image, formats the overlay, saves the snapshot.
    for env in [new, old] {
        let ws = env.ws.to_string_lossy().into_owned();
        let mut args = vec!["exec", VM, "--dir", &ws, "--memory", &memory];
        if let Some(cpus) = &opts.cpus {
            args.extend(["--cpus", cpus]);
        }
        args.extend(["--", "true"]);
        let took = env.timed(&args)?;
        env.wait_stopped()?;
        eprintln!(
            "pen-bench net: first use of {}: {}",
            env.opts.pen.display(),
            ms(took)
        );
    }

    let allow: Vec<String> = [server.sink, server.source, server.ping]
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let (mut fig_new, mut fig_old) = (Figures::default(), Figures::default());
    for rep in 0..reps {
        // Old first on even repetitions, new first on odd ones.
        let order: [(&Env, bool); 2] = if rep % 2 == 0 {
            [(old, false), (new, true)]
        } else {
            [(new, true), (old, false)]
        };
        for (env, is_new) in order {
            let fig = if is_new { &mut fig_new } else { &mut fig_old };
            one_rep(opts, env, &allow, &server, bytes, fig)?;
            loads.push(loadavg());
        }
        eprintln!(
            "pen-bench net: rep {} done, load {}",
            rep + 1,
            loads.last().unwrap()
        );
    }

    for (label, f) in [("old", &fig_old), ("new", &fig_new)] {
        eprintln!(
            "pen-bench net: {label}: (s) {:?} (ready {:?}); g2h {:.1?} MiB/s; h2g {:.1?} MiB/s",
            f.snap, f.snap_ready, f.g2h, f.h2g
        );
    }
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "pen bench net, {date}, {cpus} host CPUs, --memory {memory}, --cpus {}, medians of {reps} reps ({} connects per rep pooled)",
        opts.cpus.as_deref().unwrap_or("default"),
        opts.connects
    );
    println!(
        "load average (1 min) before the reps and after each binary's turn: {}",
        loads.join(", ")
    );
    println!("| measure | old | new | new/old |");
    println!("|---|---|---|---|");
    let (so, sn) = (median(fig_old.snap.clone()), median(fig_new.snap.clone()));
    println!(
        "| (s) snapshot `pen exec {VM} -- true` (stopped VM) | {} | {} | {:.2} |",
        ms(so),
        ms(sn),
        sn.as_secs_f64() / so.as_secs_f64()
    );
    let (ro, rn) = (
        median(fig_old.snap_ready.clone()),
        median(fig_new.snap_ready.clone()),
    );
    println!(
        "| (s) of which: supervisor start to guest Ready (its log) | {} | {} | {:.2} |",
        ms(ro),
        ms(rn),
        rn.as_secs_f64() / ro.as_secs_f64()
    );
    for (label, o, n) in [
        ("guest→host", &fig_old.g2h, &fig_new.g2h),
        ("host→guest", &fig_old.h2g, &fig_new.h2g),
    ] {
        let (o, n) = (median_f(o), median_f(n));
        println!(
            "| TCP {label}, {} MiB | {o:.1} MiB/s | {n:.1} MiB/s | {:.2} |",
            opts.mib,
            n / o
        );
    }
    let (co, cn) = (
        median(fig_old.connect.clone()),
        median(fig_new.connect.clone()),
    );
    println!(
        "| TCP connect + first byte, guest→host | {:.2} ms | {:.2} ms | {:.2} |",
        co.as_secs_f64() * 1000.0,
        cn.as_secs_f64() * 1000.0,
        cn.as_secs_f64() / co.as_secs_f64()
    );
    Ok(())
}

/// Whether this pen has `--allow-host` (its own network backend; a pen on QEMU's user
/// network reaches the host's loopback without it), so that any two pens compare.
fn has_allow_host(env: &Env) -> bool {
    Command::new(&env.opts.pen)
        .args(["start", "--help"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("--allow-host"))
}

fn one_rep(
    opts: &NetOpts,
    env: &Env,
    allow: &[String],
    server: &Server,
    bytes: u64,
    fig: &mut Figures,
) -> anyhow::Result<()> {
    let log = env.home.join("vms").join(VM).join("supervisor.log");
    fig.snap.push(env.timed(&["exec", VM, "--", "true"])?);
    if !crate::snapshots::restored(&log) {
        bail!(
            "the snapshot start of {VM} booted cold; see {}",
            log.display()
        );
    }
    fig.snap_ready.push(crate::snapshots::ready_ms(&log)?);
    env.wait_stopped()?;

    let mut args = vec!["start", VM];
    if has_allow_host(env) {
        for a in allow {
            args.extend(["--allow-host", a.as_str()]);
        }
    }
    env.timed(&args)?;
    let result = transfers(opts, env, server, bytes, fig);
    env.timed(&["stop", VM])?;
    env.wait_stopped()?;
    result
}

fn transfers(
    opts: &NetOpts,
    env: &Env,
    server: &Server,
    bytes: u64,
    fig: &mut Figures,
) -> anyhow::Result<()> {
    let host = "10.0.2.2";
    let (sink, source, ping) = (server.sink, server.source, server.ping);
    // Warm-up, not counted: a few connections and a small transfer each way.
    guest(
        env,
        &format!(
            "for i in 1 2 3 4 5; do exec 3<>/dev/tcp/{host}/{ping}; read -r -n1 -u3 x; exec 3<&-; done; \
             head -c 4M /dev/zero > /dev/tcp/{host}/{sink}; wc -c < /dev/tcp/{host}/{source} >/dev/null"
        ),
    )?;
    let _ = server.sink_done.recv_timeout(Duration::from_secs(60))?;
    let _ = server.source_done.recv_timeout(Duration::from_secs(600))?;

    // guest→host
    guest(
        env,
        &format!("head -c {}M /dev/zero > /dev/tcp/{host}/{sink}", opts.mib),
    )?;
    let (n, took) = server.sink_done.recv_timeout(Duration::from_secs(600))??;
    if n != bytes {
        bail!("guest→host: the host received {n} bytes of {bytes}");
    }
    fig.g2h.push(mib_per_s(n, took));

    // host→guest
    let out = guest(env, &format!("wc -c < /dev/tcp/{host}/{source}"))?;
    let (n, took) = server
        .source_done
        .recv_timeout(Duration::from_secs(600))??;
    if out.trim() != bytes.to_string() {
        bail!("host→guest: the guest counted {out:?} bytes of {n}");
    }
    fig.h2g.push(mib_per_s(n, took));

    // connection setup
    let out = guest(
        env,
        &format!(
            "for i in $(seq {}); do t0=$EPOCHREALTIME; exec 3<>/dev/tcp/{host}/{ping}; \
             read -r -n1 -u3 x; exec 3<&-; t1=$EPOCHREALTIME; echo \"$t0 $t1 $x\"; done",
            opts.connects
        ),
    )?;
    let mut n = 0;
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let (Some(t0), Some(t1), Some(&"x")) = (
            w.first().and_then(|t| t.parse::<f64>().ok()),
            w.get(1).and_then(|t| t.parse::<f64>().ok()),
            w.get(2),
        ) else {
            bail!("connect loop: unexpected line {line:?}");
        };
        fig.connect
            .push(Duration::from_secs_f64((t1 - t0).max(0.0)));
        n += 1;
    }
    if n != opts.connects {
        bail!("connect loop: {n} of {} connections", opts.connects);
    }
    Ok(())
}

/// Runs `bash -c SCRIPT` in the running VM; its stdout.
fn guest(env: &Env, script: &str) -> anyhow::Result<String> {
    let out = env
        .pen(&["exec", VM, "--", "bash", "-c", script])
        .stdout(Stdio::piped())
        .output()?;
    if !out.status.success() {
        bail!(
            "guest `{script}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / took.as_secs_f64()
}

fn median_f(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The 1-minute load average.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}
