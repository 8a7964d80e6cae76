//! pen's benchmark (see bench/README.md): medians over repetitions of
//!
//! * (a) cold `pen exec NAME -- true` on a stopped VM;
//! * (b) the floor: the same QEMU and virtiofsd command lines pen used, driven by a
//!   minimal in-process host that speaks the agent protocol, to the same point: `true` has
//!   exited in the guest. (b0), the same run's guest agent `Hello` (kernel + stage 1 up to
//!   the snapshot point), is printed as a breakdown;
//! * (c) `pen exec NAME -- true` on a running VM;
//! * (d) host memory (RSS and PSS) of QEMU + virtiofsd + supervisor for one idle VM;
//! * snapshots (see `snapshots.rs`): (s) `pen exec NAME -- true` on a stopped VM restored
//!   from its image's snapshot, against (a) which boots cold (`--no-snapshot`); (r) time to
//!   the guest's Ready and (p) to an interactive `pen shell` prompt, cold and restored;
//!   (m) host memory of 1 and of 4 idle VMs restored from one snapshot;
//! * volumes (see `volumes.rs`): (v) snapshot starts with 0 and with 3 volumes attached.
//!
//! Usage: `pen-bench [--pen PATH] [--reps N] [--images DIR] [--memory MB] [--volumes-only]`.
//!
//! `pen-bench net --old PATH ...` (see `net.rs`): TCP throughput both ways, connection setup
//! and the snapshot start of this pen against another pen binary, alternated in one run.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use pen_proto::{
    BootMode, ExecRequest, Frame, FrameCodec, GuestConfig, Message, CONTROL, PROTOCOL_VERSION,
};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

mod net;
mod snapshots;
mod volumes;

const VM: &str = "bench";
/// VMs of the multi-VM memory measurement (m).
const MANY: [&str; 4] = ["bench-m1", "bench-m2", "bench-m3", "bench-m4"];

#[derive(Clone)]
struct Opts {
    pen: PathBuf,
    reps: usize,
    images: Option<PathBuf>,
    memory: u32,
    /// Only the volume measurement (v).
    volumes_only: bool,
}

/// The defaults, and whatever follows on the command line (after `net` for that mode).
fn default_opts() -> anyhow::Result<Opts> {
    let exe_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let default_images = std::env::var_os("PEN_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/pen")))
        .map(|h| h.join("images"))
        .filter(|p| p.join("base.json").exists());
    Ok(Opts {
        // The pen built alongside this benchmark (same profile).
        pen: exe_dir.join("pen"),
        reps: 5,
        images: default_images,
        memory: 2048,
        volumes_only: false,
    })
}

fn parse_args(args: impl Iterator<Item = String>) -> anyhow::Result<Opts> {
    let mut opts = default_opts()?;
    const USAGE: &str =
        "usage: pen-bench [--pen PATH] [--reps N] [--images DIR] [--memory MB] [--volumes-only]";
    let mut args = args;
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("missing value");
        match arg.as_str() {
            "--pen" => opts.pen = value()?.into(),
            "--reps" => opts.reps = value()?.parse()?,
            "--images" => opts.images = Some(value()?.into()),
            "--memory" => opts.memory = value()?.parse()?,
            "--volumes-only" => opts.volumes_only = true,
            "-h" | "--help" => {
                println!("{USAGE}\nMethod and results: bench/README.md");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    Ok(opts)
}

/// A private `PEN_HOME` (images shared by symlink when given) and shared directory.
struct Env {
    opts: Opts,
    home: PathBuf,
    ws: PathBuf,
}

impl Env {
    fn pen(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.opts.pen);
        cmd.args(args)
            .env("PEN_HOME", &self.home)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs `pen ARGS`; its wall time. Fails on a non-zero exit.
    fn timed(&self, args: &[&str]) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let out = self.pen(args).output()?;
        let took = start.elapsed();
        if !out.status.success() {
            bail!(
                "pen {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(took)
    }

    fn vm_dir(&self) -> PathBuf {
        self.home.join("vms").join(VM)
    }

    /// Whether the VM's lock is held, as `pen list` sees it.
    fn running_vm(&self, name: &str) -> anyhow::Result<bool> {
        let out = self
            .pen(&["list", "--json"])
            .stdout(Stdio::piped())
            .output()?;
        let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(list
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v["name"] == name && v["status"] == "running"))
    }

    fn wait_stopped(&self) -> anyhow::Result<()> {
        self.wait_stopped_vm(VM)
    }

    fn wait_stopped_vm(&self, name: &str) -> anyhow::Result<()> {
        let start = Instant::now();
        while self.running_vm(name)? {
            if start.elapsed() > Duration::from_secs(120) {
                bail!("VM {name} did not stop");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// A private `PEN_HOME` and shared directory under `root`; `images` linked when given.
fn make_env(opts: Opts, root: &Path) -> anyhow::Result<Env> {
    let home = root.join("home");
    let ws = root.join("ws");
    std::fs::create_dir_all(&home)?;
    std::fs::create_dir_all(&ws)?;
    if let Some(images) = &opts.images {
        std::os::unix::fs::symlink(images.canonicalize()?, home.join("images"))?;
    }
    Ok(Env { opts, home, ws })
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().is_some_and(|a| a == "net") {
        args.next();
        return net::main(default_opts()?, args);
    }
    let opts = parse_args(args)?;
    if !opts.pen.exists() {
        bail!(
            "{} not found: build it (`cargo build --release -p pen`) or pass --pen",
            opts.pen.display()
        );
    }
    let root = std::env::temp_dir().join(format!("pen-bench-{}", std::process::id()));
    let env = make_env(opts, &root)?;
    let result = run(&env);
    // Whatever happened, leave nothing running.
    for name in std::iter::once(VM)
        .chain(MANY)
        .chain(["bench-v0", "bench-v3"])
    {
        let _ = env.pen(&["stop", "--force", name]).status();
    }
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn run(env: &Env) -> anyhow::Result<()> {
    let reps = env.opts.reps.max(1);
    let memory = env.opts.memory.to_string();
    let ws = env.ws.to_string_lossy().into_owned();
    eprintln!("pen-bench: {} ({} reps)", env.opts.pen.display(), reps);
    if env.opts.volumes_only {
        let figures = volumes::measure(env, reps)?;
        println!(
            "pen bench (volumes only), {}, {} host CPUs, --memory {memory}, medians of {reps}",
            today(),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!("| measure | median |");
        println!("|---|---|");
        volumes::print(&figures);
        return Ok(());
    }

    // First boot: builds the image if needed, formats the overlay, saves the image's
    // snapshot if there is none. Not measured.
    env.timed(&["exec", VM, "--dir", &ws, "--memory", &memory, "--", "true"])?;
    env.wait_stopped()?;
    let log = env.vm_dir().join("supervisor.log");

    // (a), (b) and (s) alternate, so that a change in the host's load (a shared machine)
    // hits all alike. (a) cold exec: boot, session, exit; the power-off after it is not
    // counted, but the next run waits for it. (b) the floor, with the command lines pen
    // used in (a). (s) the same exec, restored from the snapshot.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut cold, mut floor, mut hello) = (Vec::new(), Vec::new(), Vec::new());
    let (mut snap, mut cold_ready, mut snap_ready) = (Vec::new(), Vec::new(), Vec::new());
    let mut launch: Option<(Vec<String>, Vec<String>)> = None;
    for _ in 0..reps {
        cold.push(env.timed(&["exec", VM, "--no-snapshot", "--", "true"])?);
        cold_ready.push(snapshots::ready_ms(&log)?);
        env.wait_stopped()?;
        if launch.is_none() {
            let (vfsd, qemu) = launch_lines(&log)?;
            let qemu =
                snapshots::floor_qemu_argv(&qemu, &snapshots::vfs_socket(&vfsd)?, &env.vm_dir())?;
            launch = Some((vfsd, qemu));
        }
        let (vfsd_argv, qemu_argv) = launch.as_ref().expect("set above");
        let (h, done) = rt.block_on(floor_run(vfsd_argv, qemu_argv))?;
        hello.push(h);
        floor.push(done);
        snap.push(env.timed(&["exec", VM, "--", "true"])?);
        if !snapshots::restored(&log) {
            bail!(
                "the snapshot start of {VM} booted cold; see {}",
                log.display()
            );
        }
        snap_ready.push(snapshots::ready_ms(&log)?);
        env.wait_stopped()?;
    }
    let qemu_argv = launch.map(|(_, q)| q).unwrap_or_default();
    eprintln!("pen-bench: (a) {cold:?} (ready {cold_ready:?})");
    eprintln!("pen-bench: (b) {floor:?} (hello {hello:?})");
    eprintln!("pen-bench: (s) {snap:?} (ready {snap_ready:?})");

    // (p) an interactive prompt, cold and restored.
    let (mut cold_prompt, mut snap_prompt) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        cold_prompt.push(snapshots::time_to_prompt(env, VM, &["--no-snapshot"])?);
        env.wait_stopped()?;
        snap_prompt.push(snapshots::time_to_prompt(env, VM, &[])?);
        env.wait_stopped()?;
    }
    eprintln!("pen-bench: (p) cold {cold_prompt:?}, restored {snap_prompt:?}");

    // (c) warm exec on a VM kept up by `pen start`.
    env.timed(&["start", VM])?;
    env.timed(&["exec", VM, "--", "true"])?;
    let mut warm = Vec::new();
    for _ in 0..reps * 4 {
        warm.push(env.timed(&["exec", VM, "--", "true"])?);
    }
    eprintln!("pen-bench: (c) {:?}", warm);

    // (d) memory of the idle VM, once the boot's transient allocations have settled.
    std::thread::sleep(Duration::from_secs(5));
    let supervisor: u32 = std::fs::read_to_string(env.vm_dir().join("lock"))?
        .trim()
        .parse()?;
    let mut pids = vec![supervisor];
    pids.extend(children_of(supervisor));
    let mut rows = Vec::new();
    let (mut rss, mut pss) = (0, 0);
    for pid in &pids {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))?
            .trim()
            .to_string();
        let r = kb_field(&format!("/proc/{pid}/status"), "VmRSS:")?;
        let p = kb_field(&format!("/proc/{pid}/smaps_rollup"), "Pss:")?;
        rss += r;
        pss += p;
        rows.push(format!(
            "{name} {} MiB RSS / {} MiB PSS",
            r / 1024,
            p / 1024
        ));
    }
    env.timed(&["stop", VM])?;

    // (m) 1 and 4 idle VMs restored from one snapshot, measured once all 4 run.
    for name in MANY {
        env.timed(&["start", name, "--dir", &ws, "--memory", &memory])?;
    }
    std::thread::sleep(Duration::from_secs(5));
    let mut many_kb = Vec::new();
    for name in MANY {
        many_kb.push(snapshots::vm_memory_kb(snapshots::supervisor_of(
            &env.home, name,
        )?)?);
    }
    for name in MANY {
        env.timed(&["stop", name])?;
        env.timed(&["delete", "--force", name])?;
    }

    // (v) snapshot starts with 0 and with 3 volumes.
    let vol = volumes::measure(env, reps)?;

    let (a, b, b0, c) = (median(cold), median(floor), median(hello), median(warm));
    let (s_, ra, rs) = (median(snap), median(cold_ready), median(snap_ready));
    let (pa, ps) = (median(cold_prompt), median(snap_prompt));
    let (one, four) = (many_kb[0], many_kb.iter().sum::<u64>());
    let date = today();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let accel = accel_of(&qemu_argv);
    println!(
        "pen bench, {date}, {cpus} host CPUs, accel {accel}, --memory {memory}, medians of {reps} ({} for c)",
        reps * 4
    );
    println!("| measure | median |");
    println!("|---|---|");
    println!(
        "| (a) cold `pen exec {VM} -- true` (stopped VM) | {} |",
        ms(a)
    );
    println!(
        "| (b) floor: pen's QEMU + virtiofsd argv, minimal host, to `true` exited | {} |",
        ms(b)
    );
    println!(
        "| (b0) of which: QEMU start to guest agent Hello (snapshot point) | {} |",
        ms(b0)
    );
    println!("| **a/b** | **{:.2}** |", a.as_secs_f64() / b.as_secs_f64());
    println!(
        "| (c) warm `pen exec {VM} -- true` (running VM) | {} |",
        ms(c)
    );
    println!(
        "| (d) host memory, idle VM: QEMU + virtiofsd + supervisor | {} MiB RSS, {} MiB PSS |",
        rss / 1024,
        pss / 1024
    );
    println!(
        "| (s) snapshot `pen exec {VM} -- true` (stopped VM) | {} |",
        ms(s_)
    );
    println!(
        "| **a/s** | **{:.1}x** |",
        a.as_secs_f64() / s_.as_secs_f64()
    );
    println!(
        "| (r) supervisor start to guest Ready: cold / snapshot | {} / {} |",
        ms(ra),
        ms(rs)
    );
    println!(
        "| (p) `pen shell {VM}` to its prompt: cold / snapshot | {} / {} |",
        ms(pa),
        ms(ps)
    );
    println!(
        "| (m) host memory, idle VMs restored from one snapshot: 1 / 4 | {} MiB / {} MiB ({:.1}x) |",
        one / 1024,
        four / 1024,
        four as f64 / one.max(1) as f64
    );
    volumes::print(&vol);
    println!();
    println!("(d) by process: {}", rows.join("; "));
    Ok(())
}

fn today() -> String {
    Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The virtiofsd and QEMU argv of the last start, from the supervisor's log. The log joins
/// arguments with spaces; the benchmark's own paths have none.
fn launch_lines(log: &Path) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let find = |label: &str| {
        let prefix = format!("supervisor: starting {label}: ");
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(split_logged_argv)
            .with_context(|| format!("no `{prefix}` line in {}", log.display()))
    };
    Ok((find("virtiofsd")?, find("qemu")?))
}

/// Splits a logged command line at spaces, except the kernel command line after `-append`,
/// which is one argument made of space-separated words none of which starts with `-`.
fn split_logged_argv(line: &str) -> Vec<String> {
    let mut argv: Vec<String> = Vec::new();
    let mut in_append = false;
    for word in line.split(' ') {
        if in_append && !word.starts_with('-') {
            let last = argv.last_mut().expect("-append has a value");
            last.push(' ');
            last.push_str(word);
            continue;
        }
        in_append = argv.last().is_some_and(|a| a == "-append");
        argv.push(word.to_string());
    }
    argv
}

fn accel_of(qemu: &[String]) -> String {
    qemu.windows(2)
        .find(|w| w[0] == "-accel")
        .map(|w| w[1].split(',').next().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// The value of `path` after `-chardev socket,id=ID,path=`.
fn chardev_path(qemu: &[String], id: &str) -> anyhow::Result<PathBuf> {
    let prefix = format!("socket,id={id},path=");
    qemu.iter()
        .find_map(|a| a.strip_prefix(&prefix))
        .map(|rest| PathBuf::from(rest.split(',').next().unwrap_or(rest)))
        .with_context(|| format!("no {id} chardev in the QEMU command line"))
}

/// One floor run. Returns (time to the agent's Hello, time to `true` exited), both from
/// the moment virtiofsd is started.
async fn floor_run(vfsd: &[String], qemu: &[String]) -> anyhow::Result<(Duration, Duration)> {
    let agent_path = chardev_path(qemu, "agent")?;
    let vfs_path = chardev_path(qemu, "vfs")?;
    for stale in [&agent_path, &vfs_path, &chardev_path(qemu, "qmp")?] {
        let _ = std::fs::remove_file(stale);
    }
    if let Some(dir) = agent_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let start = Instant::now();
    let mut virtiofsd = tokio::process::Command::new(&vfsd[0])
        .args(&vfsd[1..])
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    // QEMU connects to virtiofsd's socket at startup: wait for it, as pen does.
    while !vfs_path.exists() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut qemu_child = tokio::process::Command::new(&qemu[0])
        .args(qemu[1..].iter().map(OsString::from))
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let stream = loop {
        match UnixStream::connect(&agent_path).await {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(1)).await
            }
            Err(e) => bail!("QEMU did not open {}: {e}", agent_path.display()),
        }
    };
    let mut link = Framed::new(stream, FrameCodec::new());
    link.send(Frame::control(Message::Hello {
        version: PROTOCOL_VERSION,
        software: "pen-bench".into(),
    }))
    .await?;
    let mut hello_at = None;
    let mut config_sent = false;
    let done_at = loop {
        let frame = match link.next().await {
            Some(Ok(Ok(frame))) => frame,
            other => bail!("agent link: {other:?}"),
        };
        match (frame.session, frame.message) {
            (CONTROL, Message::Hello { .. }) => hello_at = Some(start.elapsed()),
            (CONTROL, Message::AwaitingConfig) if !config_sent => {
                config_sent = true;
                link.send(Frame::control(Message::Config(config()))).await?;
            }
            (CONTROL, Message::Ready) => {
                link.send(Frame::new(
                    1,
                    Message::Exec(ExecRequest {
                        argv: vec!["true".into()],
                        env: Vec::new(),
                        cwd: None,
                        tty: None,
                    }),
                ))
                .await?;
                link.send(Frame::new(1, Message::Stdin(Vec::new()))).await?;
            }
            (CONTROL, Message::BootFailed { stage, message }) => {
                bail!("boot failed in {stage}: {message}")
            }
            (1, Message::Exit(_)) => break start.elapsed(),
            (1, Message::Error(e)) => bail!("exec failed: {e}"),
            _ => {}
        }
    };
    // Power off as pen does (not timed), so the overlay stays consistent between runs.
    link.send(Frame::control(Message::Shutdown { force: false }))
        .await?;
    if tokio::time::timeout(Duration::from_secs(60), qemu_child.wait())
        .await
        .is_err()
    {
        qemu_child.kill().await?;
    }
    let _ = virtiofsd.kill().await;
    Ok((hello_at.unwrap_or(done_at), done_at))
}

/// What the supervisor sends after the snapshot point.
fn config() -> GuestConfig {
    pen_vm::supervisor::fresh_guest_config(VM, Vec::new(), BootMode::Shell, None)
}

fn children_of(parent: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may hold spaces.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let ppid = after.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(parent) {
            kids.push(pid);
        }
    }
    kids
}

/// A `Key:   N kB` field of a /proc file, in kB.
fn kb_field(path: &str, key: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in {path}"))
}
