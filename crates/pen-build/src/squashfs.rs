//! Packing a tar stream into a squashfs image with `tar2sqfs` (squashfs-tools-ng), the one
//! packer both the base image and profile images use.

use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use anyhow::Context;

/// A running `tar2sqfs` writing `out`; feed it tar on [`Packer::input`], then [`Packer::finish`].
pub struct Packer {
    child: Child,
}

impl Packer {
    pub fn start(out: &Path) -> anyhow::Result<(Packer, ChildStdin)> {
        let jobs = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .to_string();
        let mut child = Command::new("tar2sqfs")
            .args([
                "--quiet",
                "--force",
                "--compressor",
                "zstd",
                "--num-jobs",
                &jobs,
            ])
            .arg(out)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tar2sqfs (install squashfs-tools-ng)")?;
        let input = child.stdin.take().expect("stdin is piped");
        Ok((Packer { child }, input))
    }

    /// Waits for the packer (its input must be dropped first). `Err` holds its last words.
    pub fn finish(self) -> anyhow::Result<Result<(), String>> {
        let output = self.child.wait_with_output()?;
        if output.status.success() {
            return Ok(Ok(()));
        }
        let last = String::from_utf8_lossy(&output.stderr)
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string();
        Ok(Err(format!("tar2sqfs failed ({}): {last}", output.status)))
    }
}
