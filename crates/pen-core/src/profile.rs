//! Profiles (`profiles/<name>.toml`): Debian packages and a build script baked into an
//! immutable image, a setup script run once per new VM, and VM defaults.
//!
//! Only `packages` and `build` (with the base image and the builder version) decide the
//! image: that is the cache key. `setup`, `[disk]` and `[vm]` never cause a rebuild.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::paths::PenHome;
use crate::{names, size, UsageError};

/// Bumped whenever the builder pipeline changes how an image comes out of a profile, so
/// images built by an older pipeline are rebuilt.
pub const BUILDER_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Debian packages baked into the image.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Runs at image build, as root, with network, in a builder VM (`bash -e`).
    #[serde(default)]
    pub build: Option<String>,
    /// Runs once on the first boot of each new VM (`bash -e`).
    #[serde(default)]
    pub setup: Option<String>,
    #[serde(default)]
    pub disk: Option<DiskSection>,
    #[serde(default)]
    pub vm: Option<VmSection>,
    /// The network policy of the builder VM and the default of VMs made from the profile.
    /// Without it both are `public`.
    #[serde(default)]
    pub network: Option<NetworkSection>,
    /// Read-only volumes (`"NAME:/guest/path"`) attached to VMs made from the profile.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Extra CA certificates (an absolute path: a PEM file or a directory of `*.crt`) trusted by VMs made from the profile and by its build, read from the host
    /// at each start: never part of the image or its cache key (see [`crate::ca_certs`]).
    #[serde(default)]
    pub ca_certs: Option<String>,
}

/// `[network]`: `allow = ["deb.debian.org", "*.example.org"]` (only these names resolve,
/// and only the addresses they resolve to are reachable: pen's `--network allow=...`), or
/// `mode = "public" | "open" | "none"`; and `allow_net = ["10.20.0.0/16"]` (`--allow-net`).
/// The domains and ranges are checked by pen-net where the profile is used (pen-core
/// holds only data).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    #[serde(default)]
    pub allow_net: Vec<String>,
}

impl Profile {
    /// The network settings the profile asks for: its `[network]`, else `public` (not
    /// chosen). An error (one line, without the file's name) for a mode pen does not know
    /// or a mode given beside `allow`.
    pub fn network_settings(&self) -> Result<crate::vm::NetworkSettings, String> {
        use crate::vm::{NETWORK_ALLOW, NETWORK_NONE, NETWORK_OPEN, NETWORK_PUBLIC};
        let Some(n) = &self.network else {
            return Ok(crate::vm::NetworkSettings::default());
        };
        let mode = match (n.mode.as_deref(), &n.allow) {
            (Some(mode), Some(_)) => {
                return Err(format!(
                    "[network] has both mode = \"{mode}\" and allow; allow is a mode of its own, give one of them"
                ))
            }
            (None, Some(_)) => NETWORK_ALLOW,
            (None, None) => NETWORK_PUBLIC,
            (Some(mode @ (NETWORK_PUBLIC | NETWORK_OPEN | NETWORK_NONE)), None) => mode,
            (Some(other), None) => {
                return Err(format!(
                    "[network] mode \"{other}\" is not public, open or none (or give allow = [...])"
                ))
            }
        };
        Ok(crate::vm::NetworkSettings {
            mode: mode.to_string(),
            mode_chosen: true,
            allow: n.allow.clone().unwrap_or_default(),
            allow_nets: n.allow_net.clone(),
            ..Default::default()
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    pub size: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmSection {
    pub cpus: Option<u32>,
    /// Megabytes.
    pub memory: Option<u32>,
}

/// A parsed and checked profile with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedProfile {
    pub name: String,
    pub path: PathBuf,
    pub profile: Profile,
    /// Overlay disk size in bytes from `[disk] size`, if given.
    pub disk_size: Option<u64>,
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

/// Parses profile text; errors name `path`, the line and the column.
pub fn parse(path: &Path, text: &str) -> Result<Profile, UsageError> {
    let profile: Profile = toml::from_str(text).map_err(|e| {
        let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        UsageError::new(format!(
            "{}:{line}:{col}: {}",
            path.display(),
            e.message().trim()
        ))
    })?;
    let locate = |needle: &str| -> String {
        match text.find(needle) {
            Some(offset) => {
                let (line, col) = line_col(text, offset);
                format!("{}:{line}:{col}", path.display())
            }
            None => path.display().to_string(),
        }
    };
    for package in &profile.packages {
        if !valid_package_name(package) {
            return Err(UsageError::new(format!(
                "{}: {package:?} is not a Debian package name (lowercase letters, digits, '+', '-', '.'; starting with a letter or digit)",
                locate(&format!("\"{package}\""))
            )));
        }
    }
    if let Some(size) = profile.disk.as_ref().and_then(|d| d.size.as_deref()) {
        size::parse_size("[disk] size", size)
            .map_err(|e| UsageError::new(format!("{}: {e}", locate("size"))))?;
    }
    if let Some(vm) = &profile.vm {
        if vm.cpus.is_some_and(|c| c == 0 || c > 255) {
            return Err(UsageError::new(format!(
                "{}: [vm] cpus must be from 1 to 255",
                locate("cpus")
            )));
        }
        if vm.memory.is_some_and(|m| m < crate::vm::MIN_MEMORY_MB) {
            return Err(UsageError::new(format!(
                "{}: [vm] memory must be at least {} (MB)",
                locate("memory"),
                crate::vm::MIN_MEMORY_MB
            )));
        }
    }
    let mut mounts = Vec::new();
    for spec in &profile.volumes {
        let mount = crate::volume::parse_spec("volumes entry", spec)
            .map_err(|e| UsageError::new(format!("{}: {e}", locate(&format!("\"{spec}\"")))))?;
        mounts.push(mount);
    }
    crate::volume::check_mounts(&mounts)
        .map_err(|e| UsageError::new(format!("{}: {e}", locate("volumes"))))?;
    Ok(profile)
}

impl Profile {
    /// The profile's `volumes`, parsed (they were checked when it was loaded).
    pub fn volume_mounts(&self) -> Vec<crate::volume::VolumeMount> {
        self.volumes
            .iter()
            .filter_map(|s| crate::volume::parse_spec("volumes entry", s).ok())
            .collect()
    }
}

/// Debian policy: `[a-z0-9][a-z0-9+.-]+`. Also keeps apt options (`-o...`) out of argv.
pub fn valid_package_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() >= 2
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.'))
}

/// Loads `profiles/<name>.toml`. A missing profile lists the ones that exist.
pub fn load(home: &PenHome, name: &str) -> anyhow::Result<LoadedProfile> {
    names::validate("profile", name)?;
    let path = home.profile_file(name);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let known = list_names(home);
            let hint = if known.is_empty() {
                format!("there are no profiles yet; create {}", path.display())
            } else {
                format!("existing profiles: {}", known.join(", "))
            };
            return Err(UsageError::new(format!("no profile named {name:?}; {hint}")).into());
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
    };
    let profile = parse(&path, &text)?;
    let disk_size = match profile.disk.as_ref().and_then(|d| d.size.as_deref()) {
        Some(text) => Some(size::parse_size("[disk] size", text)?),
        None => None,
    };
    Ok(LoadedProfile {
        name: name.to_string(),
        path,
        profile,
        disk_size,
    })
}

/// Names of `profiles/*.toml`, sorted.
pub fn list_names(home: &PenHome) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(home.profiles())
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".toml").map(str::to_string)
                })
                .filter(|n| names::validate("profile", n).is_ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

impl Profile {
    /// The image cache key: sha256 over the canonical packages (sorted, deduplicated),
    /// the build script, the identity of the base image's kernel and root (`base_root_id`,
    /// see `BaseManifest::root_id`) and the builder version.
    pub fn cache_key(&self, base_root_id: &str) -> String {
        let mut packages = self.packages.clone();
        packages.sort();
        packages.dedup();
        let canonical = serde_json::json!({
            "packages": packages,
            "build": self.build.as_deref().unwrap_or(""),
            "base": base_root_id,
            "builder": BUILDER_VERSION,
        });
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
    }

    /// The profile's `ca_certs` path, which must be absolute (a profile is used from any
    /// directory); `label` names the setting in errors.
    pub fn ca_certs_path(&self, label: &str) -> Result<Option<PathBuf>, UsageError> {
        match self.ca_certs.as_deref() {
            None | Some("") => Ok(None),
            Some(path) if Path::new(path).is_absolute() => Ok(Some(PathBuf::from(path))),
            Some(path) => Err(UsageError::new(format!(
                "{label} {path:?} is not an absolute path; give the full path of the PEM file or directory"
            ))),
        }
    }

    /// sha256 of the setup script, kept in vm.json to notice later edits.
    pub fn setup_hash(&self) -> Option<String> {
        self.setup
            .as_ref()
            .map(|s| hex::encode(Sha256::digest(s.as_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Profile, UsageError> {
        parse(Path::new("/h/profiles/x.toml"), text)
    }

    #[test]
    fn parses_a_full_profile() {
        let profile = p("packages = [\"jq\", \"git\"]\nbuild = \"echo hi\"\nsetup = \"\"\"\nmkdir -p /root/x\n\"\"\"\n[disk]\nsize = \"20G\"\n[vm]\ncpus = 2\nmemory = 1024\n").unwrap();
        assert_eq!(profile.packages, vec!["jq", "git"]);
        assert_eq!(profile.vm.unwrap().memory, Some(1024));
    }

    #[test]
    fn network_section_is_a_mode_or_an_allow_list_and_unknown_keys_are_errors() {
        let profile = p("[network]\nallow = [\"deb.debian.org\", \"*.example.org\"]\n").unwrap();
        let n = profile.network_settings().unwrap();
        assert_eq!(
            (n.mode.as_str(), n.allow.len(), n.mode_chosen),
            ("allow", 2, true)
        );
        let n = p("").unwrap().network_settings().unwrap();
        assert_eq!((n.mode.as_str(), n.mode_chosen), ("public", false));
        let n = p("[network]\nmode = \"open\"\nallow_net = [\"10.1.0.0/16\"]\n")
            .unwrap()
            .network_settings()
            .unwrap();
        assert_eq!((n.mode.as_str(), n.mode_chosen), ("open", true));
        assert_eq!(n.allow_nets, ["10.1.0.0/16"]);
        let n = p("[network]\nallow_net = [\"10.1.0.0/16\"]\n")
            .unwrap()
            .network_settings()
            .unwrap();
        assert_eq!(n.mode, "public");
        let err = p("[network]\nallow = []\nmode = \"none\"\n")
            .unwrap()
            .network_settings()
            .unwrap_err();
        assert!(err.contains("both mode = \"none\" and allow"), "{err}");
        let err = p("[network]\nmode = \"lan\"\n")
            .unwrap()
            .network_settings()
            .unwrap_err();
        assert!(
            err.contains("mode \"lan\" is not public, open or none"),
            "{err}"
        );
        let err = p("[network]\nallow = []\nallow_nets = []\n").unwrap_err().0;
        assert!(
            err.starts_with("/h/profiles/x.toml:3:1: unknown field `allow_nets`"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_file_line_and_column() {
        let err = p("packages = []\npakages = [\"jq\"]\n").unwrap_err().0;
        assert!(
            err.starts_with("/h/profiles/x.toml:2:1: unknown field `pakages`"),
            "{err}"
        );
        let err = p("packages = \"jq\"\n").unwrap_err().0;
        assert!(
            err.starts_with("/h/profiles/x.toml:1:12: invalid type"),
            "{err}"
        );
        let err = p("[vm]\ncpus = \"two\"\n").unwrap_err().0;
        assert!(err.starts_with("/h/profiles/x.toml:2:8:"), "{err}");
    }

    #[test]
    fn bad_values_are_located() {
        let err = p("packages = [\"jq\", \"-o=APT::x\"]\n").unwrap_err().0;
        assert!(err.starts_with("/h/profiles/x.toml:1:19:"), "{err}");
        assert!(p("[disk]\nsize = \"10Q\"\n")
            .unwrap_err()
            .0
            .contains(":2:1:"));
        assert!(p("[vm]\nmemory = 64\n").is_err());
    }

    #[test]
    fn cache_key_depends_on_packages_build_and_base_only() {
        let a = p("packages = [\"jq\", \"git\"]\nbuild = \"x\"\nsetup = \"one\"\n").unwrap();
        let same = p("packages = [\"git\", \"jq\", \"jq\"]\nbuild = \"x\"\nsetup = \"two\"\nca_certs = \"/etc/proxy-ca\"\n[disk]\nsize = \"5G\"\n").unwrap();
        let other_build = p("packages = [\"jq\", \"git\"]\nbuild = \"y\"\n").unwrap();
        let other_packages = p("packages = [\"jq\"]\nbuild = \"x\"\n").unwrap();
        assert_eq!(a.cache_key("base1"), same.cache_key("base1"));
        assert_ne!(a.cache_key("base1"), other_build.cache_key("base1"));
        assert_ne!(a.cache_key("base1"), other_packages.cache_key("base1"));
        assert_ne!(a.cache_key("base1"), a.cache_key("base2"));
    }

    #[test]
    fn missing_profile_lists_existing_ones() {
        let home = PenHome::at(tempfile::tempdir().unwrap().keep());
        std::fs::create_dir_all(home.profiles()).unwrap();
        std::fs::write(home.profile_file("small"), "packages = []\n").unwrap();
        let err = load(&home, "nope").unwrap_err().to_string();
        assert!(err.contains("existing profiles: small"), "{err}");
        assert!(load(&home, "Bad Name").is_err());
        assert_eq!(load(&home, "small").unwrap().profile, Profile::default());
    }
}
