//! `--ca-certs`, `PEN_CA_CERTS` and a profile's `ca_certs`: the extra CA certificates a VM
//! trusts (see [`pen_core::ca_certs`]). The VM records the path; the certificates are read
//! from the host at each start and travel to the guest with its configuration, so a changed
//! or renewed proxy CA is picked up by the next start and nothing holds a copy.

use std::path::{Path, PathBuf};

use pen_core::ca_certs::{self, CaCerts};
use pen_core::profile::LoadedProfile;
use pen_core::vm::VmConfig;
use pen_core::UsageError;

/// `--ca-certs` given: `Some(None)` for `none`, else the absolute path, its certificates
/// checked (a missing path, no certificate or a private key is a usage error).
pub fn parse_flag(value: Option<&str>) -> Result<Option<Option<PathBuf>>, UsageError> {
    let Some(value) = value else {
        return Ok(None);
    };
    if value == "none" {
        return Ok(Some(None));
    }
    let label = format!("--ca-certs {value}");
    CaCerts::load(Path::new(value), &label)?;
    let absolute = std::fs::canonicalize(value)
        .map_err(|e| UsageError::new(format!("{label}: {e}; give an existing path")))?;
    Ok(Some(Some(absolute)))
}

/// A profile's `ca_certs` for a VM made from it, checked.
pub fn from_profile(loaded: &LoadedProfile) -> Result<Option<PathBuf>, UsageError> {
    let label = format!("profile {}'s ca_certs", loaded.name);
    let Some(path) = loaded.profile.ca_certs_path(&label)? else {
        return Ok(None);
    };
    CaCerts::load(&path, &format!("{label} {}", path.display()))?;
    Ok(Some(path))
}

/// The certificates for this start of `vm`: its recorded path, else `PEN_CA_CERTS`, else
/// none. A recorded path that no longer holds certificates is a usage error that says how
/// to stop using it.
pub fn for_start(vm: &VmConfig) -> Result<Vec<String>, UsageError> {
    let loaded = match &vm.ca_certs {
        Some(path) => Some(
            CaCerts::load(
                path,
                &format!("VM {}'s --ca-certs {}", vm.name, path.display()),
            )
            .map_err(|e| {
                UsageError::new(format!(
                    "{e}; or start it with --ca-certs none to stop trusting them"
                ))
            })?,
        ),
        None => CaCerts::from_env(ca_certs::ENV)?,
    };
    Ok(loaded.map(|c| c.certs).unwrap_or_default())
}
