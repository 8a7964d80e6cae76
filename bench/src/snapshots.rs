//! The snapshot part of the benchmark: time to Ready and to an interactive prompt, host
//! memory of VMs restored from one snapshot, and the floor's command line.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{children_of, kb_field, Env};

/// "VM ready (+N ms)" from the supervisor log of the VM's last start: supervisor start to
/// the guest's `Ready`.
pub fn ready_ms(log: &Path) -> anyhow::Result<Duration> {
    let text = std::fs::read_to_string(log)?;
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("supervisor: VM ready (+"))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .map(Duration::from_millis)
        .with_context(|| format!("no `VM ready` line in {}", log.display()))
}

/// Whether the VM's last start restored a snapshot.
pub fn restored(log: &Path) -> bool {
    std::fs::read_to_string(log).is_ok_and(|t| t.contains("supervisor: restored snapshot"))
}

/// Wall time from spawning `pen shell NAME [extra]` on a terminal (`script` provides one) to
/// bash's prompt (`root@NAME:`) appearing; then the shell is exited.
pub fn time_to_prompt(env: &Env, name: &str, extra: &[&str]) -> anyhow::Result<Duration> {
    let mut line = format!("{} shell {name}", env.opts.pen.display());
    for e in extra {
        line.push(' ');
        line.push_str(e);
    }
    let start = Instant::now();
    let mut child = Command::new("script")
        .args(["-qfec", &line, "/dev/null"])
        .env("PEN_HOME", &env.home)
        .current_dir(&env.ws)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("running `script` (util-linux) for a terminal")?;
    let mut stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let needle = format!("root@{name}:").into_bytes();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(needle.len()).any(|w| w == needle) {
                let _ = tx.send(());
                // Keep draining so the shell never blocks on output.
                while matches!(stdout.read(&mut buf), Ok(n) if n > 0) {}
                return;
            }
        }
    });
    let got = rx.recv_timeout(Duration::from_secs(120));
    let took = start.elapsed();
    if let Some(stdin) = child.stdin.as_mut() {
        let _ = stdin.write_all(b"exit\n");
    }
    drop(child.stdin.take());
    if got.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        bail!("no prompt from `pen shell {name}` within 120 s");
    }
    let _ = child.wait();
    Ok(took)
}

/// Host memory of one VM: the supervisor and its children (QEMU, virtiofsd). Guest RAM is
/// counted as the pages its memfd holds, whether QEMU has mapped them or not (VmRSS only
/// shows the mapped ones). Returns kB.
pub fn vm_memory_kb(supervisor: u32) -> anyhow::Result<u64> {
    let mut pids = vec![supervisor];
    pids.extend(children_of(supervisor));
    let mut total = 0;
    for pid in pids {
        let rss = kb_field(&format!("/proc/{pid}/status"), "VmRSS:")?;
        let shmem = kb_field(&format!("/proc/{pid}/status"), "RssShmem:")?;
        total += rss - shmem + guest_ram_kb(pid);
    }
    Ok(total)
}

/// kB allocated in the guest RAM memfd a process holds open (0 if none).
fn guest_ram_kb(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    for fd in fds.flatten() {
        let is_ram = std::fs::read_link(fd.path())
            .is_ok_and(|t| t.to_string_lossy().contains("memfd:pen-guest-ram"));
        if is_ram {
            if let Ok(meta) = std::fs::metadata(fd.path()) {
                return meta.blocks() / 2;
            }
        }
    }
    0
}

/// The supervisor pid of VM `name` (from its lock file).
pub fn supervisor_of(home: &Path, name: &str) -> anyhow::Result<u32> {
    let lock = home.join("vms").join(name).join("lock");
    Ok(std::fs::read_to_string(&lock)
        .with_context(|| format!("reading {}", lock.display()))?
        .trim()
        .parse()?)
}

/// pen's QEMU command line made standalone for the floor: pen passes guest RAM as a memfd
/// it owns and hot-plugs the workspace over QMP; the floor gets its own memfd backend and
/// the workspace device on the command line (cheaper than hot-plugging, as a floor should
/// be). The descriptors pen hands QEMU become paths: the overlay disk's becomes
/// `vm_dir/overlay.img`, the console pipe `vm_dir/console.log`.
pub fn floor_qemu_argv(
    qemu: &[String],
    vfs_socket: &Path,
    vm_dir: &Path,
) -> anyhow::Result<Vec<String>> {
    let mut argv = Vec::new();
    let mut args = qemu.iter().peekable();
    while let Some(arg) = args.next() {
        if arg == "-incoming" {
            args.next();
            continue;
        }
        if arg.starts_with("file=/proc/self/fd/") && arg.contains("id=pen-overlay") {
            argv.push(fd_to_path(arg, &vm_dir.join("overlay.img")));
            continue;
        }
        if arg.starts_with("file,id=console,path=/proc/self/fd/") {
            argv.push(fd_to_path(arg, &vm_dir.join("console.log")));
            continue;
        }
        if let Some(rest) = arg.strip_prefix("memory-backend-file,id=mem,") {
            let size = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("size="))
                .context("no size in the memory backend")?;
            argv.push(format!("memory-backend-memfd,id=mem,size={size},share=on"));
            continue;
        }
        argv.push(arg.clone());
    }
    argv.extend([
        "-chardev".into(),
        format!("socket,id=vfs,path={}", vfs_socket.display()),
        "-device".into(),
        "vhost-user-fs-pci,chardev=vfs,tag=workspace".into(),
    ]);
    Ok(argv)
}

/// `arg` with its `/proc/self/fd/N` (a descriptor pen handed QEMU) replaced by `path`.
fn fd_to_path(arg: &str, path: &Path) -> String {
    let start = arg.find("/proc/self/fd/").expect("checked by the caller");
    let digits = &arg[start + "/proc/self/fd/".len()..];
    let end = arg.len()
        - digits
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .len();
    format!("{}{}{}", &arg[..start], path.display(), &arg[end..])
}

/// virtiofsd's socket path from its command line (`--socket-path=P` or `--socket-path P`).
pub fn vfs_socket(vfsd: &[String]) -> anyhow::Result<PathBuf> {
    let mut args = vfsd.iter();
    while let Some(arg) = args.next() {
        if let Some(p) = arg.strip_prefix("--socket-path=") {
            return Ok(p.into());
        }
        if arg == "--socket-path" {
            return args
                .next()
                .map(PathBuf::from)
                .context("--socket-path without a value");
        }
    }
    bail!("no --socket-path in virtiofsd's command line")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_argv_is_standalone() {
        let pen: Vec<String> = [
            "qemu",
            "-object",
            "memory-backend-file,id=mem,size=2048M,mem-path=/proc/self/fd/19,share=on",
            "-device",
            "pcie-root-port,id=pen-rp-workspace,chassis=1,slot=1",
            "-chardev",
            "file,id=console,path=/proc/self/fd/18",
            "-drive",
            "file=/proc/self/fd/20,if=none,id=pen-overlay,format=raw",
            "-incoming",
            "defer",
        ]
        .map(String::from)
        .to_vec();
        let argv = floor_qemu_argv(&pen, Path::new("/r/vfs.sock"), Path::new("/h/vms/b")).unwrap();
        let line = argv.join(" ");
        assert!(
            line.contains("memory-backend-memfd,id=mem,size=2048M,share=on"),
            "{line}"
        );
        assert!(!line.contains("/proc/self/fd"), "{line}");
        assert!(!line.contains("-incoming"), "{line}");
        assert!(
            !line.contains("fdset") && !line.contains("-add-fd"),
            "{line}"
        );
        assert!(
            line.contains("-drive file=/h/vms/b/overlay.img,if=none,id=pen-overlay,format=raw"),
            "{line}"
        );
        assert!(
            line.contains("file,id=console,path=/h/vms/b/console.log"),
            "{line}"
        );
        assert!(line.contains("socket,id=vfs,path=/r/vfs.sock"), "{line}");
    }

    #[test]
    fn socket_path_of_either_virtiofsd() {
        let c = [
            "/usr/lib/qemu/virtiofsd",
            "--socket-path=/r/v.sock",
            "-o",
            "source=/w",
        ];
        assert_eq!(
            vfs_socket(&c.map(String::from)).unwrap(),
            PathBuf::from("/r/v.sock")
        );
        let rust = ["/usr/libexec/virtiofsd", "--socket-path", "/r/v.sock"];
        assert_eq!(
            vfs_socket(&rust.map(String::from)).unwrap(),
            PathBuf::from("/r/v.sock")
        );
    }

    #[test]
    fn ready_line() {
        let dir = std::env::temp_dir().join(format!("pen-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("supervisor.log");
        std::fs::write(
            &log,
            "supervisor: restored snapshot abc in 99 ms\nsupervisor: VM ready (+283 ms)\n",
        )
        .unwrap();
        assert_eq!(ready_ms(&log).unwrap(), Duration::from_millis(283));
        assert!(restored(&log));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
