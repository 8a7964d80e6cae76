//! The network flags (`--network`, `--allow-host`, `--allow-net`, `--publish`), a
//! profile's `[network]`, and `pen logs --network`. Values are checked by pen-net's parsers (through
//! `pen_vm::net`) before anything is created; vm.json records them as given.

use std::io::Write;

use pen_core::paths::{PenHome, VmPaths};
use pen_core::profile::LoadedProfile;
use pen_core::vm::{CreationFlags, NetworkSettings};
use pen_core::UsageError;

use crate::cli::CreateArgs;

/// The network flags, checked, each `None` when not given.
pub struct Flags {
    pub mode: Option<(String, Vec<String>)>,
    pub allow_hosts: Option<Vec<String>>,
    pub allow_nets: Option<Vec<String>>,
    pub publish: Option<Vec<String>>,
}

/// The network flags, checked. A single `none` clears a list.
pub fn parse_flags(args: &CreateArgs) -> Result<Flags, UsageError> {
    let mode = match &args.network {
        Some(value) => Some(pen_vm::net::parse_mode(value).map_err(UsageError::new)?),
        None => None,
    };
    let cleared = |values: &[String]| values.len() == 1 && values[0] == "none";
    let allow_hosts = match &args.allow_host {
        v if v.is_empty() => None,
        v if cleared(v) => Some(Vec::new()),
        v => Some(pen_vm::net::parse_allow_hosts(v).map_err(UsageError::new)?),
    };
    let allow_nets = match &args.allow_net {
        v if v.is_empty() => None,
        v if cleared(v) => Some(Vec::new()),
        v => Some(
            pen_vm::net::parse_allow_nets(v.iter().map(String::as_str)).map_err(UsageError::new)?,
        ),
    };
    let publish = match &args.publish {
        v if v.is_empty() => None,
        v if cleared(v) => Some(Vec::new()),
        v => Some(pen_vm::net::parse_publishes(v).map_err(UsageError::new)?),
    };
    Ok(Flags {
        mode,
        allow_hosts,
        allow_nets,
        publish,
    })
}

/// A profile's `[network]` as defaults for a VM created from it (checked): its mode and
/// its `allow_net` ranges, where the flags give none.
pub fn apply_profile(loaded: &LoadedProfile, flags: &mut CreationFlags) -> Result<(), UsageError> {
    if loaded.profile.network.is_none() {
        return Ok(());
    }
    let settings =
        pen_vm::net::profile_settings(&loaded.profile, &loaded.path).map_err(UsageError::new)?;
    if flags.network_mode.is_none() {
        flags.network_mode = Some((settings.mode, settings.allow));
    }
    if flags.allow_nets.is_none() && !settings.allow_nets.is_empty() {
        flags.allow_nets = Some(settings.allow_nets);
    }
    Ok(())
}

/// The network settings for `pen list --json`: `mode_chosen` is false where the mode is
/// pen's default.
pub fn json(n: &NetworkSettings) -> serde_json::Value {
    serde_json::json!({
        "mode": n.mode, "mode_chosen": n.mode_chosen, "allow": n.allow,
        "allow_hosts": n.allow_hosts, "allow_nets": n.allow_nets, "publish": n.publish,
    })
}

/// `pen logs --network NAME`: the refusal lines of the VM's supervisor log (the rotated
/// `supervisor.log.1` first, when there is one), without the supervisor's prefix.
pub fn logs(home: &PenHome, name: &str) -> anyhow::Result<i32> {
    let log = VmPaths::new(home, name).supervisor_log();
    let mut rotated = log.clone().into_os_string();
    rotated.push(".1");
    let mut out = std::io::stdout().lock();
    let mut found = false;
    for path in [std::path::PathBuf::from(rotated), log] {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        for line in String::from_utf8_lossy(&bytes).lines() {
            if let Some(rest) = line.strip_prefix(pen_vm::supervisor::REFUSAL_PREFIX) {
                writeln!(out, "refused {rest}")?;
                found = true;
            }
        }
    }
    if !found {
        eprintln!("pen: VM {name}'s network has refused nothing since it last started");
    }
    Ok(0)
}
