//! One function per subcommand. Input is checked completely before anything is created.

use std::io::{IsTerminal, Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use pen_build::profile as profile_build;
use pen_core::image::profile::{self as profile_image, ImageStatus};
use pen_core::image::BaseImage;
use pen_core::paths::{PenHome, VmPaths};
use pen_core::profile::{self, LoadedProfile};
use pen_core::vm::{self, CreationFlags, Status, VmConfig};
use pen_core::{envspec, names, size, usage, UsageError};
use pen_vm::accel::Accel;
use pen_vm::client::{self, StartOptions};

use crate::catalog;
use crate::cli::{Command, CreateArgs, ImageCommand, ProfileCommand};

/// Overlay disks holding more than this need `--force` (or a yes) to delete.
const DELETE_WARN_BYTES: u64 = 100 << 20;

pub fn run(command: Command) -> anyhow::Result<i32> {
    let home = PenHome::from_env()?;
    match command {
        Command::Shell { name, create } => {
            let vm = prepare(&home, name.as_deref(), &create)?;
            let env = start(&home, &vm, &create, false)?;
            client::shell(&home, &vm.name, env)
        }
        Command::Exec {
            name,
            create,
            tty,
            interactive,
            command,
        } => {
            let vm = prepare(&home, Some(&name), &create)?;
            let env = start(&home, &vm, &create, false)?;
            let stdin = client::forward_stdin(std::io::stdin().is_terminal(), interactive, tty);
            client::exec(&home, &vm.name, command, env, tty, stdin)
        }
        Command::Start { name, create } => {
            let vm = prepare(&home, Some(&name), &create)?;
            start(&home, &vm, &create, true)?;
            eprintln!(
                "pen: VM {} is running; `pen stop {}` stops it",
                vm.name, vm.name
            );
            Ok(0)
        }
        Command::Stop { name, force } => {
            existing_vm(&home, &name)?;
            client::stop(&home, &name, force)?;
            Ok(0)
        }
        Command::List { json } => list(&home, json),
        Command::Delete { name, force } => delete(&home, &name, force),
        Command::Logs {
            name,
            network: true,
            ..
        } => {
            existing_vm(&home, &name)?;
            crate::network::logs(&home, &name)
        }
        Command::Logs { name, follow, .. } => logs(&home, &name, follow),
        Command::Image {
            command: ImageCommand::Build { profile: None, .. },
        } => {
            let image = pen_build::build_base(&home)?;
            println!("base image {} ready", &image.manifest.image_id[..12]);
            Ok(0)
        }
        Command::Image {
            command:
                ImageCommand::Build {
                    profile: Some(name),
                    ..
                },
        } => {
            let loaded = profile::load(&home, &name)?;
            let base = pen_build::ensure_base(&home)?;
            match profile_image::status(&home, &loaded, &base) {
                ImageStatus::Built(m) => {
                    println!(
                        "profile {name}'s image {} is up to date",
                        &m.cache_key[..12]
                    )
                }
                _ => {
                    profile_build::build(&home, &loaded, &base)?;
                    println!("profile {name}'s image is built");
                }
            }
            Ok(0)
        }
        Command::Volume { command } => crate::volumes::run(&home, command),
        Command::Profile {
            command: ProfileCommand::List,
        } => profile_list(&home),
        Command::Profile {
            command: ProfileCommand::Show { name },
        } => profile_show(&home, &name),
        Command::Image {
            command: ImageCommand::List { json },
        } => image_list(&home, json),
        Command::Image {
            command: ImageCommand::Prune,
        } => {
            let pruned = pen_vm::snapshot::prune(&home);
            for p in &pruned {
                println!(
                    "removed snapshot {} ({}): {}",
                    pen_vm::snapshot::short_key(&p.key),
                    size::human(p.size),
                    p.reason
                );
            }
            let total: u64 = pruned.iter().map(|p| p.size).sum();
            println!(
                "{} stale snapshot(s), {} freed",
                pruned.len(),
                size::human(total)
            );
            Ok(0)
        }
        Command::Version => {
            println!(
                "pen {} (protocol {}, pen-init {})",
                pen_core::VERSION,
                pen_proto::PROTOCOL_VERSION,
                &pen_build::pen_init_sha256()[..12]
            );
            Ok(0)
        }
        Command::Doctor => Ok(if crate::doctor::run(&home) { 0 } else { 1 }),
        Command::Completions { shell } => {
            let mut cmd = <crate::cli::Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "pen", &mut std::io::stdout());
            Ok(0)
        }
        Command::Supervise { name } => {
            pen_vm::supervisor::main(&home, &name)?;
            Ok(0)
        }
    }
}

/// Validates the name and every flag, then loads or creates the VM's vm.json.
fn prepare(home: &PenHome, name: Option<&str>, args: &CreateArgs) -> anyhow::Result<VmConfig> {
    let dir = match &args.dir {
        Some(dir) => Some(check_dir(dir)?),
        None => None,
    };
    let name = match name {
        Some(name) => name.to_string(),
        None => {
            let here = match &dir {
                Some(dir) => dir.clone(),
                None => std::env::current_dir().context("reading the current directory")?,
            };
            names::from_dir(&here)?
        }
    };
    names::validate("VM", &name)?;
    let mut flags = parse_flags(args, dir)?;
    let loaded = match &args.profile {
        Some(profile) => Some(profile::load(home, profile)?),
        None => None,
    };
    // Checked here too, so a bad --env never gets as far as creating the VM.
    resolve_env(args)?;
    // --accel, then PEN_ACCEL: a bad value is refused before anything is built or written.
    pen_vm::accel::choose(parse_accel(args)?)?;

    let paths = VmPaths::new(home, &name);
    // Before anything is written: a runtime directory someone else controls stops here.
    paths.check_runtime()?;
    let existing = VmConfig::load(&paths)?;
    let running = vm::status(&paths).0 == Status::Running;
    if !running {
        // Before vm.json is written: a host that cannot run the VM leaves nothing behind.
        pen_vm::qemu::binary()?;
        pen_vm::virtiofsd::check()?;
    }
    let default_dir = check_dir(Path::new("."))?;
    if let Some(loaded) = &loaded {
        match &existing {
            // The profile's [disk] and [vm] are defaults for a new VM; flags win.
            None => {
                let p = &loaded.profile;
                flags.profile = Some(loaded.name.clone());
                flags.disk_size = flags.disk_size.or(loaded.disk_size);
                flags.cpus = flags.cpus.or(p.vm.as_ref().and_then(|v| v.cpus));
                flags.memory_mb = flags.memory_mb.or(p.vm.as_ref().and_then(|v| v.memory));
                crate::network::apply_profile(loaded, &mut flags)?;
                if flags.volumes.is_none() && !p.volumes.is_empty() {
                    flags.volumes = Some(p.volume_mounts());
                }
                if flags.ca_certs.is_none() {
                    flags.ca_certs = crate::ca_certs::from_profile(loaded)?.map(Some);
                }
            }
            Some(vm) if vm.profile.as_deref() != Some(loaded.name.as_str()) => eprintln!(
                "pen: --profile {} ignored: VM {name} was created {}; delete it to change its profile",
                loaded.name,
                match &vm.profile {
                    Some(p) => format!("with profile {p}"),
                    None => "without a profile".to_string(),
                }
            ),
            Some(_) => {}
        }
    }
    let (mut config, notices) =
        vm::resolve_config(&name, existing.clone(), &flags, running, &default_dir);
    if !running {
        // The certificates this start will send (record or PEN_CA_CERTS) are readable.
        crate::ca_certs::for_start(&config)?;
    }
    if !running {
        // Every volume the VM will mount at this start exists (flags, profile or record).
        let from = if !args.volume.is_empty() {
            "--volume".to_string()
        } else if existing.is_none() && config.profile.is_some() {
            format!(
                "profile {}'s volumes entry",
                config.profile.as_deref().unwrap_or("")
            )
        } else {
            format!("VM {name}'s volume")
        };
        for mount in &config.volumes {
            pen_core::volume::check_exists(home, &mount.name, &format!("{from} {mount}")).map_err(
                |e| {
                    if args.volume.is_empty() && existing.is_some() {
                        UsageError::new(format!(
                            "{e}; or start it with --volume none (or other volumes) to change them"
                        ))
                    } else {
                        e
                    }
                },
            )?;
        }
    }
    check_shareable(
        home,
        &config.dir,
        args.dir.is_some(),
        existing.is_some(),
        &name,
    )?;
    if existing.is_none() {
        config.setup_hash = loaded.as_ref().and_then(|l| l.profile.setup_hash());
    }
    for notice in notices {
        eprintln!("pen: {notice}");
    }
    if !running {
        // Before vm.json is written or a supervisor spawned: a published port in use.
        pen_vm::net::check_publish_ports(&config.network.publish).map_err(anyhow::Error::msg)?;
        // And a host disk too full to boot it (or one its disk and the others' could fill).
        let what = match &existing {
            None => format!("create VM {name}"),
            Some(_) => format!("start VM {name}"),
        };
        pen_core::space::ensure_vm_room(&what, &home.vms(), &name, config.disk_size)?;
    }
    if existing.as_ref() != Some(&config) {
        config.save(&paths)?;
    }
    Ok(config)
}

fn check_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    let meta = std::fs::metadata(dir).map_err(|e| {
        UsageError::new(format!(
            "--dir {}: {}; give an existing directory",
            dir.display(),
            pen_core::fsutil::io_reason(&e, "directory")
        ))
    })?;
    if !meta.is_dir() {
        return usage!(
            "--dir {} is not a directory; give the project directory to share",
            dir.display()
        );
    }
    Ok(dir.canonicalize()?)
}

/// Refuses (usage error) a shared directory the guest must not be able to write: see
/// [`pen_core::paths::share_refusal`]. `from_flag`/`recorded` say where it came from.
fn check_shareable(
    home: &PenHome,
    dir: &Path,
    from_flag: bool,
    recorded: bool,
    name: &str,
) -> anyhow::Result<()> {
    let dir = pen_core::paths::canonical_lenient(dir);
    let pen_home = pen_core::paths::canonical_lenient(home.root());
    let user_home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| pen_core::paths::canonical_lenient(Path::new(&h)));
    let Some(why) = pen_core::paths::share_refusal(&dir, &pen_home, user_home.as_deref()) else {
        return Ok(());
    };
    let what = if from_flag {
        format!("--dir {}", dir.display())
    } else if recorded {
        format!("VM {name}'s shared directory {}", dir.display())
    } else {
        format!("the current directory {}", dir.display())
    };
    usage!(
        "{what} {why}; the VM may write all it is given: cd to a project directory or pass --dir PROJECT (a directory of its own)"
    )
}

fn parse_flags(args: &CreateArgs, dir: Option<PathBuf>) -> anyhow::Result<CreationFlags> {
    let cpus = match &args.cpus {
        Some(text) => match text.parse::<u32>() {
            Ok(n) if (1..=255).contains(&n) => Some(n),
            _ => return usage!("invalid --cpus {text:?}: give a whole number from 1 to 255"),
        },
        None => None,
    };
    let memory_mb = match &args.memory {
        Some(text) => match text.parse::<u32>() {
            Ok(mb) if mb >= vm::MIN_MEMORY_MB => Some(mb),
            Ok(mb) => {
                return usage!(
                    "--memory {mb} is too small: a VM needs at least {} MB",
                    vm::MIN_MEMORY_MB
                )
            }
            Err(_) => {
                return usage!(
                    "invalid --memory {text:?}: give megabytes as a whole number, e.g. 2048"
                )
            }
        },
        None => None,
    };
    let disk_size = match &args.disk_size {
        Some(text) => Some(size::parse_size("--disk-size", text)?),
        None => None,
    };
    if disk_size.is_some_and(|s| s < 64 << 20) {
        return usage!(
            "--disk-size {} is too small: an overlay disk needs at least 64M",
            args.disk_size.as_deref().unwrap_or("")
        );
    }
    let network = crate::network::parse_flags(args)?;
    let volumes = crate::volumes::parse_flags(&args.volume)?;
    Ok(CreationFlags {
        dir,
        cpus,
        memory_mb,
        disk_size,
        profile: None,
        network_mode: network.mode,
        allow_hosts: network.allow_hosts,
        allow_nets: network.allow_nets,
        publish: network.publish,
        volumes,
        ca_certs: crate::ca_certs::parse_flag(args.ca_certs.as_deref())?,
    })
}

fn resolve_env(args: &CreateArgs) -> Result<Vec<(String, String)>, UsageError> {
    envspec::resolve(&args.env, &args.env_from_host, |k| std::env::var(k).ok())
}

fn parse_accel(args: &CreateArgs) -> anyhow::Result<Option<Accel>> {
    match &args.accel {
        Some(text) => match text.parse::<Accel>() {
            Ok(accel) => Ok(Some(accel)),
            Err(_) => usage!("invalid --accel {text:?}: use kvm or tcg"),
        },
        None => Ok(None),
    }
}

/// Starts the VM if it is not running; returns the env for sessions attached by this command.
fn start(
    home: &PenHome,
    vm: &VmConfig,
    args: &CreateArgs,
    keep_running: bool,
) -> anyhow::Result<Vec<(String, String)>> {
    let env = resolve_env(args)?;
    // Read at each start (a running VM has its configuration already).
    let paths = VmPaths::new(home, &vm.name);
    let ca_certs = match vm::status(&paths).0 {
        Status::Running => Vec::new(),
        _ => crate::ca_certs::for_start(vm)?,
    };
    let base = pen_build::ensure_base(home)?;
    let (rootfs, setup_script, image_id) = match &vm.profile {
        None => (base.rootfs.clone(), None, base.manifest.image_id.clone()),
        Some(name) => {
            let loaded = profile::load(home, name).map_err(|e| {
                anyhow::anyhow!(
                    "VM {} uses profile {name}, which cannot be loaded: {e:#}",
                    vm.name
                )
            })?;
            let rootfs = profile_build::ensure(home, &loaded, &base)?;
            note_setup_change(vm, &loaded);
            let image_id = pen_vm::snapshot::profile_image_id(&base.manifest.image_id, &rootfs);
            (rootfs, loaded.profile.setup.clone(), image_id)
        }
    };
    client::ensure_running(
        home,
        vm,
        StartOptions {
            accel: parse_accel(args)?,
            env: env.clone(),
            keep_running,
            kernel: base.kernel,
            initrd: base.initrd,
            rootfs,
            setup_script,
            quiet: false,
            mode: pen_proto::BootMode::Shell,
            image_id,
            no_snapshot: args.no_snapshot,
            ca_certs,
        },
    )?;
    Ok(env)
}

/// Setup runs once per VM: a VM made before its profile's setup changed keeps what its own
/// first boot did. Say so, once per start, so nobody waits for a re-run.
fn note_setup_change(vm: &VmConfig, loaded: &LoadedProfile) {
    if vm.setup_hash != loaded.profile.setup_hash() {
        eprintln!(
            "pen: profile {}'s setup changed since VM {} was created; {} will not re-run it (new VMs get the new setup)",
            loaded.name, vm.name, vm.name
        );
    }
}

fn existing_vm(home: &PenHome, name: &str) -> anyhow::Result<VmConfig> {
    names::validate("VM", name)?;
    match VmConfig::load(&VmPaths::new(home, name))? {
        Some(vm) => Ok(vm),
        None => {
            let known = vm::list_names(home)?;
            let hint = if known.is_empty() {
                "there are no VMs yet; `pen shell NAME` creates one".to_string()
            } else {
                format!("existing VMs: {}", known.join(", "))
            };
            usage!("no VM named {name:?}; {hint}")
        }
    }
}

fn list(home: &PenHome, json: bool) -> anyhow::Result<i32> {
    let mut rows = Vec::new();
    for name in vm::list_names(home)? {
        let paths = VmPaths::new(home, &name);
        let Some(vm) = VmConfig::load(&paths).ok().flatten() else {
            continue;
        };
        let (status, pid) = vm::status(&paths);
        // What the supervisor noticed (the host disk filled up); none once stopped.
        let notes = if status == Status::Running && matches!(paths.check_runtime(), Ok(true)) {
            pen_core::notes::read(&paths.notes()).lines(&name)
        } else {
            Vec::new()
        };
        rows.push((vm, status, pid, notes));
    }
    if json {
        let items: Vec<_> = rows
            .iter()
            .map(|(vm, status, pid, notes)| {
                serde_json::json!({
                    "name": vm.name, "profile": vm.profile, "status": status, "pid": pid,
                    "notes": notes,
                    "cpus": vm.cpus, "memory_mb": vm.memory_mb, "disk_size": vm.disk_size,
                    "dir": vm.dir, "created_at": vm.created_at,
                    "network": crate::network::json(&vm.network),
                    "volumes": vm.volumes,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(0);
    }
    println!(
        "{:<20} {:<12} {:<8} {:>4} {:>7} {:<16} {:<16}  DIR",
        "NAME", "PROFILE", "STATUS", "CPUS", "MEMORY", "NETWORK", "VOLUMES"
    );
    let mut all_notes = Vec::new();
    for (vm, status, _, notes) in rows {
        all_notes.extend(notes);
        let volumes: Vec<&str> = vm.volumes.iter().map(|v| v.name.as_str()).collect();
        println!(
            "{:<20} {:<12} {:<8} {:>4} {:>7} {:<16} {:<16}  {}",
            vm.name,
            vm.profile.as_deref().unwrap_or("-"),
            status,
            vm.cpus,
            format!("{}M", vm.memory_mb),
            vm.network.summary(),
            if volumes.is_empty() {
                "-".to_string()
            } else {
                volumes.join(",")
            },
            vm.dir.display()
        );
    }
    // Below the table, on stderr: the table stays one line per VM for scripts.
    for note in all_notes {
        eprintln!("{note}");
    }
    Ok(0)
}

fn delete(home: &PenHome, name: &str, force: bool) -> anyhow::Result<i32> {
    existing_vm(home, name)?;
    let paths = VmPaths::new(home, name);
    // Its runtime directory is removed below: never through someone else's symlink.
    paths.check_runtime()?;
    if vm::status(&paths).0 == Status::Running {
        if !force {
            return usage!("VM {name} is running; stop it first (`pen stop {name}`) or use `pen delete {name} --force`");
        }
        client::stop(home, name, true)?;
    }
    let used = pen_core::fsutil::disk_usage(&paths.overlay());
    if used > DELETE_WARN_BYTES && !force {
        let question = format!(
            "pen: VM {name}'s overlay disk holds {} of data; delete it? [y/N] ",
            size::human(used)
        );
        if !confirm(&question)? {
            return usage!(
                "not deleted: VM {name}'s overlay disk holds {} of data; use `pen delete {name} --force` to delete it anyway",
                size::human(used)
            );
        }
    }
    // Take the lock so a start racing with us cannot boot a half-deleted VM.
    let lock = vm::VmLock::try_acquire(&paths)?;
    if lock.is_none() {
        anyhow::bail!("VM {name} was started while deleting; stop it and try again");
    }
    std::fs::remove_dir_all(&paths.dir)
        .with_context(|| format!("deleting {}", paths.dir.display()))?;
    let _ = std::fs::remove_dir_all(&paths.runtime);
    eprintln!("pen: deleted VM {name}");
    Ok(0)
}

fn confirm(question: &str) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        return Ok(false);
    }
    eprint!("{question}");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

fn logs(home: &PenHome, name: &str, follow: bool) -> anyhow::Result<i32> {
    existing_vm(home, name)?;
    let path = VmPaths::new(home, name).console_log();
    let mut out = std::io::stdout().lock();
    let mut file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !follow => {
            eprintln!("pen: VM {name} has not booted yet; no console log");
            return Ok(0);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => loop {
            std::thread::sleep(std::time::Duration::from_millis(200));
            if let Ok(file) = std::fs::File::open(&path) {
                break file;
            }
        },
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            continue;
        }
        if !follow {
            return Ok(0);
        }
        out.flush()?;
        std::thread::sleep(std::time::Duration::from_millis(200));
        // A full log is rotated to console.log.1, and each start of the VM begins a new
        // one: what we read is drained, go on with the new file.
        use std::os::unix::fs::MetadataExt;
        let now = std::fs::metadata(&path).ok();
        let replaced = now
            .as_ref()
            .is_some_and(|m| m.ino() != file.metadata().map(|f| f.ino()).unwrap_or(0));
        let shrunk = now.is_some_and(|m| m.len() < file.stream_position().unwrap_or(0));
        if replaced || shrunk {
            if let Ok(new) = std::fs::File::open(&path) {
                // What the old file got since our last read (it is console.log.1 now).
                if replaced {
                    std::io::copy(&mut file, &mut out)?;
                }
                file = new;
            }
        }
    }
}

fn image_list(home: &PenHome, json: bool) -> anyhow::Result<i32> {
    let rows = catalog::list(home);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    println!(
        "{:<16} {:<46} {:>8} {:>6}  STATUS",
        "IMAGE", "KIND", "SIZE", "AGE"
    );
    for row in rows {
        println!(
            "{:<16} {:<46} {:>8} {:>6}  {}",
            row.name,
            row.kind,
            if row.size > 0 {
                size::human(row.size)
            } else {
                "-".into()
            },
            row.created_at.map(vm::age).unwrap_or_else(|| "-".into()),
            row.status
        );
    }
    Ok(0)
}

fn profile_status_text(home: &PenHome, loaded: &LoadedProfile) -> String {
    match BaseImage::load(home) {
        None => "missing (base image not built)".to_string(),
        Some(base) => {
            let key = profile_image::cache_key(loaded, &base);
            match profile_image::status(home, loaded, &base) {
                ImageStatus::Built(_) => format!("built {}", &key[..12]),
                ImageStatus::Stale(m) => {
                    format!("stale (built {}, now {})", &m.cache_key[..12], &key[..12])
                }
                ImageStatus::Missing { damaged: true } => {
                    format!("damaged (will build {})", &key[..12])
                }
                ImageStatus::Missing { damaged: false } => {
                    format!("missing (will build {})", &key[..12])
                }
            }
        }
    }
}

fn profile_list(home: &PenHome) -> anyhow::Result<i32> {
    let names = profile::list_names(home);
    if names.is_empty() {
        eprintln!(
            "pen: no profiles yet; create {}",
            home.profile_file("NAME").display()
        );
        return Ok(0);
    }
    println!(
        "{:<16} {:<40} {:<6} IMAGE-STATUS",
        "NAME", "PACKAGES", "SETUP"
    );
    for name in names {
        match profile::load(home, &name) {
            Ok(loaded) => {
                let mut packages = loaded.profile.packages.join(",");
                if packages.len() > 40 {
                    packages.truncate(37);
                    packages.push_str("...");
                }
                println!(
                    "{:<16} {:<40} {:<6} {}",
                    name,
                    if packages.is_empty() {
                        "-".to_string()
                    } else {
                        packages
                    },
                    if loaded.profile.setup.is_some() {
                        "yes"
                    } else {
                        "no"
                    },
                    profile_status_text(home, &loaded)
                );
            }
            Err(e) => println!("{name:<16} invalid: {e:#}"),
        }
    }
    Ok(0)
}

fn profile_show(home: &PenHome, name: &str) -> anyhow::Result<i32> {
    let loaded = profile::load(home, name)?;
    let p = &loaded.profile;
    println!("profile:  {name} ({})", loaded.path.display());
    println!(
        "packages: {}",
        if p.packages.is_empty() {
            "-".to_string()
        } else {
            p.packages.join(" ")
        }
    );
    for (label, script) in [("build", &p.build), ("setup", &p.setup)] {
        match script {
            Some(script) => {
                println!("{label}:");
                for line in script.lines() {
                    println!("    {line}");
                }
            }
            None => println!("{label}:    -"),
        }
    }
    if let Some(size) = loaded.disk_size {
        println!("disk:     {}", size::human(size));
    }
    if let Some(vm) = &p.vm {
        println!(
            "vm:       cpus {}, memory {}",
            vm.cpus.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            vm.memory
                .map(|m| format!("{m}M"))
                .unwrap_or_else(|| "-".into())
        );
    }
    println!("image:    {}", profile_status_text(home, &loaded));
    let users: Vec<String> = vm::list_names(home)?
        .into_iter()
        .filter(|n| {
            VmConfig::load(&VmPaths::new(home, n))
                .ok()
                .flatten()
                .is_some_and(|vm| vm.profile.as_deref() == Some(name))
        })
        .collect();
    println!(
        "vms:      {}",
        if users.is_empty() {
            "-".to_string()
        } else {
            users.join(", ")
        }
    );
    Ok(0)
}
