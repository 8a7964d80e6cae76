//! The network flags (`--network`, `--allow-host`, `--publish`), a profile's `[network]`,
//! and `pen logs --network`. Values are checked by pen-net's parsers (through
//! `pen_vm::net`) before anything is created; vm.json records them as given.

use std::io::Write;

use pen_core::paths::{PenHome, VmPaths};
use pen_core::profile::LoadedProfile;
use pen_core::vm::NetworkSettings;
use pen_core::UsageError;

use crate::cli::CreateArgs;

type Flags = (
    Option<(String, Vec<String>)>,
    Option<Vec<String>>,
    Option<Vec<String>>,
);

/// The network flags, checked: (mode and domains, allow-hosts, publishes), each `None`
/// when not given. A single `none` clears a list.
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
    let publish = match &args.publish {
        v if v.is_empty() => None,
        v if cleared(v) => Some(Vec::new()),
        v => Some(pen_vm::net::parse_publishes(v).map_err(UsageError::new)?),
    };
    Ok((mode, allow_hosts, publish))
}

/// A profile's `[network]` as a `--network` value for a VM created from it (checked).
pub fn profile_mode(loaded: &LoadedProfile) -> Result<Option<(String, Vec<String>)>, UsageError> {
    let Some(section) = &loaded.profile.network else {
        return Ok(None);
    };
    let domains = pen_vm::net::parse_domains(section.allow.iter().map(String::as_str))
        .map_err(|e| UsageError::new(format!("{}: [network] allow: {e}", loaded.path.display())))?;
    Ok(Some((pen_core::vm::NETWORK_ALLOW.to_string(), domains)))
}

/// The network settings for `pen list --json`.
pub fn json(n: &NetworkSettings) -> serde_json::Value {
    serde_json::json!({
        "mode": n.mode, "allow": n.allow, "allow_hosts": n.allow_hosts, "publish": n.publish,
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
