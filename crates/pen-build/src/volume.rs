//! Packing read-only volumes (`pen volume create`): a host directory or a tar stream into
//! `volumes/<name>.sqfs` with the same `tar2sqfs` packer as the images.
//!
//! A directory goes through GNU tar (`--sparse`: holes stay holes; hard links, symlinks,
//! modes and empty files as they are; owners become root, the guest's user) into the
//! packer. The image is written to a temporary file beside the volume and renamed over it
//! only once complete and synced: a failed or interrupted create (a full disk) leaves the
//! previous version, and a VM running with the previous version keeps reading the file it
//! opened until it stops.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use pen_core::fsutil::{create_private_dir_all, sync_dir};
use pen_core::paths::PenHome;
use pen_core::progress::Progress;
use pen_core::volume::{self, VolumeInfo};
use pen_core::{size, UsageError};

use crate::squashfs::Packer;

/// Where a volume's content comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A host directory (`--from DIR`), checked with [`check_dir`].
    Dir(PathBuf),
    /// A tar file (`--from-tar FILE`).
    TarFile(PathBuf),
    /// A tar stream on stdin (`--from-tar -`).
    Stdin,
}

/// What a source directory holds, as counted before packing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tree {
    /// Entries below the directory (files, directories, links, ...).
    pub entries: u64,
    /// Bytes of data the files occupy on disk (holes of sparse files not counted).
    pub bytes: u64,
}

/// squashfs block size of volumes: 1 MiB instead of the images' 128 KiB. Volumes hold big
/// files read sequentially (weights, archives, toolchains); measured under TCG, a 512 MiB
/// file read with `dd` in the guest took a median 5.0 s at 1 MiB against 8.2 s at 128 KiB
/// (5 alternated reads each). Small files and tails still share fragment blocks.
const VOLUME_BLOCK_SIZE: &str = "1048576";

/// How many unreadable paths a refusal names.
const NAMED_UNREADABLE: usize = 5;

/// Checks `--from DIR` before anything is written: a readable directory whose files and
/// directories can all be read. Counts what it holds (for progress).
pub fn check_dir(dir: &Path) -> Result<Tree, UsageError> {
    let meta = std::fs::metadata(dir).map_err(|e| {
        UsageError::new(format!(
            "--from {}: {}; give a directory to pack",
            dir.display(),
            pen_core::fsutil::io_reason(&e, "file or directory")
        ))
    })?;
    if !meta.is_dir() {
        return Err(UsageError::new(format!(
            "--from {} is not a directory; give a directory to pack, or a tar file with --from-tar",
            dir.display()
        )));
    }
    let mut tree = Tree::default();
    let mut unreadable = Vec::new();
    let mut unreadable_count = 0usize;
    let mut note = |path: &Path| {
        unreadable_count += 1;
        if unreadable.len() < NAMED_UNREADABLE {
            unreadable.push(path.strip_prefix(dir).unwrap_or(path).display().to_string());
        }
    };
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(entries) => entries,
            Err(_) if d == dir => {
                return Err(UsageError::new(format!(
                    "--from {}: permission denied; give a directory you can read",
                    dir.display()
                )))
            }
            Err(_) => {
                note(&d);
                continue;
            }
        };
        for entry in entries {
            let Ok(entry) = entry else {
                note(&d);
                continue;
            };
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                note(&path);
                continue;
            };
            tree.entries += 1;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                use std::os::unix::fs::MetadataExt;
                tree.bytes += meta.blocks() * 512;
                if std::fs::File::open(&path).is_err() {
                    note(&path);
                }
            }
        }
    }
    if unreadable_count > 0 {
        let more = unreadable_count - unreadable.len();
        return Err(UsageError::new(format!(
            "--from {}: {unreadable_count} path(s) cannot be read: {}{}; make them readable (chmod u+r) or leave them out",
            dir.display(),
            unreadable.join(", "),
            if more > 0 { format!(" and {more} more") } else { String::new() }
        )));
    }
    Ok(tree)
}

/// Checks `--from-tar FILE` before anything is written.
pub fn check_tar_file(file: &Path) -> Result<(), UsageError> {
    match std::fs::File::open(file) {
        Ok(f) if f.metadata().is_ok_and(|m| m.is_dir()) => Err(UsageError::new(format!(
            "--from-tar {} is a directory; use --from {} to pack a directory",
            file.display(),
            file.display()
        ))),
        Ok(_) => Ok(()),
        Err(e) => Err(UsageError::new(format!(
            "--from-tar {}: {}; give a tar file, or - for standard input",
            file.display(),
            pen_core::fsutil::io_reason(&e, "file or directory")
        ))),
    }
}

/// Packs `source` into volume `name` (already validated, as is a [`Source::Dir`] by
/// [`check_dir`], whose count `tree` is). Replaces an existing version atomically.
pub fn create(
    home: &PenHome,
    name: &str,
    source: &Source,
    tree: Option<Tree>,
) -> anyhow::Result<VolumeInfo> {
    let dir = home.volumes();
    create_private_dir_all(&dir)?;
    pen_core::space::ensure_room(&format!("create volume {name}"), &dir, 0, &[])?;
    // 0600, removed on drop unless persisted: a failed create leaves nothing behind.
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.sqfs."))
        .tempfile_in(&dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let progress = Progress::start(&format!("packing volume {name}"));
    let (packer, mut input) = Packer::start_with(tmp.path(), &["--block-size", VOLUME_BLOCK_SIZE])?;
    let total = tree.map(|t| t.bytes);
    let fed = match source {
        Source::Dir(src) => feed_dir(src, &mut input, &progress, total),
        Source::TarFile(file) => std::fs::File::open(file)
            .with_context(|| format!("opening {}", file.display()))
            .and_then(|mut f| copy_counting(&mut f, &mut input, &progress, None)),
        Source::Stdin => copy_counting(&mut std::io::stdin().lock(), &mut input, &progress, None),
    };
    drop(input);
    let packed = packer.finish()?;
    // The packer's own message first: when it stops (a full disk), feeding it fails too,
    // with a broken pipe that says nothing.
    let fed = match (fed, packed) {
        (Ok(bytes), Ok(())) => bytes,
        (_, Err(why)) => {
            progress.abandon();
            anyhow::bail!("packing volume {name}: {why}; volume {name} not changed");
        }
        (Err(e), Ok(())) => {
            progress.abandon();
            return Err(e.context(format!("volume {name} not changed")));
        }
    };
    let target = home.volume_file(name);
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.persist(&target)
        .with_context(|| format!("renaming into {}", target.display()))?;
    sync_dir(&dir);
    let info =
        volume::info(home, name).with_context(|| format!("reading {} back", target.display()))?;
    progress.finish(&format!(
        "({} of input, {} packed)",
        size::human(fed),
        size::human(info.size)
    ));
    Ok(info)
}

/// Streams `tar` of `src` into the packer.
fn feed_dir(
    src: &Path,
    input: &mut impl Write,
    progress: &Progress,
    total: Option<u64>,
) -> anyhow::Result<u64> {
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(src)
        .args([
            "--sparse",
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--format=gnu",
            "-cf",
            "-",
            ".",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tar (install GNU tar)")?;
    let mut out = tar.stdout.take().expect("stdout is piped");
    let mut err_pipe = tar.stderr.take().expect("stderr is piped");
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let copied = copy_counting(&mut out, input, progress, total);
    drop(out);
    let status = tar.wait()?;
    let stderr = stderr.join().unwrap_or_default();
    let bytes = copied?;
    if !status.success() {
        let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        anyhow::bail!(
            "tar of {} failed ({status}): {}",
            src.display(),
            last.trim()
        );
    }
    Ok(bytes)
}

/// Copies `from` into `to`, showing the bytes so far (of `total`, when known).
fn copy_counting(
    from: &mut impl Read,
    to: &mut impl Write,
    progress: &Progress,
    total: Option<u64>,
) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut done = 0u64;
    let mut shown = Instant::now();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the volume's content"),
        };
        to.write_all(&buf[..n])
            .context("writing to tar2sqfs (it stopped early; see its message)")?;
        done += n as u64;
        if shown.elapsed() >= Duration::from_millis(500) {
            shown = Instant::now();
            progress.line(&match total {
                Some(total) => format!("{} of about {}", size::human(done), size::human(total)),
                None => format!("{} read", size::human(done)),
            });
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_counted_and_bad_sources_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/a"), b"hello").unwrap();
        std::os::unix::fs::symlink("sub/a", src.join("link")).unwrap();
        // A dangling symlink is content, not an unreadable file.
        std::os::unix::fs::symlink("nowhere", src.join("dangling")).unwrap();
        let tree = check_dir(&src).unwrap();
        assert_eq!(tree.entries, 4);
        let err = check_dir(&tmp.path().join("missing")).unwrap_err().0;
        assert!(err.contains("no such file or directory"), "{err}");
        let err = check_dir(&src.join("sub/a")).unwrap_err().0;
        assert!(err.contains("is not a directory"), "{err}");
        assert!(check_tar_file(&src)
            .unwrap_err()
            .0
            .contains("is a directory"));
        assert!(check_tar_file(&src.join("nope.tar"))
            .unwrap_err()
            .0
            .contains("no such file"));
    }

    #[test]
    fn unreadable_files_are_named() {
        if nix::unistd::geteuid().is_root() {
            // Root reads everything: the refusal cannot be provoked (CI runs as a user).
            eprintln!("skipped: running as root");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path();
        for i in 0..7 {
            let f = src.join(format!("secret{i}"));
            std::fs::write(&f, b"x").unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o000)).unwrap();
        }
        let err = check_dir(src).unwrap_err().0;
        assert!(err.contains("7 path(s) cannot be read: secret"), "{err}");
        assert!(err.contains("and 2 more"), "{err}");
    }
}
