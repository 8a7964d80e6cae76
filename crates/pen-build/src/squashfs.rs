//! Packing a tar stream into a squashfs image with `tar2sqfs` (squashfs-tools-ng), the one
//! packer both the base image and profile images use.

use std::io::Read;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread::JoinHandle;

use anyhow::Context;

use crate::confine::Jail;

/// A running `tar2sqfs` writing `out`; feed it tar on [`Packer::input`], then [`Packer::finish`].
pub struct Packer {
    child: Child,
    /// Kills the packer when `pen` is interrupted (see [`pen_core::interrupt`]).
    _undo: pen_core::interrupt::Registration,
    /// Drains the packer's stderr as it comes (a chatty packer must never block on a full
    /// pipe while we feed its stdin); keeps the last [`STDERR_KEPT`] bytes.
    stderr: JoinHandle<Vec<u8>>,
}

/// How much of the packer's stderr is kept for the error message.
const STDERR_KEPT: usize = 16 * 1024;

impl Packer {
    pub fn start(out: &Path) -> anyhow::Result<(Packer, ChildStdin)> {
        Packer::start_with(out, &[])
    }

    /// [`Packer::start`] with more `tar2sqfs` options (`--block-size N`).
    pub fn start_with(out: &Path, extra: &[&str]) -> anyhow::Result<(Packer, ChildStdin)> {
        let jobs = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .to_string();
        // tar2sqfs parses what a builder VM (hostile, as every guest) streams: it runs
        // confined to its input pipe and its output file (see `confine`).
        let jail = Jail::new(Path::new("tar2sqfs"), out).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!("{e} (install squashfs-tools-ng)")
            } else {
                anyhow::Error::new(e)
                    .context(format!("preparing tar2sqfs to write {}", out.display()))
            }
        })?;
        let out = jail.output().to_path_buf();
        let mut cmd = Command::new(jail.program());
        die_with_parent(&mut cmd, libc::SIGKILL);
        jail.confine(&mut cmd);
        let mut child = cmd
            .args([
                "--quiet",
                "--force",
                "--compressor",
                "zstd",
                "--num-jobs",
                &jobs,
            ])
            .args(extra)
            .arg(&out)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context(
                "starting tar2sqfs in namespaces of its own (`pen doctor` checks that user \
                 namespaces work)",
            )?;
        let input = child.stdin.take().expect("stdin is piped");
        let mut pipe = child.stderr.take().expect("stderr is piped");
        let stderr = std::thread::spawn(move || drain_keeping_tail(&mut pipe, STDERR_KEPT));
        let pid = child.id();
        let _undo = pen_core::interrupt::on_interrupt(move || {
            pen_core::interrupt::kill_tree(
                pid,
                nix::sys::signal::Signal::SIGKILL,
                std::time::Duration::from_secs(5),
            )
        });
        Ok((
            Packer {
                child,
                _undo,
                stderr,
            },
            input,
        ))
    }

    /// Waits for the packer (its input must be dropped first). `Err` holds its last words.
    pub fn finish(mut self) -> anyhow::Result<Result<(), String>> {
        let status = self.child.wait()?;
        let stderr = self.stderr.join().unwrap_or_default();
        if status.success() {
            return Ok(Ok(()));
        }
        let last = String::from_utf8_lossy(&stderr)
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string();
        Ok(Err(format!("tar2sqfs failed ({status}): {last}")))
    }
}

/// Makes the program `cmd` starts receive `signal` when the spawning thread (pen's main
/// thread, which runs the builds) ends: a `pen` killed with SIGKILL takes it along.
pub(crate) fn die_with_parent(cmd: &mut Command, signal: libc::c_int) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: prctl, getppid and _exit are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Reads `pipe` to its end, keeping only the last `keep` bytes.
fn drain_keeping_tail(pipe: &mut impl Read, keep: usize) -> Vec<u8> {
    let mut tail = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * keep {
                    tail.drain(..tail.len() - keep);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if tail.len() > keep {
        tail.drain(..tail.len() - keep);
    }
    tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The processes whose parent is `pid`.
    fn children_of(pid: u32) -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
                after.split(' ').nth(1) == Some(pid.to_string().as_str())
            })
            .collect()
    }

    /// tar2sqfs parses what a builder VM streams: it must not run in pen's namespaces.
    #[test]
    fn the_packer_runs_in_namespaces_of_its_own_and_still_packs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.sqfs");
        let (packer, input) = Packer::start(&out).unwrap();
        let handle = packer.child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let tar2sqfs = loop {
            if let Some(&p) = children_of(handle).first() {
                break p;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no tar2sqfs under its handle"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let ns =
            |pid: &str, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
        for kind in ["user", "mnt", "pid", "net", "ipc"] {
            assert_ne!(
                ns(&tar2sqfs.to_string(), kind),
                ns("self", kind),
                "tar2sqfs shares pen's {kind} namespace"
            );
        }
        let status = std::fs::read_to_string(format!("/proc/{tar2sqfs}/status")).unwrap();
        assert!(
            status
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Seccomp:", "2"]),
            "tar2sqfs runs without a seccomp filter:\n{status}"
        );
        let mut tar = tar::Builder::new(input);
        let mut header = tar::Header::new_gnu();
        header.set_size(5);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, "hello", &b"world"[..])
            .unwrap();
        drop(tar.into_inner().unwrap());
        packer.finish().unwrap().unwrap();
        let magic = std::fs::read(&out).unwrap();
        assert_eq!(&magic[..4], b"hsqs", "not a squashfs image");
    }

    #[test]
    fn a_chatty_child_is_drained_while_it_runs() {
        // 1 MiB on stderr before reading stdin: with stderr read only at exit, the child
        // would block on the full pipe and never read its input.
        let mut child = Command::new("sh")
            .args([
                "-c",
                "head -c 1048576 /dev/zero >&2; cat >/dev/null; echo last >&2",
            ])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stderr.take().unwrap();
        let drain = std::thread::spawn(move || drain_keeping_tail(&mut pipe, 64));
        let mut input = child.stdin.take().unwrap();
        std::io::Write::write_all(&mut input, &vec![0u8; 1 << 20]).unwrap();
        drop(input);
        assert!(child.wait().unwrap().success());
        let tail = drain.join().unwrap();
        assert_eq!(tail.len(), 64);
        assert!(tail.ends_with(b"last\n"));
    }
}
