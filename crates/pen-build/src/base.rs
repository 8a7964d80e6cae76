//! Building the base image on the host from Debian packages (nothing prebuilt downloaded):
//! mmdebstrap → one tar stream → kernel + boot modules (initrd) and the rest (squashfs).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};

use pen_core::image::{image_id, BaseImage, BaseManifest, FileIdentity};

use crate::initrd::{self, InitrdFile};
use crate::squashfs::Packer;
use crate::{pen_init_sha256, sources, write_manifest, BASE_PACKAGES, PEN_INIT};
use pen_core::fsutil::sync_dir;
use pen_core::paths::PenHome;
use pen_core::progress::Progress;
use pen_core::vm::now_secs;

/// Builds the base image, or waits for a build already running and reuses its result.
pub fn build_base(home: &PenHome) -> anyhow::Result<BaseImage> {
    let images = home.images();
    pen_core::fsutil::create_private_dir_all(&images)?;
    let _lock = lock_builds(&images)?;
    // Whoever held the lock before us may have just built it.
    if let Some(image) = BaseImage::load(home) {
        if image.manifest.pen_init_sha256 == pen_init_sha256() {
            return Ok(image);
        }
    }
    if PEN_INIT.is_empty() {
        bail!(
            "this pen was built without its guest agent (pen-init failed to compile); rebuild pen"
        );
    }
    for tool in ["mmdebstrap", "tar2sqfs"] {
        if which(tool).is_none() {
            bail!("{tool} is not installed; it is needed to build the base image: sudo apt-get install mmdebstrap squashfs-tools-ng");
        }
    }

    // mmdebstrap's tar and the squashfs are written beside the image.
    pen_core::space::ensure_room("build the base image", &images, 0, &[])?;
    let progress = Progress::start("building the base image (once; about a minute)");
    let result = build_into(home, &progress);
    match &result {
        Ok(_) => progress.finish("done"),
        Err(_) => progress.abandon(),
    }
    result
}

/// Serialises image builds across processes; released on drop.
fn lock_builds(images: &Path) -> anyhow::Result<Flock<File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(images.join(".build.lock"))
        .context("opening the image build lock")?;
    let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((file, _)) => {
            eprintln!("pen: another pen is building the image; waiting for it");
            Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| anyhow::anyhow!("locking image builds: {e}"))?
        }
    };
    sweep_dead_builds(images);
    Ok(lock)
}

/// [`sweep_dead_builds`] when no build runs (the build lock is free), else nothing: the
/// next start sweeps. Every start that needs the base image calls it.
pub(crate) fn sweep_if_idle(images: &Path) {
    let Ok(file) = std::fs::OpenOptions::new()
        .write(true)
        .open(images.join(".build.lock"))
    else {
        return;
    };
    if let Ok(_lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        sweep_dead_builds(images);
    }
}

/// Removes what builds killed before they could clean up left in `images` (`.tmp-base-*`
/// scratch directories, `.initrd-*` temporaries). Called under the build lock: no live build
/// owns them.
fn sweep_dead_builds(images: &Path) {
    pen_core::fsutil::sweep_temporaries(images);
    let Ok(entries) = std::fs::read_dir(images) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with(".tmp-base-") {
            let _ = pen_core::fsutil::remove_tree(&path);
        } else if name.starts_with(".initrd-") {
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn build_into(home: &PenHome, progress: &Progress) -> anyhow::Result<BaseImage> {
    let images = home.images();
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-base-")
        .tempdir_in(&images)?;
    // Interrupted: the scratch goes (after mmdebstrap and the packer, registered later).
    let tmp_path = tmp.path().to_path_buf();
    let _undo = pen_core::interrupt::on_interrupt(move || {
        let _ = pen_core::fsutil::remove_tree(&tmp_path);
    });
    let log_path = images.join("base-build.log");
    let mut log = pen_core::fsutil::create_private_file(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;

    let sources = sources::host_sources(
        Path::new("/etc"),
        std::env::var("PEN_MIRROR").ok().as_deref(),
    )?;
    let sources_file = tmp.path().join("sources.list");
    std::fs::write(&sources_file, sources.lines.join("\n") + "\n")?;
    writeln!(log, "suite {}\n{}", sources.suite, sources.lines.join("\n"))?;

    // 1. The whole Debian root as one tar.
    let root_tar = tmp.path().join("root.tar");
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--variant=minbase")
        .arg(format!("--include={}", BASE_PACKAGES.join(",")))
        .args([
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
        ])
        .args(["--dpkgopt=path-include=/usr/share/doc/*/copyright"])
        .args([
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-include=/usr/share/locale/locale.alias",
        ])
        .arg(&sources.suite)
        .arg(&root_tar)
        .arg(&sources_file);
    run_logged(cmd, progress, &mut log).context("mmdebstrap could not build the Debian root")?;

    // 2. Kernel and modules.dep (first pass), then modules + filtered root (second pass).
    progress.line("extracting the kernel and boot modules");
    let (kernel_version, kernel, modules_dep) = find_kernel(&root_tar)?;
    let deps = initrd::parse_modules_dep(&modules_dep);
    let order = initrd::load_order(&deps, initrd::BOOT_MODULES)?;

    progress.line("packing the root image (squashfs)");
    let rootfs_tmp = tmp.path().join("rootfs.sqfs");
    let modules = pack_rootfs(&root_tar, &rootfs_tmp, &kernel_version, &order, &mut log)?;

    // 3. Boot files.
    let modules_dir = tmp.path().join("modules");
    pen_core::fsutil::create_private_dir_all(&modules_dir)?;
    let mut load_list = String::new();
    for path in &order {
        let file = path.rsplit('/').next().unwrap_or(path);
        std::fs::write(modules_dir.join(file), &modules[path])?;
        load_list.push_str(file);
        load_list.push('\n');
    }
    std::fs::write(modules_dir.join("load.list"), load_list)?;
    std::fs::write(tmp.path().join("vmlinuz"), &kernel)?;
    write_initrd(&modules_dir, &tmp.path().join("initrd"))?;

    // 4. Into place; base.json last.
    for name in ["vmlinuz", "initrd", "rootfs.sqfs"] {
        File::open(tmp.path().join(name))?.sync_all()?;
    }
    let old_modules = images.join("modules");
    if old_modules.exists() {
        std::fs::remove_dir_all(&old_modules)?;
    }
    std::fs::rename(&modules_dir, &old_modules)?;
    for (from, to) in [
        ("vmlinuz", home.kernel()),
        ("initrd", home.initrd()),
        ("rootfs.sqfs", home.base_rootfs()),
    ] {
        std::fs::rename(tmp.path().join(from), &to)
            .with_context(|| format!("moving {}", to.display()))?;
    }
    sync_dir(&images);
    let kernel_id = FileIdentity::of(&home.kernel())?;
    let initrd_id = FileIdentity::of(&home.initrd())?;
    let rootfs_id = FileIdentity::of(&home.base_rootfs())?;
    let manifest = BaseManifest {
        image_id: image_id(&kernel_id, &initrd_id, &rootfs_id),
        suite: sources.suite,
        kernel_version,
        kernel: kernel_id,
        initrd: initrd_id,
        rootfs: rootfs_id,
        pen_init_sha256: pen_init_sha256(),
        packages: BASE_PACKAGES.iter().map(|p| p.to_string()).collect(),
        pen_version: pen_core::VERSION.to_string(),
        created_at: now_secs(),
    };
    write_manifest(home, &manifest)?;
    BaseImage::load(home).context("the base image just built does not check out")
}

/// Rebuilds only the initrd (this pen carries another pen-init than the image has).
pub fn refresh_initrd(home: &PenHome, mut image: BaseImage) -> anyhow::Result<BaseImage> {
    let images = home.images();
    let _lock = lock_builds(&images)?;
    // Another pen may have refreshed it while this one waited for the lock. Writing the
    // same initrd again would change its mtime, which every snapshot saved since pins:
    // they would all be thrown away.
    if let Some(current) = BaseImage::load(home) {
        if current.manifest.pen_init_sha256 == pen_init_sha256() {
            return Ok(current);
        }
        image = current;
    }
    let modules_dir = images.join("modules");
    if !modules_dir.join("load.list").exists() {
        drop(_lock);
        return build_base(home);
    }
    let tmp = tempfile::Builder::new()
        .prefix(".initrd-")
        .tempfile_in(&images)?;
    write_initrd(&modules_dir, tmp.path())?;
    tmp.as_file().sync_all()?;
    tmp.persist(home.initrd())?;
    let m = &mut image.manifest;
    m.initrd = FileIdentity::of(&home.initrd())?;
    m.image_id = image_id(&m.kernel, &m.initrd, &m.rootfs);
    m.pen_init_sha256 = pen_init_sha256();
    write_manifest(home, m)?;
    Ok(image)
}

fn write_initrd(modules_dir: &Path, out: &Path) -> anyhow::Result<()> {
    let load_list = std::fs::read_to_string(modules_dir.join("load.list"))?;
    let mut files = vec![InitrdFile {
        path: "init".into(),
        mode: 0o755,
        contents: PEN_INIT.to_vec(),
    }];
    for name in load_list.lines().filter(|l| !l.is_empty()) {
        files.push(InitrdFile {
            path: format!("lib/modules/{name}"),
            mode: 0o644,
            contents: std::fs::read(modules_dir.join(name))?,
        });
    }
    files.push(InitrdFile {
        path: "lib/modules/load.list".into(),
        mode: 0o644,
        contents: load_list.into_bytes(),
    });
    let out_file = std::io::BufWriter::new(pen_core::fsutil::create_private_file(out)?);
    initrd::write_cpio(out_file, &files)?.flush()?;
    Ok(())
}

/// Runs a command, showing its output lines as progress and keeping them in the log.
fn run_logged(mut cmd: Command, progress: &Progress, log: &mut File) -> anyhow::Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    // mmdebstrap cleans up (its mounts, its temporary root) on SIGTERM once its helpers
    // (apt-get, dpkg in the chroot) have ended, which they do on the same signal: it runs
    // in a process group of its own, which pen signals as a whole when it is interrupted,
    // and pen waits for that cleanup. It also gets a SIGTERM when pen dies.
    crate::squashfs::die_with_parent(&mut cmd, libc::SIGTERM);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let pid = child.id();
    let _undo = pen_core::interrupt::on_interrupt(move || {
        pen_core::interrupt::terminate_group(pid, std::time::Duration::from_secs(60))
    });
    // mmdebstrap talks on stderr; merge stdout in from a thread.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .for_each(|l| drop(tx2.send(l)))
    });
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .for_each(|l| drop(tx.send(l)))
    });
    let mut tail: Vec<String> = Vec::new();
    for line in rx {
        let _ = writeln!(log, "{line}");
        progress.line(&line);
        tail.push(line);
        if tail.len() > 15 {
            tail.remove(0);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "{program} failed ({status}); last lines:\n{}",
            tail.join("\n")
        );
    }
    Ok(())
}

/// Normalised tar path: no leading "./".
fn entry_path(entry: &tar::Entry<impl Read>) -> anyhow::Result<String> {
    let path = entry.path()?.to_string_lossy().into_owned();
    Ok(path.trim_start_matches("./").to_string())
}

/// The kernel image, its version and its modules.dep.
fn find_kernel(root_tar: &Path) -> anyhow::Result<(String, Vec<u8>, String)> {
    let mut kernel = None;
    let mut deps: HashMap<String, String> = HashMap::new();
    let mut archive = tar::Archive::new(BufReader::new(File::open(root_tar)?));
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry_path(&entry)?;
        if let Some(version) = path.strip_prefix("boot/vmlinuz-") {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            kernel = Some((version.to_string(), bytes));
        } else if let Some(rest) = path.strip_prefix("usr/lib/modules/") {
            if let Some(version) = rest.strip_suffix("/modules.dep") {
                let mut text = String::new();
                entry.read_to_string(&mut text)?;
                deps.insert(version.to_string(), text);
            }
        }
    }
    let (version, bytes) = kernel.context(
        "the Debian root has no /boot/vmlinuz-*: was linux-image-cloud-amd64 installed?",
    )?;
    let dep = deps
        .remove(&version)
        .with_context(|| format!("the Debian root has no modules.dep for kernel {version}"))?;
    Ok((version, bytes, dep))
}

/// Streams the root (minus /boot and the kernel symlinks) into tar2sqfs, collecting the boot
/// modules on the way. Returns module path (relative to the modules dir) → contents.
fn pack_rootfs(
    root_tar: &Path,
    out: &Path,
    kernel_version: &str,
    wanted: &[String],
    log: &mut File,
) -> anyhow::Result<HashMap<String, Vec<u8>>> {
    let (packer, input) = Packer::start(out)?;
    let modules_prefix = format!("usr/lib/modules/{kernel_version}/");
    let mut modules = HashMap::new();
    let write_result = (|| -> anyhow::Result<()> {
        let mut builder = tar::Builder::new(std::io::BufWriter::new(input));
        let mut archive = tar::Archive::new(BufReader::new(File::open(root_tar)?));
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = entry_path(&entry)?;
            if path.is_empty()
                || (path.starts_with("boot/") && path != "boot/")
                || path.starts_with("vmlinuz")
                || path.starts_with("initrd.img")
            {
                continue;
            }
            let mut header = entry.header().clone();
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            if let Some(rel) = path.strip_prefix(&modules_prefix) {
                if wanted.iter().any(|w| w == rel) {
                    modules.insert(rel.to_string(), data.clone());
                }
            }
            match entry.header().entry_type() {
                // Hard links and symlinks carry their target in the header; path names
                // longer than the header field need the GNU long-name extension.
                tar::EntryType::Link | tar::EntryType::Symlink => {
                    let target = entry.link_name()?.context("link without a target")?;
                    builder.append_link(&mut header, &path, target)?;
                }
                _ => builder.append_data(&mut header, &path, &data[..])?,
            }
        }
        // Mount points every VM uses, present in the image rather than made on each overlay.
        for dir in ["workspace", "var/lib/pen"] {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            header.set_mtime(0);
            builder.append_data(&mut header, dir, std::io::empty())?;
        }
        builder.into_inner()?.flush()?;
        Ok(())
    })();
    // The packer's failure comes first: when it dies, the stream only sees a broken pipe.
    if let Err(why) = packer.finish()? {
        let _ = writeln!(log, "{why}");
        bail!(why);
    }
    write_result.context("streaming the root into tar2sqfs")?;
    for path in wanted {
        if !modules.contains_key(path) {
            bail!("the Debian root lacks the boot module {path}");
        }
    }
    Ok(modules)
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.is_file())
}
