//! `pen volume create|list|rm` and the `--volume` flag. Input is checked completely before
//! anything is written; packing is pen-build's, the rules pen-core's.

use std::path::Path;

use pen_build::volume::{self as pack, Source};
use pen_core::paths::{PenHome, VmPaths};
use pen_core::vm::{self, Status, VmConfig, VmLock};
use pen_core::volume::{self, VolumeMount};
use pen_core::{names, size, usage, UsageError};

use crate::cli::VolumeCommand;

/// `--volume` values: `None` when none was given, `Some([])` for `--volume none`.
pub fn parse_flags(values: &[String]) -> Result<Option<Vec<VolumeMount>>, UsageError> {
    if values.is_empty() {
        return Ok(None);
    }
    if values.iter().any(|v| v == "none") {
        if values.len() > 1 {
            return Err(UsageError::new(
                "--volume none clears the VM's volumes and goes alone; drop it or the other --volume flags",
            ));
        }
        return Ok(Some(Vec::new()));
    }
    let mounts = values
        .iter()
        .map(|v| volume::parse_spec("--volume", v))
        .collect::<Result<Vec<_>, _>>()?;
    volume::check_mounts(&mounts)?;
    Ok(Some(mounts))
}

/// The VMs whose `vm.json` names volume `name`, with their status, sorted by VM name.
fn users(home: &PenHome, name: &str) -> Vec<(String, Status)> {
    let Ok(vms) = vm::list_names(home) else {
        return Vec::new();
    };
    vms.into_iter()
        .filter_map(|vm_name| {
            let paths = VmPaths::new(home, &vm_name);
            let config = VmConfig::load(&paths).ok().flatten()?;
            config
                .volumes
                .iter()
                .any(|v| v.name == name)
                .then(|| (vm_name, vm::status(&paths).0))
        })
        .collect()
}

pub fn run(home: &PenHome, command: VolumeCommand) -> anyhow::Result<i32> {
    match command {
        VolumeCommand::Create {
            name,
            from,
            from_tar,
        } => create(home, &name, from.as_deref(), from_tar.as_deref()),
        VolumeCommand::List { json } => list(home, json),
        VolumeCommand::Rm { name, force } => rm(home, &name, force),
    }
}

fn create(
    home: &PenHome,
    name: &str,
    from: Option<&Path>,
    from_tar: Option<&Path>,
) -> anyhow::Result<i32> {
    names::validate("volume", name)?;
    let (source, tree) = match (from, from_tar) {
        (Some(dir), _) => {
            let tree = pack::check_dir(dir)?;
            (Source::Dir(dir.to_path_buf()), Some(tree))
        }
        (None, Some(file)) if file == Path::new("-") => (Source::Stdin, None),
        (None, Some(file)) => {
            pack::check_tar_file(file)?;
            (Source::TarFile(file.to_path_buf()), None)
        }
        (None, None) => return usage!("give --from DIR or --from-tar FILE (- for stdin)"),
    };
    let replaced = home.volume_file(name).exists();
    let info = pack::create(home, name, &source, tree)?;
    let users: Vec<String> = users(home, name)
        .into_iter()
        .filter(|(_, status)| *status == Status::Running)
        .map(|(vm, _)| vm)
        .collect();
    println!(
        "volume {name} {}: {}, {} files",
        if replaced { "replaced" } else { "created" },
        size::human(info.size),
        info.files
            .map(|f| f.to_string())
            .unwrap_or_else(|| "?".into())
    );
    if !users.is_empty() {
        eprintln!(
            "pen: running VM(s) {} keep the previous version of {name} until they stop",
            users.join(", ")
        );
    }
    Ok(0)
}

fn list(home: &PenHome, json: bool) -> anyhow::Result<i32> {
    let rows: Vec<_> = volume::list(home)
        .into_iter()
        .map(|info| {
            let users = users(home, &info.name);
            (info, users)
        })
        .collect();
    if json {
        let items: Vec<_> = rows
            .iter()
            .map(|(info, users)| {
                serde_json::json!({
                    "name": info.name, "path": info.path, "size": info.size,
                    "files": info.files, "created_at": info.created_at,
                    "used_by": users.iter().map(|(vm, status)| serde_json::json!({
                        "vm": vm, "status": status,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(0);
    }
    println!(
        "{:<24} {:>8} {:>8} {:>7}  USED-BY",
        "NAME", "SIZE", "FILES", "CREATED"
    );
    for (info, users) in rows {
        let used_by: Vec<String> = users
            .iter()
            .map(|(vm, status)| match status {
                Status::Running => format!("{vm} (running)"),
                Status::Stopped => vm.clone(),
            })
            .collect();
        println!(
            "{:<24} {:>8} {:>8} {:>7}  {}",
            info.name,
            size::human(info.size),
            info.files
                .map(|f| f.to_string())
                .unwrap_or_else(|| "?".into()),
            vm::age(info.created_at),
            if used_by.is_empty() {
                "-".to_string()
            } else {
                used_by.join(", ")
            }
        );
    }
    Ok(0)
}

fn rm(home: &PenHome, name: &str, force: bool) -> anyhow::Result<i32> {
    names::validate("volume", name)?;
    volume::check_exists(home, name, "pen volume rm")?;
    let users = users(home, name);
    // Each VM that names the volume is locked (the lock its supervisor takes) until the
    // volume is gone: none can start in between and open the file, and a running one, which
    // holds its lock, is found for certain.
    let mut locked = Vec::new();
    let mut running = Vec::new();
    for (vm, _) in &users {
        let paths = VmPaths::new(home, vm);
        match VmLock::try_acquire(&paths)? {
            Some(lock) => locked.push((vm.as_str(), paths, lock)),
            None => running.push(vm.as_str()),
        }
    }
    if !running.is_empty() {
        return usage!(
            "volume {name} is in use by running VM(s) {}; stop them first (`pen stop {}`)",
            running.join(", "),
            running[0]
        );
    }
    if !locked.is_empty() && !force {
        let configured: Vec<&str> = locked.iter().map(|(vm, _, _)| *vm).collect();
        return usage!(
            "volume {name} is used by VM(s) {}; start them with other --volume flags (or --volume none) first, or use `pen volume rm {name} --force` to take it from them",
            configured.join(", ")
        );
    }
    // --force: the VMs forget the volume first, so that whatever happens next none of them
    // names a volume that is gone (a start would fail on it); a pen killed in between leaves
    // the volume unused, for the next `pen volume rm` to remove.
    let mut detached = Vec::new();
    for (vm, paths, _lock) in &locked {
        let Some(mut config) = VmConfig::load(paths)? else {
            continue;
        };
        let was: Vec<String> = config
            .volumes
            .iter()
            .filter(|v| v.name == name)
            .map(|v| v.path.clone())
            .collect();
        if was.is_empty() {
            continue;
        }
        config.volumes.retain(|v| v.name != name);
        config.save(paths)?;
        detached.push(format!("{vm} ({})", was.join(", ")));
    }
    let path = home.volume_file(name);
    std::fs::remove_file(&path).map_err(|e| anyhow::anyhow!("removing {}: {e}", path.display()))?;
    pen_core::fsutil::sync_dir(&home.volumes());
    drop(locked);
    eprintln!("pen: removed volume {name}");
    if !detached.is_empty() {
        eprintln!(
            "pen: VM(s) {} no longer mount volume {name}; `pen volume create {name}` and `--volume {name}:PATH` at a start bring it back",
            detached.join(", ")
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_flags() {
        assert_eq!(parse_flags(&[]).unwrap(), None);
        assert_eq!(parse_flags(&["none".into()]).unwrap(), Some(Vec::new()));
        assert!(parse_flags(&["none".into(), "a:/a".into()]).is_err());
        let two = parse_flags(&["a:/opt/a".into(), "b:/opt/b".into()])
            .unwrap()
            .unwrap();
        assert_eq!(two.len(), 2);
        let err = parse_flags(&["a:/opt/a".into(), "b:/opt/a/".into()]).unwrap_err();
        assert!(err.0.contains("two volumes on one path"), "{err}");
        let err = parse_flags(&["a:/proc".into()]).unwrap_err();
        assert!(err.0.contains("\"a:/proc\""), "{err}");
    }
}
