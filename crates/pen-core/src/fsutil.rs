//! File helpers. Every file pen writes that others read goes through [`write_atomic`], so a
//! reader never sees half a file and a crash never leaves one. Everything pen creates is
//! private to the user, whatever the umask: directories 0700, files 0600
//! ([`create_private_dir_all`], [`create_private_file`]; `pen` also sets umask 077 for
//! itself and the programs it starts).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};

/// Writes `contents` to a temporary file beside `path`, fsyncs it and renames it into place.
/// The temporary's name carries this process's pid ([`TEMP_PREFIX`]): one left by a killed
/// `pen` is removed by the next write in that directory ([`sweep_temporaries`]).
pub fn write_atomic(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("path has no parent directory")?;
    create_private_dir_all(dir)?;
    sweep_temporaries(dir);
    // NamedTempFile creates 0600.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{}.", std::process::id()))
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(contents)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    if let Some(name) = path.file_name() {
        crate::testpoint::pause(&format!("write {}", name.to_string_lossy()));
    }
    tmp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    sync_dir(dir);
    Ok(())
}

/// How [`write_atomic`]'s temporaries are named: `.pen-tmp-<pid>.<random>`.
pub const TEMP_PREFIX: &str = ".pen-tmp-";

/// Removes the [`write_atomic`] temporaries in `dir` whose process is gone (killed between
/// creating and renaming). A live pid keeps its file, even when the pid was reused since:
/// that file goes at a later sweep.
pub fn sweep_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(TEMP_PREFIX))
            .and_then(|rest| rest.split('.').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Removes `dir` and everything in it; NotFound is success. Retries a few times: a process
/// being killed may still create a file in it.
pub fn remove_tree(dir: &Path) -> std::io::Result<()> {
    let mut last = Ok(());
    for _ in 0..5 {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Ok(()) => return Ok(()),
            Err(e) => last = Err(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    last
}

/// `create_dir_all` with mode 0700 for every directory it creates.
pub fn create_private_dir_all(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// `File::create` (write, create, truncate) with mode 0600 for a new file.
pub fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// First executable file called `name` in `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// The last `n` lines of a file (reads at most its last 64 KiB).
pub fn tail_lines(path: &Path, n: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Lowercase hex sha256 of `bytes`.
/// Why opening a path the user named failed, in words for a one-line error: "no such
/// `what`", "permission denied", or the error itself.
pub fn io_reason(e: &std::io::Error, what: &str) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => format!("no such {what}"),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Makes a rename durable. Best effort: some filesystems refuse fsync on directories.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Total bytes allocated on disk by a file or a directory tree (sparse files count what
/// they really use).
pub fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if meta.is_dir() {
        std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| disk_usage(&e.path()))
                    .sum::<u64>()
            })
            .unwrap_or(0)
            + own
    } else {
        own
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).unwrap();
        let tail = tail_lines(&p, 3);
        assert_eq!(tail, "line 28\nline 29\nline 30");
        assert_eq!(tail_lines(&dir.path().join("none"), 3), "");
    }

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/x.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn temporaries_of_dead_processes_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        // A pid that cannot be live (above pid_max's ceiling), and this live process's.
        let dead = dir.path().join(format!("{TEMP_PREFIX}4194305.abc123"));
        let live = dir
            .path()
            .join(format!("{TEMP_PREFIX}{}.abc123", std::process::id()));
        let other = dir.path().join(".tmpabc123");
        for f in [&dead, &live, &other] {
            std::fs::write(f, b"half").unwrap();
        }
        write_atomic(&dir.path().join("vm.json"), b"{}").unwrap();
        assert!(!dead.exists(), "a dead process's temporary stays");
        assert!(live.exists(), "a live process's temporary was removed");
        assert!(other.exists(), "a file that is not ours was removed");
    }
}
