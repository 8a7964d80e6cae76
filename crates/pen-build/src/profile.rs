//! Building profile images: a profile's packages and build script baked into a root
//! squashfs by a builder VM, never on the host (build scripts are untrusted code).
//!
//! The files (`images/profiles/<name>/`) and the image's status are described in
//! [`pen_core::image::profile`]; `build.hash` is written last, so a build that fails anywhere
//! leaves the previous image and its `build.hash` untouched.

use pen_core::logfile::{rotated, CappedLog, BUILD_LOG_MAX};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};

use pen_core::fsutil::{sync_dir, write_atomic};
use pen_core::image::profile::{cache_key, rootfs_path, status, ImageStatus, ProfileImageManifest};
use pen_core::image::{BaseImage, FileIdentity};
use pen_core::paths::{PenHome, VmPaths};
use pen_core::profile::LoadedProfile;
use pen_core::progress::Progress;
use pen_core::vm::{now_secs, VmConfig};
use pen_vm::client::{self, StartOptions};

use crate::build_ca::{self, ExtraCaCerts};
use crate::squashfs::Packer;

/// Memory and scratch disk of a builder VM: enough for `apt-get install` of big toolchains.
const BUILDER_MEMORY_MB: u32 = 2048;
const BUILDER_DISK: u64 = 32 << 30;

/// The profile's image, built first when missing, stale or damaged.
pub fn ensure(
    home: &PenHome,
    profile: &LoadedProfile,
    base: &BaseImage,
) -> anyhow::Result<PathBuf> {
    match status(home, profile, base) {
        ImageStatus::Built(_) => Ok(rootfs_path(home, &profile.name)),
        other => {
            if let ImageStatus::Missing { damaged: true } = other {
                eprintln!(
                    "pen: profile {}'s image is damaged or incomplete; rebuilding it",
                    profile.name
                );
            }
            build(home, profile, base)
        }
    }
}

/// Builds `profile`'s image in a builder VM, or waits for a build of it already running
/// and reuses the result when it matches.
pub fn build(home: &PenHome, profile: &LoadedProfile, base: &BaseImage) -> anyhow::Result<PathBuf> {
    // Checked before anything is created: a bad PEN_BUILD_CA_CERTS is a usage error.
    let label = format!("profile {}'s ca_certs", profile.name);
    let profile_ca = profile.profile.ca_certs_path(&label)?;
    let extra_ca = ExtraCaCerts::for_build(profile_ca.as_deref().map(|p| (label.as_str(), p)))?;
    let dir = home.profile_image_dir(&profile.name);
    pen_core::fsutil::create_private_dir_all(&dir)?;
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".build.lock"))?;
    let _lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((file, _)) => {
            eprintln!(
                "pen: profile {} is being built by another pen; waiting for it",
                profile.name
            );
            let lock = Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| anyhow::anyhow!("locking: {e}"))?;
            if let ImageStatus::Built(_) = status(home, profile, base) {
                return Ok(rootfs_path(home, &profile.name));
            }
            lock
        }
    };
    sweep_dead_builds(&dir);
    // The builder VM's scratch disk and the new image are written in `dir`.
    pen_core::space::ensure_room(
        &format!("build profile {}'s image", profile.name),
        &dir,
        0,
        &[],
    )?;
    let progress = Progress::start(&format!("building profile {}'s image", profile.name));
    let result = build_locked(home, profile, base, extra_ca.as_ref(), &progress);
    match &result {
        Ok(_) => progress.finish("done"),
        Err(_) => progress.abandon(),
    }
    result
}

/// Writes each chunk to the build log and shows its last line as progress.
struct LogSink<'a> {
    log: &'a mut CappedLog,
    progress: &'a Progress,
    echo: bool,
}

impl Write for LogSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.log.write_all(buf)?;
        let text = String::from_utf8_lossy(buf);
        if let Some(line) = text.lines().rev().find(|l| !l.trim().is_empty()) {
            self.progress.line(line);
        }
        if self.echo {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                self.progress.println(&format!("  {line}"));
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.log.flush()
    }
}

fn build_locked(
    home: &PenHome,
    profile: &LoadedProfile,
    base: &BaseImage,
    extra_ca: Option<&ExtraCaCerts>,
    progress: &Progress,
) -> anyhow::Result<PathBuf> {
    let dir = home.profile_image_dir(&profile.name);
    let key = cache_key(profile, base);
    // The builder VM lives in a private PEN_HOME inside the image directory: it never shows
    // in `pen list` and disappears with the build.
    let scratch = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&dir)?;
    let builder_home = PenHome::at(scratch.path());
    // Interrupted (SIGINT, SIGTERM, SIGHUP): the builder VM and the scratch go. Dropped
    // before `scratch`, which removes the directory on the way out otherwise.
    let scratch_path = scratch.path().to_path_buf();
    let _undo = pen_core::interrupt::on_interrupt(move || discard_scratch(&scratch_path));
    let log_tmp = scratch.path().join("build.log");
    // Capped: the build's output is the builder guest's to choose.
    let mut log = CappedLog::start(&log_tmp, BUILD_LOG_MAX)?;
    writeln!(
        log,
        "pen: building profile {} (cache key {key})",
        profile.name
    )?;

    let network = profile_network(profile)?;
    let vm = VmConfig {
        name: "builder".into(),
        dir: scratch.path().to_path_buf(),
        cpus: pen_core::vm::host_cpus(),
        memory_mb: BUILDER_MEMORY_MB,
        disk_size: BUILDER_DISK,
        profile: None,
        setup_hash: None,
        created_at: now_secs(),
        network,
        // A builder mounts no volumes: its image must not depend on them.
        volumes: Vec::new(),
        ca_certs: None,
    };
    let vm_paths = VmPaths::new(&builder_home, &vm.name);
    vm.save(&vm_paths)?;
    progress.line("booting the builder VM");
    client::ensure_running(
        &builder_home,
        &vm,
        StartOptions {
            accel: None,
            env: Vec::new(),
            keep_running: true,
            kernel: base.kernel.clone(),
            initrd: base.initrd.clone(),
            rootfs: base.rootfs.clone(),
            setup_script: None,
            quiet: true,
            mode: pen_proto::BootMode::Build,
            // The builder's home is temporary: a snapshot saved there would be thrown away.
            image_id: String::new(),
            no_snapshot: true,
            // The build's extra CAs are build steps (`build_ca`), put back before packing.
            ca_certs: Vec::new(),
        },
    )
    .context("the builder VM did not boot")?;
    // Stop the builder whatever happens below.
    struct StopOnDrop<'a>(&'a PenHome);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            let _ = client::stop(self.0, "builder", true);
            VmPaths::new(self.0, "builder").remove_runtime();
        }
    }
    let _stop = StopOnDrop(&builder_home);

    let mut step_env = vec![("DEBIAN_FRONTEND".to_string(), "noninteractive".to_string())];
    let mut steps: Vec<(&str, Vec<String>)> = Vec::new();
    if let Some(extra) = extra_ca {
        let line = format!(
            "pen: trusting {} extra CA certificate(s) from {} ({}) during this build only",
            extra.certs.certs.len(),
            extra.certs.source.display(),
            extra.setting
        );
        progress.println(&line);
        writeln!(log, "{line}")?;
        steps.push(("install extra CA certificates", extra.install_command()));
        step_env.extend(ExtraCaCerts::build_env());
    }
    steps.push(("apt-get update", argv(&["apt-get", "update"])));
    if !profile.profile.packages.is_empty() {
        let mut install = argv(&["apt-get", "install", "-y", "--no-install-recommends"]);
        install.extend(profile.profile.packages.iter().cloned());
        steps.push(("install packages", install));
    }
    if let Some(script) = &profile.profile.build {
        // The script is one argv element: never pasted into a shell string.
        steps.push((
            "build script",
            vec!["bash".into(), "-e".into(), "-c".into(), script.clone()],
        ));
    }
    steps.push((
        "clean apt caches",
        argv(&[
            "sh",
            "-c",
            "apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin",
        ]),
    ));
    if extra_ca.is_some() {
        // The image must not trust them: it would differ from one built without them.
        steps.push((
            "remove extra CA certificates",
            ExtraCaCerts::remove_command(),
        ));
    }
    for (step, command) in steps {
        progress.println(&format!("pen: [{}] {step}", profile.name));
        writeln!(log, "pen: step {step}: {command:?}")?;
        let mut out = LogSink {
            log: &mut log.clone(),
            progress,
            echo: false,
        };
        let mut err = LogSink {
            log: &mut log.clone(),
            progress,
            echo: false,
        };
        let step_started = std::time::Instant::now();
        let status = client::run_captured(
            &builder_home,
            "builder",
            command,
            step_env.clone(),
            &mut out,
            &mut err,
        )?;
        writeln!(
            log,
            "pen: step {step} ended with status {} after {:.1}s",
            status.code(),
            step_started.elapsed().as_secs_f64()
        )?;
        if status.code() != 0 {
            keep_log(&log_tmp, &dir);
            let tail = pen_core::fsutil::tail_lines(&dir.join("build.log"), 15);
            let mut hint = build_ca::hint_for_log(&tail)
                .map(|h| format!("\nhint: {h}"))
                .unwrap_or_default();
            hint.push_str(&network_refusals_hint(&vm_paths, profile));
            bail!(
                "profile {}: step `{step}` failed with exit status {}{}; last lines of {}:\n{tail}{hint}",
                profile.name,
                status.code(),
                full_disk_note(&dir, free_bytes(&dir)),
                dir.join("build.log").display(),
            );
        }
    }

    progress.println(&format!("pen: [{}] packing the image", profile.name));
    let sqfs_tmp = scratch.path().join("rootfs.sqfs");
    let pack_started = std::time::Instant::now();
    if let Err(e) = pack_guest_root(&builder_home, &sqfs_tmp, &mut log, progress) {
        // The partial image goes first: on a full disk, keeping the log needs its room.
        let _ = std::fs::remove_file(&sqfs_tmp);
        let _ = writeln!(log, "pen: step packing the image failed: {e:#}");
        keep_log(&log_tmp, &dir);
        return Err(e.context(format!(
            "profile {}: step `packing the image` failed",
            profile.name
        )));
    }
    writeln!(
        log,
        "pen: packed the image in {:.1}s",
        pack_started.elapsed().as_secs_f64()
    )?;
    drop(_stop);

    File::open(&sqfs_tmp)?.sync_all()?;
    let rootfs = rootfs_path(home, &profile.name);
    std::fs::rename(&sqfs_tmp, &rootfs).with_context(|| format!("moving {}", rootfs.display()))?;
    sync_dir(&dir);
    let manifest = ProfileImageManifest {
        profile: profile.name.clone(),
        cache_key: key.clone(),
        base_root_id: base.manifest.root_id(),
        rootfs: FileIdentity::of(&rootfs)?,
        packages: profile.profile.packages.clone(),
        created_at: now_secs(),
    };
    write_atomic(
        &dir.join("image.json"),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    keep_log(&log_tmp, &dir);
    write_atomic(&dir.join("build.hash"), format!("{key}\n").as_bytes())?;
    Ok(rootfs)
}

/// Removes the scratch directories (`.build-*`) of builds that died without cleaning up (a
/// `pen` killed with SIGKILL, a power loss), first ending a builder VM still running in one
/// (a pen older than builders that die with it left them). Called under the profile's build
/// lock: no live build owns one.
fn sweep_dead_builds(dir: &Path) {
    pen_core::fsutil::sweep_temporaries(dir);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let dead = entry.file_name().to_string_lossy().starts_with(".build-")
            && entry.file_type().is_ok_and(|t| t.is_dir());
        if dead {
            discard_scratch(&entry.path());
        }
    }
}

/// Ends the builder VM of the scratch directory `scratch` (a private PEN_HOME) and removes
/// its runtime directory and the scratch itself.
fn discard_scratch(scratch: &Path) {
    client::kill_now(&PenHome::at(scratch), "builder");
    if let Err(e) = pen_core::fsutil::remove_tree(scratch) {
        eprintln!("pen: removing {}: {e}", scratch.display());
    }
}

/// The builder VM's network: the profile's `[network]` (checked here, naming the profile
/// file), else `public`: a build reaches the internet, not the LAN of the machine it runs
/// on.
fn profile_network(profile: &LoadedProfile) -> anyhow::Result<pen_core::vm::NetworkSettings> {
    Ok(
        pen_vm::net::profile_settings(&profile.profile, &profile.path)
            .map_err(pen_core::UsageError::new)?,
    )
}

/// What the builder's network refused (its supervisor.log), as a hint for a failed step:
/// a build that fetches from a name the profile does not allow fails there.
fn network_refusals_hint(vm_paths: &VmPaths, profile: &LoadedProfile) -> String {
    let log = std::fs::read_to_string(vm_paths.supervisor_log()).unwrap_or_default();
    let refused: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix(pen_vm::supervisor::REFUSAL_PREFIX))
        .collect();
    if refused.is_empty() {
        return String::new();
    }
    let mut hint = format!(
        "\nhint: the build's network refused (profile {}'s [network] decides; without one it is public: the internet, not the LAN):",
        profile.name
    );
    for line in refused.iter().take(10) {
        hint.push_str(&format!("\n  refused {line}"));
    }
    if refused.len() > 10 {
        hint.push_str(&format!("\n  ... and {} more", refused.len() - 10));
    }
    hint
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// Copies the build's log (and its rotation, when it outgrew the cap) beside the image.
fn keep_log(log_tmp: &Path, dir: &Path) {
    let kept = dir.join("build.log");
    let _ = std::fs::copy(log_tmp, &kept);
    let _ = std::fs::remove_file(rotated(&kept));
    if rotated(log_tmp).exists() {
        let _ = std::fs::copy(rotated(log_tmp), rotated(&kept));
    }
}

/// Streams the builder's merged root as tar (over the control channel) into tar2sqfs.
fn pack_guest_root(
    builder_home: &PenHome,
    out: &Path,
    log: &mut CappedLog,
    progress: &Progress,
) -> anyhow::Result<()> {
    let (packer, input) = Packer::start(out)?;
    let dir = out.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut stdin = FreeWatch {
        inner: input,
        dir: dir.clone(),
        unchecked: 0,
        min_free: None,
    };
    let mut err = LogSink {
        log,
        progress,
        echo: false,
    };
    // --one-file-system leaves out /proc, /sys, /dev, /run and /tmp (their mount points stay).
    let tar = argv(&[
        "tar",
        "--numeric-owner",
        "--one-file-system",
        "-C",
        "/",
        "-cf",
        "-",
        ".",
    ]);
    let streamed = client::run_captured(
        builder_home,
        "builder",
        tar,
        Vec::new(),
        &mut stdin,
        &mut err,
    );
    let min_free = stdin.min_free;
    drop(stdin);
    // The packer's failure comes first: when it dies, the stream only sees a broken pipe.
    if let Err(why) = packer.finish()? {
        // tar2sqfs reports ENOSPC as a bare "I/O error": say what it is.
        bail!("{why}{}", full_disk_note(&dir, min_free));
    }
    let status = streamed.context("streaming the builder's root")?;
    if status.code() != 0 {
        bail!(
            "tar in the builder VM failed with exit status {}",
            status.code()
        );
    }
    Ok(())
}

/// Less free space than this, seen while packing or when a step failed, means the failure is
/// a full disk: writes come in blocks of at most a few MB, so one refused for room leaves
/// less than that.
const FULL_DISK_BYTES: u64 = 16 << 20;

/// "; no space left on the disk holding DIR (N free)" when `free` says that disk is (nearly)
/// full, else "". Added to a failed step's message: a full host disk shows in the builder as an
/// I/O error (the scratch disk is a file there) and in tar2sqfs as a bare "I/O error".
fn full_disk_note(dir: &Path, free: Option<u64>) -> String {
    match free {
        Some(free) if free < FULL_DISK_BYTES => format!(
            "; no space left on the disk holding {} ({} free)",
            dir.display(),
            pen_core::size::human(free)
        ),
        _ => String::new(),
    }
}

/// Bytes still writable on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(st.blocks_available() * st.fragment_size())
}

/// The tar stream on its way to tar2sqfs, noting the least free space seen on the image's
/// disk meanwhile: tar2sqfs deletes its output when a write fails, so once it has failed the
/// disk no longer looks full.
struct FreeWatch<W> {
    inner: W,
    dir: PathBuf,
    /// Bytes passed on since the last look (one statvfs per few MB of tar).
    unchecked: usize,
    min_free: Option<u64>,
}

impl<W: Write> Write for FreeWatch<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.unchecked += n;
        if self.unchecked >= 4 << 20 {
            self.unchecked = 0;
            if let Some(free) = free_bytes(&self.dir) {
                self.min_free = Some(self.min_free.map_or(free, |m| m.min(free)));
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
